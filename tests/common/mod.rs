//! Helpers for the integration tests: fixtures, child processes with
//! timeouts, smaps coverage, and the hugetlb pool.

#![allow(dead_code)]

pub mod fixture;
pub mod proc_maps;
pub mod witness;

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

pub use witness::Range;
use witness::{align_down, align_up, huge_page, segment_pages};

pub use fixture::Spec;
pub use proc_maps::Coverage;

/// The PIE fixture: 32 MiB of text at a random 4 KiB-aligned base.
pub const PIE: Spec = Spec::new("fixture-pie-32m", 32, true);
/// The non-PIE fixture: 32 MiB of text at 0x400000.
pub const NON_PIE: Spec = Spec::new("fixture-nopie-32m", 32, false);
/// Non-PIE with headers and rodata in its r-x segment.
pub const MERGED_RX: Spec = Spec {
    merged_rx: true,
    ..Spec::new("fixture-nopie-merged-24m", 24, false)
};
/// PIE with two executable segments of 16 MiB each.
pub const TWO_SEGMENTS: Spec = Spec {
    two_text_segments: true,
    ..Spec::new("fixture-pie-two-segments-32m", 32, true)
};
/// PIE whose text is followed by 3 MiB of rodata: its last 2 MiB page holds
/// no writable data, so the aggressive strategy can cover all of its text.
pub const BIG_RODATA: Spec = Spec {
    rodata_mib: 3,
    ..Spec::new("fixture-pie-rodata-24m", 24, true)
};
/// PIE linked with 2 MiB segment alignment: text congruent with its file.
pub const HUGE_ALIGNED: Spec = Spec {
    huge_aligned: true,
    ..Spec::new("fixture-pie-aligned-24m", 24, true)
};
/// The non-PIE fixture with 64 MiB of text.
pub const NON_PIE_64: Spec = Spec::new("fixture-nopie-64m", 64, false);
/// The PIE fixture with 64 MiB of text.
pub const PIE_64: Spec = Spec::new("fixture-pie-64m", 64, true);
/// A small static program.
pub const STATIC_SMALL: Spec = Spec {
    static_link: true,
    ..Spec::new("fixture-static-1m", 1, false)
};

/// Says why a test does not run here, and returns (the caller then
/// returns). Under `TIEXEC_TEST_STRICT=1` (what CI sets) a skip fails the
/// test instead: there, everything a test needs was set up, so a skip would
/// hide a test that can no longer pass.
///
/// The note goes straight to stderr, past the test harness's capture, so
/// that it shows in a plain `cargo test` next to the test's `ok` (the
/// harness has no "skipped" result of its own).
pub fn skip(why: impl std::fmt::Display) {
    if std::env::var_os("TIEXEC_TEST_STRICT").is_some_and(|v| !v.is_empty() && v != "0") {
        panic!("skipped under TIEXEC_TEST_STRICT: {why}");
    }
    uncaptured(format_args!("SKIPPED {}: {why}", test_name()));
}

/// Says that a test does not apply to this kernel (a feature it was built
/// without, which no set-up can add), and returns. Never fails, strict or
/// not: use [`skip`] for anything a machine could be set up to have.
pub fn unsupported(why: impl std::fmt::Display) {
    uncaptured(format_args!(
        "NOT APPLICABLE {}: {why} (this kernel)",
        test_name()
    ));
}

/// The running test's name (the harness names each test's thread after it).
fn test_name() -> String {
    std::thread::current()
        .name()
        .unwrap_or("a test")
        .to_string()
}

/// One line on the real stderr, not the harness's captured one.
fn uncaptured(line: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// A digest of a fixture's source, for its file name: an edited source is
/// never served by an old build.
pub fn fixture_digest(source: &str) -> u64 {
    tiexec::internal::state::fnv1a(source.as_bytes())
}

/// Where fixtures and scratch files go.
pub fn scratch_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("tiexec-tests")
}

/// Builds a fixture once per test process (and reuses it across processes).
pub fn fixture(spec: Spec) -> PathBuf {
    static BUILD: Mutex<()> = Mutex::new(());
    let _one_at_a_time = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    fixture::build(spec, &scratch_dir().join("fixtures"))
}

/// A big shared library (24 MiB of text) and a host linked against it.
pub fn linked_library_fixture() -> (PathBuf, PathBuf) {
    static BUILD: Mutex<()> = Mutex::new(());
    let _one_at_a_time = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch_dir().join("fixtures");
    let lib = fixture::build_library("bigtext", 24, &dir);
    (fixture::build_host("host-linked", Some(&lib), &dir), lib)
}

/// A big shared library (24 MiB of text) and a host that dlopens it.
pub fn dlopen_library_fixture() -> (PathBuf, PathBuf) {
    static BUILD: Mutex<()> = Mutex::new(());
    let _one_at_a_time = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch_dir().join("fixtures");
    let lib = fixture::build_library("plugin", 24, &dir);
    (fixture::build_host("host-dlopen", None, &dir), lib)
}

