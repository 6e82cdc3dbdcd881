//! `mprotect` as the program sees it, over text on hugetlb pages.
//!
//! Code that patches itself (hooking and mocking libraries, hot patching,
//! some JITs) makes a 4 KiB page of its text writable with `mprotect`, writes
//! a jump, and makes it executable again. On text moved to hugetlb pages
//! (cache images, pool copies) that call fails: a hugetlb mapping cannot be
//! split (EINVAL), and an image is never writable (EACCES). So tiexec
//! defines `mprotect` itself: when the range touches such text, each 2 MiB
//! page concerned is first put back on ordinary 4 KiB pages holding the same
//! bytes (a private copy, moved over it with one `mremap`: no moment without
//! code, and other threads running there see the same instructions), then
//! the call proceeds as it would have without tiexec. Nothing is ever written
//! through a shared image.
//!
//! The registry of such ranges is filled after each swap, and shared with
//! the copy of the library that serves as audit module (`--dlopen`), which
//! lives in a link-map namespace of its own: that copy registers into the
//! preloaded copy's registry (same file, same layout), which it finds by
//! watching the loader load that copy (`note_object_loaded`), since a
//! namespace cannot list another's objects.
//!
//! Text goes to hugetlb pages only where this guard is in place
//! ([`hugetlb_text_guarded`]): the program's `mprotect` calls reach this
//! library's (preloaded, through the wrapper's stub, or linked into the
//! program), and for the audit module, the preloaded copy is loaded and
//! guarding. Elsewhere a partial `mprotect` would fail where it succeeds
//! without tiexec: such text stays on pages the kernel can split.
//!
//! Every other call goes straight to the next `mprotect` (libc's, or another
//! interposer's), found once with `dlsym(RTLD_NEXT)`; without a loader (a
//! static program), the system call itself.
//!
//! `_exit` and `_Exit` as the program sees them: a program that ends with
//! `_exit` (rust-lld does, for speed) runs no exit handler, so the run
//! record's end line (`session`) is written here first, by a function that
//! allocates nothing and takes no lock (`_exit` is called from signal
//! handlers and from `vfork` children). Then the next `_exit` runs (a
//! sanitizer's, libc's), or the system call.

use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};

use crate::plan::{align_down, align_up, huge_page, Range};
use crate::sys::{self, Mapping, Prot};

/// Ranges at most: more are not registered (their chunks are then split
/// only if the kernel refuses the call, see `mprotect`).
const SLOTS: usize = 64;

/// Text ranges on pages that cannot be split, as `[start, end)` pairs.
pub struct Registry {
    starts: [AtomicU64; SLOTS],
    ends: [AtomicU64; SLOTS],
    used: AtomicUsize,
    lock: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const ZERO: AtomicU64 = AtomicU64::new(0);

static REGISTRY: Registry = Registry {
    starts: [ZERO; SLOTS],
    ends: [ZERO; SLOTS],
    used: AtomicUsize::new(0),
    lock: AtomicBool::new(false),
};

/// Holds the registry's lock (a spin lock: held for a copy of 2 MiB at
/// most, and taken only by calls that touch registered text).
struct Locked<'a>(&'a Registry);

impl<'a> Locked<'a> {
    fn take(r: &'a Registry) -> Locked<'a> {
        while r
            .lock
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            core::hint::spin_loop();
        }
        Locked(r)
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        self.0.lock.store(false, Ordering::Release);
    }
}

