//! The `tiexec` command.
//!
//! - `tiexec [OPTIONS] [--] PROGRAM [ARGS...]`: run a program with its text
//!   on 2 MiB pages;
//! - `tiexec --setup`: (root) reserve hugetlb pages and mount the image cache;
//! - `tiexec --cache`: list or evict the image cache;
//! - `tiexec --stat PID...`: what a running process's text is mapped with;
//! - `tiexec --check [PROGRAM]`: is the machine ready, what would happen;
//! - `tiexec --prime FILE...`: cache files' text as 2 MiB folios;
//! - `tiexec --print-library`: the library to name in `LD_PRELOAD`;
//! - `tiexec --man`, `tiexec --completions SHELL`: the manual page and the
//!   shell completions, from the same tables as `--help`.
//!
//! A wrapper must never run something other than what the user named: the
//! management commands are options, recognised only as the first argument,
//! and any word is a program (`tiexec stat FILE` runs `stat`).

// No Rust start-up code: `main` below is the C one. It skips the runtime's
// stack-guard and signal-stack set-up, ~0.1 ms of every run of a program
// that only execs another; std works the same (arguments come from the
// C runtime on this target). The unit tests keep the test harness's main.
#![cfg_attr(not(test), no_main)]
// System calls go through the library's `sys`; the only exceptions are the
// C entry point below and the sections `embedded` assembles (data only).
#![deny(unsafe_code)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

mod args;
mod cachecmd;
mod check;
mod docs;
mod embedded;
#[cfg(tiexec_entry)]
mod entry;
mod ldenv;
mod libs;
mod path;
mod prime;
mod run;
mod setup;
mod stat;

/// A process's exit status. (std's `ExitCode` cannot give its number back,
/// which a C `main` must return.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExitCode(u8);

impl ExitCode {
    /// Status 0.
    pub const SUCCESS: ExitCode = ExitCode(0);

    /// Status `code`.
    pub const fn from(code: u8) -> ExitCode {
        ExitCode(code)
    }
}

#[cfg_attr(test, allow(dead_code))]
fn run() -> ExitCode {
    let mut argv = std::env::args_os().skip(1);
    let first = argv.next();
    match first.as_ref().and_then(|a| a.to_str()) {
        Some("--setup") => setup::main(argv),
        Some("--cache") => cachecmd::main(argv),
        Some("--stat") => stat::main(argv),
        Some("--check") => check::main(argv),
        Some("--prime") => prime::main(argv),
        Some("--print-library") => print_library(argv),
        Some("--man") => docs::man_main(argv),
        Some("--completions") => docs::completions_main(argv),
        _ => run::main(first.into_iter().chain(argv)),
    }
}

/// `tiexec --print-library`: the path of the library for a hand-written
/// `LD_PRELOAD` (the system's, installed by `tiexec --setup`, else this
/// user's own copy).
fn print_library(mut argv: impl Iterator<Item = std::ffi::OsString>) -> ExitCode {
    if let Some(extra) = argv.next() {
        let help = extra == "--help" || extra == "-h";
        let out = "Usage: tiexec --print-library\n\nPrints the path of libtiexec.so for LD_PRELOAD: the one tiexec --setup\ninstalled for every user (/usr/local/lib/tiexec), else this user's copy.\n";
        if help {
            print!("{out}");
            return ExitCode::SUCCESS;
        }
        eprint!("tiexec --print-library: unexpected argument {extra:?}\n{out}");
        return ExitCode::from(2);
    }
    match embedded::library_for_preload() {
        Ok((path, system)) => {
            println!("{}", path.display());
            if !system {
                eprintln!(
                    "tiexec: this user's copy; for services and other users: sudo tiexec --setup installs {}",
                    embedded::SYSTEM_LIBRARY
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tiexec --print-library: {e}");
            ExitCode::from(1)
        }
    }
}

/// The C entry point (see the note at the top).
#[cfg(not(test))]
#[allow(unsafe_code)] // no_mangle: the symbol the C runtime calls
#[no_mangle]
pub extern "C" fn main(_argc: i32, _argv: *const *const u8) -> i32 {
    use std::io::Write;
    // A panic must not unwind out of a C function: it was reported by the
    // panic hook; exit 101 as Rust's own runtime would.
    let code = std::panic::catch_unwind(run).unwrap_or(ExitCode::from(101));
    let _ = std::io::stdout().flush();
    i32::from(code.0)
}
