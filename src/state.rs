//! What tiexec remembers for a user between processes, in the user's own
//! cache directory (`$XDG_CACHE_HOME/tiexec`, else `$HOME/.cache/tiexec`):
//!
//! - `runs/<digest of a program's path>`: its run history: how long its
//!   last processes lived, with text copied to huge pages or not, and the
//!   runs under way (see `history`, whose rule decides each process's copy);
//! - `hot/<digest>`: which parts of its text its runs touched (`hotmap`);
//! - `calibration`: how fast copies and image builds went on this machine
//!   (µs per MiB, the last few of each);
//! - `images/<image name>`: the path of the object a cache image was built
//!   from, followed by one byte per hit (`tiexec --cache` lists them);
//! - `prime/<digest>`: the files worth priming for a program (the wrapper's
//!   memo: resolving a program's libraries reads the loader's cache and
//!   every library's headers).
//!
//! The directory is used only if it is a real directory owned by this user
//! and not writable by others; files are opened without following symlinks.
//! Everything here is best effort: a failure only means less is remembered.

use std::ffi::CString;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use crate::sys::{self, Errno};

pub use crate::history::fnv1a;
use crate::history::{History, Start};
use crate::hotmap::HotMap;

/// Hit bytes appended to an image's record at most (the count saturates).
const MAX_HIT_BYTES: u64 = 1 << 20;

/// The user's tiexec state directory, checked and open.
pub struct StateDir {
    path: PathBuf,
    dir: OwnedFd,
}

fn cstring(path: &Path) -> Option<CString> {
    CString::new(path.as_os_str().as_bytes()).ok()
}

/// The state directories to try, in order (see `state_path`): the one the
/// environment names, then the shared fallback (not checked).
pub fn default_paths() -> Vec<PathBuf> {
    let vars: Vec<(&str, Vec<u8>)> = crate::state_path::SOURCES
        .iter()
        .filter_map(|(var, _)| Some((*var, std::env::var_os(var)?.into_vec())))
        .collect();
    let named = crate::state_path::from_env(|name| {
        vars.iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_slice())
    });
    let mut out = Vec::with_capacity(2);
    if let Some((base, suffix)) = named {
        let mut p = base.to_vec();
        p.extend_from_slice(suffix);
        out.push(PathBuf::from(std::ffi::OsString::from_vec(p)));
    }
    let mut digits = [0u8; 10];
    let mut shared = crate::state_path::SHARED_PREFIX.to_vec();
    shared.extend_from_slice(crate::state_path::decimal(
        sys::effective_uid(),
        &mut digits,
    ));
    out.push(PathBuf::from(std::ffi::OsString::from_vec(shared)));
    out
}

/// The state directory the environment names, if any (not checked).
pub fn default_path() -> Option<PathBuf> {
    default_paths().into_iter().next()
}

/// Opens `name` under `dir` as a directory this user owns and others cannot
/// write to, creating it (0700) when missing.
fn own_subdir(
    dir: Option<std::os::fd::BorrowedFd<'_>>,
    name: &std::ffi::CStr,
) -> Result<OwnedFd, Errno> {
    let fd = match sys::open_dir_at(dir, name) {
        Ok(fd) => fd,
        Err(Errno(libc::ENOENT)) => {
            if let Some(parent) = dir {
                match sys::mkdir_at(parent, name, 0o700) {
                    Ok(()) | Err(Errno(libc::EEXIST)) => {}
                    Err(e) => return Err(e),
                }
            } else {
                use std::os::unix::fs::DirBuilderExt;
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(std::ffi::OsStr::from_bytes(name.to_bytes()))
                    .map_err(|e| Errno(e.raw_os_error().unwrap_or(libc::EIO)))?;
            }
            sys::open_dir_at(dir, name)?
        }
        Err(e) => return Err(e),
    };
    let st = sys::fstat(fd.as_fd())?;
    if st.st_uid != sys::effective_uid() || st.st_mode & 0o022 != 0 {
        return Err(Errno(libc::EACCES));
    }
    Ok(fd)
}

