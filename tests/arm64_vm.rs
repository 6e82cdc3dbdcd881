//! The arm64 port on real arm64 kernels. `qemu-system-aarch64` boots
//! Debian's arm64 kernels (4 KiB pages, and 16 KiB pages with 32 MiB PMD
//! pages) with a small root filesystem in
//! memory: busybox, the arm64 C library, tiexec's integration tests
//! cross-built for arm64, and their fixtures cross-built here. Inside, the
//! chosen tests run as they do on x86_64 (strict: none may skip), reading
//! coverage from that kernel's smaps; their results come back on the serial
//! console.
//!
//! Needs what `.ci/arm64-setup` installs and fetches (without it the test
//! skips, and fails under TIEXEC_TEST_STRICT). The emulated machine is slow
//! and shows nothing about speed: only behaviour is tested there.

#![cfg(target_arch = "x86_64")]

mod common;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::fixture::{self, Target};

const TRIPLE: &str = "aarch64-unknown-linux-gnu";

/// The test programs that run inside, with the tests each runs (all when
/// empty). Together they cover what the port must show: a 32 MiB PIE and
/// non-PIE fixture and a 24 MiB shared library on hugetlb and THP pages,
/// same output, no W+X mapping, every injected fault leaving the text as it
/// was; the image cache, the wrapper, `--check` and `--stat`, and programs
/// that link the library in.
type Suite = (&'static str, &'static [&'static str]);

const SUITES: &[Suite] = &[
    (
        "preload",
        &[
            "pie_on_thp",
            "non_pie_on_thp",
            "pie_on_hugetlb_with_a_filled_pool",
            "non_pie_and_merged_rx_on_hugetlb_with_a_filled_pool",
            "hugetlb_alone_with_an_empty_pool_leaves_the_text_and_says_so",
            "hugetlb_with_a_pool_smaller_than_the_text_covers_part_and_runs",
            "off_does_nothing",
            "exit_status_and_signals_are_the_programs",
            "text_moves_to_the_kernels_own_huge_pages",
        ],
    ),
    (
        "libraries",
        &[
            "a_library_linked_at_start_up_is_covered",
            "a_library_dlopened_while_another_thread_runs_is_covered",
        ],
    ),
    ("faults", &[]),
    (
        "cache",
        &[
            "a_miss_builds_the_image_and_the_next_process_maps_it",
            "six_concurrent_processes_hold_one_copy",
            "a_pie_program_gets_a_private_image_with_the_cache_backend",
            "tiexec_cache_lists_and_clears_images",
        ],
    ),
    (
        "observability",
        &[
            "check_describes_the_machine_and_plans_a_program",
            "stat_shows_coverage_pages_and_a_picture_matching_smaps",
        ],
    ),
    (
        "linked",
        &[
            "a_c_program_linked_with_libtiexec_a_moves_its_whole_text",
            "a_static_c_program_linked_with_libtiexec_a_moves_its_whole_text",
            "a_forced_failure_leaves_the_linked_program_on_its_original_text",
        ],
    ),
];

/// Where `.ci/arm64-setup` puts the kernel and busybox.
fn kit_dir() -> PathBuf {
    target_dir().join("arm64-vm")
}

/// This build's target directory (the parent of CARGO_TARGET_TMPDIR).
fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target dir")
        .to_path_buf()
}

fn have(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// What the cross build produced: test programs by name, the wrapper, and
/// the build script's output directory (the embedded libraries).
struct CrossBuild {
    tests: BTreeMap<String, PathBuf>,
    tiexec: PathBuf,
    out_dir: PathBuf,
    tmp_dir: PathBuf,
}

/// Builds the chosen test programs (and with them the library, the stub and
/// the wrapper) for arm64, in a target directory of their own.
fn cross_build() -> CrossBuild {
    let dir = target_dir().join("arm64");
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "test",
            "--no-run",
            "--message-format=json",
            "--target",
            TRIPLE,
        ])
        .env("CARGO_TARGET_DIR", &dir)
        .env(
            "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER",
            "aarch64-linux-gnu-gcc",
        );
    for (suite, _) in SUITES {
        cmd.args(["--test", suite]);
    }
    let o = common::run(&mut cmd, Duration::from_secs(1800));
    o.check(o.status.success(), "cross build of the tests for arm64");
    let mut tests = BTreeMap::new();
    let (mut tiexec, mut out_dir) = (None, None);
    for line in o.stdout.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let name = v["target"]["name"].as_str().unwrap_or("");
        let kinds = v["target"]["kind"].to_string();
        match v["reason"].as_str() {
            Some("compiler-artifact") => {
                if let Some(exe) = v["executable"].as_str() {
                    if kinds.contains("\"test\"") {
                        tests.insert(name.to_string(), PathBuf::from(exe));
                    } else if kinds.contains("\"bin\"") && name == "tiexec" {
                        tiexec = Some(PathBuf::from(exe));
                    }
                }
            }
            Some("build-script-executed")
                if v["package_id"].as_str().unwrap_or("").contains("tiexec") =>
            {
                out_dir = v["out_dir"].as_str().map(PathBuf::from);
            }
            _ => {}
        }
    }
    CrossBuild {
        tests,
        tiexec: tiexec.expect("the wrapper was built"),
        out_dir: out_dir.expect("the build script ran"),
        // CARGO_TARGET_TMPDIR of a build for another target.
        tmp_dir: dir.join(TRIPLE).join("tmp"),
    }
}

