//! The pipeline for a set of loaded objects (discovered by the caller):
//!
//! ```text
//!   prepare (plan, facts, hot pages)  ->  supply  ->  swap  ->  verify  ->  report
//! ```
//!
//! [`remap_objects`] runs it; [`forecast_objects`] runs the same
//! preparation and policy and only says what the supply would get. Per
//! huge page of text, in order (see `policy::supplies`):
//! 1. already huge (the kernel maps it from a page cache of huge folios):
//!    nothing to do;
//! 2. in place: congruent file text asks the page cache to collapse;
//! 3. the image cache: the object region's shared image, found or built
//!    (paid once per machine), mapped at the range's offset;
//! 4. a private copy (a private image on the cache's pages, else THP; the
//!    pool only when asked for), where this process copies (the run
//!    history's decision, `context::Context::decide`), and under `auto`
//!    only the huge pages the program's runs touch (`hotmap`);
//! 5. else the text stays as it is, and one line at `info` says why.

use std::cell::Cell;

use crate::config::{Backend, Strategy};
use crate::context::Context;
use crate::discover::LoadedObject;
use crate::pagesize::{huge_page, page};
use crate::plan::{self, MappingView, ObjectPlan, Skip, SwapRange};
use crate::policy::{self, Source, Supply};
use crate::range::{align_down, align_up, Range};
use crate::report::{NotAttempted, ObjectReport};
use crate::smaps::{self, Vma};
use crate::supply::{self, Facts, ImageRegion, ObjectFile};
use crate::swap::{self, SwapError};
use crate::sys;

/// True when some executable segment of `object` could use a huge page:
/// it holds a whole one, or (aggressive) it is at least one long. Cheap (no
/// /proc reads): most small programs stop here.
pub fn worth_planning(object: &LoadedObject, strategy: Strategy) -> bool {
    object.text_segments.iter().any(|s| match strategy {
        Strategy::Conservative => !plan::split(*s).body.is_empty(),
        Strategy::Aggressive => s.len() >= huge_page(),
    })
}

/// The huge-page-rounded span of the object's text: where its plan may
/// reach.
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
    Range::new(align_down(start, huge_page()), align_up(end, huge_page()))
}

fn file_congruent(v: &Vma) -> bool {
    v.inode != 0 && !v.is_hugetlb() && v.start.wrapping_sub(v.offset) % huge_page() == 0
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
            read_only_segment: v.range().covered_by_union(&object.read_only_segments),
            file_congruent: file_congruent(v),
        })
        .collect()
}

/// Faults in one page of each huge page of the object's file-backed text
/// whose address and file offset are congruent modulo the huge page (and
/// for which `wanted` holds): where the page cache holds a huge folio there
/// (a primed file), the kernel then maps all of it with one huge page, and
/// the plan sees it as already huge instead of copying it. (Unfaulted pages
/// show in no page table, so nothing could tell.) Read faults only; nothing
/// changes but which pages are present. Huge pages nobody will move are
/// left alone, so that what the program's run touches stays its own (the
/// hot map counts present pages).
fn fault_in_congruent_text(vmas: &[Vma], object: &LoadedObject, wanted: &dyn Fn(Range) -> bool) {
    for v in vmas
        .iter()
        .filter(|v| v.exec && !v.write && file_congruent(v))
    {
        for seg in &object.text_segments {
            let Some(r) = seg.intersect(v.range()) else {
                continue;
            };
            let mut chunk = align_up(r.start, huge_page());
            while chunk + huge_page() <= r.end {
                if wanted(Range::new(chunk, chunk + huge_page())) {
                    let _ = sys::populate_read(Range::new(chunk, chunk + page()));
                }
                chunk += huge_page();
            }
        }
    }
}

/// The address whose huge page must keep the name of its mapping: where
/// the object's ELF header is loaded (its lowest `PT_LOAD` segment, which
/// maps file offset 0). See [`SwapRange::names_program`].
fn pinned(object: &LoadedObject) -> Vec<u64> {
    object
        .load_segments
        .iter()
        .map(|s| s.start)
        .min()
        .into_iter()
        .collect()
}

