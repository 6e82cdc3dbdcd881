//! The wrapper's first code, run before the dynamic loader.
//!
//! `tiexec` is linked without a program interpreter (`--no-dynamic-linker`,
//! entry [`tiexec_start`]: see build.rs), so the kernel maps only its own
//! file and starts it here. Why: the dynamic loader maps the C library and
//! the unwinder (~2.5 MiB) before any of tiexec's code can run, and under a
//! tight `ulimit -v` it failed there, so a program that alone would have run
//! did not start under tiexec. Here tiexec decides first, with only its own
//! image mapped:
//!
//! 1. Under an address-space limit too tight for the wrapper (its image and
//!    [`ROOM_FOR_THE_WRAPPER`]), a run execs PROGRAM directly: found as
//!    `path::find` finds it, with the wrapper's messages and exit statuses,
//!    the environment and everything else unchanged. The wrapper would not
//!    have acted there anyway (run.rs gives no preload below
//!    `TIGHTEST_LIMIT`, which is larger).
//! 2. Otherwise it maps the dynamic loader ([`LOADER`]) as the kernel maps a
//!    program's interpreter, hands it a program header table that names it
//!    (`PT_INTERP`) and says where this image is (`PT_PHDR`), and jumps to
//!    it with the stack as the kernel left it. The loader loads the C
//!    library and comes back to [`tiexec_start`], this time with its
//!    finaliser in the first argument register, which goes on to the C
//!    runtime's `_start`: from there the wrapper runs as any dynamically
//!    linked program does.
//!
//! When mapping the loader fails, a run goes on as in 1 and says why.
//!
//! What this code may not do, because no library is loaded yet: call the
//! C library (its GOT slots are empty), which rules out what the compiler
//! turns into such calls (`memcpy`, `memset` for moves and fills larger
//! than a few words, `strlen` for a scanning loop), panicking (the panic
//! machinery writes and aborts through it), allocating, and thread-local
//! storage. The entry applies this image's own relative relocations first,
//! so pointers to its own code and data, and its GOT slots for them, hold
//! their values. So it uses system calls through `asm!`, scalars, raw
//! pointers and byte strings, small values only, and a scratch area the
//! entry cuts from the stack; bytes are read and written through
//! `read_volatile`/`write_volatile`, which the compiler cannot merge into
//! library calls. `hostile_use::the_first_code_calls_nothing_the_loader_has_not_loaded`
//! checks the rule on the disassembly of the debug and release builds (it
//! caught a closure move the debug build made with `memcpy`); integration
//! tests run both paths (every test runs path 2; `hostile_use` runs path 1
//! across limits and for each way a lookup or an exec can fail, and the
//! failure of path 2 through `TIEXEC_FAULT=wrapper-loader`).

#![allow(unsafe_code)]

use core::ptr::{read_volatile, write_volatile};

/// The dynamic loader, as build.rs found it (the interpreter of its own
/// executable on a native build, the architecture's standard path on a
/// cross build), NUL-terminated.
static LOADER: [u8; LOADER_LEN] = loader_bytes();
const LOADER_LEN: usize = env!("TIEXEC_LOADER").len() + 1;
const fn loader_bytes() -> [u8; LOADER_LEN] {
    let mut out = [0u8; LOADER_LEN];
    let s = env!("TIEXEC_LOADER").as_bytes();
    let mut i = 0;
    while i < s.len() {
        out[i] = s[i];
        i += 1;
    }
    out
}

/// Address space the wrapper needs beyond its own image: the loader, the C
/// library and the unwinder (~2.5 MiB), its heap and stack, and the files it
/// maps to read headers. Measured: the release wrapper ran a program from
/// 3.6 MiB of `ulimit -v` with a 1.2 MiB image, 2.4 MiB beyond it; this is
/// over six times that, so that a wrapper that starts never fails later for
/// lack of room (below 96 MiB it does not preload anyway).
pub const ROOM_FOR_THE_WRAPPER: u64 = 16 << 20;

/// Bytes the entry reserves below the initial stack for this code: two
/// paths of `PATH_MAX` and a page for a `stat` buffer, an ELF header and a
/// message.
const SCRATCH: usize = 3 * 4096;
const PATH_MAX: usize = 4096;

// The ELF numbers the entry needs (gABI; psABIs for the relocation types).
const DT_RELA: u64 = 7;
const DT_RELASZ: u64 = 8;
#[cfg(target_arch = "x86_64")]
const R_RELATIVE: u32 = 8; // R_X86_64_RELATIVE
#[cfg(target_arch = "aarch64")]
const R_RELATIVE: u32 = 1027; // R_AARCH64_RELATIVE

// The entry. From the loader (its finaliser in the first argument
// register; from the kernel that register is 0): on to the C runtime's
// `_start`. From the kernel: first apply this image's relative relocations
// (`DT_RELA` entries of type `R_RELATIVE`: base + addend), as a static PIE
// starts, so that the Rust code may use its GOT (debug builds call core's
// functions through it); the loader applies them again later, to the same
// values. Then [`first_steps`] on a stack with [`SCRATCH`] bytes cut from
// it, and into the loader it returns, with the stack as the kernel left it.
// (`DT_RELR`, packed relocations, are not applied here: no linker emits them
// without `-z pack-relative-relocs`, which this build does not pass.) The
// image's base is its ELF header's address: a PIE's first segment loads
// file offset 0 at address 0.
#[cfg(target_arch = "x86_64")]
core::arch::global_asm!(
    ".globl tiexec_start",
    ".type tiexec_start,@function",
    "tiexec_start:",
    "test rdx, rdx",
    "jnz _start",
    "lea r8, [rip + __ehdr_start]",
    "lea r9, [rip + _DYNAMIC]",
    "xor r10d, r10d",
    "xor r11d, r11d",
    "2:",
    "mov rax, [r9]",
    "test rax, rax",
    "jz 4f",
    "cmp rax, {dt_rela}",
    "jne 3f",
    "mov r10, [r9 + 8]",
    "3:",
    "cmp rax, {dt_relasz}",
    "jne 5f",
    "mov r11, [r9 + 8]",
    "5:",
    "add r9, 16",
    "jmp 2b",
    "4:",
    "add r10, r8",
    "add r11, r10",
    "6:",
    "cmp r10, r11",
    "jae 7f",
    "cmp dword ptr [r10 + 8], {r_relative}",
    "jne 8f",
    "mov rax, [r10 + 16]",
    "add rax, r8",
    "mov rcx, [r10]",
    "mov [r8 + rcx], rax",
    "8:",
    "add r10, 24",
    "jmp 6b",
    "7:",
    "mov rdi, rsp",
    "mov rsi, r8",
    "mov rbx, rsp",
    "sub rsp, {scratch}",
    "mov rdx, rsp",
    "and rsp, -16",
    "call {first_steps}",
    "mov rsp, rbx",
    "xor edx, edx",
    "jmp rax",
    dt_rela = const DT_RELA,
    dt_relasz = const DT_RELASZ,
    r_relative = const R_RELATIVE,
    scratch = const SCRATCH,
    first_steps = sym first_steps,
);

