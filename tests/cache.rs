//! The shared image cache, on a hugetlbfs mount of each test's own
//! (`TIEXEC_CACHE`): a miss builds, a hit maps, processes share; keys that
//! make stale text impossible; entries and directories that are not safe are
//! left alone; eviction; a pool too small; text relocations;
//! memory-deny-write-execute. Every case: the program's output, exit status
//! and read-only bytes as without tiexec, nothing writable and executable.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{CacheMount, Seen, NON_PIE, NON_PIE_64, PIE, PIE_64};

const T: Duration = Duration::from_secs(180);
const CALLS: &str = "200000";

/// A fresh copy of `spec`'s fixture in a directory of the test's own (small
/// page-cache folios: the kernel does not map it huge by itself).
fn fresh(spec: common::Spec, test: &str) -> PathBuf {
    let exe = common::fresh_copy(
        &common::fixture(spec),
        &common::scratch_dir().join(format!("cache-{test}-{}", std::process::id())),
    );
    // Old enough for its image to be shared (see `common::settle`).
    common::settle(&exe);
    exe
}

/// `exe` under the preload with the cache at `cache`, plus `env`.
fn cached(exe: &Path, cache: &CacheMount, env: &[(&str, &str)]) -> Command {
    let mut cmd = common::preloaded(exe, env);
    cmd.env("TIEXEC_CACHE", &cache.path)
        .env("TIEXEC_LOG", "info")
        .args([CALLS, "wait"]);
    cmd
}

/// Runs `exe` plainly (the expected output).
fn plain(exe: &Path) -> String {
    common::plain_run(exe, &[CALLS, "run"]).stdout
}

/// Checks a run's output against the plain one.
fn same_output(seen: &Seen, plain: &str) {
    seen.outcome.check(
        seen.stdout_first == plain,
        &format!("output differs from plain:\n{plain}"),
    );
}

#[test]
fn a_miss_builds_the_image_and_the_next_process_maps_it() {
    let Some(cache) = CacheMount::new("hit", 64, 72) else {
        return;
    };
    let exe = fresh(NON_PIE, "hit");
    let expected = plain(&exe);
    let first = common::observe(&mut cached(&exe, &cache, &[]), &exe);
    same_output(&first, &expected);
    first.outcome.check(
        first.outcome.stderr.contains("new via cache (built)"),
        "the first process builds",
    );
    first.outcome.check(
        first.cov.hugetlb >= first.interior && first.interior >= 28 << 20,
        &format!("text on the image's pages: {:?}", first.cov),
    );
    let images = cache.images();
    let used = cache.used_pages();
    first
        .outcome
        .check(!images.is_empty(), "an image was published");
    let second = common::observe(&mut cached(&exe, &cache, &[]), &exe);
    same_output(&second, &expected);
    second.outcome.check(
        second.outcome.stderr.contains("via cache (hit)")
            && !second.outcome.stderr.contains("cache (built)"),
        "the second process maps the image",
    );
    second.outcome.check(
        second.cov.hugetlb >= second.interior,
        &format!("{:?}", second.cov),
    );
    assert_eq!(cache.images(), images, "no new image");
    assert_eq!(cache.used_pages(), used, "no new page");
    // Images are read-only files of this user, in a 0700 directory.
    for image in &images {
        let meta = std::fs::metadata(image).unwrap();
        assert_eq!(
            meta.permissions().mode() & 0o777,
            0o400,
            "{}",
            image.display()
        );
        let dir = std::fs::metadata(image.parent().unwrap()).unwrap();
        assert_eq!(dir.permissions().mode() & 0o777, 0o700);
    }
}

/// The `--stat --json` object for `exe` in `o`'s output.
fn stat_of(o: &common::Outcome, exe: &Path) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap_or_default();
    let want = exe.to_string_lossy();
    v[0]["objects"]
        .as_array()
        .and_then(|objects| {
            objects
                .iter()
                .find(|o| o["path"].as_str() == Some(&want))
                .cloned()
        })
        .unwrap_or_else(|| {
            o.check(false, "the program among the objects");
            serde_json::Value::Null
        })
}

