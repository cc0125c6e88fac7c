//! Users and groups by name and by id, from the user database (with musl, /etc/passwd and
//! /etc/group), and whether the agent may give a file away.

use std::ffi::{CStr, CString};

/// Calls a getpw*_r / getgr*_r function with a buffer grown until the entry fits, and reads
/// what is wanted from the entry while the buffer its strings point into is alive.
fn lookup<Entry, T>(
    mut call: impl FnMut(*mut Entry, &mut [libc::c_char], *mut *mut Entry) -> libc::c_int,
    read: impl FnOnce(&Entry) -> T,
) -> Option<T> {
    let mut buf = vec![0 as libc::c_char; 1024];
    loop {
        // SAFETY: passwd and group are plain data; all-zero is valid and the call fills it.
        let mut entry: Entry = unsafe { std::mem::zeroed() };
        let mut found = std::ptr::null_mut();
        match call(&mut entry, &mut buf, &mut found) {
            libc::ERANGE if buf.len() < 1 << 20 => buf.resize(buf.len() * 2, 0),
            0 if !found.is_null() => return Some(read(&entry)),
            _ => return None,
        }
    }
}

/// A C string the database filled in, as text.
fn text(field: *const libc::c_char) -> String {
    // SAFETY: the lookup succeeded: the field points at a NUL-terminated string in its buffer.
    unsafe { CStr::from_ptr(field) }.to_string_lossy().into_owned()
}

pub fn user_name(uid: u32) -> Option<String> {
    lookup(
        // SAFETY: every pointer is valid for the length given with it.
        |entry, buf, found| unsafe { libc::getpwuid_r(uid, entry, buf.as_mut_ptr(), buf.len(), found) },
        |entry: &libc::passwd| text(entry.pw_name),
    )
}

pub fn group_name(gid: u32) -> Option<String> {
    lookup(
        // SAFETY: every pointer is valid for the length given with it.
        |entry, buf, found| unsafe { libc::getgrgid_r(gid, entry, buf.as_mut_ptr(), buf.len(), found) },
        |entry: &libc::group| text(entry.gr_name),
    )
}

/// The uid of user `name`; a number is taken as a uid (devices without a user database).
pub fn user_id(name: &str) -> Option<u32> {
    id_by_name(
        name,
        // SAFETY: every pointer is valid for the length given with it.
        |c_name, entry, buf, found| unsafe {
            libc::getpwnam_r(c_name.as_ptr(), entry, buf.as_mut_ptr(), buf.len(), found)
        },
        |entry: &libc::passwd| entry.pw_uid,
    )
}

/// The gid of group `name`; a number is taken as a gid.
pub fn group_id(name: &str) -> Option<u32> {
    id_by_name(
        name,
        // SAFETY: every pointer is valid for the length given with it.
        |c_name, entry, buf, found| unsafe {
            libc::getgrnam_r(c_name.as_ptr(), entry, buf.as_mut_ptr(), buf.len(), found)
        },
        |entry: &libc::group| entry.gr_gid,
    )
}

fn id_by_name<Entry>(
    name: &str,
    mut call: impl FnMut(&CStr, *mut Entry, &mut [libc::c_char], *mut *mut Entry) -> libc::c_int,
    read: impl FnOnce(&Entry) -> u32,
) -> Option<u32> {
    let c_name = CString::new(name).ok()?;
    lookup(|entry, buf, found| call(&c_name, entry, buf, found), read).or_else(|| name.parse().ok())
}

/// Whether `id` (named `name` in the database, if it is) is in `allowed`, by name or number.
pub fn listed(allowed: &[String], id: u32, name: Option<&str>) -> bool {
    allowed.iter().any(|entry| Some(entry.as_str()) == name || entry.parse() == Ok(id))
}

pub fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Whether the agent may chown a file of its own to `uid` (POSIX: only root gives files away).
pub fn can_give_to_user(uid: u32) -> bool {
    let me = effective_uid();
    me == 0 || me == uid
}

/// Whether the agent may chgrp a file of its own to `gid`: root, or a member of the group.
pub fn can_give_to_group(gid: u32) -> bool {
    // SAFETY: getegid has no preconditions and cannot fail.
    if effective_uid() == 0 || unsafe { libc::getegid() } == gid {
        return true;
    }
    let mut groups = vec![0 as libc::gid_t; 256];
    // SAFETY: `groups` has room for its length.
    let count = unsafe { libc::getgroups(groups.len() as libc::c_int, groups.as_mut_ptr()) };
    count > 0 && groups[..count as usize].contains(&gid)
}
