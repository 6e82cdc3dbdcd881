//! Replaces text ranges with huge pages holding the same bytes. The only
//! module that changes mappings of the program.
//!
//! For each range, in order:
//! 1. **stage**: map the replacement away from the text (hugetlb from the
//!    pool, or 2 MiB-aligned anonymous memory advised `MADV_HUGEPAGE`) and
//!    populate it with `MADV_POPULATE_WRITE`, so a shortage is an error now
//!    and never a SIGBUS later; for THP, check the pages really are huge.
//! 2. **copy** the live text bytes into it (one memcpy; the text is readable
//!    and unchanged meanwhile: the process has one thread).
//! 3. **swap** all ranges in one call of the trampoline: r-x, then one
//!    `mremap(MREMAP_FIXED)` over the text. No moment without code, and no
//!    second copy. Failure before the mremap leaves the text as it was.
//! 4. **clean up**: unmap what was not used; the trampoline page goes too.
//!
//! Peak extra memory: the stagings, i.e. the bytes being swapped (the old
//! text pages are page cache, shared, and are dropped from this process by the
//! mremap).

use crate::fault::{self, Step};
use crate::plan::{align_up, Range, Source, SwapRange, HUGE_PAGE};
use crate::sys::{self, Errno};
use crate::trampoline::{Fail, MappedTrampoline, Outcome, SwapOp, TrampolineError};

/// Why a range was not swapped. One variant per failed step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SwapError {
    /// No huge-page source was allowed for it.
    NoSource,
    /// Step 1: mmap of the staging area failed (for hugetlb: the pool had too
    /// few free pages).
    StagingMap(Errno),
    /// Step 1: trimming the THP staging area to 2 MiB alignment failed.
    StagingTrim(Errno),
    /// Step 1: `MADV_HUGEPAGE` on the staging area failed.
    StagingAdvise(Errno),
    /// Step 1: populating the staging area failed (no memory).
    StagingPopulate(Errno),
    /// Step 1: an unmapped hole inside the range (the aggressive strategy
    /// spans them) could not be reserved: something is mapped there now.
    HoleTaken(Errno),
    /// Step 1: `RLIMIT_AS` leaves too little address space for a copy.
    AddressSpaceLimit {
        /// Bytes the process could still map.
        headroom: u64,
    },
    /// Step 1: the memory cgroup's limit leaves too little room for a THP copy
    /// (going over it would mean reclaim, or an OOM kill).
    CgroupLimit {
        /// Bytes the cgroup could still charge.
        headroom: u64,
    },
    /// Step 1: the kernel gave THP staging only `huge` bytes of 2 MiB pages.
    StagingNotHuge {
        /// Bytes that were huge.
        huge: u64,
    },
    /// Step 3: the trampoline could not be mapped.
    Trampoline(TrampolineError),
    /// Step 3: blocking signals failed; nothing was touched.
    SignalMask(Errno),
    /// Step 3: making the staging r-x failed; text untouched.
    StagingProtect(Errno),
    /// Step 3: mremap failed; text untouched.
    Remap(Errno),
    /// Step 3: mremap failed after unmapping the text; the same bytes were
    /// put back on 4 KiB pages (r-x). The program is unharmed.
    RemapRestoredByCopy(Errno),
    /// Step 3: the text could not be put back. Never expected.
    TextLost(Errno),
    /// Step 3: the restored copy could not be made r-x; it is r-w.
    RestoredCopyWritable(Errno),
}

impl SwapError {
    /// True when the program's text at the range is not what it was and
    /// should be (only the "never expected" cases).
    pub fn is_harmful(&self) -> bool {
        matches!(
            self,
            SwapError::TextLost(_) | SwapError::RestoredCopyWritable(_)
        )
    }
}

impl core::fmt::Display for SwapError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            SwapError::NoSource => write!(f, "no huge-page source allowed"),
            SwapError::StagingMap(e) => write!(f, "mmap of huge pages failed: {e}"),
            SwapError::StagingTrim(e) => write!(f, "trimming staging failed: {e}"),
            SwapError::StagingAdvise(e) => write!(f, "madvise(MADV_HUGEPAGE) failed: {e}"),
            SwapError::StagingPopulate(e) => write!(f, "populating huge pages failed: {e}"),
            SwapError::HoleTaken(e) => {
                write!(f, "a hole in its 2 MiB page could not be reserved: {e}")
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
            SwapError::StagingNotHuge { huge } => {
                write!(
                    f,
                    "kernel gave only {} of 2 MiB pages",
                    crate::log::Bytes(*huge)
                )
            }
            SwapError::Trampoline(TrampolineError::Unsupported) => {
                write!(f, "no swap routine for this architecture")
            }
            SwapError::Trampoline(TrampolineError::Map(e)) => {
                write!(f, "mapping the trampoline failed: {e}")
            }
            SwapError::Trampoline(TrampolineError::Protect(e)) => {
                write!(f, "protecting the trampoline failed: {e}")
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
        }
    }
}

