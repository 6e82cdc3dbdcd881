//! The pipeline for a set of loaded objects:
//! discover (done by the caller) -> plan -> swap -> verify -> report,
//! and the policy that decides, per range, where its huge pages come from.
//!
//! Per 2 MiB range of text, in order (see `plan::supplies`):
//! 1. already huge (the kernel maps it from a page cache of 2 MiB folios):
//!    nothing to do;
//! 2. in place: congruent file text asks the page cache to collapse;
//! 3. the image cache: an image found is mapped (no copy, shared); a miss
//!    builds one from the file, paid once per machine;
//! 4. a private copy (THP; the pool only when asked for), made only where
//!    it can pay off in this process: the program's past runs say it lives
//!    long enough (`state`), or the backend was named explicitly;
//! 5. else the text stays as it is, and one line at `info` says why.

use std::cell::OnceCell;
use std::fs::File;
use std::os::fd::AsFd;

use crate::cache::{self, Cache, Content, FileIdentity, ImageKey, Piece};
use crate::config::{Backend, Strategy};
use crate::discover::{self, LoadedObject};
use crate::plan::{
    self, align_down, align_up, huge_page, page, MappingView, NotCacheable, ObjectPlan, Offer,
    Payoff, Range, RangeFacts, Skip, Source, Supply, SwapRange,
};
use crate::report::{NotAttempted, ObjectReport};
use crate::smaps::{self, Vma};
use crate::state::StateDir;
use crate::swap::{self, Staged, SwapError};
use crate::sys;

/// What to do, beyond which objects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Where huge pages come from.
    pub backend: Backend,
    /// How far plans reach beyond the text.
    pub strategy: Strategy,
}

/// Everything one pass over objects shares.
pub struct Context {
    /// What to do.
    pub request: Request,
    /// What this process may use.
    pub offer: Offer,
    /// The image cache, when set up and usable.
    pub cache: Option<Cache>,
    /// The user's state directory (run history, image records), opened on
    /// first use.
    state: OnceCell<Option<StateDir>>,
    /// The main program's path: whose run history counts.
    pub program: String,
    /// Lifetimes of the program's last runs, read on first use.
    runs: OnceCell<Vec<u32>>,
    /// Whether a private copy's payoff was weighed (the run is then worth
    /// recording).
    pub payoff_weighed: core::cell::Cell<bool>,
    /// Read smaps after the swap for coverage by kind (someone will look:
    /// info logging, a JSON report). Otherwise the report's coverage is what
    /// the swap did, as the routine reported it.
    pub verify: bool,
}

impl Context {
    /// A context for `request`: opens the cache at `cache_root` (None: no
    /// cache) and reads what the machine offers. Also returns why the cache
    /// is not used, when it is not.
    pub fn new(
        request: Request,
        cache_root: Option<&std::path::Path>,
        program: String,
        verify: bool,
    ) -> (Context, Option<cache::Unusable>) {
        let (cache, why) = match cache_root.map(Cache::open) {
            None => (None, Some(cache::Unusable::Off)),
            Some(Ok(c)) => (Some(c), None),
            Some(Err(e)) => (None, Some(e)),
        };
        let offer = discover::offer(cache.is_some(), request.backend);
        (
            Context {
                request,
                offer,
                cache,
                state: OnceCell::new(),
                program,
                runs: OnceCell::new(),
                payoff_weighed: core::cell::Cell::new(false),
                verify,
            },
            why,
        )
    }

    fn state(&self) -> Option<&StateDir> {
        self.state.get_or_init(StateDir::open_default).as_ref()
    }

    fn runs(&self) -> &[u32] {
        self.runs.get_or_init(|| {
            self.state()
                .map(|s| s.runs(&self.program))
                .unwrap_or_default()
        })
    }

    /// True when this process would copy nothing whatever its plan says:
    /// `auto`, no image cache, and not even one 2 MiB page's copy pays off
    /// (a copy's cost grows with its size). Only text the kernel maps huge
    /// by itself (the page cache) would end up huge, and it needs nothing
    /// from us. Weighs the payoff (the run is then recorded).
    pub fn copies_cannot_pay(&self) -> bool {
        self.request.backend == Backend::Auto
            && self.cache.is_none()
            && self.payoff(huge_page()) != Payoff::Pays
    }

    /// Runs of the program remembered so far.
    pub fn runs_known(&self) -> usize {
        self.runs().len()
    }

