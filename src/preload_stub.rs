//! The small library the `tiexec` wrapper preloads (`libtiexec-stub.so`).
//!
//! Not a module of the crate: build.rs compiles this file on its own
//! (`no_std`, `panic=abort`, only libc) into a library of a few KiB whose
//! loading costs a program ~20 µs, where the full library (Rust's std, the
//! unwinder) costs ~0.2 ms. Most processes a build or a script starts have
//! no text worth moving (`sh`, `sed`, `as`): for them the stub is all that
//! loads. Its constructor, before `main`:
//!
//! 1. does nothing in a secure-execution process, or with the backend `off`;
//! 2. hands the process to the full library (`dlopen` of `TIEXEC_LIB`) when
//!    there is anything for it to do: an object with an executable segment
//!    of 2 MiB or more (the full library's own first test), or environment
//!    to prepare for children (`--dlopen`'s restore, `--no-children`);
//!    the full library's constructor then does everything. Except where
//!    the library would only decide not to copy: `auto`, no image cache
//!    mounted, nobody asking for a log or a report, and the program's run
//!    history (the same record and rule, `history.rs`, compiled in here;
//!    at least half full, no run in it ended unrecorded) says "plain" even
//!    for one huge page's copy. One such process in four still loads it,
//!    to record its run, so that the history follows the program. A
//!    process that a recorded run `exec`ed into (`TIEXEC_RUN` naming this
//!    PID) always loads it: the library ends that run;
//! 3. otherwise only turns off AddressSanitizer's link-order check for the
//!    children, which inherit the preload (see `tiexec::preload_env`).
//!
//! It also defines `mprotect`, for the program's calls: when the full
//! library has registered its handler (text on hugetlb pages that a call
//! must first put back on 4 KiB pages, see `tiexec::interpose`), that runs
//! first; then the next `mprotect` (libc's), found once with `RTLD_NEXT`.
//! And `_exit` and `_Exit` likewise: the full library's handler writes the
//! run's end line (a program that ends with `_exit` runs no exit handler),
//! then the next `_exit`, or the system call.
//!
//! What it may not do: allocate, panic (it aborts: there is nothing here that
//! can), or touch anything but the environment and its own statics.

#![no_std]
#![deny(unsafe_op_in_unsafe_fn)]

#[allow(dead_code)] // the stub uses part of it
#[path = "history.rs"]
mod history;
#[allow(dead_code)]
#[path = "state_path.rs"]
mod state_path;

use core::ffi::{c_char, c_int, c_void, CStr};
use core::sync::atomic::{AtomicPtr, Ordering};

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    // SAFETY: abort has no preconditions. Nothing in this file panics:
    // no indexing, no arithmetic that can overflow, no unwrap.
    unsafe { abort() }
}

#[repr(C)]
struct DlPhdrInfo {
    addr: u64,
    name: *const c_char,
    phdr: *const Elf64Phdr,
    phnum: u16,
}

#[repr(C)]
struct Elf64Phdr {
    p_type: u32,
    p_flags: u32,
    p_offset: u64,
    p_vaddr: u64,
    p_paddr: u64,
    p_filesz: u64,
    p_memsz: u64,
    p_align: u64,
}

#[repr(C)]
struct DlInfo {
    fname: *const c_char,
    fbase: *mut c_void,
    sname: *const c_char,
    saddr: *mut c_void,
}

type PhdrCallback = unsafe extern "C" fn(*mut DlPhdrInfo, usize, *mut c_void) -> c_int;

#[link(name = "c")]
extern "C" {
    fn abort() -> !;
    fn getenv(name: *const c_char) -> *const c_char;
    fn setenv(name: *const c_char, value: *const c_char, overwrite: c_int) -> c_int;
    fn getauxval(kind: u64) -> u64;
    fn dlopen(path: *const c_char, flags: c_int) -> *mut c_void;
    fn dlsym(handle: *mut c_void, name: *const c_char) -> *mut c_void;
    fn dlerror() -> *const c_char;
    fn dladdr(addr: *const c_void, info: *mut DlInfo) -> c_int;
    fn dl_iterate_phdr(callback: PhdrCallback, data: *mut c_void) -> c_int;
    fn write(fd: c_int, buf: *const c_void, count: usize) -> isize;
    fn open(path: *const c_char, flags: c_int, ...) -> c_int;
    fn read(fd: c_int, buf: *mut c_void, count: usize) -> isize;
    fn close(fd: c_int) -> c_int;
    fn readlink(path: *const c_char, buf: *mut c_char, size: usize) -> isize;
    fn statfs(path: *const c_char, buf: *mut c_void) -> c_int;
    fn getpid() -> c_int;
    fn geteuid() -> u32;
    fn fstat(fd: c_int, buf: *mut c_void) -> c_int;
    fn kill(pid: c_int, sig: c_int) -> c_int;
    fn __errno_location() -> *mut c_int;
    fn syscall(number: i64, ...) -> i64;
}

