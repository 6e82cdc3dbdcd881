//! `tiexec --stat PID...`: how much of each object's text in a running process
//! is on 2 MiB pages, of which kind, and what that saves in page-table (TLB)
//! entries; a picture per 2 MiB for people who would rather look than read;
//! JSON for machines.

use crate::ExitCode;
use std::ffi::OsString;

use tiexec::internal::inspect::{self, ObjectStat};
use tiexec::internal::json::Json;
use tiexec::internal::log::Bytes;

const USAGE: &str = "\
Usage: tiexec --stat [--json] [--tree] [--all] PID...
       tiexec --stat [--json]

Without a PID: every process tiexec serves now (those with its library
loaded, text it moved or images of its cache mapped), one line each, and
the machine's totals: text, share on 2 MiB pages, private huge pages
held, cache images mapped. As another user, only your own processes.

For each object of each process with at least 2 MiB of text: text size,
bytes on 2 MiB pages by kind (hugetlb, anonymous THP, file THP from the page
cache), bytes left on 4 KiB pages, coverage, how much comes from tiexec's
image cache and how many processes share those images, the page-table
entries the text needs (4 KiB only -> now -> all huge), and one character
per 2 MiB of text: '#' huge, '+' partly, '.' 4 KiB pages (or not yet
faulted in).

  --json   one JSON document on stdout
  --tree   also the descendants of each PID
  --all    every object with text, not only those with 2 MiB or more
";

/// Runs `tiexec --stat`.
pub fn main(argv: impl Iterator<Item = OsString>) -> ExitCode {
    let (mut json, mut tree, mut all) = (false, false, false);
    let mut pids = Vec::new();
    for arg in argv {
        match arg.to_str() {
            Some("-h" | "--help") => {
                print!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            Some("--json") => json = true,
            Some("--tree") => tree = true,
            Some("--all") => all = true,
            Some(s) => match s.parse::<u32>() {
                Ok(p) => pids.push(p),
                Err(_) => {
                    eprintln!("tiexec --stat: {s}: not a PID\nTry 'tiexec --stat --help'.");
                    return ExitCode::from(2);
                }
            },
            None => {
                eprintln!("tiexec --stat: bad argument\nTry 'tiexec --stat --help'.");
                return ExitCode::from(2);
            }
        }
    }
    if pids.is_empty() {
        if tree {
            eprintln!("tiexec --stat: --tree needs a PID\nTry 'tiexec --stat --help'.");
            return ExitCode::from(2);
        }
        return machine(json);
    }
    if tree {
        pids = with_descendants(&pids);
    }
    let min_text = if all { 1 } else { 2 << 20 };
    let mut failed = false;
    let mut results = Vec::new();
    for pid in pids {
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("tiexec --stat: {pid}: no such process");
            failed = true;
            continue;
        }
        match inspect::process_objects(pid, min_text) {
            Ok(objects) => results.push((pid, command_name(pid), objects)),
            Err(e) => {
                eprintln!("tiexec --stat: {pid}: {e}");
                failed = true;
            }
        }
    }
    if json {
        println!("{}", to_json(&results));
    } else {
        for (pid, name, objects) in &results {
            print_process(*pid, name, objects);
        }
    }
    if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

fn command_name(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// `pids` followed by all their descendants (from /proc/*/stat).
fn with_descendants(pids: &[u32]) -> Vec<u32> {
    let mut parent_of: Vec<(u32, u32)> = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // The command name may hold spaces and parentheses: the fields
            // after the last ')' are "state ppid ...".
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse().ok());
            if let Some(ppid) = ppid {
                parent_of.push((pid, ppid));
            }
        }
    }
    let mut out = pids.to_vec();
    let mut i = 0;
    while i < out.len() {
        let parent = out[i];
        for &(child, ppid) in &parent_of {
            if ppid == parent && !out.contains(&child) {
                out.push(child);
            }
        }
        i += 1;
    }
    out
}