#[cfg(target_arch = "aarch64")]
core::arch::global_asm!(
    ".globl tiexec_start",
    ".type tiexec_start,%function",
    "tiexec_start:",
    "cbz x0, 2f",
    "b _start",
    "2:",
    "adrp x8, __ehdr_start",
    "add x8, x8, :lo12:__ehdr_start",
    "adrp x9, _DYNAMIC",
    "add x9, x9, :lo12:_DYNAMIC",
    "mov x10, xzr",
    "mov x11, xzr",
    "3:",
    "ldr x12, [x9]",
    "cbz x12, 5f",
    "cmp x12, {dt_rela}",
    "b.ne 4f",
    "ldr x10, [x9, 8]",
    "4:",
    "cmp x12, {dt_relasz}",
    "b.ne 6f",
    "ldr x11, [x9, 8]",
    "6:",
    "add x9, x9, 16",
    "b 3b",
    "5:",
    "add x10, x10, x8",
    "add x11, x11, x10",
    "7:",
    "cmp x10, x11",
    "b.hs 8f",
    "ldr w12, [x10, 8]",
    "cmp w12, {r_relative}",
    "b.ne 9f",
    "ldr x12, [x10, 16]",
    "add x12, x12, x8",
    "ldr x13, [x10]",
    "str x12, [x8, x13]",
    "9:",
    "add x10, x10, 24",
    "b 7b",
    "8:",
    "mov x0, sp",
    "mov x1, x8",
    "mov x19, sp",
    "mov x9, {scratch}",
    "sub x2, x19, x9",
    "mov sp, x2",
    "bl {first_steps}",
    "mov sp, x19",
    "mov x16, x0",
    "mov x0, xzr",
    "br x16",
    dt_rela = const DT_RELA,
    dt_relasz = const DT_RELASZ,
    r_relative = const R_RELATIVE,
    scratch = const SCRATCH,
    first_steps = sym first_steps,
);

// ---------------------------------------------------------------------------
// System calls. Numbers from libc's constants; results as -errno.

#[cfg(target_arch = "x86_64")]
unsafe fn syscall(n: libc::c_long, a: [usize; 6]) -> isize {
    let ret: isize;
    // SAFETY: the caller passes arguments valid for system call `n`.
    core::arch::asm!(
        "syscall",
        inlateout("rax") n as isize => ret,
        in("rdi") a[0], in("rsi") a[1], in("rdx") a[2],
        in("r10") a[3], in("r8") a[4], in("r9") a[5],
        lateout("rcx") _, lateout("r11") _,
        options(nostack),
    );
    ret
}

#[cfg(target_arch = "aarch64")]
unsafe fn syscall(n: libc::c_long, a: [usize; 6]) -> isize {
    let ret: isize;
    // SAFETY: the caller passes arguments valid for system call `n`.
    core::arch::asm!(
        "svc 0",
        in("x8") n,
        inlateout("x0") a[0] => ret,
        in("x1") a[1], in("x2") a[2], in("x3") a[3], in("x4") a[4], in("x5") a[5],
        options(nostack),
    );
    ret
}

/// An errno value.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Errno(i32);

fn check(ret: isize) -> Result<usize, Errno> {
    if (-4095..0).contains(&ret) {
        Err(Errno(ret.wrapping_neg() as i32))
    } else {
        Ok(ret as usize)
    }
}

unsafe fn write_all(fd: usize, p: *const u8, len: usize) {
    let mut done = 0;
    while done < len {
        let r = syscall(
            libc::SYS_write,
            [fd, p as usize + done, len - done, 0, 0, 0],
        );
        match check(r) {
            Ok(0) | Err(_) => return,
            Ok(n) => done += n,
        }
    }
}

unsafe fn exit(status: i32) -> ! {
    loop {
        syscall(libc::SYS_exit_group, [status as usize, 0, 0, 0, 0, 0]);
    }
}

unsafe fn execve(path: *const u8, argv: *const *const u8, envp: *const *const u8) -> Errno {
    let r = syscall(
        libc::SYS_execve,
        [path as usize, argv as usize, envp as usize, 0, 0, 0],
    );
    match check(r) {
        Err(e) => e,
        Ok(_) => Errno(0),
    }
}

/// `st_mode` of `path` (`stat`, or `lstat` with `nofollow`).
unsafe fn file_mode(path: *const u8, nofollow: bool, buf: *mut u8) -> Option<u32> {
    let flags = if nofollow {
        libc::AT_SYMLINK_NOFOLLOW
    } else {
        0
    };
    let r = syscall(
        libc::SYS_newfstatat,
        [
            libc::AT_FDCWD as usize,
            path as usize,
            buf as usize,
            flags as usize,
            0,
            0,
        ],
    );
    check(r).ok()?;
    let at = buf.add(core::mem::offset_of!(libc::stat, st_mode));
    Some(read_volatile(at as *const u32))
}

// ---------------------------------------------------------------------------
// Bytes.

unsafe fn byte(p: *const u8, i: usize) -> u8 {
    read_volatile(p.add(i))
}

unsafe fn c_len(p: *const u8) -> usize {
    let mut n = 0;
    while byte(p, n) != 0 {
        n += 1;
    }
    n
}

/// Whether the `len` bytes at `p` are `word`.
unsafe fn equals(p: *const u8, len: usize, word: &[u8]) -> bool {
    if len != word.len() {
        return false;
    }
    let mut i = 0;
    while i < len {
        if byte(p, i) != byte(word.as_ptr(), i) {
            return false;
        }
        i += 1;
    }
    true
}

/// Whether `list` (words each followed by a space) holds the `len` bytes
/// at `p`.
unsafe fn listed(p: *const u8, len: usize, list: &[u8]) -> bool {
    let mut start = 0;
    let mut i = 0;
    while i < list.len() {
        if byte(list.as_ptr(), i) == b' ' {
            // SAFETY: `start..i` lies within `list` (no bounds check, which
            // could panic).
            let word = core::slice::from_raw_parts(list.as_ptr().add(start), i - start);
            if equals(p, len, word) {
                return true;
            }
            start = i + 1;
        }
        i += 1;
    }
    false
}

