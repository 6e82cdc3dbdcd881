//! The shared image cache: ready huge-page copies of text ranges, as files on
//! a hugetlbfs mount, so that the copy is paid once per machine and the pages
//! are shared by every process of a program.
//!
//! An *image* holds the bytes of one region of an object's text as a
//! process maps it: the huge pages its text spans (its text segments,
//! rounded out to huge pages, merged where they share one), with the
//! file's bytes of the object's read-only mappings there at their offsets,
//! zeros elsewhere. One image per object, region and load phase (the load
//! address modulo the huge page), whatever part of it a process needs: a
//! process maps the part it plans to move (at that offset in the image)
//! `PROT_READ|PROT_EXEC`, `MAP_SHARED`, populated, from a read-only
//! descriptor, and moves it over its text with the usual single `mremap`: no
//! copy, no private memory, and no mapping that was ever writable (so it works
//! under memory-deny-write-execute, and no process can write through it).
//! What the page cache already maps huge in one process and not in another
//! changes which part is mapped, never which image.
//!
//! Layout: `<root>/<uid>/<name>` where `<root>` is a hugetlbfs mount (made by
//! `tiexec --setup`, default [`DEFAULT_ROOT`]) and `<uid>` the directory of
//! one user (0700, owned by that user). `<name>` is the object's file name
//! and the whole key (see [`ImageKey::file_name`]): a name is found only for
//! the very bytes it holds. `<name>.lock` is a zero-length lock file.
//!
//! Building (a miss): from the file on disk, never from the process's memory
//! (a debugger's breakpoint or a relocated text page must never be shared),
//! under an exclusive lock per image (a second process that misses meanwhile
//! waits for it, at most about twice the time the build is expected to take
//! on this machine, then goes on without the image), into an unnamed file
//! (`O_TMPFILE`) filled through a writable mapping that is then dropped, and
//! published with `linkat`, which never replaces a name. A crashed builder
//! leaves nothing behind: the unnamed file goes with its descriptor.
//!
//! Eviction only ever unlinks: a process that maps an image keeps its pages
//! until it exits. Nothing here truncates a file (a truncated hugetlbfs file
//! kills the processes mapping it with SIGBUS).
//!
//! Trust: an image is used only if it and its directory are owned by the
//! current user, are not writable by group or others, and were reached
//! without following a symlink. Anything else is left alone and reported.

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use crate::cgroup;
use crate::plan::huge_page;
use crate::state::{fnv1a, RateKind, StateDir};
use crate::sys::{self, Errno, Mapping, Prot};

/// Where `tiexec --setup` mounts the cache, and where processes look for it
/// unless `TIEXEC_CACHE` says otherwise.
pub const DEFAULT_ROOT: &str = "/run/tiexec";

/// The version of the image format, part of every name.
pub const FORMAT: &str = "v2";

/// Bytes of the object's file name kept in an image's name.
const NAME_BYTES: usize = 40;

/// Bytes of a build ID kept in an image's name (a SHA-1 ID is 20).
const BUILD_ID_BYTES: usize = 20;

/// How long after a file's last change (modification or status change) an
/// image of it may be shared: longer than any filesystem's timestamp tick
/// (1 s on filesystems without sub-second times, 2 s on FAT; a few ms even
/// on ext4, whose clock is coarse). Within it, a second change in the same
/// tick would leave the key (device, inode, size, times, build ID) as it
/// was, and the image would serve old text.
pub const SETTLE_NS: u64 = 2_000_000_000;

/// Whether a file with `identity` changed long enough ago (see
/// [`SETTLE_NS`]) for its key to tell every later version apart, at
/// `now_ns` (realtime); `Err` with its age otherwise.
pub fn settled(identity: &FileIdentity, now_ns: u64) -> Result<(), Failure> {
    let changed = identity.mtime_ns.max(identity.ctime_ns);
    let age = now_ns.saturating_sub(changed);
    if now_ns >= changed && age >= SETTLE_NS {
        Ok(())
    } else {
        Err(Failure::TooRecent {
            age_ms: age / 1_000_000,
        })
    }
}

/// Identity and version of a file: a different value means different bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileIdentity {
    /// Device (`st_dev`).
    pub dev: u64,
    /// Inode.
    pub ino: u64,
    /// Size in bytes.
    pub size: u64,
    /// Last modification, in nanoseconds since the epoch.
    pub mtime_ns: u64,
    /// Last status change, in nanoseconds since the epoch (no one can set
    /// it back).
    pub ctime_ns: u64,
}

fn ns(sec: i64, nsec: i64) -> u64 {
    (sec as u64)
        .wrapping_mul(1_000_000_000)
        .wrapping_add(nsec as u64)
}

impl FileIdentity {
    /// From `fstat`'s answer.
    pub fn of(st: &libc::stat) -> FileIdentity {
        FileIdentity {
            dev: st.st_dev,
            ino: st.st_ino,
            size: st.st_size as u64,
            mtime_ns: ns(st.st_mtime, st.st_mtime_nsec),
            ctime_ns: ns(st.st_ctime, st.st_ctime_nsec),
        }
    }