/// Builds the fixtures the chosen tests use, for arm64, where the arm64
/// test programs look for them (their CARGO_TARGET_TMPDIR).
fn cross_fixtures(tmp_dir: &Path, archive: &Path) -> PathBuf {
    assert!(
        fixture::set_target(Target::Aarch64) || fixture::target() == Target::Aarch64,
        "fixtures of this process are for arm64"
    );
    let dir = tmp_dir.join("tiexec-tests").join("fixtures");
    for spec in [
        common::PIE,
        common::NON_PIE,
        common::MERGED_RX,
        common::NON_PIE_64,
        common::PIE_64,
    ] {
        fixture::build(spec, &dir);
    }
    let lib = fixture::build_library("bigtext", 24, &dir);
    fixture::build_host("host-linked", Some(&lib), &dir);
    fixture::build_library("plugin", 24, &dir);
    fixture::build_host("host-dlopen", None, &dir);
    // Programs that link libtiexec.a (built for arm64), as
    // `common::linked_fixture` names them.
    for (spec, name) in [
        (common::PIE, "fixture-pie-32m-linked"),
        (
            common::Spec {
                static_link: true,
                ..common::NON_PIE
            },
            "fixture-static-32m-linked",
        ),
    ] {
        fixture::build_linking(common::Spec { name, ..spec }, &dir, Some(archive));
    }
    dir
}

/// A `newc` cpio archive (what the kernel unpacks as its first root
/// filesystem), written entry by entry.
struct Cpio {
    out: Vec<u8>,
    dirs: std::collections::BTreeSet<String>,
    ino: u32,
}

impl Cpio {
    fn new() -> Cpio {
        Cpio {
            out: Vec::new(),
            dirs: Default::default(),
            ino: 1,
        }
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        let name = name.trim_start_matches('/');
        self.ino += 1;
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        );
        self.out.extend_from_slice(header.as_bytes());
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while self.out.len() % 4 != 0 {
            self.out.push(0);
        }
    }

    /// `path`'s parent directories, once each.
    fn parents(&mut self, path: &str) {
        let mut at = String::new();
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        for part in &parts[..parts.len().saturating_sub(1)] {
            at.push('/');
            at.push_str(part);
            if self.dirs.insert(at.clone()) {
                self.entry(&at.clone(), 0o040755, &[]);
            }
        }
    }

    fn dir(&mut self, path: &str) {
        self.parents(&format!("{path}/x"));
    }

    fn file(&mut self, path: &str, mode: u32, data: &[u8]) {
        self.parents(path);
        self.entry(path, 0o100000 | mode, data);
    }

    fn symlink(&mut self, path: &str, target: &str) {
        self.parents(path);
        self.entry(path, 0o120777, target.as_bytes());
    }

    /// A file of this machine at the same path inside.
    fn copy(&mut self, host: &Path) {
        use std::os::unix::fs::PermissionsExt;
        let data = std::fs::read(host).unwrap_or_else(|e| panic!("{}: {e}", host.display()));
        let mode = std::fs::metadata(host)
            .map(|m| m.permissions().mode() & 0o7777)
            .unwrap_or(0o644);
        self.file(&host.to_string_lossy(), mode, &data);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        while self.out.len() % 512 != 0 {
            self.out.push(0);
        }
        self.out
    }
}

