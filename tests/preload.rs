//! libtiexec.so preloaded into generated fixtures with tens of MiB of text:
//! output unchanged, coverage read from the running fixture's smaps, text
//! bytes unchanged, nothing writable+executable or leaked.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::time::Duration;

use common::{PoolGuard, Spec, Waiting, MERGED_RX, NON_PIE, PIE, TWO_SEGMENTS};

const CALLS: &str = "200000";
const T: Duration = Duration::from_secs(120);

/// What the kernel must show for the text after the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// The interior on hugetlb pages (or already huge by the kernel).
    Hugetlb,
    /// The interior on THP (anonymous, or the kernel's file THP).
    Thp,
    /// Text as it was: nothing of ours (no hugetlb, no anonymous THP).
    Untouched,
}

use common::preloaded;

/// Runs `spec` under the preload with `env`, checks everything the kernel
/// shows while it waits, and returns its stderr.
fn run_and_check(spec: Spec, env: &[(&str, &str)], expect: Expect) -> String {
    run_prepared_and_check(spec, env, expect, |_, _| {})
}

/// As [`run_and_check`], after `prepare(command, program)` (e.g. to give
/// the program a run history).
fn run_prepared_and_check(
    spec: Spec,
    env: &[(&str, &str)],
    expect: Expect,
    prepare: impl FnOnce(&Command, &std::path::Path),
) -> String {
    let exe = common::fixture(spec);
    let plain = common::plain_run(&exe, &[CALLS, "run"]);
    let mut cmd = preloaded(&exe, env);
    prepare(&cmd, &exe);
    let w = Waiting::start(cmd.args([CALLS, "wait"]), T);
    let pid = w.pid();
    let segments = common::text_segments(pid, &exe);
    let interior = common::planned_interior(&segments);
    // The huge page holding the program's ELF header stays as it is.
    let header_page = common::header_page(pid, &exe, &segments).map_or(0, |p| p.len());
    let cov = common::coverage(pid, &segments);
    let text_check = common::read_only_segments_match_file(pid, &exe);
    let wx = common::writable_executable_mappings(pid);
    let stray = common::stray_executable_anon(pid, &segments);
    let huge_elsewhere = common::huge_memory_outside(pid, &segments);
    let reachable = common::reachable_text(pid, &segments, &exe);
    let first_line = w.first_line.clone();
    let o = w.finish(T);
    let context = format!("{o}\nsegments {segments:x?}\ninterior {interior}\ncoverage {cov:?}");

    o.check(o.status.success(), &format!("fixture failed\n{context}"));
    o.check(
        first_line == plain.stdout,
        &format!(
            "output differs from plain run:\nplain: {}\n{context}",
            plain.stdout
        ),
    );
    o.check(
        text_check.is_ok(),
        &format!("text bytes changed: {text_check:?}\n{context}"),
    );
    o.check(
        wx.is_empty(),
        &format!("writable+executable mappings: {wx:?}\n{context}"),
    );
    o.check(
        stray.is_empty(),
        &format!("leaked executable mappings: {stray:?}\n{context}"),
    );
    o.check(
        huge_elsewhere.is_empty(),
        &format!("huge pages outside the text (leaked staging?): {huge_elsewhere:?}\n{context}"),
    );
    assert!(
        interior >= 20 << 20 || expect == Expect::Untouched,
        "fixture too small: {context}"
    );
    // The share on 2 MiB pages of the text that can be, head and tail
    // included (printed: the arm64 runs report it).
    let text: u64 = segments.iter().map(|s| s.len()).sum();
    let share = cov.huge() as f64 / reachable.max(1) as f64;
    eprintln!(
        "{}: {:.1} % of its reachable text on {} pages ({:.1} of {:.1} MiB; all text {:.1} MiB)",
        spec.name,
        share * 100.0,
        common::witness::huge_page_name(),
        cov.huge() as f64 / 1048576.0,
        reachable as f64 / 1048576.0,
        text as f64 / 1048576.0,
    );
    if expect != Expect::Untouched {
        o.check(
            share >= 0.95,
            &format!("less than 95 % of the reachable text on 2 MiB pages\n{context}"),
        );
    }
    match expect {
        Expect::Hugetlb => o.check(
            cov.hugetlb + cov.file_thp >= interior - header_page,
            &format!("interior not on hugetlb pages\n{context}"),
        ),
        Expect::Thp => o.check(
            cov.anon_thp + cov.file_thp >= interior - header_page,
            &format!("interior not on THP\n{context}"),
        ),
        Expect::Untouched => o.check(
            cov.hugetlb == 0 && cov.anon_thp == 0,
            &format!("text was changed although it should not be\n{context}"),
        ),
    }
    o.stderr
}

