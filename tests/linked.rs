//! Programs that link tiexec in and optimise themselves: a C program linked
//! with libtiexec.a (dynamic and fully static), and Rust programs using the
//! API (dynamic and static-pie). No LD_PRELOAD, no environment.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{Spec, Waiting, NON_PIE, PIE};

const T: Duration = Duration::from_secs(300);
const CALLS: &str = "200000";

/// Runs a fixture that links tiexec in, and checks what the kernel shows.
fn check_linked(exe: &Path, plain_spec: Spec, env: &[(&str, &str)], expect_huge: bool) -> String {
    let plain_exe = common::fixture(plain_spec);
    let plain = common::run(Command::new(&plain_exe).args([CALLS, "run"]), T);
    let mut cmd = Command::new(exe);
    common::isolate(&mut cmd);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let w = Waiting::start(cmd.args([CALLS, "wait"]), T);
    let pid = w.pid();
    let segments = common::text_segments(pid, exe);
    let interior = common::movable_interior(pid, exe, &segments);
    let cov = common::coverage(pid, &segments);
    let bytes = common::read_only_segments_match_file(pid, exe);
    let wx = common::writable_executable_mappings(pid);
    let first = w.first_line.clone();
    let o = w.finish(T);
    let what = format!("{}: interior {interior}, coverage {cov:?}", exe.display());
    o.check(o.status.success(), &format!("{what}: status"));
    o.check(
        first == plain.stdout,
        &format!("{what}: output differs from the plain build"),
    );
    o.check(bytes.is_ok(), &format!("{what}: bytes {bytes:?}"));
    o.check(wx.is_empty(), &format!("{what}: W+X {wx:?}"));
    if expect_huge {
        o.check(
            interior >= 20 << 20 && cov.huge() >= interior,
            &format!("{what}: not covered"),
        );
    } else {
        o.check(cov.huge() == 0, &format!("{what}: should be untouched"));
    }
    o.stderr
}

#[test]
fn a_c_program_linked_with_libtiexec_a_moves_its_whole_text() {
    let exe = common::linked_fixture(PIE, "fixture-pie-32m-linked");
    // Silent by default; the whole text, tiexec's own code in it included.
    let err = check_linked(&exe, PIE, &[("TIEXEC_BACKEND", "thp")], true);
    assert!(!err.contains("tiexec:"), "{err}");
    let err = check_linked(
        &exe,
        PIE,
        &[("TIEXEC_BACKEND", "thp"), ("TIEXEC_LOG", "info")],
        true,
    );
    assert!(err.contains("fixture-pie-32m-linked: text"), "{err}");
    // auto, with no cache and no past runs: a program that links tiexec in
    // asked for huge text, and gets it on its first run.
    let err = check_linked(&exe, PIE, &[("TIEXEC_LOG", "info")], true);
    assert!(
        err.contains("first run of a program named to tiexec"),
        "{err}"
    );
}

#[test]
fn a_static_c_program_linked_with_libtiexec_a_moves_its_whole_text() {
    let spec = Spec {
        static_link: true,
        ..NON_PIE
    };
    let exe = common::linked_fixture(spec, "fixture-static-32m-linked");
    check_linked(&exe, NON_PIE, &[("TIEXEC_BACKEND", "thp")], true);
}

#[test]
fn a_forced_failure_leaves_the_linked_program_on_its_original_text() {
    // remap-hole unmaps the text, tiexec's own code included, and the
    // trampoline (in its own page) must put it back before returning.
    for (spec, name, plain) in [
        (PIE, "fixture-pie-32m-linked", PIE),
        (
            Spec {
                static_link: true,
                ..NON_PIE
            },
            "fixture-static-32m-linked",
            NON_PIE,
        ),
    ] {
        let exe = common::linked_fixture(spec, name);
        for step in ["remap-hole", "staging-populate", "protect"] {
            let env = [("TIEXEC_BACKEND", "thp"), ("TIEXEC_FAULT", step)];
            let err = check_linked(&exe, plain, &env, false);
            assert!(err.contains("left on 4 KiB pages"), "{step}: {err}");
        }
    }
}

