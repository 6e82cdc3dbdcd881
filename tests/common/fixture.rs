//! Generated fixture programs with big text: one small function per 4 KiB
//! page, called in a pseudo-random order, printing a checksum. Shared by the
//! integration tests and the benchmarks.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The architecture fixtures are built for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    X86_64,
    Aarch64,
}

static TARGET: std::sync::OnceLock<Target> = std::sync::OnceLock::new();

/// Builds this test process's fixtures for `t` instead of the machine's own
/// architecture (a process that prepares programs for another machine).
/// Once per process, before the first fixture; false if already set.
#[allow(dead_code)]
pub fn set_target(t: Target) -> bool {
    TARGET.set(t).is_ok()
}

/// The architecture fixtures are built for: the one set, else this one.
pub fn target() -> Target {
    *TARGET.get_or_init(|| {
        if cfg!(target_arch = "aarch64") {
            Target::Aarch64
        } else {
            Target::X86_64
        }
    })
}

/// How to build one fixture.
#[derive(Clone, Copy, Debug)]
pub struct Spec {
    /// File name of the program.
    pub name: &'static str,
    /// Text size in MiB (one function per 4 KiB page).
    pub text_mib: u64,
    /// Position-independent executable (random 4 KiB-aligned base) or not
    /// (fixed at 0x400000).
    pub pie: bool,
    /// `-z noseparate-code`: the r-x segment also holds the ELF headers and
    /// read-only data.
    pub merged_rx: bool,
    /// Link statically.
    pub static_link: bool,
    /// Put the second half of the functions in a section of their own at
    /// 256 MiB, which the linker gives a second `R E` segment.
    pub two_text_segments: bool,
    /// MiB of read-only data after the text (so the text's last 2 MiB page
    /// holds no writable data).
    pub rodata_mib: u64,
    /// `-z max-page-size=0x200000`: segments 2 MiB aligned in the file and
    /// in memory, so the text is congruent with its file offset.
    pub huge_aligned: bool,
}

impl Spec {
    /// A dynamically linked fixture.
    pub const fn new(name: &'static str, text_mib: u64, pie: bool) -> Spec {
        Spec {
            name,
            text_mib,
            pie,
            merged_rx: false,
            static_link: false,
            two_text_segments: false,
            rodata_mib: 0,
            huge_aligned: false,
        }
    }
}

const DRIVER_C: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/wait.h>

typedef unsigned long (*fixture_fn)(unsigned long);
extern const fixture_fn fixture_table[];
extern const unsigned long fixture_count;
extern const unsigned char fixture_rodata[];
extern const unsigned long fixture_rodata_len;

static const char rodata_message[] = "tiexec-fixture-rodata";
static unsigned long writable_counter = 7;

/* usage: fixture [CALLS [wait|run|fork|patch|hog|_exit|abort [EXIT_CODE|PAGES]]]
 * Calls CALLS functions chosen by xorshift, prints the checksum; with "wait",
 * prints "ready" and its pid (stderr), then blocks until stdin closes; with
 * "fork", a child calls every function once and the parent reports how the
 * child ended; with "_exit", ends with _exit(EXIT_CODE) (no exit handlers).
 * FIXTURE_REGION=FIRST:COUNT in the environment makes the calls go to the
 * functions FIRST..FIRST+COUNT only (one contiguous part of the text). */