impl Registry {
    fn ranges(&self) -> impl Iterator<Item = (usize, Range)> + '_ {
        let n = self.used.load(Ordering::Acquire).min(SLOTS);
        (0..n).filter_map(move |i| {
            let (s, e) = (
                self.starts.get(i)?.load(Ordering::Acquire),
                self.ends.get(i)?.load(Ordering::Acquire),
            );
            (s < e).then(|| (i, Range::new(s, e)))
        })
    }

    fn add(&self, r: Range) {
        let _held = Locked::take(self);
        let n = self.used.load(Ordering::Relaxed);
        // Reuse an emptied slot first.
        let slot = (0..n.min(SLOTS))
            .find(|&i| {
                self.starts.get(i).map(|a| a.load(Ordering::Relaxed))
                    >= self.ends.get(i).map(|a| a.load(Ordering::Relaxed))
            })
            .or((n < SLOTS).then_some(n));
        let Some(i) = slot else {
            return;
        };
        if let (Some(s), Some(e)) = (self.starts.get(i), self.ends.get(i)) {
            s.store(r.start, Ordering::Release);
            e.store(r.end, Ordering::Release);
        }
        if i == n {
            self.used.store(n + 1, Ordering::Release);
        }
    }

    /// Empties every slot whose range overlaps `range`.
    fn remove_overlapping(&self, range: Range) {
        let _held = Locked::take(self);
        for (i, r) in self.ranges() {
            if r.intersect(range).is_some() {
                if let Some(e) = self.ends.get(i) {
                    e.store(r.start, Ordering::Release);
                }
            }
        }
    }

    /// Takes `chunk` out of the range in slot `i` (whose part it is).
    fn remove_chunk(&self, i: usize, chunk: Range) {
        let (Some(s), Some(e)) = (self.starts.get(i), self.ends.get(i)) else {
            return;
        };
        let (start, end) = (s.load(Ordering::Relaxed), e.load(Ordering::Relaxed));
        if chunk.start == start {
            s.store(chunk.end, Ordering::Release);
        } else if chunk.end == end {
            e.store(chunk.start, Ordering::Release);
        } else {
            // The middle: the slot keeps the head, a new one the tail.
            e.store(chunk.start, Ordering::Release);
            let n = self.used.load(Ordering::Relaxed);
            if n < SLOTS {
                if let (Some(s2), Some(e2)) = (self.starts.get(n), self.ends.get(n)) {
                    s2.store(chunk.end, Ordering::Release);
                    e2.store(end, Ordering::Release);
                    self.used.store(n + 1, Ordering::Release);
                }
            }
        }
    }
}

/// True once the program's `mprotect` calls reach this copy's: set by
/// [`resolve_next`] (this library's `mprotect` is the program's), by
/// [`attach_to_stub`], or by [`guard_linked_program`].
static GUARDING: AtomicBool = AtomicBool::new(false);

/// For the audit module: the load bias of the copy of this same file that
/// the loader loaded into the program's namespace (0: none seen yet).
static BASE_COPY_BIAS: AtomicU64 = AtomicU64::new(0);

/// This library linked into the program itself (`libtiexec.a`): the
/// program's own calls to `mprotect` bind to this one when it is linked.
pub fn guard_linked_program() {
    GUARDING.store(true, Ordering::Release);
}

/// The audit module is told of every object the loader maps, in every
/// namespace: when it is another copy of this library's own file (same
/// device and inode) at another address, that is the copy whose registry
/// the program's `mprotect` reaches.
pub fn note_object_loaded(bias: u64, path: &core::ffi::CStr) {
    static OWN: std::sync::OnceLock<Option<(u64, std::ffi::CString, libc::stat)>> =
        std::sync::OnceLock::new();
    let own = OWN.get_or_init(|| {
        let (bias, path) = crate::discover::own_load()?;
        let st = sys::stat_path(&path).ok()?;
        Some((bias, path, st))
    });
    let Some((own_bias, own_path, own_st)) = own else {
        return;
    };
    let file_name = |p: &[u8]| p.rsplit(|&b| b == b'/').next().map(<[u8]>::to_vec);
    if bias == *own_bias
        || bias == 0
        || file_name(path.to_bytes()) != file_name(own_path.to_bytes())
    {
        return;
    }
    let same_file = sys::stat_path(path)
        .is_ok_and(|st| st.st_dev == own_st.st_dev && st.st_ino == own_st.st_ino);
    if same_file {
        BASE_COPY_BIAS.store(bias, Ordering::Release);
    }
}

/// The statics of the preloaded copy of this library, seen from the audit
/// module: at the same offsets from its load bias as ours from ours.
fn base_copy<T>(ours: &'static T) -> Option<&'static T> {
    let twin = BASE_COPY_BIAS.load(Ordering::Acquire);
    let (own_bias, _) = crate::discover::own_load()?;
    if twin == 0 || twin == own_bias {
        return None;
    }
    let theirs = (ours as *const T as u64)
        .wrapping_sub(own_bias)
        .wrapping_add(twin);
    // SAFETY: `twin` is the load bias of another mapping of this very file
    // (same device and inode, see `note_object_loaded`), in the program's
    // namespace, loaded for the rest of the program's life (it is
    // preloaded, or loaded by the preloaded stub, and never unloaded): the
    // same static, of a type made of atomics only, at the same offset.
    Some(unsafe { &*(theirs as *const T) })
}

/// The registry the program's `mprotect` consults: ours, unless this copy
/// is the audit module, whose namespace is not the program's.
fn shared_registry() -> Option<&'static Registry> {
    if crate::discover::in_base_namespace() {
        return Some(&REGISTRY);
    }
    base_copy(&REGISTRY)
}

