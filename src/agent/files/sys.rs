//! Thin wrappers of the *at(2) calls the file access layer is made of: every name is looked up
//! in a directory held open, never from a path string the kernel would resolve on its own.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Retries a call interrupted by a signal; -1 becomes the error in errno.
fn check(mut call: impl FnMut() -> libc::c_long) -> io::Result<libc::c_long> {
    loop {
        match call() {
            -1 => match io::Error::last_os_error() {
                e if e.kind() == io::ErrorKind::Interrupted => continue,
                e => return Err(e),
            },
            n => return Ok(n),
        }
    }
}

/// `openat(dir, name, flags | O_CLOEXEC, mode)`.
pub fn openat(dir: impl AsFd, name: &CStr, flags: libc::c_int, mode: libc::mode_t) -> io::Result<File> {
    let flags = flags | libc::O_CLOEXEC;
    let fd = dir.as_fd().as_raw_fd();
    // SAFETY: `name` is NUL-terminated; the kernel checks `fd`.
    let opened =
        check(|| unsafe { libc::openat(fd, name.as_ptr(), flags, libc::c_uint::from(mode)) }.into())?;
    // SAFETY: openat returned a new descriptor that nothing else owns.
    Ok(unsafe { File::from_raw_fd(opened as libc::c_int) })
}

/// The entry `name` itself, never what it links to: O_PATH opens a link as a link, and has no
/// side effect on a device or a FIFO (it is not an open for reading or writing).
pub fn open_entry(dir: impl AsFd, name: &CStr) -> io::Result<File> {
    openat(dir, name, libc::O_PATH | libc::O_NOFOLLOW, 0)
}

/// A directory held by an O_PATH descriptor, opened for reading (to list it, fsync it).
pub fn reopen_dir(dir: impl AsFd) -> io::Result<File> {
    openat(dir, c".", libc::O_RDONLY | libc::O_DIRECTORY, 0)
}

/// The text of the link `link` (opened by `open_entry`): the very link that was examined.
pub fn read_link(link: impl AsFd) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 256];
    loop {
        let fd = link.as_fd().as_raw_fd();
        // SAFETY: `buf` is writable for its length; "" with an O_PATH descriptor names the link.
        let n =
            check(|| unsafe { libc::readlinkat(fd, c"".as_ptr(), buf.as_mut_ptr().cast(), buf.len()) } as _)?;
        if (n as usize) < buf.len() {
            buf.truncate(n as usize);
            return Ok(buf);
        }
        buf.resize(buf.len() * 4, 0);
    }
}

pub fn unlinkat(dir: impl AsFd, name: &CStr) -> io::Result<()> {
    let fd = dir.as_fd().as_raw_fd();
    // SAFETY: `name` is NUL-terminated.
    check(|| unsafe { libc::unlinkat(fd, name.as_ptr(), 0) }.into()).map(drop)
}

/// Renames `from` over `to` in `dir`; with `replace` false, fails with EEXIST when `to` exists.
pub fn renameat(dir: impl AsFd, from: &CStr, to: &CStr, replace: bool) -> io::Result<()> {
    let fd = dir.as_fd().as_raw_fd();
    if replace {
        // SAFETY: both names are NUL-terminated.
        return check(|| unsafe { libc::renameat(fd, from.as_ptr(), fd, to.as_ptr()) }.into()).map(drop);
    }
    let no_replace = libc::RENAME_NOREPLACE;
    // SAFETY: as renameat, with flags; musl has no renameat2 wrapper on every version.
    let renamed = check(|| unsafe {
        libc::syscall(libc::SYS_renameat2, fd, from.as_ptr(), fd, to.as_ptr(), no_replace)
    });
    match renamed {
        // Kernels before 3.15, or a filesystem without the flag: check, then rename. Only a
        // local user creating the same name in between could be overwritten.
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EINVAL)) => {
            match open_entry(&dir, to) {
                Ok(_) => Err(io::Error::from_raw_os_error(libc::EEXIST)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => renameat(dir, from, to, true),
                Err(e) => Err(e),
            }
        }
        other => other.map(drop),
    }
}

/// Whether `fd` is on procfs, where links are "magic": /proc/PID/root, cwd, fd/N lead wherever
/// the process's are, whatever their text says.
#[allow(clippy::unnecessary_cast)] // f_type is signed or unsigned, 32 or 64 bits, by target
pub fn is_procfs(fd: impl AsFd) -> io::Result<bool> {
    const PROC_SUPER_MAGIC: u64 = 0x9fa0;
    // SAFETY: statfs is plain numbers, so all-zero is valid.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let raw = fd.as_fd().as_raw_fd();
    // SAFETY: `st` is writable.
    check(|| unsafe { libc::fstatfs(raw, &mut st) }.into())?;
    Ok(st.f_type as u64 == PROC_SUPER_MAGIC)
}

/// The names in directory `dir` (opened for reading), `.` and `..` left out, unsorted.
pub fn read_dir_names(dir: &File) -> io::Result<Vec<CString>> {
    let fd: OwnedFd = dir.try_clone()?.into();
    // SAFETY: fdopendir takes `fd` over (closedir closes it) only when it succeeds.
    let stream = unsafe { libc::fdopendir(fd.as_raw_fd()) };
    if stream.is_null() {
        return Err(io::Error::last_os_error());
    }
    std::mem::forget(fd);
    let mut names = Vec::new();
    let result = loop {
        // SAFETY: errno is this thread's; readdir leaves it alone at the end and sets it on error.
        unsafe { *libc::__errno_location() = 0 };
        // SAFETY: `stream` is an open directory stream used by this thread only.
        let entry = unsafe { libc::readdir(stream) };
        if entry.is_null() {
            let error = io::Error::last_os_error();
            break if error.raw_os_error() == Some(0) { Ok(names) } else { Err(error) };
        }
        // SAFETY: readdir returned an entry whose d_name is NUL-terminated.
        let name = unsafe { CStr::from_ptr((*entry).d_name.as_ptr()) };
        if name != c"." && name != c".." {
            names.push(name.to_owned());
        }
    };
    // SAFETY: `stream` is open, and not used after this.
    unsafe { libc::closedir(stream) };
    result
}

/// A path's bytes as a C string; a NUL in it is an error.
pub fn c_name(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a name holds a NUL byte"))
}

pub fn path_of(bytes: &[u8]) -> &Path {
    Path::new(std::ffi::OsStr::from_bytes(bytes))
}
