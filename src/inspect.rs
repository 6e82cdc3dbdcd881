//! What a running process's text looks like now, from outside: its objects,
//! their executable segments, how much of each is on 2 MiB pages and of
//! which kind (smaps), and a picture per 2 MiB (page tables, through
//! PAGEMAP_SCAN). For `tiexec stat`; reads only.

use crate::elf;
use crate::plan::{align_down, huge_page, page, Range};
use crate::smaps::{self, Coverage, Vma};

/// The load bias of an object from its file-backed mappings, each given as
/// (address, file offset): a mapping at offset `offset` belongs to a
/// `PT_LOAD` holding that offset, whose byte `offset` sits at
/// `p_vaddr - p_offset + offset` before relocation.
///
/// One mapping alone can be ambiguous: two segments may share a file page
/// (read-only data ending where the writable data starts, both mapped from
/// that page at different addresses, and RELRO makes part of the data
/// read-only too), and the text and headers may have been replaced by
/// anonymous huge pages. Each mapping votes for the biases it allows; the
/// bias most of them allow wins (the first mapping's, on a tie).
pub fn bias_from_mappings(
    phdrs: &[goblin::elf::ProgramHeader],
    mappings: &[(u64, u64)],
) -> Option<u64> {
    use goblin::elf::program_header::PT_LOAD;
    let mut votes: Vec<(u64, usize)> = Vec::new();
    for &(start, offset) in mappings {
        let mut mine: Vec<u64> = phdrs
            .iter()
            .filter(|p| p.p_type == PT_LOAD)
            .filter(|p| {
                align_down(p.p_offset, page()) <= offset && offset < p.p_offset + p.p_filesz.max(1)
            })
            .map(|p| start.wrapping_sub(p.p_vaddr.wrapping_sub(p.p_offset).wrapping_add(offset)))
            .collect();
        mine.dedup();
        for bias in mine {
            match votes.iter_mut().find(|(b, _)| *b == bias) {
                Some((_, n)) => *n += 1,
                None => votes.push((bias, 1)),
            }
        }
    }
    let best = votes.iter().map(|(_, n)| *n).max()?;
    votes.iter().find(|(_, n)| *n == best).map(|(b, _)| *b)
}

/// What one 2 MiB page of text is mapped with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Chunk {
    /// All of it on a 2 MiB page.
    Huge,
    /// Some of it.
    Mixed,
    /// None of it (4 KiB pages, or not faulted in).
    Small,
}

impl Chunk {
    /// `#` huge, `+` mixed, `.` small.
    pub fn symbol(self) -> char {
        match self {
            Chunk::Huge => '#',
            Chunk::Mixed => '+',
            Chunk::Small => '.',
        }
    }
}

/// A cache image that serves part of an object's text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageUse {
    /// The image file.
    pub path: String,
    /// Bytes of the object's text it serves.
    pub bytes: u64,
    /// Processes that map it now (this one included).
    pub processes: usize,
}

/// One object of a process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectStat {
    /// Its file.
    pub path: String,
    /// Its executable segments, as mapped.
    pub text: Vec<Range>,
    /// How they are mapped now.
    pub coverage: Coverage,
    /// One entry per 2 MiB page the text touches, in address order.
    pub chunks: Vec<Chunk>,
    /// The cache images its text is on (their bytes count as hugetlb in
    /// `coverage`).
    pub images: Vec<ImageUse>,
}

impl ObjectStat {
    /// Bytes of text served by cache images.
    pub fn cache_bytes(&self) -> u64 {
        self.images.iter().map(|i| i.bytes).sum()
    }
}

