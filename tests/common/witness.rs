//! The tests' own arithmetic: page sizes read from the kernel, ranges,
//! alignment and load addresses, written here rather than taken from the
//! library, so that a mistake in the library's planner cannot hide itself
//! by being the witness of its own work.

/// A half-open address range `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Range {
    pub start: u64,
    pub end: u64,
}

impl Range {
    /// `[start, end)`; an inverted range is empty at `start`.
    pub fn new(start: u64, end: u64) -> Range {
        Range {
            start,
            end: end.max(start),
        }
    }

    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }

    pub fn intersect(&self, other: Range) -> Option<Range> {
        let r = Range::new(self.start.max(other.start), self.end.min(other.end));
        (!r.is_empty()).then_some(r)
    }

    pub fn contains(&self, other: Range) -> bool {
        self.start <= other.start && other.end <= self.end
    }
}

/// The kernel's base page size.
pub fn page() -> u64 {
    // SAFETY: sysconf reads a constant.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).expect("page size")
}

/// The kernel's PMD-level huge page, as the kernel reports it (THP's
/// `hpage_pmd_size`; 2 MiB with 4 KiB pages when THP is not built in).
pub fn huge_page() -> u64 {
    std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| page() / 8 * page())
}

/// The huge page size as the library's messages write it ("2 MiB").
pub fn huge_page_name() -> String {
    let size = huge_page();
    if size >= 1 << 30 && size % (1 << 30) == 0 {
        format!("{} GiB", size >> 30)
    } else {
        format!("{} MiB", size >> 20)
    }
}

/// The sysfs directory of the hugetlb pool of that size.
pub fn pool_dir() -> String {
    format!("/sys/kernel/mm/hugepages/hugepages-{}kB", huge_page() >> 10)
}

pub fn align_down(x: u64, align: u64) -> u64 {
    x / align * align
}

pub fn align_up(x: u64, align: u64) -> u64 {
    x.div_ceil(align) * align
}

/// The pages the loader maps for a segment at `vaddr` with `memsz` bytes.
pub fn segment_pages(vaddr: u64, memsz: u64) -> Range {
    Range::new(align_down(vaddr, page()), align_up(vaddr + memsz, page()))
}

/// The whole huge pages inside `segment` (empty when there are none).
pub fn interior(segment: Range) -> Range {
    Range::new(
        align_up(segment.start, huge_page()),
        align_down(segment.end, huge_page()),
    )
}

/// The load bias of an object whose ELF file is `elf`, from the mapping of
/// its first segment's first page: the huge page holding the ELF header
/// stays the file's whatever tiexec does, so that mapping is still there,
/// at the file offset the loader gave it. `mappings` are `(start, file
/// offset)` of the object's file mappings.
pub fn load_bias(elf: &goblin::elf::Elf, mappings: &[(u64, u64)]) -> Option<u64> {
    if elf.header.e_type != goblin::elf::header::ET_DYN {
        return Some(0);
    }
    let first = elf
        .program_headers
        .iter()
        .filter(|p| p.p_type == goblin::elf::program_header::PT_LOAD)
        .min_by_key(|p| p.p_vaddr)?;
    let page_offset = align_down(first.p_offset, page());
    let (start, _) = mappings
        .iter()
        .find(|&&(_, offset)| offset == page_offset)?;
    Some(start - align_down(first.p_vaddr, page()))
}
