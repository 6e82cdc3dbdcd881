//! What tiexec remembers for a user between processes, in the user's own
//! cache directory (`$XDG_CACHE_HOME/tiexec`, else `$HOME/.cache/tiexec`):
//!
//! - `runs/<digest of a program's path>`: how long its last processes lived,
//!   so that copies that cannot pay off are skipped (see
//!   [`crate::plan::payoff`]);
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
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::sys::{self, Errno};

pub use crate::history::{fnv1a, RUNS_KEPT};

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

/// Where the state directory is for this environment (not checked).
pub fn default_path() -> Option<PathBuf> {
    let xdg = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute());
    let base = xdg.or_else(|| {
        std::env::var_os("HOME")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute() && p != Path::new("/"))
            .map(|h| h.join(".cache"))
    })?;
    Some(base.join("tiexec"))
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
    /// Opens (creating if needed) the state directory at `path`.
    pub fn open(path: &Path) -> Result<StateDir, Errno> {
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

    /// The default state directory, if it can be used.
    pub fn open_default() -> Option<StateDir> {
        StateDir::open(&default_path()?).ok()
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn subdir(&self, name: &std::ffi::CStr) -> Result<OwnedFd, Errno> {
        own_subdir(Some(self.dir.as_fd()), name)
    }

    /// The record `name` in subdirectory `sub` (at most 64 KiB), if any.
    pub fn read_record(&self, sub: &std::ffi::CStr, name: &str) -> Option<Vec<u8>> {
        let dir = self.subdir(sub).ok()?;
        let name = CString::new(name).ok()?;
        let fd = sys::open_at(
            Some(dir.as_fd()),
            &name,
            libc::O_RDONLY | libc::O_NOFOLLOW,
            0,
        )
        .ok()?;
        let mut buf = vec![0u8; 64 << 10];
        let n = sys::pread_full(fd.as_fd(), &mut buf, 0).ok()?;
        buf.truncate(n);
        Some(buf)
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

    /// The lifetimes (milliseconds, oldest first) recorded for `program`.
    pub fn runs(&self, program: &str) -> Vec<u32> {
        self.read_record(c"runs", &run_file_name(program))
            .map(|text| parse_runs(&text, program))
            .unwrap_or_default()
    }

    /// Adds a lifetime for `program`, keeping the last [`RUNS_KEPT`].
    pub fn record_run(&self, program: &str, lifetime_ms: u32) -> Result<(), Errno> {
        let mut runs = self.runs(program);
        runs.push(lifetime_ms);
        let keep_from = runs.len().saturating_sub(RUNS_KEPT);
        let text = format_runs(program, runs.get(keep_from..).unwrap_or(&[]));
        self.write_record(c"runs", &run_file_name(program), text.as_bytes())
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

/// `program` on the first line (telling apart two paths with one digest),
/// then the lifetimes in milliseconds, space-separated.
pub fn format_runs(program: &str, runs: &[u32]) -> String {
    let mut s = String::with_capacity(program.len() + 1 + runs.len() * 8);
    s.push_str(program);
    s.push('\n');
    for (i, r) in runs.iter().enumerate() {
        if i > 0 {
            s.push(' ');
        }
        s.push_str(&r.to_string());
    }
    s.push('\n');
    s
}

/// The lifetimes in a record, if it is `program`'s.
pub fn parse_runs(text: &[u8], program: &str) -> Vec<u32> {
    let mut runs = [0; RUNS_KEPT];
    let n = crate::history::parse(text, program.as_bytes(), &mut runs);
    runs.get(..n).unwrap_or(&[]).to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_records_round_trip_and_name_their_program() {
        let text = format_runs("/usr/bin/rustc", &[66, 70, 1200]);
        assert_eq!(
            parse_runs(text.as_bytes(), "/usr/bin/rustc"),
            [66, 70, 1200]
        );
        assert!(parse_runs(text.as_bytes(), "/usr/bin/other").is_empty());
        assert!(parse_runs(b"", "x").is_empty());
        assert!(parse_runs(b"x\n1 zz 3\n", "x") == [1, 3]);
    }

    #[test]
    fn a_state_dir_remembers_runs_and_images() {
        let root = std::env::temp_dir().join(format!("tiexec-state-test-{}", std::process::id()));
        let dir = StateDir::open(&root.join("tiexec")).expect("open");
        for ms in 1..=10 {
            dir.record_run("/bin/prog", ms).expect("record");
        }
        assert_eq!(dir.runs("/bin/prog"), (3..=10).collect::<Vec<u32>>());
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