    /// Of an open file.
    pub fn of_fd(fd: BorrowedFd<'_>) -> Result<FileIdentity, Errno> {
        sys::fstat(fd).map(|st| FileIdentity::of(&st))
    }
}

/// Everything an image's bytes depend on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageKey {
    /// The object's file, identity and version.
    pub file: FileIdentity,
    /// Its ELF build ID (empty when it has none).
    pub build_id: Vec<u8>,
    /// Start of the region relative to the load bias.
    pub offset: u64,
    /// Length of the region, a multiple of the huge page.
    pub len: u64,
    /// The load bias modulo the huge page: where the file's bytes fall in
    /// the pages.
    pub phase: u64,
    /// A digest of the pieces: which bytes come from where in the file.
    pub layout: u64,
}

/// One part of an image that holds file bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    /// Offset in the image.
    pub at: u64,
    /// Offset in the file.
    pub file_offset: u64,
    /// Length.
    pub len: u64,
}

/// The digest of a layout, for the key.
pub fn layout_digest(pieces: &[Piece]) -> u64 {
    let mut bytes = Vec::with_capacity(pieces.len() * 24);
    for p in pieces {
        bytes.extend_from_slice(&p.at.to_le_bytes());
        bytes.extend_from_slice(&p.file_offset.to_le_bytes());
        bytes.extend_from_slice(&p.len.to_le_bytes());
    }
    fnv1a(&bytes)
}

/// A file name made safe: letters, digits and `._+-` kept, anything else
/// `_`, at most `max` bytes.
fn safe_name(name: &str, max: usize) -> String {
    name.bytes()
        .take(max)
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"._+-".contains(&b) {
                char::from(b)
            } else {
                '_'
            }
        })
        .collect()
}

/// Whether `name` is an image of the first format (one image per range,
/// `@v1-`, eleven fields ending in the strategy's letter): never used now,
/// but listed and evicted like any image so that its pages come back.
pub fn is_legacy_image_name(name: &str) -> bool {
    name.rsplit_once('@').is_some_and(|(_, rest)| {
        let fields: Vec<&str> = rest.split('-').collect();
        fields.len() == 12
            && fields.first() == Some(&"v1")
            && matches!(fields.last(), Some(&("a" | "c")))
    })
}

/// Whether `path` names a cache image of this format (what `tiexec --stat`
/// looks for among a process's mappings).
pub fn is_image_path(path: &str) -> bool {
    parse_name(path.rsplit('/').next().unwrap_or("")).is_some()
}

impl ImageKey {
    /// The image's file name: `<object file name>@v2-<key fields in hex>`.
    /// Every field of the key is in it (the build ID cut to 20 bytes), so a
    /// name matches only the bytes it was built from. At most ~240 bytes.
    pub fn file_name(&self, object_path: &str) -> String {
        let base = object_path.rsplit('/').next().unwrap_or("");
        let mut id = String::with_capacity(BUILD_ID_BYTES * 2);
        for b in self.build_id.iter().take(BUILD_ID_BYTES) {
            id.push_str(&format!("{b:02x}"));
        }
        if id.is_empty() {
            id.push('0');
        }
        let f = &self.file;
        format!(
            "{}@{FORMAT}-{:x}-{:x}-{:x}-{:x}-{:x}-{id}-{:x}-{:x}-{:x}-{:x}",
            safe_name(base, NAME_BYTES),
            f.dev,
            f.ino,
            f.size,
            f.mtime_ns,
            f.ctime_ns,
            self.offset,
            self.len,
            self.phase,
            self.layout,
        )
    }
}

/// The object a name was built from (its file name), and its length, when
/// `name` is an image's name.
pub fn parse_name(name: &str) -> Option<(&str, u64)> {
    let (base, rest) = name.rsplit_once('@')?;
    let mut fields = rest.split('-');
    if fields.next()? != FORMAT {
        return None;
    }
    let fields: Vec<&str> = fields.collect();
    if fields.len() != 10
        || !fields
            .iter()
            .all(|f| !f.is_empty() && f.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return None;
    }
    let len = u64::from_str_radix(fields.get(7)?, 16).ok()?;
    Some((base, len))
}

/// Why the cache cannot be used by this process at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unusable {
    /// `TIEXEC_CACHE=off`.
    Off,
    /// No hugetlbfs at the cache's path: `tiexec --setup` makes one.
    NotSetUp,
    /// The mount has no size limit and no hugetlb cgroup limit bounds this
    /// process: it would take pages from the pool that belong to the
    /// machine's applications.
    Unlimited,
    /// The user's directory could not be made or opened.
    UserDir(Errno),
    /// The user's directory is owned by someone else.
    ForeignDir(u32),
    /// The user's directory is writable by group or others.
    OpenDir,
    /// The user's directory, or the mount's path, is a symlink.
    SymlinkedDir,
    /// This process's user is the overflow ID (a user namespace that does
    /// not map it): any unmapped user's files look like its own.
    UnmappedUser,
}

