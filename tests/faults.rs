//! Every step of the swap made to fail (TIEXEC_FAULT): the program still
//! gives the right output and exit status, its text and rodata bytes are
//! unchanged, nothing writable+executable or leaked is left, and tiexec says
//! what failed in one line.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{PoolGuard, Waiting, PIE};
use tiexec::internal::fault::Step;

const T: Duration = Duration::from_secs(120);
const CALLS: &str = "200000";

/// A PIE holding whole huge pages of this kernel's size (2 MiB here; 32
/// MiB on an arm64 kernel with 16 KiB pages, where the 32 MiB one may hold
/// none).
fn fixture() -> std::path::PathBuf {
    if common::witness::huge_page() > 2 << 20 {
        common::fixture(common::PIE_64)
    } else {
        common::fixture(PIE)
    }
}

fn run_with_fault(step_name: &str, backend: &str) {
    let exe = fixture();
    let plain = common::run(Command::new(&exe).args([CALLS, "run"]), T);
    let w = Waiting::start(
        common::preloaded(
            &exe,
            &[("TIEXEC_BACKEND", backend), ("TIEXEC_FAULT", step_name)],
        )
        .args([CALLS, "wait"]),
        T,
    );
    let pid = w.pid();
    let segments = common::text_segments(pid, &exe);
    let bytes = common::read_only_segments_match_file(pid, &exe);
    let cov = common::coverage(pid, &segments);
    let wx = common::writable_executable_mappings(pid);
    let stray = common::stray_executable_anon(pid, &segments);
    let huge_elsewhere = common::huge_memory_outside(pid, &segments);
    let first = w.first_line.clone();
    let o = w.finish(T);
    let what = format!("fault {step_name} ({backend}): coverage {cov:?}");
    o.check(o.status.success(), &format!("{what}: exit status"));
    o.check(first == plain.stdout, &format!("{what}: output"));
    o.check(bytes.is_ok(), &format!("{what}: bytes {bytes:?}"));
    o.check(wx.is_empty(), &format!("{what}: W+X {wx:?}"));
    o.check(stray.is_empty(), &format!("{what}: leaked exec {stray:?}"));
    o.check(
        huge_elsewhere.is_empty(),
        &format!("{what}: leaked huge {huge_elsewhere:?}"),
    );
    // A hole left by a failed mremap is filled again: with anonymous
    // copies, by a copy of the bytes on 4 KiB pages (nothing huge); with
    // file-backed replacements (pool copies, cache images), by mapping the
    // same file there, which leaves the range as a swap would.
    let restored_by_map = step_name == "remap-hole" && backend != "thp";
    if !restored_by_map {
        o.check(cov.huge() == 0, &format!("{what}: nothing may be swapped"));
    }
    let ours: Vec<&str> = o
        .stderr
        .lines()
        .filter(|l| l.starts_with("tiexec:"))
        .collect();
    o.check(!ours.is_empty(), &format!("{what}: says what failed"));
    if step_name == "remap-hole" {
        let said = if restored_by_map {
            "its image was mapped there instead"
        } else {
            "text restored on 4 KiB pages"
        };
        o.check(
            o.stderr.contains(said),
            &format!("{what}: the restore path ran"),
        );
    }
}

#[test]
fn every_step_failing_on_thp_leaves_the_program_as_it_was() {
    for (_, name) in Step::all() {
        run_with_fault(name, "thp");
    }
}

#[test]
fn hugetlb_staging_failures_leave_the_program_as_it_was() {
    // Room for the fixture's text and then some, in this kernel's pages.
    let Some(_pool) = PoolGuard::set((128 << 20) / common::witness::huge_page()) else {
        return;
    };
    for step in [Step::StagingMap, Step::StagingPopulate, Step::RemapHole] {
        let name = Step::all()
            .find(|(s, _)| *s == step)
            .map(|(_, n)| n)
            .unwrap();
        run_with_fault(name, "hugetlb");
    }
}

#[test]
fn an_unknown_step_is_reported_and_ignored() {
    let exe = common::fixture(PIE);
    let o = common::run(
        common::preloaded(
            &exe,
            &[("TIEXEC_BACKEND", "thp"), ("TIEXEC_FAULT", "everything")],
        )
        .args(["1000", "run"]),
        T,
    );
    o.check(o.status.success(), "runs");
    o.check(o.stderr.contains("TIEXEC_FAULT=\"everything\""), "reported");
}
