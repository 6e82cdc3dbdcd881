//! `tiexec --setup`: once, as root, reserve hugetlb pages for the image cache
//! and mount it, install the library where services can preload it, and,
//! with `--persist`, have the same at every boot; `--setup --remove` undoes
//! all of it.
//!
//! The cache is a hugetlbfs mount whose `min_size` and `size` are both the
//! pages given to it: the kernel reserves them for the mount at once, so they
//! are never taken from the pool that the machine's programs (a database
//! with `huge_pages=on`) count on, and the cache can never grow beyond them.
//!
//! What a setup did is recorded (`/var/lib/tiexec/setup`): the pages it
//! added to the pool, whether it made the mount. Running it again changes
//! nothing (the record stays the first one's); `--remove` gives back exactly
//! those pages, unmounts, and deletes every file a setup wrote. `--root DIR`
//! writes and removes the files under DIR instead of `/` (a system image
//! being prepared; the tests); the pool and the mount are the machine's.

use crate::ExitCode;
use std::ffi::{CString, OsString};
use std::path::{Path, PathBuf};

use tiexec::internal::cache::DEFAULT_ROOT;
use tiexec::internal::discover;

const USAGE: &str = "\
Usage: tiexec --setup [--pages N] [--cache-dir DIR] [--persist] [--root DIR]
       tiexec --setup --remove [--cache-dir DIR] [--root DIR]

As root: reserves N hugetlb pages for tiexec's image cache, growing the
pool by what it lacks, and mounts a hugetlbfs of exactly that size at DIR
(default /run/tiexec) for every user (each gets a private directory in
it). Programs run with tiexec then share one copy of their text, built by
the first process that needs it. Installs the library for LD_PRELOAD at
/usr/local/lib/tiexec/libtiexec.so (tiexec --print-library). Running it
again changes nothing.

  --pages N        pages for the cache (default: 256, at most 5 % of memory)
  --cache-dir DIR  where to mount it (then set TIEXEC_CACHE=DIR for programs)
  --persist        also at every boot: a systemd unit, tiexec-setup.service
  --remove         undo a setup: unmount, give the pool its pages back,
                   delete the library, the unit and the record
  --root DIR       write (or remove) the files under DIR instead of /

Exit status: 0 when done, 1 when not, 2 for a usage error.
";

/// The unit `--persist` writes.
const UNIT_NAME: &str = "tiexec-setup.service";
/// A line every file a setup writes carries, so that `--remove` deletes
/// only files tiexec wrote.
const MARK: &str = "# written by tiexec --setup; tiexec --setup --remove deletes it";

/// The files a setup writes, under `root`.
struct Files {
    record: PathBuf,
    library: PathBuf,
    unit: PathBuf,
    wants: PathBuf,
}

impl Files {
    fn under(root: &Path) -> Files {
        let systemd = root.join("etc/systemd/system");
        Files {
            record: root.join("var/lib/tiexec/setup"),
            library: root.join(crate::embedded::SYSTEM_LIBRARY.trim_start_matches('/')),
            unit: systemd.join(UNIT_NAME),
            wants: systemd.join("multi-user.target.wants").join(UNIT_NAME),
        }
    }
}

/// What a setup did, from its record.
#[derive(Debug, Default, PartialEq)]
struct Record {
    /// The cache's mount point.
    mount: Option<PathBuf>,
    /// Pages for the cache.
    pages: u64,
    /// Pages this setup added to the pool.
    pool_added: u64,
    /// This setup mounted it (else it was there).
    mounted: bool,
}

impl Record {
    fn render(&self) -> String {
        format!(
            "{MARK}\nmount {}\npages {}\npool_added {}\nmounted {}\n",
            self.mount
                .as_deref()
                .unwrap_or(Path::new(DEFAULT_ROOT))
                .display(),
            self.pages,
            self.pool_added,
            u8::from(self.mounted)
        )
    }