// The ABI's numbers (this file has no libc crate): one list, checked
// against the libc crate's by the library's unit tests.
#[path = "stub_abi.rs"]
mod abi;
use abi::*;
const RTLD_NEXT: *mut c_void = RTLD_NEXT_ADDR as *mut c_void;
/// The stub's first filter: an executable segment this long (the full
/// library then decides with the kernel's real huge page size).
const HUGE_PAGE: u64 = 2 << 20;
/// The image cache's default mount (`tiexec::cache::DEFAULT_ROOT`).
const DEFAULT_CACHE: &[u8] = b"/run/tiexec";

fn env(name: &CStr) -> Option<&'static [u8]> {
    // SAFETY: getenv returns null or a NUL-terminated string of the
    // environment, which nothing changes while the constructor reads it.
    let p = unsafe { getenv(name.as_ptr()) };
    if p.is_null() {
        None
    } else {
        // SAFETY: non-null and NUL-terminated (see above).
        Some(unsafe { CStr::from_ptr(p) }.to_bytes())
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Writes `parts` to stderr as one line.
fn say(parts: &[&[u8]]) {
    let mut line = [0u8; 512];
    let mut n = 0;
    for part in parts.iter().chain([&b"\n"[..]].iter()) {
        for &b in part.iter() {
            if let Some(slot) = line.get_mut(n) {
                *slot = b;
                n += 1;
            }
        }
    }
    // SAFETY: a valid buffer of `n` bytes; a closed fd 2 only fails.
    unsafe { write(2, line.as_ptr().cast(), n) };
}

/// True when some loaded object (the vDSO and this stub aside) has an
/// executable segment of 2 MiB or more: the full library's first test.
fn big_text_loaded() -> bool {
    unsafe extern "C" fn visit(info: *mut DlPhdrInfo, _: usize, data: *mut c_void) -> c_int {
        // SAFETY: the loader passes a valid record for each object.
        let info = unsafe { &*info };
        if info.phdr.is_null() {
            return 0;
        }
        // SAFETY: `phdr` points at `phnum` headers of a loaded object.
        let phdrs = unsafe { core::slice::from_raw_parts(info.phdr, usize::from(info.phnum)) };
        let big = phdrs
            .iter()
            .any(|p| p.p_type == PT_LOAD && p.p_flags & PF_X != 0 && p.p_memsz >= HUGE_PAGE);
        if big {
            // SAFETY: `data` is the &mut bool passed below.
            unsafe { *data.cast::<bool>() = true };
            return 1; // stop
        }
        0
    }
    let mut found = false;
    // SAFETY: the callback only reads the loader's records and writes
    // `found`, which outlives the call.
    unsafe { dl_iterate_phdr(visit, (&mut found as *mut bool).cast()) };
    found
}

/// ASan's link-order check off for the children (the preload comes first
/// in their library list), keeping the options they have.
fn asan_options_for_children() {
    const OPTION: &[u8] = b"verify_asan_link_order=0";
    let existing = env(c"ASAN_OPTIONS").unwrap_or(b"");
    if contains(existing, b"verify_asan_link_order") {
        return;
    }
    let mut value = [0u8; 1024];
    let total = existing.len() + usize::from(!existing.is_empty()) + OPTION.len();
    if total >= value.len() {
        return; // options that long: leave them
    }
    let mut n = 0;
    for &b in existing
        .iter()
        .chain(if existing.is_empty() { &b""[..] } else { b":" })
        .chain(OPTION)
    {
        if let Some(slot) = value.get_mut(n) {
            *slot = b;
            n += 1;
        }
    }
    // `value` is zeroed past `n`: NUL-terminated.
    // SAFETY: before main, single-threaded; both strings NUL-terminated.
    unsafe { setenv(c"ASAN_OPTIONS".as_ptr(), value.as_ptr().cast(), 1) };
}

/// The next `mprotect` (libc's), and the full library's handler.
static NEXT: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());
static HANDLER: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());

type MprotectFn = unsafe extern "C" fn(*mut c_void, usize, c_int) -> c_int;
type HandlerFn = unsafe extern "C" fn(*mut c_void, usize, c_int);