/// The cache images among `vmas` that hold part of `text`, with how many
/// processes map each (`sharing`: paths and counts under the cache).
fn images_of(
    text: &[Range],
    vmas: &[Vma],
    sharing: &[(std::path::PathBuf, usize)],
) -> Vec<ImageUse> {
    let mut out: Vec<ImageUse> = Vec::new();
    for v in vmas
        .iter()
        .filter(|v| v.is_hugetlb() && crate::cache::is_image_path(&v.path))
    {
        let bytes: u64 = text
            .iter()
            .filter_map(|t| t.intersect(v.range()))
            .map(|r| r.len())
            .sum();
        if bytes == 0 {
            continue;
        }
        let path = v.path.strip_suffix(" (deleted)").unwrap_or(&v.path);
        let processes = sharing
            .iter()
            .find(|(p, _)| p.as_os_str() == path)
            .map_or(1, |(_, n)| *n);
        match out.iter_mut().find(|i| i.path == path) {
            Some(i) => i.bytes += bytes,
            None => out.push(ImageUse {
                path: path.to_string(),
                bytes,
                processes,
            }),
        }
    }
    out
}

impl ObjectStat {
    /// Bytes of text.
    pub fn text_bytes(&self) -> u64 {
        self.text.iter().map(Range::len).sum()
    }

    /// Page-table entries (TLB entries) the text needs on 4 KiB pages only.
    pub fn pages_if_small(&self) -> u64 {
        self.text_bytes() / page()
    }

    /// Entries it needs now: one per 2 MiB page, plus the 4 KiB pages left.
    pub fn pages_now(&self) -> u64 {
        self.coverage.huge().div_ceil(huge_page()) + self.coverage.small() / page()
    }

    /// Entries with every 2 MiB page it touches huge.
    pub fn pages_if_all_huge(&self) -> u64 {
        self.chunks.len() as u64
    }

    /// Percentage of the text on 2 MiB pages.
    pub fn percent_huge(&self) -> f64 {
        match self.text_bytes() {
            0 => 0.0,
            t => self.coverage.huge() as f64 * 100.0 / t as f64,
        }
    }

    /// The picture: one symbol per 2 MiB page.
    pub fn picture(&self) -> String {
        self.chunks.iter().map(|c| c.symbol()).collect()
    }
}

fn chunk_kinds(pid: u32, text: &[Range], vmas: &[Vma]) -> Vec<Chunk> {
    let mut starts: Vec<u64> = Vec::new();
    for seg in text {
        let mut c = align_down(seg.start, huge_page());
        while c < seg.end {
            starts.push(c);
            c += huge_page();
        }
    }
    starts.sort_unstable();
    starts.dedup();
    let (Some(&lo), Some(&hi)) = (starts.first(), starts.last()) else {
        return Vec::new();
    };
    let huge = crate::smaps::huge_ranges(Some(pid), Range::new(lo, hi + huge_page()), Some(vmas));
    starts
        .into_iter()
        .map(|s| {
            let chunk = Range::new(s, s + huge_page());
            // Only the text's part of the chunk counts.
            let parts: Vec<Range> = text.iter().filter_map(|t| t.intersect(chunk)).collect();
            let total: u64 = parts.iter().map(Range::len).sum();
            let on_huge: u64 = parts
                .iter()
                .map(|p| {
                    huge.iter()
                        .filter_map(|h| h.intersect(*p))
                        .map(|r| r.len())
                        .sum::<u64>()
                })
                .sum();
            if on_huge >= total {
                Chunk::Huge
            } else if on_huge > 0 {
                Chunk::Mixed
            } else {
                Chunk::Small
            }
        })
        .collect()
}