/// The archive a C program links to optimise itself (built by build.rs with
/// the `constructor` feature).
pub fn staticlib() -> PathBuf {
    built_by_build_rs(env!("TIEXEC_EMBEDDED_STATICLIB"))
}

/// A file build.rs made (an empty placeholder means it did not).
/// The stub library the wrapper preloads, as build.rs made it.
pub fn stub_lib() -> PathBuf {
    built_by_build_rs(env!("TIEXEC_EMBEDDED_STUB"))
}

fn built_by_build_rs(path: &str) -> PathBuf {
    let file = PathBuf::from(path);
    let built = std::fs::metadata(&file).is_ok_and(|m| m.len() > 0);
    assert!(built, "{} not built", file.display());
    file
}

/// `spec` with libtiexec.a linked in (named after it, "-linked").
pub fn linked_fixture(spec: Spec, name: &'static str) -> PathBuf {
    static BUILD: Mutex<()> = Mutex::new(());
    let _one_at_a_time = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    let spec = Spec { name, ..spec };
    fixture::build_linking(spec, &scratch_dir().join("fixtures"), Some(&staticlib()))
}

/// A fresh copy of `exe` in `dir` (a new inode: nothing cached, nothing
/// mapping it), written in 4 KiB writes so its cached pages are small: the
/// page cache outlives processes, and an earlier run may have primed the
/// original.
pub fn fresh_copy(exe: &Path, dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let copy = dir.join(exe.file_name().unwrap());
    let _ = std::fs::remove_file(&copy);
    std::fs::copy(exe, &copy).unwrap();
    fixture::rewrite_in_small_pages(&copy);
    copy
}

/// Waits until `path` last changed more than 2 s ago: the image cache
/// shares no image of a file its timestamps could not tell from a version
/// changed in the same tick (`cache::SETTLE_NS`).
pub fn settle(path: &Path) {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).expect("stat");
    let changed = std::time::UNIX_EPOCH
        + Duration::new(
            meta.ctime().max(meta.mtime()) as u64,
            meta.ctime_nsec() as u32,
        );
    let ready = changed + Duration::from_millis(2100);
    if let Ok(wait) = ready.duration_since(std::time::SystemTime::now()) {
        std::thread::sleep(wait);
    }
}

/// The `tiexec` binary under test.
pub fn tiexec_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tiexec"))
}

/// Makes `cmd` independent of the environment the tests run in: no
/// `TIEXEC_*` setting, preload or audit module of the caller's, the image
/// cache off (tests of the cache name one), and a state directory of its own
/// (`XDG_CACHE_HOME`: run history, image records, the extracted library), so
/// no test sees another's history.
pub fn isolate(cmd: &mut Command) -> &mut Command {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if k.starts_with("TIEXEC_") || k == "LD_PRELOAD" || k == "LD_AUDIT" {
            cmd.env_remove(k);
        }
    }
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let state = scratch_dir()
        .join("state")
        .join(format!("{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);
    std::fs::create_dir_all(&state).unwrap();
    cmd.env("XDG_CACHE_HOME", &state).env("TIEXEC_CACHE", "off")
}

/// The state directory `isolate` gave `cmd` (its `XDG_CACHE_HOME`/tiexec).
pub fn state_dir_of(cmd: &Command) -> PathBuf {
    let xdg = cmd
        .get_envs()
        .find(|(k, _)| *k == "XDG_CACHE_HOME")
        .and_then(|(_, v)| v)
        .expect("isolated command");
    Path::new(xdg).join("tiexec")
}

/// A command running `tiexec`, isolated (see [`isolate`]).
pub fn tiexec_cmd() -> Command {
    let mut c = Command::new(tiexec_bin());
    isolate(&mut c);
    c
}

/// A command running `exe` with the freshly built library preloaded,
/// isolated (see [`isolate`]), with `env` set.
pub fn preloaded(exe: &Path, env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(exe);
    isolate(&mut cmd);
    cmd.env("LD_PRELOAD", preload_lib());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// Records `lifetimes_ms` as past runs of `program` on 4 KiB pages in the
/// state directory of `cmd` (made with `isolate`), as the library's end
/// lines would.
pub fn remember_runs(cmd: &Command, program: &Path, lifetimes_ms: &[u32]) {
    let runs: Vec<(u32, Arm)> = lifetimes_ms.iter().map(|&ms| (ms, Arm::Plain)).collect();
    remember(cmd, program, &runs);
}

/// Records past runs of `program`, each with its lifetime and arm, in the
/// state directory of `cmd` (made with `isolate`).
pub fn remember(cmd: &Command, program: &Path, runs: &[(u32, Arm)]) {
    let program = std::fs::canonicalize(program).unwrap();
    let program = program.to_str().unwrap();
    let dir = tiexec::internal::state::StateDir::open(&state_dir_of(cmd)).expect("state dir");
    for &(ms, arm) in runs {
        dir.add_run(program, ms, arm).expect("record");
    }
}

pub use tiexec::internal::history::Arm;

/// The freshly built `libtiexec.so`: the release build that build.rs makes
/// and the CLI embeds (`cargo test` does not emit the cdylib itself).
pub fn preload_lib() -> PathBuf {
    built_by_build_rs(env!("TIEXEC_EMBEDDED_LIB"))
}

/// A finished child: what it printed and how it ended.
pub struct Outcome {
    pub command: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Outcome {
    /// Panics with the command, stdout and stderr unless `ok`.
    pub fn check(&self, ok: bool, what: &str) {
        assert!(ok, "{what}\n{self}");
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "command: {}\nstatus: {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.command, self.status, self.stdout, self.stderr
        )
    }
}

fn describe(cmd: &Command) -> String {
    // Debug shows the environment changes, the program and its arguments.
    format!("{cmd:?}")
}

/// Spawns, retrying while the program file is "busy": a test thread that
/// just wrote an executable (copy, compile) may race with another thread's
/// fork, whose child holds the written fd until it execs (ETXTBSY).
fn spawn(cmd: &mut Command, command: &str) -> Child {
    let mut tries = 0;
    loop {
        match cmd.spawn() {
            Ok(c) => return c,
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 50 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("spawn {command}: {e}"),
        }
    }
}

fn wait_with_deadline(child: &mut Child, timeout: Duration, command: &str) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("timed out after {timeout:?}: {command}");
            }
        }
    }
}

