//! What the swap costs: for 8, 64 and 256 MiB of file-backed r-x "text",
//! the time `swap_ranges` takes against, in the same run and interleaved
//! (A B C A B C ...), one memcpy of the same bytes and one fresh fault of the
//! same amount of huge pages; and the peak extra memory during the swap.
//!
//! Goal (issue 2): swap <= 1.5 x (fresh huge-page fault + one memcpy), and
//! peak extra memory <= the size of the text swapped.
//!
//! Run: `cargo bench --bench swap` (as root to size the hugetlb pool; the
//! hugetlb rows are skipped otherwise unless the pool already has room).

use std::io::Write;
use std::os::fd::AsRawFd;
use std::time::Instant;

use tiexec::internal::plan::{huge_page, Range};
use tiexec::internal::policy::Source;
use tiexec::internal::sys;

const ROUNDS: usize = 7;
const MIB: usize = 1 << 20;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn status_kib(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|r| r.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn hugetlb_free() -> u64 {
    std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// A file of `len` bytes mapped r-x private at a 2 MiB-aligned address and
/// read once, like text a program has run.
struct Text {
    addr: *mut u8,
    len: usize,
}

impl Text {
    fn map(file: &std::fs::File, len: usize) -> Text {
        // SAFETY: reserving fresh address space, then mapping our file over
        // the aligned part of it with MAP_FIXED (the range is our own).
        unsafe {
            let reserve = libc::mmap(
                std::ptr::null_mut(),
                len + huge_page() as usize,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            assert_ne!(reserve, libc::MAP_FAILED);
            let aligned =
                tiexec::internal::plan::align_up(reserve as u64, huge_page()) as *mut libc::c_void;
            let addr = libc::mmap(
                aligned,
                len,
                libc::PROT_READ | libc::PROT_EXEC,
                libc::MAP_PRIVATE | libc::MAP_FIXED,
                file.as_raw_fd(),
                0,
            );
            assert_eq!(addr, aligned);
            let mut sum = 0u8;
            for off in (0..len).step_by(4096) {
                sum = sum.wrapping_add(std::ptr::read_volatile((addr as *const u8).add(off)));
            }
            std::hint::black_box(sum);
            Text {
                addr: addr.cast(),
                len,
            }
        }
    }
}

impl Drop for Text {
    fn drop(&mut self) {
        // SAFETY: our own mapping (file pages or the huge pages swapped in);
        // the reservation's unaligned edges are left (a few MiB per round).
        unsafe { libc::munmap(self.addr.cast(), self.len) };
    }
}

fn time_memcpy(src: *const u8, dst: &mut [u8]) -> f64 {
    let t = Instant::now();
    // SAFETY: `src` is readable for dst.len() bytes (a mapped Text).
    unsafe { std::ptr::copy_nonoverlapping(src, dst.as_mut_ptr(), dst.len()) };
    std::hint::black_box(&dst);
    t.elapsed().as_secs_f64() * 1e3
}

fn time_fresh_fault(source: Source, len: usize) -> Option<f64> {
    use sys::{Mapping, Prot};
    let t = Instant::now();
    let mut fresh = match source {
        Source::Hugetlb => Mapping::anonymous(len, Prot::READ_WRITE, libc::MAP_HUGETLB).ok()?,
        Source::Thp => {
            let mut m =
                Mapping::anonymous_aligned(len, huge_page() as usize, Prot::READ_WRITE).ok()?;
            m.advise(libc::MADV_HUGEPAGE).ok()?;
            m
        }
        _ => return None,
    };
    let populated = fresh.advise(sys::MADV_POPULATE_WRITE);
    let ms = t.elapsed().as_secs_f64() * 1e3;
    drop(fresh);
    populated.ok().map(|()| ms)
}

struct Row {
    mib: usize,
    source: Source,
    memcpy: f64,
    fault: f64,
    swap: f64,
    peak_extra_kib: u64,
    swapped_ok: usize,
}

fn bench(file: &std::fs::File, mib: usize, source: Source) -> Option<Row> {
    let len = mib * MIB;
    let mut dst = vec![1u8; len];
    let (mut m, mut f, mut s) = (Vec::new(), Vec::new(), Vec::new());
    let mut peak_extra_kib = 0;
    let mut swapped_ok = 0;
    for _ in 0..ROUNDS {
        f.push(time_fresh_fault(source, len)?);

        let text = Text::map(file, len);
        m.push(time_memcpy(text.addr, &mut dst));

        // Peak extra memory: reset the RSS high-water mark, then compare it
        // (and the pool's free pages) with the state before the swap.
        std::fs::write("/proc/self/clear_refs", "5").ok();
        let rss_before = status_kib("VmRSS:");
        let pool_before = hugetlb_free();
        let range = Range::new(text.addr as u64, text.addr as u64 + len as u64);
        let t = Instant::now();
        // SAFETY: `range` is our own r-x private file mapping, 2 MiB aligned;
        // the benchmark is single-threaded.
        let request = tiexec::internal::plan::SwapRange {
            range,
            pieces: vec![range],
            in_place: false,
            names_program: false,
        };
        // SAFETY (both copies): `req` is the request above: our own
        // mapping, mapped and readable, not written meanwhile.
        let mut supply = |req: &tiexec::internal::plan::SwapRange| match source {
            Source::Hugetlb => unsafe { tiexec::internal::staging::pool_copy(req) },
            _ => unsafe { tiexec::internal::staging::thp_copy(req) },
        };
        let results =
            unsafe { tiexec::internal::swap::swap_ranges(&[request], &mut supply, false) };
        s.push(t.elapsed().as_secs_f64() * 1e3);
        let hwm_extra = status_kib("VmHWM:").saturating_sub(rss_before);
        let pool_taken = pool_before.saturating_sub(hugetlb_free()) * 2048;
        peak_extra_kib = peak_extra_kib.max(hwm_extra + pool_taken);
        if results.iter().all(|r| r.result.is_ok()) {
            swapped_ok += 1;
        } else {
            eprintln!("swap failed: {:?}", results);
        }
        // SAFETY: the range now holds the bytes of the file, check a few.
        let first = unsafe { std::ptr::read_volatile(text.addr) };
        std::hint::black_box(first);
        drop(text);
    }
    Some(Row {
        mib,
        source,
        memcpy: median(&mut m),
        fault: median(&mut f),
        swap: median(&mut s),
        peak_extra_kib,
        swapped_ok,
    })
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` would pass
    // nothing useful here: run only when benchmarking.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let sizes = [8usize, 64, 256];
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bench-text.bin");
    let max = sizes.iter().max().unwrap() * MIB;
    if std::fs::metadata(&path)
        .map(|m| m.len() as usize)
        .unwrap_or(0)
        != max
    {
        let mut f = std::fs::File::create(&path).unwrap();
        let mut x = 0x9e3779b97f4a7c15u64;
        let mut buf = vec![0u8; MIB];
        for _ in 0..max / MIB {
            for chunk in buf.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                chunk.copy_from_slice(&x.to_le_bytes());
            }
            f.write_all(&buf).unwrap();
        }
    }
    let file = std::fs::File::open(&path).unwrap();

    let pool_path = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages";
    let old_pool = std::fs::read_to_string(pool_path).unwrap_or_default();
    let want = (max / (2 * MIB)) as u64 + 8;
    let pool_ok = std::fs::write(pool_path, format!("{want}\n")).is_ok() || hugetlb_free() >= want;

    println!(
        "swap cost, medians of {ROUNDS} interleaved rounds (ms); machine: {} cores, kernel {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );
    println!();
    println!("| text | backend | memcpy | fresh fault | swap | swap / (fault + memcpy) | peak extra memory | swaps ok |");
    println!("|---|---|---|---|---|---|---|---|");
    for &mib in &sizes {
        for source in [Source::Hugetlb, Source::Thp] {
            if source == Source::Hugetlb && !pool_ok {
                println!(
                    "| {mib} MiB | hugetlb | skipped: pool too small and not root | | | | | |"
                );
                continue;
            }
            match bench(&file, mib, source) {
                Some(r) => println!(
                    "| {} MiB | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.1} MiB ({:.2} x text) | {}/{} |",
                    r.mib,
                    r.source.name(),
                    r.memcpy,
                    r.fault,
                    r.swap,
                    r.swap / (r.fault + r.memcpy),
                    r.peak_extra_kib as f64 / 1024.0,
                    r.peak_extra_kib as f64 / 1024.0 / r.mib as f64,
                    r.swapped_ok,
                    ROUNDS
                ),
                None => println!("| {mib} MiB | {} | could not allocate | | | | | |", source.name()),
            }
        }
    }
    if !old_pool.is_empty() {
        let _ = std::fs::write(pool_path, old_pool);
    }
}