    /// Whether privately copying `bytes` pays off in this process.
    fn payoff(&self, bytes: u64) -> Payoff {
        self.payoff_weighed.set(true);
        let age = discover::process_age_ms().unwrap_or(0);
        plan::payoff(self.runs(), bytes, age)
    }
}

/// True when some executable segment of `object` could use a 2 MiB page:
/// it holds a whole one, or (aggressive) it is at least 2 MiB long. Cheap
/// (no /proc reads): most small programs stop here.
pub fn worth_planning(object: &LoadedObject, strategy: Strategy) -> bool {
    object.text_segments.iter().any(|s| match strategy {
        Strategy::Conservative => !plan::split(*s).body.is_empty(),
        Strategy::Aggressive => s.len() >= huge_page(),
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
    Range::new(align_down(start, huge_page()), align_up(end, huge_page()))
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
            read_only_segment: covered_by_union(v.range(), &object.read_only_segments),
            file_congruent: file_congruent(v),
        })
        .collect()
}

/// Ranges inside `window` that the kernel maps with 2 MiB pages already.
fn already_huge(window: Range) -> Vec<Range> {
    smaps::huge_ranges(None, window, None)
}

/// Faults in one page of each 2 MiB page of the object's file-backed text
/// whose address and file offset are congruent modulo 2 MiB: where the page
/// cache holds a 2 MiB folio there (a primed file), the kernel then maps all
/// of it with one 2 MiB page, and the plan sees it as already huge instead of
/// copying it. (Unfaulted pages show in no page table, so nothing could
/// tell.) Read faults only; nothing changes but which pages are present.
fn fault_in_congruent_text(vmas: &[Vma], object: &LoadedObject) {
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
                let _ = sys::populate_read(Range::new(chunk, chunk + page()));
                chunk += huge_page();
            }
        }
    }
}

/// The address whose 2 MiB page must keep the name of its mapping: the main
/// program's ELF header, when it is loaded at a base of its own (PIE). See
/// [`SwapRange::names_program`].
fn pinned(object: &LoadedObject) -> Vec<u64> {
    if object.is_main && object.bias != 0 {
        vec![object.bias]
    } else {
        Vec::new()
    }
}