/// Runs `cmd` to completion (stdin closed), with a timeout.
pub fn run(cmd: &mut Command, timeout: Duration) -> Outcome {
    run_with_stdin(cmd, Stdio::null(), timeout)
}

/// Runs `cmd` to completion (stdin closed); `None` when it did not finish
/// within `timeout` (it is killed).
pub fn run_limited(cmd: &mut Command, timeout: Duration) -> Option<Outcome> {
    run_bounded(cmd, Stdio::null(), timeout)
}

/// Runs `cmd` reading `stdin`, collecting stdout and stderr; `None` when it
/// did not finish within `timeout` (it is killed).
fn run_bounded(cmd: &mut Command, stdin: Stdio, timeout: Duration) -> Option<Outcome> {
    let command = describe(cmd);
    let mut child = spawn(
        cmd.stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
        &command,
    );
    let mut out_pipe = child.stdout.take().expect("stdout");
    let mut err_pipe = child.stderr.take().expect("stderr");
    let out_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out_pipe.read_to_end(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err_pipe.read_to_end(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    status.map(|status| Outcome {
        command,
        status,
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    })
}

/// Runs `cmd` to completion reading `stdin`, with a timeout.
pub fn run_with_stdin(cmd: &mut Command, stdin: Stdio, timeout: Duration) -> Outcome {
    let command = describe(cmd);
    run_bounded(cmd, stdin, timeout)
        .unwrap_or_else(|| panic!("timed out after {timeout:?}: {command}"))
}

/// A fixture started with `wait`: it has run its calls, printed its
/// checksum, and now blocks until `finish` closes its stdin.
pub struct Waiting {
    pub command: String,
    pub child: Child,
    pub first_line: String,
    stdout: BufReader<std::process::ChildStdout>,
    stderr_thread: Option<std::thread::JoinHandle<Vec<u8>>>,
}

/// A fixture started, not yet seen ready.
struct Starting {
    command: String,
    child: Child,
    rx: std::sync::mpsc::Receiver<(BufReader<std::process::ChildStdout>, String, String)>,
    stderr_thread: Option<std::thread::JoinHandle<Vec<u8>>>,
}

impl Starting {
    fn ready(mut self, timeout: Duration) -> Waiting {
        let (stdout, first_line, ready) = match self.rx.recv_timeout(timeout) {
            Ok(v) => v,
            Err(_) => {
                let _ = self.child.kill();
                panic!("no 'ready' within {timeout:?}: {}", self.command);
            }
        };
        let w = Waiting {
            command: self.command,
            child: self.child,
            first_line,
            stdout,
            stderr_thread: self.stderr_thread,
        };
        if ready.trim() != "ready" {
            let o = w.finish(Duration::from_secs(10));
            panic!("fixture did not get ready (got {ready:?})\n{o}");
        }
        w
    }
}

impl Waiting {
    /// Starts `cmd` (whose program is a fixture run with `CALLS wait`) and
    /// waits for "ready".
    pub fn start(cmd: &mut Command, timeout: Duration) -> Waiting {
        Waiting::spawned(cmd).ready(timeout)
    }

    /// Starts every one of `cmds` at once, then waits for each to be ready:
    /// concurrent starts.
    pub fn start_all(cmds: &mut [Command], timeout: Duration) -> Vec<Waiting> {
        let started: Vec<Starting> = cmds.iter_mut().map(Waiting::spawned).collect();
        started.into_iter().map(|s| s.ready(timeout)).collect()
    }

    fn spawned(cmd: &mut Command) -> Starting {
        let command = describe(cmd);
        let mut child = spawn(
            cmd.stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
            &command,
        );
        let mut err_pipe = child.stderr.take().expect("stderr");
        let stderr_thread = Some(std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = err_pipe.read_to_end(&mut s);
            s
        }));
        let (tx, rx) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            let mut first = String::new();
            let mut ready = String::new();
            let _ = r.read_line(&mut first);
            let _ = r.read_line(&mut ready);
            let _ = tx.send((r, first, ready));
        });
        Starting {
            command,
            child,
            rx,
            stderr_thread,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Closes stdin, lets it finish, and collects everything.
    pub fn finish(mut self, timeout: Duration) -> Outcome {
        drop(self.child.stdin.take());
        let status = wait_with_deadline(&mut self.child, timeout, &self.command);
        let mut rest = String::new();
        let _ = self.stdout.read_to_string(&mut rest);
        let stderr = self
            .stderr_thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default();
        Outcome {
            command: self.command.clone(),
            status,
            stdout: format!("{}ready\n{}", self.first_line, rest),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
        }
    }
}

