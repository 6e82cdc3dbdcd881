//! The limits this process's cgroups set, read the same way for every
//! controller: the tightest over the process's cgroup and its ancestors
//! visible under the hierarchy's mount, in cgroup v2 or a v1 hierarchy.
//!
//! Two users: the memory controller bounds private THP copies (over its
//! limit the kernel reclaims and may OOM-kill: `staging` checks the room
//! first), and the hugetlb controller bounds an image cache on a hugetlbfs
//! mounted without `size=`. Kubernetes gives a pod its `hugepages-2Mi` as an
//! `emptyDir` of medium `HugePages`: a hugetlbfs with no size of its own,
//! bounded by the pod's hugetlb cgroup (`hugetlb.2MB.max` in v2,
//! `limit_in_bytes` in v1), which charges every page a process of the pod
//! faults in, image files included, until they are freed. That limit is the
//! pod's own allowance, so within it the cache may grow; with no limit
//! anywhere up the tree an unlimited mount would take the machine's pool,
//! and the cache refuses it (see `cache::Unusable::Unlimited`).
//!
//! Inputs: `/proc/self/cgroup` (which cgroup, per hierarchy),
//! `/proc/self/mountinfo` (where that hierarchy is mounted and which of its
//! cgroups is the mount's root: the mount point is not assumed, hybrid
//! systems mount v2 at `/sys/fs/cgroup/unified`), and the controller's files
//! of the cgroup and each ancestor. Output: the tightest limit and what is
//! left of it. No effect. A limit whose files cannot be found or read counts
//! as none.

use std::path::{Path, PathBuf};

/// A finite limit on this process, the tightest over its cgroup and the
/// ancestors visible to it, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit {
    /// Bytes the limit allows in all.
    pub bytes: u64,
    /// Bytes still free under it (the limit less what is charged).
    pub free: u64,
}

/// The tightest finite limit on this process that `controller`'s files
/// set, if any cgroup up its tree sets one. `v2` and `v1` are the
/// `(limit, usage)` file names in each generation, several where the
/// controller has several limits (hugetlb: faults and reservations).
pub fn limit(controller: &str, v2: &[(&str, &str)], v1: &[(&str, &str)]) -> Option<Limit> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let (v2_cgroup, v1_cgroup) = cgroups_of(&cgroups, controller);
    let mut tightest: Option<Limit> = None;
    for (version, cgroup, pairs) in [(Version::V2, v2_cgroup, v2), (Version::V1, v1_cgroup, v1)] {
        let Some(cgroup) = cgroup else { continue };
        let Some(mount) = mount_of(&mounts, version, controller) else {
            continue;
        };
        let Some(dir) = cgroup_dir(&mount, cgroup) else {
            continue;
        };
        if let Some(l) = limit_up_from(&dir, &mount.point, pairs) {
            tightest = Some(tighter(tightest, l));
        }
    }
    tightest
}

/// The memory limit on this process (v2 `memory.max`, v1
/// `memory.limit_in_bytes`).
pub fn memory() -> Option<Limit> {
    limit(
        "memory",
        &[("memory.max", "memory.current")],
        &[("memory.limit_in_bytes", "memory.usage_in_bytes")],
    )
}

/// The hugetlb limit on this process for pages of `huge` bytes, in pages:
/// `(in all, free)`. Faults and reservations (`rsvd`) both bound it.
pub fn hugetlb_pages(huge: u64) -> Option<(u64, u64)> {
    let size = size_name(huge)?;
    let f = |name: &str| format!("hugetlb.{size}.{name}");
    let (max, current) = (f("max"), f("current"));
    let (rsvd_max, rsvd_current) = (f("rsvd.max"), f("rsvd.current"));
    let (limit_in, usage_in) = (f("limit_in_bytes"), f("usage_in_bytes"));
    let (rsvd_limit_in, rsvd_usage_in) = (f("rsvd.limit_in_bytes"), f("rsvd.usage_in_bytes"));
    limit(
        "hugetlb",
        &[(&max, &current), (&rsvd_max, &rsvd_current)],
        &[(&limit_in, &usage_in), (&rsvd_limit_in, &rsvd_usage_in)],
    )
    .map(|l| (l.bytes / huge, l.free / huge))
}

