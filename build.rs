//! Build script.
//!
//! Builds `libtiexec.so` once more, in release mode, into `OUT_DIR`, so that
//! the `tiexec` binary can carry the preload library inside itself
//! (in sections of its file that are not loaded, see
//! src/bin/tiexec/embedded.rs). `cargo install --path .` installs only binaries; with
//! the library embedded, an installed `tiexec` needs no other file. The
//! inner build sets `TIEXEC_INNER_BUILD`, which skips this step there.
//!
//! (The swap routine in asm/ is assembled by `global_asm!` in
//! src/trampoline.rs, with its constants from Rust: nothing to do here.)

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=TIEXEC_INNER_BUILD");

    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let embedded = out_dir.join("libtiexec-embedded.so");
    let stub = out_dir.join("libtiexec-stub.so");
    if env::var_os("TIEXEC_INNER_BUILD").is_some() {
        // The inner build itself: nothing to embed.
        for placeholder in [&embedded, &stub, &out_dir.join("libtiexec-static.a")] {
            std::fs::write(placeholder, b"").expect("write placeholder");
        }
    } else {
        println!("cargo:rerun-if-changed=src");
        println!("cargo:rerun-if-changed=asm");
        println!("cargo:rerun-if-changed=Cargo.toml");
        build_preload_library(&out_dir, &embedded);
        build_stub(&stub);
    }
    // Their digests name the extracted copies: the binary finds its own
    // libraries without reading them back.
    for (var, file) in [("LIB", &embedded), ("STUB", &stub)] {
        // The binary takes them in with the assembler's .incbin (into a
        // section that is not loaded), which quotes the path.
        let shown = file.display().to_string();
        assert!(
            !shown.contains(['"', '\\', '\n']),
            "the build directory's path must not contain a quote, backslash or newline: {shown}"
        );
        let bytes = std::fs::read(file).unwrap_or_default();
        println!("cargo:rustc-env=TIEXEC_EMBEDDED_{var}={shown}");
        println!(
            "cargo:rustc-env=TIEXEC_EMBEDDED_{var}_DIGEST={:016x}",
            fnv1a(&bytes)
        );
        println!("cargo:rustc-env=TIEXEC_EMBEDDED_{var}_LEN={}", bytes.len());
    }
    println!(
        "cargo:rustc-env=TIEXEC_EMBEDDED_STATICLIB={}",
        out_dir.join("libtiexec-static.a").display()
    );
    entry_without_interpreter();
}

/// The `tiexec` binary starts in src/bin/tiexec/entry.rs, with no program
/// interpreter: the kernel maps only its file, and that code maps the
/// dynamic loader itself once it has seen that the address space allows
/// (see there). It needs the loader's path, which the linker would have
/// written as the interpreter: on a native build, that of this build
/// script (linked by the same toolchain for the same target); on a cross
/// build, the architecture's standard one.
fn entry_without_interpreter() {
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let os = env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env_abi = env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    let standard = match arch.as_str() {
        "x86_64" => "/lib64/ld-linux-x86-64.so.2",
        "aarch64" => "/lib/ld-linux-aarch64.so.1",
        _ => "",
    };
    let native = env::var("HOST").ok() == env::var("TARGET").ok();
    let loader = native
        .then(|| env::current_exe().ok().and_then(|p| interpreter_of(&p)))
        .flatten()
        .unwrap_or_else(|| standard.to_string());
    println!("cargo:rustc-env=TIEXEC_LOADER={loader}");
    if os == "linux" && env_abi == "gnu" && !standard.is_empty() && !loader.is_empty() {
        println!("cargo:rustc-link-arg-bin=tiexec=-Wl,--no-dynamic-linker");
        println!("cargo:rustc-link-arg-bin=tiexec=-Wl,-e,tiexec_start");
        println!("cargo:rustc-cfg=tiexec_entry");
    }
    println!("cargo:rustc-check-cfg=cfg(tiexec_entry)");
}

/// The program interpreter (`PT_INTERP`) an ELF64 little-endian
/// executable names.
fn interpreter_of(path: &std::path::Path) -> Option<String> {
    let bytes = std::fs::read(path).ok()?;
    let at = |off: usize, n: usize| -> Option<u64> {
        let b = bytes.get(off..off + n)?;
        Some(b.iter().rev().fold(0u64, |v, &x| (v << 8) | u64::from(x)))
    };
    if bytes.get(..4)? != b"\x7fELF" || bytes.get(4)? != &2 || bytes.get(5)? != &1 {
        return None;
    }
    let phoff = at(32, 8)? as usize;
    let phentsize = at(54, 2)? as usize;
    let phnum = at(56, 2)? as usize;
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        if at(ph, 4)? == 3 {
            let off = at(ph + 8, 8)? as usize;
            let len = at(ph + 32, 8)? as usize;
            let name = bytes.get(off..off + len)?;
            let name = name.strip_suffix(b"\0").unwrap_or(name);
            return String::from_utf8(name.to_vec()).ok();
        }
    }
    None
}