#[test]
fn pie_on_thp() {
    run_and_check(PIE, &[("TIEXEC_BACKEND", "thp")], Expect::Thp);
}

#[test]
fn non_pie_on_thp() {
    run_and_check(NON_PIE, &[("TIEXEC_BACKEND", "thp")], Expect::Thp);
}

#[test]
fn rx_segment_with_headers_and_rodata_on_thp() {
    // The output line prints rodata and a written global: both must work.
    run_and_check(MERGED_RX, &[("TIEXEC_BACKEND", "thp")], Expect::Thp);
}

#[test]
fn two_executable_segments_on_thp() {
    let exe = common::fixture(TWO_SEGMENTS);
    let w = Waiting::start(Command::new(&exe).args(["1", "wait"]), T);
    let segments = common::text_segments(w.pid(), &exe);
    w.finish(T);
    assert_eq!(segments.len(), 2, "fixture must have two R E segments");
    run_and_check(TWO_SEGMENTS, &[("TIEXEC_BACKEND", "thp")], Expect::Thp);
}

#[test]
fn pie_on_hugetlb_with_a_filled_pool() {
    let Some(_pool) = PoolGuard::set(64) else {
        return;
    };
    let err = run_and_check(
        PIE,
        &[("TIEXEC_BACKEND", "hugetlb"), ("TIEXEC_LOG", "info")],
        Expect::Hugetlb,
    );
    assert!(err.contains("via hugetlb"), "{err}");
}

#[test]
fn non_pie_and_merged_rx_on_hugetlb_with_a_filled_pool() {
    let Some(_pool) = PoolGuard::set(64) else {
        return;
    };
    run_and_check(NON_PIE, &[("TIEXEC_BACKEND", "hugetlb")], Expect::Hugetlb);
    run_and_check(MERGED_RX, &[("TIEXEC_BACKEND", "hugetlb")], Expect::Hugetlb);
}

#[test]
fn auto_never_takes_the_pool() {
    // A program preloaded by hand is one the user named: its first run
    // gets a copy, on THP, never from the pool, which belongs to the
    // machine's programs.
    let Some(_pool) = PoolGuard::set(64) else {
        return;
    };
    let exe = common::fixture(PIE);
    let plain = common::plain_run(&exe, &[CALLS, "run"]);
    let mut cmd = preloaded(&exe, &[("TIEXEC_LOG", "info")]);
    let o = common::run(cmd.args([CALLS, "run"]), T);
    o.check(
        o.status.success() && o.stdout == plain.stdout,
        "runs the same",
    );
    o.check(
        o.stderr.contains("first run of a program named to tiexec") && o.stderr.contains("via thp"),
        "a named program's first run is copied, to THP",
    );
    o.check(
        common::pool_pages_available() == Some(64),
        "the pool is untouched",
    );
}

#[test]
fn auto_copies_to_thp_for_a_program_known_to_run_long() {
    // A filled pool stays untouched: it belongs to the machine's programs.
    let Some(_pool) = PoolGuard::set(64) else {
        return;
    };
    let err = run_prepared_and_check(PIE, &[("TIEXEC_LOG", "info")], Expect::Thp, |cmd, exe| {
        common::remember_runs(cmd, exe, &[600_000, 900_000, 3_600_000])
    });
    assert!(err.contains("via thp"), "{err}");
}

#[test]
fn hugetlb_alone_with_an_empty_pool_leaves_the_text_and_says_so() {
    let Some(_pool) = PoolGuard::set(0) else {
        return;
    };
    // Default log level: this one line is the only thing tiexec says.
    let err = run_and_check(PIE, &[("TIEXEC_BACKEND", "hugetlb")], Expect::Untouched);
    let ours: Vec<&str> = err.lines().filter(|l| l.starts_with("tiexec:")).collect();
    assert_eq!(ours.len(), 1, "{err}");
    assert!(
        ours[0].contains("nothing moved: hugetlb pool has no free pages"),
        "{err}"
    );
}