impl StateDir {
    /// Opens (creating if needed) the state directory at `path`. Refused
    /// (`EPERM`) when ownership proves nothing (see
    /// `sys::identity_unmapped`): a directory "of this user" could be
    /// anyone's.
    pub fn open(path: &Path) -> Result<StateDir, Errno> {
        if sys::identity_unmapped() {
            return Err(Errno(libc::EPERM));
        }
        use std::os::unix::fs::DirBuilderExt;
        let c = cstring(path).ok_or(Errno(libc::EINVAL))?;
        if let Some(parent) = path.parent() {
            // Parents the user lacks are made private too (XDG says 0700).
            let _ = std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent);
        }
        let dir = own_subdir(None, &c)?;
        Ok(StateDir {
            path: path.to_path_buf(),
            dir,
        })
    }

    /// The first default state directory that can be used (see
    /// [`default_paths`]).
    pub fn open_default() -> Option<StateDir> {
        default_paths().iter().find_map(|p| StateDir::open(p).ok())
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn subdir(&self, name: &std::ffi::CStr) -> Result<OwnedFd, Errno> {
        own_subdir(Some(self.dir.as_fd()), name)
    }

    /// The record `name` in subdirectory `sub` (at most `max` bytes), if
    /// any.
    fn read_record_max(&self, sub: &std::ffi::CStr, name: &str, max: usize) -> Option<Vec<u8>> {
        let dir = self.subdir(sub).ok()?;
        let name = CString::new(name).ok()?;
        let fd = sys::open_at(
            Some(dir.as_fd()),
            &name,
            libc::O_RDONLY | libc::O_NOFOLLOW,
            0,
        )
        .ok()?;
        // The buffer as large as the record, not as `max` (a hot map may be
        // 4 MiB at most, and is a few hundred bytes): what is appended
        // after the size was taken is read next time.
        let size = sys::fstat(fd.as_fd()).ok()?.st_size;
        let len = usize::try_from(size).map_or(max, |n| n.min(max));
        let mut buf = vec![0u8; len];
        let n = sys::pread_full(fd.as_fd(), &mut buf, 0).ok()?;
        buf.truncate(n);
        Some(buf)
    }

    /// The record `name` in subdirectory `sub` (at most 64 KiB), if any.
    pub fn read_record(&self, sub: &std::ffi::CStr, name: &str) -> Option<Vec<u8>> {
        self.read_record_max(sub, name, 64 << 10)
    }

    /// Replaces the record `name` in subdirectory `sub` with `bytes`:
    /// written under a unique name, then renamed over it, so that readers
    /// never see half a record. Concurrent writers may lose each other's
    /// record; never more.
    pub fn write_record(
        &self,
        sub: &std::ffi::CStr,
        name: &str,
        bytes: &[u8],
    ) -> Result<(), Errno> {
        let dir = self.subdir(sub)?;
        let tmp = format!(".{name}.{}", std::process::id());
        let (Ok(name_c), Ok(tmp_c)) = (CString::new(name), CString::new(tmp)) else {
            return Err(Errno(libc::EINVAL));
        };
        let fd = sys::open_at(
            Some(dir.as_fd()),
            &tmp_c,
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
            0o600,
        )?;
        let written = sys::write_all(fd.as_fd(), bytes);
        drop(fd);
        let renamed = written.and_then(|()| sys::rename_at(dir.as_fd(), &tmp_c, &name_c));
        if renamed.is_err() {
            let _ = sys::unlink_at(dir.as_fd(), &tmp_c);
        }
        renamed
    }

    /// The path of `program`'s run record (for the recorder that appends
    /// its end line from `_exit`, where nothing may allocate).
    pub fn runs_path(&self, program: &str) -> PathBuf {
        self.path.join("runs").join(run_file_name(program))
    }

    /// `program`'s run history, with what processes appended since folded
    /// in: end lines become runs, and start lines of processes `alive` says
    /// are gone become runs that ended unrecorded (killed). The record is
    /// rewritten folded (atomically, with `rate`, the calibrated copy rate,
    /// 0: none, in its header for the preload stub) when a run was found
    /// killed or [`FOLD_LINES`] lines were appended; otherwise only read.
    pub fn history(&self, program: &str, alive: impl Fn(&Start) -> bool, rate: u32) -> History {
        let name = run_file_name(program);
        let Some(text) = self.read_record(c"runs", &name) else {
            return History::default();
        };
        let mut h = crate::history::parse(&text, program.as_bytes());
        let mut gone = Vec::new();
        h.drop_starts(|s| {
            let dead = !alive(s);
            if dead {
                gone.push(*s);
            }
            dead
        });
        for s in &gone {
            h.push(crate::history::Run {
                ms: None,
                arm: s.arm,
            });
        }
        if rate != 0 {
            h.rate_us_per_mib = rate;
        }
        // Lines beyond the starts still under way are folded in once there
        // are FOLD_LINES of them: every read folds them in memory anyway,
        // and replacing the record costs more than reading it (ext4 writes
        // a file renamed over another out at once: ~0.5 ms per process).
        // A run found killed is folded in at once: the stub, which cannot
        // fold, loads the library while a record names a process gone.
        if !gone.is_empty() || appended_lines(&text) >= h.starts().len() + FOLD_LINES {
            let _ = self.write_record(c"runs", &name, format_history(program, &h).as_bytes());
        }
        h
    }

    /// Appends `line` (a start or end line, see `history`) to `program`'s
    /// run record with one `write` (`O_APPEND`), creating the record with
    /// its header first when there is none (linked into place, so that no
    /// reader ever sees a record without its header).
    pub fn append_run_line(&self, program: &str, line: &[u8], rate: u32) -> Result<(), Errno> {
        let dir = self.subdir(c"runs")?;
        let name = CString::new(run_file_name(program)).map_err(|_| Errno(libc::EINVAL))?;
        let open = || {
            sys::open_at(
                Some(dir.as_fd()),
                &name,
                libc::O_WRONLY | libc::O_APPEND | libc::O_NOFOLLOW,
                0,
            )
        };
        let fd = match open() {
            Ok(fd) => fd,
            Err(Errno(libc::ENOENT)) => {
                let mut empty = History::default();
                empty.rate_us_per_mib = rate;
                let header = format_history(program, &empty);
                let tmp = sys::open_at(
                    Some(dir.as_fd()),
                    c".",
                    libc::O_TMPFILE | libc::O_WRONLY,
                    0o600,
                )?;
                sys::write_all(tmp.as_fd(), header.as_bytes())?;
                match sys::link_tmpfile(tmp.as_fd(), dir.as_fd(), &name) {
                    Ok(()) | Err(Errno(libc::EEXIST)) => {}
                    Err(e) => return Err(e),
                }
                open()?
            }
            Err(e) => return Err(e),
        };
        sys::write_all(fd.as_fd(), line)
    }

    /// Adds a finished run to `program`'s record, as a process's end line
    /// would (for tests and tools that teach tiexec a program's past).
    pub fn add_run(&self, program: &str, ms: u32, arm: crate::history::Arm) -> Result<(), Errno> {
        let nobody = Start {
            pid: 0,
            ticks: 0,
            arm,
        };
        let mut buf = [0u8; 64];
        let n = crate::history::end_line(nobody, ms, arm, &mut buf);
        self.append_run_line(program, buf.get(..n).unwrap_or(&[]), 0)
    }

    /// The copy rates measured on this machine.
    pub fn rates(&self) -> Rates {
        let text = self
            .read_record_max(c".", "calibration", 4096)
            .unwrap_or_default();
        Rates::parse(&text)
    }

    /// Adds a measured rate (µs per MiB) of `kind`, keeping the last
    /// [`RATES_KEPT`] of each kind.
    pub fn record_rate(&self, kind: RateKind, us_per_mib: u32) {
        let mut rates = self.rates();
        rates.push(kind, us_per_mib);
        let _ = self.write_record(c".", "calibration", rates.format().as_bytes());
    }

    /// `program`'s hot map (empty when none is kept).
    pub fn hot_map(&self, program: &str) -> HotMap {
        self.read_record_max(c"hot", &run_file_name(program), 4 << 20)
            .map(|text| HotMap::parse(&text, program))
            .unwrap_or_default()
    }

    /// Replaces `program`'s hot map.
    pub fn write_hot_map(&self, program: &str, map: &HotMap) -> Result<(), Errno> {
        self.write_record(
            c"hot",
            &run_file_name(program),
            map.format(program).as_bytes(),
        )
    }

    /// Records that the image `name` was built from `object`.
    pub fn image_built(&self, name: &str, object: &str) {
        // The path as people know it (the loader's may hold "..").
        let canonical = std::fs::canonicalize(object);
        let object = canonical
            .as_ref()
            .ok()
            .and_then(|p| p.to_str())
            .unwrap_or(object);
        let _ = self.append_image_record(name, object, false);
    }

    /// Counts one hit of the image `name` (built from `object`).
    pub fn image_hit(&self, name: &str, object: &str) {
        let _ = self.append_image_record(name, object, true);
    }

    fn append_image_record(&self, name: &str, object: &str, hit: bool) -> Result<(), Errno> {
        let images = self.subdir(c"images")?;
        let name_c = CString::new(name).map_err(|_| Errno(libc::EINVAL))?;
        // A new record starts with the object's path on a line of its own.
        match sys::open_at(
            Some(images.as_fd()),
            &name_c,
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
            0o600,
        ) {
            Ok(fd) => {
                let mut line = object.as_bytes().to_vec();
                line.push(b'\n');
                if hit {
                    line.push(b'+');
                }
                sys::write_all(fd.as_fd(), &line)
            }
            Err(Errno(libc::EEXIST)) if hit => {
                let fd = sys::open_at(
                    Some(images.as_fd()),
                    &name_c,
                    libc::O_WRONLY | libc::O_APPEND | libc::O_NOFOLLOW,
                    0,
                )?;
                if sys::fstat(fd.as_fd())?.st_size as u64 >= MAX_HIT_BYTES {
                    return Ok(());
                }
                sys::write_all(fd.as_fd(), b"+")
            }
            Err(Errno(libc::EEXIST)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The object path and hit count recorded for image `name`.
    pub fn image_record(&self, name: &str) -> Option<(String, u64)> {
        let images = self.subdir(c"images").ok()?;
        let name_c = CString::new(name).ok()?;
        let fd = sys::open_at(
            Some(images.as_fd()),
            &name_c,
            libc::O_RDONLY | libc::O_NOFOLLOW,
            0,
        )
        .ok()?;
        let mut buf = vec![0u8; MAX_HIT_BYTES as usize + 4096];
        let n = sys::pread_full(fd.as_fd(), &mut buf, 0).ok()?;
        let text = buf.get(..n)?;
        let newline = text.iter().position(|&b| b == b'\n')?;
        let path = String::from_utf8_lossy(text.get(..newline)?).into_owned();
        let hits = text
            .get(newline + 1..)?
            .iter()
            .filter(|&&b| b == b'+')
            .count();
        Some((path, hits as u64))
    }

    /// Forgets image `name` (after it was evicted).
    pub fn image_removed(&self, name: &str) {
        if let (Ok(images), Ok(name_c)) = (self.subdir(c"images"), CString::new(name)) {
            let _ = sys::unlink_at(images.as_fd(), &name_c);
        }
    }

    /// Names of the image records kept.
    pub fn image_records(&self) -> Vec<String> {
        std::fs::read_dir(self.path.join("images"))
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// The record's file name for `program`: the digest of its path.
pub fn run_file_name(program: &str) -> String {
    String::from_utf8_lossy(&crate::history::file_name(program.as_bytes())).into_owned()
}

/// Lines after a run record's first three (start and end lines).
/// Appended lines (beyond the starts of runs under way) a run record
/// gathers before a reader rewrites it folded: eight runs' start and end
/// lines, a few hundred bytes (the stub reads the first 4 KiB).
const FOLD_LINES: usize = 16;

fn appended_lines(text: &[u8]) -> usize {
    text.split(|&b| b == b'\n')
        .skip(3)
        .filter(|l| !l.is_empty())
        .count()
}

/// A run record's text: `program` on the first line (telling apart two
/// paths with one digest), the header, the runs, and the start lines of
/// the runs still under way (see `history`).
pub fn format_history(program: &str, h: &History) -> String {
    use core::fmt::Write;
    let mut s = String::with_capacity(program.len() + 32 + h.runs().len() * 8);
    s.push_str(program);
    let under_way = h.starts().len() as u32;
    let _ = write!(
        s,
        "\nv2 {} {}\n",
        h.started.saturating_sub(under_way),
        h.rate_us_per_mib
    );
    for (i, r) in h.runs().iter().enumerate() {
        if i > 0 {
            s.push(' ');
        }
        match r.ms {
            Some(ms) => {
                let _ = write!(s, "{ms}");
            }
            None => s.push('k'),
        }
        s.push(char::from(r.arm.letter()));
    }
    s.push('\n');
    for start in h.starts() {
        let mut buf = [0u8; 64];
        let n = crate::history::start_line(*start, &mut buf);
        s.push_str(&String::from_utf8_lossy(buf.get(..n).unwrap_or(&[])));
    }
    s
}

/// Measured copy rates kept at most, per kind.
pub const RATES_KEPT: usize = 8;
/// Measurements after which the assumed rate no longer counts.
pub const PRIOR_UNTIL: usize = 3;

/// What a rate measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RateKind {
    /// A private copy of text (THP or pool pages): populate and copy.
    Copy,
    /// A cache image built from the file: populate and read.
    Image,
}

/// The rates (µs per MiB) measured on this machine, newest last.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rates {
    copy: Vec<u32>,
    image: Vec<u32>,
}

impl Rates {
    fn list(&self, kind: RateKind) -> &Vec<u32> {
        match kind {
            RateKind::Copy => &self.copy,
            RateKind::Image => &self.image,
        }
    }

    fn parse(text: &[u8]) -> Rates {
        let mut r = Rates::default();
        for line in String::from_utf8_lossy(text).lines() {
            let mut words = line.split(' ');
            let kind = match words.next() {
                Some("copy") => RateKind::Copy,
                Some("image") => RateKind::Image,
                _ => continue,
            };
            for w in words.filter_map(|w| w.parse().ok()) {
                r.push(kind, w);
            }
        }
        r
    }

    fn format(&self) -> String {
        use core::fmt::Write;
        let mut s = String::new();
        for (kind, word) in [(RateKind::Copy, "copy"), (RateKind::Image, "image")] {
            s.push_str(word);
            for v in self.list(kind) {
                let _ = write!(s, " {v}");
            }
            s.push('\n');
        }
        s
    }

    /// Adds one measurement, keeping the last [`RATES_KEPT`].
    pub fn push(&mut self, kind: RateKind, us_per_mib: u32) {
        let list = match kind {
            RateKind::Copy => &mut self.copy,
            RateKind::Image => &mut self.image,
        };
        list.push(us_per_mib.max(1));
        if list.len() > RATES_KEPT {
            list.remove(0);
        }
    }

    /// The lowest of the recent measurements of `kind` (µs per MiB), if
    /// any: what a copy costs here when nothing slows it down. Until
    /// [`PRIOR_UNTIL`] were made, `prior` counts as one of them. (In a VM
    /// whose host takes freed memory back, the first copy after a pause
    /// touches memory the host must give again and costs several times as
    /// much: one such copy must not stop all others. Whether copies pay is
    /// told by the run history's comparison of lifetimes, copies included.)
    pub fn best(&self, kind: RateKind, prior: u32) -> Option<u32> {
        let list = self.list(kind);
        let prior = (list.len() < PRIOR_UNTIL && prior > 0).then_some(prior);
        list.iter().copied().chain(prior).min()
    }

    /// The median of the measurements of `kind` (µs per MiB), if any.
    pub fn median(&self, kind: RateKind) -> Option<u32> {
        let mut v = self.list(kind).clone();
        v.sort_unstable();
        let n = v.len();
        match n {
            0 => None,
            n if n % 2 == 1 => v.get(n / 2).copied(),
            n => Some((v.get(n / 2 - 1)? / 2) + (v.get(n / 2)? / 2)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::history::{Arm, Run};

    #[test]
    fn run_records_fold_appended_lines_and_dead_starts() {
        let root = std::env::temp_dir().join(format!("tiexec-state-runs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let dir = StateDir::open(&root.join("tiexec")).expect("open");
        let p = "/usr/bin/prog";
        let mut buf = [0u8; 64];
        let a = Start {
            pid: 10,
            ticks: 1,
            arm: Arm::Copy,
        };
        let b = Start {
            pid: 11,
            ticks: 2,
            arm: Arm::Plain,
        };
        let c = Start {
            pid: 12,
            ticks: 3,
            arm: Arm::Copy,
        };
        for s in [a, b, c] {
            let n = crate::history::start_line(s, &mut buf);
            dir.append_run_line(p, &buf[..n], 412).expect("start");
        }
        let n = crate::history::end_line(a, 600, Arm::Copy, &mut buf);
        dir.append_run_line(p, &buf[..n], 412).expect("end");
        // Few lines appended, none of a process gone: read as folded, the
        // record left as it is.
        let alive = dir.history(p, |_| true, 0);
        assert_eq!(alive.starts(), [b, c]);
        let appended = std::fs::read_to_string(dir.runs_path(p)).expect("record");
        assert_eq!(appended.lines().count(), 3 + 4, "{appended}");
        // b is gone (killed), c still runs: folded in at once.
        let h = dir.history(p, |s| s.pid == 12, 0);
        assert_eq!(
            std::fs::read_to_string(dir.runs_path(p)).expect("record"),
            "/usr/bin/prog\nv2 2 412\n600c kp\ns 12 3 c\n"
        );
        assert_eq!(h.started, 3);
        assert_eq!(h.rate_us_per_mib, 412);
        assert_eq!(
            h.runs(),
            [
                Run {
                    ms: Some(600),
                    arm: Arm::Copy
                },
                Run {
                    ms: None,
                    arm: Arm::Plain
                }
            ]
        );
        assert_eq!(h.starts(), [c]);
        assert_eq!(dir.history(p, |s| s.pid == 12, 0), h, "read again");
        // Eight more runs of 100 ms: sixteen lines beyond c's start, and
        // the record is rewritten folded, c's start line still there.
        for pid in 20..28 {
            let s = Start {
                pid,
                ticks: 4,
                arm: Arm::Plain,
            };
            let n = crate::history::start_line(s, &mut buf);
            dir.append_run_line(p, &buf[..n], 412).expect("start");
            let n = crate::history::end_line(s, 100, Arm::Plain, &mut buf);
            dir.append_run_line(p, &buf[..n], 412).expect("end");
        }
        let folded = dir.history(p, |s| s.pid == 12, 0);
        assert_eq!(folded.runs().len(), 10);
        assert_eq!(folded.starts(), [c]);
        let text = std::fs::read_to_string(dir.runs_path(p)).expect("record");
        assert_eq!(
            text,
            "/usr/bin/prog\nv2 10 412\n600c kp 100p 100p 100p 100p 100p 100p 100p 100p\ns 12 3 c\n"
        );
        assert_eq!(
            dir.history(p, |s| s.pid == 12, 0),
            folded,
            "the same, folded"
        );
        // Another program's record is not read as this one's.
        assert_eq!(dir.history("/other", |_| true, 0), History::default());
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn rates_keep_the_last_measurements_and_give_their_median() {
        let root = std::env::temp_dir().join(format!("tiexec-state-rates-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let dir = StateDir::open(&root.join("tiexec")).expect("open");
        assert_eq!(dir.rates().median(RateKind::Copy), None);
        for v in [900, 400, 410, 390, 420, 380, 400, 405, 395, 410] {
            dir.record_rate(RateKind::Copy, v);
        }
        dir.record_rate(RateKind::Image, 800);
        let r = dir.rates();
        // The last eight: 380 390 395 400 405 410 410 420 (the 900 has gone).
        assert_eq!(r.median(RateKind::Copy), Some(402));
        assert_eq!(r.best(RateKind::Copy, 500), Some(380));
        assert_eq!(r.best(RateKind::Image, 0), Some(800));
        // One slow measurement does not outweigh what is assumed.
        assert_eq!(r.best(RateKind::Image, 500), Some(500));
        assert_eq!(r.median(RateKind::Image), Some(800));
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn a_state_dir_remembers_images_and_hot_maps() {
        let root = std::env::temp_dir().join(format!("tiexec-state-test-{}", std::process::id()));
        let dir = StateDir::open(&root.join("tiexec")).expect("open");
        let mut map = HotMap::default();
        let text = [crate::range::Range::new(0, 4 << 20)];
        map.merge(&crate::hotmap::Measurement {
            path: "/lib/libx.so",
            identity: 5,
            text: &text,
            measured: &text,
            present: &[crate::range::Range::new(0, 4096)],
        });
        dir.write_hot_map("/bin/prog", &map).expect("hot map");
        assert_eq!(dir.hot_map("/bin/prog"), map);
        assert_eq!(dir.hot_map("/bin/other"), HotMap::default());
        dir.image_built("img@v1", "/lib/libx.so");
        dir.image_hit("img@v1", "/lib/libx.so");
        dir.image_hit("img@v1", "/lib/libx.so");
        assert_eq!(dir.image_record("img@v1"), Some(("/lib/libx.so".into(), 2)));
        dir.image_hit("other@v1", "/lib/liby.so");
        assert_eq!(
            dir.image_record("other@v1"),
            Some(("/lib/liby.so".into(), 1))
        );
        dir.image_removed("img@v1");
        assert_eq!(dir.image_record("img@v1"), None);
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn a_directory_others_can_write_is_not_used() {
        use std::os::unix::fs::PermissionsExt;
        let root = std::env::temp_dir().join(format!("tiexec-state-open-{}", std::process::id()));
        std::fs::create_dir_all(&root).unwrap();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(StateDir::open(&root).is_err());
        let _ = std::fs::remove_dir_all(&root);
    }
}
