//! Programs that once behaved differently under tiexec, and the classes they
//! stand for: symbolizers that name the program by a mapping, sanitizer
//! runtimes that must come first, programs that reserve the hugetlb pool,
//! code that patches its own text, threads with small stacks under
//! `--dlopen`, libraries with text relocations, cache directories on
//! `noexec` mounts, the user's own audit modules, tools like valgrind. Each
//! test compares output and exit status with and without tiexec.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use common::{CacheMount, PoolGuard, NON_PIE, PIE};

const T: Duration = Duration::from_secs(180);

fn once<R>(lock: &'static Mutex<()>, f: impl FnOnce() -> R) -> R {
    let _one = lock.lock().unwrap_or_else(|e| e.into_inner());
    f()
}

fn fixtures() -> PathBuf {
    common::scratch_dir().join("fixtures")
}

/// Output and status, the way a user compares them: tiexec's own lines
/// taken out of stderr, and the thread ID Rust prints in a panic message
/// (another process, another ID).
fn seen(o: &common::Outcome) -> (Option<i32>, String, String) {
    let stderr: Vec<String> = o
        .stderr
        .lines()
        .filter(|l| !l.starts_with("tiexec:"))
        .map(|l| match (l.find("thread '"), l.find("' (")) {
            (Some(0), Some(i)) => {
                let rest = &l[i + 3..];
                let close = rest.find(')').map_or(0, |c| c + 1);
                format!("{}'{}", &l[..i], &rest[close..])
            }
            _ => l.to_string(),
        })
        .collect();
    (o.status.code(), o.stdout.clone(), stderr.join("\n"))
}

/// The frame names of a Rust backtrace, in order.
fn frames(stderr: &str) -> Vec<String> {
    stderr
        .lines()
        .filter_map(|l| {
            let l = l.trim_start();
            let (n, rest) = l.split_once(": ")?;
            n.parse::<u32>().ok()?;
            // `full` prints "N: 0xADDR - name"
            Some(rest.rsplit(" - ").next().unwrap_or(rest).to_string())
        })
        .collect()
}

#[test]
fn rust_panic_backtraces_name_every_frame_as_without_tiexec() {
    // Rust's symbolizer takes the program's file from the mapping at its
    // load address: that 2 MiB page must keep its name (or have none).
    static BUILD: Mutex<()> = Mutex::new(());
    let exe = once(&BUILD, || common::fixture::build_rust_panicker(&fixtures()));
    let Some(cache) = CacheMount::new("backtrace", 32, 96) else {
        return;
    };
    for mode in ["1", "full"] {
        let mut plain = Command::new(&exe);
        common::isolate(&mut plain).env("RUST_BACKTRACE", mode);
        let plain = common::run(&mut plain, T);
        let plain_frames = frames(&plain.stderr);
        plain.check(
            plain_frames.iter().any(|f| f.contains("::third")),
            "the plain backtrace names its frames",
        );
        for backend in ["hugetlb", "cache", "thp"] {
            let mut cmd = common::preloaded(
                &exe,
                &[
                    ("TIEXEC_BACKEND", backend),
                    ("TIEXEC_LOG", "info"),
                    ("RUST_BACKTRACE", mode),
                ],
            );
            cmd.env("TIEXEC_CACHE", &cache.path);
            let o = common::run(&mut cmd, T);
            o.check(
                o.stderr.contains("panicker") && o.stderr.contains(" via "),
                &format!("{backend}: the text was moved"),
            );
            if mode == "1" {
                o.check(
                    seen(&o) == seen(&plain),
                    &format!("{backend}: backtrace differs\nplain: {plain}"),
                );
            } else {
                // Addresses differ from run to run; the names may not.
                o.check(
                    frames(&o.stderr) == plain_frames,
                    &format!("{backend}: frames differ\nplain: {plain}"),
                );
            }
        }
    }
}

/// A C program built with a sanitizer, printing a line.
fn sanitized(kind: &str) -> Option<PathBuf> {
    static BUILD: Mutex<()> = Mutex::new(());
    once(&BUILD, || {
        let dir = fixtures();
        std::fs::create_dir_all(&dir).unwrap();
        let exe = dir.join(format!("sanitized-{kind}"));
        if exe.exists() {
            return Some(exe);
        }
        let src = dir.join("sanitized.c");
        std::fs::write(
            &src,
            "#include <stdio.h>\n#include <stdlib.h>\nint main(int c, char **v) {\n\
             char *p = malloc(16); snprintf(p, 16, \"%d args\", c); puts(p); free(p);\n\
             return c > 2 ? atoi(v[2]) : 0; }\n",
        )
        .unwrap();
        let tmp = dir.join(format!("sanitized-{kind}.tmp{}", std::process::id()));
        let o = Command::new("gcc")
            .arg(format!("-fsanitize={kind}"))
            .arg(&src)
            .arg("-o")
            .arg(&tmp)
            .output()
            .ok()?;
        if !o.status.success() {
            // A sanitizer gcc cannot build for is a test not run: a
            // visible skip, and a failure under TIEXEC_TEST_STRICT.
            common::skip(format_args!(
                "gcc cannot build with -fsanitize={kind}: {}",
                String::from_utf8_lossy(&o.stderr)
            ));
            return None;
        }
        std::fs::rename(&tmp, &exe).unwrap();
        Some(exe)
    })
}

