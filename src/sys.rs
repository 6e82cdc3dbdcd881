//! Thin wrappers over the system calls tiexec makes, with one error convention:
//! every fallible call returns `Result<_, Errno>`, and [`Errno::last`] is the
//! only place that reads `errno`.
//!
//! Memory is owned through [`Mapping`]: a mapping this process made itself,
//! unmapped when dropped, changed only through `&mut self`. Calls that change
//! memory the caller does not own (the program's text) are `unsafe fn`:
//! changing mappings can invalidate references anywhere in the process, so
//! each caller states why the range is its own to change. Queries and calls on
//! file descriptors are safe.

use core::fmt;
use std::ffi::CStr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use crate::range::{align_up, Range};

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

    /// From a raw syscall return value in `-4095..0` (the swap routine's
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
            libc::EBADF => "EBADF",
            libc::EAGAIN => "EAGAIN",
            libc::ENOMEM => "ENOMEM",
            libc::EACCES => "EACCES",
            libc::EFAULT => "EFAULT",
            libc::EBUSY => "EBUSY",
            libc::EEXIST => "EEXIST",
            libc::EXDEV => "EXDEV",
            libc::ENOTDIR => "ENOTDIR",
            libc::EINVAL => "EINVAL",
            libc::ENOSPC => "ENOSPC",
            libc::EROFS => "EROFS",
            libc::ENOSYS => "ENOSYS",
            libc::ELOOP => "ELOOP",
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

impl std::error::Error for Errno {}

fn check_zero(ret: libc::c_int) -> Result<(), Errno> {
    if ret == 0 {
        Ok(())
    } else {
        Err(Errno::last())
    }
}

fn check_fd(ret: libc::c_int) -> Result<OwnedFd, Errno> {
    if ret < 0 {
        Err(Errno::last())
    } else {
        // SAFETY: a fresh descriptor the kernel just returned to us; nothing
        // else owns it.
        Ok(unsafe { OwnedFd::from_raw_fd(ret) })
    }
}

// --- Memory ----------------------------------------------------------------

/// Memory protection of a mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prot(i32);

impl Prot {
    /// No access (placeholders).
    pub const NONE: Prot = Prot(libc::PROT_NONE);
    /// Read only.
    pub const READ: Prot = Prot(libc::PROT_READ);
    /// Read and write (a replacement being filled).
    pub const READ_WRITE: Prot = Prot(libc::PROT_READ | libc::PROT_WRITE);
    /// Read and execute (text).
    pub const READ_EXEC: Prot = Prot(libc::PROT_READ | libc::PROT_EXEC);

    /// The `PROT_*` bits.
    pub const fn bits(self) -> i32 {
        self.0
    }
}

/// `MADV_POPULATE_WRITE` (Linux 5.14): fault every page in now, writable, so
/// that a shortage is an error now, not a `SIGBUS` later.
pub const MADV_POPULATE_WRITE: i32 = libc::MADV_POPULATE_WRITE;
/// `MADV_POPULATE_READ` (Linux 5.14): fault every page in, readable.
pub const MADV_POPULATE_READ: i32 = libc::MADV_POPULATE_READ;
/// `MADV_COLLAPSE` (Linux 6.1): make the range huge now, synchronously.
pub const MADV_COLLAPSE: i32 = libc::MADV_COLLAPSE;

/// A mapping this process made and owns: unmapped on drop, unless
/// [`Mapping::release`]d because its pages now live elsewhere (moved over
/// the text by `mremap`).
#[derive(Debug)]
pub struct Mapping {
    addr: *mut u8,
    len: usize,
    prot: Prot,
    /// Part of it maps a file whose length no one promised
    /// ([`Mapping::map_file_within`]): a read there could raise SIGBUS, so
    /// [`Mapping::bytes`] gives none.
    foreign_file: bool,
}

fn raw_mmap(
    addr: *mut u8,
    len: usize,
    prot: Prot,
    flags: i32,
    fd: i32,
    offset: u64,
) -> Result<*mut u8, Errno> {
    let offset = libc::off_t::try_from(offset).map_err(|_| Errno(libc::EINVAL))?;
    // SAFETY: every caller either lets the kernel choose the address (no
    // MAP_FIXED: no existing mapping is affected) or passes
    // MAP_FIXED_NOREPLACE (fails instead of replacing) or MAP_FIXED over a
    // range it owns (see `Mapping::map_file_within`).
    let got = unsafe { libc::mmap(addr.cast(), len, prot.bits(), flags, fd, offset) };
    if got == libc::MAP_FAILED {
        Err(Errno::last())
    } else {
        Ok(got.cast())
    }
}

impl Mapping {
    /// Fresh private anonymous memory at an address of the kernel's choosing
    /// (`extra_flags`: e.g. `MAP_HUGETLB`).
    pub fn anonymous(len: usize, prot: Prot, extra_flags: i32) -> Result<Mapping, Errno> {
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | extra_flags;
        let addr = raw_mmap(core::ptr::null_mut(), len, prot, flags, -1, 0)?;
        Ok(Mapping {
            addr,
            len,
            prot,
            foreign_file: false,
        })
    }

    /// Fresh private anonymous memory whose start is a multiple of `align`
    /// (a power of two): over-allocates by `align`, then trims both ends.
    pub fn anonymous_aligned(len: usize, align: usize, prot: Prot) -> Result<Mapping, Errno> {
        let reserve = len.checked_add(align).ok_or(Errno(libc::ENOMEM))?;
        let whole = Mapping::anonymous(reserve, prot, 0)?;
        let start = whole.addr as u64;
        let aligned = align_up(start, align as u64);
        let head = (aligned - start) as usize;
        let tail = reserve - head - len;
        let (addr, prot) = (whole.addr, whole.prot);
        // From here on the parts are unmapped one by one: `whole` must not
        // unmap them all again.
        whole.release();
        // The aligned middle is ours as soon as the head and tail are gone;
        // own it first so that a failed trim still unmaps it.
        let middle = Mapping {
            addr: addr.wrapping_add(head),
            len,
            prot,
            foreign_file: false,
        };
        for (part, part_len) in [(addr, head), (addr.wrapping_add(head + len), tail)] {
            if part_len > 0 {
                // SAFETY: the head or tail of our own fresh mapping, outside
                // `middle`; nothing refers to it.
                unsafe { munmap(part, part_len) }?;
            }
        }
        Ok(middle)
    }

