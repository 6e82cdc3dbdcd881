//! Keeping profilers and debuggers useful once text lives in anonymous huge
//! pages instead of the file mapping.
//!
//! - Debuggers (gdb) find symbols through the loader's list of objects and
//!   the files on disk, by address: unchanged addresses keep backtraces
//!   named. Nothing to do.
//! - `/proc/PID/maps` shows the swapped THP ranges as `[anon:tiexec:NAME]`
//!   (`PR_SET_VMA_ANON_NAME`, Linux 5.17 with `CONFIG_ANON_VMA_NAME`; hugetlb
//!   ranges cannot be named and show as `/anon_hugepage`).
//! - `perf report` resolves samples in anonymous memory through
//!   `/tmp/perf-PID.map` (the format JIT compilers write: `START SIZE name`,
//!   hex). With `TIEXEC_PERF_MAP=1`, tiexec appends the functions of every
//!   range it moved to anonymous memory. The file is opened without
//!   following symlinks and used only if this user owns it.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};

use crate::policy::Source;
use crate::range::Range;
use crate::sys::Errno;

/// The name shown in /proc/PID/maps for `path`'s swapped text:
/// `tiexec:FILE`, printable ASCII without the characters the kernel refuses.
pub fn anon_name(path: &str) -> std::ffi::CString {
    let file = path.rsplit('/').next().unwrap_or(path);
    let clean: String = file
        .chars()
        .filter(|c| c.is_ascii_graphic() && !matches!(c, '[' | ']' | '\\' | '$' | '`'))
        .take(64)
        .collect();
    std::ffi::CString::new(format!("tiexec:{clean}")).unwrap_or_default()
}

/// Names the anonymous (THP) ranges tiexec swapped in for `path`. Failures
/// (an older kernel, no `CONFIG_ANON_VMA_NAME`) are ignored: names are a
/// convenience.
pub fn name_swapped_ranges(path: &str, swapped: &[(Range, Source)]) {
    let name = anon_name(path);
    for (range, _) in swapped.iter().filter(|(_, s)| *s == Source::Thp) {
        let _ = crate::sys::name_anonymous_range(*range, &name);
    }
}

/// A read-only mapping of a whole file (unmapped on drop).
struct MappedFile(crate::sys::Mapping);

impl MappedFile {
    #[allow(unsafe_code)] // maps a loaded object: see the SAFETY note
    fn open(path: &str) -> Result<MappedFile, Errno> {
        use std::os::fd::AsFd;
        let file = std::fs::File::open(path).map_err(|e| Errno(e.raw_os_error().unwrap_or(0)))?;
        let len = file.metadata().map(|m| m.len() as usize).unwrap_or(0);
        if len == 0 {
            return Err(Errno(libc::EINVAL));
        }
        // SAFETY: `path` is an object this process has loaded: shrinking
        // it would already take the program's own text away (SIGBUS).
        unsafe {
            crate::sys::Mapping::file(file.as_fd(), 0, len, crate::sys::Prot::READ, false, false)
        }
        .map(MappedFile)
    }

    fn bytes(&self) -> &[u8] {
        self.0.bytes().unwrap_or(&[])
    }
}

/// `(runtime address, size, name)` of the functions of an ELF image (symbol
/// table, else dynamic symbols) that lie in `ranges`, loaded at `bias`.
pub fn functions_in(elf_bytes: &[u8], bias: u64, ranges: &[Range]) -> Vec<(u64, u64, String)> {
    use goblin::elf::sym::STT_FUNC;
    let Ok(elf) = goblin::elf::Elf::parse(elf_bytes) else {
        return Vec::new();
    };
    let (syms, strtab) = if elf.syms.is_empty() {
        (&elf.dynsyms, &elf.dynstrtab)
    } else {
        (&elf.syms, &elf.strtab)
    };
    let mut out: Vec<(u64, u64, String)> = syms
        .iter()
        .filter(|s| s.st_type() == STT_FUNC && s.st_size > 0 && s.st_shndx != 0)
        .filter_map(|s| {
            let addr = bias.wrapping_add(s.st_value);
            let inside = ranges.iter().any(|r| r.start <= addr && addr < r.end);
            let name = strtab.get_at(s.st_name)?;
            (inside && !name.is_empty()).then(|| (addr, s.st_size, name.to_string()))
        })
        .collect();
    out.sort();
    out.dedup_by_key(|(a, _, _)| *a);
    out
}

/// Appends the functions of `path`'s swapped ranges (hugetlb and THP; the
/// page cache keeps its file name) to `/tmp/perf-PID.map`. Returns how many
/// lines were written.
pub fn append_perf_map(
    path: &str,
    bias: u64,
    swapped: &[(Range, Source)],
) -> Result<usize, String> {
    let ranges: Vec<Range> = swapped
        .iter()
        .filter(|(_, s)| *s != Source::PageCache)
        .map(|(r, _)| *r)
        .collect();
    if ranges.is_empty() {
        return Ok(0);
    }
    let file = MappedFile::open(path).map_err(|e| format!("{path}: {e}"))?;
    let functions = functions_in(file.bytes(), bias, &ranges);
    drop(file);
    let map_path = format!("/tmp/perf-{}.map", std::process::id());
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&map_path)
        .map_err(|e| format!("{map_path}: {e}"))?;
    let meta = f.metadata().map_err(|e| format!("{map_path}: {e}"))?;
    let me = crate::sys::effective_uid();
    if !meta.is_file() || meta.uid() != me {
        return Err(format!(
            "{map_path}: not a regular file of this user; left alone"
        ));
    }
    let mut text = String::with_capacity(functions.len() * 48);
    for (addr, size, name) in &functions {
        text.push_str(&format!("{addr:x} {size:x} {name}\n"));
    }
    f.write_all(text.as_bytes())
        .map_err(|e| format!("{map_path}: {e}"))?;
    Ok(functions.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_what_the_kernel_accepts() {
        assert_eq!(
            anon_name("/usr/lib/libLLVM.so.22").to_str().unwrap(),
            "tiexec:libLLVM.so.22"
        );
        assert_eq!(anon_name("/x/a[b]$c d").to_str().unwrap(), "tiexec:abcd");
    }

    /// A function that stays a function of its own in any build profile.
    #[inline(never)]
    #[allow(unsafe_code)] // no_mangle: the symbol name the test looks for
    #[no_mangle]
    extern "C" fn tiexec_profiling_test_marker() -> u32 {
        std::hint::black_box(7)
    }

    #[test]
    fn this_test_binary_lists_its_own_functions() {
        assert_eq!(std::hint::black_box(tiexec_profiling_test_marker)(), 7);
        let exe = std::fs::read("/proc/self/exe").unwrap();
        let all = functions_in(&exe, 0, &[Range::new(0, u64::MAX)]);
        assert!(all
            .iter()
            .any(|(_, _, n)| n == "tiexec_profiling_test_marker"));
        assert!(functions_in(&exe, 0, &[]).is_empty());
    }
}