/// The load bias of `exe` in process `pid` (0 for non-PIE), from its
/// mappings still backed by the file (swapped ranges are anonymous; the data
/// segment always stays), by the tests' own reckoning (`witness::load_bias`).
pub fn load_bias(pid: u32, exe: &Path, elf: &goblin::elf::Elf) -> u64 {
    if elf.header.e_type != goblin::elf::header::ET_DYN {
        return 0;
    }
    let canon = std::fs::canonicalize(exe).expect("canon");
    let mappings: Vec<(u64, u64)> = proc_maps::read(pid)
        .iter()
        .filter(|v| Path::new(&v.path) == canon)
        .map(|v| (v.start, v.offset))
        .collect();
    witness::load_bias(elf, &mappings).unwrap_or_else(|| {
        panic!(
            "{} not mapped in {pid}: {mappings:x?}\n{}",
            exe.display(),
            std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default()
        )
    })
}

/// The executable segments of `exe` as mapped in process `pid` (page-rounded),
/// computed from the ELF file and the process's load address.
pub fn text_segments(pid: u32, exe: &Path) -> Vec<Range> {
    let bytes = std::fs::read(exe).expect("read exe");
    let elf = goblin::elf::Elf::parse(&bytes).expect("parse exe");
    let bias = load_bias(pid, exe, &elf);
    elf.program_headers
        .iter()
        .filter(|p| {
            p.p_type == goblin::elf::program_header::PT_LOAD
                && p.p_flags & goblin::elf::program_header::PF_X != 0
        })
        .map(|p| segment_pages(bias + p.p_vaddr, p.p_memsz))
        .collect()
}

/// Whether every executable segment of `exe` lies in process `pid` at an
/// address congruent with its file offset modulo the huge page size. A PIE
/// loads at a random base aligned to its segments' `p_align` (4 or 64 KiB),
/// so now and then (1 in 32 with 64 KiB) it lands congruent by chance, and
/// tiexec rightly treats it as such.
pub fn text_congruent(pid: u32, exe: &Path) -> bool {
    let bytes = std::fs::read(exe).expect("read exe");
    let elf = goblin::elf::Elf::parse(&bytes).expect("parse exe");
    let bias = load_bias(pid, exe, &elf);
    let huge = huge_page();
    elf.program_headers
        .iter()
        .filter(|p| {
            p.p_type == goblin::elf::program_header::PT_LOAD
                && p.p_flags & goblin::elf::program_header::PF_X != 0
        })
        .all(|p| (bias + p.p_vaddr) % huge == p.p_offset % huge)
}

/// Checks that every read-only segment of `exe` (text, headers, rodata)
/// holds in process `pid` the same bytes as in the file.
pub fn read_only_segments_match_file(pid: u32, exe: &Path) -> Result<(), String> {
    use std::os::unix::fs::FileExt;
    let bytes = std::fs::read(exe).map_err(|e| e.to_string())?;
    let elf = goblin::elf::Elf::parse(&bytes).map_err(|e| e.to_string())?;
    let bias = load_bias(pid, exe, &elf);
    let mem = File::open(format!("/proc/{pid}/mem")).map_err(|e| e.to_string())?;
    let mut checked = 0;
    for ph in elf.program_headers.iter().filter(|p| {
        p.p_type == goblin::elf::program_header::PT_LOAD
            && p.p_flags & goblin::elf::program_header::PF_W == 0
    }) {
        let addr = bias + ph.p_vaddr;
        let len = ph.p_filesz as usize;
        let mut live = vec![0u8; len];
        mem.read_exact_at(&mut live, addr)
            .map_err(|e| format!("read mem at {addr:#x}: {e}"))?;
        let file = &bytes[ph.p_offset as usize..ph.p_offset as usize + len];
        if live != file {
            let first = live.iter().zip(file).position(|(a, b)| a != b).unwrap_or(0);
            return Err(format!("bytes differ at {:#x}", addr + first as u64));
        }
        checked += 1;
    }
    if checked == 0 {
        return Err("no read-only segment".into());
    }
    Ok(())
}