impl core::fmt::Display for Unusable {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Unusable::Off => write!(f, "cache off"),
            Unusable::NotSetUp => write!(f, "no cache set up (tiexec --setup)"),
            Unusable::Unlimited => {
                write!(
                    f,
                    "the cache's hugetlbfs has no size limit, and no hugetlb cgroup limit bounds this process (mount it with size= and min_size=, as tiexec --setup does, or run in a cgroup with hugetlb.2MB.max set, as Kubernetes does for hugepages-2Mi)"
                )
            }
            Unusable::UserDir(Errno(libc::EACCES | libc::EPERM | libc::EROFS)) => write!(
                f,
                "this user cannot make its directory in the cache: permission denied (the mount \
                 must let each user make its own: mode 1777, as tiexec --setup mounts it)"
            ),
            Unusable::UserDir(e) => write!(f, "this user's directory in the cache: {e}"),
            Unusable::ForeignDir(uid) => {
                write!(
                    f,
                    "cache directory owned by uid {uid}, not by this user: not used"
                )
            }
            Unusable::OpenDir => {
                write!(f, "cache directory writable by group or others: not used")
            }
            Unusable::SymlinkedDir => {
                write!(f, "cache directory (or its mount) is a symlink: not used")
            }
            Unusable::UnmappedUser => write!(
                f,
                "this process's user is not mapped in its user namespace (uid {}): ownership proves nothing, the cache is not used",
                sys::overflow_uid()
            ),
        }
    }
}

/// Why one image was not used or made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// An entry with that name is not safe to use (owner, mode, type).
    Untrusted(&'static str),
    /// Another process was building this image, and had not published it
    /// after this one waited as long as a build should take.
    Busy {
        /// How long this process waited (ms).
        waited_ms: u64,
    },
    /// Not enough room, even after evicting what no process uses.
    NoRoom {
        /// 2 MiB pages needed.
        needed: u64,
        /// 2 MiB pages free.
        free: u64,
    },
    /// Creating the unnamed file failed.
    Create(Errno),
    /// Mapping it (reserving its pages) failed.
    Map(Errno),
    /// Faulting its pages in failed.
    Populate(Errno),
    /// Reading the object's file failed.
    Read(Errno),
    /// The object's file changed while its image was built.
    Changed,
    /// Naming the finished image failed.
    Link(Errno),
    /// Opening the finished image read-only failed.
    Reopen(Errno),
    /// The object's file changed too recently for its timestamps to tell
    /// a later change in the same tick: an image of it is not shared yet.
    TooRecent {
        /// How long ago it changed (ms; 0 when its times are ahead of the
        /// clock).
        age_ms: u64,
    },
}

impl core::fmt::Display for Failure {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Failure::Untrusted(why) => write!(f, "cache entry not used: {why}"),
            Failure::Busy { waited_ms } => write!(
                f,
                "another process is building its image (waited {waited_ms} ms, longer than a build should take)"
            ),
            Failure::NoRoom { needed, free } => write!(
                f,
                "cache full: {needed} pages needed, {free} free after evicting unused images"
            ),
            Failure::Create(e) => write!(f, "creating the image failed: {e}"),
            Failure::Map(e) => write!(f, "reserving the image's pages failed: {e}"),
            Failure::Populate(e) => write!(f, "allocating the image's pages failed: {e}"),
            Failure::Read(e) => write!(f, "reading the file for the image failed: {e}"),
            Failure::Changed => write!(f, "the file changed while its image was built"),
            Failure::Link(e) => write!(f, "publishing the image failed: {e}"),
            Failure::Reopen(e) => write!(f, "reopening the image failed: {e}"),
            Failure::TooRecent { age_ms } => write!(
                f,
                "its file changed {age_ms} ms ago: too recent for its timestamps to tell a change in the same tick, so no image is shared yet"
            ),
        }
    }
}

/// A usable image: a read-only descriptor and what it holds.
#[derive(Debug)]
pub struct Image {
    fd: OwnedFd,
    len: u64,
    /// Its name (also for private images, which have no name in the cache).
    pub name: String,
    /// Found ready (a hit), not built by this process.
    pub hit: bool,
}

impl Image {
    /// Maps `len` bytes of it from `offset` (both multiples of the huge
    /// page) r-x, shared, populated: nothing left to allocate later, so no
    /// SIGBUS; never writable, through this mapping or any other made from
    /// the read-only descriptor.
    #[allow(unsafe_code)] // maps a file: see the SAFETY note below
    pub fn map(&self, offset: u64, len: u64) -> Result<Mapping, Errno> {
        if offset.checked_add(len).is_none_or(|end| end > self.len) || offset % huge_page() != 0 {
            return Err(Errno(libc::EINVAL));
        }
        let len = usize::try_from(len).map_err(|_| Errno(libc::EINVAL))?;
        // SAFETY: `offset + len` lies within the image's length, checked
        // above; an image is linked read-only (0400/0444) and never opened
        // for writing again, so only its owner, after changing its mode,
        // or root could shrink it.
        unsafe { Mapping::file(self.fd.as_fd(), offset, len, Prot::READ_EXEC, true, true) }
    }

    /// The read-only descriptor (for the swap routine's restore path).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Its length.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when it holds nothing (never: images are whole 2 MiB pages).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// What the bytes of a new image are: pieces of one open file.
pub struct Content<'a> {
    /// The object's file, opened by the caller and checked to be the file
    /// that is mapped (same device and inode).
    pub file: BorrowedFd<'a>,
    /// Its identity when the key was made; checked again after building.
    pub identity: FileIdentity,
    /// Where its bytes go.
    pub pieces: &'a [Piece],
    /// The image's length.
    pub len: u64,
}

