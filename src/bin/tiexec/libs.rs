//! The libraries the dynamic loader will load for a program at start-up,
//! found the way glibc's loader finds them, without running the loader (which
//! would load the user's preload and audit modules once more, and costs a
//! process): `DT_NEEDED` names, searched in `DT_RPATH` (when there is no
//! `DT_RUNPATH`), `LD_LIBRARY_PATH`, `DT_RUNPATH`, the loader's cache
//! (`/etc/ld.so.cache`) and the default directories, with `$ORIGIN`
//! expanded. Reads ELF headers and dynamic sections with `pread` only.
//!
//! Used for priming their page cache before exec, and for the static TLS
//! that `--dlopen` needs.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use goblin::elf::program_header::{PT_DYNAMIC, PT_LOAD, PT_TLS};
use goblin::elf::ProgramHeader;

const DT_NEEDED: u64 = 1;
const DT_STRTAB: u64 = 5;
const DT_STRSZ: u64 = 10;
const DT_RPATH: u64 = 15;
const DT_RUNPATH: u64 = 29;
const DT_FLAGS: u64 = 30;
const DF_STATIC_TLS: u64 = 0x10;

/// What the loader needs to know of one object.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Object {
    /// Its path.
    pub path: PathBuf,
    /// Its `DT_NEEDED` names.
    pub needed: Vec<Vec<u8>>,
    /// `DT_RPATH` and `DT_RUNPATH`, `$ORIGIN` not yet expanded.
    pub rpath: Option<Vec<u8>>,
    /// See above.
    pub runpath: Option<Vec<u8>>,
    /// Bytes of thread-local storage it needs in the static TLS block:
    /// its `PT_TLS` size, aligned, when it uses the initial-exec model
    /// (`DF_STATIC_TLS`); 0 otherwise.
    pub static_tls: u64,
    /// Size of its file.
    pub file_size: u64,
    /// It names an interpreter (a dynamically linked program).
    pub interpreter: bool,
}

/// Reads `path`'s dynamic section (names, search paths, TLS needs).
pub fn read_object(path: &Path) -> Option<Object> {
    let file = File::open(path).ok()?;
    let file_size = file.metadata().ok()?.len();
    let phdrs = tiexec::internal::elf::read_program_headers(&file)?;
    let mut obj = Object {
        path: path.to_path_buf(),
        file_size,
        interpreter: tiexec::internal::elf::has_interpreter(&phdrs),
        ..Object::default()
    };
    let Some(dynamic) = phdrs.iter().find(|p| p.p_type == PT_DYNAMIC) else {
        return Some(obj); // static: needs nothing
    };
    let len = usize::try_from(dynamic.p_filesz)
        .ok()
        .filter(|&l| l <= 1 << 20)?;
    let mut raw = vec![0u8; len];
    file.read_exact_at(&mut raw, dynamic.p_offset).ok()?;
    let entries: Vec<(u64, u64)> = raw
        .chunks_exact(16)
        .map(|e| {
            let (t, v) = e.split_at(8);
            (
                u64::from_ne_bytes(t.try_into().unwrap_or([0; 8])),
                u64::from_ne_bytes(v.try_into().unwrap_or([0; 8])),
            )
        })
        .take_while(|&(t, _)| t != 0)
        .collect();
    let value = |tag| entries.iter().find(|(t, _)| *t == tag).map(|&(_, v)| v);
    let strtab = file_offset(&phdrs, value(DT_STRTAB)?)?;
    let strsz = value(DT_STRSZ).unwrap_or(0);
    // Only the few strings needed, not the whole table (libc's is 32 KiB).
    let string = |off: u64| -> Option<Vec<u8>> {
        let mut buf = [0u8; 4096];
        let len = usize::try_from(strsz.checked_sub(off)?)
            .ok()?
            .min(buf.len());
        let buf = buf.get_mut(..len)?;
        let n = file.read_at(buf, strtab.checked_add(off)?).ok()?;
        Some(buf.get(..n)?.split(|&b| b == 0).next()?.to_vec())
    };
    for &(tag, v) in &entries {
        match tag {
            DT_NEEDED => obj.needed.extend(string(v)),
            DT_RPATH => obj.rpath = string(v),
            DT_RUNPATH => obj.runpath = string(v),
            _ => {}
        }
    }
    if value(DT_FLAGS).unwrap_or(0) & DF_STATIC_TLS != 0 {
        obj.static_tls = phdrs.iter().find(|p| p.p_type == PT_TLS).map_or(0, |t| {
            tiexec::internal::plan::align_up(t.p_memsz, t.p_align.max(1).next_power_of_two())
        });
    }
    Some(obj)
}

/// The file offset of virtual address `vaddr` (in a `PT_LOAD`).
fn file_offset(phdrs: &[ProgramHeader], vaddr: u64) -> Option<u64> {
    phdrs
        .iter()
        .filter(|p| p.p_type == PT_LOAD)
        .find(|p| p.p_vaddr <= vaddr && vaddr < p.p_vaddr + p.p_filesz)
        .map(|p| vaddr - p.p_vaddr + p.p_offset)
}

