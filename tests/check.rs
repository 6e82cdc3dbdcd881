//! `tiexec --check PROGRAM` forecasts with the library's own planner and
//! policy: for every fixture, what it says a run would do is what the next
//! run does (ranges, sources, what is kept and why), with the image cache
//! and with private THP copies. It never lets PROGRAM run, and it leaves no
//! file behind in the shared temporary directory.

mod common;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::CacheMount;

const T: Duration = Duration::from_secs(180);
const CALLS: &str = "20000";

/// Runs `cmd` with address-space randomization off (inherited across exec),
/// so that a forecast and a run load every object at the same address.
fn no_aslr(cmd: &mut Command) -> &mut Command {
    // SAFETY: personality(2) only changes this child's execution domain;
    // it allocates nothing and is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::personality(libc::ADDR_NO_RANDOMIZE as libc::c_ulong) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// One object's plan and outcome, as both reports give them: what must be
/// the same between a forecast and a run (addresses relative to the
/// object's load bias).
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    path: String,
    text_bytes: u64,
    planned_bytes: u64,
    already_huge_bytes: u64,
    kept: Vec<(String, u64)>,
    swapped: Vec<(u64, u64, String)>,
    failed: usize,
    not_attempted: Option<String>,
    /// Whether the process copies, by which rule, with what figures.
    decision: Option<String>,
}

