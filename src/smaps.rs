//! `/proc/<pid>/smaps`: the kernel's own account of every mapping and the
//! page sizes behind it. Parsing is pure over text; the same code reads back
//! coverage after a swap, in tests, and in the CLI.

use crate::plan::{huge_page, Range};

/// One mapping (VMA) with the fields tiexec needs. Sizes in bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Vma {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// Readable.
    pub read: bool,
    /// Writable.
    pub write: bool,
    /// Executable.
    pub exec: bool,
    /// Private (copy-on-write), as opposed to shared.
    pub private: bool,
    /// File offset of `start`.
    pub offset: u64,
    /// Device of the file (`st_dev` encoding); 0 for anonymous memory.
    pub dev: u64,
    /// Inode number; 0 for anonymous memory.
    pub inode: u64,
    /// The path or pseudo-name (`[heap]`, `/anon_hugepage (deleted)`), or
    /// empty.
    pub path: String,
    /// `KernelPageSize`: 2 MiB for hugetlb mappings, else 4 KiB.
    pub kernel_page_size: u64,
    /// `Rss`.
    pub rss: u64,
    /// `AnonHugePages`: anonymous THP mapped with 2 MiB entries.
    pub anon_huge: u64,
    /// `FilePmdMapped`: page-cache THP mapped with 2 MiB entries.
    pub file_pmd_mapped: u64,
    /// `ShmemPmdMapped`.
    pub shmem_pmd_mapped: u64,
    /// `Private_Hugetlb`.
    pub private_hugetlb: u64,
    /// `Shared_Hugetlb`.
    pub shared_hugetlb: u64,
}

impl Vma {
    /// The mapping's address range.
    pub fn range(&self) -> Range {
        Range::new(self.start, self.end)
    }

    /// Bytes of this mapping that the kernel maps with 2 MiB pages.
    pub fn huge_bytes(&self) -> u64 {
        if self.kernel_page_size >= huge_page() {
            self.private_hugetlb + self.shared_hugetlb
        } else {
            self.anon_huge + self.file_pmd_mapped + self.shmem_pmd_mapped
        }
    }

    /// True for a hugetlb mapping.
    pub fn is_hugetlb(&self) -> bool {
        self.kernel_page_size >= huge_page()
    }
}

fn parse_header(line: &str) -> Option<Vma> {
    // start-end perms offset dev inode [path]
    let mut fields = line.splitn(6, ' ');
    let (start, end) = fields.next()?.split_once('-')?;
    let perms = fields.next()?.as_bytes();
    let offset = fields.next()?;
    let dev = fields.next()?;
    let (major, minor) = dev.split_once(':')?;
    let inode = fields.next()?;
    let path = fields.next().unwrap_or("").trim_start();
    if perms.len() < 4 {
        return None;
    }
    Some(Vma {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        read: perms.first() == Some(&b'r'),
        write: perms.get(1) == Some(&b'w'),
        exec: perms.get(2) == Some(&b'x'),
        private: perms.get(3) == Some(&b'p'),
        offset: u64::from_str_radix(offset, 16).ok()?,
        dev: libc::makedev(
            u32::from_str_radix(major, 16).ok()?,
            u32::from_str_radix(minor, 16).ok()?,
        ),
        inode: inode.parse().ok()?,
        path: path.to_string(),
        kernel_page_size: 4096,
        ..Vma::default()
    })
}

fn parse_kb_field(line: &str) -> Option<(&str, u64)> {
    let (name, rest) = line.split_once(':')?;
    let rest = rest.trim();
    let number = rest.strip_suffix("kB")?.trim();
    Some((name, number.parse::<u64>().ok()?.checked_mul(1024)?))
}

/// A mapping's header starts with `start-end` in hex; field lines start with
/// `Name:` (and names such as `AnonHugePages` begin with hex letters).
fn is_header(line: &str) -> bool {
    let first = line.split(' ').next().unwrap_or("");
    match first.split_once('-') {
        Some((a, b)) => {
            !a.is_empty()
                && !b.is_empty()
                && a.bytes().all(|c| c.is_ascii_hexdigit())
                && b.bytes().all(|c| c.is_ascii_hexdigit())
        }
        None => false,
    }
}

