//! Shared libraries: linked at start-up, or dlopened later while another
//! thread runs; outward rounding to full coverage; filters.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{BIG_RODATA, HUGE_ALIGNED};

const T: Duration = Duration::from_secs(120);
const CALLS: &str = "200000";

#[test]
fn a_library_linked_at_start_up_is_covered() {
    let (host, lib) = common::linked_library_fixture();
    let plain = common::run(Command::new(&host).args([CALLS, "run"]), T);
    for backend in ["thp", "hugetlb"] {
        // Small page-cache folios (a new inode): the kernel cannot map the
        // library's text huge by itself, and the backend is what shows.
        common::fixture::rewrite_in_small_pages(&lib);
        // Pool pages for the library's text and then some.
        let pages = (32 << 20) / common::witness::huge_page() + 2;
        let Some(_pool) = common::PoolGuard::set(pages) else {
            return;
        };
        let seen = common::observe(
            common::tiexec_cmd()
                .args(["-v", "--no-prime", "-b", backend])
                .arg(&host)
                .args([CALLS, "wait"]),
            &lib,
        );
        seen.outcome
            .check(seen.stdout_first == plain.stdout, "same output");
        seen.outcome.check(
            seen.cov.huge() >= seen.reachable && seen.reachable >= 20 << 20,
            &format!(
                "{backend}: library text not covered: {:?}, reachable {}",
                seen.cov, seen.reachable
            ),
        );
        let moved = format!("new via {backend}");
        seen.outcome.check(
            seen.outcome
                .stderr
                .lines()
                .any(|l| l.contains("libbigtext.so: text") && l.contains(&moved)),
            &format!("{backend}: reported as moved by tiexec"),
        );
        let share = seen.cov.huge() as f64 / seen.reachable.max(1) as f64;
        eprintln!(
            "libbigtext.so on {backend}: {:.1} % of its reachable text on {} pages ({:.1} of {:.1} MiB; all text {:.1} MiB)",
            share * 100.0,
            common::witness::huge_page_name(),
            seen.cov.huge() as f64 / 1048576.0,
            seen.reachable as f64 / 1048576.0,
            seen.text as f64 / 1048576.0,
        );
        seen.outcome.check(
            share >= 0.95,
            &format!(
                "{backend}: at least 95 % of its reachable text; maps:\n{}",
                seen.near
            ),
        );
    }
}

#[test]
fn a_library_dlopened_while_another_thread_runs_is_covered() {
    let (host, lib) = common::dlopen_library_fixture();
    let plain = common::run(Command::new(&host).args([CALLS, "run"]).arg(&lib), T);
    plain.check(plain.status.success(), "plain run");
    let seen = common::observe(
        common::tiexec_cmd()
            .args(["-v", "--no-prime", "-b", "thp", "--dlopen"])
            .arg(&host)
            .args([CALLS, "wait"])
            .arg(&lib),
        &lib,
    );
    seen.outcome
        .check(seen.stdout_first == plain.stdout, "same output");
    seen.outcome.check(
        seen.cov.anon_thp + seen.cov.file_thp >= seen.reachable && seen.reachable >= 20 << 20,
        &format!(
            "dlopened text not covered: {:?}, reachable {}",
            seen.cov, seen.reachable
        ),
    );
    seen.outcome.check(
        seen.outcome
            .stderr
            .lines()
            .any(|l| l.contains("libplugin.so: text") && l.contains("new via thp")),
        "reported as moved by tiexec",
    );
}

#[test]
fn by_default_a_dlopened_library_is_left_alone() {
    let (host, lib) = common::dlopen_library_fixture();
    let seen = common::observe(
        common::tiexec_cmd()
            .args(["--no-prime", "-b", "thp"])
            .arg(&host)
            .args([CALLS, "wait"])
            .arg(&lib),
        &lib,
    );
    // No hugetlb, anonymous or file huge pages: the library stays as loaded
    // (the fixture is written so the kernel does not map it huge by itself).
    seen.outcome
        .check(seen.cov.huge() == 0, &format!("{:?}", seen.cov));
}

#[test]
fn excluded_libraries_are_left_alone() {
    let (host, lib) = common::linked_library_fixture();
    let seen = common::observe(
        common::tiexec_cmd()
            .args(["--no-prime", "-b", "thp", "--exclude", "libbig*"])
            .arg(&host)
            .args([CALLS, "wait"]),
        &lib,
    );
    seen.outcome
        .check(seen.cov.anon_thp == 0, &format!("{:?}", seen.cov));
    let seen = common::observe(
        common::tiexec_cmd()
            .args(["--no-prime", "-b", "thp", "--include", "no-such-lib*"])
            .arg(&host)
            .args([CALLS, "wait"]),
        &lib,
    );
    seen.outcome
        .check(seen.cov.anon_thp == 0, &format!("{:?}", seen.cov));
}

