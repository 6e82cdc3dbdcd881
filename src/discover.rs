//! What is loaded, and what the machine offers. Reads only: the loader's list
//! of objects (`dl_iterate_phdr`), /proc and /sys.

use crate::elf;
use crate::policy::Offer;
use crate::range::Range;
use crate::sys;

/// One loaded ELF object and its executable segments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadedObject {
    /// Its path (for the main program, `/proc/self/exe` resolved).
    pub path: String,
    /// Load bias (`dlpi_addr`): 0 for non-PIE executables.
    pub bias: u64,
    /// True for the main program (the loader lists it first).
    pub is_main: bool,
    /// Executable `PT_LOAD` segments as mapped (page-rounded), ascending.
    pub text_segments: Vec<Range>,
    /// `PT_LOAD` segments that are not writable per the ELF flags.
    pub read_only_segments: Vec<Range>,
    /// All `PT_LOAD` segments as mapped, for telling whose pages are whose.
    pub load_segments: Vec<Range>,
    /// Its ELF build ID (empty when it has none).
    pub build_id: Vec<u8>,
    /// Its dynamic section asks for text relocations (`DT_TEXTREL`): the
    /// loader writes into its text, which then differs from its file.
    pub text_relocations: bool,
}

impl LoadedObject {
    /// Bytes of executable segments.
    pub fn text_bytes(&self) -> u64 {
        self.text_segments.iter().map(Range::len).sum()
    }

    /// True when `addr` lies in one of this object's segments.
    pub fn contains(&self, addr: u64) -> bool {
        self.load_segments
            .iter()
            .any(|r| r.start <= addr && addr < r.end)
    }

    /// A digest of what makes this object's text what it is, wherever it is
    /// loaded: its build ID and its text segments' link-time ranges (a
    /// rebuilt object differs in one or the other). Keys its hot map.
    pub fn identity_digest(&self) -> u64 {
        let mut bytes = self.build_id.clone();
        for s in &self.text_segments {
            bytes.extend_from_slice(&s.start.wrapping_sub(self.bias).to_le_bytes());
            bytes.extend_from_slice(&s.len().to_le_bytes());
        }
        crate::history::fnv1a(&bytes)
    }
}

/// `RTLD_DL_LINKMAP` from <dlfcn.h> (not in the libc crate).
const RTLD_DL_LINKMAP: libc::c_int = 2;

/// True when the copy of this library whose code is at `own` lives in the
/// program's own link-map namespace (not in the one the loader makes for
/// audit modules).
pub fn in_base_namespace_of(own: u64) -> bool {
    let mut info = libc::Dl_info {
        dli_fname: core::ptr::null(),
        dli_fbase: core::ptr::null_mut(),
        dli_sname: core::ptr::null(),
        dli_saddr: core::ptr::null_mut(),
    };
    let mut map: *mut libc::c_void = core::ptr::null_mut();
    // SAFETY: dladdr1 with RTLD_DL_LINKMAP stores our link map (a valid
    // handle for dlinfo) into `map`; both out-pointers are valid.
    let found = unsafe {
        libc::dladdr1(
            own as *const libc::c_void,
            &mut info,
            (&mut map as *mut *mut libc::c_void).cast(),
            RTLD_DL_LINKMAP,
        )
    };
    if found == 0 || map.is_null() {
        return true; // statically linked: there is only one namespace
    }
    let mut lmid: libc::c_long = libc::LM_ID_BASE;
    // SAFETY: `map` is a link map (dlopen handle) from the loader; `lmid` is
    // a valid out-pointer of the size RTLD_DI_LMID writes.
    let ok = unsafe {
        libc::dlinfo(
            map,
            libc::RTLD_DI_LMID,
            (&mut lmid as *mut libc::c_long).cast(),
        )
    };
    ok != 0 || lmid == libc::LM_ID_BASE
}

/// The head of glibc's `struct link_map` (public ABI: `<link.h>`).
#[repr(C)]
pub struct LinkMap {
    /// The load bias.
    pub l_addr: usize,
    /// The file's name as the loader opened it.
    pub l_name: *const libc::c_char,
    l_ld: *mut libc::c_void,
    l_next: *mut LinkMap,
    l_prev: *mut LinkMap,
}