/// A replacement being built, unmapped on drop unless it became the text.
struct Staging {
    addr: *mut u8,
    len: usize,
}

impl Staging {
    /// The staging pages were moved over the text by mremap: nothing is left
    /// at `addr` to unmap.
    fn moved(self) {
        core::mem::forget(self);
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        // SAFETY: the range was mapped by `stage` and is used by nobody else.
        let _ = unsafe { sys::munmap(self.addr, self.len) };
    }
}

fn stage_hugetlb(len: usize) -> Result<Staging, SwapError> {
    // Private hugetlb reserves its pages at mmap time: ENOMEM here when the
    // pool is short. No MAP_NORESERVE (that turns a shortage into SIGBUS).
    if fault::at(Step::StagingMap) {
        return Err(SwapError::StagingMap(Errno(libc::ENOMEM)));
    }
    let addr = sys::mmap_anonymous(len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_HUGETLB)
        .map_err(SwapError::StagingMap)?;
    let staging = Staging { addr, len };
    // Populate with an error return, not MAP_POPULATE (which ignores
    // failures, e.g. a hugetlb cgroup limit, that would SIGBUS on first touch).
    if fault::at(Step::StagingPopulate) {
        return Err(SwapError::StagingPopulate(Errno(libc::ENOMEM)));
    }
    // SAFETY: our fresh mapping.
    unsafe { sys::madvise(addr, len, sys::MADV_POPULATE_WRITE) }
        .map_err(SwapError::StagingPopulate)?;
    Ok(staging)
}

fn huge_bytes_in(start: u64, len: u64) -> u64 {
    let end = start + len;
    match sys::huge_mapped_ranges(start, end) {
        Ok(ranges) => ranges
            .iter()
            .filter_map(|&(s, e)| Range::new(s, e).intersect(Range::new(start, end)))
            .map(|r| r.len())
            .sum(),
        // Before Linux 6.7: ask smaps about this one mapping.
        Err(_) => crate::smaps::read(None)
            .map(|vmas| crate::smaps::coverage(&vmas, Range::new(start, end)).anon_thp)
            .unwrap_or(0),
    }
}

/// Room kept free in a limited memory cgroup, beyond the copy itself.
const CGROUP_MARGIN: u64 = 64 << 20;

fn stage_thp(len: usize) -> Result<Staging, SwapError> {
    if let Some(headroom) = crate::discover::memory_cgroup_headroom() {
        if headroom < len as u64 + CGROUP_MARGIN {
            return Err(SwapError::CgroupLimit { headroom });
        }
    }
    // Over-allocate by 2 MiB, then trim head and tail so the rest is aligned.
    let reserve = len + HUGE_PAGE as usize;
    if fault::at(Step::StagingMap) {
        return Err(SwapError::StagingMap(Errno(libc::ENOMEM)));
    }
    let base = sys::mmap_anonymous(reserve, libc::PROT_READ | libc::PROT_WRITE, 0)
        .map_err(SwapError::StagingMap)?;
    let aligned = align_up(base as u64, HUGE_PAGE);
    let head = (aligned - base as u64) as usize;
    let tail = reserve - head - len;
    let whole = Staging {
        addr: base,
        len: reserve,
    };
    if head > 0 {
        // SAFETY: the head of our own fresh mapping.
        unsafe { sys::munmap(base, head) }.map_err(SwapError::StagingTrim)?;
    }
    whole.moved(); // from here on only the aligned part is ours
    let staging = Staging {
        addr: aligned as *mut u8,
        len,
    };
    if tail > 0 {
        // SAFETY: the tail of our own fresh mapping, past `staging`.
        unsafe { sys::munmap((aligned as *mut u8).wrapping_add(len), tail) }
            .map_err(SwapError::StagingTrim)?;
    }
    if fault::at(Step::StagingAdvise) {
        return Err(SwapError::StagingAdvise(Errno(libc::EINVAL)));
    }
    // SAFETY: our fresh mapping; advice only.
    unsafe { sys::madvise(staging.addr, len, libc::MADV_HUGEPAGE) }
        .map_err(SwapError::StagingAdvise)?;
    if fault::at(Step::StagingPopulate) {
        return Err(SwapError::StagingPopulate(Errno(libc::ENOMEM)));
    }
    // SAFETY: our fresh mapping; faults its pages in.
    unsafe { sys::madvise(staging.addr, len, sys::MADV_POPULATE_WRITE) }
        .map_err(SwapError::StagingPopulate)?;
    if fault::at(Step::StagingNotHuge) {
        return Err(SwapError::StagingNotHuge { huge: 0 });
    }
    let mut huge = huge_bytes_in(aligned, len as u64);
    if huge < len as u64 {
        // Fragmented memory gave some 4 KiB pages: ask for a synchronous
        // collapse (Linux 6.1) before giving up. The pages hold no data yet.
        // SAFETY: our mapping; collapse keeps contents.
        let _ = unsafe { sys::madvise(staging.addr, len, sys::MADV_COLLAPSE) };
        huge = huge_bytes_in(aligned, len as u64);
    }
    if huge < len as u64 {
        return Err(SwapError::StagingNotHuge { huge });
    }
    Ok(staging)
}