/// Splits a search path (`:`-separated), expanding `$ORIGIN` and
/// `${ORIGIN}` to `origin`; other tokens (`$LIB`, `$PLATFORM`) make an
/// entry unusable here, as does an empty one.
fn search_dirs(list: &[u8], origin: &Path) -> Vec<PathBuf> {
    list.split(|&b| b == b':')
        .filter(|d| !d.is_empty())
        .filter_map(|d| {
            let d = std::str::from_utf8(d).ok()?;
            let expanded = d
                .replace("${ORIGIN}", &origin.to_string_lossy())
                .replace("$ORIGIN", &origin.to_string_lossy());
            (!expanded.contains('$')).then(|| PathBuf::from(expanded))
        })
        .collect()
}

/// The loader's cache of library names and paths (`/etc/ld.so.cache`, the
/// "glibc-ld.so.cache1.1" format), for x86-64 libc6 entries. Looked up in
/// place: a program needs a handful of its thousands of entries.
pub struct LdCache {
    bytes: Vec<u8>,
    /// Where the new format starts (it may follow an old-format table).
    start: Option<usize>,
}

/// `FLAG_ELF_LIBC6 | FLAG_X8664_LIB64`, the type of x86-64 entries.
const X86_64_LIBC6: i32 = 0x0303;

impl LdCache {
    /// Reads the cache (empty when absent or unknown).
    pub fn read(path: &Path) -> LdCache {
        LdCache::from_bytes(std::fs::read(path).unwrap_or_default())
    }

    /// The cache in `bytes`.
    pub fn from_bytes(bytes: Vec<u8>) -> LdCache {
        const MAGIC: &[u8] = b"glibc-ld.so.cache1.1";
        let start = bytes.windows(MAGIC.len()).position(|w| w == MAGIC);
        LdCache { bytes, start }
    }

    fn u32_at(&self, at: usize) -> Option<u32> {
        Some(u32::from_ne_bytes(
            self.bytes.get(at..at + 4)?.try_into().ok()?,
        ))
    }

    /// A string of the new format (offsets count from its header).
    fn string(&self, off: u32) -> Option<&[u8]> {
        let rest = self.bytes.get(self.start? + off as usize..)?;
        rest.split(|&b| b == 0).next()
    }

    /// Its x86-64 entries: `(name, path)`.
    fn entries(&self) -> impl Iterator<Item = (&[u8], &[u8])> + '_ {
        let start = self.start.unwrap_or(0);
        let nlibs = self.start.and_then(|s| self.u32_at(s + 20)).unwrap_or(0) as usize;
        (0..nlibs).filter_map(move |i| {
            let at = start + 48 + i * 24;
            let (flags, key, value) =
                (self.u32_at(at)?, self.u32_at(at + 4)?, self.u32_at(at + 8)?);
            if flags as i32 & 0xffff != X86_64_LIBC6 {
                return None;
            }
            Some((self.string(key)?, self.string(value)?))
        })
    }

    /// The path the cache gives for `name`.
    pub fn find(&self, name: &[u8]) -> Option<PathBuf> {
        self.entries()
            .find(|(n, _)| *n == name)
            .map(|(_, p)| PathBuf::from(OsStr::from_bytes(p)))
    }
}

/// The directories searched last (Debian's multiarch layout first).
const DEFAULT_DIRS: [&str; 6] = [
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib64",
    "/usr/lib64",
    "/lib",
    "/usr/lib",
];

/// The `DT_RPATH`s of the objects that led to one, with each object's path
/// (for `$ORIGIN`), outermost first.
type RpathChain = Vec<(Vec<u8>, PathBuf)>;

/// Finds the library `name` needed by `loader` (with the RPATHs of the
/// objects that loaded it, for `DT_RPATH`), in the loader's order.
fn find_library(
    name: &[u8],
    loader: &Object,
    rpath_chain: &[(Vec<u8>, PathBuf)],
    ld_library_path: &[PathBuf],
    cache: &LdCache,
) -> Option<PathBuf> {
    let name_os = OsStr::from_bytes(name);
    if name.contains(&b'/') {
        let p = PathBuf::from(name_os);
        return p.is_file().then_some(p);
    }
    let origin = |p: &Path| p.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut dirs: Vec<PathBuf> = Vec::new();
    if loader.runpath.is_none() {
        // DT_RPATH of the object, then of those that loaded it.
        for (rpath, from) in rpath_chain.iter().rev() {
            dirs.extend(search_dirs(rpath, &origin(from)));
        }
    }
    dirs.extend(ld_library_path.iter().cloned());
    if let Some(runpath) = &loader.runpath {
        dirs.extend(search_dirs(runpath, &origin(&loader.path)));
    }
    for d in &dirs {
        let p = d.join(name_os);
        if p.is_file() {
            return Some(p);
        }
    }
    if let Some(p) = cache.find(name) {
        return Some(p);
    }
    DEFAULT_DIRS
        .iter()
        .map(|d| Path::new(d).join(name_os))
        .find(|p| p.is_file())
}