#[test]
fn six_concurrent_processes_hold_one_copy() {
    // 64 MiB of text, six processes at once: the pages held stay within
    // 1.5 times one copy (today's private copies: six).
    let Some(cache) = CacheMount::new("six", 64, 72) else {
        return;
    };
    let exe = fresh(NON_PIE_64, "six");
    let expected = plain(&exe);
    let waiting: Vec<common::Waiting> = (0..6)
        .map(|_| common::Waiting::start(&mut cached(&exe, &cache, &[]), T))
        .collect();
    let one_copy = 64 << 20;
    let mut covered = Vec::new();
    for w in &waiting {
        let segments = common::text_segments(w.pid(), &exe);
        covered.push(common::coverage(w.pid(), &segments).hugetlb);
    }
    let held = cache.used_pages() * (2 << 20);
    // What `tiexec --stat` says of one of them: the text from the cache, the
    // image mapped by all six.
    let pid = waiting[0].pid().to_string();
    let text = common::run(common::tiexec_cmd().args(["--stat", &pid]), T);
    let json = common::run(common::tiexec_cmd().args(["--stat", "--json", &pid]), T);
    let stat = stat_of(&json, &exe);
    let images = stat["images"].as_array().cloned().unwrap_or_default();
    json.check(
        stat["cache_bytes"].as_u64() == Some(covered[0])
            && !images.is_empty()
            && images.iter().all(|i| i["processes"].as_u64() == Some(6)),
        &format!("cache bytes {} and six processes per image", covered[0]),
    );
    text.check(
        text.stdout.contains("from the image cache")
            && text.stdout.contains("mapped by up to 6 process(es)"),
        "the text report names the cache and the sharing",
    );
    let mut built = 0;
    for w in waiting {
        let first = w.first_line.clone();
        let o = w.finish(T);
        o.check(o.status.success() && first == expected, "runs the same");
        built += o.stderr.matches("cache (built)").count();
    }
    assert!(
        covered.iter().filter(|&&c| c >= 60 << 20).count() >= 5,
        "processes on the image: {covered:?}"
    );
    assert!(built >= 1, "one process built the images");
    assert!(
        held * 2 <= one_copy * 3,
        "{held} bytes of huge pages held by six processes, one copy is {one_copy}"
    );
    // The pool outside the cache was not touched either.
}