/// Called by the full library once loaded: `handler` runs before every
/// `mprotect` of the program.
#[no_mangle]
pub extern "C" fn tiexec_stub_set_mprotect_handler(handler: HandlerFn) {
    HANDLER.store(handler as *mut c_void, Ordering::Release);
}

/// `mprotect(2)` as libc's, after the full library's handler if any.
///
/// # Safety
/// As libc's `mprotect`.
#[no_mangle]
pub unsafe extern "C" fn mprotect(addr: *mut c_void, len: usize, prot: c_int) -> c_int {
    let h = HANDLER.load(Ordering::Acquire);
    if !h.is_null() {
        // SAFETY: the full library registered a function of this type,
        // which stays loaded (it is never unloaded).
        let h: HandlerFn = unsafe { core::mem::transmute::<*mut c_void, HandlerFn>(h) };
        // SAFETY: the caller's arguments.
        unsafe { h(addr, len, prot) };
    }
    let next = NEXT.load(Ordering::Acquire);
    if next.is_null() {
        // SAFETY: the system call, as libc's mprotect makes it.
        return unsafe { syscall(SYS_MPROTECT, addr, len, prot) } as c_int;
    }
    // SAFETY: dlsym's address of the next `mprotect`, of this type.
    let next: MprotectFn = unsafe { core::mem::transmute::<*mut c_void, MprotectFn>(next) };
    // SAFETY: the caller's arguments.
    unsafe { next(addr, len, prot) }
}

/// `parts` joined into `buf` with a NUL at the end, as a C string; `None`
/// if too long or holding a NUL. (Built by hand: core's checked `CStr`
/// constructors would bring in code that unwinds.)
fn c_path(parts: &[&[u8]], buf: &mut [u8]) -> Option<*const c_char> {
    let mut n = 0;
    for part in parts {
        for &b in part.iter() {
            if b == 0 {
                return None;
            }
            *buf.get_mut(n)? = b;
            n += 1;
        }
    }
    *buf.get_mut(n)? = 0;
    Some(buf.as_ptr().cast())
}

/// Whether a hugetlbfs is mounted at `path` (the image cache may serve).
fn hugetlbfs_at(path: &[u8]) -> bool {
    let mut name = [0u8; 4096];
    let Some(name) = c_path(&[path], &mut name) else {
        return false;
    };
    // `struct statfs`, with room to spare; `f_type` comes first.
    let mut st = [0i64; STATFS_BYTES / 8 + 2];
    // SAFETY: a NUL-terminated path and a buffer larger than the struct.
    let r = unsafe { statfs(name, st.as_mut_ptr().cast()) };
    r == 0 && st.first() == Some(&HUGETLBFS_MAGIC)
}

/// Runs a history must hold before the stub decides for the library.
const RUNS_TO_SKIP: usize = history::RUNS_KEPT / 2;

