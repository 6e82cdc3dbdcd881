//! The `tiexec` wrapper: same PID, exit status and signals as the program;
//! shell-like lookup errors; children; static targets; a binary that finds
//! its library with no other file beside it.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::time::Duration;

use common::{Waiting, PIE, STATIC_SMALL};

const T: Duration = Duration::from_secs(120);

#[test]
fn the_program_keeps_the_pid_and_gets_huge_text() {
    let exe = common::fixture(PIE);
    let w = Waiting::start(
        common::tiexec_cmd()
            .args(["-b", "thp"])
            .arg(&exe)
            .args(["100000", "wait"]),
        T,
    );
    let pid = w.pid();
    // The fixture is the process we started: no fork in between.
    let segments = common::text_segments(pid, &exe);
    let cov = common::coverage(pid, &segments);
    let interior = common::movable_interior(pid, &exe, &segments);
    let o = w.finish(T);
    let reported = format!("pid {pid}");
    o.check(
        o.stderr.lines().any(|l| l == reported),
        "fixture must report tiexec's pid",
    );
    o.check(
        cov.anon_thp + cov.file_thp >= interior,
        &format!("coverage {cov:?}"),
    );
}

#[test]
fn exit_status_and_signals_pass_through() {
    let o = common::run(common::tiexec_cmd().args(["sh", "-c", "exit 42"]), T);
    o.check(o.status.code() == Some(42), "exit 42");
    let o = common::run(common::tiexec_cmd().args(["sh", "-c", "kill -TERM $$"]), T);
    o.check(o.status.signal() == Some(libc::SIGTERM), "SIGTERM");
}

