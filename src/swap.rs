//! Replaces text ranges with huge pages holding the same bytes. The only
//! module that changes mappings of the program.
//!
//! For each range, in order:
//! 1. **holes**: unmapped parts of the range (the aggressive strategy spans
//!    them) get `PROT_NONE` placeholders before anything else is mapped, so
//!    nothing new can land there;
//! 2. **in place**: file text congruent with its file first asks the page
//!    cache for its 2 MiB pages (`MADV_COLLAPSE`): no copy at all;
//! 3. **stage**: otherwise a *supplier* (the pipeline's policy, in `remap`)
//!    hands over a replacement holding the text's bytes, built away from the
//!    text: a cache image mapped r-x from a read-only file ([`Staged`] with a
//!    descriptor), a private copy on pool pages made the same way through a
//!    memfd ([`pool_copy`]), or a private copy on anonymous THP, r-w
//!    ([`thp_copy`]). Replacements are populated: a shortage is an error now,
//!    never a SIGBUS later;
//! 4. **swap** all ranges in one call of the routine (see `trampoline`):
//!    anonymous copies become r-x, then one `mremap(MREMAP_FIXED)` per range
//!    moves the replacement over the text. No moment without code; failure
//!    before the mremap leaves the text as it was;
//! 5. **clean up**: unmap what was not used.
//!
//! Peak extra memory: the replacements being built (an image found in the
//! cache costs nothing: its pages are already there, shared).

use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use crate::fault::{self, Step};
use crate::pagesize::{huge_page, page};
use crate::plan::SwapRange;
use crate::policy::{NoSupply, Source};
use crate::range::{align_down, Range};
use crate::sys::{self, Errno, Mapping, Prot};
use crate::trampoline::{Fail, Outcome, SwapOp, Trampoline, TrampolineError};

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

fn huge_bytes_in(range: Range) -> u64 {
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

/// Asks the kernel to map file-backed text with 2 MiB pages from the page
/// cache itself (`MADV_HUGEPAGE`, then `MADV_COLLAPSE`, Linux 6.1): no copy,
/// pages shared with every process mapping the file, the file name kept.
/// Needs `CONFIG_READ_ONLY_THP_FOR_FS` for regular files; without it the
/// collapse fails with EINVAL and nothing changed but the advice.
///
/// # Safety
/// `range` must be 2 MiB aligned file-backed text of a loaded object.
unsafe fn collapse_in_place(range: Range) -> Result<(), Errno> {
    let addr = range.start as *mut u8;
    let len = range.len() as usize;
    // SAFETY: advice on the caller's text; contents are unchanged.
    unsafe { sys::madvise(addr, len, libc::MADV_HUGEPAGE) }?;
    // SAFETY: as above; the kernel copies into a huge folio and remaps
    // atomically, or fails leaving the mapping as it was.
    unsafe { sys::madvise(addr, len, sys::MADV_COLLAPSE) }?;
    if huge_bytes_in(range) == range.len() {
        Ok(())
    } else {
        Err(Errno(libc::EAGAIN))
    }
}

/// Leaves the text just put at `op.text` out of core dumps: its bytes are
/// the file's (a debugger reads them there), and a core of a program with
/// moved text stays the size it was (the kernel dumps anonymous and
/// private hugetlb memory, which the file's own mapping was not). A failure
/// only means a bigger core.
fn leave_out_of_core_dumps(op: &SwapOp) {
    // SAFETY: advice on the range the routine just made our text; it
    // changes what a core dump holds, nothing else.
    let _ = unsafe { sys::madvise(op.text as *mut u8, op.len as usize, libc::MADV_DONTDUMP) };
}

/// The parts of `range` that none of `pieces` covers.
fn holes(range: Range, pieces: &[Range]) -> Vec<Range> {
    let mut out = Vec::new();
    let mut cursor = range.start;
    let mut sorted: Vec<Range> = pieces.iter().filter_map(|p| p.intersect(range)).collect();
    sorted.sort();
    for p in sorted {
        if p.start > cursor {
            out.push(Range::new(cursor, p.start));
        }
        cursor = cursor.max(p.end);
    }
    if cursor < range.end {
        out.push(Range::new(cursor, range.end));
    }
    out
}

/// The result for one range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RangeResult {
    /// The text range.
    pub range: Range,
    /// Where its pages came from, when swapped.
    pub source: Option<Source>,
    /// What happened.
    pub result: Result<(), SwapError>,
    /// Why collapsing the page cache in place did not serve, when tried.
    pub in_place_error: Option<Errno>,
}

