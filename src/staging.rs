//! Replacements for text ranges, built away from the text: private copies
//! on pages of the hugetlb pool ([`pool_copy`]) or on anonymous THP
//! ([`thp_copy`]), each a [`Staged`] holding the range's bytes, populated
//! (a shortage is an error now, never a SIGBUS later); cache images are
//! staged by `supply`. `swap` moves them over the text. Also the error of
//! every step of a swap ([`SwapError`]), which all stages report.

use std::os::fd::{AsFd, OwnedFd};

use crate::fault::{self, Step};
use crate::pagesize::huge_page;
use crate::plan::SwapRange;
use crate::policy::{NoSupply, Source};
use crate::range::Range;
use crate::sys::{self, Errno, Mapping, Prot};
use crate::trampoline::TrampolineError;

/// Why a range was not swapped. One variant per failed step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SwapError {
    /// No way to get huge pages for it was allowed or possible.
    NoSupply(NoSupply),
    /// The cache had no usable image and could not build one.
    Cache(crate::cache::Failure),
    /// Mapping a cache image failed.
    ImageMap(Errno),
    /// Stage: mapping the replacement failed (for hugetlb: the pool had too
    /// few free pages).
    StagingMap(Errno),
    /// Stage: `MADV_HUGEPAGE` on THP staging failed.
    StagingAdvise(Errno),
    /// Stage: populating the replacement failed (no memory).
    StagingPopulate(Errno),
    /// Stage: an unmapped hole inside the range could not be reserved:
    /// something is mapped there now.
    HoleTaken(Errno),
    /// Stage: `RLIMIT_AS` leaves too little address space for a copy.
    AddressSpaceLimit {
        /// Bytes the process could still map.
        headroom: u64,
    },
    /// Stage: the memory cgroup's limit leaves too little room for a THP
    /// copy (going over it would mean reclaim, or an OOM kill).
    CgroupLimit {
        /// Bytes the cgroup could still charge.
        headroom: u64,
    },
    /// Stage: the kernel gave THP staging only `huge` bytes of 2 MiB pages.
    StagingNotHuge {
        /// Bytes that were huge.
        huge: u64,
    },
    /// Swap: the routine could not be made ready.
    Trampoline(TrampolineError),
    /// Swap: blocking signals failed; nothing was touched.
    SignalMask(Errno),
    /// Swap: making the staging r-x failed; text untouched.
    StagingProtect(Errno),
    /// Swap: mremap failed; text untouched.
    Remap(Errno),
    /// Swap: mremap failed after unmapping the text; the same bytes were put
    /// back on 4 KiB pages (r-x). The program is unharmed.
    RemapRestoredByCopy(Errno),
    /// Swap: the text could not be put back. Never expected.
    TextLost(Errno),
    /// Swap: the restored copy could not be made r-x; it is r-w.
    RestoredCopyWritable(Errno),
    /// Swap: the routine left an outcome it does not write.
    Unknown(u64),
}

impl SwapError {
    /// True when the program's text at the range is not what it was and
    /// should be (only the "never expected" cases).
    pub fn is_harmful(&self) -> bool {
        matches!(
            self,
            SwapError::TextLost(_) | SwapError::RestoredCopyWritable(_) | SwapError::Unknown(_)
        )
    }
}

