//! Which ranges to swap, and with which backend. Pure functions over plain
//! data: no system calls, no unsafe, tested with tables of layouts.
//!
//! A text segment, as mapped (page-rounded), split at 2 MiB boundaries:
//!
//! ```text
//!   seg.start      body.start                            body.end      seg.end
//!   |---- head ----|=================== body ===================|-- tail --|
//!    4 KiB pages    whole 2 MiB pages, each one:                  4 KiB pages
//!                   - already huge (kernel did it)  -> left as is
//!                   - not plain r-x private text    -> left, with the reason
//!                   - otherwise                     -> swapped
//! ```
//!
//! `head < 2 MiB`, `tail < 2 MiB`, `body.len() % 2 MiB == 0`, and
//! `head + body + tail == segment`.

use crate::config::Backend;

/// 2 MiB, the huge page size tiexec uses (x86_64 PMD).
pub const HUGE_PAGE: u64 = 2 << 20;
/// 4 KiB, the base page size.
pub const PAGE: u64 = 4096;

/// A half-open address range `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Range {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

impl Range {
    /// `[start, end)`; an inverted range is empty at `start`.
    pub const fn new(start: u64, end: u64) -> Range {
        Range {
            start,
            end: if end < start { start } else { end },
        }
    }

    /// Bytes in the range.
    pub const fn len(&self) -> u64 {
        self.end - self.start
    }

    /// True when it holds no byte.
    pub const fn is_empty(&self) -> bool {
        self.end == self.start
    }

    /// The common part, if any.
    pub fn intersect(&self, other: Range) -> Option<Range> {
        let r = Range::new(self.start.max(other.start), self.end.min(other.end));
        (!r.is_empty()).then_some(r)
    }

    /// True when `other` lies entirely inside.
    pub fn contains(&self, other: Range) -> bool {
        other.start >= self.start && other.end <= self.end
    }
}

/// Rounds down to a multiple of `align` (a power of two).
pub const fn align_down(x: u64, align: u64) -> u64 {
    x & !(align - 1)
}

/// Rounds up to a multiple of `align` (a power of two), saturating.
pub const fn align_up(x: u64, align: u64) -> u64 {
    match x.checked_add(align - 1) {
        Some(v) => v & !(align - 1),
        None => align_down(x, align),
    }
}

/// The page-rounded range the loader maps for a segment at runtime address
/// `vaddr` with `memsz` bytes.
pub fn segment_pages(vaddr: u64, memsz: u64) -> Range {
    Range::new(
        align_down(vaddr, PAGE),
        align_up(vaddr.saturating_add(memsz), PAGE),
    )
}

/// A segment cut into head, body and tail (see the module drawing).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Split {
    /// Before the first 2 MiB boundary: stays on 4 KiB pages.
    pub head: Range,
    /// Whole 2 MiB pages; empty when the segment holds none.
    pub body: Range,
    /// After the last 2 MiB boundary: stays on 4 KiB pages.
    pub tail: Range,
}

/// Cuts `segment` at 2 MiB boundaries.
///
/// ```
/// use tiexec::plan::{split, Range};
/// const MIB: u64 = 1 << 20;
/// // A PIE's text at a 4 KiB-aligned base: 0x1000 past 4 MiB, 9 MiB long.
/// let s = split(Range::new(4 * MIB + 0x1000, 13 * MIB + 0x1000));
/// assert_eq!(s.head, Range::new(4 * MIB + 0x1000, 6 * MIB));
/// assert_eq!(s.body, Range::new(6 * MIB, 12 * MIB)); // three 2 MiB pages
/// assert_eq!(s.tail, Range::new(12 * MIB, 13 * MIB + 0x1000));
/// ```
pub fn split(segment: Range) -> Split {
    let body_start = align_up(segment.start, HUGE_PAGE);
    let body_end = align_down(segment.end, HUGE_PAGE);
    let s = if body_start < body_end {
        Split {
            head: Range::new(segment.start, body_start),
            body: Range::new(body_start, body_end),
            tail: Range::new(body_end, segment.end),
        }
    } else {
        // No whole huge page: everything is "head".
        Split {
            head: segment,
            body: Range::new(segment.end, segment.end),
            tail: Range::new(segment.end, segment.end),
        }
    };
    debug_assert_eq!(s.head.len() + s.body.len() + s.tail.len(), segment.len());
    debug_assert!(s.body.is_empty() || (s.head.len() < HUGE_PAGE && s.tail.len() < HUGE_PAGE));
    debug_assert_eq!(s.body.len() % HUGE_PAGE, 0);
    debug_assert!(s.body.is_empty() || s.body.start % HUGE_PAGE == 0);
    s
}