fn outcomes(objects: &serde_json::Value) -> Vec<Outcome> {
    let mut out: Vec<Outcome> = objects
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|o| {
            let n = |k: &str| o[k].as_u64().unwrap_or(u64::MAX);
            let bias = n("bias");
            Outcome {
                path: o["path"].as_str().unwrap_or("").to_string(),
                text_bytes: n("text_bytes"),
                planned_bytes: n("planned_bytes"),
                already_huge_bytes: n("already_huge_bytes"),
                kept: o["kept"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .iter()
                    .map(|k| {
                        (
                            k["reason"].as_str().unwrap_or("").to_string(),
                            k["bytes"].as_u64().unwrap_or(0),
                        )
                    })
                    .collect(),
                swapped: o["swapped"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .iter()
                    .map(|s| {
                        (
                            s["start"].as_u64().unwrap_or(0).wrapping_sub(bias),
                            s["end"].as_u64().unwrap_or(0).wrapping_sub(bias),
                            s["source"].as_str().unwrap_or("").to_string(),
                        )
                    })
                    .collect(),
                failed: o["failed"].as_array().map_or(0, Vec::len),
                not_attempted: o["not_attempted"].as_str().map(str::to_string),
                decision: o["decision"].as_str().map(str::to_string),
            }
        })
        .collect();
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}

/// The environment both commands share: a state directory (run history)
/// and, when given, a cache.
fn shared_env(state: &Path, cache: Option<&CacheMount>) -> Vec<(String, String)> {
    vec![
        ("XDG_CACHE_HOME".into(), state.display().to_string()),
        (
            "TIEXEC_CACHE".into(),
            cache.map_or("off".into(), |c| c.path.display().to_string()),
        ),
    ]
}

/// Runs `exe` under the wrapper (with `flags`) and returns its JSON report.
fn real_run(exe: &Path, env: &[(String, String)], report: &Path, flags: &[&str]) -> Vec<Outcome> {
    let _ = std::fs::remove_file(report);
    let mut cmd = common::tiexec_cmd();
    no_aslr(&mut cmd);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let o = common::run(
        cmd.env("TIEXEC_REPORT", report)
            .args(flags)
            .arg(exe)
            .args([CALLS, "run"]),
        T,
    );
    o.check(o.status.success(), "the run");
    let text = std::fs::read_to_string(report).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    outcomes(&v["objects"])
}

/// `tiexec --check --json exe`: its forecast, and the whole output.
fn forecast(exe: &Path, env: &[(String, String)]) -> (Vec<Outcome>, common::Outcome) {
    let mut cmd = common::tiexec_cmd();
    no_aslr(&mut cmd);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let o = common::run(cmd.args(["--check", "--json"]).arg(exe), T);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap_or_default();
    o.check(
        v["program"]["forecast"].is_object(),
        "a forecast in the output",
    );
    (outcomes(&v["program"]["forecast"]["objects"]), o)
}

/// Every fixture, as a fresh copy (small page-cache folios), plus the host
/// of a big linked library.
fn fixtures(test: &str) -> Vec<PathBuf> {
    let dir = common::scratch_dir().join(format!("check-{test}-{}", std::process::id()));
    let mut out: Vec<PathBuf> = [
        common::NON_PIE,
        common::PIE,
        common::MERGED_RX,
        common::TWO_SEGMENTS,
        common::BIG_RODATA,
        common::HUGE_ALIGNED,
        common::NON_PIE_64,
        common::PIE_64,
    ]
    .into_iter()
    .map(|spec| common::fresh_copy(&common::fixture(spec), &dir))
    .collect();
    // Old enough for their images to be shared (see `common::settle`).
    if let Some(last) = out.last() {
        common::settle(last);
    }
    out.push(common::linked_library_fixture().0);
    out
}

/// What a program's state holds before the forecast.
#[derive(Clone, Copy)]
enum Past {
    /// Nothing: its first run (the forecast comes first).
    Nothing,
    /// Ten runs of this lifetime on 4 KiB pages.
    Plain(u32),
    /// Runs that measured a gain from huge text.
    Gain,
    /// Long runs, and a hot map: its runs touch only its first 4 MiB
    /// (`FIXTURE_REGION`), measured by a run of the program as a child.
    Hot,
}

/// For each fixture: a run (the page cache and the cache settle), the
/// forecast, another run; the forecast must be what the second run did.
/// With no past, the forecast comes first and must be what the first run
/// does.
fn forecast_is_the_next_run(test: &str, cache: Option<&CacheMount>, past: Past) {
    use tiexec::internal::history::Arm;
    // One at a time: the fixtures (and the libraries they load) are shared
    // files, and a run of one test priming a library's page cache between
    // another test's forecast and its run would change what that run finds
    // already huge.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let scratch = common::scratch_dir().join(format!("check-{test}-{}", std::process::id()));
    // Fixtures whose ranges went to the policy (not all already huge), and
    // those whose cold text stayed.
    let mut supplied = 0;
    let mut with_cold = 0;
    for exe in fixtures(test) {
        let state = scratch.join(format!(
            "state-{}",
            exe.file_name().unwrap().to_string_lossy()
        ));
        let _ = std::fs::remove_dir_all(&state);
        std::fs::create_dir_all(&state).unwrap();
        let mut env = shared_env(&state, cache);
        let dir =
            tiexec::internal::state::StateDir::open(&state.join("tiexec")).expect("state dir");
        let program = std::fs::canonicalize(&exe).unwrap();
        let program = program.to_str().unwrap();
        let runs: Vec<(u32, Arm)> = match past {
            Past::Nothing => Vec::new(),
            Past::Plain(ms) => vec![(ms, Arm::Plain); 10],
            Past::Gain => vec![
                (560, Arm::Copy),
                (630, Arm::Plain),
                (550, Arm::Copy),
                (620, Arm::Plain),
                (540, Arm::Copy),
            ],
            Past::Hot => vec![(60_000, Arm::Plain); 3],
        };
        if let Past::Hot = past {
            // The first 1024 functions: 4 MiB of text (the host's library
            // is called through its own table, untouched by the region).
            // Measured by a first run of the program as a child: on 4 KiB
            // pages, and recorded.
            env.push(("FIXTURE_REGION".into(), "0:1024".into()));
            let mut child = Command::new(&exe);
            common::isolate(&mut child);
            no_aslr(&mut child);
            for (k, v) in &env {
                child.env(k, v);
            }
            let o = common::run(
                child
                    .env("LD_PRELOAD", common::preload_lib())
                    .env("TIEXEC_NAMED_PID", "1")
                    .args([CALLS, "run"]),
                T,
            );
            o.check(o.status.success(), "the measuring run");
        }
        for (ms, arm) in runs {
            dir.add_run(program, ms, arm).unwrap();
        }
        let report = scratch.join("report.json");
        let (first, (foreseen, check), second) = if let Past::Nothing = past {
            // The first run, without the wrapper's priming of the page
            // cache (the forecast does not prime: it must see the page
            // cache the run sees).
            let f = forecast(&exe, &env);
            let run = real_run(&exe, &env, &report, &["--no-prime"]);
            (Vec::new(), f, run)
        } else {
            // The first run primes the page cache; nothing primes between
            // the forecast and the run it foresees.
            let first = real_run(&exe, &env, &report, &[]);
            let f = forecast(&exe, &env);
            (first, f, real_run(&exe, &env, &report, &["--no-prime"]))
        };
        assert!(!second.is_empty(), "{}: no report", exe.display());
        if second.iter().any(|o| o.planned_bytes > 0) {
            supplied += 1;
        }
        assert_eq!(
            foreseen,
            second,
            "{}: the forecast is not what the run did\n(first run: {first:#?})\n{check}",
            exe.display()
        );
        let cold: u64 = second
            .iter()
            .flat_map(|o| &o.kept)
            .filter(|(why, _)| why.contains("not touched"))
            .map(|(_, n)| n)
            .sum();
        if cold > 0 {
            with_cold += 1;
        }
    }
    assert!(
        supplied >= 4,
        "only {supplied} fixtures had ranges to supply"
    );
    if let Past::Hot = past {
        // The fixtures the page cache does not map huge by itself.
        assert!(
            with_cold >= 4,
            "only {with_cold} fixtures kept cold text on 4 KiB pages"
        );
    }
    let _ = std::fs::remove_dir_all(&scratch);
}

#[test]
fn the_forecast_is_what_a_run_does_with_the_cache() {
    let Some(cache) = CacheMount::new("check", 160, 170) else {
        return;
    };
    forecast_is_the_next_run("cache", Some(&cache), Past::Nothing);
}

#[test]
fn the_forecast_is_what_a_run_does_with_private_copies() {
    // Long past runs: a private THP copy is negligible.
    forecast_is_the_next_run("thp", None, Past::Plain(60_000));
}

#[test]
fn the_forecast_is_what_a_run_does_when_copies_would_not_pay() {
    // Short past runs: nothing is copied, and the forecast says so.
    forecast_is_the_next_run("short", None, Past::Plain(5));
}

#[test]
fn the_forecast_is_what_a_first_run_does() {
    // The program named to tiexec, never run before: copied.
    forecast_is_the_next_run("first", None, Past::Nothing);
}

#[test]
fn the_forecast_is_what_a_run_does_when_gains_were_measured() {
    forecast_is_the_next_run("gain", None, Past::Gain);
}

#[test]
fn the_forecast_is_what_a_run_does_with_a_hot_map() {
    // Only the huge pages its runs touch are copied; the rest stays.
    forecast_is_the_next_run("hot", None, Past::Hot);
}

/// The program never runs: a fixture that would write a file when it
/// starts (its `main`) leaves none behind under `--check`.
#[test]
fn check_never_runs_the_program() {
    let dir = common::scratch_dir().join(format!("check-never-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let marker = dir.join("ran");
    // A shell script would be its interpreter's business: use an ELF
    // program that writes a file from main.
    let src = dir.join("writer.c");
    std::fs::write(
        &src,
        r#"#include <stdio.h>
           #include <stdlib.h>
           int main(void) { FILE *f = fopen(getenv("MARKER"), "w"); if (f) fclose(f); return 0; }"#,
    )
    .unwrap();
    let exe = dir.join("writer");
    let cc = common::run(
        Command::new("cc").arg("-O1").arg("-o").arg(&exe).arg(&src),
        T,
    );
    cc.check(cc.status.success(), "cc");
    let o = common::run(
        common::tiexec_cmd()
            .env("MARKER", &marker)
            .args(["--check"])
            .arg(&exe),
        T,
    );
    o.check(
        o.stdout.contains("what a run would do") && !marker.exists(),
        "a forecast, and the program's main never ran",
    );
    // Sanity: run plainly, it does write the file.
    let plain = common::run(Command::new(&exe).env("MARKER", &marker), T);
    plain.check(marker.exists(), "the program writes its marker when run");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every file `tiexec` creates in a shared temporary directory is created
/// new (`O_EXCL`) without following symlinks (`O_NOFOLLOW`), or has no name
/// (`O_TMPFILE`); directories are made new, 0700. Traced with strace over
/// `--check` (the kernel probe, the forecast) and a run with a report and a
/// perf map.
#[test]
fn files_in_shared_temporary_directories_are_created_safely() {
    if common::run(Command::new("strace").arg("-V"), T)
        .status
        .code()
        != Some(0)
    {
        common::skip("strace is not installed");
        return;
    }
    let dir = common::scratch_dir().join(format!("check-tmp-{}", std::process::id()));
    let tmp = dir.join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o1777)).unwrap();
    let exe = common::fresh_copy(&common::fixture(common::PIE), &dir);
    let trace = dir.join("trace");
    for args in [
        vec!["--check".to_string(), exe.display().to_string()],
        vec![
            "-b".to_string(),
            "thp".to_string(),
            "--perf-map".to_string(),
            "--report".to_string(),
            tmp.join("report-%p.json").display().to_string(),
            exe.display().to_string(),
            CALLS.to_string(),
            "run".to_string(),
        ],
    ] {
        let _ = std::fs::remove_file(&trace);
        let mut cmd = Command::new("strace");
        common::isolate(&mut cmd);
        let o = common::run(
            cmd.env("TMPDIR", &tmp)
                .args([
                    "-f",
                    "-qq",
                    "-e",
                    "trace=open,openat,creat,mkdir,mkdirat",
                    "-o",
                ])
                .arg(&trace)
                .arg(common::tiexec_bin())
                .args(&args),
            T,
        );
        o.check(o.status.code().is_some(), "traced");
        let text = std::fs::read_to_string(&trace).unwrap_or_default();
        let mut seen = 0;
        for line in text.lines() {
            let in_tmp =
                line.contains(&format!("\"{}/", tmp.display())) || line.contains("\"/tmp/");
            if !in_tmp || line.contains("= -1") {
                continue;
            }
            seen += 1;
            if let Some(map) = line
                .split('"')
                .find(|w| w.starts_with("/tmp/perf-") && w.ends_with(".map"))
            {
                let _ = std::fs::remove_file(map);
            }
            let creates = line.contains("O_CREAT");
            let safe_file = !creates
                || (line.contains("O_EXCL") && line.contains("O_NOFOLLOW"))
                // perf's own convention: /tmp/perf-PID.map is appended to
                // (a JIT may have written it): never followed, checked to
                // be the user's regular file.
                || (line.contains("/tmp/perf-") && line.contains("O_NOFOLLOW"));
            let safe_dir = !line.contains("mkdir") || line.contains("0700");
            let unnamed = line.contains("O_TMPFILE");
            assert!(
                unnamed || (safe_file && safe_dir),
                "{args:?}: not created safely in a shared temporary directory:\n{line}\n{o}"
            );
        }
        // The probe and the forecast's directory; the report and the perf
        // map.
        assert!(
            seen >= 2,
            "{args:?}: nothing traced in {}:\n{text}",
            tmp.display()
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
