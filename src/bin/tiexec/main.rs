//! The `tiexec` command.
//!
//! - `tiexec [OPTIONS] [--] PROGRAM [ARGS...]`: run a program with its text
//!   on 2 MiB pages;
//! - `tiexec --setup`: (root) reserve hugetlb pages and mount the image cache;
//! - `tiexec --cache`: list or evict the image cache;
//! - `tiexec --stat PID...`: what a running process's text is mapped with;
//! - `tiexec --check [PROGRAM]`: is the machine ready, what would happen;
//! - `tiexec --prime FILE...`: cache files' text as 2 MiB folios.
//!
//! A wrapper must never run something other than what the user named: the
//! management commands are options, recognised only as the first argument,
//! and any word is a program (`tiexec stat FILE` runs `stat`).

use std::process::ExitCode;

mod args;
mod cachecmd;
mod check;
mod embedded;
mod libs;
mod path;
mod prime;
mod run;
mod setup;
mod stat;

fn main() -> ExitCode {
    let mut argv = std::env::args_os().skip(1);
    let first = argv.next();
    match first.as_ref().and_then(|a| a.to_str()) {
        Some("--setup") => setup::main(argv),
        Some("--cache") => cachecmd::main(argv),
        Some("--stat") => stat::main(argv),
        Some("--check") => check::main(argv),
        Some("--prime") => prime::main(argv),
        _ => run::main(first.into_iter().chain(argv)),
    }
}
