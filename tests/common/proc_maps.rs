//! The tests' own reader of /proc/PID/smaps: what a process's memory is
//! mapped with, read without the product's parser, so that a bug there
//! cannot hide in the tests' measurements.

use super::witness::Range;

/// One mapping, with the page figures the tests look at (bytes).
#[derive(Clone, Debug, Default)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    pub perms: String,
    pub offset: u64,
    pub inode: u64,
    pub path: String,
    pub kernel_page_bytes: u64,
    pub anon_huge: u64,
    pub file_pmd_mapped: u64,
    pub shmem_pmd_mapped: u64,
    pub hugetlb: u64,
}

impl Mapping {
    pub fn range(&self) -> Range {
        Range::new(self.start, self.end)
    }
    pub fn exec(&self) -> bool {
        self.perms.as_bytes().get(2) == Some(&b'x')
    }
    /// Mapped with hugetlb pages (of any size: 2 MiB, or 32 MiB and 512
    /// MiB on arm64 kernels with bigger base pages).
    pub fn is_hugetlb(&self) -> bool {
        self.kernel_page_bytes >= 2 << 20
    }
    /// Bytes on 2 MiB pages of any kind.
    pub fn huge_bytes(&self) -> u64 {
        self.anon_huge + self.file_pmd_mapped + self.shmem_pmd_mapped + self.hugetlb
    }
}

/// "1234 kB" as bytes.
fn kib(value: &str) -> u64 {
    value
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .unwrap_or(0)
        * 1024
}

/// A header line: "start-end perms offset dev inode   path".
fn header(line: &str) -> Option<Mapping> {
    let mut words = line.splitn(6, ' ');
    let (start, end) = words.next()?.split_once('-')?;
    let perms = words.next()?;
    let offset = words.next()?;
    let _dev = words.next()?;
    let inode = words.next()?;
    let path = words.next().unwrap_or("").trim_start();
    Some(Mapping {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        perms: perms.to_string(),
        offset: u64::from_str_radix(offset, 16).ok()?,
        inode: inode.parse().ok()?,
        path: path.to_string(),
        ..Mapping::default()
    })
}

/// The mappings of process `pid`.
pub fn read(pid: u32) -> Vec<Mapping> {
    let text = std::fs::read(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let mut out: Vec<Mapping> = Vec::new();
    for line in text.lines() {
        if let Some((key, value)) = line.split_once(':') {
            // Figures have a key without spaces, and a value in kB.
            if !key.contains(' ') && value.trim_end().ends_with("kB") {
                if let Some(m) = out.last_mut() {
                    let bytes = kib(value);
                    match key {
                        "KernelPageSize" => m.kernel_page_bytes = bytes,
                        "AnonHugePages" => m.anon_huge = bytes,
                        "FilePmdMapped" => m.file_pmd_mapped = bytes,
                        "ShmemPmdMapped" => m.shmem_pmd_mapped = bytes,
                        "Private_Hugetlb" | "Shared_Hugetlb" => m.hugetlb += bytes,
                        _ => {}
                    }
                }
                continue;
            }
            if key == "VmFlags" || key == "THPeligible" || key == "ProtectionKey" {
                continue;
            }
        }
        if let Some(m) = header(line) {
            out.push(m);
        }
    }
    out
}

/// How much of a range is on huge pages, by kind (bytes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Coverage {
    pub mapped: u64,
    pub hugetlb: u64,
    pub anon_thp: u64,
    pub file_thp: u64,
}

impl Coverage {
    pub fn huge(&self) -> u64 {
        self.hugetlb + self.anon_thp + self.file_thp
    }
    pub fn small(&self) -> u64 {
        self.mapped.saturating_sub(self.huge())
    }
    pub fn add(&mut self, o: Coverage) {
        self.mapped += o.mapped;
        self.hugetlb += o.hugetlb;
        self.anon_thp += o.anon_thp;
        self.file_thp += o.file_thp;
    }
}

/// The coverage of `range` by `mappings`: a mapping's huge bytes count up
/// to its overlap with the range (smaps gives per-mapping totals; the
/// tests' ranges are whole mappings or 2 MiB-aligned unions of them).
pub fn coverage(mappings: &[Mapping], range: Range) -> Coverage {
    let mut c = Coverage::default();
    for m in mappings {
        let overlap = range.intersect(m.range()).map_or(0, |r| r.len());
        if overlap == 0 {
            continue;
        }
        c.mapped += overlap;
        if m.is_hugetlb() {
            c.hugetlb += overlap.min(m.hugetlb);
        } else {
            let anon = overlap.min(m.anon_huge);
            c.anon_thp += anon;
            c.file_thp += (overlap - anon).min(m.file_pmd_mapped + m.shmem_pmd_mapped);
        }
    }
    c
}