/// One entry, for listings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Its file name.
    pub name: String,
    /// Whose directory it is in.
    pub uid: u32,
    /// Its size in bytes.
    pub bytes: u64,
    /// Last use (or build), in seconds since the epoch.
    pub last_use: i64,
}

/// The cache of the current user, checked and open.
pub struct Cache {
    root: PathBuf,
    root_fd: OwnedFd,
    dir: OwnedFd,
    uid: u32,
}

fn c(name: &str) -> Result<CString, Errno> {
    CString::new(name).map_err(|_| Errno(libc::EINVAL))
}

/// True when `fd` is on a hugetlbfs mount.
fn on_hugetlbfs(fd: BorrowedFd<'_>) -> bool {
    sys::fstatfs(fd).is_ok_and(|s| s.f_type as u32 == libc::HUGETLBFS_MAGIC as u32)
}

/// 2 MiB pages the cache at `fd` may hold in all, and has free: the mount's
/// own size (`size=`); for a mount without one (a Kubernetes `HugePages`
/// volume), the hugetlb limit of this process's cgroup, which charges the
/// images' pages as the pod's (see `cgroup`). `None`: a mount of
/// another page size, or one nothing bounds.
fn mount_pages(fd: BorrowedFd<'_>) -> Option<(u64, u64)> {
    let s = sys::fstatfs(fd).ok()?;
    if s.f_bsize as u64 != huge_page() {
        return None;
    }
    let total = s.f_blocks;
    // No size of its own shows as 0 (no subpool) or as -1 pages.
    if total != 0 && total < u64::MAX / 2 {
        return Some((total, s.f_bfree));
    }
    cgroup::hugetlb_pages(huge_page())
}

/// 2 MiB pages in all and free of the cache at `path` (`None`: not a
/// hugetlbfs, not reachable, or bounded neither by its size nor by a
/// cgroup: see `mount_pages`).
pub fn hugetlbfs_pages(path: &Path) -> Option<(u64, u64)> {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    let fd = sys::open_dir_at(None, &c).ok()?;
    on_hugetlbfs(fd.as_fd()).then(|| mount_pages(fd.as_fd()))?
}

/// Whether `path` is (the root of, or in) a hugetlbfs.
pub fn is_hugetlbfs(path: &Path) -> bool {
    CString::new(path.as_os_str().as_encoded_bytes())
        .ok()
        .and_then(|c| sys::open_dir_at(None, &c).ok())
        .is_some_and(|fd| on_hugetlbfs(fd.as_fd()))
}