/// The objects of process `pid` that have executable segments, with at
/// least `min_text` bytes of text.
pub fn process_objects(pid: u32, min_text: u64) -> std::io::Result<Vec<ObjectStat>> {
    let vmas = smaps::read(Some(pid))?;
    // Processes sharing the images this one maps (one /proc scan per cache
    // directory).
    let mut sharing: Vec<(std::path::PathBuf, usize)> = Vec::new();
    let mut dirs: Vec<&std::path::Path> = Vec::new();
    for v in vmas
        .iter()
        .filter(|v| v.is_hugetlb() && crate::cache::is_image_path(&v.path))
    {
        if let Some(dir) = std::path::Path::new(&v.path).parent() {
            if !dirs.contains(&dir) {
                dirs.push(dir);
                sharing.extend(crate::cache::mapped_under(dir));
            }
        }
    }
    let mut seen: Vec<(String, u64)> = Vec::new();
    let mut out = Vec::new();
    for v in vmas
        .iter()
        .filter(|v| v.inode != 0 && v.path.starts_with('/') && !v.is_hugetlb())
    {
        if seen.iter().any(|(p, i)| *p == v.path && *i == v.inode) {
            continue;
        }
        seen.push((v.path.clone(), v.inode));
        let Ok(file) = std::fs::File::open(&v.path) else {
            continue;
        };
        let Some(phdrs) = elf::read_program_headers(&file) else {
            continue;
        };
        let mappings: Vec<(u64, u64)> = vmas
            .iter()
            .filter(|m| m.path == v.path && m.inode == v.inode && !m.is_hugetlb())
            .map(|m| (m.start, m.offset))
            .collect();
        let Some(bias) = bias_from_mappings(&phdrs, &mappings) else {
            continue;
        };
        let text = elf::load_segments(&phdrs, bias).text;
        let bytes: u64 = text.iter().map(Range::len).sum();
        if text.is_empty() || bytes < min_text {
            continue;
        }
        let mut coverage = Coverage::default();
        for s in &text {
            coverage.add(smaps::coverage(&vmas, *s));
        }
        let chunks = chunk_kinds(pid, &text, &vmas);
        let images = images_of(&text, &vmas, &sharing);
        out.push(ObjectStat {
            path: v.path.clone(),
            text,
            coverage,
            chunks,
            images,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_mapping_sharing_a_file_page_with_rodata_gets_the_right_bias() {
        use goblin::elf::program_header::{ProgramHeader, PF_R, PF_W, PF_X, PT_LOAD};
        let load = |offset: u64, vaddr: u64, filesz: u64, flags: u32| ProgramHeader {
            p_type: PT_LOAD,
            p_flags: flags,
            p_offset: offset,
            p_vaddr: vaddr,
            p_paddr: vaddr,
            p_filesz: filesz,
            p_memsz: filesz,
            p_align: 0x1000,
        };
        // The two-segment fixture's layout: headers, text, one page of
        // rodata, data (RELRO first) starting in the rodata's file page.
        let phdrs = [
            load(0, 0, 0x309e0, PF_R),
            load(0x31000, 0x31000, 0x10013d9, PF_R | PF_X),
            load(0x1033000, 0x1033000, 0x244, PF_R),
            load(0x1033dd0, 0x1034dd0, 0x102c0, PF_R | PF_W),
        ];
        let base = 0x55a0_c0fc_d000u64;
        // Headers and text replaced by anonymous pages: left are the rodata
        // page, RELRO (read-only now) and the writable rest, the last two
        // mapped from offset 0x1033000 as well.
        let mappings = [
            (base + 0x1033000, 0x1033000),
            (base + 0x1034000, 0x1033000),
            (base + 0x1035000, 0x1034000),
        ];
        assert_eq!(bias_from_mappings(&phdrs, &mappings), Some(base));
        // Alone, the RELRO mapping is ambiguous; with the header it is not.
        let with_header = [(base, 0), (base + 0x1034000, 0x1033000)];
        assert_eq!(bias_from_mappings(&phdrs, &with_header), Some(base));
        assert_eq!(bias_from_mappings(&phdrs, &[]), None);
    }

    #[test]
    fn this_process_is_described() {
        let objects = process_objects(std::process::id(), 0).unwrap();
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let me = objects
            .iter()
            .find(|o| std::path::Path::new(&o.path) == exe)
            .expect("the test binary");
        assert!(me.text_bytes() > 0);
        let here = this_process_is_described as *const () as u64;
        assert!(me.text.iter().any(|r| r.start <= here && here < r.end));
        assert_eq!(me.picture().len(), me.chunks.len());
        assert!(me.pages_if_small() >= me.pages_now() || me.coverage.huge() == 0);
    }
}
