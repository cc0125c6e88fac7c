//! On the real filesystem, in temp dirs: a chroot `root` next to a directory `outside` that
//! holds a `secret` nothing may read or change.

use super::put::{check_space, give, Ids, USER};
use super::*;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::PathBuf;
use std::process::Command;

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    outside: PathBuf,
    state: PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let (root, outside, state) =
        (dir.path().join("root"), dir.path().join("outside"), dir.path().join("state"));
    fs::create_dir(&root).unwrap();
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("secret"), "secret").unwrap();
    Fixture { _dir: dir, root, outside, state }
}

impl Fixture {
    fn access(&self, settings: impl FnOnce(&mut FileTransferConfig)) -> FileAccess {
        let mut config = FileTransferConfig { chroot: self.root.clone(), ..FileTransferConfig::default() };
        settings(&mut config);
        FileAccess::new(&config, &self.state)
    }

    fn write(&self, path: &str, content: &str) -> PathBuf {
        let path = self.root.join(path);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, content).unwrap();
        path
    }

    /// The names in `dir` of the chroot, sorted.
    fn names(&self, dir: &str) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(self.root.join(dir))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    fn secret_untouched(&self) {
        assert_eq!(fs::read_to_string(self.outside.join("secret")).unwrap(), "secret");
        assert_eq!(fs::read_dir(&self.outside).unwrap().count(), 1, "something was written outside");
    }
}

fn follow(config: &mut FileTransferConfig) {
    config.follow_symlinks = true;
}

fn refused<T: fmt::Debug>(result: Result<T, FileError>) -> String {
    result.expect_err("accepted").0
}

fn read(access: &FileAccess, path: &str) -> Result<String, FileError> {
    let source = access.get(path)?;
    let mut text = String::new();
    io::Read::read_to_string(&mut &source.file, &mut text).unwrap();
    Ok(text)
}

fn sha(bytes: &[u8]) -> String {
    crate::trust::sha256_hex(bytes)
}

fn request<'a>(path: &'a str, content: &[u8], sha256: &'a str) -> PutRequest<'a> {
    PutRequest { path, size: content.len() as u64, sha256, mode: None, uid: None, gid: None }
}

fn put(access: &FileAccess, path: &str, content: &[u8]) -> Result<(), FileError> {
    let sha256 = sha(content);
    let mut target = access.begin_put(&request(path, content, &sha256))?;
    target.write(content)?;
    target.finish()
}

fn mkfifo(path: &Path) {
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: `c_path` is NUL-terminated.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
}

fn is_root() -> bool {
    users::effective_uid() == 0
}

/// A filesystem mounted for a test (as root, where mount is permitted), unmounted when dropped.
struct Mount(PathBuf);

