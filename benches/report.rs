//! The benchmark report: `cargo bench --bench report` (as root, so it can
//! size the hugetlb pool and mount an image cache of its own; it puts both
//! back). Runs every workload with and without tiexec, alternating the
//! variants in each round (A B C, A B C, ...), and writes
//! benches/results/REPORT.md and benches/results/speedup.svg. Absolute times
//! drift on a shared machine; ratios measured side by side in one run are
//! what the report gives.
//!
//! Sections: the default policy (a fresh 0.6 s program against `-b thp`
//! and intel/iodlr's preload, a 256 MiB program that uses 16 MiB of its
//! text, a server's first start and restart); real programs (rustc, cargo,
//! g++, PostgreSQL) with the cache set up and with THP only; the wrapper's
//! own cost; memory shared by concurrent processes;
//! memory-deny-write-execute; synthetic iTLB workloads; start-up cost.
//!
//! `TIEXEC_BENCH_ROUNDS=N` sets the rounds of the synthetic workloads
//! (default 5); `TIEXEC_BENCH_QUICK=1` runs a reduced set;
//! `TIEXEC_BENCH_IODLR=PATH` names an `liblppreload.so` to compare with
//! (not built here); `TIEXEC_BENCH_ONLY_DEFAULT=1` prints the default
//! policy's section alone and leaves the report as it is.

#[path = "../tests/common/fixture.rs"]
#[allow(dead_code)]
mod fixture;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

const MIB: u64 = 1 << 20;
/// The hugetlb pool of the kernel's huge page size.
fn pool() -> String {
    format!(
        "{}/nr_hugepages",
        tiexec::internal::discover::hugetlb_pool_dir()
    )
}

/// The image cache the report mounts for itself (hugetlbfs, size =
/// min_size), unmounted on drop.
struct Cache {
    path: PathBuf,
}

impl Cache {
    fn mount(dir: &Path, pages: u64) -> Cache {
        let path = dir.join("image-cache");
        let _ = Command::new("umount").arg("-l").arg(&path).status();
        std::fs::create_dir_all(&path).unwrap();
        let opts = format!(
            "pagesize=2M,size={m}M,min_size={m}M,mode=1777",
            m = pages * 2
        );
        let out = sh(Command::new("mount")
            .args(["-t", "hugetlbfs", "-o", &opts, "none"])
            .arg(&path));
        assert!(out.status.success(), "mount the image cache: {out:?}");
        Cache { path }
    }

    /// 2 MiB pages its files hold now.
    fn used_pages(&self) -> u64 {
        let c = std::ffi::CString::new(self.path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: an all-zero statfs is valid; `c` is NUL-terminated.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: valid path and out-pointer.
        unsafe { libc::statfs(c.as_ptr(), &mut st) };
        st.f_blocks - st.f_bfree
    }
}

impl Drop for Cache {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// A C driver that calls `CALLS` functions spread over a working set of
/// `WS` functions (evenly over the whole text: one 4 KiB page each), in
/// pseudo-random order. One cache line per page: the caches hold the
/// working set long before the TLB does.
const DRIVER: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
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
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (unsigned long i = 0; i < calls; i++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        acc = fixture_table[(x % ws) * stride](acc + i);
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    /* The loop alone, without start-up (where a copy is paid). */
    fprintf(stderr, "loop_ns %ld\n",
            (long)((t1.tv_sec - t0.tv_sec) * 1000000000L + (t1.tv_nsec - t0.tv_nsec)));
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

/// The synthetic iTLB workloads: each size, each working set, each variant.
fn synthetic_workloads(
    dir: &Path,
    lib: &Path,
    cache: &Cache,
    sizes: &[u64],
    quick: bool,
) -> Vec<Measured> {
    let mut synthetic = Vec::new();
    for &mib in sizes {
        let (pie, aligned) = build_synthetic(dir, mib);
        sh(Command::new(tiexec_bin()).arg("--prime").arg(&aligned));
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
                &variants(lib, &cache.path, Some(&aligned)),
            ));
        }
    }
    synthetic
}