#[test]
fn hugetlb_with_a_pool_smaller_than_the_text_covers_part_and_runs() {
    let Some(_pool) = PoolGuard::set(4) else {
        return;
    };
    let exe = common::fixture(PIE);
    let plain = common::plain_run(&exe, &[CALLS, "run"]);
    let w = Waiting::start(
        preloaded(
            &exe,
            &[("TIEXEC_BACKEND", "hugetlb"), ("TIEXEC_LOG", "info")],
        )
        .args([CALLS, "wait"]),
        T,
    );
    let pid = w.pid();
    let segments = common::text_segments(pid, &exe);
    let cov = common::coverage(pid, &segments);
    let text_check = common::read_only_segments_match_file(pid, &exe);
    let first = w.first_line.clone();
    let o = w.finish(T);
    o.check(o.status.success() && first == plain.stdout, "output");
    o.check(text_check.is_ok(), &format!("{text_check:?}"));
    // The pool's 4 pages are used, the rest stays as it was. (The first
    // 2 MiB page, which holds the program's header, takes no pool page.
    // Where the random load address puts the text's start in the next
    // 2 MiB page, that pool page holds some bytes before the text.)
    o.check(
        cov.hugetlb > 3 << 21 && cov.hugetlb <= 4 << 21,
        &format!("{cov:?}"),
    );
    o.check(
        o.stderr.contains("(4 pages: 4 new via hugetlb"),
        "all four pages used",
    );
    o.check(cov.anon_thp == 0, &format!("{cov:?}"));
    o.check(
        o.stderr
            .contains("left on 4 KiB pages: mmap of huge pages failed"),
        "says so",
    );
}

/// Text moves to the kernel's own PMD-level pages, whatever they are: 2 MiB
/// here, 32 MiB on an arm64 kernel with 16 KiB pages (tests/arm64_vm.rs
/// boots one). 64 MiB programs hold whole huge pages of any of those sizes;
/// for a 32 MiB PIE at a random base the planner may find none, and then
/// it must say so.
#[test]
fn text_moves_to_the_kernels_own_huge_pages() {
    use common::{NON_PIE_64, PIE_64};
    let huge = common::witness::huge_page();
    let name = common::witness::huge_page_name();
    for spec in [PIE_64, NON_PIE_64, PIE] {
        let exe = common::fixture(spec);
        let plain = common::plain_run(&exe, &[CALLS, "run"]);
        let pages = (spec.text_mib << 20) / huge + 3;
        let Some(_pool) = PoolGuard::set(pages) else {
            return;
        };
        for backend in ["thp", "hugetlb"] {
            let w = Waiting::start(
                preloaded(&exe, &[("TIEXEC_BACKEND", backend), ("TIEXEC_LOG", "info")])
                    .args([CALLS, "wait"]),
                T,
            );
            let pid = w.pid();
            let segments = common::text_segments(pid, &exe);
            let cov = common::coverage(pid, &segments);
            let reachable = common::reachable_text(pid, &segments, &exe);
            let bytes = common::read_only_segments_match_file(pid, &exe);
            let wx = common::writable_executable_mappings(pid);
            let first = w.first_line.clone();
            let o = w.finish(T);
            let what = format!(
                "{} on {backend} with {name} pages: {:.1} of {:.1} MiB reachable on huge pages",
                spec.name,
                cov.huge() as f64 / 1048576.0,
                reachable as f64 / 1048576.0
            );
            eprintln!("{what}");
            o.check(o.status.success() && first == plain.stdout, &what);
            o.check(
                bytes.is_ok() && wx.is_empty(),
                &format!("{what}: {bytes:?} {wx:?}"),
            );
            if reachable == 0 {
                o.check(
                    cov.hugetlb == 0 && cov.anon_thp == 0 && o.stderr.contains("tiexec:"),
                    &format!("{what}: nothing to move, and it says so"),
                );
            } else {
                o.check(
                    cov.huge() as f64 >= 0.95 * reachable as f64,
                    &format!("{what}: at least 95 %"),
                );
            }
            if spec.text_mib >= 64 {
                o.check(reachable >= huge, &format!("{what}: a whole huge page"));
            }
        }
    }
}