/// Why a part of a text segment stays as it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skip {
    /// Head or tail: less than a whole 2 MiB page.
    PartialHugePage,
    /// The kernel already maps it with 2 MiB pages.
    AlreadyHuge,
    /// Not covered by private, read-only, executable mappings (a hole, a
    /// writable page, another object): not ours to replace.
    NotPlainText,
}

impl Skip {
    /// Short words for logs and reports.
    pub fn describe(self) -> &'static str {
        match self {
            Skip::PartialHugePage => "head/tail, not a whole 2 MiB page",
            Skip::AlreadyHuge => "already on 2 MiB pages",
            Skip::NotPlainText => "not plain r-x private text",
        }
    }
}

/// How one mapping looks, as far as planning cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MappingView {
    /// Its address range.
    pub range: Range,
    /// `r-xp` exactly: readable, executable, private, not writable.
    pub plain_text: bool,
}

/// The plan for one text segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentPlan {
    /// The segment as mapped.
    pub segment: Range,
    /// Its cut at 2 MiB boundaries.
    pub split: Split,
    /// Ranges to replace with huge pages, 2 MiB aligned, ascending, merged.
    pub swap: Vec<Range>,
    /// Ranges left as they are, with the reason, ascending, merged.
    pub keep: Vec<(Range, Skip)>,
}

impl SegmentPlan {
    /// Bytes planned for swapping.
    pub fn swap_bytes(&self) -> u64 {
        self.swap.iter().map(Range::len).sum()
    }

    /// Bytes kept for `reason`.
    pub fn kept_bytes(&self, reason: Skip) -> u64 {
        self.keep
            .iter()
            .filter(|(_, r)| *r == reason)
            .map(|(range, _)| range.len())
            .sum()
    }
}

fn push_merged<T: Copy + PartialEq>(list: &mut Vec<(Range, T)>, range: Range, tag: T) {
    if range.is_empty() {
        return;
    }
    if let Some((last, last_tag)) = list.last_mut() {
        if *last_tag == tag && last.end == range.start {
            last.end = range.end;
            return;
        }
    }
    list.push((range, tag));
}

fn covered_by(range: Range, mappings: &[MappingView], pred: impl Fn(&MappingView) -> bool) -> bool {
    // Walk the (sorted or not) mappings, advancing a cursor through `range`.
    let mut cursor = range.start;
    loop {
        if cursor >= range.end {
            return true;
        }
        match mappings
            .iter()
            .find(|m| m.range.start <= cursor && cursor < m.range.end)
        {
            Some(m) if pred(m) => cursor = m.range.end,
            _ => return false,
        }
    }
}

/// Plans one segment.
///
/// - `mappings`: the process's mappings overlapping the segment (from smaps).
/// - `huge`: ranges the kernel already maps with 2 MiB pages (from
///   PAGEMAP_SCAN or smaps); a 2 MiB page counts as already huge only when it
///   lies entirely inside one of them.
pub fn plan_segment(segment: Range, mappings: &[MappingView], huge: &[Range]) -> SegmentPlan {
    let split = split(segment);
    let mut swap: Vec<(Range, ())> = Vec::new();
    let mut keep: Vec<(Range, Skip)> = Vec::new();
    push_merged(&mut keep, split.head, Skip::PartialHugePage);
    let mut page = split.body.start;
    while page < split.body.end {
        let chunk = Range::new(page, page + HUGE_PAGE);
        if !covered_by(chunk, mappings, |m| m.plain_text) {
            push_merged(&mut keep, chunk, Skip::NotPlainText);
        } else if huge.iter().any(|h| h.contains(chunk)) {
            push_merged(&mut keep, chunk, Skip::AlreadyHuge);
        } else {
            push_merged(&mut swap, chunk, ());
        }
        page += HUGE_PAGE;
    }
    push_merged(&mut keep, split.tail, Skip::PartialHugePage);
    keep.sort_by_key(|(r, _)| r.start);
    SegmentPlan {
        segment,
        split,
        swap: swap.into_iter().map(|(r, ())| r).collect(),
        keep,
    }
}