/// What a fixture run under observation showed.
pub struct Seen {
    pub pid: u32,
    pub interior: u64,
    pub text: u64,
    /// See [`reachable_text`].
    pub reachable: u64,
    /// The maps lines around the text, while it ran (for failure messages).
    pub near: String,
    pub cov: Coverage,
    /// Whether every text segment was loaded congruent with its file
    /// offset modulo the huge page size (see [`text_congruent`]).
    pub congruent: bool,
    pub stdout_first: String,
    pub outcome: Outcome,
}

/// Starts `cmd` (a fixture in wait mode), reads the coverage of `object`'s
/// text and checks its read-only bytes while it waits, then lets it finish;
/// checks it exited 0, its bytes matched the file, and nothing was writable
/// and executable.
pub fn observe(cmd: &mut Command, object: &Path) -> Seen {
    let t = Duration::from_secs(120);
    let w = Waiting::start(cmd, t);
    let pid = w.pid();
    let segments = text_segments(pid, object);
    let interior = movable_interior(pid, object, &segments);
    let cov = coverage(pid, &segments);
    let reachable = reachable_text(pid, &segments, object);
    let near = maps_near(pid, &segments);
    let congruent = text_congruent(pid, object);
    let bytes = read_only_segments_match_file(pid, object);
    let wx = writable_executable_mappings(pid);
    let stdout_first = w.first_line.clone();
    let outcome = w.finish(t);
    let context = format!("segments {segments:x?}, coverage {cov:?}");
    outcome.check(outcome.status.success(), &format!("exit status; {context}"));
    outcome.check(
        bytes.is_ok(),
        &format!("bytes changed: {bytes:?}; {context}"),
    );
    outcome.check(wx.is_empty(), &format!("W+X mappings {wx:?}"));
    Seen {
        pid,
        interior,
        text: segments.iter().map(|s| s.len()).sum(),
        reachable,
        near,
        cov,
        congruent,
        stdout_first,
        outcome,
    }
}

/// As [`observe`], but the process is killed (SIGKILL) instead of let
/// finish: a server stopped the hard way.
pub fn observe_killed(cmd: &mut Command, object: &Path) -> Seen {
    let t = Duration::from_secs(120);
    let w = Waiting::start(cmd, t);
    let pid = w.pid();
    let segments = text_segments(pid, object);
    let interior = movable_interior(pid, object, &segments);
    let cov = coverage(pid, &segments);
    let reachable = reachable_text(pid, &segments, object);
    let near = maps_near(pid, &segments);
    let congruent = text_congruent(pid, object);
    let stdout_first = w.first_line.clone();
    // SAFETY: kill has no memory preconditions; `pid` is our child.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let outcome = w.finish(t);
    outcome.check(
        outcome.status.code().is_none(),
        "killed by the signal, as asked",
    );
    Seen {
        pid,
        interior,
        text: segments.iter().map(|s| s.len()).sum(),
        reachable,
        near,
        cov,
        congruent,
        stdout_first,
        outcome,
    }
}

/// Bytes of anonymous transparent huge pages process `pid` holds: its
/// private copies (hugetlb pages, of a cache image or private to it, are
/// counted by the cache's mount).
pub fn private_huge_bytes(pid: u32) -> u64 {
    proc_maps::read(pid).iter().map(|m| m.anon_huge).sum()
}

/// The huge page holding `exe`'s ELF header in process `pid`, when it lies
/// in the interior of one of its text `segments` (a merged r-x segment,
/// arm64's layout): tiexec leaves that page as it is (its mapping names the
/// program for symbolizers; only the page cache, in place, may map it
/// huge), so it is no part of what tiexec moves.
pub fn header_page(pid: u32, exe: &Path, segments: &[Range]) -> Option<Range> {
    let bytes = std::fs::read(exe).expect("read the program");
    let elf = goblin::elf::Elf::parse(&bytes).expect("parse the program");
    let huge = huge_page();
    let first_load = elf
        .program_headers
        .iter()
        .filter(|p| p.p_type == goblin::elf::program_header::PT_LOAD)
        .map(|p| p.p_vaddr)
        .min()
        .unwrap_or(0);
    let start = align_down(load_bias(pid, exe, &elf) + first_load, huge);
    let page = Range::new(start, start + huge);
    segments
        .iter()
        .any(|s| witness::interior(*s).contains(page))
        .then_some(page)
}

/// What tiexec moves of `exe`'s text in `pid`: the interior of its text
/// segments, less the huge page holding its ELF header.
pub fn movable_interior(pid: u32, exe: &Path, segments: &[Range]) -> u64 {
    planned_interior(segments) - header_page(pid, exe, segments).map_or(0, |p| p.len())
}

/// The 2 MiB-aligned interior of the segments: what must end up huge.
pub fn planned_interior(segments: &[Range]) -> u64 {
    segments.iter().map(|s| witness::interior(*s).len()).sum()
}

/// Coverage of the segments in `pid`, read from its smaps.
pub fn coverage(pid: u32, segments: &[Range]) -> Coverage {
    let mappings = proc_maps::read(pid);
    let mut c = Coverage::default();
    for s in segments {
        c.add(proc_maps::coverage(&mappings, *s));
    }
    c
}