/// True when the full library, loaded, would only decide not to copy here
/// (see the module comment): then it need not load.
fn library_would_not_copy() -> bool {
    if !matches!(env(c"TIEXEC_BACKEND"), None | Some(b"" | b"auto")) {
        return false;
    }
    if matches!(env(c"TIEXEC_LOG"), Some(b"info" | b"debug"))
        || env(c"TIEXEC_REPORT").is_some_and(|r| !r.is_empty())
    {
        return false;
    }
    let cache = match env(c"TIEXEC_CACHE") {
        Some(b"off") => None,
        Some(p) if !p.is_empty() => Some(p),
        _ => Some(DEFAULT_CACHE),
    };
    if cache.is_some_and(hugetlbfs_at) {
        return false;
    }
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { getpid() };
    if pid % 4 == 0 {
        return false;
    }
    let mut digits = [0u8; 12];
    let pid_text = decimal(pid as u32, &mut digits);
    // The program's path, as the library names it (/proc/self/exe).
    let mut exe = [0u8; 4096];
    // SAFETY: a NUL-terminated path and a buffer of the given size.
    let n = unsafe {
        readlink(
            c"/proc/self/exe".as_ptr(),
            exe.as_mut_ptr().cast(),
            exe.len(),
        )
    };
    let Some(exe) = usize::try_from(n).ok().and_then(|n| exe.get(..n)) else {
        return false;
    };
    if exe.len() >= 4096 - 1 {
        return false;
    }
    // The record: `runs/NAME` in the state directory, found by the
    // library's own rule (`state_path`): where the environment says, else
    // the shared fallback. Read only if this user owns it (a fallback
    // directory in /var/tmp is anyone's to create).
    let name = history::file_name(exe);
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { geteuid() };
    let mut uid_digits = [0u8; 10];
    let uid_text = state_path::decimal(uid, &mut uid_digits);
    let named = state_path::from_env(|var| match var {
        "TIEXEC_STATE" => env(c"TIEXEC_STATE"),
        "XDG_CACHE_HOME" => env(c"XDG_CACHE_HOME"),
        "CACHE_DIRECTORY" => env(c"CACHE_DIRECTORY"),
        "HOME" => env(c"HOME"),
        _ => None,
    });
    let mut path = [0u8; 4096];
    let mut fd = -1;
    for candidate in [named, Some((state_path::SHARED_PREFIX, &b""[..]))] {
        let Some((base, suffix)) = candidate else {
            continue;
        };
        let uid_part: &[u8] = if base == state_path::SHARED_PREFIX {
            uid_text
        } else {
            b""
        };
        let Some(p) = c_path(&[base, uid_part, suffix, b"/runs/", &name], &mut path) else {
            continue;
        };
        // SAFETY: a NUL-terminated path; plain flags.
        fd = unsafe { open(p, O_RDONLY | O_NOFOLLOW | O_CLOEXEC) };
        if fd >= 0 {
            break;
        }
    }
    if fd < 0 {
        return false;
    }
    // 8-byte words: `struct stat`'s alignment.
    let mut st = [0u64; STAT_BYTES / 8];
    // SAFETY: our descriptor and a buffer the size of `struct stat`.
    let stat_ok = unsafe { fstat(fd, st.as_mut_ptr().cast()) } == 0;
    let mut uid_bytes = [0u8; 4];
    for (i, b) in st
        .iter()
        .flat_map(|w| w.to_ne_bytes())
        .skip(STAT_UID_OFFSET)
        .take(4)
        .enumerate()
    {
        if let Some(slot) = uid_bytes.get_mut(i) {
            *slot = b;
        }
    }
    let owner = Some(u32::from_ne_bytes(uid_bytes));
    if !stat_ok || owner != Some(uid) {
        // SAFETY: our own descriptor, closed once.
        unsafe { close(fd) };
        return false;
    }
    let mut text = [0u8; 4096];
    // SAFETY: reads into a buffer of the given size from our descriptor.
    let got = unsafe { read(fd, text.as_mut_ptr().cast(), text.len()) };
    // SAFETY: our own descriptor, closed once.
    unsafe { close(fd) };
    let Some(text) = usize::try_from(got).ok().and_then(|n| text.get(..n)) else {
        return false;
    };
    let h = history::parse(text, exe);
    if h.runs().len() < RUNS_TO_SKIP || h.runs().iter().any(|r| r.ms.is_none()) {
        return false; // the history fills first
    }
    // A run that ended unrecorded (its process is gone): the library folds
    // it in as a long run, which may change the decision.
    let gone = |s: &history::Start| {
        // SAFETY: signal 0 only checks the process exists.
        let r = unsafe { kill(s.pid as c_int, 0) };
        // SAFETY: errno of this thread.
        r != 0 && unsafe { *__errno_location() } == ESRCH
    };
    if h.starts().iter().any(gone) {
        return false;
    }
    let named = match env(c"TIEXEC_NAMED_PID") {
        None | Some(b"") => true,
        Some(v) => v == pid_text,
    };
    let asking = history::Asking {
        named,
        copy_bytes: HUGE_PAGE,
        age_ms: 0,
    };
    history::decide(&h, asking).arm == history::Arm::Plain
}

/// True when a run tiexec recorded `exec`ed into this process (`TIEXEC_RUN`
/// names this PID): the library writes that run's end line.
fn predecessor_run_ends_here() -> bool {
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { getpid() };
    let mut digits = [0u8; 12];
    let pid_text = decimal(pid as u32, &mut digits);
    env(c"TIEXEC_RUN")
        .is_some_and(|v| v.starts_with(pid_text) && v.get(pid_text.len()) == Some(&b' '))
}

/// `v` in decimal, in `buf`.
fn decimal(mut v: u32, buf: &mut [u8; 12]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        if let Some(d) = buf.get_mut(i) {
            *d = b'0' + (v % 10) as u8;
        }
        v /= 10;
        if v == 0 || i == 0 {
            break;
        }
    }
    buf.get(i..).unwrap_or(&[])
}

/// The full library's handler for `_exit`, and the next `_exit`s.
static EXIT_HANDLER: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());
static NEXT_EXIT: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());
static NEXT_EXIT_C99: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());

type ExitHandlerFn = extern "C" fn();
type ExitFn = unsafe extern "C" fn(c_int) -> !;