int main(int argc, char **argv) {
    unsigned long calls = argc > 1 ? strtoul(argv[1], 0, 10) : 1000000;
    int wait = argc > 2 && strcmp(argv[2], "wait") == 0;
    int code = argc > 3 ? atoi(argv[3]) : 0;
    unsigned long first = 0, count = fixture_count;
    const char *region = getenv("FIXTURE_REGION");
    if (region) {
        char *colon;
        first = strtoul(region, &colon, 10);
        if (*colon == ':') count = strtoul(colon + 1, 0, 10);
        if (first >= fixture_count) first = 0;
        if (count == 0 || first + count > fixture_count) count = fixture_count - first;
    }
    unsigned long x = 88172645463325252UL, acc = 0;
    for (unsigned long i = 0; i < calls; i++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        acc = fixture_table[first + x % count](acc + i);
    }
    writable_counter += acc & 0xff;
    unsigned long rodata_sum = 1469598103934665603UL;
    for (unsigned long i = 0; i < fixture_rodata_len; i++)
        rodata_sum = (rodata_sum ^ fixture_rodata[i]) * 1099511628211UL;
    printf("functions %lu calls %lu checksum %016lx rodata %s %016lx counter %lu\n",
           fixture_count, calls, acc, rodata_message, rodata_sum, writable_counter);
    fflush(stdout);
    if (argc > 3 && strcmp(argv[2], "hog") == 0) {
        /* Like a database with huge_pages=on: maps the PAGES hugetlb pages
         * it was configured for, and fails to start without them. */
        unsigned long pages = strtoul(argv[3], 0, 10);
        size_t len = pages << 21;
        void *p = mmap(0, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB, -1, 0);
        if (p == MAP_FAILED) { perror("hog: mmap of its huge pages"); return 5; }
        for (size_t off = 0; off < len; off += 1UL << 21) ((volatile char *)p)[off] = 1;
        printf("hog: %lu huge pages\n", pages);
        fflush(stdout);
        code = 0;
    }
    if (argc > 2 && strcmp(argv[2], "patch") == 0) {
        /* What hooking libraries do: make one 4 KiB page of text writable,
         * change a function there, make it executable again, call it. */
        unsigned char *f = (unsigned char *)fixture_table[fixture_count / 2];
        unsigned char *page = (unsigned char *)((unsigned long)f & ~4095UL);
        if (mprotect(page, 4096, PROT_READ | PROT_WRITE | PROT_EXEC)) { perror("mprotect rwx"); return 3; }
        f[9] ^= 1; /* the low byte of its xor immediate */
        if (mprotect(page, 4096, PROT_READ | PROT_EXEC)) { perror("mprotect r-x"); return 4; }
        printf("patched %016lx\n", fixture_table[fixture_count / 2](12345));
        fflush(stdout);
    }
    if (argc > 2 && strcmp(argv[2], "_exit") == 0) {
        fflush(stdout);
        _exit(code);
    }
    if (argc > 2 && strcmp(argv[2], "abort") == 0) {
        fflush(stdout);
        abort();
    }
    if (argc > 2 && strcmp(argv[2], "fork") == 0) {
        fflush(stdout);
        pid_t child = fork();
        if (child == 0) {
            for (unsigned long i = 0; i < fixture_count; i++) acc = fixture_table[i](acc);
            _exit((int)(acc & 0x3f));
        }
        int status = 0;
        waitpid(child, &status, 0);
        printf("child %s %d\n", WIFEXITED(status) ? "exited" : "killed",
               WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status));
    }
    if (wait) {
        fprintf(stderr, "pid %d\n", (int)getpid());
        puts("ready");
        fflush(stdout);
        char buf[64];
        while (read(0, buf, sizeof buf) > 0) {}
        /* after the parent looked: run everything (of the region) once more */
        for (unsigned long i = first; i < first + count; i++) acc = fixture_table[i](acc);
        printf("after %016lx\n", acc);
    }
    return code;
}
"#;

/// The section that `two_text_segments` puts at its own address. Not named
/// `.text.*`: the default linker script would fold that into `.text`.
pub const SECOND_TEXT_SECTION: &str = "fixture_b";

/// The generated assembly: `functions` functions, each at its own 4 KiB page
/// at a staggered offset (so caches, not only the TLB, see different sets).
/// With `split`, the second half goes to [`SECOND_TEXT_SECTION`].
pub fn assembly(functions: u64, split: bool, rodata_mib: u64) -> String {
    assembly_named("fixture", functions, split, rodata_mib)
}

