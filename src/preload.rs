//! The constructor of `libtiexec.so`: runs before `main` of any program it is
//! preloaded into.
//!
//! What it may not do: panic or unwind into the loader (everything runs under
//! `catch_unwind`), stop the program, write to stdout, or act when acting is
//! unsafe. Whatever happens, the program runs on with its text byte for byte
//! as it was, at the same addresses.
//!
//! Steps, each of which may end the run with one log line:
//! 1. In the copy loaded as an audit module, stop (it serves the hooks). If
//!    tiexec is linked into the main program itself (libtiexec.a, or a Rust
//!    dependency), go on only when built with the `constructor` feature.
//! 2. Read the settings; report bad values, use the defaults; stop if `off`.
//! 3. Stop if `RLIMIT_AS` leaves too little room to work. (Steps 1 to 3
//!    allocate nothing: an allocation failure would abort the program.)
//! 4. With `TIEXEC_CHILDREN=0`, remove this library from `LD_PRELOAD`.
//!    Select the objects (the main program and its libraries, less the vDSO,
//!    tiexec itself and what the filters leave out) that hold text worth
//!    moving; most processes stop here.
//! 5. Stop if the process is in secure-execution mode or more than one
//!    thread runs; else run the pipeline and log one line per object.

use crate::config::{self, Backend};
use crate::discover;
use crate::log::{self, Level};
use crate::remap;
use crate::select;
use crate::sys;

#[ctor::ctor(unsafe)]
fn tiexec_preload_constructor() {
    // A panic must never cross into the loader; the program goes on either way.
    if std::panic::catch_unwind(run).is_err() {
        crate::tlog!(Level::Error, "internal error; program left as it was");
    }
}

/// Where the constructor's own code lives (for telling cdylib from static use).
fn own_address() -> u64 {
    tiexec_preload_constructor as *const () as usize as u64
}