    /// Maps `len` bytes of an open file from `offset`, at an address of the
    /// kernel's choosing. `shared`: `MAP_SHARED` (else private);
    /// `populate`: fault every page in now (`MAP_POPULATE`).
    ///
    /// # Safety
    /// While the mapping's bytes are read (or run), the file must not shrink
    /// below `offset + len`: a page past its end raises SIGBUS. Map only
    /// files no one else can truncate (this process's memfds and unlinked
    /// files, read-only images), or files whose truncation would break the
    /// program anyway (its own loaded objects).
    pub unsafe fn file(
        fd: BorrowedFd<'_>,
        offset: u64,
        len: usize,
        prot: Prot,
        shared: bool,
        populate: bool,
    ) -> Result<Mapping, Errno> {
        let mut flags = if shared {
            libc::MAP_SHARED
        } else {
            libc::MAP_PRIVATE
        };
        if populate {
            flags |= libc::MAP_POPULATE;
        }
        let addr = raw_mmap(
            core::ptr::null_mut(),
            len,
            prot,
            flags,
            fd.as_raw_fd(),
            offset,
        )?;
        Ok(Mapping {
            addr,
            len,
            prot,
            foreign_file: false,
        })
    }

    /// A `PROT_NONE` placeholder over `range`, which must be unmapped: fails
    /// (`EEXIST`) if anything is mapped there.
    pub fn reserve_at(range: Range) -> Result<Mapping, Errno> {
        let want = range.start as *mut u8;
        let len = usize::try_from(range.len()).map_err(|_| Errno(libc::EINVAL))?;
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE;
        let got = raw_mmap(want, len, Prot::NONE, flags, -1, 0)?;
        let reservation = Mapping {
            addr: got,
            len,
            prot: Prot::NONE,
            foreign_file: false,
        };
        if got != want {
            // Kernels before 4.17 ignore MAP_FIXED_NOREPLACE and may place
            // the mapping elsewhere: give it back (dropped) and fail.
            return Err(Errno(libc::EEXIST));
        }
        Ok(reservation)
    }

    /// Maps `len` bytes of `fd` from `file_offset` over this mapping's bytes
    /// from `at`, replacing them (`MAP_FIXED` inside our own mapping). The
    /// file may be anyone's: from then on [`Mapping::bytes`] gives nothing
    /// (the kernel reads it: `MADV_POPULATE_READ` reports a truncated file
    /// as an error, where a read would raise SIGBUS).
    pub fn map_file_within(
        &mut self,
        at: usize,
        fd: BorrowedFd<'_>,
        file_offset: u64,
        len: usize,
        prot: Prot,
    ) -> Result<(), Errno> {
        let end = at.checked_add(len).ok_or(Errno(libc::EINVAL))?;
        if end > self.len {
            return Err(Errno(libc::EINVAL));
        }
        let addr = self.addr.wrapping_add(at);
        let flags = libc::MAP_PRIVATE | libc::MAP_FIXED;
        // MAP_FIXED replaces only pages of `self`, which `&mut self` owns.
        self.foreign_file = true;
        let got = raw_mmap(addr, len, prot, flags, fd.as_raw_fd(), file_offset)?;
        debug_assert_eq!(got, addr);
        Ok(())
    }

    /// Its first byte.
    pub fn as_ptr(&self) -> *mut u8 {
        self.addr
    }

    /// Its address as a number.
    pub fn start(&self) -> u64 {
        self.addr as u64
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for a zero-length mapping (never made).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Its address range.
    pub fn range(&self) -> Range {
        Range::new(self.start(), self.start() + self.len as u64)
    }

    /// Its bytes, when it is readable (and holds no file of unknown
    /// length, see [`Mapping::map_file_within`]).
    pub fn bytes(&self) -> Option<&[u8]> {
        if self.prot.bits() & libc::PROT_READ == 0 || self.foreign_file {
            return None;
        }
        // SAFETY: our own readable mapping of `len` bytes, borrowed for as
        // long as the slice lives (nothing can unmap it meanwhile).
        Some(unsafe { core::slice::from_raw_parts(self.addr, self.len) })
    }

    /// Its bytes, for filling, when it is writable.
    pub fn bytes_mut(&mut self) -> Option<&mut [u8]> {
        if self.prot != Prot::READ_WRITE || self.foreign_file {
            return None;
        }
        // SAFETY: our own readable and writable mapping of `len` bytes,
        // borrowed mutably for as long as the slice lives.
        Some(unsafe { core::slice::from_raw_parts_mut(self.addr, self.len) })
    }

    /// Gives advice about the whole mapping (`MADV_HUGEPAGE`,
    /// `MADV_POPULATE_WRITE`, ...). Destructive advice only loses our own
    /// contents.
    pub fn advise(&mut self, advice: i32) -> Result<(), Errno> {
        // SAFETY: our own mapping, borrowed mutably: no reference into it
        // outlives this call.
        unsafe { madvise(self.addr, self.len, advice) }
    }

    /// Gives advice about `len` bytes from `at` inside the mapping.
    pub fn advise_range(&mut self, at: usize, len: usize, advice: i32) -> Result<(), Errno> {
        if at.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(Errno(libc::EINVAL));
        }
        // SAFETY: a part of our own mapping (checked above), borrowed
        // mutably: no reference into it outlives this call.
        unsafe { madvise(self.addr.wrapping_add(at), len, advice) }
    }

    /// Changes the protection of the whole mapping.
    pub fn protect(&mut self, prot: Prot) -> Result<(), Errno> {
        // SAFETY: as for `advise`.
        unsafe { mprotect(self.addr, self.len, prot.bits()) }?;
        self.prot = prot;
        Ok(())
    }

    /// Makes code bytes written into this mapping visible to instruction
    /// fetch before any of it runs (see [`sync_icache`]). Call after the
    /// last write, before the mapping (or the pages it is moved onto)
    /// becomes executable.
    pub fn sync_icache(&self) {
        if self.prot.bits() & libc::PROT_READ != 0 && !self.foreign_file {
            // SAFETY: our own mapping, mapped and readable.
            unsafe { sync_icache(self.range()) };
        }
    }

    /// Stops owning the range without unmapping it: its pages were moved
    /// elsewhere (`mremap`) or now serve as the text. Returns the range.
    pub fn release(self) -> Range {
        let r = self.range();
        core::mem::forget(self);
        r
    }
}

