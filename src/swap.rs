//! Replaces text ranges with huge pages holding the same bytes. The only
//! module that changes mappings of the program.
//!
//! For each range, in order:
//! 1. **holes**: unmapped parts of the range (the aggressive strategy spans
//!    them) get `PROT_NONE` placeholders before anything else is mapped, so
//!    nothing new can land there;
//! 2. **in place**: file text congruent with its file first asks the page
//!    cache for its 2 MiB pages (`MADV_COLLAPSE`): no copy at all;
//! 3. **stage**: otherwise a *supplier* (`supply`, choosing by `policy`)
//!    hands over a replacement holding the text's bytes, built away from the
//!    text (`staging`): a cache image mapped r-x from a read-only file
//!    ([`Staged`] with a descriptor), a private copy on pool pages made the
//!    same way through a memfd, or a private copy on anonymous THP, r-w.
//!    Replacements are populated: a shortage is an error now, never a
//!    SIGBUS later;
//! 4. **swap** all ranges in one call of the routine (see `trampoline`):
//!    anonymous copies become r-x, then one `mremap(MREMAP_FIXED)` per range
//!    moves the replacement over the text. No moment without code; failure
//!    before the mremap leaves the text as it was;
//! 5. **clean up**: unmap what was not used.
//!
//! Peak extra memory: the replacements being built (an image found in the
//! cache costs nothing: its pages are already there, shared).

use std::os::fd::AsRawFd;

use crate::fault::{self, Step};
use crate::pagesize::page;
use crate::plan::SwapRange;
use crate::policy::Source;
use crate::range::{align_down, Range};
use crate::sys::{self, Errno, Mapping};
use crate::trampoline::{Fail, Outcome, SwapOp, Trampoline};

use crate::staging::huge_bytes_in;
pub use crate::staging::{Staged, SwapError};

/// Asks the kernel to map file-backed text with 2 MiB pages from the page
/// cache itself (`MADV_HUGEPAGE`, then `MADV_COLLAPSE`, Linux 6.1): no copy,
/// pages shared with every process mapping the file, the file name kept.
/// Needs `CONFIG_READ_ONLY_THP_FOR_FS` for regular files; without it the
/// collapse fails with EINVAL and nothing changed but the advice.
///
/// # Safety
/// `range` must be huge-page aligned file-backed text of a loaded object.
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
/// Each range must be huge-page aligned; its pieces must be mapped, readable and
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
        let page = Mapping::anonymous(4096, crate::sys::Prot::READ, 0).expect("map");
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