/// The cgroup hierarchies' generations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Version {
    /// The unified hierarchy.
    V2,
    /// A v1 hierarchy holding the controller.
    V1,
}

/// The kernel's name for a huge page size in the controller's file names
/// (`hugetlb_cgroup.c`: "2MB", "1GB", "64KB").
fn size_name(huge: u64) -> Option<String> {
    const KIB: u64 = 1 << 10;
    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;
    Some(if huge >= GIB && huge % GIB == 0 {
        format!("{}GB", huge / GIB)
    } else if huge >= MIB && huge % MIB == 0 {
        format!("{}MB", huge / MIB)
    } else if huge >= KIB && huge % KIB == 0 {
        format!("{}KB", huge / KIB)
    } else {
        return None;
    })
}

/// This process's cgroup in the unified hierarchy (`0::PATH`) and in the v1
/// hierarchy holding `controller` (`N:...,controller,...:PATH`).
fn cgroups_of<'a>(proc_cgroup: &'a str, controller: &str) -> (Option<&'a str>, Option<&'a str>) {
    let mut v2 = None;
    let mut v1 = None;
    for line in proc_cgroup.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if id == "0" && controllers.is_empty() {
            v2 = Some(path);
        } else if controllers.split(',').any(|c| c == controller) {
            v1 = Some(path);
        }
    }
    (v2, v1)
}

/// A cgroup hierarchy's mount: where it is, and which cgroup it shows at
/// that point (`/` unless a sub-cgroup was bind-mounted, or the mount was
/// made in another cgroup namespace).
#[derive(Debug, PartialEq, Eq)]
struct Mount {
    point: PathBuf,
    root: String,
}

/// The mount of the unified hierarchy, or of the v1 hierarchy holding
/// `controller`, from `/proc/self/mountinfo`.
fn mount_of(mountinfo: &str, version: Version, controller: &str) -> Option<Mount> {
    for line in mountinfo.lines() {
        // ID PARENT MAJ:MIN ROOT POINT OPTIONS [OPTIONAL...] - TYPE SOURCE SUPER
        let Some((before, after)) = line.split_once(" - ") else {
            continue;
        };
        let fields: Vec<&str> = before.split(' ').collect();
        let mut tail = after.split(' ');
        let (Some(fstype), _source, super_options) = (tail.next(), tail.next(), tail.next()) else {
            continue;
        };
        let (Some(root), Some(point)) = (fields.get(3), fields.get(4)) else {
            continue;
        };
        let wanted = match version {
            Version::V2 => fstype == "cgroup2",
            Version::V1 => {
                fstype == "cgroup"
                    && super_options.is_some_and(|o| o.split(',').any(|c| c == controller))
            }
        };
        if wanted {
            return Some(Mount {
                point: PathBuf::from(unescape(point)),
                root: unescape(root),
            });
        }
    }
    None
}