/// What the machine offers, as far as choosing a backend goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Machine {
    /// Free 2 MiB pages in the hugetlb pool not already promised to others
    /// (`free_hugepages - resv_hugepages`).
    pub hugetlb_available: u64,
    /// THP usable here: not `never` system-wide, not disabled for this
    /// process.
    pub thp_usable: bool,
}

/// The backend actually used for a range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// `MAP_HUGETLB` from the pool.
    Hugetlb,
    /// Anonymous transparent huge pages.
    Thp,
}

impl Source {
    /// Its name in logs and reports.
    pub fn name(self) -> &'static str {
        match self {
            Source::Hugetlb => "hugetlb",
            Source::Thp => "thp",
        }
    }
}

/// The order in which to try sources for `pages_needed` 2 MiB pages, or why
/// there is none.
pub fn choose_sources(
    backend: Backend,
    machine: Machine,
    pages_needed: u64,
) -> Result<&'static [Source], &'static str> {
    match backend {
        Backend::Off => Err("backend off"),
        Backend::Hugetlb => {
            if machine.hugetlb_available == 0 {
                Err("hugetlb pool has no free pages")
            } else {
                // Even a pool smaller than the text covers what it can.
                Ok(&[Source::Hugetlb])
            }
        }
        Backend::Thp => {
            if machine.thp_usable {
                Ok(&[Source::Thp])
            } else {
                Err("transparent huge pages are disabled")
            }
        }
        Backend::Auto => {
            let pool_enough = machine.hugetlb_available >= pages_needed && pages_needed > 0;
            match (pool_enough, machine.thp_usable) {
                // The pool is preferred; THP covers what a race takes from it.
                (true, true) => Ok(&[Source::Hugetlb, Source::Thp]),
                (true, false) => Ok(&[Source::Hugetlb]),
                (false, true) => Ok(&[Source::Thp]),
                (false, false) => Err("hugetlb pool too small and transparent huge pages disabled"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: u64 = HUGE_PAGE;

    fn text(start: u64, end: u64) -> MappingView {
        MappingView {
            range: Range::new(start, end),
            plain_text: true,
        }
    }

    #[test]
    fn split_table() {
        // (segment, head, body, tail)
        let table = [
            // Aligned both ends: all body.
            (
                (4 * M, 8 * M),
                (4 * M, 4 * M),
                (4 * M, 8 * M),
                (8 * M, 8 * M),
            ),
            // Typical PIE: 4 KiB-aligned start, ragged end.
            (
                (4 * M + 0x1000, 9 * M + 0x3000),
                (4 * M + 0x1000, 5 * M),
                (5 * M, 9 * M),
                (9 * M, 9 * M + 0x3000),
            ),
            // Less than 2 MiB: no body.
            (
                (4 * M + 0x1000, 5 * M + 0x1000),
                (4 * M + 0x1000, 5 * M + 0x1000),
                (5 * M + 0x1000, 5 * M + 0x1000),
                (5 * M + 0x1000, 5 * M + 0x1000),
            ),
            // 3.99 MiB straddling one boundary but holding no whole page.
            (
                (4 * M + 0x1000, 6 * M - 0x1000),
                (4 * M + 0x1000, 6 * M - 0x1000),
                (6 * M - 0x1000, 6 * M - 0x1000),
                (6 * M - 0x1000, 6 * M - 0x1000),
            ),
        ];
        for ((s, e), (hs, he), (bs, be), (ts, te)) in table {
            let got = split(Range::new(s, e));
            assert_eq!(got.head, Range::new(hs, he), "head of {s:#x}-{e:#x}");
            assert_eq!(got.body, Range::new(bs, be), "body of {s:#x}-{e:#x}");
            assert_eq!(got.tail, Range::new(ts, te), "tail of {s:#x}-{e:#x}");
        }
    }

    #[test]
    fn segment_pages_rounds_outward_to_4k() {
        assert_eq!(
            segment_pages(0x401234, 0x10),
            Range::new(0x401000, 0x402000)
        );
        assert_eq!(
            segment_pages(0x400000, 0x1000),
            Range::new(0x400000, 0x401000)
        );
    }

    #[test]
    fn plain_segment_swaps_its_body() {
        let seg = Range::new(M + 0x1000, 6 * M + 0x5000);
        let p = plan_segment(seg, &[text(seg.start, seg.end)], &[]);
        assert_eq!(p.swap, vec![Range::new(2 * M, 6 * M)]);
        assert_eq!(p.kept_bytes(Skip::PartialHugePage), seg.len() - 4 * M);
        assert_eq!(
            p.swap_bytes() + p.keep.iter().map(|(r, _)| r.len()).sum::<u64>(),
            seg.len()
        );
    }

    #[test]
    fn already_huge_chunks_are_skipped_and_runs_split_around_them() {
        let seg = Range::new(2 * M, 10 * M);
        // Chunks 4 and 5 huge; only half of chunk 9.
        let huge = [Range::new(4 * M, 6 * M), Range::new(9 * M, 9 * M + M / 2)];
        let p = plan_segment(seg, &[text(seg.start, seg.end)], &huge);
        assert_eq!(
            p.swap,
            vec![Range::new(2 * M, 4 * M), Range::new(6 * M, 10 * M)]
        );
        // The half-covered chunk 9 is not "already huge".
        assert_eq!(p.kept_bytes(Skip::AlreadyHuge), 2 * M);
    }

    #[test]
    fn everything_already_huge_means_nothing_to_do() {
        let seg = Range::new(0x400000, 0x400000 + 20 * M + 0x3000);
        let p = plan_segment(
            seg,
            &[text(seg.start, seg.end)],
            &[Range::new(0x400000, 0x400000 + 20 * M)],
        );
        assert!(p.swap.is_empty());
        assert_eq!(p.kept_bytes(Skip::AlreadyHuge), 20 * M);
    }

    #[test]
    fn holes_writable_pages_and_split_mappings() {
        let seg = Range::new(2 * M, 10 * M);
        let mappings = [
            text(2 * M, 3 * M),
            text(3 * M, 5 * M), // the kernel split the VMA: still fine
            MappingView {
                range: Range::new(5 * M, 5 * M + 0x1000),
                plain_text: false, // e.g. made writable by a text relocation
            },
            text(5 * M + 0x1000, 7 * M),
            // hole from 7M to 8M
            text(8 * M, 10 * M),
        ];
        let p = plan_segment(seg, &mappings, &[]);
        // Chunk 5 holds a writable page, chunk 7 is a hole.
        assert_eq!(
            p.swap,
            vec![
                Range::new(2 * M, 5 * M),
                Range::new(6 * M, 7 * M),
                Range::new(8 * M, 10 * M)
            ]
        );
        assert_eq!(
            p.keep,
            vec![
                (Range::new(5 * M, 6 * M), Skip::NotPlainText),
                (Range::new(7 * M, 8 * M), Skip::NotPlainText)
            ]
        );
    }

    #[test]
    fn backend_choice() {
        let both = Machine {
            hugetlb_available: 16,
            thp_usable: true,
        };
        let empty_pool = Machine {
            hugetlb_available: 0,
            thp_usable: true,
        };
        let nothing = Machine {
            hugetlb_available: 0,
            thp_usable: false,
        };
        assert_eq!(
            choose_sources(Backend::Auto, both, 16),
            Ok(&[Source::Hugetlb, Source::Thp][..])
        );
        assert_eq!(
            choose_sources(Backend::Auto, both, 17),
            Ok(&[Source::Thp][..])
        );
        assert_eq!(
            choose_sources(Backend::Auto, empty_pool, 1),
            Ok(&[Source::Thp][..])
        );
        assert!(choose_sources(Backend::Auto, nothing, 1).is_err());
        assert!(choose_sources(Backend::Hugetlb, empty_pool, 1).is_err());
        assert_eq!(
            choose_sources(Backend::Hugetlb, both, 40),
            Ok(&[Source::Hugetlb][..])
        );
        assert!(choose_sources(Backend::Thp, nothing, 1).is_err());
        assert!(choose_sources(Backend::Off, both, 1).is_err());
    }

    #[test]
    fn range_helpers() {
        assert_eq!(align_up(u64::MAX - 3, PAGE), align_down(u64::MAX, PAGE));
        assert!(Range::new(5, 3).is_empty());
        assert_eq!(Range::new(0, 10).intersect(Range::new(10, 20)), None);
        assert_eq!(
            Range::new(0, 10).intersect(Range::new(5, 20)),
            Some(Range::new(5, 10))
        );
    }
}
