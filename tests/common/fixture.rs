//! Generated fixture programs with big text: one small function per 4 KiB
//! page, called in a pseudo-random order, printing a checksum. Shared by the
//! integration tests and the benchmarks.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

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
        }
    }
}

const DRIVER_C: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef unsigned long (*fixture_fn)(unsigned long);
extern const fixture_fn fixture_table[];
extern const unsigned long fixture_count;

static const char rodata_message[] = "tiexec-fixture-rodata";
static unsigned long writable_counter = 7;

/* usage: fixture [CALLS [wait|run [EXIT_CODE]]]
 * Calls CALLS functions chosen by xorshift, prints the checksum; with "wait",
 * prints "ready" and its pid (stderr), then blocks until stdin closes. */
int main(int argc, char **argv) {
    unsigned long calls = argc > 1 ? strtoul(argv[1], 0, 10) : 1000000;
    int wait = argc > 2 && strcmp(argv[2], "wait") == 0;
    int code = argc > 3 ? atoi(argv[3]) : 0;
    unsigned long x = 88172645463325252UL, acc = 0;
    for (unsigned long i = 0; i < calls; i++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        acc = fixture_table[x % fixture_count](acc + i);
    }
    writable_counter += acc & 0xff;
    printf("functions %lu calls %lu checksum %016lx rodata %s counter %lu\n",
           fixture_count, calls, acc, rodata_message, writable_counter);
    fflush(stdout);
    if (wait) {
        fprintf(stderr, "pid %d\n", (int)getpid());
        puts("ready");
        fflush(stdout);
        char buf[64];
        while (read(0, buf, sizeof buf) > 0) {}
        /* after the parent looked: run everything once more */
        for (unsigned long i = 0; i < fixture_count; i++) acc = fixture_table[i](acc);
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
pub fn assembly(functions: u64, split: bool) -> String {
    let mut s = String::with_capacity(functions as usize * 120);
    s.push_str("    .section .text.fixture,\"ax\",@progbits\n");
    for i in 0..functions {
        if split && i == functions / 2 {
            let _ = writeln!(s, "    .section {SECOND_TEXT_SECTION},\"ax\",@progbits");
        }
        let offset = (i * 17 % 60) * 64;
        let mul = (i.wrapping_mul(2654435761) % 0x7fff_0000) | 1;
        let add = i.wrapping_mul(40503) % 0x7fff_0000;
        s.push_str("    .p2align 12\n");
        if offset > 0 {
            let _ = writeln!(s, "    .skip {offset}, 0x90");
        }
        let _ = write!(
            s,
            "fixture_fn_{i}:\n    imul ${mul}, %rdi, %rax\n    xor ${add}, %rax\n    ret\n"
        );
    }
    s.push_str("    .section .data.rel.ro,\"aw\",@progbits\n    .p2align 3\n    .globl fixture_table\nfixture_table:\n");
    for i in 0..functions {
        let _ = writeln!(s, "    .quad fixture_fn_{i}");
    }
    let _ = write!(
        s,
        "    .section .rodata\n    .p2align 3\n    .globl fixture_count\nfixture_count:\n    .quad {functions}\n    .section .note.GNU-stack,\"\",@progbits\n"
    );
    s
}

/// Builds the fixture into `dir` (once: an existing program is reused).
pub fn build(spec: Spec, dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).expect("fixture dir");
    let exe = dir.join(spec.name);
    if exe.exists() {
        return exe;
    }
    let asm = dir.join(format!("{}.S", spec.name));
    let driver = dir.join(format!("{}-main.c", spec.name));
    std::fs::write(&asm, assembly(spec.text_mib * 256, spec.two_text_segments)).expect("write asm");
    std::fs::write(&driver, DRIVER_C).expect("write driver");
    let tmp = dir.join(format!("{}.tmp{}", spec.name, std::process::id()));
    let mut cc = Command::new("gcc");
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
    if spec.two_text_segments {
        cc.arg(format!(
            "-Wl,--section-start={SECOND_TEXT_SECTION}=0x10000000"
        ));
    }
    let out = cc.output().expect("run gcc");
    assert!(
        out.status.success(),
        "building fixture {}: {:?}\n{}",
        spec.name,
        cc,
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::rename(&tmp, &exe).expect("rename fixture");
    exe
}
