//! Which parts of a program's text its runs touched: the *hot map*. Pure:
//! parsing, formatting, merging a measurement, and asking whether a huge
//! page of text is hot. No system calls (the measurement is `session`'s).
//!
//! Text is counted in units of 64 KiB of the object's link-time addresses
//! (runtime address minus load bias), so that a PIE loaded at another base
//! next time reads the same map. 64 KiB is the kernel's fault-around
//! window: one fault on file-backed text maps up to 16 pages around it, so
//! finer units would only measure that. A unit holds how many of its 4 KiB
//! pages were present at the end of a run whose text there was still on
//! 4 KiB pages (0 to 16), or *unknown* (never measured: its text was on
//! huge pages in every run looked at).
//!
//! A huge page of text is *hot* when any unit it overlaps was touched or is
//! unknown: private copies under `auto` take the hot ones and leave the
//! cold ones on 4 KiB pages.
//!
//! The record (`hot/<digest of the program's path>` in the state dir):
//!
//! ```text
//! /usr/bin/prog
//! <identity, 16 hex> <first unit> <one character per unit> <object path>
//! ```
//!
//! with `0`-`9`, `a`-`g` for 0 to 16 present pages and `?` for unknown.
//! The identity is a digest of the object file's device, inode, size,
//! times and build ID: a rebuilt object starts a new map.

use crate::range::Range;

/// Bytes per unit.
pub const UNIT: u64 = 64 << 10;
/// Pages of 4 KiB counted per unit at most.
const MAX_COUNT: u8 = 16;
/// A unit never measured.
const UNKNOWN: u8 = u8::MAX;
/// Units kept per object at most (64 GiB of text).
const MAX_UNITS: u64 = 1 << 20;

/// One object's map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectMap {
    /// The object's path, as loaded.
    pub path: String,
    /// Digest of the object file's identity (see the module doc).
    pub identity: u64,
    /// The unit index (link address / [`UNIT`]) of `counts[0]`.
    pub first_unit: u64,
    /// Present pages per unit, or [`UNKNOWN`].
    counts: Vec<u8>,
}

/// A program's hot map: one [`ObjectMap`] per object measured.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HotMap {
    /// The objects.
    pub objects: Vec<ObjectMap>,
}

/// What a decision reads of a unit's count: touched, untouched, unknown.
fn class(count: u8) -> u8 {
    match count {
        0 => 0,
        UNKNOWN => 2,
        _ => 1,
    }
}

fn count_char(c: u8) -> u8 {
    match c {
        UNKNOWN => b'?',
        n => b"0123456789abcdefg"
            .get(usize::from(n.min(MAX_COUNT)))
            .copied()
            .unwrap_or(b'g'),
    }
}

fn char_count(c: u8) -> Option<u8> {
    match c {
        b'?' => Some(UNKNOWN),
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'g' => Some(c - b'a' + 10),
        _ => None,
    }
}

impl ObjectMap {
    /// Units, as characters.
    fn chars(&self) -> String {
        self.counts
            .iter()
            .map(|&c| char::from(count_char(c)))
            .collect()
    }

    /// The count of unit `u` (link address / UNIT), if the map spans it.
    fn unit(&self, u: u64) -> Option<u8> {
        let i = u.checked_sub(self.first_unit)?;
        self.counts.get(usize::try_from(i).ok()?).copied()
    }

    /// Whether the huge page of text at link addresses `chunk` is hot:
    /// some unit of text it overlaps was touched, or was never measured.
    /// Units outside the map hold no text and do not count; a huge page
    /// with none inside it is unknown, so hot.
    pub fn is_hot(&self, chunk: Range) -> bool {
        if chunk.is_empty() {
            return false;
        }
        let first = chunk.start / UNIT;
        let last = (chunk.end - 1) / UNIT;
        let mut inside = (first..=last).filter_map(|u| self.unit(u)).peekable();
        if inside.peek().is_none() {
            return true;
        }
        inside.any(|c| c > 0)
    }

    /// Whether the huge page at runtime addresses `chunk` of an object
    /// loaded at `bias` is hot (see [`ObjectMap::is_hot`]). The part of it
    /// below the object's link address 0 holds none of its text.
    pub fn is_hot_at(&self, chunk: Range, bias: u64) -> bool {
        self.is_hot(Range::new(
            chunk.start.saturating_sub(bias),
            chunk.end.saturating_sub(bias),
        ))
    }

    /// Bytes of the huge pages (of size `huge`) that `text` (runtime
    /// addresses of an object loaded at `bias`) spans and that are hot:
    /// what a private copy of its hot text moves.
    pub fn hot_bytes(&self, text: &[Range], huge: u64, bias: u64) -> u64 {
        let mut chunks: Vec<u64> = Vec::new();
        for seg in text {
            let mut at = crate::range::align_down(seg.start, huge);
            while at < seg.end {
                if chunks.last() != Some(&at) && self.is_hot_at(Range::new(at, at + huge), bias) {
                    chunks.push(at);
                }
                at += huge;
            }
        }
        chunks.len() as u64 * huge
    }

