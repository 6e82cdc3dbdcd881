//! The benchmark report: `cargo bench --bench report` (as root, so it can
//! size the hugetlb pool; it restores it). Runs every workload with and
//! without tiexec, alternating the variants in each round (A B C D, A B C D,
//! ...), and writes benches/results/REPORT.md and benches/results/speedup.svg.
//! Absolute times drift on a shared machine; ratios measured side by side
//! in one run are what the report gives.
//!
//! `TIEXEC_BENCH_ROUNDS=N` sets the rounds (default 5); `TIEXEC_BENCH_QUICK=1`
//! runs a reduced set (16/64 MiB, fewer working sets, no PostgreSQL).

#[path = "../tests/common/fixture.rs"]
#[allow(dead_code)]
mod fixture;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

const MIB: u64 = 1 << 20;
const POOL: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages";

/// A C driver that calls `CALLS` functions spread over a working set of
/// `WS` functions (evenly over the whole text: one 4 KiB page each), in
/// pseudo-random order. One cache line per page: the caches hold the
/// working set long before the TLB does.
const DRIVER: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
typedef unsigned long (*fn)(unsigned long);
extern const fn fixture_table[];
extern const unsigned long fixture_count;
int main(int argc, char **argv) {
    unsigned long calls = argc > 1 ? strtoul(argv[1], 0, 10) : 0;
    unsigned long ws = argc > 2 ? strtoul(argv[2], 0, 10) : fixture_count;
    if (ws == 0 || ws > fixture_count) ws = fixture_count;
    unsigned long stride = fixture_count / ws;
    unsigned long x = 88172645463325252UL, acc = 0;
    for (unsigned long i = 0; i < calls; i++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        acc = fixture_table[(x % ws) * stride](acc + i);
    }
    printf("%016lx\n", acc);
    if (argc > 3 && strcmp(argv[3], "wait") == 0) {
        puts("ready");
        fflush(stdout);
        char b[8];
        while (read(0, b, sizeof b) > 0) {}
    }
    return 0;
}
"#;

