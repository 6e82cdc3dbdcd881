//! Libraries loaded after start-up (`dlopen`), through the loader's audit
//! interface: `LD_AUDIT=libtiexec.so` (the `tiexec` wrapper sets it).
//!
//! Why the audit hook and not an interposed `dlopen`: glibc resolves a
//! `dlopen` relative to its caller (RUNPATH, `$ORIGIN`, namespace), which an
//! interposer would change; and after `dlopen` returns, the library's
//! constructors may have started threads that run its code. `la_objopen`
//! runs inside the loader right after the object is mapped, before it is
//! relocated and before any of its code can run, in the thread that loads
//! it; other threads may run, but none can be in this object's text. So the
//! swap is safe there with any number of threads.
//!
//! The loader runs audit modules in a link-map namespace of their own, with
//! their own copy of libc: this copy of tiexec has its own statics, and its
//! constructor does nothing (see `preload`). Objects loaded at start-up are
//! left to the preloaded copy's constructor: this module acts only once the
//! loader reported the start-up set complete (`la_activity`).
//!
//! What it may not do: unwind into the loader (everything runs under
//! `catch_unwind`), ask for symbol-binding hooks (they would slow every PLT
//! call), or stop the load.

use core::sync::atomic::{AtomicBool, Ordering};

use crate::config;
use crate::discover::LoadedObject;
use crate::elf;
use crate::log::Level;
use crate::pipeline;
use crate::select;
use crate::session::Refusal;
use crate::smaps;

/// `LA_ACT_CONSISTENT`: the set of loaded objects is complete again.
const LA_ACT_CONSISTENT: libc::c_uint = 0;

/// Set once the loader reported the start-up objects complete.
static STARTED: AtomicBool = AtomicBool::new(false);

use crate::discover::LinkMap;

/// The loader asks which audit interface version we speak: 2 (glibc 2.35's
/// `LAV_CURRENT`), or the loader's own when it is lower. The hooks used here
/// (`la_activity`, `la_objopen`) are the same in versions 1 and 2.
#[no_mangle]
pub extern "C" fn la_version(version: libc::c_uint) -> libc::c_uint {
    version.min(2)
}

/// The loader reports changes to the set of loaded objects.
#[no_mangle]
pub extern "C" fn la_activity(_cookie: *mut usize, flag: libc::c_uint) {
    if flag == LA_ACT_CONSISTENT {
        STARTED.store(true, Ordering::Release);
    }
}

/// An object was mapped (not yet relocated, none of its code run).
///
/// # Safety
/// Called by the loader with a valid link map for the new object.
#[no_mangle]
pub unsafe extern "C" fn la_objopen(
    map: *mut LinkMap,
    _lmid: libc::c_long,
    _cookie: *mut usize,
) -> libc::c_uint {
    if map.is_null() {
        return 0;
    }
    // SAFETY: the loader passes a valid link map that lives at least as long
    // as this call.
    let (bias, name) = unsafe { ((*map).l_addr as u64, (*map).l_name) };
    if name.is_null() {
        return 0;
    }
    // SAFETY: l_name is a NUL-terminated string owned by the loader.
    let name = unsafe { core::ffi::CStr::from_ptr(name) };
    if std::panic::catch_unwind(|| crate::interpose::note_object_loaded(bias, name)).is_err() {
        return 0;
    }
    if !STARTED.load(Ordering::Acquire) {
        return 0;
    }
    let name = name.to_bytes().to_vec();
    if std::panic::catch_unwind(|| object_opened(bias, &name)).is_err() {
        crate::tlog!(Level::Error, "internal error; library left as it was");
    }
    // No LA_FLG_BINDTO / LA_FLG_BINDFROM: no symbol-binding hooks.
    0
}

