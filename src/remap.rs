//! The pipeline for a set of loaded objects:
//! discover (done by the caller) -> plan -> swap -> verify -> report.

use crate::config::{Backend, Strategy};
use crate::discover::{self, LoadedObject};
use crate::plan::{self, align_down, align_up, MappingView, ObjectPlan, Range, Skip, HUGE_PAGE};
use crate::report::{NotAttempted, ObjectReport};
use crate::smaps::{self, Vma};
use crate::swap;
use crate::sys;

/// What to do, beyond which objects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Where huge pages come from.
    pub backend: Backend,
    /// How far plans reach beyond the text.
    pub strategy: Strategy,
}

/// True when some executable segment of `object` could use a 2 MiB page:
/// it holds a whole one, or (aggressive) it is at least 2 MiB long. Cheap
/// (no /proc reads): most small programs stop here.
pub fn worth_planning(object: &LoadedObject, strategy: Strategy) -> bool {
    object.text_segments.iter().any(|s| match strategy {
        Strategy::Conservative => !plan::split(*s).body.is_empty(),
        Strategy::Aggressive => s.len() >= HUGE_PAGE,
    })
}

/// The 2 MiB-rounded span of the object's text: where its plan may reach.
fn chunk_window(object: &LoadedObject) -> Range {
    let start = object
        .text_segments
        .iter()
        .map(|s| s.start)
        .min()
        .unwrap_or(0);
    let end = object
        .text_segments
        .iter()
        .map(|s| s.end)
        .max()
        .unwrap_or(0);
    Range::new(align_down(start, HUGE_PAGE), align_up(end, HUGE_PAGE))
}

/// True when every byte of `range` lies in one of `ranges` (the kernel may
/// merge neighbouring segments' mappings into one).
fn covered_by_union(range: Range, ranges: &[Range]) -> bool {
    let mut cursor = range.start;
    while cursor < range.end {
        match ranges.iter().find(|r| r.start <= cursor && cursor < r.end) {
            Some(r) => cursor = r.end,
            None => return false,
        }
    }
    true
}

fn mapping_views(vmas: &[Vma], object: &LoadedObject, window: Range) -> Vec<MappingView> {
    vmas.iter()
        .filter(|v| v.range().intersect(window).is_some())
        .map(|v| MappingView {
            range: v.range(),
            read: v.read,
            write: v.write,
            exec: v.exec,
            private: v.private,
            read_only_segment: covered_by_union(v.range(), &object.read_only_segments),
            file_congruent: v.inode != 0
                && !v.is_hugetlb()
                && v.start.wrapping_sub(v.offset) % HUGE_PAGE == 0,
        })
        .collect()
}

/// Ranges inside `window` that the kernel maps with 2 MiB pages already.
fn already_huge(vmas: &[Vma], window: Range) -> Vec<Range> {
    if window.is_empty() {
        return Vec::new();
    }
    match sys::huge_mapped_ranges(window.start, window.end) {
        Ok(found) => found.into_iter().map(|(s, e)| Range::new(s, e)).collect(),
        // Before Linux 6.7, smaps only counts per mapping: a mapping counts
        // as huge when all of it is; a partly huge one is redone.
        Err(_) => vmas
            .iter()
            .filter(|v| !v.range().is_empty() && v.huge_bytes() >= v.range().len())
            .map(Vma::range)
            .collect(),
    }
}

/// Faults in the object's file-backed text whose address and file offset are
/// congruent modulo 2 MiB: where the page cache holds 2 MiB folios (a primed
/// file), the kernel then maps them with 2 MiB pages, and the plan sees them
/// as already huge instead of copying them. (Unfaulted pages show in no page
/// table, so nothing could tell.) Read faults only; nothing changes but
/// which pages are present.
fn fault_in_congruent_text(vmas: &[Vma], object: &LoadedObject) {
    for v in vmas {
        let congruent = v.inode != 0
            && v.exec
            && !v.write
            && !v.is_hugetlb()
            && v.start.wrapping_sub(v.offset) % HUGE_PAGE == 0;
        if !congruent {
            continue;
        }
        for seg in &object.text_segments {
            if let Some(r) = seg.intersect(v.range()) {
                // SAFETY: MADV_POPULATE_READ on mapped, readable text of a
                // loaded object: it only faults pages in, without changing
                // contents or protections.
                let _ = unsafe {
                    sys::madvise(
                        r.start as *mut u8,
                        r.len() as usize,
                        sys::MADV_POPULATE_READ,
                    )
                };
            }
        }
    }
}