/// Called by the full library once loaded: `handler` runs before the
/// program ends with `_exit` or `_Exit`.
#[no_mangle]
pub extern "C" fn tiexec_stub_set_exit_handler(handler: ExitHandlerFn) {
    EXIT_HANDLER.store(handler as *mut c_void, Ordering::Release);
}

fn exit_with(next: &AtomicPtr<c_void>, status: c_int) -> ! {
    let h = EXIT_HANDLER.load(Ordering::Acquire);
    if !h.is_null() {
        // SAFETY: the full library registered a function of this type,
        // which stays loaded.
        let h: ExitHandlerFn = unsafe { core::mem::transmute::<*mut c_void, ExitHandlerFn>(h) };
        h();
    }
    let f = next.load(Ordering::Acquire);
    if !f.is_null() {
        // SAFETY: dlsym's address of the next `_exit`, of this type.
        let f: ExitFn = unsafe { core::mem::transmute::<*mut c_void, ExitFn>(f) };
        // SAFETY: the caller's status.
        unsafe { f(status) }
    }
    loop {
        // SAFETY: ends the process; never returns.
        unsafe { syscall(SYS_EXIT_GROUP, status) };
    }
}

/// `_exit(2)`, after the full library's handler if any.
#[no_mangle]
pub extern "C" fn _exit(status: c_int) -> ! {
    exit_with(&NEXT_EXIT, status)
}

/// `_Exit`, likewise.
#[no_mangle]
pub extern "C" fn _Exit(status: c_int) -> ! {
    exit_with(&NEXT_EXIT_C99, status)
}

extern "C" fn constructor() {
    // SAFETY: getauxval has no preconditions.
    if unsafe { getauxval(AT_SECURE) } != 0 {
        return;
    }
    // SAFETY: dlsym with RTLD_NEXT and a NUL-terminated name.
    let next = unsafe { dlsym(RTLD_NEXT, c"mprotect".as_ptr()) };
    if !next.is_null() && next != mprotect as MprotectFn as *mut c_void {
        NEXT.store(next, Ordering::Release);
    }
    for (name, slot, own) in [
        (c"_exit", &NEXT_EXIT, _exit as ExitFn as *mut c_void),
        (c"_Exit", &NEXT_EXIT_C99, _Exit as ExitFn as *mut c_void),
    ] {
        // SAFETY: dlsym with RTLD_NEXT and a NUL-terminated name.
        let f = unsafe { dlsym(RTLD_NEXT, name.as_ptr()) };
        if !f.is_null() && f != own {
            slot.store(f, Ordering::Release);
        }
    }
    if env(c"TIEXEC_BACKEND") == Some(b"off") {
        return;
    }
    let children = env(c"TIEXEC_CHILDREN") != Some(b"0");
    let for_children = env(c"TIEXEC_RESTORE_AUDIT").is_some() || !children;
    let needed = for_children
        || predecessor_run_ends_here()
        || (big_text_loaded() && !library_would_not_copy());
    if children {
        asan_options_for_children();
    }
    if !needed {
        return;
    }
    let Some(full) = env(c"TIEXEC_LIB") else {
        return;
    };
    // `full` is NUL-terminated in the environment.
    // SAFETY: a NUL-terminated path from the environment.
    let handle = unsafe { dlopen(full.as_ptr().cast(), RTLD_NOW) };
    if handle.is_null() {
        let quiet = matches!(env(c"TIEXEC_LOG"), Some(b"off" | b"error"));
        if !quiet {
            // SAFETY: dlerror returns null or a NUL-terminated message.
            let why = unsafe { dlerror() };
            let why = if why.is_null() {
                &b"unknown error"[..]
            } else {
                // SAFETY: non-null and NUL-terminated.
                unsafe { CStr::from_ptr(why) }.to_bytes()
            };
            say(&[
                b"tiexec: cannot load the library; program left as it was: ",
                why,
            ]);
        }
    }
}

#[used]
#[link_section = ".init_array"]
static CONSTRUCTOR: extern "C" fn() = constructor;

/// The stub's own path, for the full library (which removes it from
/// `LD_PRELOAD` under `--no-children`).
#[no_mangle]
pub extern "C" fn tiexec_stub_path() -> *const c_char {
    let mut info = DlInfo {
        fname: core::ptr::null(),
        fbase: core::ptr::null_mut(),
        sname: core::ptr::null(),
        saddr: core::ptr::null_mut(),
    };
    // SAFETY: dladdr only reads the loader's tables and writes `info`.
    let found = unsafe { dladdr(tiexec_stub_path as *const c_void, &mut info) };
    if found == 0 {
        core::ptr::null()
    } else {
        info.fname
    }
}
