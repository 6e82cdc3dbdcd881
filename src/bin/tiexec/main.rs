//! The `tiexec` command.
//!
//! - `tiexec [run] [OPTIONS] PROGRAM [ARGS...]`: run a program with its text
//!   on 2 MiB pages (the default command);
//! - `tiexec prime FILE...`: cache files' text as 2 MiB folios;
//! - `tiexec stat PID...`: what a running process's text is mapped with;
//! - `tiexec check [PROGRAM]`: is the machine ready, what would happen.
//!
//! A command name counts only as the first word: `tiexec -- prime` runs a
//! program called `prime`.

use std::process::ExitCode;

mod check;
mod prime;
mod run;
mod stat;

fn main() -> ExitCode {
    let mut argv = std::env::args_os().skip(1).peekable();
    match argv.peek().and_then(|a| a.to_str()) {
        Some("run") => {
            argv.next();
            run::main(argv)
        }
        Some("prime") => {
            argv.next();
            prime::main(argv)
        }
        Some("check") => {
            argv.next();
            check::main(argv)
        }
        Some("stat") => {
            argv.next();
            stat::main(argv)
        }
        _ => run::main(argv),
    }
}