#[test]
fn sanitized_programs_run_the_same_directly_and_as_children() {
    for kind in ["address", "thread", "undefined", "leak"] {
        let Some(exe) = sanitized(kind) else {
            continue;
        };
        let plain = common::run(common::isolate(&mut Command::new(&exe)).args(["x", "3"]), T);
        let direct = common::run(common::tiexec_cmd().arg(&exe).args(["x", "3"]), T);
        direct.check(
            seen(&direct) == seen(&plain),
            &format!("{kind}: run directly\nplain: {plain}"),
        );
        // As a child of a program run under tiexec, inheriting its preload.
        let script = format!("{} x 3", exe.display());
        let child = common::run(common::tiexec_cmd().args(["sh", "-c", &script]), T);
        child.check(
            seen(&child) == seen(&plain),
            &format!("{kind}: as a child\nplain: {plain}"),
        );
    }
}

#[test]
fn a_program_that_reserves_the_pool_for_itself_still_starts() {
    // Like PostgreSQL with huge_pages=on and a pool sized for its shared
    // memory: the program maps every free page of the pool. tiexec's auto
    // leaves the pool to it, with a cache set up (its own pages) or not.
    let exe = common::fixture(PIE);
    let Some(_pool) = PoolGuard::set(24) else {
        return;
    };
    let plain = common::run(
        common::isolate(&mut Command::new(&exe)).args(["2000", "hog", "24"]),
        T,
    );
    plain.check(plain.status.success(), "the program gets its pages plainly");
    // Known to run long, so that auto would copy if it could.
    let mut cmd = common::tiexec_cmd();
    cmd.args(["-v", "--no-prime"])
        .arg(&exe)
        .args(["2000", "hog", "24"]);
    common::remember_runs(&cmd, &exe, &[3_600_000]);
    let o = common::run(&mut cmd, T);
    o.check(seen(&o) == seen(&plain), &format!("plain: {plain}"));
    o.check(o.stderr.contains("via thp"), "its text went to THP instead");
    drop(_pool);

    // With a cache (pages of its own) and the program's pages on top.
    let Some(cache) = CacheMount::new("hog", 32, 32 + 24) else {
        return;
    };
    let mut cmd = common::tiexec_cmd();
    cmd.args(["-v", "--no-prime", "--cache-dir"])
        .arg(&cache.path)
        .arg(&exe)
        .args(["2000", "hog", "24"]);
    common::remember_runs(&cmd, &exe, &[3_600_000]);
    let o = common::run(&mut cmd, T);
    o.check(seen(&o) == seen(&plain), &format!("plain: {plain}"));
}

#[test]
fn code_that_patches_its_own_text_works_on_every_backend() {
    // mprotect(RWX) of one 4 KiB page in the moved text, a write, r-x
    // again: hooking and mocking libraries do this.
    let Some(cache) = CacheMount::new("patch", 32, 96) else {
        return;
    };
    let pie = common::fixture(PIE);
    // A program whose images are shared (fixed address, small page cache).
    let shared = common::fresh_copy(
        &common::fixture(NON_PIE),
        &common::scratch_dir().join(format!("patch-{}", std::process::id())),
    );
    common::settle(&shared);
    for (exe, backend) in [
        (&pie, "hugetlb"),
        (&pie, "thp"),
        (&pie, "cache"),
        (&shared, "cache"),
    ] {
        let plain = common::run(
            common::isolate(&mut Command::new(exe)).args(["1000", "patch"]),
            T,
        );
        plain.check(
            plain.status.success() && plain.stdout.contains("patched"),
            "patches itself plainly",
        );
        let mut cmd =
            common::preloaded(exe, &[("TIEXEC_BACKEND", backend), ("TIEXEC_LOG", "info")]);
        cmd.env("TIEXEC_CACHE", &cache.path).args(["1000", "patch"]);
        let o = common::run(&mut cmd, T);
        o.check(o.stderr.contains(" via "), &format!("{backend}: moved"));
        o.check(
            seen(&o) == seen(&plain),
            &format!("{backend}: patching works as without tiexec\nplain: {plain}"),
        );
    }
    // A shared image is never written through: the next process maps the
    // image as it was built, and runs the original function.
    let mut cmd = common::preloaded(&shared, &[("TIEXEC_LOG", "info")]);
    cmd.env("TIEXEC_CACHE", &cache.path).args(["1000", "run"]);
    let o = common::run(&mut cmd, T);
    let plain = common::run(
        common::isolate(&mut Command::new(&shared)).args(["1000", "run"]),
        T,
    );
    o.check(
        o.stderr.contains("cache (hit)") && o.stdout == plain.stdout,
        "the image is as built",
    );
}