/// The value of `NAME=` in the environment, if set.
unsafe fn getenv(envp: *const *const u8, name: &[u8]) -> Option<*const u8> {
    let mut e = envp;
    loop {
        let entry = read_volatile(e);
        if entry.is_null() {
            return None;
        }
        let mut i = 0;
        while i < name.len() && byte(entry, i) == byte(name.as_ptr(), i) {
            i += 1;
        }
        if i == name.len() && byte(entry, i) == b'=' {
            return Some(entry.add(i + 1));
        }
        e = e.add(1);
    }
}

/// A line assembled in a buffer, written with one `write(2)`.
struct Line {
    buf: *mut u8,
    len: usize,
    cap: usize,
}

impl Line {
    unsafe fn new(buf: *mut u8, cap: usize) -> Line {
        Line { buf, len: 0, cap }
    }

    unsafe fn raw(&mut self, p: *const u8, len: usize) -> &mut Line {
        let mut i = 0;
        while i < len && self.len < self.cap {
            write_volatile(self.buf.add(self.len), byte(p, i));
            self.len += 1;
            i += 1;
        }
        self
    }

    unsafe fn text(&mut self, s: &[u8]) -> &mut Line {
        self.raw(s.as_ptr(), s.len())
    }

    unsafe fn c_str(&mut self, p: *const u8) -> &mut Line {
        self.raw(p, c_len(p))
    }

    unsafe fn number(&mut self, mut n: u64) -> &mut Line {
        // Digits, most significant first, without a buffer of our own.
        let mut scale = 1u64;
        while n / scale >= 10 {
            scale *= 10;
        }
        loop {
            let d = b'0' + (n / scale) as u8;
            self.raw(&d, 1);
            n %= scale;
            if scale == 1 {
                return self;
            }
            scale /= 10;
        }
    }

    /// As `tiexec::internal::log::Bytes` shows sizes.
    unsafe fn bytes(&mut self, b: u64) -> &mut Line {
        const KIB: u64 = 1024;
        const MIB: u64 = 1024 * KIB;
        const GIB: u64 = 1024 * MIB;
        if b >= GIB {
            self.number(b / GIB)
                .text(b".")
                .number((b % GIB) * 10 / GIB)
                .text(b" GiB")
        } else if b >= MIB {
            self.number(b / MIB)
                .text(b".")
                .number((b % MIB) * 10 / MIB)
                .text(b" MiB")
        } else if b >= KIB {
            self.number(b / KIB).text(b" KiB")
        } else {
            self.number(b).text(b" B")
        }
    }

    /// As Rust's `std::io::Error` shows an OS error.
    unsafe fn error(&mut self, e: Errno) -> &mut Line {
        // One string, not a table of slices: a table would hold pointers.
        const TEXTS: &[u8] = b"\x01Operation not permitted\0\x02No such file or directory\0\
            \x05Input/output error\0\x07Argument list too long\0\x08Exec format error\0\
            \x0cCannot allocate memory\0\x0dPermission denied\0\x0eBad address\0\
            \x14Not a directory\0\x15Is a directory\0\x16Invalid argument\0\
            \x1aText file busy\0\x24File name too long\0\
            \x28Too many levels of symbolic links\0\x50Accessing a corrupted shared library\0";
        let mut i = 0;
        let mut found = false;
        while i < TEXTS.len() {
            let code = byte(TEXTS.as_ptr(), i);
            let text = TEXTS.as_ptr().add(i + 1);
            if i32::from(code) == e.0 {
                self.c_str(text);
                found = true;
                break;
            }
            i += 1 + c_len(text) + 1;
        }
        if !found {
            self.text(b"Unknown error ").number(e.0 as u64);
        }
        self.text(b" (os error ").number(e.0 as u64).text(b")")
    }

    unsafe fn write_line(&mut self) {
        self.text(b"\n");
        write_all(2, self.buf, self.len);
    }
}

// ---------------------------------------------------------------------------
// The command line, as args.rs reads it (lexopt's rules), only as far as
// finding PROGRAM. The tables are tested against `args::run_options`.

/// Long options that take a value.
pub(crate) const LONG_WITH_VALUE: &[u8] =
    b"backend log strategy include exclude min-text report cache-dir state-dir library ";
/// Long options that take none (help and version print, not run).
pub(crate) const LONG_FLAGS: &[u8] = b"verbose dlopen no-prime no-children perf-map ";
/// Short options that take a value.
pub(crate) const SHORT_WITH_VALUE: &[u8] = b"bls";
/// Short options that take none.
pub(crate) const SHORT_FLAGS: &[u8] = b"v";
/// The management commands (recognised only as the first argument).
pub(crate) const COMMANDS: &[u8] =
    b"--setup --cache --stat --check --prime --print-library --man --completions ";

/// Words that named tiexec's commands before they became options (as
/// run.rs's `FORMER_COMMANDS`, but `run`, which has a hint of its own).
pub(crate) const FORMER_COMMANDS: &[u8] = b"stat check prime setup cache ";

/// What the command line asks for, as far as this code needs to know.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct Request {
    /// PROGRAM's index in argv: a run. None: anything else (a command,
    /// help, version, or a usage error), which only the full wrapper does.
    pub program: Option<usize>,
    /// The log level the options ask for is info or debug (`-v`,
    /// `--log info`); None: the options do not say.
    pub verbose: Option<bool>,
}

fn verbose_level(value: *const u8) -> bool {
    // SAFETY: a NUL-terminated argument or environment value.
    unsafe {
        let len = c_len(value);
        equals(value, len, b"info") || equals(value, len, b"debug")
    }
}

/// Reads the command line (`argc` words at `argv`).
///
/// # Safety
/// `argv` holds `argc` NUL-terminated strings.
pub(crate) unsafe fn read_request(argc: usize, argv: *const *const u8) -> Request {
    let mut out = Request {
        program: None,
        verbose: None,
    };
    let arg = |i: usize| read_volatile(argv.add(i));
    if argc > 1 {
        let first = arg(1);
        if listed(first, c_len(first), COMMANDS) {
            return out;
        }
    }
    let mut i = 1;
    while i < argc {
        let a = arg(i);
        let len = c_len(a);
        if equals(a, len, b"--") {
            if i + 1 < argc {
                out.program = Some(i + 1);
            }
            return out;
        }
        if len > 2 && byte(a, 0) == b'-' && byte(a, 1) == b'-' {
            let name = a.add(2);
            let mut name_len = 0;
            while name_len < len - 2 && byte(name, name_len) != b'=' {
                name_len += 1;
            }
            let inline_value = name_len < len - 2;
            if listed(name, name_len, LONG_WITH_VALUE) {
                let value = if inline_value {
                    name.add(name_len + 1)
                } else if i + 1 < argc {
                    i += 1;
                    arg(i)
                } else {
                    return out;
                };
                if equals(name, name_len, b"log") {
                    out.verbose = Some(verbose_level(value));
                }
            } else if listed(name, name_len, LONG_FLAGS) && !inline_value {
                if equals(name, name_len, b"verbose") {
                    out.verbose = Some(true);
                }
            } else {
                // --help, --version, or a usage error.
                return out;
            }
            i += 1;
            continue;
        }
        if len > 1 && byte(a, 0) == b'-' {
            let mut j = 1;
            while j < len {
                let c = byte(a, j);
                if listed_char(c, SHORT_WITH_VALUE) {
                    let value = if j + 1 < len {
                        a.add(j + 1)
                    } else if i + 1 < argc {
                        i += 1;
                        arg(i)
                    } else {
                        return out;
                    };
                    if c == b'l' {
                        out.verbose = Some(verbose_level(value));
                    }
                    break;
                } else if listed_char(c, SHORT_FLAGS) {
                    if c == b'v' {
                        out.verbose = Some(true);
                    }
                } else {
                    // -h, -V, or a usage error.
                    return out;
                }
                j += 1;
            }
            i += 1;
            continue;
        }
        out.program = Some(i);
        return out;
    }
    out
}