fn print_process(pid: u32, name: &str, objects: &[ObjectStat]) {
    println!("{pid} ({name})");
    if objects.is_empty() {
        println!("  no object with 2 MiB of text or more (--all lists every one)");
    }
    for o in objects {
        let c = &o.coverage;
        println!("  {}", o.path);
        println!(
            "    text {}: {:.1} % on {} pages ({} hugetlb, {} anonymous THP, {} file THP), {} on {} pages",
            Bytes(o.text_bytes()),
            o.percent_huge(),
            tiexec::internal::pagesize::huge_page_name(),
            Bytes(c.hugetlb),
            Bytes(c.anon_thp),
            Bytes(c.file_thp),
            Bytes(c.small()),
            tiexec::internal::pagesize::SizeName(tiexec::internal::pagesize::page())
        );
        if !o.images.is_empty() {
            let most = o.images.iter().map(|i| i.processes).max().unwrap_or(1);
            println!(
                "    {} of it from the image cache ({} image(s), mapped by up to {most} process(es))",
                Bytes(o.cache_bytes()),
                o.images.len(),
            );
        }
        println!(
            "    page-table entries for the text: {} on 4 KiB pages only -> {} now -> {} with all of it huge",
            o.pages_if_small(),
            o.pages_now(),
            o.pages_if_all_huge()
        );
        println!("    [{}]", o.picture());
    }
}

fn to_json(results: &[(u32, String, Vec<ObjectStat>)]) -> String {
    let mut j = Json::new();
    j.begin_array(None);
    for (pid, name, objects) in results {
        j.begin_object(None)
            .uint("pid", u64::from(*pid))
            .str("command", name)
            .begin_array(Some("objects"));
        for o in objects {
            let c = &o.coverage;
            j.begin_object(None)
                .str("path", &o.path)
                .uint("text_bytes", o.text_bytes())
                .uint("huge_bytes", c.huge())
                .uint("hugetlb_bytes", c.hugetlb)
                .uint("anon_thp_bytes", c.anon_thp)
                .uint("file_thp_bytes", c.file_thp)
                .uint("small_bytes", c.small())
                .float("percent_huge", o.percent_huge())
                .uint("entries_small_only", o.pages_if_small())
                .uint("entries_now", o.pages_now())
                .uint("entries_all_huge", o.pages_if_all_huge())
                .str("picture", &o.picture())
                .uint("cache_bytes", o.cache_bytes());
            j.begin_array(Some("images"));
            for i in &o.images {
                j.begin_object(None)
                    .str("path", &i.path)
                    .uint("bytes", i.bytes)
                    .uint("processes", i.processes as u64)
                    .end_object();
            }
            j.end_array();
            j.begin_array(Some("text"));
            for t in &o.text {
                j.begin_object(None)
                    .uint("start", t.start)
                    .uint("end", t.end)
                    .end_object();
            }
            j.end_array().end_object();
        }
        j.end_array().end_object();
    }
    j.end_array();
    j.finish()
}

/// What one served process holds.
struct Served {
    pid: u32,
    command: String,
    /// Text of its objects with 2 MiB or more.
    text: u64,
    huge: u64,
    /// Of `huge`: from cache images (shared with other processes).
    from_images: u64,
    /// Huge pages it holds alone: anonymous THP and private hugetlb copies.
    private: u64,
}

/// Whether a line of /proc/PID/maps shows tiexec at work: its library or
/// stub, text it moved to anonymous memory (named `[anon:tiexec:...]`), or
/// an image of its cache.
fn tiexec_mapping(line: &str) -> bool {
    let path = line.split_whitespace().nth(5).unwrap_or("");
    let file = path.rsplit('/').next().unwrap_or("");
    file.starts_with("libtiexec")
        || line.contains("[anon:tiexec:")
        || tiexec::internal::cache::is_image_path(path)
}

