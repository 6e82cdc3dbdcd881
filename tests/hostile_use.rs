//! Hostile use, round 3: another user's files, user namespaces, coarse
//! timestamps, what a program inherits, symbolizers, core dumps, terminals,
//! exit statuses, address-space limits. Every case: the program behaves as
//! it would without tiexec, and nothing another user planted ever runs.
//!
//! Root only (it makes a second user and plants files as that user); it
//! touches shared places (`/tmp/tiexec-*`, `core_pattern`) under a lock and
//! puts them back.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use common::{CacheMount, NON_PIE, PIE, PIE_64};

const T: Duration = Duration::from_secs(180);
const CALLS: &str = "200000";

/// One test at a time touches the machine's shared places.
static SHARED_PLACES: Mutex<()> = Mutex::new(());

fn root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

use common::other_user;

fn overflow_uid() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/overflowuid")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(65534)
}

/// A shared library whose constructor creates `marker`: what an attacker
/// would plant in place of tiexec's.
fn planted_library(dir: &Path, marker: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let src = dir.join("planted.c");
    std::fs::write(
        &src,
        format!(
            "#include <stdio.h>\n__attribute__((constructor)) static void own(void) {{ \
             FILE *f = fopen(\"{}\", \"w\"); if (f) fclose(f); }}\n",
            marker.display()
        ),
    )
    .unwrap();
    let lib = dir.join("planted.so");
    let o = common::run(
        Command::new("cc")
            .args(["-shared", "-fPIC", "-o"])
            .arg(&lib)
            .arg(&src),
        T,
    );
    o.check(o.status.success(), "build the planted library");
    lib
}

/// The names the wrapper gives its extracted stub and library.
fn extracted_names() -> [String; 2] {
    let digest = |p: PathBuf| {
        let bytes = std::fs::read(p).unwrap();
        let h = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        format!("{h:016x}")
    };
    let version = env!("CARGO_PKG_VERSION");
    [
        format!("libtiexec-stub-{version}-{}.so", digest(common::stub_lib())),
        format!("libtiexec-{version}-{}.so", digest(common::preload_lib())),
    ]
}

/// `dir` made by `uid`, 0700, holding copies of `lib` under `names`.
fn plant(dir: &Path, uid: u32, lib: &Path, names: &[String]) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    for name in names {
        let to = dir.join(name);
        std::fs::copy(lib, &to).unwrap();
        std::os::unix::fs::chown(&to, Some(uid), Some(uid)).unwrap();
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::chown(dir, Some(uid), Some(uid)).unwrap();
}

#[test]
fn in_a_user_namespace_that_maps_nobody_nothing_planted_runs() {
    if !root() {
        common::skip("needs root (a second user, unshare)");
        return;
    }
    let Some(other) = other_user() else {
        return;
    };
    let _shared = SHARED_PLACES.lock().unwrap_or_else(|e| e.into_inner());
    let scratch = common::scratch_dir().join(format!("userns-{}", std::process::id()));
    let marker = scratch.join("planted-code-ran");
    let _ = std::fs::remove_file(&marker);
    let lib = planted_library(&scratch, &marker);
    // Inside `unshare -U` (no uid map), root is the overflow id, and so is
    // every file of another user: the other user plants tiexec's libraries
    // where an unmapped root would look for them.
    let overflow = overflow_uid();
    let planted: Vec<PathBuf> = ["/tmp", "/var/tmp", "/dev/shm"]
        .iter()
        .map(|d| Path::new(d).join(format!("tiexec-{overflow}")))
        .collect();
    for dir in &planted {
        plant(dir, other, &lib, &extracted_names());
    }
    let run = |args: &[&str]| {
        let mut cmd = Command::new("unshare");
        cmd.arg("-U")
            .arg("env")
            .args([
                "-u",
                "HOME",
                "-u",
                "XDG_CACHE_HOME",
                "-u",
                "XDG_RUNTIME_DIR",
            ])
            .arg("TMPDIR=/tmp")
            .arg(common::tiexec_bin())
            .args(args);
        common::run(&mut cmd, T)
    };
    let o = run(&["-v", "/bin/echo", "hi"]);
    for dir in &planted {
        let _ = std::fs::remove_dir_all(dir);
    }
    o.check(
        o.status.success() && o.stdout == "hi\n",
        "the program runs as without tiexec",
    );
    o.check(!marker.exists(), "the planted library never ran");
    o.check(
        o.stderr.contains("not mapped in its user namespace"),
        "says why tiexec stays out",
    );

    // The image cache: another user's directory under the overflow id's
    // name is not this process's, whatever ownership says inside.
    let Some(cache) = CacheMount::new("userns", 32, 40) else {
        return;
    };
    let dir = cache.path.join(overflow.to_string());
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::chown(&dir, Some(other), Some(other)).unwrap();
    let exe = common::fresh_copy(&common::fixture(NON_PIE), &scratch);
    let mut cmd = Command::new("unshare");
    cmd.arg("-U")
        .arg("env")
        .arg(format!("LD_PRELOAD={}", common::preload_lib().display()))
        .arg(format!("TIEXEC_CACHE={}", cache.path.display()))
        .arg("TIEXEC_LOG=info")
        .arg(&exe)
        .args([CALLS, "run"]);
    let o = common::run(&mut cmd, T);
    o.check(o.status.success(), "runs");
    o.check(
        o.stderr.contains("not mapped in its user namespace") && !o.stderr.contains("via cache"),
        "the cache is not used",
    );
    assert!(
        std::fs::read_dir(&dir).unwrap().next().is_none(),
        "nothing written into the other user's directory"
    );
}

