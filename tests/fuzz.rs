//! Fuzzing the parsers and the planner with proptest, from a kept corpus of
//! real /proc files (tests/corpus: smaps with hugetlb, anonymous THP and
//! file THP text, a status file) mutated at random, and from arbitrary
//! input. Failures proptest finds are written to
//! tests/fuzz.proptest-regressions and replayed first on every run.

use proptest::prelude::*;
use tiexec::internal::config::{self, Strategy as PlanStrategy};
use tiexec::internal::plan::{self, MappingView, Range};

/// The sizes the generated layouts are written for (the planner uses the
/// kernel's; these tests run on 4 KiB-page machines).
const HUGE_PAGE: u64 = 2 << 20;
const PAGE: u64 = 4096;
use tiexec::internal::smaps;

fn corpus() -> Vec<String> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("tests/corpus")
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    files
        .iter()
        .map(|p| std::fs::read_to_string(p).expect("corpus file"))
        .collect()
}

#[test]
fn the_corpus_parses_to_what_the_kernel_said() {
    let c = corpus();
    let by_name = |needle: &str| {
        c.iter()
            .find(|t| t.contains(needle))
            .unwrap_or_else(|| panic!("no corpus file with {needle}"))
    };
    let hugetlb = smaps::parse(by_name("Private_Hugetlb:   32768 kB").as_str());
    assert!(hugetlb
        .iter()
        .any(|v| v.is_hugetlb() && v.exec && v.huge_bytes() == 32 << 20));
    let file_thp = smaps::parse(by_name("cc1plus").as_str());
    assert!(file_thp
        .iter()
        .any(|v| v.exec && v.file_pmd_mapped >= 2 << 20));
    let thp = smaps::parse(by_name("AnonHugePages:     32768 kB").as_str());
    assert!(thp.iter().any(|v| v.exec && v.anon_huge >= 2 << 20));
    for text in &c {
        let vmas = smaps::parse(text);
        if text.contains("KernelPageSize") {
            assert!(vmas.len() > 10, "every mapping parsed");
            // Each header line is one mapping.
            let headers = text
                .lines()
                .filter(|l| {
                    l.split(' ')
                        .next()
                        .is_some_and(|w| w.contains('-') && !w.contains(':'))
                })
                .count();
            assert_eq!(vmas.len(), headers);
        }
        assert!(vmas.iter().all(|v| v.start <= v.end));
    }
}