/// Moves `mapping` over `[to, to + its length)` with one
/// `mremap(MREMAP_MAYMOVE|MREMAP_FIXED)`: whatever was mapped there is
/// replaced, in one step. On failure the mapping is dropped (unmapped) and
/// the target left as it was.
///
/// # Safety
/// `to` must be page aligned, and the range there must be the caller's to
/// replace (with the same bytes, when it holds code that may run).
pub unsafe fn move_over(mapping: Mapping, to: u64) -> Result<(), Errno> {
    // SAFETY: `mapping` owns its range; the target is the caller's.
    let moved = unsafe {
        libc::mremap(
            mapping.as_ptr().cast(),
            mapping.len(),
            mapping.len(),
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            to as *mut libc::c_void,
        )
    };
    if moved == libc::MAP_FAILED {
        return Err(Errno::last());
    }
    mapping.release();
    Ok(())
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: the range was mapped by a constructor of `Mapping` and
            // is owned by this value alone.
            let _ = unsafe { munmap(self.addr, self.len) };
        }
    }
}

/// The kernel's base page size (`AT_PAGESZ`); 0 if the kernel did not say.
pub fn base_page_size() -> u64 {
    // SAFETY: getauxval has no preconditions.
    unsafe { libc::getauxval(libc::AT_PAGESZ) }
}

/// True when `path` names something that exists. Allocates nothing.
pub fn exists(path: &CStr) -> bool {
    // SAFETY: a NUL-terminated path.
    unsafe { libc::access(path.as_ptr(), libc::F_OK) == 0 }
}

/// Makes bytes just written into `range` (mapped, readable) visible to
/// instruction fetch. arm64 does not keep its instruction cache coherent
/// with data writes: each data cache line is cleaned to the point of
/// unification, each instruction cache line invalidated, then both are
/// synchronised (`__builtin___clear_cache`; line sizes from CTR_EL0, which
/// Linux lets user space read). x86_64 keeps them coherent: nothing to do.
///
/// # Safety
/// `range` must be mapped and readable: a cache maintenance operation on
/// an unmapped address faults.
#[cfg(target_arch = "aarch64")]
unsafe fn sync_icache(range: Range) {
    use core::arch::asm;
    let ctr: u64;
    // SAFETY: reads a register Linux makes readable at EL0 (or emulates).
    unsafe { asm!("mrs {}, ctr_el0", out(reg) ctr, options(nomem, nostack, preserves_flags)) };
    let data_line = 4u64 << ((ctr >> 16) & 0xf);
    let insn_line = 4u64 << (ctr & 0xf);
    let mut at = range.start & !(data_line - 1);
    while at < range.end {
        // SAFETY: a cache maintenance operation on a mapped address; it
        // changes no memory contents.
        unsafe { asm!("dc cvau, {}", in(reg) at, options(nostack, preserves_flags)) };
        at += data_line;
    }
    // SAFETY: barriers only.
    unsafe { asm!("dsb ish", options(nostack, preserves_flags)) };
    let mut at = range.start & !(insn_line - 1);
    while at < range.end {
        // SAFETY: as for `dc cvau`.
        unsafe { asm!("ic ivau, {}", in(reg) at, options(nostack, preserves_flags)) };
        at += insn_line;
    }
    // SAFETY: barriers only.
    unsafe { asm!("dsb ish", "isb", options(nostack, preserves_flags)) };
}

/// See the arm64 version: x86_64 keeps the caches coherent.
///
/// # Safety
/// None needed on x86_64; the arm64 version's contract applies to callers.
#[cfg(not(target_arch = "aarch64"))]
unsafe fn sync_icache(_range: Range) {}