/// Parses the text of a smaps file. Lines it does not know are ignored; a
/// malformed header ends the current mapping without failing the whole parse.
pub fn parse(text: &str) -> Vec<Vma> {
    let mut vmas: Vec<Vma> = Vec::new();
    let mut current: Option<Vma> = None;
    for line in text.lines() {
        if is_header(line) {
            if let Some(v) = current.take() {
                vmas.push(v);
            }
            current = parse_header(line);
            continue;
        }
        let Some(vma) = current.as_mut() else {
            continue;
        };
        let Some((name, bytes)) = parse_kb_field(line) else {
            continue;
        };
        match name {
            "KernelPageSize" => vma.kernel_page_size = bytes,
            "Rss" => vma.rss = bytes,
            "AnonHugePages" => vma.anon_huge = bytes,
            "FilePmdMapped" => vma.file_pmd_mapped = bytes,
            "ShmemPmdMapped" => vma.shmem_pmd_mapped = bytes,
            "Private_Hugetlb" => vma.private_hugetlb = bytes,
            "Shared_Hugetlb" => vma.shared_hugetlb = bytes,
            _ => {}
        }
    }
    if let Some(v) = current {
        vmas.push(v);
    }
    vmas
}

/// Reads and parses `/proc/<pid>/smaps` (`pid` `None` = this process).
pub fn read(pid: Option<u32>) -> std::io::Result<Vec<Vma>> {
    Ok(parse(&read_proc_text(pid, "smaps")?))
}

/// `/proc/<pid>/<name>` as text (paths that are not UTF-8 come out lossy,
/// not as an error that would hide every other mapping). Read into a large
/// buffer at once: the file reports size 0, and small reads each restart
/// the kernel's walk of the mappings.
fn read_proc_text(pid: Option<u32>, name: &str) -> std::io::Result<String> {
    use std::io::Read;
    let path = match pid {
        Some(p) => format!("/proc/{p}/{name}"),
        None => format!("/proc/self/{name}"),
    };
    let mut bytes = Vec::with_capacity(64 << 10);
    std::fs::File::open(path)?.read_to_end(&mut bytes)?;
    Ok(match String::from_utf8(bytes) {
        Ok(text) => text,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    })
}

/// Reads and parses `/proc/<pid>/maps`: the same mappings without the page
/// figures (all zero), at a fraction of the cost (the kernel walks no page
/// tables for it).
pub fn read_maps(pid: Option<u32>) -> std::io::Result<Vec<Vma>> {
    Ok(parse(&read_proc_text(pid, "maps")?))
}

/// The parts of `window` that process `pid` (`None`: this one) maps with
/// 2 MiB pages, ascending: exact, from `PAGEMAP_SCAN` (Linux 6.7); before
/// that, the mappings smaps says are all huge (`vmas`: that process's smaps
/// when already read, else it is read now), cut to `window`.
pub fn huge_ranges(pid: Option<u32>, window: Range, vmas: Option<&[Vma]>) -> Vec<Range> {
    if window.is_empty() {
        return Vec::new();
    }
    let scanned = match pid {
        None => crate::sys::huge_mapped_ranges(window.start, window.end),
        Some(p) => std::ffi::CString::new(format!("/proc/{p}/pagemap"))
            .map_err(|_| crate::sys::Errno(libc::EINVAL))
            .and_then(|path| crate::sys::huge_mapped_ranges_in(&path, window.start, window.end)),
    };
    if let Ok(found) = scanned {
        return found
            .into_iter()
            .filter_map(|(s, e)| Range::new(s, e).intersect(window))
            .collect();
    }
    let read;
    let vmas = match vmas {
        Some(v) => v,
        None => {
            read = self::read(pid).unwrap_or_default();
            &read
        }
    };
    vmas.iter()
        .filter(|v| !v.range().is_empty() && v.huge_bytes() >= v.range().len())
        .filter_map(|v| v.range().intersect(window))
        .collect()
}

/// How much of an address range is on 2 MiB pages, by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Coverage {
    /// Mapped bytes of the range.
    pub mapped: u64,
    /// On hugetlb pages.
    pub hugetlb: u64,
    /// On anonymous THP.
    pub anon_thp: u64,
    /// On page-cache THP (`FilePmdMapped`).
    pub file_thp: u64,
}

impl Coverage {
    /// All bytes on 2 MiB pages.
    pub fn huge(&self) -> u64 {
        self.hugetlb + self.anon_thp + self.file_thp
    }

    /// Mapped bytes left on 4 KiB pages.
    pub fn small(&self) -> u64 {
        self.mapped.saturating_sub(self.huge())
    }