/// Every library the loader loads for `program` at start-up, in load
/// order (breadth first, each once), with what it needs.
pub fn startup_libraries(program: &Object) -> Vec<Object> {
    let main = program.clone();
    let cache = LdCache::read(Path::new("/etc/ld.so.cache"));
    let ld_library_path: Vec<PathBuf> = std::env::var_os("LD_LIBRARY_PATH")
        .map(|v| search_dirs(v.as_bytes(), Path::new(".")))
        .unwrap_or_default();
    let mut seen: HashSet<Vec<u8>> = HashSet::new();
    let mut out: Vec<Object> = Vec::new();
    // (object, rpath chain of its loaders)
    let mut queue: std::collections::VecDeque<(Object, RpathChain)> =
        std::collections::VecDeque::new();
    queue.push_back((main, Vec::new()));
    while let Some((obj, mut chain)) = queue.pop_front() {
        if let Some(r) = &obj.rpath {
            chain.push((r.clone(), obj.path.clone()));
        }
        for name in &obj.needed {
            if !seen.insert(name.clone()) {
                continue;
            }
            let Some(path) = find_library(name, &obj, &chain, &ld_library_path, &cache) else {
                continue;
            };
            if let Some(lib) = read_object(&path) {
                out.push(lib.clone());
                queue.push_back((lib, chain.clone()));
            }
        }
    }
    out
}

/// glibc's static TLS surplus beyond the optional part, with one audit
/// module (glibc 2.32 and later, `_dl_tls_static_surplus_init`:
/// `192 * (nns - 1) + 144 * nns + optional_static_tls`, `nns` = the 4
/// namespaces of `glibc.rtld.nns` plus one per audit module). Measured with
/// rustc 1.95 (librustc_driver: 23 688 bytes of initial-exec TLS): it
/// starts from `optional_static_tls` = 22 500 up, not below.
const SURPLUS_WITHOUT_OPTIONAL: u64 = 192 * 4 + 144 * 5;
/// glibc's default `glibc.rtld.optional_static_tls`.
const DEFAULT_OPTIONAL: u64 = 512;
/// Room kept for alignment padding and the loader's own accounting.
const TLS_MARGIN: u64 = 1024;

/// The `glibc.rtld.optional_static_tls` a program needs when an audit
/// module is loaded (`--dlopen`), or `None` when the default serves.
///
/// With an audit module, glibc lays out the static TLS block before it loads
/// the program's libraries, which must then fit their initial-exec TLS into
/// the surplus. The least that fits them is computed here, not a fixed
/// figure: the surplus comes out of every thread's stack, and programs that
/// start threads with small stacks (Python's `threading.stack_size`, Java's
/// helper threads) must not lose them to it.
pub fn optional_static_tls(libraries: &[Object]) -> Option<u64> {
    let needed: u64 = libraries.iter().map(|l| l.static_tls).sum();
    let beyond = (needed + TLS_MARGIN).checked_sub(SURPLUS_WITHOUT_OPTIONAL)?;
    if beyond == 0 {
        return None;
    }
    Some(tiexec::internal::plan::align_up(
        DEFAULT_OPTIONAL + beyond,
        64,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn search_paths_expand_origin_and_drop_what_cannot_be_known() {
        let dirs = search_dirs(
            b"$ORIGIN/../lib::/opt/x:${ORIGIN}:$LIB/y",
            Path::new("/a/bin"),
        );
        assert_eq!(
            dirs,
            [
                PathBuf::from("/a/bin/../lib"),
                PathBuf::from("/opt/x"),
                PathBuf::from("/a/bin")
            ]
        );
    }

    #[test]
    fn the_loader_cache_of_this_machine_names_libc() {
        // Debian (what the tests run on) always has one; ldconfig makes it.
        let cache = LdCache::read(Path::new("/etc/ld.so.cache"));
        assert!(
            cache.entries().next().is_some(),
            "/etc/ld.so.cache unreadable or empty"
        );
        let libc = cache.find(b"libc.so.6").expect("libc in the cache");
        assert!(libc.is_file(), "{}", libc.display());
    }

    #[test]
    fn a_program_s_libraries_are_found_like_ldd_finds_them() {
        let libs = startup_libraries(&read_object(Path::new("/bin/sh")).unwrap());
        let names: Vec<String> = libs
            .iter()
            .map(|l| l.path.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().any(|n| n == "libc.so.6"), "{names:?}");
        let libc = libs.iter().find(|l| l.path.ends_with("libc.so.6")).unwrap();
        assert!(libc.static_tls > 0, "libc uses initial-exec TLS");
    }

    #[test]
    fn tls_surplus_is_asked_for_only_beyond_what_glibc_gives() {
        let lib = |tls| Object {
            static_tls: tls,
            ..Object::default()
        };
        assert_eq!(optional_static_tls(&[lib(0x90)]), None);
        assert_eq!(optional_static_tls(&[lib(0x90), lib(0x100)]), None);
        // rustc's librustc_driver: 23 688 bytes of initial-exec TLS; it
        // starts from 22 500 up (measured), and the margin stays small.
        let n = optional_static_tls(&[lib(0x90), lib(23_688)]).unwrap();
        assert!(n > 22_500 && n < 26 << 10, "{n}");
        assert_eq!(n % 64, 0);
    }
}
