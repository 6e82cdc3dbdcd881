//! The default policy (`auto`), rule by rule, on real processes: who gets
//! huge text on which run, and why (see `history`, `hotmap`):
//!
//! - the program named to the wrapper, preloaded by hand, or linking tiexec
//!   in gets it on its first run; the programs it starts learn first;
//! - measured runs decide, and exploration stays within its bounds;
//! - private copies take the huge pages the program's runs touch;
//! - runs that end with `_exit` are recorded; a server killed by a signal
//!   counts as long-lived and gets its text on the restart;
//! - concurrent first starts wait for the image being built;
//! - one image per object region, whatever part of it a process needs.
//!
//! Coverage is read by the tests' own smaps reader; what decided is read
//! from the library's info line.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{Arm, CacheMount, Seen, PIE, PIE_64};

const T: Duration = Duration::from_secs(180);
const CALLS: &str = "200000";

/// A fresh copy of `spec`'s fixture for `test` (a new inode, small page
/// cache folios: nothing huge by itself, no history anywhere).
fn fresh(spec: common::Spec, test: &str) -> PathBuf {
    let exe = common::fresh_copy(
        &common::fixture(spec),
        &common::scratch_dir().join(format!("policy-{test}-{}", std::process::id())),
    );
    // Old enough for its image to be shared (see `common::settle`).
    common::settle(&exe);
    exe
}

/// `tiexec -v --no-prime EXE ARGS` with the state directory at `xdg` (shared
/// by the runs of one test), the cache off unless `cache` names one.
fn wrapped(exe: &Path, xdg: &Path, cache: Option<&CacheMount>, args: &[&str]) -> Command {
    let mut cmd = common::tiexec_cmd();
    cmd.env("XDG_CACHE_HOME", xdg);
    if let Some(c) = cache {
        cmd.env("TIEXEC_CACHE", &c.path);
    }
    cmd.args(["-v", "--no-prime"]).arg(exe).args(args);
    cmd
}

