//! tiexec puts a running program's machine code (its executable segments) on
//! 2 MiB huge pages, before `main`, with no rebuild of the program.
//!
//! Three ways in:
//! - `tiexec PROGRAM ARGS...`: the CLI preloads `libtiexec.so` and execs the
//!   program (same PID, exit status and signals);
//! - `LD_PRELOAD=libtiexec.so PROGRAM`: the same, by hand;
//! - [`remap_text`]: a program that links tiexec swaps its own text.
//!
//! The pipeline, one module per step (data flows one way; addresses are
//! [`range::Range`]s):
//!
//! ```text
//!   session  ->  discover  ->  plan  ->  supply  ->  swap  ->  verify  ->  report
//!   (who asked,  (loaded      (huge     (policy,    (asm      (smaps      (one line
//!    refusals,    objects)     pages)    cache,      routine)  read back)  per object)
//!    decision)                           copies)
//! ```
//!
//! `session` runs it for each way in (`preload`, `audit`, [`remap_text`],
//! `forecast`); `pipeline` chains the steps; `context` is what they share;
//! `history` and `hotmap` are what a program's runs taught.
//!
//! Unsafe code is denied at the root and allowed, by name below, only in:
//! `sys` (syscall wrappers and the owned `sys::Mapping`), `trampoline` (the
//! asm routine and where it runs), `swap` (the only module that replaces
//! text), `pipeline` (which calls it), `discover` (the loader's callback),
//! `interpose` (the `mprotect` and `_exit` interposers), `audit` (the
//! loader's audit hooks), `env` (the environment, changed before `main`),
//! `session` (which changes it) and the constructor (`preload`); besides,
//! three functions that map files, each allowed alone (`cache`'s image
//! `map` and `build`, `profiling`'s reader of a loaded object). Planning
//! (`plan`, `policy`, `history`, `hotmap`), parsing (`config`, `smaps`),
//! the cache's bookkeeping and reporting hold none.

#![deny(unsafe_code)]
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]
// The library runs inside other people's programs: no unwrap, expect or
// panic outside tests (a panic is caught at the constructor boundary, but
// must not be how errors travel).
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::unimplemented,
        clippy::todo
    )
)]
#![warn(missing_docs)]

#[allow(unsafe_code)]
pub(crate) mod audit;
pub(crate) mod cache;
pub(crate) mod cgroup;
pub(crate) mod config;
pub(crate) mod context;
#[allow(unsafe_code)]
pub(crate) mod discover;
pub(crate) mod elf;
#[allow(unsafe_code)]
pub(crate) mod env;
pub(crate) mod fault;
pub(crate) mod forecast;
pub(crate) mod history;
pub(crate) mod hotmap;
pub(crate) mod inspect;
#[allow(unsafe_code)]
pub(crate) mod interpose;
pub(crate) mod json;
pub(crate) mod log;
pub(crate) mod pagesize;
#[allow(unsafe_code)]
pub(crate) mod pipeline;
pub(crate) mod plan;
pub(crate) mod policy;
#[allow(unsafe_code)]
pub(crate) mod preload;
pub(crate) mod preload_env;
pub(crate) mod prime;
pub(crate) mod profiling;
pub(crate) mod range;
pub(crate) mod report;
pub(crate) mod select;
#[allow(unsafe_code)]
pub(crate) mod session;
pub(crate) mod smaps;
#[allow(unsafe_code)]
pub(crate) mod staging;
pub(crate) mod state;
pub(crate) mod state_path;
#[cfg(test)]
mod stub_abi;
pub(crate) mod supply;
#[allow(unsafe_code)]
pub(crate) mod swap;
#[allow(unsafe_code)]
pub(crate) mod sys;
#[allow(unsafe_code)]
pub(crate) mod trampoline;