impl core::fmt::Display for SwapError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            SwapError::NoSupply(why) => write!(f, "{why}"),
            SwapError::Cache(why) => write!(f, "{why}"),
            SwapError::ImageMap(e) => write!(f, "mapping the cache image failed: {e}"),
            SwapError::StagingMap(e) => write!(f, "mmap of huge pages failed: {e}"),
            SwapError::StagingAdvise(e) => write!(f, "madvise(MADV_HUGEPAGE) failed: {e}"),
            SwapError::StagingPopulate(e) => write!(f, "populating huge pages failed: {e}"),
            SwapError::HoleTaken(e) => {
                write!(
                    f,
                    "a hole in its {} page could not be reserved: {e}",
                    crate::pagesize::huge_page_name()
                )
            }
            SwapError::AddressSpaceLimit { headroom } => write!(
                f,
                "address-space limit (RLIMIT_AS) leaves only {} for the copy",
                crate::log::Bytes(*headroom)
            ),
            SwapError::CgroupLimit { headroom } => write!(
                f,
                "memory cgroup limit leaves only {} for the copy",
                crate::log::Bytes(*headroom)
            ),
            SwapError::StagingNotHuge { huge } => write!(
                f,
                "kernel gave only {} of {} pages",
                crate::log::Bytes(*huge),
                crate::pagesize::huge_page_name()
            ),
            SwapError::Trampoline(TrampolineError::Unsupported) => {
                write!(f, "no swap routine for this architecture")
            }
            SwapError::Trampoline(TrampolineError::Map(e)) => {
                write!(f, "mapping the swap routine failed: {e}")
            }
            SwapError::Trampoline(TrampolineError::Protect(e)) => {
                write!(f, "protecting the swap routine failed: {e}")
            }
            SwapError::SignalMask(e) => write!(f, "blocking signals failed: {e}"),
            SwapError::StagingProtect(e) => write!(f, "mprotect r-x of huge pages failed: {e}"),
            SwapError::Remap(e) => write!(f, "mremap over the text failed: {e}"),
            SwapError::RemapRestoredByCopy(e) => {
                write!(f, "mremap failed ({e}); text restored on 4 KiB pages")
            }
            SwapError::TextLost(e) => write!(f, "TEXT LOST after mremap failure: {e}"),
            SwapError::RestoredCopyWritable(e) => {
                write!(f, "restored text left writable after mremap failure: {e}")
            }
            SwapError::Unknown(code) => write!(f, "unknown outcome {code} of the swap routine"),
        }
    }
}

/// A replacement for one range, holding the range's bytes, ready to be moved
/// over the text.
#[derive(Debug)]
pub struct Staged {
    /// The replacement: anonymous r-w (`fd` none), or a shared mapping of
    /// `fd`'s file, r-x.
    pub mapping: Mapping,
    /// A read-only descriptor of the file behind `mapping`, if any.
    pub fd: Option<OwnedFd>,
    /// Where in that file `mapping` starts.
    pub fd_offset: u64,
    /// Where its pages come from.
    pub source: Source,
}

/// Copies the bytes of `req`'s pieces from the live text into `dst` (the
/// replacement's bytes, as long as the range); the rest stays as it is
/// (zeros).
///
/// # Safety
/// Every piece of `req` must be mapped and readable, and not written while
/// this runs.
unsafe fn copy_text_into(dst: &mut [u8], req: &SwapRange) {
    for piece in req.pieces.iter().filter_map(|p| p.intersect(req.range)) {
        let at = (piece.start - req.range.start) as usize;
        let len = piece.len() as usize;
        let Some(to) = dst.get_mut(at..at.saturating_add(len)) else {
            continue;
        };
        // SAFETY: the caller guarantees that every piece is mapped,
        // readable and not written meanwhile; `to` is a distinct writable
        // mapping of exactly `len` bytes.
        let from = unsafe { core::slice::from_raw_parts(piece.start as *const u8, len) };
        to.copy_from_slice(from);
    }
}

/// Address space kept free under RLIMIT_AS, beyond the copy itself, for
/// the program and for tiexec's own small allocations (which must not fail:
/// an allocation failure aborts).
pub const ADDRESS_SPACE_MARGIN: u64 = 64 << 20;

/// Checks there is address space for `len` more bytes of mappings.
pub fn check_address_space(len: u64) -> Result<(), SwapError> {
    if let Some(headroom) = crate::discover::address_space_headroom() {
        if headroom < len + huge_page() + ADDRESS_SPACE_MARGIN {
            return Err(SwapError::AddressSpaceLimit { headroom });
        }
    }
    Ok(())
}

