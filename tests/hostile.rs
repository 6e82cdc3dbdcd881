//! Hostile process states and environments: whatever happens, the program
//! runs on with its original text, byte for byte (issue: robustness).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{PoolGuard, Waiting, PIE};

const T: Duration = Duration::from_secs(120);
const CALLS: &str = "100000";

fn hostile() -> PathBuf {
    static BUILD: Mutex<()> = Mutex::new(());
    let _one = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    common::fixture::build_hostile(&common::scratch_dir().join("fixtures"))
}

struct Seen {
    cov: common::Coverage,
    interior: u64,
    o: common::Outcome,
}

/// Runs the PIE fixture through `launcher` (hostile MODE, or nothing) with
/// the preload and `env`, and checks it is unharmed.
fn run_fixture(launcher: &[&str], env: &[(&str, &str)]) -> Seen {
    let exe = common::fixture(PIE);
    let plain = common::run(Command::new(&exe).args([CALLS, "run"]), T);
    let mut cmd = match launcher.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(&exe);
            c
        }
        None => Command::new(&exe),
    };
    common::isolate(&mut cmd).env("LD_PRELOAD", common::preload_lib());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let w = Waiting::start(cmd.args([CALLS, "wait"]), T);
    let pid = w.pid();
    let segments = common::text_segments(pid, &exe);
    let interior = common::movable_interior(pid, &exe, &segments);
    let cov = common::coverage(pid, &segments);
    let bytes = common::read_only_segments_match_file(pid, &exe);
    let wx = common::writable_executable_mappings(pid);
    let leaked = common::huge_memory_outside(pid, &segments);
    let first = w.first_line.clone();
    let o = w.finish(T);
    let what = format!("{launcher:?} {env:?}: coverage {cov:?}");
    o.check(
        o.status.success() && first == plain.stdout,
        &format!("{what}: runs the same"),
    );
    o.check(bytes.is_ok(), &format!("{what}: bytes {bytes:?}"));
    o.check(
        wx.is_empty() && leaked.is_empty(),
        &format!("{what}: {wx:?} {leaked:?}"),
    );
    Seen { cov, interior, o }
}

/// Said `says`, and left the bulk of the text as it was (the 2 MiB page
/// holding the program's header is a copy of its own: small enough, it may
/// still be made under a limit that refuses the rest).
fn bulk_untouched(s: &Seen, says: &str) {
    s.o.check(
        s.cov.hugetlb == 0 && s.cov.anon_thp <= 2 << 20,
        "text left as it was",
    );
    s.o.check(s.o.stderr.contains(says), &format!("says: {says}"));
}

fn untouched(s: &Seen, says: &str) {
    s.o.check(
        s.cov.anon_thp == 0 && s.cov.hugetlb == 0,
        "text left as it was",
    );
    s.o.check(s.o.stderr.contains(says), &format!("says: {says}"));
}

#[test]
fn a_seccomp_filter_refusing_mremap_leaves_the_text() {
    let h = hostile();
    let s = run_fixture(
        &[h.to_str().unwrap(), "seccomp-mremap"],
        &[("TIEXEC_BACKEND", "thp")],
    );
    untouched(&s, "mremap over the text failed: EPERM");
}

#[test]
fn a_seccomp_filter_refusing_madvise_leaves_the_text() {
    let h = hostile();
    let s = run_fixture(
        &[h.to_str().unwrap(), "seccomp-madvise"],
        &[("TIEXEC_BACKEND", "thp")],
    );
    untouched(&s, "madvise(MADV_HUGEPAGE) failed: EPERM");
}

#[test]
fn a_seccomp_filter_refusing_memfd_leaves_pool_copies_undone() {
    // Private pool copies are built in a memfd (so the text never has to be
    // writable and executable): refused, the text stays as it was.
    let Some(_pool) = PoolGuard::set(64) else {
        return;
    };
    let h = hostile();
    let s = run_fixture(
        &[h.to_str().unwrap(), "seccomp-memfd"],
        &[("TIEXEC_BACKEND", "hugetlb")],
    );
    untouched(&s, "mmap of huge pages failed: EPERM");
}

