//! One process's session with tiexec, for every way in (the preload
//! constructor, the audit hook, the linked-in library and its Rust API, the
//! forecast of `tiexec --check`):
//!
//! - [`Refusal`]: the one list of reasons to leave a process alone;
//! - [`targets`]: the objects with text worth planning;
//! - [`open_context`]: the pipeline's context (cache, offer, the program, who
//!   asked for it);
//! - [`after_swap`]: the log lines, mapping names, perf map and JSON report;
//! - the run record: a start line now, an end line at exit (or `_exit`, or
//!   when the process `exec`s another program under tiexec), and the hot map
//!   measured at exit (see `history`, `hotmap`).
//!
//! Data flows one way: the session calls the pipeline, never the reverse.

use std::ffi::CString;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Mutex, OnceLock};

use crate::config::{self, Backend};
use crate::context::{Context, Origin, Program, Request, NAMED_PID_VAR};
use crate::discover::{self, LoadedObject};
use crate::history::{self, Arm, Start};
use crate::hotmap::Measurement;
use crate::log::{self, Level};
use crate::range::Range;
use crate::report::ObjectReport;
use crate::state::StateDir;
use crate::{pipeline, select, sys};

/// Why tiexec leaves a process's text as it is. One list, checked in this
/// order by every way in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The backend is `off`.
    Off,
    /// The kernel's page sizes are not ones tiexec handles.
    PageSizes(crate::pagesize::Unsupported),
    /// `RLIMIT_AS` leaves too little room to work.
    AddressSpace {
        /// Bytes the process could still map.
        headroom: u64,
    },
    /// A secure-execution process (setuid, setgid, file capabilities).
    SecureExecution,
    /// More than one thread runs.
    Threads(u64),
    /// The threads cannot be counted.
    ThreadsUnknown,
}

impl Refusal {
    /// The checks that need no allocation and no /proc read (the
    /// constructor makes them before anything else).
    pub fn before_selection(backend: Backend) -> Option<Refusal> {
        if backend == Backend::Off {
            return Some(Refusal::Off);
        }
        if let Some(headroom) = discover::address_space_headroom() {
            if headroom < crate::staging::ADDRESS_SPACE_MARGIN {
                return Some(Refusal::AddressSpace { headroom });
            }
        }
        if let Err(why) = crate::pagesize::current_supported() {
            return Some(Refusal::PageSizes(why));
        }
        None
    }

    /// The checks made once there is something to move.
    pub fn after_selection() -> Option<Refusal> {
        if sys::secure_execution() {
            return Some(Refusal::SecureExecution);
        }
        match discover::thread_count() {
            Some(1) => None,
            Some(n) => Some(Refusal::Threads(n)),
            None => Some(Refusal::ThreadsUnknown),
        }
    }

    /// Every check, in order.
    pub fn any(backend: Backend) -> Option<Refusal> {
        Refusal::before_selection(backend).or_else(Refusal::after_selection)
    }

    /// How loud: what an explicit backend asked for and cannot get is a
    /// warning; the rest is information.
    pub fn level(self, backend: Backend) -> Level {
        match self {
            Refusal::AddressSpace { .. } | Refusal::PageSizes(_) if backend != Backend::Auto => {
                Level::Warn
            }
            Refusal::Off => Level::Debug,
            _ => Level::Info,
        }
    }
}

impl core::fmt::Display for Refusal {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Refusal::Off => write!(f, "backend off"),
            Refusal::PageSizes(why) => write!(f, "{why}"),
            Refusal::AddressSpace { headroom } => write!(
                f,
                "address-space limit (RLIMIT_AS) leaves only {}",
                log::Bytes(*headroom)
            ),
            Refusal::SecureExecution => {
                write!(
                    f,
                    "secure-execution process (setuid, setgid or capabilities)"
                )
            }
            Refusal::Threads(n) => write!(f, "{n} threads already running"),
            Refusal::ThreadsUnknown => write!(f, "cannot count threads"),
        }
    }
}