/// The text bytes that can go on 2 MiB pages without changing anything
/// else: all of `segments` but the parts in a 2 MiB page that also holds
/// writable data (`object`'s writable segments, RELRO included, from its
/// ELF file), another object's pages or anonymous memory, a hole the loader
/// keeps between `object`'s segments (`---p`, as the planner refuses it:
/// only the object's readable bytes may share a page with text), or `object`'s ELF
/// header (whose mapping names the object to symbolizers: it stays the
/// file's, unless the page cache maps it huge). Unmapped gaps do not count:
/// a huge page may cover them. Read from `pid`'s maps after the swap and the
/// ELF file, independently of the product's planner.
pub fn reachable_text(pid: u32, segments: &[Range], object: &Path) -> u64 {
    use goblin::elf::program_header::{PF_W, PT_LOAD};
    use std::os::unix::fs::MetadataExt;
    let inode = std::fs::metadata(object).map(|m| m.ino()).unwrap_or(0);
    let bytes = std::fs::read(object).expect("read object");
    let elf = goblin::elf::Elf::parse(&bytes).expect("parse object");
    let bias = load_bias(pid, object, &elf);
    let loads = || elf.program_headers.iter().filter(|p| p.p_type == PT_LOAD);
    let writable: Vec<Range> = loads()
        .filter(|p| p.p_flags & PF_W != 0)
        .map(|p| segment_pages(bias + p.p_vaddr, p.p_memsz))
        .collect();
    let header = loads().find(|p| p.p_offset == 0).map(|p| bias + p.p_vaddr);
    let maps = proc_maps::read(pid);
    let blocked = |part: Range| {
        writable.iter().any(|w| w.intersect(part).is_some())
            || maps.iter().any(|m| {
                // A swap's result (anonymous or hugetlb, executable) covers
                // the whole 2 MiB page it took: that page was reachable. The
                // vDSO is anonymous and executable too, but another object.
                let kernel_object = m.path.starts_with('[') && !m.path.starts_with("[anon:tiexec:");
                let replacement = m.exec() && !kernel_object && (m.inode == 0 || m.is_hugetlb());
                // Another object's mapping, writable data, or a hole the
                // loader keeps in the object's reservation (`---p` of its
                // own file, between segments: on arm64 the 64 KiB alignment
                // leaves one after the text): none may become text. Only
                // unmapped space and the object's own readable bytes may.
                m.range().intersect(part).is_some()
                    && !replacement
                    && (m.perms.contains('w') || m.inode != inode || !m.perms.starts_with('r'))
            })
    };
    let mut reachable = 0;
    for s in segments {
        let mut lost = 0;
        let first = align_down(s.start, huge_page());
        let mut page_start = first;
        while page_start < s.end {
            let page = Range::new(page_start, page_start + huge_page());
            page_start = page.end;
            let Some(text_part) = page.intersect(*s) else {
                continue;
            };
            // A page found on 2 MiB pages (by the kernel from the page
            // cache, or by the swap through whatever way it found) was
            // reachable, whatever its neighbours.
            let huge_now = maps
                .iter()
                .any(|m| m.huge_bytes() > 0 && m.range().intersect(text_part).is_some());
            if huge_now {
                continue;
            }
            let holds_header = header.is_some_and(|h| page.start <= h && h < page.end);
            if holds_header
                || blocked(Range::new(page.start, text_part.start))
                || blocked(Range::new(text_part.end, page.end))
            {
                lost += text_part.len();
            }
        }
        reachable += s.len().saturating_sub(lost);
    }
    reachable
}

/// The lines of /proc/<pid>/maps within a huge page of `segments`.
pub fn maps_near(pid: u32, segments: &[Range]) -> String {
    let around: Vec<Range> = rounded_out(segments)
        .iter()
        .map(|r| Range::new(r.start.saturating_sub(huge_page()), r.end + huge_page()))
        .collect();
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            let Some((a, b)) = l.split_whitespace().next().and_then(|r| r.split_once('-')) else {
                return false;
            };
            let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) else {
                return false;
            };
            around
                .iter()
                .any(|r| r.intersect(Range::new(a, b)).is_some())
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The function symbols of `exe`: name -> (value, size).
#[allow(dead_code)]
pub fn functions(exe: &Path) -> std::collections::HashMap<String, (u64, u64)> {
    let bytes = std::fs::read(exe).expect("read exe");
    let elf = goblin::elf::Elf::parse(&bytes).expect("parse exe");
    elf.syms
        .iter()
        .filter(|s| s.is_function() && s.st_size > 0)
        .filter_map(|s| {
            Some((
                elf.strtab.get_at(s.st_name)?.to_string(),
                (s.st_value, s.st_size),
            ))
        })
        .collect()
}

/// Lines of /proc/<pid>/maps that are writable and executable at once.
pub fn writable_executable_mappings(pid: u32) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            let perms = l.split_whitespace().nth(1).unwrap_or("");
            perms.contains('w') && perms.contains('x')
        })
        .map(str::to_string)
        .collect()
}

