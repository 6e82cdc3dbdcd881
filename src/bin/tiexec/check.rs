//! `tiexec --check [PROGRAM]`: is this machine ready, and what would tiexec do
//! with PROGRAM? Kernel, THP, the hugetlb pool per NUMA node, what the
//! kernel supports; for PROGRAM: how it is linked, how each object's text is
//! aligned and cached, a dry-run plan with the pages it needs, and the exact
//! command to reserve them. Exit status 0 when ready, 1 when not.
//!
//! It changes nothing: it reads files (their pages may enter the page
//! cache) and /proc and /sys.

use crate::ExitCode;
use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tiexec::discover::{self, ThpMode};
use tiexec::json::Json;
use tiexec::log::Bytes;
use tiexec::plan::{self, Range, HUGE_PAGE};
use tiexec::prime::{self, State};

const USAGE: &str = "\
Usage: tiexec --check [--json] [PROGRAM]

Says whether this machine is ready for tiexec: kernel, transparent huge
pages, the hugetlb pool (per NUMA node), and what the kernel supports. With
PROGRAM: whether it is dynamic, PIE, setuid; how the text of the program and
of its libraries is aligned and cached; what tiexec would do (objects,
ranges, 2 MiB pages needed, from where); and the command that reserves the
hugetlb pages it needs.

  --json   one JSON document on stdout

Exit status: 0 when tiexec can put PROGRAM's text (or, without PROGRAM,
anything) on 2 MiB pages; 1 when it cannot; 2 for a usage error.
";

const POOL_DIR: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB";

struct NodePool {
    node: String,
    total: u64,
    free: u64,
    surplus: u64,
}

struct Machine {
    kernel: String,
    thp: ThpMode,
    thp_text: String,
    defrag: String,
    pool: discover::Pool,
    nodes: Vec<NodePool>,
    pagemap_scan: bool,
    file_collapse: Result<(), String>,
}

/// One object of the program: its text, and the dry-run plan.
struct ObjectCheck {
    path: PathBuf,
    segments: Vec<SegmentCheck>,
}

struct SegmentCheck {
    file: Range,
    bytes: u64,
    align: u64,
    congruent: bool,
    /// 2 MiB pages the text touches (the aggressive plan's upper bound).
    pages: u64,
    /// Whole 2 MiB pages inside it (what the conservative plan takes).
    whole_pages: u64,
    cache: Option<State>,
}

impl SegmentCheck {
    /// 2 MiB pages that would come from the page cache without a copy.
    fn zero_copy_pages(&self) -> u64 {
        match self.cache {
            Some(State::Huge) => self.whole_pages,
            _ => 0,
        }
    }
}

