//! What happened to each object, verified from smaps, and its one-line form.

use crate::log::{Bytes, Level, Millis};
use crate::pagesize::{huge_page, page};
use crate::plan::Skip;
use crate::policy::Source;
use crate::range::Range;
use crate::smaps::Coverage;
use crate::swap::SwapError;

/// Writes `reports` as one JSON document to `target`: `fd:N`, or a path in
/// which `%p` stands for the PID. A file is created new, never following a
/// symlink and never replacing an existing file (mode 0600).
pub fn write_json(target: &[u8], reports: &[ObjectReport]) -> Result<(), String> {
    let mut j = crate::json::Json::new();
    j.begin_object(None)
        .uint("pid", u64::from(std::process::id()))
        .begin_array(Some("objects"));
    for r in reports {
        r.to_json(&mut j);
    }
    j.end_array().end_object();
    let mut text = j.finish();
    text.push('\n');
    write_target(target, text.as_bytes())
}

/// Writes `bytes` to `fd:N` or to a new file (see [`write_json`]).
pub fn write_target(target: &[u8], bytes: &[u8]) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(fd) = target.strip_prefix(b"fd:") {
        let fd: i32 = std::str::from_utf8(fd)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or("fd:N needs a number")?;
        crate::sys::write_all_to_fd_number(fd, bytes)
            .map_err(|e| format!("write to fd {fd}: {e}"))?;
        return Ok(());
    }
    let pid = std::process::id().to_string();
    let mut path = Vec::with_capacity(target.len() + pid.len());
    let mut rest = target;
    while let Some(&b) = rest.first() {
        if rest.starts_with(b"%p") {
            path.extend_from_slice(pid.as_bytes());
            rest = rest.get(2..).unwrap_or(&[]);
        } else {
            path.push(b);
            rest = rest.get(1..).unwrap_or(&[]);
        }
    }
    let path = std::path::Path::new(std::ffi::OsStr::from_bytes(&path));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all(bytes)
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// " (1.2 MiB head/tail, ...)" for the kept bytes that are not already huge.
struct KeptReasons<'a>(&'a [(Skip, u64)]);

impl core::fmt::Display for KeptReasons<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let mut first = true;
        for (reason, bytes) in self.0.iter().filter(|(r, _)| *r != Skip::AlreadyHuge) {
            f.write_str(if first { " (" } else { "; " })?;
            write!(f, "{}: {}", Bytes(*bytes), reason.describe())?;
            first = false;
        }
        if !first {
            f.write_str(")")?;
        }
        Ok(())
    }
}

/// " (in place: EINVAL)" when the page cache could not serve and a copy did.
struct InPlaceNote(Option<crate::sys::Errno>);

impl core::fmt::Display for InPlaceNote {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.0 {
            Some(e) => write!(
                f,
                " after in-place collapse failed with {} (tiexec --prime on this file: no copy next start)",
                e.name()
            ),
            None => Ok(()),
        }
    }
}

/// The sources of swapped ranges, joined by '+', in report order.
struct Sources<'a>(&'a [(Range, Source)]);

impl core::fmt::Display for Sources<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let mut first = true;
        for source in Source::ALL {
            if self.0.iter().any(|(_, s)| *s == source) {
                if !first {
                    f.write_str("+")?;
                }
                f.write_str(if source == Source::PageCache {
                    "page cache in place"
                } else {
                    source.name()
                })?;
                first = false;
            }
        }
        if first {
            f.write_str("none")?;
        }
        Ok(())
    }
}

/// Why nothing was attempted for an object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotAttempted {
    /// No executable segment holds a whole 2 MiB page.
    NoWholeHugePage,
    /// Every whole 2 MiB page is already mapped huge by the kernel.
    AlreadyHuge,
    /// No whole 2 MiB page is plain r-x private text.
    NoPlainText,
    /// No huge-page source is usable (the reason says which).
    NoSource(crate::policy::NoSupply),
    /// The program's recent runs touched none of its whole huge pages.
    AllCold,
    /// /proc/self/smaps could not be read.
    SmapsUnreadable,
}

impl NotAttempted {
    /// The reason in words.
    pub fn describe(self) -> String {
        match self {
            NotAttempted::NoWholeHugePage => {
                format!(
                    "no whole {} page in its text",
                    crate::pagesize::huge_page_name()
                )
            }
            NotAttempted::AlreadyHuge => {
                format!("already on {} pages", crate::pagesize::huge_page_name())
            }
            NotAttempted::NoPlainText => "no plain r-x text to move".into(),
            NotAttempted::NoSource(why) => why.to_string(),
            NotAttempted::AllCold => {
                "the program's recent runs touched none of its huge pages of text".into()
            }
            NotAttempted::SmapsUnreadable => "cannot read /proc/self/maps".into(),
        }
    }
}

/// The result for one loaded object.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ObjectReport {
    /// The object's path.
    pub path: String,
    /// Its load bias (addresses in the file plus this are addresses in
    /// memory).
    pub bias: u64,
    /// Bytes in its executable segments.
    pub text_bytes: u64,
    /// Bytes planned for swapping.
    pub planned_bytes: u64,
    /// Bytes the kernel already mapped huge before we started.
    pub already_huge_bytes: u64,
    /// Text left on 4 KiB pages by the plan, by reason (non-zero only).
    pub kept: Vec<(Skip, u64)>,
    /// Ranges swapped, and from where their pages came.
    pub swapped: Vec<(Range, Source)>,
    /// Why the page cache could not supply huge pages in place, when tried
    /// (the ranges were copied instead).
    pub in_place_error: Option<crate::sys::Errno>,
    /// Ranges planned but not swapped, and why.
    pub failed: Vec<(Range, SwapError)>,
    /// Why nothing was attempted, when that is the case.
    pub not_attempted: Option<NotAttempted>,
    /// The user named the backend (not `auto`): failing to use it is a
    /// warning, not information.
    pub explicit_backend: bool,
    /// Coverage of the text segments, read back from smaps afterwards.
    pub after: Coverage,
    /// Whether the process copies, and why (see `history::decide`), when a
    /// decision was needed.
    pub decision: Option<crate::history::Decision>,
    /// Wall time spent on this object, in nanoseconds.
    pub elapsed_ns: u64,
}

