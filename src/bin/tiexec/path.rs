//! Finding PROGRAM the way a shell does, and what its ELF headers say about
//! how it will be loaded.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Where PROGRAM is, or why it cannot be run.
pub enum Lookup {
    /// An executable file.
    Found(PathBuf),
    /// Nothing by that name.
    NotFound,
    /// A file that cannot be executed.
    NotExecutable(PathBuf),
}

fn is_executable_file(path: &Path) -> bool {
    let Ok(meta) = std::fs::metadata(path) else {
        return false;
    };
    if !meta.is_file() {
        return false;
    }
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    tiexec::internal::sys::can_execute(&c)
}

/// PROGRAM's path when it can be run (see [`find`]).
pub fn resolve(program: &OsStr) -> Option<PathBuf> {
    match find(program) {
        Lookup::Found(p) => Some(p),
        _ => None,
    }
}

/// Finds PROGRAM the way a shell does: as a path if it holds a '/', else in
/// each directory of PATH in turn (an empty entry is the current directory).
pub fn find(program: &OsStr) -> Lookup {
    let as_path = Path::new(program);
    if program.as_bytes().contains(&b'/') {
        return if is_executable_file(as_path) {
            Lookup::Found(as_path.to_path_buf())
        } else if as_path.exists() {
            Lookup::NotExecutable(as_path.to_path_buf())
        } else {
            Lookup::NotFound
        };
    }
    let path_var =
        std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    let mut not_executable = None;
    for dir in path_var.as_bytes().split(|&b| b == b':') {
        let dir = if dir.is_empty() {
            Path::new(".")
        } else {
            Path::new(OsStr::from_bytes(dir))
        };
        let candidate = dir.join(program);
        if is_executable_file(&candidate) {
            return Lookup::Found(candidate);
        }
        // As execvp: an entry that exists but cannot be executed (a file
        // without permission, a directory) is EACCES, remembered while the
        // search goes on; what does not exist is skipped.
        if not_executable.is_none() && std::fs::symlink_metadata(&candidate).is_ok() {
            not_executable = Some(candidate);
        }
    }
    match not_executable {
        Some(p) => Lookup::NotExecutable(p),
        None => Lookup::NotFound,
    }
}

/// What the ELF headers say about how PROGRAM will be loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Linkage {
    /// It names an interpreter (the dynamic loader).
    Dynamic,
    /// An ELF program without one.
    Static,
    /// Not an ELF program (a script: its interpreter is what runs).
    NotElf,
}

/// How `path` will be loaded.
pub fn linkage(path: &Path) -> Linkage {
    let Ok(file) = std::fs::File::open(path) else {
        return Linkage::NotElf;
    };
    match tiexec::internal::elf::read_program_headers(&file) {
        Some(phdrs) if tiexec::internal::elf::has_interpreter(&phdrs) => Linkage::Dynamic,
        Some(_) => Linkage::Static,
        None => Linkage::NotElf,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn path_lookup() {
        assert!(matches!(find(OsStr::new("sh")), Lookup::Found(_)));
        assert!(matches!(
            find(OsStr::new("no-such-program-tiexec")),
            Lookup::NotFound
        ));
        let plain = std::env::temp_dir().join(format!("tiexec-not-exec-{}", std::process::id()));
        std::fs::write(&plain, b"data").unwrap();
        std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).unwrap();
        let got = find(plain.as_os_str());
        let _ = std::fs::remove_file(&plain);
        assert!(matches!(got, Lookup::NotExecutable(_)));
    }
}