/// As [`assembly`], with `prefix` for the symbols (`PREFIX_table`,
/// `PREFIX_count`, `PREFIX_rodata`, `PREFIX_rodata_len`).
pub fn assembly_named(prefix: &str, functions: u64, split: bool, rodata_mib: u64) -> String {
    let mut s = String::with_capacity(functions as usize * 120);
    // `%` for section types and symbol kinds: what both architectures'
    // assemblers accept (`@` starts a comment on some).
    s.push_str("    .section .text.fixture,\"ax\",%progbits\n");
    for i in 0..functions {
        if split && i == functions / 2 {
            let _ = writeln!(s, "    .section {SECOND_TEXT_SECTION},\"ax\",%progbits");
        }
        let offset = (i * 17 % 60) * 64;
        let mul = (i.wrapping_mul(2654435761) % 0x7fff_0000) | 1;
        let add = i.wrapping_mul(40503) % 0x7fff_0000;
        s.push_str("    .p2align 12\n");
        if offset > 0 {
            let _ = writeln!(s, "    .skip {offset}, 0");
        }
        // Typed and sized like a compiler's functions, so symbol tools
        // (perf maps, debuggers) see them. The same arithmetic (x * mul ^
        // add, 64-bit) on both architectures.
        let _ = writeln!(s, "    .type {prefix}_fn_{i}, %function\n{prefix}_fn_{i}:");
        if target() == Target::Aarch64 {
            let _ = writeln!(
                s,
                "    movz x1, #{}\n    movk x1, #{}, lsl #16\n    mul x0, x0, x1\n\
                 \x20   movz x2, #{}\n    movk x2, #{}, lsl #16\n    eor x0, x0, x2\n    ret",
                mul & 0xffff,
                mul >> 16,
                add & 0xffff,
                add >> 16
            );
        } else {
            let _ = writeln!(
                s,
                "    imul ${mul}, %rdi, %rax\n    xor ${add}, %rax\n    ret"
            );
        }
        let _ = writeln!(s, "    .size {prefix}_fn_{i}, .-{prefix}_fn_{i}");
    }
    // Types and sizes matter: an executable that uses a library's data gets
    // a copy relocation, which copies `.size` bytes.
    let _ = write!(
        s,
        "    .section .data.rel.ro,\"aw\",%progbits\n    .p2align 3\n    .globl {prefix}_table\n\
         \x20   .type {prefix}_table, %object\n    .size {prefix}_table, {}\n{prefix}_table:\n",
        functions * 8
    );
    for i in 0..functions {
        let _ = writeln!(s, "    .quad {prefix}_fn_{i}");
    }
    let rodata_bytes = rodata_mib << 20;
    let _ = write!(
        s,
        "    .section .rodata\n    .p2align 3\n\
         \x20   .globl {prefix}_count\n    .type {prefix}_count, %object\n    .size {prefix}_count, 8\n\
         {prefix}_count:\n    .quad {functions}\n\
         \x20   .globl {prefix}_rodata_len\n    .type {prefix}_rodata_len, %object\n    .size {prefix}_rodata_len, 8\n\
         {prefix}_rodata_len:\n    .quad {rodata_bytes}\n\
         \x20   .globl {prefix}_rodata\n    .type {prefix}_rodata, %object\n    .size {prefix}_rodata, {}\n\
         {prefix}_rodata:\n",
        rodata_bytes + 1
    );
    // Varied bytes, one line per 64 KiB.
    for k in 0..rodata_bytes / 65536 {
        let _ = writeln!(
            s,
            "    .fill 8192, 8, {:#x}",
            0x9e37_79b9_7f4a_7c15u64.wrapping_mul(k + 1)
        );
    }
    s.push_str("    .byte 0\n    .section .note.GNU-stack,\"\",%progbits\n");
    s
}

/// Rewrites `path` with 4 KiB writes under a new inode, so that its page
/// cache holds 4 KiB folios: the kernel then cannot map its text with 2 MiB
/// pages by itself, and tests see tiexec's own work. (A file written in large
/// writes, as the linker does, can get 2 MiB folios on this kernel, and a
/// 2 MiB-aligned, congruent mapping of it is then `FilePmdMapped` for free.)
pub fn rewrite_in_small_pages(path: &Path) {
    use std::io::Write as _;
    use std::os::unix::fs::PermissionsExt;
    let bytes = std::fs::read(path).expect("read fixture");
    let mode = std::fs::metadata(path)
        .expect("stat fixture")
        .permissions()
        .mode();
    let tmp = path.with_extension(format!("small{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp).expect("create");
    for chunk in bytes.chunks(4096) {
        f.write_all(chunk).expect("write");
    }
    f.sync_all().expect("sync");
    drop(f);
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).expect("chmod");
    std::fs::rename(&tmp, path).expect("rename");
}

/// Builds the fixture into `dir` (once: an existing program is reused).
pub fn build(spec: Spec, dir: &Path) -> PathBuf {
    build_linking(spec, dir, None)
}

/// The link line a C program uses to link tiexec in: the archive, the
/// reference that pulls in its constructor, and its system libraries
/// (`rustc --print native-static-libs`; libgcc_eh instead of libgcc_s for
/// a static program).
pub fn tiexec_link_args(archive: &Path, static_link: bool) -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> =
        vec![archive.into(), "-Wl,--undefined=tiexec_remap_text".into()];
    args.push(if static_link { "-lgcc_eh" } else { "-lgcc_s" }.into());
    for lib in ["-lutil", "-lrt", "-lpthread", "-lm", "-ldl"] {
        args.push(lib.into());
    }
    args
}