fn listed_char(c: u8, list: &[u8]) -> bool {
    let mut i = 0;
    while i < list.len() {
        // SAFETY: within `list`.
        if unsafe { byte(list.as_ptr(), i) } == c {
            return true;
        }
        i += 1;
    }
    false
}

// ---------------------------------------------------------------------------
// Path 1: exec PROGRAM as the wrapper would without acting.

/// Where PROGRAM is (see `path::Lookup`).
enum Lookup {
    Found(*const u8),
    NotFound,
    NotExecutable(*const u8),
}

unsafe fn is_executable_file(path: *const u8, stat_buf: *mut u8) -> bool {
    match file_mode(path, false, stat_buf) {
        Some(mode) if mode & libc::S_IFMT == libc::S_IFREG => {
            let r = syscall(
                libc::SYS_faccessat,
                [
                    libc::AT_FDCWD as usize,
                    path as usize,
                    libc::X_OK as usize,
                    0,
                    0,
                    0,
                ],
            );
            check(r).is_ok()
        }
        _ => false,
    }
}

/// `path::find`, into `found`/`denied` (each `PATH_MAX` bytes).
unsafe fn find(
    program: *const u8,
    envp: *const *const u8,
    found: *mut u8,
    denied: *mut u8,
    stat_buf: *mut u8,
) -> Lookup {
    let len = c_len(program);
    let mut i = 0;
    while i < len {
        if byte(program, i) == b'/' {
            return if is_executable_file(program, stat_buf) {
                Lookup::Found(program)
            } else if file_mode(program, false, stat_buf).is_some() {
                Lookup::NotExecutable(program)
            } else {
                Lookup::NotFound
            };
        }
        i += 1;
    }
    let default: &[u8] = b"/usr/local/bin:/usr/bin:/bin\0";
    let path_var = getenv(envp, b"PATH").unwrap_or(default.as_ptr());
    let mut have_denied = false;
    let mut start = 0;
    loop {
        let mut end = start;
        while byte(path_var, end) != 0 && byte(path_var, end) != b':' {
            end += 1;
        }
        // dir + "/" + program + NUL; an empty entry is ".".
        let mut line = Line::new(found, PATH_MAX);
        if end == start {
            line.text(b".");
        } else {
            line.raw(path_var.add(start), end - start);
        }
        if byte(found, line.len - 1) != b'/' {
            line.text(b"/");
        }
        line.raw(program, len);
        let fits = line.len < PATH_MAX;
        line.text(b"\0");
        if fits {
            if is_executable_file(found, stat_buf) {
                return Lookup::Found(found);
            }
            if !have_denied && file_mode(found, true, stat_buf).is_some() {
                let mut copy = Line::new(denied, PATH_MAX);
                copy.raw(found, line.len);
                have_denied = true;
            }
        }
        if byte(path_var, end) == 0 {
            break;
        }
        start = end + 1;
    }
    if have_denied {
        Lookup::NotExecutable(denied)
    } else {
        Lookup::NotFound
    }
}

/// Why tiexec runs PROGRAM without itself, when that is to be said.
#[derive(Clone, Copy)]
enum Why {
    /// Nothing to say (the default log level, under a tight limit).
    Unsaid,
    /// The address-space limit (said with `-v`, as run.rs says it).
    Limit(u64),
    /// The loader (the path) could not be mapped (always said).
    NoLoader(*const u8, Errno),
}

impl Line {
    unsafe fn why(&mut self, why: Why) -> &mut Line {
        match why {
            Why::Unsaid => self,
            Why::Limit(limit) => self
                .text(b"tiexec: address-space limit (ulimit -v) of ")
                .bytes(limit)
                .text(b": too little for tiexec to work in"),
            Why::NoLoader(path, e) => self
                .text(b"tiexec: cannot map the dynamic loader ")
                .c_str(path)
                .text(b": ")
                .error(e),
        }
    }
}

/// Execs PROGRAM (`argv[index]`, its arguments after it) without tiexec,
/// as run.rs does: same lookup, messages and statuses, environment as it
/// is. `why` is said first (unless unsaid).
unsafe fn run_without_tiexec(
    argv: *mut *const u8,
    index: usize,
    envp: *const *const u8,
    scratch: *mut u8,
    why: Why,
) -> ! {
    let found_buf = scratch;
    let denied_buf = scratch.add(PATH_MAX);
    let misc = scratch.add(2 * PATH_MAX);
    let program = read_volatile(argv.add(index));
    let mut line = Line::new(misc, 4096);
    let path = match find(program, envp, found_buf, denied_buf, misc) {
        Lookup::Found(p) => p,
        Lookup::NotFound => {
            line.text(b"tiexec: ")
                .c_str(program)
                .text(b": command not found");
            // run.rs's hint for words that named tiexec's commands once.
            let len = c_len(program);
            if equals(program, len, b"run") {
                line.text(b" (tiexec runs PROGRAM without a command word: tiexec PROGRAM)");
            } else if listed(program, len, FORMER_COMMANDS) {
                line.text(b" (tiexec's own commands are options now: tiexec --")
                    .c_str(program)
                    .text(b")");
            }
            line.write_line();
            exit(127);
        }
        Lookup::NotExecutable(p) => {
            line.text(b"tiexec: ").c_str(p).text(b": Permission denied");
            line.write_line();
            exit(126);
        }
    };
    if !matches!(why, Why::Unsaid) {
        line.why(why);
        line.text(b"; running ").c_str(program).text(b" without it");
        line.write_line();
        line = Line::new(misc, 4096);
    }
    let err = execve(path, argv.add(index), envp);
    let err = if err == Errno(libc::ENOEXEC) {
        // As execvp: a file the kernel cannot run for its format runs with
        // /bin/sh. argv[index - 1] is one of tiexec's own words (index >= 1).
        write_volatile(argv.add(index - 1), c"/bin/sh".as_ptr().cast());
        write_volatile(argv.add(index), path);
        execve(c"/bin/sh".as_ptr().cast(), argv.add(index - 1), envp)
    } else {
        err
    };
    line.text(b"tiexec: ").c_str(path).text(b": ").error(err);
    line.write_line();
    exit(if err == Errno(libc::ENOENT) { 127 } else { 126 });
}

