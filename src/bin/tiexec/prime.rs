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
            "{}: text at file offset {:#x}, {} of whole {huge} pages: {}, {} on {huge} folios{}",
            path.display(),
            s.file.start,
            Bytes(s.body.len()),
            s.state.describe(),
            Bytes(s.huge_bytes),
            if s.state == State::NotCongruent {
                format!("; relink with {}", prime::LINK_ADVICE)
            } else {
                String::new()
            },
            huge = tiexec::internal::pagesize::huge_page_name()
        );
        ok &= matches!(s.state, State::Huge | State::Primed | State::NoWholePage);
    }
    ok
}

/// A file's identity, as the memo below checks it: device, inode, size,
/// modification time (ns).
fn identity(path: &Path) -> Option<[u64; 4]> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some([
        m.dev(),
        m.ino(),
        m.size(),
        (m.mtime() as u64).wrapping_mul(1_000_000_000) + m.mtime_nsec() as u64,
    ])
}

/// The memo's name for `program`: a digest of everything the loader's
/// choice of libraries depends on here (the program's path and identity,
/// `LD_LIBRARY_PATH`, the loader cache's identity).
fn memo_name(program: &Path) -> Option<String> {
    use std::os::unix::ffi::OsStrExt;
    let mut key = program.as_os_str().as_bytes().to_vec();
    for n in identity(program)? {
        key.extend_from_slice(&n.to_le_bytes());
    }
    key.push(0);
    if let Some(v) = std::env::var_os("LD_LIBRARY_PATH") {
        key.extend_from_slice(v.as_bytes());
    }
    key.push(0);
    for n in identity(Path::new("/etc/ld.so.cache")).unwrap_or_default() {
        key.extend_from_slice(&n.to_le_bytes());
    }
    Some(format!("{:016x}", tiexec::internal::state::fnv1a(&key)))
}

/// The remembered list, if every file in it is still the same file.
fn read_memo(text: &[u8]) -> Option<Vec<PathBuf>> {
    use std::os::unix::ffi::OsStrExt;
    let mut out = Vec::new();
    for line in text.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let (ids, path) = line.split_at(line.iter().position(|&b| b == b'\t')?);
        let path = Path::new(std::ffi::OsStr::from_bytes(path.get(1..)?));
        let ids: Vec<u64> = std::str::from_utf8(ids)
            .ok()?
            .split(' ')
            .filter_map(|w| w.parse().ok())
            .collect();
        if identity(path).map(|i| i.to_vec()) != Some(ids) {
            return None;
        }
        out.push(path.to_path_buf());
    }
    Some(out)
}

fn write_memo(files: &[PathBuf]) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt;
    let mut out = Vec::new();
    for f in files {
        let Some(ids) = identity(f) else {
            continue;
        };
        let ids: Vec<String> = ids.iter().map(u64::to_string).collect();
        out.extend_from_slice(ids.join(" ").as_bytes());
        out.push(b'\t');
        out.extend_from_slice(f.as_os_str().as_bytes());
        out.push(b'\n');
    }
    out
}

/// The files worth priming for `program` at `path`: it and the libraries
/// the loader gives it, those of 2 MiB or more (a smaller file holds no
/// whole 2 MiB page of text). `resolved`: the libraries, when the caller
/// resolved them anyway; else they are resolved now, or taken from the
/// memo of an earlier run when nothing they depend on changed (resolving
/// reads the loader's cache and every library's headers, on every run of
/// every program).
pub fn files_to_prime(
    path: &Path,
    program: &crate::libs::Object,
    resolved: Option<&[crate::libs::Object]>,
) -> Vec<PathBuf> {
    let big = |o: &crate::libs::Object| (o.file_size >= 2 << 20).then(|| o.path.clone());
    if let Some(libraries) = resolved {
        return std::iter::once(program)
            .chain(libraries)
            .filter_map(big)
            .collect();
    }
    if !program.interpreter {
        return big(program).into_iter().collect();
    }
    let state = tiexec::internal::state::StateDir::open_default();
    let name = memo_name(path);
    if let (Some(state), Some(name)) = (&state, &name) {
        if let Some(files) = state
            .read_record(c"prime", name)
            .and_then(|text| read_memo(&text))
        {
            return files;
        }
    }
    let libraries = crate::libs::startup_libraries(program);
    let files: Vec<PathBuf> = std::iter::once(program)
        .chain(&libraries)
        .filter_map(big)
        .collect();
    if let (Some(state), Some(name)) = (&state, &name) {
        let _ = state.write_record(c"prime", name, &write_memo(&files));
    }
    files
}

/// Caches the text of `files` as 2 MiB folios where that lets the kernel
/// map it huge for free. Says what it primed when `verbose`.
pub fn before_exec(files: &[PathBuf], verbose: bool) {
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
                    "tiexec: {}: primed {} of text as {} page-cache folios",
                    f.display(),
                    tiexec::internal::log::Bytes(s.body.len()),
                    tiexec::internal::pagesize::huge_page_name()
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_memo_holds_only_files_that_are_still_the_same() {
        let dir = std::env::temp_dir().join(format!("tiexec-memo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let a = dir.join("a");
        std::fs::write(&a, b"x").unwrap();
        let text = write_memo(std::slice::from_ref(&a));
        assert_eq!(read_memo(&text), Some(vec![a.clone()]));
        assert_eq!(read_memo(b""), Some(vec![]));
        std::thread::sleep(std::time::Duration::from_millis(10));
        std::fs::write(&a, b"xy").unwrap();
        assert_eq!(read_memo(&text), None, "changed file: the memo is stale");
        std::fs::remove_file(&a).unwrap();
        assert_eq!(read_memo(&text), None, "removed file: the memo is stale");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