/// A state directory of the test's own, empty.
fn new_state(test: &str) -> PathBuf {
    let xdg = common::scratch_dir()
        .join("policy-state")
        .join(format!("{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&xdg);
    std::fs::create_dir_all(&xdg).unwrap();
    xdg
}

/// The program's run history as the library reads it.
fn history(xdg: &Path, exe: &Path) -> tiexec::internal::history::History {
    let dir = tiexec::internal::state::StateDir::open(&xdg.join("tiexec")).expect("state dir");
    let program = std::fs::canonicalize(exe).unwrap();
    dir.history(program.to_str().unwrap(), |_| true, 0)
}

/// Share of `seen`'s reachable text on huge pages, in percent.
fn percent(seen: &Seen) -> u64 {
    (seen.cov.huge().min(seen.reachable) * 100)
        .checked_div(seen.reachable)
        .unwrap_or(0)
}

fn at_least_90(seen: &Seen, what: &str) {
    seen.outcome.check(
        percent(seen) >= 90,
        &format!(
            "{what}: {} % of {} reachable bytes on 2 MiB pages ({:?})\n{}",
            percent(seen),
            seen.reachable,
            seen.cov,
            seen.near
        ),
    );
}

#[test]
fn the_named_program_gets_huge_text_on_its_first_run_and_its_children_learn() {
    let exe = fresh(PIE, "named");
    let xdg = new_state("named");
    let seen = common::observe(&mut wrapped(&exe, &xdg, None, &[CALLS, "wait"]), &exe);
    at_least_90(&seen, "the program named to the wrapper, first run");
    seen.outcome.check(
        seen.outcome
            .stderr
            .contains("copy: first run of a program named to tiexec"),
        "says which rule decided",
    );
    // The same program started by another one (the marker names another
    // process): measured first, nothing copied.
    let child = fresh(PIE, "child");
    let mut cmd = common::preloaded(&child, &[("TIEXEC_LOG", "info"), ("TIEXEC_NAMED_PID", "1")]);
    let seen = common::observe(cmd.args([CALLS, "wait"]), &child);
    seen.outcome.check(
        seen.cov.huge() == 0
            && seen
                .outcome
                .stderr
                .contains("first run of a program started by another, measured first"),
        "a child's first run is measured, not copied",
    );
    // Through the wrapper, for real: `sh` is named, the program it runs is
    // its child. Its run is recorded, plain.
    let xdg = new_state("named-sh");
    let script = format!("{} {CALLS} run; true", child.display());
    let o = common::run(
        common::tiexec_cmd().env("XDG_CACHE_HOME", &xdg).args([
            "-v",
            "--no-prime",
            "sh",
            "-c",
            &script,
        ]),
        T,
    );
    o.check(
        o.status.success() && o.stderr.contains("measured first"),
        "the program sh starts is a child",
    );
    let h = history(&xdg, &child);
    o.check(
        h.runs().len() == 1 && h.runs()[0].arm == Arm::Plain && h.runs()[0].ms.is_some(),
        &format!("its run is recorded, plain: {h:?}"),
    );
}

#[test]
fn measured_runs_decide_whether_copies_pay() {
    let exe = fresh(PIE, "measured");
    // Runs with huge text faster than without, copy included: copied.
    let xdg = new_state("measured-gain");
    let cmd = wrapped(&exe, &xdg, None, &[CALLS, "wait"]);
    common::remember(
        &cmd,
        &exe,
        &[
            (560, Arm::Copy),
            (630, Arm::Plain),
            (550, Arm::Copy),
            (620, Arm::Plain),
        ],
    );
    let seen = common::observe(&mut wrapped(&exe, &xdg, None, &[CALLS, "wait"]), &exe);
    at_least_90(&seen, "a measured gain");
    seen.outcome.check(
        seen.outcome
            .stderr
            .contains("copy: measured, runs with huge text 555 ms"),
        "says what was measured",
    );
    // No gain: no copy, even for the program named to the wrapper.
    let xdg = new_state("measured-none");
    let cmd = wrapped(&exe, &xdg, None, &[CALLS, "wait"]);
    common::remember(
        &cmd,
        &exe,
        &[
            (640, Arm::Copy),
            (600, Arm::Plain),
            (650, Arm::Copy),
            (610, Arm::Plain),
        ],
    );
    let seen = common::observe(&mut wrapped(&exe, &xdg, None, &[CALLS, "wait"]), &exe);
    seen.outcome.check(
        seen.cov.huge() == 0 && seen.outcome.stderr.contains("no copy: measured, no gain"),
        "no gain measured: no copy",
    );
}

#[test]
fn exploration_stays_within_its_bounds() {
    // A program started by another, whose runs are short for its copy
    // (32 MiB: ~16 ms; runs of 100 ms: 16 %, above the 2 % a child may
    // spend): never copied, run after run, and each run recorded.
    let exe = fresh(PIE, "explore-child");
    let xdg = new_state("explore-child");
    let mut cmd = common::preloaded(&exe, &[("TIEXEC_LOG", "info"), ("TIEXEC_NAMED_PID", "1")]);
    cmd.env("XDG_CACHE_HOME", &xdg);
    common::remember_runs(&cmd, &exe, &[100, 100]);
    for run in 0..10 {
        let o = common::run(
            common::preloaded(&exe, &[("TIEXEC_LOG", "info"), ("TIEXEC_NAMED_PID", "1")])
                .env("XDG_CACHE_HOME", &xdg)
                .args(["20000", "run"]),
            T,
        );
        o.check(
            o.status.success() && !o.stderr.contains("via thp"),
            &format!("run {run}: no copy"),
        );
    }
    let h = history(&xdg, &exe);
    assert!(
        h.runs().len() == 12 && h.runs().iter().all(|r| r.arm == Arm::Plain),
        "{h:?}"
    );
    // The program named to the wrapper, copy ~5 % of its runs: copied while
    // learning, one run in eight on 4 KiB pages (the second, the tenth)
    // until two were measured.
    let exe = fresh(PIE, "explore-named");
    let xdg = new_state("explore-named");
    let cmd = wrapped(&exe, &xdg, None, &[]);
    common::remember(&cmd, &exe, &[(600, Arm::Copy)]);
    let o = common::run(&mut wrapped(&exe, &xdg, None, &["20000", "run"]), T);
    o.check(
        !o.stderr.contains("via thp") && o.stderr.contains("this run explores the other way"),
        "the second run explores 4 KiB pages",
    );
    let o = common::run(&mut wrapped(&exe, &xdg, None, &["20000", "run"]), T);
    o.check(
        o.stderr.contains("via thp") && o.stderr.contains("within the 10% allowed"),
        "the third copies, within the named program's bound",
    );
}

/// The 256 MiB program whose runs touch one 16 MiB part of its text.
const BIG: common::Spec = common::Spec::new("fixture-pie-256m", 256, true);
/// Its functions (one per 4 KiB page) from 96 MiB into the text, 16 MiB.
const REGION: &str = "24576:4096";

#[test]
fn private_copies_take_the_text_the_runs_touch() {
    let exe = fresh(BIG, "hot");
    let xdg = new_state("hot");
    // Runs of about a second: the copy of the region is a small share of
    // one, whatever the machine's copy rate.
    let calls = "4000000";
    let region = |cmd: &mut Command| {
        cmd.env("FIXTURE_REGION", REGION);
    };
    // Run 1: named, first run: everything copied. Run 2: on 4 KiB pages, to
    // measure (and learn what the runs touch).
    for _ in 0..2 {
        let mut cmd = wrapped(&exe, &xdg, None, &[calls, "run"]);
        region(&mut cmd);
        let o = common::run(&mut cmd, T);
        o.check(o.status.success(), "runs");
    }
    let map = tiexec::internal::state::StateDir::open(&xdg.join("tiexec"))
        .expect("state")
        .hot_map(std::fs::canonicalize(&exe).unwrap().to_str().unwrap());
    let (hot, unknown, cold) = map.objects.first().map(|o| o.tally()).unwrap_or_default();
    assert!(
        cold > hot && hot > 0,
        "the hot map holds the region: {hot} units touched, {unknown} unknown, {cold} cold"
    );
    // Run 3: the region on huge pages, little else held.
    let mut cmd = wrapped(&exe, &xdg, None, &[calls, "wait"]);
    region(&mut cmd);
    let w = common::Waiting::start(&mut cmd, T);
    let pid = w.pid();
    let segments = common::text_segments(pid, &exe);
    let bias = segments[0].start - text_start_in_file(&exe);
    let (first, count) = (24576u64, 4096u64);
    let region_text = common::Range::new(
        bias + function_address(&exe, first),
        bias + function_address(&exe, first + count - 1) + 4096,
    );
    let cov = common::coverage(pid, &[region_text]);
    let held = common::private_huge_bytes(pid);
    let o = w.finish(T);
    println!(
        "256 MiB program, third run: region {} MiB, {} MiB of it huge; {} MiB of private huge pages; hot map: {hot} units touched, {unknown} unknown, {cold} cold",
        region_text.len() >> 20,
        cov.huge() >> 20,
        held >> 20
    );
    o.check(o.status.success(), "runs the same");
    o.check(
        cov.huge() * 10 >= region_text.len() * 9,
        &format!("the region on huge pages: {cov:?} of {}", region_text.len()),
    );
    o.check(
        held <= 48 << 20,
        &format!("{} MiB of private huge pages held", held >> 20),
    );
    o.check(
        o.stderr
            .contains("not touched by the program's recent runs"),
        "says what stayed and why",
    );
}

/// The link-time address of the fixture's first text byte (`.text`'s start).
fn text_start_in_file(exe: &Path) -> u64 {
    let bytes = std::fs::read(exe).unwrap();
    let elf = goblin::elf::Elf::parse(&bytes).unwrap();
    elf.program_headers
        .iter()
        .find(|p| p.p_type == goblin::elf::program_header::PT_LOAD && p.is_executable())
        .map(|p| p.p_vaddr & !0xfff)
        .unwrap()
}

/// The link-time address of the fixture's function `i`.
fn function_address(exe: &Path, i: u64) -> u64 {
    common::functions(exe)
        .get(&format!("fixture_fn_{i}"))
        .map(|&(value, _)| value)
        .unwrap()
}

#[test]
fn runs_ending_with_exit_are_recorded_and_killed_servers_count_as_long() {
    // _exit: no exit handler runs; the run is recorded all the same.
    let exe = fresh(PIE, "exit");
    let xdg = new_state("exit");
    let o = common::run(&mut wrapped(&exe, &xdg, None, &["20000", "_exit", "3"]), T);
    o.check(o.status.code() == Some(3), "its status");
    let h = history(&xdg, &exe);
    o.check(
        h.runs().len() == 1 && h.runs()[0].ms.is_some_and(|ms| ms < 60_000),
        &format!("recorded with its lifetime: {h:?}"),
    );
    for cache in [false, true] {
        let mount = cache.then(|| CacheMount::new("killed", 64, 72)).flatten();
        if cache && mount.is_none() {
            return;
        }
        // A server, named to the wrapper, killed on its first run.
        let exe = fresh(PIE_64, &format!("killed-{cache}"));
        let xdg = new_state(&format!("killed-{cache}"));
        let first = common::observe_killed(
            &mut wrapped(&exe, &xdg, mount.as_ref(), &[CALLS, "wait"]),
            &exe,
        );
        at_least_90(&first, &format!("first start (cache {cache})"));
        // Its restart: the killed run counts as a long one.
        let seen = common::observe(
            &mut wrapped(&exe, &xdg, mount.as_ref(), &[CALLS, "wait"]),
            &exe,
        );
        at_least_90(&seen, &format!("restart after kill -9 (cache {cache})"));
        let h = history(&xdg, &exe);
        seen.outcome.check(
            h.runs().first().is_some_and(|r| r.ms.is_none()),
            &format!("the killed run is in the history: {h:?}"),
        );
    }
}

#[test]
fn concurrent_first_starts_wait_for_the_image_being_built() {
    let Some(cache) = CacheMount::new("first-starts", 72, 80) else {
        return;
    };
    let exe = fresh(common::NON_PIE_64, "first-starts");
    let xdg = new_state("first-starts");
    let mut cmds: Vec<Command> = (0..6)
        .map(|_| wrapped(&exe, &xdg, Some(&cache), &[CALLS, "wait"]))
        .collect();
    let waiting = common::Waiting::start_all(&mut cmds, T);
    let mut covered = Vec::new();
    for w in &waiting {
        let segments = common::text_segments(w.pid(), &exe);
        let reachable = common::reachable_text(w.pid(), &segments, &exe);
        let cov = common::coverage(w.pid(), &segments);
        covered.push((cov.huge().min(reachable) * 100) / reachable.max(1));
    }
    let private: u64 = waiting
        .iter()
        .map(|w| common::private_huge_bytes(w.pid()))
        .sum();
    let held = cache.used_pages() * (2 << 20) + private;
    let mut said = String::new();
    for w in waiting {
        let o = w.finish(T);
        o.check(o.status.success(), "runs");
        said.push_str(&o.stderr);
    }
    assert!(
        covered.iter().all(|&p| p >= 90),
        "each of six first starts at least 90 %: {covered:?}\n{said}"
    );
    let one_copy = 64 << 20;
    println!(
        "six concurrent first starts: {covered:?} % huge; {} MiB held",
        held >> 20
    );
    assert!(
        held * 2 <= one_copy * 3,
        "{held} bytes of huge pages held, one copy is {one_copy}\n{said}"
    );
}

#[test]
fn one_image_serves_an_object_whatever_part_of_it_a_process_needs() {
    let Some(cache) = CacheMount::new("one-image", 64, 72) else {
        return;
    };
    let exe = fresh(common::NON_PIE, "one-image");
    let xdg = new_state("one-image");
    // Conservative first (the whole huge pages inside the text), then
    // aggressive (its head and tail pages too): one image, and a hit.
    let a = common::observe(
        common::tiexec_cmd()
            .env("XDG_CACHE_HOME", &xdg)
            .env("TIEXEC_CACHE", &cache.path)
            .args(["-v", "--no-prime", "-s", "conservative"])
            .arg(&exe)
            .args([CALLS, "wait"]),
        &exe,
    );
    a.outcome
        .check(a.outcome.stderr.contains("cache (built)"), "built");
    let images = cache.images();
    let b = common::observe(
        &mut wrapped(&exe, &xdg, Some(&cache), &[CALLS, "wait"]),
        &exe,
    );
    b.outcome.check(
        b.outcome.stderr.contains("cache (hit)") && !b.outcome.stderr.contains("cache (built)"),
        "the other plan maps the same image",
    );
    assert_eq!(images.len(), 1, "one image: {images:?}");
    assert_eq!(cache.images(), images, "no second image");
}
