//! Which ranges of text to swap: layout planning. Pure functions over plain
//! data: no system calls, no unsafe, tested with tables of layouts. (Where
//! each range's pages come from is `policy`'s.)
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
//! Head and tail stay on 4 KiB pages under the conservative strategy. The
//! aggressive one swaps the whole 2 MiB page around a head or tail too, when
//! everything else in it is unmapped or read-only bytes of the same object
//! (ELF headers, rodata), copying those bytes along; a page that also holds
//! writable data or another object's pages stays as it is.
//!
//! `head < 2 MiB`, `tail < 2 MiB`, `body.len() % 2 MiB == 0`, and
//! `head + body + tail == segment`.

use crate::config::Strategy;

pub use crate::pagesize::Geometry;
pub use crate::pagesize::{huge_page, page, segment_pages};
pub use crate::range::{align_down, align_up, Range};

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

/// Cuts `segment` at the kernel's huge page boundaries (2 MiB with 4 KiB
/// base pages, as in this example).
///
/// ```
/// use tiexec::internal::plan::{split, Range};
/// const MIB: u64 = 1 << 20;
/// // A PIE's text at a 4 KiB-aligned base: 0x1000 past 4 MiB, 9 MiB long.
/// let s = split(Range::new(4 * MIB + 0x1000, 13 * MIB + 0x1000));
/// assert_eq!(s.head, Range::new(4 * MIB + 0x1000, 6 * MIB));
/// assert_eq!(s.body, Range::new(6 * MIB, 12 * MIB)); // three 2 MiB pages
/// assert_eq!(s.tail, Range::new(12 * MIB, 13 * MIB + 0x1000));
/// ```
pub fn split(segment: Range) -> Split {
    split_in(crate::pagesize::current(), segment)
}

/// Cuts `segment` at the boundaries of `g`'s huge pages (2 MiB, or 32 MiB
/// and 512 MiB on arm64 kernels with 16 KiB and 64 KiB pages).
pub fn split_in(g: Geometry, segment: Range) -> Split {
    let body_start = align_up(segment.start, g.huge);
    let body_end = align_down(segment.end, g.huge);
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
    debug_assert!(s.body.is_empty() || (s.head.len() < g.huge && s.tail.len() < g.huge));
    debug_assert_eq!(s.body.len() % g.huge, 0);
    debug_assert!(s.body.is_empty() || s.body.start % g.huge == 0);
    s
}

/// Why a part of a text segment stays as it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skip {
    /// Conservative strategy: the segment fills only part of this 2 MiB page.
    PartialHugePage,
    /// Aggressive strategy: the rest of this 2 MiB page holds writable data
    /// or another object's pages.
    SharedPage,
    /// The kernel already maps it with 2 MiB pages.
    AlreadyHuge,
    /// Not covered by private, read-only, executable mappings (a hole, a
    /// writable page): not ours to replace.
    NotPlainText,
    /// The program's recent runs did not touch it (see `hotmap`): a private
    /// copy under `auto` leaves it on 4 KiB pages.
    Cold,
    /// It holds the object's ELF header (file offset 0), whose mapping
    /// names the object to debuggers, profilers and crash tools that read
    /// /proc/PID/maps: it stays the file's, unless the page cache maps it
    /// huge in place (file-backed still).
    ElfHeader,
}

impl Skip {
    /// Short words for logs and reports (in the kernel's huge page size).
    pub fn describe(self) -> crate::pagesize::HugeText {
        crate::pagesize::HugeText(match self {
            Skip::PartialHugePage => "head/tail, not a whole 2 MiB page",
            Skip::SharedPage => "shares its 2 MiB page with writable data or another object",
            Skip::AlreadyHuge => "already on 2 MiB pages",
            Skip::NotPlainText => "not plain r-x private text",
            Skip::Cold => "not touched by the program's recent runs",
            Skip::ElfHeader => {
                "holds the ELF header that names the object to symbolizers (kept file-backed)"
            }
        })
    }
}

