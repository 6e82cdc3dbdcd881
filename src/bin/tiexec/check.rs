//! `tiexec --check [PROGRAM]`: is this machine ready, and what would tiexec
//! do with PROGRAM?
//!
//! The machine: kernel, THP, the hugetlb pool per NUMA node, the image
//! cache, what the kernel supports. PROGRAM: how it is linked, how each
//! object's text is aligned and cached in its file, and the forecast: the
//! library's own selection, planner and policy (the very code of a run),
//! applied in PROGRAM as the loader maps it. For that, PROGRAM is started
//! with tiexec preloaded and stopped by tiexec's constructor where a run
//! would move its text (see `tiexec::internal::forecast`): the libraries initialized
//! before the preload have run their initializers, as in any run; PROGRAM's
//! own initializers and `main` never run.
//!
//! First everything is computed (`Check`), then rendered as text or JSON.
//! Effects: the files read enter the page cache; the forecast faults in the
//! congruent text of PROGRAM's objects as a run would. Written: a temporary
//! file with no name (`O_TMPFILE`, the kernel probe) and the forecast, in a
//! directory made new for it (0700) and removed after.
//! Exit status 0 when ready, 1 when not.

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::ExitCode;

use tiexec::internal::config::{self, CachePath};
use tiexec::internal::discover::{self, ThpMode};
use tiexec::internal::json::Json;
use tiexec::internal::log::Bytes;
use tiexec::internal::plan::{self, huge_page, Range};
use tiexec::internal::prime::{self, State};

const USAGE: &str = "\
Usage: tiexec --check [--json] [OPTIONS] [PROGRAM]

Says whether this machine is ready for tiexec: kernel, transparent huge
pages, the hugetlb pool (per NUMA node), the image cache, and what the
kernel supports. With PROGRAM: whether it is dynamic, PIE, setuid; how the
text of the program and of its libraries is aligned and cached; and what a
run would do, object by object: the ranges it would move and from where,
what it would leave on 4 KiB pages and why, and what `tiexec --setup` would
change. That forecast is made by tiexec's own code in PROGRAM as the
loader maps it: PROGRAM is started with tiexec preloaded and stopped where
a run would move its text, before its own initializers and main (libraries
loaded before tiexec run their initializers, as in any run). TIEXEC_*
variables apply as they would to a run.

  --json   one JSON document on stdout
  OPTIONS  those of a run (--cache-dir DIR, --backend NAME, --state-dir
           DIR, ...), anywhere on the line: the check sees what a run with
           them would

Exit status: 0 when tiexec can put PROGRAM's text (or, without PROGRAM,
anything) on 2 MiB pages; 1 when it cannot; 2 for a usage error; 127
when PROGRAM is not found, 126 when it cannot be executed, as for a run.
";

/// How long a forecast may take (the loader maps and relocates PROGRAM's
/// libraries; a few hundred MiB of text take well under a second).
const FORECAST_TIMEOUT: Duration = Duration::from_secs(60);

struct NodePool {
    node: String,
    total: u64,
    free: u64,
    surplus: u64,
}

/// The image cache, as this user would find it.
enum CacheState {
    /// Set up and usable: its mount, pages in all, free, this user's
    /// images, whether its mount reserves its pages (`min_size`), and
    /// whether its size is this process's hugetlb cgroup limit (a mount
    /// without `size=`, as Kubernetes gives a pod).
    Ready {
        root: PathBuf,
        pages: u64,
        free: u64,
        images: usize,
        reserved: bool,
        by_cgroup: bool,
    },
    /// Not usable (not set up, or not safe): why.
    Unusable { root: PathBuf, why: String },
    /// Turned off by the settings.
    Off,
}

struct Machine {
    kernel: String,
    page_sizes: tiexec::internal::pagesize::PageSizes,
    thp: ThpMode,
    thp_text: String,
    defrag: String,
    pool: discover::Pool,
    nodes: Vec<NodePool>,
    pagemap_scan: bool,
    file_collapse: Result<(), String>,
    cache: CacheState,
}

/// One object of the program, as its file says.
struct ObjectFacts {
    path: PathBuf,
    segments: Vec<SegmentFacts>,
}

