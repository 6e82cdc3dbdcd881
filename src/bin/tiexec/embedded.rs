//! The preload library the `tiexec` binary carries inside itself, written
//! once to a private directory where the loader can map it executable.
//!
//! Named by its content (a digest computed when it was built), so a binary
//! finds its own library with one `lstat`, without reading it back. A
//! directory is used only if it is a real directory of this user that others
//! cannot write to, and only if a library there can be mapped executable:
//! a cache directory on a `noexec` mount (or one a security module forbids)
//! would make the loader refuse the preload in every process.
//!
//! The libraries' bytes are in the binary's file but not in its memory: they
//! sit in sections no segment loads (`.tiexec.lib`, `.tiexec.stub`), read
//! from the file only when a copy is written. Loaded, they would be 0.9 MB
//! of every wrapper's address space, which under a tight `RLIMIT_AS` is the
//! difference between running the program and the loader failing.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// One library carried inside the binary's file.
struct Embedded {
    /// Its file name's stem.
    stem: &'static str,
    /// The name of the section of this binary's file that holds its bytes
    /// (a function: see [`sections`]).
    section: fn() -> &'static str,
    /// Their length, computed by build.rs.
    len: u64,
    /// Their digest (FNV-1a), computed by build.rs.
    digest: &'static str,
}

/// A decimal number given by build.rs, at compile time.
const fn parse_len(s: &str) -> u64 {
    let b = s.as_bytes();
    let mut n = 0u64;
    let mut i = 0;
    while i < b.len() {
        assert!(b[i].is_ascii_digit(), "build.rs gives lengths in decimal");
        n = n * 10 + (b[i] - b'0') as u64;
        i += 1;
    }
    n
}

/// The sections: not allocated (no "a" flag), so no segment maps them;
/// kept by the linker's garbage collection through the retain flag ("R",
/// SHF_GNU_RETAIN) and, for linkers older than that flag, because this
/// module's object holds the functions that name them, which the reader
/// calls: an object none of whose code is used is dropped whole, non-alloc
/// sections included. Only data, no code: nothing here runs, which is the
/// lint's concern.
#[allow(unsafe_code)]
mod sections {
    // The digests, as local symbols: `.incbin` names a file whose path
    // never changes, so without them an incremental build would see the
    // same assembly and keep an object holding the old bytes (seen: the
    // check in `bytes` caught it). With them, new bytes are new text.
    std::arch::global_asm!(concat!(
        ".set .Ltiexec_lib_",
        env!("TIEXEC_EMBEDDED_LIB_DIGEST"),
        ", ",
        env!("TIEXEC_EMBEDDED_LIB_LEN"),
        "\n",
        ".set .Ltiexec_stub_",
        env!("TIEXEC_EMBEDDED_STUB_DIGEST"),
        ", ",
        env!("TIEXEC_EMBEDDED_STUB_LEN"),
        "\n",
        ".pushsection .tiexec.lib,\"R\",%progbits\n",
        ".incbin \"",
        env!("TIEXEC_EMBEDDED_LIB"),
        "\"\n",
        ".popsection\n",
        ".pushsection .tiexec.stub,\"R\",%progbits\n",
        ".incbin \"",
        env!("TIEXEC_EMBEDDED_STUB"),
        "\"\n",
        ".popsection\n",
    ));

    /// The full library's section name (see the note above on why this is
    /// a function here).
    #[inline(never)]
    pub fn name_of_full() -> &'static str {
        ".tiexec.lib"
    }

    /// The stub's section name.
    #[inline(never)]
    pub fn name_of_stub() -> &'static str {
        ".tiexec.stub"
    }
}

const FULL: Embedded = Embedded {
    stem: "libtiexec",
    section: sections::name_of_full,
    len: parse_len(env!("TIEXEC_EMBEDDED_LIB_LEN")),
    digest: env!("TIEXEC_EMBEDDED_LIB_DIGEST"),
};

const STUB: Embedded = Embedded {
    stem: "libtiexec-stub",
    section: sections::name_of_stub,
    len: parse_len(env!("TIEXEC_EMBEDDED_STUB_LEN")),
    digest: env!("TIEXEC_EMBEDDED_STUB_DIGEST"),
};