/// Whether the first page of `fd` can be mapped executable (what the loader
/// will do; `EPERM` on a noexec mount). Maps it and unmaps it again.
pub fn can_map_executable(fd: BorrowedFd<'_>) -> Result<(), Errno> {
    let flags = libc::MAP_PRIVATE;
    let got = raw_mmap(
        core::ptr::null_mut(),
        4096,
        Prot::READ_EXEC,
        flags,
        fd.as_raw_fd(),
        0,
    )?;
    // SAFETY: the mapping just made, which no byte of this process refers to.
    unsafe { munmap(got, 4096) }
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

/// Faults in `[start, end)` of readable memory (`MADV_POPULATE_READ`):
/// read faults only, contents and protections unchanged.
pub fn populate_read(range: Range) -> Result<(), Errno> {
    // SAFETY: MADV_POPULATE_READ only faults pages in; it changes no
    // contents, protections or mappings, so no reference is affected.
    unsafe {
        madvise(
            range.start as *mut u8,
            range.len() as usize,
            MADV_POPULATE_READ,
        )
    }
}

// --- Process state ---------------------------------------------------------

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

/// The wall clock in nanoseconds since the epoch (what file times are in).
pub fn realtime_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// Sleeps `us` microseconds (interrupted early by a signal: callers loop).
pub fn sleep_us(us: u64) {
    let ts = libc::timespec {
        tv_sec: (us / 1_000_000) as libc::time_t,
        tv_nsec: ((us % 1_000_000) * 1000) as libc::c_long,
    };
    // SAFETY: a valid timespec; no remainder asked for.
    unsafe { libc::nanosleep(&ts, core::ptr::null_mut()) };
}

/// When process `pid` started (clock ticks since boot: `/proc/PID/stat`
/// field 22), if it exists: together with the PID, it names one process
/// (a PID is reused, the pair is not).
pub fn process_start_ticks(pid: u32) -> Option<u64> {
    let mut path = [0u8; 32];
    let mut n = 0;
    for part in [
        &b"/proc/"[..],
        decimal(u64::from(pid), &mut [0u8; 20]),
        b"/stat",
    ] {
        for &b in part {
            *path.get_mut(n)? = b;
            n += 1;
        }
    }
    let path = CStr::from_bytes_until_nul(path.get(..=n)?).ok()?;
    let mut buf = [0u8; 1024];
    let len = read_small_file(path, &mut buf).ok()?;
    stat_start_ticks(buf.get(..len)?)
}

/// Field 22 (starttime) of a `/proc/PID/stat` line. The command name (field
/// 2) may hold spaces and parentheses: the fields after it are counted from
/// its last `)`.
pub fn stat_start_ticks(stat: &[u8]) -> Option<u64> {
    let close = stat.iter().rposition(|&b| b == b')')?;
    let rest = stat.get(close + 1..)?;
    // After ") ": field 3 (state) is the first word; 22 is the 20th.
    let word = rest
        .split(|&b| b == b' ')
        .filter(|w| !w.is_empty())
        .nth(19)?;
    let mut v: u64 = 0;
    for &d in word {
        if !d.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
    }
    Some(v)
}

/// `v` in decimal, in `buf`.
fn decimal(mut v: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        if let Some(d) = buf.get_mut(i) {
            *d = b'0' + (v % 10) as u8;
        }
        v /= 10;
        if v == 0 || i == 0 {
            break;
        }
    }
    buf.get(i..).unwrap_or(&[])
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

/// True when memory-deny-write-execute is on for this process
/// (`PR_SET_MDWE`, e.g. systemd's `MemoryDenyWriteExecute=yes`): no mapping
/// may become executable after being writable, or gain `PROT_EXEC` at all.
/// A fresh mapping that is executable from the start is allowed.
pub fn mdwe_refuses_exec_gain() -> bool {
    // SAFETY: PR_GET_MDWE takes no pointers; kernels before 6.3 fail (EINVAL)
    // and have no MDWE.
    let flags = unsafe { libc::prctl(libc::PR_GET_MDWE, 0, 0, 0, 0) };
    flags > 0 && flags as libc::c_uint & libc::PR_MDWE_REFUSE_EXEC_GAIN != 0
}

/// The effective user ID (whose files the process creates).
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// The real user ID.
pub fn real_uid() -> u32 {
    // SAFETY: getuid has no preconditions.
    unsafe { libc::getuid() }
}

/// The user ID the kernel shows for users a user namespace does not map
/// (`/proc/sys/kernel/overflowuid`, 65534 unless changed).
pub fn overflow_uid() -> u32 {
    let mut buf = [0u8; 16];
    read_small_file(c"/proc/sys/kernel/overflowuid", &mut buf)
        .ok()
        .and_then(|n| std::str::from_utf8(buf.get(..n)?).ok()?.trim().parse().ok())
        .unwrap_or(65534)
}

/// True when ownership proves nothing here: this process's effective or
/// real user is the overflow ID (a user namespace that does not map it, or
/// the `nobody` user), which every unmapped owner also reads as. A file
/// "owned by this user" may then be anyone's: nothing shared may be
/// trusted (the image cache, a state directory, a temporary directory).
pub fn identity_unmapped() -> bool {
    let overflow = overflow_uid();
    effective_uid() == overflow || real_uid() == overflow
}

/// Whether this process may execute `path` (`access(X_OK)`: permission
/// bits, ACLs, root's rules and `noexec` mounts, as exec will apply them).
pub fn can_execute(path: &CStr) -> bool {
    // SAFETY: `path` is NUL-terminated.
    unsafe { libc::access(path.as_ptr(), libc::X_OK) == 0 }
}

/// Replaces this process with `path`, run with `argv` and the environment
/// `envp` (`execve(2)`): the PID, signal dispositions and mask, resource
/// limits and open descriptors stay as they are. Returns only when that
/// failed, with why.
pub fn execve(path: &CStr, argv: &[std::ffi::CString], envp: &[std::ffi::CString]) -> Errno {
    let mut args: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    args.push(core::ptr::null());
    let mut env: Vec<*const libc::c_char> = envp.iter().map(|e| e.as_ptr()).collect();
    env.push(core::ptr::null());
    // SAFETY: NUL-terminated strings in NULL-terminated arrays, which
    // outlive the call (on success nothing of this process remains).
    unsafe { libc::execve(path.as_ptr(), args.as_ptr(), env.as_ptr()) };
    Errno::last()
}

/// Mounts a hugetlbfs at `target` with mount options `data`, `nosuid` and
/// `nodev` (root only).
pub fn mount_hugetlbfs(target: &CStr, data: &CStr) -> Result<(), Errno> {
    // SAFETY: NUL-terminated strings; a new mount of a pseudo filesystem
    // changes no memory of this process.
    check_zero(unsafe {
        libc::mount(
            c"none".as_ptr(),
            target.as_ptr(),
            c"hugetlbfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            data.as_ptr().cast(),
        )
    })
}

/// Unmounts `target`; `detach`: lazily (`MNT_DETACH`: gone from the tree
/// now, released when no process uses it).
pub fn unmount(target: &CStr, detach: bool) -> Result<(), Errno> {
    let flags = if detach { libc::MNT_DETACH } else { 0 };
    // SAFETY: a NUL-terminated path; unmounting changes no memory of this
    // process (a mapping of a file there keeps the file).
    check_zero(unsafe { libc::umount2(target.as_ptr(), flags) })
}

/// Reads one variable from the process environment without allocating.
///
/// # Safety
/// No thread may change the environment (`setenv`, `putenv`, `unsetenv`)
/// while the returned slice is in use: it points into the environment block.
pub unsafe fn getenv_bytes(name: &CStr) -> Option<&'static [u8]> {
    // SAFETY: getenv returns NULL or a pointer to a NUL-terminated string in
    // the environment block, valid while the environment is not changed
    // (the caller's promise).
    let p = unsafe { libc::getenv(name.as_ptr()) };
    if p.is_null() {
        None
    } else {
        // SAFETY: non-null and NUL-terminated (see above).
        Some(unsafe { CStr::from_ptr(p) }.to_bytes())
    }
}

/// Writes `bytes` to stderr in one call (a closed fd 2 fails harmlessly).
pub fn write_stderr(bytes: &[u8]) {
    // SAFETY: `bytes` is a valid readable buffer of its length.
    unsafe { libc::write(2, bytes.as_ptr().cast(), bytes.len()) };
}