/// The objects of `objects` whose text is worth planning under `config`
/// (one line at debug, or info for the main program, for each other).
/// `tiexec_at`: an address in tiexec's own code, whose object is left alone
/// unless tiexec is linked into the main program (`linked_in`: its code is
/// then part of the program's text, and the swap routine runs from a page
/// of its own).
pub fn targets(
    objects: &[LoadedObject],
    config: &config::Config<'_>,
    tiexec_at: u64,
    linked_in: bool,
) -> Vec<LoadedObject> {
    let mut targets = Vec::new();
    for object in objects {
        let path = object.path.as_bytes();
        let is_tiexec = object.contains(tiexec_at) && !(linked_in && object.is_main);
        match select::select(path, object.text_bytes(), is_tiexec, config) {
            Ok(()) if pipeline::worth_planning(object, config.strategy) => {
                targets.push(object.clone())
            }
            Ok(()) => crate::tlog!(
                if object.is_main {
                    Level::Info
                } else {
                    Level::Debug
                },
                "{}: text {} holds no whole {} page: nothing to do",
                object.path,
                log::Bytes(object.text_bytes()),
                crate::pagesize::huge_page_name()
            ),
            Err(why) => crate::tlog!(
                Level::Debug,
                "{}: left alone: {}",
                object.path,
                why.describe()
            ),
        }
    }
    targets
}

/// Who asked for this process's text, from the environment's marker.
pub fn origin_from_env(env: &config::EnvSnapshot) -> Origin {
    Origin::from_marker(env.get(NAMED_PID_VAR), std::process::id())
}

/// The pipeline's context for this process: the cache named by the settings
/// (one line at info when it is there but cannot be used), what the machine
/// offers, the program and who asked for it.
pub fn open_context(
    config: &config::Config<'_>,
    program: String,
    origin: Origin,
    verify: bool,
) -> Context {
    use std::os::unix::ffi::OsStrExt;
    let request = Request {
        backend: config.backend,
        strategy: config.strategy,
    };
    let root = match config.cache {
        config::CachePath::Default => Some(std::path::Path::new(crate::cache::DEFAULT_ROOT)),
        config::CachePath::Off => None,
        config::CachePath::At(p) => Some(std::path::Path::new(std::ffi::OsStr::from_bytes(p))),
    };
    let verify = verify || log::enabled(Level::Info) || config.report.is_some();
    let (ctx, why) = Context::new(request, root, Program::new(program, origin), verify);
    match why {
        None | Some(crate::cache::Unusable::Off) => {}
        // Not set up where nobody said to look: the common case, no news.
        Some(crate::cache::Unusable::NotSetUp) if config.cache == config::CachePath::Default => {
            crate::tlog!(Level::Debug, "no image cache set up (tiexec --setup)")
        }
        Some(why) => crate::tlog!(
            Level::Info,
            "image cache {} not used: {why}",
            root.map(|r| r.display().to_string()).unwrap_or_default()
        ),
    }
    ctx
}

/// What follows a swap, for every way in: one line per object, names for
/// the anonymous ranges, the perf map and the JSON report when asked (the
/// report only once per process: `write_report`).
pub fn after_swap(
    objects: &[LoadedObject],
    reports: &[ObjectReport],
    config: &config::Config<'_>,
    write_report: bool,
) {
    for (object, r) in objects.iter().zip(reports) {
        r.log();
        crate::profiling::name_swapped_ranges(&object.path, &r.swapped);
        if config.perf_map {
            match crate::profiling::append_perf_map(&object.path, object.bias, &r.swapped) {
                Ok(0) => {}
                Ok(n) => crate::tlog!(
                    Level::Info,
                    "{}: {n} functions written to /tmp/perf-{}.map",
                    object.path,
                    std::process::id()
                ),
                Err(e) => crate::tlog!(Level::Warn, "perf map not written: {e}"),
            }
        }
    }
    if let (true, Some(target)) = (write_report, config.report) {
        if let Err(e) = crate::report::write_json(target, reports) {
            crate::tlog!(Level::Warn, "report not written: {e}");
        }
    }
}

