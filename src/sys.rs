//! Thin wrappers over the system calls tiexec makes, with one error convention:
//! every fallible call returns `Result<_, Errno>`, and [`Errno::last`] is the
//! only place that reads `errno`.
//!
//! Memory-changing calls are `unsafe fn`: changing mappings can invalidate
//! references anywhere in the process, so each caller states why the range is
//! its own to change. Read-only queries are safe.

use core::fmt;

/// A raw `errno` value from a failed call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Errno(pub i32);

impl Errno {
    /// The calling thread's `errno`, right after a call that reported failure.
    pub fn last() -> Errno {
        // SAFETY: __errno_location returns the calling thread's errno slot,
        // valid for the life of the thread.
        Errno(unsafe { *libc::__errno_location() })
    }

    /// From a raw syscall return value in `-4095..0` (the trampoline's
    /// convention).
    pub fn from_negative(ret: i64) -> Errno {
        Errno(i32::try_from(-ret).unwrap_or(libc::EINVAL))
    }

    /// The symbolic name of the common values, for one-line logs.
    pub fn name(self) -> &'static str {
        match self.0 {
            libc::EPERM => "EPERM",
            libc::ENOENT => "ENOENT",
            libc::EINTR => "EINTR",
            libc::EAGAIN => "EAGAIN",
            libc::ENOMEM => "ENOMEM",
            libc::EACCES => "EACCES",
            libc::EFAULT => "EFAULT",
            libc::EBUSY => "EBUSY",
            libc::EEXIST => "EEXIST",
            libc::EINVAL => "EINVAL",
            libc::ENOSYS => "ENOSYS",
            libc::ENOTTY => "ENOTTY",
            libc::EOPNOTSUPP => "EOPNOTSUPP",
            _ => "errno",
        }
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.0)
    }
}

fn check_zero(ret: libc::c_int) -> Result<(), Errno> {
    if ret == 0 {
        Ok(())
    } else {
        Err(Errno::last())
    }
}

/// Maps `len` bytes of fresh anonymous memory at an address of the kernel's
/// choosing.
pub fn mmap_anonymous(len: usize, prot: i32, extra_flags: i32) -> Result<*mut u8, Errno> {
    // SAFETY: without MAP_FIXED the kernel picks an unused address, so no
    // existing mapping (and no Rust reference) is affected.
    let addr = unsafe {
        libc::mmap(
            core::ptr::null_mut(),
            len,
            prot,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | extra_flags,
            -1,
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        Err(Errno::last())
    } else {
        Ok(addr.cast())
    }
}

/// Unmaps `[addr, addr + len)`.
///
/// # Safety
/// The range must belong to the caller: nothing else in the process may still
/// use memory in it.
pub unsafe fn munmap(addr: *mut u8, len: usize) -> Result<(), Errno> {
    // SAFETY: the caller owns the range (see above).
    check_zero(unsafe { libc::munmap(addr.cast(), len) })
}

/// Changes the protection of `[addr, addr + len)`.
///
/// # Safety
/// The range must belong to the caller, and removing access must not break
/// any live reference into it.
pub unsafe fn mprotect(addr: *mut u8, len: usize, prot: i32) -> Result<(), Errno> {
    // SAFETY: the caller owns the range (see above).
    check_zero(unsafe { libc::mprotect(addr.cast(), len, prot) })
}

/// Gives the kernel advice about `[addr, addr + len)`.
///
/// # Safety
/// The range must belong to the caller; destructive advice (MADV_DONTNEED and
/// the like) must only be given where losing the contents is intended.
pub unsafe fn madvise(addr: *mut u8, len: usize, advice: i32) -> Result<(), Errno> {
    // SAFETY: the caller owns the range (see above).
    check_zero(unsafe { libc::madvise(addr.cast(), len, advice) })
}

/// `MADV_POPULATE_WRITE` (Linux 5.14): fault every page in now, writable, so
/// that a shortage shows up as ENOMEM here instead of a signal later.
pub const MADV_POPULATE_WRITE: i32 = 23;
/// `MADV_POPULATE_READ` (Linux 5.14): fault every page in, readable.
pub const MADV_POPULATE_READ: i32 = 22;
/// `MADV_COLLAPSE` (Linux 6.1): make the range huge now, synchronously.
pub const MADV_COLLAPSE: i32 = 25;

/// Monotonic clock in nanoseconds.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// True when the process runs in secure-execution mode (setuid, setgid, file
/// capabilities): the loader set `AT_SECURE`.
pub fn secure_execution() -> bool {
    // SAFETY: getauxval has no preconditions.
    unsafe { libc::getauxval(libc::AT_SECURE) != 0 }
}

/// True when THP was switched off for this process (`PR_SET_THP_DISABLE`,
/// inherited across fork and exec).
pub fn thp_disabled_for_process() -> bool {
    // SAFETY: PR_GET_THP_DISABLE takes no pointers.
    unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) == 1 }
}