/// As [`build`], linking `archive` (libtiexec.a) into the program when given.
pub fn build_linking(spec: Spec, dir: &Path, archive: Option<&Path>) -> PathBuf {
    std::fs::create_dir_all(dir).expect("fixture dir");
    let exe = dir.join(spec.name);
    // What the program is built from: an edited driver, generator, spec or
    // archive is never served by an old build.
    let stamp = dir.join(format!("{}.digest", spec.name));
    let mut source = format!("{DRIVER_C}{spec:?}{:?}{:?}", archive, target());
    source.push_str(&assembly(2, spec.two_text_segments, 0));
    if let Some(a) = archive {
        // Its content, not its timestamps: the arm64 machine sees the same
        // archive with other ones, and must not rebuild (it has no gcc).
        let bytes = std::fs::read(a).expect("archive");
        source.push_str(&format!("{:016x}", digest(&bytes)));
    }
    let digest = format!("{:016x}", digest(source.as_bytes()));
    if exe.exists() && std::fs::read_to_string(&stamp).is_ok_and(|d| d == digest) {
        return exe;
    }
    let asm = dir.join(format!("{}.S", spec.name));
    let driver = dir.join(format!("{}-main.c", spec.name));
    std::fs::write(
        &asm,
        assembly(spec.text_mib * 256, spec.two_text_segments, spec.rodata_mib),
    )
    .expect("write asm");
    std::fs::write(&driver, DRIVER_C).expect("write driver");
    let tmp = dir.join(format!("{}.tmp{}", spec.name, std::process::id()));
    let mut cc = Command::new(c_compiler());
    cc.arg("-O2").arg(&driver).arg(&asm).arg("-o").arg(&tmp);
    cc.arg(if spec.pie { "-pie" } else { "-no-pie" });
    if spec.pie {
        cc.arg("-fPIE");
    }
    if spec.merged_rx {
        cc.arg("-Wl,-z,noseparate-code");
    }
    if spec.static_link {
        cc.arg("-static");
    }
    if spec.huge_aligned {
        cc.arg("-Wl,-z,max-page-size=0x200000");
    }
    if spec.two_text_segments {
        cc.arg(format!(
            "-Wl,--section-start={SECOND_TEXT_SECTION}=0x10000000"
        ));
    }
    if let Some(archive) = archive {
        cc.args(tiexec_link_args(archive, spec.static_link));
    }
    let out = cc.output().expect("run gcc");
    assert!(
        out.status.success(),
        "building fixture {}: {:?}\n{}",
        spec.name,
        cc,
        String::from_utf8_lossy(&out.stderr)
    );
    rewrite_in_small_pages(&tmp);
    std::fs::rename(&tmp, &exe).expect("rename fixture");
    std::fs::write(&stamp, &digest).expect("write the fixture's digest");
    exe
}

