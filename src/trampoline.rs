//! The routine that performs the swap (asm/swap_x86_64.s, whose header is
//! its full contract; asm/swap_aarch64.s, the same contract on arm64), the
//! numbers it is assembled with, and where it runs.
//!
//! Every constant the routine uses comes from here: syscall numbers, flags and
//! errno values from the libc crate, record offsets from `offset_of!`, codes
//! from the enums below. The assembler substitutes them; none is copied by
//! hand.
//!
//! Where it runs ([`Trampoline::prepare`]): in place, in tiexec's own text,
//! when that text is not among the ranges being swapped (always so for the
//! preloaded library, which never moves itself); otherwise from a copy in a
//! page of its own, so the code doing the swap is never inside a range being
//! swapped (tiexec linked into the program it optimises). The copy is
//! written into anonymous memory that becomes r-x only after it is written,
//! or, when memory-deny-write-execute forbids that, written into a memfd that
//! is mapped r-x from the start.

use core::mem::offset_of;

use crate::fault;
use crate::plan::{page, Range};
use crate::sys::{self, Errno, Mapping, Prot};

/// One record of the routine's input and output.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SwapOp {
    /// The replacement: huge-page aligned, populated, holding the text bytes.
    /// Anonymous and r-w when `fd < 0`; else a mapping of `fd`'s file, r-x.
    pub staging: u64,
    /// The text range to replace.
    pub text: u64,
    /// Length of both, a multiple of 2 MiB.
    pub len: u64,
    /// -1, or a read-only descriptor of the file `staging` maps (from
    /// `fd_offset`): the routine maps it back if the text is lost.
    pub fd: i64,
    /// Where in `fd`'s file the staging mapping starts (a multiple of the
    /// huge page: an image serving part of an object's text).
    pub fd_offset: u64,
    /// A page of the text range that was mapped before the swap (the range
    /// may hold unmapped holes).
    pub probe: u64,
    /// In: 0, or a [`Fail`] code to make one step fail on purpose (tests).
    pub fail: u64,
    /// Out: 0, or `-errno` of the step that failed.
    pub status: i64,
    /// Out: one of the [`OutcomeCode`]s.
    pub outcome: u64,
}

impl Default for SwapOp {
    fn default() -> Self {
        SwapOp {
            staging: 0,
            text: 0,
            len: 0,
            fd: -1,
            fd_offset: 0,
            probe: 0,
            fail: 0,
            status: 0,
            outcome: u64::MAX,
        }
    }
}

/// Injected failures inside the routine (see the asm header), for tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum Fail {
    /// Step 1 (mprotect of anonymous staging) reports EPERM.
    Protect = 1,
    /// Step 2 (mremap) reports ENOMEM; nothing was changed.
    Remap = 2,
    /// The text is really unmapped, then step 2 reports ENOMEM: the routine
    /// must find the hole and put the bytes back.
    RemapHole = 3,
}

/// The routine's raw outcome codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum OutcomeCode {
    /// See [`Outcome::Swapped`].
    Swapped = 0,
    /// See [`Outcome::ProtectFailed`].
    ProtectFailed = 1,
    /// See [`Outcome::RemapFailed`].
    RemapFailed = 2,
    /// See [`Outcome::RestoredByCopy`].
    RestoredByCopy = 3,
    /// See [`Outcome::TextLost`].
    TextLost = 4,
    /// See [`Outcome::RestoreProtectFailed`].
    RestoreProtectFailed = 5,
    /// See [`Outcome::RestoredByMap`].
    RestoredByMap = 6,
}

/// What the routine did with one record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The huge pages are the text now; the staging address is free.
    Swapped,
    /// mprotect(staging, r-x) failed; text untouched, staging still r-w.
    ProtectFailed(Errno),
    /// mremap failed and the text is still fully mapped: untouched.
    RemapFailed(Errno),
    /// mremap failed after the kernel had unmapped the text; the same bytes
    /// were copied back into anonymous 4 KiB pages, r-x.
    RestoredByCopy(Errno),
    /// mremap failed after the kernel had unmapped the text; the staging's
    /// file was mapped there again (the same bytes, r-x).
    RestoredByMap(Errno),
    /// As above, but mapping memory at the text address failed: the text is
    /// gone. Never seen; reported as an error.
    TextLost(Errno),
    /// As `RestoredByCopy`, but making the copy r-x failed: it is r-w.
    RestoreProtectFailed(Errno),
    /// A code the routine does not write (the record was not processed).
    Unknown(u64),
}