/// A C program that starts threads with small stacks, and one that needs
/// no TLS beyond libc's: under `--dlopen`, the TLS surplus tiexec asks for
/// (none here) must not take their stacks.
#[test]
fn threads_with_small_stacks_start_under_dlopen() {
    static BUILD: Mutex<()> = Mutex::new(());
    let exe = once(&BUILD, || {
        let dir = fixtures();
        std::fs::create_dir_all(&dir).unwrap();
        let src = dir.join("small-stacks.c");
        let source = r#"
#include <pthread.h>
#include <stdio.h>
static void *work(void *p) { return p; }
int main(void) {
    for (size_t kib = 16; kib <= 64; kib *= 2) {
        pthread_attr_t a; pthread_attr_init(&a);
        int r = pthread_attr_setstacksize(&a, kib << 10);
        pthread_t t;
        if (!r) r = pthread_create(&t, &a, work, 0);
        if (!r) pthread_join(t, 0);
        printf("%zu KiB stack: %s\n", kib, r ? "failed" : "ok");
    }
    return 0;
}
"#;
        let exe = dir.join(format!(
            "small-stacks-{:016x}",
            common::fixture_digest(source)
        ));
        if !exe.exists() {
            std::fs::write(&src, source).unwrap();
            let o = Command::new("gcc")
                .args(["-O2", "-pthread"])
                .arg(&src)
                .arg("-o")
                .arg(&exe)
                .output()
                .unwrap();
            assert!(o.status.success(), "{o:?}");
        }
        exe
    });
    let plain = common::run(common::isolate(&mut Command::new(&exe)), T);
    plain.check(!plain.stdout.contains("failed"), "plain threads start");
    let o = common::run(common::tiexec_cmd().arg("--dlopen").arg(&exe), T);
    o.check(seen(&o) == seen(&plain), &format!("plain: {plain}"));

    // Python's threading.stack_size(65536).
    let py = "import threading\nthreading.stack_size(65536)\n\
              t = threading.Thread(target=lambda: print('thread ran'))\nt.start(); t.join()\n";
    let plain = common::run(
        common::isolate(&mut Command::new("/usr/bin/python3")).args(["-c", py]),
        T,
    );
    let o = common::run(
        common::tiexec_cmd().args(["--dlopen", "/usr/bin/python3", "-c", py]),
        T,
    );
    o.check(seen(&o) == seen(&plain), &format!("python\nplain: {plain}"));

    // Children start as without tiexec: no audit module, no tunable.
    let env = common::run(
        common::tiexec_cmd().args(["--dlopen", "sh", "-c", "env"]),
        T,
    );
    env.check(
        !env.stdout.contains("LD_AUDIT") && !env.stdout.contains("glibc.rtld.optional_static_tls"),
        "children see neither",
    );
    let env = common::run(
        common::tiexec_cmd().args(["--dlopen", "--no-children", "sh", "-c", "env"]),
        T,
    );
    env.check(
        !env.stdout.contains("LD_AUDIT")
            && !env.stdout.contains("LD_PRELOAD")
            && !env.stdout.contains("glibc.rtld.optional_static_tls"),
        "nor with --no-children",
    );
}

