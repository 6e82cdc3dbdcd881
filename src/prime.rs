//! Zero copy: get a file's text into the page cache as 2 MiB folios, so that
//! every process that maps it with address and file offset congruent modulo
//! 2 MiB gets its text on 2 MiB pages from the kernel itself (`FilePmdMapped`):
//! no copy, nothing private, shared by all, file names kept, no LD_PRELOAD,
//! statically linked programs included. ("2 MiB" here is the kernel's huge
//! page, `pagesize::huge_page`: 32 MiB on a 16 KiB-page arm64 kernel.)
//!
//! How (measured on ext4 with large folios, Linux 6.18): pages that enter the
//! page cache through a mapping advised `MADV_HUGEPAGE` are read as 2 MiB
//! folios. For each 2 MiB-aligned part of an executable segment's file range:
//! 1. map it read-only at a 2 MiB-aligned address, `MADV_HUGEPAGE`,
//!    `MADV_POPULATE_READ`, and ask `PAGEMAP_SCAN`: huge already? done;
//! 2. otherwise drop the file's cached pages that no process maps
//!    (`POSIX_FADV_DONTNEED`) and do step 1 again: huge now = primed; still
//!    small = pages in use by running processes, or a filesystem or kernel
//!    without large folios.
//!
//! It reads the file and the page cache only: no running process's mappings
//! change, and nothing is written.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::Path;

use crate::elf;
use crate::plan::{align_down, align_up, huge_page, Range};
use crate::sys::{self, Errno, Mapping, Prot};

/// How one executable segment of a file stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Less than one whole 2 MiB page of the segment lies in the file.
    NoWholePage,
    /// Address and file offset differ modulo 2 MiB: no mapping of this file
    /// can use its page-cache folios as 2 MiB pages (relink, see `advice`).
    NotCongruent,
    /// Its cached pages are 2 MiB folios.
    Huge,
    /// Its cached pages were not; now they are.
    Primed,
    /// Its cached pages are small, and dropping them did not help: some are
    /// mapped by running processes, or the filesystem gives no large folios.
    Small,
}

impl State {
    /// The state in words (in the kernel's huge page size).
    pub fn describe(self) -> crate::pagesize::HugeText {
        crate::pagesize::HugeText(match self {
            State::NoWholePage => "no whole 2 MiB page",
            State::NotCongruent => "address and file offset differ modulo 2 MiB",
            State::Huge => "cached as 2 MiB folios",
            State::Primed => "primed: now cached as 2 MiB folios",
            State::Small => "cached as small folios (in use, or no large folios here)",
        })
    }
}

/// One executable segment of a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentState {
    /// File offsets of the segment's bytes.
    pub file: Range,
    /// The 2 MiB-aligned file range that could be mapped huge.
    pub body: Range,
    /// What was found or done.
    pub state: State,
    /// Bytes of `body` on 2 MiB folios afterwards.
    pub huge_bytes: u64,
}

/// Why a file could not be examined.
#[derive(Debug)]
pub enum PrimeError {
    /// It could not be opened or read.
    Io(std::io::Error),
    /// It is not an ELF file with program headers.
    NotElf,
    /// Mapping it failed.
    Map(Errno),
}

impl core::fmt::Display for PrimeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            PrimeError::Io(e) => write!(f, "{e}"),
            PrimeError::NotElf => write!(f, "not an ELF file"),
            PrimeError::Map(e) => write!(f, "mmap failed: {e}"),
        }
    }
}

/// The file ranges of the executable segments, and whether each will be
/// congruent at run time: its address and file offset must agree modulo
/// 2 MiB, and the base it is loaded at must be 2 MiB aligned. A non-PIE
/// executable sits at a fixed address. A PIE executable's base is random,
/// aligned to its largest `p_align` only (4 KiB unless linked with
/// `-z max-page-size=0x200000`). A library's big mapping is placed 2 MiB
/// aligned by the kernel.
pub fn text_file_ranges(e_type: u16, phdrs: &[goblin::elf::ProgramHeader]) -> Vec<(Range, bool)> {
    use goblin::elf::program_header::{PF_X, PT_LOAD};
    let is_pie_executable = e_type == goblin::elf::header::ET_DYN && elf::has_interpreter(phdrs);
    let base_aligned = !is_pie_executable
        || phdrs
            .iter()
            .filter(|p| p.p_type == PT_LOAD)
            .any(|p| p.p_align >= huge_page());
    phdrs
        .iter()
        .filter(|p| p.p_type == PT_LOAD && p.p_flags & PF_X != 0)
        .map(|p| {
            let file = Range::new(p.p_offset, p.p_offset.saturating_add(p.p_filesz));
            let congruent = base_aligned && p.p_vaddr.wrapping_sub(p.p_offset) % huge_page() == 0;
            (file, congruent)
        })
        .collect()
}