#[test]
fn off_does_nothing() {
    let err = run_and_check(
        PIE,
        &[("TIEXEC_BACKEND", "off"), ("TIEXEC_LOG", "info")],
        Expect::Untouched,
    );
    assert!(!err.contains("tiexec:"), "{err}");
}

#[test]
fn silent_at_the_default_level_when_all_is_well() {
    let exe = common::fixture(PIE);
    let o = common::run(
        preloaded(&exe, &[("TIEXEC_BACKEND", "thp")]).args([CALLS, "run"]),
        T,
    );
    o.check(
        o.status.success() && o.stderr.is_empty(),
        "expected no stderr",
    );
}

#[test]
fn bad_settings_are_reported_once_and_the_program_runs() {
    let exe = common::fixture(PIE);
    let plain = common::plain_run(&exe, &[CALLS, "run"]);
    let o = common::run(
        preloaded(
            &exe,
            &[("TIEXEC_BACKEND", "fastest"), ("TIEXEC_CHILDREN", "maybe")],
        )
        .args([CALLS, "run"]),
        T,
    );
    o.check(
        o.status.success() && o.stdout == plain.stdout,
        "program must run unchanged",
    );
    let lines: Vec<&str> = o.stderr.lines().collect();
    o.check(lines.len() == 2, "one line per bad variable");
    o.check(
        lines[0].contains("TIEXEC_BACKEND=\"fastest\": expected auto|cache|hugetlb|thp|off"),
        "names the variable, the value and what is accepted",
    );
}

#[test]
fn exit_status_and_signals_are_the_programs() {
    let exe = common::fixture(PIE);
    let o = common::run(
        preloaded(&exe, &[("TIEXEC_BACKEND", "thp")]).args(["1000", "run", "3"]),
        T,
    );
    o.check(o.status.code() == Some(3), "exit status 3 expected");

    let w = Waiting::start(
        preloaded(&exe, &[("TIEXEC_BACKEND", "thp")]).args(["1000", "wait"]),
        T,
    );
    // SAFETY: signalling our own child.
    unsafe { libc::kill(w.pid() as i32, libc::SIGTERM) };
    let o = w.finish(T);
    o.check(
        o.status.signal() == Some(libc::SIGTERM),
        "killed by SIGTERM expected",
    );
}

#[test]
fn a_thread_started_before_the_constructor_means_hands_off() {
    // The loader runs preloaded constructors last-listed first, so this
    // library's thread is running when tiexec's constructor looks.
    let lib = common::fixture::thread_starter_library(&common::scratch_dir().join("fixtures"));

    let exe = common::fixture(PIE);
    let plain = common::plain_run(&exe, &[CALLS, "run"]);
    let mut preload = common::preload_lib().into_os_string();
    preload.push(":");
    preload.push(&lib);
    let w = Waiting::start(
        preloaded(&exe, &[("TIEXEC_BACKEND", "thp"), ("TIEXEC_LOG", "info")])
            .env("LD_PRELOAD", &preload)
            .args([CALLS, "wait"]),
        T,
    );
    let pid = w.pid();
    let segments = common::text_segments(pid, &exe);
    let cov = common::coverage(pid, &segments);
    let first = w.first_line.clone();
    let o = w.finish(T);
    o.check(
        o.status.success() && first == plain.stdout,
        "runs unchanged",
    );
    o.check(
        o.stderr
            .contains("2 threads already running: text left alone"),
        "says why",
    );
    o.check(
        cov.anon_thp == 0 && cov.hugetlb == 0,
        &format!("text untouched: {cov:?}"),
    );
}

