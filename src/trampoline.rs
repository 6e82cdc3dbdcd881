//! The asm routine that performs the swap (asm/trampoline_x86_64.S, whose
//! header is its full contract), and the private mapping it runs from.
//!
//! The routine's bytes are copied out of our own text into a fresh anonymous
//! page, which is then made r-x (never writable and executable at once). So
//! the code doing the swap is never inside a range being swapped, even when
//! tiexec is linked into the program it optimises.

use crate::fault;
use crate::sys::{self, Errno};

/// One record of the routine's input and output (56 bytes, see the asm).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SwapOp {
    /// The replacement: 2 MiB aligned, populated, holding the text bytes, r-w.
    pub staging: u64,
    /// The text range to replace.
    pub text: u64,
    /// Length of both, a multiple of 2 MiB.
    pub len: u64,
    /// Out: 0, or `-errno` of the step that failed.
    pub status: i64,
    /// Out: one of the `Outcome` codes.
    pub outcome: u64,
    /// In: 0, or a `Fail` code to make one step fail on purpose (tests).
    pub fail: u64,
    /// In: a page of the text range that was mapped before the swap (the
    /// range may hold unmapped holes).
    pub probe: u64,
}

const _: () = assert!(core::mem::size_of::<SwapOp>() == 56);

/// Injected failures inside the routine (see the asm header), for tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum Fail {
    /// Step 1 (mprotect of the staging) reports EPERM.
    Protect = 1,
    /// Step 2 (mremap) reports ENOMEM; nothing was changed.
    Remap = 2,
    /// The text is really unmapped, then step 2 reports ENOMEM: the routine
    /// must find the hole and copy the bytes back.
    RemapHole = 3,
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
    /// As above, but mapping memory at the text address failed: the text is
    /// gone. Never seen; reported as an error.
    TextLost(Errno),
    /// As `RestoredByCopy`, but making the copy r-x failed: it is r-w.
    RestoreProtectFailed(Errno),
}

impl SwapOp {
    /// Decodes the routine's output.
    pub fn outcome(&self) -> Outcome {
        let e = Errno::from_negative(self.status);
        match self.outcome {
            0 => Outcome::Swapped,
            1 => Outcome::ProtectFailed(e),
            2 => Outcome::RemapFailed(e),
            3 => Outcome::RestoredByCopy(e),
            4 => Outcome::TextLost(e),
            _ => Outcome::RestoreProtectFailed(e),
        }
    }
}

#[cfg(tiexec_trampoline)]
extern "C" {
    static tiexec_trampoline_start: u8;
    static tiexec_trampoline_end: u8;
}

/// The routine's bytes in our own text.
#[cfg(tiexec_trampoline)]
fn routine_bytes() -> &'static [u8] {
    // SAFETY: both symbols are defined by the asm file in the same section,
    // start before end, and the bytes between them are read-only code that
    // lives as long as this library.
    unsafe {
        let start = core::ptr::addr_of!(tiexec_trampoline_start);
        let end = core::ptr::addr_of!(tiexec_trampoline_end);
        let len = (end as usize).saturating_sub(start as usize);
        core::slice::from_raw_parts(start, len)
    }
}

#[cfg(not(tiexec_trampoline))]
fn routine_bytes() -> &'static [u8] {
    &[]
}

/// Why the trampoline could not be made ready.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrampolineError {
    /// No routine for this architecture.
    Unsupported,
    /// mmap of its page failed.
    Map(Errno),
    /// mprotect r-x of its page failed.
    Protect(Errno),
}

/// A private r-x copy of the routine, unmapped on drop.
pub struct MappedTrampoline {
    addr: *mut u8,
    len: usize,
}

impl MappedTrampoline {
    /// Copies the routine into a fresh page and makes it r-x.
    pub fn map() -> Result<MappedTrampoline, TrampolineError> {
        let code = routine_bytes();
        if code.is_empty() {
            return Err(TrampolineError::Unsupported);
        }
        let len = crate::plan::align_up(code.len() as u64, crate::plan::PAGE) as usize;
        if fault::at(fault::Step::TrampolineMap) {
            return Err(TrampolineError::Map(Errno(libc::ENOMEM)));
        }
        let addr = sys::mmap_anonymous(len, libc::PROT_READ | libc::PROT_WRITE, 0)
            .map_err(TrampolineError::Map)?;
        let mapped = MappedTrampoline { addr, len };
        // SAFETY: `addr` is a fresh private mapping of `len >= code.len()`
        // bytes, writable, not overlapping `code`.
        unsafe { core::ptr::copy_nonoverlapping(code.as_ptr(), addr, code.len()) };
        if fault::at(fault::Step::TrampolineProtect) {
            return Err(TrampolineError::Protect(Errno(libc::EACCES)));
        }
        // SAFETY: the page is ours (mapped just above); from here on it is
        // only read and executed.
        unsafe { sys::mprotect(addr, len, libc::PROT_READ | libc::PROT_EXEC) }
            .map_err(TrampolineError::Protect)?;
        Ok(mapped)
    }

