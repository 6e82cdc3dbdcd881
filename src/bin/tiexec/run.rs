//! `tiexec [run] [OPTIONS] PROGRAM...`: run a program with its text on 2 MiB
//! huge pages.
//!
//! A thin wrapper: it primes the page cache of the program's text where that
//! gives 2 MiB pages for free (see `tiexec::prime`), puts libtiexec.so into
//! `LD_PRELOAD` (keeping what is there), sets the `TIEXEC_*` variables its
//! options stand for, and execs the program: same PID, same exit status,
//! same signals.

use std::ffi::{OsStr, OsString};
use std::io::Write;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use tiexec::config::{self, Backend};

/// The preload library, built by build.rs from these same sources.
static EMBEDDED_LIBRARY: &[u8] = include_bytes!(env!("TIEXEC_EMBEDDED_LIB"));

pub const USAGE: &str = "\
Usage: tiexec [run] [OPTIONS] [--] PROGRAM [ARGS...]
       tiexec prime FILE...    (see tiexec prime --help)
       tiexec stat PID...      (see tiexec stat --help)
       tiexec check [PROGRAM]  (see tiexec check --help)

Runs PROGRAM with its executable text on 2 MiB huge pages. PROGRAM keeps
tiexec's PID, and tiexec exits with PROGRAM's status.

Options:
  -b, --backend NAME   where huge pages come from: auto (default), hugetlb,
                       thp, off                        [TIEXEC_BACKEND]
  -l, --log LEVEL      off, error, warn (default), info, debug  [TIEXEC_LOG]
  -v, --verbose        same as --log info: one line per object
  -s, --strategy S     conservative (whole 2 MiB pages of text only) or
                       aggressive (default: also the 2 MiB pages text
                       shares with read-only data)     [TIEXEC_STRATEGY]
      --include PATS   only objects matching these ':'-separated globs
                                                       [TIEXEC_INCLUDE]
      --exclude PATS   leave objects matching these alone [TIEXEC_EXCLUDE]
      --min-text SIZE  leave objects with less text alone (e.g. 8M)
                                                       [TIEXEC_MIN_TEXT]
      --dlopen         also cover libraries loaded later with dlopen, through
                       an audit module (LD_AUDIT); costs ~0.6 ms per process
                       start, and raises glibc's static TLS surplus
      --no-prime       do not cache PROGRAM's text (and its libraries') as
                       2 MiB folios before starting it (see tiexec prime)
      --no-children    programs started by PROGRAM run without tiexec
                                                       [TIEXEC_CHILDREN=0]
      --library PATH   preload this libtiexec.so instead of the built-in one
                                                       [TIEXEC_LIBRARY]
  -h, --help           show this help
  -V, --version        show the version

Exit status: PROGRAM's, or 127 when PROGRAM is not found, 126 when it
cannot be executed, 2 for a usage error.
";

struct Args {
    backend: Option<Backend>,
    strategy: Option<config::Strategy>,
    include: Option<OsString>,
    exclude: Option<OsString>,
    min_text: Option<u64>,
    dlopen: bool,
    no_prime: bool,
    log: Option<tiexec::log::Level>,
    no_children: bool,
    library: Option<PathBuf>,
    program: OsString,
    program_args: Vec<OsString>,
}

enum Parsed {
    Run(Box<Args>),
    Exit(ExitCode),
}

fn usage_error(msg: &str) -> Parsed {
    eprintln!("tiexec: {msg}\nTry 'tiexec --help'.");
    Parsed::Exit(ExitCode::from(2))
}