// ---------------------------------------------------------------------------
// Path 2: map the dynamic loader.

/// An ELF64 field: `n` bytes, little-endian, at `p + at`.
unsafe fn field(p: *const u8, at: usize, n: usize) -> u64 {
    let mut v = 0u64;
    let mut i = n;
    while i > 0 {
        i -= 1;
        v = (v << 8) | u64::from(byte(p, at + i));
    }
    v
}

unsafe fn put(p: *mut u8, at: usize, n: usize, v: u64) {
    let mut i = 0;
    while i < n {
        write_volatile(p.add(at + i), (v >> (8 * i)) as u8);
        i += 1;
    }
}

/// A field of one of libc's ELF64 structures: its offset and width, from the
/// structure's definition (the compiler's numbers, not ours).
#[derive(Clone, Copy)]
struct Field {
    at: usize,
    len: usize,
}

const fn width<T, F>(_: fn(&T) -> &F) -> usize {
    core::mem::size_of::<F>()
}

macro_rules! elf_field {
    ($ty:ident, $f:ident) => {
        Field {
            at: core::mem::offset_of!(libc::$ty, $f),
            len: width(|s: &libc::$ty| &s.$f),
        }
    };
}

const E_IDENT: usize = core::mem::offset_of!(libc::Elf64_Ehdr, e_ident);
const E_MAGIC: Field = Field {
    at: E_IDENT,
    len: 4,
};
const E_CLASS: Field = Field {
    at: E_IDENT + libc::EI_CLASS,
    len: 1,
};
const E_DATA: Field = Field {
    at: E_IDENT + libc::EI_DATA,
    len: 1,
};
const E_TYPE: Field = elf_field!(Elf64_Ehdr, e_type);
const E_MACHINE: Field = elf_field!(Elf64_Ehdr, e_machine);
const E_ENTRY: Field = elf_field!(Elf64_Ehdr, e_entry);
const E_PHOFF: Field = elf_field!(Elf64_Ehdr, e_phoff);
const E_PHENTSIZE: Field = elf_field!(Elf64_Ehdr, e_phentsize);
const E_PHNUM: Field = elf_field!(Elf64_Ehdr, e_phnum);
const PHDR_SIZE: usize = core::mem::size_of::<libc::Elf64_Phdr>();
const P_TYPE: Field = elf_field!(Elf64_Phdr, p_type);
const P_FLAGS: Field = elf_field!(Elf64_Phdr, p_flags);
const P_OFFSET: Field = elf_field!(Elf64_Phdr, p_offset);
const P_VADDR: Field = elf_field!(Elf64_Phdr, p_vaddr);
const P_PADDR: Field = elf_field!(Elf64_Phdr, p_paddr);
const P_FILESZ: Field = elf_field!(Elf64_Phdr, p_filesz);
const P_MEMSZ: Field = elf_field!(Elf64_Phdr, p_memsz);
const P_ALIGN: Field = elf_field!(Elf64_Phdr, p_align);
const RLIM_CUR: Field = elf_field!(rlimit64, rlim_cur);

/// `f` of the structure at `p`.
unsafe fn get(p: *const u8, f: Field) -> u64 {
    field(p, f.at, f.len)
}

/// Sets `f` of the structure at `p` to `v`.
unsafe fn set(p: *mut u8, f: Field, v: u64) {
    put(p, f.at, f.len, v)
}

#[cfg(target_arch = "x86_64")]
const MACHINE: u64 = libc::EM_X86_64 as u64;
#[cfg(target_arch = "aarch64")]
const MACHINE: u64 = libc::EM_AARCH64 as u64;

fn round_down(x: usize, page: usize) -> usize {
    x & !(page - 1)
}

fn round_up(x: usize, page: usize) -> usize {
    x.wrapping_add(page - 1) & !(page - 1)
}

unsafe fn mmap(
    addr: usize,
    len: usize,
    prot: i32,
    flags: i32,
    fd: usize,
    off: usize,
) -> Result<usize, Errno> {
    check(syscall(
        libc::SYS_mmap,
        [addr, len, prot as usize, flags as usize, fd, off],
    ))
}

unsafe fn munmap(addr: usize, len: usize) {
    if len > 0 {
        syscall(libc::SYS_munmap, [addr, len, 0, 0, 0, 0]);
    }
}

/// Maps the ELF shared object open at `fd` (the loader) as the kernel maps
/// an interpreter: its loadable segments at one random base, with their
/// protections and zeroed `.bss`. Returns its base and entry point.
/// `header` is a page of scratch.
unsafe fn map_loader(fd: usize, header: *mut u8, page: usize) -> Result<(usize, usize), Errno> {
    let n = check(syscall(
        libc::SYS_pread64,
        [fd, header as usize, 4096, 0, 0, 0],
    ))?;
    let bad = Err(Errno(libc::ENOEXEC));
    if n < 64
        || get(header, E_MAGIC) != u64::from(u32::from_le_bytes(*b"\x7fELF"))
        || get(header, E_CLASS) != u64::from(libc::ELFCLASS64)
        || get(header, E_DATA) != u64::from(libc::ELFDATA2LSB)
        || get(header, E_TYPE) != u64::from(libc::ET_DYN)
        || get(header, E_MACHINE) != MACHINE
        || get(header, E_PHENTSIZE) != PHDR_SIZE as u64
    {
        return bad;
    }
    let entry = get(header, E_ENTRY) as usize;
    let phoff = get(header, E_PHOFF) as usize;
    let phnum = get(header, E_PHNUM) as usize;
    if phnum == 0 || phoff > n || (n - phoff) / PHDR_SIZE < phnum {
        return bad;
    }
    let ph = |i: usize, f: Field| get(header.add(phoff + i * PHDR_SIZE), f) as usize;

    // The span of the loadable segments, and their largest alignment.
    let (mut lo, mut hi, mut align) = (usize::MAX, 0usize, page);
    for i in 0..phnum {
        if ph(i, P_TYPE) != libc::PT_LOAD as usize {
            continue;
        }
        let vaddr = ph(i, P_VADDR);
        let memsz = ph(i, P_MEMSZ);
        let a = ph(i, P_ALIGN);
        if a.is_power_of_two() && a > align {
            align = a;
        }
        match vaddr.checked_add(memsz) {
            Some(end) if end <= usize::MAX - page => {
                lo = lo.min(round_down(vaddr, page));
                hi = hi.max(round_up(end, page));
            }
            _ => return bad,
        }
    }
    if lo >= hi || hi - lo > (1 << 30) || align > (1 << 30) {
        return bad;
    }
    let span = hi - lo;

    // Reserve the span at the alignment, then map each segment over it.
    let reserved = mmap(
        0,
        span + align,
        libc::PROT_NONE,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
        usize::MAX,
        0,
    )?;
    let start = round_up(reserved, align);
    munmap(reserved, start - reserved);
    munmap(start + span, reserved + span + align - (start + span));
    let base = start.wrapping_sub(lo);
    match map_segments(fd, header, phoff, phnum, base, start, page) {
        Ok(()) => Ok((base, base.wrapping_add(entry))),
        Err(e) => {
            munmap(start, span);
            Err(e)
        }
    }
}

