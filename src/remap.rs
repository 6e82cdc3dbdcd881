//! The pipeline for a set of loaded objects:
//! discover (done by the caller) -> plan -> swap -> verify -> report.

use crate::config::Backend;
use crate::discover::{self, LoadedObject};
use crate::plan::{self, MappingView, Range, SegmentPlan, Skip, HUGE_PAGE};
use crate::report::{NotAttempted, ObjectReport};
use crate::smaps::{self, Vma};
use crate::swap;
use crate::sys;

/// True when some executable segment of `object` holds a whole 2 MiB page.
/// Cheap (no /proc reads): most small programs stop here.
pub fn has_huge_page_of_text(object: &LoadedObject) -> bool {
    object
        .text_segments
        .iter()
        .any(|s| !plan::split(*s).body.is_empty())
}

fn mapping_views(vmas: &[Vma], segment: Range) -> Vec<MappingView> {
    vmas.iter()
        .filter(|v| v.range().intersect(segment).is_some())
        .map(|v| MappingView {
            range: v.range(),
            plain_text: v.read && v.exec && !v.write && v.private,
        })
        .collect()
}

/// Ranges inside `body` that the kernel maps with 2 MiB pages already.
fn already_huge(vmas: &[Vma], body: Range) -> Vec<Range> {
    if body.is_empty() {
        return Vec::new();
    }
    match sys::huge_mapped_ranges(body.start, body.end) {
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

/// Plans every executable segment of `object` against the current mappings.
pub fn plan_object(object: &LoadedObject, vmas: &[Vma]) -> Vec<SegmentPlan> {
    object
        .text_segments
        .iter()
        .map(|&segment| {
            let body = plan::split(segment).body;
            plan::plan_segment(
                segment,
                &mapping_views(vmas, segment),
                &already_huge(vmas, body),
            )
        })
        .collect()
}

fn coverage_of(object: &LoadedObject, vmas: &[Vma]) -> smaps::Coverage {
    let mut c = smaps::Coverage::default();
    for s in &object.text_segments {
        c.add(smaps::coverage(vmas, *s));
    }
    c
}

/// Runs plan, swap and verify for each object, in order.
///
/// # Safety
/// No other thread may run in the process, and the objects must be loaded
/// (their text mapped) for the whole call. The text of each object is
/// replaced in place with identical bytes.
pub unsafe fn remap_objects(objects: &[LoadedObject], backend: Backend) -> Vec<ObjectReport> {
    let mut reports = Vec::with_capacity(objects.len());
    let mut vmas: Option<Vec<Vma>> = None;
    for object in objects {
        let started = sys::monotonic_ns();
        let mut report = ObjectReport {
            path: object.path.clone(),
            text_bytes: object.text_bytes(),
            explicit_backend: backend != Backend::Auto,
            ..ObjectReport::default()
        };
        if !has_huge_page_of_text(object) {
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
        let plans = plan_object(object, &current);
        let ranges: Vec<Range> = plans.iter().flat_map(|p| p.swap.iter().copied()).collect();
        report.planned_bytes = ranges.iter().map(Range::len).sum();
        report.already_huge_bytes = plans.iter().map(|p| p.kept_bytes(Skip::AlreadyHuge)).sum();
        report.not_plain_text_bytes = plans.iter().map(|p| p.kept_bytes(Skip::NotPlainText)).sum();

        if ranges.is_empty() {
            report.not_attempted = Some(if report.already_huge_bytes > 0 {
                NotAttempted::AlreadyHuge
            } else {
                NotAttempted::NoPlainText
            });
            report.after = coverage_of(object, &current);
            vmas = Some(current);
        } else {
            let pages = report.planned_bytes / HUGE_PAGE;
            match plan::choose_sources(backend, discover::machine(), pages) {
                Err(why) => {
                    report.not_attempted = Some(NotAttempted::NoSource(why));
                    report.after = coverage_of(object, &current);
                    vmas = Some(current);
                }
                Ok(sources) => {
                    // SAFETY: the ranges come from the plan: 2 MiB aligned,
                    // inside r-x private mappings of a loaded object, not
                    // overlapping; the caller guarantees a single thread.
                    let results = unsafe { swap::swap_ranges(&ranges, sources) };
                    for r in results {
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