fn parse_args(mut argv: impl Iterator<Item = OsString>) -> Parsed {
    let mut args = Args {
        backend: None,
        strategy: None,
        include: None,
        exclude: None,
        min_text: None,
        dlopen: false,
        no_prime: false,
        log: None,
        no_children: false,
        library: None,
        program: OsString::new(),
        program_args: Vec::new(),
    };
    loop {
        let Some(arg) = argv.next() else {
            return usage_error("missing PROGRAM");
        };
        let bytes = arg.as_bytes();
        // --name=value and --name value
        let (name, inline): (&[u8], Option<&[u8]>) = match bytes.iter().position(|&b| b == b'=') {
            Some(i) if bytes.starts_with(b"--") => (&bytes[..i], Some(&bytes[i + 1..])),
            _ => (bytes, None),
        };
        let mut value = |what: &str| -> Result<OsString, Parsed> {
            match inline {
                Some(v) => Ok(OsStr::from_bytes(v).to_os_string()),
                None => argv
                    .next()
                    .ok_or_else(|| usage_error(&format!("{what} needs a value"))),
            }
        };
        match name {
            b"--" => {
                let Some(p) = argv.next() else {
                    return usage_error("missing PROGRAM");
                };
                args.program = p;
                break;
            }
            b"-h" | b"--help" => {
                print!("{USAGE}");
                return Parsed::Exit(ExitCode::SUCCESS);
            }
            b"-V" | b"--version" => {
                println!("tiexec {}", env!("CARGO_PKG_VERSION"));
                return Parsed::Exit(ExitCode::SUCCESS);
            }
            b"-b" | b"--backend" => match value("--backend") {
                Ok(v) => match Backend::parse(v.as_bytes()) {
                    Some(b) => args.backend = Some(b),
                    None => {
                        return usage_error(&format!(
                            "--backend {}: expected auto, hugetlb, thp or off",
                            v.to_string_lossy()
                        ))
                    }
                },
                Err(e) => return e,
            },
            b"-l" | b"--log" => match value("--log") {
                Ok(v) => match config::parse_level(v.as_bytes()) {
                    Some(l) => args.log = Some(l),
                    None => {
                        return usage_error(&format!(
                            "--log {}: expected off, error, warn, info or debug",
                            v.to_string_lossy()
                        ))
                    }
                },
                Err(e) => return e,
            },
            b"-s" | b"--strategy" => match value("--strategy") {
                Ok(v) => match config::Strategy::parse(v.as_bytes()) {
                    Some(st) => args.strategy = Some(st),
                    None => {
                        return usage_error(&format!(
                            "--strategy {}: expected conservative or aggressive",
                            v.to_string_lossy()
                        ))
                    }
                },
                Err(e) => return e,
            },
            b"--include" => match value("--include") {
                Ok(v) => args.include = Some(v),
                Err(e) => return e,
            },
            b"--exclude" => match value("--exclude") {
                Ok(v) => args.exclude = Some(v),
                Err(e) => return e,
            },
            b"--min-text" => match value("--min-text") {
                Ok(v) => match config::parse_size(v.as_bytes()) {
                    Some(n) => args.min_text = Some(n),
                    None => {
                        return usage_error(&format!(
                            "--min-text {}: expected a byte count such as 4194304 or 4M",
                            v.to_string_lossy()
                        ))
                    }
                },
                Err(e) => return e,
            },
            b"--dlopen" => args.dlopen = true,
            b"--no-prime" => args.no_prime = true,
            b"-v" | b"--verbose" => args.log = Some(tiexec::log::Level::Info),
            b"--no-children" => args.no_children = true,
            b"--library" => match value("--library") {
                Ok(v) => args.library = Some(PathBuf::from(v)),
                Err(e) => return e,
            },
            _ if bytes.starts_with(b"-") && bytes.len() > 1 => {
                return usage_error(&format!("unknown option {}", arg.to_string_lossy()))
            }
            _ => {
                args.program = arg;
                break;
            }
        }
    }
    args.program_args = argv.collect();
    Parsed::Run(Box::new(args))
}

/// Why PROGRAM cannot be run.
enum Lookup {
    Found(PathBuf),
    NotFound,
    NotExecutable(PathBuf),
}

fn is_executable_file(path: &Path) -> bool {
    let Ok(meta) = std::fs::metadata(path) else {
        return false;
    };
    if !meta.is_file() {
        return false;
    }
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `c` is a valid NUL-terminated path.
    unsafe { libc::access(c.as_ptr(), libc::X_OK) == 0 }
}

/// PROGRAM's path when it can be run (see [`find_program`]).
pub fn resolve(program: &OsStr) -> Option<PathBuf> {
    match find_program(program) {
        Lookup::Found(p) => Some(p),
        _ => None,
    }
}

