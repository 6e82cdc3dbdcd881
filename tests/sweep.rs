//! A sweep over programs nobody here wrote: every dynamically linked ELF
//! program in /usr/bin that answers `--version` the same way twice gives
//! byte-identical stdout and stderr and the same exit status under tiexec,
//! with nothing printed by tiexec at the default log level.
//!
//! The test suite takes a deterministic sample (about 40 programs);
//! `TIEXEC_SWEEP=all cargo test --test sweep` takes every one.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(10);

/// Programs not to run at all, whatever they do with --version.
const NEVER: &[&str] = &[
    "reboot",
    "shutdown",
    "halt",
    "poweroff",
    "init",
    "telinit",
    "runlevel",
    "kill",
    "killall",
    "killall5",
    "pkill",
    "skill",
    "snice",
    "xdg-open",
    "sensible-browser",
    "x-www-browser",
    "login",
    "su",
    "sudo",
    "passwd",
    "agetty",
    "dbus-daemon",
    "Xvfb",
    "Xorg",
    "chromium",
    "systemctl",
    "loginctl",
    "machinectl",
    "timedatectl",
    "hostnamectl",
    "localectl",
];

fn candidates() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir("/usr/bin")
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    out.retain(|p| {
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let Ok(meta) = std::fs::symlink_metadata(p) else {
            return false;
        };
        let mode = meta.permissions().mode();
        meta.is_file()
            && mode & 0o111 != 0
            && mode & 0o6000 == 0
            && !NEVER.contains(&name)
            && is_dynamic_elf(p)
    });
    out.sort();
    out
}

fn is_dynamic_elf(p: &Path) -> bool {
    std::fs::File::open(p)
        .ok()
        .and_then(|f| tiexec::internal::elf::read_program_headers(&f))
        .is_some_and(|ph| tiexec::internal::elf::has_interpreter(&ph))
}

fn version(cmd: &mut Command, home: &Path) -> Option<common::Outcome> {
    common::run_limited(
        cmd.arg("--version").current_dir(home).env("HOME", home),
        LIMIT,
    )
}

#[test]
fn programs_answer_version_the_same_under_tiexec() {
    let all = candidates();
    let full = std::env::var_os("TIEXEC_SWEEP").is_some_and(|v| v == "all");
    let step = if full { 1 } else { (all.len() / 40).max(1) };
    let home = common::scratch_dir().join(format!("sweep-{}", std::process::id()));
    std::fs::create_dir_all(&home).unwrap();
    let (mut compared, mut unstable, mut slow) = (0, 0, 0);
    let mut differences = Vec::new();
    for program in all.iter().step_by(step) {
        let (Some(a), Some(b)) = (
            version(&mut Command::new(program), &home),
            version(&mut Command::new(program), &home),
        ) else {
            slow += 1;
            continue;
        };
        if a.stdout != b.stdout || a.stderr != b.stderr || a.status.code() != b.status.code() {
            unstable += 1;
            continue;
        }
        let Some(t) = version(common::tiexec_cmd().arg(program), &home) else {
            differences.push(format!(
                "{}: timed out under tiexec only",
                program.display()
            ));
            continue;
        };
        compared += 1;
        if t.stdout != a.stdout || t.stderr != a.stderr || t.status.code() != a.status.code() {
            differences.push(format!(
                "{}\n--- plain ---\n{a}\n--- tiexec ---\n{t}",
                program.display()
            ));
        }
    }
    let _ = std::fs::remove_dir_all(&home);
    eprintln!(
        "sweep: {} candidates, {compared} compared, {unstable} unstable, {slow} timed out",
        all.len()
    );
    assert!(differences.is_empty(), "{}", differences.join("\n\n"));
    assert!(compared >= 20 || full, "only {compared} programs compared");
}