/// A scratch filesystem whose timestamps have 1-second granularity (ext4
/// with 128-byte inodes), mounted from a file; unmounted on drop.
struct CoarseFs {
    mount: PathBuf,
}

impl CoarseFs {
    fn new(name: &str) -> Option<CoarseFs> {
        let base = common::scratch_dir().join(format!("{name}-{}", std::process::id()));
        std::fs::create_dir_all(&base).unwrap();
        let image = base.join("fs.img");
        let mount = base.join("mnt");
        std::fs::create_dir_all(&mount).unwrap();
        let f = std::fs::File::create(&image).unwrap();
        f.set_len(256 << 20).unwrap();
        let mk = common::run(
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-I", "128"])
                .arg(&image),
            T,
        );
        if !mk.status.success() {
            common::skip(format_args!("mkfs.ext4 -I 128\n{mk}"));
            return None;
        }
        let m = common::run(
            Command::new("mount")
                .args(["-o", "loop"])
                .arg(&image)
                .arg(&mount),
            T,
        );
        if !m.status.success() {
            common::skip(format_args!("cannot mount a loop file\n{m}"));
            return None;
        }
        Some(CoarseFs { mount })
    }
}

impl Drop for CoarseFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
    }
}

#[test]
fn a_program_patched_within_a_timestamp_tick_never_runs_its_old_text() {
    if !root() {
        common::skip("needs root (a loop mount)");
        return;
    }
    let Some(fs) = CoarseFs::new("coarse") else {
        return;
    };
    let Some(cache) = CacheMount::new("coarse", 32, 40) else {
        return;
    };
    let exe = fs.mount.join("prog");
    let old = std::fs::read(common::fixture(NON_PIE)).unwrap();
    let new = common::fixture::patched_text(&common::fixture(NON_PIE), 4000);
    // In place (same inode), in 4 KiB writes (small page-cache folios: the
    // kernel does not map it huge by itself, the cache is what serves).
    let write = |bytes: &[u8]| {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&exe)
            .unwrap();
        for chunk in bytes.chunks(4096) {
            f.write_all(chunk).unwrap();
        }
        f.set_permissions(std::fs::Permissions::from_mode(0o755))
            .unwrap();
    };
    let run = || {
        common::run(
            common::preloaded(&exe, &[("TIEXEC_LOG", "info")])
                .env("TIEXEC_CACHE", &cache.path)
                .args(["20000", "run"]),
            T,
        )
    };
    let plain = |bytes: &[u8]| {
        write(bytes);
        common::run(Command::new(&exe).args(["20000", "run"]), T).stdout
    };
    let out_old = plain(&old);
    let out_new = plain(&new);
    assert_ne!(out_old, out_new, "the patch changes the output");
    // Several rounds: write, run under tiexec with the cache, patch in place
    // within the same second (same size, inode, build ID and, on this
    // filesystem, times), run again.
    for round in 0..3 {
        write(&old);
        let a = run();
        a.check(
            a.stdout == out_old,
            &format!("round {round}: the old version runs"),
        );
        write(&new);
        let b = run();
        b.check(
            b.stdout == out_new,
            &format!("round {round}: the patched version runs its new text"),
        );
        b.check(
            !b.stderr.contains("cache (hit)"),
            "no image of the old version is used",
        );
    }
    // Settled (older than any tick): its image is shared.
    common::settle(&exe);
    let c = run();
    c.check(
        c.stdout == out_new && c.stderr.contains("cache (built)"),
        "a settled file's image is built and shared",
    );
}