fn object_opened(bias: u64, name: &[u8]) {
    let env = config::EnvSnapshot::take();
    let parsed = env.parse();
    crate::log::set_level(parsed.config.log);
    crate::fault::set(parsed.config.fault);
    let config = parsed.config;
    if name.is_empty() {
        return;
    }
    // The session's refusals, less the thread count: here, before the new
    // object's code can run, other threads do no harm.
    if let Some(why) = Refusal::before_selection(config.backend)
        .or_else(|| crate::sys::secure_execution().then_some(Refusal::SecureExecution))
    {
        crate::tlog!(
            Level::Debug,
            "{}: {why}: left alone",
            String::from_utf8_lossy(name)
        );
        return;
    }
    let path = String::from_utf8_lossy(name).into_owned();
    let Ok(vmas) = smaps::read(None) else {
        return;
    };
    let Some(object) = object_from_mappings(&path, bias, &vmas) else {
        crate::tlog!(
            Level::Info,
            "{path}: loaded later, but not found mapped from its file: left alone"
        );
        return;
    };
    if let Err(why) = select::select(name, object.text_bytes(), false, &config) {
        crate::tlog!(Level::Debug, "{path}: left alone: {}", why.describe());
        return;
    }
    if !pipeline::worth_planning(&object, config.strategy) {
        crate::tlog!(
            Level::Debug,
            "{path}: text {} holds no whole {} page: nothing to do",
            crate::log::Bytes(object.text_bytes()),
            crate::pagesize::huge_page_name()
        );
        return;
    }
    if object.text_relocations {
        // The loader is about to write into its text: it must stay the
        // file's private pages, writable for that moment.
        crate::tlog!(Level::Info, "{path}: has text relocations: left alone");
        return;
    }
    let program = std::fs::read_link("/proc/self/exe")
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    let origin = crate::session::origin_from_env(&env);
    let ctx = crate::session::open_context(&config, program, origin, false);
    let objects = [object];
    // SAFETY: the object was just mapped by the loader, which holds its lock
    // and will not unmap it during this call; none of its code has run or can
    // run before la_objopen returns (it is not relocated, and no other
    // thread can reach it yet).
    let reports = unsafe { pipeline::remap_objects(&objects, &ctx) };
    if let Ok(mut opened) = ON_HUGETLB.lock() {
        for (range, source) in reports.iter().flat_map(|r| &r.swapped) {
            if source.on_hugetlb() {
                opened.push((bias, *range));
            }
        }
    }
    crate::session::after_swap(&objects, &reports, &config, false);
}

/// An object is about to be unloaded (its last `dlclose`): the ranges of
/// its text on hugetlb pages leave the `mprotect` interposer's registry, so
/// that nothing mapped there later is taken for them (see `interpose`).
///
/// # Safety
/// Called by the loader with the cookie of an object it reported to
/// `la_objopen` (by default, its link map's address), while the object is
/// still mapped.
#[no_mangle]
pub unsafe extern "C" fn la_objclose(cookie: *mut usize) -> libc::c_uint {
    if cookie.is_null() {
        return 0;
    }
    // SAFETY: the loader's cookie holds the object's link map (we never set
    // it to anything else), valid until the object is unmapped, after this
    // call.
    let map = unsafe { *cookie } as *const LinkMap;
    if map.is_null() {
        return 0;
    }
    // SAFETY: as above: a valid link map.
    let bias = unsafe { (*map).l_addr } as u64;
    let _ = std::panic::catch_unwind(|| {
        let Ok(mut opened) = ON_HUGETLB.lock() else {
            return;
        };
        opened.retain(|&(b, range)| {
            if b == bias {
                crate::interpose::unregister(range);
            }
            b != bias
        });
    });
    0
}

/// Text this hook put on hugetlb pages, by the load bias of its object (the
/// link map's `l_addr`, which `la_objclose` sees again).
static ON_HUGETLB: std::sync::Mutex<Vec<(u64, crate::range::Range)>> =
    std::sync::Mutex::new(Vec::new());

/// Builds the object's description from its program headers, read from its
/// file (the header table is not always in a mapped page), after checking
/// that the file is the one mapped (same inode as a mapping of it).
pub(crate) fn object_from_mappings(
    path: &str,
    bias: u64,
    vmas: &[smaps::Vma],
) -> Option<LoadedObject> {
    use std::os::unix::fs::MetadataExt;
    let file = std::fs::File::open(path).ok()?;
    let inode = file.metadata().ok()?.ino();
    let canonical = std::fs::canonicalize(path).ok()?;
    let canonical = canonical.to_str()?;
    if !vmas.iter().any(|v| v.path == canonical && v.inode == inode) {
        return None;
    }
    let phdrs = elf::read_program_headers(&file)?;
    let segments = elf::load_segments(&phdrs, bias);
    let (build_id, text_relocations) = elf::read_identity_notes(&file, &phdrs);
    Some(LoadedObject {
        path: path.to_string(),
        bias,
        is_main: false,
        text_segments: segments.text,
        read_only_segments: segments.read_only,
        load_segments: segments.all,
        build_id,
        text_relocations,
    })
}