#[test]
fn aggressive_covers_all_text_when_its_neighbours_are_read_only() {
    let exe = common::fixture(BIG_RODATA);
    let plain = common::run(Command::new(&exe).args([CALLS, "run"]), T);
    let aggressive = common::observe(
        common::tiexec_cmd()
            .args(["-v", "--no-prime", "-b", "thp", "--strategy", "aggressive"])
            .arg(&exe)
            .args([CALLS, "wait"]),
        &exe,
    );
    // Same output: the rodata checksum and the written global are in it.
    aggressive
        .outcome
        .check(aggressive.stdout_first == plain.stdout, "same output");
    // All of it but the huge page holding its ELF header (which names it
    // to symbolizers, and stays the file's).
    aggressive.outcome.check(
        aggressive.cov.anon_thp + aggressive.cov.file_thp >= aggressive.reachable
            && aggressive.reachable + (2 << 20) >= aggressive.text,
        &format!(
            "not all reachable text: {:?} of {} ({} reachable)",
            aggressive.cov, aggressive.text, aggressive.reachable
        ),
    );

    let conservative = common::observe(
        common::tiexec_cmd()
            .args([
                "-v",
                "--no-prime",
                "-b",
                "thp",
                "--strategy",
                "conservative",
            ])
            .arg(&exe)
            .args([CALLS, "wait"]),
        &exe,
    );
    conservative
        .outcome
        .check(conservative.stdout_first == plain.stdout, "same output");
    let huge = conservative.cov.anon_thp + conservative.cov.file_thp;
    conservative.outcome.check(
        huge >= conservative.interior && huge < conservative.text,
        &format!(
            "conservative covers the interior only: {:?}",
            conservative.cov
        ),
    );
    conservative.outcome.check(
        conservative
            .outcome
            .stderr
            .contains("head/tail, not a whole 2 MiB page"),
        "says what stayed small and why",
    );
}

#[test]
fn congruent_text_is_tried_in_place_and_copied_when_the_kernel_refuses() {
    // Text linked 2 MiB aligned is congruent with its file offset: tiexec
    // first asks the kernel to collapse the page cache in place (no copy).
    // Kernels without CONFIG_READ_ONLY_THP_FOR_FS refuse (EINVAL) and the
    // copy path serves; either way all of the text ends up huge.
    let exe = common::fresh_copy(
        &common::fixture(HUGE_ALIGNED),
        &common::scratch_dir().join(format!("in-place-{}", std::process::id())),
    );
    let plain = common::run(Command::new(&exe).args([CALLS, "run"]), T);
    let seen = common::observe(
        common::tiexec_cmd()
            .args(["-v", "--no-prime", "-b", "thp"])
            .arg(&exe)
            .args([CALLS, "wait"]),
        &exe,
    );
    seen.outcome
        .check(seen.stdout_first == plain.stdout, "same output");
    seen.outcome.check(
        seen.cov.huge() == seen.text,
        &format!("not all text huge: {:?} of {}", seen.cov, seen.text),
    );
    let line = seen
        .outcome
        .stderr
        .lines()
        .find(|l| l.contains("fixture-pie-aligned-24m: text"))
        .unwrap_or_default()
        .to_string();
    seen.outcome.check(
        line.contains("via page cache in place")
            || line.contains("after in-place collapse failed with"),
        "in place tried first, the path taken reported",
    );
    if line.contains("failed with") {
        seen.outcome
            .check(seen.cov.anon_thp == seen.text, "copied on THP");
    } else {
        seen.outcome
            .check(seen.cov.file_thp == seen.text, "page cache THP");
    }
}

/// A library whose text tiexec moved to hugetlb pages is unloaded; the
/// program maps fresh memory where the text was and changes the protection
/// of one page of it. The `mprotect` interposer, which copies registered
/// hugetlb text back to small pages before a split, must have forgotten
/// the range: the new memory is the program's, and behaves as without
/// tiexec.
#[test]
fn memory_mapped_where_unloaded_hugetlb_text_was_is_the_programs() {
    let (host, lib) = common::dlopen_library_fixture();
    let plain = common::run(Command::new(&host).args([CALLS, "unload"]).arg(&lib), T);
    plain.check(
        plain.status.success() && plain.stdout.contains(" 0 bytes differ"),
        "plain run",
    );
    let pages = (32 << 20) / common::witness::huge_page() + 2;
    let Some(_pool) = common::PoolGuard::set(pages) else {
        return;
    };
    let o = common::run(
        common::tiexec_cmd()
            .args(["-v", "--no-prime", "-b", "hugetlb", "--dlopen"])
            .arg(&host)
            .args([CALLS, "unload"])
            .arg(&lib),
        T,
    );
    o.check(
        o.stderr
            .lines()
            .any(|l| l.contains("libplugin.so: text") && l.contains("via hugetlb")),
        "the library's text was moved to hugetlb pages",
    );
    o.check(
        o.status.success() && o.stdout == plain.stdout,
        "same output and status as without tiexec",
    );
}