/// A mountinfo field with its octal escapes (`\040` for a space) undone.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = bytes.get(i + 1..i + 4).and_then(|d| {
            let s = std::str::from_utf8(d).ok()?;
            u8::from_str_radix(s, 8).ok()
        });
        match (bytes[i], escaped) {
            (b'\\', Some(b)) => {
                out.push(b);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The directory of `cgroup` under `mount`: `None` when the mount does not
/// show it (the cgroup lies outside the mount's root).
fn cgroup_dir(mount: &Mount, cgroup: &str) -> Option<PathBuf> {
    let root = mount.root.trim_end_matches('/');
    let below = cgroup.strip_prefix(root)?;
    if !(below.is_empty() || below.starts_with('/')) {
        return None;
    }
    let below = below.trim_start_matches('/');
    if below.split('/').any(|c| c == "..") {
        return None;
    }
    Some(if below.is_empty() {
        mount.point.clone()
    } else {
        mount.point.join(below)
    })
}

/// The tightest finite limit from `dir` up to `top` (the mount point)
/// inclusive.
fn limit_up_from(dir: &Path, top: &Path, pairs: &[(&str, &str)]) -> Option<Limit> {
    let mut tightest = None;
    let mut at = Some(dir);
    while let Some(d) = at {
        if let Some(l) = limit_in(d, pairs) {
            tightest = Some(tighter(tightest, l));
        }
        if d == top {
            break;
        }
        at = d.parent().filter(|p| p.starts_with(top));
    }
    tightest
}

/// The finite limit one cgroup sets, the tightest of its `(limit, usage)`
/// file pairs.
fn limit_in(dir: &Path, pairs: &[(&str, &str)]) -> Option<Limit> {
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).ok();
    let mut tightest = None;
    for (limit, usage) in pairs {
        let Some(max) = read(limit).and_then(|t| bytes_limit(&t)) else {
            continue;
        };
        let used = read(usage)
            .and_then(|t| t.trim().parse::<u64>().ok())
            .unwrap_or(max);
        let l = Limit {
            bytes: max,
            free: max.saturating_sub(used),
        };
        tightest = Some(tighter(tightest, l));
    }
    tightest
}

/// A limit file's bytes, `None` for no limit: v2 writes "max", v1 the page
/// counter's maximum (about 2^63 bytes).
fn bytes_limit(text: &str) -> Option<u64> {
    let t = text.trim();
    if t == "max" {
        return None;
    }
    t.parse::<u64>().ok().filter(|&b| b < 1 << 60)
}

/// The tighter of two limits, each bound kept (a level with more room may
/// have less left).
fn tighter(a: Option<Limit>, b: Limit) -> Limit {
    match a {
        None => b,
        Some(a) => Limit {
            bytes: a.bytes.min(b.bytes),
            free: a.free.min(b.free),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_names_are_the_kernels() {
        assert_eq!(size_name(2 << 20).as_deref(), Some("2MB"));
        assert_eq!(size_name(1 << 30).as_deref(), Some("1GB"));
        assert_eq!(size_name(32 << 20).as_deref(), Some("32MB"));
        assert_eq!(size_name(64 << 10).as_deref(), Some("64KB"));
        assert_eq!(size_name(1000), None);
    }

    #[test]
    fn the_cgroups_holding_a_controller_are_found() {
        let mixed = "12:hugetlb:/kubepods/pod1/c1\n4:memory:/x\n0::/kubepods/pod1/c1\n";
        assert_eq!(
            cgroups_of(mixed, "hugetlb"),
            (Some("/kubepods/pod1/c1"), Some("/kubepods/pod1/c1"))
        );
        assert_eq!(
            cgroups_of(mixed, "memory"),
            (Some("/kubepods/pod1/c1"), Some("/x"))
        );
        let v1_shared = "3:cpu,hugetlb:/a\n1:name=systemd:/\n";
        assert_eq!(cgroups_of(v1_shared, "hugetlb"), (None, Some("/a")));
        assert_eq!(cgroups_of(v1_shared, "memory"), (None, None));
        assert_eq!(cgroups_of("0::/\n", "hugetlb"), (Some("/"), None));
        assert_eq!(cgroups_of("garbage\n", "memory"), (None, None));
    }

    #[test]
    fn mounts_are_read_from_mountinfo() {
        let info = "\
30 1 0:26 / /sys/fs/cgroup rw,nosuid - tmpfs tmpfs rw
35 30 0:31 / /sys/fs/cgroup/memory rw shared:9 - cgroup cgroup rw,memory
40 30 0:35 /kubepods /sys/fs/cgroup/hugetlb\\040x rw - cgroup cgroup rw,hugetlb
41 30 0:36 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
";
        assert_eq!(
            mount_of(info, Version::V2, "hugetlb"),
            Some(Mount {
                point: "/sys/fs/cgroup/unified".into(),
                root: "/".into()
            })
        );
        assert_eq!(
            mount_of(info, Version::V1, "hugetlb"),
            Some(Mount {
                point: "/sys/fs/cgroup/hugetlb x".into(),
                root: "/kubepods".into()
            })
        );
        assert_eq!(
            mount_of(info, Version::V1, "memory"),
            Some(Mount {
                point: "/sys/fs/cgroup/memory".into(),
                root: "/".into()
            })
        );
        assert_eq!(mount_of(info, Version::V1, "pids"), None);
        assert_eq!(mount_of("", Version::V2, "memory"), None);
    }

    #[test]
    fn a_cgroup_is_found_under_its_mounts_root() {
        let at_root = Mount {
            point: "/sys/fs/cgroup".into(),
            root: "/".into(),
        };
        assert_eq!(
            cgroup_dir(&at_root, "/a/b"),
            Some(PathBuf::from("/sys/fs/cgroup/a/b"))
        );
        assert_eq!(
            cgroup_dir(&at_root, "/"),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        let bound = Mount {
            point: "/c".into(),
            root: "/kubepods/pod1".into(),
        };
        assert_eq!(
            cgroup_dir(&bound, "/kubepods/pod1/c1"),
            Some(PathBuf::from("/c/c1"))
        );
        assert_eq!(
            cgroup_dir(&bound, "/kubepods/pod1"),
            Some(PathBuf::from("/c"))
        );
        assert_eq!(cgroup_dir(&bound, "/kubepods/pod12"), None);
        assert_eq!(cgroup_dir(&bound, "/other"), None);
        assert_eq!(cgroup_dir(&at_root, "/a/../b"), None);
    }

    #[test]
    fn limits_are_read_and_the_tightest_kept() {
        assert_eq!(bytes_limit("max\n"), None);
        assert_eq!(bytes_limit("9223372036854771712\n"), None);
        assert_eq!(bytes_limit("67108864\n"), Some(64 << 20));
        assert_eq!(bytes_limit("nonsense"), None);
        let dir = std::env::temp_dir().join(format!("tiexec-cgroup-{}", std::process::id()));
        let child = dir.join("pod").join("c");
        std::fs::create_dir_all(&child).unwrap();
        // The pod: 64 MiB, 16 MiB used; the container: no limit of its own;
        // the mount's root: nothing to read.
        std::fs::write(dir.join("pod/hugetlb.2MB.max"), "67108864\n").unwrap();
        std::fs::write(dir.join("pod/hugetlb.2MB.current"), "16777216\n").unwrap();
        std::fs::write(child.join("hugetlb.2MB.max"), "max\n").unwrap();
        std::fs::write(child.join("hugetlb.2MB.current"), "0\n").unwrap();
        let faults = [("hugetlb.2MB.max", "hugetlb.2MB.current")];
        let both = [
            ("hugetlb.2MB.max", "hugetlb.2MB.current"),
            ("hugetlb.2MB.rsvd.max", "hugetlb.2MB.rsvd.current"),
        ];
        let mib = 1u64 << 20;
        assert_eq!(
            limit_up_from(&child, &dir, &faults),
            Some(Limit {
                bytes: 64 * mib,
                free: 48 * mib
            })
        );
        // A reservation limit tighter than the fault limit bounds too.
        std::fs::write(child.join("hugetlb.2MB.rsvd.max"), "8388608\n").unwrap();
        std::fs::write(child.join("hugetlb.2MB.rsvd.current"), "2097152\n").unwrap();
        assert_eq!(
            limit_up_from(&child, &dir, &both),
            Some(Limit {
                bytes: 8 * mib,
                free: 6 * mib
            })
        );
        // Above the mount point nothing is read.
        assert_eq!(
            limit_up_from(&dir.join("pod/c"), &dir.join("pod/c"), &faults),
            None
        );
        // Any controller's files: memory (v1 names), usage unreadable counts
        // as all used.
        std::fs::write(dir.join("pod/memory.limit_in_bytes"), "1048576\n").unwrap();
        assert_eq!(
            limit_up_from(
                &child,
                &dir,
                &[("memory.limit_in_bytes", "memory.usage_in_bytes")]
            ),
            Some(Limit {
                bytes: mib,
                free: 0
            })
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