impl Mount {
    fn new(args: &[&str], at: &Path) -> Option<Mount> {
        fs::create_dir_all(at).unwrap();
        let mounted =
            is_root() && Command::new("mount").args(args).arg(at).status().is_ok_and(|s| s.success());
        mounted.then(|| Mount(at.to_path_buf()))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn dot_dot_and_absolute_paths_stay_inside_the_chroot() {
    let f = fixture();
    f.write("etc/passwd", "inside");
    fs::create_dir(f.root.join("a")).unwrap();
    let access = f.access(|_| {});
    let outside = format!("leads outside file_transfer.chroot ({})", f.root.display());
    for path in ["../outside/secret", "a/../../outside/secret", "/../outside/secret", "a/../.."] {
        assert_eq!(refused(access.get(path)), format!("{path}: {outside}"));
        assert!(refused(put(&access, path, b"x")).ends_with(&outside), "{path}");
        assert!(refused(access.ls(path)).ends_with(&outside), "{path}");
    }
    assert_eq!(read(&access, "/etc/passwd").unwrap(), "inside", "absolute paths start at the chroot");
    assert_eq!(read(&access, "a/./../etc//passwd").unwrap(), "inside");
    assert_eq!(refused(access.get("/etc/shadow")), "/etc/shadow: No such file or directory");
    assert_eq!(refused(access.get("/")), "/ is a directory");
    f.secret_untouched();
}

#[test]
fn symbolic_links_are_refused_unless_followed_and_never_lead_out() {
    let f = fixture();
    f.write("data/real.txt", "real");
    symlink(&f.outside, f.root.join("abs-out")).unwrap();
    symlink("../outside", f.root.join("rel-out")).unwrap();
    symlink(f.outside.join("secret"), f.root.join("last")).unwrap();
    symlink("real.txt", f.root.join("data/alias")).unwrap();
    symlink(f.root.join("data"), f.root.join("abs-in")).unwrap();
    symlink("loop-b", f.root.join("loop-a")).unwrap();
    symlink("loop-a", f.root.join("loop-b")).unwrap();

    let strict = f.access(|_| {});
    let not_followed = "is a symbolic link (file_transfer.follow_symlinks is false)";
    assert_eq!(refused(strict.get("abs-out/secret")), format!("/abs-out {not_followed}"));
    assert_eq!(refused(strict.get("last")), format!("/last {not_followed}"));
    assert_eq!(refused(strict.get("data/alias")), format!("/data/alias {not_followed}"));
    assert_eq!(refused(put(&strict, "last", b"x")), format!("/last {not_followed}"));
    assert_eq!(refused(put(&strict, "abs-out/new", b"x")), format!("/abs-out {not_followed}"));

    let following = f.access(follow);
    let root = f.root.canonicalize().unwrap();
    let points_out = |link: &str, to: &Path| {
        format!("{link} points to {}, outside file_transfer.chroot ({})", to.display(), root.display())
    };
    assert_eq!(refused(following.get("abs-out/secret")), points_out("/abs-out", &f.outside));
    assert_eq!(refused(following.get("last")), points_out("/last", &f.outside.join("secret")));
    assert_eq!(refused(put(&following, "last", b"x")), points_out("/last", &f.outside.join("secret")));
    assert!(refused(following.get("rel-out/secret")).contains("leads outside file_transfer.chroot"));
    assert!(refused(put(&following, "rel-out/new", b"x")).contains("leads outside"));
    assert_eq!(read(&following, "data/alias").unwrap(), "real");
    assert_eq!(read(&following, "abs-in/alias").unwrap(), "real", "an absolute link inside the chroot");
    assert_eq!(refused(following.get("loop-a")), "loop-a: more than 40 symbolic links");
    f.secret_untouched();
}

#[test]
fn a_link_swapped_in_after_the_walk_is_not_followed() {
    let f = fixture();
    let file = f.write("dir/file", "inside");
    let access = f.access(follow);
    let root = access.root().unwrap();

    // The last component becomes a link to outside between the walk and the open.
    let location = resolve(root, "dir/file", true, Leaf::Follow).unwrap();
    fs::remove_file(&file).unwrap();
    symlink(f.outside.join("secret"), &file).unwrap();
    let error = open_last(&location, location.file_name().unwrap(), libc::O_RDONLY, true).unwrap_err();
    assert_eq!(error.0, "/dir/file became a symbolic link while being opened");

    // A directory of the path becomes a link to outside: the directory held is used.
    fs::remove_file(&file).unwrap();
    fs::write(&file, "inside").unwrap();
    let location = resolve(root, "dir/secret", true, Leaf::Follow).unwrap();
    fs::rename(f.root.join("dir"), f.root.join("moved")).unwrap();
    symlink(&f.outside, f.root.join("dir")).unwrap();
    let error = open_last(&location, location.file_name().unwrap(), libc::O_RDONLY, true).unwrap_err();
    assert_eq!(
        error.0, "/dir/secret: No such file or directory",
        "looked in the directory held, not outside"
    );
    f.secret_untouched();
}

#[test]
fn proc_magic_links_are_refused() {
    let everything = FileTransferConfig { follow_symlinks: true, chroot: "/".into(), ..Default::default() };
    let access = FileAccess::new(&everything, Path::new("/nonexistent"));
    assert_eq!(
        refused(access.get("/proc/self/root/etc/passwd")),
        "/proc/self is a link in /proc: magic links are refused"
    );
    assert_eq!(
        refused(access.get("/proc/1/root/etc/passwd")),
        "/proc/1/root is a link in /proc: magic links are refused"
    );
    assert_eq!(refused(access.ls("/proc/1/cwd")), "/proc/1/cwd is a link in /proc: magic links are refused");

    let f = fixture();
    symlink("/proc", f.root.join("proc")).unwrap();
    let points_out = refused(f.access(follow).get("/proc/self/root/etc/passwd"));
    assert!(points_out.starts_with("/proc points to /proc, outside file_transfer.chroot"), "{points_out}");
    let strict = refused(f.access(|_| {}).get("/proc/self/root/etc/passwd"));
    assert!(strict.starts_with("/proc is a symbolic link"), "{strict}");

    fs::remove_file(f.root.join("proc")).unwrap();
    if let Some(_proc) = Mount::new(&["-t", "proc", "proc"], &f.root.join("proc")) {
        let error = refused(f.access(follow).get("/proc/self/root/etc/passwd"));
        assert_eq!(error, "/proc/self is a link in /proc: magic links are refused");
    }
}

#[test]
fn devices_and_fifos_are_refused_when_regular_files_only() {
    let f = fixture();
    mkfifo(&f.root.join("fifo"));
    let access = f.access(|_| {});
    let not_regular = "not a regular file (file_transfer.regular_files_only is true)";
    assert_eq!(refused(access.get("fifo")), format!("/fifo is a FIFO, {not_regular}"));
    assert_eq!(refused(put(&access, "fifo", b"x")), format!("/fifo is a FIFO, {not_regular}"));
    let everything = FileTransferConfig { chroot: "/".into(), ..Default::default() };
    let dev = FileAccess::new(&everything, &f.state);
    assert_eq!(refused(dev.get("/dev/null")), format!("/dev/null is a character device, {not_regular}"));

    // Allowed, a FIFO opens without waiting for a writer.
    let lax = f.access(|c| c.regular_files_only = false);
    assert_eq!(lax.get("fifo").unwrap().size, 0);
    assert_eq!(refused(lax.get("/")), "/ is a directory");
}

#[test]
fn owner_and_group_lists_limit_what_is_read() {
    let f = fixture();
    f.write("file", "x");
    let (uid, gid) = (users::effective_uid(), unsafe { libc::getegid() });
    let (me, my_group) = (users::user_name(uid).unwrap(), users::group_name(gid).unwrap());
    let other = (uid + 4242).to_string();
    assert!(f.access(|c| c.owner_get = vec![other.clone(), me.clone()]).get("file").is_ok());
    assert!(f.access(|c| c.owner_get = vec![uid.to_string()]).get("file").is_ok(), "by number");
    assert!(f.access(|c| c.group_get = vec![my_group.clone()]).get("file").is_ok());
    assert_eq!(
        refused(f.access(|c| c.owner_get = vec![other.clone()]).get("file")),
        format!("/file is owned by {me}, not by a user in file_transfer.owner_get ({other})")
    );
    assert_eq!(
        refused(f.access(|c| c.group_get = vec!["nosuchgroup".into(), other.clone()]).get("file")),
        format!("/file belongs to group {my_group}, not to a group in file_transfer.group_get (nosuchgroup, {other})")
    );
}

#[test]
fn sizes_over_the_limit_are_refused() {
    let f = fixture();
    f.write("big", "0123456789");
    let access = f.access(|c| c.max_file_size = 9);
    assert_eq!(refused(access.get("big")), "/big is 10 bytes, more than file_transfer.max_file_size (9)");
    assert_eq!(
        refused(put(&access, "new", b"0123456789")),
        "/new would be 10 bytes, more than file_transfer.max_file_size (9)"
    );
    assert!(f.access(|c| c.max_file_size = 0).get("big").is_ok(), "0: no limit");
    assert_eq!(f.names(""), ["big"]);
}

#[test]
fn get_reports_what_it_opened_and_the_disable_switch_refuses_all() {
    let f = fixture();
    let path = f.write("file", "hello world");
    fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
    let source = f.access(|_| {}).get("file").unwrap();
    assert_eq!((source.size, source.mode, source.uid), (11, 0o640, users::effective_uid()));
    assert_eq!(source.mtime, fs::metadata(&path).unwrap().mtime());
    assert_eq!(sha256_prefix(&source.file, 5).unwrap(), sha(b"hello"));
    assert_eq!(sha256_prefix(&source.file, 11).unwrap(), sha(b"hello world"));
    assert!(sha256_prefix(&source.file, 12).is_err());

    let disabled = f.access(|c| c.disable = true);
    let off = "file transfer is disabled on this device (file_transfer.disable)";
    assert_eq!((refused(disabled.get("file")), refused(disabled.ls("/"))), (off.into(), off.into()));
    assert_eq!(refused(put(&disabled, "new", b"x")), off);
    let missing = refused(f.access(|c| c.chroot = f.root.join("missing")).ls("/"));
    assert!(missing.starts_with("file_transfer.chroot ") && missing.ends_with("No such file or directory"));
}

#[test]
fn ls_lists_sorted_and_shows_links_as_links() {
    let f = fixture();
    let b = f.write("d/b.txt", "12345");
    fs::set_permissions(&b, fs::Permissions::from_mode(0o640)).unwrap();
    fs::create_dir(f.root.join("d/a")).unwrap();
    symlink("b.txt", f.root.join("d/c")).unwrap();
    mkfifo(&f.root.join("d/f"));
    let access = f.access(|_| {});
    let entries = access.ls("d").unwrap();
    let summary: Vec<(&str, Kind, Option<&str>)> =
        entries.iter().map(|e| (e.name.as_str(), e.kind, e.link.as_deref())).collect();
    assert_eq!(
        summary,
        [
            ("a", Kind::Dir, None),
            ("b.txt", Kind::File, None),
            ("c", Kind::Symlink, Some("b.txt")),
            ("f", Kind::Other, None)
        ]
    );
    let file = &entries[1];
    assert_eq!((file.size, file.mode, file.mtime), (5, 0o640, fs::metadata(&b).unwrap().mtime()));
    assert_eq!(file.owner, users::user_name(users::effective_uid()).unwrap());
    assert_eq!(serde_json::to_value(file).unwrap()["kind"], "file");

    assert_eq!(access.ls("d/c").unwrap()[0].kind, Kind::Symlink, "not followed");
    assert_eq!(f.access(follow).ls("d/c").unwrap()[0].kind, Kind::File, "followed");
    assert_eq!(access.ls("d/b.txt").unwrap().len(), 1);
    assert_eq!(access.ls("/").unwrap()[0].name, "d");
    assert_eq!(access.ls("d/a/..").unwrap().len(), 4);
    assert_eq!(refused(access.ls("d/missing")), "/d/missing: No such file or directory");
}

#[test]
fn a_put_is_atomic_and_resumes_where_it_was_cut() {
    let f = fixture();
    let target = f.write("conf", "old");
    let access = f.access(|_| {});
    let content: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let sha256 = sha(&content);
    let mut cut = access.begin_put(&request("conf", &content, &sha256)).unwrap();
    assert_eq!(cut.offset(), 0);
    cut.write(&content[..40_000]).unwrap();
    drop(cut); // the link is lost
    assert_eq!(fs::read_to_string(&target).unwrap(), "old");
    let temp = f.names("").into_iter().find(|n| n.starts_with(".tether-put-")).expect("temp kept");
    assert!(temp.ends_with(".part") && temp.len() == ".tether-put-.part".len() + 16, "{temp}");
    assert_eq!(fs::metadata(f.root.join(&temp)).unwrap().permissions().mode() & 0o777, 0o600);

    let mut resumed = access.begin_put(&request("/./conf", &content, &sha256)).unwrap();
    assert_eq!(resumed.offset(), 40_000, "the same file, however named, resumes");
    assert!(refused(resumed.write(&content)).contains("more than the 100000 bytes announced"));
    resumed.write(&content[40_000..]).unwrap();
    resumed.finish().unwrap();
    assert_eq!(fs::read(&target).unwrap(), content);
    assert_eq!(f.names(""), ["conf"], "no temp left");
    assert_eq!(fs::read_to_string(f.state.join("file-puts.json")).unwrap(), r#"{"temps":[]}"#);
}

#[test]
fn a_wrong_sha256_leaves_nothing_under_the_target_name() {
    let f = fixture();
    f.write("conf", "old");
    let access = f.access(|_| {});
    let wrong = sha(b"something else");
    for path in ["conf", "fresh"] {
        let mut target = access.begin_put(&request(path, b"new", &wrong)).unwrap();
        target.write(b"new").unwrap();
        let error = refused(target.finish());
        assert!(
            error.starts_with(&format!("/{path}: sha256 mismatch: the bytes received have {}", sha(b"new")))
        );
    }
    assert_eq!(f.names(""), ["conf"]);
    assert_eq!(fs::read_to_string(f.root.join("conf")).unwrap(), "old");
    let short = access.begin_put(&request("fresh", b"new", &sha(b"new"))).unwrap();
    assert_eq!(refused(short.finish()), "/fresh: 0 bytes received of 3");
    put(&access, "x", b"1").unwrap();
}

#[test]
fn allow_overwrite_false_never_replaces_a_file() {
    let f = fixture();
    f.write("conf", "old");
    let access = f.access(|c| c.allow_overwrite = false);
    assert_eq!(
        refused(put(&access, "conf", b"new")),
        "/conf exists (file_transfer.allow_overwrite is false)"
    );
    put(&access, "fresh", b"new").unwrap();
    // Made by someone else while the put was under way: kept, the put refused.
    let mut late = access.begin_put(&request("late", b"new", &sha(b"new"))).unwrap();
    late.write(b"new").unwrap();
    f.write("late", "theirs");
    assert_eq!(refused(late.finish()), "/late exists (file_transfer.allow_overwrite is false)");
    assert_eq!(fs::read_to_string(f.root.join("late")).unwrap(), "theirs");
    assert_eq!(f.names(""), ["conf", "fresh", "late"]);
    assert_eq!(
        refused(put(&access, ".tether-put-0123456789abcdef.part", b"x")),
        "/.tether-put-0123456789abcdef.part: the name of a put's temp file is not for a target"
    );
    assert_eq!(refused(put(&f.access(|_| {}), "/", b"x")), "/ is a directory");
}

#[test]
fn free_space_is_checked_before_anything_is_written() {
    assert_eq!(check_space("/data", 10, 10), Ok(()));
    assert_eq!(refused(check_space("/data", 10, 11)), "not enough space in /data: 10 bytes free, 11 needed");

    let f = fixture();
    let Some(_tmpfs) = Mount::new(&["-t", "tmpfs", "-o", "size=64k", "tmpfs"], &f.root.join("small")) else {
        eprintln!("not root, or mount not permitted: the arithmetic alone was tested");
        return;
    };
    let access = f.access(|_| {});
    let big = vec![7u8; 1 << 20];
    let error = refused(access.begin_put(&request("small/big", &big, &sha(&big))));
    assert!(
        error.starts_with("not enough space in /small: ") && error.ends_with(" bytes free, 1048576 needed")
    );
    assert!(f.names("small").is_empty(), "nothing written");
    assert!(!f.state.join("file-puts.json").exists(), "nothing recorded");

    // Full while writing (the space went to someone else): the error says so, the target stays.
    f.write("small/conf", "old");
    let half = vec![1u8; 40_000];
    let mut target = access.begin_put(&request("small/conf", &half, &sha(&half))).unwrap();
    f.write("small/hog", &"x".repeat(40_000));
    let error = (0..4).map(|_| target.write(&half[..10_000])).find_map(Result::err).expect("the disk filled");
    assert!(error.0.ends_with("No space left on device"), "{error}");
    target.abort();
    assert_eq!(f.names("small"), ["conf", "hog"]);
    assert_eq!(fs::read_to_string(f.root.join("small/conf")).unwrap(), "old");
}

#[test]
fn a_killed_agent_s_temp_files_are_removed_at_the_next_start_and_the_put_starts_over() {
    let f = fixture();
    f.write("conf", "old");
    let content = b"new content";
    let sha256 = sha(content);
    {
        let access = f.access(|_| {});
        let mut target = access.begin_put(&request("conf", content, &sha256)).unwrap();
        target.write(&content[..4]).unwrap();
        // kill -9: nothing more runs.
        std::mem::forget(target);
    }
    let temp = f.names("").into_iter().find(|n| n.starts_with(".tether-put-")).unwrap();
    let journal = fs::read_to_string(f.state.join("file-puts.json")).unwrap();
    let real = f.root.canonicalize().unwrap().join(&temp);
    assert!(journal.contains(real.to_str().unwrap()), "{journal}");

    assert_eq!(cleanup_at_start(&f.state), [real]);
    assert_eq!(f.names(""), ["conf"]);
    assert_eq!(fs::read_to_string(f.root.join("conf")).unwrap(), "old");
    assert!(!f.state.join("file-puts.json").exists());
    assert_eq!(cleanup_at_start(&f.state), Vec::<PathBuf>::new());

    // A temp file this agent did not make is not resumed: it is replaced.
    f.write(&temp, "planted");
    let access = f.access(|_| {});
    let mut target = access.begin_put(&request("conf", content, &sha256)).unwrap();
    assert_eq!(target.offset(), 0);
    target.write(content).unwrap();
    target.finish().unwrap();
    assert_eq!(fs::read(f.root.join("conf")).unwrap(), content);

    // A journal naming other files (edited by hand, say) removes nothing else.
    fs::write(
        f.state.join("file-puts.json"),
        format!(r#"{{"temps":["{}"]}}"#, f.root.join("conf").display()),
    )
    .unwrap();
    assert!(cleanup_at_start(&f.state).is_empty());
    assert!(f.root.join("conf").exists());
}

#[test]
fn a_retried_put_supersedes_the_one_cut_before_the_device_noticed() {
    let f = fixture();
    let access = f.access(|_| {});
    let content = b"0123456789";
    let sha256 = sha(content);
    let mut first = access.begin_put(&request("file", content, &sha256)).unwrap();
    first.write(&content[..3]).unwrap();
    let mut second = access.begin_put(&request("file", content, &sha256)).unwrap();
    assert_eq!(second.offset(), 3);
    assert_eq!(refused(first.write(b"x")), "/file: superseded by a newer put of the same file");
    first.abort(); // leaves the temp file to the second
    second.write(&content[3..]).unwrap();
    // Hashing a big file takes a while: the event loop may hand `finish` to a worker thread.
    let finishing = std::thread::spawn(move || second.finish());
    finishing.join().unwrap().unwrap();
    assert_eq!(fs::read(f.root.join("file")).unwrap(), content);
}

#[test]
fn a_put_finishing_after_a_retry_took_its_file_over_leaves_the_file_to_the_retry() {
    let f = fixture();
    let access = f.access(|_| {});
    let content = b"0123456789";
    let sha256 = sha(content);
    let mut first = access.begin_put(&request("file", content, &sha256)).unwrap();
    first.write(content).unwrap();
    let second = access.begin_put(&request("file", content, &sha256)).unwrap();
    assert_eq!(second.offset(), 10);
    assert_eq!(refused(first.finish()), "/file: superseded by a newer put of the same file");
    assert!(!f.root.join("file").exists());
    second.finish().unwrap();
    assert_eq!(fs::read(f.root.join("file")).unwrap(), content);
    assert_eq!(f.names(""), ["file"], "no temp file left");
}

#[test]
fn umask_and_preserve_mode_set_the_mode_and_a_replaced_file_keeps_its_own() {
    let f = fixture();
    let mode_of = |name: &str| fs::metadata(f.root.join(name)).unwrap().permissions().mode() & 0o7777;
    let with_mode = |path: &'static str, mode: u32, access: &FileAccess| {
        let sha256 = sha(b"x");
        let mut target =
            access.begin_put(&PutRequest { mode: Some(mode), ..request(path, b"x", &sha256) }).unwrap();
        target.write(b"x").unwrap();
        target.finish().unwrap();
    };
    let umask_027 = f.access(|c| c.umask = 0o027);
    put(&umask_027, "new", b"x").unwrap();
    assert_eq!(mode_of("new"), 0o640);
    with_mode("ignored", 0o755, &umask_027);
    assert_eq!(mode_of("ignored"), 0o640, "the operator's mode without preserve_mode");

    let preserving = f.access(|c| (c.umask, c.preserve_mode) = (0o027, true));
    with_mode("script", 0o4775, &preserving);
    assert_eq!(mode_of("script"), 0o750, "umask applied, setuid never");

    fs::set_permissions(f.root.join("new"), fs::Permissions::from_mode(0o604)).unwrap();
    put(&umask_027, "new", b"y").unwrap();
    assert_eq!(mode_of("new"), 0o604, "kept");
}

#[test]
fn owners_are_given_as_the_settings_say_or_refused_with_the_reason() {
    let f = fixture();
    let owner = |name: &str| {
        let meta = fs::metadata(f.root.join(name)).unwrap();
        (meta.uid(), meta.gid())
    };
    let never = Ids { can_give: |_| false, ..USER };
    assert_eq!(
        refused(give(&never, "/x", Some("7"), None, None)),
        format!("cannot give /x to user 7 (file_transfer.owner_put): only root gives files away (the agent runs as uid {})", users::effective_uid())
    );
    assert_eq!(
        refused(give(&never, "/x", None, Some(7), None)).split(':').next(),
        Some("cannot give /x to user 7 (file_transfer.preserve_owner)")
    );
    assert_eq!(
        give(&never, "/x", None, None, Some(7)),
        Ok(None),
        "a replaced file's owner is kept only when possible"
    );
    assert_eq!(
        refused(f.access(|c| c.owner_put = Some("no-such-user".into())).begin_put(&request(
            "x",
            b"x",
            &sha(b"x")
        ))),
        "file_transfer.owner_put: there is no user no-such-user on this device"
    );
    if !is_root() {
        let error = refused(put(&f.access(|c| c.group_put = Some("0".into())), "x", b"x"));
        assert!(error.starts_with("cannot give /x to group 0 (file_transfer.group_put)"), "{error}");
        return;
    }
    put(&f.access(|c| (c.owner_put, c.group_put) = (Some("1".into()), Some("2".into()))), "given", b"x")
        .unwrap();
    assert_eq!(owner("given"), (1, 2));
    let preserving = f.access(|c| (c.preserve_owner, c.preserve_group) = (true, true));
    let sha256 = sha(b"x");
    let mut target = preserving
        .begin_put(&PutRequest { uid: Some(3), gid: Some(4), ..request("preserved", b"x", &sha256) })
        .unwrap();
    target.write(b"x").unwrap();
    target.finish().unwrap();
    assert_eq!(owner("preserved"), (3, 4));
    put(&f.access(|_| {}), "given", b"y").unwrap();
    assert_eq!(owner("given"), (1, 2), "a replaced file keeps its owner");
}