    fn parse(text: &str) -> Option<Record> {
        if !text.starts_with(MARK) {
            return None;
        }
        let mut r = Record::default();
        for line in text.lines() {
            match line.split_once(' ') {
                Some(("mount", v)) => r.mount = Some(PathBuf::from(v)),
                Some(("pages", v)) => r.pages = v.parse().ok()?,
                Some(("pool_added", v)) => r.pool_added = v.parse().ok()?,
                Some(("mounted", v)) => r.mounted = v == "1",
                _ => {}
            }
        }
        Some(r)
    }
}

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
    let huge_kib = tiexec::internal::plan::huge_page() >> 10;
    (mem_kib / huge_kib.max(1) / 20).clamp(16, 256)
}

/// The command line.
struct Args {
    pages: Option<u64>,
    dir: Option<PathBuf>,
    persist: bool,
    remove: bool,
    root: PathBuf,
}

fn parse(argv: impl Iterator<Item = OsString>) -> Result<Option<Args>, String> {
    use lexopt::Arg::{Long, Short};
    let mut args = Args {
        pages: None,
        dir: None,
        persist: false,
        remove: false,
        root: PathBuf::from("/"),
    };
    let mut parser = lexopt::Parser::from_args(argv);
    while let Some(arg) = parser.next().map_err(|e| e.to_string())? {
        match arg {
            Long("help") | Short('h') => {
                print!("{USAGE}");
                return Ok(None);
            }
            Long("pages") => {
                let v = parser.value().map_err(|e| e.to_string())?;
                args.pages = Some(
                    v.to_str()
                        .and_then(|s| s.parse().ok())
                        .filter(|&n| n > 0)
                        .ok_or("--pages needs a positive number")?,
                );
            }
            Long("cache-dir") => {
                let v = PathBuf::from(parser.value().map_err(|e| e.to_string())?);
                if !v.is_absolute() {
                    return Err("--cache-dir needs an absolute path".into());
                }
                args.dir = Some(v);
            }
            Long("root") => {
                let v = PathBuf::from(parser.value().map_err(|e| e.to_string())?);
                if !v.is_absolute() {
                    return Err("--root needs an absolute path".into());
                }
                args.root = v;
            }
            Long("persist") => args.persist = true,
            Long("remove") => args.remove = true,
            other => return Err(other.unexpected().to_string()),
        }
    }
    if args.remove && (args.persist || args.pages.is_some()) {
        return Err("--remove takes no --pages or --persist".into());
    }
    Ok(Some(args))
}

/// Runs `tiexec --setup`.
pub fn main(argv: impl Iterator<Item = OsString>) -> ExitCode {
    let args = match parse(argv) {
        Ok(Some(a)) => a,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => return usage_error(&e),
    };
    if tiexec::internal::sys::effective_uid() != 0 {
        eprintln!(
            "tiexec --setup: needs root (it sizes the hugetlb pool, mounts a filesystem and writes system files)"
        );
        return ExitCode::from(1);
    }
    let files = Files::under(&args.root);
    let result = if args.remove {
        remove(&args, &files)
    } else {
        setup(&args, &files)
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tiexec --setup: {e}");
            ExitCode::from(1)
        }
    }
}

fn c_path(p: &Path) -> Result<CString, String> {
    CString::new(p.as_os_str().as_encoded_bytes()).map_err(|_| format!("{}: bad path", p.display()))
}

fn read_record(files: &Files) -> Option<Record> {
    Record::parse(&std::fs::read_to_string(&files.record).ok()?)
}

/// Writes `content` to `path` (a new file renamed over it: never half a
/// file, never through a symlink), with `mode`; parents made 0755.
fn write_file(path: &Path, content: &[u8], mode: u32) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    let parent = path.parent().ok_or("no parent directory")?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(parent)
        .map_err(|e| format!("{}: {e}", parent.display()))?;
    if std::fs::read(path).is_ok_and(|old| old == content) {
        return Ok(());
    }
    let tmp = parent.join(format!(".tiexec-setup.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .and_then(|mut f| f.write_all(content).and_then(|()| f.sync_all()))
        .and_then(|()| std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)))
        .and_then(|()| std::fs::rename(&tmp, path));
    written.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("{}: {e}", path.display())
    })
}