/// Address space kept free under RLIMIT_AS, beyond the copy itself, for
/// the program and for tiexec's own small allocations (which must not fail:
/// an allocation failure aborts).
pub const ADDRESS_SPACE_MARGIN: u64 = 64 << 20;

fn stage(source: Source, len: usize) -> Result<Staging, SwapError> {
    if let Some(headroom) = crate::discover::address_space_headroom() {
        if headroom < len as u64 + HUGE_PAGE + ADDRESS_SPACE_MARGIN {
            return Err(SwapError::AddressSpaceLimit { headroom });
        }
    }
    match source {
        Source::Hugetlb => stage_hugetlb(len),
        Source::Thp => stage_thp(len),
        // Not a copy: handled before staging.
        Source::PageCache => Err(SwapError::NoSource),
    }
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
    if huge_bytes_in(range.start, range.len()) == range.len() {
        Ok(())
    } else {
        Err(Errno(libc::EAGAIN))
    }
}

/// A `PROT_NONE` placeholder over an unmapped hole inside a range to swap,
/// unmapped on drop. While it stands, no other mapping (our trampoline page,
/// a large allocation, another thread's mmap) can land in the hole, where the
/// swap's `MREMAP_FIXED` would silently replace it.
struct HoleReservation {
    addr: *mut u8,
    len: usize,
}

impl HoleReservation {
    /// Reserves `hole`, which must be unmapped; fails if anything is there.
    fn take(hole: Range) -> Result<HoleReservation, Errno> {
        let want = hole.start as *mut libc::c_void;
        let len = hole.len() as usize;
        // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping: it
        // fails with EEXIST instead. Kernels before 4.17 ignore the flag and
        // may place the mapping elsewhere, which is checked below.
        let got = unsafe {
            libc::mmap(
                want,
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                -1,
                0,
            )
        };
        if got == libc::MAP_FAILED {
            return Err(Errno::last());
        }
        let reservation = HoleReservation {
            addr: got.cast(),
            len,
        };
        if got != want {
            return Err(Errno(libc::EEXIST)); // dropped: unmapped again
        }
        Ok(reservation)
    }

    /// The swap replaced it with the new text: nothing left to unmap.
    fn replaced(self) {
        core::mem::forget(self);
    }
}

impl Drop for HoleReservation {
    fn drop(&mut self) {
        // SAFETY: our own placeholder (or the part of a restored copy over
        // it, which held zeros): unmapping gives the hole back.
        let _ = unsafe { sys::munmap(self.addr, self.len) };
    }
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
    /// The source that was staged last (the one used, on success).
    pub source: Option<Source>,
    /// What happened.
    pub result: Result<(), SwapError>,
    /// Why collapsing the page cache in place did not serve, when tried.
    pub in_place_error: Option<Errno>,
}