fn sh(cmd: &mut Command) -> std::process::Output {
    cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

fn gcc(args: &[&str], what: &str) {
    let out = sh(Command::new("gcc").args(args));
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Builds the synthetic program with `mib` MiB of text: a PIE (4 KiB-aligned
/// random base: what most programs are) and the same linked 2 MiB aligned
/// (what the kernel can map huge from a primed page cache).
fn build_synthetic(dir: &Path, mib: u64) -> (PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let asm = dir.join(format!("syn{mib}.S"));
    let drv = dir.join("driver.c");
    let pie = dir.join(format!("syn{mib}-pie"));
    let aligned = dir.join(format!("syn{mib}-aligned"));
    if !pie.exists() || !aligned.exists() {
        std::fs::write(&asm, fixture::assembly(mib * 256, false, 0)).unwrap();
        std::fs::write(&drv, DRIVER).unwrap();
        let (a, d) = (asm.to_str().unwrap(), drv.to_str().unwrap());
        gcc(
            &["-O2", "-pie", "-fPIE", d, a, "-o", pie.to_str().unwrap()],
            "pie",
        );
        gcc(
            &[
                "-O2",
                "-pie",
                "-fPIE",
                "-Wl,-z,max-page-size=0x200000",
                d,
                a,
                "-o",
                aligned.to_str().unwrap(),
            ],
            "aligned",
        );
        fixture::rewrite_in_small_pages(&pie);
        fixture::rewrite_in_small_pages(&aligned);
    }
    (pie, aligned)
}

/// One way of running a program.
#[derive(Clone)]
struct Variant {
    name: &'static str,
    env: Vec<(&'static str, String)>,
    /// Run the program through this program's path instead (the aligned
    /// build for the kernel's own huge pages).
    program: Option<PathBuf>,
}

fn variants(lib: &Path, aligned: Option<&Path>) -> Vec<Variant> {
    let with = |backend: &str| {
        vec![
            ("LD_PRELOAD", lib.display().to_string()),
            ("TIEXEC_BACKEND", backend.to_string()),
        ]
    };
    let mut v = vec![
        Variant {
            name: "plain (4 KiB)",
            env: vec![],
            program: None,
        },
        Variant {
            name: "tiexec hugetlb",
            env: with("hugetlb"),
            program: None,
        },
        Variant {
            name: "tiexec thp",
            env: with("thp"),
            program: None,
        },
    ];
    if let Some(a) = aligned {
        v.push(Variant {
            name: "kernel (page cache)",
            env: vec![],
            program: Some(a.to_path_buf()),
        });
    }
    v
}

/// Wall time of one run, in seconds.
fn time_run(program: &Path, args: &[String], env: &[(&'static str, String)]) -> f64 {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let t = Instant::now();
    let out = cmd.output().expect("run");
    let s = t.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "{program:?} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    s
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Speedups of each variant against the first (plain), per round.
struct Measured {
    workload: String,
    text_mib: f64,
    coverage: Vec<String>,
    names: Vec<&'static str>,
    /// Per variant: speedup per round (plain time / variant time).
    ratios: Vec<Vec<f64>>,
    plain_seconds: f64,
}

impl Measured {
    fn summary(&self, i: usize) -> (f64, f64, f64) {
        let mut r = self.ratios[i].clone();
        let med = median(&mut r);
        let min = r.iter().cloned().fold(f64::MAX, f64::min);
        let max = r.iter().cloned().fold(f64::MIN, f64::max);
        (med, min, max)
    }
}

/// Coverage of `program`'s text when run under `variant`, read from smaps
/// while it waits.
fn coverage(program: &Path, args: &[String], v: &Variant) -> String {
    let mut cmd = Command::new(v.program.as_deref().unwrap_or(program));
    cmd.args(args)
        .arg("wait")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    for (k, val) in &v.env {
        cmd.env(k, val);
    }
    let mut child = cmd.spawn().expect("spawn");
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    use std::io::BufRead;
    let _ = out.read_line(&mut line);
    line.clear();
    let _ = out.read_line(&mut line);
    let objs = tiexec::inspect::process_objects(child.id(), 2 * MIB).unwrap_or_default();
    drop(child.stdin.take());
    let _ = child.wait();
    let main = objs.into_iter().max_by_key(|o| o.text_bytes());
    main.map_or("?".into(), |o| format!("{:.0} %", o.percent_huge()))
}

fn rounds() -> usize {
    std::env::var("TIEXEC_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
}

fn measure(
    workload: String,
    text_mib: f64,
    program: &Path,
    args: Vec<String>,
    vs: &[Variant],
) -> Measured {
    let coverage: Vec<String> = vs.iter().map(|v| coverage(program, &args, v)).collect();
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); vs.len()];
    // One warm-up round, not counted (page cache, pool, THP allocation).
    for (i, v) in vs.iter().enumerate() {
        let _ = i;
        time_run(v.program.as_deref().unwrap_or(program), &args, &v.env);
    }
    for _ in 0..rounds() {
        for (i, v) in vs.iter().enumerate() {
            times[i].push(time_run(
                v.program.as_deref().unwrap_or(program),
                &args,
                &v.env,
            ));
        }
    }
    let plain = times[0].clone();
    let ratios = times
        .iter()
        .map(|t| t.iter().zip(&plain).map(|(v, p)| p / v).collect())
        .collect();
    let m = Measured {
        workload,
        text_mib,
        coverage,
        names: vs.iter().map(|v| v.name).collect(),
        ratios,
        plain_seconds: median(&mut plain.clone()),
    };
    eprint!("{}:", m.workload);
    for i in 1..vs.len() {
        let (med, lo, hi) = m.summary(i);
        eprint!("  {} {med:.3} [{lo:.3}-{hi:.3}]", m.names[i]);
    }
    eprintln!();
    m
}

fn tiexec_bin() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let exe = root.join("target/release/tiexec");
    let build = sh(Command::new(env!("CARGO"))
        .args(["build", "--release", "--bin", "tiexec"])
        .current_dir(&root));
    assert!(
        build.status.success(),
        "cargo build --release: {}",
        String::from_utf8_lossy(&build.stderr)
    );
    exe
}

fn set_pool(pages: u64) -> bool {
    std::fs::write(POOL, format!("{pages}\n")).is_ok()
        && std::fs::read_to_string(POOL)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            >= Some(pages)
}

/// Start-up cost: exec to exit of a program that makes no calls, per
/// variant, against one memcpy of the text's size in this process; and the
/// private memory each variant adds (read from smaps while it waits).
fn startup(dir: &Path, lib: &Path, tiexec: &Path, sizes: &[u64]) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "| text | memcpy of that size | plain | tiexec hugetlb | tiexec thp | page cache (primed, no copy) | private memory added: hugetlb / thp / page cache |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|");
    for &mib in sizes {
        let (pie, aligned) = build_synthetic(dir, mib);
        let _ = sh(Command::new(tiexec).arg("prime").arg(&aligned));
        let src = vec![1u8; (mib * MIB) as usize];
        let mut dst = vec![0u8; (mib * MIB) as usize];
        let mut copies = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            dst.copy_from_slice(&src);
            copies.push(t.elapsed().as_secs_f64() * 1e3);
            std::hint::black_box(&dst);
        }
        let vs = variants(lib, Some(&aligned));
        let args = vec!["0".to_string(), "0".to_string()];
        let mut times: Vec<Vec<f64>> = vec![Vec::new(); vs.len()];
        for _ in 0..rounds() + 1 {
            for (i, v) in vs.iter().enumerate() {
                times[i].push(time_run(v.program.as_deref().unwrap_or(&pie), &args, &v.env) * 1e3);
            }
        }
        let private: Vec<String> = vs[1..]
            .iter()
            .map(|v| {
                let mut cmd = Command::new(v.program.as_deref().unwrap_or(&pie));
                cmd.args(["0", "0", "wait"])
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped());
                for (k, val) in &v.env {
                    cmd.env(k, val);
                }
                let mut child = cmd.spawn().unwrap();
                let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
                let mut l = String::new();
                use std::io::BufRead;
                let _ = out.read_line(&mut l);
                let _ = out.read_line(&mut l);
                let vmas = tiexec::smaps::read(Some(child.id())).unwrap_or_default();
                drop(child.stdin.take());
                let _ = child.wait();
                let private: u64 = vmas.iter().map(|v| v.private_hugetlb + v.anon_huge).sum();
                format!("{}", tiexec::log::Bytes(private))
            })
            .collect();
        let med = |v: &mut Vec<f64>| {
            v.remove(0); // warm-up
            median(v)
        };
        let _ = writeln!(
            md,
            "| {mib} MiB | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {} / {} / {} |",
            median(&mut copies),
            med(&mut times[0]),
            med(&mut times[1]),
            med(&mut times[2]),
            med(&mut times[3]),
            private[0],
            private[1],
            private[2]
        );
        eprintln!("startup {mib} MiB done");
    }
    md
}

const CPP_UNIT: &str = r#"
#include <algorithm>
#include <functional>
#include <iostream>
#include <map>
#include <memory>
#include <numeric>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <tuple>
#include <unordered_map>
#include <variant>
#include <vector>
template <int N> struct Fib { static constexpr long v = Fib<N - 1>::v + Fib<N - 2>::v; };
template <> struct Fib<1> { static constexpr long v = 1; };
template <> struct Fib<0> { static constexpr long v = 0; };
using V = std::variant<int, double, std::string, std::vector<int>>;
struct Visitor {
    std::string operator()(int i) const { return std::to_string(i); }
    std::string operator()(double d) const { return std::to_string(d); }
    std::string operator()(const std::string& s) const { return s; }
    std::string operator()(const std::vector<int>& v) const { return std::to_string(v.size()); }
};
int main() {
    std::map<std::string, std::vector<V>> m;
    std::regex re("([a-z]+)([0-9]*)");
    for (int i = 0; i < 100; ++i) m["k" + std::to_string(i % 9)].push_back(V{i});
    std::unordered_map<int, std::set<std::string>> u;
    for (auto& [k, vs] : m) for (auto& v : vs) u[k.size()].insert(std::visit(Visitor{}, v));
    std::smatch sm;
    std::string s = "abc123";
    std::regex_match(s, sm, re);
    std::cout << Fib<40>::v << sm.size() << u.size() << std::endl;
}
"#;

const RUST_CRATE: &str = r#"
use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
pub trait Shape: Debug { fn area(&self) -> f64; fn name(&self) -> String; }
#[derive(Debug, Clone)] pub struct Circle(pub f64);
#[derive(Debug, Clone)] pub struct Rect(pub f64, pub f64);
impl Shape for Circle { fn area(&self) -> f64 { 3.14159 * self.0 * self.0 } fn name(&self) -> String { format!("circle {}", self.0) } }
impl Shape for Rect { fn area(&self) -> f64 { self.0 * self.1 } fn name(&self) -> String { format!("rect {}x{}", self.0, self.1) } }
pub fn build(n: usize) -> Vec<Box<dyn Shape>> {
    (0..n).map(|i| if i % 2 == 0 { Box::new(Circle(i as f64)) as Box<dyn Shape> } else { Box::new(Rect(i as f64, 2.0)) }).collect()
}
pub fn index<T: Debug + Clone, K: Ord + Clone>(v: &[T], key: impl Fn(&T) -> K) -> BTreeMap<K, Vec<T>> {
    let mut m = BTreeMap::new();
    for x in v { m.entry(key(x)).or_insert_with(Vec::new).push(x.clone()); }
    m
}
pub fn words(text: &str) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for w in text.split_whitespace() { *m.entry(w.to_lowercase()).or_insert(0) += 1; }
    m
}
pub fn report(n: usize) -> String {
    let shapes = build(n);
    let by_name = index(&shapes.iter().map(|s| s.name()).collect::<Vec<_>>(), |s| s.len());
    let total: f64 = shapes.iter().map(|s| s.area()).sum();
    format!("{total} {:?} {:?}", by_name.keys().collect::<Vec<_>>(), words("a b a c"))
}
"#;