    /// Units touched (count > 0), unknown, and measured cold, for tests
    /// and listings.
    pub fn tally(&self) -> (usize, usize, usize) {
        let hot = self
            .counts
            .iter()
            .filter(|&&c| c > 0 && c != UNKNOWN)
            .count();
        let unknown = self.counts.iter().filter(|&&c| c == UNKNOWN).count();
        (hot, unknown, self.counts.len() - hot - unknown)
    }
}

/// What one run measured of one object, in link addresses.
pub struct Measurement<'a> {
    /// The object's path.
    pub path: &'a str,
    /// Its identity digest.
    pub identity: u64,
    /// Its text segments (link addresses, page-rounded).
    pub text: &'a [Range],
    /// The parts of the text that were on 4 KiB pages of its file all run
    /// long (measurable).
    pub measured: &'a [Range],
    /// The present 4 KiB pages inside `measured`.
    pub present: &'a [Range],
}

fn overlap(a: Range, b: Range) -> u64 {
    a.intersect(b).map_or(0, |r| r.len())
}

impl HotMap {
    /// Whether `other` tells the same units apart as touched, untouched
    /// and unknown, for the same objects in any order (merging reorders
    /// them): all a decision reads. Counts of touched pages vary from run
    /// to run by a page or two (fault-around), and a map that differs only
    /// in them need not be written again.
    pub fn same_as(&self, other: &HotMap) -> bool {
        self.objects.len() == other.objects.len()
            && self.objects.iter().all(|o| {
                other.objects.iter().any(|p| {
                    p.path == o.path
                        && p.identity == o.identity
                        && p.first_unit == o.first_unit
                        && p.counts.len() == o.counts.len()
                        && p.counts
                            .iter()
                            .zip(&o.counts)
                            .all(|(a, b)| class(*a) == class(*b))
                })
            })
    }

    /// The map of the object at `path` with `identity`, if kept.
    pub fn object(&self, path: &str, identity: u64) -> Option<&ObjectMap> {
        self.objects
            .iter()
            .find(|o| o.path == path && o.identity == identity)
    }

    /// Folds one run's measurement of one object in: measured units take
    /// the new count, the others keep what they had (unknown when the
    /// object is new or was rebuilt).
    pub fn merge(&mut self, m: &Measurement<'_>) {
        let (Some(lo), Some(hi)) = (
            m.text.iter().map(|r| r.start).min(),
            m.text.iter().map(|r| r.end).max(),
        ) else {
            return;
        };
        let first = lo / UNIT;
        let units = hi.div_ceil(UNIT).saturating_sub(first).min(MAX_UNITS);
        let old = self
            .objects
            .iter()
            .position(|o| o.path == m.path && o.identity == m.identity)
            .map(|i| self.objects.swap_remove(i));
        self.objects.retain(|o| o.path != m.path);
        let mut counts = Vec::with_capacity(units as usize);
        for i in 0..units {
            let u = first + i;
            let unit = Range::new(u * UNIT, (u + 1) * UNIT);
            let measured = m.measured.iter().any(|r| overlap(*r, unit) > 0);
            let count = if measured {
                let bytes: u64 = m.present.iter().map(|r| overlap(*r, unit)).sum();
                (bytes.div_ceil(4096)).min(u64::from(MAX_COUNT)) as u8
            } else {
                old.as_ref().and_then(|o| o.unit(u)).unwrap_or(UNKNOWN)
            };
            counts.push(count);
        }
        self.objects.push(ObjectMap {
            path: m.path.to_string(),
            identity: m.identity,
            first_unit: first,
            counts,
        });
    }

    /// The record's text (see the module doc).
    pub fn format(&self, program: &str) -> String {
        let mut s = String::new();
        s.push_str(program);
        s.push('\n');
        for o in &self.objects {
            s.push_str(&format!(
                "{:016x} {} {} {}\n",
                o.identity,
                o.first_unit,
                o.chars(),
                o.path
            ));
        }
        s
    }