/// Replaces each range with huge pages holding the same bytes: in place from
/// the page cache where the plan allows, else whatever `supply` hands over
/// for it (see [`Staged`]). The bytes of each range's `pieces` are kept; the
/// rest of the range (unmapped space) becomes zeros.
///
/// # Safety
/// Each range must be 2 MiB aligned; its pieces must be mapped, readable and
/// private, and not written while this runs; the rest of it unmapped; no
/// thread may run code in it meanwhile. Ranges must not overlap. Every
/// replacement `supply` returns must hold exactly the range's bytes. Any
/// pointer into the ranges stays valid (the bytes and addresses are the
/// same), but the ranges become anonymous or image memory, readable and
/// executable.
pub unsafe fn swap_ranges(
    requests: &[SwapRange],
    supply: &mut dyn FnMut(&SwapRange) -> Result<Staged, SwapError>,
    mdwe: bool,
) -> Vec<RangeResult> {
    let mut results: Vec<RangeResult> = requests
        .iter()
        .map(|req| RangeResult {
            range: req.range,
            source: None,
            result: Ok(()),
            in_place_error: None,
        })
        .collect();
    // Step 1: placeholders over the holes of each range, taken before
    // anything else is mapped, so nothing new can land in them.
    let mut reserved: Vec<Vec<Mapping>> = Vec::with_capacity(requests.len());
    for (r, req) in results.iter_mut().zip(requests) {
        let mut mine = Vec::new();
        if !req.in_place {
            for hole in holes(req.range, &req.pieces) {
                match Mapping::reserve_at(hole) {
                    Ok(h) => mine.push(h),
                    Err(e) => {
                        r.result = Err(SwapError::HoleTaken(e));
                        mine.clear(); // gives back what this range reserved
                        break;
                    }
                }
            }
        }
        reserved.push(mine);
    }

    // Steps 2 and 3: in place, or a replacement for each range.
    let mut staged: Vec<(usize, Staged)> = Vec::new();
    let mut ops: Vec<SwapOp> = Vec::new();
    for (i, (r, req)) in results.iter_mut().zip(requests).enumerate() {
        if r.result.is_err() {
            continue;
        }
        if req.in_place {
            // SAFETY: the range is file-backed text (caller); collapsing keeps
            // its contents, and the kernel serialises it against faults.
            match unsafe { collapse_in_place(r.range) } {
                Ok(()) => {
                    r.source = Some(Source::PageCache);
                    continue;
                }
                Err(e) => r.in_place_error = Some(e),
            }
        }
        match supply(req) {
            Ok(s) => {
                let fail = if fault::at(Step::Protect) {
                    Fail::Protect as u64
                } else if fault::at(Step::Remap) {
                    Fail::Remap as u64
                } else if fault::at(Step::RemapHole) {
                    Fail::RemapHole as u64
                } else {
                    0
                };
                // A page that is mapped now (the first piece's): the
                // routine's check for damage after a failed mremap.
                let probe = req
                    .pieces
                    .first()
                    .map_or(r.range.start, |p| align_down(p.start, page()));
                ops.push(SwapOp {
                    staging: s.mapping.start(),
                    text: r.range.start,
                    len: r.range.len(),
                    fd: s.fd.as_ref().map_or(-1, |fd| i64::from(fd.as_raw_fd())),
                    fd_offset: s.fd_offset,
                    fail,
                    probe,
                    ..SwapOp::default()
                });
                r.source = Some(s.source);
                staged.push((i, s));
            }
            Err(e) => r.result = Err(e),
        }
    }
    if ops.is_empty() {
        return results;
    }

    // Step 4: swap them all with signals blocked.
    let ranges: Vec<Range> = ops
        .iter()
        .map(|op| Range::new(op.text, op.text + op.len))
        .collect();
    let trampoline = match Trampoline::prepare(&ranges, mdwe) {
        Ok(t) => t,
        Err(e) => {
            for (i, _) in &staged {
                if let Some(r) = results.get_mut(*i) {
                    r.result = Err(SwapError::Trampoline(e));
                    r.source = None;
                }
            }
            return results; // replacements unmapped on drop
        }
    };
    // SAFETY: each op describes a replacement built above (aligned,
    // populated, the text's bytes; anonymous r-w or r-x from its read-only
    // descriptor, which stays open until after the call) and a text range
    // the caller vouches for; ranges do not overlap (caller), and the
    // routine runs outside all of them (`prepare`).
    if let Err(e) = unsafe { trampoline.run(&mut ops) } {
        for (i, _) in &staged {
            if let Some(r) = results.get_mut(*i) {
                r.result = Err(SwapError::SignalMask(e));
                r.source = None;
            }
        }
        return results;
    }
    drop(trampoline);

    // Step 5: keep what became text, unmap the rest.
    for ((i, s), op) in staged.into_iter().zip(ops.iter()) {
        let result = match op.outcome() {
            Outcome::Swapped => {
                s.mapping.release();
                for h in reserved.get_mut(i).map(std::mem::take).unwrap_or_default() {
                    h.release();
                }
                leave_out_of_core_dumps(op);
                Ok(())
            }
            Outcome::ProtectFailed(e) => Err(SwapError::StagingProtect(e)),
            Outcome::RemapFailed(e) => Err(SwapError::Remap(e)),
            Outcome::RestoredByCopy(e) => Err(SwapError::RemapRestoredByCopy(e)),
            // The image mapped at the text address is what the swap would
            // have left there: the same bytes, on the image's pages.
            Outcome::RestoredByMap(e) => {
                leave_out_of_core_dumps(op);
                // Never expected of the kernel: worth a warning.
                crate::tlog!(
                    crate::log::Level::Warn,
                    "{:#x}-{:#x}: mremap failed ({e}) after unmapping the text; its image was mapped there instead",
                    op.text,
                    op.text + op.len
                );
                for h in reserved.get_mut(i).map(std::mem::take).unwrap_or_default() {
                    h.release();
                }
                Ok(())
            }
            Outcome::TextLost(e) => Err(SwapError::TextLost(e)),
            Outcome::RestoreProtectFailed(e) => Err(SwapError::RestoredCopyWritable(e)),
            Outcome::Unknown(code) => Err(SwapError::Unknown(code)),
        };
        if let Some(r) = results.get_mut(i) {
            if result.is_err() {
                r.source = None;
            }
            r.result = result;
        }
        // Otherwise the placeholders are dropped: unmapping them gives the
        // holes back (after a restore, the parts of the restored range over
        // them, which hold no text).
    }
    results
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holes_are_what_the_pieces_leave() {
        let r = Range::new(0x200000, 0x400000);
        assert_eq!(holes(r, &[r]), vec![]);
        assert_eq!(
            holes(
                r,
                &[
                    Range::new(0x201000, 0x300000),
                    Range::new(0x300000, 0x3ff000)
                ]
            ),
            vec![
                Range::new(0x200000, 0x201000),
                Range::new(0x3ff000, 0x400000)
            ]
        );
        assert_eq!(holes(r, &[]), vec![r]);
    }

    #[test]
    fn a_hole_that_is_in_use_cannot_be_reserved() {
        let page = Mapping::anonymous(4096, Prot::READ, 0).expect("map");
        assert!(matches!(
            Mapping::reserve_at(page.range()),
            Err(Errno(libc::EEXIST))
        ));
        drop(page);
        // A free hole (1 TiB up: far below where mmap, brk and the program
        // live) is reserved, and given back on drop.
        let free = Range::new(1 << 40, (1 << 40) + 8192);
        let h = Mapping::reserve_at(free).expect("reserve");
        assert_eq!(h.start(), free.start);
        drop(h);
        let again = Mapping::reserve_at(free).expect("given back");
        drop(again);
    }
}