/// FNV-1a, 64 bits (the tests' own: a digest of sources, not security).
fn digest(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

const HOST_C: &str = r#"
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

typedef unsigned long (*fixture_fn)(unsigned long);
#ifdef LINKED
extern const fixture_fn lib_table[];
extern const unsigned long lib_count;
#endif

static void *idle(void *p) { (void)p; for (;;) pause(); return 0; }

/* usage: host CALLS run|wait|unload [LIBRARY]
 * Calls functions of a big library: linked at start-up (LINKED) or
 * dlopened from LIBRARY after a second thread has started. `unload`
 * (dlopened only): then changes the protection of one page of its text,
 * dlcloses it, maps fresh memory where its text was, fills it, makes one
 * page of it read-only with mprotect and checks it. */
int main(int argc, char **argv) {
    unsigned long calls = argc > 1 ? strtoul(argv[1], 0, 10) : 1000000;
    int wait = argc > 2 && strcmp(argv[2], "wait") == 0;
    const fixture_fn *table;
    unsigned long count;
#ifdef LINKED
    table = lib_table;
    count = lib_count;
#else
    pthread_t t;
    pthread_create(&t, 0, idle, 0);
    void *h = dlopen(argc > 3 ? argv[3] : "", RTLD_NOW);
    if (!h) { fprintf(stderr, "dlopen: %s\n", dlerror()); return 99; }
    table = (const fixture_fn *)dlsym(h, "lib_table");
    count = *(const unsigned long *)dlsym(h, "lib_count");
#endif
    unsigned long x = 88172645463325252UL, acc = 0;
    for (unsigned long i = 0; i < calls; i++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        acc = table[x % count](acc + i);
    }
    printf("library functions %lu calls %lu checksum %016lx\n", count, calls, acc);
    fflush(stdout);
#ifndef LINKED
    if (argc > 2 && strcmp(argv[2], "unload") == 0) {
        /* The 4 MiB around the middle of the library's text. */
        unsigned long mid = (unsigned long)table[count / 2];
        unsigned long start = (mid & ~((2UL << 20) - 1)) - (2UL << 20);
        unsigned long len = 4UL << 20;
        /* One page of the loaded text loses and regains PROT_EXEC: on
         * hugetlb pages tiexec must put its 2 MiB page back on small pages
         * first (the kernel cannot split a hugetlb mapping there). */
        void *page = (void *)(mid & ~4095UL);
        if (mprotect(page, 4096, PROT_READ) != 0 || mprotect(page, 4096, PROT_READ | PROT_EXEC) != 0) {
            perror("mprotect of the library's text");
            return 95;
        }
        if (dlclose(h) != 0) { fprintf(stderr, "dlclose: %s\n", dlerror()); return 98; }
        unsigned char *p = mmap((void *)start, len, PROT_READ | PROT_WRITE,
                                MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
        if (p == MAP_FAILED || (unsigned long)p != start) {
            fprintf(stderr, "old text still mapped at %lx\n", start);
            return 97;
        }
        for (unsigned long i = 0; i < len; i++) p[i] = (unsigned char)(i * 7 + 3);
        if (mprotect(p + (1UL << 20), 4096, PROT_READ) != 0) { perror("mprotect"); return 96; }
        unsigned long bad = 0;
        for (unsigned long i = 0; i < len; i++) bad += p[i] != (unsigned char)(i * 7 + 3);
        p[0] = 1; /* still writable outside the protected page */
        printf("unloaded; new memory at the old text: %lu bytes differ\n", bad);
        return bad != 0;
    }
#endif
    if (wait) {
        fprintf(stderr, "pid %d\n", (int)getpid());
        puts("ready");
        fflush(stdout);
        char buf[64];
        while (read(0, buf, sizeof buf) > 0) {}
        puts("done");
    }
    return 0;
}
"#;

/// The C compiler that builds fixtures: `TIEXEC_TEST_CC`, else the
/// target's (`gcc` for this machine's architecture, the Debian cross
/// compiler for another).
pub fn c_compiler() -> std::ffi::OsString {
    if let Some(cc) = std::env::var_os("TIEXEC_TEST_CC") {
        return cc;
    }
    let native = cfg!(target_arch = "aarch64") == (target() == Target::Aarch64);
    match target() {
        _ if native => "gcc".into(),
        Target::Aarch64 => "aarch64-linux-gnu-gcc".into(),
        Target::X86_64 => "x86_64-linux-gnu-gcc".into(),
    }
}

fn gcc(args: &[&std::ffi::OsStr], what: &str) {
    let out = Command::new(c_compiler())
        .args(args)
        .output()
        .expect("run gcc");
    assert!(
        out.status.success(),
        "building {what}: gcc {args:?}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

const PANICKER_RS: &str = r#"
// A Rust program with big text (the fixture's functions, linked in) that
// panics a few calls deep: its backtrace must name every frame.
extern "C" {
    static fixture_table: [extern "C" fn(u64) -> u64; 1];
    static fixture_count: u64;
}

#[inline(never)]
fn third(x: u64) -> u64 {
    if std::hint::black_box(x) > 0 {
        panic!("tiexec fixture panic after {x}");
    }
    x
}

#[inline(never)]
fn second(x: u64) -> u64 {
    third(x) + 1
}

#[inline(never)]
fn first(x: u64) -> u64 {
    second(x) * 3
}

fn main() {
    // SAFETY: the linked-in table has at least one function.
    let (f, n) = unsafe { (fixture_table[0], fixture_count) };
    println!("functions {n} first {:x}", f(n));
    let wait = std::env::args().nth(1).is_some_and(|a| a == "wait");
    if wait {
        eprintln!("pid {}", std::process::id());
        println!("ready");
        let mut s = String::new();
        let _ = std::io::stdin().read_line(&mut s);
    }
    first(std::hint::black_box(n));
}
"#;

/// Builds the Rust program that panics (24 MiB of text, PIE, line tables)
/// into `dir` (once), with `rustc`.
pub fn build_rust_panicker(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).expect("fixture dir");
    let digest = digest(PANICKER_RS.as_bytes());
    let exe = dir.join(format!("panicker-{digest:016x}"));
    if exe.exists() {
        return exe;
    }
    let asm = dir.join("panicker-text.S");
    let obj = dir.join(format!("panicker-text-{}.o", std::process::id()));
    std::fs::write(&asm, assembly(24 * 256, false, 0)).expect("write asm");
    gcc(
        &[
            "-c".as_ref(),
            "-fPIC".as_ref(),
            asm.as_os_str(),
            "-o".as_ref(),
            obj.as_os_str(),
        ],
        "panicker text",
    );
    let src = dir.join("panicker.rs");
    std::fs::write(&src, PANICKER_RS).expect("write source");
    let tmp = dir.join(format!("panicker.tmp{}", std::process::id()));
    let out = Command::new(std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into()))
        .args([
            "--edition",
            "2021",
            "-C",
            "opt-level=1",
            "-C",
            "debuginfo=1",
            "-C",
            "strip=none",
        ])
        .arg("-C")
        .arg(format!("link-arg={}", obj.display()))
        .arg(&src)
        .arg("-o")
        .arg(&tmp)
        .output()
        .expect("run rustc");
    assert!(
        out.status.success(),
        "building the panicker: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_file(&obj);
    rewrite_in_small_pages(&tmp);
    std::fs::rename(&tmp, &exe).expect("rename");
    exe
}

/// Builds `lib<name>.so` with `text_mib` MiB of text into `dir` (once).
pub fn build_library(name: &str, text_mib: u64, dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).expect("fixture dir");
    let lib = dir.join(format!("lib{name}.so"));
    if lib.exists() {
        return lib;
    }
    let asm = dir.join(format!("lib{name}.S"));
    std::fs::write(&asm, assembly_named("lib", text_mib * 256, false, 0)).expect("write asm");
    let tmp = dir.join(format!("lib{name}.so.tmp{}", std::process::id()));
    gcc(
        &[
            "-shared".as_ref(),
            "-fPIC".as_ref(),
            asm.as_os_str(),
            "-o".as_ref(),
            tmp.as_os_str(),
        ],
        name,
    );
    rewrite_in_small_pages(&tmp);
    std::fs::rename(&tmp, &lib).expect("rename library");
    lib
}

/// Builds `lib<name>.so` like [`build_library`], plus one function whose
/// code holds an absolute address (`movabs`), linked with `-z notext`: the
/// library has text relocations (`DT_TEXTREL`), so the loader writes into
/// its text and the text in memory differs from the file.
pub fn build_textrel_library(name: &str, text_mib: u64, dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).expect("fixture dir");
    let lib = dir.join(format!("lib{name}.so"));
    if lib.exists() {
        return lib;
    }
    let asm = dir.join(format!("lib{name}.S"));
    let mut text = assembly_named("lib", text_mib * 256, false, 0);
    text.push_str(
        "    .text
    .globl lib_textrel
    .type lib_textrel, @function
         lib_textrel:
    movabs $lib_table, %rax
    ret
    .size lib_textrel, .-lib_textrel
",
    );
    std::fs::write(&asm, text).expect("write asm");
    let tmp = dir.join(format!("lib{name}.so.tmp{}", std::process::id()));
    gcc(
        &[
            "-shared".as_ref(),
            "-fPIC".as_ref(),
            "-Wl,-z,notext".as_ref(),
            asm.as_os_str(),
            "-o".as_ref(),
            tmp.as_os_str(),
        ],
        name,
    );
    rewrite_in_small_pages(&tmp);
    std::fs::rename(&tmp, &lib).expect("rename library");
    lib
}

/// The file offset of symbol `name`'s first byte in the ELF file `bytes`.
pub fn symbol_file_offset(bytes: &[u8], name: &str) -> Option<usize> {
    let elf = goblin::elf::Elf::parse(bytes).ok()?;
    let sym = elf
        .syms
        .iter()
        .find(|s| elf.strtab.get_at(s.st_name) == Some(name))?;
    let load = elf.program_headers.iter().find(|p| {
        p.p_type == goblin::elf::program_header::PT_LOAD
            && p.p_vaddr <= sym.st_value
            && sym.st_value < p.p_vaddr + p.p_filesz
    })?;
    usize::try_from(sym.st_value - load.p_vaddr + load.p_offset).ok()
}

/// `exe`'s bytes with the code of `fixture_fn_<index>` changed (the low
/// byte of its `xor` immediate): same size, same layout, another checksum
/// whenever that function is called.
pub fn patched_text(exe: &Path, index: u64) -> Vec<u8> {
    let mut bytes = std::fs::read(exe).expect("read fixture");
    let at = symbol_file_offset(&bytes, &format!("fixture_fn_{index}")).expect("symbol");
    // imul $imm32, %rdi, %rax (7 bytes), then xor $imm32, %rax (48 35 imm32)
    assert_eq!(bytes[at + 7..at + 9], [0x48, 0x35], "layout of fixture_fn");
    bytes[at + 9] ^= 1;
    bytes
}

/// Builds the host program into `dir` (once): linked against `linked_lib`,
/// or, with `None`, dlopening the library named on its command line.
pub fn build_host(name: &str, linked_lib: Option<&Path>, dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).expect("fixture dir");
    let exe = dir.join(name);
    // Rebuilt when the source or the library it links changes.
    let stamp = dir.join(format!("{name}.digest"));
    let linked = linked_lib
        .map(|l| l.display().to_string())
        .unwrap_or_default();
    let version = format!("{:016x}", digest(format!("{HOST_C}{linked}").as_bytes()));
    if exe.exists() && std::fs::read_to_string(&stamp).is_ok_and(|d| d == version) {
        return exe;
    }
    let src = dir.join(format!("{name}.c"));
    std::fs::write(&src, HOST_C).expect("write host");
    let tmp = dir.join(format!("{name}.tmp{}", std::process::id()));
    let mut args: Vec<std::ffi::OsString> = vec![
        "-O2".into(),
        src.clone().into(),
        "-o".into(),
        tmp.clone().into(),
    ];
    match linked_lib {
        Some(lib) => {
            let dir = lib.parent().expect("library dir");
            args.push("-DLINKED".into());
            args.push(lib.into());
            args.push(format!("-Wl,-rpath,{}", dir.display()).into());
        }
        None => {
            args.push("-ldl".into());
            args.push("-lpthread".into());
        }
    }
    let refs: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    gcc(&refs, name);
    std::fs::rename(&tmp, &exe).expect("rename host");
    std::fs::write(&stamp, version).expect("write the host's digest");
    exe
}