#[test]
fn concurrent_misses_build_each_image_once() {
    let Some(cache) = CacheMount::new("race", 64, 72) else {
        return;
    };
    let exe = fresh(NON_PIE, "race");
    let expected = plain(&exe);
    let children: Vec<_> = (0..8)
        .map(|_| {
            common::preloaded(&exe, &[("TIEXEC_LOG", "info")])
                .env("TIEXEC_CACHE", &cache.path)
                .args(["20000", "run"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawn")
        })
        .collect();
    let expected_short = common::plain_run(&exe, &["20000", "run"]).stdout;
    let mut said = String::new();
    for c in children {
        let out = c.wait_with_output().expect("wait");
        assert!(out.status.success(), "{out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout), expected_short);
        said.push_str(&String::from_utf8_lossy(&out.stderr));
    }
    let _ = expected;
    // Each range's image exists once (names are the keys), and no more
    // pages are held than one set of images needs.
    let images = cache.images();
    let bytes: u64 = images
        .iter()
        .map(|i| std::fs::metadata(i).unwrap().len())
        .sum();
    assert_eq!(cache.used_pages() * (2 << 20), bytes, "{said}");
    assert!(bytes <= 34 << 20, "{bytes} bytes of images\n{said}");
    // Processes that found the build under way went on without waiting.
    assert!(said.contains("cache (built)"), "{said}");
}

#[test]
fn a_program_rebuilt_in_place_never_gets_its_old_text() {
    let Some(cache) = CacheMount::new("stale", 64, 72) else {
        return;
    };
    let exe = fresh(NON_PIE, "stale");
    let old_output = plain(&exe);
    let first = common::observe(&mut cached(&exe, &cache, &[]), &exe);
    same_output(&first, &old_output);
    let old_images = cache.images();
    assert!(!old_images.is_empty());
    // The same file (same inode), new code of the same size, and its
    // modification time set back: only its status-change time tells.
    let new_bytes = common::fixture::patched_text(&exe, 4000);
    let mtime = std::fs::metadata(&exe).unwrap().modified().unwrap();
    let inode = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&exe).unwrap());
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&exe)
            .unwrap();
        f.write_all(&new_bytes).unwrap();
        f.set_modified(mtime).unwrap();
    }
    assert_eq!(
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&exe).unwrap()),
        inode
    );
    let new_output = plain(&exe);
    assert_ne!(new_output, old_output, "the patch changes the output");
    common::settle(&exe);
    let second = common::observe(&mut cached(&exe, &cache, &[]), &exe);
    same_output(&second, &new_output);
    second.outcome.check(
        !second.outcome.stderr.contains("cache (hit)"),
        "the old image is never used",
    );
    // Its new text: from a new image, or mapped huge by the kernel from
    // the page cache the rewrite filled.
    second.outcome.check(
        second.outcome.stderr.contains("cache (built)")
            || second.outcome.stderr.contains("already on 2 MiB pages"),
        "a new image is built, or none is needed",
    );
}

/// Runs the fixture with the cache in a state that must not be trusted, and
/// checks it runs the same, maps nothing from the cache, and says `says`.
fn refused(cache: &CacheMount, exe: &Path, says: &str) {
    let expected = plain(exe);
    let seen = common::observe(&mut cached(exe, cache, &[]), exe);
    same_output(&seen, &expected);
    seen.outcome
        .check(seen.cov.hugetlb == 0, "nothing from the cache");
    seen.outcome
        .check(seen.outcome.stderr.contains(says), &format!("says: {says}"));
}

fn user_dir(cache: &CacheMount) -> PathBuf {
    // SAFETY: geteuid has no preconditions.
    cache.path.join(unsafe { libc::geteuid() }.to_string())
}

#[test]
fn a_directory_or_image_that_is_not_safe_is_left_alone() {
    let Some(cache) = CacheMount::new("unsafe", 64, 72) else {
        return;
    };
    let exe = fresh(NON_PIE, "unsafe");
    let dir = user_dir(&cache);

    // A directory owned by someone else (made before this user's first use).
    std::fs::create_dir(&dir).unwrap();
    std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
    refused(&cache, &exe, "cache directory owned by uid 65534");

    // A directory others may write to.
    std::os::unix::fs::chown(&dir, Some(0), Some(0)).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o770)).unwrap();
    refused(&cache, &exe, "cache directory writable by group or others");

    std::fs::remove_dir(&dir).unwrap();

    // The cache reached through a symlink (hugetlbfs has none inside).
    let link = common::scratch_dir().join(format!("cache-link-{}", std::process::id()));
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&cache.path, &link).unwrap();
    let expected = plain(&exe);
    let mut cmd = cached(&exe, &cache, &[]);
    cmd.env("TIEXEC_CACHE", &link);
    let seen = common::observe(&mut cmd, &exe);
    same_output(&seen, &expected);
    seen.outcome
        .check(seen.cov.hugetlb == 0, "nothing from the cache");
    seen.outcome.check(
        seen.outcome.stderr.contains("is a symlink: not used"),
        "says why",
    );
    std::fs::remove_file(&link).unwrap();

    // A good directory, and images that are not safe: built by this test's
    // first run, then handed to another user.
    let first = common::observe(&mut cached(&exe, &cache, &[]), &exe);
    first
        .outcome
        .check(first.outcome.stderr.contains("cache (built)"), "built");
    for image in cache.images() {
        std::os::unix::fs::chown(&image, Some(65534), None).unwrap();
    }
    refused(&cache, &exe, "cache entry not used: owned by another user");
}