struct SegmentFacts {
    file: Range,
    bytes: u64,
    align: u64,
    congruent: bool,
    /// Whole 2 MiB pages inside it (loaded at a 2 MiB-aligned base).
    whole_pages: u64,
    cache: Option<State>,
    /// Of its whole 2 MiB pages in the file: bytes cached as 2 MiB folios,
    /// and all of them.
    cached_huge: Option<(u64, u64)>,
}

impl SegmentFacts {
    /// The page cache's state of it, in words.
    fn cache_words(&self) -> String {
        match (self.cache, self.cached_huge) {
            (Some(State::Small), Some((huge, all))) => format!(
                "{} of {} cached as {} folios (the rest small: in use, or never read huge)",
                Bytes(huge),
                Bytes(all),
                tiexec::internal::pagesize::huge_page_name()
            ),
            (Some(state), _) => state.describe().to_string(),
            (None, _) => "unknown".to_string(),
        }
    }
}

/// The forecast, as the library wrote it.
enum Forecast {
    /// Made: the library's output (JSON or text), and whether every planned
    /// range would be on 2 MiB pages.
    Made { output: String, all_huge: bool },
    /// Not made, and why (static, setuid, not glibc's loader, ...).
    NotMade(String),
}

struct ProgramCheck {
    path: PathBuf,
    linkage: crate::path::Linkage,
    pie: bool,
    setuid: bool,
    objects: Vec<ObjectFacts>,
    forecast: Forecast,
}

struct Check {
    machine: Machine,
    program: Option<ProgramCheck>,
}

impl Check {
    fn ready(&self) -> bool {
        let m = &self.machine;
        let can_copy = m.thp != ThpMode::Never || matches!(m.cache, CacheState::Ready { .. });
        match &self.program {
            None => can_copy || m.pool.available() > 0,
            Some(p) => match &p.forecast {
                Forecast::Made { all_huge, .. } => *all_huge,
                // Nothing can copy for it: the page cache must serve its
                // text, every whole 2 MiB page of it.
                Forecast::NotMade(_) => p.objects.iter().flat_map(|o| &o.segments).all(|s| {
                    s.whole_pages == 0 || matches!(s.cache, Some(State::Huge | State::Primed))
                }),
            },
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

fn cache_state() -> CacheState {
    use std::os::unix::ffi::OsStrExt;
    // The settings as a run reads them.
    let env = config::EnvSnapshot::take();
    let root = match env.parse().config.cache {
        CachePath::Off => return CacheState::Off,
        CachePath::At(p) => PathBuf::from(std::ffi::OsStr::from_bytes(p)),
        CachePath::Default => PathBuf::from(tiexec::internal::cache::DEFAULT_ROOT),
    };
    match tiexec::internal::cache::Cache::open(&root) {
        Ok(c) => {
            let (pages, free) = c.pages();
            CacheState::Ready {
                reserved: mount_has_option(&root, "min_size="),
                by_cgroup: !mount_has_option(&root, "size="),
                root,
                pages,
                free,
                images: c.entries().len(),
            }
        }
        Err(e) => CacheState::Unusable {
            root,
            why: e.to_string(),
        },
    }
}

/// Whether the hugetlbfs mounted at `root` has an option starting with
/// `option` (`min_size=`: it reserves its pages, as `tiexec --setup` mounts
/// it; `size=`: it has a size of its own).
fn mount_has_option(root: &Path, option: &str) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        let (_, at, kind, options) = (f.next(), f.next(), f.next(), f.next().unwrap_or(""));
        at.is_some_and(|a| Path::new(a) == root)
            && kind == Some("hugetlbfs")
            && options.split(',').any(|o| o.starts_with(option))
    })
}