/// True when text put on hugetlb pages now would be guarded: a later
/// `mprotect` of part of it reaches tiexec's, which puts it back on small
/// pages first (see the module doc).
pub fn hugetlb_text_guarded() -> bool {
    if crate::discover::in_base_namespace() {
        return GUARDING.load(Ordering::Acquire);
    }
    base_copy(&GUARDING).is_some_and(|g| g.load(Ordering::Acquire))
}

/// Records that `range` now holds text on pages that cannot be split: the
/// `mprotect` interposer will copy such a range back to small pages before
/// a change of protection splits it. Returns false when there is no
/// registry the program's `mprotect` reaches (see [`hugetlb_text_guarded`]).
///
/// # Safety
/// `range` must be text this process mapped on hugetlb pages, mapped and
/// readable for as long as it stays registered ([`unregister`] it before
/// it is unmapped).
pub unsafe fn register(range: Range) -> bool {
    match shared_registry() {
        Some(r) => {
            r.add(range);
            true
        }
        None => false,
    }
}

/// Forgets every registered range that overlaps `range` (its object is being
/// unloaded: whatever is mapped there next is not ours).
pub fn unregister(range: Range) {
    if let Some(r) = shared_registry() {
        r.remove_overlapping(range);
    }
}

/// The next `mprotect` in the lookup order (libc's, or another interposer's).
static NEXT: AtomicPtr<libc::c_void> = AtomicPtr::new(core::ptr::null_mut());

type MprotectFn = unsafe extern "C" fn(*mut libc::c_void, libc::size_t, libc::c_int) -> libc::c_int;

/// Finds the next `mprotect` (once, from the constructor: not from inside a
/// call, where the loader's lock might be held).
pub fn resolve_next() {
    // SAFETY: dlsym with RTLD_NEXT and a NUL-terminated name; it returns a
    // function pointer or null.
    let f = unsafe { libc::dlsym(libc::RTLD_NEXT, c"mprotect".as_ptr()) };
    let own = mprotect as MprotectFn as *mut libc::c_void;
    if !f.is_null() && f != own {
        NEXT.store(f, Ordering::Release);
    }
    // SAFETY: as above, with RTLD_DEFAULT: what the program's calls reach.
    let program_s = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"mprotect".as_ptr()) };
    if program_s == own {
        GUARDING.store(true, Ordering::Release);
    }
    for (name, slot, own) in [
        (c"_exit", &NEXT_EXIT, _exit as ExitFn as *mut libc::c_void),
        (
            c"_Exit",
            &NEXT_EXIT_C99,
            _Exit as ExitFn as *mut libc::c_void,
        ),
    ] {
        // SAFETY: as above.
        let f = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) };
        if !f.is_null() && f != own {
            slot.store(f, Ordering::Release);
        }
    }
}

fn next_mprotect(addr: *mut libc::c_void, len: libc::size_t, prot: libc::c_int) -> libc::c_int {
    let f = NEXT.load(Ordering::Acquire);
    if f.is_null() {
        // SAFETY: the system call itself, with the caller's arguments: what
        // libc's mprotect does.
        return unsafe { libc::syscall(libc::SYS_mprotect, addr, len, prot) } as libc::c_int;
    }
    // SAFETY: `f` is the address dlsym gave for the next `mprotect`, which
    // has this C signature.
    let f: MprotectFn = unsafe { core::mem::transmute::<*mut libc::c_void, MprotectFn>(f) };
    // SAFETY: the caller's arguments, passed on unchanged.
    unsafe { f(addr, len, prot) }
}

/// Puts the 2 MiB page `chunk` (text on hugetlb pages) back on 4 KiB pages
/// holding the same bytes: a private copy, made r-x, moved over it with one
/// `mremap`. Returns false when that could not be done (the text is then as
/// it was).
fn split(chunk: Range) -> bool {
    let len = huge_page() as usize;
    let Ok(mut copy) = Mapping::anonymous(len, Prot::READ_WRITE, 0) else {
        return false;
    };
    // Ordinary pages, even with THP set to "always".
    let _ = copy.advise(libc::MADV_NOHUGEPAGE);
    let Some(bytes) = copy.bytes_mut() else {
        return false;
    };
    // SAFETY: `chunk` is registered text: mapped and readable, 2 MiB long.
    let text = unsafe { core::slice::from_raw_parts(chunk.start as *const u8, len) };
    bytes.copy_from_slice(text);
    copy.sync_icache();
    if copy.protect(Prot::READ_EXEC).is_err() {
        return false; // memory-deny-write-execute: the call fails as before
    }
    // SAFETY: moves our private copy over the chunk in one call: the same
    // bytes at the same addresses before and after, no moment without code.
    match unsafe { sys::move_over(copy, chunk.start) } {
        Ok(()) => true,
        Err(_) => false, // the copy is unmapped; the chunk is unchanged
    }
}

