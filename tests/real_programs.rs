//! Programs nobody here wrote, under the wrapper: same results as without.

mod common;

use std::process::Command;
use std::time::Duration;

const T: Duration = Duration::from_secs(300);

const CPP_SOURCE: &str = r#"
#include <algorithm>
#include <iostream>
#include <map>
#include <numeric>
#include <string>
#include <vector>

template <typename T> T total(const std::vector<T>& v) {
    return std::accumulate(v.begin(), v.end(), T{});
}

int main() {
    std::map<std::string, std::vector<double>> m;
    for (int i = 0; i < 100; ++i) m["k" + std::to_string(i % 7)].push_back(i * 0.5);
    double s = 0;
    for (auto& [k, v] : m) { std::sort(v.begin(), v.end()); s += total(v); }
    std::cout << s << "\n";
}
"#;

/// g++ (its cc1plus has ~21 MiB of non-PIE text) compiles a C++ file to the
/// same object bytes under tiexec as without, and while cc1plus runs
/// (blocked reading the source from its standard input), at least 95 % of
/// its text that a 2 MiB page can hold is on 2 MiB pages (moved by tiexec,
/// or already mapped huge by the kernel), read from its smaps.
#[test]
fn gxx_compiles_to_the_same_object() {
    use std::io::Write;
    use std::process::Stdio;

    let dir = common::scratch_dir().join(format!("gxx-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("unit.cpp");
    std::fs::write(&src, CPP_SOURCE).unwrap();
    let plain_obj = dir.join("plain.o");
    let tiexec_obj = dir.join("tiexec.o");
    let cc1plus = Command::new("g++")
        .arg("-print-prog-name=cc1plus")
        .output()
        .ok()
        .and_then(|o| std::fs::canonicalize(String::from_utf8_lossy(&o.stdout).trim()).ok())
        .expect("g++ names its cc1plus");

    // Both compile from standard input (the object names its source).
    let plain = common::run_with_stdin(
        Command::new("g++")
            .args(["-O2", "-x", "c++", "-c", "-", "-o"])
            .arg(&plain_obj),
        std::fs::File::open(&src).unwrap().into(),
        T,
    );
    plain.check(plain.status.success(), "plain g++");
    // THP: independent of the hugetlb pool, which other tests resize.
    let mut child = common::tiexec_cmd()
        .args([
            "-v", "-b", "thp", "g++", "-O2", "-x", "c++", "-c", "-", "-o",
        ])
        .arg(&tiexec_obj)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tiexec g++");
    let gxx = child.id();
    let running = common::wait_until_reading_stdin(
        || common::descendants_running(gxx, &cc1plus).first().copied(),
        Duration::from_secs(60),
    );
    let measured = running.map(|pid| {
        let segments = common::text_segments(pid, &cc1plus);
        let reachable = common::reachable_text(pid, &segments, &cc1plus);
        (common::coverage(pid, &segments), reachable)
    });
    let mut stdin = child.stdin.take().unwrap();
    let _ = stdin.write_all(CPP_SOURCE.as_bytes());
    drop(stdin);
    let out = child.wait_with_output().expect("wait for g++");
    let context = format!(
        "cc1plus {:?} (coverage, reachable text): {measured:?}\nstderr:\n{}",
        cc1plus,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "g++ under tiexec failed\n{context}");
    let a = std::fs::read(&plain_obj).unwrap();
    let b = std::fs::read(&tiexec_obj).unwrap();
    assert!(a == b, "object files differ\n{context}");
    let (cov, reachable) = measured.unwrap_or_else(|| panic!("cc1plus never ran\n{context}"));
    assert!(
        reachable >= 16 << 20 && cov.huge() * 100 >= reachable * 95,
        "cc1plus text under 95 % on 2 MiB pages\n{context}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Debian's python3 (and the shell that runs it) behaves the same.
#[test]
fn python_and_shell_give_the_same_output() {
    let script =
        "import hashlib,sys; print(hashlib.sha256(b'x'*100000).hexdigest(), sum(range(10**6)))";
    for prog in [
        &["/usr/bin/python3", "-c", script][..],
        &["sh", "-c", "echo $((6*7)); exit 9"][..],
    ] {
        let plain = common::run(Command::new(prog[0]).args(&prog[1..]), T);
        let o = common::run(common::tiexec_cmd().args(prog), T);
        o.check(
            o.stdout == plain.stdout && o.status.code() == plain.status.code(),
            &format!("differs from plain:\n{plain}"),
        );
        o.check(o.stderr.is_empty(), "silent at the default level");
    }
}

/// The toolchain's real rustc (not rustup's proxy) and its two big
/// libraries: librustc_driver and libLLVM (the file, not the linker script).
fn rustc_and_libraries() -> Option<(std::path::PathBuf, std::path::PathBuf, std::path::PathBuf)> {
    let out = Command::new("rustc")
        .args(["--print", "sysroot"])
        .output()
        .ok()?;
    let sysroot = std::path::PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
    let lib = sysroot.join("lib");
    let mut driver = None;
    let mut llvm = None;
    for entry in std::fs::read_dir(&lib).ok()? {
        let path = entry.ok()?.path();
        let name = path.file_name()?.to_string_lossy().into_owned();
        let big = std::fs::metadata(&path)
            .map(|m| m.len() > 1 << 20)
            .unwrap_or(false);
        if name.starts_with("librustc_driver-") && name.ends_with(".so") && big {
            driver = Some(path);
        } else if name.starts_with("libLLVM") && big {
            llvm = Some(path);
        }
    }
    Some((sysroot.join("bin").join("rustc"), driver?, llvm?))
}

const RUST_SOURCE: &str = "
pub fn fib(n: u64) -> u64 { if n < 2 { n } else { fib(n - 1) + fib(n - 2) } }
pub fn total() -> u64 { (0..20).map(fib).sum() }
";

/// rustc compiles a small crate to the same rlib under tiexec, and while it
/// runs (blocked reading its source from stdin, libraries loaded) at least
/// 95 % of the text of librustc_driver and of libLLVM is on 2 MiB pages,
/// read from its smaps.
#[test]
fn rustc_compiles_the_same_with_its_big_libraries_on_huge_pages() {
    use std::io::{BufRead, BufReader, Write};
    use std::process::Stdio;

    let Some((rustc, driver, llvm)) = rustc_and_libraries() else {
        common::skip(format_args!(
            "no rustup toolchain with librustc_driver and libLLVM"
        ));
        return;
    };
    let dir = common::scratch_dir().join(format!("rustc-{}", std::process::id()));
    let (plain_dir, tiexec_dir) = (dir.join("plain"), dir.join("tiexec"));
    std::fs::create_dir_all(&plain_dir).unwrap();
    std::fs::create_dir_all(&tiexec_dir).unwrap();
    let args = [
        "--edition",
        "2021",
        "--crate-type",
        "lib",
        "--crate-name",
        "small",
        "-O",
        "-",
        "--out-dir",
    ];

    let src = dir.join("small.rs");
    std::fs::write(&src, RUST_SOURCE).unwrap();
    let plain = common::run_with_stdin(
        Command::new(&rustc).args(args).arg(&plain_dir),
        std::fs::File::open(&src).unwrap().into(),
        T,
    );
    plain.check(plain.status.success(), "plain rustc");

    let mut child = common::tiexec_cmd()
        .args(["-v", "-b", "thp"])
        .arg(&rustc)
        .args(args)
        .arg(&tiexec_dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tiexec rustc");
    let pid = child.id();
    // Blocked reading its source: start-up (tiexec's work included) done.
    let ready = common::wait_until_reading_stdin(|| Some(pid), T).is_some();
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });
    let coverage = |lib: &std::path::Path| {
        let segments = common::text_segments(pid, lib);
        let text: u64 = segments.iter().map(|s| s.len()).sum();
        (common::coverage(pid, &segments).huge(), text)
    };
    let (driver_huge, driver_text) = if ready { coverage(&driver) } else { (0, 1) };
    let (llvm_huge, llvm_text) = if ready { coverage(&llvm) } else { (0, 1) };
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(RUST_SOURCE.as_bytes()).unwrap();
    drop(stdin);
    let status = child.wait().unwrap();
    let stderr = reader.join().unwrap().join("\n");
    let context = format!(
        "stderr:\n{stderr}\nlibrustc_driver {driver_huge} of {driver_text}, libLLVM {llvm_huge} of {llvm_text}"
    );
    assert!(ready, "rustc never waited for its source\n{context}");
    assert!(status.success(), "rustc under tiexec failed\n{context}");
    let a = std::fs::read(plain_dir.join("libsmall.rlib")).unwrap();
    let b = std::fs::read(tiexec_dir.join("libsmall.rlib")).unwrap();
    assert!(a == b, "rlibs differ\n{context}");
    assert!(
        driver_huge * 100 >= driver_text * 95,
        "librustc_driver under 95 %\n{context}"
    );
    assert!(
        llvm_huge * 100 >= llvm_text * 95,
        "libLLVM under 95 %\n{context}"
    );
    eprintln!("{context}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Under `--dlopen` (tiexec as the loader's audit module) rustc starts: the
/// static TLS surplus tiexec asks glibc for holds librustc_driver's ~23 KiB
/// of initial-exec TLS, and compiles the same rlib.
#[test]
fn rustc_runs_under_dlopen() {
    let Some((rustc, _, _)) = rustc_and_libraries() else {
        common::skip(format_args!(
            "no rustup toolchain with librustc_driver and libLLVM"
        ));
        return;
    };
    let dir = common::scratch_dir().join(format!("rustc-dlopen-{}", std::process::id()));
    let (plain_dir, tiexec_dir) = (dir.join("plain"), dir.join("tiexec"));
    std::fs::create_dir_all(&plain_dir).unwrap();
    std::fs::create_dir_all(&tiexec_dir).unwrap();
    let src = dir.join("small.rs");
    std::fs::write(&src, RUST_SOURCE).unwrap();
    let args = ["--edition", "2021", "--crate-type", "lib", "-O"];
    let plain = common::run(
        Command::new(&rustc)
            .args(args)
            .arg(&src)
            .arg("--out-dir")
            .arg(&plain_dir),
        T,
    );
    plain.check(plain.status.success(), "plain rustc");
    let o = common::run(
        common::tiexec_cmd()
            .args(["--dlopen"])
            .arg(&rustc)
            .args(args)
            .arg(&src)
            .arg("--out-dir")
            .arg(&tiexec_dir),
        T,
    );
    o.check(o.status.success(), "rustc under --dlopen");
    let a = std::fs::read(plain_dir.join("libsmall.rlib")).unwrap_or_default();
    let b = std::fs::read(tiexec_dir.join("libsmall.rlib")).unwrap_or_default();
    o.check(!a.is_empty() && a == b, "the same rlib");
    let _ = std::fs::remove_dir_all(&dir);
}