fn real_workloads(dir: &Path, tiexec: &Path) -> Vec<Measured> {
    let mut out = Vec::new();
    let env_for = |backend: &str| vec![("TIEXEC_BACKEND", backend.to_string())];
    // g++: the wrapper, so every process g++ starts is covered.
    let cpp = dir.join("unit.cpp");
    std::fs::write(&cpp, CPP_UNIT).unwrap();
    let obj = dir.join("unit.o");
    let gxx_args = |prefix: Vec<String>| {
        let mut a = prefix;
        a.extend(["g++", "-O2", "-std=c++17", "-c"].map(String::from));
        a.push(cpp.display().to_string());
        a.push("-o".into());
        a.push(obj.display().to_string());
        a
    };
    let cc1plus =
        String::from_utf8(sh(Command::new("g++").arg("-print-prog-name=cc1plus")).stdout).unwrap();
    let cc1_mib = text_mib(Path::new(cc1plus.trim()));
    let mut m = measure_commands(
        "g++ -O2 on a C++17 unit (cc1plus)".into(),
        cc1_mib,
        vec![
            ("plain (4 KiB)", Command::new("env"), gxx_args(vec![])),
            (
                "tiexec auto",
                tiexec_cmd(tiexec, &env_for("auto")),
                gxx_args(vec![]),
            ),
        ],
    );
    let log = sh(tiexec_cmd(tiexec, &env_for("auto"))
        .arg("-v")
        .args(gxx_args(vec![])));
    m.coverage = vec![
        "0 %".into(),
        coverage_from_log(&String::from_utf8_lossy(&log.stderr), &["cc1plus"]),
    ];
    out.push(m);
    // rustc: the toolchain's own binary (not rustup's proxy).
    let sysroot =
        String::from_utf8(sh(Command::new("rustc").args(["--print", "sysroot"])).stdout).unwrap();
    let rustc = PathBuf::from(sysroot.trim()).join("bin/rustc");
    let krate = dir.join("shapes.rs");
    std::fs::write(&krate, RUST_CRATE).unwrap();
    let rargs = vec![
        rustc.display().to_string(),
        "--edition".into(),
        "2021".into(),
        "--crate-type".into(),
        "lib".into(),
        "-C".into(),
        "opt-level=2".into(),
        "--out-dir".into(),
        dir.display().to_string(),
        krate.display().to_string(),
    ];
    let lib_mib: f64 = std::fs::read_dir(PathBuf::from(sysroot.trim()).join("lib"))
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    let n = p.file_name().unwrap().to_string_lossy().to_string();
                    (n.starts_with("librustc_driver") || n.starts_with("libLLVM.so"))
                        && std::fs::metadata(p).map(|m| m.len() > MIB).unwrap_or(false)
                })
                .map(|p| text_mib(&p))
                .sum()
        })
        .unwrap_or(0.0);
    let mut m = measure_commands(
        "rustc -O on a small crate (librustc_driver + libLLVM)".into(),
        lib_mib,
        vec![
            ("plain (4 KiB)", Command::new("env"), rargs.clone()),
            (
                "tiexec auto",
                tiexec_cmd(tiexec, &env_for("auto")),
                rargs.clone(),
            ),
        ],
    );
    let log = sh(tiexec_cmd(tiexec, &env_for("auto")).arg("-v").args(&rargs));
    m.coverage = vec![
        "0 %".into(),
        coverage_from_log(
            &String::from_utf8_lossy(&log.stderr),
            &["librustc_driver", "libLLVM"],
        ),
    ];
    out.push(m);
    out
}