/// Maps the loadable segments of the object at `fd` (program headers at
/// `header + phoff`) at `base`, over the reservation that begins at
/// `start`.
unsafe fn map_segments(
    fd: usize,
    header: *const u8,
    phoff: usize,
    phnum: usize,
    base: usize,
    start: usize,
    page: usize,
) -> Result<(), Errno> {
    let ph = |i: usize, f: Field| get(header.add(phoff + i * PHDR_SIZE), f) as usize;
    let mut mapped_to = start;
    for i in 0..phnum {
        if ph(i, P_TYPE) != libc::PT_LOAD as usize {
            continue;
        }
        let flags = ph(i, P_FLAGS);
        let mut prot = 0;
        if flags & 4 != 0 {
            prot |= libc::PROT_READ;
        }
        if flags & 2 != 0 {
            prot |= libc::PROT_WRITE;
        }
        if flags & 1 != 0 {
            prot |= libc::PROT_EXEC;
        }
        let seg = base.wrapping_add(ph(i, P_VADDR));
        let offset = ph(i, P_OFFSET);
        let filesz = ph(i, P_FILESZ);
        let memsz = ph(i, P_MEMSZ);
        let first_page = round_down(seg, page);
        if offset % page != seg % page || filesz > memsz || first_page < mapped_to {
            return Err(Errno(libc::ENOEXEC));
        }
        // Whatever lies between the previous segment and this one stays
        // unmapped, as the kernel leaves it.
        munmap(mapped_to, first_page - mapped_to);
        let file_end = seg + filesz;
        if filesz > 0 {
            let len = round_up(file_end, page) - first_page;
            mmap(
                first_page,
                len,
                prot,
                libc::MAP_PRIVATE | libc::MAP_FIXED,
                fd,
                offset - (seg - first_page),
            )?;
        }
        let mem_end = seg + memsz;
        if memsz > filesz {
            // .bss: the rest of the last file page is zeroed (to the end
            // of the page, as the kernel does: the loader's first
            // allocations take that room and count on zeros), whole pages
            // beyond it are anonymous.
            if filesz > 0 && file_end % page != 0 {
                if prot & libc::PROT_WRITE == 0 {
                    return Err(Errno(libc::ENOEXEC));
                }
                let mut p = file_end;
                while p < round_up(file_end, page) {
                    write_volatile(p as *mut u8, 0);
                    p += 1;
                }
            }
            let anon_start = if filesz > 0 {
                round_up(file_end, page)
            } else {
                first_page
            };
            let anon_end = round_up(mem_end, page);
            if anon_end > anon_start {
                mmap(
                    anon_start,
                    anon_end - anon_start,
                    prot,
                    libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_ANONYMOUS,
                    usize::MAX,
                    0,
                )?;
            }
        }
        mapped_to = round_up(mem_end, page);
    }
    Ok(())
}

/// Opens and maps the loader at `path`; see [`map_loader`].
unsafe fn load_loader(
    path: *const u8,
    header: *mut u8,
    page: usize,
) -> Result<(usize, usize), Errno> {
    let fd = check(syscall(
        libc::SYS_openat,
        [
            libc::AT_FDCWD as usize,
            path as usize,
            (libc::O_RDONLY | libc::O_CLOEXEC) as usize,
            0,
            0,
            0,
        ],
    ))?;
    let r = map_loader(fd, header, page);
    syscall(libc::SYS_close, [fd, 0, 0, 0, 0, 0]);
    r
}

/// This image's program header table as the loader must see it: a
/// `PT_PHDR` first (the loader computes the image's base from it, and the
/// linker leaves it out without an interpreter) and a `PT_INTERP` naming
/// [`LOADER`] (the loader takes its own name from it), then the image's
/// own headers but a `PT_PHDR`. In a page of its own: the loader keeps
/// pointing at it for the life of the process.
unsafe fn program_headers_for_loader(
    phdr: usize,
    phnum: usize,
    bias: usize,
    page: usize,
) -> Result<(usize, usize), Errno> {
    let count = phnum + 2;
    if count * PHDR_SIZE > page {
        return Err(Errno(libc::ENOEXEC));
    }
    let table = mmap(
        0,
        page,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
        usize::MAX,
        0,
    )?;
    let t = table as *mut u8;
    let entry = |i: usize| t.add(i * PHDR_SIZE);
    let self_phdr = entry(0);
    set(self_phdr, P_TYPE, libc::PT_PHDR as u64);
    set(self_phdr, P_FLAGS, libc::PF_R as u64);
    set(self_phdr, P_VADDR, table.wrapping_sub(bias) as u64);
    set(self_phdr, P_PADDR, table.wrapping_sub(bias) as u64);
    set(self_phdr, P_FILESZ, (count * PHDR_SIZE) as u64);
    set(self_phdr, P_MEMSZ, (count * PHDR_SIZE) as u64);
    set(self_phdr, P_ALIGN, 8);
    let interp = entry(1);
    let name = LOADER.as_ptr() as usize;
    set(interp, P_TYPE, libc::PT_INTERP as u64);
    set(interp, P_FLAGS, libc::PF_R as u64);
    set(interp, P_VADDR, name.wrapping_sub(bias) as u64);
    set(interp, P_PADDR, name.wrapping_sub(bias) as u64);
    set(interp, P_FILESZ, LOADER_LEN as u64);
    set(interp, P_MEMSZ, LOADER_LEN as u64);
    set(interp, P_ALIGN, 1);
    let mut n = 2;
    for i in 0..phnum {
        let from = (phdr + i * PHDR_SIZE) as *const u8;
        if get(from, P_TYPE) == libc::PT_PHDR as u64 {
            continue;
        }
        let to = entry(n);
        let mut k = 0;
        while k < PHDR_SIZE {
            write_volatile(to.add(k), byte(from, k));
            k += 1;
        }
        n += 1;
    }
    syscall(
        libc::SYS_mprotect,
        [table, page, libc::PROT_READ as usize, 0, 0, 0],
    );
    Ok((table, n))
}