impl ObjectReport {
    /// Writes this report as a JSON object.
    pub fn to_json(&self, j: &mut crate::json::Json) {
        j.begin_object(None)
            .str("path", &self.path)
            .uint("text_bytes", self.text_bytes)
            .uint("planned_bytes", self.planned_bytes)
            .uint("swapped_bytes", self.swapped_bytes())
            .uint("already_huge_bytes", self.already_huge_bytes);
        j.begin_object(Some("swapped_by_source"));
        for source in Source::ALL {
            let n: u64 = self
                .swapped
                .iter()
                .filter(|(_, s)| *s == source)
                .map(|(r, _)| r.len())
                .sum();
            j.uint(source.key(), n);
        }
        j.end_object();
        j.uint("bias", self.bias);
        j.begin_array(Some("swapped"));
        for (range, source) in &self.swapped {
            j.begin_object(None)
                .uint("start", range.start)
                .uint("end", range.end)
                .str("source", source.key())
                .end_object();
        }
        j.end_array();
        j.begin_object(Some("after"))
            .uint("huge_bytes", self.after.huge())
            .uint("hugetlb_bytes", self.after.hugetlb)
            .uint("anon_thp_bytes", self.after.anon_thp)
            .uint("file_thp_bytes", self.after.file_thp)
            .uint("small_bytes", self.after.small())
            .end_object();
        j.begin_array(Some("kept"));
        for (reason, bytes) in &self.kept {
            j.begin_object(None)
                .str("reason", &reason.describe().to_string())
                .uint("bytes", *bytes)
                .end_object();
        }
        j.end_array();
        j.begin_array(Some("failed"));
        for (range, e) in &self.failed {
            j.begin_object(None)
                .uint("start", range.start)
                .uint("end", range.end)
                .str("error", &e.to_string())
                .end_object();
        }
        j.end_array();
        match self.not_attempted {
            Some(why) => j.str("not_attempted", &why.describe()),
            None => j.null("not_attempted"),
        };
        match self.in_place_error {
            Some(e) => j.str("in_place_error", e.name()),
            None => j.null("in_place_error"),
        };
        match self.decision {
            Some(d) => j.str("decision", &d.to_string()),
            None => j.null("decision"),
        };
        j.uint("elapsed_ns", self.elapsed_ns).end_object();
    }

    /// Bytes swapped by us.
    pub fn swapped_bytes(&self) -> u64 {
        self.swapped.iter().map(|(r, _)| r.len()).sum()
    }

    /// The source(s) used, for the log line: "cache (hit)+thp".
    fn sources(&self) -> Sources<'_> {
        Sources(&self.swapped)
    }

    /// Text bytes the plan kept for `reason`.
    pub fn kept_bytes(&self, reason: Skip) -> u64 {
        self.kept
            .iter()
            .filter(|(r, _)| *r == reason)
            .map(|(_, n)| n)
            .sum()
    }

    /// Writes the per-object lines: one at info, plus one per range left
    /// behind. The default level (warn) shows only what the user asked for
    /// and did not get: a failure of a backend named explicitly (warn), or
    /// harm to the text (error). Fallbacks of `auto` are expected: info.
    pub fn log(&self) {
        for (range, e) in &self.failed {
            let level = if e.is_harmful() {
                Level::Error
            } else if self.explicit_backend
                && *e != SwapError::NoSupply(crate::policy::NoSupply::NamesProgram)
            {
                // What the user named did not serve. (The page that names
                // the program is left on purpose, whatever the backend.)
                Level::Warn
            } else {
                Level::Info
            };
            crate::tlog!(
                level,
                "{}: {:#x}-{:#x} left on {} pages: {e}",
                self.path,
                range.start,
                range.end,
                crate::pagesize::SizeName(page())
            );
        }
        if let Some(why) = self.not_attempted {
            let level = match why {
                NotAttempted::NoSource(_) | NotAttempted::SmapsUnreadable
                    if self.explicit_backend =>
                {
                    Level::Warn
                }
                _ => Level::Info,
            };
            crate::tlog!(
                level,
                "{}: text {}, nothing moved: {}; on {} pages {}",
                self.path,
                Bytes(self.text_bytes),
                why.describe(),
                crate::pagesize::huge_page_name(),
                Bytes(self.after.huge())
            );
            return;
        }
        crate::tlog!(
            Level::Info,
            "{}: text {}, on {} pages {} ({} pages: {} new via {}{}, {} already), {} x {} left{}, {}",
            self.path,
            Bytes(self.text_bytes),
            crate::pagesize::huge_page_name(),
            Bytes(self.after.huge()),
            (self.swapped_bytes() + self.already_huge_bytes) / huge_page(),
            self.swapped_bytes() / huge_page(),
            self.sources(),
            InPlaceNote(self.in_place_error),
            self.already_huge_bytes / huge_page(),
            self.after.small() / page(),
            crate::pagesize::SizeName(page()),
            KeptReasons(&self.kept),
            Millis(self.elapsed_ns)
        );
    }
}
