//! The running kernel's page sizes: inputs to planning, never assumed.
//!
//! x86_64 has 4 KiB base pages and 2 MiB pages at the PMD level. arm64
//! kernels are built with 4 KiB, 16 KiB or 64 KiB base pages; a page table
//! holds `base / 8` entries, so the PMD-level page is 2 MiB, 32 MiB or
//! 512 MiB, and hugetlb may offer more sizes (64 KiB and 2 MiB contiguous
//! entries, 1 GiB). [`PageSizes::read`] reads what this kernel has (the base
//! page from `AT_PAGESZ`, THP's from `hpage_pmd_size`, hugetlb's from
//! `/sys/kernel/mm/hugepages/`); [`PageSizes::geometry`] says whether
//! tiexec can work with it and with which [`Geometry`], which the planner
//! takes as input (`plan::split_in`, `plan::plan_object_in`).
//!
//! Every size-dependent step reads [`current`] (through `range::page` and
//! `range::huge_page`): planning, staging alignment, hugetlb page sizes, the
//! cache's mount, coverage. A kernel with sizes Linux does not use on these
//! architectures is refused with one line naming them.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::sys;

const PAGE_4K: u64 = 4096;
const HUGE_2M: u64 = 2 << 20;

/// This process's geometry, packed (base page shift, huge page shift); 0
/// until first read.
static CURRENT: AtomicU64 = AtomicU64::new(0);

/// The geometry of the running kernel, from its base page (`AT_PAGESZ`,
/// read once: no system call, no allocation).
pub fn current() -> Geometry {
    let packed = CURRENT.load(Ordering::Relaxed);
    if packed != 0 {
        return Geometry {
            page: 1 << (packed & 0xff),
            huge: 1 << (packed >> 8),
        };
    }
    let g = Geometry::for_base_page(base_page());
    let packed = u64::from(g.page.trailing_zeros()) | (u64::from(g.huge.trailing_zeros()) << 8);
    CURRENT.store(packed, Ordering::Relaxed);
    g
}

/// A base page size and the huge page the swap uses with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// The base page (the kernel's page size).
    pub page: u64,
    /// The PMD-level huge page: what one TLB entry maps after the swap.
    pub huge: u64,
}

impl Geometry {
    /// 4 KiB base pages, 2 MiB huge pages: x86_64, and arm64 with 4 KiB
    /// pages. The geometry the swap works with.
    pub const BASE_4K: Geometry = Geometry {
        page: PAGE_4K,
        huge: HUGE_2M,
    };

    /// The geometry of a kernel with `page`-byte base pages: the PMD level
    /// maps `page / 8` (one table of 8-byte entries) base pages.
    pub const fn for_base_page(page: u64) -> Geometry {
        Geometry {
            page,
            huge: page * (page / 8),
        }
    }
}

/// Why the swap does not run with this kernel's page sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unsupported {
    /// Base pages other than 4, 16 or 64 KiB (huge pages of `huge` bytes).
    BasePage {
        /// The base page size.
        page: u64,
        /// Its PMD-level huge page.
        huge: u64,
    },
    /// THP works with another PMD size than the base page implies.
    ThpSize(u64),
}

impl core::fmt::Display for Unsupported {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            Unsupported::BasePage { page, huge } => write!(
                f,
                "base pages of {} KiB (huge pages of {} MiB): not a size Linux uses on x86_64 or arm64",
                page >> 10,
                huge >> 20
            ),
            Unsupported::ThpSize(size) => {
                write!(
                    f,
                    "THP page size of {} KiB, not the PMD size its base page implies",
                    size >> 10
                )
            }
        }
    }
}

/// Hugetlb sizes looked for, smallest first (every size Linux offers on
/// x86_64 and arm64).
const HUGETLB_CANDIDATES: [u64; 6] = [64 << 10, 2 << 20, 32 << 20, 512 << 20, 1 << 30, 16 << 30];

/// The sysfs directory of the hugetlb pool of pages of `.0` bytes:
/// `/sys/kernel/mm/hugepages/hugepages-2048kB` for 2 MiB.
#[derive(Clone, Copy, Debug)]
pub struct HugetlbDir(pub u64);

impl core::fmt::Display for HugetlbDir {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "/sys/kernel/mm/hugepages/hugepages-{}kB", self.0 >> 10)
    }
}

