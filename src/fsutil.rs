//! Files that must survive power loss are replaced atomically: write a temporary file, fsync
//! it, rename it over the old one, fsync the directory. A reader sees the old or the new
//! content, never a torn mix.
//!
//! The agent often runs as root: every file it creates is created exclusively and never
//! through a symbolic link, so another local user cannot plant a link and have it overwrite a
//! file of their choosing. A missing state directory (deleted under a running agent) is made
//! again, private.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Replaces `path` with `bytes`, readable only by the agent's user (0600).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = parent(path);
    let name = path.file_name().ok_or_else(|| io::Error::other("no file name"))?;
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    let mut file = create_new(&tmp)?;
    let written = file.write_all(bytes).and_then(|_| file.sync_all());
    drop(file);
    if let Err(e) = written.and_then(|_| fs::rename(&tmp, path)) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(dir)
}

/// Overwrites a small file of fixed size in place (its blocks are already on disk, so this
/// works on a full disk too), or creates it atomically. For content whose every version has
/// the same length, e.g. a zero-padded counter: a reader sees the old or the new one.
pub fn overwrite_small(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let opened = OpenOptions::new().write(true).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC).open(path);
    match opened {
        Ok(file) if file.metadata()?.len() == bytes.len() as u64 => {
            file.write_all_at(bytes, 0)?;
            file.sync_data()
        }
        Ok(_) => write_atomic(path, bytes),
        // Missing, or a link someone planted: the rename puts a file of ours in its place.
        Err(e) if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ELOOP) => {
            write_atomic(path, bytes)
        }
        Err(e) => Err(e),
    }
}

/// Creates `path` exclusively (0600), never through a link: a leftover from a crash is removed
/// first (removing a link removes the link, not its target). A missing parent is made again.
pub fn create_new(path: &Path) -> io::Result<File> {
    let new = OpenOptions::new().write(true).create_new(true).clone();
    match open_private(path, &new) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            fs::remove_file(path)?;
            open_private(path, &new)
        }
        other => other,
    }
}

/// Opens `path` to read and append, creating it (0600) if missing, never through a link: a
/// journal. A missing parent is made again.
pub fn open_append(path: &Path) -> io::Result<File> {
    open_private(path, OpenOptions::new().read(true).append(true).create(true))
}

/// Opens with `options`, a file created 0600 and never through a link; a missing parent
/// directory is made again (private) and the open tried once more.
fn open_private(path: &Path, options: &OpenOptions) -> io::Result<File> {
    let mut options = options.clone();
    options.mode(0o600).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC);
    match options.open(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            create_private_dir(parent(path))?;
            options.open(path)
        }
        other => other,
    }
}

fn parent(path: &Path) -> &Path {
    path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// Makes sure `dir` exists, belongs to the agent's user and is private (0700): a directory
/// that someone else owns is refused, a looser mode is tightened.
pub fn secure_private_dir(dir: &Path) -> Result<(), String> {
    create_private_dir(dir).map_err(|e| format!("cannot create it: {}", error_text(&e)))?;
    let meta = fs::metadata(dir).map_err(|e| error_text(&e))?;
    if !meta.is_dir() {
        return Err("not a directory".into());
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err(format!(
            "owned by uid {}, not by the agent's user (uid {me}): chown it, or choose another state_dir",
            meta.uid()
        ));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("cannot make it private (mode {mode:o}): {}", error_text(&e)))?;
        log::warn!("{}: mode was {mode:o}, now 700 (the agent's state is private)", dir.display());
    }
    Ok(())
}

/// Makes a rename or unlink in `dir` durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates `dir` (and parents) private to the agent's user (0700) when missing.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// An io::Error as people read it: "No such file or directory", without " (os error 2)".
pub fn error_text(e: &io::Error) -> String {
    let text = e.to_string();
    match e.raw_os_error() {
        Some(code) => text.strip_suffix(&format!(" (os error {code})")).unwrap_or(&text).to_string(),
        None => text,
    }
}

/// Bytes that unprivileged users may still write on the filesystem of `fd`.
pub fn free_bytes(fd: impl std::os::fd::AsFd) -> io::Result<u64> {
    use std::os::fd::AsRawFd;
    // SAFETY: statvfs is plain numbers, so all-zero is valid.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is writable. (A hung NFS server can make it wait: retried when a signal cuts it.)
    while unsafe { libc::fstatvfs(fd.as_fd().as_raw_fd(), &mut st) } != 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    // The field types differ between libcs and word sizes, hence the casts.
    let (available, fragment, block) = (st.f_bavail as u64, st.f_frsize as u64, st.f_bsize as u64);
    // Very old kernels leave f_frsize zero; f_bsize is the unit then.
    Ok(available.saturating_mul(if fragment > 0 { fragment } else { block }))
}

/// Reads a small state file; `Ok(None)` when it does not exist.
pub fn read_optional(path: &Path) -> io::Result<Option<Vec<u8>>> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn atomic_write_replaces_content_with_private_mode() {
        let dir = std::env::temp_dir().join(format!("tether-fsutil-{}", std::process::id()));
        create_private_dir(&dir).unwrap();
        let path = dir.join("state.json");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
        assert_eq!(read_optional(&dir.join("missing")).unwrap(), None);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_planted_link_is_never_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, b"precious").unwrap();
        let state = dir.path().join("state");
        create_private_dir(&state).unwrap();
        std::os::unix::fs::symlink(&victim, state.join(".seq.tmp")).unwrap();
        std::os::unix::fs::symlink(&victim, state.join("seq")).unwrap();
        write_atomic(&state.join("seq"), b"1").unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        assert_eq!(fs::read(state.join("seq")).unwrap(), b"1");
        assert!(!fs::symlink_metadata(state.join("seq")).unwrap().file_type().is_symlink());
        std::os::unix::fs::symlink(&victim, state.join("counter")).unwrap();
        overwrite_small(&state.join("counter"), b"8").unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        assert_eq!(fs::read(state.join("counter")).unwrap(), b"8");
    }

    #[test]
    fn small_files_are_overwritten_in_place_and_a_deleted_dir_is_made_again() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let path = state.join("counter");
        overwrite_small(&path, b"0001").unwrap();
        let inode = fs::metadata(&path).unwrap().ino();
        overwrite_small(&path, b"0002").unwrap();
        assert_eq!((fs::read(&path).unwrap(), fs::metadata(&path).unwrap().ino()), (b"0002".to_vec(), inode));
        fs::remove_dir_all(&state).unwrap();
        overwrite_small(&path, b"0003").unwrap();
        assert_eq!(fs::metadata(&state).unwrap().permissions().mode() & 0o777, 0o700);
    }

    #[test]
    fn a_loose_state_dir_is_tightened() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        fs::create_dir(&state).unwrap();
        fs::set_permissions(&state, fs::Permissions::from_mode(0o777)).unwrap();
        secure_private_dir(&state).unwrap();
        assert_eq!(fs::metadata(&state).unwrap().permissions().mode() & 0o777, 0o700);
    }
}