/// Plans every executable segment of `object` against the current mappings
/// (`wanted`: the huge pages worth faulting in to see whether the page
/// cache maps them huge).
pub fn plan_object(
    object: &LoadedObject,
    vmas: &[Vma],
    strategy: Strategy,
    wanted: &dyn Fn(Range) -> bool,
) -> ObjectPlan {
    let window = chunk_window(object);
    fault_in_congruent_text(vmas, object, wanted);
    plan::plan_object(
        &object.text_segments,
        &mapping_views(vmas, object, window),
        &smaps::huge_ranges(None, window, None),
        &pinned(object),
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

/// Coverage as the swap left it, from the plan and the routine's outcomes
/// (used when nobody asked to read smaps back).
fn coverage_from_results(object: &LoadedObject, report: &ObjectReport) -> smaps::Coverage {
    let mut c = smaps::Coverage {
        mapped: object.text_bytes(),
        file_thp: report.already_huge_bytes,
        ..smaps::Coverage::default()
    };
    for (range, source) in &report.swapped {
        let text: u64 = object
            .text_segments
            .iter()
            .filter_map(|s| s.intersect(*range))
            .map(|r| r.len())
            .sum();
        match source {
            Source::PageCache => c.file_thp += text,
            Source::Thp => c.anon_thp += text,
            Source::CacheHit | Source::CacheBuilt | Source::Hugetlb => c.hugetlb += text,
        }
    }
    c
}

const ALL_SKIPS: [Skip; 5] = [
    Skip::PartialHugePage,
    Skip::SharedPage,
    Skip::AlreadyHuge,
    Skip::NotPlainText,
    Skip::Cold,
];

/// Whether the huge page of `object` at `chunk` is hot: its runs touched
/// it, or nothing is known (see `hotmap`).
fn hot(ctx: &Context, object: &LoadedObject, chunk: Range) -> bool {
    match ctx.hot_map().object(&object.path, object.identity_digest()) {
        Some(map) => map.is_hot_at(chunk, object.bias),
        None => true,
    }
}

/// Whether `object`'s private copies take hot huge pages only: under
/// `auto`, where no shared image is likely to serve it.
fn hot_only(ctx: &Context, object: &LoadedObject) -> bool {
    ctx.copies_hot_only() && !ctx.image_likely(object)
}

/// One object, planned: its report so far, the ranges to supply with what
/// is known of their bytes, its file and image regions.
struct Prepared {
    report: ObjectReport,
    swaps: Vec<(SwapRange, Facts)>,
    file: Option<ObjectFile>,
    regions: Vec<ImageRegion>,
}

/// Plans `object` against `vmas`: its congruent text faulted in, cold huge
/// pages set aside (private copies under `auto`), the pool's budget split
/// off (`hugetlb`), and the facts of each range. `Err` carries the finished
/// report when there is nothing to supply.
fn prepare(
    object: &LoadedObject,
    vmas: &[Vma],
    ctx: &Context,
    started: u64,
) -> Result<Prepared, Box<ObjectReport>> {
    let mut report = ObjectReport {
        path: object.path.clone(),
        bias: object.bias,
        text_bytes: object.text_bytes(),
        explicit_backend: ctx.request.backend != Backend::Auto,
        decision: ctx.decision(),
        ..ObjectReport::default()
    };
    if !worth_planning(object, ctx.request.strategy) {
        report.not_attempted = Some(NotAttempted::NoWholeHugePage);
        report.elapsed_ns = sys::monotonic_ns().saturating_sub(started);
        return Err(Box::new(report));
    }
    let hot_only = hot_only(ctx, object);
    let wanted = |chunk: Range| !hot_only || hot(ctx, object, chunk);
    let plan = plan_object(object, vmas, ctx.request.strategy, &wanted);
    report.planned_bytes = plan.swap_bytes();
    report.already_huge_bytes = plan.kept_bytes(Skip::AlreadyHuge);
    let mut kept: Vec<(Skip, u64)> = ALL_SKIPS.iter().map(|&r| (r, plan.kept_bytes(r))).collect();
    if plan.swap.is_empty() {
        report.not_attempted = Some(if report.already_huge_bytes > 0 {
            NotAttempted::AlreadyHuge
        } else if plan.kept_bytes(Skip::NotPlainText) > 0 {
            NotAttempted::NoPlainText
        } else {
            NotAttempted::NoWholeHugePage
        });
    }
    let swaps = match ctx.request.backend {
        // Only the pool: use what it has, report the rest.
        Backend::Hugetlb => plan::split_at_budget(plan.swap, ctx.offer.pool_available),
        _ if hot_only => {
            let (hot, cold) = plan::keep_hot(plan.swap, huge_page(), |c| hot(ctx, object, c));
            let cold_text: u64 = cold
                .iter()
                .flat_map(|c| object.text_segments.iter().filter_map(|s| s.intersect(*c)))
                .map(|r| r.len())
                .sum();
            if let Some(k) = kept.iter_mut().find(|(r, _)| *r == Skip::Cold) {
                k.1 += cold_text;
            }
            report.planned_bytes -= cold.iter().map(Range::len).sum::<u64>();
            if hot.is_empty() && !cold.is_empty() {
                report.not_attempted = Some(NotAttempted::AllCold);
            }
            hot
        }
        _ => plan.swap,
    };
    report.kept = kept.into_iter().filter(|&(_, n)| n > 0).collect();
    let file = if swaps.is_empty() {
        None
    } else {
        supply::open_object_file(object, vmas)
    };
    let regions = match (&file, ctx.offer.cache) {
        (Some(f), true) => supply::image_regions(object, f, vmas),
        _ => Vec::new(),
    };
    let swaps = swaps
        .into_iter()
        .map(|req| {
            let facts = supply::range_facts(&req, object, file.as_ref(), &regions, vmas);
            (req, facts)
        })
        .collect();
    Ok(Prepared {
        report,
        swaps,
        file,
        regions,
    })
}

/// A policy that allowed nothing for any range is one reason, said once for
/// the object.
fn one_reason_for_all(report: &mut ObjectReport) {
    if let (true, Some((_, SwapError::NoSupply(why)))) =
        (report.swapped.is_empty(), report.failed.first().copied())
    {
        if report
            .failed
            .iter()
            .all(|(_, e)| *e == SwapError::NoSupply(why))
        {
            report.failed.clear();
            report.not_attempted = Some(NotAttempted::NoSource(why));
        }
    }
}

/// What a run would do with `objects`, decided by the same planner and the
/// same policy as [`remap_objects`], without moving anything: the ranges it
/// would swap with the source each would get, those it would leave and why.
/// `in_place_works`: whether the kernel collapses file text in place (a
/// forecast does not try: that would change the page cache).
///
/// Effects: read faults on the objects' congruent text (as a run makes);
/// nothing mapped, written or cached. The cache is only looked into.
pub fn forecast_objects(
    objects: &[LoadedObject],
    ctx: &Context,
    in_place_works: bool,
) -> Vec<ObjectReport> {
    ctx.decide(objects);
    let vmas = smaps::read_maps(None);
    let mut reports = Vec::with_capacity(objects.len());
    for object in objects {
        let started = sys::monotonic_ns();
        let Ok(vmas) = &vmas else {
            reports.push(unreadable(object, ctx));
            continue;
        };
        let Prepared {
            mut report,
            swaps,
            file,
            regions,
        } = match prepare(object, vmas, ctx, started) {
            Ok(p) => p,
            Err(report) => {
                reports.push(*report);
                continue;
            }
        };
        for (req, facts) in &swaps {
            if req.in_place && in_place_works {
                report.swapped.push((req.range, Source::PageCache));
                continue;
            }
            let identity = file.as_ref().map(|f| &f.identity);
            let mut attempt =
                |way: Supply| supply::foresee(way, req, facts, &regions, identity, ctx);
            match supply::supply_range(req, object, facts, ctx, &mut attempt) {
                Ok(source) => report.swapped.push((req.range, source)),
                Err(e) => report.failed.push((req.range, e)),
            }
        }
        one_reason_for_all(&mut report);
        report.after = coverage_from_results(object, &report);
        report.elapsed_ns = sys::monotonic_ns().saturating_sub(started);
        reports.push(report);
    }
    reports
}

fn unreadable(object: &LoadedObject, ctx: &Context) -> ObjectReport {
    ObjectReport {
        path: object.path.clone(),
        bias: object.bias,
        text_bytes: object.text_bytes(),
        explicit_backend: ctx.request.backend != Backend::Auto,
        not_attempted: Some(NotAttempted::SmapsUnreadable),
        decision: ctx.decision(),
        ..ObjectReport::default()
    }
}

/// Private copies made in one pass: bytes and time, for the machine's copy
/// rate (`state::RateKind::Copy`).
#[derive(Default)]
struct CopyClock {
    bytes: Cell<u64>,
    ns: Cell<u64>,
}

impl CopyClock {
    fn time<T>(
        &self,
        bytes: u64,
        f: impl FnOnce() -> Result<T, SwapError>,
    ) -> Result<T, SwapError> {
        let started = sys::monotonic_ns();
        let got = f();
        if got.is_ok() {
            self.bytes.set(self.bytes.get() + bytes);
            self.ns
                .set(self.ns.get() + sys::monotonic_ns().saturating_sub(started));
        }
        got
    }

    /// Records the rate measured, when anything was copied.
    fn record(&self, ctx: &Context) {
        let bytes = self.bytes.get();
        if bytes < huge_page() {
            return;
        }
        let us_per_mib = (self.ns.get() / 1000).saturating_mul(1 << 20) / bytes;
        if let Some(state) = ctx.state() {
            state.record_rate(
                crate::state::RateKind::Copy,
                u32::try_from(us_per_mib).unwrap_or(u32::MAX),
            );
        }
    }
}

/// Runs prepare, supply, swap and verify for each object, in order.
///
/// # Safety
/// The objects must stay loaded for the whole call, and no thread may run
/// code in their text meanwhile: either the process has one thread, or the
/// objects were just mapped and none of their code can have been reached
/// yet (the loader's audit hook). Text is replaced in place with identical
/// bytes.
pub unsafe fn remap_objects(objects: &[LoadedObject], ctx: &Context) -> Vec<ObjectReport> {
    ctx.decide(objects);
    let clock = CopyClock::default();
    let mut reports = Vec::with_capacity(objects.len());
    // The mappings, read once: swapping one object's text changes no other
    // object's mappings.
    let vmas = smaps::read_maps(None);
    let mut changed = false;
    for object in objects {
        let started = sys::monotonic_ns();
        let Ok(vmas) = &vmas else {
            reports.push(unreadable(object, ctx));
            continue;
        };
        let Prepared {
            mut report,
            swaps,
            file,
            regions,
        } = match prepare(object, vmas, ctx, started) {
            Ok(p) => p,
            Err(report) => {
                reports.push(*report);
                continue;
            }
        };
        if !swaps.is_empty() {
            let requests: Vec<SwapRange> = swaps.iter().map(|(r, _)| r.clone()).collect();
            let mut supply = |req: &SwapRange| {
                let Some((_, facts)) = swaps.iter().find(|(r, _)| r.range == req.range) else {
                    return Err(SwapError::NoSupply(policy::NoSupply::Nothing));
                };
                let mut attempt = |way: Supply| match way {
                    Supply::SharedImage | Supply::PrivateImage => {
                        match (ctx.cache.as_ref(), file.as_ref()) {
                            (Some(cache), Some(file)) => supply::image_for(
                                req,
                                facts,
                                &supply::ObjectSupply {
                                    object,
                                    file,
                                    regions: &regions,
                                },
                                cache,
                                ctx,
                                way == Supply::SharedImage,
                            ),
                            _ => Err(SwapError::NoSupply(policy::NoSupply::NoCache)),
                        }
                    }
                    // SAFETY: the caller of `remap_objects` keeps the text
                    // mapped and unwritten: `req` is a planned range of it,
                    // its pieces mapped and readable.
                    Supply::Pool => clock.time(req.range.len(), || unsafe {
                        crate::staging::pool_copy(req)
                    }),
                    Supply::Thp => clock.time(req.range.len(), || {
                        // SAFETY: as above.
                        unsafe { crate::staging::thp_copy(req) }
                    }),
                };
                supply::supply_range(req, object, facts, ctx, &mut attempt)
            };
            // SAFETY: the ranges come from the plan: huge-page aligned, made
            // of r-x private text of a loaded object and, when aggressive,
            // read-only pages of the same object or unmapped space; they do
            // not overlap. Every supply holds the range's bytes: copies are
            // made from the live text, images from the very file mapped,
            // only for ranges whose pages are all the file's. The caller
            // guarantees no thread runs this text meanwhile.
            let results = unsafe { swap::swap_ranges(&requests, &mut supply, ctx.offer.mdwe) };
            for r in results {
                if report.in_place_error.is_none() {
                    report.in_place_error = r.in_place_error;
                }
                match (r.result, r.source) {
                    (Ok(()), Some(source)) => {
                        if source.on_hugetlb() {
                            // hugetlb pages cannot be split: a later
                            // mprotect of part of them needs tiexec's help.
                            // SAFETY: text just swapped onto hugetlb pages,
                            // mapped r-x; `audit`'s `la_objclose`
                            // unregisters it before its object is unmapped.
                            unsafe { crate::interpose::register(r.range) };
                        }
                        report.swapped.push((r.range, source))
                    }
                    (Err(e), _) => report.failed.push((r.range, e)),
                    (Ok(()), None) => {}
                }
            }
        }
        one_reason_for_all(&mut report);
        changed |= !report.swapped.is_empty();
        report.after = coverage_from_results(object, &report);
        report.elapsed_ns = sys::monotonic_ns().saturating_sub(started);
        reports.push(report);
    }
    // Verify: what counts is what the kernel says now, when anyone is going
    // to look.
    if ctx.verify {
        match (changed, smaps::read(None)) {
            (_, Ok(after)) => {
                for (report, object) in reports.iter_mut().zip(objects) {
                    if report.not_attempted != Some(NotAttempted::SmapsUnreadable) {
                        report.after = coverage_of(object, &after);
                    }
                }
            }
            (_, Err(_)) => {
                for r in &mut reports {
                    r.not_attempted = Some(NotAttempted::SmapsUnreadable);
                }
            }
        }
    }
    clock.record(ctx);
    reports
}