impl SwapOp {
    /// Decodes the routine's output.
    pub fn outcome(&self) -> Outcome {
        let e = Errno::from_negative(self.status);
        const SWAPPED: u64 = OutcomeCode::Swapped as u64;
        const PROTECT_FAILED: u64 = OutcomeCode::ProtectFailed as u64;
        const REMAP_FAILED: u64 = OutcomeCode::RemapFailed as u64;
        const RESTORED_BY_COPY: u64 = OutcomeCode::RestoredByCopy as u64;
        const TEXT_LOST: u64 = OutcomeCode::TextLost as u64;
        const RESTORE_PROTECT_FAILED: u64 = OutcomeCode::RestoreProtectFailed as u64;
        const RESTORED_BY_MAP: u64 = OutcomeCode::RestoredByMap as u64;
        match self.outcome {
            SWAPPED => Outcome::Swapped,
            PROTECT_FAILED => Outcome::ProtectFailed(e),
            REMAP_FAILED => Outcome::RemapFailed(e),
            RESTORED_BY_COPY => Outcome::RestoredByCopy(e),
            RESTORED_BY_MAP => Outcome::RestoredByMap(e),
            TEXT_LOST => Outcome::TextLost(e),
            RESTORE_PROTECT_FAILED => Outcome::RestoreProtectFailed(e),
            other => Outcome::Unknown(other),
        }
    }
}

/// Assembles one architecture's routine with every number it names
/// supplied from here (see the module doc).
macro_rules! assemble_swap_routine {
    ($file:literal $(, $option:ident)?) => {
        core::arch::global_asm!(
            include_str!($file),
            OP_STAGING = const offset_of!(SwapOp, staging),
            OP_TEXT = const offset_of!(SwapOp, text),
            OP_LEN = const offset_of!(SwapOp, len),
            OP_FD = const offset_of!(SwapOp, fd),
            OP_FD_OFFSET = const offset_of!(SwapOp, fd_offset),
            OP_PROBE = const offset_of!(SwapOp, probe),
            OP_FAIL = const offset_of!(SwapOp, fail),
            OP_STATUS = const offset_of!(SwapOp, status),
            OP_OUTCOME = const offset_of!(SwapOp, outcome),
            OP_SIZE = const core::mem::size_of::<SwapOp>(),
            SYS_MMAP = const libc::SYS_mmap,
            SYS_MPROTECT = const libc::SYS_mprotect,
            SYS_MUNMAP = const libc::SYS_munmap,
            SYS_MREMAP = const libc::SYS_mremap,
            SYS_MSYNC = const libc::SYS_msync,
            SYS_RT_SIGPROCMASK = const libc::SYS_rt_sigprocmask,
            SIG_SETMASK = const libc::SIG_SETMASK,
            SIGSET_BYTES = const KERNEL_SIGSET_BYTES,
            PROT_READ_EXEC = const libc::PROT_READ | libc::PROT_EXEC,
            PROT_READ_WRITE = const libc::PROT_READ | libc::PROT_WRITE,
            MREMAP_MAYMOVE_FIXED = const libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            MAP_SHARED_FIXED = const libc::MAP_SHARED | libc::MAP_FIXED,
            MAP_PRIVATE_ANON_FIXED = const libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
            MS_ASYNC = const libc::MS_ASYNC,
            PAGE = const MSYNC_PROBE_LEN,
            EPERM = const libc::EPERM,
            ENOMEM = const libc::ENOMEM,
            FAIL_PROTECT = const Fail::Protect as u64,
            FAIL_REMAP = const Fail::Remap as u64,
            FAIL_REMAP_HOLE = const Fail::RemapHole as u64,
            OUTCOME_SWAPPED = const OutcomeCode::Swapped as u64,
            OUTCOME_PROTECT_FAILED = const OutcomeCode::ProtectFailed as u64,
            OUTCOME_REMAP_FAILED = const OutcomeCode::RemapFailed as u64,
            OUTCOME_RESTORED_BY_COPY = const OutcomeCode::RestoredByCopy as u64,
            OUTCOME_RESTORED_BY_MAP = const OutcomeCode::RestoredByMap as u64,
            OUTCOME_TEXT_LOST = const OutcomeCode::TextLost as u64,
            OUTCOME_RESTORE_PROTECT_FAILED = const OutcomeCode::RestoreProtectFailed as u64,
            $(options($option))?
        );
    };
}