/// A program whose past runs are short, with no image cache: no copy could
/// pay off, so the library stops before reading the mappings or planning
/// (what it would add to every 50 ms compiler process), still records the
/// run while its history is not full, and the program runs the same. Asked
/// for a report, it plans and says why nothing moved.
#[test]
fn a_short_lived_program_without_a_cache_is_not_planned() {
    if common::run(Command::new("strace").arg("-V"), T)
        .status
        .code()
        != Some(0)
    {
        common::skip("strace is not installed");
        return;
    }
    let exe = common::fixture(PIE);
    let plain = common::plain_run(&exe, &[CALLS, "run"]);
    let mut cmd = preloaded(&exe, &[]);
    common::remember_runs(&cmd, &exe, &[5, 5, 5]);
    let state = common::state_dir_of(&cmd);
    let trace = common::scratch_dir().join(format!("short-{}.trace", std::process::id()));
    let mut traced = Command::new("strace");
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => traced.env(k, v),
            None => traced.env_remove(k),
        };
    }
    let o = common::run(
        traced
            .args(["-f", "-qq", "-e", "trace=openat", "-o"])
            .arg(&trace)
            .arg(&exe)
            .args([CALLS, "run"]),
        T,
    );
    o.check(
        o.status.success() && o.stdout == plain.stdout,
        "runs the same",
    );
    let text = std::fs::read_to_string(&trace).unwrap_or_default();
    let _ = std::fs::remove_file(&trace);
    assert!(
        text.contains("libtiexec") && !text.contains("/proc/self/maps"),
        "the library loaded, and read no mappings:\n{text}"
    );
    let dir = tiexec::internal::state::StateDir::open(&state).unwrap();
    let program = std::fs::canonicalize(&exe).unwrap();
    let h = dir.history(program.to_str().unwrap(), |_| true, 0);
    assert_eq!(h.runs().len(), 4, "the run is recorded: {h:?}");
    // Asked for a report: planned, and the reason given.
    let report = common::scratch_dir().join(format!("short-{}.json", std::process::id()));
    let _ = std::fs::remove_file(&report);
    let o = common::run(cmd.env("TIEXEC_REPORT", &report).args([CALLS, "run"]), T);
    o.check(o.status.success(), "with a report");
    let json = std::fs::read_to_string(&report).unwrap_or_default();
    let _ = std::fs::remove_file(&report);
    assert!(json.contains("would cost"), "{json}");
}

/// Under the wrapper, once a program's full history says its runs are too
/// short for any copy, and there is no cache, its processes mostly do not
/// even load the library (the stub decides, with the same rule): one in
/// four still does, to record its run.
#[test]
fn the_stub_leaves_the_library_out_of_short_lived_programs() {
    if common::run(Command::new("strace").arg("-V"), T)
        .status
        .code()
        != Some(0)
    {
        common::skip("strace is not installed");
        return;
    }
    let exe = common::fixture(PIE);
    let plain = common::plain_run(&exe, &[CALLS, "run"]);
    let cmd = common::tiexec_cmd();
    common::remember_runs(&cmd, &exe, &[5; 8]);
    let xdg = common::state_dir_of(&cmd).parent().unwrap().to_path_buf();
    let trace = common::scratch_dir().join(format!("stub-skip-{}.trace", std::process::id()));
    let (mut loaded, mut skipped) = (0, 0);
    for _ in 0..12 {
        let mut traced = Command::new("strace");
        common::isolate(&mut traced);
        let o = common::run(
            traced
                .env("XDG_CACHE_HOME", &xdg)
                .args(["-f", "-qq", "-e", "trace=openat", "-o"])
                .arg(&trace)
                .arg(common::tiexec_bin())
                .arg(&exe)
                .args([CALLS, "run"]),
            T,
        );
        o.check(
            o.status.success() && o.stdout == plain.stdout,
            "runs the same",
        );
        let text = std::fs::read_to_string(&trace).unwrap_or_default();
        if text.contains("/libtiexec-0.") {
            loaded += 1;
        } else {
            skipped += 1;
        }
    }
    let _ = std::fs::remove_file(&trace);
    // 12 processes, each skipping with probability 3/4: all loading has
    // odds of 1 in 17 million.
    assert!(
        skipped > 0,
        "the library loaded in every process ({loaded})"
    );
    // Asked to say what it does, it loads and says why nothing moved.
    let mut verbose = common::tiexec_cmd();
    let o = common::run(
        verbose
            .env("XDG_CACHE_HOME", &xdg)
            .arg("-v")
            .arg(&exe)
            .args([CALLS, "run"]),
        T,
    );
    o.check(
        o.status.success() && o.stderr.contains("would cost"),
        "the library says why",
    );
}