#[test]
fn lookup_errors_are_127_and_126() {
    let o = common::run(common::tiexec_cmd().arg("no-such-program-for-tiexec"), T);
    o.check(o.status.code() == Some(127), "127 for not found");
    o.check(
        o.stderr
            .contains("no-such-program-for-tiexec: command not found"),
        "message",
    );

    let dir = common::scratch_dir().join("cli-lookup");
    std::fs::create_dir_all(&dir).unwrap();
    let plain = dir.join("not-executable");
    std::fs::write(&plain, "#!/bin/sh\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = common::run(common::tiexec_cmd().arg(&plain), T);
    o.check(o.status.code() == Some(126), "126 for not executable");
    o.check(o.stderr.contains("Permission denied"), "message");
}

#[test]
fn help_version_and_usage_errors() {
    let o = common::run(common::tiexec_cmd().arg("--help"), T);
    o.check(
        o.status.success() && o.stdout.contains("Usage: tiexec"),
        "--help",
    );
    let o = common::run(common::tiexec_cmd().arg("--version"), T);
    o.check(
        o.status.success() && o.stdout.starts_with("tiexec "),
        "--version",
    );
    let o = common::run(common::tiexec_cmd().args(["--backend", "fast", "true"]), T);
    o.check(
        o.status.code() == Some(2) && o.stderr.contains("expected auto"),
        "bad option",
    );
    let o = common::run(&mut common::tiexec_cmd(), T);
    o.check(o.status.code() == Some(2), "missing program");
}

#[test]
fn children_inherit_the_preload_unless_told_not_to() {
    let o = common::run(
        common::tiexec_cmd().args(["sh", "-c", "echo \"[$LD_PRELOAD]\""]),
        T,
    );
    o.check(
        o.status.success() && o.stdout.contains("libtiexec"),
        "inherited by default",
    );

    let o = common::run(
        common::tiexec_cmd().args(["--no-children", "sh", "-c", "echo \"[$LD_PRELOAD]\""]),
        T,
    );
    o.check(
        o.status.success() && o.stdout.trim() == "[]",
        "removed with --no-children",
    );

    // What the user preloads already stays, in both cases.
    let o = common::run(
        common::tiexec_cmd().env("LD_PRELOAD", "libm.so.6").args([
            "--no-children",
            "sh",
            "-c",
            "echo \"[$LD_PRELOAD]\"",
        ]),
        T,
    );
    o.check(o.stdout.trim() == "[libm.so.6]", "others kept");
}

#[test]
fn static_programs_run_unchanged_with_a_clear_note() {
    let exe = common::fixture(STATIC_SMALL);
    let o = common::run(common::tiexec_cmd().arg(&exe).args(["1000", "run", "5"]), T);
    o.check(o.status.code() == Some(5), "runs, status passes through");
    o.check(
        o.stderr.contains("is statically linked"),
        "says why tiexec cannot act",
    );
    o.check(o.stdout.starts_with("functions "), "output");
}

#[test]
fn an_installed_binary_alone_finds_its_library() {
    // Like `cargo install`: only the binary, in a directory of its own, and a
    // fresh HOME. The library comes out of the binary itself.
    let root = common::scratch_dir().join(format!("installed-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::create_dir_all(root.join("home")).unwrap();
    let bin = root.join("bin/tiexec");
    std::fs::copy(common::tiexec_bin(), &bin).unwrap();
    let exe = common::fixture(PIE);
    let run_once = || {
        let mut c = Command::new(&bin);
        for v in [
            "TIEXEC_BACKEND",
            "TIEXEC_LOG",
            "TIEXEC_LIBRARY",
            "LD_PRELOAD",
            "XDG_CACHE_HOME",
        ] {
            c.env_remove(v);
        }
        c.env("HOME", root.join("home"))
            .args(["-v", "-b", "thp"])
            .arg(&exe)
            .args(["1000", "run"]);
        common::run(&mut c, T)
    };
    for _ in 0..2 {
        // The second run reuses the extracted library.
        let o = run_once();
        o.check(o.status.success(), "runs");
        o.check(o.stderr.contains("new via thp"), "library loaded and acted");
    }
    // The library and the stub the wrapper preloads, once each.
    let cached: Vec<_> = std::fs::read_dir(root.join("home/.cache/tiexec"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".so"))
        .collect();
    assert_eq!(cached.len(), 2, "{cached:?}");
    assert!(cached.iter().any(|n| n.starts_with("libtiexec-stub-")));
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn the_carried_libraries_are_outside_the_loaded_segments_and_checked_when_read() {
    // The libraries sit in sections no segment loads: the wrapper's address
    // space does not hold them (see hostile_use's address-space limits).
    let wrapper = common::tiexec_bin();
    let bytes = std::fs::read(&wrapper).unwrap();
    let elf = goblin::elf::Elf::parse(&bytes).unwrap();
    let loaded: u64 = elf
        .program_headers
        .iter()
        .filter(|p| p.p_type == goblin::elf::program_header::PT_LOAD)
        .map(|p| p.p_memsz)
        .sum();
    for name in [".tiexec.lib", ".tiexec.stub"] {
        let s = elf
            .section_headers
            .iter()
            .find(|s| elf.shdr_strtab.get_at(s.sh_name) == Some(name))
            .unwrap_or_else(|| panic!("{name} in {}", wrapper.display()));
        assert!(s.sh_size > 0 && s.sh_addr == 0, "{name}: not loaded");
        assert_eq!(
            s.sh_flags & u64::from(goblin::elf::section_header::SHF_ALLOC),
            0
        );
    }
    println!(
        "the wrapper loads {loaded} bytes of its {} byte file",
        bytes.len()
    );
    // A copy whose library was taken out, or replaced by other bytes of the
    // same size, runs the program without tiexec and says why (at -v).
    let dir = common::scratch_dir().join(format!("carried-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let lib_len = elf
        .section_headers
        .iter()
        .find(|s| elf.shdr_strtab.get_at(s.sh_name) == Some(".tiexec.lib"))
        .map_or(0, |s| s.sh_size);
    let other = dir.join("other-bytes");
    std::fs::write(&other, vec![0x5a; lib_len as usize]).unwrap();
    let exe = common::fixture(PIE);
    let expected = common::plain_run(&exe, &["1000", "run"]).stdout;
    for (case, objcopy_args, says) in [
        (
            "without",
            vec!["--remove-section=.tiexec.lib".to_string()],
            "has no .tiexec.lib section",
        ),
        (
            "altered",
            vec![format!("--update-section=.tiexec.lib={}", other.display())],
            "does not hold the library this tiexec was built with",
        ),
    ] {
        let copy = dir.join(format!("tiexec-{case}"));
        let o = common::run(
            Command::new("objcopy")
                .args(&objcopy_args)
                .arg(&wrapper)
                .arg(&copy),
            T,
        );
        o.check(o.status.success(), "objcopy");
        // In a mount namespace where the wrapper's fallback directories
        // (/tmp, /var/tmp, /dev/shm tiexec-UID) are empty: a copy another
        // run extracted there (named by the same digest) would be used
        // without reading the section at all. (Only those directories: the
        // build itself may live under /tmp.)
        let private = dir.join(format!("tmpdir-{case}"));
        std::fs::create_dir_all(&private).unwrap();
        let mut c = Command::new("unshare");
        common::isolate(&mut c)
            .env_remove("XDG_RUNTIME_DIR")
            .env("TMPDIR", &private)
            .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg(
                "for d in /tmp /var/tmp /dev/shm; do p=$d/tiexec-$(id -u); \
                 mkdir -p $p && mount -t tmpfs -o mode=700 none $p || exit 99; done; \
                 exec \"$0\" \"$@\"",
            )
            .arg(&copy)
            .args(["-v", "-b", "thp"])
            .arg(&exe)
            .args(["1000", "run"]);
        let o = common::run(&mut c, T);
        o.check(
            o.status.success() && o.stdout == expected,
            &format!("{case}: the program runs as without tiexec"),
        );
        o.check(
            o.stderr.contains(says) && o.stderr.contains("without tiexec"),
            &format!("{case}: says why"),
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_explicit_library_is_used() {
    let exe = common::fixture(PIE);
    let lib = common::preload_lib();
    let o = common::run(
        common::tiexec_cmd()
            .arg("--library")
            .arg(&lib)
            .args(["sh", "-c", "echo $LD_PRELOAD"]),
        T,
    );
    let canon = std::fs::canonicalize(&lib).unwrap();
    o.check(
        o.stdout.trim() == canon.to_str().unwrap(),
        "LD_PRELOAD names it",
    );
    let o = common::run(
        common::tiexec_cmd()
            .args(["--library", "/nonexistent/libtiexec.so"])
            .arg(&exe)
            .args(["1000", "run"]),
        T,
    );
    o.check(o.status.success(), "program still runs without tiexec");
    o.check(
        o.stderr.contains("running") && o.stderr.contains("without tiexec"),
        "says so",
    );
}

#[test]
fn setuid_programs_get_a_clear_note() {
    let dir = common::scratch_dir().join(format!("setuid-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let prog = dir.join("true-setuid");
    std::fs::copy("/bin/true", &prog).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&prog, std::fs::Permissions::from_mode(0o4755)).unwrap();
    let o = common::run(common::tiexec_cmd().arg(&prog), T);
    let _ = std::fs::remove_dir_all(&dir);
    o.check(o.status.success(), "runs");
    o.check(
        o.stderr.contains("is setuid/setgid"),
        "says LD_PRELOAD cannot act",
    );
}

#[test]
fn a_word_is_always_a_program_never_one_of_tiexecs_commands() {
    // `stat`, `check` and friends are programs: tiexec's own commands are
    // options (`--stat`), recognised only as the first argument.
    for (program, args) in [
        ("stat", &["-c", "%n %s", "/etc/hostname"][..]),
        ("true", &[][..]),
    ] {
        let plain = common::run(Command::new(program).args(args), T);
        let o = common::run(common::tiexec_cmd().arg(program).args(args), T);
        o.check(
            o.status.code() == plain.status.code() && o.stdout == plain.stdout,
            &format!("{program} ran as itself\nplain: {plain}"),
        );
    }
    // A former command word that is no program gets a hint.
    let o = common::run(common::tiexec_cmd().args(["run", "true"]), T);
    o.check(o.status.code() == Some(127), "127");
    o.check(o.stderr.contains("without a command word"), "hint");
    // After the program, options are the program's.
    let o = common::run(common::tiexec_cmd().args(["echo", "--stat", "--help"]), T);
    o.check(o.stdout == "--stat --help\n", "echo got its arguments");
}

/// The stub loads into every process the wrapper reaches: it stays a few
/// KiB, and needs nothing but libc (a symbol of Rust's runtime, such as the
/// unwinder's personality routine, would make every program fail to start).
#[test]
fn the_stub_is_small_and_needs_only_libc() {
    let stub = common::stub_lib();
    let size = std::fs::metadata(&stub).unwrap().len();
    assert!(size < 64 << 10, "{} is {size} bytes", stub.display());
    let bytes = std::fs::read(&stub).unwrap();
    let elf = goblin::elf::Elf::parse(&bytes).unwrap();
    let undefined: Vec<String> = elf
        .dynsyms
        .iter()
        .filter(|s| s.is_import() && s.st_bind() != goblin::elf::sym::STB_WEAK)
        .filter_map(|s| elf.dynstrtab.get_at(s.st_name).map(str::to_string))
        .collect();
    assert!(
        !undefined
            .iter()
            .any(|n| n.starts_with("rust_") || n.starts_with("_Unwind") || n.starts_with("_ZN")),
        "Rust runtime symbols needed: {undefined:?}"
    );
    // A missing symbol would fail every program at start-up.
    let o = common::run(
        Command::new("/bin/true").env("LD_PRELOAD", &stub),
        std::time::Duration::from_secs(30),
    );
    o.check(
        o.status.success() && o.stderr.is_empty(),
        "a program starts with it",
    );
}