/// FNV-1a, as tiexec::state::fnv1a.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    })
}

/// Compiles src/preload_stub.rs (no_std, panic=abort, libc only) into the
/// small library the wrapper preloads, with the same rustc and target.
fn build_stub(out: &std::path::Path) {
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("manifest dir"));
    let tmp = out.with_extension("so.tmp");
    let mut cmd = Command::new(rustc);
    cmd.args(["--edition", "2021", "--crate-type", "cdylib"])
        .args(["--crate-name", "tiexec_stub"])
        .args([
            "-C",
            "panic=abort",
            "-C",
            "opt-level=2",
            "-C",
            "debuginfo=0",
        ])
        .arg(manifest_dir.join("src").join("preload_stub.rs"))
        .arg("-o")
        .arg(&tmp);
    if let Ok(target) = env::var("TARGET") {
        cmd.arg("--target").arg(target);
    }
    // The linker cargo resolved for the target (cross builds name one).
    if let Some(linker) = env::var_os("RUSTC_LINKER") {
        let mut arg = std::ffi::OsString::from("linker=");
        arg.push(linker);
        cmd.arg("-C").arg(arg);
    }
    let status = cmd.status().expect("run rustc for the stub library");
    assert!(status.success(), "building the stub library failed");
    // Renamed over, like the full library: a running program may map it.
    std::fs::rename(&tmp, out).unwrap_or_else(|e| panic!("rename {}: {e}", tmp.display()));
}

/// Runs `cargo build --release --lib` of this same package into a private
/// target directory, and copies the resulting `libtiexec.so` to `embedded`.
fn build_preload_library(out_dir: &std::path::Path, embedded: &std::path::Path) {
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("manifest dir"));
    let target_dir = out_dir.join("preload-target");
    let mut cmd = Command::new(cargo);
    cmd.arg("build")
        .arg("--release")
        .arg("--lib")
        .arg("--manifest-path")
        .arg(manifest_dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        // The archive given to tests is the one a C program would link.
        .arg("--features")
        .arg("constructor")
        .env("TIEXEC_INNER_BUILD", "1")
        // Symbols stay (backtraces name functions); debug info does not.
        .env("CARGO_PROFILE_RELEASE_DEBUG", "0")
        .env("CARGO_PROFILE_RELEASE_STRIP", "debuginfo");
    if let Ok(target) = env::var("TARGET") {
        cmd.arg("--target").arg(target);
    }
    // The outer cargo may run under clippy or another wrapper; the embedded
    // library is an ordinary build.
    for var in [
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET_DIR",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_PRIMARY_PACKAGE",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd
        .status()
        .expect("run cargo for the embedded preload library");
    assert!(
        status.success(),
        "building the embedded libtiexec.so failed"
    );
    let target = env::var("TARGET").unwrap_or_default();
    let built = target_dir
        .join(&target)
        .join("release")
        .join("libtiexec.so");
    // Copy, then rename over: a test or program may have the previous
    // library mapped (LD_PRELOAD), and writing into that file in place would
    // change its code under it. A rename leaves it the old inode.
    let tmp = embedded.with_extension("so.tmp");
    std::fs::copy(&built, &tmp)
        .unwrap_or_else(|e| panic!("copy {} -> {}: {e}", built.display(), tmp.display()));
    std::fs::rename(&tmp, embedded)
        .unwrap_or_else(|e| panic!("rename {} -> {}: {e}", tmp.display(), embedded.display()));
    // The static archive, for the tests of programs that link tiexec in.
    let archive = target_dir.join(&target).join("release").join("libtiexec.a");
    let staticlib = out_dir.join("libtiexec-static.a");
    let tmp = staticlib.with_extension("a.tmp");
    std::fs::copy(&archive, &tmp).unwrap_or_else(|e| panic!("copy {}: {e}", archive.display()));
    std::fs::rename(&tmp, &staticlib).unwrap_or_else(|e| panic!("rename {}: {e}", tmp.display()));
}