fn read_trim(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn read_u64(path: &str) -> u64 {
    read_trim(path).parse().unwrap_or(0)
}

fn selected(text: &str) -> String {
    text.split_whitespace()
        .find(|w| w.starts_with('['))
        .map(|w| w.trim_matches(|c| c == '[' || c == ']').to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// Can the kernel collapse a regular file's cached text in place? Probes a
/// temporary 4 MiB file (needs CONFIG_READ_ONLY_THP_FOR_FS).
fn probe_file_collapse() -> Result<(), String> {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let path = std::env::temp_dir().join(format!("tiexec-check-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&path).map_err(|e| e.to_string())?;
        f.write_all(&vec![0xc3u8; 4 << 20])
            .map_err(|e| e.to_string())?;
        drop(f);
        // Read-only, and no longer open for writing: what text is.
        let f = std::fs::File::open(&path).map_err(|e| e.to_string())?;
        let len = 4usize << 20;
        // SAFETY: a fresh read-only private mapping of our own temporary
        // file at a kernel-chosen address, unmapped below.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                f.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(format!("mmap: {}", tiexec::sys::Errno::last()));
        }
        let aligned = plan::align_up(base as u64, HUGE_PAGE);
        let offset = aligned - base as u64;
        // The 2 MiB page inside the mapping is congruent only if the kernel
        // placed the mapping 2 MiB-aligned (it does for files this big);
        // otherwise the answer is unknown.
        let r = if offset == 0 {
            // SAFETY: advice on our own mapping; contents do not change.
            unsafe {
                let _ = tiexec::sys::madvise(base.cast(), HUGE_PAGE as usize, libc::MADV_HUGEPAGE);
                tiexec::sys::madvise(base.cast(), HUGE_PAGE as usize, tiexec::sys::MADV_COLLAPSE)
            }
            .map_err(|e| format!("{} (kernel without CONFIG_READ_ONLY_THP_FOR_FS?)", e.name()))
        } else {
            Err("unknown (could not place a congruent mapping)".into())
        };
        // SAFETY: our own mapping, no longer used.
        unsafe { libc::munmap(base, len) };
        r
    })();
    let _ = std::fs::remove_file(&path);
    result
}

fn machine() -> Machine {
    let mut nodes = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/sys/devices/system/node") {
        let mut names: Vec<String> = dir
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .filter(|n| n.starts_with("node") && n[4..].chars().all(|c| c.is_ascii_digit()))
            .collect();
        names.sort();
        for n in names {
            let d = format!("/sys/devices/system/node/{n}/hugepages/hugepages-2048kB");
            nodes.push(NodePool {
                total: read_u64(&format!("{d}/nr_hugepages")),
                free: read_u64(&format!("{d}/free_hugepages")),
                surplus: read_u64(&format!("{d}/surplus_hugepages")),
                node: n,
            });
        }
    }
    let thp_text = read_trim("/sys/kernel/mm/transparent_hugepage/enabled");
    Machine {
        kernel: read_trim("/proc/sys/kernel/osrelease"),
        thp: discover::parse_thp_mode(thp_text.as_bytes()),
        defrag: selected(&read_trim("/sys/kernel/mm/transparent_hugepage/defrag")),
        thp_text: selected(&thp_text),
        pool: discover::hugetlb_pool(),
        nodes,
        pagemap_scan: tiexec::sys::huge_mapped_ranges(0x1000, 0x2000).is_ok(),
        file_collapse: probe_file_collapse(),
    }
}

fn check_object(path: &Path) -> Option<ObjectCheck> {
    let file = std::fs::File::open(path).ok()?;
    let phdrs = tiexec::elf::read_program_headers(&file)?;
    let cache = prime::prime_file(path, false).ok();
    let e_type = tiexec::elf::read_type(&file)?;
    let congruence = prime::text_file_ranges(e_type, &phdrs);
    let segments = phdrs
        .iter()
        .filter(|p| {
            p.p_type == goblin::elf::program_header::PT_LOAD
                && p.p_flags & goblin::elf::program_header::PF_X != 0
        })
        .enumerate()
        .map(|(i, p)| {
            let memory = plan::segment_pages(p.p_vaddr, p.p_memsz);
            let congruent = congruence.get(i).is_some_and(|(_, c)| *c);
            // Where it lands at run time is unknown for a PIE or library;
            // count as if loaded at a 2 MiB-aligned base.
            SegmentCheck {
                file: Range::new(p.p_offset, p.p_offset + p.p_filesz),
                bytes: p.p_memsz,
                align: p.p_align,
                congruent,
                pages: tiexec::inspect::chunks_touched(memory),
                whole_pages: plan::split(memory).body.len() / HUGE_PAGE,
                cache: cache.as_ref().and_then(|c| c.get(i)).map(|s| s.state),
            }
        })
        .collect();
    Some(ObjectCheck {
        path: path.to_path_buf(),
        segments,
    })
}

/// Runs `tiexec --check`.
pub fn main(argv: impl Iterator<Item = OsString>) -> ExitCode {
    let mut json = false;
    let mut program: Option<OsString> = None;
    for arg in argv {
        match arg.to_str() {
            Some("-h" | "--help") => {
                print!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            Some("--json") => json = true,
            Some(s) if s.starts_with('-') => {
                eprintln!("tiexec --check: unknown option {s}\nTry 'tiexec --check --help'.");
                return ExitCode::from(2);
            }
            _ if program.is_none() => program = Some(arg),
            _ => {
                eprintln!("tiexec --check: one PROGRAM at most\nTry 'tiexec --check --help'.");
                return ExitCode::from(2);
            }
        }
    }
    let m = machine();
    let thp_usable = m.thp != ThpMode::Never;
    let mut out = Json::new();
    out.begin_object(None);
    machine_json(&mut out, &m);
    if !json {
        print_machine(&m);
    }

    let Some(program) = program else {
        out.bool("ready", thp_usable || m.pool.available() > 0)
            .end_object();
        if json {
            println!("{}", out.finish());
        }
        return if thp_usable || m.pool.available() > 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        };
    };

    let Some(path) = crate::path::resolve(&program) else {
        eprintln!(
            "tiexec --check: {}: not found or not executable",
            program.to_string_lossy()
        );
        return ExitCode::from(1);
    };
    let linkage = crate::path::linkage(&path);
    let dynamic = linkage == crate::path::Linkage::Dynamic;
    let setuid = std::fs::metadata(&path).is_ok_and(|md| md.permissions().mode() & 0o6000 != 0);
    let pie = std::fs::read(&path)
        .ok()
        .and_then(|b| goblin::elf::Elf::parse_header(&b).ok().map(|h| h.e_type))
        == Some(goblin::elf::header::ET_DYN);
    let mut objects: Vec<ObjectCheck> = check_object(&path).into_iter().collect();
    if dynamic {
        objects.extend(
            crate::libs::read_object(&path)
                .map(|p| crate::libs::startup_libraries(&p))
                .unwrap_or_default()
                .iter()
                .filter(|l| l.file_size >= 2 << 20)
                .filter_map(|l| check_object(&l.path)),
        );
    }
    // Dry run: what would be copied, what the page cache serves.
    let copy_pages: u64 = objects
        .iter()
        .flat_map(|o| &o.segments)
        .filter(|s| s.whole_pages > 0)
        .map(|s| s.pages - s.zero_copy_pages())
        .sum();
    let zero_copy_pages: u64 = objects
        .iter()
        .flat_map(|o| &o.segments)
        .map(|s| s.zero_copy_pages())
        .sum();
    let available = m.pool.available();
    let backend = if copy_pages == 0 {
        "none needed"
    } else if available >= copy_pages {
        "hugetlb"
    } else if thp_usable {
        "thp"
    } else {
        "none: no hugetlb pages and THP disabled"
    };
    let reserve = (available < copy_pages).then(|| {
        let want = m.pool.total + copy_pages - available;
        format!("echo {want} > {POOL_DIR}/nr_hugepages")
    });
    // Ready: whatever PROGRAM's text needs can be had. Text to copy needs
    // the preload to reach the program and a source of huge pages; text that
    // only the page cache can serve (static programs) needs priming.
    let reachable = dynamic && !setuid;
    let whole_pages: u64 = objects
        .iter()
        .flat_map(|o| &o.segments)
        .map(|s| s.whole_pages)
        .sum();
    let ready = if reachable {
        copy_pages == 0 || available >= copy_pages || thp_usable
    } else {
        // Nothing can copy for it: the page cache must serve its text.
        whole_pages == 0 || zero_copy_pages >= whole_pages
    };

    if json {
        out.begin_object(Some("program"))
            .str("path", &path.to_string_lossy())
            .bool("dynamic", dynamic)
            .bool("pie", pie)
            .bool("setuid", setuid)
            .bool("preload_reaches_it", reachable)
            .begin_array(Some("objects"));
        for o in &objects {
            out.begin_object(None)
                .str("path", &o.path.to_string_lossy())
                .begin_array(Some("text_segments"));
            for s in &o.segments {
                out.begin_object(None)
                    .uint("file_offset", s.file.start)
                    .uint("bytes", s.bytes)
                    .uint("p_align", s.align)
                    .bool("congruent", s.congruent)
                    .uint("huge_pages_touched", s.pages)
                    .uint("whole_huge_pages", s.whole_pages)
                    .str("page_cache", s.cache.map_or("unknown", |c| c.describe()))
                    .end_object();
            }
            out.end_array().end_object();
        }
        out.end_array()
            .end_object()
            .begin_object(Some("plan"))
            .uint("pages_to_copy", copy_pages)
            .uint("pages_from_page_cache", zero_copy_pages)
            .str("backend", backend);
        match &reserve {
            Some(cmd) => out.str("reserve_command", cmd),
            None => out.null("reserve_command"),
        };
        out.end_object().bool("ready", ready).end_object();
        println!("{}", out.finish());
    } else {
        println!("\nprogram {}", path.display());
        println!(
            "  {}, {}{}",
            match linkage {
                crate::path::Linkage::Dynamic => "dynamically linked",
                crate::path::Linkage::Static => "statically linked (LD_PRELOAD cannot reach it: tiexec --prime, or link libtiexec.a)",
                crate::path::Linkage::NotElf => "not an ELF program (a script: its interpreter is what runs)",
            },
            if pie { "PIE" } else { "not PIE (fixed address)" },
            if setuid { ", setuid/setgid (the loader ignores LD_PRELOAD for it)" } else { "" }
        );
        for o in &objects {
            println!("  {}", o.path.display());
            for s in &o.segments {
                println!(
                    "    text {} at file offset {:#x}, p_align {:#x}: {}; touches {} x 2 MiB ({} whole); page cache: {}",
                    Bytes(s.bytes),
                    s.file.start,
                    s.align,
                    if s.congruent {
                        "congruent (the page cache can serve 2 MiB pages)".to_string()
                    } else if pie || o.path != path {
                        format!("not congruent: relink with {}", prime::LINK_ADVICE)
                    } else {
                        "not congruent".to_string()
                    },
                    s.pages,
                    s.whole_pages,
                    s.cache.map_or("unknown", |c| c.describe())
                );
            }
        }
        println!("\nplan (dry run)");
        if copy_pages + zero_copy_pages == 0 {
            println!(
                "  nothing to move in {} itself (the programs it starts may have: check them)",
                path.display()
            );
        }
        println!("  {zero_copy_pages} x 2 MiB from the page cache (no copy), {copy_pages} x 2 MiB to copy: backend {backend}");
        if let Some(cmd) = &reserve {
            println!("  to copy into hugetlb pages, reserve them (as root): {cmd}");
        }
        if zero_copy_pages < copy_pages + zero_copy_pages {
            println!(
                "  to serve congruent text from the page cache: tiexec --prime {}",
                path.display()
            );
        }
        println!("\n{}", if ready { "ready" } else { "not ready" });
    }
    if ready {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn machine_json(j: &mut Json, m: &Machine) {
    j.begin_object(Some("machine"))
        .str("kernel", &m.kernel)
        .str("thp_enabled", &m.thp_text)
        .str("thp_defrag", &m.defrag)
        .begin_object(Some("hugetlb_pool"))
        .uint("total", m.pool.total)
        .uint("free", m.pool.free)
        .uint("reserved", m.pool.reserved)
        .uint("available", m.pool.available())
        .begin_array(Some("nodes"));
    for n in &m.nodes {
        j.begin_object(None)
            .str("node", &n.node)
            .uint("total", n.total)
            .uint("free", n.free)
            .uint("surplus", n.surplus)
            .end_object();
    }
    j.end_array()
        .end_object()
        .bool("pagemap_scan", m.pagemap_scan)
        .bool("file_collapse_in_place", m.file_collapse.is_ok())
        .end_object();
}

fn print_machine(m: &Machine) {
    println!("machine");
    println!("  kernel {}", m.kernel);
    println!(
        "  transparent huge pages: {} (defrag {}){}",
        m.thp_text,
        m.defrag,
        if m.thp == ThpMode::Never {
            ": the thp backend cannot work"
        } else {
            ""
        }
    );
    println!(
        "  hugetlb pool (2 MiB): {} pages, {} free, {} reserved: {} available",
        m.pool.total,
        m.pool.free,
        m.pool.reserved,
        m.pool.available()
    );
    for n in &m.nodes {
        println!(
            "    {}: {} pages, {} free, {} surplus",
            n.node, n.total, n.free, n.surplus
        );
    }
    println!(
        "  PAGEMAP_SCAN (exact huge-page checks, Linux 6.7): {}",
        if m.pagemap_scan {
            "yes"
        } else {
            "no: smaps is used, per mapping"
        }
    );
    println!(
        "  in-place collapse of file text (MADV_COLLAPSE): {}",
        match &m.file_collapse {
            Ok(()) => "yes".to_string(),
            Err(e) => format!("no, {e}: text is copied instead, or primed"),
        }
    );
}
