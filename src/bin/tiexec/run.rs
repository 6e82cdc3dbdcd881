//! `tiexec [OPTIONS] PROGRAM...`: run a program with its text on 2 MiB
//! huge pages.
//!
//! A thin wrapper: it finds PROGRAM (`path`), reads its headers and those of
//! its libraries (`libs`), primes the page cache of their text where that
//! gives 2 MiB pages for free (`prime`), puts tiexec's stub into
//! `LD_PRELOAD` (`embedded`, `ldenv`: keeping what is there), sets the
//! `TIEXEC_*` variables its options stand for (`args`), and execs the
//! program: same PID, same exit status, same signals. It runs no other
//! process and reads only headers.

use std::ffi::{CString, OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::ExitCode;

use tiexec::internal::config::{self, Backend};
use tiexec::internal::log::Level;

use crate::args::{self, Args, Parsed};
use crate::ldenv;
use crate::libs;
use crate::path::{self, Linkage, Lookup};

/// Under an `RLIMIT_AS` below this, the program runs without the preload:
/// the library needs its margin (`staging::ADDRESS_SPACE_MARGIN`) beyond the
/// program and a copy of a huge page, or it refuses anyway.
pub const TIGHTEST_LIMIT: u64 = tiexec::internal::staging::ADDRESS_SPACE_MARGIN + (32 << 20);

/// Words that named tiexec's commands before they became options.
pub(crate) const FORMER_COMMANDS: [&str; 6] = ["run", "stat", "check", "prime", "setup", "cache"];

/// What to preload: the built-in stub (which loads the full library only
/// where there is work), or the library the user named (preloaded as it
/// is); and the full library (for `--dlopen`'s audit module).
struct Preload {
    preload: PathBuf,
    full: PathBuf,
    through_stub: bool,
}

fn what_to_preload(args: &Args) -> Result<Preload, String> {
    let explicit = args.library.clone().or_else(|| {
        std::env::var_os("TIEXEC_LIBRARY")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    });
    if let Some(p) = explicit {
        let full =
            std::fs::canonicalize(&p).map_err(|e| format!("library {}: {e}", p.display()))?;
        return Ok(Preload {
            preload: full.clone(),
            full,
            through_stub: false,
        });
    }
    let placed = crate::embedded::libraries().map_err(|e| e.to_string())?;
    Ok(Preload {
        preload: placed.stub,
        full: placed.full,
        through_stub: true,
    })
}

/// Runs PROGRAM (the words after `tiexec`).
pub fn main(argv: impl Iterator<Item = OsString>) -> ExitCode {
    let args = match args::parse(argv) {
        Parsed::Run(a) => a,
        Parsed::Print(text) => {
            print!("{text}");
            return ExitCode::SUCCESS;
        }
        Parsed::Usage(msg) => {
            eprintln!("tiexec: {msg}\nTry 'tiexec --help'.");
            return ExitCode::from(2);
        }
    };
    // The level the program will log at: the option, else TIEXEC_LOG.
    let level = args
        .setting(config::VAR_LOG)
        .cloned()
        .or_else(|| std::env::var_os(config::VAR_LOG))
        .and_then(|v| config::parse_level(v.as_bytes()));
    let quiet = matches!(level, Some(Level::Off | Level::Error));
    let verbose = level >= Some(Level::Info);
    let backend = args
        .setting(config::VAR_BACKEND)
        .cloned()
        .or_else(|| std::env::var_os(config::VAR_BACKEND))
        .and_then(|v| Backend::parse(v.as_bytes()));
    let shown = args.program.to_string_lossy().into_owned();
    let path = match path::find(&args.program) {
        Lookup::Found(p) => p,
        Lookup::NotFound => {
            let hint = match shown.as_str() {
                "run" => " (tiexec runs PROGRAM without a command word: tiexec PROGRAM)".into(),
                w if FORMER_COMMANDS.contains(&w) => {
                    format!(" (tiexec's own commands are options now: tiexec --{w})")
                }
                _ => String::new(),
            };
            eprintln!("tiexec: {shown}: command not found{hint}");
            return ExitCode::from(127);
        }
        Lookup::NotExecutable(p) => {
            eprintln!("tiexec: {}: Permission denied", p.display());
            return ExitCode::from(126);
        }
    };

    // The program's headers, read once: how it is linked, what it needs.
    let program = libs::read_object(&path);
    let linked = match &program {
        None => Linkage::NotElf,
        Some(o) if o.interpreter => Linkage::Dynamic,
        Some(_) => Linkage::Static,
    };
    let off = backend == Some(Backend::Off);
    let prime = !args.no_prime && !off;
    // The loader's libraries, for --dlopen's TLS (and then for priming).
    let libraries = match &program {
        Some(p) if linked == Linkage::Dynamic && args.dlopen => libs::startup_libraries(p),
        _ => Vec::new(),
    };
    if let (true, Some(p)) = (prime, &program) {
        let resolved = args.dlopen.then_some(libraries.as_slice());
        let files = crate::prime::files_to_prime(&path, p, resolved);
        crate::prime::before_exec(&files, verbose);
    }

    let mut cmd = Exec::new(&path, &args.program, &args.program_args);

    // LD_PRELOAD cannot reach a static program: do not offer it one. Under
    // an address-space limit too tight for the library to work in (it
    // would refuse), the preload would only take the room the program may
    // need: none either.
    let limit = tiexec::internal::discover::address_space_limit();
    let too_tight = limit.is_some_and(|l| l < TIGHTEST_LIMIT);
    if too_tight && verbose && !off {
        eprintln!(
            "tiexec: address-space limit (ulimit -v) of {}: too little for tiexec to work in; running {shown} without it",
            tiexec::internal::log::Bytes(limit.unwrap_or(0))
        );
    }
    let preload = linked != Linkage::Static && !off && !too_tight;
    if !quiet {
        if linked == Linkage::Static {
            eprintln!(
                "tiexec: note: {shown} is statically linked: LD_PRELOAD cannot reach it, \
                 so it runs unchanged (link it with libtiexec.a to optimise it)"
            );
        }
        if let Ok(meta) = std::fs::metadata(&path) {
            if meta.permissions().mode() & 0o6000 != 0 {
                eprintln!(
                    "tiexec: note: {shown} is setuid/setgid: the loader ignores LD_PRELOAD \
                     for it, so it runs unchanged"
                );
            }
        }
    }

    if preload {
        match what_to_preload(&args) {
            Ok(libs) => {
                cmd.env(
                    "LD_PRELOAD",
                    ldenv::ld_list_with(std::env::var_os("LD_PRELOAD"), &libs.preload),
                );
                if libs.through_stub {
                    cmd.env("TIEXEC_LIB", &libs.full);
                }
                let lib = &libs.full;
                // See tiexec::internal::preload_env: ASan programs must accept the
                // preload; the library does the same for PROGRAM's children.
                let asan = std::env::var_os("ASAN_OPTIONS");
                if let Some(v) = tiexec::internal::preload_env::asan_options_with_link_order(
                    asan.as_deref().map(OsStrExt::as_bytes),
                ) {
                    cmd.env("ASAN_OPTIONS", OsString::from_vec(v));
                }
                if args.dlopen {
                    // The same library, as an audit module: covers libraries
                    // loaded later with dlopen. For PROGRAM only: its
                    // constructor puts LD_AUDIT and GLIBC_TUNABLES back the
                    // way they were before PROGRAM starts anything.
                    let original_tunables = std::env::var_os("GLIBC_TUNABLES");
                    cmd.env(
                        "LD_AUDIT",
                        ldenv::ld_list_with(std::env::var_os("LD_AUDIT"), lib),
                    );
                    cmd.env(
                        tiexec::internal::preload_env::RESTORE_AUDIT,
                        tiexec::internal::preload_env::encode_restore(
                            std::env::var_os("LD_AUDIT").as_deref(),
                            original_tunables.as_deref(),
                        ),
                    );
                    if let Some(t) = ldenv::tunables_for_audit(&libraries) {
                        cmd.env("GLIBC_TUNABLES", t);
                    }
                }
            }
            Err(e) => {
                // Never stop the user's program for our sake. A library the
                // user named is their request: always said (unless logging
                // is off); where to put the built-in one is ours, and
                // another user's files must not make the program noisy:
                // said with -v.
                let named = args.library.is_some()
                    || std::env::var_os("TIEXEC_LIBRARY").is_some_and(|v| !v.is_empty());
                if verbose || (named && !quiet) {
                    eprintln!("tiexec: {e}; running {shown} without tiexec");
                }
            }
        }
    }
    for (var, value) in &args.settings {
        cmd.env(var, value);
    }
    // PROGRAM is what the user named: exec keeps this PID, so the library
    // in it knows it was asked for (its first run gets huge text), and the
    // programs it starts know they were not (see `context::Origin`).
    cmd.env(
        tiexec::internal::context::NAMED_PID_VAR,
        std::process::id().to_string(),
    );

    // exec replaces this process: on success it does not return.
    let err = cmd.exec();
    eprintln!(
        "tiexec: {}: {}",
        path.display(),
        std::io::Error::from_raw_os_error(err.0)
    );
    ExitCode::from(if err.0 == libc::ENOENT { 127 } else { 126 })
}

/// What to exec: the program, its argument vector, and the environment as
/// it is with the wrapper's changes. Built by hand rather than with
/// `std::process::Command`, whose exec resets the signal mask and
/// `SIGPIPE`'s disposition: the program must inherit everything the wrapper
/// inherited (dispositions, mask, limits, descriptors), as under `env`.
struct Exec {
    path: PathBuf,
    argv: Vec<OsString>,
    changes: Vec<(OsString, OsString)>,
}

impl Exec {
    fn new(path: &Path, argv0: &OsStr, args: &[OsString]) -> Exec {
        let mut argv = vec![argv0.to_os_string()];
        argv.extend(args.iter().cloned());
        Exec {
            path: path.to_path_buf(),
            argv,
            changes: Vec::new(),
        }
    }

    /// Sets `var` in the program's environment.
    fn env(&mut self, var: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> &mut Exec {
        let var = var.as_ref().to_os_string();
        self.changes.retain(|(k, _)| *k != var);
        self.changes.push((var, value.as_ref().to_os_string()));
        self
    }

    /// The environment: this process's, in its order, with the changes
    /// (replaced in place, or added at the end).
    fn environment(&self) -> Vec<CString> {
        let mut out: Vec<(OsString, OsString)> = std::env::vars_os().collect();
        for (k, v) in &self.changes {
            match out.iter_mut().find(|(key, _)| key == k) {
                Some(slot) => slot.1 = v.clone(),
                None => out.push((k.clone(), v.clone())),
            }
        }
        out.into_iter()
            .filter_map(|(k, v)| {
                let mut entry = k.into_vec();
                entry.push(b'=');
                entry.extend_from_slice(v.as_bytes());
                CString::new(entry).ok()
            })
            .collect()
    }

    /// Execs the program; returns only on failure. A file the kernel cannot
    /// execute for its format (a script without `#!`) runs with `/bin/sh`,
    /// as `execvp` (and so `env`, and shells) do.
    fn exec(&self) -> tiexec::internal::sys::Errno {
        let to_c = |s: &OsStr| CString::new(s.as_bytes()).ok();
        let (Some(path), Some(argv)) = (
            to_c(self.path.as_os_str()),
            self.argv
                .iter()
                .map(|a| to_c(a))
                .collect::<Option<Vec<_>>>(),
        ) else {
            return tiexec::internal::sys::Errno(libc::EINVAL);
        };
        let envp = self.environment();
        let err = tiexec::internal::sys::execve(&path, &argv, &envp);
        if err.0 != libc::ENOEXEC {
            return err;
        }
        let mut with_sh = vec![c"/bin/sh".to_owned(), path];
        with_sh.extend(argv.into_iter().skip(1));
        tiexec::internal::sys::execve(c"/bin/sh", &with_sh, &envp)
    }
}