/// Replaces each range with huge pages holding the same bytes, trying
/// `sources` in order for each range. The bytes of each range's `pieces` are
/// copied; the rest of the range (unmapped space) becomes zeros.
///
/// # Safety
/// Each range must be 2 MiB aligned; its pieces must be mapped, readable and
/// private, and not written while this runs; the rest of it unmapped; no
/// thread may run code in it meanwhile. Ranges must not overlap. Any pointer
/// into the ranges stays valid (the bytes and addresses are the same), but
/// the ranges become anonymous memory, readable and executable.
pub unsafe fn swap_ranges(requests: &[SwapRange], sources: &[Source]) -> Vec<RangeResult> {
    let mut results: Vec<RangeResult> = requests
        .iter()
        .map(|req| RangeResult {
            range: req.range,
            source: None,
            result: Err(SwapError::NoSource),
            in_place_error: None,
        })
        .collect();
    let mut staged: Vec<(usize, Staging)> = Vec::new();
    let mut ops: Vec<SwapOp> = Vec::new();
    // Placeholders over the holes of each range, taken before anything else
    // is mapped (staging, trampoline), so nothing new can land in them.
    let mut reserved: Vec<Vec<HoleReservation>> = Vec::with_capacity(requests.len());
    for (r, req) in results.iter_mut().zip(requests) {
        let mut mine = Vec::new();
        if !req.in_place {
            for hole in holes(req.range, &req.pieces) {
                match HoleReservation::take(hole) {
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

    // Steps 1 and 2: build every replacement first.
    for (i, (r, req)) in results.iter_mut().zip(requests).enumerate() {
        if matches!(r.result, Err(SwapError::HoleTaken(_))) {
            continue;
        }
        let len = r.range.len() as usize;
        if req.in_place {
            // SAFETY: the range is file-backed text (caller); collapsing keeps
            // its contents, and the kernel serialises it against faults.
            match unsafe { collapse_in_place(r.range) } {
                Ok(()) => {
                    r.source = Some(Source::PageCache);
                    r.result = Ok(());
                    continue;
                }
                Err(e) => r.in_place_error = Some(e),
            }
        }
        for &source in sources {
            r.source = Some(source);
            match stage(source, len) {
                Ok(staging) => {
                    for piece in req.pieces.iter().filter_map(|p| p.intersect(req.range)) {
                        let offset = (piece.start - req.range.start) as usize;
                        // SAFETY: the piece is mapped and readable (caller),
                        // and lies in the range, so `offset + piece.len()`
                        // fits in `staging`, a distinct writable mapping of
                        // `len` bytes.
                        unsafe {
                            core::ptr::copy_nonoverlapping(
                                piece.start as *const u8,
                                staging.addr.add(offset),
                                piece.len() as usize,
                            )
                        };
                    }
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
                    let probe = req.pieces.first().map_or(r.range.start, |p| {
                        crate::plan::align_down(p.start, crate::plan::PAGE)
                    });
                    ops.push(SwapOp {
                        staging: staging.addr as u64,
                        text: r.range.start,
                        len: len as u64,
                        fail,
                        probe,
                        ..SwapOp::default()
                    });
                    staged.push((i, staging));
                    r.result = Ok(());
                    break;
                }
                Err(e) => {
                    crate::tlog!(
                        crate::log::Level::Debug,
                        "staging {:#x}-{:#x} with {} failed: {e}",
                        r.range.start,
                        r.range.end,
                        source.name()
                    );
                    r.result = Err(e);
                }
            }
        }
    }
    if ops.is_empty() {
        return results;
    }

    // Step 3: swap them all with signals blocked, from the trampoline page.
    let trampoline = match MappedTrampoline::map() {
        Ok(t) => t,
        Err(e) => {
            for (i, _) in &staged {
                if let Some(r) = results.get_mut(*i) {
                    r.result = Err(SwapError::Trampoline(e));
                }
            }
            return results; // stagings unmapped on drop
        }
    };
    // SAFETY: each op describes a staging built above (aligned, populated,
    // r-w, same bytes as its text range) and a text range the caller vouches
    // for; ranges do not overlap (caller).
    if let Err(e) = unsafe { trampoline.run(&mut ops) } {
        for (i, _) in &staged {
            if let Some(r) = results.get_mut(*i) {
                r.result = Err(SwapError::SignalMask(e));
            }
        }
        return results;
    }
    drop(trampoline);

    // Step 4: keep what became text, unmap the rest.
    for ((i, staging), op) in staged.into_iter().zip(ops.iter()) {
        let result = match op.outcome() {
            Outcome::Swapped => {
                staging.moved();
                for h in reserved.get_mut(i).map(std::mem::take).unwrap_or_default() {
                    h.replaced();
                }
                Ok(())
            }
            Outcome::ProtectFailed(e) => Err(SwapError::StagingProtect(e)),
            Outcome::RemapFailed(e) => Err(SwapError::Remap(e)),
            Outcome::RestoredByCopy(e) => Err(SwapError::RemapRestoredByCopy(e)),
            Outcome::TextLost(e) => Err(SwapError::TextLost(e)),
            Outcome::RestoreProtectFailed(e) => Err(SwapError::RestoredCopyWritable(e)),
        };
        if let Some(r) = results.get_mut(i) {
            r.result = result;
        }
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
        let page = sys::mmap_anonymous(4096, libc::PROT_READ, 0).expect("map");
        let taken = Range::new(page as u64, page as u64 + 4096);
        assert!(matches!(
            HoleReservation::take(taken),
            Err(Errno(libc::EEXIST))
        ));
        // SAFETY: our own page.
        unsafe { sys::munmap(page, 4096) }.expect("unmap");
        // A free hole (1 TiB up: far below where mmap, brk and the program
        // live) is reserved, and given back on drop.
        let free = Range::new(1 << 40, (1 << 40) + 8192);
        let h = HoleReservation::take(free).expect("reserve");
        assert_eq!(h.addr as u64, free.start);
        drop(h);
        let again = HoleReservation::take(free).expect("given back");
        drop(again);
    }
}