/// The init program: mounts what the tests read, runs each suite, reports
/// each exit status on the console, powers off.
fn init_script(build: &CrossBuild, suites: &[Suite]) -> String {
    let mut s = String::from(
        "#!/bin/busybox sh\n\
         /bin/busybox --install -s /bin\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sysfs /sys\n\
         mount -t devtmpfs devtmpfs /dev\n\
         echo madvise > /sys/kernel/mm/transparent_hugepage/enabled\n\
         export PATH=/bin HOME=/root TIEXEC_TEST_STRICT=1 RUST_BACKTRACE=1\n\
         echo \"tiexec-vm: kernel $(uname -r) $(uname -m), base page $(grep -m1 KernelPageSize /proc/self/smaps | tr -s ' ' | cut -d' ' -f2) KiB, \
         THP $(cat /sys/kernel/mm/transparent_hugepage/hpage_pmd_size) bytes, hugetlb sizes: $(ls /sys/kernel/mm/hugepages | tr '\\n' ' ')\"\n",
    );
    // The tests' files on ramfs, not the root's tmpfs: like text on a disk
    // filesystem (no huge page cache, no 2 MiB-aligned placement), which is
    // what the kernel does for programs on a server.
    let fixtures = build.tmp_dir.join("tiexec-tests");
    s.push_str(&format!(
        "mv {f} {f}.tmpfs && mkdir {f} && mount -t ramfs ramfs {f} && cp -a {f}.tmpfs/. {f}/ && rm -rf {f}.tmpfs\n",
        f = fixtures.display()
    ));
    for (suite, tests) in suites {
        let exe = &build.tests[*suite];
        let filters = if tests.is_empty() {
            String::new()
        } else {
            format!("--exact {}", tests.join(" "))
        };
        s.push_str(&format!(
            "echo \"tiexec-vm: suite {suite}\"\n\
             {} --test-threads=1 --nocapture {filters} 2>&1\n\
             echo \"tiexec-vm: suite {suite} exit $?\"\n",
            exe.display()
        ));
    }
    s.push_str("echo tiexec-vm: done\npoweroff -f\n");
    s
}

/// The root filesystem: busybox, the C library, the test programs and
/// everything they name by path, the fixtures.
fn initramfs(build: &CrossBuild, suites: &[Suite], fixtures: &Path, busybox: &Path) -> Vec<u8> {
    let mut c = Cpio::new();
    for d in ["/proc", "/sys", "/dev", "/tmp", "/root", "/etc"] {
        c.dir(d);
    }
    c.file(
        "/bin/busybox",
        0o755,
        &std::fs::read(busybox).expect("busybox"),
    );
    c.file("/init", 0o755, init_script(build, suites).as_bytes());
    c.file("/etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n");
    // The C library of the cross toolchain: the same glibc Debian ships
    // for arm64, placed where its loader looks.
    let sysroot = Path::new("/usr/aarch64-linux-gnu/lib");
    for name in [
        "ld-linux-aarch64.so.1",
        "libc.so.6",
        "libm.so.6",
        "libgcc_s.so.1",
        "libdl.so.2",
        "libpthread.so.0",
        "librt.so.1",
    ] {
        let data = std::fs::read(sysroot.join(name)).expect("arm64 C library");
        c.file(&format!("/lib/aarch64-linux-gnu/{name}"), 0o755, &data);
    }
    c.symlink(
        "/lib/ld-linux-aarch64.so.1",
        "aarch64-linux-gnu/ld-linux-aarch64.so.1",
    );
    c.symlink("/usr/lib/aarch64-linux-gnu", "/lib/aarch64-linux-gnu");
    for exe in build.tests.values() {
        c.copy(exe);
    }
    c.copy(&build.tiexec);
    for e in std::fs::read_dir(&build.out_dir)
        .expect("out dir")
        .flatten()
    {
        if e.file_type().is_ok_and(|t| t.is_file()) {
            c.copy(&e.path());
        }
    }
    c.dir(&build.tmp_dir.to_string_lossy());
    for e in std::fs::read_dir(fixtures).expect("fixtures").flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let keep = !name.ends_with(".S") && !name.ends_with(".c") && !name.contains(".tmp");
        if keep && e.file_type().is_ok_and(|t| t.is_file()) {
            c.copy(&e.path());
        }
    }
    c.finish()
}