    /// Parses a record; empty for another program's or a damaged one
    /// (lines that do not parse are left out).
    pub fn parse(text: &[u8], program: &str) -> HotMap {
        let text = String::from_utf8_lossy(text);
        let mut lines = text.lines();
        if lines.next() != Some(program) {
            return HotMap::default();
        }
        let objects = lines
            .filter_map(|line| {
                let mut words = line.splitn(4, ' ');
                let identity = u64::from_str_radix(words.next()?, 16).ok()?;
                let first_unit = words.next()?.parse().ok()?;
                let counts: Option<Vec<u8>> = words.next()?.bytes().map(char_count).collect();
                let path = words.next()?.to_string();
                Some(ObjectMap {
                    path,
                    identity,
                    first_unit,
                    counts: counts?,
                })
            })
            .collect();
        HotMap { objects }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: u64 = 2 << 20;

    #[test]
    fn a_run_s_touches_make_its_huge_pages_hot_and_the_rest_cold() {
        // 16 MiB of text from link address 1 MiB; the run touched 40 KiB
        // in the third huge page and one page in the sixth.
        let text = [Range::new(M / 2, 8 * M + M / 2)];
        let present = [
            Range::new(2 * M + 0x1000, 2 * M + 0xb000),
            Range::new(5 * M + 0x40000, 5 * M + 0x41000),
        ];
        let mut map = HotMap::default();
        map.merge(&Measurement {
            path: "/bin/p",
            identity: 7,
            text: &text,
            measured: &text,
            present: &present,
        });
        let o = map.object("/bin/p", 7).unwrap();
        let hot: Vec<u64> = (0..9)
            .filter(|&k| o.is_hot(Range::new(k * M, (k + 1) * M)))
            .collect();
        assert_eq!(hot, [2, 5]);
        assert_eq!(o.tally().0, 2);
        // The huge pages a copy would take: two, loaded at 0 (non-PIE).
        assert_eq!(o.hot_bytes(&text, M, 0), 2 * M);
        // Loaded at a PIE's 4 KiB-aligned base: the touched units now fall
        // in the runtime huge pages that hold them (two or three of them).
        let bias = 0x5600_0000_1000;
        let runtime: Vec<Range> = text
            .iter()
            .map(|r| Range::new(r.start + bias, r.end + bias))
            .collect();
        let bytes = o.hot_bytes(&runtime, M, bias);
        assert!(bytes == 2 * M || bytes == 3 * M, "{bytes}");
        assert!(map.object("/bin/p", 8).is_none(), "another build");
        // The same run again, and another object after it: the same map in
        // another order is the same; a page touched elsewhere is not.
        let other = [Range::new(0, M)];
        let measure = |map: &mut HotMap, path: &'static str, present: &[Range], text: &[Range]| {
            map.merge(&Measurement {
                path,
                identity: 7,
                text,
                measured: text,
                present,
            })
        };
        measure(&mut map, "/lib/q.so", &other, &other);
        let before = map.clone();
        measure(&mut map, "/bin/p", &present, &text);
        assert_ne!(map, before, "merging reorders the objects");
        assert!(map.same_as(&before));
        // Fewer pages touched in the same huge pages: the same to a decision.
        let fewer = [
            Range::new(2 * M + 0x1000, 2 * M + 0x2000),
            Range::new(5 * M + 0x40000, 5 * M + 0x41000),
        ];
        measure(&mut map, "/bin/p", &fewer, &text);
        assert!(map.same_as(&before));
        measure(&mut map, "/bin/p", &present[..1], &text);
        assert!(!map.same_as(&before), "the sixth huge page went cold");
    }

    #[test]
    fn huge_pages_not_measured_keep_what_earlier_runs_said() {
        let text = [Range::new(0, 4 * M)];
        let mut map = HotMap::default();
        // Run 1: all of it on huge pages: nothing measured.
        map.merge(&Measurement {
            path: "/p",
            identity: 1,
            text: &text,
            measured: &[],
            present: &[],
        });
        let o = map.object("/p", 1).unwrap().clone();
        assert!((0..4).all(|k| o.is_hot(Range::new(k * M, (k + 1) * M))));
        // Run 2: plain, touched only the first huge page.
        map.merge(&Measurement {
            path: "/p",
            identity: 1,
            text: &text,
            measured: &text,
            present: &[Range::new(0x1000, 0x3000)],
        });
        // Run 3: the first huge page copied, the rest measured cold again.
        map.merge(&Measurement {
            path: "/p",
            identity: 1,
            text: &text,
            measured: &[Range::new(M, 4 * M)],
            present: &[],
        });
        let o = map.object("/p", 1).unwrap();
        let hot: Vec<u64> = (0..4)
            .filter(|&k| o.is_hot(Range::new(k * M, (k + 1) * M)))
            .collect();
        assert_eq!(hot, [0]);
        // A rebuilt object starts over.
        map.merge(&Measurement {
            path: "/p",
            identity: 2,
            text: &text,
            measured: &[],
            present: &[],
        });
        assert_eq!(map.objects.len(), 1);
        assert!(map
            .object("/p", 2)
            .unwrap()
            .is_hot(Range::new(3 * M, 4 * M)));
    }

    #[test]
    fn records_round_trip() {
        let text = [Range::new(0x1000, 3 * M)];
        let mut map = HotMap::default();
        map.merge(&Measurement {
            path: "/opt/a b/lib.so",
            identity: 0xabc,
            text: &text,
            measured: &[Range::new(0, M)],
            present: &[Range::new(0x1000, 0x12000)],
        });
        let s = map.format("/bin/p");
        assert!(s.starts_with("/bin/p\n0000000000000abc 0 f2"), "{s}");
        assert_eq!(HotMap::parse(s.as_bytes(), "/bin/p"), map);
        assert_eq!(HotMap::parse(s.as_bytes(), "/bin/q"), HotMap::default());
        assert_eq!(
            HotMap::parse(b"/bin/p\nzz 0 1 /x\n", "/bin/p")
                .objects
                .len(),
            0
        );
    }
}