/// How one mapping looks, as far as planning cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MappingView {
    /// Its address range.
    pub range: Range,
    /// Readable.
    pub read: bool,
    /// Writable.
    pub write: bool,
    /// Executable.
    pub exec: bool,
    /// Private (not shared).
    pub private: bool,
    /// Inside the object's own non-writable `PT_LOAD` segments (headers,
    /// rodata, text; not RELRO, which is relocated data).
    pub read_only_segment: bool,
    /// File-backed, with address and file offset congruent modulo 2 MiB:
    /// the page cache could supply its 2 MiB pages in place.
    pub file_congruent: bool,
}

impl MappingView {
    /// `r-xp`: text tiexec may replace.
    pub fn plain_text(&self) -> bool {
        self.read && self.exec && !self.write && self.private
    }

    /// Read-only bytes of the same object (headers, rodata, text): may share
    /// a 2 MiB page with the text under the aggressive strategy.
    pub fn read_only_same_object(&self) -> bool {
        self.read && !self.write && self.private && self.read_only_segment
    }
}

/// One range to replace, and the mapped parts of it whose bytes to copy
/// (the rest is unmapped and stays zero).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SwapRange {
    /// Aligned to the kernel's huge page, a multiple of it long.
    pub range: Range,
    /// Mapped, readable parts of `range`, ascending.
    pub pieces: Vec<Range>,
    /// All of it is file-backed text congruent with its file: try to get the
    /// huge pages from the page cache in place before copying.
    pub in_place: bool,
    /// It holds an object's ELF header, at its load address: symbolizers
    /// (Rust's backtraces, libdwfl's `eu-stack`, profilers reading
    /// /proc/PID/maps) find the object's file, and where it is loaded, by
    /// the mapping there. Only the page cache, in place, may replace it
    /// (the mapping stays the file's); the planner keeps it otherwise
    /// ([`Skip::ElfHeader`]).
    pub names_program: bool,
}

/// The plan for one object.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ObjectPlan {
    /// Ranges to replace with huge pages, ascending, merged.
    pub swap: Vec<SwapRange>,
    /// Text left as it is, with the reason, ascending, merged.
    pub keep: Vec<(Range, Skip)>,
}

impl ObjectPlan {
    /// Bytes planned for swapping (text, plus neighbours when aggressive).
    pub fn swap_bytes(&self) -> u64 {
        self.swap.iter().map(|s| s.range.len()).sum()
    }