#[cfg(target_arch = "x86_64")]
assemble_swap_routine!("../asm/swap_x86_64.s", att_syntax);

#[cfg(target_arch = "aarch64")]
assemble_swap_routine!("../asm/swap_aarch64.s");

/// The length the routine's msync probes: one 4 KiB page, which the kernel
/// rounds up to its own page (4, 16 or 64 KiB) from the page-aligned probe.
const MSYNC_PROBE_LEN: u64 = 4096;

/// The kernel's `sigset_t` (64 signals), which rt_sigprocmask wants, not
/// glibc's 128-byte one.
const KERNEL_SIGSET_BYTES: usize = 8;

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
extern "C" {
    static tiexec_trampoline_start: u8;
    static tiexec_trampoline_end: u8;
}

/// The routine's bytes in our own text.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
fn routine_bytes() -> &'static [u8] {
    // SAFETY: both symbols are defined by the asm in the same section, start
    // before end, and the bytes between them are read-only code that lives
    // as long as this library.
    unsafe {
        let start = core::ptr::addr_of!(tiexec_trampoline_start);
        let end = core::ptr::addr_of!(tiexec_trampoline_end);
        let len = (end as usize).saturating_sub(start as usize);
        core::slice::from_raw_parts(start, len)
    }
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn routine_bytes() -> &'static [u8] {
    &[]
}

/// Why the routine could not be made ready.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrampolineError {
    /// No routine for this architecture.
    Unsupported,
    /// Mapping a page for a copy of it failed.
    Map(Errno),
    /// Making that page r-x failed (memory-deny-write-execute refuses it when
    /// the page was writable).
    Protect(Errno),
}

/// Where the routine runs for one swap.
pub enum Trampoline {
    /// In tiexec's own text, which the swap leaves alone.
    InPlace(&'static [u8]),
    /// A private r-x copy, unmapped on drop.
    Copied(Mapping),
}

impl Trampoline {
    /// Chooses where to run the routine for swapping `ranges`: in place when
    /// its own pages lie outside all of them; else a copy (see the module
    /// doc; `mdwe`: memory-deny-write-execute is on).
    pub fn prepare(ranges: &[Range], mdwe: bool) -> Result<Trampoline, TrampolineError> {
        let code = routine_bytes();
        if code.is_empty() {
            return Err(TrampolineError::Unsupported);
        }
        let start = code.as_ptr() as u64;
        let own = Range::new(
            crate::plan::align_down(start, page()),
            crate::plan::align_up(start + code.len() as u64, page()),
        );
        // The tests of the copy path force it.
        let forced =
            fault::at(fault::Step::TrampolineMap) || fault::at(fault::Step::TrampolineProtect);
        if !forced && ranges.iter().all(|r| r.intersect(own).is_none()) {
            return Ok(Trampoline::InPlace(code));
        }
        let len = crate::plan::align_up(code.len() as u64, page()) as usize;
        if fault::at(fault::Step::TrampolineMap) {
            return Err(TrampolineError::Map(Errno(libc::ENOMEM)));
        }
        if mdwe {
            return copy_through_memfd(code, len).map(Trampoline::Copied);
        }
        let mut page =
            Mapping::anonymous(len, Prot::READ_WRITE, 0).map_err(TrampolineError::Map)?;
        let bytes = page
            .bytes_mut()
            .ok_or(TrampolineError::Map(Errno(libc::EFAULT)))?;
        if let Some(dst) = bytes.get_mut(..code.len()) {
            dst.copy_from_slice(code);
        }
        // The instruction cache does not see data writes on every
        // architecture (arm64): the copy must reach it before it can run.
        page.sync_icache();
        if fault::at(fault::Step::TrampolineProtect) {
            return Err(TrampolineError::Protect(Errno(libc::EACCES)));
        }
        page.protect(Prot::READ_EXEC)
            .map_err(TrampolineError::Protect)?;
        Ok(Trampoline::Copied(page))
    }