fn machine() -> Machine {
    let mut nodes = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/sys/devices/system/node") {
        let mut names: Vec<String> = dir
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .filter(|n| {
                n.strip_prefix("node")
                    .is_some_and(|d| !d.is_empty() && d.chars().all(|c| c.is_ascii_digit()))
            })
            .collect();
        names.sort();
        for n in names {
            let d = format!(
                "/sys/devices/system/node/{n}/hugepages/hugepages-{}kB",
                plan::huge_page() >> 10
            );
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
        page_sizes: tiexec::internal::pagesize::PageSizes::read(),
        thp: discover::parse_thp_mode(thp_text.as_bytes()),
        defrag: selected(&read_trim("/sys/kernel/mm/transparent_hugepage/defrag")),
        thp_text: selected(&thp_text),
        pool: discover::hugetlb_pool(),
        nodes,
        pagemap_scan: tiexec::internal::sys::huge_mapped_ranges(0x1000, 0x2000).is_ok(),
        file_collapse: discover::probe_file_collapse(&std::env::temp_dir()),
        cache: cache_state(),
    }
}

fn object_facts(path: &Path) -> Option<ObjectFacts> {
    let file = std::fs::File::open(path).ok()?;
    let phdrs = tiexec::internal::elf::read_program_headers(&file)?;
    let cache = prime::prime_file(path, false).ok();
    let e_type = tiexec::internal::elf::read_type(&file)?;
    let congruence = prime::text_file_ranges(e_type, &phdrs);
    let segments = phdrs
        .iter()
        .filter(|p| {
            p.p_type == goblin::elf::program_header::PT_LOAD
                && p.p_flags & goblin::elf::program_header::PF_X != 0
        })
        .enumerate()
        .map(|(i, p)| SegmentFacts {
            file: Range::new(p.p_offset, p.p_offset + p.p_filesz),
            bytes: p.p_memsz,
            align: p.p_align,
            congruent: congruence.get(i).is_some_and(|(_, c)| *c),
            whole_pages: plan::split(plan::segment_pages(p.p_vaddr, p.p_memsz))
                .body
                .len()
                / huge_page(),
            cache: cache.as_ref().and_then(|c| c.get(i)).map(|s| s.state),
            cached_huge: cache
                .as_ref()
                .and_then(|c| c.get(i))
                .map(|s| (s.huge_bytes, s.body.len())),
        })
        .collect();
    Some(ObjectFacts {
        path: path.to_path_buf(),
        segments,
    })
}

/// A directory of this process's own for the forecast's output: created
/// new (mkdir fails on anything already there, symlinks included), 0700.
struct PrivateDir(PathBuf);

impl PrivateDir {
    fn new() -> std::io::Result<PrivateDir> {
        use std::os::unix::fs::DirBuilderExt;
        let base = std::env::temp_dir();
        let mut last = None;
        for attempt in 0..16u32 {
            let nonce = tiexec::internal::sys::monotonic_ns() ^ u64::from(attempt).rotate_left(40);
            let path = base.join(format!("tiexec-check-{}-{nonce:x}", std::process::id()));
            match std::fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => return Ok(PrivateDir(path)),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| std::io::Error::other("no directory")))
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Starts `path` for the forecast (see the module comment) and returns what
/// the library wrote.
fn forecast(path: &Path, dynamic: bool, setuid: bool, json: bool, m: &Machine) -> Forecast {
    if !dynamic {
        return Forecast::NotMade(
            "not dynamically linked: no preload reaches it, no forecast".into(),
        );
    }
    if setuid {
        return Forecast::NotMade(
            "setuid/setgid: the loader ignores LD_PRELOAD for it, no forecast".into(),
        );
    }
    // Only glibc's loader is sure to load the (glibc) library, or to stop:
    // a preload it cannot load, another loader might ignore, and the
    // program would run.
    let interpreter = std::fs::File::open(path).ok().and_then(|f| {
        let phdrs = tiexec::internal::elf::read_program_headers(&f)?;
        tiexec::internal::elf::interpreter(&f, &phdrs)
    });
    let glibc = interpreter.as_ref().is_some_and(|i| {
        i.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("ld-linux"))
    });
    if !glibc {
        return Forecast::NotMade(format!(
            "its loader ({}) is not glibc's: no forecast",
            interpreter.map_or("none".into(), |i| i.display().to_string())
        ));
    }
    let libs = match crate::embedded::libraries() {
        Ok(l) => l,
        Err(e) => return Forecast::NotMade(format!("the library: {e}")),
    };
    let dir = match PrivateDir::new() {
        Ok(d) => d,
        Err(e) => return Forecast::NotMade(format!("a private directory: {e}")),
    };
    let out = dir.0.join("forecast");
    let mut cmd = Command::new(path);
    cmd.env("LD_PRELOAD", &libs.full)
        .env_remove("TIEXEC_LIB")
        .env(tiexec::internal::forecast::VAR, &out)
        .env(
            tiexec::internal::forecast::FORMAT_VAR,
            if json { "json" } else { "text" },
        )
        .env(
            tiexec::internal::forecast::IN_PLACE_VAR,
            if m.file_collapse.is_ok() { "1" } else { "0" },
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return Forecast::NotMade(format!("cannot start it: {e}")),
    };
    let Some(output) = wait_with_timeout(child, FORECAST_TIMEOUT) else {
        return Forecast::NotMade("it did not stop in time: killed".into());
    };
    let status = output.status;
    let written = std::fs::read_to_string(&out).unwrap_or_default();
    match status.code() {
        Some(code)
            if (code == tiexec::internal::forecast::ALL_HUGE
                || code == tiexec::internal::forecast::SOME_LEFT)
                && !written.is_empty() =>
        {
            Forecast::Made {
                output: written,
                all_huge: code == tiexec::internal::forecast::ALL_HUGE,
            }
        }
        _ => Forecast::NotMade(format!(
            "the forecast failed ({}): {}",
            status.code().map_or_else(
                || format!("signal {:?}", status.signal()),
                |c| format!("status {c}")
            ),
            String::from_utf8_lossy(&output.stderr).trim()
        )),
    }
}