impl Cache {
    /// Opens the cache at `root` for the current user: checks it is a
    /// hugetlbfs mount with a size limit, and creates or checks the user's
    /// directory.
    pub fn open(root: &Path) -> Result<Cache, Unusable> {
        if sys::identity_unmapped() {
            return Err(Unusable::UnmappedUser);
        }
        // The path processes' maps will show for the images: its parents
        // resolved (/var/run -> /run), the mount point itself never followed.
        let (Some(parent), Some(name)) = (root.parent(), root.file_name()) else {
            return Err(Unusable::NotSetUp);
        };
        let root = std::fs::canonicalize(parent)
            .map_err(|_| Unusable::NotSetUp)?
            .join(name);
        let root_c =
            CString::new(root.as_os_str().as_encoded_bytes()).map_err(|_| Unusable::NotSetUp)?;
        let root_fd = match sys::open_dir_at(None, &root_c) {
            Ok(fd) => fd,
            Err(_) if std::fs::symlink_metadata(&root).is_ok_and(|m| m.is_symlink()) => {
                return Err(Unusable::SymlinkedDir)
            }
            Err(_) => return Err(Unusable::NotSetUp),
        };
        if !on_hugetlbfs(root_fd.as_fd()) {
            return Err(Unusable::NotSetUp);
        }
        if mount_pages(root_fd.as_fd()).is_none() {
            return Err(Unusable::Unlimited);
        }
        let uid = sys::effective_uid();
        let name = c(&uid.to_string()).map_err(Unusable::UserDir)?;
        let dir = match sys::open_dir_at(Some(root_fd.as_fd()), &name) {
            Ok(fd) => fd,
            Err(Errno(libc::ENOENT)) => {
                match sys::mkdir_at(root_fd.as_fd(), &name, 0o700) {
                    Ok(()) | Err(Errno(libc::EEXIST)) => {}
                    Err(e) => return Err(Unusable::UserDir(e)),
                }
                sys::open_dir_at(Some(root_fd.as_fd()), &name).map_err(|e| match e {
                    Errno(libc::ELOOP) => Unusable::SymlinkedDir,
                    e => Unusable::UserDir(e),
                })?
            }
            // O_NOFOLLOW|O_DIRECTORY on a symlink: ELOOP, or ENOTDIR when
            // it points at something other than a directory.
            Err(Errno(libc::ELOOP | libc::ENOTDIR)) => {
                let is_link = sys::lstat_at(root_fd.as_fd(), &name)
                    .is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFLNK);
                return Err(if is_link {
                    Unusable::SymlinkedDir
                } else {
                    Unusable::UserDir(Errno(libc::ENOTDIR))
                });
            }
            Err(e) => return Err(Unusable::UserDir(e)),
        };
        let st = sys::fstat(dir.as_fd()).map_err(Unusable::UserDir)?;
        if st.st_uid != uid {
            return Err(Unusable::ForeignDir(st.st_uid));
        }
        if st.st_mode & 0o022 != 0 {
            return Err(Unusable::OpenDir);
        }
        Ok(Cache {
            root,
            root_fd,
            dir,
            uid,
        })
    }

    /// The mount's path.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The user's directory's path.
    pub fn dir_path(&self) -> PathBuf {
        self.root.join(self.uid.to_string())
    }

    /// 2 MiB pages the mount allows in all, and has free.
    pub fn pages(&self) -> (u64, u64) {
        mount_pages(self.root_fd.as_fd()).unwrap_or((0, 0))
    }

    /// The status of an entry opened in the cache, if it may be used: a
    /// regular file of this user that only the user can write.
    fn trusted(&self, fd: BorrowedFd<'_>) -> Result<libc::stat, Failure> {
        let st = sys::fstat(fd).map_err(|_| Failure::Untrusted("it cannot be examined"))?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(Failure::Untrusted("not a regular file"));
        }
        if st.st_uid != self.uid {
            return Err(Failure::Untrusted("owned by another user"));
        }
        if st.st_mode & 0o022 != 0 {
            return Err(Failure::Untrusted("writable by group or others"));
        }
        Ok(st)
    }

    /// Finds the image `name`: `Ok(None)` when there is none (an entry of
    /// the wrong size is removed first), `Err` when one is there but not
    /// safe to use.
    pub fn lookup(&self, name: &str, len: u64) -> Result<Option<Image>, Failure> {
        let name_c = c(name).map_err(|_| Failure::Untrusted("bad name"))?;
        let fd = match sys::open_at(
            Some(self.dir.as_fd()),
            &name_c,
            // O_NONBLOCK: a FIFO planted under the name must not hang us.
            libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK,
            0,
        ) {
            Ok(fd) => fd,
            Err(Errno(libc::ENOENT)) => return Ok(None),
            Err(Errno(libc::ELOOP)) => return Err(Failure::Untrusted("it is a symlink")),
            Err(_) => return Err(Failure::Untrusted("it cannot be opened")),
        };
        let st = self.trusted(fd.as_fd())?;
        if st.st_size as u64 != len {
            // Not what its name promises (truncated, or a stray file):
            // remove the name; processes still mapping it keep their pages.
            let _ = sys::unlink_at(self.dir.as_fd(), &name_c);
            crate::tlog!(
                crate::log::Level::Info,
                "cache entry {name}: {} bytes where its key says {len}: removed",
                st.st_size
            );
            return Ok(None);
        }
        // Last use, for eviction (owner may set the times of a 0400 file).
        let _ = sys::touch(fd.as_fd());
        Ok(Some(Image {
            fd,
            len,
            name: name.to_string(),
            hit: true,
        }))
    }

    /// What [`Cache::get_or_build`] would do for image `name` of `len`
    /// bytes, without doing it or touching anything: `Ok(true)` a hit,
    /// `Ok(false)` a build that fits (counting what eviction could free),
    /// `Err` why it would fail. A published image is found by name; a
    /// private one (`shared` false) is always built.
    pub fn foresee(
        &self,
        name: &str,
        len: u64,
        shared: bool,
        identity: Option<&FileIdentity>,
    ) -> Result<bool, Failure> {
        if let (true, Some(identity)) = (shared, identity) {
            settled(identity, sys::realtime_ns())?;
        }
        if shared {
            let name_c = c(name).map_err(|_| Failure::Untrusted("bad name"))?;
            if let Ok(fd) = sys::open_at(
                Some(self.dir.as_fd()),
                &name_c,
                libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK,
                0,
            ) {
                if self.trusted(fd.as_fd())?.st_size as u64 == len {
                    return Ok(true);
                }
            }
        }
        let pages = len / huge_page();
        let (_, free) = self.pages();
        if free >= pages {
            return Ok(false);
        }
        let in_use = images_in_use(&self.dir_path());
        let evictable: u64 = self
            .entries()
            .iter()
            .filter(|e| !in_use.contains(&e.name))
            .map(|e| e.bytes / huge_page())
            .sum();
        if free + evictable >= pages {
            Ok(false)
        } else {
            Err(Failure::NoRoom {
                needed: pages,
                free: free + evictable,
            })
        }
    }

    /// Returns the image `name` holding `content`: found (a hit), or built
    /// now. With `publish`, a built image gets its name in the cache (under
    /// the image's lock: a process that finds the lock taken waits for the
    /// builder, at most `wait_ms`, and then uses what it published; after
    /// that it gets [`Failure::Busy`] and goes on without); without, it stays
    /// unnamed and private to this process (text whose load address is
    /// random: no other process could use it).
    pub fn get_or_build(
        &self,
        name: &str,
        content: &Content<'_>,
        publish: bool,
        wait_ms: u64,
        state: Option<&StateDir>,
        object: &str,
    ) -> Result<Image, Failure> {
        if publish {
            // Neither used nor made while the file's times cannot tell a
            // change in the same tick (see `SETTLE_NS`).
            settled(&content.identity, sys::realtime_ns())?;
        }
        let _lock = if publish {
            if let Some(image) = self.lookup(name, content.len)? {
                if let Some(s) = state {
                    s.image_hit(name, object);
                }
                return Ok(image);
            }
            let lock = self.lock(name, wait_ms)?;
            // Published between the lookup and the lock (by the process
            // waited for)?
            if let Some(image) = self.lookup(name, content.len)? {
                if let Some(s) = state {
                    s.image_hit(name, object);
                }
                return Ok(image);
            }
            Some(lock)
        } else {
            None
        };
        let pages = content.len / huge_page();
        self.make_room(pages, state)?;
        let started = sys::monotonic_ns();
        let image = self.build(content)?;
        if let (Some(s), true) = (state, content.len >= huge_page()) {
            let us = sys::monotonic_ns().saturating_sub(started) / 1000;
            let per_mib = us.saturating_mul(1 << 20) / content.len;
            s.record_rate(RateKind::Image, u32::try_from(per_mib).unwrap_or(u32::MAX));
        }
        if !publish {
            return Ok(Image {
                fd: sys::reopen_read_only(image.as_fd()).map_err(Failure::Reopen)?,
                len: content.len,
                name: name.to_string(),
                hit: false,
            });
        }
        let name_c = c(name).map_err(|_| Failure::Untrusted("bad name"))?;
        match sys::link_tmpfile(image.as_fd(), self.dir.as_fd(), &name_c) {
            Ok(()) => {}
            // Published by a process that did not take the lock (its lock
            // file was evicted meanwhile): use that one.
            Err(Errno(libc::EEXIST)) => {
                return self
                    .lookup(name, content.len)?
                    .ok_or(Failure::Link(Errno(libc::EEXIST)))
            }
            Err(e) => return Err(Failure::Link(e)),
        }
        if let Some(s) = state {
            s.image_built(name, object);
        }
        // Opened by its name, so that /proc/PID/maps shows it (what the
        // unnamed file's descriptor would show is a temporary name): that
        // is how eviction and `tiexec --stat` tell who maps it.
        let fd = match self.lookup(name, content.len) {
            Ok(Some(found)) => found.fd,
            _ => sys::reopen_read_only(image.as_fd()).map_err(Failure::Reopen)?,
        };
        Ok(Image {
            fd,
            len: content.len,
            name: name.to_string(),
            hit: false,
        })
    }

    /// Takes the image's build lock. When another process holds it (it is
    /// building the image), waits for it, polling, at most `wait_ms`: never
    /// unboundedly.
    fn lock(&self, name: &str, wait_ms: u64) -> Result<OwnedFd, Failure> {
        let lock_c = c(&format!("{name}.lock")).map_err(|_| Failure::Untrusted("bad name"))?;
        let fd = sys::open_at(
            Some(self.dir.as_fd()),
            &lock_c,
            libc::O_RDONLY | libc::O_CREAT | libc::O_NOFOLLOW,
            0o600,
        )
        .map_err(Failure::Create)?;
        let started = sys::monotonic_ns();
        let mut pause_us = 500;
        loop {
            match sys::try_lock_exclusive(fd.as_fd()) {
                Ok(true) => return Ok(fd),
                Ok(false) => {}
                Err(e) => return Err(Failure::Create(e)),
            }
            let waited_ms = sys::monotonic_ns().saturating_sub(started) / 1_000_000;
            if waited_ms >= wait_ms {
                return Err(Failure::Busy { waited_ms });
            }
            sys::sleep_us(pause_us);
            pause_us = (pause_us * 2).min(4000);
        }
    }

    /// How long a process should wait for another's build of `len` bytes
    /// (ms): twice what builds measured on this machine took for that size
    /// (`us_per_mib`, 0: unknown, taken as 2 ms/MiB), plus 20 ms for the
    /// scheduler, at most 5 s.
    pub fn wait_for_build_ms(len: u64, us_per_mib: u32) -> u64 {
        let rate = if us_per_mib == 0 {
            2000
        } else {
            u64::from(us_per_mib)
        };
        let expected_ms = (len >> 20).saturating_mul(rate) / 1000;
        (expected_ms.saturating_mul(2) + 20).min(5000)
    }

    /// Builds an unnamed image file holding `content`; returns its
    /// read-write descriptor.
    #[allow(unsafe_code)] // maps its own unnamed file: see the SAFETY note
    fn build(&self, content: &Content<'_>) -> Result<OwnedFd, Failure> {
        let len = usize::try_from(content.len).map_err(|_| Failure::Map(Errno(libc::EINVAL)))?;
        let file = sys::open_at(
            Some(self.dir.as_fd()),
            c".",
            libc::O_TMPFILE | libc::O_RDWR,
            0o400,
        )
        .map_err(Failure::Create)?;
        sys::ftruncate(file.as_fd(), content.len).map_err(Failure::Create)?;
        {
            // A shared hugetlbfs mapping reserves its pages now: a shortage
            // is ENOMEM here, not SIGBUS later.
            // SAFETY: an unnamed file (O_TMPFILE) only this process holds,
            // sized above.
            let mut map =
                unsafe { Mapping::file(file.as_fd(), 0, len, Prot::READ_WRITE, true, false) }
                    .map_err(Failure::Map)?;
            map.advise(sys::MADV_POPULATE_WRITE)
                .map_err(Failure::Populate)?;
            let bytes = map.bytes_mut().ok_or(Failure::Map(Errno(libc::EFAULT)))?;
            for p in content.pieces {
                let (at, n) = (p.at as usize, p.len as usize);
                let dst = bytes
                    .get_mut(at..at.saturating_add(n))
                    .ok_or(Failure::Read(Errno(libc::EINVAL)))?;
                // Past the end of the file (the last page of a segment) the
                // mapping reads zeros, and so does the image.
                sys::pread_full(content.file, dst, p.file_offset).map_err(Failure::Read)?;
            }
            map.sync_icache();
        }
        if FileIdentity::of_fd(content.file).ok() != Some(content.identity) {
            return Err(Failure::Changed);
        }
        Ok(file)
    }

    /// Evicts least recently used images that no process maps until `pages`
    /// fit.
    fn make_room(&self, pages: u64, state: Option<&StateDir>) -> Result<(), Failure> {
        let (_, free) = self.pages();
        if free >= pages {
            return Ok(());
        }
        let mut entries = self.entries();
        entries.sort_by_key(|e| e.last_use);
        let in_use = images_in_use(&self.dir_path());
        let mut free = free;
        for e in entries {
            if free >= pages {
                break;
            }
            if in_use.contains(&e.name) {
                continue;
            }
            if self.remove(&e.name).is_ok() {
                if let Some(s) = state {
                    s.image_removed(&e.name);
                }
                crate::tlog!(
                    crate::log::Level::Debug,
                    "cache: evicted {} ({} pages)",
                    e.name,
                    e.bytes / huge_page()
                );
            }
            free = self.pages().1;
        }
        if free >= pages {
            Ok(())
        } else {
            Err(Failure::NoRoom {
                needed: pages,
                free,
            })
        }
    }

    /// Unlinks image `name` and its lock file. Processes that map it keep
    /// their pages until they exit; nothing is truncated.
    pub fn remove(&self, name: &str) -> Result<(), Errno> {
        let name_c = c(name)?;
        sys::unlink_at(self.dir.as_fd(), &name_c)?;
        if let Ok(lock) = c(&format!("{name}.lock")) {
            let _ = sys::unlink_at(self.dir.as_fd(), &lock);
        }
        Ok(())
    }

    /// The user's images.
    pub fn entries(&self) -> Vec<Entry> {
        entries_in(&proc_fd_dir(self.dir.as_fd()), self.uid)
    }
}