    /// Bytes of text kept for `reason`.
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
    // Walk the mappings, advancing a cursor through `range`.
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

/// Decides one 2 MiB `chunk` for the text `inside` it (the part of the chunk
/// that belongs to a text segment).
fn decide_chunk(
    chunk: Range,
    inside: Range,
    mappings: &[MappingView],
    huge: &[Range],
    strategy: Strategy,
) -> Option<Skip> {
    if !covered_by(inside, mappings, MappingView::plain_text) {
        return Some(Skip::NotPlainText);
    }
    if inside != chunk {
        if strategy == Strategy::Conservative {
            return Some(Skip::PartialHugePage);
        }
        // Everything else in the chunk must be unmapped or read-only bytes
        // of the same object (its own text included; never another
        // object's, not even its text).
        let neighbours_ok = mappings
            .iter()
            .filter(|m| m.range.intersect(chunk).is_some())
            .all(MappingView::read_only_same_object);
        if !neighbours_ok {
            return Some(Skip::SharedPage);
        }
    }
    if huge.iter().any(|h| h.contains(chunk)) {
        return Some(Skip::AlreadyHuge);
    }
    None
}

/// Plans every executable segment of one object, in the kernel's huge pages
/// (the drawing's 2 MiB: see `pagesize`).
///
/// - `segments`: its executable segments as mapped (page-rounded).
/// - `mappings`: the process's mappings near them (from smaps), with
///   `read_only_segment` set for those inside the object's non-writable segments.
/// - `huge`: ranges the kernel already maps with 2 MiB pages; a 2 MiB page
///   counts as already huge only when it lies entirely inside one of them.
/// - `pinned`: addresses whose 2 MiB page must keep the name of its mapping
///   (the object's ELF header: see [`SwapRange::names_program`]).
pub fn plan_object(
    segments: &[Range],
    mappings: &[MappingView],
    huge: &[Range],
    pinned: &[u64],
    strategy: Strategy,
) -> ObjectPlan {
    plan_object_in(
        crate::pagesize::current(),
        segments,
        mappings,
        huge,
        pinned,
        strategy,
    )
}

/// [`plan_object`] for a kernel with geometry `g`: chunks of `g.huge`
/// bytes (32 MiB or 512 MiB pages on arm64 kernels with 16 KiB or 64 KiB
/// base pages).
pub fn plan_object_in(
    g: Geometry,
    segments: &[Range],
    mappings: &[MappingView],
    huge: &[Range],
    pinned: &[u64],
    strategy: Strategy,
) -> ObjectPlan {
    // One decision per chunk, keyed by its start: two segments can share a
    // chunk, and it must be swapped once (only if both agree).
    let mut decisions: std::collections::BTreeMap<u64, (Option<Skip>, Vec<Range>)> =
        std::collections::BTreeMap::new();
    for &segment in segments.iter().filter(|s| !s.is_empty()) {
        let mut chunk_start = align_down(segment.start, g.huge);
        while chunk_start < segment.end {
            let chunk = Range::new(chunk_start, chunk_start.saturating_add(g.huge));
            let inside = chunk.intersect(segment).unwrap_or(chunk);
            let decision = decide_chunk(chunk, inside, mappings, huge, strategy);
            let entry = decisions.entry(chunk.start).or_insert((None, Vec::new()));
            entry.0 = entry.0.or(decision);
            entry.1.push(inside);
            chunk_start = chunk.end;
        }
    }
    // Runs of chunks to swap, merged only with chunks of the same kind
    // (in place from the page cache, or copied; naming the program or not).
    let mut swap: Vec<(Range, (bool, bool))> = Vec::new();
    let mut keep: Vec<(Range, Skip)> = Vec::new();
    for (&start, (decision, insides)) in &decisions {
        match decision {
            None => {
                let chunk = Range::new(start, start + g.huge);
                let in_place = covered_by(chunk, mappings, |m| m.plain_text() && m.file_congruent);
                let names_program = pinned.iter().any(|&a| chunk.start <= a && a < chunk.end);
                if names_program && !in_place {
                    for inside in insides {
                        push_merged(&mut keep, *inside, Skip::ElfHeader);
                    }
                    continue;
                }
                push_merged(&mut swap, chunk, (in_place, names_program));
            }
            Some(reason) => {
                for inside in insides {
                    push_merged(&mut keep, *inside, *reason);
                }
            }
        }
    }
    let swap = swap
        .into_iter()
        .map(|(range, (in_place, names_program))| {
            let mut pieces: Vec<Range> = mappings
                .iter()
                .filter_map(|m| m.range.intersect(range))
                .collect();
            pieces.sort();
            SwapRange {
                range,
                pieces,
                in_place,
                names_program,
            }
        })
        .collect();
    let plan = ObjectPlan { swap, keep };
    debug_assert!(plan
        .swap
        .iter()
        .all(|s| s.range.start % g.huge == 0 && s.range.len() % g.huge == 0));
    plan
}

/// Keeps of `swaps` the huge pages for which `hot` holds, as ranges of
/// their own (merged where adjacent), and returns the others apart: a
/// private copy under `auto` takes only what the program's runs use.
///
/// ```text
///   swap:   |== hot ==|== cold ==|== hot ==|== hot ==|
///   kept:   |== A ====|          |== B ==============|
///   cold:              |== C ===|
/// ```
///
/// Pieces are cut along (the bytes each new range copies); `in_place` and
/// `names_program` stay with the huge pages they were decided for.
pub fn keep_hot(
    swaps: Vec<SwapRange>,
    huge: u64,
    hot: impl Fn(Range) -> bool,
) -> (Vec<SwapRange>, Vec<Range>) {
    let mut kept: Vec<SwapRange> = Vec::with_capacity(swaps.len());
    let mut cold: Vec<Range> = Vec::new();
    for s in swaps {
        // Merged only within one of `swaps` (their boundaries may be
        // deliberate: see `split_at_budget`).
        let first_of_s = kept.len();
        let mut at = s.range.start;
        while at < s.range.end {
            let chunk = Range::new(at, at.saturating_add(huge).min(s.range.end));
            at = chunk.end;
            if !hot(chunk) {
                match cold.last_mut() {
                    Some(last) if last.end == chunk.start => last.end = chunk.end,
                    _ => cold.push(chunk),
                }
                continue;
            }
            let pieces: Vec<Range> = s.pieces.iter().filter_map(|p| p.intersect(chunk)).collect();
            let merge = kept.len() > first_of_s;
            match kept.last_mut() {
                Some(last) if merge && last.range.end == chunk.start => {
                    last.range.end = chunk.end;
                    for p in pieces {
                        // Rejoin what one original piece held (a piece is
                        // one mapping: never join two).
                        match last.pieces.last_mut() {
                            Some(prev)
                                if prev.end == p.start
                                    && s.pieces
                                        .iter()
                                        .any(|q| q.start <= prev.start && p.end <= q.end) =>
                            {
                                prev.end = p.end
                            }
                            _ => last.pieces.push(p),
                        }
                    }
                }
                _ => kept.push(SwapRange {
                    range: chunk,
                    pieces,
                    in_place: s.in_place,
                    names_program: s.names_program,
                }),
            }
        }
    }
    debug_assert!(kept.iter().all(|k| k.range.len() % huge == 0));
    (kept, cold)
}

/// Splits `swaps` so that the first `budget` 2 MiB pages form ranges of
/// their own: with a hugetlb pool smaller than the plan, those get huge pages
/// and the rest is tried (and reported) on its own. A range that names the
/// program takes no pool pages (see [`SwapRange::names_program`]), so it
/// spends none of the budget.
pub fn split_at_budget(swaps: Vec<SwapRange>, budget: u64) -> Vec<SwapRange> {
    let mut out = Vec::with_capacity(swaps.len() + 1);
    let mut left = budget;
    for s in swaps {
        let pages = s.range.len() / huge_page();
        if s.names_program {
            out.push(s);
            continue;
        }
        if left == 0 || pages <= left {
            left = left.saturating_sub(pages);
            out.push(s);
            continue;
        }
        let cut = s.range.start + left * huge_page();
        let part = |r: Range| SwapRange {
            range: r,
            pieces: s.pieces.iter().filter_map(|p| p.intersect(r)).collect(),
            in_place: s.in_place,
            names_program: s.names_program,
        };
        out.push(part(Range::new(s.range.start, cut)));
        out.push(part(Range::new(cut, s.range.end)));
        left = 0;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::range::{HUGE_PAGE, PAGE};

    const M: u64 = HUGE_PAGE;

    fn view(start: u64, end: u64, perms: &str, read_only_segment: bool) -> MappingView {
        let p = perms.as_bytes();
        MappingView {
            range: Range::new(start, end),
            read: p[0] == b'r',
            write: p[1] == b'w',
            exec: p[2] == b'x',
            private: p[3] == b'p',
            read_only_segment,
            file_congruent: false,
        }
    }

    fn text(start: u64, end: u64) -> MappingView {
        view(start, end, "r-xp", true)
    }

    fn ranges(p: &ObjectPlan) -> Vec<Range> {
        p.swap.iter().map(|s| s.range).collect()
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
    fn conservative_swaps_the_body_only() {
        let seg = Range::new(M + 0x1000, 6 * M + 0x5000);
        let p = plan_object(
            &[seg],
            &[text(seg.start, seg.end)],
            &[],
            &[],
            Strategy::Conservative,
        );
        assert_eq!(ranges(&p), vec![Range::new(2 * M, 6 * M)]);
        assert_eq!(p.swap[0].pieces, vec![Range::new(2 * M, 6 * M)]);
        assert!(!p.swap[0].in_place);
        assert_eq!(p.kept_bytes(Skip::PartialHugePage), seg.len() - 4 * M);
        let kept: u64 = p.keep.iter().map(|(r, _)| r.len()).sum();
        assert_eq!(p.swap_bytes() + kept, seg.len());
    }

    #[test]
    fn congruent_file_text_is_tried_in_place_first() {
        let seg = Range::new(2 * M, 6 * M);
        let congruent = MappingView {
            file_congruent: true,
            ..text(seg.start, seg.end)
        };
        let p = plan_object(&[seg], &[congruent], &[], &[], Strategy::Aggressive);
        assert!(p.swap[0].in_place);
        // A chunk that also holds rodata or a hole is copied.
        let seg = Range::new(2 * M + 0x1000, 6 * M);
        let mappings = [
            view(2 * M, 2 * M + 0x1000, "r--p", true),
            MappingView {
                file_congruent: true,
                ..text(seg.start, seg.end)
            },
        ];
        let p = plan_object(&[seg], &mappings, &[], &[], Strategy::Aggressive);
        assert_eq!(
            ranges(&p),
            vec![Range::new(2 * M, 3 * M), Range::new(3 * M, 6 * M)]
        );
        assert!(!p.swap[0].in_place);
        assert!(p.swap[1].in_place);
    }

    /// One layout planned under each kernel geometry: a 40 MiB PIE text at
    /// a base page-aligned address (1 page past 64 MiB), read-only data
    /// after it, then writable data in the next huge page.
    #[test]
    fn each_geometry_plans_its_own_huge_pages() {
        const KIB: u64 = 1 << 10;
        const MIB: u64 = 1 << 20;
        // (base page, expected swapped ranges, expected to keep something)
        type Case = (u64, &'static [(u64, u64)], bool);
        let table: [Case; 3] = [
            // 4 KiB / 2 MiB: 64 MiB..104 MiB in 2 MiB pages, head and tail
            // pages included (read-only neighbours only).
            (4 * KIB, &[(64 * MIB, 106 * MIB)], false),
            // 16 KiB / 32 MiB: 64..96 MiB (headers and text) and 96..128 MiB
            // (the tail and rodata; the writable data starts the next page).
            (16 * KIB, &[(64 * MIB, 128 * MIB)], false),
            // 64 KiB / 512 MiB: the 512 MiB page around the text also holds
            // the writable data: nothing is swapped, all kept.
            (64 * KIB, &[], true),
        ];
        for (page, want, keeps) in table {
            let g = Geometry::for_base_page(page);
            let seg = Range::new(64 * MIB + page, 104 * MIB + page);
            let mappings = [
                view(64 * MIB, 64 * MIB + page, "r--p", true),
                text(seg.start, seg.end),
                view(seg.end, seg.end + 2 * MIB, "r--p", true),
                view(128 * MIB, 128 * MIB + page, "rw-p", false),
            ];
            let p = plan_object_in(g, &[seg], &mappings, &[], &[], Strategy::Aggressive);
            let want: Vec<Range> = want.iter().map(|&(a, b)| Range::new(a, b)).collect();
            assert_eq!(ranges(&p), want, "base page {page}");
            assert_eq!(!p.keep.is_empty(), keeps, "base page {page}: {:?}", p.keep);
            for s in &p.swap {
                assert_eq!(s.range.start % g.huge, 0);
                assert_eq!(s.range.len() % g.huge, 0);
            }
            // Conservative: whole huge pages inside the text only.
            let c = plan_object_in(g, &[seg], &mappings, &[], &[], Strategy::Conservative);
            let body = split_in(g, seg).body;
            let swapped: u64 = c.swap.iter().map(|s| s.range.len()).sum();
            assert_eq!(swapped, body.len(), "base page {page}");
        }
    }

    #[test]
    fn aggressive_takes_head_and_tail_pages_with_read_only_neighbours() {
        // r-- headers | r-x text | r-- rodata | hole | (next chunk) rw- data
        let seg = Range::new(M + 0x1000, 6 * M + 0x5000);
        let mappings = [
            view(M, M + 0x1000, "r--p", true),
            text(seg.start, seg.end),
            view(6 * M + 0x5000, 6 * M + 0x9000, "r--p", true),
            view(7 * M, 7 * M + 0x4000, "rw-p", true),
        ];
        let p = plan_object(&[seg], &mappings, &[], &[], Strategy::Aggressive);
        assert_eq!(ranges(&p), vec![Range::new(M, 7 * M)]);
        assert!(p.keep.is_empty(), "{:?}", p.keep);
        // The hole from 6M+0x9000 to 7M is not copied.
        assert_eq!(
            p.swap[0].pieces,
            vec![
                Range::new(M, M + 0x1000),
                seg,
                Range::new(6 * M + 0x5000, 6 * M + 0x9000)
            ]
        );
    }

    #[test]
    fn aggressive_leaves_pages_shared_with_writable_data_or_other_objects() {
        let seg = Range::new(M + 0x1000, 6 * M + 0x5000);
        let mappings = [
            view(M, M + 0x1000, "r--p", false), // another object's page
            text(seg.start, seg.end),
            // RELRO: read-only now, but part of the writable segment.
            view(6 * M + 0x5000, 6 * M + 0x7000, "r--p", false),
            view(6 * M + 0x7000, 6 * M + 0x9000, "rw-p", false), // .data
        ];
        let p = plan_object(&[seg], &mappings, &[], &[], Strategy::Aggressive);
        assert_eq!(ranges(&p), vec![Range::new(2 * M, 6 * M)]);
        assert_eq!(
            p.keep,
            vec![
                (Range::new(seg.start, 2 * M), Skip::SharedPage),
                (Range::new(6 * M, seg.end), Skip::SharedPage)
            ]
        );
    }

    #[test]
    fn a_chunk_shared_by_two_text_segments_is_swapped_once() {
        let a = Range::new(2 * M, 3 * M + 0x3000);
        let b = Range::new(3 * M + 0x3000, 6 * M);
        let mappings = [text(a.start, a.end), view(b.start, b.end, "r-xp", true)];
        let p = plan_object(&[a, b], &mappings, &[], &[], Strategy::Aggressive);
        assert_eq!(ranges(&p), vec![Range::new(2 * M, 6 * M)]);
        let p = plan_object(&[a, b], &mappings, &[], &[], Strategy::Conservative);
        assert_eq!(
            ranges(&p),
            vec![Range::new(2 * M, 3 * M), Range::new(4 * M, 6 * M)]
        );
    }

    #[test]
    fn already_huge_chunks_are_skipped_and_runs_split_around_them() {
        let seg = Range::new(2 * M, 10 * M);
        // Chunks 4 and 5 huge; only half of chunk 9.
        let huge = [Range::new(4 * M, 6 * M), Range::new(9 * M, 9 * M + M / 2)];
        let p = plan_object(
            &[seg],
            &[text(seg.start, seg.end)],
            &huge,
            &[],
            Strategy::Aggressive,
        );
        assert_eq!(
            ranges(&p),
            vec![Range::new(2 * M, 4 * M), Range::new(6 * M, 10 * M)]
        );
        // The half-covered chunk 9 is not "already huge".
        assert_eq!(p.kept_bytes(Skip::AlreadyHuge), 2 * M);
    }

    #[test]
    fn everything_already_huge_means_nothing_to_do() {
        let seg = Range::new(0x400000, 0x400000 + 20 * M + 0x3000);
        let p = plan_object(
            &[seg],
            &[text(seg.start, seg.end)],
            &[Range::new(0x400000, 0x400000 + 20 * M)],
            &[],
            Strategy::Conservative,
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
            view(5 * M, 5 * M + 0x1000, "rwxp", true), // a text relocation
            text(5 * M + 0x1000, 7 * M),
            // hole from 7M to 8M
            text(8 * M, 10 * M),
        ];
        for strategy in [Strategy::Conservative, Strategy::Aggressive] {
            let p = plan_object(&[seg], &mappings, &[], &[], strategy);
            // Chunk 5 holds a writable page, chunk 7 is a hole.
            assert_eq!(
                ranges(&p),
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
    }

    #[test]
    fn a_small_pool_gets_a_range_of_its_own() {
        let whole = SwapRange {
            range: Range::new(2 * M, 12 * M),
            pieces: vec![Range::new(2 * M + 0x1000, 12 * M)],
            in_place: false,
            names_program: false,
        };
        let split = split_at_budget(vec![whole.clone()], 3);
        assert_eq!(
            split.iter().map(|s| s.range).collect::<Vec<_>>(),
            vec![Range::new(2 * M, 5 * M), Range::new(5 * M, 12 * M)]
        );
        assert_eq!(split[0].pieces, vec![Range::new(2 * M + 0x1000, 5 * M)]);
        assert_eq!(split[1].pieces, vec![Range::new(5 * M, 12 * M)]);
        assert_eq!(
            split_at_budget(vec![whole.clone()], 10),
            vec![whole.clone()]
        );
        assert_eq!(split_at_budget(vec![whole.clone()], 0), vec![whole]);
    }

    #[test]
    fn only_hot_huge_pages_are_kept_and_the_pieces_follow() {
        let swaps = vec![
            SwapRange {
                range: Range::new(2 * M, 6 * M),
                pieces: vec![Range::new(2 * M + 0x1000, 6 * M)],
                in_place: false,
                names_program: false,
            },
            SwapRange {
                range: Range::new(6 * M, 8 * M),
                pieces: vec![Range::new(6 * M, 8 * M)],
                in_place: true,
                names_program: false,
            },
        ];
        // Hot: the huge pages at 2M, 4M, 5M and 7M; 3M and 6M are cold.
        let hot = |r: Range| [2, 4, 5, 7].contains(&(r.start / M));
        let (kept, cold) = keep_hot(swaps.clone(), M, hot);
        assert_eq!(
            kept.iter().map(|k| k.range).collect::<Vec<_>>(),
            [
                Range::new(2 * M, 3 * M),
                Range::new(4 * M, 6 * M),
                Range::new(7 * M, 8 * M)
            ]
        );
        assert_eq!(kept[0].pieces, [Range::new(2 * M + 0x1000, 3 * M)]);
        assert_eq!(kept[1].pieces, [Range::new(4 * M, 6 * M)]);
        assert!(kept[2].in_place && !kept[1].in_place);
        assert_eq!(cold, [Range::new(3 * M, 4 * M), Range::new(6 * M, 7 * M)]);
        // All hot: the same ranges.
        let (all, none) = keep_hot(swaps.clone(), M, |_| true);
        assert_eq!(all, swaps);
        assert!(none.is_empty());
    }

    #[test]
    fn the_chunk_holding_the_elf_header_stays_the_files() {
        // A PIE's first chunk holds its headers (read-only, same object) and
        // the start of its text: aggressive would take it, unless pinned.
        let base = 4 * M + 0x1000;
        let mappings = [
            view(base, base + 0x3000, "r--p", true),
            text(base + 0x3000, 9 * M),
        ];
        let seg = Range::new(base + 0x3000, 9 * M);
        let p = plan_object(&[seg], &mappings, &[], &[], Strategy::Aggressive);
        assert_eq!(ranges(&p), vec![Range::new(4 * M, 9 * M)]);
        assert!(p.swap.iter().all(|s| !s.names_program));
        let p = plan_object(&[seg], &mappings, &[], &[base], Strategy::Aggressive);
        assert_eq!(ranges(&p), vec![Range::new(5 * M, 9 * M)]);
        assert_eq!(p.kept_bytes(Skip::ElfHeader), 5 * M - seg.start);
        // Congruent with its file, the page cache may map it huge in place
        // (still the file's mapping): planned, and marked.
        let congruent = [
            MappingView {
                file_congruent: true,
                ..view(4 * M, 4 * M + 0x3000, "r-xp", true)
            },
            MappingView {
                file_congruent: true,
                ..text(4 * M + 0x3000, 9 * M)
            },
        ];
        let seg = Range::new(4 * M, 9 * M);
        let p = plan_object(&[seg], &congruent, &[], &[4 * M], Strategy::Aggressive);
        assert_eq!(
            ranges(&p),
            vec![Range::new(4 * M, 5 * M), Range::new(5 * M, 9 * M)]
        );
        assert!(p.swap[0].names_program && p.swap[0].in_place);
    }

    #[test]
    fn another_objects_text_is_never_taken_along() {
        // The tail chunk of our text also holds another library's text.
        let seg = Range::new(2 * M, 4 * M + M / 2);
        let mut theirs = text(4 * M + M / 2, 5 * M);
        theirs.read_only_segment = false;
        let mappings = [text(seg.start, seg.end), theirs];
        let p = plan_object(&[seg], &mappings, &[], &[], Strategy::Aggressive);
        assert_eq!(ranges(&p), vec![Range::new(2 * M, 4 * M)]);
        assert_eq!(p.kept_bytes(Skip::SharedPage), M / 2);
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