/// The auxiliary vector's entries this code reads or changes.
struct Aux {
    phdr: *mut usize,
    phnum: *mut usize,
    base: *mut usize,
    page: usize,
}

unsafe fn read_aux(mut a: *mut usize) -> Aux {
    let mut aux = Aux {
        phdr: core::ptr::null_mut(),
        phnum: core::ptr::null_mut(),
        base: core::ptr::null_mut(),
        page: 4096,
    };
    loop {
        let kind = read_volatile(a) as u64;
        let value = a.add(1);
        match kind {
            libc::AT_NULL => return aux,
            libc::AT_PHDR => aux.phdr = value,
            libc::AT_PHNUM => aux.phnum = value,
            libc::AT_BASE => aux.base = value,
            libc::AT_PAGESZ => aux.page = read_volatile(value),
            _ => {}
        }
        a = a.add(2);
    }
}

/// The size of this image's loadable segments.
unsafe fn image_size(phdr: usize, phnum: usize, page: usize) -> u64 {
    let mut total = 0u64;
    for i in 0..phnum {
        let p = (phdr + i * PHDR_SIZE) as *const u8;
        if get(p, P_TYPE) == libc::PT_LOAD as u64 {
            let vaddr = get(p, P_VADDR) as usize;
            let memsz = get(p, P_MEMSZ) as usize;
            total += (round_up(vaddr + memsz, page) - round_down(vaddr, page)) as u64;
        }
    }
    total
}

/// The soft `RLIMIT_AS`, None when unlimited.
unsafe fn address_space_limit(buf: *mut u8) -> Option<u64> {
    let r = syscall(
        libc::SYS_prlimit64,
        [0, libc::RLIMIT_AS as usize, 0, buf as usize, 0, 0],
    );
    check(r).ok()?;
    let soft = get(buf, RLIM_CUR);
    (soft != libc::RLIM_INFINITY).then_some(soft)
}

/// Called by [`tiexec_start`] when the kernel started this image: `sp` is
/// the initial stack (argc, argv, envp, auxv), `ehdr` this image's ELF
/// header, `scratch` [`SCRATCH`] bytes. Returns the loader's entry point,
/// or does not return (PROGRAM was exec'd, or the wrapper exits).
unsafe extern "C" fn first_steps(sp: *mut usize, ehdr: *const u8, scratch: *mut u8) -> usize {
    let argc = read_volatile(sp);
    let argv = sp.add(1) as *mut *const u8;
    let envp = argv.add(argc + 1) as *const *const u8;
    let mut end = envp;
    while !read_volatile(end).is_null() {
        end = end.add(1);
    }
    let aux = read_aux(end.add(1) as *mut usize);
    let misc = scratch.add(2 * PATH_MAX);
    if aux.phdr.is_null() || aux.phnum.is_null() || aux.base.is_null() {
        let mut line = Line::new(misc, 4096);
        line.text(b"tiexec: the kernel gave no program headers");
        line.write_line();
        exit(127);
    }
    let phdr = read_volatile(aux.phdr);
    let phnum = read_volatile(aux.phnum);
    // The kernel's page size (a power of two; anything else would be a
    // kernel bug, and 4 KiB the safe reading of it).
    let page = if aux.page.is_power_of_two() {
        aux.page
    } else {
        4096
    };
    let request = read_request(argc, argv);

    // 1. Too little room for the wrapper: run PROGRAM as it is.
    let limit = address_space_limit(misc);
    let need = image_size(phdr, phnum, page) + ROOM_FOR_THE_WRAPPER;
    if let (Some(limit), Some(index)) = (limit, request.program) {
        if limit < need {
            let why = if verbose(request, envp) {
                Why::Limit(limit)
            } else {
                Why::Unsaid
            };
            run_without_tiexec(argv, index, envp, scratch, why);
        }
    }

    // 2. The loader, and the headers that tell it about this image. This
    // image's base: where its ELF header is, less the address the file
    // gives it (that of the segment loading file offset 0).
    let mut header_vaddr = 0usize;
    for i in 0..phnum {
        let p = (phdr + i * PHDR_SIZE) as *const u8;
        if get(p, P_TYPE) == libc::PT_LOAD as u64 && get(p, P_OFFSET) == 0 {
            header_vaddr = get(p, P_VADDR) as usize;
        }
    }
    let bias = (ehdr as usize).wrapping_sub(header_vaddr);
    // Tests make this step fail (`TIEXEC_FAULT=wrapper-loader`, as
    // `tiexec::internal::fault` makes the library's steps fail): the loader
    // is then looked for where none is. It can only make tiexec stand aside.
    let loader = match getenv(envp, b"TIEXEC_FAULT") {
        Some(v) if equals(v, c_len(v), b"wrapper-loader") => c"/nonexistent/ld.so".as_ptr().cast(),
        _ => LOADER.as_ptr(),
    };
    let failed = match program_headers_for_loader(phdr, phnum, bias, page) {
        Err(e) => e,
        Ok((table, count)) => match load_loader(loader, misc, page) {
            Err(e) => e,
            Ok((base, entry)) => {
                write_volatile(aux.phdr, table);
                write_volatile(aux.phnum, count);
                write_volatile(aux.base, base);
                return entry;
            }
        },
    };
    match request.program {
        Some(index) => {
            run_without_tiexec(argv, index, envp, scratch, Why::NoLoader(loader, failed))
        }
        None => {
            let mut line = Line::new(misc, 4096);
            line.why(Why::NoLoader(loader, failed)).write_line();
            exit(1);
        }
    }
}