fn setup(args: &Args, files: &Files) -> Result<(), String> {
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_ROOT));
    let huge = tiexec::internal::pagesize::huge_page_name();
    let huge_mib = tiexec::internal::plan::huge_page() >> 20;
    let previous = read_record(files).filter(|r| r.mount.as_deref() == Some(dir.as_path()));

    // 1. The mount (reused when there).
    let pages;
    // A setup again over the same mount keeps the first one's record: what
    // it added stays what --remove gives back.
    let record = if tiexec::internal::cache::is_hugetlbfs(&dir) {
        let (total, free) = tiexec::internal::cache::hugetlbfs_pages(&dir).unwrap_or((0, 0));
        pages = total;
        println!(
            "tiexec: the image cache is already mounted at {}: {total} pages of {huge}, {free} free",
            dir.display()
        );
        if args.pages.is_some_and(|p| p != total) {
            println!(
                "  (to give it another size: tiexec --setup --remove once no process maps its images, then tiexec --setup again)"
            );
        }
        previous.unwrap_or(Record {
            mount: Some(dir.clone()),
            pages: total,
            pool_added: 0,
            mounted: false,
        })
    } else {
        pages = args.pages.unwrap_or_else(default_pages);
        let added = mount_cache(&dir, pages)?;
        println!(
            "tiexec: image cache mounted at {} with {pages} pages of {huge}",
            dir.display()
        );
        Record {
            mount: Some(dir.clone()),
            pages,
            pool_added: added,
            mounted: true,
        }
    };
    write_file(&files.record, record.render().as_bytes(), 0o644)?;
    println!(
        "  reserved: {} MiB of memory, for the cache only (the pool grew by {} pages; tiexec --setup --remove gives them back)",
        pages * huge_mib,
        record.pool_added
    );
    if dir != Path::new(DEFAULT_ROOT) {
        println!("  programs find it with TIEXEC_CACHE={}", dir.display());
    }

    // 2. The library, for LD_PRELOAD by hand and for services.
    let library = crate::embedded::full_library()?;
    if library.is_empty() {
        return Err("this tiexec was built without its library".into());
    }
    write_file(&files.library, &library, 0o755)?;
    println!(
        "  library for LD_PRELOAD: {} (tiexec --print-library)",
        files.library.display()
    );

    // 3. At every boot.
    if args.persist {
        let exe = std::env::current_exe()
            .and_then(std::fs::canonicalize)
            .map_err(|e| format!("cannot name this binary for the unit: {e}"))?;
        let unit = unit_text(&exe, &dir, pages, &args.root);
        write_file(&files.unit, unit.as_bytes(), 0o644)?;
        enable(files)?;
        println!(
            "  at every boot: {} (enabled; runs {} --setup --pages {pages} --cache-dir {})",
            files.unit.display(),
            exe.display(),
            dir.display()
        );
    } else {
        println!("  after a reboot the cache is gone: tiexec --setup --persist keeps it");
    }
    Ok(())
}

/// Grows the pool by what `pages` lack and mounts the cache; returns the
/// pages added to the pool.
fn mount_cache(dir: &Path, pages: u64) -> Result<u64, String> {
    let pool = discover::hugetlb_pool();
    let mut added = 0;
    if pool.available() < pages {
        let want = pool.total + (pages - pool.available());
        std::fs::write(pool_file(), format!("{want}\n"))
            .map_err(|e| format!("cannot grow the hugetlb pool to {want} pages: {e}"))?;
        let now = discover::hugetlb_pool();
        if now.available() < pages {
            let _ = std::fs::write(pool_file(), format!("{}\n", pool.total));
            return Err(format!(
                "the hugetlb pool reached {} pages, {} free: not enough for {pages} (memory too fragmented? try fewer --pages, or right after boot)",
                now.total,
                now.available()
            ));
        }
        added = now.total - pool.total;
    }
    let give_back = |why: String| {
        if added > 0 {
            let _ = std::fs::write(pool_file(), format!("{}\n", pool.total));
        }
        why
    };
    std::fs::create_dir_all(dir).map_err(|e| give_back(format!("{}: {e}", dir.display())))?;
    let target = c_path(dir)?;
    let data = CString::new(mount_options(pages)).map_err(|_| "bad mount options".to_string())?;
    tiexec::internal::sys::mount_hugetlbfs(&target, &data).map_err(|e| {
        give_back(format!(
            "mounting hugetlbfs at {} failed: {e}",
            dir.display()
        ))
    })?;
    Ok(added)
}