    /// Runs the routine over `ops`.
    ///
    /// # Safety
    /// Every record must satisfy the asm contract: `staging` a single mapping
    /// of `len` bytes, huge-page aligned, populated, holding exactly the bytes
    /// now at `text` (r-w and anonymous when `fd < 0`, else r-x from `fd`);
    /// `text` huge-page aligned, mapped r-x private, and not executed by any
    /// other thread meanwhile; no two records overlap, and none overlaps the
    /// routine. On `Outcome::Swapped` the staging range is no longer mapped.
    pub unsafe fn run(&self, ops: &mut [SwapOp]) -> Result<(), Errno> {
        type Routine = unsafe extern "C" fn(*mut SwapOp, usize) -> i64;
        let entry = match self {
            Trampoline::InPlace(code) => code.as_ptr(),
            Trampoline::Copied(page) => page.as_ptr().cast_const(),
        };
        // SAFETY: `entry` is the first byte of the position-independent
        // routine (in our text, or an exact copy of it, r-x); its ABI is the
        // C one declared in the asm header.
        let routine: Routine = unsafe { core::mem::transmute::<*const u8, Routine>(entry) };
        // SAFETY: the caller upholds the contract above; `ops` is a valid
        // mutable array of `ops.len()` records.
        let ret = unsafe { routine(ops.as_mut_ptr(), ops.len()) };
        if ret == 0 {
            Ok(())
        } else {
            Err(Errno::from_negative(ret))
        }
    }
}

/// A copy of `code` in a page that is never writable: written into a memfd,
/// which is then mapped r-x.
fn copy_through_memfd(code: &[u8], len: usize) -> Result<Mapping, TrampolineError> {
    use std::os::fd::AsFd;
    let fd = sys::memfd(c"tiexec-swap", None).map_err(TrampolineError::Map)?;
    sys::write_all(fd.as_fd(), code).map_err(TrampolineError::Map)?;
    sys::ftruncate(fd.as_fd(), len as u64).map_err(TrampolineError::Map)?;
    // SAFETY: our own memfd, `len` bytes long, never truncated.
    unsafe { Mapping::file(fd.as_fd(), 0, len, Prot::READ_EXEC, false, true) }
        .map_err(TrampolineError::Protect)
}

#[cfg(all(test, any(target_arch = "x86_64", target_arch = "aarch64")))]
mod tests {
    use super::*;

    #[test]
    fn routine_is_small_and_self_contained() {
        let code = routine_bytes();
        assert!(
            !code.is_empty() && code.len() < 1024,
            "{} bytes",
            code.len()
        );
        // A landing pad for indirect calls first (endbr64 / bti c), a
        // return last.
        #[cfg(target_arch = "x86_64")]
        {
            assert_eq!(&code[..4], &[0xf3, 0x0f, 0x1e, 0xfa]);
            assert_eq!(code.last(), Some(&0xc3));
        }
        #[cfg(target_arch = "aarch64")]
        {
            assert_eq!(&code[..4], &0xd503245f_u32.to_le_bytes());
            assert_eq!(&code[code.len() - 4..], &0xd65f03c0_u32.to_le_bytes());
        }
    }

    #[test]
    fn the_record_is_what_the_routine_expects() {
        assert_eq!(core::mem::size_of::<SwapOp>(), 72);
        assert_eq!(offset_of!(SwapOp, outcome), 64);
    }

    #[test]
    fn no_records_means_no_change() {
        let t = Trampoline::prepare(&[], false).expect("prepare");
        assert!(matches!(t, Trampoline::InPlace(_)));
        // SAFETY: an empty list satisfies the contract trivially.
        unsafe { t.run(&mut []) }.expect("run");
    }

    #[test]
    fn a_copy_runs_too_written_either_way() {
        let code = routine_bytes();
        let own = Range::new(code.as_ptr() as u64, code.as_ptr() as u64 + 1);
        for mdwe in [false, true] {
            let t = Trampoline::prepare(&[own], mdwe).expect("prepare");
            assert!(matches!(t, Trampoline::Copied(_)));
            // SAFETY: as above.
            unsafe { t.run(&mut []) }.expect("run");
        }
    }