#[test]
fn a_seccomp_filter_refusing_map_hugetlb_does_not_stop_pool_copies() {
    // Nothing tiexec maps uses MAP_HUGETLB: hugetlb pages come from files.
    let Some(_pool) = PoolGuard::set(64) else {
        return;
    };
    let h = hostile();
    let s = run_fixture(
        &[h.to_str().unwrap(), "seccomp-hugetlb"],
        &[("TIEXEC_BACKEND", "hugetlb"), ("TIEXEC_LOG", "info")],
    );
    s.o.check(s.cov.hugetlb >= s.interior, "on the pool's pages");
    s.o.check(s.o.stderr.contains("new via hugetlb"), "reported");
}

#[test]
fn thp_disabled_for_the_process_means_nothing_is_done() {
    let h = hostile();
    let s = run_fixture(
        &[h.to_str().unwrap(), "thp-off"],
        &[("TIEXEC_BACKEND", "thp")],
    );
    untouched(&s, "transparent huge pages are disabled");
}

#[test]
fn a_tight_address_space_limit_leaves_the_text() {
    // The fixture's address space with tiexec loaded but doing nothing, plus
    // 16 MiB: enough to run, not for a 34 MiB copy.
    let exe = common::fixture(PIE);
    let w = Waiting::start(
        common::preloaded(&exe, &[("TIEXEC_BACKEND", "off")]).args(["1", "wait"]),
        T,
    );
    let status = std::fs::read_to_string(format!("/proc/{}/status", w.pid())).unwrap();
    w.finish(T);
    let vm_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmPeak:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    let h = hostile();
    // 16 MiB of room: too little for tiexec to start working at all.
    let limit = (vm_kib + 16 * 1024) * 1024;
    let s = run_fixture(
        &[h.to_str().unwrap(), &format!("rlimit-as={limit}")],
        &[("TIEXEC_BACKEND", "thp")],
    );
    untouched(&s, "address-space limit (RLIMIT_AS) leaves only");
    untouched(&s, "left alone");
    // 80 MiB: enough to start, not for a 34 MiB copy and the margin kept.
    let limit = (vm_kib + 80 * 1024) * 1024;
    let s = run_fixture(
        &[h.to_str().unwrap(), &format!("rlimit-as={limit}")],
        &[("TIEXEC_BACKEND", "thp")],
    );
    bulk_untouched(&s, "for the copy");
}

/// A memory cgroup of our own below the one this test runs in (v1 or v2),
/// with a limit; removed on drop.
struct Cgroup(PathBuf);

impl Cgroup {
    fn with_limit(bytes: u64) -> Option<Cgroup> {
        let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
        let (dir, limit_file) = own.lines().find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
            if controllers.is_empty() {
                Some((format!("/sys/fs/cgroup{path}"), "memory.max"))
            } else if controllers.split(',').any(|c| c == "memory") {
                Some((
                    format!("/sys/fs/cgroup/memory{path}"),
                    "memory.limit_in_bytes",
                ))
            } else {
                None
            }
        })?;
        let cg = Path::new(&dir).join(format!("tiexec-test-{}", std::process::id()));
        std::fs::create_dir(&cg).ok()?;
        if std::fs::write(cg.join(limit_file), bytes.to_string()).is_err() {
            let _ = std::fs::remove_dir(&cg);
            return None;
        }
        Some(Cgroup(cg))
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            if std::fs::remove_dir(&self.0).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn a_tight_memory_cgroup_is_not_pushed_into_an_oom_kill() {
    // 80 MiB: the fixture and tiexec fit, a 30 MiB copy plus the 64 MiB
    // kept free does not.
    let Some(cg) = Cgroup::with_limit(80 << 20) else {
        common::skip("cannot make a memory cgroup here");
        return;
    };
    let h = hostile();
    let s = run_fixture(
        &[h.to_str().unwrap(), &format!("cgroup={}", cg.0.display())],
        &[("TIEXEC_BACKEND", "thp")],
    );
    bulk_untouched(&s, "memory cgroup limit leaves only");
}