/// Boots the kernel with `initrd`; returns the console's output.
fn boot(kernel: &Path, initrd: &Path) -> common::Outcome {
    let mut qemu = Command::new("qemu-system-aarch64");
    qemu.args(["-M", "virt", "-cpu", "max,pauth-impdef=on", "-smp", "2"])
        .args(["-m", "3072", "-nographic", "-no-reboot"])
        // No network card: the machine needs none, and the default one's
        // boot ROM (efi-virtio.rom, Debian's ipxe-qemu) is not installed
        // with qemu-system-arm --no-install-recommends.
        .args(["-nic", "none"])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args([
            "-append",
            "console=ttyAMA0 rdinit=/init panic=-1 quiet transparent_hugepage=madvise",
        ]);
    let o = common::run(&mut qemu, Duration::from_secs(2400));
    if let Some(line) = o
        .stderr
        .lines()
        .find(|l| l.contains("failed to find romfile"))
    {
        o.check(
            false,
            &format!(
                "qemu-system-aarch64 lacks a firmware file it asked for ({line}): \
                 install the package that holds it (ipxe-qemu for efi-*.rom), \
                 or boot without the device that needs it"
            ),
        );
    }
    o
}

/// The library's unit tests, cross-built, run by qemu's user-mode emulator
/// on this machine: ELF parsing, planning for every page size, the arm64
/// swap routine over ordinary pages (moving, restoring by copy and by map,
/// running the moved code). qemu-user cannot show huge pages (it refuses
/// MAP_HUGETLB and shows this machine's smaps): that is the kernel test's.
#[test]
fn the_unit_tests_pass_under_qemu_user() {
    for tool in ["qemu-aarch64", "aarch64-linux-gnu-gcc"] {
        if !have(tool) {
            common::skip(format_args!("{tool} missing (run .ci/arm64-setup as root)"));
            return;
        }
    }
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["test", "--lib", "--target", TRIPLE])
        .env("CARGO_TARGET_DIR", target_dir().join("arm64"))
        .env(
            "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER",
            "aarch64-linux-gnu-gcc",
        )
        .env(
            "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER",
            "qemu-aarch64 -L /usr/aarch64-linux-gnu",
        );
    let o = common::run(&mut cmd, Duration::from_secs(1800));
    o.check(o.status.success(), "unit tests under qemu-aarch64");
    for t in [
        "trampoline::tests::a_swap_on_ordinary_pages_moves_the_same_bytes_over_the_text",
        "trampoline::tests::an_injected_hole_is_filled_with_the_same_bytes_by_copy_or_by_map",
        "plan::tests::each_geometry_plans_its_own_huge_pages",
    ] {
        o.check(
            o.stdout.contains(&format!("test {t} ... ok")),
            &format!("{t} ran and passed"),
        );
    }
}