    #[test]
    fn a_bad_record_leaves_the_text_and_reports_why() {
        // A staging address that is not mapped at all: mprotect fails and
        // nothing else happens.
        let t = Trampoline::prepare(&[], false).expect("prepare");
        let text = Mapping::anonymous(4096, Prot::READ, 0).expect("map");
        let mut ops = [SwapOp {
            staging: 0x1000, // never mapped in a user process
            text: text.start(),
            len: 4096,
            probe: text.start(),
            ..SwapOp::default()
        }];
        // SAFETY: the record violates the contract only in ways the routine
        // detects (unmapped staging); `text` is our own page.
        unsafe { t.run(&mut ops) }.expect("run");
        assert_eq!(
            ops[0].outcome(),
            Outcome::ProtectFailed(Errno(libc::ENOMEM))
        );
    }

    #[test]
    fn a_refused_mremap_leaves_the_text_mapped_and_readable() {
        // mremap refuses an unaligned target before touching anything: the
        // routine must see the text still mapped and report RemapFailed.
        let t = Trampoline::prepare(&[], false).expect("prepare");
        let mut text = Mapping::anonymous(8192, Prot::READ_WRITE, 0).expect("map");
        text.bytes_mut().expect("writable").fill(0xab);
        let staging = Mapping::anonymous(4096, Prot::READ_WRITE, 0).expect("map");
        let mut ops = [SwapOp {
            staging: staging.start(),
            text: text.start() + 1, // unaligned: EINVAL
            len: 4096,
            probe: text.start(),
            ..SwapOp::default()
        }];
        // SAFETY: every address in the record is our own mapping; the
        // unaligned target only makes mremap fail.
        unsafe { t.run(&mut ops) }.expect("run");
        assert_eq!(ops[0].outcome(), Outcome::RemapFailed(Errno(libc::EINVAL)));
        assert!(text
            .bytes_mut()
            .expect("writable")
            .iter()
            .all(|&b| b == 0xab));
    }

    /// A function that returns 42, in this architecture's machine code.
    #[cfg(target_arch = "x86_64")]
    const RETURNS_42: &[u8] = &[0xb8, 0x2a, 0, 0, 0, 0xc3]; // mov eax, 42; ret
    #[cfg(target_arch = "aarch64")]
    const RETURNS_42: &[u8] = &[0x40, 0x05, 0x80, 0x52, 0xc0, 0x03, 0x5f, 0xd6]; // mov w0, #42; ret

    const TEXT_LEN: usize = 64 << 10;

    /// "Text" on ordinary pages: `RETURNS_42` at the start of every 4 KiB
    /// page, a pattern elsewhere, r-x. Returns the mapping and its bytes.
    fn fake_text() -> (Mapping, Vec<u8>) {
        let mut bytes = vec![0u8; TEXT_LEN];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = (i * 7 + i / 4096) as u8;
        }
        for page in bytes.chunks_mut(4096) {
            page[..RETURNS_42.len()].copy_from_slice(RETURNS_42);
        }
        let mut text = Mapping::anonymous(TEXT_LEN, Prot::READ_WRITE, 0).expect("map");
        text.bytes_mut().expect("writable").copy_from_slice(&bytes);
        text.sync_icache();
        text.protect(Prot::READ_EXEC).expect("r-x");
        (text, bytes)
    }

    /// Calls the function at `addr` (a copy of `RETURNS_42`).
    fn call(addr: u64) -> i32 {
        // SAFETY: the tests call only addresses that hold `RETURNS_42`,
        // mapped r-x, with caches synchronised.
        let f = unsafe { core::mem::transmute::<u64, extern "C" fn() -> i32>(addr) };
        f()
    }

    /// The `rwxp` field of the one /proc/self/maps line that covers
    /// `[start, end)` exactly; None if no single line does.
    fn perms_of(start: u64, end: u64) -> Option<String> {
        let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
        maps.lines().find_map(|l| {
            let mut f = l.split_whitespace();
            let (a, b) = f.next()?.split_once('-')?;
            let a = u64::from_str_radix(a, 16).ok()?;
            let b = u64::from_str_radix(b, 16).ok()?;
            (a <= start && end <= b).then(|| f.next().map(str::to_owned))?
        })
    }