/// `bytes`' digest as build.rs writes it (FNV-1a, 16 hex digits).
fn digest_of(bytes: &[u8]) -> String {
    format!("{:016x}", tiexec::internal::state::fnv1a(bytes))
}

impl Embedded {
    /// Its bytes, read from this binary's file, checked against the length
    /// and digest build.rs computed.
    fn bytes(&self) -> Result<Vec<u8>, String> {
        let name = (self.section)();
        let exe = std::fs::read("/proc/self/exe")
            .map_err(|e| format!("reading this tiexec's own file: {e}"))?;
        let elf =
            goblin::elf::Elf::parse(&exe).map_err(|e| format!("this tiexec's own file: {e}"))?;
        let section = elf
            .section_headers
            .iter()
            .find(|s| elf.shdr_strtab.get_at(s.sh_name) == Some(name))
            .ok_or_else(|| format!("this tiexec's file has no {name} section"))?;
        let start = usize::try_from(section.sh_offset).map_err(|e| e.to_string())?;
        let len = usize::try_from(self.len).map_err(|e| e.to_string())?;
        let bytes = exe
            .get(start..start.saturating_add(len))
            .filter(|_| section.sh_size == self.len)
            .ok_or_else(|| format!("{name} holds {} bytes, not {}", section.sh_size, self.len))?;
        if digest_of(bytes) != self.digest {
            return Err(format!(
                "{name} does not hold the library this tiexec was built with"
            ));
        }
        Ok(bytes.to_vec())
    }
}

/// Where `tiexec --setup` installs the full library, for a hand-written
/// `LD_PRELOAD` and for services (root's, readable by every user).
pub const SYSTEM_LIBRARY: &str = "/usr/local/lib/tiexec/libtiexec.so";

/// The full library's bytes (empty when this binary was built without).
pub fn full_library() -> Result<Vec<u8>, String> {
    if FULL.len == 0 {
        return Ok(Vec::new());
    }
    FULL.bytes()
}

/// The library to name in `LD_PRELOAD`: the system's when `tiexec --setup`
/// installed this very build there, else this user's copy (written now if
/// needed). `true` with the system's.
pub fn library_for_preload() -> Result<(PathBuf, bool), Unplaced> {
    let system = Path::new(SYSTEM_LIBRARY);
    let installed = std::fs::symlink_metadata(system)
        .is_ok_and(|m| m.is_file() && m.uid() == 0 && m.mode() & 0o022 == 0 && m.len() == FULL.len)
        && std::fs::read(system).is_ok_and(|b| digest_of(&b) == FULL.digest);
    if installed {
        return Ok((system.to_path_buf(), true));
    }
    libraries().map(|p| (p.full, false))
}

/// Where the libraries were placed.
pub struct Placed {
    /// The full library.
    pub full: PathBuf,
    /// The stub the wrapper preloads.
    pub stub: PathBuf,
}

/// Why no place for the library was found.
#[derive(Debug)]
pub enum Unplaced {
    /// This binary was built without its library.
    NotEmbedded,
    /// This user is the overflow ID (see `sys::identity_unmapped`): no
    /// directory can be told to be its own.
    UnmappedUser(u32),
    /// Every candidate directory failed; the reasons, in order.
    Nowhere(Vec<(PathBuf, String)>),
}

impl std::fmt::Display for Unplaced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unplaced::NotEmbedded => write!(f, "this tiexec was built without its library"),
            Unplaced::UnmappedUser(uid) => write!(
                f,
                "this user is not mapped in its user namespace (uid {uid}): no directory can be trusted to hold the library"
            ),
            Unplaced::Nowhere(tried) => {
                write!(
                    f,
                    "no directory where libtiexec.so can be mapped executable"
                )?;
                for (dir, why) in tried {
                    write!(f, "; {}: {why}", dir.display())?;
                }
                Ok(())
            }
        }
    }
}

/// Directories to try, in order: the user's cache directory, then private
/// directories in the temporary places.
fn candidates() -> Vec<PathBuf> {
    let uid = tiexec::internal::sys::real_uid();
    let mut out = Vec::new();
    if let Some(p) = tiexec::internal::state::default_path() {
        out.push(p);
    }
    let private = format!("tiexec-{uid}");
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from) {
        if d.is_absolute() {
            out.push(d.join("tiexec"));
        }
    }
    out.push(std::env::temp_dir().join(&private));
    for d in ["/tmp", "/var/tmp", "/dev/shm"] {
        let p = Path::new(d).join(&private);
        if !out.contains(&p) {
            out.push(p);
        }
    }
    out
}