/// Puts back on 4 KiB pages every registered 2 MiB page that a call on
/// `[start, end)` with `prot` would otherwise find unsplittable: those it
/// covers only in part, and all it would make writable.
fn split_for(start: u64, end: u64, prot: libc::c_int) {
    let registry = &REGISTRY;
    let hit = |r: Range| r.start < end && start < r.end;
    if registry.used.load(Ordering::Acquire) == 0 || !registry.ranges().any(|(_, r)| hit(r)) {
        return;
    }
    let _held = Locked::take(registry);
    let mut chunk_start = align_down(start, huge_page());
    while chunk_start < align_up(end, huge_page()) {
        let chunk = Range::new(chunk_start, chunk_start + huge_page());
        chunk_start += huge_page();
        let whole = start <= chunk.start && chunk.end <= end;
        if whole && prot & libc::PROT_WRITE == 0 {
            continue; // the kernel does this on huge pages too
        }
        let slot = registry
            .ranges()
            .find(|(_, r)| r.contains(chunk))
            .map(|(i, _)| i);
        if let Some(i) = slot {
            if split(chunk) {
                registry.remove_chunk(i, chunk);
            }
        }
    }
}

/// The handler the wrapper's stub library calls before each `mprotect` of
/// the program (it defines `mprotect` itself, and loaded this library only
/// when there was work to do).
unsafe extern "C" fn stub_handler(addr: *mut libc::c_void, len: libc::size_t, prot: libc::c_int) {
    let start = addr as u64;
    split_for(start, start.saturating_add(len as u64), prot);
}

type SetHandlerFn =
    unsafe extern "C" fn(unsafe extern "C" fn(*mut libc::c_void, libc::size_t, libc::c_int));

/// When the wrapper's stub library loaded this one, has the program's
/// `mprotect` calls (which reach the stub's `mprotect`) run our handler.
pub fn attach_to_stub() {
    // SAFETY: dlsym with RTLD_DEFAULT and a NUL-terminated name.
    let f = unsafe {
        libc::dlsym(
            libc::RTLD_DEFAULT,
            c"tiexec_stub_set_mprotect_handler".as_ptr(),
        )
    };
    if f.is_null() {
        return;
    }
    // SAFETY: the stub defines this function with this C signature.
    let set: SetHandlerFn = unsafe { core::mem::transmute::<*mut libc::c_void, SetHandlerFn>(f) };
    // SAFETY: registers a function of this library, which is never unloaded.
    unsafe { set(stub_handler) };
    GUARDING.store(true, Ordering::Release);
}

/// The path of the wrapper's stub library, when it is loaded.
pub fn stub_path() -> Option<Vec<u8>> {
    type PathFn = unsafe extern "C" fn() -> *const libc::c_char;
    // SAFETY: dlsym with RTLD_DEFAULT and a NUL-terminated name.
    let f = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"tiexec_stub_path".as_ptr()) };
    if f.is_null() {
        return None;
    }
    // SAFETY: the stub defines this function with this C signature.
    let f: PathFn = unsafe { core::mem::transmute::<*mut libc::c_void, PathFn>(f) };
    // SAFETY: it returns null or the loader's NUL-terminated name.
    let p = unsafe { f() };
    // SAFETY: non-null: a NUL-terminated string owned by the loader.
    (!p.is_null()).then(|| unsafe { core::ffi::CStr::from_ptr(p) }.to_bytes().to_vec())
}

/// `mprotect(2)`, as libc's, with text on hugetlb pages put back on 4 KiB
/// pages first where the call needs it (see the module doc).
///
/// # Safety
/// As libc's `mprotect`: the caller owns the range.
#[no_mangle]
pub unsafe extern "C" fn mprotect(
    addr: *mut libc::c_void,
    len: libc::size_t,
    prot: libc::c_int,
) -> libc::c_int {
    let start = addr as u64;
    split_for(start, start.saturating_add(len as u64), prot);
    next_mprotect(addr, len, prot)
}

// --- _exit ------------------------------------------------------------------

/// What runs before the process ends through `_exit` (see the module doc).
static EXIT_HOOK: AtomicPtr<libc::c_void> = AtomicPtr::new(core::ptr::null_mut());
/// The next `_exit` and `_Exit` in the lookup order.
static NEXT_EXIT: AtomicPtr<libc::c_void> = AtomicPtr::new(core::ptr::null_mut());
static NEXT_EXIT_C99: AtomicPtr<libc::c_void> = AtomicPtr::new(core::ptr::null_mut());