/// The directory behind `fd`, as a path that always reaches it.
fn proc_fd_dir(fd: BorrowedFd<'_>) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// The images in `dir` (which belongs to `uid`).
pub fn entries_in(dir: &Path, uid: u32) -> Vec<Entry> {
    use std::os::unix::fs::MetadataExt;
    let Ok(list) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    list.flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let legacy = is_legacy_image_name(&name);
            if parse_name(&name).is_none() && !legacy {
                return None;
            }
            let meta = e.metadata().ok()?;
            meta.is_file().then(|| Entry {
                name,
                uid,
                bytes: meta.len(),
                // Images of the first format are never used again: the
                // first to be evicted.
                last_use: if legacy { i64::MIN } else { meta.mtime() },
            })
        })
        .collect()
}

/// Paths of files under `dir` that processes map now, with how many
/// processes map each (from /proc/*/maps: those of this user, or all for
/// root). A removed image that is still mapped counts under its old path.
pub fn mapped_under(dir: &Path) -> Vec<(PathBuf, usize)> {
    let prefix = format!("{}/", dir.display());
    let mut counts: Vec<(PathBuf, usize)> = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return counts;
    };
    for p in procs.flatten() {
        if !p
            .file_name()
            .as_encoded_bytes()
            .iter()
            .all(u8::is_ascii_digit)
        {
            continue;
        }
        let Ok(maps) = std::fs::read_to_string(p.path().join("maps")) else {
            continue;
        };
        let mut seen: Vec<&str> = Vec::new();
        for line in maps.lines() {
            let Some(i) = line.find(&prefix) else {
                continue;
            };
            let path = line.get(i..).unwrap_or("");
            let path = path.strip_suffix(" (deleted)").unwrap_or(path);
            if seen.contains(&path) {
                continue;
            }
            seen.push(path);
            match counts.iter_mut().find(|(p, _)| p.as_os_str() == path) {
                Some((_, n)) => *n += 1,
                None => counts.push((PathBuf::from(path), 1)),
            }
        }
    }
    counts
}