/// True when hugetlb offers pages of `size` bytes (their pool's directory
/// exists). Allocates nothing.
fn hugetlb_size_offered(size: u64) -> bool {
    let mut path = crate::log::LineBuf::new();
    let _ = core::fmt::Write::write_fmt(&mut path, format_args!("{}\0", HugetlbDir(size)));
    core::ffi::CStr::from_bytes_until_nul(path.as_bytes()).is_ok_and(sys::exists)
}

/// The page sizes of a kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageSizes {
    /// The base page.
    pub base: u64,
    /// THP's PMD-level size; None without THP.
    pub thp: Option<u64>,
    /// Hugetlb sizes offered (a bit per [`HUGETLB_CANDIDATES`] entry).
    hugetlb_mask: u8,
}

impl PageSizes {
    /// Sizes given directly (tests, and other machines' descriptions).
    pub fn new(base: u64, thp: Option<u64>, hugetlb: &[u64]) -> PageSizes {
        let mut mask = 0u8;
        for (i, size) in HUGETLB_CANDIDATES.iter().enumerate() {
            if hugetlb.contains(size) {
                mask |= 1 << i;
            }
        }
        PageSizes {
            base,
            thp,
            hugetlb_mask: mask,
        }
    }

    /// This kernel's sizes, for reports (`tiexec --check`). Allocates
    /// nothing.
    pub fn read() -> PageSizes {
        let base = base_page();
        let mut buf = [0u8; 32];
        let thp = sys::read_small_file(
            c"/sys/kernel/mm/transparent_hugepage/hpage_pmd_size",
            &mut buf,
        )
        .ok()
        .and_then(|n| parse_decimal(buf.get(..n)?));
        let mut mask = 0u8;
        for (i, &size) in HUGETLB_CANDIDATES.iter().enumerate() {
            if hugetlb_size_offered(size) {
                mask |= 1 << i;
            }
        }
        PageSizes {
            base,
            thp,
            hugetlb_mask: mask,
        }
    }

    /// The hugetlb sizes offered, smallest first.
    pub fn hugetlb(&self) -> impl Iterator<Item = u64> + '_ {
        HUGETLB_CANDIDATES
            .into_iter()
            .enumerate()
            .filter(|(i, _)| self.hugetlb_mask & (1 << i) != 0)
            .map(|(_, size)| size)
    }

    /// The geometry planning uses on this kernel: its base page and the
    /// PMD-level page above it.
    pub fn planning_geometry(&self) -> Geometry {
        Geometry::for_base_page(self.base)
    }

    /// The geometry the swap works with here, or why there is none: base
    /// pages of 4, 16 or 64 KiB, and THP (where built in) at the PMD size
    /// they imply.
    pub fn geometry(&self) -> Result<Geometry, Unsupported> {
        let g = self.planning_geometry();
        if !SUPPORTED_BASES.contains(&g.page) {
            return Err(Unsupported::BasePage {
                page: g.page,
                huge: g.huge,
            });
        }
        match self.thp {
            Some(size) if size != g.huge => Err(Unsupported::ThpSize(size)),
            _ => Ok(g),
        }
    }
}

/// The base page from `AT_PAGESZ` (4 KiB if the kernel gave none).
fn base_page() -> u64 {
    match sys::base_page_size() {
        // Any power of two Linux could report (its sizes go to 64 KiB); an
        // absurd value falls back rather than overflow the arithmetic.
        n if n.is_power_of_two() && (PAGE_4K..=1 << 20).contains(&n) => n,
        _ => PAGE_4K,
    }
}

/// The base page sizes Linux uses on x86_64 and arm64.
const SUPPORTED_BASES: [u64; 3] = [4 << 10, 16 << 10, 64 << 10];

/// Whether the swap works with this kernel's page sizes, from the base page
/// alone (no system call: the constructor asks before anything else).
/// A THP size other than the PMD's shows later, as staging that is not huge.
pub fn current_supported() -> Result<Geometry, Unsupported> {
    let g = current();
    if SUPPORTED_BASES.contains(&g.page) {
        Ok(g)
    } else {
        Err(Unsupported::BasePage {
            page: g.page,
            huge: g.huge,
        })
    }
}

fn parse_decimal(text: &[u8]) -> Option<u64> {
    let digits = text.split(|b| b.is_ascii_whitespace()).next()?;
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| {
        d.is_ascii_digit()
            .then(|| n.checked_mul(10)?.checked_add(u64::from(d - b'0')))?
    })
}

/// The kernel's base page: 4 KiB on x86_64; 4, 16 or 64 KiB on arm64 (read
/// once, see `pagesize`).
pub fn page() -> u64 {
    current().page
}

