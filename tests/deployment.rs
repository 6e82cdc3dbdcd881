//! Deployment as operators do it: services started with a clean
//! environment, containers with a hugetlbfs of their own, the library for a
//! hand-written `LD_PRELOAD`, setup that can be undone.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::PIE_64;

const T: Duration = Duration::from_secs(120);
const CALLS: &str = "20000";

/// A directory under /tmp that every user can enter (the test's fixtures
/// live under the build directory, which a service user may not reach),
/// removed when the test is done with it.
struct OpenDir(PathBuf);

fn open_dir(name: &str) -> OpenDir {
    let dir = Path::new("/tmp").join(format!("tiexec-deploy-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    OpenDir(dir)
}

impl std::ops::Deref for OpenDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for OpenDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<std::ffi::OsStr> for OpenDir {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.0.as_os_str()
    }
}

impl Drop for OpenDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs the shell `script` in a mount namespace of its own (private
/// propagation: nothing it mounts is seen outside).
fn in_private_mounts(script: &str) -> common::Outcome {
    common::run(
        Command::new("unshare").args([
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            script,
        ]),
        T,
    )
}

/// A copy of `exe` in `dir`, readable and executable by everyone.
fn public_copy(exe: &Path, dir: &Path) -> PathBuf {
    let copy = dir.join(exe.file_name().unwrap());
    std::fs::copy(exe, &copy).unwrap();
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
    copy
}

/// The decision line the library logs for `exe` at `-v`.
fn decision(stderr: &str, exe: &Path) -> Option<String> {
    let prefix = format!("tiexec: {}: ", exe.display());
    stderr
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .find(|l| l.starts_with("copy:") || l.starts_with("no copy:"))
        .map(str::to_owned)
}

/// A service, as systemd starts one: a clean environment (`env -i`: no
/// HOME, no XDG variables), as its own user, started twice. The second
/// start must use what the first one recorded: its history lives where the
/// environment says (`CACHE_DIRECTORY` from `CacheDirectory=`, or
/// `TIEXEC_STATE`), else in the shared fallback `/var/tmp/tiexec-UID`.
#[test]
fn a_service_with_a_clean_environment_keeps_its_history() {
    let Some(uid) = common::other_user() else {
        return;
    };
    let dir = open_dir("service");
    let exe = public_copy(&common::fixture(PIE_64), &dir);
    let tiexec = public_copy(&common::tiexec_bin(), &dir);
    let cache_directory = dir.join("var-cache-svc");
    let state = dir.join("state");
    for d in [&cache_directory, &state] {
        std::fs::create_dir_all(d).unwrap();
        std::os::unix::fs::chown(d, Some(uid), None).unwrap();
    }
    let shared = PathBuf::from(format!("/var/tmp/tiexec-{uid}"));
    let _ = std::fs::remove_dir_all(&shared);
    // (what a service sets, its variables, where its state must be)
    type Setup<'a> = (&'a str, Vec<(&'a str, &'a Path)>, PathBuf);
    let setups: [Setup; 3] = [
        (
            "CacheDirectory=",
            vec![("CACHE_DIRECTORY", cache_directory.as_path())],
            cache_directory.join("tiexec"),
        ),
        (
            "TIEXEC_STATE",
            vec![("TIEXEC_STATE", state.as_path())],
            state.clone(),
        ),
        ("nothing set", vec![], shared.clone()),
    ];
    for (what, vars, where_) in setups {
        let start = || {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", "tiexec-other", "--", "env", "-i"]);
            for (k, v) in &vars {
                cmd.arg(format!("{k}={}", v.display()));
            }
            cmd.arg("TIEXEC_CACHE=off")
                .arg(&tiexec)
                .arg("-v")
                .arg(&exe)
                .args([CALLS, "run"]);
            common::run(&mut cmd, T)
        };
        let first = start();
        first.check(first.status.success(), &format!("{what}: first start"));
        let first_decision = decision(&first.stderr, &exe);
        first.check(
            first_decision
                .as_deref()
                .is_some_and(|d| d.contains("first run")),
            &format!("{what}: the first start is a first run"),
        );
        let second = start();
        let second_decision = decision(&second.stderr, &exe);
        second.check(
            second.status.success()
                && second_decision
                    .as_deref()
                    .is_some_and(|d| !d.contains("first run")),
            &format!("{what}: the second start uses the first one's history"),
        );
        let records = std::fs::read_dir(where_.join("runs"))
            .map(|d| d.count())
            .unwrap_or(0);
        second.check(
            records == 1,
            &format!("{what}: one run record in {}", where_.display()),
        );
    }
    let _ = std::fs::remove_dir_all(&shared);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A container's way: a hugetlbfs the operator mounted (here at a path of
/// the host's choosing) is bind-mounted into a private mount namespace at a
/// custom path, and a non-root user there runs a program with
/// `--cache-dir`: the first run builds the image, the second maps it.
#[test]
fn a_container_uses_a_bind_mounted_hugetlbfs_through_cache_dir() {
    let Some(uid) = common::other_user() else {
        return;
    };
    let Some(cache) = common::CacheMount::new("container", 24, 32) else {
        return;
    };
    let dir = open_dir("container");
    // A new inode in small page-cache folios: the kernel cannot map it huge
    // by itself, the cache is what shows.
    let exe = common::fresh_copy(&common::fixture(common::NON_PIE), &dir);
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let tiexec = public_copy(&common::tiexec_bin(), &dir);
    // Images are shared only for files that last changed 2 s ago or more.
    common::settle(&exe);
    let inside = dir.join("cache");
    std::fs::create_dir_all(&inside).unwrap();
    let state = dir.join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::os::unix::fs::chown(&state, Some(uid), None).unwrap();
    let run_as_user = format!(
        "runuser -u tiexec-other -- env -i TIEXEC_STATE={state} {tiexec} -v --no-prime -b cache --cache-dir {inside} {exe} {CALLS} run",
        state = state.display(),
        tiexec = tiexec.display(),
        inside = inside.display(),
        exe = exe.display(),
    );
    let script = format!(
        "mount --bind {src} {inside} && {run_as_user} && echo --- >&2 && {run_as_user}",
        src = cache.path.display(),
        inside = inside.display(),
    );
    let o = in_private_mounts(&script);
    o.check(o.status.success(), "both runs in the namespace");
    let (first, second) = o.stderr.split_once("---").unwrap_or((&o.stderr, ""));
    o.check(
        first.contains("cache (built)"),
        "the first run builds the image",
    );
    o.check(
        second.contains("cache (hit)") && !second.contains("cache (built)"),
        "the second run maps it",
    );
    // On the host: the image, in the user's own directory of the mount.
    let images = cache.images();
    o.check(
        !images.is_empty()
            && images
                .iter()
                .all(|i| i.starts_with(cache.path.join(uid.to_string()))),
        &format!("images in the user's directory: {images:?}"),
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A cgroup of the test's own with the hugetlb controller: in cgroup v2
/// where the controller can be enabled there, else in a v1 hierarchy the
/// test mounts. Removed on drop, with whatever the test turned on or
/// mounted for it.
struct HugetlbCgroup {
    dir: PathBuf,
    /// The limit and usage files' last words: `max`/`current` (v2),
    /// `limit_in_bytes`/`usage_in_bytes` (v1).
    files: (&'static str, &'static str),
    enabled_here: Option<PathBuf>,
    mounted_here: Option<PathBuf>,
}

impl HugetlbCgroup {
    /// A new cgroup whose hugetlb limit is `limit` bytes; `None` (and a
    /// visible skip) where the machine offers the controller in neither.
    fn new(name: &str, limit: u64) -> Option<HugetlbCgroup> {
        let cg = Self::in_v2(name).or_else(|| Self::in_v1(name));
        let Some(cg) = cg else {
            common::skip("the hugetlb cgroup controller is available neither in cgroup v2 nor v1");
            return None;
        };
        std::fs::write(cg.file(cg.files.0), limit.to_string()).unwrap();
        Some(cg)
    }

    fn in_v2(name: &str) -> Option<HugetlbCgroup> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let mut mounted_here = None;
        let top = match mountinfo
            .lines()
            .find(|l| l.contains(" - cgroup2 "))
            .and_then(|l| l.split(' ').nth(4))
        {
            Some(point) => PathBuf::from(point),
            None => {
                let point = common::scratch_dir().join(format!("cgroup2-{}", std::process::id()));
                std::fs::create_dir_all(&point).unwrap();
                let mounted = Command::new("mount")
                    .args(["-t", "cgroup2", "none"])
                    .arg(&point)
                    .status()
                    .is_ok_and(|s| s.success());
                if !mounted {
                    return None;
                }
                mounted_here = Some(point.clone());
                point
            }
        };
        let subtree = top.join("cgroup.subtree_control");
        let on = |p: &Path| {
            std::fs::read_to_string(p).is_ok_and(|s| s.split_whitespace().any(|c| c == "hugetlb"))
        };
        let mut enabled_here = None;
        if !on(&subtree) {
            if std::fs::write(&subtree, "+hugetlb").is_err() || !on(&subtree) {
                if let Some(p) = mounted_here {
                    let _ = Command::new("umount").arg("-l").arg(p).status();
                }
                return None;
            }
            enabled_here = Some(subtree);
        }
        Some(HugetlbCgroup {
            dir: Self::child(&top, name),
            files: ("max", "current"),
            enabled_here,
            mounted_here,
        })
    }

    fn in_v1(name: &str) -> Option<HugetlbCgroup> {
        let point =
            common::scratch_dir().join(format!("cgroup-hugetlb-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&point).unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "cgroup", "-o", "hugetlb", "none"])
            .arg(&point)
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            return None;
        }
        Some(HugetlbCgroup {
            dir: Self::child(&point, name),
            files: ("limit_in_bytes", "usage_in_bytes"),
            enabled_here: None,
            mounted_here: Some(point),
        })
    }

    /// A new cgroup `name` (this test process's) under `top`.
    fn child(top: &Path, name: &str) -> PathBuf {
        let dir = top.join(format!("tiexec-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir(&dir);
        std::fs::create_dir(&dir).unwrap();
        dir
    }

    /// The controller's file `hugetlb.<size>.<last>`.
    fn file(&self, last: &str) -> PathBuf {
        let size = format!("{}MB", common::witness::huge_page() >> 20);
        self.dir.join(format!("hugetlb.{size}.{last}"))
    }

    /// Bytes of huge pages charged to the cgroup now.
    fn charged(&self) -> u64 {
        std::fs::read_to_string(self.file(self.files.1))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    /// `cmd`'s words, run by a shell that first moves itself into the cgroup.
    fn run_inside(&self, cmd: &Command) -> Command {
        let mut sh = Command::new("sh");
        sh.arg("-c")
            .arg(format!(
                "echo $$ > '{}/cgroup.procs' && exec \"$0\" \"$@\"",
                self.dir.display()
            ))
            .arg(cmd.get_program())
            .args(cmd.get_args());
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => sh.env(k, v),
                None => sh.env_remove(k),
            };
        }
        sh
    }
}

impl Drop for HugetlbCgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() || !self.dir.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Some(p) = &self.enabled_here {
            let _ = std::fs::write(p, "-hugetlb");
        }
        if let Some(p) = &self.mounted_here {
            let _ = Command::new("umount").arg("-l").arg(p).status();
        }
    }
}

/// Kubernetes gives a pod its `hugepages-2Mi` as an `emptyDir` of medium
/// `HugePages`: a hugetlbfs without `size=`, bounded by the pod's hugetlb
/// cgroup. The cache grows within that limit and is refused where nothing
/// bounds the mount; a limit too small for the text leaves part of it on
/// 4 KiB pages and never harms the program.
#[test]
fn a_kubernetes_hugepages_volume_is_bounded_by_the_pods_cgroup() {
    let huge = common::witness::huge_page();
    let Some(_pool) = common::PoolGuard::set(48) else {
        return;
    };
    let Some(pod) = HugetlbCgroup::new("pod", 32 * huge) else {
        return;
    };
    let Some(tight) = HugetlbCgroup::new("tight", 4 * huge) else {
        return;
    };
    // Each pod's volume: a hugetlbfs with no size, every user's to write in.
    struct Volume(PathBuf);
    impl Drop for Volume {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let volume_for = |pod: &str| {
        let path = common::scratch_dir().join(format!("k8s-{pod}-{}", std::process::id()));
        std::fs::create_dir_all(&path).unwrap();
        let o = common::run(
            Command::new("mount")
                .args(["-t", "hugetlbfs", "-o"])
                .arg(format!("pagesize={}M,mode=1777", huge >> 20))
                .arg("none")
                .arg(&path),
            T,
        );
        if !o.status.success() {
            common::skip(format_args!("cannot mount hugetlbfs\n{o}"));
            return None;
        }
        Some(Volume(path))
    };
    let Some(volume) = volume_for("pod") else {
        return;
    };
    let Some(tight_volume) = volume_for("tight") else {
        return;
    };
    let dir = open_dir("k8s");
    let exe = common::fresh_copy(&common::fixture(common::NON_PIE), &dir);
    common::settle(&exe);
    let plain = common::plain_run(&exe, &[CALLS, "run"]).stdout;
    let run = |cgroup: Option<&HugetlbCgroup>, volume: &Volume| {
        let mut cmd = common::tiexec_cmd();
        cmd.args(["-v", "--no-prime", "-b", "cache", "--cache-dir"])
            .arg(&volume.0)
            .arg(&exe)
            .args([CALLS, "run"]);
        let o = match cgroup {
            Some(cg) => common::run(&mut cg.run_inside(&cmd), T),
            None => common::run(&mut cmd, T),
        };
        o.check(
            o.status.success() && o.stdout == plain,
            "runs, and prints what it prints without tiexec",
        );
        o
    };
    let name = exe.file_name().unwrap().to_string_lossy().into_owned();
    let text_line = |o: &common::Outcome| {
        o.stderr
            .lines()
            .find(|l| l.contains(&name) && l.contains(": text "))
            .unwrap_or("")
            .to_string()
    };

    // Outside any limit: refused, and said why.
    let o = run(None, &volume);
    o.check(
        o.stderr
            .contains("no hugetlb cgroup limit bounds this process"),
        "an unbounded mount is refused, with the reason",
    );
    // In the pod: the first run builds, the second maps what it built.
    let first = run(Some(&pod), &volume);
    first.check(
        text_line(&first).contains("cache (built)"),
        "the first run in the pod builds its images",
    );
    let charged = pod.charged();
    first.check(
        charged >= 8 * huge && charged <= 32 * huge,
        &format!("the images are charged to the pod: {charged} bytes"),
    );
    // Listing: from the pod, its images; from outside, why there is none.
    let mut list = common::tiexec_cmd();
    list.args(["--cache", "--cache-dir"]).arg(&volume.0);
    let inside = common::run(&mut pod.run_inside(&list), T);
    inside.check(
        inside.status.success() && inside.stdout.contains(&name),
        "the pod lists its images",
    );
    let mut check = common::tiexec_cmd();
    check.args(["--check", "--cache-dir"]).arg(&volume.0);
    let checked = common::run(&mut pod.run_inside(&check), T);
    checked.check(
        checked
            .stdout
            .contains("(its size: this process's hugetlb cgroup limit, the mount has none)"),
        "--check in the pod says what bounds the cache",
    );
    let outside = common::run(&mut list, T);
    outside.check(
        !outside.status.success() && outside.stderr.contains("no size limit"),
        "outside the pod: why it is no cache",
    );
    let second = run(Some(&pod), &volume);
    second.check(
        text_line(&second).contains("cache (hit)") && !text_line(&second).contains("cache (built)"),
        "the second run maps the images",
    );
    // A pod whose limit holds 4 pages, with its own volume: at most 4 of
    // them, the program runs.
    let o = run(Some(&tight), &tight_volume);
    let charged = tight.charged();
    o.check(
        charged <= 4 * huge && o.stderr.contains("cache full"),
        &format!("within the tight limit, and said: {charged} bytes"),
    );
    println!("pod: {}\ntight pod: {}", text_line(&second), text_line(&o));
}

/// A hugetlbfs mounted by hand, root's and not writable by others: a
/// non-root user's run says which cache, what is wrong and what would fix
/// it, and the program runs.
#[test]
fn a_cache_a_user_cannot_write_to_is_named_with_the_fix() {
    if common::other_user().is_none() {
        return;
    }
    let Some(cache) = common::CacheMount::new("root-only", 8, 16) else {
        return;
    };
    std::fs::set_permissions(&cache.path, std::fs::Permissions::from_mode(0o755)).unwrap();
    let dir = open_dir("root-only");
    let exe = public_copy(&common::fixture(common::NON_PIE), &dir);
    let tiexec = public_copy(&common::tiexec_bin(), &dir);
    let o = common::run(
        Command::new("runuser")
            .args(["-u", "tiexec-other", "--", "env", "-i", "TIEXEC_STATE=/tmp"])
            .arg(&tiexec)
            .args(["-v", "--no-prime", "-b", "cache", "--cache-dir"])
            .arg(&cache.path)
            .arg(&exe)
            .args([CALLS, "run"]),
        T,
    );
    o.check(o.status.success(), "the program runs");
    o.check(
        o.stderr.lines().any(|l| {
            l.contains(&format!("image cache {} not used", cache.path.display()))
                && l.contains("mode 1777")
        }),
        "the line names the cache and the fix",
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `tiexec --setup --persist` twice is the same as once; a reboot-like
/// sequence (the mount and the pool's growth forgotten, then the unit's
/// command run) mounts the cache again; `tiexec --setup --remove` leaves
/// the pool, the mounts and the files as they were before. In a private
/// mount namespace, with the files under a directory of the test's.
#[test]
fn setup_persists_idempotently_and_remove_undoes_it() {
    // The pool's lock, held throughout (the pool is the machine's); the
    // guard puts its size back.
    let Some(_pool) = common::PoolGuard::set(0) else {
        return;
    };
    let root = open_dir("setup-root");
    let mount = root.join("run-tiexec");
    let tiexec = common::tiexec_bin();
    let pool = format!("{}/nr_hugepages", common::witness::pool_dir());
    let setup = format!(
        "{} --setup --pages 8 --cache-dir {} --persist --root {}",
        tiexec.display(),
        mount.display(),
        root.display()
    );
    let state = |n: u32| {
        format!(
            "echo mounted{n} $(grep -c ' {m} hugetlbfs ' /proc/self/mounts); echo pool{n} $(cat {pool}); \
             echo files{n} $(cd {r} && find . -type f -o -type l | sort | xargs -r sha256sum | sha256sum | cut -c1-16) \
             $(cd {r} && find . -type f -o -type l | wc -l)",
            m = mount.display(),
            r = root.display()
        )
    };
    let unit = root.join("etc/systemd/system/tiexec-setup.service");
    let script = [
        state(0),
        setup.clone(),
        state(1),
        setup.clone(),
        state(2),
        // A reboot: the mount and the pool's growth are gone...
        format!("umount {}", mount.display()),
        format!("echo $(( $(cat {pool}) - 8 )) > {pool}",),
        // ... and systemd runs the unit.
        format!("sed -n 's/^ExecStart=//p' {} | sh", unit.display()),
        state(3),
        format!(
            "{} --setup --remove --cache-dir {} --root {}",
            tiexec.display(),
            mount.display(),
            root.display()
        ),
        state(4),
    ]
    .join(" && ");
    let system_files = [
        Path::new("/var/lib/tiexec/setup"),
        Path::new("/usr/local/lib/tiexec/libtiexec.so"),
        Path::new("/etc/systemd/system/tiexec-setup.service"),
    ];
    let before: Vec<bool> = system_files.iter().map(|f| f.exists()).collect();
    let o = in_private_mounts(&script);
    o.check(o.status.success(), "the sequence ran");
    let after: Vec<bool> = system_files.iter().map(|f| f.exists()).collect();
    o.check(
        before == after,
        &format!(
            "nothing written outside --root, the unit's run included: {system_files:?} {before:?} -> {after:?}"
        ),
    );
    let value = |key: &str| -> Vec<String> {
        o.stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key} ")))
            .map(|v| v.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default()
    };
    let num = |key: &str| {
        value(key)
            .first()
            .and_then(|v| v.parse::<i64>().ok())
            .unwrap_or(-1)
    };
    let pool0 = num("pool0");
    o.check(
        num("mounted0") == 0 && value("files0").last().map(String::as_str) == Some("0"),
        "nothing before",
    );
    o.check(
        num("mounted1") == 1 && num("pool1") == pool0 + 8,
        "setup mounts and grows the pool by 8",
    );
    o.check(
        value("files1").last().map(String::as_str) == Some("4"),
        "record, library, unit and its link written",
    );
    o.check(
        num("mounted2") == 1 && num("pool2") == num("pool1") && value("files2") == value("files1"),
        "a second setup changes nothing",
    );
    o.check(
        num("mounted3") == 1 && num("pool3") == pool0 + 8,
        "after a reboot-like sequence the unit mounts it again",
    );
    o.check(
        num("mounted4") == 0
            && num("pool4") == pool0
            && value("files4").last().map(String::as_str) == Some("0"),
        "remove leaves the machine as before",
    );
    let _ = std::fs::remove_dir_all(&root);
}

/// `tiexec --stat` without a PID: every process tiexec serves, with what
/// it holds, in text and JSON; a PID that does not exist is named so.
#[test]
fn the_machine_wide_view_lists_served_processes() {
    let exe = common::fixture(PIE_64);
    let w = common::Waiting::start(
        common::tiexec_cmd()
            .args(["--no-prime", "-b", "thp"])
            .arg(&exe)
            .args([CALLS, "wait"]),
        T,
    );
    let pid = w.pid();
    let text = common::run(common::tiexec_cmd().arg("--stat"), T);
    let json = common::run(common::tiexec_cmd().args(["--stat", "--json"]), T);
    let o = w.finish(T);
    o.check(o.status.success(), "the served program");
    let line = text
        .stdout
        .lines()
        .find(|l| l.split_whitespace().next() == Some(&pid.to_string()))
        .map(str::to_owned);
    text.check(
        text.status.success()
            && line.as_deref().is_some_and(|l| !l.contains(" 0.0%"))
            && text.stdout.contains("process(es): text"),
        &format!("{pid} listed with its huge text: {line:?}"),
    );
    let doc: serde_json::Value = serde_json::from_str(&json.stdout).expect("JSON");
    let me = doc["processes"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["pid"] == pid))
        .cloned();
    json.check(
        me.as_ref().is_some_and(|p| {
            p["huge_bytes"].as_u64() > Some(0) && p["private_huge_bytes"].as_u64() > Some(0)
        }) && doc["totals"]["processes"].as_u64() >= Some(1),
        &format!("JSON: {me:?}"),
    );
    let gone = common::run(common::tiexec_cmd().args(["--stat", "999999999"]), T);
    gone.check(
        gone.status.code() == Some(1) && gone.stderr.contains("999999999: no such process"),
        "a PID that does not exist",
    );
}

/// The command-line answers an operator meets: each says what is wrong
/// and what to do, with a run's exit statuses.
#[test]
fn the_cli_says_what_is_wrong_and_what_to_do() {
    let tiexec = |args: &[&str]| common::run(common::tiexec_cmd().args(args), T);
    // A missing program: 127, as a run.
    let o = tiexec(&["--check", "tiexec-no-such-program"]);
    o.check(
        o.status.code() == Some(127) && o.stderr.contains("command not found"),
        "--check of a missing program",
    );
    // A near miss of a command.
    let o = tiexec(&["--stats", "1"]);
    o.check(
        o.status.code() == Some(2) && o.stderr.contains("did you mean --stat?"),
        "--stats",
    );
    // --help names every command and their main options.
    let o = tiexec(&["--help"]);
    for needle in [
        "--stat [--tree] [--json] PID",
        "--setup --remove",
        "--persist",
        "--print-library",
        "--state-dir",
    ] {
        o.check(o.stdout.contains(needle), &format!("--help names {needle}"));
    }
    // Settings apply to --check in any order around PROGRAM; the forecast
    // says whose history it used; with a cache, text that is not congruent
    // is not sent to the linker.
    let Some(cache) = common::CacheMount::new("cli", 8, 16) else {
        return;
    };
    let exe = common::fixture(PIE_64);
    let dir = cache.path.display().to_string();
    let exe_s = exe.display().to_string();
    for args in [
        ["--check", "--cache-dir", &dir, &exe_s],
        ["--check", &exe_s, "--cache-dir", &dir],
    ] {
        let o = tiexec(&args);
        o.check(
            o.status.success() && o.stdout.contains(&format!("image cache {dir}: ")),
            &format!("{args:?}: the cache named is the one checked"),
        );
        o.check(
            o.stdout.contains("from the run history of uid"),
            "whose history the decision comes from",
        );
        o.check(
            o.stdout.contains("the image cache serves it") && !o.stdout.contains("relink"),
            "no relinking advice for text the cache serves",
        );
        o.check(
            o.stdout.contains("the image cache has pages of its own"),
            "a mount with min_size has pages of its own",
        );
    }
    // A mount without min_size takes its pages from the pool as it fills.
    let open = common::witness::huge_page() >> 20;
    let bare = open_dir("bare-mount");
    let m = common::run(
        Command::new("mount")
            .args([
                "-t",
                "hugetlbfs",
                "-o",
                &format!("pagesize={open}M,size=16M,mode=1777"),
                "none",
            ])
            .arg(&bare),
        T,
    );
    m.check(m.status.success(), "mount a hugetlbfs without min_size");
    let o = tiexec(&["--check", "--cache-dir", &bare.display().to_string()]);
    let _ = Command::new("umount").arg(&bare).status();
    o.check(
        o.stdout.contains("reserves none") && !o.stdout.contains("pages of its own"),
        "a mount without min_size is said to take from the pool",
    );
    // Not ready: the last line says what to do. A static program cannot be
    // reached by LD_PRELOAD.
    let static_exe = common::fixture(common::Spec {
        static_link: true,
        ..common::Spec::new("fixture-static-cli-8m", 8, false)
    });
    let o = tiexec(&["--check", &static_exe.display().to_string()]);
    let last = o.stdout.lines().last().unwrap_or("").to_string();
    o.check(
        last.starts_with("not ready: ") && last.contains("tiexec --prime"),
        &format!("a next step after 'not ready': {last}"),
    );
}

/// Libraries an older build of tiexec extracted, unused for a week, are
/// deleted when this one places its own; recent ones stay.
#[test]
fn libraries_of_old_builds_do_not_pile_up() {
    let mut cmd = common::tiexec_cmd();
    let dir = common::state_dir_of(&cmd);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let old = dir.join("libtiexec-0.0.1-00000000deadbeef.so");
    let recent = dir.join("libtiexec-0.0.2-00000000feedface.so");
    for f in [&old, &recent] {
        std::fs::write(f, b"not a library").unwrap();
    }
    let c = std::ffi::CString::new(old.as_os_str().as_encoded_bytes()).unwrap();
    let eight_days = libc::timespec {
        tv_sec: (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            - 8 * 86_400) as libc::time_t,
        tv_nsec: 0,
    };
    // SAFETY: a NUL-terminated path and two valid timespecs.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            [eight_days, eight_days].as_ptr(),
            0,
        )
    };
    assert_eq!(r, 0);
    let o = common::run(cmd.arg("true"), T);
    o.check(o.status.success(), "tiexec true");
    o.check(
        !old.exists() && recent.exists(),
        &format!("old gone, recent kept in {}", dir.display()),
    );
}

/// After `tiexec --setup`, a service user finds the library with
/// `tiexec --print-library` at the stable system path, can read it, and a
/// hand-written `LD_PRELOAD` of it works; `--setup --remove` takes it away.
/// (A real setup, in a private mount namespace; skipped on a machine whose
/// own setup it would disturb.)
#[test]
fn the_system_library_serves_a_service_user() {
    let Some(_uid) = common::other_user() else {
        return;
    };
    let system = Path::new("/usr/local/lib/tiexec/libtiexec.so");
    if system.exists()
        || common::run(Command::new("mountpoint").args(["-q", "/run/tiexec"]), T)
            .status
            .success()
    {
        common::skip("this machine has its own tiexec setup: not this test's to change");
        return;
    }
    let Some(_pool) = common::PoolGuard::set(0) else {
        return;
    };
    let dir = open_dir("system-library");
    let exe = public_copy(&common::fixture(PIE_64), &dir);
    let tiexec = public_copy(&common::tiexec_bin(), &dir);
    let script = format!(
        "{t} --setup --pages 4 >/dev/null && \
         lib=$(runuser -u tiexec-other -- {t} --print-library 2>/dev/null) && echo \"library $lib\" && \
         runuser -u tiexec-other -- env -i LD_PRELOAD=\"$lib\" TIEXEC_LOG=info TIEXEC_BACKEND=thp TIEXEC_STATE=/tmp {exe} {CALLS} run; \
         status=$?; {t} --setup --remove >/dev/null; exit $status",
        t = tiexec.display(),
        exe = exe.display()
    );
    let o = in_private_mounts(&script);
    o.check(
        o.status.success(),
        "the program runs under the system library",
    );
    o.check(
        o.stdout.contains(&format!("library {}", system.display())),
        "--print-library names the system's copy",
    );
    o.check(
        o.stderr
            .contains("fixture-pie-64m: text 64.0 MiB, on 2 MiB pages"),
        "the library worked in the service user's process",
    );
    o.check(!system.exists(), "--setup --remove took it away");
    let _ = std::fs::remove_dir_all(&dir);
}

/// What `--check` says stays on 4 KiB pages never adds up to more than an
/// object's text (the plan counts whole 2 MiB ranges, rodata included).
#[test]
fn the_forecast_never_counts_more_small_bytes_than_text() {
    fn bytes(text: &str) -> Option<f64> {
        let mut w = text.split_whitespace();
        let n: f64 = w.next()?.parse().ok()?;
        let unit = match w.next()? {
            "B" => 1.0,
            "KiB" => 1024.0,
            "MiB" => 1048576.0,
            "GiB" => 1073741824.0,
            _ => return None,
        };
        Some(n * unit)
    }
    for spec in [
        common::TWO_SEGMENTS,
        common::HUGE_ALIGNED,
        common::MERGED_RX,
    ] {
        let exe = common::fixture(spec);
        for backend in ["cache", "thp", "auto"] {
            let o = common::run(
                common::tiexec_cmd()
                    .args(["--check", "--backend", backend, "--cache-dir", "off"])
                    .arg(&exe),
                T,
            );
            let mut text = 0.0;
            let mut small = 0.0;
            for line in o.stdout.lines() {
                if let Some((_, t)) = line.split_once(": text ") {
                    text = bytes(t).unwrap_or(0.0);
                    small = 0.0;
                } else if line.contains(" on 4 KiB pages") {
                    small += bytes(line.trim()).unwrap_or(0.0);
                    // Figures are shown to 0.1 MiB.
                    o.check(
                        small <= text + 0.1 * 1048576.0,
                        &format!("{} -b {backend}: {small} bytes small of {text}", spec.name),
                    );
                }
            }
        }
    }
}