#[test]
fn what_a_program_inherits_reaches_it_unchanged() {
    // Dispositions, mask, limits, descriptors and the environment (less the
    // documented variables), as under `env`. (The descriptors are listed by
    // the program itself, `ls /proc/self/fd`: a shell listing its own while
    // it sets up a pipeline shows the pipe's ends or not, by chance.)
    let script = r#"
        trap '' PIPE
        ulimit -n 777
        exec 7</dev/null
        yes | "$@" head -1 >/dev/null; echo "yes: ${PIPESTATUS[0]}"
        "$@" grep -E '^Sig(Ign|Blk|Cgt)' /proc/self/status
        "$@" sh -c 'ulimit -n; exec ls /proc/self/fd'
        "$@" env | grep -v -E '^(TIEXEC_|LD_PRELOAD=|ASAN_OPTIONS=|_=|XDG_CACHE_HOME=)' | sort
    "#;
    let run = |wrapper: &[&std::ffi::OsStr]| {
        let mut cmd = Command::new("bash");
        common::isolate(&mut cmd)
            .args(["-c", script, "inherit"])
            .args(wrapper);
        common::run(&mut cmd, T)
    };
    let plain = run(&["env".as_ref()]);
    let under = run(&[common::tiexec_bin().as_os_str()]);
    under.check(
        under.stdout == plain.stdout,
        &format!("as under env:\n{}", plain.stdout),
    );
    under.check(
        under.stdout.contains("yes: 1"),
        "SIGPIPE stays ignored: yes sees EPIPE and exits 1",
    );
}