/// Writes all of `bytes` to descriptor number `fd` (one the user named,
/// e.g. `TIEXEC_REPORT=fd:3`). A descriptor that is not open only makes
/// the call fail.
pub fn write_all_to_fd_number(fd: i32, mut bytes: &[u8]) -> Result<(), Errno> {
    while !bytes.is_empty() {
        // SAFETY: writes from a valid buffer; the kernel checks `fd`.
        let n = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
        if n < 0 {
            let e = Errno::last();
            if e.0 == libc::EINTR {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(Errno(libc::EIO));
        }
        bytes = bytes.get(n as usize..).unwrap_or(&[]);
    }
    Ok(())
}

/// Appends `bytes` to the regular file at `path` that this user owns, with
/// one `write` (`O_APPEND`: whole, between other appenders' lines), never
/// following a symlink. Allocates nothing and takes no lock: callable from
/// `_exit`.
pub fn append_to_path(path: &CStr, bytes: &[u8]) -> Result<(), Errno> {
    // SAFETY: a NUL-terminated path; plain flags.
    let fd = check_fd(unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_WRONLY | libc::O_APPEND | libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK,
        )
    })?;
    let st = fstat(fd.as_fd())?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG || st.st_uid != effective_uid() {
        return Err(Errno(libc::EPERM));
    }
    // SAFETY: a valid buffer of `bytes.len()` bytes and our descriptor.
    let n = unsafe { libc::write(fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) };
    if n < 0 {
        return Err(Errno::last());
    }
    if n as usize != bytes.len() {
        return Err(Errno(libc::EIO));
    }
    Ok(())
}

/// Drops the page cache of `len` bytes of `fd`'s file from `offset`, where
/// no process maps it (`POSIX_FADV_DONTNEED`: advice, nothing else changes).
pub fn fadvise_dont_need(fd: BorrowedFd<'_>, offset: u64, len: u64) -> Result<(), Errno> {
    let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(Errno(libc::EINVAL));
    };
    // SAFETY: advice on an open descriptor; no memory is touched.
    let r = unsafe { libc::posix_fadvise(fd.as_raw_fd(), offset, len, libc::POSIX_FADV_DONTNEED) };
    if r == 0 {
        Ok(())
    } else {
        Err(Errno(r))
    }
}

/// Renames `from` to `to`, both in `dir` (replacing `to` atomically).
pub fn rename_at(dir: BorrowedFd<'_>, from: &CStr, to: &CStr) -> Result<(), Errno> {
    // SAFETY: both names are NUL-terminated; both are relative to `dir`.
    let r = unsafe { libc::renameat(dir.as_raw_fd(), from.as_ptr(), dir.as_raw_fd(), to.as_ptr()) };
    if r == 0 {
        Ok(())
    } else {
        Err(Errno::last())
    }
}

/// Names the anonymous memory of `range` (`PR_SET_VMA_ANON_NAME`, shown in
/// /proc/PID/maps as `[anon:NAME]`). Needs `CONFIG_ANON_VMA_NAME`.
pub fn name_anonymous_range(range: Range, name: &CStr) -> Result<(), Errno> {
    // SAFETY: prctl only reads the NUL-terminated name and labels the
    // mappings of the range; contents and protections do not change.
    let r = unsafe {
        libc::prctl(
            libc::PR_SET_VMA,
            libc::PR_SET_VMA_ANON_NAME as libc::c_ulong,
            range.start as libc::c_ulong,
            range.len() as libc::c_ulong,
            name.as_ptr(),
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(Errno::last())
    }
}

/// Reads a small file (under /proc or /sys) into `buf` with raw
/// open/read/close, without allocating. Returns the bytes read.
pub fn read_small_file(path: &CStr, buf: &mut [u8]) -> Result<usize, Errno> {
    // SAFETY: `path` is NUL-terminated; O_CLOEXEC keeps the fd from leaking
    // into a child should another thread exec.
    let fd = check_fd(unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) })?;
    let mut filled = 0usize;
    loop {
        let rest = match buf.get_mut(filled..) {
            Some(r) if !r.is_empty() => r,
            _ => return Ok(filled),
        };
        match read(fd.as_fd(), rest) {
            Ok(0) => return Ok(filled),
            Ok(n) => filled += n,
            Err(Errno(libc::EINTR)) => {}
            Err(e) => return Err(e),
        }
    }
}

// --- Files -----------------------------------------------------------------

/// `read(2)` into `buf`; returns the bytes read (0 at the end).
pub fn read(fd: BorrowedFd<'_>, buf: &mut [u8]) -> Result<usize, Errno> {
    // SAFETY: `buf` is a valid writable buffer of `buf.len()` bytes.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    usize::try_from(n).map_err(|_| Errno::last())
}

/// Reads `buf.len()` bytes from `offset`, fewer only at the end of the file.
/// Returns the bytes read.
pub fn pread_full(fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> Result<usize, Errno> {
    let mut done = 0usize;
    while let Some(rest) = buf.get_mut(done..).filter(|r| !r.is_empty()) {
        let at = libc::off_t::try_from(offset + done as u64).map_err(|_| Errno(libc::EINVAL))?;
        // SAFETY: `rest` is a valid writable buffer of `rest.len()` bytes.
        let n = unsafe { libc::pread(fd.as_raw_fd(), rest.as_mut_ptr().cast(), rest.len(), at) };
        match usize::try_from(n) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(_) if Errno::last().0 == libc::EINTR => {}
            Err(_) => return Err(Errno::last()),
        }
    }
    Ok(done)
}

/// `openat(2)`: `name` relative to `dir` (or the current directory), with
/// `O_CLOEXEC` added.
pub fn open_at(
    dir: Option<BorrowedFd<'_>>,
    name: &CStr,
    flags: i32,
    mode: u32,
) -> Result<OwnedFd, Errno> {
    let dirfd = dir.map_or(libc::AT_FDCWD, |d| d.as_raw_fd());
    // SAFETY: `name` is NUL-terminated; the mode is passed as the variadic
    // argument openat expects (ignored without O_CREAT / O_TMPFILE).
    check_fd(unsafe {
        libc::openat(
            dirfd,
            name.as_ptr(),
            flags | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    })
}

/// Opens the directory `name` under `dir` without following a symlink at
/// its last component.
pub fn open_dir_at(dir: Option<BorrowedFd<'_>>, name: &CStr) -> Result<OwnedFd, Errno> {
    open_at(
        dir,
        name,
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
        0,
    )
}

/// A new directory `name` under `dir`.
pub fn mkdir_at(dir: BorrowedFd<'_>, name: &CStr, mode: u32) -> Result<(), Errno> {
    // SAFETY: `name` is NUL-terminated.
    check_zero(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode) })
}

/// Removes the file `name` under `dir`.
pub fn unlink_at(dir: BorrowedFd<'_>, name: &CStr) -> Result<(), Errno> {
    // SAFETY: `name` is NUL-terminated.
    check_zero(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) })
}