const HOSTILE_C: &str = r#"
#define _GNU_SOURCE
#include <errno.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

/* usage: hostile MODE PROGRAM ARGS...
 * Sets up a hostile environment, then execs PROGRAM:
 *   seccomp-mremap    mremap fails with EPERM
 *   seccomp-hugetlb   mmap with MAP_HUGETLB fails with EPERM
 *   seccomp-madvise   madvise fails with EPERM
 *   seccomp-memfd     memfd_create fails with EPERM
 *   mdwe              PR_SET_MDWE (memory-deny-write-execute), as systemd's
 *                     MemoryDenyWriteExecute=yes
 *   thp-off           PR_SET_THP_DISABLE
 *   rlimit-as=BYTES   RLIMIT_AS
 *   cgroup=DIR        joins the cgroup DIR (writes cgroup.procs) */
#define ALLOW BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW)
#define EPERM_RET BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM)
#define LOAD(field) BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, field))

static int filter(struct sock_filter *f, unsigned short n) {
    struct sock_fprog prog = { .len = n, .filter = f };
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)) return -1;
    return syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog);
}

static int deny_call(int nr) {
    struct sock_filter f[] = {
        LOAD(arch),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0),
        ALLOW,
        LOAD(nr),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, nr, 0, 1),
        EPERM_RET,
        ALLOW,
    };
    return filter(f, sizeof f / sizeof f[0]);
}