/// The synthetic workloads' table.
fn synthetic_table(synthetic: &[Measured]) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "| workload | text | variant | coverage | speedup, exec to exit, median [min-max] | speedup of the loop alone | runs |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|");
    for m in synthetic {
        for i in 0..m.names.len() {
            let (med, lo, hi) = m.summary(i);
            let loop_only = m.loop_summary(i).map_or("?".to_string(), |(med, lo, hi)| {
                format!("{med:.3} [{lo:.3}-{hi:.3}]")
            });
            let _ = writeln!(
                md,
                "| {} | {:.0} MiB | {} | {} | {med:.3} [{lo:.3}-{hi:.3}] | {loop_only} | {} |",
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
    md
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
    settle(&pie);
    settle(&aligned);
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

fn variants(lib: &Path, cache: &Path, aligned: Option<&Path>) -> Vec<Variant> {
    let with = |backend: &str| {
        vec![
            ("LD_PRELOAD", lib.display().to_string()),
            ("TIEXEC_BACKEND", backend.to_string()),
            ("TIEXEC_CACHE", cache.display().to_string()),
        ]
    };
    let mut v = vec![
        Variant {
            name: "plain (4 KiB)",
            env: vec![],
            program: None,
        },
        Variant {
            name: "tiexec cache",
            env: with("cache"),
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
    time_run_and_loop(program, args, env).0
}

/// Wall time of one run and, when the program reports it (`loop_ns N` on
/// stderr: the synthetic driver), the time of its loop alone, in seconds.
fn time_run_and_loop(
    program: &Path,
    args: &[String],
    env: &[(&'static str, String)],
) -> (f64, Option<f64>) {
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
    let loop_s = String::from_utf8_lossy(&out.stderr)
        .lines()
        .find_map(|l| l.strip_prefix("loop_ns "))
        .and_then(|n| n.trim().parse::<f64>().ok())
        .map(|ns| ns / 1e9);
    (s, loop_s)
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
    /// Per variant: the same for the program's loop alone (start-up left
    /// out), when it reports it.
    loop_ratios: Vec<Vec<f64>>,
    plain_seconds: f64,
}

impl Measured {
    fn summary(&self, i: usize) -> (f64, f64, f64) {
        summarize(&self.ratios[i])
    }

    fn loop_summary(&self, i: usize) -> Option<(f64, f64, f64)> {
        self.loop_ratios
            .get(i)
            .filter(|r| !r.is_empty())
            .map(|r| summarize(r))
    }
}

/// Median, min and max.
fn summarize(ratios: &[f64]) -> (f64, f64, f64) {
    let mut r = ratios.to_vec();
    let med = median(&mut r);
    let min = r.iter().cloned().fold(f64::MAX, f64::min);
    let max = r.iter().cloned().fold(f64::MIN, f64::max);
    (med, min, max)
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
    let objs = tiexec::internal::inspect::process_objects(child.id(), 2 * MIB).unwrap_or_default();
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
    let mut loops: Vec<Vec<f64>> = vec![Vec::new(); vs.len()];
    // One warm-up round, not counted (page cache, pool, THP allocation).
    for v in vs {
        time_run(v.program.as_deref().unwrap_or(program), &args, &v.env);
    }
    for _ in 0..rounds() {
        for (i, v) in vs.iter().enumerate() {
            let (wall, loop_s) =
                time_run_and_loop(v.program.as_deref().unwrap_or(program), &args, &v.env);
            times[i].push(wall);
            loops[i].extend(loop_s);
        }
    }
    let against_plain = |t: &Vec<Vec<f64>>| -> Vec<Vec<f64>> {
        let plain = t[0].clone();
        t.iter()
            .map(|v| v.iter().zip(&plain).map(|(v, p)| p / v).collect())
            .collect()
    };
    let plain = times[0].clone();
    let ratios = against_plain(&times);
    let loop_ratios = if loops.iter().all(|l| l.len() == times[0].len()) {
        against_plain(&loops)
    } else {
        Vec::new()
    };
    let m = Measured {
        workload,
        text_mib,
        coverage,
        names: vs.iter().map(|v| v.name).collect(),
        ratios,
        loop_ratios,
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
    std::fs::write(pool(), format!("{pages}\n")).is_ok()
        && std::fs::read_to_string(pool())
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            >= Some(pages)
}

/// Start-up cost: exec to exit of a program that makes no calls, per
/// variant, against one memcpy of the text's size in this process; and the
/// private memory each variant adds (read from smaps while it waits).
fn startup(dir: &Path, lib: &Path, cache: &Path, tiexec: &Path, sizes: &[u64]) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "| text | memcpy of that size | plain | tiexec cache (image found) | tiexec hugetlb | tiexec thp | page cache (primed, no copy) | private memory added: cache / hugetlb / thp / page cache |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|");
    for &mib in sizes {
        let (pie, aligned) = build_synthetic(dir, mib);
        let _ = sh(Command::new(tiexec).arg("--prime").arg(&aligned));
        let src = vec![1u8; (mib * MIB) as usize];
        let mut dst = vec![0u8; (mib * MIB) as usize];
        let mut copies = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            dst.copy_from_slice(&src);
            copies.push(t.elapsed().as_secs_f64() * 1e3);
            std::hint::black_box(&dst);
        }
        // The aligned build (a stable address) once more, its page cache in
        // small folios (so the kernel does not map it huge by itself): its
        // image is found in the cache after the first run, what every later
        // process pays.
        let for_image = dir.join(format!("syn{mib}-aligned-image"));
        if !for_image.exists() {
            std::fs::copy(&aligned, &for_image).unwrap();
            fixture::rewrite_in_small_pages(&for_image);
        }
        settle(&for_image);
        let mut vs = variants(lib, cache, Some(&aligned));
        if let Some(v) = vs.get_mut(1) {
            v.program = Some(for_image.clone());
        }
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
                let vmas = tiexec::internal::smaps::read(Some(child.id())).unwrap_or_default();
                drop(child.stdin.take());
                let _ = child.wait();
                // Pages of a shared image count once per machine, not here
                // (with one process mapping it, smaps calls them private).
                let private: u64 = vmas
                    .iter()
                    .filter(|v| !tiexec::internal::cache::is_image_path(&v.path))
                    .map(|v| v.private_hugetlb + v.anon_huge)
                    .sum();
                format!("{}", tiexec::internal::log::Bytes(private))
            })
            .collect();
        let med = |v: &mut Vec<f64>| {
            v.remove(0); // warm-up
            median(v)
        };
        let _ = writeln!(
            md,
            "| {mib} MiB | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {} / {} / {} / {} |",
            median(&mut copies),
            med(&mut times[0]),
            med(&mut times[1]),
            med(&mut times[2]),
            med(&mut times[3]),
            med(&mut times[4]),
            private[0],
            private[1],
            private[2],
            private[3]
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

/// A real workload, as commands: how to prepare a round (clean), and what
/// to time; run plain, under tiexec with the cache, under tiexec with THP
/// only (no setup), alternating.
struct Real {
    name: String,
    /// Text of the big objects, MiB.
    text_mib: f64,
    /// Objects whose coverage the report gives (file names contain these).
    objects: Vec<&'static str>,
    program: Vec<String>,
    prepare: Option<Vec<String>>,
    rounds: usize,
}

/// One row of the real-workloads table.
struct RealRow {
    real: Real,
    plain_seconds: f64,
    /// Per tiexec variant: ratios (plain / variant) per round, coverage.
    variants: Vec<(&'static str, Vec<f64>, String)>,
}

fn run_quiet(argv: &[String], env: &[(String, String)]) -> f64 {
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
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
        "{argv:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    s
}

/// Coverage of `objects` over every JSON report in `dir` (one per process):
/// bytes on 2 MiB pages / bytes of text, summed.
fn coverage_from_reports(dir: &Path, objects: &[&str]) -> String {
    let (mut text, mut huge, mut processes) = (0u64, 0u64, 0usize);
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let Ok(doc) = std::fs::read_to_string(e.path()) else {
            continue;
        };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&doc) else {
            continue;
        };
        let mut counted = false;
        for o in v["objects"].as_array().into_iter().flatten() {
            let path = o["path"].as_str().unwrap_or("");
            if objects.iter().any(|n| path.contains(n)) {
                text += o["text_bytes"].as_u64().unwrap_or(0);
                huge += o["after"]["huge_bytes"].as_u64().unwrap_or(0);
                counted = true;
            }
        }
        processes += usize::from(counted);
    }
    if text == 0 {
        "(no report)".into()
    } else {
        format!(
            "{:.1} % ({processes} processes)",
            huge as f64 * 100.0 / text as f64
        )
    }
}

fn real_workloads(dir: &Path, tiexec: &Path, cache: &Cache, quick: bool) -> Vec<RealRow> {
    let mut reals = Vec::new();
    let rustc_libs = rustc_library_mib();
    // rustc compiling a hello world: ~70 ms, the program that paid most.
    let hello = dir.join("hello.rs");
    std::fs::write(&hello, "fn main() { println!(\"hello\"); }\n").unwrap();
    reals.push(Real {
        name: "rustc hello.rs (a binary, linked)".into(),
        text_mib: rustc_libs,
        objects: vec!["librustc_driver", "libLLVM"],
        program: vec![
            "rustc".into(),
            hello.display().to_string(),
            "-o".into(),
            dir.join("hello").display().to_string(),
        ],
        prepare: None,
        rounds: if quick { 5 } else { 15 },
    });
    // cargo build --release of a real crate with its dependencies, from
    // clean: ~20 crates, many short rustc processes, build scripts.
    let krate = dir.join("proptest");
    if !krate.join("Cargo.toml").exists() {
        let src = std::fs::read_dir(home().join(".cargo/registry/src"))
            .ok()
            .and_then(|d| d.flatten().next())
            .map(|d| d.path().join("proptest-1.12.0"));
        if let Some(src) = src.filter(|s| s.exists()) {
            sh(Command::new("cp").arg("-r").arg(&src).arg(&krate));
        }
    }
    if krate.join("Cargo.toml").exists() {
        let manifest = krate.join("Cargo.toml").display().to_string();
        // Fetch once (then offline).
        sh(Command::new("cargo").args(["fetch", "--manifest-path", &manifest]));
        reals.push(Real {
            name: "cargo build --release of proptest 1.12 and its 20 dependencies, from clean"
                .into(),
            text_mib: rustc_libs,
            objects: vec!["librustc_driver", "libLLVM"],
            program: vec![
                "cargo".into(),
                "build".into(),
                "--release".into(),
                "--offline".into(),
                "--manifest-path".into(),
                manifest.clone(),
            ],
            prepare: Some(vec![
                "cargo".into(),
                "clean".into(),
                "--manifest-path".into(),
                manifest,
            ]),
            rounds: if quick { 3 } else { 5 },
        });
    }
    // g++ on a C++17 unit: cc1plus, 21 MiB of text.
    let cpp = dir.join("unit.cpp");
    std::fs::write(&cpp, CPP_UNIT).unwrap();
    let cc1plus =
        String::from_utf8(sh(Command::new("g++").arg("-print-prog-name=cc1plus")).stdout).unwrap();
    reals.push(Real {
        name: "g++ -O2 on a C++17 unit (cc1plus)".into(),
        text_mib: text_mib(Path::new(cc1plus.trim())),
        objects: vec!["cc1plus"],
        program: vec![
            "g++".into(),
            "-O2".into(),
            "-std=c++17".into(),
            "-c".into(),
            cpp.display().to_string(),
            "-o".into(),
            dir.join("unit.o").display().to_string(),
        ],
        prepare: None,
        rounds: if quick { 5 } else { 10 },
    });

    let state = dir.join("state");
    let mut rows = Vec::new();
    for real in reals {
        let _ = std::fs::remove_dir_all(&state);
        std::fs::create_dir_all(&state).unwrap();
        let base_env = vec![("XDG_CACHE_HOME".to_string(), state.display().to_string())];
        let reports = |name: &str| dir.join(format!("reports-{name}"));
        let variant = |name: &str, cache_dir: &str| {
            let mut env = base_env.clone();
            env.push(("TIEXEC_CACHE".into(), cache_dir.into()));
            let mut argv = vec![tiexec.display().to_string()];
            argv.extend(real.program.iter().cloned());
            (name.to_string(), argv, env)
        };
        let cache_dir = cache.path.display().to_string();
        let runs = [
            ("plain".to_string(), real.program.clone(), base_env.clone()),
            variant("cache", &cache_dir),
            variant("thp-only", "off"),
        ];
        let once = |argv: &[String], env: &[(String, String)]| {
            if let Some(p) = &real.prepare {
                run_quiet(p, &base_env);
            }
            run_quiet(argv, env)
        };
        // Warm-up: the cache gets its images, the page cache its files, and
        // THP-only its run history.
        for (_, argv, env) in &runs {
            once(argv, env);
        }
        let mut times = vec![Vec::new(); runs.len()];
        for _ in 0..real.rounds {
            for (i, (_, argv, env)) in runs.iter().enumerate() {
                times[i].push(once(argv, env));
            }
        }
        // Coverage, from each process's own JSON report (smaps read back).
        let mut variants = Vec::new();
        for (i, (name, argv, env)) in runs.iter().enumerate().skip(1) {
            let rd = reports(name);
            let _ = std::fs::remove_dir_all(&rd);
            std::fs::create_dir_all(&rd).unwrap();
            let mut env = env.clone();
            env.push((
                "TIEXEC_REPORT".into(),
                rd.join("r-%p.json").display().to_string(),
            ));
            once(argv, &env);
            let ratios: Vec<f64> = times[0].iter().zip(&times[i]).map(|(p, v)| p / v).collect();
            let label = if name == "cache" {
                "tiexec, cache set up"
            } else {
                "tiexec, THP only, no setup"
            };
            variants.push((label, ratios, coverage_from_reports(&rd, &real.objects)));
        }
        let plain_seconds = median(&mut times[0].clone());
        eprint!("{}: plain {plain_seconds:.3} s", real.name);
        for (label, r, cov) in &variants {
            eprint!("  {label} {:.3} ({cov})", median(&mut r.clone()));
        }
        eprintln!();
        rows.push(RealRow {
            real,
            plain_seconds,
            variants,
        });
    }
    rows
}

fn home() -> PathBuf {
    PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
}

/// MiB of text in the toolchain's librustc_driver and libLLVM.
fn rustc_library_mib() -> f64 {
    let sysroot =
        String::from_utf8(sh(Command::new("rustc").args(["--print", "sysroot"])).stdout).unwrap();
    std::fs::read_dir(PathBuf::from(sysroot.trim()).join("lib"))
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
        .unwrap_or(0.0)
}

fn text_mib(p: &Path) -> f64 {
    std::fs::File::open(p)
        .ok()
        .and_then(|f| tiexec::internal::elf::read_program_headers(&f))
        .map(|ph| {
            tiexec::internal::elf::load_segments(&ph, 0)
                .text
                .iter()
                .map(|r| r.len())
                .sum::<u64>() as f64
                / MIB as f64
        })
        .unwrap_or(0.0)
}

/// PostgreSQL: read-only pgbench throughput, the server started plain,
/// under tiexec with the cache, under tiexec with THP only, alternating.
fn postgres(dir: &Path, tiexec: &Path, cache: &Cache) -> Option<RealRow> {
    let bin = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .map(|e| e.path().join("bin"))
        .find(|b| b.join("pgbench").exists())?;
    let data = dir.join("pg");
    let _ = std::fs::remove_dir_all(&data);
    std::fs::create_dir_all(&data).ok()?;
    sh(Command::new("chown").arg("-R").arg("postgres").arg(&data));
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
    let reports = data.join("reports");
    std::fs::create_dir_all(&reports).ok()?;
    sh(Command::new("chown").arg("postgres").arg(&reports));
    let start = |variant: usize, report: bool| {
        let mut c = if variant == 0 {
            as_pg(&bin.join("postgres"))
        } else {
            let mut c = as_pg(tiexec);
            c.arg(bin.join("postgres"));
            c
        };
        match variant {
            1 => c.env("TIEXEC_CACHE", &cache.path),
            _ => c.env("TIEXEC_CACHE", "off"),
        };
        if report {
            c.env("TIEXEC_REPORT", reports.join("r-%p.json"));
        }
        c.arg("-D")
            .arg(data.join("d"))
            .args(["-p", port, "-c", "listen_addresses=127.0.0.1", "-k"])
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
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
    let mut first = start(0, false);
    wait_ready();
    pgbench(&["-i", "-s", "10"]);
    stop();
    let _ = first.wait();
    let tps = |variant: usize| {
        let mut s = start(variant, false);
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
    let mut t: Vec<Vec<f64>> = vec![Vec::new(); 3];
    for _ in 0..3 {
        for (v, slot) in t.iter_mut().enumerate() {
            slot.push(tps(v));
        }
    }
    let mut variants = Vec::new();
    for v in 1..3 {
        let _ = std::fs::remove_dir_all(&reports);
        std::fs::create_dir_all(&reports).ok()?;
        sh(Command::new("chown").arg("postgres").arg(&reports));
        let mut s = start(v, true);
        wait_ready();
        pgbench(&["-S", "-c", "4", "-j", "2", "-T", "2"]);
        stop();
        let _ = s.wait();
        let ratios = t[v].iter().zip(&t[0]).map(|(x, p)| x / p).collect();
        variants.push((
            if v == 1 {
                "tiexec, cache set up"
            } else {
                "tiexec, THP only, no setup"
            },
            ratios,
            coverage_from_reports(&reports, &["bin/postgres"]),
        ));
    }
    let _ = std::fs::remove_dir_all(&data);
    let row = RealRow {
        real: Real {
            name: "PostgreSQL 15 server, pgbench -S, 4 clients, 10 s (throughput, tiexec / plain)"
                .into(),
            text_mib: text_mib(&bin.join("postgres")),
            objects: vec!["bin/postgres"],
            program: vec![],
            prepare: None,
            rounds: 3,
        },
        plain_seconds: median(&mut t[0].clone()),
        variants,
    };
    eprintln!("postgres done");
    Some(row)
}

/// A fresh copy of `exe` in `dir` (a new inode, small page-cache folios,
/// no history anywhere): what a user who just installed it has.
fn fresh_copy(exe: &Path, dir: &Path, name: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let copy = dir.join(name);
    let _ = std::fs::remove_file(&copy);
    std::fs::copy(exe, &copy).unwrap();
    fixture::rewrite_in_small_pages(&copy);
    settle(&copy);
    copy
}

/// Waits until `path` last changed longer ago than the image cache's
/// settling time (`SETTLE_NS`): until then it shares no image of the file
/// (its timestamps could not tell a second change in the same tick), and a
/// benchmark of a file written a moment ago would measure private copies
/// where an installed program gets the shared image.
fn settle(path: &Path) {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).unwrap();
    let changed_ns = |s: i64, ns: i64| (s.max(0) as u64) * 1_000_000_000 + ns.max(0) as u64;
    let changed = changed_ns(meta.mtime(), meta.mtime_nsec())
        .max(changed_ns(meta.ctime(), meta.ctime_nsec()));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let ready = changed + tiexec::internal::cache::SETTLE_NS + 100_000_000;
    if ready > now {
        std::thread::sleep(std::time::Duration::from_nanos(ready - now));
    }
}

/// A state directory (run history) of its own, empty.
fn fresh_state(dir: &Path, name: &str) -> PathBuf {
    let s = dir.join(name);
    let _ = std::fs::remove_dir_all(&s);
    std::fs::create_dir_all(&s).unwrap();
    s
}

/// Wall time of `tiexec FLAGS PROGRAM ARGS` with the state at `state` and
/// the cache at `cache` (`off` for none).
fn time_wrapped(
    tiexec: &Path,
    flags: &[&str],
    program: &Path,
    args: &[String],
    state: &Path,
    cache: &str,
) -> f64 {
    let argv: Vec<String> = flags
        .iter()
        .map(|f| f.to_string())
        .chain([program.display().to_string()])
        .chain(args.iter().cloned())
        .collect();
    time_run(
        tiexec,
        &argv,
        &[
            ("XDG_CACHE_HOME", state.display().to_string()),
            ("TIEXEC_CACHE", cache.to_string()),
        ],
    )
}

/// The arms the program's recorded runs took, oldest first (`c` copied,
/// `p` plain).
fn arms(state: &Path, program: &Path) -> String {
    let Ok(dir) = tiexec::internal::state::StateDir::open(&state.join("tiexec")) else {
        return "?".into();
    };
    let canon = std::fs::canonicalize(program).unwrap();
    dir.history(canon.to_str().unwrap(), |_| true, 0)
        .runs()
        .iter()
        .map(|r| char::from(r.arm.letter()))
        .collect()
}

/// Huge-page coverage (percent) of the biggest object of process `pid`.
fn coverage_of(pid: u32) -> f64 {
    tiexec::internal::inspect::process_objects(pid, 2 * MIB)
        .unwrap_or_default()
        .into_iter()
        .max_by_key(|o| o.text_bytes())
        .map_or(0.0, |o| o.percent_huge())
}

/// The default policy (`auto`, no options) against `-b thp` and a peer's
/// preload (intel/iodlr's `liblppreload.so`, when `TIEXEC_BENCH_IODLR`
/// names one: it is not built here), on what the policy must get right.
fn default_policy(dir: &Path, tiexec: &Path, cache: &Cache) -> String {
    let dir = dir.join("default-policy");
    let iodlr = std::env::var_os("TIEXEC_BENCH_IODLR").map(PathBuf::from);
    let mut md = String::new();

    // 1. A 64 MiB PIE running ~0.6 s, fresh: 7 rounds, in turn.
    let (pie, _) = build_synthetic(&dir, 64);
    let prog = fresh_copy(&pie, &dir, "prog64");
    let probe = time_run(&prog, &["5000000".into(), "16384".into()], &[]);
    let calls = ((5_000_000.0 * 0.6 / probe) as u64).max(1_000_000);
    let args = vec![calls.to_string(), "16384".to_string()];
    let default_state = fresh_state(&dir, "state-default");
    let thp_state = fresh_state(&dir, "state-thp");
    let rounds = 7;
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); 4];
    for _ in 0..rounds {
        times[0].push(time_run(&prog, &args, &[]));
        times[1].push(time_wrapped(
            tiexec,
            &[],
            &prog,
            &args,
            &default_state,
            "off",
        ));
        times[2].push(time_wrapped(
            tiexec,
            &["-b", "thp"],
            &prog,
            &args,
            &thp_state,
            "off",
        ));
        if let Some(lib) = &iodlr {
            times[3].push(time_run(
                &prog,
                &args,
                &[("LD_PRELOAD", lib.display().to_string())],
            ));
        }
    }
    let ratio = |t: &[f64]| -> (f64, f64, f64) {
        let mut r: Vec<f64> = t.iter().zip(&times[0]).map(|(v, p)| v / p).collect();
        let lo = r.iter().cloned().fold(f64::MAX, f64::min);
        let hi = r.iter().cloned().fold(f64::MIN, f64::max);
        (median(&mut r), lo, hi)
    };
    let _ = writeln!(
        md,
        "A PIE with 64 MiB of text, all of it in use, running {:.2} s plain; a fresh copy (no history, no setup), {rounds} rounds in turn, the first run of each variant included. Time ratio to plain (below 1: faster), median [min-max]:\n",
        median(&mut times[0].clone())
    );
    let _ = writeln!(md, "| variant | time ratio | what each run did |");
    let _ = writeln!(md, "|---|---|---|");
    let (m, lo, hi) = ratio(&times[1]);
    let _ = writeln!(
        md,
        "| `tiexec PROGRAM` (default) | {m:.3} [{lo:.3}-{hi:.3}] | {} (c: copied, p: 4 KiB pages) |",
        arms(&default_state, &prog)
    );
    let (m, lo, hi) = ratio(&times[2]);
    let _ = writeln!(
        md,
        "| `tiexec -b thp PROGRAM` | {m:.3} [{lo:.3}-{hi:.3}] | copied every run |"
    );
    if iodlr.is_some() {
        let (m, lo, hi) = ratio(&times[3]);
        let _ = writeln!(
            md,
            "| iodlr `liblppreload.so` | {m:.3} [{lo:.3}-{hi:.3}] | copied every run |"
        );
    } else {
        let _ = writeln!(
            md,
            "| iodlr `liblppreload.so` | not measured (set TIEXEC_BENCH_IODLR) | |"
        );
    }
    eprintln!("default policy, 64 MiB: {md}");

    // 2. A 256 MiB program whose runs touch one 16 MiB part of its text.
    let spec = fixture::Spec::new("fixture-pie-256m", 256, true);
    let big = fresh_copy(
        &fixture::build(spec, &dir.join("fixtures")),
        &dir,
        "prog256",
    );
    let region = [("FIXTURE_REGION", "24576:4096".to_string())];
    let state = fresh_state(&dir, "state-256");
    let big_args = vec!["4000000".to_string(), "run".to_string()];
    let run_big = |wait: bool| {
        let mut cmd = Command::new(tiexec);
        cmd.arg(&big)
            .args(["4000000", if wait { "wait" } else { "run" }])
            .envs(region.iter().cloned())
            .env("XDG_CACHE_HOME", &state)
            .env("TIEXEC_CACHE", "off")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        cmd.spawn().unwrap()
    };
    for _ in 0..2 {
        let _ = run_big(false).wait();
    }
    let mut child = run_big(true);
    {
        use std::io::BufRead;
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut l = String::new();
        let _ = out.read_line(&mut l);
        let _ = out.read_line(&mut l);
    }
    let pid = child.id();
    let objs = tiexec::internal::inspect::process_objects(pid, 2 * MIB).unwrap_or_default();
    let held: u64 = tiexec::internal::smaps::read(Some(pid))
        .unwrap_or_default()
        .iter()
        .map(|v| v.anon_huge)
        .sum();
    let huge: u64 = objs.iter().map(|o| o.coverage.huge()).sum();
    drop(child.stdin.take());
    let _ = child.wait();
    let mut plain_t = Vec::new();
    let mut ours_t = Vec::new();
    for _ in 0..5 {
        let mut c = Command::new(&big);
        c.args(&big_args).envs(region.iter().cloned());
        let t = Instant::now();
        let _ = c.stdout(Stdio::null()).status();
        plain_t.push(t.elapsed().as_secs_f64());
        let mut w = Command::new(tiexec);
        w.arg(&big)
            .args(&big_args)
            .envs(region.iter().cloned())
            .env("XDG_CACHE_HOME", &state)
            .env("TIEXEC_CACHE", "off");
        let t = Instant::now();
        let _ = w.stdout(Stdio::null()).stderr(Stdio::null()).status();
        ours_t.push(t.elapsed().as_secs_f64());
    }
    let mut r: Vec<f64> = ours_t.iter().zip(&plain_t).map(|(o, p)| o / p).collect();
    let _ = writeln!(
        md,
        "\nA PIE with 256 MiB of text whose runs call only 16 MiB of it (one contiguous part), started with the default settings: after two runs (the first copies everything, the second runs on 4 KiB pages and records what it touches), the third holds {} MiB of its text on huge pages, with {} MiB of private huge pages in all; then 5 rounds in turn with plain: time ratio {:.3} (runs: {}).\n",
        huge >> 20,
        held >> 20,
        median(&mut r),
        arms(&state, &big)
    );

    // 3. A server's first start, and its restart after kill -9.
    let server = fresh_copy(&pie, &dir, "server64");
    let mut rows = String::new();
    for (label, cache_dir) in [
        ("no setup", "off".to_string()),
        ("cache set up", cache.path.display().to_string()),
    ] {
        let state = fresh_state(&dir, &format!("state-server-{}", cache_dir.len()));
        let mut seen = Vec::new();
        for _ in 0..2 {
            let mut c = Command::new(tiexec)
                .arg(&server)
                .args(["1000", "16384", "wait"])
                .env("XDG_CACHE_HOME", &state)
                .env("TIEXEC_CACHE", &cache_dir)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            {
                use std::io::BufRead;
                let mut out = std::io::BufReader::new(c.stdout.take().unwrap());
                let mut l = String::new();
                let _ = out.read_line(&mut l);
                let _ = out.read_line(&mut l);
            }
            seen.push(coverage_of(c.id()));
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = writeln!(rows, "| {label} | {:.1} % | {:.1} % |", seen[0], seen[1]);
    }
    let _ = writeln!(md, "A 64 MiB server (the same PIE, waiting), started with the default settings, then killed with SIGKILL and started again:\n");
    let _ = writeln!(
        md,
        "| machine | text on 2 MiB pages, first start | after `kill -9`, restart |"
    );
    let _ = writeln!(md, "|---|---|---|");
    md.push_str(&rows);
    md
}

/// Huge pages held by six concurrent processes of one 64 MiB program: with
/// the cache (one image, shared), and with private THP copies.
fn sharing(dir: &Path, lib: &Path, cache: &Cache) -> String {
    let spec = fixture::Spec::new("share-nopie-64m", 64, false);
    let exe = fixture::build(spec, &dir.join("fixtures"));
    settle(&exe);
    let held = |env: &[(&str, String)]| -> (u64, u64) {
        let before_cache = cache.used_pages();
        let mut children = Vec::new();
        for _ in 0..6 {
            let mut c = Command::new(&exe);
            c.args(["1000", "wait"])
                .env("LD_PRELOAD", lib)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null());
            for (k, v) in env {
                c.env(k, v);
            }
            let mut child = c.spawn().unwrap();
            let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
            let mut l = String::new();
            use std::io::BufRead;
            let _ = out.read_line(&mut l);
            let _ = out.read_line(&mut l);
            children.push(child);
        }
        let private: u64 = children
            .iter()
            .map(|c| {
                tiexec::internal::smaps::read(Some(c.id()))
                    .unwrap_or_default()
                    .iter()
                    .filter(|v| !tiexec::internal::cache::is_image_path(&v.path))
                    .map(|v| v.anon_huge + v.private_hugetlb)
                    .sum::<u64>()
            })
            .sum();
        let shared = cache.used_pages().saturating_sub(before_cache) * 2 * MIB;
        for mut c in children {
            drop(c.stdin.take());
            let _ = c.wait();
        }
        (private, shared)
    };
    let cache_dir = cache.path.display().to_string();
    let (p1, s1) = held(&[("TIEXEC_CACHE", cache_dir.clone())]);
    let (p2, s2) = held(&[
        ("TIEXEC_BACKEND", "thp".to_string()),
        ("TIEXEC_CACHE", "off".to_string()),
    ]);
    let mut md = String::new();
    let _ = writeln!(
        md,
        "| six processes of a 64 MiB program (non-PIE) | huge pages held | times one copy |"
    );
    let _ = writeln!(md, "|---|---|---|");
    for (name, bytes) in [
        ("tiexec, cache set up (one shared image)", p1 + s1),
        ("tiexec, THP (private copies)", p2 + s2),
    ] {
        let _ = writeln!(
            md,
            "| {name} | {} | {:.2} |",
            tiexec::internal::log::Bytes(bytes),
            bytes as f64 / (64 * MIB) as f64
        );
    }
    md
}

/// Coverage of a 64 MiB program run with memory-deny-write-execute.
fn mdwe(dir: &Path, lib: &Path, cache: &Cache) -> String {
    let hostile = fixture::build_hostile(&dir.join("fixtures"));
    let mut md = String::new();
    let _ = writeln!(
        md,
        "| program under PR_SET_MDWE | backend | text on 2 MiB pages |"
    );
    let _ = writeln!(md, "|---|---|---|");
    for (spec, backend) in [
        (fixture::Spec::new("mdwe-nopie-64m", 64, false), "auto"),
        (fixture::Spec::new("mdwe-pie-64m", 64, true), "auto"),
        (fixture::Spec::new("mdwe-pie-64m", 64, true), "cache"),
        (fixture::Spec::new("mdwe-pie-64m", 64, true), "thp"),
    ] {
        let exe = fixture::build(spec, &dir.join("fixtures"));
        settle(&exe);
        let mut c = Command::new(&hostile);
        c.arg("mdwe")
            .arg(&exe)
            .args(["1000", "wait"])
            .env("LD_PRELOAD", lib)
            .env("TIEXEC_CACHE", &cache.path)
            .env("TIEXEC_BACKEND", backend)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = c.spawn().unwrap();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut l = String::new();
        use std::io::BufRead;
        let _ = out.read_line(&mut l);
        let _ = out.read_line(&mut l);
        let objs =
            tiexec::internal::inspect::process_objects(child.id(), 2 * MIB).unwrap_or_default();
        drop(child.stdin.take());
        let _ = child.wait();
        let pct = objs
            .iter()
            .max_by_key(|o| o.text_bytes())
            .map_or(0.0, |o| o.percent_huge());
        let _ = writeln!(
            md,
            "| 64 MiB, {} | {backend} | {pct:.1} % |",
            if spec.pie { "PIE" } else { "non-PIE" }
        );
    }
    md
}

/// The wrapper's own cost: `tiexec /bin/true` against `/bin/true`, and
/// against a minimal C program that only execs its arguments (what any exec
/// wrapper costs), spawned in turn; medians.
fn wrapper_cost(tiexec: &Path, state: &Path, dir: &Path) -> String {
    let exec_only = dir.join("exec-only");
    let src = dir.join("exec-only.c");
    std::fs::write(
        &src,
        "#include <unistd.h>\nint main(int c, char **v) { execv(v[1], v + 1); return 127; }\n",
    )
    .expect("write exec-only.c");
    sh(Command::new("cc")
        .args(["-O2", "-o"])
        .arg(&exec_only)
        .arg(&src));
    let spawn = |how: usize| {
        let mut c = match how {
            0 => Command::new("/bin/true"),
            1 => {
                let mut c = Command::new(&exec_only);
                c.arg("/bin/true");
                c
            }
            _ => {
                let mut c = Command::new(tiexec);
                c.arg("/bin/true");
                c
            }
        };
        c.env("XDG_CACHE_HOME", state)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let t = Instant::now();
        let st = c.status().expect("spawn");
        assert!(st.success());
        t.elapsed().as_secs_f64() * 1e3
    };
    let mut times: [Vec<f64>; 3] = Default::default();
    spawn(2);
    for _ in 0..500 {
        for (how, t) in times.iter_mut().enumerate() {
            t.push(spawn(how));
        }
    }
    let [plain, exec_only, wrapped] = times.map(|mut t| median(&mut t));
    format!(
        "| /bin/true | {plain:.3} ms | {exec_only:.3} ms (+{:.3} ms) | {wrapped:.3} ms (+{:.3} ms) |\n",
        exec_only - plain,
        wrapped - plain
    )
}

fn svg(rows: &[Measured]) -> String {
    // Grouped bars: one group per synthetic workload, one bar per variant,
    // the median speedup against plain 4 KiB text; whiskers min-max.
    let colors = ["#888888", "#9467bd", "#1f77b4", "#ff7f0e", "#2ca02c"];
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
                colors[i % colors.len()]
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
                colors[i % colors.len()],
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
    let old_pool = std::fs::read_to_string(pool()).unwrap_or_default();
    let sizes: &[u64] = if quick { &[16, 64] } else { &[16, 64, 256] };
    // The pool: the cache's pages (reserved by its mount) plus room for the
    // hugetlb variant's private copies.
    let cache_pages = 256;
    let pool_ok = set_pool(cache_pages + sizes.iter().max().unwrap() / 2 + 8);
    assert!(pool_ok, "the report needs root, to size the hugetlb pool");
    let cache = Cache::mount(&dir, cache_pages);
    let state = dir.join("wrapper-state");
    std::fs::create_dir_all(&state).unwrap();

    let default_md = default_policy(&dir, &tiexec, &cache);
    if std::env::var_os("TIEXEC_BENCH_ONLY_DEFAULT").is_some() {
        // Only the default policy's section, printed; the report stays.
        println!("{default_md}");
        drop(cache);
        let _ = std::fs::write(pool(), old_pool);
        return;
    }
    if std::env::var_os("TIEXEC_BENCH_ONLY_SYNTHETIC").is_some() {
        // Only the synthetic workloads' table, printed; the report stays.
        let synthetic = synthetic_workloads(&dir, &lib, &cache, sizes, quick);
        println!("{}", synthetic_table(&synthetic));
        drop(cache);
        let _ = std::fs::write(pool(), old_pool);
        return;
    }
    let real = real_workloads(&dir, &tiexec, &cache, quick);
    let pg = if quick {
        None
    } else {
        postgres(&dir, &tiexec, &cache)
    };
    let wrapper_md = wrapper_cost(&tiexec, &state, &dir);
    let sharing_md = sharing(&dir, &lib, &cache);
    let mdwe_md = mdwe(&dir, &lib, &cache);

    let synthetic = synthetic_workloads(&dir, &lib, &cache, sizes, quick);
    let startup_md = startup(
        &dir,
        &lib,
        &cache.path,
        &tiexec,
        if quick { &[8, 64] } else { &[8, 64, 256] },
    );
    drop(cache);
    let _ = std::fs::write(pool(), old_pool);

    let mut md = String::new();
    let _ = writeln!(md, "# tiexec benchmark report\n");
    let _ = writeln!(md, "Regenerate: `cargo bench --bench report` (as root; it sizes the hugetlb pool, mounts an image cache of its own, and puts both back).\n");
    let _ = writeln!(md, "Machine: {}.\n", machine());
    let _ = writeln!(md, "Every workload runs with each variant in turn, round after round (after one warm-up round), in one run; the ratio is plain time / variant time per round (above 1: faster; for PostgreSQL, throughput / plain throughput), given as median [min-max]. Coverage is the share of the text on 2 MiB pages, read from smaps in each process (its JSON report) or while it runs.\n");
    let _ = writeln!(md, "## The default policy\n");
    let _ = writeln!(md, "What a user gets with no options: `tiexec PROGRAM` copies on the first run of a program named to it, then its run history decides (see README, *Where the huge pages come from*).\n");
    md.push_str(&default_md);
    let _ = writeln!(md, "\n## Real programs\n");
    let _ = writeln!(md, "Under the wrapper (`tiexec COMMAND`), so every process the command starts is covered. *cache set up*: `tiexec --setup` done (here: a hugetlbfs of {cache_pages} pages mounted for the report), images built in the warm-up round. *THP only, no setup*: no cache, no pool (a developer's laptop); private THP copies only where the program's past runs show they pay off (the warm-up round is its first run). Compilers are timed end to end.\n");
    let _ = writeln!(
        md,
        "| workload | text | plain | variant | speedup median [min-max] | rounds | coverage of the big objects |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|");
    for row in real.iter().chain(pg.iter()) {
        for (label, ratios, cov) in &row.variants {
            let mut r = ratios.clone();
            let lo = r.iter().cloned().fold(f64::MAX, f64::min);
            let hi = r.iter().cloned().fold(f64::MIN, f64::max);
            let plain = if row.real.program.is_empty() {
                format!("{:.0} tps", row.plain_seconds)
            } else {
                format!("{:.3} s", row.plain_seconds)
            };
            let _ = writeln!(
                md,
                "| {} | {:.0} MiB | {plain} | {label} | {:.3} [{lo:.3}-{hi:.3}] | {} | {cov} |",
                row.real.name,
                row.real.text_mib,
                median(&mut r),
                ratios.len()
            );
        }
    }
    let _ = writeln!(md, "\n## The wrapper's own cost\n");
    let _ = writeln!(md, "`tiexec /bin/true` against `/bin/true`, and against a minimal C program that only execs its arguments (the floor of any exec wrapper), 500 spawns each, in turn (medians). tiexec's share is what it adds beyond that floor: a dynamically linked Rust program's start, reading the program's headers, and the stub in the program.\n");
    let _ = writeln!(
        md,
        "| program | plain | under a C exec-only wrapper | under tiexec |"
    );
    let _ = writeln!(md, "|---|---|---|---|");
    md.push_str(&wrapper_md);
    let _ = writeln!(md, "\n## Memory: concurrent processes of one program\n");
    let _ = writeln!(md, "Huge pages held while six processes of one 64 MiB program run (private: smaps of each; shared: pages the cache's files hold).\n");
    md.push_str(&sharing_md);
    let _ = writeln!(md, "\n## Memory-deny-write-execute\n");
    let _ = writeln!(md, "Programs run with `PR_SET_MDWE` (systemd's `MemoryDenyWriteExecute=yes`): images are mapped executable from the start and the swap routine runs from tiexec's own text; private THP copies (written, then made executable) cannot work there and are not tried.\n");
    md.push_str(&mdwe_md);
    let _ = writeln!(md, "\n## Synthetic iTLB workloads\n");
    let _ = writeln!(md, "One small function per 4 KiB page, called in pseudo-random order across a working set spread over the whole text (one cache line per page, so caches hold the working set long before the TLB does). The program is a PIE (random load address: its cache image is private, as for a copy); `kernel (page cache)` is the same program linked with 2 MiB alignment and its page cache primed. {} rounds.\n", rounds());
    let _ = writeln!(md, "![speedup](speedup.svg)\n");
    md.push_str(&synthetic_table(&synthetic));
    let _ = writeln!(md, "## Start-up cost and private memory\n");
    let _ = writeln!(md, "Time from exec to exit of the same program making no calls (median), against one memcpy of the text's size in the benchmark's own process. `tiexec cache` maps the program's image, found in the cache (the 2 MiB-aligned build: a stable address); private memory is what smaps shows as private hugetlb or anonymous huge pages while it runs (an image's pages are shared, held once per machine).\n");
    md.push_str(&startup_md);
    let results = root.join("benches/results");
    std::fs::create_dir_all(&results).unwrap();
    std::fs::write(results.join("REPORT.md"), md).unwrap();
    std::fs::write(results.join("speedup.svg"), svg(&synthetic)).unwrap();
    eprintln!("wrote {}", results.join("REPORT.md").display());
}