/// Plans every executable segment of `object` against the current mappings.
pub fn plan_object(object: &LoadedObject, vmas: &[Vma], strategy: Strategy) -> ObjectPlan {
    let window = chunk_window(object);
    fault_in_congruent_text(vmas, object);
    plan::plan_object(
        &object.text_segments,
        &mapping_views(vmas, object, window),
        &already_huge(vmas, window),
        strategy,
    )
}

fn coverage_of(object: &LoadedObject, vmas: &[Vma]) -> smaps::Coverage {
    let mut c = smaps::Coverage::default();
    for s in &object.text_segments {
        c.add(smaps::coverage(vmas, *s));
    }
    c
}

const ALL_SKIPS: [Skip; 4] = [
    Skip::PartialHugePage,
    Skip::SharedPage,
    Skip::AlreadyHuge,
    Skip::NotPlainText,
];

/// Runs plan, swap and verify for each object, in order.
///
/// # Safety
/// The objects must stay loaded for the whole call, and no thread may run
/// code in their text meanwhile: either the process has one thread, or the
/// objects were just mapped and none of their code can have been reached
/// yet (the loader's audit hook). Text is replaced in place with identical
/// bytes.
pub unsafe fn remap_objects(objects: &[LoadedObject], request: Request) -> Vec<ObjectReport> {
    let mut reports = Vec::with_capacity(objects.len());
    let mut vmas: Option<Vec<Vma>> = None;
    for object in objects {
        let started = sys::monotonic_ns();
        let mut report = ObjectReport {
            path: object.path.clone(),
            text_bytes: object.text_bytes(),
            explicit_backend: request.backend != Backend::Auto,
            ..ObjectReport::default()
        };
        if !worth_planning(object, request.strategy) {
            report.not_attempted = Some(NotAttempted::NoWholeHugePage);
            report.elapsed_ns = sys::monotonic_ns().saturating_sub(started);
            reports.push(report);
            continue;
        }
        let current = match vmas.take().map_or_else(|| smaps::read(None), Ok) {
            Ok(v) => v,
            Err(_) => {
                report.not_attempted = Some(NotAttempted::SmapsUnreadable);
                reports.push(report);
                continue;
            }
        };
        let plan = plan_object(object, &current, request.strategy);
        report.planned_bytes = plan.swap_bytes();
        report.already_huge_bytes = plan.kept_bytes(Skip::AlreadyHuge);
        report.kept = ALL_SKIPS
            .iter()
            .map(|&r| (r, plan.kept_bytes(r)))
            .filter(|&(_, n)| n > 0)
            .collect();

        if plan.swap.is_empty() {
            report.not_attempted = Some(if report.already_huge_bytes > 0 {
                NotAttempted::AlreadyHuge
            } else if plan.kept_bytes(Skip::NotPlainText) > 0 {
                NotAttempted::NoPlainText
            } else {
                NotAttempted::NoWholeHugePage
            });
            report.after = coverage_of(object, &current);
            vmas = Some(current);
        } else {
            let pages = report.planned_bytes / HUGE_PAGE;
            match plan::choose_sources(request.backend, discover::machine(), pages) {
                Err(why) => {
                    report.not_attempted = Some(NotAttempted::NoSource(why));
                    report.after = coverage_of(object, &current);
                    vmas = Some(current);
                }
                Ok(sources) => {
                    // Only the pool: use what it has, report the rest.
                    let swaps = if sources == [plan::Source::Hugetlb] {
                        plan::split_at_budget(plan.swap, discover::hugetlb_pool().available())
                    } else {
                        plan.swap
                    };
                    // SAFETY: the ranges come from the plan: 2 MiB aligned,
                    // made of r-x private text of a loaded object and, when
                    // aggressive, read-only pages of the same object or
                    // unmapped space; they do not overlap. The caller
                    // guarantees no thread runs this text meanwhile.
                    let results = unsafe { swap::swap_ranges(&swaps, sources) };
                    for r in results {
                        if report.in_place_error.is_none() {
                            report.in_place_error = r.in_place_error;
                        }
                        match (r.result, r.source) {
                            (Ok(()), Some(source)) => report.swapped.push((r.range, source)),
                            (Err(e), _) => report.failed.push((r.range, e)),
                            (Ok(()), None) => {}
                        }
                    }
                    // Verify: what counts is what the kernel says now.
                    match smaps::read(None) {
                        Ok(after) => {
                            report.after = coverage_of(object, &after);
                            vmas = Some(after);
                        }
                        Err(_) => report.not_attempted = Some(NotAttempted::SmapsUnreadable),
                    }
                }
            }
        }
        report.elapsed_ns = sys::monotonic_ns().saturating_sub(started);
        reports.push(report);
    }
    reports
}