type ExitFn = unsafe extern "C" fn(libc::c_int) -> !;
type HookFn = extern "C" fn();

/// Has `hook` run before the process ends with `_exit` or `_Exit`: through
/// this library's own `_exit` (preloaded by hand, or linked in), or through
/// the wrapper's stub, which defines the program's.
pub fn on_exit_now(hook: HookFn) {
    EXIT_HOOK.store(hook as *mut libc::c_void, Ordering::Release);
    type SetFn = unsafe extern "C" fn(HookFn);
    // SAFETY: dlsym with RTLD_DEFAULT and a NUL-terminated name.
    let f = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"tiexec_stub_set_exit_handler".as_ptr()) };
    if !f.is_null() {
        // SAFETY: the stub defines this function with this C signature.
        let set: SetFn = unsafe { core::mem::transmute::<*mut libc::c_void, SetFn>(f) };
        // SAFETY: registers a function of this library, which is never
        // unloaded.
        unsafe { set(hook) };
    }
}

fn run_exit_hook() {
    let h = EXIT_HOOK.load(Ordering::Acquire);
    if !h.is_null() {
        // SAFETY: `on_exit_now` stored a function of this type.
        let h: HookFn = unsafe { core::mem::transmute::<*mut libc::c_void, HookFn>(h) };
        h();
    }
}

/// Ends the process through `next` (another `_exit`), or the system call.
fn exit_through(next: &AtomicPtr<libc::c_void>, status: libc::c_int) -> ! {
    let f = next.load(Ordering::Acquire);
    if !f.is_null() {
        // SAFETY: dlsym's address of the next `_exit`, of this type.
        let f: ExitFn = unsafe { core::mem::transmute::<*mut libc::c_void, ExitFn>(f) };
        // SAFETY: the caller's status, passed on.
        unsafe { f(status) }
    }
    loop {
        // SAFETY: ends the process (all threads); never returns.
        unsafe { libc::syscall(libc::SYS_exit_group, status) };
    }
}

/// `_exit(2)`, after the run record's end line (see the module doc).
#[no_mangle]
pub extern "C" fn _exit(status: libc::c_int) -> ! {
    run_exit_hook();
    exit_through(&NEXT_EXIT, status)
}

/// `_Exit` (C99's name for `_exit`), likewise.
#[no_mangle]
pub extern "C" fn _Exit(status: libc::c_int) -> ! {
    run_exit_hook();
    exit_through(&NEXT_EXIT_C99, status)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::range::HUGE_PAGE;
    use crate::sys;

    #[test]
    fn ranges_are_added_and_chunks_taken_out() {
        let r = Registry {
            starts: [ZERO; SLOTS],
            ends: [ZERO; SLOTS],
            used: AtomicUsize::new(0),
            lock: AtomicBool::new(false),
        };
        const M: u64 = HUGE_PAGE;
        r.add(Range::new(10 * M, 20 * M));
        r.add(Range::new(40 * M, 42 * M));
        let all = |r: &Registry| r.ranges().map(|(_, x)| x).collect::<Vec<_>>();
        assert_eq!(
            all(&r),
            [Range::new(10 * M, 20 * M), Range::new(40 * M, 42 * M)]
        );
        r.remove_chunk(0, Range::new(10 * M, 11 * M));
        r.remove_chunk(0, Range::new(19 * M, 20 * M));
        r.remove_chunk(0, Range::new(15 * M, 16 * M));
        let mut got = all(&r);
        got.sort();
        assert_eq!(
            got,
            [
                Range::new(11 * M, 15 * M),
                Range::new(16 * M, 19 * M),
                Range::new(40 * M, 42 * M)
            ]
        );
        r.remove_chunk(1, Range::new(40 * M, 41 * M));
        r.remove_chunk(1, Range::new(41 * M, 42 * M));
        // The emptied slot is reused.
        r.add(Range::new(60 * M, 62 * M));
        assert_eq!(r.used.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn calls_on_unregistered_memory_pass_through() {
        let m = Mapping::anonymous(8192, Prot::READ_WRITE, 0).expect("map");
        // SAFETY: our own mapping.
        let r = unsafe { mprotect(m.as_ptr().cast(), 4096, libc::PROT_READ) };
        assert_eq!(r, 0);
        // SAFETY: an unaligned address: EINVAL, as from libc.
        let r = unsafe { mprotect(m.as_ptr().wrapping_add(1).cast(), 4096, libc::PROT_READ) };
        assert_eq!(r, -1);
        assert_eq!(sys::Errno::last().0, libc::EINVAL);
    }
}
