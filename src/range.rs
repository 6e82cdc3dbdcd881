//! Address arithmetic: half-open ranges and alignment. Plain values used by
//! every step (planning, the swap, the cache, inspection); a leaf: it uses
//! no other module. (The kernel's page sizes are `pagesize`'s.)

/// 2 MiB and 4 KiB: the sizes unit tests are written for.
#[cfg(test)]
pub const HUGE_PAGE: u64 = 2 << 20;
/// See [`HUGE_PAGE`].
#[cfg(test)]
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

    /// True when every byte lies in one of `ranges` (which may touch: the
    /// kernel merges neighbouring segments' mappings into one).
    pub fn covered_by_union(&self, ranges: &[Range]) -> bool {
        let mut cursor = self.start;
        while cursor < self.end {
            match ranges.iter().find(|r| r.start <= cursor && cursor < r.end) {
                Some(r) => cursor = r.end,
                None => return false,
            }
        }
        true
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_intersect_contain_and_never_invert() {
        let a = Range::new(0x1000, 0x5000);
        assert_eq!(
            a.intersect(Range::new(0x4000, 0x9000)),
            Some(Range::new(0x4000, 0x5000))
        );
        assert_eq!(a.intersect(Range::new(0x5000, 0x9000)), None);
        assert!(a.contains(Range::new(0x2000, 0x3000)));
        assert!(!a.contains(Range::new(0x2000, 0x6000)));
        assert!(Range::new(9, 3).is_empty());
        let parts = [Range::new(0x1000, 0x3000), Range::new(0x3000, 0x6000)];
        assert!(a.covered_by_union(&parts));
        assert!(!Range::new(0x1000, 0x7000).covered_by_union(&parts));
        assert_eq!(Range::new(9, 3).start, 9);
    }

    #[test]
    fn alignment_rounds_and_saturates() {
        assert_eq!(align_down(HUGE_PAGE + 1, HUGE_PAGE), HUGE_PAGE);
        assert_eq!(align_up(HUGE_PAGE + 1, HUGE_PAGE), 2 * HUGE_PAGE);
        assert_eq!(align_up(u64::MAX - 1, PAGE), align_down(u64::MAX, PAGE));
    }
}