/// Boots `kernel` (in the kit directory) with the test programs and
/// fixtures, runs `suites` there, checks each passed with every test named;
/// returns the console's text.
fn run_on_kernel(kernel: &str, suites: &[Suite]) -> Option<String> {
    let kit = kit_dir();
    let (kernel, busybox) = (kit.join(kernel), kit.join("busybox"));
    if !kernel.exists() || !busybox.exists() {
        common::skip(format_args!(
            "no {} in {} (run .ci/arm64-setup as root)",
            kernel.display(),
            kit.display()
        ));
        return None;
    }
    for tool in ["qemu-system-aarch64", "aarch64-linux-gnu-gcc"] {
        if !have(tool) {
            common::skip(format_args!("{tool} missing (run .ci/arm64-setup as root)"));
            return None;
        }
    }
    // One build and one set of fixtures for both kernels' tests, which
    // run in parallel.
    static PREPARE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let (build, fixtures) = {
        let _one = PREPARE.lock().unwrap_or_else(|e| e.into_inner());
        let build = cross_build();
        let fixtures = cross_fixtures(&build.tmp_dir, &build.out_dir.join("libtiexec-static.a"));
        (build, fixtures)
    };
    let image = initramfs(&build, suites, &fixtures, &busybox);
    let initrd = kit.join(format!(
        "initrd-{}-{}.cpio",
        std::process::id(),
        kernel.file_name().unwrap_or_default().to_string_lossy()
    ));
    std::fs::File::create(&initrd)
        .and_then(|mut f| f.write_all(&image))
        .expect("write initrd");
    let o = boot(&kernel, &initrd);
    let _ = std::fs::remove_file(&initrd);
    // Everything the machine said, for the log of a passing run too: the
    // coverage each test printed is the record of what arm64 showed.
    println!("{}", o.stdout);
    o.check(
        o.stdout.contains("tiexec-vm: done"),
        "the arm64 machine ran every suite",
    );
    // The serial console ends lines with CR LF.
    let console = o.stdout.replace("\r\n", "\n");
    for (suite, tests) in suites {
        let start = format!("tiexec-vm: suite {suite}\n");
        let end = format!("tiexec-vm: suite {suite} exit ");
        let part = console
            .split_once(&start)
            .and_then(|(_, rest)| rest.split_once(&end))
            .map(|(part, status)| (part, status.starts_with("0\n")));
        let Some((part, exit_ok)) = part else {
            o.check(false, &format!("suite {suite} ran on arm64"));
            return None;
        };
        o.check(exit_ok, &format!("suite {suite} passed on arm64"));
        // Every test named ran (output printed by the tests may follow
        // the name on its line) and none was filtered away or failed.
        for t in *tests {
            o.check(
                part.contains(&format!("test {t} ... ")),
                &format!("{suite}::{t} ran on arm64"),
            );
        }
        let passed = if tests.is_empty() {
            "test result: ok. ".to_string()
        } else {
            format!("test result: ok. {} passed; 0 failed", tests.len())
        };
        o.check(
            part.contains(&passed),
            &format!("{suite}: every test passed on arm64"),
        );
    }
    Some(console)
}

#[test]
fn the_integration_tests_pass_on_an_arm64_kernel() {
    if let Some(console) = run_on_kernel("vmlinuz", SUITES) {
        assert!(console.contains("base page 4 KiB"), "a 4 KiB-page kernel");
    }
}

/// A kernel with 16 KiB base pages: text moves to its 32 MiB PMD pages
/// (hugetlb and THP) where a program holds whole ones, same output, no
/// W+X; every injected fault leaves the text as it was.
#[test]
fn text_moves_to_32_mib_pages_on_a_16k_arm64_kernel() {
    const SUITES_16K: &[Suite] = &[
        (
            "preload",
            &[
                "text_moves_to_the_kernels_own_huge_pages",
                "off_does_nothing",
                "exit_status_and_signals_are_the_programs",
            ],
        ),
        ("faults", &[]),
    ];
    if let Some(console) = run_on_kernel("vmlinuz-16k", SUITES_16K) {
        assert!(console.contains("base page 16 KiB"), "a 16 KiB-page kernel");
        for line in [
            "fixture-pie-64m on thp with 32 MiB pages",
            "fixture-pie-64m on hugetlb with 32 MiB pages",
            "fixture-nopie-64m on thp with 32 MiB pages",
        ] {
            assert!(console.contains(line), "{line}");
        }
    }
}
