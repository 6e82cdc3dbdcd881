//! Fault injection for tests: `TIEXEC_FAULT=<step>` makes one step of the
//! swap fail, so tests can show that every failure leaves the program running
//! on its original text, byte for byte.
//!
//! Harmless in production: a fault can only make tiexec give up on a range
//! (and, for `remap-hole`, take the restore path that exists for exactly that
//! case). Unset, it costs one relaxed atomic load per step.

use core::sync::atomic::{AtomicU8, Ordering};

/// A step that can be made to fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// mmap of the staging area.
    StagingMap = 1,
    /// `MADV_HUGEPAGE` on THP staging.
    StagingAdvise = 2,
    /// `MADV_POPULATE_WRITE` of the staging area.
    StagingPopulate = 3,
    /// The kernel gives THP staging no huge pages.
    StagingNotHuge = 4,
    /// mmap of the trampoline page.
    TrampolineMap = 5,
    /// mprotect r-x of the trampoline page.
    TrampolineProtect = 6,
    /// In the routine: mprotect r-x of the staging.
    Protect = 7,
    /// In the routine: mremap over the text (nothing changed).
    Remap = 8,
    /// In the routine: the text is unmapped, then mremap fails; the routine
    /// must put the bytes back.
    RemapHole = 9,
}

const ALL: [(Step, &str); 9] = [
    (Step::StagingMap, "staging-map"),
    (Step::StagingAdvise, "staging-advise"),
    (Step::StagingPopulate, "staging-populate"),
    (Step::StagingNotHuge, "staging-not-huge"),
    (Step::TrampolineMap, "trampoline-map"),
    (Step::TrampolineProtect, "trampoline-protect"),
    (Step::Protect, "protect"),
    (Step::Remap, "remap"),
    (Step::RemapHole, "remap-hole"),
];

impl Step {
    /// Parses a step name.
    pub fn parse(value: &[u8]) -> Option<Step> {
        ALL.iter()
            .find(|(_, n)| n.as_bytes() == value)
            .map(|(s, _)| *s)
    }

    /// Every step with its name, for tests that try them all.
    pub fn all() -> impl Iterator<Item = (Step, &'static str)> {
        ALL.iter().copied()
    }
}

static FAULT: AtomicU8 = AtomicU8::new(0);

/// Sets (or clears) the step to fail in this process.
pub fn set(step: Option<Step>) {
    FAULT.store(step.map_or(0, |s| s as u8), Ordering::Relaxed);
}

/// True when `step` is to fail.
pub fn at(step: Step) -> bool {
    FAULT.load(Ordering::Relaxed) == step as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for (step, name) in Step::all() {
            assert_eq!(Step::parse(name.as_bytes()), Some(step));
        }
        assert_eq!(Step::parse(b"everything"), None);
    }
}
