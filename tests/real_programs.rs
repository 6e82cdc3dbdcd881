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
/// same object bytes under tiexec as without, and cc1plus reports its text
/// on 2 MiB pages (moved by tiexec or already mapped huge by the kernel).
#[test]
fn gxx_compiles_to_the_same_object() {
    let dir = common::scratch_dir().join(format!("gxx-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("unit.cpp");
    std::fs::write(&src, CPP_SOURCE).unwrap();
    let plain_obj = dir.join("plain.o");
    let tiexec_obj = dir.join("tiexec.o");

    let plain = common::run(
        Command::new("g++")
            .args(["-O2", "-c"])
            .arg(&src)
            .arg("-o")
            .arg(&plain_obj),
        T,
    );
    plain.check(plain.status.success(), "plain g++");
    // THP: independent of the hugetlb pool, which other tests resize.
    let o = common::run(
        common::tiexec_cmd()
            .args(["-v", "-b", "thp", "g++", "-O2", "-c"])
            .arg(&src)
            .arg("-o")
            .arg(&tiexec_obj),
        T,
    );
    o.check(o.status.success(), "g++ under tiexec");
    let a = std::fs::read(&plain_obj).unwrap();
    let b = std::fs::read(&tiexec_obj).unwrap();
    o.check(a == b, "object files differ");
    let line = o
        .stderr
        .lines()
        .find(|l| l.contains("cc1plus: text"))
        .unwrap_or_else(|| panic!("no report line for cc1plus\n{o}"));
    o.check(
        line.contains("on 2 MiB pages") && !line.contains("on 2 MiB pages 0 B"),
        "cc1plus text on 2 MiB pages",
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
