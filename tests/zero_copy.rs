//! Zero copy: text cached as 2 MiB page-cache folios is mapped huge by the
//! kernel itself. `tiexec --prime`, priming before exec in the wrapper (static
//! programs included), tiexec leaving such text alone in process, and the
//! copy fallback where the filesystem gives no large folios.
//!
//! The fixtures here are used by no other test: pages mapped by a running
//! process cannot be dropped from the cache, which priming needs.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{Spec, Waiting};

const T: Duration = Duration::from_secs(120);
const CALLS: &str = "200000";

const STATIC_ZC: Spec = Spec {
    name: "zc-static-nopie-24m",
    text_mib: 24,
    static_link: true,
    ..common::NON_PIE
};

const ALIGNED_ZC: Spec = Spec {
    name: "zc-pie-aligned-24m",
    ..common::HUGE_ALIGNED
};

fn prime(args: &[&str], file: &Path) -> common::Outcome {
    common::run(common::tiexec_cmd().arg("--prime").args(args).arg(file), T)
}

#[test]
fn the_wrapper_primes_a_static_program_which_then_runs_on_file_huge_pages() {
    let exe = common::fresh_copy(
        &common::fixture(STATIC_ZC),
        &common::scratch_dir().join(format!("zc-static-{}", std::process::id())),
    );
    let plain = common::run(Command::new(&exe).args([CALLS, "run"]), T);
    plain.check(plain.status.success(), "plain run");
    let before = prime(&["--check"], &exe);
    before.check(
        before.status.code() == Some(1) && before.stdout.contains("small folios"),
        "written in small writes: cached small",
    );

    let w = Waiting::start(
        common::tiexec_cmd()
            .arg("-v")
            .arg(&exe)
            .args([CALLS, "wait"]),
        T,
    );
    let pid = w.pid();
    let segments = common::text_segments(pid, &exe);
    let interior = common::planned_interior(&segments);
    let cov = common::coverage(pid, &segments);
    let bytes = common::read_only_segments_match_file(pid, &exe);
    let first = w.first_line.clone();
    let o = w.finish(T);
    let what = format!("interior {interior}, coverage {cov:?}");
    o.check(
        o.status.success() && first == plain.stdout,
        &format!("same output; {what}"),
    );
    o.check(bytes.is_ok(), &format!("bytes {bytes:?}"));
    o.check(
        o.stderr.contains("statically linked"),
        "says LD_PRELOAD cannot act",
    );
    o.check(o.stderr.contains("primed"), "says it primed");
    // Touched pages only: the fixture's calls reach every page.
    o.check(
        interior >= 20 << 20 && cov.file_thp >= interior,
        &format!("text not FilePmdMapped; {what}"),
    );
    let after = prime(&["--check"], &exe);
    after.check(
        after.status.success() && after.stdout.contains("cached as 2 MiB folios"),
        "check",
    );
    let _ = std::fs::remove_dir_all(exe.parent().unwrap());
}

#[test]
fn a_primed_program_is_left_to_the_kernel_in_process() {
    let exe = common::fresh_copy(
        &common::fixture(ALIGNED_ZC),
        &common::scratch_dir().join(format!("zc-aligned-{}", std::process::id())),
    );
    let p = prime(&[], &exe);
    p.check(p.status.success() && p.stdout.contains("primed"), "prime");
    // Raw preload, so that only the library acts (the wrapper would prime).
    let w = Waiting::start(
        common::preloaded(&exe, &[("TIEXEC_BACKEND", "thp"), ("TIEXEC_LOG", "info")])
            .args([CALLS, "wait"]),
        T,
    );
    let pid = w.pid();
    let segments = common::text_segments(pid, &exe);
    let interior = common::planned_interior(&segments);
    let cov = common::coverage(pid, &segments);
    let o = w.finish(T);
    let what = format!("interior {interior}, coverage {cov:?}");
    o.check(o.status.success(), "runs");
    // The page cache serves the interior. Its 2 MiB folios are the
    // kernel's to keep: one may be split or reclaimed between the priming
    // and the run (seen once in CI, late in a full run); tiexec then copies
    // that one and no other. Never more than one.
    let huge = common::witness::huge_page();
    o.check(
        cov.file_thp + huge >= interior && cov.file_thp + cov.anon_thp >= interior,
        &format!("page cache serves the interior, tiexec copies only a gap; {what}"),
    );
    let line = o
        .stderr
        .lines()
        .find(|l| l.contains("zc-pie-aligned-24m: text"))
        .unwrap_or("");
    let already = cov.file_thp / huge;
    o.check(
        line.contains(&format!(", {already} already)")),
        &format!("reports the {already} pages already huge, not copied; {what}"),
    );
    if cov.file_thp < interior {
        println!("one folio lost between priming and the run, copied: {line}");
    }
    let _ = std::fs::remove_dir_all(exe.parent().unwrap());
}

#[test]
fn where_priming_cannot_help_the_in_process_paths_take_over_and_say_so() {
    // tmpfs with shmem_enabled=never caches small folios only, so priming
    // fails; in process, MADV_COLLAPSE in place works on tmpfs (it ignores
    // the sysfs setting) and serves without a copy; elsewhere the copy
    // would. Either way all of the text ends up huge and the line says how.
    let shm = Path::new("/dev/shm");
    let enabled = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
        .unwrap_or_default();
    if !shm.is_dir() || !enabled.contains("[never]") {
        common::skip("no tmpfs without huge pages at /dev/shm");
        return;
    }
    let exe = common::fresh_copy(
        &common::fixture(ALIGNED_ZC),
        &shm.join(format!("tiexec-zc-{}", std::process::id())),
    );
    let plain = common::run(Command::new(&exe).args([CALLS, "run"]), T);
    if !plain.status.success() {
        common::skip("/dev/shm does not allow exec");
        let _ = std::fs::remove_dir_all(exe.parent().unwrap());
        return;
    }
    let p = prime(&[], &exe);
    p.check(
        p.status.code() == Some(1) && p.stdout.contains("small folios"),
        "prime says it could not",
    );
    let w = Waiting::start(
        common::tiexec_cmd()
            .args(["-v", "-b", "thp"])
            .arg(&exe)
            .args([CALLS, "wait"]),
        T,
    );
    let pid = w.pid();
    let segments = common::text_segments(pid, &exe);
    let interior = common::planned_interior(&segments);
    let cov = common::coverage(pid, &segments);
    let first = w.first_line.clone();
    let o = w.finish(T);
    let _ = std::fs::remove_dir_all(exe.parent().unwrap());
    o.check(o.status.success() && first == plain.stdout, "same output");
    o.check(cov.huge() >= interior, &format!("covered anyway: {cov:?}"));
    let line = o
        .stderr
        .lines()
        .find(|l| l.contains("zc-pie-aligned-24m: text"))
        .unwrap_or("");
    o.check(
        line.contains("via page cache in place") || line.contains("after in-place collapse failed"),
        "the line says which path served",
    );
}