/// This copy of the library: its load bias and file name, from the
/// loader's link map (`None` without a loader: a static program).
pub fn own_load() -> Option<(u64, std::ffi::CString)> {
    let mut info = libc::Dl_info {
        dli_fname: core::ptr::null(),
        dli_fbase: core::ptr::null_mut(),
        dli_sname: core::ptr::null(),
        dli_saddr: core::ptr::null_mut(),
    };
    let mut map: *mut LinkMap = core::ptr::null_mut();
    let own = own_load as *const () as *const libc::c_void;
    // SAFETY: dladdr1 with RTLD_DL_LINKMAP stores our link map into `map`;
    // both out-pointers are valid.
    let found = unsafe {
        libc::dladdr1(
            own,
            &mut info,
            (&mut map as *mut *mut LinkMap).cast(),
            RTLD_DL_LINKMAP,
        )
    };
    if found == 0 || map.is_null() {
        return None;
    }
    // SAFETY: the loader's link map of a loaded object (ours), valid while
    // we are loaded; `l_name` is NUL-terminated, owned by the loader.
    let (bias, name) = unsafe { ((*map).l_addr as u64, (*map).l_name) };
    if name.is_null() {
        return None;
    }
    // SAFETY: as above.
    let name = unsafe { core::ffi::CStr::from_ptr(name) }.to_owned();
    Some((bias, name))
}

/// True when this copy of the library lives in the program's own link-map
/// namespace.
pub fn in_base_namespace() -> bool {
    in_base_namespace_of(in_base_namespace as *const () as usize as u64)
}

struct Collector {
    objects: Vec<LoadedObject>,
    first: bool,
}

unsafe extern "C" fn collect_object(
    info: *mut libc::dl_phdr_info,
    _size: libc::size_t,
    data: *mut libc::c_void,
) -> libc::c_int {
    // SAFETY: `data` is the &mut Collector passed to dl_iterate_phdr below,
    // alive and exclusively ours for the whole iteration.
    let collector = unsafe { &mut *data.cast::<Collector>() };
    // SAFETY: the loader passes a valid dl_phdr_info for this callback.
    let info = unsafe { &*info };
    let is_main = collector.first;
    collector.first = false;
    let bias = info.dlpi_addr;
    let phdrs: &[libc::Elf64_Phdr] = if info.dlpi_phdr.is_null() {
        &[]
    } else {
        // SAFETY: dlpi_phdr points at dlpi_phnum program headers of a loaded
        // object, which stay mapped while the object is loaded.
        unsafe { core::slice::from_raw_parts(info.dlpi_phdr, info.dlpi_phnum as usize) }
    };
    let segments = elf::segments(
        phdrs
            .iter()
            .filter(|ph| ph.p_type == libc::PT_LOAD)
            .map(|ph| (ph.p_flags, ph.p_vaddr, ph.p_memsz)),
        bias,
    );
    let name = if info.dlpi_name.is_null() {
        &[][..]
    } else {
        // SAFETY: dlpi_name is a NUL-terminated string owned by the loader.
        unsafe { core::ffi::CStr::from_ptr(info.dlpi_name) }.to_bytes()
    };
    let path = if is_main || name.is_empty() {
        if is_main {
            std::fs::read_link("/proc/self/exe")
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default()
        } else {
            String::new()
        }
    } else {
        String::from_utf8_lossy(name).into_owned()
    };
    let (build_id, text_relocations) = identity_from_memory(phdrs, bias);
    collector.objects.push(LoadedObject {
        path,
        bias,
        is_main,
        text_segments: segments.text,
        read_only_segments: segments.read_only,
        load_segments: segments.all,
        build_id,
        text_relocations,
    });
    0
}

