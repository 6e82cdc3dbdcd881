//! Seeing what happened: the JSON report (TIEXEC_REPORT), perf maps, names
//! in /proc/PID/maps, and a debugger that still names functions in text
//! that moved to anonymous huge pages.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{Waiting, PIE};

const T: Duration = Duration::from_secs(120);

fn scratch(name: &str) -> std::path::PathBuf {
    let d = common::scratch_dir().join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn preloaded(exe: &Path) -> Command {
    common::preloaded(exe, &[("TIEXEC_BACKEND", "thp")])
}

#[test]
fn the_json_report_says_per_object_what_happened() {
    let exe = common::fixture(PIE);
    let dir = scratch("report");
    let target = dir.join("report-%p.json");
    let w = Waiting::start(
        preloaded(&exe)
            .env("TIEXEC_REPORT", &target)
            .args(["1000", "wait"]),
        T,
    );
    let pid = w.pid();
    let o = w.finish(T);
    o.check(
        o.status.success() && o.stderr.lines().count() == 1,
        "runs, silent",
    );
    let path = dir.join(format!("report-{pid}.json"));
    let text = std::fs::read_to_string(&path).expect("report written, %p = pid");
    let v: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    assert_eq!(v["pid"], pid);
    let objects = v["objects"].as_array().unwrap();
    let me = objects
        .iter()
        .find(|o| o["path"].as_str().unwrap().ends_with("fixture-pie-32m"))
        .expect("the fixture's record");
    // A copy to THP; or, for a PIE that loaded congruent with its file by
    // chance (1 in 512 with 4 KiB alignment), the page cache in place.
    let bytes = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    let by_source = &me["swapped_by_source"];
    assert!(
        bytes(&by_source["thp"]) + bytes(&by_source["page_cache"]) >= 30 << 20,
        "{me}"
    );
    assert!(
        bytes(&me["after"]["anon_thp_bytes"]) + bytes(&me["after"]["file_thp_bytes"]) >= 30 << 20,
        "{me}"
    );
    assert!(me["not_attempted"].is_null() && me["failed"].as_array().unwrap().is_empty());
    assert!(me["elapsed_ns"].as_u64().unwrap() > 0);
    let kept = me["kept"].as_array().unwrap();
    assert!(kept
        .iter()
        .all(|k| k["reason"].is_string() && k["bytes"].as_u64().is_some()));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn reports_never_clobber_or_follow_symlinks() {
    let exe = common::fixture(PIE);
    let dir = scratch("report-safe");
    let existing = dir.join("existing.json");
    std::fs::write(&existing, "mine").unwrap();
    let victim = dir.join("victim");
    std::fs::write(&victim, "precious").unwrap();
    let link = dir.join("link.json");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    for target in [&existing, &link] {
        let o = common::run(
            preloaded(&exe)
                .env("TIEXEC_REPORT", target)
                .args(["1000", "run"]),
            T,
        );
        o.check(o.status.success(), "the program runs");
        o.check(o.stderr.contains("report not written"), "says so");
    }
    assert_eq!(std::fs::read_to_string(&existing).unwrap(), "mine");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_perf_map_matches_the_binarys_symbols() {
    let exe = common::fixture(PIE);
    let w = Waiting::start(
        preloaded(&exe)
            .env("TIEXEC_PERF_MAP", "1")
            .env("TIEXEC_LOG", "info")
            .args(["1000", "wait"]),
        T,
    );
    let pid = w.pid();
    let bytes = std::fs::read(&exe).unwrap();
    let bias = common::load_bias(pid, &exe, &goblin::elf::Elf::parse(&bytes).unwrap());
    let o = w.finish(T);
    let map_path = format!("/tmp/perf-{pid}.map");
    let map = std::fs::read_to_string(&map_path).expect("perf map written");
    let _ = std::fs::remove_file(&map_path);
    o.check(o.stderr.contains("functions written to"), "says so");
    let symbols = common::functions(&exe);
    let mut checked = 0;
    for line in map.lines() {
        let mut f = line.splitn(3, ' ');
        let addr = u64::from_str_radix(f.next().unwrap(), 16).unwrap();
        let size = u64::from_str_radix(f.next().unwrap(), 16).unwrap();
        let name = f.next().unwrap();
        let (value, sym_size) = symbols
            .get(name)
            .unwrap_or_else(|| panic!("{name} not in binary"));
        assert_eq!(addr - bias, *value, "{line}");
        assert_eq!(size, *sym_size, "{line}");
        checked += 1;
    }
    // One function per 4 KiB page of the swapped 32 MiB, less the edges.
    assert!(checked >= 7000, "{checked} lines");
}

#[test]
fn gdb_still_names_functions_in_swapped_text() {
    if Command::new("gdb").arg("--version").output().is_err() {
        common::skip("no gdb");
        return;
    }
    let exe = common::fixture(PIE);
    let w = Waiting::start(preloaded(&exe).args(["1000", "wait"]), T);
    let pid = w.pid();
    let bytes = std::fs::read(&exe).unwrap();
    let bias = common::load_bias(pid, &exe, &goblin::elf::Elf::parse(&bytes).unwrap());
    let segments = common::text_segments(pid, &exe);
    let cov = common::coverage(pid, &segments);
    let symbols = common::functions(&exe);
    let (value, _) = symbols["fixture_fn_4000"];
    let addr = bias + value;
    let gdb = common::run(
        Command::new("gdb")
            .args(["-batch", "-nx", "-p", &pid.to_string()])
            .args(["-ex", "bt", "-ex"])
            .arg(format!("info symbol {addr:#x}")),
        T,
    );
    let o = w.finish(T);
    o.check(o.status.success(), "fixture survives the debugger");
    o.check(
        cov.anon_thp >= 30 << 20,
        &format!("text was swapped: {cov:?}"),
    );
    gdb.check(gdb.stdout.contains(" main "), "backtrace names main");
    gdb.check(
        gdb.stdout.contains("fixture_fn_4000 in section"),
        "names a function mid-text",
    );
}

#[test]
fn swapped_ranges_are_named_in_maps_where_the_kernel_allows() {
    // PR_SET_VMA_ANON_NAME needs CONFIG_ANON_VMA_NAME; probe first.
    let probe = std::ffi::CString::new("tiexec:probe").unwrap();
    // SAFETY: a fresh private page of our own, named and unmapped.
    let supported = unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        let ok = libc::prctl(
            0x5356_4d41,
            0,
            p as libc::c_ulong,
            4096 as libc::c_ulong,
            probe.as_ptr(),
        ) == 0;
        libc::munmap(p, 4096);
        ok
    };
    if !supported {
        common::unsupported("kernel without CONFIG_ANON_VMA_NAME");
        return;
    }
    let exe = common::fixture(PIE);
    let w = Waiting::start(preloaded(&exe).args(["1000", "wait"]), T);
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", w.pid())).unwrap();
    let o = w.finish(T);
    o.check(maps.contains("[anon:tiexec:fixture-pie-32m]"), &maps);
}

#[test]
fn stat_shows_coverage_pages_and_a_picture_matching_smaps() {
    let exe = common::fixture(PIE);
    let w = Waiting::start(preloaded(&exe).args(["1000", "wait"]), T);
    let pid = w.pid();
    let segments = common::text_segments(pid, &exe);
    let cov = common::coverage(pid, &segments);
    let text = common::run(common::tiexec_cmd().args(["--stat", &pid.to_string()]), T);
    let json = common::run(
        common::tiexec_cmd().args(["--stat", "--json", &pid.to_string()]),
        T,
    );
    w.finish(T);
    text.check(text.status.success(), "stat runs");
    text.check(text.stdout.contains("fixture-pie-32m"), "names the object");
    text.check(
        text.stdout.contains("% on 2 MiB pages") && text.stdout.contains("#"),
        "figures and picture",
    );
    let v: serde_json::Value = serde_json::from_str(&json.stdout).expect("valid JSON");
    let objects = v[0]["objects"].as_array().unwrap();
    let o = objects
        .iter()
        .find(|o| o["path"].as_str().unwrap().ends_with("fixture-pie-32m"))
        .expect("the fixture");
    let n = |k: &str| o[k].as_u64().unwrap();
    assert_eq!(n("huge_bytes"), cov.huge(), "same as smaps read here");
    assert_eq!(n("anon_thp_bytes"), cov.anon_thp);
    assert_eq!(
        n("text_bytes"),
        segments.iter().map(|s| s.len()).sum::<u64>()
    );
    assert_eq!(n("entries_small_only"), n("text_bytes") / 4096);
    assert_eq!(
        n("entries_now"),
        n("huge_bytes").div_ceil(2 << 20) + n("small_bytes") / 4096
    );
    let picture = o["picture"].as_str().unwrap();
    assert_eq!(picture.len() as u64, n("entries_all_huge"));
    assert!(
        picture.chars().filter(|&c| c == '#').count() >= 15,
        "{picture}"
    );
}

#[test]
fn stat_tree_follows_children() {
    let exe = common::fixture(PIE);
    // A shell that starts the fixture: --tree on the shell finds it.
    let w = Waiting::start(
        common::tiexec_cmd()
            .args(["-b", "thp", "sh", "-c"])
            .arg(format!("'{}' 1000 wait; true", exe.display())),
        T,
    );
    let out = common::run(
        common::tiexec_cmd().args(["--stat", "--tree", &w.pid().to_string()]),
        T,
    );
    w.finish(T);
    out.check(
        out.stdout.contains("fixture-pie-32m"),
        "the child is listed",
    );
}

#[test]
fn check_describes_the_machine_and_plans_a_program() {
    let Some(_pool) = common::PoolGuard::set(0) else {
        return;
    };
    let exe = common::fixture(PIE);
    // Without run history, the program named to tiexec gets a copy on its
    // first run: ready, and the forecast says by which rule.
    let first = common::run(common::tiexec_cmd().args(["--check"]).arg(&exe), T);
    first.check(
        first.status.code() == Some(0)
            && first
                .stdout
                .contains("first run of a program named to tiexec"),
        "ready, and why",
    );
    // Long past runs: a private THP copy pays off.
    let cmd = common::tiexec_cmd();
    common::remember_runs(&cmd, &exe, &[60_000; 5]);
    let state = common::state_dir_of(&cmd);
    let xdg = state.parent().unwrap().to_path_buf();
    let with_history = || {
        let mut c = common::tiexec_cmd();
        c.env("XDG_CACHE_HOME", &xdg);
        c
    };
    let o = common::run(with_history().args(["--check", "--json"]).arg(&exe), T);
    o.check(o.status.success(), "ready: THP is available and pays off");
    let v: serde_json::Value = serde_json::from_str(&o.stdout).expect("valid JSON");
    let pool = &v["machine"]["hugetlb_pool"];
    // The pool as the kernel reports it (others may hold pages of it: a
    // cache mount's reservation).
    let total: u64 =
        std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
    assert_eq!(pool["total"], total);
    assert!(v["machine"]["kernel"].as_str().unwrap().starts_with(
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap()
            .trim()
    ));
    assert_eq!(v["program"]["dynamic"], true);
    assert_eq!(v["program"]["pie"], true);
    let forecast = &v["program"]["forecast"]["objects"][0];
    let thp = forecast["swapped_by_source"]["thp"].as_u64().unwrap_or(0);
    assert!(thp >= 30 << 20, "{forecast}");
    let text = common::run(with_history().arg("--check").arg(&exe), T);
    text.check(
        text.stdout
            .contains("not congruent (relink with -Wl,-z,max-page-size=0x200000")
            && text.stdout.contains("moved, from thp"),
        "PIE advice and the forecast",
    );
}

#[test]
fn check_says_a_static_program_is_ready_once_primed() {
    let spec = common::Spec {
        name: "obs-static-nopie-24m",
        text_mib: 24,
        static_link: true,
        ..common::NON_PIE
    };
    let exe = common::fresh_copy(&common::fixture(spec), &scratch("check-static"));
    let before = common::run(common::tiexec_cmd().arg("--check").arg(&exe), T);
    before.check(before.status.code() == Some(1), "not ready before priming");
    before.check(before.stdout.contains("statically linked"), "says why");
    let p = common::run(common::tiexec_cmd().arg("--prime").arg(&exe), T);
    p.check(p.status.success(), "primed");
    let after = common::run(common::tiexec_cmd().arg("--check").arg(&exe), T);
    after.check(
        after.status.success() && after.stdout.contains("cached as 2 MiB folios"),
        "ready",
    );
    let _ = std::fs::remove_dir_all(exe.parent().unwrap());
}