/// The huge page tiexec puts text on: the kernel's PMD-level page, 2 MiB
/// with 4 KiB base pages, 32 MiB with 16 KiB, 512 MiB with 64 KiB.
pub fn huge_page() -> u64 {
    current().huge
}

/// The page-rounded range the loader maps for a segment at runtime address
/// `vaddr` with `memsz` bytes.
pub fn segment_pages(vaddr: u64, memsz: u64) -> crate::range::Range {
    crate::range::Range::new(
        crate::range::align_down(vaddr, page()),
        crate::range::align_up(vaddr.saturating_add(memsz), page()),
    )
}

/// The huge page's size in words: "2 MiB", "32 MiB", "512 MiB".
pub fn huge_page_name() -> SizeName {
    SizeName(huge_page())
}

/// A page size in words: "4 KiB", "2 MiB", "1 GiB".
#[derive(Clone, Copy, Debug)]
pub struct SizeName(pub u64);

impl core::fmt::Display for SizeName {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        if self.0 >= 1 << 30 && self.0 % (1 << 30) == 0 {
            write!(f, "{} GiB", self.0 >> 30)
        } else if self.0 >= 1 << 20 {
            write!(f, "{} MiB", self.0 >> 20)
        } else {
            write!(f, "{} KiB", self.0 >> 10)
        }
    }
}

/// A message written for 2 MiB pages, shown with the kernel's huge page
/// size (the same text on 4 KiB-page kernels; allocates only elsewhere).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HugeText(pub &'static str);

impl core::fmt::Display for HugeText {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        if huge_page() == 2 << 20 {
            f.write_str(self.0)
        } else {
            f.write_str(&self.0.replace("2 MiB", &huge_page_name().to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KIB: u64 = 1 << 10;
    const MIB: u64 = 1 << 20;

    #[test]
    fn the_pmd_page_follows_the_base_page() {
        assert_eq!(Geometry::for_base_page(4 * KIB), Geometry::BASE_4K);
        assert_eq!(Geometry::for_base_page(16 * KIB).huge, 32 * MIB);
        assert_eq!(Geometry::for_base_page(64 * KIB).huge, 512 * MIB);
    }

    #[test]
    fn each_arm64_geometry_is_accepted_and_odd_ones_are_named() {
        let x86 = PageSizes::new(4 * KIB, Some(2 * MIB), &[2 * MIB, 1 << 30]);
        assert_eq!(x86.geometry(), Ok(Geometry::BASE_4K));
        // arm64, 4 KiB pages, THP off, contiguous hugetlb sizes offered.
        let arm4k = PageSizes::new(4 * KIB, None, &[64 * KIB, 2 * MIB, 32 * MIB, 1 << 30]);
        assert_eq!(arm4k.geometry(), Ok(Geometry::BASE_4K));
        assert_eq!(
            arm4k.hugetlb().collect::<Vec<_>>(),
            [64 * KIB, 2 * MIB, 32 * MIB, 1 << 30]
        );
        let arm16k = PageSizes::new(16 * KIB, Some(32 * MIB), &[2 * MIB, 32 * MIB]);
        assert_eq!(
            arm16k.geometry(),
            Ok(Geometry {
                page: 16 * KIB,
                huge: 32 * MIB
            })
        );
        let arm64k = PageSizes::new(64 * KIB, Some(512 * MIB), &[2 * MIB, 512 * MIB]);
        assert_eq!(arm64k.geometry().map(|g| g.huge), Ok(512 * MIB));
        let odd = PageSizes::new(8 * KIB, None, &[]);
        assert!(odd.geometry().unwrap_err().to_string().contains("8 KiB"));
        let odd_thp = PageSizes::new(4 * KIB, Some(4 * MIB), &[]);
        assert_eq!(odd_thp.geometry(), Err(Unsupported::ThpSize(4 * MIB)));
    }

    #[test]
    fn this_kernel_is_read() {
        let here = PageSizes::read();
        assert!(here.base.is_power_of_two() && here.base >= 4 * KIB);
        if let Some(thp) = here.thp {
            assert_eq!(thp, here.planning_geometry().huge);
        }
    }

    #[test]
    fn decimals_parse_with_a_newline() {
        assert_eq!(parse_decimal(b"2097152\n"), Some(2 * MIB));
        assert_eq!(parse_decimal(b""), None);
        assert_eq!(parse_decimal(b"x1"), None);
    }
}