static int deny_hugetlb_mmap(void) {
    struct sock_filter f[] = {
        LOAD(arch),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0),
        ALLOW,
        LOAD(nr),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_mmap, 1, 0),
        ALLOW,
        LOAD(args[3]),
        BPF_JUMP(BPF_JMP | BPF_JSET | BPF_K, MAP_HUGETLB, 0, 1),
        EPERM_RET,
        ALLOW,
    };
    return filter(f, sizeof f / sizeof f[0]);
}

int main(int argc, char **argv) {
    if (argc < 3) { fprintf(stderr, "usage: hostile MODE PROGRAM ARGS...\n"); return 2; }
    const char *m = argv[1];
    int r = 0;
    if (!strcmp(m, "seccomp-mremap")) r = deny_call(SYS_mremap);
    else if (!strcmp(m, "seccomp-madvise")) r = deny_call(SYS_madvise);
    else if (!strcmp(m, "seccomp-hugetlb")) r = deny_hugetlb_mmap();
    else if (!strcmp(m, "seccomp-memfd")) r = deny_call(SYS_memfd_create);
    else if (!strcmp(m, "mdwe")) r = prctl(65 /* PR_SET_MDWE */, 1 /* REFUSE_EXEC_GAIN */, 0, 0, 0);
    else if (!strcmp(m, "thp-off")) r = prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0);
    else if (!strncmp(m, "rlimit-as=", 10)) {
        struct rlimit l = { strtoull(m + 10, 0, 10), strtoull(m + 10, 0, 10) };
        r = setrlimit(RLIMIT_AS, &l);
    } else if (!strncmp(m, "cgroup=", 7)) {
        char path[4096];
        snprintf(path, sizeof path, "%s/cgroup.procs", m + 7);
        FILE *f = fopen(path, "w");
        if (!f) { perror(path); return 2; }
        r = fprintf(f, "%d\n", (int)getpid()) < 0;
        r |= fclose(f);
    } else { fprintf(stderr, "hostile: unknown mode %s\n", m); return 2; }
    if (r) { perror(m); return 2; }
    execv(argv[2], argv + 2);
    perror(argv[2]);
    return 127;
}
"#;