/// The 2 MiB pages around `segments`: where a swap may legitimately put
/// anonymous or huge mappings (the aggressive strategy includes the read-only
/// neighbours of a head or tail).
pub fn rounded_out(segments: &[Range]) -> Vec<Range> {
    segments
        .iter()
        .map(|s| {
            Range::new(
                align_down(s.start, huge_page()),
                align_up(s.end, huge_page()),
            )
        })
        .collect()
}

/// Anonymous executable mappings outside the 2 MiB pages around `segments`
/// (a leaked trampoline or staging area would show here).
pub fn stray_executable_anon(pid: u32, segments: &[Range]) -> Vec<String> {
    let allowed = rounded_out(segments);
    proc_maps::read(pid)
        .into_iter()
        .filter(|v| v.exec() && (v.inode == 0 || v.is_hugetlb()) && !v.path.starts_with('['))
        .filter(|v| !allowed.iter().any(|s| s.contains(v.range())))
        .map(|v| format!("{:#x}-{:#x} {}", v.start, v.end, v.path))
        .collect()
}

/// Mappings outside the 2 MiB pages around `segments` that hold huge pages
/// (a leaked staging area would show here; the fixtures allocate nothing
/// huge themselves).
pub fn huge_memory_outside(pid: u32, segments: &[Range]) -> Vec<String> {
    let allowed = rounded_out(segments);
    proc_maps::read(pid)
        .into_iter()
        .filter(|v| v.huge_bytes() > 0)
        .filter(|v| !allowed.iter().any(|s| s.contains(v.range())))
        .map(|v| {
            format!(
                "{:#x}-{:#x} {} huge {}",
                v.start,
                v.end,
                v.path,
                v.huge_bytes()
            )
        })
        .collect()
}

/// A private hugetlbfs mount serving as the image cache for a test's
/// processes (`TIEXEC_CACHE`), with its own pool pages (`size` and
/// `min_size` both `pages`). Unmounted (lazily: processes may still map
/// images) and removed on drop, before the pool is put back.
pub struct CacheMount {
    pub path: PathBuf,
    pub pages: u64,
    _pool: PoolGuard,
}

impl CacheMount {
    /// Sets the pool to `pool` pages and mounts a cache of `pages` of them.
    /// `None` (and a note) without root.
    pub fn new(name: &str, pages: u64, pool: u64) -> Option<CacheMount> {
        let guard = PoolGuard::set(pool)?;
        let path = scratch_dir()
            .join("caches")
            .join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&path);
        let huge_mib = huge_page() >> 20;
        let opts = format!(
            "pagesize={huge_mib}M,size={mib}M,min_size={mib}M,mode=1777",
            mib = pages * huge_mib
        );
        let o = run(
            Command::new("mount")
                .args(["-t", "hugetlbfs", "-o", &opts, "none"])
                .arg(&path),
            Duration::from_secs(30),
        );
        if !o.status.success() {
            skip(format_args!("cannot mount hugetlbfs (not root?)\n{o}"));
            return None;
        }
        Some(CacheMount {
            path,
            pages,
            _pool: guard,
        })
    }

    /// The images (not lock files) in the cache, for every user.
    pub fn images(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for user in std::fs::read_dir(&self.path)
            .into_iter()
            .flatten()
            .flatten()
        {
            for e in std::fs::read_dir(user.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                let name = e.file_name().to_string_lossy().into_owned();
                if tiexec::internal::cache::parse_name(&name).is_some() {
                    out.push(e.path());
                }
            }
        }
        out.sort();
        out
    }

    /// Pages in use by the mount's files now (statfs).
    pub fn used_pages(&self) -> u64 {
        let c = std::ffi::CString::new(self.path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: an all-zero statfs is valid; `c` is NUL-terminated.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: valid path and out-pointer.
        assert_eq!(unsafe { libc::statfs(c.as_ptr(), &mut st) }, 0);
        st.f_blocks - st.f_bfree
    }
}