/// Plans every executable segment of `object` against the current mappings.
pub fn plan_object(object: &LoadedObject, vmas: &[Vma], strategy: Strategy) -> ObjectPlan {
    let window = chunk_window(object);
    fault_in_congruent_text(vmas, object);
    plan::plan_object(
        &object.text_segments,
        &mapping_views(vmas, object, window),
        &already_huge(window),
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

const ALL_SKIPS: [Skip; 4] = [
    Skip::PartialHugePage,
    Skip::SharedPage,
    Skip::AlreadyHuge,
    Skip::NotPlainText,
];

/// The object's file, opened and checked to be the very file its text maps.
struct ObjectFile {
    file: File,
    identity: FileIdentity,
}

fn open_object_file(object: &LoadedObject, vmas: &[Vma]) -> Option<ObjectFile> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(&object.path)
        .ok()?;
    let identity = FileIdentity::of_fd(file.as_fd()).ok()?;
    let maps_it = vmas.iter().any(|v| {
        v.inode == identity.ino
            && v.dev == identity.dev
            && object
                .text_segments
                .iter()
                .any(|s| s.intersect(v.range()).is_some())
    });
    maps_it.then_some(ObjectFile { file, identity })
}

/// What the cache needs to know about one range: whether an image built from
/// the file holds its bytes, and where each piece comes from in the file.
fn range_facts(
    req: &SwapRange,
    object: &LoadedObject,
    file: Option<&ObjectFile>,
    vmas: &[Vma],
) -> (RangeFacts, Vec<Piece>) {
    let phase_stable = object.bias % huge_page() == 0;
    let fail = |why| {
        (
            RangeFacts {
                cacheable: Err(why),
                phase_stable,
            },
            Vec::new(),
        )
    };
    let Some(file) = file else {
        return fail(NotCacheable::FileNotMapped);
    };
    if object.text_relocations {
        return fail(NotCacheable::TextRelocations);
    }
    let mut pieces = Vec::with_capacity(req.pieces.len());
    for p in req.pieces.iter().filter_map(|p| p.intersect(req.range)) {
        let Some(v) = vmas.iter().find(|v| v.start <= p.start && p.end <= v.end) else {
            return fail(NotCacheable::NotFromFile);
        };
        if v.inode != file.identity.ino || v.dev != file.identity.dev {
            return fail(NotCacheable::NotFromFile);
        }
        pieces.push(Piece {
            at: p.start - req.range.start,
            file_offset: v.offset + (p.start - v.start),
            len: p.len(),
        });
    }
    // Written pages (relocations, breakpoints, patches) differ from the file.
    match sys::modified_file_pages(req.range.start, req.range.end) {
        Ok(written) if written.is_empty() => {}
        // Written, or the page tables could not be read: not from the file.
        _ => return fail(NotCacheable::Modified),
    }
    (
        RangeFacts {
            cacheable: Ok(()),
            phase_stable,
        },
        pieces,
    )
}

/// One way of supplying a range, tried: for real (mapped pages) or in a
/// forecast (the source it would be).
type Attempt<'a, T> = dyn FnMut(Supply, &[Piece]) -> Result<T, SwapError> + 'a;

/// Gets huge pages holding `req`'s bytes: tries each way `plan::supplies`
/// allows, in order, through `attempt`; returns the first that works, or
/// the last error. The order and the payoff rules live here once, for a
/// real run (`attempt` maps pages) and a forecast (`attempt` only says what
/// would happen) alike.
fn supply_range<T>(
    req: &SwapRange,
    object: &LoadedObject,
    file: Option<&ObjectFile>,
    vmas: &[Vma],
    ctx: &Context,
    payoff: &dyn Fn() -> Payoff,
    attempt: &mut Attempt<'_, T>,
) -> Result<T, SwapError> {
    let (facts, pieces) = range_facts(req, object, file, vmas);
    let backend = ctx.request.backend;
    // The payoff is weighed (the run history read) only where it decides
    // something: not for a range a shared image serves, unless that fails.
    let image_serves = ctx.offer.cache && facts.cacheable.is_ok() && facts.phase_stable;
    let weighed = match backend {
        Backend::Auto if !image_serves => payoff(),
        Backend::Auto => Payoff::Unknown,
        _ => Payoff::Pays,
    };
    let mut ways =
        plan::supplies(backend, ctx.offer, facts, weighed).map_err(SwapError::NoSupply)?;
    if backend == Backend::Auto && image_serves && plan::supplies_thp(ctx.offer) {
        // Should the image fail (another process builds it, the cache is
        // full), a private copy may still pay off.
        ways.push(Supply::Thp);
    }
    if req.names_program {
        ways.retain(|w| *w == Supply::Thp);
        if ways.is_empty() {
            return Err(SwapError::NoSupply(plan::NoSupply::NamesProgram));
        }
    }
    let mut last = SwapError::NoSupply(plan::NoSupply::Nothing);
    for way in ways {
        if way == Supply::Thp && backend == Backend::Auto && image_serves {
            let p = payoff();
            if p != Payoff::Pays {
                last = match last {
                    SwapError::Cache(_) => last,
                    _ => SwapError::NoSupply(plan::NoSupply::WouldNotPay(p)),
                };
                continue;
            }
        }
        match attempt(way, &pieces) {
            Ok(got) => return Ok(got),
            Err(e) => {
                crate::tlog!(
                    crate::log::Level::Debug,
                    "{}: {:#x}-{:#x}: {:?} did not serve: {e}",
                    object.path,
                    req.range.start,
                    req.range.end,
                    way
                );
                last = e;
            }
        }
    }
    Err(last)
}

/// The cache key of `req`'s image, as a file name.
fn image_name(
    req: &SwapRange,
    object: &LoadedObject,
    file: &ObjectFile,
    pieces: &[Piece],
    strategy: Strategy,
) -> String {
    ImageKey {
        file: file.identity,
        build_id: object.build_id.clone(),
        offset: req.range.start.wrapping_sub(object.bias),
        len: req.range.len(),
        phase: object.bias % huge_page(),
        layout: cache::layout_digest(pieces),
        strategy,
    }
    .file_name(&object.path)
}

/// The range's image from the cache (found, or built now), mapped r-x.
fn image_for(
    req: &SwapRange,
    object: &LoadedObject,
    file: &ObjectFile,
    pieces: &[Piece],
    cache: &Cache,
    ctx: &Context,
    shared: bool,
) -> Result<Staged, SwapError> {
    let name = image_name(req, object, file, pieces, ctx.request.strategy);
    let content = Content {
        file: file.file.as_fd(),
        identity: file.identity,
        pieces,
        len: req.range.len(),
    };
    swap::check_address_space(req.range.len() * if shared { 1 } else { 2 })?;
    let image = cache
        .get_or_build(&name, &content, shared, ctx.state(), &object.path)
        .map_err(SwapError::Cache)?;
    let mapping = image.map().map_err(SwapError::ImageMap)?;
    let source = match (shared, image.hit) {
        (true, true) => Source::CacheHit,
        (true, false) => Source::CacheBuilt,
        (false, _) => Source::Hugetlb,
    };
    let fd = sys::reopen_read_only(image.fd()).map_err(SwapError::ImageMap)?;
    Ok(Staged {
        mapping,
        fd: Some(fd),
        source,
    })
}

/// What `attempt` would get for `way`, without getting it: the image found
/// (a hit) or one that could be built (room in the cache, counting what
/// eviction could free); a copy where the machine offers its kind. Without
/// a cache (`ctx.cache` none while the offer says there is one: the
/// forecast of what `tiexec --setup` would bring) an image would be built.
fn foresee(
    way: Supply,
    req: &SwapRange,
    object: &LoadedObject,
    file: Option<&ObjectFile>,
    pieces: &[Piece],
    ctx: &Context,
) -> Result<Source, SwapError> {
    match way {
        Supply::SharedImage | Supply::PrivateImage => {
            let shared = way == Supply::SharedImage;
            let (Some(cache), Some(file)) = (ctx.cache.as_ref(), file) else {
                return if ctx.offer.cache {
                    Ok(if shared {
                        Source::CacheBuilt
                    } else {
                        Source::Hugetlb
                    })
                } else {
                    Err(SwapError::NoSupply(plan::NoSupply::NoCache))
                };
            };
            let name = image_name(req, object, file, pieces, ctx.request.strategy);
            let hit = cache
                .foresee(&name, req.range.len(), shared)
                .map_err(SwapError::Cache)?;
            Ok(match (shared, hit) {
                (true, true) => Source::CacheHit,
                (true, false) => Source::CacheBuilt,
                (false, _) => Source::Hugetlb,
            })
        }
        Supply::Pool => Ok(Source::Hugetlb),
        Supply::Thp => Ok(Source::Thp),
    }
}

/// One object's plan against the current mappings, and the report so far.
struct Planned {
    report: ObjectReport,
    swaps: Vec<SwapRange>,
    vmas: Vec<Vma>,
}

/// Plans `object`: reads the mappings (or reuses `vmas`), faults in its
/// congruent text, plans. `Err` carries the finished report when there is
/// nothing to supply.
fn plan_for(
    object: &LoadedObject,
    vmas: Option<Vec<Vma>>,
    ctx: &Context,
    started: u64,
) -> Result<Planned, Box<ObjectReport>> {
    let mut report = ObjectReport {
        path: object.path.clone(),
        bias: object.bias,
        text_bytes: object.text_bytes(),
        explicit_backend: ctx.request.backend != Backend::Auto,
        ..ObjectReport::default()
    };
    if !worth_planning(object, ctx.request.strategy) {
        report.not_attempted = Some(NotAttempted::NoWholeHugePage);
        report.elapsed_ns = sys::monotonic_ns().saturating_sub(started);
        return Err(Box::new(report));
    }
    let Ok(current) = vmas.map_or_else(|| smaps::read_maps(None), Ok) else {
        report.not_attempted = Some(NotAttempted::SmapsUnreadable);
        return Err(Box::new(report));
    };
    let plan = plan_object(object, &current, ctx.request.strategy);
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
    }
    // Only the pool: use what it has, report the rest.
    let swaps = if ctx.request.backend == Backend::Hugetlb {
        plan::split_at_budget(plan.swap, ctx.offer.pool_available)
    } else {
        plan.swap
    };
    Ok(Planned {
        report,
        swaps,
        vmas: current,
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
    let mut reports = Vec::with_capacity(objects.len());
    let mut vmas: Option<Vec<Vma>> = None;
    for object in objects {
        let started = sys::monotonic_ns();
        let planned = match plan_for(object, vmas.take(), ctx, started) {
            Ok(p) => p,
            Err(report) => {
                reports.push(*report);
                continue;
            }
        };
        let Planned {
            mut report,
            swaps,
            vmas: current,
        } = planned;
        let file = if swaps.is_empty() {
            None
        } else {
            open_object_file(object, &current)
        };
        let planned_bytes = report.planned_bytes;
        let payoff = OnceCell::new();
        let payoff = || *payoff.get_or_init(|| ctx.payoff(planned_bytes));
        for req in &swaps {
            if req.in_place && in_place_works {
                report.swapped.push((req.range, Source::PageCache));
                continue;
            }
            let mut attempt = |way: Supply, pieces: &[Piece]| {
                foresee(way, req, object, file.as_ref(), pieces, ctx)
            };
            match supply_range(
                req,
                object,
                file.as_ref(),
                &current,
                ctx,
                &payoff,
                &mut attempt,
            ) {
                Ok(source) => report.swapped.push((req.range, source)),
                Err(e) => report.failed.push((req.range, e)),
            }
        }
        one_reason_for_all(&mut report);
        report.after = coverage_from_results(object, &report);
        report.elapsed_ns = sys::monotonic_ns().saturating_sub(started);
        vmas = Some(current);
        reports.push(report);
    }
    reports
}

/// Runs plan, swap and verify for each object, in order.
///
/// # Safety
/// The objects must stay loaded for the whole call, and no thread may run
/// code in their text meanwhile: either the process has one thread, or the
/// objects were just mapped and none of their code can have been reached
/// yet (the loader's audit hook). Text is replaced in place with identical
/// bytes.
pub unsafe fn remap_objects(objects: &[LoadedObject], ctx: &Context) -> Vec<ObjectReport> {
    let mut reports = Vec::with_capacity(objects.len());
    let mut vmas: Option<Vec<Vma>> = None;
    for object in objects {
        let started = sys::monotonic_ns();
        let planned = match plan_for(object, vmas.take(), ctx, started) {
            Ok(p) => p,
            Err(report) => {
                reports.push(*report);
                continue;
            }
        };
        let Planned {
            mut report,
            swaps,
            vmas: current,
        } = planned;
        if !swaps.is_empty() {
            let file = open_object_file(object, &current);
            let planned_bytes = report.planned_bytes;
            let payoff = OnceCell::new();
            let payoff = || *payoff.get_or_init(|| ctx.payoff(planned_bytes));
            let mut supply = |req: &SwapRange| {
                let mut attempt = |way: Supply, pieces: &[Piece]| match way {
                    Supply::SharedImage | Supply::PrivateImage => {
                        match (ctx.cache.as_ref(), file.as_ref()) {
                            (Some(cache), Some(file)) => image_for(
                                req,
                                object,
                                file,
                                pieces,
                                cache,
                                ctx,
                                way == Supply::SharedImage,
                            ),
                            _ => Err(SwapError::NoSupply(plan::NoSupply::NoCache)),
                        }
                    }
                    Supply::Pool => swap::pool_copy(req),
                    Supply::Thp => swap::thp_copy(req),
                };
                supply_range(
                    req,
                    object,
                    file.as_ref(),
                    &current,
                    ctx,
                    &payoff,
                    &mut attempt,
                )
            };
            // SAFETY: the ranges come from the plan: 2 MiB aligned, made of
            // r-x private text of a loaded object and, when aggressive,
            // read-only pages of the same object or unmapped space; they do
            // not overlap. Every supply holds the range's bytes: copies are
            // made from the live text, images from the very file mapped,
            // only for ranges whose pages are all the file's. The caller
            // guarantees no thread runs this text meanwhile.
            let results = unsafe { swap::swap_ranges(&swaps, &mut supply, ctx.offer.mdwe) };
            for r in results {
                if report.in_place_error.is_none() {
                    report.in_place_error = r.in_place_error;
                }
                match (r.result, r.source) {
                    (Ok(()), Some(source)) => {
                        if matches!(
                            source,
                            Source::CacheHit | Source::CacheBuilt | Source::Hugetlb
                        ) {
                            // hugetlb pages cannot be split: a later
                            // mprotect of part of them needs tiexec's help.
                            crate::interpose::register(r.range);
                        }
                        report.swapped.push((r.range, source))
                    }
                    (Err(e), _) => report.failed.push((r.range, e)),
                    (Ok(()), None) => {}
                }
            }
        }
        one_reason_for_all(&mut report);
        // Verify: what counts is what the kernel says now, when anyone is
        // going to look.
        let changed = !report.swapped.is_empty();
        if ctx.verify {
            match smaps::read(None) {
                Ok(after) => report.after = coverage_of(object, &after),
                Err(_) => report.not_attempted = Some(NotAttempted::SmapsUnreadable),
            }
        } else {
            report.after = coverage_from_results(object, &report);
        }
        vmas = if changed { None } else { Some(current) };
        report.elapsed_ns = sys::monotonic_ns().saturating_sub(started);
        reports.push(report);
    }
    reports
}