#[test]
fn java_starts_a_subprocess_under_dlopen() {
    if Command::new("java").arg("-version").output().is_err() {
        common::skip("no java");
        return;
    }
    // `jshell` is heavy; a one-file program run by the java launcher starts
    // a process (its reaper thread has a small stack) and prints its output.
    let dir = common::scratch_dir().join(format!("java-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("Sub.java");
    std::fs::write(
        &src,
        "public class Sub { public static void main(String[] a) throws Exception {\n\
         Process p = new ProcessBuilder(\"echo\", \"from child\").inheritIO().start();\n\
         System.out.println(\"exit \" + p.waitFor()); } }\n",
    )
    .unwrap();
    let plain = common::run(common::isolate(&mut Command::new("java")).arg(&src), T);
    let o = common::run(common::tiexec_cmd().args(["--dlopen", "java"]).arg(&src), T);
    let _ = std::fs::remove_dir_all(&dir);
    o.check(seen(&o) == seen(&plain), &format!("plain: {plain}"));
}

#[test]
fn a_library_with_text_relocations_loads_under_dlopen() {
    static BUILD: Mutex<()> = Mutex::new(());
    let (host, lib) = once(&BUILD, || {
        let lib = common::fixture::build_textrel_library("textrel", 24, &fixtures());
        let (host, _) = common::dlopen_library_fixture();
        (host, lib)
    });
    let plain = common::run(
        common::isolate(&mut Command::new(&host))
            .args(["20000", "run"])
            .arg(&lib),
        T,
    );
    plain.check(plain.status.success(), "loads plainly");
    let o = common::run(
        common::tiexec_cmd()
            .args(["-v", "--dlopen", "-b", "thp"])
            .arg(&host)
            .args(["20000", "run"])
            .arg(&lib),
        T,
    );
    o.check(seen(&o) == seen(&plain), &format!("plain: {plain}"));
    o.check(
        o.stderr.contains("has text relocations: left alone"),
        "says why it was left alone",
    );
}

/// A tmpfs mounted `noexec` in the scratch directory; unmounted on drop.
struct NoexecDir(PathBuf);

impl NoexecDir {
    fn new(name: &str) -> Option<NoexecDir> {
        let dir = common::scratch_dir().join(format!("{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "noexec,size=16m,mode=1777", "none"])
            .arg(&dir)
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(NoexecDir(dir))
    }
}

impl Drop for NoexecDir {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn a_cache_directory_on_a_noexec_mount_is_passed_over() {
    let Some(noexec) = NoexecDir::new("noexec") else {
        common::skip("cannot mount a tmpfs (not root?)");
        return;
    };
    // The user's cache directory and the temporary directory both noexec:
    // the library goes elsewhere, and no process complains.
    let mut cmd = common::tiexec_cmd();
    cmd.env("XDG_CACHE_HOME", &noexec.0)
        .env("TMPDIR", &noexec.0)
        .args(["-v", "sh", "-c", "echo one; sh -c 'echo two'"]);
    let o = common::run(&mut cmd, T);
    o.check(
        o.status.success() && o.stdout == "one\ntwo\n",
        "runs the same",
    );
    o.check(
        !o.stderr.contains("cannot be preloaded"),
        "the loader never refuses the library",
    );
}

#[test]
fn the_users_own_audit_module_runs_as_often_as_under_any_wrapper() {
    static BUILD: Mutex<()> = Mutex::new(());
    let module = once(&BUILD, || {
        let dir = fixtures();
        std::fs::create_dir_all(&dir).unwrap();
        let source = r#"
#include <link.h>
#include <stdio.h>
#include <unistd.h>
unsigned int la_version(unsigned int v) {
    dprintf(2, "audit module loaded in %d\n", (int)getpid());
    return v;
}
"#;
        let so = dir.join(format!(
            "libcountaudit-{:016x}.so",
            common::fixture_digest(source)
        ));
        if !so.exists() {
            let src = dir.join("countaudit.c");
            std::fs::write(&src, source).unwrap();
            let o = Command::new("gcc")
                .args(["-shared", "-fPIC", "-O2"])
                .arg(&src)
                .arg("-o")
                .arg(&so)
                .output()
                .unwrap();
            assert!(o.status.success(), "{o:?}");
        }
        so
    });
    // Once in each process: the program, and (like under any wrapper that
    // is a program itself, `env` or `nice`) tiexec's own process before the
    // exec. Resolving the program's libraries runs no loader: no third time.
    let count = |o: &common::Outcome| o.stderr.matches("audit module loaded").count();
    let plain = common::run(
        common::isolate(&mut Command::new("env"))
            .env("LD_AUDIT", &module)
            .arg("/bin/true"),
        T,
    );
    let o = common::run(
        common::tiexec_cmd()
            .env("LD_AUDIT", &module)
            .arg("/bin/true"),
        T,
    );
    o.check(o.status.success(), "runs");
    assert_eq!(count(&o), count(&plain), "{o}\nplain: {plain}");
}

#[test]
fn valgrind_runs_are_silent_at_the_default_level() {
    if Command::new("valgrind").arg("--version").output().is_err() {
        common::skip("no valgrind");
        return;
    }
    let exe = common::fixture(PIE);
    let plain = common::run(
        common::isolate(&mut Command::new("valgrind"))
            .args(["-q", "--error-exitcode=9"])
            .arg(&exe)
            .args(["100", "run"]),
        T,
    );
    let mut cmd = common::tiexec_cmd();
    cmd.args(["valgrind", "-q", "--error-exitcode=9"])
        .arg(&exe)
        .args(["100", "run"]);
    // Known to run long: auto tries a copy, which valgrind's address space
    // may refuse; that is no news at the default level.
    common::remember_runs(&cmd, &exe, &[3_600_000]);
    let o = common::run(&mut cmd, T);
    o.check(seen(&o) == seen(&plain), &format!("plain: {plain}"));
    o.check(!o.stderr.contains("tiexec:"), "nothing said");
}