#[test]
fn an_image_of_the_wrong_size_is_removed_and_rebuilt() {
    let Some(cache) = CacheMount::new("truncated", 64, 72) else {
        return;
    };
    let exe = fresh(NON_PIE, "truncated");
    let expected = plain(&exe);
    let first = common::observe(&mut cached(&exe, &cache, &[]), &exe);
    same_output(&first, &expected);
    // Cut every image by one 2 MiB page (hugetlbfs sizes are whole pages).
    for image in cache.images() {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&image)
            .unwrap();
        let len = f.metadata().unwrap().len();
        f.set_len(len - (2 << 20)).unwrap();
    }
    let second = common::observe(&mut cached(&exe, &cache, &[]), &exe);
    same_output(&second, &expected);
    second.outcome.check(
        second.outcome.stderr.contains("where its key says")
            && second.outcome.stderr.contains("removed"),
        "says the entry was removed",
    );
    second.outcome.check(
        second.outcome.stderr.contains("cache (built)") && second.cov.hugetlb >= second.interior,
        "rebuilt and used",
    );
}

#[test]
fn a_full_cache_evicts_the_least_recently_used_image_no_process_maps() {
    // 20 pages: one fixture's images (16 pages) fit, two do not.
    let Some(cache) = CacheMount::new("evict", 20, 28) else {
        return;
    };
    let a = fresh(NON_PIE, "evict-a");
    let b_spec = common::Spec::new("fixture-nopie-30m", 30, false);
    let b = fresh(b_spec, "evict-b");
    let first = common::observe(&mut cached(&a, &cache, &[]), &a);
    same_output(&first, &plain(&a));
    let a_images = cache.images();
    assert!(!a_images.is_empty());
    let second = common::observe(&mut cached(&b, &cache, &[]), &b);
    same_output(&second, &plain(&b));
    second.outcome.check(
        second.outcome.stderr.contains("cache (built)") && second.cov.hugetlb >= second.interior,
        "b's images built after evicting a's",
    );
    // As many of a's images as needed made room (the least recently used
    // first), and the cache stayed within its size.
    let now = cache.images();
    assert!(
        a_images.iter().any(|i| !now.contains(i)),
        "some of a's images evicted: {now:?}"
    );
    assert!(now
        .iter()
        .any(|i| i.to_string_lossy().contains("fixture-nopie-30m")));
    assert!(cache.used_pages() <= 20);
}

#[test]
fn an_image_in_use_is_not_evicted_and_the_newcomer_goes_without() {
    let Some(cache) = CacheMount::new("busy", 20, 28) else {
        return;
    };
    let a = fresh(NON_PIE, "busy-a");
    let b = fresh(common::Spec::new("fixture-nopie-30m", 30, false), "busy-b");
    // a keeps running, mapping its images.
    let w = common::Waiting::start(&mut cached(&a, &cache, &[]), T);
    let a_images = cache.images();
    let second = common::observe(&mut cached(&b, &cache, &[]), &b);
    same_output(&second, &plain(&b));
    second.outcome.check(
        second.outcome.stderr.contains("cache full"),
        "says the cache is full",
    );
    let now = cache.images();
    assert!(
        a_images.iter().all(|i| now.contains(i)),
        "a's images stay: {now:?}"
    );
    assert!(cache.used_pages() <= 20);
    let o = w.finish(T);
    o.check(o.status.success(), "a ran");
}