/// Names of the images under `dir` that some process maps now.
pub fn images_in_use(dir: &Path) -> Vec<String> {
    mapped_under(dir)
        .into_iter()
        .filter_map(|(p, _)| Some(p.file_name()?.to_string_lossy().into_owned()))
        .collect()
}

/// The users' directories in the cache at `root`: `(uid, path)`.
pub fn user_dirs(root: &Path) -> Vec<(u32, PathBuf)> {
    let Ok(list) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let mut out: Vec<(u32, PathBuf)> = list
        .flatten()
        .filter_map(|e| {
            let uid = e.file_name().to_str()?.parse().ok()?;
            e.file_type().ok()?.is_dir().then(|| (uid, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// Removes image `name` and its lock file from the user directory `dir`
/// (root's way to evict another user's images). Unlinks only.
pub fn remove_in(dir: &Path, name: &str) -> std::io::Result<()> {
    std::fs::remove_file(dir.join(name))?;
    let _ = std::fs::remove_file(dir.join(format!("{name}.lock")));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> ImageKey {
        ImageKey {
            file: FileIdentity {
                dev: 0xfe00,
                ino: 0x2f2a7,
                size: 0x5f5e100,
                mtime_ns: 0x1800000000000000,
                ctime_ns: 0x1800000000000001,
            },
            build_id: vec![0xab; 20],
            offset: 0x1200000,
            len: 0x3c00000,
            phase: 0,
            layout: 0x1234,
        }
    }

    #[test]
    fn names_hold_the_whole_key_and_stay_short() {
        let k = key();
        let name = k.file_name("/usr/lib/x86_64-linux-gnu/libLLVM.so.22.1");
        assert!(name.starts_with("libLLVM.so.22.1@v2-fe00-2f2a7-"), "{name}");
        assert!(name.len() < 255);
        assert_eq!(parse_name(&name), Some(("libLLVM.so.22.1", 0x3c00000)));
        // Any field changed: another name.
        let mut changed = k.clone();
        changed.file.ctime_ns += 1;
        assert_ne!(
            changed.file_name("/x/libLLVM.so.22.1"),
            k.file_name("/x/libLLVM.so.22.1")
        );
        let mut phase = k.clone();
        phase.phase = 0x1000;
        assert_ne!(phase.file_name("/x/a"), k.file_name("/x/a"));
        // The longest possible name still fits a file name.
        let worst = ImageKey {
            file: FileIdentity {
                dev: u64::MAX,
                ino: u64::MAX,
                size: u64::MAX,
                mtime_ns: u64::MAX,
                ctime_ns: u64::MAX,
            },
            build_id: vec![0xff; 64],
            offset: u64::MAX,
            len: u64::MAX,
            phase: u64::MAX,
            layout: u64::MAX,
        };
        let name = worst.file_name(&format!("/{}", "n".repeat(300)));
        assert!(name.len() <= 255, "{} bytes", name.len());
        assert!(parse_name(&name).is_some());
    }

    #[test]
    fn odd_object_names_become_safe_names() {
        let name = key().file_name("/opt/we ird/lib@x:y.so");
        assert!(name.starts_with("lib_x_y.so@v2-"), "{name}");
        assert!(parse_name("not-an-image").is_none());
        assert!(parse_name("x@v3-1-2").is_none());
        assert!(parse_name("x.lock").is_none());
        let lock = format!("{}.lock", key().file_name("/x/libx.so"));
        assert!(parse_name(&lock).is_none());
        assert!(is_image_path(&format!(
            "/run/c/{}",
            key().file_name("/x/libx.so")
        )));
        assert!(!is_image_path("/run/c/x@v2-"));
        // The first format's names (one image per range) are not images now,
        // but are known, to be evicted.
        assert!(parse_name("a@v1-1-2-3-4-5-0-6-200000-0-7-a").is_none());
        assert!(is_legacy_image_name("a@v1-1-2-3-4-5-0-6-200000-0-7-a"));
        assert!(!is_legacy_image_name("a@v1-1-2-3.lock"));
    }

    #[test]
    fn layouts_digest_every_field() {
        let a = [Piece {
            at: 0x1000,
            file_offset: 0,
            len: 0x1000,
        }];
        let b = [Piece {
            at: 0x1000,
            file_offset: 0x1000,
            len: 0x1000,
        }];
        assert_ne!(layout_digest(&a), layout_digest(&b));
    }

    #[test]
    fn files_changed_within_a_timestamp_tick_are_not_shared_yet() {
        let now = 1_800_000_000_000_000_000;
        let at = |mtime_ns, ctime_ns| FileIdentity {
            dev: 1,
            ino: 2,
            size: 3,
            mtime_ns,
            ctime_ns,
        };
        assert_eq!(
            settled(&at(now - 10 * SETTLE_NS, now - SETTLE_NS), now),
            Ok(())
        );
        assert_eq!(
            settled(&at(now - 10 * SETTLE_NS, now - 1_500_000_000), now),
            Err(Failure::TooRecent { age_ms: 1500 })
        );
        // Times ahead of the clock (another machine's, over NFS): not yet.
        assert!(settled(&at(now + 1, now + 1), now).is_err());
    }

    #[test]
    fn a_directory_that_is_not_hugetlbfs_is_no_cache() {
        assert_eq!(
            Cache::open(&std::env::temp_dir()).err(),
            Some(Unusable::NotSetUp)
        );
        assert_eq!(
            Cache::open(Path::new("/nonexistent/tiexec")).err(),
            Some(Unusable::NotSetUp)
        );
    }
}