/// One line at info saying whether this process copies, and why (the rule
/// and its figures).
pub fn log_decision(ctx: &Context) {
    if let Some(d) = ctx.decision() {
        crate::tlog!(Level::Info, "{}: {d}", ctx.program.path);
    }
}

// --- The run record ---------------------------------------------------------

/// The run this process records, for its end line: what `_exit` may read
/// without allocating or locking.
struct Recorder {
    /// The run record's path, NUL-terminated.
    path: CString,
    /// This process and its start time.
    pid: u32,
    ticks: u64,
    /// When it started (monotonic ns).
    started_ns: u64,
    /// The arm it took ([`Arm::letter`]).
    arm: AtomicU8,
    /// The end line was written.
    done: AtomicBool,
}

static RECORDER: OnceLock<Recorder> = OnceLock::new();

/// What the exit handler measures for the hot map (normal exit only).
struct HotPlan {
    state: std::path::PathBuf,
    program: String,
    objects: Vec<HotObject>,
}

struct HotObject {
    path: String,
    identity: u64,
    bias: u64,
    text: Vec<Range>,
    replaced: Vec<Range>,
}

static HOT_PLAN: Mutex<Option<HotPlan>> = Mutex::new(None);
static EXIT_REGISTERED: AtomicBool = AtomicBool::new(false);

/// The environment variable that tells a program `exec`ed by a recorded
/// process (same PID) that its predecessor's run ended there: `PID TICKS
/// START_NS ARM PATH`.
const RUN_VAR: &core::ffi::CStr = c"TIEXEC_RUN";

/// Records that this process's run started (a start line in the program's
/// run record, see `history`), with the arm decided, and arranges for its
/// end line at exit, at `_exit`, or at an `exec` of a program under tiexec.
/// Once per process; best effort (a record that cannot be written only
/// means less is remembered).
///
/// # Safety
/// No other thread may run (it sets [`RUN_VAR`] in the environment).
pub unsafe fn begin_run(ctx: &Context, arm: Arm) {
    if RECORDER.get().is_some() {
        return;
    }
    let Some(state) = ctx.state() else {
        return;
    };
    let pid = std::process::id();
    let Some(ticks) = sys::process_start_ticks(pid) else {
        return;
    };
    let started_ns = sys::monotonic_ns();
    let start = Start { pid, ticks, arm };
    let mut buf = [0u8; 64];
    let n = history::start_line(start, &mut buf);
    let rate = ctx.history().rate_us_per_mib;
    if state
        .append_run_line(&ctx.program.path, buf.get(..n).unwrap_or(&[]), rate)
        .is_err()
    {
        return;
    }
    let path = state.runs_path(&ctx.program.path);
    let Ok(path_c) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return;
    };
    let recorder = Recorder {
        path: path_c,
        pid,
        ticks,
        started_ns: process_start_ns().unwrap_or(started_ns),
        arm: AtomicU8::new(arm.letter()),
        done: AtomicBool::new(false),
    };
    if RECORDER.set(recorder).is_err() {
        return;
    }
    // SAFETY: the caller's promise.
    unsafe { set_run_var(arm) };
    crate::interpose::on_exit_now(end_run_now);
    if !EXIT_REGISTERED.swap(true, Ordering::AcqRel) {
        // SAFETY: registers a plain function that never unwinds (see below).
        unsafe { libc::atexit(at_exit) };
    }
}

/// When this process started, as monotonic ns (its age subtracted from now):
/// the lifetime counts from exec, not from the constructor.
fn process_start_ns() -> Option<u64> {
    let age_ms = discover::process_age_ms()?;
    Some(sys::monotonic_ns().saturating_sub(age_ms.saturating_mul(1_000_000)))
}

/// The arm the run took in the end: `Copy` when any of its text was moved.
///
/// # Safety
/// No other thread may run (see [`begin_run`]).
pub unsafe fn run_took(arm: Arm) {
    if let Some(r) = RECORDER.get() {
        r.arm.store(arm.letter(), Ordering::Release);
        // SAFETY: the caller's promise.
        unsafe { set_run_var(arm) };
    }
}