/// Waits for `child`, killing it after `timeout`.
fn wait_with_timeout(
    mut child: std::process::Child,
    timeout: Duration,
) -> Option<std::process::Output> {
    let started = std::time::Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) => return child.wait_with_output().ok(),
            Ok(None) if started.elapsed() < timeout => std::thread::sleep(Duration::from_millis(5)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

fn program_check(program: &OsString, json: bool, m: &Machine) -> Result<ProgramCheck, String> {
    let path = crate::path::resolve(program)
        .ok_or_else(|| format!("{}: not found or not executable", program.to_string_lossy()))?;
    let linkage = crate::path::linkage(&path);
    let dynamic = linkage == crate::path::Linkage::Dynamic;
    let setuid = std::fs::metadata(&path).is_ok_and(|md| md.permissions().mode() & 0o6000 != 0);
    let pie = std::fs::File::open(&path)
        .ok()
        .and_then(|f| tiexec::internal::elf::read_type(&f))
        == Some(goblin::elf::header::ET_DYN);
    let mut objects: Vec<ObjectFacts> = object_facts(&path).into_iter().collect();
    if dynamic {
        objects.extend(
            crate::libs::read_object(&path)
                .map(|p| crate::libs::startup_libraries(&p))
                .unwrap_or_default()
                .iter()
                .filter(|l| l.file_size >= 2 << 20)
                .filter_map(|l| object_facts(&l.path)),
        );
    }
    let forecast = forecast(&path, dynamic, setuid, json, m);
    Ok(ProgramCheck {
        path,
        linkage,
        pie,
        setuid,
        objects,
        forecast,
    })
}

/// Runs `tiexec --check`.
pub fn main(argv: impl Iterator<Item = OsString>) -> ExitCode {
    use lexopt::Arg::{Long, Short, Value};
    use std::os::unix::ffi::OsStrExt;
    let mut json = false;
    let mut program: Option<OsString> = None;
    let usage = |msg: &str| {
        eprintln!("tiexec --check: {msg}\nTry 'tiexec --check --help'.");
        ExitCode::from(2)
    };
    let mut parser = lexopt::Parser::from_args(argv);
    loop {
        let arg = match parser.next() {
            Ok(Some(a)) => a,
            Ok(None) => break,
            Err(e) => return usage(&e.to_string()),
        };
        // The settings a run takes (`--cache-dir DIR`, `-b NAME`, ...), in
        // any order around PROGRAM: they apply to the check as to a run.
        let setting = match &arg {
            Long(name) => config::setting_for_flag(Some(name), None),
            Short(c) => config::setting_for_flag(None, Some(*c)),
            Value(_) => None,
        };
        if let Some((s, flag)) = setting.and_then(|s| Some((s, s.flag?))) {
            let value = match flag.switch {
                Some(v) => OsString::from(v),
                None => match parser.value() {
                    Ok(v) => v,
                    Err(e) => return usage(&e.to_string()),
                },
            };
            if let Err(expected) = config::check_value(s, value.as_bytes()) {
                return usage(&format!(
                    "--{} {}: expected {expected}",
                    flag.long,
                    value.to_string_lossy()
                ));
            }
            // One thread: nothing else reads the environment meanwhile.
            std::env::set_var(s.var, &value);
            continue;
        }
        match arg {
            Short('h') | Long("help") => {
                print!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            Long("json") => json = true,
            Value(p) if program.is_none() => program = Some(p),
            Value(_) => return usage("one PROGRAM at most"),
            other => return usage(&other.unexpected().to_string()),
        }
    }
    if let Some(p) = &program {
        // As a run would: 127 when PROGRAM is not found, 126 when it cannot
        // be executed.
        match crate::path::find(p) {
            crate::path::Lookup::Found(_) => {}
            crate::path::Lookup::NotFound => {
                eprintln!("tiexec --check: {}: command not found", p.to_string_lossy());
                return ExitCode::from(127);
            }
            crate::path::Lookup::NotExecutable(at) => {
                eprintln!("tiexec --check: {}: Permission denied", at.display());
                return ExitCode::from(126);
            }
        }
    }
    let machine = machine();
    let program = match program
        .map(|p| program_check(&p, json, &machine))
        .transpose()
    {
        Ok(p) => p,
        Err(e) => {
            eprintln!("tiexec --check: {e}");
            return ExitCode::from(1);
        }
    };
    let check = Check { machine, program };
    if json {
        println!("{}", to_json(&check));
    } else {
        print!("{}", render(&check));
    }
    if check.ready() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn to_json(c: &Check) -> String {
    let m = &c.machine;
    let mut j = Json::new();
    j.begin_object(None);
    j.begin_object(Some("machine"))
        .str("kernel", &m.kernel)
        .begin_object(Some("page_sizes"))
        .uint("base", m.page_sizes.base)
        .uint("thp", m.page_sizes.thp.unwrap_or(0))
        .begin_array(Some("hugetlb"));
    for size in m.page_sizes.hugetlb() {
        j.uint_value(size);
    }
    j.end_array()
        .bool("supported", m.page_sizes.geometry().is_ok())
        .end_object();
    j.str("thp_enabled", &m.thp_text)
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
    j.end_array().end_object();
    j.begin_object(Some("cache"));
    match &m.cache {
        CacheState::Ready {
            root,
            pages,
            free,
            images,
            reserved,
            by_cgroup,
        } => {
            j.bool("usable", true)
                .str("root", &root.to_string_lossy())
                .uint("pages", *pages)
                .uint("free_pages", *free)
                .uint("images", *images as u64)
                .bool("pages_reserved", *reserved)
                .bool("bounded_by_cgroup", *by_cgroup);
        }
        CacheState::Unusable { root, why } => {
            j.bool("usable", false)
                .str("root", &root.to_string_lossy())
                .str("why", why);
        }
        CacheState::Off => {
            j.bool("usable", false).str("why", "off (TIEXEC_CACHE=off)");
        }
    }
    j.end_object()
        .bool("pagemap_scan", m.pagemap_scan)
        .bool("file_collapse_in_place", m.file_collapse.is_ok())
        .end_object();
    if let Some(p) = &c.program {
        j.begin_object(Some("program"))
            .str("path", &p.path.to_string_lossy())
            .bool("dynamic", p.linkage == crate::path::Linkage::Dynamic)
            .bool("pie", p.pie)
            .bool("setuid", p.setuid)
            .begin_array(Some("objects"));
        for o in &p.objects {
            j.begin_object(None)
                .str("path", &o.path.to_string_lossy())
                .begin_array(Some("text_segments"));
            for s in &o.segments {
                j.begin_object(None)
                    .uint("file_offset", s.file.start)
                    .uint("bytes", s.bytes)
                    .uint("p_align", s.align)
                    .bool("congruent", s.congruent)
                    .uint("whole_huge_pages", s.whole_pages)
                    .str("page_cache", &s.cache_words())
                    .end_object();
            }
            j.end_array().end_object();
        }
        j.end_array();
        match &p.forecast {
            Forecast::Made { output, .. } => {
                j.raw("forecast", output).null("no_forecast");
            }
            Forecast::NotMade(why) => {
                j.null("forecast").str("no_forecast", why);
            }
        }
        j.end_object();
    }
    j.bool("ready", c.ready()).end_object();
    j.finish()
}

fn render(c: &Check) -> String {
    use std::fmt::Write;
    let m = &c.machine;
    let mut out = String::new();
    let _ = writeln!(out, "machine");
    let _ = writeln!(out, "  kernel {}", m.kernel);
    let ps = &m.page_sizes;
    let hugetlb: Vec<String> = ps.hugetlb().map(|s| Bytes(s).to_string()).collect();
    let _ = writeln!(
        out,
        "  page sizes: base {}, THP {}, hugetlb {}{}",
        Bytes(ps.base),
        ps.thp.map_or("none".to_string(), |s| Bytes(s).to_string()),
        if hugetlb.is_empty() {
            "none".to_string()
        } else {
            hugetlb.join(", ")
        },
        match ps.geometry() {
            Ok(_) => String::new(),
            Err(why) => format!(": {why}"),
        }
    );
    let _ = writeln!(
        out,
        "  transparent huge pages: {} (defrag {}){}",
        m.thp_text,
        m.defrag,
        if m.thp == ThpMode::Never {
            ": no private copies on THP"
        } else {
            ""
        }
    );
    let cache_pages = match &m.cache {
        CacheState::Ready { reserved: true, .. } => "; the image cache has pages of its own",
        CacheState::Ready {
            reserved: false, ..
        } => "; the image cache takes its pages from it as it fills (its mount reserves none: no min_size)",
        _ => "",
    };
    let _ = writeln!(
        out,
        "  hugetlb pool ({}): {} pages, {} free, {} reserved: {} available \
         (tiexec takes from it only with --backend hugetlb{cache_pages})",
        tiexec::internal::pagesize::huge_page_name(),
        m.pool.total,
        m.pool.free,
        m.pool.reserved,
        m.pool.available()
    );
    for n in &m.nodes {
        let _ = writeln!(
            out,
            "    {}: {} pages, {} free, {} surplus",
            n.node, n.total, n.free, n.surplus
        );
    }
    let _ = match &m.cache {
        CacheState::Ready {
            root,
            pages,
            free,
            images,
            by_cgroup,
            ..
        } => writeln!(
            out,
            "  image cache {}: {pages} pages, {free} free, {images} image(s) of this user{}",
            root.display(),
            if *by_cgroup {
                " (its size: this process's hugetlb cgroup limit, the mount has none)"
            } else {
                ""
            }
        ),
        CacheState::Unusable { root, why } => writeln!(
            out,
            "  image cache {}: not used: {why}; `tiexec --setup` (as root, once) sets it up: \
             text shared by every process of a program, copied once per machine",
            root.display()
        ),
        CacheState::Off => writeln!(out, "  image cache: off (TIEXEC_CACHE=off)"),
    };
    let _ = writeln!(
        out,
        "  PAGEMAP_SCAN (exact huge-page checks, Linux 6.7): {}",
        if m.pagemap_scan {
            "yes"
        } else {
            "no: smaps is read instead, per mapping"
        }
    );
    let _ = writeln!(
        out,
        "  in-place collapse of file text (MADV_COLLAPSE): {}",
        match &m.file_collapse {
            Ok(()) => "yes".to_string(),
            Err(e) => format!("no, {e}: text is served by the page cache when primed, or copied"),
        }
    );
    if let Some(p) = &c.program {
        render_program(&mut out, p, matches!(m.cache, CacheState::Ready { .. }));
    } else if m.thp == ThpMode::Never && m.pool.available() == 0 {
        let _ = writeln!(
            out,
            "\nno source of huge pages: THP is 'never' and the pool is empty; \
             to reserve pages (as root): echo 64 > {}/nr_hugepages",
            discover::hugetlb_pool_dir()
        );
    }
    if c.ready() {
        let _ = writeln!(out, "\nready");
    } else {
        let _ = writeln!(out, "\nnot ready: {}", next_step(c));
    }
    out
}

/// What to do next when not ready: the first thing that would help.
fn next_step(c: &Check) -> String {
    let m = &c.machine;
    let cache_ready = matches!(m.cache, CacheState::Ready { .. });
    let Some(p) = &c.program else {
        return "no source of huge pages: sudo tiexec --setup (an image cache), or THP in 'madvise' mode".into();
    };
    match (&p.forecast, p.linkage) {
        (Forecast::NotMade(_), crate::path::Linkage::Static) => format!(
            "LD_PRELOAD cannot reach a static program: tiexec --prime {} (the page cache serves its congruent text), or link libtiexec.a",
            p.path.display()
        ),
        (Forecast::NotMade(_), _) if p.setuid => {
            "the loader ignores LD_PRELOAD for setuid programs: tiexec --prime, or link libtiexec.a"
                .into()
        }
        (Forecast::NotMade(_), _) => format!(
            "see 'no forecast' above; tiexec --prime {} serves congruent text from the page cache",
            p.path.display()
        ),
        (Forecast::Made { .. }, _) if !cache_ready => {
            "text would stay on 4 KiB pages (why: above); sudo tiexec --setup sets up the image \
             cache, which serves every run with no copy"
                .into()
        }
        (Forecast::Made { .. }, _) => {
            "text would stay on 4 KiB pages (why: above); --backend thp copies it on every run"
                .into()
        }
    }
}

fn render_program(out: &mut String, p: &ProgramCheck, cache_ready: bool) {
    use std::fmt::Write;
    let _ = writeln!(out, "\nprogram {}", p.path.display());
    let _ = writeln!(
        out,
        "  {}, {}{}",
        match p.linkage {
            crate::path::Linkage::Dynamic => "dynamically linked",
            crate::path::Linkage::Static =>
                "statically linked (LD_PRELOAD cannot reach it: tiexec --prime, or link libtiexec.a)",
            crate::path::Linkage::NotElf =>
                "not an ELF program (a script: its interpreter is what runs)",
        },
        if p.pie {
            "PIE"
        } else {
            "not PIE (fixed address)"
        },
        if p.setuid {
            ", setuid/setgid (the loader ignores LD_PRELOAD for it)"
        } else {
            ""
        }
    );
    for o in &p.objects {
        let _ = writeln!(out, "  {}", o.path.display());
        for s in &o.segments {
            let _ = writeln!(
                out,
                "    text {} at file offset {:#x}, p_align {:#x}: {}; {} whole {} page(s); page cache: {}",
                Bytes(s.bytes),
                s.file.start,
                s.align,
                if s.congruent {
                    format!(
                        "congruent (the page cache can serve {} pages)",
                        tiexec::internal::pagesize::huge_page_name()
                    )
                } else if cache_ready {
                    "not congruent: the page cache cannot map it huge, the image cache serves it"
                        .to_string()
                } else {
                    format!("not congruent (relink with {} for that)", prime::LINK_ADVICE)
                },
                s.whole_pages,
                tiexec::internal::pagesize::huge_page_name(),
                s.cache_words()
            );
        }
    }
    let _ = writeln!(out);
    match &p.forecast {
        Forecast::Made { output, .. } => out.push_str(output),
        Forecast::NotMade(why) => {
            let _ = writeln!(out, "no forecast: {why}");
            let small = p
                .objects
                .iter()
                .flat_map(|o| &o.segments)
                .any(|s| s.whole_pages > 0 && s.congruent && s.cache != Some(State::Huge));
            if small {
                let _ = writeln!(
                    out,
                    "  to serve its congruent text from the page cache: tiexec --prime {}",
                    p.path.display()
                );
            }
        }
    }
}