/// What the `tiexec` command, the tests and the benchmarks use, item by
/// item (each list is what they call; the rest stays `pub(crate)`): not a
/// stable API (names and types change with the tool). A program that
/// optimises itself uses [`remap_text`] and [`Options`]. Functions whose
/// contract the compiler cannot check are `unsafe fn`.
#[doc(hidden)]
pub mod internal {
    #[allow(missing_docs)]
    pub mod cache {
        pub use crate::cache::{
            entries_in, hugetlbfs_pages, is_hugetlbfs, is_image_path, mapped_under, parse_name,
            remove_in, user_dirs, Cache, Entry, DEFAULT_ROOT, SETTLE_NS,
        };
    }
    #[allow(missing_docs)]
    pub mod config {
        pub use crate::config::{
            check_value, parse, parse_level, parse_size, parse_switch, setting_for_flag,
            variable_names, Backend, CachePath, EnvSnapshot, Strategy, SETTINGS, VAR_BACKEND,
            VAR_LOG,
        };
    }
    #[allow(missing_docs)]
    pub mod context {
        pub use crate::context::NAMED_PID_VAR;
    }
    #[allow(missing_docs)]
    pub mod discover {
        pub use crate::discover::{
            address_space_limit, field_value, hugetlb_pool, hugetlb_pool_dir, parse_thp_mode,
            probe_file_collapse, Pool, ThpMode,
        };
    }
    #[allow(missing_docs)]
    pub mod elf {
        pub use crate::elf::{
            has_interpreter, interpreter, load_segments, program_headers, read_program_headers,
            read_type,
        };
    }
    #[allow(missing_docs)]
    pub mod fault {
        pub use crate::fault::Step;
    }
    #[allow(missing_docs)]
    pub mod forecast {
        pub use crate::forecast::{ALL_HUGE, FORMAT_VAR, IN_PLACE_VAR, SOME_LEFT, VAR};
    }
    #[allow(missing_docs)]
    pub mod history {
        pub use crate::history::{Arm, History};
    }
    #[allow(missing_docs)]
    pub mod inspect {
        pub use crate::inspect::{process_objects, ObjectStat};
    }
    #[allow(missing_docs)]
    pub mod json {
        pub use crate::json::Json;
    }
    #[allow(missing_docs)]
    pub mod log {
        pub use crate::log::{Bytes, Level, Shown};
    }
    #[allow(missing_docs)]
    pub mod pagesize {
        pub use crate::pagesize::{huge_page_name, page, PageSizes, SizeName};
    }
    #[allow(missing_docs)]
    pub mod plan {
        pub use crate::plan::{
            align_up, huge_page, plan_object, segment_pages, split, MappingView, Range, SwapRange,
        };
    }
    #[allow(missing_docs)]
    pub mod policy {
        pub use crate::policy::Source;
    }
    #[allow(missing_docs)]
    pub mod preload_env {
        pub use crate::preload_env::{asan_options_with_link_order, encode_restore, RESTORE_AUDIT};
    }
    #[allow(missing_docs)]
    pub mod prime {
        pub use crate::prime::{prime_file, text_file_ranges, State, LINK_ADVICE};
    }
    #[allow(missing_docs)]
    pub mod select {
        pub use crate::select::{glob, matches_any};
    }
    #[allow(missing_docs)]
    pub mod smaps {
        pub use crate::smaps::{coverage, parse, read};
    }
    #[allow(missing_docs)]
    pub mod state {
        pub use crate::state::{default_path, fnv1a, StateDir};
    }
    #[allow(missing_docs)]
    pub mod swap {
        pub use crate::swap::swap_ranges;
    }
    #[allow(missing_docs)]
    pub mod staging {
        pub use crate::staging::{pool_copy, thp_copy, ADDRESS_SPACE_MARGIN};
    }
    #[allow(missing_docs)]
    pub mod sys {
        pub use crate::sys::{
            can_execute, can_map_executable, effective_uid, execve, huge_mapped_ranges,
            identity_unmapped, monotonic_ns, mount_hugetlbfs, overflow_uid, real_uid, unmount,
            Errno, Mapping, Prot, MADV_POPULATE_WRITE,
        };
    }
}

pub use config::{Backend, Strategy};
pub use plan::Skip;
pub use policy::Source;
pub use range::Range;
pub use report::{NotAttempted, ObjectReport};
pub use smaps::Coverage;
pub use swap::SwapError;

/// Options for [`remap_text`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Options {
    /// Where the huge pages come from.
    pub backend: Backend,
    /// How far plans reach beyond the text.
    pub strategy: Strategy,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            backend: Backend::Auto,
            strategy: Strategy::Aggressive,
        }
    }
}

/// Why [`remap_text`] did nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// More than one thread runs; swapping text under another thread is not
    /// done.
    ThreadsRunning(u64),
    /// The thread count could not be read from /proc.
    ThreadCountUnknown,
    /// The process runs in secure-execution mode (setuid and the like).
    SecureExecution,
    /// The backend is `off`.
    Off,
    /// The kernel's page sizes are not ones Linux uses on x86_64 or arm64.
    PageSizes(pagesize::Unsupported),
    /// `RLIMIT_AS` leaves too little address space to work in.
    AddressSpaceLimit {
        /// Bytes the process could still map.
        headroom: u64,
    },
}

impl From<session::Refusal> for Error {
    fn from(r: session::Refusal) -> Error {
        use session::Refusal as R;
        match r {
            R::Off => Error::Off,
            R::PageSizes(why) => Error::PageSizes(why),
            R::AddressSpace { headroom } => Error::AddressSpaceLimit { headroom },
            R::SecureExecution => Error::SecureExecution,
            R::Threads(n) => Error::ThreadsRunning(n),
            R::ThreadsUnknown => Error::ThreadCountUnknown,
        }
    }
}

