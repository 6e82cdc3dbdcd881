//! The constructor of `libtiexec.so`: runs before `main` of any program it is
//! preloaded into.
//!
//! What it may not do: panic or unwind into the loader (everything runs under
//! `catch_unwind`), stop the program, write to stdout, or act when acting is
//! unsafe. Whatever happens, the program runs on with its text byte for byte
//! as it was, at the same addresses.
//!
//! Steps, each of which may end the run with one log line:
//! 1. In the copy loaded as an audit module, stop (it serves the hooks).
//!    Route the program's `mprotect` and `_exit` through tiexec's (see
//!    `interpose`). In a forecast (`tiexec --check`), forecast and end the
//!    process. If tiexec
//!    is linked into the main program itself (libtiexec.a, or a Rust
//!    dependency), go on only when built with the `constructor` feature.
//! 2. Read the settings; report bad values, use the defaults.
//! 3. The refusals that need nothing allocated (`session::Refusal`): off,
//!    too little address space, page sizes. (Steps 1 to 3 allocate
//!    nothing: an allocation failure would abort the program.)
//! 4. The environment children inherit; the end of the run of the program
//!    this process `exec`ed from, when that was recorded.
//! 5. Select the objects with text worth moving (the main program and its
//!    libraries, less the vDSO, tiexec itself and what the filters leave
//!    out); most processes stop here.
//! 6. The other refusals: secure execution, more than one thread.
//! 7. Decide whether this process copies (its run history, `history`), and
//!    record the run's start; where nothing can be moved, stop before
//!    reading the mappings (unless someone will read what the plan says).
//! 8. Run the pipeline; log one line per object, name and report; note the
//!    arm the run took and what to measure of its text at exit.

use crate::config;
use crate::context::Origin;
use crate::discover;
use crate::log::{self, Level};
use crate::session::{self, Refusal};

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
    // Steps 1 to 3 allocate nothing: under a tight address-space limit even
    // a small allocation could fail, and in Rust that aborts.

    // Step 1: the copy loaded as an audit module (its own namespace) only
    // serves the audit hooks. A copy linked into the program itself
    // (libtiexec.a, or a Rust dependency) acts only when built with the
    // `constructor` feature.
    if !discover::in_base_namespace_of(own_address()) {
        return;
    }
    // The program's mprotect and _exit calls go through tiexec's (see
    // `interpose`): find the ones they would have reached, or have the
    // wrapper's stub (which defines the program's) call ours. (Before the
    // forecast: whether hugetlb text would be guarded is part of its plan.)
    crate::interpose::resolve_next();
    crate::interpose::attach_to_stub();

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
    if linked_in {
        // The program's own calls to mprotect bound to ours when it was
        // linked.
        crate::interpose::guard_linked_program();
    }

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

    // Step 3: room to work at all.
    if let Some(why) = Refusal::before_selection(config.backend) {
        crate::tlog!(why.level(config.backend), "{why}: left alone");
        return;
    }

    // Step 4: what children inherit (allocates: after the check above).
    // SAFETY: the constructor runs before main, in the thread that loaded
    // the program; nothing else reads or changes the environment meanwhile.
    unsafe { prepare_environment_for_children(config.children) };
    let objects = discover::loaded_objects();

    // Step 5: the objects with text worth moving.
    let targets = session::targets(&objects, &config, own_address(), linked_in);
    if targets.is_empty() {
        return;
    }

    // Step 6: refusals (after the selection: most processes have nothing
    // to move and stop there, without reading /proc).
    if let Some(why) = Refusal::after_selection() {
        crate::tlog!(why.level(config.backend), "{why}: text left alone");
        return;
    }

    let origin = if linked_in {
        Origin::Linked
    } else {
        // SAFETY: as in step 4.
        Origin::from_marker(
            unsafe { crate::env::get(c"TIEXEC_NAMED_PID") },
            std::process::id(),
        )
    };
    let program = objects.first().map(|o| o.path.clone()).unwrap_or_default();
    let ctx = session::open_context(&config, program, origin, false);

    // Step 7: the decision, and the run's start. A process that copies
    // nothing and has no image to map stops here, before reading the
    // mappings and planning, unless someone will read what the plan says
    // (info logging, a report): costs tiexec adds to a 50 ms compiler
    // process are what this saves.
    let decision = ctx.decide(&targets);
    session::log_decision(&ctx);
    if let Some(d) = decision {
        // SAFETY: one thread (step 6), before main.
        unsafe { session::begin_run(&ctx, d.arm) };
        let images = targets.iter().any(|o| ctx.image_likely(o));
        if d.arm == crate::history::Arm::Plain && !images && !ctx.verify {
            session::plan_hot_measurement(&ctx, &targets, &[]);
            return;
        }
    }
    // Step 8: the pipeline, and what follows it.
    // SAFETY: one thread (checked above, and nothing here starts one); the
    // objects stay loaded: nothing can dlclose them while we run.
    let reports = unsafe { crate::pipeline::remap_objects(&targets, &ctx) };
    session::after_swap(&targets, &reports, &config, true);
    if decision.is_some() {
        // SAFETY: as above.
        unsafe { session::run_took(session::arm_of(&reports)) };
        session::plan_hot_measurement(&ctx, &targets, &reports);
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
    unsafe { crate::env::get(name) }
}

/// True when this code is part of the main program itself (statically
/// linked in), not of a shared object: the object holding our code is the one
/// holding the program's headers (`AT_PHDR`). Allocates nothing.
pub(crate) fn linked_into_main_program() -> bool {
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

/// Makes the environment what the program's children should inherit (see
/// `preload_env`): `LD_AUDIT` and `GLIBC_TUNABLES` as they were before
/// `--dlopen` changed them for this program; without this library when
/// `children` is false; with ASan's link-order check off when they keep it;
/// with this process marked as the one the user named, unless someone
/// (the wrapper) did. Ends the run of the program this process `exec`ed
/// from, when tiexec recorded it.
///
/// # Safety
/// No other thread may read or change the environment meanwhile.
unsafe fn prepare_environment_for_children(children: bool) {
    use crate::preload_env;
    let set_env = |var: &core::ffi::CStr, value: Option<&[u8]>| {
        // SAFETY: the caller's promise: no other thread reads or changes
        // the environment.
        unsafe { crate::env::set(var, value) }
    };
    if let Some(run) = env_in_place(c"TIEXEC_RUN") {
        let run = run.to_vec();
        // SAFETY: the caller's promise.
        unsafe { session::end_predecessor_run(&run) };
    }
    // SAFETY: the caller's promise.
    unsafe { session::mark_named_for_children(env_in_place(c"TIEXEC_NAMED_PID").is_some()) };
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