/// Builds the example in a target directory of its own (release, with
/// `rustflags`), and returns its path.
fn build_example(name: &str, rustflags: &str, features: &[&str]) -> PathBuf {
    let target_dir = common::scratch_dir().join(name);
    let triple = "x86_64-unknown-linux-gnu";
    let build = common::run(
        Command::new(env!("CARGO"))
            .args([
                "build",
                "--release",
                "--example",
                "self_remap",
                "--target",
                triple,
            ])
            .args(features.iter().flat_map(|f| ["--features", f]))
            .arg("--manifest-path")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
            .arg("--target-dir")
            .arg(&target_dir)
            .env("RUSTFLAGS", rustflags)
            .env_remove("CARGO_TARGET_DIR"),
        Duration::from_secs(1200),
    );
    build.check(build.status.success(), "build of the example");
    target_dir
        .join(triple)
        .join("release")
        .join("examples")
        .join("self_remap")
}

fn check_example_output(o: &common::Outcome) {
    o.check(o.status.success(), "example runs");
    // "...: N bytes of text, M on 2 MiB pages (...), K swapped by tiexec"
    let line = o.stdout.lines().next().unwrap_or_default();
    let number_before = |word: &str| -> u64 {
        let i = line.find(word).unwrap_or(0);
        line[..i]
            .split_whitespace()
            .last()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    let huge = number_before(" on 2 MiB pages");
    o.check(
        huge >= 6 << 20,
        &format!("{huge} bytes on 2 MiB pages, at least 6 MiB expected"),
    );
}

#[test]
fn the_rust_example_optimises_itself() {
    let exe = build_example("example-dynamic", "", &[]);
    let o = common::run(common::isolate(&mut Command::new(&exe)), T);
    check_example_output(&o);
}

#[test]
fn a_static_pie_rust_program_optimises_itself() {
    // glibc static-pie: no loader, no LD_PRELOAD possible; the API is the way.
    let exe = build_example("example-static", "-C target-feature=+crt-static", &[]);
    let file = std::fs::read(&exe).unwrap();
    let phdrs = tiexec::internal::elf::program_headers(&file).unwrap();
    assert!(
        !tiexec::internal::elf::has_interpreter(&phdrs),
        "not static"
    );
    let o = common::run(common::isolate(&mut Command::new(&exe)), T);
    check_example_output(&o);
}

#[test]
fn with_the_constructor_feature_the_text_is_huge_before_main() {
    let exe = build_example("example-constructor", "", &["constructor"]);
    // The constructor takes its settings from the environment.
    let o = common::run(
        common::isolate(&mut Command::new(&exe))
            .env("TIEXEC_LOG", "info")
            .env("TIEXEC_BACKEND", "thp"),
        T,
    );
    check_example_output(&o);
    // The constructor reported first; by main, nothing was left to swap.
    o.check(
        o.stderr.contains("self_remap: text"),
        "the constructor reported",
    );
    o.check(
        o.stdout.contains(", 0 swapped by tiexec"),
        "main found it done",
    );
}

#[test]
fn a_setuid_program_is_never_touched() {
    // The linked-in constructor runs whatever the loader does with
    // LD_PRELOAD: a setuid-root copy run by another user is in
    // secure-execution mode, and tiexec must keep its hands off.
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 || Command::new("runuser").arg("--help").output().is_err() {
        common::skip("needs root and runuser");
        return;
    }
    let linked = common::linked_fixture(PIE, "fixture-pie-32m-linked");
    let dir = std::env::temp_dir().join(format!("tiexec-setuid-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let exe = dir.join("setuid-fixture");
    std::fs::copy(&linked, &exe).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o4755)).unwrap();
    let w = Waiting::start(
        Command::new("runuser")
            .args(["-u", "nobody", "--"])
            .arg(&exe)
            .args(["1000", "wait"])
            .env("TIEXEC_LOG", "info"),
        T,
    );
    // The program runs as root (setuid), started by nobody.
    let pid = w.pid();
    let fixture_pid = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .ok()
        .and_then(|c| {
            c.split_whitespace()
                .next()
                .and_then(|p| p.parse::<u32>().ok())
        })
        .unwrap_or(pid);
    let segments = common::text_segments(fixture_pid, &exe);
    let cov = common::coverage(fixture_pid, &segments);
    let o = w.finish(T);
    let _ = std::fs::remove_dir_all(&dir);
    o.check(o.status.success(), "runs");
    o.check(cov.huge() == 0, &format!("untouched: {cov:?}"));
    o.check(o.stderr.contains("secure-execution process"), "says why");
}