#[test]
fn fifty_processes_competing_for_ten_pages_all_run_correctly() {
    let Some(_pool) = PoolGuard::set(10) else {
        return;
    };
    let exe = common::fixture(PIE);
    let plain = common::run(Command::new(&exe).args(["20000", "run"]), T);
    let children: Vec<_> = (0..50)
        .map(|i| {
            common::preloaded(
                &exe,
                &[(
                    "TIEXEC_BACKEND",
                    if i % 2 == 0 { "auto" } else { "hugetlb" },
                )],
            )
            .args(["20000", "run"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn")
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().expect("wait");
        assert!(out.status.success(), "{out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout), plain.stdout);
    }
}

#[test]
fn a_fork_after_the_swap_with_the_pool_exhausted_does_not_kill_the_child() {
    // Ten pages, all taken by the swap; then the child runs every function.
    let Some(_pool) = PoolGuard::set(10) else {
        return;
    };
    let exe = common::fixture(PIE);
    let plain = common::run(Command::new(&exe).args(["1000", "fork"]), T);
    plain.check(plain.stdout.contains("child exited"), "plain fork");
    let o = common::run(
        common::preloaded(
            &exe,
            &[("TIEXEC_BACKEND", "hugetlb"), ("TIEXEC_LOG", "info")],
        )
        .args(["1000", "fork"]),
        T,
    );
    o.check(
        o.stdout == plain.stdout,
        "the child ran every function and exited the same way",
    );
    o.check(
        o.stderr.contains("5 new via hugetlb") || o.stderr.contains("10 new via hugetlb"),
        "used the pool",
    );
    assert_eq!(
        common::pool_pages_available(),
        Some(10),
        "the pages came back after exit"
    );
}

#[test]
fn signals_sprayed_during_the_swap_do_no_harm() {
    // A library listed after tiexec's runs its constructor first: it installs
    // handlers for SIGALRM and SIGUSR1, says so, and waits for a byte on
    // stdin. The test then starts sending SIGALRM, SIGCHLD and SIGUSR1 as
    // fast as it can, releases it, and goes on until the program exits: the
    // signals rain on tiexec's constructor while it swaps.
    use std::io::{BufRead, BufReader, Read, Write};
    let dir = common::scratch_dir().join("fixtures");
    let handlers = {
        static BUILD: Mutex<()> = Mutex::new(());
        let _one = BUILD.lock().unwrap_or_else(|e| e.into_inner());
        common::fixture::build_signal_handlers(&dir)
    };
    let exe = common::fixture(PIE);
    let plain = common::run(Command::new(&exe).args([CALLS, "run"]), T);
    let mut preload = common::preload_lib().into_os_string();
    preload.push(":");
    preload.push(&handlers);
    for round in 0..10 {
        let mut child = common::preloaded(&exe, &[("TIEXEC_BACKEND", "thp")])
            .env("LD_PRELOAD", &preload)
            .args([CALLS, "run"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn");
        let pid = child.id() as i32;
        let mut err = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        err.read_line(&mut line).unwrap();
        assert_eq!(line, "handlers installed\n", "round {round}");
        let spray = |n: usize| {
            for _ in 0..n {
                for sig in [libc::SIGALRM, libc::SIGCHLD, libc::SIGUSR1] {
                    // SAFETY: signalling our own child, alive until this
                    // thread reaps it.
                    unsafe { libc::kill(pid, sig) };
                }
            }
        };
        spray(100);
        child.stdin.take().unwrap().write_all(b"x").unwrap();
        let started = Instant::now();
        let mut sent = 300u64;
        while child.try_wait().expect("wait").is_none() && started.elapsed() < T {
            spray(1);
            sent += 3;
        }
        let status = child.wait().expect("wait");
        let mut stdout = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut stdout)
            .unwrap();
        let mut rest = String::new();
        err.read_to_string(&mut rest).unwrap();
        assert!(
            status.success(),
            "round {round}: {status:?} after {sent} signals; {rest}"
        );
        assert_eq!(stdout, plain.stdout, "round {round}");
        assert!(rest.is_empty(), "tiexec said: {rest}");
    }
}