    /// Adds another range's figures.
    pub fn add(&mut self, other: Coverage) {
        self.mapped += other.mapped;
        self.hugetlb += other.hugetlb;
        self.anon_thp += other.anon_thp;
        self.file_thp += other.file_thp;
    }
}

/// Coverage of `range` according to `vmas`. smaps counts per mapping, so a
/// mapping that sticks out of `range` contributes at most its overlap.
pub fn coverage(vmas: &[Vma], range: Range) -> Coverage {
    let mut c = Coverage::default();
    for v in vmas {
        let overlap = range.intersect(v.range()).map_or(0, |r| r.len());
        if overlap == 0 {
            continue;
        }
        c.mapped += overlap;
        if v.is_hugetlb() {
            c.hugetlb += overlap.min(v.private_hugetlb + v.shared_hugetlb);
        } else {
            let anon = v.anon_huge.min(overlap);
            let file = (v.file_pmd_mapped + v.shmem_pmd_mapped).min(overlap - anon);
            c.anon_thp += anon;
            c.file_thp += file;
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
55d0c0000000-55d0c0200000 r--p 00000000 fe:00 1234                       /usr/bin/prog
Size:               2048 kB
KernelPageSize:        4 kB
Rss:                2048 kB
AnonHugePages:         0 kB
FilePmdMapped:         0 kB
VmFlags: rd mr mw me sd
55d0c0200000-55d0c0400000 r-xp 00000000 00:11 4581                       /anon_hugepage (deleted)
Size:               2048 kB
KernelPageSize:     2048 kB
Rss:                   0 kB
Private_Hugetlb:    2048 kB
VmFlags: rd ex mr mw me de ht sd
55d0c0400000-55d0c0800000 r-xp 00000000 00:00 0 
Size:               4096 kB
KernelPageSize:        4 kB
Rss:                4096 kB
AnonHugePages:      4096 kB
55d0c0800000-55d0c0a00000 r-xp 00600000 fe:00 1234                       /usr/bin/prog with space
Size:               2048 kB
KernelPageSize:        4 kB
Rss:                2048 kB
FilePmdMapped:      2048 kB
7ffd1000-7ffd2000 rw-p 00000000 00:00 0                          [stack]
Rss:                   4 kB
";

    #[test]
    fn parses_headers_and_page_fields() {
        let v = parse(SAMPLE);
        assert_eq!(v.len(), 5);
        assert_eq!(v[0].path, "/usr/bin/prog");
        assert_eq!(v[0].dev, libc::makedev(0xfe, 0));
        assert_eq!(v[1].dev, libc::makedev(0, 0x11));
        assert!(v[0].read && !v[0].write && !v[0].exec && v[0].private);
        assert!(v[1].is_hugetlb());
        assert_eq!(v[1].huge_bytes(), 2 << 20);
        assert_eq!(v[2].path, "");
        assert_eq!(v[2].anon_huge, 4 << 20);
        assert_eq!(v[3].path, "/usr/bin/prog with space");
        assert_eq!(v[3].offset, 0x600000);
        assert_eq!(v[3].file_pmd_mapped, 2 << 20);
        assert_eq!(v[4].path, "[stack]");
        assert_eq!(v[4].rss, 4096);
    }

    #[test]
    fn coverage_splits_by_kind_and_clips_to_the_range() {
        let v = parse(SAMPLE);
        let c = coverage(&v, Range::new(0x55d0c0000000, 0x55d0c0a00000));
        assert_eq!(c.mapped, 10 << 20);
        assert_eq!(c.hugetlb, 2 << 20);
        assert_eq!(c.anon_thp, 4 << 20);
        assert_eq!(c.file_thp, 2 << 20);
        assert_eq!(c.small(), 2 << 20);
        // Half of the anonymous THP mapping.
        let half = coverage(&v, Range::new(0x55d0c0400000, 0x55d0c0600000));
        assert_eq!(half.mapped, 2 << 20);
        assert_eq!(half.anon_thp, 2 << 20);
    }

    #[test]
    fn garbage_does_not_panic() {
        for text in [
            "",
            "-",
            "zz-yy r-xp",
            "0-1 r",
            "Rss: 4 kB",
            "0-1000 r-xp 0 0:0 x\nRss: kB\n",
        ] {
            let _ = parse(text);
        }
    }
}