/// Finds PROGRAM the way a shell does: as a path if it holds a '/', else in
/// each directory of PATH in turn (an empty entry is the current directory).
fn find_program(program: &OsStr) -> Lookup {
    let as_path = Path::new(program);
    if program.as_bytes().contains(&b'/') {
        return if is_executable_file(as_path) {
            Lookup::Found(as_path.to_path_buf())
        } else if as_path.exists() {
            Lookup::NotExecutable(as_path.to_path_buf())
        } else {
            Lookup::NotFound
        };
    }
    let path_var =
        std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    let mut not_executable = None;
    for dir in path_var.as_bytes().split(|&b| b == b':') {
        let dir = if dir.is_empty() {
            Path::new(".")
        } else {
            Path::new(OsStr::from_bytes(dir))
        };
        let candidate = dir.join(program);
        if is_executable_file(&candidate) {
            return Lookup::Found(candidate);
        }
        if not_executable.is_none() && candidate.is_file() {
            not_executable = Some(candidate);
        }
    }
    match not_executable {
        Some(p) => Lookup::NotExecutable(p),
        None => Lookup::NotFound,
    }
}

/// What the ELF headers say about how PROGRAM will be loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Linkage {
    Dynamic,
    Static,
    NotElf,
}

pub fn linkage(path: &Path) -> Linkage {
    let Ok(file) = std::fs::File::open(path) else {
        return Linkage::NotElf;
    };
    match tiexec::elf::read_program_headers(&file) {
        Some(phdrs) if tiexec::elf::has_interpreter(&phdrs) => Linkage::Dynamic,
        Some(_) => Linkage::Static,
        None => Linkage::NotElf,
    }
}

/// Caches the text of the program, and of the libraries the loader would give
/// it, as 2 MiB folios where that lets the kernel map it huge for free.
/// Says what it primed when `verbose` (log level info or more).
fn prime_before_exec(program: &Path, linked: Linkage, verbose: bool) {
    let mut files = vec![program.to_path_buf()];
    if linked == Linkage::Dynamic {
        files.extend(libraries_of(program));
    }
    for f in files {
        if let Ok(segments) = tiexec::prime::prime_file(&f, true) {
            for s in segments
                .iter()
                .filter(|s| s.state == tiexec::prime::State::Primed)
            {
                if verbose {
                    eprintln!(
                        "tiexec: {}: primed {} of text as 2 MiB page-cache folios",
                        f.display(),
                        tiexec::log::Bytes(s.body.len())
                    );
                }
            }
        }
    }
}

/// The libraries the dynamic loader resolves for `program`, with at least
/// 2 MiB of file: asks the loader itself (`ld.so --list`, what ldd does; it
/// loads nothing into this process and runs none of the program's code).
pub fn libraries_of(program: &Path) -> Vec<PathBuf> {
    let Ok(file) = std::fs::File::open(program) else {
        return Vec::new();
    };
    let Some(interp) = tiexec::elf::read_program_headers(&file)
        .and_then(|phdrs| tiexec::elf::interpreter(&file, &phdrs))
    else {
        return Vec::new();
    };
    let Ok(out) = Command::new(interp).arg("--list").arg(program).output() else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split("=> ").nth(1))
        .filter_map(|rest| rest.split(" (").next())
        .map(PathBuf::from)
        .filter(|p| std::fs::metadata(p).is_ok_and(|m| m.len() >= 2 << 20))
        .collect()
}

/// FNV-1a, to name the extracted library by its content.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    })
}

/// A directory only this user can write to, for the extracted library.
fn private_cache_dir() -> Option<PathBuf> {
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    let home_cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| Path::new(v).is_absolute())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")));
    let candidates = home_cache
        .map(|c| c.join("tiexec"))
        .into_iter()
        .chain(std::iter::once(
            std::env::temp_dir().join(format!("tiexec-{uid}")),
        ));
    for dir in candidates {
        let _ = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir);
        // Use it only if it is a real directory we own that others cannot
        // write to (no following a planted symlink, no shared /tmp dir).
        let Ok(meta) = std::fs::symlink_metadata(&dir) else {
            continue;
        };
        use std::os::unix::fs::MetadataExt;
        if meta.is_dir() && meta.uid() == uid && meta.mode() & 0o022 == 0 {
            return Some(dir);
        }
    }
    None
}