/// A private copy of `req` on pages of the hugetlb pool: an anonymous
/// hugetlb file (memfd), filled through a writable mapping that is then
/// dropped, and mapped r-x from a read-only descriptor. Never writable and
/// executable, so it works under memory-deny-write-execute too.
///
/// # Safety
/// `req`'s pieces must be mapped, readable, and not written meanwhile (a
/// planned range of loaded text).
pub unsafe fn pool_copy(req: &SwapRange) -> Result<Staged, SwapError> {
    let len = req.range.len() as usize;
    check_address_space(req.range.len() * 2)?;
    if fault::at(Step::StagingMap) {
        return Err(SwapError::StagingMap(Errno(libc::ENOMEM)));
    }
    let file = sys::memfd(c"tiexec-text", Some(huge_page())).map_err(SwapError::StagingMap)?;
    sys::ftruncate(file.as_fd(), req.range.len()).map_err(SwapError::StagingMap)?;
    {
        // A shared hugetlb mapping reserves its pages now (ENOMEM when the
        // pool is short); populating allocates them.
        // SAFETY: our own memfd, sized above, never truncated.
        let mut fill =
            unsafe { Mapping::file(file.as_fd(), 0, len, Prot::READ_WRITE, true, false) }
                .map_err(SwapError::StagingMap)?;
        if fault::at(Step::StagingPopulate) {
            return Err(SwapError::StagingPopulate(Errno(libc::ENOMEM)));
        }
        fill.advise(sys::MADV_POPULATE_WRITE)
            .map_err(SwapError::StagingPopulate)?;
        let bytes = fill
            .bytes_mut()
            .ok_or(SwapError::StagingMap(Errno(libc::EFAULT)))?;
        // SAFETY: the caller's promise about `req`'s pieces.
        unsafe { copy_text_into(bytes, req) };
        fill.sync_icache();
    }
    let fd = sys::reopen_read_only(file.as_fd()).map_err(SwapError::StagingMap)?;
    drop(file);
    // SAFETY: as above; the writable descriptor is closed.
    let mapping = unsafe { Mapping::file(fd.as_fd(), 0, len, Prot::READ_EXEC, true, true) }
        .map_err(SwapError::StagingMap)?;
    Ok(Staged {
        mapping,
        fd: Some(fd),
        fd_offset: 0,
        source: Source::Hugetlb,
    })
}

pub(crate) fn huge_bytes_in(range: Range) -> u64 {
    crate::smaps::huge_ranges(None, range, None)
        .iter()
        .map(Range::len)
        .sum()
}

/// Room kept free in a limited memory cgroup, beyond the copy itself.
const CGROUP_MARGIN: u64 = 64 << 20;

/// A private copy of `req` on anonymous THP: huge-page-aligned memory
/// advised `MADV_HUGEPAGE`, populated, checked huge, filled, r-w (the
/// routine makes it r-x).
///
/// # Safety
/// `req`'s pieces must be mapped, readable, and not written meanwhile (a
/// planned range of loaded text).
pub unsafe fn thp_copy(req: &SwapRange) -> Result<Staged, SwapError> {
    let len = req.range.len() as usize;
    check_address_space(req.range.len())?;
    if let Some(headroom) = crate::discover::memory_cgroup_headroom() {
        if headroom < req.range.len() + CGROUP_MARGIN {
            return Err(SwapError::CgroupLimit { headroom });
        }
    }
    if fault::at(Step::StagingMap) {
        return Err(SwapError::StagingMap(Errno(libc::ENOMEM)));
    }
    let mut staging = Mapping::anonymous_aligned(len, huge_page() as usize, Prot::READ_WRITE)
        .map_err(SwapError::StagingMap)?;
    if fault::at(Step::StagingAdvise) {
        return Err(SwapError::StagingAdvise(Errno(libc::EINVAL)));
    }
    staging
        .advise(libc::MADV_HUGEPAGE)
        .map_err(SwapError::StagingAdvise)?;
    if fault::at(Step::StagingPopulate) {
        return Err(SwapError::StagingPopulate(Errno(libc::ENOMEM)));
    }
    staging
        .advise(sys::MADV_POPULATE_WRITE)
        .map_err(SwapError::StagingPopulate)?;
    if fault::at(Step::StagingNotHuge) {
        return Err(SwapError::StagingNotHuge { huge: 0 });
    }
    let mut huge = huge_bytes_in(staging.range());
    if huge < req.range.len() {
        // Fragmented memory gave some 4 KiB pages: ask for a synchronous
        // collapse (Linux 6.1) before giving up. The pages hold no data yet.
        let _ = staging.advise(sys::MADV_COLLAPSE);
        huge = huge_bytes_in(staging.range());
    }
    if huge < req.range.len() {
        return Err(SwapError::StagingNotHuge { huge });
    }
    let bytes = staging
        .bytes_mut()
        .ok_or(SwapError::StagingMap(Errno(libc::EFAULT)))?;
    // SAFETY: the caller's promise about `req`'s pieces.
    unsafe { copy_text_into(bytes, req) };
    staging.sync_icache();
    Ok(Staged {
        mapping: staging,
        fd: None,
        fd_offset: 0,
        source: Source::Thp,
    })
}
