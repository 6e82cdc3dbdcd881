//! The C ABI's numbers the preload stub uses. The stub is built on its own,
//! without the libc crate (see `preload_stub.rs`), so it includes this file
//! (`#[path]`); the library's unit test below includes it too and checks
//! every number against the libc crate's, for the architecture built.
//!
//! Plain constants only: no code, nothing to allocate or unwind.

#![allow(dead_code)] // each includer uses part of it

use core::ffi::c_int;

/// `AT_SECURE` (getauxval).
pub const AT_SECURE: u64 = 23;
/// `PT_LOAD`.
pub const PT_LOAD: u32 = 1;
/// `PF_X`.
pub const PF_X: u32 = 1;
/// `RTLD_NOW`.
pub const RTLD_NOW: c_int = 2;
/// `RTLD_NEXT`, as an address.
pub const RTLD_NEXT_ADDR: isize = -1;
/// `SYS_mprotect`.
#[cfg(target_arch = "x86_64")]
pub const SYS_MPROTECT: i64 = 10;
/// `SYS_mprotect`.
#[cfg(target_arch = "aarch64")]
pub const SYS_MPROTECT: i64 = 226;
/// `SYS_exit_group`.
#[cfg(target_arch = "x86_64")]
pub const SYS_EXIT_GROUP: i64 = 231;
/// `SYS_exit_group`.
#[cfg(target_arch = "aarch64")]
pub const SYS_EXIT_GROUP: i64 = 94;
/// `ESRCH`.
pub const ESRCH: c_int = 3;
/// `O_RDONLY`.
pub const O_RDONLY: c_int = 0;
/// `O_NOFOLLOW`.
#[cfg(target_arch = "x86_64")]
pub const O_NOFOLLOW: c_int = 0o400000;
/// `O_NOFOLLOW`.
#[cfg(target_arch = "aarch64")]
pub const O_NOFOLLOW: c_int = 0o100000;
/// `O_CLOEXEC`.
pub const O_CLOEXEC: c_int = 0o2000000;
/// `HUGETLBFS_MAGIC` (statfs's `f_type`).
pub const HUGETLBFS_MAGIC: i64 = 0x958458f6;
/// Bytes of `struct statfs` on 64-bit Linux; `f_type` comes first.
pub const STATFS_BYTES: usize = 120;
/// Bytes of `struct stat`.
#[cfg(target_arch = "x86_64")]
pub const STAT_BYTES: usize = 144;
/// Bytes of `struct stat`.
#[cfg(target_arch = "aarch64")]
pub const STAT_BYTES: usize = 128;
/// Where `st_uid` (a `u32`) lies in `struct stat`.
#[cfg(target_arch = "x86_64")]
pub const STAT_UID_OFFSET: usize = 28;
/// Where `st_uid` (a `u32`) lies in `struct stat`.
#[cfg(target_arch = "aarch64")]
pub const STAT_UID_OFFSET: usize = 24;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stubs_numbers_are_libcs() {
        assert_eq!(AT_SECURE, libc::AT_SECURE);
        assert_eq!(PT_LOAD, libc::PT_LOAD);
        assert_eq!(PF_X, libc::PF_X);
        assert_eq!(RTLD_NOW, libc::RTLD_NOW);
        assert_eq!(RTLD_NEXT_ADDR as *mut libc::c_void, libc::RTLD_NEXT);
        assert_eq!(SYS_MPROTECT, libc::SYS_mprotect);
        assert_eq!(SYS_EXIT_GROUP, libc::SYS_exit_group);
        assert_eq!(ESRCH, libc::ESRCH);
        assert_eq!(O_RDONLY, libc::O_RDONLY);
        assert_eq!(O_NOFOLLOW, libc::O_NOFOLLOW);
        assert_eq!(O_CLOEXEC, libc::O_CLOEXEC);
        assert_eq!(HUGETLBFS_MAGIC as u32, libc::HUGETLBFS_MAGIC as u32);
        assert_eq!(STATFS_BYTES, core::mem::size_of::<libc::statfs>());
        assert_eq!(STAT_BYTES, core::mem::size_of::<libc::stat>());
        assert_eq!(STAT_UID_OFFSET, core::mem::offset_of!(libc::stat, st_uid));
    }
}