/// # Safety
/// No other thread may run.
unsafe fn set_run_var(arm: Arm) {
    let Some(r) = RECORDER.get() else {
        return;
    };
    let mut value = format!(
        "{} {} {} {} ",
        r.pid,
        r.ticks,
        r.started_ns,
        char::from(arm.letter())
    )
    .into_bytes();
    value.extend_from_slice(r.path.as_bytes());
    // SAFETY: the caller's promise.
    unsafe { crate::env::set(RUN_VAR, Some(&value)) };
}

/// Notes what the exit handler should measure for the hot map: the targets'
/// text, less what was replaced.
pub fn plan_hot_measurement(ctx: &Context, objects: &[LoadedObject], reports: &[ObjectReport]) {
    let Some(state) = ctx.state() else {
        return;
    };
    let hot_objects: Vec<HotObject> = objects
        .iter()
        .filter(|o| ctx.copies_hot_only() && !ctx.image_likely(o))
        .map(|o| HotObject {
            path: o.path.clone(),
            identity: o.identity_digest(),
            bias: o.bias,
            text: o.text_segments.clone(),
            replaced: reports
                .iter()
                .find(|r| r.path == o.path && r.bias == o.bias)
                .map(|r| r.swapped.iter().map(|(range, _)| *range).collect())
                .unwrap_or_default(),
        })
        .collect();
    if hot_objects.is_empty() {
        return;
    }
    if let Ok(mut plan) = HOT_PLAN.lock() {
        *plan = Some(HotPlan {
            state: state.path().to_path_buf(),
            program: ctx.program.path.clone(),
            objects: hot_objects,
        });
    }
}

/// The end line, written now: from `_exit` (through the interposer) and
/// from the exit handler. Allocates nothing and takes no lock: `_exit` may
/// be called from a signal handler, or in a child sharing our memory
/// (`vfork`), where only this PID's run may be recorded.
extern "C" fn end_run_now() {
    let Some(r) = RECORDER.get() else {
        return;
    };
    // SAFETY: getpid has no preconditions.
    if unsafe { libc::getpid() } as u32 != r.pid || r.done.swap(true, Ordering::AcqRel) {
        return;
    }
    let ms = sys::monotonic_ns().saturating_sub(r.started_ns) / 1_000_000;
    let arm = if r.arm.load(Ordering::Acquire) == Arm::Copy.letter() {
        Arm::Copy
    } else {
        Arm::Plain
    };
    let start = Start {
        pid: r.pid,
        ticks: r.ticks,
        arm,
    };
    let mut buf = [0u8; 64];
    let n = history::end_line(start, u32::try_from(ms).unwrap_or(u32::MAX), arm, &mut buf);
    let _ = sys::append_to_path(&r.path, buf.get(..n).unwrap_or(&[]));
}

extern "C" fn at_exit() {
    let _ = std::panic::catch_unwind(|| {
        end_run_now();
        measure_hot_map();
    });
}

/// Folds this run's touched text into the program's hot map: the present
/// 4 KiB pages of each target's text still on its file's small pages.
fn measure_hot_map() {
    let Some(plan) = HOT_PLAN.lock().ok().and_then(|mut p| p.take()) else {
        return;
    };
    if RECORDER.get().is_some_and(|r| r.pid != std::process::id()) {
        return; // a forked child exits: not the run that planned this
    }
    let Ok(state) = StateDir::open(&plan.state) else {
        return;
    };
    let mut map = state.hot_map(&plan.program);
    let before = map.clone();
    for o in &plan.objects {
        let link =
            |r: Range| Range::new(r.start.saturating_sub(o.bias), r.end.saturating_sub(o.bias));
        let measured_abs: Vec<Range> = o
            .text
            .iter()
            .flat_map(|t| subtract(*t, &o.replaced))
            .collect();
        let mut measured = Vec::new();
        let mut present = Vec::new();
        for m in &measured_abs {
            match sys::present_small_pages(m.start, m.end) {
                Ok((small, huge)) => {
                    // Huge pages (the page cache's) are not measured.
                    for part in subtract(*m, &huge) {
                        measured.push(link(part));
                    }
                    present.extend(small.into_iter().map(link));
                }
                Err(_) => continue,
            }
        }
        let text: Vec<Range> = o.text.iter().map(|r| link(*r)).collect();
        map.merge(&Measurement {
            path: &o.path,
            identity: o.identity,
            text: &text,
            measured: &measured,
            present: &present,
        });
    }
    // Runs of one program mostly touch the same text: an unchanged map is
    // not rewritten (a record replaced costs ~0.5 ms on ext4).
    if !map.same_as(&before) {
        let _ = state.write_hot_map(&plan.program, &map);
    }
}

