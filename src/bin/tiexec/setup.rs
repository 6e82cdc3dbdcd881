//! `tiexec --setup`: once, as root, reserve hugetlb pages for the image cache
//! and mount it, then say how to make that permanent.
//!
//! The cache is a hugetlbfs mount whose `min_size` and `size` are both the
//! pages given to it: the kernel reserves them for the mount at once, so they
//! are never taken from the pool that the machine's programs (a database
//! with `huge_pages=on`) count on, and the cache can never grow beyond them.

use crate::ExitCode;
use std::ffi::{CString, OsString};
use std::path::{Path, PathBuf};

use tiexec::internal::cache::DEFAULT_ROOT;
use tiexec::internal::discover;

const USAGE: &str = "\
Usage: tiexec --setup [--pages N] [--cache-dir DIR]

As root: reserves N hugetlb pages (2 MiB each) for tiexec's image cache,
growing the pool by what it lacks, and mounts a hugetlbfs of exactly that
size at DIR (default /run/tiexec) for every user (each gets a private
directory in it). Programs run with tiexec then share one copy of their
text, built by the first process that needs it. Prints how to make the
setup permanent. An existing mount is reused as it is.

  --pages N        pages for the cache (default: 256, at most 5 % of memory)
  --cache-dir DIR  where to mount it (then set TIEXEC_CACHE=DIR for programs)

Exit status: 0 when the cache is mounted, 1 when not, 2 for a usage error.
";

/// The pool's size file, for tiexec's huge page size.
fn pool_file() -> String {
    format!("{}/nr_hugepages", discover::hugetlb_pool_dir())
}

/// The default size: 256 pages (512 MiB, two Rust toolchains' text), at
/// most 5 % of memory, at least 16 pages.
fn default_pages() -> u64 {
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(0);
    (mem_kib / 2048 / 20).clamp(16, 256)
}

/// Runs `tiexec --setup`.
pub fn main(argv: impl Iterator<Item = OsString>) -> ExitCode {
    use lexopt::Arg::Long;
    let mut pages: Option<u64> = None;
    let mut dir = PathBuf::from(DEFAULT_ROOT);
    let mut parser = lexopt::Parser::from_args(argv);
    loop {
        let arg = match parser.next() {
            Ok(Some(a)) => a,
            Ok(None) => break,
            Err(e) => return usage_error(&e.to_string()),
        };
        let value = match arg {
            Long("help") | lexopt::Arg::Short('h') => {
                print!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            Long("pages") => parser.value().map(|v| {
                pages = v.to_str().and_then(|s| s.parse().ok()).filter(|&n| n > 0);
                pages.is_some()
            }),
            Long("cache-dir") => parser.value().map(|v| {
                dir = PathBuf::from(v);
                dir.is_absolute()
            }),
            other => return usage_error(&other.unexpected().to_string()),
        };
        match value {
            Ok(true) => {}
            Ok(false) => {
                return usage_error("--pages needs a positive number, --cache-dir an absolute path")
            }
            Err(e) => return usage_error(&e.to_string()),
        }
    }
    if tiexec::internal::sys::effective_uid() != 0 {
        eprintln!("tiexec --setup: needs root (it sizes the hugetlb pool and mounts a filesystem)");
        return ExitCode::from(1);
    }
    let pages = pages.unwrap_or_else(default_pages);

    if tiexec::internal::cache::is_hugetlbfs(&dir) {
        let (total, free) = tiexec::internal::cache::hugetlbfs_pages(&dir).unwrap_or((0, 0));
        println!(
            "tiexec: the image cache is already mounted at {}: {total} pages, {free} free",
            dir.display()
        );
        if total != pages {
            println!(
                "  (to give it {pages} pages: umount {} once no process maps its images, then run tiexec --setup again)",
                dir.display()
            );
        }
        print_permanent(&dir, total.max(1));
        return ExitCode::SUCCESS;
    }

    // The pool must have `pages` free pages nobody has reserved.
    let pool = discover::hugetlb_pool();
    if pool.available() < pages {
        let want = pool.total + (pages - pool.available());
        if let Err(e) = std::fs::write(pool_file(), format!("{want}\n")) {
            eprintln!("tiexec --setup: cannot grow the hugetlb pool to {want} pages: {e}");
            return ExitCode::from(1);
        }
        let now = discover::hugetlb_pool();
        if now.available() < pages {
            eprintln!(
                "tiexec --setup: the hugetlb pool reached {} pages, {} free: not enough for {pages} (memory too fragmented? try fewer --pages, or right after boot)",
                now.total,
                now.available()
            );
            let _ = std::fs::write(pool_file(), format!("{}\n", pool.total));
            return ExitCode::from(1);
        }
    }
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("tiexec --setup: {}: {e}", dir.display());
        return ExitCode::from(1);
    }
    let options = mount_options(pages);
    let (Ok(target), Ok(data)) = (
        CString::new(dir.as_os_str().as_encoded_bytes()),
        CString::new(options.clone()),
    ) else {
        return usage_error("bad --cache-dir");
    };
    let r = tiexec::internal::sys::mount_hugetlbfs(&target, &data);
    if let Err(e) = r {
        eprintln!(
            "tiexec --setup: mounting hugetlbfs at {} failed: {e}",
            dir.display()
        );
        return ExitCode::from(1);
    }
    println!(
        "tiexec: image cache mounted at {} with {pages} pages ({} MiB), reserved for it; hugetlb pool now {} pages",
        dir.display(),
        pages * 2,
        discover::hugetlb_pool().total
    );
    if dir != Path::new(DEFAULT_ROOT) {
        println!("  programs find it with TIEXEC_CACHE={}", dir.display());
    }
    print_permanent(&dir, pages);
    ExitCode::SUCCESS
}

fn mount_options(pages: u64) -> String {
    let huge_mib = tiexec::internal::plan::huge_page() >> 20;
    format!(
        "pagesize={huge_mib}M,size={mib}M,min_size={mib}M,mode=1777",
        mib = pages * huge_mib
    )
}

/// How to have the same after a reboot.
fn print_permanent(dir: &Path, pages: u64) {
    let pool = discover::hugetlb_pool().total;
    let unit = dir
        .to_string_lossy()
        .trim_start_matches('/')
        .replace('-', "\\x2d")
        .replace('/', "-");
    println!(
        "\nTo keep it after a reboot (the pool must cover the cache and any other user of huge pages):\n\
         \x20 echo 'vm.nr_hugepages = {pool}' > /etc/sysctl.d/60-tiexec.conf\n\
         \x20 echo 'none {dir} hugetlbfs {opts},nosuid,nodev 0 0' >> /etc/fstab\n\
         or, with systemd, /etc/systemd/system/{unit}.mount:\n\
         \x20 [Mount]\n\x20 What=none\n\x20 Where={dir}\n\x20 Type=hugetlbfs\n\x20 Options={opts},nosuid,nodev\n\
         \x20 [Install]\n\x20 WantedBy=multi-user.target",
        dir = dir.display(),
        opts = mount_options(pages),
    );
}

fn usage_error(msg: &str) -> ExitCode {
    eprintln!("tiexec --setup: {msg}\nTry 'tiexec --setup --help'.");
    ExitCode::from(2)
}