impl core::fmt::Display for Error {
    /// The refusal's own words, as a run and the forecast write them.
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        use session::Refusal as R;
        let refusal = match *self {
            Error::ThreadsRunning(n) => R::Threads(n),
            Error::ThreadCountUnknown => R::ThreadsUnknown,
            Error::SecureExecution => R::SecureExecution,
            Error::Off => R::Off,
            Error::PageSizes(why) => R::PageSizes(why),
            Error::AddressSpaceLimit { headroom } => R::AddressSpace { headroom },
        };
        write!(f, "{refusal}")
    }
}

impl std::error::Error for Error {}

impl Options {
    /// The defaults, overridden by `TIEXEC_BACKEND` and `TIEXEC_STRATEGY`
    /// where set (bad values are ignored).
    pub fn from_env() -> Options {
        let env = config::EnvSnapshot::take();
        let c = env.parse().config;
        Options {
            backend: c.backend,
            strategy: c.strategy,
        }
    }
}

/// C entry point for programs linked with `libtiexec.a`: moves the main
/// program's text to huge pages now (settings from `TIEXEC_*`, defaults
/// otherwise) and logs one line per object at `TIEXEC_LOG=info`.
///
/// Returns 0 when it ran (whatever it could move; see the log), -1 when it
/// refused (more than one thread, secure-execution mode, backend off).
/// Never panics into C.
///
/// ```c
/// int tiexec_remap_text(void);
/// ```
#[allow(unsafe_code)] // no_mangle: the C symbol
#[no_mangle]
pub extern "C" fn tiexec_remap_text() -> libc::c_int {
    let run = || {
        let env = config::EnvSnapshot::take();
        let parsed = env.parse();
        log::set_level(parsed.config.log);
        fault::set(parsed.config.fault);
        match remap_text(&Options::from_env()) {
            Ok(reports) => {
                for r in &reports {
                    r.log();
                }
                0
            }
            Err(e) => {
                tlog!(log::Level::Info, "text left as it is: {e}");
                -1
            }
        }
    };
    std::panic::catch_unwind(run).unwrap_or(-1)
}

/// Moves the main program's text to huge pages, in this process, now.
///
/// Safe to call at any time: it refuses (with an error) unless the calling
/// thread is the only one (the same refusals as the preloaded library), and
/// every failure leaves the text as it was. The reports say, per object,
/// what was moved and what the kernel now maps huge (read back from smaps).
/// The program asked for huge text: the first time it runs it gets them,
/// and its run history (as any program's) decides from then on whether a
/// private copy pays.
///
/// ```
/// // Early in main, before any thread is started:
/// match tiexec::remap_text(&tiexec::Options::default()) {
///     Ok(reports) => {
///         for r in &reports {
///             println!("{}: {} of {} bytes of text on 2 MiB pages", r.path, r.after.huge(), r.text_bytes);
///         }
///     }
///     Err(e) => eprintln!("text left on 4 KiB pages: {e}"),
/// }
/// ```
#[allow(unsafe_code)] // the call into the swap, under the checks above it
pub fn remap_text(options: &Options) -> Result<Vec<ObjectReport>, Error> {
    if let Some(why) = session::Refusal::any(options.backend) {
        return Err(why.into());
    }
    if preload::linked_into_main_program() {
        // The program's own calls to mprotect bound to ours when it was
        // linked: its text may go to hugetlb pages.
        interpose::guard_linked_program();
    }
    let objects = discover::loaded_objects();
    let main = objects.get(..1).unwrap_or(&[]);
    let env = config::EnvSnapshot::take();
    let parsed = env.parse();
    let config = config::Config {
        backend: options.backend,
        strategy: options.strategy,
        ..parsed.config
    };
    let program = main.first().map(|o| o.path.clone()).unwrap_or_default();
    // The caller reads the reports: their coverage comes from smaps.
    let ctx = session::open_context(&config, program, context::Origin::Linked, true);
    ctx.decide(main);
    session::log_decision(&ctx);
    if let Some(d) = ctx.decision() {
        // SAFETY: one thread (checked above; only this thread could start
        // another, and it is busy here).
        unsafe { session::begin_run(&ctx, d.arm) };
    }
    // SAFETY: one thread (as above); the main program stays loaded.
    let reports = unsafe { pipeline::remap_objects(main, &ctx) };
    if ctx.decision().is_some() {
        // SAFETY: one thread (as above).
        unsafe { session::run_took(session::arm_of(&reports)) };
        session::plan_hot_measurement(&ctx, main, &reports);
    }
    Ok(reports)
}