/// The build ID and the text-relocation flag of a loaded object, read from
/// its note and dynamic segments in memory. A segment is read only when it
/// lies inside one of the object's `PT_LOAD` segments (so it is mapped).
fn identity_from_memory(phdrs: &[libc::Elf64_Phdr], bias: u64) -> (Vec<u8>, bool) {
    let loaded = |ph: &libc::Elf64_Phdr| -> Option<&'static [u8]> {
        let start = bias.wrapping_add(ph.p_vaddr);
        let len = ph.p_memsz.min(1 << 20);
        let inside = phdrs.iter().any(|l| {
            l.p_type == libc::PT_LOAD
                && l.p_vaddr <= ph.p_vaddr
                && ph.p_vaddr.saturating_add(len) <= l.p_vaddr.saturating_add(l.p_filesz)
        });
        if !inside || len == 0 {
            return None;
        }
        // SAFETY: the range lies inside a PT_LOAD segment of a loaded object
        // (checked above), which the loader mapped readable and keeps mapped
        // while the object is loaded.
        Some(unsafe { core::slice::from_raw_parts(start as *const u8, len as usize) })
    };
    let build_id = phdrs
        .iter()
        .filter(|ph| ph.p_type == libc::PT_NOTE)
        .filter_map(loaded)
        .find_map(elf::build_id_in_notes)
        .map(<[u8]>::to_vec)
        .unwrap_or_default();
    let text_relocations = phdrs
        .iter()
        .filter(|ph| ph.p_type == libc::PT_DYNAMIC)
        .filter_map(loaded)
        .any(|d| {
            elf::has_text_relocations(d.chunks_exact(16).map(|e| {
                let (t, v) = e.split_at(8);
                (
                    u64::from_ne_bytes(t.try_into().unwrap_or([0; 8])),
                    u64::from_ne_bytes(v.try_into().unwrap_or([0; 8])),
                )
            }))
        });
    (build_id, text_relocations)
}

/// Every object the loader knows about, the main program first.
pub fn loaded_objects() -> Vec<LoadedObject> {
    let mut collector = Collector {
        objects: Vec::new(),
        first: true,
    };
    // SAFETY: the callback only touches `collector` through `data`, and
    // `collector` outlives the call.
    unsafe {
        libc::dl_iterate_phdr(
            Some(collect_object),
            (&mut collector as *mut Collector).cast(),
        )
    };
    collector.objects
}

/// The number of threads in this process (`Threads:` in /proc/self/status).
pub fn thread_count() -> Option<u64> {
    let mut buf = [0u8; 4096];
    let n = sys::read_small_file(c"/proc/self/status", &mut buf).ok()?;
    let text = buf.get(..n)?;
    field_value(text, b"Threads:")
}

/// Parses `Name:\t<number>` out of a /proc status-like text.
pub fn field_value(text: &[u8], name: &[u8]) -> Option<u64> {
    text.split(|&b| b == b'\n')
        .find_map(|line| line.strip_prefix(name))
        .and_then(parse_leading_u64)
}

fn parse_leading_u64(bytes: &[u8]) -> Option<u64> {
    let digits: &[u8] = {
        let start = bytes.iter().position(|b| !b.is_ascii_whitespace())?;
        let rest = bytes.get(start..)?;
        let len = rest
            .iter()
            .position(|b| !b.is_ascii_digit())
            .unwrap_or(rest.len());
        rest.get(..len)?
    };
    if digits.is_empty() {
        return None;
    }
    let mut v: u64 = 0;
    for d in digits {
        v = v.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
    }
    Some(v)
}

fn read_sys_u64(path: &core::ffi::CStr) -> Option<u64> {
    let mut buf = [0u8; 64];
    let n = sys::read_small_file(path, &mut buf).ok()?;
    parse_leading_u64(buf.get(..n)?)
}

/// The hugetlb pool of tiexec's huge page size, system-wide.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pool {
    /// `nr_hugepages`.
    pub total: u64,
    /// `free_hugepages` (includes reserved ones).
    pub free: u64,
    /// `resv_hugepages`: promised to mappings, not yet faulted.
    pub reserved: u64,
}

impl Pool {
    /// Pages a new mapping can still reserve.
    pub fn available(&self) -> u64 {
        self.free.saturating_sub(self.reserved)
    }
}

