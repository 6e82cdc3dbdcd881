//! `tiexec --cache`: what the image cache holds, and eviction.
//!
//! Lists the images of this user (root: with `--all-users`, every user's):
//! the object each was built from, its size in 2 MiB pages, when it was last
//! used, how many processes started from it (hits), and how many map it now;
//! then totals against the mount's size. `--clear` evicts (all, or the
//! images of objects whose file name matches a glob), `--dry-run` only says
//! what would go. Evicting only unlinks: processes that map an image keep
//! its pages until they exit. Names other users chose are shown escaped.

use crate::ExitCode;
use std::ffi::OsString;
use std::path::PathBuf;

use tiexec::internal::cache::{self, Entry};
use tiexec::internal::json::Json;
use tiexec::internal::log::{Bytes, Shown};
use tiexec::internal::plan::huge_page;
use tiexec::internal::state::StateDir;

const USAGE: &str = "\
Usage: tiexec --cache [--json] [--all-users] [--cache-dir DIR]
       tiexec --cache --clear [PATTERN] [--dry-run] [--all-users] [--cache-dir DIR]

Lists this user's images in tiexec's cache: the object each holds text of,
its 2 MiB pages, its last use, its hits (process starts served by it), and
the processes mapping it now; then the totals.
With --clear, evicts this user's images: all, or those of objects whose
file name matches the glob PATTERN (e.g. 'libLLVM*'). Eviction only
unlinks: running processes keep their pages until they exit.

  --json           one JSON document on stdout
  --dry-run        with --clear: list what would be evicted, evict nothing
  --all-users      (root) every user's images, not only root's own
  --cache-dir DIR  the cache's mount (default: TIEXEC_CACHE, else /run/tiexec)

Exit status: 0, 1 when there is no cache, 2 for a usage error.
";