fn mount_options(pages: u64) -> String {
    let huge_mib = tiexec::internal::plan::huge_page() >> 20;
    format!(
        "pagesize={huge_mib}M,size={mib}M,min_size={mib}M,mode=1777",
        mib = pages * huge_mib
    )
}

/// The boot-time unit: the same setup, after the local filesystems and the
/// sysctl settings (a pool some other program's sysctl sizes is grown, not
/// replaced), before the services that may use the cache.
fn unit_text(exe: &Path, dir: &Path, pages: u64, root: &Path) -> String {
    // Files written under another root stay under it at boot too.
    let root = if root == Path::new("/") {
        String::new()
    } else {
        format!(" --root {}", unit_word(root))
    };
    format!(
        "{MARK}\n\
         [Unit]\n\
         Description=tiexec image cache: hugetlb pages reserved for shared program text\n\
         After=local-fs.target systemd-sysctl.service\n\
         Before=multi-user.target\n\
         \n\
         [Service]\n\
         Type=oneshot\n\
         RemainAfterExit=yes\n\
         ExecStart={exe} --setup --pages {pages} --cache-dir {dir}{root}\n\
         \n\
         [Install]\n\
         WantedBy=multi-user.target\n",
        exe = unit_word(exe),
        dir = unit_word(dir)
    )
}

/// One word of an `ExecStart=` line: systemd splits the line at white
/// space, so a path holding any is quoted (and its quotes and backslashes
/// escaped) to reach the program whole; `%` (a specifier) and `$` (a
/// variable) are doubled wherever they appear.
fn unit_word(path: &Path) -> String {
    let text = path
        .display()
        .to_string()
        .replace('%', "%%")
        .replace('$', "$$");
    if !text.contains(|c: char| c.is_whitespace() || c == '"' || c == '\\' || c == '\'') {
        return text;
    }
    let mut quoted = String::from("\"");
    for c in text.chars() {
        if matches!(c, '"' | '\\') {
            quoted.push('\\');
        }
        quoted.push(c);
    }
    quoted.push('"');
    quoted
}

/// Enables the unit (the link `systemctl enable` makes), and tells a
/// running systemd about it.
fn enable(files: &Files) -> Result<(), String> {
    let target = Path::new("..").join(UNIT_NAME);
    if std::fs::read_link(&files.wants).ok().as_deref() != Some(target.as_path()) {
        if let Some(parent) = files.wants.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        }
        let _ = std::fs::remove_file(&files.wants);
        std::os::unix::fs::symlink(&target, &files.wants)
            .map_err(|e| format!("{}: {e}", files.wants.display()))?;
    }
    reload_systemd(files);
    Ok(())
}

/// `systemctl daemon-reload` when the files are the running system's.
fn reload_systemd(files: &Files) {
    let system = files.unit.starts_with("/etc/systemd/system");
    if system && Path::new("/run/systemd/system").is_dir() {
        let _ = std::process::Command::new("systemctl")
            .arg("daemon-reload")
            .status();
    }
}

/// Deletes `path` if tiexec wrote it (it carries the mark, or is the
/// library, which cannot).
fn remove_ours(path: &Path, what: &str) -> Option<String> {
    let ours = match std::fs::read(path) {
        Ok(bytes) => what == "library" || bytes.starts_with(MARK.as_bytes()),
        Err(_) => return None,
    };
    if !ours {
        return Some(format!(
            "{} was not written by tiexec: left alone",
            path.display()
        ));
    }
    Some(match std::fs::remove_file(path) {
        Ok(()) => {
            // Its directory too, when that is now empty and tiexec's.
            if let Some(parent) = path.parent().filter(|p| p.ends_with("tiexec")) {
                let _ = std::fs::remove_dir(parent);
            }
            format!("removed {}", path.display())
        }
        Err(e) => format!("{}: {e}", path.display()),
    })
}