/// Reads a small file (under /proc or /sys) into `buf` with raw
/// open/read/close, without allocating. Returns the bytes read.
pub fn read_small_file(path: &core::ffi::CStr, buf: &mut [u8]) -> Result<usize, Errno> {
    // SAFETY: `path` is NUL-terminated; O_CLOEXEC keeps the fd from leaking
    // into a child should another thread exec.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(Errno::last());
    }
    let mut filled = 0usize;
    let result = loop {
        let rest = match buf.get_mut(filled..) {
            Some(r) if !r.is_empty() => r,
            _ => break Ok(filled),
        };
        // SAFETY: `rest` is a valid writable buffer of `rest.len()` bytes.
        let n = unsafe { libc::read(fd, rest.as_mut_ptr().cast(), rest.len()) };
        if n < 0 {
            let e = Errno::last();
            if e.0 == libc::EINTR {
                continue;
            }
            break Err(e);
        }
        if n == 0 {
            break Ok(filled);
        }
        filled += n as usize;
    };
    // SAFETY: `fd` was opened above and is closed once.
    unsafe { libc::close(fd) };
    result
}

// --- PAGEMAP_SCAN (Linux 6.7): which pages of a range are mapped huge ------

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

#[repr(C)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

const PAGE_IS_HUGE: u64 = 1 << 6;
// _IOWR('f', 16, struct pm_scan_arg): dir 3 << 30, size 96 << 16, type 'f' << 8, nr 16.
const PAGEMAP_SCAN: libc::c_ulong = (3 << 30) | (96 << 16) | ((b'f' as libc::c_ulong) << 8) | 16;

/// The parts of `[start, end)` that are mapped with huge pages (PMD-mapped
/// THP, file or anonymous, or hugetlb), as `(start, end)` pairs in ascending
/// order. Reads page tables only; changes nothing. `Err(ENOTTY)` or
/// `Err(EINVAL)` on kernels older than 6.7.
pub fn huge_mapped_ranges(start: u64, end: u64) -> Result<Vec<(u64, u64)>, Errno> {
    huge_mapped_ranges_in(c"/proc/self/pagemap", start, end)
}

/// As [`huge_mapped_ranges`], for the process whose pagemap is `path`
/// (`/proc/PID/pagemap`; reading another process's needs ptrace access).
pub fn huge_mapped_ranges_in(
    path: &core::ffi::CStr,
    start: u64,
    end: u64,
) -> Result<Vec<(u64, u64)>, Errno> {
    // SAFETY: the path is NUL-terminated.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(Errno::last());
    }
    let mut found = Vec::new();
    let mut regions = [PageRegion::default(); 64];
    let mut cursor = start;
    let result = loop {
        if cursor >= end {
            break Ok(());
        }
        let mut arg = PmScanArg {
            size: core::mem::size_of::<PmScanArg>() as u64,
            flags: 0,
            start: cursor,
            end,
            walk_end: 0,
            vec: regions.as_mut_ptr() as u64,
            vec_len: regions.len() as u64,
            max_pages: 0,
            category_inverted: 0,
            category_mask: 0,
            category_anyof_mask: PAGE_IS_HUGE,
            return_mask: PAGE_IS_HUGE,
        };
        // SAFETY: `arg` and `regions` are valid for the duration of the
        // call; the kernel writes at most `vec_len` regions and `walk_end`.
        let n = unsafe { libc::ioctl(fd, PAGEMAP_SCAN as _, &mut arg) };
        if n < 0 {
            break Err(Errno::last());
        }
        for r in regions.iter().take(n as usize) {
            found.push((r.start, r.end));
        }
        if arg.walk_end <= cursor {
            break Ok(());
        }
        cursor = arg.walk_end;
    };
    // SAFETY: `fd` was opened above and is closed once.
    unsafe { libc::close(fd) };
    result.map(|()| found)
}
