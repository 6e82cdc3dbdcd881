//! A Rust program that moves its own text to 2 MiB pages, then prints what
//! the kernel says about it.
//!
//! Real programs that want this are big; this one pads its text with 8 MiB
//! of code (below) so there is something to move. Run it:
//!
//!     cargo run --release --example self_remap
//!
//! With `features = ["constructor"]` on the dependency, the same happens
//! before `main` without calling anything.

// 8 MiB of real instructions in the program's text (never executed).
std::arch::global_asm!(
    ".pushsection .text.self_remap_padding,\"ax\",@progbits",
    ".p2align 12",
    ".globl self_remap_padding",
    "self_remap_padding:",
    ".fill 8388608, 1, 0x90",
    ".popsection",
);

extern "C" {
    static self_remap_padding: u8;
}

fn main() {
    // Refer to the padding so the linker keeps it (taking an address only).
    std::hint::black_box(std::ptr::addr_of!(self_remap_padding));
    // This program knows it is worth it: it asks for THP copies outright.
    // (`Options::default()`, the `auto` backend, would use the image cache
    // where `tiexec --setup` made one, and otherwise copy only once past runs
    // of the program show that a copy pays off.) `TIEXEC_BACKEND` overrides.
    let options = match std::env::var_os("TIEXEC_BACKEND") {
        Some(_) => tiexec::Options::from_env(),
        None => tiexec::Options {
            backend: tiexec::Backend::Thp,
            ..tiexec::Options::default()
        },
    };
    match tiexec::remap_text(&options) {
        Ok(reports) => {
            for r in &reports {
                println!(
                    "{}: {} bytes of text, {} on 2 MiB pages ({} hugetlb, {} THP, {} page cache), \
                     {} swapped by tiexec",
                    r.path,
                    r.text_bytes,
                    r.after.huge(),
                    r.after.hugetlb,
                    r.after.anon_thp,
                    r.after.file_thp,
                    r.swapped_bytes()
                );
            }
        }
        Err(e) => {
            println!("text left on 4 KiB pages: {e}");
            std::process::exit(2);
        }
    }
}