/// Every process tiexec serves now (that this user may look at), and how
/// many could not be read.
fn served_processes() -> (Vec<Served>, usize) {
    let mut out = Vec::new();
    let mut unreadable = 0;
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return (out, 0);
    };
    let own = std::process::id();
    let mut pids: Vec<u32> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|&p| p != own)
        .collect();
    pids.sort_unstable();
    for pid in pids {
        let Ok(maps) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else {
            unreadable += 1;
            continue;
        };
        if !maps.lines().any(tiexec_mapping) {
            continue;
        }
        let Ok(objects) = inspect::process_objects(pid, 2 << 20) else {
            unreadable += 1;
            continue;
        };
        let text = objects.iter().map(|o| o.text_bytes()).sum();
        let huge = objects.iter().map(|o| o.coverage.huge()).sum();
        let from_images: u64 = objects.iter().map(|o| o.cache_bytes()).sum();
        let hugetlb: u64 = objects.iter().map(|o| o.coverage.hugetlb).sum();
        let anon: u64 = objects.iter().map(|o| o.coverage.anon_thp).sum();
        out.push(Served {
            pid,
            command: command_name(pid),
            text,
            huge,
            from_images,
            private: anon + hugetlb.saturating_sub(from_images),
        });
    }
    (out, unreadable)
}

/// `tiexec --stat` without a PID: the machine-wide view.
fn machine(json: bool) -> ExitCode {
    let (served, unreadable) = served_processes();
    let text: u64 = served.iter().map(|s| s.text).sum();
    let huge: u64 = served.iter().map(|s| s.huge).sum();
    let private: u64 = served.iter().map(|s| s.private).sum();
    let from_images: u64 = served.iter().map(|s| s.from_images).sum();
    let cache = tiexec::internal::cache::hugetlbfs_pages(std::path::Path::new(
        tiexec::internal::cache::DEFAULT_ROOT,
    ));
    let percent = |part: u64, whole: u64| {
        if whole == 0 {
            0.0
        } else {
            part as f64 * 100.0 / whole as f64
        }
    };
    if json {
        let mut j = Json::new();
        j.begin_object(None).begin_array(Some("processes"));
        for s in &served {
            j.begin_object(None)
                .uint("pid", u64::from(s.pid))
                .str("command", &s.command)
                .uint("text_bytes", s.text)
                .uint("huge_bytes", s.huge)
                .uint("from_images_bytes", s.from_images)
                .uint("private_huge_bytes", s.private)
                .end_object();
        }
        j.end_array()
            .begin_object(Some("totals"))
            .uint("processes", served.len() as u64)
            .uint("text_bytes", text)
            .uint("huge_bytes", huge)
            .uint("private_huge_bytes", private)
            .uint("from_images_bytes", from_images)
            .uint("unreadable_processes", unreadable as u64);
        if let Some((total, free)) = cache {
            let page = tiexec::internal::plan::huge_page();
            j.uint("cache_bytes", total * page)
                .uint("cache_free_bytes", free * page);
        }
        j.end_object().end_object();
        println!("{}", j.finish());
        return ExitCode::SUCCESS;
    }
    if served.is_empty() {
        println!("no process is served by tiexec now");
    } else {
        println!(
            "{:>8}  {:<16} {:>10} {:>7} {:>12} {:>12}",
            "PID", "COMMAND", "TEXT", "HUGE", "FROM IMAGES", "PRIVATE HUGE"
        );
        for s in &served {
            println!(
                "{:>8}  {:<16} {:>10} {:>6.1}% {:>12} {:>12}",
                s.pid,
                s.command,
                Bytes(s.text).to_string(),
                percent(s.huge, s.text),
                Bytes(s.from_images).to_string(),
                Bytes(s.private).to_string()
            );
        }
        println!(
            "{} process(es): text {}, {:.1} % on 2 MiB pages; private huge pages held {}; from cache images {} (shared)",
            served.len(),
            Bytes(text),
            percent(huge, text),
            Bytes(private),
            Bytes(from_images)
        );
    }
    if let Some((total, free)) = cache {
        let page = tiexec::internal::plan::huge_page();
        println!(
            "image cache {}: {} of {} in use",
            tiexec::internal::cache::DEFAULT_ROOT,
            Bytes((total - free) * page),
            Bytes(total * page)
        );
    }
    if unreadable > 0 && tiexec::internal::sys::effective_uid() != 0 {
        println!(
            "({unreadable} other processes could not be read: run as root to see every user's)"
        );
    }
    ExitCode::SUCCESS
}