/// `fstat(2)`.
pub fn fstat(fd: BorrowedFd<'_>) -> Result<libc::stat, Errno> {
    // SAFETY: an all-zero `stat` is a valid value of this plain C struct.
    let mut st: libc::stat = unsafe { core::mem::zeroed() };
    // SAFETY: `st` is a valid out-pointer.
    check_zero(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
    Ok(st)
}

/// `stat(2)` of `path`, following symlinks.
pub fn stat_path(path: &CStr) -> Result<libc::stat, Errno> {
    // SAFETY: an all-zero `stat` is a valid value of this plain C struct.
    let mut st: libc::stat = unsafe { core::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and `st` a valid out-pointer.
    check_zero(unsafe { libc::stat(path.as_ptr(), &mut st) })?;
    Ok(st)
}

/// `fstatat(2)` without following a symlink at `name`.
pub fn lstat_at(dir: BorrowedFd<'_>, name: &CStr) -> Result<libc::stat, Errno> {
    // SAFETY: an all-zero `stat` is a valid value of this plain C struct.
    let mut st: libc::stat = unsafe { core::mem::zeroed() };
    // SAFETY: `name` is NUL-terminated and `st` a valid out-pointer.
    check_zero(unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(st)
}

/// `fstatfs(2)`.
pub fn fstatfs(fd: BorrowedFd<'_>) -> Result<libc::statfs, Errno> {
    // SAFETY: an all-zero `statfs` is a valid value of this plain C struct.
    let mut st: libc::statfs = unsafe { core::mem::zeroed() };
    // SAFETY: `st` is a valid out-pointer.
    check_zero(unsafe { libc::fstatfs(fd.as_raw_fd(), &mut st) })?;
    Ok(st)
}

/// Sets a file's length.
pub fn ftruncate(fd: BorrowedFd<'_>, len: u64) -> Result<(), Errno> {
    let len = libc::off_t::try_from(len).map_err(|_| Errno(libc::EINVAL))?;
    // SAFETY: plain call on a descriptor.
    check_zero(unsafe { libc::ftruncate(fd.as_raw_fd(), len) })
}

/// Sets a file's access and modification times to now.
pub fn touch(fd: BorrowedFd<'_>) -> Result<(), Errno> {
    let now = libc::timespec {
        tv_sec: 0,
        tv_nsec: libc::UTIME_NOW,
    };
    let times = [now, now];
    // SAFETY: `times` points at two valid timespecs.
    check_zero(unsafe { libc::futimens(fd.as_raw_fd(), times.as_ptr()) })
}

/// Tries to take an exclusive `flock` without waiting: `Ok(true)` when
/// taken (held until the descriptor is closed), `Ok(false)` when another
/// open file description holds it.
pub fn try_lock_exclusive(fd: BorrowedFd<'_>) -> Result<bool, Errno> {
    // SAFETY: plain call on a descriptor.
    match check_zero(unsafe { libc::flock(fd.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) }) {
        Ok(()) => Ok(true),
        Err(Errno(libc::EWOULDBLOCK)) => Ok(false),
        Err(e) => Err(e),
    }
}

/// `/proc/self/fd/N` for `fd`, NUL-terminated.
fn proc_fd_path(fd: BorrowedFd<'_>) -> [u8; 32] {
    let mut path = [0u8; 32];
    let mut digits = [0u8; 20];
    let number = decimal(u64::try_from(fd.as_raw_fd()).unwrap_or(0), &mut digits);
    for (slot, &b) in path.iter_mut().zip(b"/proc/self/fd/".iter().chain(number)) {
        *slot = b;
    }
    path
}

/// Gives the unnamed file `fd` (made with `O_TMPFILE`) the name `name` under
/// `dir`. Fails with `EEXIST` if the name is taken: never replaces a file.
pub fn link_tmpfile(fd: BorrowedFd<'_>, dir: BorrowedFd<'_>, name: &CStr) -> Result<(), Errno> {
    let path = proc_fd_path(fd);
    // SAFETY: `path` and `name` are NUL-terminated; AT_SYMLINK_FOLLOW makes
    // linkat link the file the /proc link stands for (no privilege needed,
    // unlike AT_EMPTY_PATH).
    check_zero(unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            path.as_ptr().cast(),
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    })
}

/// A new read-only open file description of the file behind `fd`. A shared
/// mapping made from it can never be made writable (`mprotect` refuses).
pub fn reopen_read_only(fd: BorrowedFd<'_>) -> Result<OwnedFd, Errno> {
    let path = proc_fd_path(fd);
    let name = CStr::from_bytes_until_nul(&path).map_err(|_| Errno(libc::EINVAL))?;
    open_at(None, name, libc::O_RDONLY, 0)
}

/// An anonymous file (`memfd_create`), on hugetlb pages of `hugetlb` bytes
/// when given.
///
/// A hugetlb memfd asks for its page size explicitly (the size's log2 in
/// the flags' top bits), not the kernel's default size, which a boot option
/// may have set to 1 GiB.
pub fn memfd(name: &CStr, hugetlb: Option<u64>) -> Result<OwnedFd, Errno> {
    let flags = libc::MFD_CLOEXEC
        | match hugetlb {
            Some(size) => libc::MFD_HUGETLB | (size.trailing_zeros() << libc::MFD_HUGE_SHIFT),
            None => 0,
        };
    // SAFETY: `name` is NUL-terminated.
    check_fd(unsafe { libc::memfd_create(name.as_ptr(), flags) })
}

/// Writes all of `bytes` to `fd`.
pub fn write_all(fd: BorrowedFd<'_>, mut bytes: &[u8]) -> Result<(), Errno> {
    while !bytes.is_empty() {
        // SAFETY: `bytes` is a valid readable buffer.
        let n = unsafe { libc::write(fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) };
        match usize::try_from(n) {
            Ok(0) => return Err(Errno(libc::EIO)),
            Ok(n) => bytes = bytes.get(n..).unwrap_or(&[]),
            Err(_) if Errno::last().0 == libc::EINTR => {}
            Err(_) => return Err(Errno::last()),
        }
    }
    Ok(())
}

// --- PAGEMAP_SCAN (Linux 6.7): page-table facts about a range -------------

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

const PAGE_IS_FILE: u64 = 1 << 2;
const PAGE_IS_PRESENT: u64 = 1 << 3;
const PAGE_IS_SWAPPED: u64 = 1 << 4;
const PAGE_IS_HUGE: u64 = 1 << 6;
// _IOWR('f', 16, struct pm_scan_arg): dir 3 << 30, the struct's size << 16,
// type 'f' << 8, nr 16 (<linux/fs.h>; not in the libc crate).
const PAGEMAP_SCAN: libc::c_ulong = (3 << 30)
    | ((core::mem::size_of::<PmScanArg>() as libc::c_ulong) << 16)
    | ((b'f' as libc::c_ulong) << 8)
    | 16;

/// Which pages to look for, in PAGEMAP_SCAN's terms: every category of
/// `all` (those in `inverted` must be absent), and at least one of `any`.
#[derive(Clone, Copy)]
struct Categories {
    inverted: u64,
    all: u64,
    any: u64,
}

fn pagemap_scan(
    pagemap: &CStr,
    start: u64,
    end: u64,
    want: Categories,
) -> Result<Vec<(u64, u64)>, Errno> {
    Ok(pagemap_scan_categories(pagemap, start, end, want, 0)?
        .into_iter()
        .map(|(s, e, _)| (s, e))
        .collect())
}

/// As [`pagemap_scan`], each region with its categories among `want`'s and
/// `also` (regions differing in them come apart).
fn pagemap_scan_categories(
    pagemap: &CStr,
    start: u64,
    end: u64,
    want: Categories,
    also: u64,
) -> Result<Vec<(u64, u64, u64)>, Errno> {
    // SAFETY: the path is NUL-terminated.
    let fd = check_fd(unsafe { libc::open(pagemap.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) })?;
    let mut found = Vec::new();
    let mut regions = [PageRegion::default(); 64];
    let mut cursor = start;
    while cursor < end {
        let mut arg = PmScanArg {
            size: core::mem::size_of::<PmScanArg>() as u64,
            flags: 0,
            start: cursor,
            end,
            walk_end: 0,
            vec: regions.as_mut_ptr() as u64,
            vec_len: regions.len() as u64,
            max_pages: 0,
            category_inverted: want.inverted,
            category_mask: want.all,
            category_anyof_mask: want.any,
            return_mask: want.all | want.any | also,
        };
        // SAFETY: `arg` and `regions` are valid for the duration of the
        // call; the kernel writes at most `vec_len` regions and `walk_end`.
        let n = unsafe { libc::ioctl(fd.as_raw_fd(), PAGEMAP_SCAN as _, &mut arg) };
        if n < 0 {
            return Err(Errno::last());
        }
        for r in regions.iter().take(n as usize) {
            found.push((r.start, r.end, r.categories));
        }
        if arg.walk_end <= cursor {
            break;
        }
        cursor = arg.walk_end;
    }
    Ok(found)
}

/// Which pages of `[start, end)` are present in this process's page tables:
/// `(present on small pages, mapped huge)`, as `(start, end)` ranges in
/// ascending order. Reads page tables only. With `PAGEMAP_SCAN` (Linux
/// 6.7); before it, from /proc/self/pagemap's entries, which cannot tell
/// huge pages (the second list is then empty: they count as present).
pub fn present_small_pages(start: u64, end: u64) -> Result<(Vec<Range>, Vec<Range>), Errno> {
    let present = Categories {
        inverted: 0,
        all: PAGE_IS_PRESENT,
        any: 0,
    };
    match pagemap_scan_categories(c"/proc/self/pagemap", start, end, present, PAGE_IS_HUGE) {
        Ok(regions) => {
            let mut small = Vec::new();
            let mut huge = Vec::new();
            for (s, e, cat) in regions {
                if cat & PAGE_IS_HUGE != 0 {
                    huge.push(Range::new(s, e));
                } else {
                    small.push(Range::new(s, e));
                }
            }
            Ok((small, huge))
        }
        Err(Errno(libc::ENOTTY | libc::EINVAL | libc::ENOSYS)) => {
            const PRESENT: u64 = 1 << 63;
            let found = pagemap_entries(start, end, |e| e & PRESENT != 0)?;
            Ok((
                found.into_iter().map(|(s, e)| Range::new(s, e)).collect(),
                Vec::new(),
            ))
        }
        Err(e) => Err(e),
    }
}

/// The parts of `[start, end)` that are mapped with huge pages (PMD-mapped
/// THP, file or anonymous, or hugetlb), as `(start, end)` pairs in ascending
/// order. Reads page tables only; changes nothing. `Err(ENOTTY)` or
/// `Err(EINVAL)` on kernels older than 6.7.
pub fn huge_mapped_ranges(start: u64, end: u64) -> Result<Vec<(u64, u64)>, Errno> {
    huge_mapped_ranges_in(c"/proc/self/pagemap", start, end)
}

/// As [`huge_mapped_ranges`], for the process whose pagemap is `path`
/// (`/proc/PID/pagemap`; reading another process's needs ptrace access).
pub fn huge_mapped_ranges_in(path: &CStr, start: u64, end: u64) -> Result<Vec<(u64, u64)>, Errno> {
    let huge = Categories {
        inverted: 0,
        all: 0,
        any: PAGE_IS_HUGE,
    };
    pagemap_scan(path, start, end, huge)
}

/// The parts of `[start, end)` in this process whose pages are private
/// copies rather than the file's (present or swapped anonymous pages in a
/// file mapping: written to, by text relocations, a debugger's breakpoint,
/// a hot patch). Text built from the file would differ from them.
///
/// Uses `PAGEMAP_SCAN` (Linux 6.7); before it, the same answer from the
/// per-page entries of /proc/self/pagemap ([`modified_file_pages_by_entries`]).
pub fn modified_file_pages(start: u64, end: u64) -> Result<Vec<(u64, u64)>, Errno> {
    let copied = Categories {
        inverted: PAGE_IS_FILE,
        all: PAGE_IS_FILE,
        any: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
    };
    match pagemap_scan(c"/proc/self/pagemap", start, end, copied) {
        // Unknown to the kernel (ENOTTY, EINVAL), or to an emulator or a
        // filter in between (ENOSYS).
        Err(Errno(libc::ENOTTY | libc::EINVAL | libc::ENOSYS)) => {
            modified_file_pages_by_entries(start, end)
        }
        other => other,
    }
}

/// [`modified_file_pages`] from /proc/self/pagemap's 64-bit entries, one
/// per base page (Linux 3.5 and later): a page is a private copy when it is
/// present but not a file page (bit 63 set, bit 61 clear), or swapped out
/// (bit 62: only anonymous pages of a private mapping are). Reads 512
/// entries at a time into a stack buffer.
pub fn modified_file_pages_by_entries(start: u64, end: u64) -> Result<Vec<(u64, u64)>, Errno> {
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    const FILE_OR_SHARED: u64 = 1 << 61;
    pagemap_entries(start, end, |e| {
        (e & PRESENT != 0 && e & FILE_OR_SHARED == 0) || e & SWAPPED != 0
    })
}

/// The pages of `[start, end)` whose /proc/self/pagemap entry `pick` takes,
/// merged into ranges. Reads 512 entries at a time into a stack buffer.
fn pagemap_entries(
    start: u64,
    end: u64,
    pick: impl Fn(u64) -> bool,
) -> Result<Vec<(u64, u64)>, Errno> {
    const BATCH: u64 = 512;
    let page = match base_page_size() {
        0 => 4096,
        n => n,
    };
    // SAFETY: a NUL-terminated path.
    let fd = check_fd(unsafe {
        libc::open(
            c"/proc/self/pagemap".as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        )
    })?;
    let mut found: Vec<(u64, u64)> = Vec::new();
    let mut buf = [0u8; (BATCH * 8) as usize];
    let mut index = start / page;
    let last = end.div_ceil(page);
    while index < last {
        let n = (last - index).min(BATCH) as usize;
        let want = buf.get_mut(..n * 8).ok_or(Errno(libc::EINVAL))?;
        if pread_full(fd.as_fd(), want, index * 8)? < n * 8 {
            return Err(Errno(libc::EIO));
        }
        for (i, entry) in want.chunks_exact(8).enumerate() {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(entry);
            if pick(u64::from_ne_bytes(bytes)) {
                let at = (index + i as u64) * page;
                match found.last_mut() {
                    Some(last) if last.1 == at => last.1 = at + page,
                    _ => found.push((at, at + page)),
                }
            }
        }
        index += n as u64;
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_pages_of_a_file_mapping_are_found_with_or_without_pagemap_scan() {
        use std::io::Write;
        let dir = std::env::temp_dir().join(format!("tiexec-modified-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("file");
        std::fs::File::create(&path)
            .and_then(|mut f| f.write_all(&[7u8; 8 * 4096]))
            .expect("write file");
        let file = std::fs::File::open(&path).expect("open");
        // SAFETY: the test's own file in its own directory, not truncated.
        let mut m = unsafe { Mapping::file(file.as_fd(), 0, 8 * 4096, Prot::READ, false, true) }
            .expect("map");
        let r = m.range();
        assert_eq!(modified_file_pages_by_entries(r.start, r.end), Ok(vec![]));
        m.protect(Prot::READ_WRITE).expect("writable");
        if let Some(b) = m.bytes_mut().and_then(|b| b.get_mut(2 * 4096..3 * 4096)) {
            b.fill(1);
        }
        let written = vec![(r.start + 2 * 4096, r.start + 3 * 4096)];
        assert_eq!(
            modified_file_pages_by_entries(r.start, r.end),
            Ok(written.clone())
        );
        assert_eq!(modified_file_pages(r.start, r.end), Ok(written));
        drop(m);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_process_is_named_by_its_pid_and_start_time() {
        let me = process_start_ticks(std::process::id()).expect("our own stat");
        assert!(me > 0);
        assert_eq!(process_start_ticks(std::process::id()), Some(me));
        assert_eq!(process_start_ticks(u32::MAX), None);
        let odd = b"42 (a) b) c) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 777 19";
        assert_eq!(stat_start_ticks(odd), Some(777));
    }

    #[test]
    fn aligned_anonymous_memory_is_aligned_and_given_back() {
        let m = Mapping::anonymous_aligned(4 << 20, 2 << 20, Prot::READ_WRITE).expect("map");
        assert_eq!(m.start() % (2 << 20), 0);
        assert_eq!(m.len(), 4 << 20);
        let r = m.range();
        drop(m);
        // Given back: a placeholder fits exactly there again.
        let again = Mapping::reserve_at(r).expect("free again");
        drop(again);
    }

    #[test]
    fn a_placeholder_never_replaces_a_mapping() {
        let m = Mapping::anonymous(4096, Prot::READ, 0).expect("map");
        assert_eq!(
            Mapping::reserve_at(m.range()).err(),
            Some(Errno(libc::EEXIST))
        );
    }

    #[test]
    fn only_writable_mappings_hand_out_their_bytes() {
        let mut m = Mapping::anonymous(4096, Prot::READ_WRITE, 0).expect("map");
        m.bytes_mut().expect("writable")[0] = 7;
        m.protect(Prot::READ).expect("protect");
        assert!(m.bytes_mut().is_none());
    }

    #[test]
    fn tmpfiles_are_linked_without_replacing_and_reopened_read_only() {
        let dir = std::env::temp_dir();
        let dir_c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
        let dirfd = open_dir_at(None, &dir_c).expect("open tmp");
        // The temporary directory must take O_TMPFILE (ext4, tmpfs, xfs,
        // btrfs do): the cache relies on it on hugetlbfs, and this is the
        // test of the calls it makes.
        let tmp = open_at(
            Some(dirfd.as_fd()),
            c".",
            libc::O_TMPFILE | libc::O_RDWR,
            0o600,
        )
        .expect("O_TMPFILE in the temporary directory");
        write_all(tmp.as_fd(), b"hello").expect("write");
        let name = format!("tiexec-sys-test-{}", std::process::id());
        let name_c = std::ffi::CString::new(name.clone()).unwrap();
        link_tmpfile(tmp.as_fd(), dirfd.as_fd(), &name_c).expect("link");
        assert_eq!(
            link_tmpfile(tmp.as_fd(), dirfd.as_fd(), &name_c),
            Err(Errno(libc::EEXIST))
        );
        let ro = reopen_read_only(tmp.as_fd()).expect("reopen");
        let mut buf = [0u8; 8];
        assert_eq!(pread_full(ro.as_fd(), &mut buf, 0), Ok(5));
        assert_eq!(&buf[..5], b"hello");
        assert!(write_all(ro.as_fd(), b"x").is_err(), "read-only");
        unlink_at(dirfd.as_fd(), &name_c).expect("unlink");
    }
}