#[test]
fn a_pool_too_small_for_the_cache_leaves_the_text_and_says_why() {
    // The mount promises 64 pages but reserves (min_size) none, and the
    // pool has 4: building the images fails when their pages are reserved.
    let Some(_pool) = common::PoolGuard::set(4) else {
        return;
    };
    let path = common::scratch_dir()
        .join("caches")
        .join(format!("unreserved-{}", std::process::id()));
    std::fs::create_dir_all(&path).unwrap();
    let o = common::run(
        Command::new("mount")
            .args([
                "-t",
                "hugetlbfs",
                "-o",
                "pagesize=2M,size=128M,mode=1777",
                "none",
            ])
            .arg(&path),
        T,
    );
    if !o.status.success() {
        common::skip(format_args!("cannot mount hugetlbfs\n{o}"));
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(path.clone());
    let exe = fresh(NON_PIE, "small-pool");
    let expected = plain(&exe);
    let mut cmd = common::preloaded(&exe, &[("TIEXEC_LOG", "info"), ("TIEXEC_BACKEND", "cache")]);
    cmd.env("TIEXEC_CACHE", &path).args([CALLS, "wait"]);
    let seen = common::observe(&mut cmd, &exe);
    same_output(&seen, &expected);
    seen.outcome
        .check(seen.cov.hugetlb < seen.interior, "not covered from nothing");
    seen.outcome.check(
        seen.outcome
            .stderr
            .contains("reserving the image's pages failed: ENOMEM"),
        "says why",
    );
}

#[test]
fn a_pie_program_gets_a_private_image_with_the_cache_backend() {
    // A PIE loads at a random base aligned to 4 or 64 KiB: an image would
    // serve no other process, so it stays unnamed, private to this one.
    // Now and then (1 in 32 with 64 KiB alignment, as on arm64) the base
    // falls congruent with the file: then the image is named and shared,
    // as for any congruent text; the test checks that, and tries again.
    let Some(cache) = CacheMount::new("pie", 64, 72) else {
        return;
    };
    for attempt in 0..6 {
        let exe = fresh(PIE, &format!("pie-{attempt}"));
        let expected = plain(&exe);
        let seen = common::observe(
            &mut cached(&exe, &cache, &[("TIEXEC_BACKEND", "cache")]),
            &exe,
        );
        same_output(&seen, &expected);
        seen.outcome.check(
            seen.cov.hugetlb + (2 << 20) >= seen.interior,
            &format!("{:?}", seen.cov),
        );
        if seen.congruent {
            seen.outcome.check(
                seen.outcome.stderr.contains("via cache") && !cache.images().is_empty(),
                "a PIE loaded congruent by chance gets a shared image",
            );
            for image in cache.images() {
                std::fs::remove_file(&image).expect("remove the shared image");
            }
            continue;
        }
        seen.outcome
            .check(seen.outcome.stderr.contains("via hugetlb"), "private");
        assert!(cache.images().is_empty(), "nothing published");
        assert_eq!(cache.used_pages(), 0, "its pages went with the process");
        return;
    }
    common::skip("the PIE loaded congruent six times: its private image was not tried");
}

#[test]
fn under_memory_deny_write_execute_the_cache_still_serves() {
    // systemd's MemoryDenyWriteExecute=yes: no mapping may become
    // executable. Images are mapped r-x from the start; the swap routine
    // runs from tiexec's own text.
    let Some(cache) = CacheMount::new("mdwe", 64, 72) else {
        return;
    };
    let hostile = {
        static BUILD: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one = BUILD.lock().unwrap_or_else(|e| e.into_inner());
        common::fixture::build_hostile(&common::scratch_dir().join("fixtures"))
    };
    // A PIE's text at a random base gets a private image of the cache's
    // pages by default too: the program named to tiexec, first run.
    for (spec, backend) in [(NON_PIE_64, "auto"), (PIE_64, "cache"), (PIE_64, "auto")] {
        let exe = fresh(spec, &format!("mdwe-{backend}"));
        let expected = plain(&exe);
        let mut cmd = Command::new(&hostile);
        cmd.arg("mdwe").arg(&exe);
        common::isolate(&mut cmd)
            .env("LD_PRELOAD", common::preload_lib())
            .env("TIEXEC_CACHE", &cache.path)
            .env("TIEXEC_LOG", "info")
            .env("TIEXEC_BACKEND", backend)
            .args([CALLS, "wait"]);
        let seen = common::observe(&mut cmd, &exe);
        same_output(&seen, &expected);
        seen.outcome.check(
            seen.cov.huge() * 10 >= seen.text * 9,
            &format!(
                "{backend}: at least 90 % on 2 MiB pages: {:?} of {}",
                seen.cov, seen.text
            ),
        );
    }
    // The private copies that cannot work there are not even tried.
    let exe = fresh(PIE, "mdwe-thp");
    let mut cmd = Command::new(&hostile);
    cmd.arg("mdwe").arg(&exe);
    common::isolate(&mut cmd)
        .env("LD_PRELOAD", common::preload_lib())
        .env("TIEXEC_BACKEND", "thp")
        .env("TIEXEC_LOG", "info")
        .args([CALLS, "wait"]);
    let seen = common::observe(&mut cmd, &exe);
    seen.outcome.check(
        seen.outcome
            .stderr
            .contains("memory-deny-write-execute forbids private copies"),
        "says why",
    );
}

#[test]
fn a_library_with_text_relocations_is_never_cached() {
    let Some(cache) = CacheMount::new("textrel", 64, 72) else {
        return;
    };
    let dir = common::scratch_dir().join("fixtures");
    let lib = {
        static BUILD: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one = BUILD.lock().unwrap_or_else(|e| e.into_inner());
        common::fixture::build_textrel_library("textrel", 24, &dir)
    };
    let dynamic = common::run(Command::new("readelf").arg("-d").arg(&lib), T);
    dynamic.check(
        dynamic.stdout.contains("TEXTREL"),
        "the fixture has text relocations",
    );
    let host = {
        static BUILD: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one = BUILD.lock().unwrap_or_else(|e| e.into_inner());
        common::fixture::build_host("host-textrel", Some(&lib), &dir)
    };
    let expected = common::run(Command::new(&host).args([CALLS, "run"]), T).stdout;
    // Under the cache backend (images or nothing) and under auto with a
    // program known to run long (images, else THP): never an image.
    for backend in ["cache", "auto"] {
        let mut cmd = common::preloaded(
            &host,
            &[("TIEXEC_LOG", "info"), ("TIEXEC_BACKEND", backend)],
        );
        cmd.env("TIEXEC_CACHE", &cache.path);
        common::remember_runs(&cmd, &host, &[3_600_000]);
        // (Its text differs from its file by design: no byte comparison.)
        let w = common::Waiting::start(cmd.args([CALLS, "wait"]), T);
        let segments = common::text_segments(w.pid(), &lib);
        let cov = common::coverage(w.pid(), &segments);
        let wx = common::writable_executable_mappings(w.pid());
        let first = w.first_line.clone();
        let o = w.finish(T);
        o.check(o.status.success() && first == expected, "runs the same");
        o.check(wx.is_empty(), &format!("W+X {wx:?}"));
        o.check(cov.hugetlb == 0, &format!("{backend}: no image: {cov:?}"));
        o.check(
            o.stderr.contains("it has text relocations") || o.stderr.contains("via thp"),
            &format!("{backend}: says why, or copies privately"),
        );
        assert!(cache.images().is_empty(), "nothing cached");
    }
}

#[test]
fn tiexec_cache_lists_and_clears_images() {
    let Some(cache) = CacheMount::new("list", 64, 72) else {
        return;
    };
    let exe = fresh(NON_PIE, "list");
    for _ in 0..3 {
        common::observe(&mut cached(&exe, &cache, &[]), &exe);
    }
    // The runs recorded their hits in their own state directories; list
    // with one of them.
    let mut list = common::tiexec_cmd();
    list.args(["--cache", "--json", "--cache-dir"])
        .arg(&cache.path);
    let o = common::run(&mut list, T);
    o.check(o.status.success(), "lists");
    let doc: serde_json::Value = serde_json::from_str(&o.stdout).expect("json");
    let images = doc["images"].as_array().expect("images");
    assert_eq!(images.len(), cache.images().len(), "{}", o.stdout);
    assert!(images
        .iter()
        .all(|i| i["object"].as_str().unwrap().contains("fixture-nopie-32m")));
    assert!(images.iter().all(|i| i["pages"].as_u64().unwrap() >= 1));
    let text = common::run(
        common::tiexec_cmd()
            .args(["--cache", "--cache-dir"])
            .arg(&cache.path),
        T,
    );
    text.check(
        text.stdout.contains("mapped by 0 processes"),
        "text listing",
    );
    // Evict by object name; other patterns leave them.
    let keep = common::run(
        common::tiexec_cmd()
            .args(["--cache", "--clear", "libLLVM*", "--cache-dir"])
            .arg(&cache.path),
        T,
    );
    keep.check(keep.stdout.contains("evicted 0 images"), "nothing matched");
    let clear = common::run(
        common::tiexec_cmd()
            .args(["--cache", "--clear", "fixture-nopie*", "--cache-dir"])
            .arg(&cache.path),
        T,
    );
    clear.check(clear.status.success(), "clears");
    assert!(cache.images().is_empty());
    assert_eq!(cache.used_pages(), 0);
}

/// Text served from a cache image stays named: gdb (through the loader's
/// list of objects) names a function in the middle of it and the backtrace,
/// and the perf map lists the image's functions at their addresses (perf
/// treats hugetlb mappings as anonymous memory and reads the map for them).
#[test]
fn debuggers_and_profilers_name_functions_in_images() {
    if Command::new("gdb").arg("--version").output().is_err() {
        common::skip("no gdb");
        return;
    }
    let Some(cache) = CacheMount::new("names", 40, 48) else {
        return;
    };
    let exe = fresh(NON_PIE, "names");
    // The first run builds the images; the second maps them (a hit).
    let first = common::observe(&mut cached(&exe, &cache, &[]), &exe);
    first
        .outcome
        .check(!cache.images().is_empty(), "images built");
    let mut cmd = common::preloaded(&exe, &[("TIEXEC_PERF_MAP", "1")]);
    cmd.env("TIEXEC_CACHE", &cache.path)
        .env("TIEXEC_LOG", "info")
        .args(["1000", "wait"]);
    let w = common::Waiting::start(&mut cmd, T);
    let pid = w.pid();
    let segments = common::text_segments(pid, &exe);
    let cov = common::coverage(pid, &segments);
    let symbols = common::functions(&exe);
    let (value, size) = symbols["fixture_fn_4000"];
    let gdb = common::run(
        Command::new("gdb")
            .args(["-batch", "-nx", "-p", &pid.to_string()])
            .args(["-ex", "bt", "-ex"])
            .arg(format!("info symbol {value:#x}")),
        T,
    );
    let map_path = format!("/tmp/perf-{pid}.map");
    let map = std::fs::read_to_string(&map_path).unwrap_or_default();
    let _ = std::fs::remove_file(&map_path);
    let o = w.finish(T);
    o.check(
        o.status.success() && o.stderr.contains("cache (hit)"),
        "served from the cache",
    );
    o.check(cov.hugetlb >= 28 << 20, &format!("on the image: {cov:?}"));
    gdb.check(gdb.stdout.contains(" main "), "backtrace names main");
    gdb.check(
        gdb.stdout.contains("fixture_fn_4000 in section"),
        "names a function mid-text",
    );
    let wanted = format!("{value:x} {size:x} fixture_fn_4000");
    assert!(
        map.lines().any(|l| l == wanted),
        "perf map has no line {wanted:?} ({} lines)",
        map.lines().count()
    );
}