/// Writes the embedded library to the cache once (named by its content) and
/// returns its path.
fn extract_embedded_library() -> std::io::Result<PathBuf> {
    if EMBEDDED_LIBRARY.is_empty() {
        return Err(std::io::Error::other(
            "this tiexec was built without its library",
        ));
    }
    let dir = private_cache_dir()
        .ok_or_else(|| std::io::Error::other("no private directory for libtiexec.so"))?;
    let name = format!(
        "libtiexec-{}-{:016x}.so",
        env!("CARGO_PKG_VERSION"),
        fnv1a(EMBEDDED_LIBRARY)
    );
    let path = dir.join(name);
    if let Ok(existing) = std::fs::read(&path) {
        if existing == EMBEDDED_LIBRARY {
            return Ok(path);
        }
    }
    // Write under a unique name, then rename: a concurrent tiexec never sees
    // a half-written library, and nothing is followed or clobbered.
    let tmp = dir.join(format!(".libtiexec-{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o755)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)?;
    f.write_all(EMBEDDED_LIBRARY)?;
    f.sync_all()?;
    drop(f);
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

fn library_path(args: &Args) -> Result<PathBuf, String> {
    let explicit = args.library.clone().or_else(|| {
        std::env::var_os("TIEXEC_LIBRARY")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    });
    if let Some(p) = explicit {
        let abs = std::fs::canonicalize(&p).map_err(|e| format!("library {}: {e}", p.display()))?;
        return Ok(abs);
    }
    extract_embedded_library().map_err(|e| format!("cannot write libtiexec.so: {e}"))
}

/// `lib` first, then the entries of `existing` (':' or ' ' separated) other
/// than `lib`, joined by ':'. For `LD_PRELOAD` and `LD_AUDIT` alike.
fn ld_list_with(existing: Option<OsString>, lib: &Path) -> OsString {
    let lib = lib.as_os_str().as_bytes();
    let mut out = lib.to_vec();
    if let Some(existing) = existing {
        for entry in existing.as_bytes().split(|&b| b == b':' || b == b' ') {
            if entry.is_empty() || entry == lib {
                continue;
            }
            out.push(b':');
            out.extend_from_slice(entry);
        }
    }
    OsString::from_vec(out)
}

/// With an audit module, glibc lays out static TLS before loading the
/// program's libraries, which must then fit their initial-exec TLS into the
/// optional surplus (512 bytes by default): rustc's librustc_driver needs
/// ~24 KiB and would not start. Give them 64 KiB, unless the user chose.
const TLS_SURPLUS_TUNABLE: &str = "glibc.rtld.optional_static_tls";

fn tunables_with_tls_surplus(existing: Option<OsString>) -> OsString {
    let mut out = existing.unwrap_or_default();
    if out
        .as_bytes()
        .windows(TLS_SURPLUS_TUNABLE.len())
        .any(|w| w == TLS_SURPLUS_TUNABLE.as_bytes())
    {
        return out;
    }
    if !out.is_empty() {
        out.push(":");
    }
    out.push(format!("{TLS_SURPLUS_TUNABLE}=65536"));
    out
}

/// Runs PROGRAM (the words after `tiexec` or `tiexec run`).
pub fn main(argv: impl Iterator<Item = OsString>) -> ExitCode {
    let args = match parse_args(argv) {
        Parsed::Run(a) => a,
        Parsed::Exit(code) => return code,
    };
    // The level the program will log at: the option, else TIEXEC_LOG.
    let level = args.log.or_else(|| {
        std::env::var_os(config::VAR_LOG).and_then(|v| config::parse_level(v.as_bytes()))
    });
    let quiet = matches!(
        level,
        Some(tiexec::log::Level::Off | tiexec::log::Level::Error)
    );
    let shown = args.program.to_string_lossy().into_owned();
    let path = match find_program(&args.program) {
        Lookup::Found(p) => p,
        Lookup::NotFound => {
            eprintln!("tiexec: {shown}: command not found");
            return ExitCode::from(127);
        }
        Lookup::NotExecutable(p) => {
            eprintln!("tiexec: {}: Permission denied", p.display());
            return ExitCode::from(126);
        }
    };

    let linked = linkage(&path);
    if !args.no_prime && args.backend != Some(Backend::Off) {
        prime_before_exec(&path, linked, level >= Some(tiexec::log::Level::Info));
    }

    let mut cmd = Command::new(&path);
    cmd.arg0(&args.program).args(&args.program_args);

    // LD_PRELOAD cannot reach a static program: do not offer it one.
    let preload = linked != Linkage::Static;
    if !quiet {
        if !preload {
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
        match library_path(&args) {
            Ok(lib) => {
                cmd.env(
                    "LD_PRELOAD",
                    ld_list_with(std::env::var_os("LD_PRELOAD"), &lib),
                );
                if args.dlopen {
                    // The same library, as an audit module: covers libraries
                    // loaded later with dlopen.
                    cmd.env("LD_AUDIT", ld_list_with(std::env::var_os("LD_AUDIT"), &lib));
                    cmd.env(
                        "GLIBC_TUNABLES",
                        tunables_with_tls_surplus(std::env::var_os("GLIBC_TUNABLES")),
                    );
                }
            }
            Err(e) => {
                // Never stop the user's program for our sake.
                eprintln!("tiexec: {e}; running {shown} without tiexec");
            }
        }
    }
    if let Some(b) = args.backend {
        cmd.env(config::VAR_BACKEND, b.name());
    }
    if let Some(l) = args.log {
        cmd.env(config::VAR_LOG, l.name());
    }
    if let Some(st) = args.strategy {
        cmd.env(config::VAR_STRATEGY, st.name());
    }
    if let Some(p) = &args.include {
        cmd.env("TIEXEC_INCLUDE", p);
    }
    if let Some(p) = &args.exclude {
        cmd.env("TIEXEC_EXCLUDE", p);
    }
    if let Some(n) = args.min_text {
        cmd.env("TIEXEC_MIN_TEXT", n.to_string());
    }
    if args.no_children {
        cmd.env(config::VAR_CHILDREN, "0");
    }

    // exec replaces this process: on success it does not return.
    let err = cmd.exec();
    eprintln!("tiexec: {}: {err}", path.display());
    ExitCode::from(if err.kind() == std::io::ErrorKind::NotFound {
        127
    } else {
        126
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: &[&str]) -> Option<Args> {
        match parse_args(v.iter().map(OsString::from)) {
            Parsed::Run(a) => Some(*a),
            Parsed::Exit(_) => None,
        }
    }

    #[test]
    fn options_stop_at_the_program() {
        let a = parse(&["-b", "thp", "--log=info", "g++", "-O2", "--backend", "x"]).unwrap();
        assert_eq!(a.backend, Some(Backend::Thp));
        assert_eq!(a.log, Some(tiexec::log::Level::Info));
        assert_eq!(a.program, "g++");
        assert_eq!(a.program_args, ["-O2", "--backend", "x"]);
        let a = parse(&["--", "-weird-name"]).unwrap();
        assert_eq!(a.program, "-weird-name");
        assert!(parse(&["--backend", "bogus", "ls"]).is_none());
        assert!(parse(&["--frobnicate", "ls"]).is_none());
        assert!(parse(&[]).is_none());
    }

    #[test]
    fn ld_lists_keep_existing_entries() {
        let lib = Path::new("/c/libtiexec.so");
        assert_eq!(ld_list_with(None, lib), "/c/libtiexec.so");
        assert_eq!(
            ld_list_with(Some("/a.so /c/libtiexec.so:/b.so".into()), lib),
            "/c/libtiexec.so:/a.so:/b.so"
        );
    }

    #[test]
    fn tls_surplus_is_added_once_and_never_overrides_the_user() {
        assert_eq!(
            tunables_with_tls_surplus(None),
            "glibc.rtld.optional_static_tls=65536"
        );
        assert_eq!(
            tunables_with_tls_surplus(Some("glibc.malloc.arena_max=2".into())),
            "glibc.malloc.arena_max=2:glibc.rtld.optional_static_tls=65536"
        );
        let mine = "glibc.rtld.optional_static_tls=1024";
        assert_eq!(tunables_with_tls_surplus(Some(mine.into())), mine);
    }

    #[test]
    fn path_lookup() {
        assert!(matches!(find_program(OsStr::new("sh")), Lookup::Found(_)));
        assert!(matches!(
            find_program(OsStr::new("no-such-program-tiexec")),
            Lookup::NotFound
        ));
        let plain = std::env::temp_dir().join(format!("tiexec-not-exec-{}", std::process::id()));
        std::fs::write(&plain, b"data").unwrap();
        std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).unwrap();
        let got = find_program(plain.as_os_str());
        let _ = std::fs::remove_file(&plain);
        assert!(matches!(got, Lookup::NotExecutable(_)));
    }
}
