//! What happened to each object, verified from smaps, and its one-line form.

use crate::log::{Bytes, Level, Millis};
use crate::plan::{Range, Skip, Source, HUGE_PAGE, PAGE};
use crate::smaps::Coverage;
use crate::swap::SwapError;

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
                " after in-place collapse failed with {} (tiexec prime on this file: no copy next start)",
                e.name()
            ),
            None => Ok(()),
        }
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
    NoSource(&'static str),
    /// /proc/self/smaps could not be read.
    SmapsUnreadable,
}

impl NotAttempted {
    /// The reason in words.
    pub fn describe(self) -> &'static str {
        match self {
            NotAttempted::NoWholeHugePage => "no whole 2 MiB page in its text",
            NotAttempted::AlreadyHuge => "already on 2 MiB pages",
            NotAttempted::NoPlainText => "no plain r-x text to move",
            NotAttempted::NoSource(why) => why,
            NotAttempted::SmapsUnreadable => "cannot read /proc/self/smaps",
        }
    }
}

/// The result for one loaded object.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ObjectReport {
    /// The object's path.
    pub path: String,
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
    /// Wall time spent on this object, in nanoseconds.
    pub elapsed_ns: u64,
}

impl ObjectReport {
    /// Bytes swapped by us.
    pub fn swapped_bytes(&self) -> u64 {
        self.swapped.iter().map(|(r, _)| r.len()).sum()
    }

    /// The source(s) used, for the log line.
    fn sources(&self) -> &'static str {
        let h = self.swapped.iter().any(|(_, s)| *s == Source::Hugetlb);
        let t = self.swapped.iter().any(|(_, s)| *s == Source::Thp);
        let p = self.swapped.iter().any(|(_, s)| *s == Source::PageCache);
        match (p, h, t) {
            (false, true, true) => "hugetlb+thp",
            (false, true, false) => "hugetlb",
            (false, false, true) => "thp",
            (false, false, false) => "none",
            (true, false, false) => "page cache in place",
            (true, true, _) | (true, _, true) => "page cache in place+copies",
        }
    }

    /// Text bytes the plan kept for `reason`.
    pub fn kept_bytes(&self, reason: Skip) -> u64 {
        self.kept
            .iter()
            .filter(|(r, _)| *r == reason)
            .map(|(_, n)| n)
            .sum()
    }

    /// Writes the per-object lines: one at info, plus one per failure (at
    /// warn, or error for the harmful kinds).
    pub fn log(&self) {
        for (range, e) in &self.failed {
            let level = if e.is_harmful() {
                Level::Error
            } else {
                Level::Warn
            };
            crate::tlog!(
                level,
                "{}: {:#x}-{:#x} left on 4 KiB pages: {e}",
                self.path,
                range.start,
                range.end
            );
        }
        if let Some(why) = self.not_attempted {
            let level = match why {
                NotAttempted::NoSource(_) if self.explicit_backend => Level::Warn,
                NotAttempted::SmapsUnreadable => Level::Warn,
                _ => Level::Info,
            };
            crate::tlog!(
                level,
                "{}: text {}, nothing moved: {}; on 2 MiB pages {}",
                self.path,
                Bytes(self.text_bytes),
                why.describe(),
                Bytes(self.after.huge())
            );
            return;
        }
        crate::tlog!(
            Level::Info,
            "{}: text {}, on 2 MiB pages {} ({} pages: {} new via {}{}, {} already), {} x 4 KiB left{}, {}",
            self.path,
            Bytes(self.text_bytes),
            Bytes(self.after.huge()),
            (self.swapped_bytes() + self.already_huge_bytes) / HUGE_PAGE,
            self.swapped_bytes() / HUGE_PAGE,
            self.sources(),
            InPlaceNote(self.in_place_error),
            self.already_huge_bytes / HUGE_PAGE,
            self.after.small() / PAGE,
            KeptReasons(&self.kept),
            Millis(self.elapsed_ns)
        );
    }
}