/// A corpus text with some bytes flipped, deleted or duplicated.
fn mutated() -> impl proptest::strategy::Strategy<Value = String> {
    let texts = corpus();
    (
        0..texts.len(),
        prop::collection::vec((any::<usize>(), any::<u8>(), 0u8..3), 0..40),
    )
        .prop_map(move |(i, edits)| {
            let mut b = texts[i].clone().into_bytes();
            for (pos, byte, kind) in edits {
                if b.is_empty() {
                    break;
                }
                let at = pos % b.len();
                match kind {
                    0 => b[at] = byte,
                    1 => {
                        b.remove(at);
                    }
                    _ => {
                        let c = b[at];
                        b.insert(at, c);
                    }
                }
            }
            String::from_utf8_lossy(&b).into_owned()
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn smaps_survives_mutated_real_files(text in mutated()) {
        let vmas = smaps::parse(&text);
        for v in &vmas {
            let c = smaps::coverage(&vmas, v.range());
            prop_assert!(c.huge() <= c.mapped, "{:?}", c);
        }
    }

    #[test]
    fn smaps_survives_arbitrary_text(text in ".{0,400}") {
        let vmas = smaps::parse(&text);
        let _ = smaps::coverage(&vmas, Range::new(0, u64::MAX));
    }

    #[test]
    fn status_fields_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let _ = tiexec::internal::discover::field_value(&bytes, b"Threads:");
        let _ = tiexec::internal::discover::parse_thp_mode(&bytes);
    }

    #[test]
    fn settings_accept_exactly_the_documented_values(value in prop::collection::vec(any::<u8>(), 0..24)) {
        for var in config::variable_names() {
            let p = config::parse(|n| (n == var).then_some(value.as_slice()));
            let complained = p.bad.iter().flatten().any(|b| b.var == var);
            let accepted = match var {
                "TIEXEC_BACKEND" => config::Backend::parse(&value).is_some(),
                "TIEXEC_LOG" => config::parse_level(&value).is_some(),
                "TIEXEC_CHILDREN" | "TIEXEC_PERF_MAP" => config::parse_switch(&value).is_some(),
                "TIEXEC_STRATEGY" => PlanStrategy::parse(&value).is_some(),
                "TIEXEC_MIN_TEXT" => config::parse_size(&value).is_some(),
                "TIEXEC_FAULT" => tiexec::internal::fault::Step::parse(&value).is_some(),
                "TIEXEC_CACHE" => config::CachePath::parse(&value).is_some(),
                "TIEXEC_STATE" => value.first() == Some(&b'/'), // "an absolute path"
                _ => true, // free-form: patterns, report target
            };
            prop_assert_eq!(complained, !value.is_empty() && !accepted, "{} = {:?}", var, value);
        }
    }

    #[test]
    fn globs_agree_with_a_naive_matcher(pattern in "[ab*?]{0,8}", text in "[ab]{0,10}") {
        fn naive(p: &[u8], t: &[u8]) -> bool {
            match (p.first(), t.first()) {
                (None, None) => true,
                (Some(b'*'), _) => naive(&p[1..], t) || (!t.is_empty() && naive(p, &t[1..])),
                (Some(b'?'), Some(_)) => naive(&p[1..], &t[1..]),
                (Some(a), Some(b)) if a == b => naive(&p[1..], &t[1..]),
                _ => false,
            }
        }
        prop_assert_eq!(
            tiexec::internal::select::glob(pattern.as_bytes(), text.as_bytes()),
            naive(pattern.as_bytes(), text.as_bytes())
        );
    }

    #[test]
    fn program_headers_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = tiexec::internal::elf::program_headers(&bytes);
    }

    /// Random layouts around one object's text: the plan never touches what
    /// is not its own read-only bytes, stays 2 MiB aligned, and accounts for
    /// every byte of text.
    #[test]
    fn plans_keep_their_promises(
        seg_start in 0u64..64,
        seg_pages in 1u64..4096,
        neighbours in prop::collection::vec((0u64..5000, 1u64..600, 0u8..4), 0..8),
        huge in prop::collection::vec((0u64..40, 1u64..4), 0..3),
        aggressive in any::<bool>(),
    ) {
        let base = 1u64 << 30;
        let seg = Range::new(base + seg_start * 0x11000, base + seg_start * 0x11000 + seg_pages * PAGE);
        let mut mappings = vec![MappingView {
            range: seg,
            read: true, write: false, exec: true, private: true,
            read_only_segment: true, file_congruent: false,
        }];
        for (start, pages, kind) in neighbours {
            let r = Range::new(base - 0x400000 + start * PAGE, base - 0x400000 + (start + pages) * PAGE);
            if r.intersect(seg).is_some() || mappings.iter().any(|m| m.range.intersect(r).is_some()) {
                continue;
            }
            mappings.push(MappingView {
                range: r,
                read: true,
                write: kind == 1,
                exec: false,
                private: true,
                read_only_segment: kind == 0,
                file_congruent: false,
            });
        }
        let huge: Vec<Range> = huge
            .iter()
            .map(|&(c, n)| Range::new(base - 0x400000 + c * HUGE_PAGE, base - 0x400000 + (c + n) * HUGE_PAGE))
            .collect();
        let strategy = if aggressive { PlanStrategy::Aggressive } else { PlanStrategy::Conservative };
        let p = plan::plan_object(&[seg], &mappings, &huge, &[], strategy);
        let mut last_end = 0;
        let mut text_swapped = 0;
        for s in &p.swap {
            prop_assert_eq!(s.range.start % HUGE_PAGE, 0);
            prop_assert_eq!(s.range.len() % HUGE_PAGE, 0);
            prop_assert!(s.range.start >= last_end, "sorted, disjoint");
            last_end = s.range.end;
            prop_assert!(s.range.intersect(seg).is_some(), "every range holds text");
            for m in &mappings {
                if m.range.intersect(s.range).is_some() {
                    prop_assert!(m.plain_text() || m.read_only_same_object(), "{:?} in {:?}", m, s.range);
                }
            }
            for piece in &s.pieces {
                prop_assert!(s.range.contains(*piece));
            }
            text_swapped += s.range.intersect(seg).map_or(0, |r| r.len());
            if !aggressive {
                prop_assert!(seg.contains(s.range));
            }
        }
        let kept: u64 = p.keep.iter().map(|(r, _)| r.len()).sum();
        prop_assert_eq!(text_swapped + kept, seg.len(), "every byte of text accounted for");
    }
}