/// A directory only this user can write to (made 0700 if missing).
fn private_dir(dir: &Path) -> Result<(), String> {
    let uid = tiexec::internal::sys::real_uid();
    let meta = match std::fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(_) => {
            let _ = std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir);
            std::fs::symlink_metadata(dir).map_err(|e| e.to_string())?
        }
    };
    if !meta.is_dir() {
        return Err("not a directory (or a symlink)".into());
    }
    if meta.uid() != uid {
        return Err(format!("owned by uid {}", meta.uid()));
    }
    if meta.mode() & 0o022 != 0 {
        return Err("writable by group or others".into());
    }
    Ok(())
}

/// True when `file` can be mapped executable (what the loader will do).
fn mappable_executable(file: &std::fs::File) -> Result<(), String> {
    use std::os::fd::AsFd;
    tiexec::internal::sys::can_map_executable(file.as_fd())
        .map_err(|e| format!("cannot be mapped executable ({e}; a noexec mount?)"))
}

/// `lib` in `dir`: the existing file when it is ours and whole, else
/// written now (under a unique name, then renamed: a concurrent tiexec never
/// sees half a library, and nothing is followed or clobbered).
fn place_one(dir: &Path, lib: &Embedded) -> Result<PathBuf, String> {
    let path = dir.join(format!(
        "{}-{}-{}.so",
        lib.stem,
        env!("CARGO_PKG_VERSION"),
        lib.digest
    ));
    let uid = tiexec::internal::sys::real_uid();
    let ours = std::fs::symlink_metadata(&path)
        .is_ok_and(|m| m.is_file() && m.uid() == uid && m.len() == lib.len);
    if !ours {
        let bytes = lib.bytes()?;
        let tmp = dir.join(format!(".{}-{}.tmp", lib.stem, std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o755)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .map_err(|e| e.to_string())?;
        let written = f
            .write_all(&bytes)
            .and_then(|()| f.sync_all())
            .and_then(|()| std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(e.to_string());
        }
    }
    Ok(path)
}

/// Both libraries in `dir`, where they can be mapped executable (one test
/// serves both: same directory, same mount).
fn place_in(dir: &Path) -> Result<Placed, String> {
    private_dir(dir)?;
    let placed = Placed {
        full: place_one(dir, &FULL)?,
        stub: place_one(dir, &STUB)?,
    };
    let file = std::fs::File::open(&placed.stub).map_err(|e| e.to_string())?;
    mappable_executable(&file)?;
    remove_old_versions(dir, &placed);
    Ok(placed)
}

/// Deletes the libraries other builds of tiexec wrote into `dir` and have
/// not used for a week (each build names its own by content: upgrades would
/// pile them up). A process mapping one keeps it; a build still in use
/// rewrites its own when it next runs.
fn remove_old_versions(dir: &Path, current: &Placed) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let uid = tiexec::internal::sys::real_uid();
    // A week: with relatime, a file read daily may show an access a day old.
    let week_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(7 * 86_400);
    for e in entries.flatten() {
        let path = e.path();
        let name = e.file_name();
        let name = name.to_string_lossy();
        let ours = (name.starts_with("libtiexec-") && name.ends_with(".so"))
            && path != current.full
            && path != current.stub;
        let stale = e.metadata().is_ok_and(|m| {
            m.is_file()
                && m.uid() == uid
                && m.accessed()
                    .or_else(|_| m.modified())
                    .is_ok_and(|t| t < week_ago)
        });
        if ours && stale {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// The paths of the libraries, written where they can serve if needed.
pub fn libraries() -> Result<Placed, Unplaced> {
    if FULL.len == 0 || STUB.len == 0 {
        return Err(Unplaced::NotEmbedded);
    }
    if tiexec::internal::sys::identity_unmapped() {
        return Err(Unplaced::UnmappedUser(tiexec::internal::sys::overflow_uid()));
    }
    let mut tried = Vec::new();
    for dir in candidates() {
        match place_in(&dir) {
            Ok(p) => return Ok(p),
            Err(why) => tried.push((dir, why)),
        }
    }
    Err(Unplaced::Nowhere(tried))
}