/// The whole 2 MiB pages of a file range.
pub fn huge_body(file: Range) -> Range {
    Range::new(
        align_up(file.start, huge_page()),
        align_down(file.end, huge_page()),
    )
}

/// A read-only mapping of part of a file at a 2 MiB-aligned address (inside
/// a reservation of our own), unmapped on drop.
struct AlignedFileMap {
    map: Mapping,
}

impl AlignedFileMap {
    fn new(file: &File, range: Range) -> Result<AlignedFileMap, Errno> {
        let len = range.len() as usize;
        let mut map = Mapping::anonymous_aligned(len, huge_page() as usize, Prot::NONE)?;
        map.map_file_within(0, file.as_fd(), range.start, len, Prot::READ)?;
        Ok(AlignedFileMap { map })
    }

    /// Faults every page in (through a `MADV_HUGEPAGE` mapping when
    /// `advise`: pages read from disk then come as 2 MiB folios), and returns
    /// how many bytes the kernel then maps with 2 MiB pages.
    fn populate_huge(&mut self, advise: bool) -> u64 {
        if advise {
            let _ = self.map.advise(libc::MADV_HUGEPAGE);
        }
        let _ = self.map.advise(sys::MADV_POPULATE_READ);
        crate::smaps::huge_ranges(None, self.map.range(), None)
            .iter()
            .map(Range::len)
            .sum()
    }
}

/// Examines the executable segments of `path` and, when `prime` is set,
/// brings congruent ones into the page cache as 2 MiB folios.
pub fn prime_file(path: &Path, prime: bool) -> Result<Vec<SegmentState>, PrimeError> {
    let file = File::open(path).map_err(PrimeError::Io)?;
    let phdrs = elf::read_program_headers(&file).ok_or(PrimeError::NotElf)?;
    let e_type = elf::read_type(&file).ok_or(PrimeError::NotElf)?;
    let ranges = text_file_ranges(e_type, &phdrs);
    let mut out = Vec::new();
    for (file_range, congruent) in ranges {
        let body = huge_body(file_range);
        let mut s = SegmentState {
            file: file_range,
            body,
            state: State::NoWholePage,
            huge_bytes: 0,
        };
        if !body.is_empty() && !congruent {
            s.state = State::NotCongruent;
        } else if !body.is_empty() {
            let mut map = AlignedFileMap::new(&file, body).map_err(PrimeError::Map)?;
            // Checking only: no advice, so that looking does not prime.
            s.huge_bytes = map.populate_huge(prime);
            drop(map);
            if s.huge_bytes >= body.len() {
                s.state = State::Huge;
            } else if !prime {
                s.state = State::Small;
            } else {
                // Drop what no process maps; pages mapped elsewhere stay.
                let _ = crate::sys::fadvise_dont_need(file.as_fd(), body.start, body.len());
                let mut map = AlignedFileMap::new(&file, body).map_err(PrimeError::Map)?;
                s.huge_bytes = map.populate_huge(true);
                s.state = if s.huge_bytes >= body.len() {
                    State::Primed
                } else {
                    State::Small
                };
            }
        }
        out.push(s);
    }
    Ok(out)
}

/// The link flag that makes a PIE's or library's text congruent.
pub const LINK_ADVICE: &str = "-Wl,-z,max-page-size=0x200000 (or -Wl,-z,separate-code with that)";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::range::HUGE_PAGE;

    #[test]
    fn bodies_are_whole_2m_pages_of_the_file_range() {
        const M: u64 = HUGE_PAGE;
        assert_eq!(huge_body(Range::new(0x1000, 3 * M)), Range::new(M, 3 * M));
        assert!(huge_body(Range::new(0x1000, M + 0x1000)).is_empty());
    }

    #[test]
    fn this_test_binary_has_text_ranges() {
        let file = File::open("/proc/self/exe").unwrap();
        let phdrs = elf::read_program_headers(&file).unwrap();
        let e_type = elf::read_type(&file).unwrap();
        let ranges = text_file_ranges(e_type, &phdrs);
        assert!(!ranges.is_empty());
        // A PIE test binary with 4 KiB alignment: never congruent.
        if e_type == goblin::elf::header::ET_DYN {
            assert!(ranges.iter().all(|(_, congruent)| !congruent));
        }
    }
}