    /// Runs the routine over `ops`.
    ///
    /// # Safety
    /// Every record must satisfy the asm contract: `staging` a single private
    /// mapping of `len` bytes, 2 MiB aligned, populated, r-w, holding exactly
    /// the bytes now at `text`; `text` 2 MiB aligned, mapped r-x private, and
    /// not executed by any other thread meanwhile; no two records overlap.
    /// On `Outcome::Swapped` the staging address range is no longer mapped.
    pub unsafe fn run(&self, ops: &mut [SwapOp]) -> Result<(), Errno> {
        type Routine = unsafe extern "C" fn(*mut SwapOp, usize) -> i64;
        // SAFETY: `addr` holds an exact copy of the position-independent
        // routine, r-x; its ABI is the C one declared in the asm header.
        let routine: Routine = unsafe { core::mem::transmute::<*mut u8, Routine>(self.addr) };
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

impl Drop for MappedTrampoline {
    fn drop(&mut self) {
        // SAFETY: the page was mapped by `map` and nothing refers to it once
        // `run` has returned.
        let _ = unsafe { sys::munmap(self.addr, self.len) };
    }
}

#[cfg(all(test, tiexec_trampoline))]
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
        // endbr64 first, ret last.
        assert_eq!(&code[..4], &[0xf3, 0x0f, 0x1e, 0xfa]);
        assert_eq!(code.last(), Some(&0xc3));
    }

    #[test]
    fn no_records_means_no_change() {
        let t = MappedTrampoline::map().expect("map trampoline");
        // SAFETY: an empty list satisfies the contract trivially.
        unsafe { t.run(&mut []) }.expect("run");
    }

    #[test]
    fn a_bad_record_leaves_the_text_and_reports_why() {
        // Staging that is not 2 MiB aligned: mremap over hugetlb-free memory
        // still works in general, so use a staging address that is not mapped
        // at all: mprotect fails and nothing else happens.
        let t = MappedTrampoline::map().expect("map trampoline");
        let text = sys::mmap_anonymous(4096, libc::PROT_READ, 0).expect("map");
        let mut ops = [SwapOp {
            staging: 0x1000, // never mapped in a user process
            text: text as u64,
            len: 4096,
            probe: text as u64,
            ..SwapOp::default()
        }];
        // SAFETY: the record violates the contract only in ways the routine
        // detects (unmapped staging); `text` is our own page.
        unsafe { t.run(&mut ops) }.expect("run");
        assert_eq!(
            ops[0].outcome(),
            Outcome::ProtectFailed(Errno(libc::ENOMEM))
        );
        // SAFETY: our page, mapped above.
        unsafe { sys::munmap(text, 4096) }.expect("unmap");
    }

    #[test]
    fn a_refused_mremap_leaves_the_text_mapped_and_readable() {
        // mremap refuses an unaligned target before touching anything: the
        // routine must see the text still mapped and report RemapFailed.
        let t = MappedTrampoline::map().expect("map trampoline");
        let text = sys::mmap_anonymous(8192, libc::PROT_READ | libc::PROT_WRITE, 0).expect("map");
        // SAFETY: our own fresh page.
        unsafe { text.write_bytes(0xab, 8192) };
        let staging =
            sys::mmap_anonymous(4096, libc::PROT_READ | libc::PROT_WRITE, 0).expect("map");
        let mut ops = [SwapOp {
            staging: staging as u64,
            text: text as u64 + 1, // unaligned: EINVAL
            len: 4096,
            probe: text as u64,
            ..SwapOp::default()
        }];
        // SAFETY: every address in the record is our own mapping; the
        // unaligned target only makes mremap fail.
        unsafe { t.run(&mut ops) }.expect("run");
        assert_eq!(ops[0].outcome(), Outcome::RemapFailed(Errno(libc::EINVAL)));
        // SAFETY: the text pages are still mapped and readable.
        let bytes = unsafe { core::slice::from_raw_parts(text, 8192) };
        assert!(bytes.iter().all(|&b| b == 0xab));
        // SAFETY: our own mappings.
        unsafe {
            sys::munmap(text, 8192).expect("unmap");
            sys::munmap(staging, 4096).expect("unmap");
        }
    }
}