/// Reads the pool of the huge page size tiexec uses (2 MiB with 4 KiB base
/// pages; `range::huge_page`) from /sys (zeros when absent). Allocates
/// nothing.
pub fn hugetlb_pool() -> Pool {
    let read = |file: &str| {
        let mut path = crate::log::LineBuf::new();
        let _ =
            core::fmt::Write::write_fmt(&mut path, format_args!("{}/{file}\0", hugetlb_pool_dir()));
        core::ffi::CStr::from_bytes_until_nul(path.as_bytes())
            .ok()
            .and_then(read_sys_u64)
            .unwrap_or(0)
    };
    Pool {
        total: read("nr_hugepages"),
        free: read("free_hugepages"),
        reserved: read("resv_hugepages"),
    }
}

/// The sysfs directory of that pool.
pub fn hugetlb_pool_dir() -> crate::pagesize::HugetlbDir {
    crate::pagesize::HugetlbDir(crate::pagesize::huge_page())
}

/// The system-wide THP mode (`always`, `madvise` or `never`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThpMode {
    /// `[always]`.
    Always,
    /// `[madvise]`.
    Madvise,
    /// `[never]`, or THP not built into the kernel.
    Never,
}

/// Parses the text of `/sys/kernel/mm/transparent_hugepage/enabled`.
pub fn parse_thp_mode(text: &[u8]) -> ThpMode {
    let has = |needle: &[u8]| text.windows(needle.len()).any(|w| w == needle);
    if has(b"[always]") {
        ThpMode::Always
    } else if has(b"[madvise]") {
        ThpMode::Madvise
    } else {
        ThpMode::Never
    }
}

/// Reads the THP mode.
pub fn thp_mode() -> ThpMode {
    let mut buf = [0u8; 128];
    match sys::read_small_file(c"/sys/kernel/mm/transparent_hugepage/enabled", &mut buf) {
        Ok(n) => parse_thp_mode(buf.get(..n).unwrap_or(&[])),
        Err(_) => ThpMode::Never,
    }
}

/// The soft `RLIMIT_AS` (bytes), or `None` without a limit.
pub fn address_space_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the limit into `limit`, a valid out-pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut limit) } != 0
        || limit.rlim_cur == libc::RLIM_INFINITY
    {
        return None;
    }
    Some(limit.rlim_cur)
}

/// Bytes of address space this process can still map under `RLIMIT_AS`
/// (the limit less `VmSize`), or `None` without a limit. Reads without
/// allocating, so it can run before anything else.
pub fn address_space_headroom() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the limit into `limit`, a valid out-pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut limit) } != 0
        || limit.rlim_cur == libc::RLIM_INFINITY
    {
        return None;
    }
    let mut buf = [0u8; 4096];
    let n = sys::read_small_file(c"/proc/self/status", &mut buf).ok()?;
    let vm_kib = field_value(buf.get(..n)?, b"VmSize:")?;
    Some(limit.rlim_cur.saturating_sub(vm_kib.saturating_mul(1024)))
}

/// Bytes this process's memory cgroups can still charge before the
/// tightest limit up its tree (v2 `memory.max - memory.current`, or v1
/// `memory.limit_in_bytes - memory.usage_in_bytes`, see `cgroup`); `None`
/// when there is no limit or it cannot be read. Anonymous THP staging is
/// charged there, and over the limit the kernel reclaims and may OOM-kill:
/// check first.
pub fn memory_cgroup_headroom() -> Option<u64> {
    crate::cgroup::memory().map(|l| l.free)
}

/// What the machine offers this process now (`cache`: whether the image
/// cache opened; `mprotect_guarded`: see [`Offer::mprotect_guarded`]). The
/// pool is read only for the one backend that takes from it (three sysfs
/// files every process would otherwise read for nothing).
pub fn offer(cache: bool, backend: crate::config::Backend, mprotect_guarded: bool) -> Offer {
    Offer {
        pool_available: if backend == crate::config::Backend::Hugetlb {
            hugetlb_pool().available()
        } else {
            0
        },
        thp_usable: thp_mode() != ThpMode::Never && !sys::thp_disabled_for_process(),
        cache,
        mdwe: sys::mdwe_refuses_exec_gain(),
        mprotect_guarded,
    }
}