/// Whether the wrapper would log at info or above: the options say, else
/// `TIEXEC_LOG`.
unsafe fn verbose(request: Request, envp: *const *const u8) -> bool {
    match request.verbose {
        Some(v) => v,
        None => getenv(envp, b"TIEXEC_LOG").is_some_and(verbose_level),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;

    fn request(words: &[&str]) -> Request {
        let owned: Vec<CString> = std::iter::once("tiexec")
            .chain(words.iter().copied())
            .map(|w| CString::new(w).unwrap())
            .collect();
        let mut ptrs: Vec<*const u8> = owned.iter().map(|c| c.as_ptr().cast()).collect();
        ptrs.push(std::ptr::null());
        // SAFETY: NUL-terminated strings, kept alive by `owned`.
        unsafe { read_request(owned.len(), ptrs.as_ptr()) }
    }

    #[test]
    fn the_program_is_found_where_the_full_parser_finds_it() {
        let cases: [(&[&str], Option<usize>, Option<bool>); 16] = [
            (&["ls", "-l"], Some(1), None),
            (&["-v", "ls"], Some(2), Some(true)),
            (&["-b", "thp", "ls"], Some(3), None),
            (&["-bthp", "ls"], Some(2), None),
            (&["-vb", "thp", "ls"], Some(3), Some(true)),
            (&["--backend=thp", "ls"], Some(2), None),
            (
                &["--backend", "thp", "--log", "debug", "ls"],
                Some(5),
                Some(true),
            ),
            (&["-l", "warn", "ls"], Some(3), Some(false)),
            (&["--", "-v"], Some(2), None),
            (&["--dlopen", "--no-prime", "x"], Some(3), None),
            (&["--check", "ls"], None, None),
            (&["--help"], None, None),
            (&["-V"], None, None),
            (&["--no-such-option", "ls"], None, None),
            (&["-b"], None, None),
            (&["-", "x"], Some(1), None),
        ];
        for (words, program, verbose) in cases {
            let got = request(words);
            assert_eq!(got.program, program, "{words:?}");
            assert_eq!(got.verbose, verbose, "{words:?}");
            // The full parser agrees on the program.
            let parsed = crate::args::parse(words.iter().map(std::ffi::OsString::from));
            match (&parsed, program) {
                (crate::args::Parsed::Run(a), Some(i)) => {
                    assert_eq!(a.program, words[i - 1], "{words:?}")
                }
                (crate::args::Parsed::Run(_), None) => panic!("{words:?}: a run"),
                (_, Some(_)) => panic!("{words:?}: not a run"),
                _ => {}
            }
        }
    }

    #[test]
    fn the_loader_is_mapped_as_its_file_says() {
        // Maps the real loader into this test process (it is never run) and
        // checks every loadable segment against the file: bytes, zeroed
        // .bss to the end of its last page, protections, one base.
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let mut header = vec![0u8; 4096];
        // SAFETY: LOADER is NUL-terminated; `header` is a page.
        let (base, entry) = unsafe { load_loader(LOADER.as_ptr(), header.as_mut_ptr(), page) }
            .unwrap_or_else(|e| panic!("mapping the loader: errno {}", e.0));
        let path = std::str::from_utf8(&LOADER[..LOADER_LEN - 1]).unwrap();
        let file = std::fs::read(path).unwrap();
        let elf = goblin::elf::Elf::parse(&file).unwrap();
        assert_eq!(entry, base + elf.header.e_entry as usize);
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let mut span = (usize::MAX, 0);
        for ph in elf
            .program_headers
            .iter()
            .filter(|p| p.p_type == libc::PT_LOAD)
        {
            let at = base + ph.p_vaddr as usize;
            // SAFETY: mapped by load_loader just above, readable (every
            // loadable segment of the loader is).
            let mem = unsafe { std::slice::from_raw_parts(at as *const u8, ph.p_memsz as usize) };
            let filesz = ph.p_filesz as usize;
            let off = ph.p_offset as usize;
            assert_eq!(
                &mem[..filesz],
                &file[off..off + filesz],
                "segment at {:#x}",
                ph.p_vaddr
            );
            if ph.p_memsz > ph.p_filesz {
                let page_end = (at + filesz).next_multiple_of(page) - at;
                // SAFETY: within the mapping (zeroed to the end of the page).
                let tail = unsafe {
                    std::slice::from_raw_parts((at + filesz) as *const u8, page_end - filesz)
                };
                assert!(
                    tail.iter().all(|&b| b == 0),
                    ".bss and the rest of its page zeroed"
                );
                assert!(mem[filesz..].iter().all(|&b| b == 0));
            }
            let first = at & !(page - 1);
            let line = maps
                .lines()
                .find(|l| l.starts_with(&format!("{first:x}-")))
                .unwrap_or_else(|| panic!("no mapping at {first:x}:\n{maps}"));
            let perms = line.split_whitespace().nth(1).unwrap();
            let want = format!(
                "{}{}{}p",
                if ph.p_flags & 4 != 0 { 'r' } else { '-' },
                if ph.p_flags & 2 != 0 { 'w' } else { '-' },
                if ph.p_flags & 1 != 0 { 'x' } else { '-' },
            );
            assert_eq!(perms, want, "{line}");
            span = (
                span.0.min(first),
                span.1
                    .max((at + ph.p_memsz as usize).next_multiple_of(page)),
            );
        }
        // SAFETY: the loader's mappings, used by nothing.
        unsafe { munmap(span.0, span.1 - span.0) };
    }

    #[test]
    fn the_former_command_words_are_run_rs_words() {
        let mut ours: Vec<&str> = std::str::from_utf8(FORMER_COMMANDS)
            .unwrap()
            .split_whitespace()
            .collect();
        ours.push("run");
        ours.sort();
        let mut theirs = crate::run::FORMER_COMMANDS.to_vec();
        theirs.sort();
        assert_eq!(ours, theirs);
    }

    #[test]
    fn the_option_tables_are_the_parsers() {
        let mut long_value = String::new();
        let mut long_flag = String::new();
        let mut short_value = String::new();
        let mut short_flag = String::new();
        for (short, long, value, _, _) in crate::args::run_options() {
            if ["help", "version"].contains(&long) {
                continue;
            }
            let (longs, shorts) = if value.is_empty() {
                (&mut long_flag, &mut short_flag)
            } else {
                (&mut long_value, &mut short_value)
            };
            longs.push_str(long);
            longs.push(' ');
            shorts.extend(short);
        }
        let sorted = |s: &[u8]| {
            let mut w: Vec<String> = String::from_utf8(s.to_vec())
                .unwrap()
                .split_whitespace()
                .map(String::from)
                .collect();
            w.sort();
            w
        };
        assert_eq!(sorted(LONG_WITH_VALUE), sorted(long_value.as_bytes()));
        assert_eq!(sorted(LONG_FLAGS), sorted(long_flag.as_bytes()));
        let chars = |s: &[u8]| {
            let mut c = s.to_vec();
            c.sort();
            c
        };
        assert_eq!(chars(SHORT_WITH_VALUE), chars(short_value.as_bytes()));
        assert_eq!(chars(SHORT_FLAGS), chars(short_flag.as_bytes()));
        let commands: Vec<String> = crate::args::COMMANDS
            .iter()
            .map(|(synopsis, _)| synopsis.split_whitespace().next().unwrap().to_string())
            .collect();
        let mut commands: Vec<String> = commands
            .iter()
            .flat_map(|c| c.split('|').map(|s| s.trim().to_string()))
            .collect();
        commands.push("--completions".into());
        commands.sort();
        commands.dedup();
        assert_eq!(sorted(COMMANDS), commands);
    }
}
