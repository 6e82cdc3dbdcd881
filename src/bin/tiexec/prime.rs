//! `tiexec --prime FILE...`: bring the text of programs and libraries into the
//! page cache as 2 MiB folios, so that their next start maps it with 2 MiB
//! pages at no cost (see `tiexec::internal::prime`). For a service's start-up script,
//! or before running a statically linked program.

use crate::ExitCode;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use tiexec::internal::log::Bytes;
use tiexec::internal::prime::{self, State};

const USAGE: &str = "\
Usage: tiexec --prime [--check] FILE...

Brings the executable segments of each FILE into the page cache as 2 MiB
folios, so that a program or library mapped from it with its address and
file offset congruent modulo 2 MiB gets 2 MiB pages from the kernel itself:
no copy, shared by every process, statically linked programs included.

  --check     only say how the text is cached; change nothing

Exit status: 0 when every segment with a whole 2 MiB page is cached huge,
1 when some is not (the lines say why), 2 for a usage error.
";

/// Runs `tiexec --prime`.
pub fn main(argv: impl Iterator<Item = OsString>) -> ExitCode {
    let mut check_only = false;
    let mut files = Vec::new();
    for arg in argv {
        match arg.to_str() {
            Some("-h" | "--help") => {
                print!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            Some("--check") => check_only = true,
            Some(s) if s.starts_with('-') && files.is_empty() => {
                eprintln!("tiexec --prime: unknown option {s}\nTry 'tiexec --prime --help'.");
                return ExitCode::from(2);
            }
            _ => files.push(PathBuf::from(arg)),
        }
    }
    if files.is_empty() {
        eprintln!("tiexec --prime: missing FILE\nTry 'tiexec --prime --help'.");
        return ExitCode::from(2);
    }
    let mut all_huge = true;
    for f in &files {
        all_huge &= report(f, !check_only);
    }
    if all_huge {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// Primes (or checks) one file and prints a line per executable segment.
/// True when every segment with a whole 2 MiB page is cached huge.
pub fn report(path: &Path, prime: bool) -> bool {
    let segments = match prime::prime_file(path, prime) {
        Ok(s) => s,
        Err(e) => {
            println!("{}: {e}", path.display());
            return false;
        }
    };
    let mut ok = true;
    for s in &segments {
        println!(
            "{}: text at file offset {:#x}, {} of whole 2 MiB pages: {}, {} on 2 MiB folios{}",
            path.display(),
            s.file.start,
            Bytes(s.body.len()),
            s.state.describe(),
            Bytes(s.huge_bytes),
            if s.state == State::NotCongruent {
                format!("; relink with {}", prime::LINK_ADVICE)
            } else {
                String::new()
            }
        );
        ok &= matches!(s.state, State::Huge | State::Primed | State::NoWholePage);
    }
    ok
}

/// Caches the text of the program, and of the libraries the loader gives
/// it, as 2 MiB folios where that lets the kernel map it huge for free.
/// Says what it primed when `verbose`.
pub fn before_exec(
    program: &crate::libs::Object,
    libraries: &[crate::libs::Object],
    verbose: bool,
) {
    // A file of less than 2 MiB holds no whole 2 MiB page of text.
    let files = std::iter::once(program)
        .chain(libraries)
        .filter(|o| o.file_size >= 2 << 20)
        .map(|o| &o.path);
    for f in files {
        let Ok(segments) = tiexec::internal::prime::prime_file(f, true) else {
            continue;
        };
        for s in segments
            .iter()
            .filter(|s| s.state == tiexec::internal::prime::State::Primed)
        {
            if verbose {
                eprintln!(
                    "tiexec: {}: primed {} of text as 2 MiB page-cache folios",
                    f.display(),
                    tiexec::internal::log::Bytes(s.body.len())
                );
            }
        }
    }
}