/// The share of text on 2 MiB pages that tiexec's own report lines give
/// (read from smaps in each process) for the objects whose path contains
/// one of `names`, over all such lines in `log`.
fn coverage_from_log(log: &str, names: &[&str]) -> String {
    let bytes = |s: &str| -> f64 {
        let mut w = s.split_whitespace();
        let n: f64 = w.next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
        match w.next() {
            Some("GiB") => n * 1024.0,
            Some("MiB") => n,
            Some("KiB") => n / 1024.0,
            _ => n / MIB as f64,
        }
    };
    let (mut text, mut huge) = (0.0, 0.0);
    for line in log.lines().filter(|l| names.iter().any(|n| l.contains(n))) {
        let (Some(t), Some(h)) = (
            line.split(": text ").nth(1),
            line.split("on 2 MiB pages ").nth(1),
        ) else {
            continue;
        };
        text += bytes(t.split(',').next().unwrap_or(""));
        huge += bytes(h.split(" (").next().unwrap_or(""));
    }
    if text == 0.0 {
        "?".into()
    } else {
        format!("{:.0} %", huge * 100.0 / text)
    }
}

fn tiexec_cmd(tiexec: &Path, env: &[(&'static str, String)]) -> Command {
    let mut c = Command::new(tiexec);
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

fn text_mib(p: &Path) -> f64 {
    std::fs::File::open(p)
        .ok()
        .and_then(|f| tiexec::elf::read_program_headers(&f))
        .map(|ph| {
            tiexec::elf::load_segments(&ph, 0)
                .text
                .iter()
                .map(|r| r.len())
                .sum::<u64>() as f64
                / MIB as f64
        })
        .unwrap_or(0.0)
}

/// Alternates whole commands (A B A B ...), the first being the baseline.
fn measure_commands(
    workload: String,
    text_mib: f64,
    cmds: Vec<(&'static str, Command, Vec<String>)>,
) -> Measured {
    let run = |c: &(&'static str, Command, Vec<String>)| {
        let mut cmd = Command::new(c.1.get_program());
        cmd.args(c.1.get_args()).args(&c.2);
        for (k, v) in c.1.get_envs() {
            if let Some(v) = v {
                cmd.env(k, v);
            }
        }
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        let t = Instant::now();
        let st = cmd.status().expect("run");
        assert!(st.success(), "{cmd:?}");
        t.elapsed().as_secs_f64()
    };
    for c in &cmds {
        run(c);
    }
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); cmds.len()];
    for _ in 0..rounds() {
        for (i, c) in cmds.iter().enumerate() {
            times[i].push(run(c));
        }
    }
    let plain = times[0].clone();
    let m = Measured {
        workload,
        text_mib,
        coverage: vec!["".into(); cmds.len()],
        names: cmds.iter().map(|c| c.0).collect(),
        ratios: times
            .iter()
            .map(|t| t.iter().zip(&plain).map(|(v, p)| p / v).collect())
            .collect(),
        plain_seconds: median(&mut plain.clone()),
    };
    let (med, lo, hi) = m.summary(1);
    eprintln!("{}: {med:.3} [{lo:.3}-{hi:.3}]", m.workload);
    m
}

/// PostgreSQL: read-only pgbench throughput, server started plain or under
/// tiexec, alternating; the ratio is tps(tiexec) / tps(plain).
fn postgres(dir: &Path, tiexec: &Path) -> Option<Measured> {
    let bin = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .map(|e| e.path().join("bin"))
        .find(|b| b.join("pgbench").exists())?;
    let data = dir.join("pg");
    let _ = std::fs::remove_dir_all(&data);
    std::fs::create_dir_all(&data).ok()?;
    sh(Command::new("chown").arg("-R").arg("postgres").arg(dir));
    let as_pg = |p: &Path| {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(p);
        c
    };
    let init = sh(as_pg(&bin.join("initdb"))
        .arg("-D")
        .arg(data.join("d"))
        .args(["-A", "trust", "-U", "postgres"]));
    if !init.status.success() {
        return None;
    }
    let port = "54391";
    let server_log = dir.join("pg-server.log");
    let start = |under: bool| {
        let mut c = if under {
            let mut c = as_pg(tiexec);
            c.arg("-v").arg(bin.join("postgres"));
            c
        } else {
            as_pg(&bin.join("postgres"))
        };
        c.arg("-D")
            .arg(data.join("d"))
            .args(["-p", port, "-c", "listen_addresses=127.0.0.1", "-k"])
            .arg(&data);
        let log = std::fs::File::create(&server_log).expect("server log");
        c.stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("postgres")
    };
    let stop = || {
        sh(as_pg(&bin.join("pg_ctl"))
            .arg("-D")
            .arg(data.join("d"))
            .args(["stop", "-m", "fast"]));
    };
    let wait_ready = || {
        for _ in 0..200 {
            if sh(Command::new(bin.join("pg_isready")).args(["-h", "127.0.0.1", "-p", port]))
                .status
                .success()
            {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("postgres did not start");
    };
    let pgbench = |args: &[&str]| {
        sh(Command::new(bin.join("pgbench"))
            .args(["-h", "127.0.0.1", "-p", port, "-U", "postgres"])
            .args(args)
            .arg("postgres"))
    };
    let mut first = start(false);
    wait_ready();
    pgbench(&["-i", "-s", "10"]);
    stop();
    let _ = first.wait();
    let tps = |under: bool| {
        let mut s = start(under);
        wait_ready();
        let out = pgbench(&["-S", "-c", "4", "-j", "2", "-T", "10"]);
        stop();
        let _ = s.wait();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(text.contains("number of failed transactions: 0"), "{text}");
        text.lines()
            .find_map(|l| l.strip_prefix("tps = "))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let mut ratios = Vec::new();
    let mut plain_tps = Vec::new();
    let mut log = String::new();
    for _ in 0..rounds().min(3) {
        let p = tps(false);
        let t = tps(true);
        log = std::fs::read_to_string(&server_log).unwrap_or_default();
        plain_tps.push(p);
        ratios.push(t / p);
    }
    let _ = std::fs::remove_dir_all(&data);
    let m = Measured {
        workload: "PostgreSQL 15, pgbench -S, 4 clients, 10 s (throughput)".into(),
        text_mib: text_mib(&bin.join("postgres")),
        coverage: vec!["0 %".into(), coverage_from_log(&log, &["bin/postgres"])],
        names: vec!["plain (4 KiB)", "tiexec auto"],
        ratios: vec![vec![1.0; ratios.len()], ratios],
        plain_seconds: median(&mut plain_tps),
    };
    let (med, lo, hi) = m.summary(1);
    eprintln!("{}: {med:.3} [{lo:.3}-{hi:.3}]", m.workload);
    Some(m)
}

fn svg(rows: &[Measured]) -> String {
    // Grouped bars: one group per synthetic workload, one bar per variant,
    // the median speedup against plain 4 KiB text; whiskers min-max.
    let colors = ["#888888", "#1f77b4", "#ff7f0e", "#2ca02c"];
    let groups: Vec<&Measured> = rows.iter().filter(|m| m.names.len() > 2).collect();
    let (w, h, left, bottom, top) = (960.0, 420.0, 60.0, 90.0, 30.0);
    let max = groups
        .iter()
        .flat_map(|m| (0..m.names.len()).map(move |i| m.summary(i).2))
        .fold(1.2f64, f64::max)
        * 1.05;
    let plot_h = h - bottom - top;
    let y = |v: f64| top + plot_h * (1.0 - v / max);
    let gw = (w - left - 20.0) / groups.len().max(1) as f64;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{left}" y="18" font-size="13">Speedup against plain 4 KiB text (median, min-max), synthetic iTLB workloads</text>"#
    );
    let mut tick = 0.0;
    while tick <= max {
        let _ = writeln!(
            s,
            r##"<line x1="{left}" x2="{}" y1="{:.1}" y2="{:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{tick:.1}</text>"##,
            w - 20.0,
            y(tick),
            y(tick),
            left - 5.0,
            y(tick) + 4.0
        );
        tick += 0.2;
    }
    let _ = writeln!(
        s,
        r##"<line x1="{left}" x2="{}" y1="{:.1}" y2="{:.1}" stroke="#000" stroke-dasharray="4 3"/>"##,
        w - 20.0,
        y(1.0),
        y(1.0)
    );
    for (g, m) in groups.iter().enumerate() {
        let n = m.names.len();
        let bw = gw * 0.8 / n as f64;
        for i in 0..n {
            let (med, lo, hi) = m.summary(i);
            let x = left + g as f64 * gw + gw * 0.1 + i as f64 * bw;
            let _ = writeln!(
                s,
                r#"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{}"/>"#,
                y(med),
                bw * 0.9,
                y(0.0) - y(med),
                colors[i % 4]
            );
            let cx = x + bw * 0.45;
            let _ = writeln!(
                s,
                r#"<line x1="{cx:.1}" x2="{cx:.1}" y1="{:.1}" y2="{:.1}" stroke="black"/>"#,
                y(lo),
                y(hi)
            );
        }
        let label_x = left + g as f64 * gw + gw / 2.0;
        for (k, part) in m.workload.split(", ").enumerate() {
            let _ = writeln!(
                s,
                r#"<text x="{label_x:.1}" y="{:.1}" text-anchor="middle">{part}</text>"#,
                h - bottom + 16.0 + 13.0 * k as f64
            );
        }
    }
    if let Some(m) = groups.first() {
        for (i, name) in m.names.iter().enumerate() {
            let x = left + 10.0 + 200.0 * i as f64;
            let _ = writeln!(
                s,
                r#"<rect x="{x}" y="{}" width="12" height="12" fill="{}"/><text x="{}" y="{}">{name}</text>"#,
                h - 22.0,
                colors[i % 4],
                x + 16.0,
                h - 12.0
            );
        }
    }
    s.push_str("</svg>\n");
    s
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines().next().map(|l| {
                l.split_whitespace()
                    .nth(1)
                    .unwrap_or("0")
                    .parse::<u64>()
                    .unwrap_or(0)
                    / 1024
                    / 1024
            })
        })
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let thp =
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    format!(
        "{cpu}, {cores} cores, {mem} GiB, Linux {}, THP `{}`; a VM whose host maps guest memory with 4 KiB TLB entries, so huge pages in the guest only shorten page walks",
        kernel.trim(),
        thp.trim()
    )
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let quick = std::env::var_os("TIEXEC_BENCH_QUICK").is_some();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-report");
    std::fs::create_dir_all(&dir).unwrap();
    let tiexec = tiexec_bin();
    let lib = PathBuf::from(env!("TIEXEC_EMBEDDED_LIB"));
    // The tests' lock on the hugetlb pool: never resize it under them.
    let lock =
        std::fs::File::create(std::env::temp_dir().join("tiexec-tests-hugetlb-pool.lock")).unwrap();
    use std::os::fd::AsRawFd;
    // SAFETY: a valid open descriptor; flock waits for the tests to finish.
    unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
    let old_pool = std::fs::read_to_string(POOL).unwrap_or_default();
    let sizes: &[u64] = if quick { &[16, 64] } else { &[16, 64, 256] };
    let pool_ok = set_pool(sizes.iter().max().unwrap() / 2 + 8);
    assert!(pool_ok, "the report needs root, to size the hugetlb pool");

    let mut synthetic = Vec::new();
    for &mib in sizes {
        let (pie, aligned) = build_synthetic(&dir, mib);
        sh(Command::new(&tiexec).arg("prime").arg(&aligned));
        let functions = mib * 256;
        let sets: Vec<u64> = if quick {
            vec![4, mib]
        } else {
            vec![4, 16.min(mib), mib]
        };
        let mut seen = Vec::new();
        for ws_mib in sets {
            if seen.contains(&ws_mib) {
                continue;
            }
            seen.push(ws_mib);
            let ws = ws_mib * 256;
            let calls = 20_000_000u64;
            let args = vec![calls.to_string(), ws.min(functions).to_string()];
            synthetic.push(measure(
                format!("{mib} MiB text, {ws_mib} MiB working set"),
                mib as f64,
                &pie,
                args,
                &variants(&lib, Some(&aligned)),
            ));
        }
    }
    let startup_md = startup(
        &dir,
        &lib,
        &tiexec,
        if quick { &[8, 64] } else { &[8, 64, 256] },
    );
    let real = real_workloads(&dir, &tiexec);
    let pg = if quick { None } else { postgres(&dir, &tiexec) };
    let _ = std::fs::write(POOL, old_pool);

    let mut md = String::new();
    let _ = writeln!(md, "# tiexec benchmark report\n");
    let _ = writeln!(md, "Regenerate: `cargo bench --bench report` (as root; it sizes the hugetlb pool and puts it back).\n");
    let _ = writeln!(md, "Machine: {}.\n", machine());
    let _ = writeln!(md, "Every workload runs with each variant in turn, round after round ({} rounds after one warm-up), in one run; the ratio is plain time / variant time per round (above 1: faster), given as median [min-max]. Coverage is the share of the program's text on 2 MiB pages, read from smaps while it runs.\n", rounds());
    let _ = writeln!(md, "## Synthetic iTLB workloads\n");
    let _ = writeln!(md, "One small function per 4 KiB page, called in pseudo-random order across a working set spread over the whole text (one cache line per page, so caches hold the working set long before the TLB does). `kernel (page cache)` is the same program linked with 2 MiB alignment and its page cache primed: the best the kernel can do by itself.\n");
    let _ = writeln!(md, "![speedup](speedup.svg)\n");
    let _ = writeln!(
        md,
        "| workload | text | variant | coverage | speedup median [min-max] | runs |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|");
    for m in &synthetic {
        for i in 0..m.names.len() {
            let (med, lo, hi) = m.summary(i);
            let _ = writeln!(
                md,
                "| {} | {:.0} MiB | {} | {} | {med:.3} [{lo:.3}-{hi:.3}] | {} |",
                m.workload,
                m.text_mib,
                m.names[i],
                m.coverage[i],
                m.ratios[i].len()
            );
        }
    }
    let _ = writeln!(
        md,
        "\n(plain times: {})\n",
        synthetic
            .iter()
            .map(|m| format!("{:.2} s", m.plain_seconds))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(md, "## Start-up cost and private memory\n");
    let _ = writeln!(md, "Time from exec to exit of the same program making no calls (median), against one memcpy of the text's size in the benchmark's own process; private memory is what smaps shows as hugetlb or anonymous huge pages while it runs. The page-cache path copies nothing and adds no private memory.\n");
    md.push_str(&startup_md);
    let _ = writeln!(md, "\n## Real workloads\n");
    let _ = writeln!(md, "Under the wrapper, so every process the command starts is covered; coverage from tiexec's own report lines (smaps, read in each process). Compilers are timed end to end, start-up copy included; PostgreSQL by throughput (tiexec / plain).\n");
    let _ = writeln!(
        md,
        "| workload | text | variant | coverage | speedup median [min-max] | runs |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|");
    for m in real.iter().chain(pg.iter()) {
        let (med, lo, hi) = m.summary(1);
        let cov = m.coverage.get(1).cloned().unwrap_or_default();
        let _ = writeln!(
            md,
            "| {} | {:.0} MiB | {} | {cov} | {med:.3} [{lo:.3}-{hi:.3}] | {} |",
            m.workload,
            m.text_mib,
            m.names[1],
            m.ratios[1].len()
        );
    }
    let results = root.join("benches/results");
    std::fs::create_dir_all(&results).unwrap();
    std::fs::write(results.join("REPORT.md"), md).unwrap();
    std::fs::write(results.join("speedup.svg"), svg(&synthetic)).unwrap();
    eprintln!("wrote {}", results.join("REPORT.md").display());
}