#[test]
fn maps_based_symbolizers_name_frames_in_moved_text() {
    if Command::new("eu-stack").arg("--version").output().is_err() {
        common::skip("eu-stack (elfutils) is not installed");
        return;
    }
    // A program busy in its text; eu-stack reads /proc/PID/maps to find its
    // modules, as continuous profilers do.
    let named = |extra: &[&str], exe: &Path| -> usize {
        let mut cmd = if extra.is_empty() {
            let mut c = Command::new(exe);
            common::isolate(&mut c);
            c
        } else {
            let mut c = common::tiexec_cmd();
            c.args(extra).arg(exe);
            c
        };
        let mut child = cmd
            .args(["1000000000", "run"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        let mut named = 0;
        for _ in 0..6 {
            let o = Command::new("eu-stack")
                .args(["-1", "-p", &child.id().to_string()])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&o.stdout);
            // `#0  0x... NAME`: a frame eu-stack could name (a fixture
            // function, or the driver's loop between two calls); an
            // unnamed one shows the address alone.
            if text
                .lines()
                .find(|l| l.starts_with("#0"))
                .is_some_and(|l| l.split_whitespace().nth(2).is_some())
            {
                named += 1;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
        named
    };
    for spec in [PIE_64, common::NON_PIE_64] {
        let exe = common::fixture(spec);
        let plain = named(&[], &exe);
        let moved = named(&["--no-prime", "-b", "thp"], &exe);
        let auto = named(&["--no-prime"], &exe);
        assert!(
            plain >= 5 && moved >= 5 && auto >= 5,
            "{}: frames named in 6 samples: plain {plain}, -b thp {moved}, default {auto}",
            spec.name
        );
    }
}

/// Sets `core_pattern` to a directory of the test's own while it lives.
struct CorePattern {
    old: String,
    dir: PathBuf,
}

impl CorePattern {
    fn new() -> CorePattern {
        let dir = common::scratch_dir().join(format!("cores-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let old = std::fs::read_to_string("/proc/sys/kernel/core_pattern").unwrap();
        std::fs::write(
            "/proc/sys/kernel/core_pattern",
            format!("{}/core.%p", dir.display()),
        )
        .unwrap();
        CorePattern { old, dir }
    }
}

impl Drop for CorePattern {
    fn drop(&mut self) {
        let _ = std::fs::write("/proc/sys/kernel/core_pattern", self.old.trim_end());
    }
}

#[test]
fn core_dumps_stay_the_size_they_were_and_name_the_same_frames() {
    if !root() {
        common::skip("needs root (core_pattern)");
        return;
    }
    if Command::new("gdb").arg("--version").output().is_err() {
        common::skip("gdb is not installed");
        return;
    }
    let _shared = SHARED_PLACES.lock().unwrap_or_else(|e| e.into_inner());
    let cores = CorePattern::new();
    let exe = common::fixture(PIE);
    let dump = |wrapper: &str| -> (u64, String) {
        let script = format!(
            "ulimit -c unlimited; exec {wrapper} '{}' 20000 abort",
            exe.display()
        );
        let mut cmd = Command::new("bash");
        common::isolate(&mut cmd).args(["-c", &script]);
        let o = common::run(&mut cmd, T);
        o.check(
            o.status.code().is_none() || o.status.code() == Some(134),
            "aborted",
        );
        let core = std::fs::read_dir(&cores.dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .next()
            .expect("a core dump");
        let size = std::fs::metadata(&core).unwrap().len();
        let bt = common::run(
            Command::new("gdb")
                .args(["-batch", "-nx", "-ex", "bt"])
                .arg(&exe)
                .arg(&core),
            T,
        );
        let _ = std::fs::remove_file(&core);
        let frames: Vec<String> = bt
            .stdout
            .lines()
            .filter(|l| l.starts_with('#'))
            .filter_map(|l| l.split(" in ").nth(1).or(l.split_whitespace().nth(1)))
            .map(|f| f.split_whitespace().next().unwrap_or("").to_string())
            .collect();
        (size, frames.join(" "))
    };
    let (plain_size, plain_bt) = dump("");
    let (moved_size, moved_bt) = dump(&format!(
        "{} --no-prime -b thp",
        common::tiexec_bin().display()
    ));
    assert!(plain_bt.contains("main"), "plain backtrace: {plain_bt}");
    assert_eq!(moved_bt, plain_bt, "the same backtrace");
    assert!(
        moved_size <= plain_size + (4 << 20),
        "core of {moved_size} bytes, {plain_size} plain"
    );
}

#[test]
fn cache_listings_escape_other_users_names() {
    if !root() {
        common::skip("needs root (a second user)");
        return;
    }
    let Some(other) = other_user() else {
        return;
    };
    let Some(cache) = CacheMount::new("escape", 8, 16) else {
        return;
    };
    let dir = cache.path.join(other.to_string());
    std::fs::create_dir(&dir).unwrap();
    let evil = "lib\x1b[2J\x1b]0;owned\x07\nforged line@v2-1-2-3-4-5-0-6-200000-0-7";
    std::fs::File::create(dir.join(evil)).unwrap();
    std::os::unix::fs::chown(dir.join(evil), Some(other), Some(other)).unwrap();
    std::os::unix::fs::chown(&dir, Some(other), Some(other)).unwrap();
    let list = |extra: &[&str]| {
        common::run(
            common::tiexec_cmd()
                .arg("--cache")
                .args(extra)
                .arg("--cache-dir")
                .arg(&cache.path),
            T,
        )
    };
    let own = list(&[]);
    own.check(
        !own.stdout.contains("forged"),
        "root's own images only, by default",
    );
    let all = list(&["--all-users"]);
    all.check(
        all.stdout.contains("forged line")
            && !all.stdout.contains('\x1b')
            && !all.stdout.contains('\x07')
            && all.stdout.contains("\\x1b[2J"),
        "every name escaped",
    );
    all.check(
        !all.stdout.lines().any(|l| l.starts_with("forged")),
        "no line forged",
    );
    // Clearing as root: root's own images unless --all-users; --dry-run
    // only lists.
    let clear = list(&["--clear"]);
    clear.check(dir.join(evil).exists(), "another user's image stays");
    let dry = list(&["--clear", "--dry-run", "--all-users"]);
    dry.check(
        dir.join(evil).exists() && dry.stdout.contains("would evict"),
        "a dry run lists, and removes nothing",
    );
    let all = list(&["--clear", "--all-users"]);
    all.check(!dir.join(evil).exists(), "--all-users clears every user's");
}

/// A directory moved aside for a test's lifetime and put back on drop
/// (after the test removed whatever it made in its place).
struct MovedAside {
    path: PathBuf,
    aside: PathBuf,
}

impl MovedAside {
    fn new(path: &Path) -> Option<MovedAside> {
        let aside = path.with_extension(format!("aside-{}", std::process::id()));
        std::fs::rename(path, &aside).ok()?;
        Some(MovedAside {
            path: path.to_path_buf(),
            aside,
        })
    }
}

impl Drop for MovedAside {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
        let _ = std::fs::rename(&self.aside, &self.path);
    }
}

#[test]
fn another_users_temporary_directories_make_no_noise() {
    if !root() {
        common::skip("needs root (a second user)");
        return;
    }
    let Some(other) = other_user() else {
        return;
    };
    let _shared = SHARED_PLACES.lock().unwrap_or_else(|e| e.into_inner());
    // Without HOME, the wrapper would use root's private directories in the
    // temporary places: another user made them all first. Root's own, left
    // by earlier runs, are moved aside meanwhile and put back after.
    let planted: Vec<PathBuf> = ["/tmp", "/var/tmp", "/dev/shm"]
        .iter()
        .map(|d| Path::new(d).join("tiexec-0"))
        .collect();
    let _aside: Vec<MovedAside> = planted.iter().filter_map(|p| MovedAside::new(p)).collect();
    for dir in &planted {
        std::fs::create_dir(dir).unwrap();
        std::os::unix::fs::chown(dir, Some(other), Some(other)).unwrap();
    }
    let mut cmd = Command::new("env");
    cmd.args([
        "-u",
        "HOME",
        "-u",
        "XDG_CACHE_HOME",
        "-u",
        "XDG_RUNTIME_DIR",
    ])
    .arg(common::tiexec_bin())
    .args(["/bin/echo", "hi"]);
    let o = common::run(&mut cmd, T);
    for dir in &planted {
        let _ = std::fs::remove_dir_all(dir);
    }
    o.check(
        o.status.success() && o.stdout == "hi\n" && o.stderr.is_empty(),
        "runs as without tiexec, silently",
    );
}

/// A fresh directory of commands a lookup treats specially: `dircmd` (a
/// directory), `noexec` (a file without x) and `noshebang` (an executable
/// script without `#!`, which runs with /bin/sh and prints its arguments).
fn odd_commands(name: &str) -> PathBuf {
    let dir = common::scratch_dir().join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("dircmd")).unwrap();
    std::fs::write(dir.join("noexec"), "#!/bin/sh\n").unwrap();
    std::fs::write(dir.join("noshebang"), "echo from sh \"$@\"\n").unwrap();
    std::fs::set_permissions(
        dir.join("noshebang"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    dir
}

#[test]
fn exit_statuses_follow_env() {
    let dir = odd_commands("status");
    let path = format!("{}:/usr/bin:/bin", dir.display());
    for (what, args) in [
        ("a directory in PATH", vec!["dircmd"]),
        ("a file without x in PATH", vec!["noexec"]),
        ("nothing by that name", vec!["no-such-command-anywhere"]),
        ("a script without #!", vec!["noshebang"]),
        ("a directory by path", vec![dir.to_str().unwrap()]),
    ] {
        let run = |first: &std::ffi::OsStr| {
            let mut c = Command::new(first);
            common::isolate(&mut c).env("PATH", &path).args(&args);
            common::run(&mut c, T)
        };
        let env = run("env".as_ref());
        let ours = run(common::tiexec_bin().as_os_str());
        ours.check(
            ours.status.code() == env.status.code() && ours.stdout == env.stdout,
            &format!("{what}: as env ({:?})\n{env}", env.status.code()),
        );
    }
}

#[test]
fn under_a_tight_address_space_limit_the_program_still_runs() {
    // Where the limit leaves tiexec too little room to work, the program
    // runs without it: at 8 MB the wrapper's first code execs it (too
    // little for the wrapper to load its C library), at 30 and 60 MB the
    // full wrapper runs it without the preload, at 120 MB with it.
    for kib in [8_000, 30_000, 60_000, 120_000] {
        let script = format!("ulimit -v {kib}; exec \"$@\" /bin/echo hi");
        let run = |first: &std::ffi::OsStr| {
            let mut c = Command::new("bash");
            common::isolate(&mut c)
                .args(["-c", &script, "limit"])
                .arg(first);
            common::run(&mut c, T)
        };
        let env = run("env".as_ref());
        let ours = run(common::tiexec_bin().as_os_str());
        ours.check(
            ours.status.code() == env.status.code() && ours.stdout == env.stdout,
            &format!("ulimit -v {kib}: as env\n{env}"),
        );
    }
}

/// `tiexec` as users install it: the release build, made once for this
/// file's tests in a target directory of its own (the debug build's image
/// is 2.4 times the size, and its floor with it).
fn release_wrapper() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let target_dir = common::scratch_dir().join("release-wrapper");
            let build = common::run(
                Command::new(env!("CARGO"))
                    .args(["build", "--release", "--bin", "tiexec"])
                    .arg("--manifest-path")
                    .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
                    .arg("--target-dir")
                    .arg(&target_dir)
                    .env_remove("CARGO_TARGET_DIR"),
                Duration::from_secs(1200),
            );
            build.check(build.status.success(), "release build of the wrapper");
            target_dir.join("release").join("tiexec")
        })
        .clone()
}

/// Runs `argv` under `ulimit -v kib`.
fn under_limit(kib: u64, argv: &[&std::ffi::OsStr]) -> common::Outcome {
    let mut c = Command::new("bash");
    common::isolate(&mut c)
        .args(["-c", &format!("ulimit -v {kib}; exec \"$@\""), "limit"])
        .args(argv);
    common::run(&mut c, T)
}

#[test]
fn where_the_program_alone_runs_it_runs_under_tiexec() {
    // The wrapper starts with only its own image mapped (src/bin/tiexec/
    // entry.rs): under a limit too tight for it to work, it execs the
    // program at once. So wherever the program alone runs, it runs under
    // tiexec, with the same output: every dynamically linked program
    // (the dynamic loader and the C library alone need more than the
    // wrapper's image), and a static one from the wrapper's own floor up
    // (below it the kernel cannot map the wrapper and kills it before any
    // code runs, as it would any program too big for the limit). Before,
    // the dynamic loader mapped the C library for the wrapper first, and
    // `/bin/echo`, which runs from 2.4 MiB, did not run under tiexec below
    // 4.6 MiB (3.6 MiB after the carried libraries left the loaded image).
    let wrapper = release_wrapper();
    let echo = PathBuf::from("/bin/echo");
    let small_static = common::fixture(common::STATIC_SMALL);
    // Smaller than the wrapper: a static C program that only prints.
    let dir = common::scratch_dir().join(format!("tiny-static-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let source = dir.join("tiny.c");
    std::fs::write(
        &source,
        "#include <unistd.h>\nint main(void) { return write(1, \"hi\\n\", 3) != 3; }\n",
    )
    .unwrap();
    let tiny_static = dir.join("tiny");
    let cc = common::run(
        Command::new("gcc")
            .args(["-static", "-O2", "-o"])
            .arg(&tiny_static)
            .arg(&source),
        T,
    );
    cc.check(cc.status.success(), "gcc -static");
    let mut floors = Vec::new();
    for (what, program, dynamic) in [
        ("/bin/echo (dynamic)", &echo, true),
        ("a static program with 1 MiB of text", &small_static, false),
        ("a tiny static program", &tiny_static, false),
    ] {
        let mut alone_floor = None;
        let mut kernel_refused = Vec::new();
        let mut wrong = Vec::new();
        for kib in (512..6144).step_by(32) {
            let alone = under_limit(kib, &[program.as_os_str(), "hi".as_ref()]);
            if !alone.status.success() {
                continue;
            }
            alone_floor.get_or_insert(kib);
            let ours = under_limit(
                kib,
                &[wrapper.as_os_str(), program.as_os_str(), "hi".as_ref()],
            );
            if ours.status.code() == alone.status.code() && ours.stdout == alone.stdout {
                continue;
            }
            let killed = std::os::unix::process::ExitStatusExt::signal(&ours.status)
                .is_some_and(|s| s == libc::SIGSEGV || s == libc::SIGKILL)
                && ours.stderr.is_empty();
            if killed && !dynamic {
                kernel_refused.push(kib);
            } else {
                wrong.push(format!(
                    "ulimit -v {kib}: {:?}\n{}",
                    ours.status, ours.stderr
                ));
            }
        }
        // Refused by the kernel only below one floor, never above it.
        let wrapper_floor = kernel_refused.last().map(|k| k + 32);
        if let Some(f) = wrapper_floor {
            assert_eq!(
                kernel_refused.len() as u64,
                (f - alone_floor.unwrap_or(f)) / 32,
                "{what}: the kernel refused the wrapper only below one floor: {kernel_refused:?}"
            );
        }
        println!(
            "{what}: runs alone from ulimit -v {alone_floor:?} KiB, under tiexec from {:?} KiB",
            wrapper_floor.or(alone_floor)
        );
        assert!(
            alone_floor.is_some() && wrong.is_empty(),
            "{what}: where it runs alone, it runs under tiexec; wrong:\n{}",
            wrong.join("\n")
        );
        floors.push(wrapper_floor);
    }
    // The wrapper's own floor (its image and a stack), which only the tiny
    // program shows: under 2 MiB, below any dynamically linked program's.
    let own = floors.iter().flatten().max().copied();
    assert!(
        own.is_some_and(|f| f < 2048),
        "the wrapper's own floor {own:?} KiB"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn under_a_tight_limit_the_wrapper_runs_the_program_as_it_always_does() {
    // Below its own room, the wrapper's first code finds and execs the
    // program: the same lookup, messages and statuses as the full wrapper
    // gives without a limit (and env: see exit_statuses_follow_env), the
    // options skipped as the full parser skips them, the limit said with -v.
    let dir = odd_commands("tight");
    let path = format!("{}::/usr/bin:/bin", dir.display());
    let dir_arg = dir.to_str().unwrap().to_string();
    let cases: [(&str, Vec<&str>); 11] = [
        ("a program in PATH", vec!["echo", "a", "b"]),
        ("a former command word", vec!["setup"]),
        ("run", vec!["run", "echo"]),
        (
            "options with values first",
            vec!["-b", "thp", "--log=warn", "--", "echo", "x"],
        ),
        ("short options clustered", vec!["-bthp", "echo", "y"]),
        ("a directory in PATH", vec!["dircmd"]),
        ("a file without x in PATH", vec!["noexec"]),
        ("nothing by that name", vec!["no-such-command-anywhere"]),
        ("a script without #!", vec!["noshebang", "1", "2"]),
        ("a directory by path", vec![&dir_arg]),
        ("a missing path", vec!["/no/such/file"]),
    ];
    // 12 MiB: the debug wrapper starts (its image is 2.9 MiB) but is under
    // its image and room for the full wrapper.
    let limited = |args: &[&str], limit: Option<u64>| {
        let mut c = Command::new("bash");
        let script = match limit {
            Some(kib) => format!("ulimit -v {kib}; exec \"$@\""),
            None => "exec \"$@\"".to_string(),
        };
        common::isolate(&mut c)
            .env("PATH", &path)
            .args(["-c", &script, "limit"])
            .arg(common::tiexec_bin())
            .args(args);
        common::run(&mut c, T)
    };
    for (what, args) in &cases {
        let free = limited(args, None);
        let tight = limited(args, Some(12 << 10));
        tight.check(
            tight.status.code() == free.status.code()
                && tight.stdout == free.stdout
                && tight.stderr == free.stderr,
            &format!("{what}: as without a limit\n{free}"),
        );
    }
    // -v says why tiexec stands aside; the program still runs.
    for verbose in [&["-v"][..], &["--log", "debug"], &["-l", "info"]] {
        let mut args = verbose.to_vec();
        args.extend(["echo", "z"]);
        let tight = limited(&args, Some(12 << 10));
        tight.check(
            tight.status.success()
                && tight.stdout == "z\n"
                && tight.stderr.starts_with(
                    "tiexec: address-space limit (ulimit -v) of 12.0 MiB: too little for tiexec to work in; running echo without it\n",
                ),
            &format!("{verbose:?}: the limit said, the program run"),
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn when_the_loader_cannot_be_mapped_the_program_runs_and_the_cause_is_said() {
    // The entry maps the dynamic loader itself; if that fails (here: made to
    // look where none is), a run goes on without tiexec and says why in one
    // line, at any log level; anything else exits 1 with that line.
    let mut run = common::tiexec_cmd();
    run.env("TIEXEC_FAULT", "wrapper-loader")
        .args(["/bin/echo", "hi"]);
    let o = common::run(&mut run, T);
    o.check(
        o.status.success()
            && o.stdout == "hi\n"
            && o.stderr
                == "tiexec: cannot map the dynamic loader /nonexistent/ld.so: No such file or directory (os error 2); running /bin/echo without it\n",
        "the program runs, the cause said",
    );
    let mut version = common::tiexec_cmd();
    version
        .env("TIEXEC_FAULT", "wrapper-loader")
        .arg("--version");
    let o = common::run(&mut version, T);
    o.check(
        o.status.code() == Some(1)
            && o.stdout.is_empty()
            && o.stderr
                .starts_with("tiexec: cannot map the dynamic loader "),
        "a command stops with the cause",
    );
}

#[test]
fn the_first_code_calls_nothing_the_loader_has_not_loaded() {
    // The wrapper's entry runs before the dynamic loader: a call to the C
    // library from it (a memcpy the compiler put there, a GOT slot bound to
    // a library symbol) would jump to nothing. From the disassembly of the
    // binary the tests run (debug, where the compiler inlines least) and of
    // the release one: every function reachable from `first_steps` by
    // direct calls, and on x86_64 by calls through a GOT slot that holds a
    // relative relocation (one the entry applies itself), calls only this
    // binary's code. Panics are dead ends (core's panic functions), reached
    // only on conditions the code rules out.
    for exe in [common::tiexec_bin(), release_wrapper()] {
        let bad = calls_outside_the_image(&exe);
        assert!(
            bad.is_empty(),
            "{}: the entry reaches code the loader would have to bind:\n{}",
            exe.display(),
            bad.join("\n")
        );
    }
}

fn calls_outside_the_image(exe: &Path) -> Vec<String> {
    let tool = |name: &str, args: &[&str]| {
        let o = common::run(Command::new(name).args(args).arg(exe), T);
        o.check(o.status.success(), name);
        o.stdout
    };
    let disassembly = tool("objdump", &["-d", "--no-show-raw-insn"]);
    // GOT slots: offset -> Ok(target of a relative relocation) or Err(symbol).
    let mut slots = std::collections::HashMap::new();
    for line in tool("readelf", &["-rW"]).lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        let Some(offset) = w.first().and_then(|o| u64::from_str_radix(o, 16).ok()) else {
            continue;
        };
        if w.len() < 4 || w[0].len() < 8 {
            continue;
        }
        if w[2].ends_with("_RELATIVE") {
            if let Ok(addend) = u64::from_str_radix(w[3], 16) {
                slots.insert(offset, Ok(addend));
            }
        } else {
            slots.insert(offset, Err(w[4..].join(" ")));
        }
    }
    let mut functions: std::collections::HashMap<String, Vec<String>> = Default::default();
    let mut at: std::collections::HashMap<u64, String> = Default::default();
    let mut current = None;
    for line in disassembly.lines() {
        if let Some(head) = line.strip_suffix(">:") {
            if let Some((addr, name)) = head.split_once(" <") {
                if let Ok(a) = u64::from_str_radix(addr, 16) {
                    at.insert(a, name.to_string());
                    functions.insert(name.to_string(), Vec::new());
                    current = Some(name.to_string());
                    continue;
                }
            }
        }
        if let (Some(f), false) = (&current, line.trim().is_empty()) {
            functions.get_mut(f).unwrap().push(line.to_string());
        }
    }
    let start = functions
        .keys()
        .find(|f| f.contains("first_steps"))
        .cloned()
        .expect("first_steps in the disassembly");
    let dead_end = |f: &str| f.contains("panicking") || f.contains("panic_");
    let (mut seen, mut todo, mut bad) = (std::collections::HashSet::new(), vec![start], vec![]);
    while let Some(f) = todo.pop() {
        if dead_end(&f) || !seen.insert(f.clone()) {
            continue;
        }
        let mut loaded: std::collections::HashMap<String, u64> = Default::default();
        for line in &functions[&f] {
            let ins: Vec<&str> = line.split('\t').collect();
            let text = ins.get(1..).map(|i| i.join(" ")).unwrap_or_default();
            let slot = text
                .split("# ")
                .nth(1)
                .and_then(|s| s.split_whitespace().next())
                .and_then(|s| u64::from_str_radix(s, 16).ok());
            let mnemonic = text.split_whitespace().next().unwrap_or("");
            let mut follow_slot = |slot: u64| match slots.get(&slot) {
                Some(Ok(target)) => match at.get(target) {
                    Some(t) => todo.push(t.clone()),
                    None => bad.push(format!("{f}: a slot to {target:x}, no function")),
                },
                Some(Err(symbol)) => bad.push(format!("{f}: through the GOT to {symbol}")),
                None => bad.push(format!("{f}: slot {slot:x} without a relocation")),
            };
            if mnemonic == "mov" && text.contains("(%rip),%") {
                if let (Some(s), Some(reg)) = (slot, text.split(",%").nth(1)) {
                    loaded.insert(reg.split_whitespace().next().unwrap_or("").to_string(), s);
                }
            }
            let is_call = matches!(mnemonic, "call" | "jmp" | "bl" | "b");
            if !is_call {
                continue;
            }
            let operand = text.split_whitespace().nth(1).unwrap_or("");
            if !operand.starts_with('*') {
                let target = text
                    .split('<')
                    .nth(1)
                    .and_then(|t| t.split(['>', '+']).next());
                match target {
                    Some(t) if t.contains("@plt") => bad.push(format!("{f}: {t}")),
                    Some(t) if t != f && functions.contains_key(t) => todo.push(t.to_string()),
                    _ => {}
                }
            } else {
                if let Some(s) = slot.filter(|_| operand.starts_with("*0x")) {
                    follow_slot(s);
                } else if let Some(reg) = operand.strip_prefix("*%") {
                    match loaded.get(reg) {
                        Some(&s) => follow_slot(s),
                        // A jump through a register not loaded from the
                        // GOT: a jump table, within the function.
                        None if mnemonic == "jmp" => {}
                        None => bad.push(format!("{f}: an indirect call: {text}")),
                    }
                }
            }
        }
    }
    bad
}