fn run() {
    let started = crate::sys::monotonic_ns();
    // Steps 1 to 3 allocate nothing: under a tight address-space limit even
    // a small allocation could fail, and in Rust that aborts.

    // Step 1: the copy loaded as an audit module (its own namespace) only
    // serves the audit hooks. A copy linked into the program itself
    // (libtiexec.a, or a Rust dependency) acts only when built with the
    // `constructor` feature.
    if !in_base_namespace() {
        return;
    }
    // `tiexec --check`: the same settings, selection and plan as a run
    // (below), nothing moved; the process ends here, before the program's
    // own initializers and main.
    if crate::forecast::wanted() {
        let status = std::panic::catch_unwind(crate::forecast::run_in_constructor)
            .unwrap_or(crate::forecast::FAILED);
        // SAFETY: ends the process at once: no atexit handler, no
        // destructor, nothing more of the program runs.
        unsafe { libc::_exit(status) };
    }
    let linked_in = linked_into_main_program();
    if linked_in && !cfg!(feature = "constructor") {
        return;
    }
    // The program's mprotect calls go through tiexec's (see `interpose`):
    // find the one they would have reached, or have the wrapper's stub
    // (which defines the program's) call ours.
    crate::interpose::resolve_next();
    crate::interpose::attach_to_stub();

    // Step 2: settings.
    let parsed = settings_in_place();
    log::set_level(parsed.config.log);
    crate::fault::set(parsed.config.fault);
    for bad in parsed.bad.iter().flatten() {
        crate::tlog!(
            Level::Warn,
            "{}={:?}: expected {}; using the default",
            bad.var,
            EscapedBytes(bad.value),
            bad.expected
        );
    }
    let config = parsed.config;
    if config.backend == Backend::Off {
        crate::tlog!(Level::Debug, "backend off: nothing done");
        return;
    }

    // Step 3: room to work at all.
    if let Some(headroom) = discover::address_space_headroom() {
        if headroom < crate::swap::ADDRESS_SPACE_MARGIN {
            crate::tlog!(
                if config.backend == Backend::Auto {
                    Level::Info
                } else {
                    Level::Warn
                },
                "address-space limit (RLIMIT_AS) leaves only {}: left alone",
                log::Bytes(headroom)
            );
            return;
        }
    }

    // Page sizes: base pages of 4, 16 or 64 KiB, whose PMD-level page the
    // swap uses (see `pagesize`); from AT_PAGESZ, no system call.
    if let Err(why) = crate::pagesize::current_supported() {
        crate::tlog!(
            if config.backend == Backend::Auto {
                Level::Info
            } else {
                Level::Warn
            },
            "{why}: left alone"
        );
        return;
    }

    // What children inherit (allocates: after the check above).
    prepare_environment_for_children(config.children);
    let objects = discover::loaded_objects();

    // Step 4: the objects with text worth moving.
    let targets = targets(&objects, &config, linked_in);
    if targets.is_empty() {
        return;
    }

    // Step 5: refusals (after the selection: most processes have nothing
    // to move and stop there, without reading /proc).
    if sys::secure_execution() {
        crate::tlog!(
            Level::Info,
            "secure-execution process (setuid, setgid or capabilities): left alone"
        );
        return;
    }
    match discover::thread_count() {
        Some(1) => {}
        Some(n) => {
            crate::tlog!(Level::Info, "{n} threads already running: text left alone");
            return;
        }
        None => {
            crate::tlog!(Level::Info, "cannot count threads: text left alone");
            return;
        }
    }

    let request = remap::Request {
        backend: config.backend,
        strategy: config.strategy,
    };
    let program = objects.first().map(|o| o.path.clone()).unwrap_or_default();
    let ctx = context(request, &config, program, false);
    // Step 6: a short-lived program without a cache copies nothing: stop
    // here, before reading the mappings and planning, unless someone will
    // read what the plan says (info logging, a report). Costs tiexec adds to
    // a 50 ms compiler process are what this saves.
    if !ctx.verify && ctx.copies_cannot_pay() {
        lifetime::record_at_exit(&ctx.program, started, ctx.runs_known());
        return;
    }
    // SAFETY: one thread (checked above, and nothing here starts one); the
    // objects stay loaded: nothing can dlclose them while we run.
    let reports = unsafe { remap::remap_objects(&targets, &ctx) };
    after_swap(&targets, &reports, &config, true);
    if ctx.payoff_weighed.get() {
        // A private copy was weighed against how long this program runs:
        // record how long this run lasts, for the next one.
        lifetime::record_at_exit(&ctx.program, started, ctx.runs_known());
    }
}

/// The settings, read from the environment in place (no allocation: under a
/// tight address-space limit even a small one could fail, and abort).
fn settings_in_place() -> config::Parsed<'static> {
    config::parse(|name| {
        let mut buf = [0u8; 32];
        let bytes = name.as_bytes();
        let slot = buf.get_mut(..bytes.len())?;
        slot.copy_from_slice(bytes);
        // `buf` is zeroed past the name: NUL-terminated.
        let c = core::ffi::CStr::from_bytes_until_nul(&buf).ok()?;
        env_in_place(c)
    })
}

/// One variable, read in place (see [`settings_in_place`]).
fn env_in_place(name: &core::ffi::CStr) -> Option<&'static [u8]> {
    // SAFETY: the constructor runs before main, in the thread that loaded
    // the program. Its own changes (`prepare_environment_for_children`)
    // come later and never free a string getenv returned (glibc's setenv
    // and unsetenv keep replaced strings alive). A thread started by an
    // earlier library initializer could race with it, as it could with
    // glibc's own getenv calls at this point; such threads are rare, and
    // once counted they make the constructor leave the text alone.
    unsafe { crate::sys::getenv_bytes(name) }
}