    fn staging_with(bytes: &[u8]) -> Mapping {
        let mut staging = Mapping::anonymous(TEXT_LEN, Prot::READ_WRITE, 0).expect("map");
        staging
            .bytes_mut()
            .expect("writable")
            .copy_from_slice(bytes);
        staging.sync_icache();
        staging
    }

    /// The whole routine on ordinary pages: swapped, or put back after an
    /// injected hole, the text holds the same bytes, runs, and is r-x.
    fn swap_case(fail: Option<Fail>, file_backed: bool) -> Outcome {
        use std::os::fd::{AsFd, AsRawFd};
        let t = Trampoline::prepare(&[], false).expect("prepare");
        let (text, bytes) = fake_text();
        let (staging, fd) = if file_backed {
            let fd = sys::memfd(c"tiexec-test", None).expect("memfd");
            sys::write_all(fd.as_fd(), &bytes).expect("write");
            // SAFETY: the test's own memfd, never truncated.
            let m = unsafe { Mapping::file(fd.as_fd(), 0, TEXT_LEN, Prot::READ_EXEC, false, true) }
                .expect("map file");
            (m, Some(fd))
        } else {
            (staging_with(&bytes), None)
        };
        let mut ops = [SwapOp {
            staging: staging.start(),
            text: text.start(),
            len: TEXT_LEN as u64,
            probe: text.start() + 4096,
            fd: fd.as_ref().map_or(-1, |f| i64::from(f.as_raw_fd())),
            fail: fail.map_or(0, |f| f as u64),
            ..SwapOp::default()
        }];
        // SAFETY: `text` and `staging` are our own mappings of the same
        // length and bytes; nothing else runs in `text`.
        unsafe { t.run(&mut ops) }.expect("run");
        let outcome = ops[0].outcome();
        // SAFETY: the text range is mapped (every outcome below but
        // TextLost says so) and readable.
        let now = unsafe { core::slice::from_raw_parts(text.start() as *const u8, TEXT_LEN) };
        assert!(now == &bytes[..], "{outcome:?}: the same bytes");
        for page in (0..TEXT_LEN as u64).step_by(4096) {
            assert_eq!(call(text.start() + page), 42, "{outcome:?}: runs");
        }
        // Put back by mapping the file, the text is a shared mapping of it.
        let want = if matches!(outcome, Outcome::RestoredByMap(_)) {
            "r-xs"
        } else {
            "r-xp"
        };
        assert_eq!(
            perms_of(text.start(), text.start() + TEXT_LEN as u64).as_deref(),
            Some(want),
            "{outcome:?}: r-x, never writable"
        );
        if outcome == Outcome::Swapped {
            // The staging's pages are the text now: its old range is free.
            staging.release();
        }
        outcome
    }

    #[test]
    fn a_swap_on_ordinary_pages_moves_the_same_bytes_over_the_text() {
        assert_eq!(swap_case(None, false), Outcome::Swapped);
        assert_eq!(swap_case(None, true), Outcome::Swapped);
    }

    #[test]
    fn an_injected_hole_is_filled_with_the_same_bytes_by_copy_or_by_map() {
        let e = Errno(libc::ENOMEM);
        assert_eq!(
            swap_case(Some(Fail::RemapHole), false),
            Outcome::RestoredByCopy(e)
        );
        assert_eq!(
            swap_case(Some(Fail::RemapHole), true),
            Outcome::RestoredByMap(e)
        );
    }

    #[test]
    fn injected_refusals_leave_the_text_alone() {
        let e = Errno(libc::ENOMEM);
        assert_eq!(swap_case(Some(Fail::Remap), false), Outcome::RemapFailed(e));
        assert_eq!(
            swap_case(Some(Fail::Protect), false),
            Outcome::ProtectFailed(Errno(libc::EPERM))
        );
    }

    #[test]
    fn unknown_codes_decode_as_unknown() {
        let op = SwapOp::default();
        assert_eq!(op.outcome(), Outcome::Unknown(u64::MAX));
    }
}