impl Drop for CacheMount {
    fn drop(&mut self) {
        let c = std::ffi::CString::new(self.path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a NUL-terminated path of our own mount.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// The sysfs directory of the pool of the kernel's huge page size.
fn pool_dir() -> String {
    witness::pool_dir()
}

/// Holds `pages` hugetlb pages free and unreserved for the life of the
/// guard, exclusive across test threads and test processes; restores the
/// pool's old size on drop.
///
/// Pages other owners already hold (a `tiexec --setup` cache mount's
/// `min_size`, a database's shared memory, another user's mapping) are left
/// alone and not counted: the pool is sized to those plus `pages`, so a
/// test sees exactly `pages` it can take, on a fresh machine or a busy one.
pub struct PoolGuard {
    old: u64,
    _lock: File,
    _thread: MutexGuard<'static, ()>,
}

fn read_pool_file(name: &str) -> Option<u64> {
    std::fs::read_to_string(format!("{}/{name}", pool_dir()))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// (pool size, pages held by others: in use or reserved, free for anyone).
fn read_pool() -> Option<(u64, u64, u64)> {
    let total = read_pool_file("nr_hugepages")?;
    let free = read_pool_file("free_hugepages")?;
    let reserved = read_pool_file("resv_hugepages")?;
    let held = total.saturating_sub(free) + reserved;
    Some((total, held, free.saturating_sub(reserved)))
}

/// Pool pages free and not reserved by anyone: what a new mapping can take.
pub fn pool_pages_available() -> Option<u64> {
    read_pool().map(|(_, _, available)| available)
}

impl PoolGuard {
    /// Makes exactly `pages` pool pages free for the taking. `None` (and a
    /// note on stderr) when this process may not change the pool (not
    /// root) or the kernel cannot find the memory: the caller skips its test.
    pub fn set(pages: u64) -> Option<PoolGuard> {
        static IN_PROCESS: OnceLock<Mutex<()>> = OnceLock::new();
        let thread = IN_PROCESS
            .get_or_init(|| Mutex::new(()))
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let lock_path = std::env::temp_dir().join("tiexec-tests-hugetlb-pool.lock");
        let lock = match File::create(&lock_path) {
            Ok(f) => f,
            Err(e) => {
                skip(format_args!("the pool's lock {}: {e}", lock_path.display()));
                return None;
            }
        };
        use std::os::fd::AsRawFd;
        // SAFETY: a valid open fd; flock blocks until the other holder ends.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            skip(format_args!(
                "locking {}: {}",
                lock_path.display(),
                std::io::Error::last_os_error()
            ));
            return None;
        }
        let Some((old, held, _)) = read_pool() else {
            skip(format_args!(
                "cannot read the hugetlb pool in {}",
                pool_dir()
            ));
            return None;
        };
        let write = |n: u64| {
            std::fs::OpenOptions::new()
                .write(true)
                .open(format!("{}/nr_hugepages", pool_dir()))
                .and_then(|mut f| f.write_all(format!("{n}\n").as_bytes()))
        };
        if write(held + pages).is_err() {
            skip("cannot set the hugetlb pool (not root?)");
            return None;
        }
        let (_, held_now, available) = read_pool().unwrap_or((0, 0, 0));
        if available != pages {
            skip(format_args!(
                "hugetlb pool: {available} pages free for the test, not {pages} \
                 ({held_now} held by others)"
            ));
            let _ = write(old);
            return None;
        }
        Some(PoolGuard {
            old,
            _lock: lock,
            _thread: thread,
        })
    }
}

impl Drop for PoolGuard {
    fn drop(&mut self) {
        let _ = std::fs::write(
            format!("{}/nr_hugepages", pool_dir()),
            format!("{}\n", self.old),
        );
    }
}

/// The stdout a fixture gives without tiexec.
pub fn plain_run(exe: &Path, args: &[&str]) -> Outcome {
    let o = run(Command::new(exe).args(args), Duration::from_secs(60));
    o.check(o.status.success() || !args.is_empty(), "plain fixture run");
    o
}

/// True when a thread of `pid` is blocked reading its standard input (the
/// program reached `main` and waits for what a test will write): the
/// `read(0, ...)` system call in `/proc/PID/task/*/syscall`.
pub fn blocked_reading_stdin(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.filter_map(Result::ok).any(|t| {
        let call = std::fs::read_to_string(t.path().join("syscall")).unwrap_or_default();
        let mut words = call.split_whitespace();
        words.next() == Some(&libc::SYS_read.to_string()) && words.next() == Some("0x0")
    })
}

/// The processes descended from `ancestor` whose executable is `exe`.
pub fn descendants_running(ancestor: u32, exe: &Path) -> Vec<u32> {
    let parent_of = |pid: u32| -> Option<u32> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // After the command name's closing parenthesis: state, then ppid.
        stat.rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|p| p == exe))
        .filter(|&pid| {
            let mut at = pid;
            for _ in 0..16 {
                match parent_of(at) {
                    Some(p) if p == ancestor => return true,
                    Some(p) if p > 1 => at = p,
                    _ => return false,
                }
            }
            false
        })
        .collect()
}

/// Waits (up to `timeout`) until `found()` names a process blocked reading
/// its standard input; returns it.
pub fn wait_until_reading_stdin(found: impl Fn() -> Option<u32>, timeout: Duration) -> Option<u32> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(pid) = found().filter(|&p| blocked_reading_stdin(p)) {
            return Some(pid);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

/// The uid of a second, unprivileged user (made once, `tiexec-other`: a
/// system user without a home directory, as services have), or a skip.
pub fn other_user() -> Option<u32> {
    let id = |name: &str| {
        Command::new("id")
            .args(["-u", name])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
    };
    if let Some(uid) = id("tiexec-other") {
        return Some(uid);
    }
    let o = run(
        Command::new("useradd").args(["--system", "--no-create-home", "tiexec-other"]),
        Duration::from_secs(60),
    );
    if !o.status.success() {
        skip(format_args!("cannot add a second user\n{o}"));
        return None;
    }
    id("tiexec-other")
}