/// One image, as listed.
struct Listed {
    entry: Entry,
    dir: PathBuf,
    object: String,
    hits: Option<u64>,
    mapped_by: usize,
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn ago(secs: i64) -> String {
    match secs {
        s if s < 120 => format!("{s} s ago"),
        s if s < 7200 => format!("{} min ago", s / 60),
        s if s < 172_800 => format!("{} h ago", s / 3600),
        s => format!("{} days ago", s / 86_400),
    }
}

fn cache_root(explicit: Option<PathBuf>) -> PathBuf {
    explicit
        .or_else(|| {
            std::env::var_os("TIEXEC_CACHE")
                .filter(|v| v != "off" && !v.is_empty())
                .map(PathBuf::from)
        })
        .unwrap_or_else(|| PathBuf::from(cache::DEFAULT_ROOT))
}

/// Runs `tiexec --cache`.
pub fn main(argv: impl Iterator<Item = OsString>) -> ExitCode {
    use lexopt::Arg::{Long, Short, Value};
    let (mut json, mut clear, mut dry_run, mut all_users) = (false, false, false, false);
    let mut pattern: Option<String> = None;
    let mut dir: Option<PathBuf> = None;
    let mut parser = lexopt::Parser::from_args(argv);
    loop {
        let arg = match parser.next() {
            Ok(Some(a)) => a,
            Ok(None) => break,
            Err(e) => return usage_error(&e.to_string()),
        };
        match arg {
            Short('h') | Long("help") => {
                print!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            Long("json") => json = true,
            Long("clear") => clear = true,
            Long("dry-run") => dry_run = true,
            Long("all-users") => all_users = true,
            Long("cache-dir") => match parser.value() {
                Ok(v) => dir = Some(v.into()),
                Err(e) => return usage_error(&e.to_string()),
            },
            Value(v) if clear && pattern.is_none() => {
                pattern = Some(v.to_string_lossy().into_owned())
            }
            other => return usage_error(&other.unexpected().to_string()),
        }
    }
    if dry_run && !clear {
        return usage_error("--dry-run goes with --clear");
    }
    let root = cache_root(dir);
    let root = std::fs::canonicalize(&root).unwrap_or(root);
    let uid = tiexec::internal::sys::effective_uid();
    if all_users && uid != 0 {
        return usage_error("--all-users needs root (other users' images are theirs)");
    }
    let dirs: Vec<(u32, PathBuf)> = cache::user_dirs(&root)
        .into_iter()
        .filter(|(owner, _)| all_users || *owner == uid)
        .collect();
    let pages = cache::hugetlbfs_pages(&root);
    if pages.is_none() {
        if cache::is_hugetlbfs(&root) {
            eprintln!(
                "tiexec --cache: the hugetlbfs at {} has no size limit, and no hugetlb cgroup limit bounds this process: not an image cache here",
                root.display()
            );
        } else {
            eprintln!(
                "tiexec --cache: no image cache at {} (tiexec --setup makes one)",
                root.display()
            );
        }
        return ExitCode::from(1);
    }
    let state = StateDir::open_default();
    let mapped = cache::mapped_under(&root);
    let mut listed: Vec<Listed> = Vec::new();
    for (owner, d) in &dirs {
        for entry in cache::entries_in(d, *owner) {
            let record = (*owner == uid)
                .then(|| state.as_ref()?.image_record(&entry.name))
                .flatten();
            let base = cache::parse_name(&entry.name).map_or("", |(b, _)| b);
            let path = d.join(&entry.name);
            listed.push(Listed {
                object: record
                    .as_ref()
                    .map_or_else(|| base.to_string(), |(p, _)| p.clone()),
                hits: record.map(|(_, h)| h),
                mapped_by: mapped
                    .iter()
                    .find(|(p, _)| *p == path)
                    .map_or(0, |(_, n)| *n),
                dir: d.clone(),
                entry,
            });
        }
    }
    listed.sort_by(|a, b| {
        a.object
            .cmp(&b.object)
            .then(a.entry.name.cmp(&b.entry.name))
    });

    if clear {
        let mut removed = 0u64;
        let mut bytes = 0u64;
        for l in &listed {
            let base = cache::parse_name(&l.entry.name).map_or("", |(b, _)| b);
            let matches = pattern.as_deref().is_none_or(|p| {
                tiexec::internal::select::matches_any(p.as_bytes(), l.object.as_bytes())
                    || tiexec::internal::select::matches_any(p.as_bytes(), base.as_bytes())
            });
            if !matches {
                continue;
            }
            if dry_run {
                removed += 1;
                bytes += l.entry.bytes;
                println!(
                    "would evict {} ({}, {}){}",
                    Shown(&l.object),
                    Bytes(l.entry.bytes),
                    Shown(&l.entry.name),
                    if all_users {
                        format!(" of uid {}", l.entry.uid)
                    } else {
                        String::new()
                    }
                );
                continue;
            }
            match cache::remove_in(&l.dir, &l.entry.name) {
                Ok(()) => {
                    removed += 1;
                    bytes += l.entry.bytes;
                    if let Some(s) = state.as_ref().filter(|_| l.entry.uid == uid) {
                        s.image_removed(&l.entry.name);
                    }
                }
                Err(e) => eprintln!("tiexec --cache: {}: {e}", Shown(&l.entry.name)),
            }
        }
        if dry_run {
            println!(
                "tiexec: {removed} images ({}) would be evicted; nothing was",
                Bytes(bytes)
            );
            return ExitCode::SUCCESS;
        }
        let still_mapped: usize = listed.iter().filter(|l| l.mapped_by > 0).count();
        println!(
            "tiexec: evicted {removed} images ({}){}",
            Bytes(bytes),
            if still_mapped > 0 {
                "; pages of images still mapped are freed when those processes exit"
            } else {
                ""
            }
        );
        return ExitCode::SUCCESS;
    }

    let (total, free) = pages.unwrap_or((0, 0));
    if json {
        let mut j = Json::new();
        j.begin_object(None)
            .str("cache", &root.display().to_string())
            .uint("pages_total", total)
            .uint("pages_free", free)
            .begin_array(Some("images"));
        for l in &listed {
            j.begin_object(None)
                .str("object", &l.object)
                .str("name", &l.entry.name)
                .uint("uid", u64::from(l.entry.uid))
                .uint("bytes", l.entry.bytes)
                .uint("pages", l.entry.bytes / huge_page())
                .uint("last_use", l.entry.last_use.max(0) as u64);
            match l.hits {
                Some(h) => j.uint("hits", h),
                None => j.null("hits"),
            };
            j.uint("mapped_by", l.mapped_by as u64).end_object();
        }
        j.end_array().end_object();
        println!("{}", j.finish());
        return ExitCode::SUCCESS;
    }
    println!(
        "image cache {}: {total} pages, {free} free",
        Shown(&root.display().to_string())
    );
    let now = now();
    for l in &listed {
        println!(
            "  {}\n    {} ({} pages), last use {}, {} hits, mapped by {} processes{}",
            Shown(&l.object),
            Bytes(l.entry.bytes),
            l.entry.bytes / huge_page(),
            ago(now - l.entry.last_use),
            l.hits.map_or("?".to_string(), |h| h.to_string()),
            l.mapped_by,
            if all_users {
                format!(" (uid {})", l.entry.uid)
            } else {
                String::new()
            }
        );
    }
    let used: u64 = listed.iter().map(|l| l.entry.bytes / huge_page()).sum();
    println!(
        "{} images, {used} pages{}",
        listed.len(),
        if all_users {
            " (every user's)"
        } else if uid == 0 {
            " (root's own; --all-users for every user's)"
        } else {
            " (this user's; other users' images also count against the mount)"
        }
    );
    ExitCode::SUCCESS
}

fn usage_error(msg: &str) -> ExitCode {
    eprintln!("tiexec --cache: {msg}\nTry 'tiexec --cache --help'.");
    ExitCode::from(2)
}