const SIGNALS_C: &str = r#"
#include <signal.h>
#include <string.h>
#include <unistd.h>
static volatile sig_atomic_t seen;
static void count(int sig) { (void)sig; seen++; }
/* Runs before tiexec's constructor (see the tests): from here on the
 * program survives SIGALRM and SIGUSR1. It says so on stderr, then waits for
 * one byte on stdin, so the test can start spraying signals before tiexec's
 * constructor begins. */
__attribute__((constructor)) static void install(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = count;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGALRM, &sa, 0);
    sigaction(SIGUSR1, &sa, 0);
    write(2, "handlers installed\n", 19);
    char c;
    while (read(0, &c, 1) < 0) {}
}
"#;

/// Builds C `source` into `dir` once per version of the source (`shared`: a
/// library); the file is `name` with the source's digest before its
/// extension, so an edited source is never served by an old build.
fn build_c_once(dir: &Path, name: &str, source: &str, shared: bool) -> PathBuf {
    let digest = digest(source.as_bytes());
    let (stem, ext) = name.split_once('.').unwrap_or((name, ""));
    let versioned = if ext.is_empty() {
        format!("{stem}-{digest:016x}")
    } else {
        format!("{stem}-{digest:016x}.{ext}")
    };
    let out = dir.join(&versioned);
    if out.exists() {
        return out;
    }
    let name = versioned.as_str();
    std::fs::create_dir_all(dir).expect("fixture dir");
    let src = dir.join(format!("{name}.c"));
    std::fs::write(&src, source).expect("write");
    let tmp = dir.join(format!("{name}.tmp{}", std::process::id()));
    let mut args: Vec<&std::ffi::OsStr> = vec!["-O2".as_ref()];
    if shared {
        args.extend([
            std::ffi::OsStr::new("-shared"),
            std::ffi::OsStr::new("-fPIC"),
        ]);
    }
    args.extend([src.as_os_str(), "-o".as_ref(), tmp.as_os_str()]);
    gcc(&args, name);
    std::fs::rename(&tmp, &out).expect("rename");
    out
}

/// Builds the hostile-environment launcher into `dir` (once).
pub fn build_hostile(dir: &Path) -> PathBuf {
    build_c_once(dir, "hostile", HOSTILE_C, false)
}

/// Builds the signal-handler library into `dir` (once).
pub fn build_signal_handlers(dir: &Path) -> PathBuf {
    build_c_once(dir, "libsignals.so", SIGNALS_C, true)
}

const THREAD_STARTER_C: &str = r#"
#include <pthread.h>
#include <unistd.h>
static void *idle(void *p) { (void)p; for (;;) pause(); return 0; }
__attribute__((constructor)) static void start_thread(void) {
    pthread_t t;
    pthread_create(&t, 0, idle, 0);
}
"#;

/// A library whose constructor starts a thread (preloaded after tiexec,
/// its constructor runs first: the thread runs when tiexec's looks), built
/// into `dir`.
pub fn thread_starter_library(dir: &Path) -> PathBuf {
    build_c_once(dir, "libstarter.so", THREAD_STARTER_C, true)
}