/// `range` less every part of `holes`.
fn subtract(range: Range, holes: &[Range]) -> Vec<Range> {
    let mut out = vec![range];
    for h in holes {
        out = out
            .into_iter()
            .flat_map(|r| {
                if r.intersect(*h).is_none() {
                    return vec![r];
                }
                [
                    Range::new(r.start, h.start.max(r.start)),
                    Range::new(h.end.min(r.end), r.end),
                ]
                .into_iter()
                .filter(|x| !x.is_empty())
                .collect()
            })
            .collect();
    }
    out
}

/// When this process is a program `exec`ed by a recorded process under
/// tiexec (the same PID, [`RUN_VAR`] naming it), writes the end line of its
/// predecessor's run (which lived until now), and forgets the variable.
///
/// # Safety
/// No other thread may run (it changes the environment).
pub unsafe fn end_predecessor_run(value: &[u8]) {
    let mut words = value.splitn(5, |&b| b == b' ');
    let mut number = || std::str::from_utf8(words.next()?).ok()?.parse::<u64>().ok();
    let (Some(pid), Some(ticks), Some(started_ns)) = (number(), number(), number()) else {
        return;
    };
    let arm = match words.next() {
        Some(b"c") => Arm::Copy,
        _ => Arm::Plain,
    };
    let Some(path) = words.next() else {
        return;
    };
    if pid != u64::from(std::process::id()) {
        return; // inherited by a child: not ours to end
    }
    let Ok(path) = CString::new(path) else {
        return;
    };
    let ms = sys::monotonic_ns().saturating_sub(started_ns) / 1_000_000;
    let start = Start {
        pid: pid as u32,
        ticks,
        arm,
    };
    let mut buf = [0u8; 64];
    let n = history::end_line(start, u32::try_from(ms).unwrap_or(u32::MAX), arm, &mut buf);
    let _ = sys::append_to_path(&path, buf.get(..n).unwrap_or(&[]));
    // SAFETY: the caller's promise.
    unsafe { crate::env::set(RUN_VAR, None) };
}

/// Marks this process as the one the user named, for its children, when no
/// one did (a hand-made `LD_PRELOAD`): they are then children.
///
/// # Safety
/// No other thread may run (it changes the environment).
pub unsafe fn mark_named_for_children(env_has_marker: bool) {
    if env_has_marker {
        return;
    }
    let pid = std::process::id().to_string();
    // SAFETY: the caller's promise.
    unsafe { crate::env::set(c"TIEXEC_NAMED_PID", Some(pid.as_bytes())) };
}

/// Whether the session's arm counts as a copy: some of the text moved.
pub fn arm_of(reports: &[ObjectReport]) -> Arm {
    if reports.iter().any(|r| !r.swapped.is_empty()) {
        Arm::Copy
    } else {
        Arm::Plain
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subtracting_ranges() {
        let m = crate::pagesize::huge_page();
        let r = Range::new(0, 4 * m);
        assert_eq!(
            subtract(r, &[Range::new(m, 2 * m)]),
            [Range::new(0, m), Range::new(2 * m, 4 * m)]
        );
        assert_eq!(subtract(r, &[r]), []);
        assert_eq!(subtract(r, &[Range::new(8 * m, 9 * m)]), [r]);
    }

    #[test]
    fn refusals_come_in_one_order() {
        assert_eq!(Refusal::any(Backend::Off), Some(Refusal::Off));
        assert_eq!(Refusal::Off.level(Backend::Off), Level::Debug);
        assert_eq!(Refusal::Threads(3).to_string(), "3 threads already running");
    }
}