fn remove(args: &Args, files: &Files) -> Result<(), String> {
    let record = read_record(files);
    let dir = args
        .dir
        .clone()
        .or_else(|| record.as_ref().and_then(|r| r.mount.clone()))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_ROOT));
    // 1. Boot-time setup.
    for (path, what) in [(&files.unit, "unit")] {
        if let Some(said) = remove_ours(path, what) {
            println!("tiexec: {said}");
        }
    }
    if std::fs::read_link(&files.wants).is_ok() {
        let _ = std::fs::remove_file(&files.wants);
        let _ = files.wants.parent().map(std::fs::remove_dir);
    }
    reload_systemd(files);
    // 2. The mount.
    let mut unmounted = false;
    if tiexec::internal::cache::is_hugetlbfs(&dir) {
        let target = c_path(&dir)?;
        match tiexec::internal::sys::unmount(&target, false) {
            Ok(()) => println!("tiexec: unmounted {}", dir.display()),
            Err(tiexec::internal::sys::Errno(libc::EBUSY)) => {
                tiexec::internal::sys::unmount(&target, true)
                    .map_err(|e| format!("unmounting {}: {e}", dir.display()))?;
                println!(
                    "tiexec: detached {} (processes still map its images: its pages return to the pool when they exit)",
                    dir.display()
                );
            }
            Err(e) => return Err(format!("unmounting {}: {e}", dir.display())),
        }
        unmounted = true;
        if record.as_ref().is_some_and(|r| r.mounted) {
            let _ = std::fs::remove_dir(&dir);
        }
    }
    // 3. The pool: exactly what the setup added.
    match &record {
        Some(r) if r.pool_added > 0 && unmounted => {
            let pool = discover::hugetlb_pool();
            let want = pool.total.saturating_sub(r.pool_added);
            std::fs::write(pool_file(), format!("{want}\n"))
                .map_err(|e| format!("cannot shrink the hugetlb pool to {want} pages: {e}"))?;
            println!(
                "tiexec: hugetlb pool {} -> {} pages (the {} the setup added)",
                pool.total,
                discover::hugetlb_pool().total,
                r.pool_added
            );
        }
        Some(_) => {}
        None => println!(
            "tiexec: no record of a setup ({}): the hugetlb pool is left as it is",
            files.record.display()
        ),
    }
    // 4. The library and the record.
    for (path, what) in [(&files.library, "library"), (&files.record, "record")] {
        if let Some(said) = remove_ours(path, what) {
            println!("tiexec: {said}");
        }
    }
    Ok(())
}

fn usage_error(msg: &str) -> ExitCode {
    eprintln!("tiexec --setup: {msg}\nTry 'tiexec --setup --help'.");
    ExitCode::from(2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_reads_back_what_was_written() {
        let r = Record {
            mount: Some(PathBuf::from("/run/tiexec")),
            pages: 256,
            pool_added: 200,
            mounted: true,
        };
        assert_eq!(Record::parse(&r.render()), Some(r));
        assert_eq!(Record::parse("mount /etc\npool_added 9\n"), None);
    }

    #[test]
    fn the_unit_runs_the_same_setup_after_sysctl() {
        let u = unit_text(
            Path::new("/usr/local/bin/tiexec"),
            Path::new("/run/tiexec"),
            64,
            Path::new("/"),
        );
        assert!(u.starts_with(MARK));
        assert!(u.contains("After=local-fs.target systemd-sysctl.service"));
        assert!(u.contains(
            "ExecStart=/usr/local/bin/tiexec --setup --pages 64 --cache-dir /run/tiexec\n"
        ));
        assert!(u.contains("WantedBy=multi-user.target"));
    }

    #[test]
    fn the_unit_keeps_another_root_and_odd_paths_whole() {
        let u = unit_text(
            Path::new("/opt/my tools/tiexec"),
            Path::new("/run/tiexec"),
            8,
            Path::new("/srv/image root"),
        );
        assert!(u.contains(
            "ExecStart=\"/opt/my tools/tiexec\" --setup --pages 8 --cache-dir /run/tiexec \
             --root \"/srv/image root\"\n"
        ));
        let u = unit_text(
            Path::new("/opt/100%/tiexec"),
            Path::new("/run/$x"),
            8,
            Path::new("/"),
        );
        assert!(u.contains("ExecStart=/opt/100%%/tiexec --setup --pages 8 --cache-dir /run/$$x\n"));
    }
}