/// Whether the kernel collapses a regular file's cached text into 2 MiB
/// pages in place (`MADV_COLLAPSE` on read-only file text, which needs
/// `CONFIG_READ_ONLY_THP_FOR_FS`), probed on a 4 MiB file in `dir` made with
/// `O_TMPFILE`: it never has a name, so nothing can be planted in its place
/// and nothing is left behind.
pub fn probe_file_collapse(dir: &std::path::Path) -> Result<(), String> {
    use std::os::fd::AsFd;
    use std::os::unix::ffi::OsStrExt;
    const LEN: usize = 4 << 20;
    let dir_c = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
    let dir_fd = sys::open_dir_at(None, &dir_c).map_err(|e| format!("{}: {e}", dir.display()))?;
    let file = sys::open_at(
        Some(dir_fd.as_fd()),
        c".",
        libc::O_TMPFILE | libc::O_RDWR,
        0o600,
    )
    .map_err(|e| format!("O_TMPFILE in {}: {e}", dir.display()))?;
    sys::write_all(file.as_fd(), &vec![0xc3u8; LEN]).map_err(|e| e.to_string())?;
    // Read-only, and no longer open for writing: what text is.
    let read_only = sys::reopen_read_only(file.as_fd()).map_err(|e| e.to_string())?;
    drop(file);
    // SAFETY: an unnamed file (O_TMPFILE) only this process holds, `LEN`
    // bytes long.
    let mut map =
        unsafe { sys::Mapping::file(read_only.as_fd(), 0, LEN, sys::Prot::READ, false, false) }
            .map_err(|e| format!("mmap: {e}"))?;
    // A 2 MiB page inside the mapping is congruent with the file only when
    // the kernel placed the mapping 2 MiB-aligned (it does for files this
    // big); otherwise the answer is unknown.
    if map.start() % crate::pagesize::huge_page() != 0 {
        return Err("unknown (could not place a congruent mapping)".into());
    }
    let huge = crate::pagesize::huge_page() as usize;
    let _ = map.advise_range(0, huge, libc::MADV_HUGEPAGE);
    map.advise_range(0, huge, sys::MADV_COLLAPSE)
        .map_err(|e| format!("{} (kernel without CONFIG_READ_ONLY_THP_FOR_FS?)", e.name()))
}

/// How long this process has existed, in milliseconds (from its start time
/// in /proc/self/stat and the boot-time clock).
pub fn process_age_ms() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold anything): state is
    // field 3, starttime field 22.
    let rest = stat.rsplit_once(')')?.1;
    let start_ticks: u64 = rest.split_whitespace().nth(19)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).ok()?;
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } != 0 {
        return None;
    }
    let now_ms = (ts.tv_sec as u64) * 1000 + (ts.tv_nsec as u64) / 1_000_000;
    Some(now_ms.saturating_sub(start_ticks * 1000 / hz.max(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_fields() {
        let text = b"Name:\tcat\nThreads:\t12\nSigQ:\t0/1\n";
        assert_eq!(field_value(text, b"Threads:"), Some(12));
        assert_eq!(field_value(text, b"Missing:"), None);
        assert_eq!(field_value(b"Threads:\t\n", b"Threads:"), None);
        assert_eq!(
            field_value(b"Threads:\t99999999999999999999999\n", b"Threads:"),
            None
        );
    }

    #[test]
    fn thp_modes() {
        assert_eq!(
            parse_thp_mode(b"always [madvise] never\n"),
            ThpMode::Madvise
        );
        assert_eq!(parse_thp_mode(b"[always] madvise never\n"), ThpMode::Always);
        assert_eq!(parse_thp_mode(b"always madvise [never]\n"), ThpMode::Never);
        assert_eq!(parse_thp_mode(b""), ThpMode::Never);
    }

    #[test]
    fn this_test_binary_is_found_first_with_text() {
        let objects = loaded_objects();
        let main = objects.first().expect("main program");
        assert!(main.is_main);
        assert!(main.text_bytes() > 0);
        let here = this_test_binary_is_found_first_with_text as *const () as usize as u64;
        assert!(main
            .text_segments
            .iter()
            .any(|r| r.start <= here && here < r.end));
        assert!(thread_count().unwrap_or(0) >= 1);
        assert!(!main.text_relocations);
        assert!(process_age_ms().is_some_and(|ms| ms < 24 * 3600 * 1000));
    }
}