/// The objects of `objects` whose text is worth planning under `config`
/// (one line at debug, or info for the main program, for each other).
/// When linked in (`linked_in`), tiexec's code is part of the program's
/// text: the trampoline runs from its own page, so that text is fair game.
pub(crate) fn targets(
    objects: &[discover::LoadedObject],
    config: &config::Config<'_>,
    linked_in: bool,
) -> Vec<discover::LoadedObject> {
    let me = own_address();
    let mut targets = Vec::new();
    for object in objects {
        let path = object.path.as_bytes();
        let is_tiexec = object.contains(me) && !(linked_in && object.is_main);
        match select::select(path, object.text_bytes(), is_tiexec, config) {
            Ok(()) if remap::worth_planning(object, config.strategy) => {
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
                crate::range::huge_page_name()
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

/// The pipeline's context for this process: the cache named by the settings
/// (one line at info when it is there but cannot be used), what the machine
/// offers.
pub(crate) fn context(
    request: remap::Request,
    config: &config::Config<'_>,
    program: String,
    verify: bool,
) -> remap::Context {
    use std::os::unix::ffi::OsStrExt;
    let root = match config.cache {
        config::CachePath::Default => Some(std::path::Path::new(crate::cache::DEFAULT_ROOT)),
        config::CachePath::Off => None,
        config::CachePath::At(p) => Some(std::path::Path::new(std::ffi::OsStr::from_bytes(p))),
    };
    let verify = verify || log::enabled(Level::Info) || config.report.is_some();
    let (ctx, why) = remap::Context::new(request, root, program, verify);
    match why {
        None | Some(crate::cache::Unusable::Off) => {}
        // Not set up where nobody said to look: the common case, no news.
        Some(crate::cache::Unusable::NotSetUp) if config.cache == config::CachePath::Default => {
            crate::tlog!(Level::Debug, "no image cache set up (tiexec --setup)")
        }
        Some(why) => crate::tlog!(Level::Info, "image cache not used: {why}"),
    }
    ctx
}

/// How long the program runs, recorded at exit for the payoff of private
/// copies in its next runs (see `plan::payoff`).
mod lifetime {
    use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
    use std::sync::OnceLock;

    static PROGRAM: OnceLock<String> = OnceLock::new();
    static STARTED_NS: AtomicU64 = AtomicU64::new(0);
    static PID: AtomicU32 = AtomicU32::new(0);

    /// Registers the recording (once per process). Once the history is
    /// full (`known` runs), one process in four records its run: the
    /// history then follows a change of the program's lifetimes over ~32
    /// runs instead of 8, and three processes in four skip a file write.
    pub fn record_at_exit(program: &str, started_ns: u64, known: usize) {
        if known >= crate::state::RUNS_KEPT && std::process::id() % 4 != 0 {
            return;
        }
        if PROGRAM.set(program.to_string()).is_err() {
            return;
        }
        STARTED_NS.store(started_ns, Ordering::Relaxed);
        PID.store(std::process::id(), Ordering::Relaxed);
        // SAFETY: registers a plain function that never unwinds (see below).
        unsafe { libc::atexit(record) };
    }

    extern "C" fn record() {
        let _ = std::panic::catch_unwind(|| {
            // Only the process that ran the constructor: not its forked
            // children (a server's workers), which live lives of their own.
            if PID.load(Ordering::Relaxed) != std::process::id() {
                return;
            }
            let Some(program) = PROGRAM.get() else {
                return;
            };
            let ms = crate::sys::monotonic_ns().saturating_sub(STARTED_NS.load(Ordering::Relaxed))
                / 1_000_000;
            if let Some(dir) = crate::state::StateDir::open_default() {
                let _ = dir.record_run(program, u32::try_from(ms).unwrap_or(u32::MAX));
            }
        });
    }
}

/// What follows a swap, for the constructor and the audit hook alike: one
/// line per object, names for the anonymous ranges, the perf map and the JSON
/// report when asked (the report only from the constructor: one per process).
pub(crate) fn after_swap(
    objects: &[discover::LoadedObject],
    reports: &[crate::report::ObjectReport],
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

/// `RTLD_DL_LINKMAP` from <dlfcn.h> (not in the libc crate).
const RTLD_DL_LINKMAP: libc::c_int = 2;

/// True when this code is part of the main program itself (statically
/// linked in), not of a shared object: the object holding our code is the one
/// holding the program's headers (`AT_PHDR`). Allocates nothing.
fn linked_into_main_program() -> bool {
    let base_of = |addr: *const libc::c_void| {
        let mut info = libc::Dl_info {
            dli_fname: core::ptr::null(),
            dli_fbase: core::ptr::null_mut(),
            dli_sname: core::ptr::null(),
            dli_saddr: core::ptr::null_mut(),
        };
        // SAFETY: dladdr only reads the loader's tables and writes `info`.
        let found = unsafe { libc::dladdr(addr, &mut info) };
        (found != 0).then_some(info.dli_fbase)
    };
    // SAFETY: getauxval has no preconditions.
    let phdr = unsafe { libc::getauxval(libc::AT_PHDR) } as *const libc::c_void;
    match (base_of(own_address() as *const libc::c_void), base_of(phdr)) {
        (Some(ours), Some(main)) => ours == main,
        // No loader tables: a static program, which we are part of.
        _ => true,
    }
}

/// True when this copy of the library lives in the program's own link-map
/// namespace (not in the one the loader makes for audit modules).
pub(crate) fn in_base_namespace() -> bool {
    let mut info = libc::Dl_info {
        dli_fname: core::ptr::null(),
        dli_fbase: core::ptr::null_mut(),
        dli_sname: core::ptr::null(),
        dli_saddr: core::ptr::null_mut(),
    };
    let mut map: *mut libc::c_void = core::ptr::null_mut();
    // SAFETY: dladdr1 with RTLD_DL_LINKMAP stores our link map (a valid
    // handle for dlinfo) into `map`; both out-pointers are valid.
    let found = unsafe {
        libc::dladdr1(
            own_address() as *const libc::c_void,
            &mut info,
            (&mut map as *mut *mut libc::c_void).cast(),
            RTLD_DL_LINKMAP,
        )
    };
    if found == 0 || map.is_null() {
        return true; // statically linked: there is only one namespace
    }
    let mut lmid: libc::c_long = libc::LM_ID_BASE;
    // SAFETY: `map` is a link map (dlopen handle) from the loader; `lmid` is
    // a valid out-pointer of the size RTLD_DI_LMID writes.
    let ok = unsafe {
        libc::dlinfo(
            map,
            libc::RTLD_DI_LMID,
            (&mut lmid as *mut libc::c_long).cast(),
        )
    };
    ok != 0 || lmid == libc::LM_ID_BASE
}

/// Shows bytes the way `{:?}` shows a string, for bytes that may not be UTF-8.
struct EscapedBytes<'a>(&'a [u8]);

impl core::fmt::Debug for EscapedBytes<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("\"")?;
        for chunk in self.0.utf8_chunks() {
            for c in chunk.valid().chars() {
                write!(f, "{}", c.escape_debug())?;
            }
            for b in chunk.invalid() {
                write!(f, "\\x{b:02x}")?;
            }
        }
        f.write_str("\"")
    }
}

/// The path the loader used for this library (as written in LD_PRELOAD).
fn own_path() -> Option<Vec<u8>> {
    let mut info = libc::Dl_info {
        dli_fname: core::ptr::null(),
        dli_fbase: core::ptr::null_mut(),
        dli_sname: core::ptr::null(),
        dli_saddr: core::ptr::null_mut(),
    };
    // SAFETY: dladdr only reads the loader's tables and writes `info`.
    let found = unsafe { libc::dladdr(own_address() as *const libc::c_void, &mut info) };
    if found == 0 || info.dli_fname.is_null() {
        return None;
    }
    // SAFETY: dli_fname is a NUL-terminated string owned by the loader.
    Some(
        unsafe { core::ffi::CStr::from_ptr(info.dli_fname) }
            .to_bytes()
            .to_vec(),
    )
}

/// Sets (`Some`) or unsets (`None`) an environment variable.
///
/// Called only from the constructor, single-threaded, before `main`.
fn set_env(var: &core::ffi::CStr, value: Option<&[u8]>) -> bool {
    let result = match value {
        // SAFETY: single-threaded (constructor, before main); the name is
        // NUL-terminated.
        None => unsafe { libc::unsetenv(var.as_ptr()) },
        Some(v) => match std::ffi::CString::new(v) {
            // SAFETY: as above; both strings are NUL-terminated.
            Ok(value) => unsafe { libc::setenv(var.as_ptr(), value.as_ptr(), 1) },
            Err(_) => -1,
        },
    };
    result == 0
}

/// Makes the environment what the program's children should inherit (see
/// `preload_env`): `LD_AUDIT` and `GLIBC_TUNABLES` as they were before
/// `--dlopen` changed them for this program; without this library when
/// `children` is false; with ASan's link-order check off when they keep it.
fn prepare_environment_for_children(children: bool) {
    use crate::preload_env;
    if let Some(value) = env_in_place(preload_env::RESTORE_AUDIT_C) {
        if let Some((audit, tunables)) = preload_env::decode_restore(value) {
            let ok = set_env(c"LD_AUDIT", audit.as_deref())
                & set_env(c"GLIBC_TUNABLES", tunables.as_deref())
                & set_env(preload_env::RESTORE_AUDIT_C, None);
            if !ok {
                crate::tlog!(Level::Warn, "could not restore LD_AUDIT and GLIBC_TUNABLES");
            }
        }
    }
    if !children {
        // This library, and the wrapper's stub that loaded it.
        let ours: Vec<Vec<u8>> = own_path()
            .into_iter()
            .chain(crate::interpose::stub_path())
            .collect();
        for var in [c"LD_PRELOAD", c"LD_AUDIT"] {
            let Some(current) = env_in_place(var) else {
                continue;
            };
            let kept = ours
                .iter()
                .fold(current.to_vec(), |list, me| ld_preload_without(&list, me));
            let kept = (!kept.is_empty()).then_some(kept.as_slice());
            if !set_env(var, kept) {
                crate::tlog!(Level::Warn, "could not remove itself from {:?}", var);
            }
        }
        set_env(c"TIEXEC_LIB", None);
        return;
    }
    if let Some(v) = preload_env::asan_options_with_link_order(env_in_place(c"ASAN_OPTIONS")) {
        set_env(c"ASAN_OPTIONS", Some(&v));
    }
}

/// `LD_PRELOAD` (entries separated by ':' or ' ') without the entries equal
/// to `me`, joined by ':'.
pub fn ld_preload_without(list: &[u8], me: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(list.len());
    for entry in list.split(|&b| b == b':' || b == b' ') {
        if entry.is_empty() || entry == me {
            continue;
        }
        if !out.is_empty() {
            out.push(b':');
        }
        out.extend_from_slice(entry);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ld_preload_editing_keeps_the_others_in_order() {
        let me = b"/opt/t/libtiexec.so";
        assert_eq!(ld_preload_without(b"/opt/t/libtiexec.so", me), b"");
        assert_eq!(
            ld_preload_without(b"/a.so:/opt/t/libtiexec.so /b.so", me),
            b"/a.so:/b.so"
        );
        assert_eq!(ld_preload_without(b"::/a.so::", me), b"/a.so");
    }

    #[test]
    fn in_a_test_binary_the_constructor_stays_out_of_the_way() {
        // The library is linked into this test program: step 1 stops there.
        let objects = discover::loaded_objects();
        assert!(objects[0].contains(own_address()));
        assert!(linked_into_main_program());
    }

    #[test]
    fn escaped_bytes() {
        assert_eq!(format!("{:?}", EscapedBytes(b"a\xffb\n")), "\"a\\xffb\\n\"");
    }
}
