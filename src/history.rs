//! A program's run history, and the rule that decides, once per process,
//! whether its text is copied to huge pages (the *copy* arm) or left on
//! 4 KiB pages (the *plain* arm). One source for the library and for the
//! preload stub, which compiles this same file (`#[path]`) to skip loading
//! the library where it would only decide "plain".
//!
//! Pure and `no_std`: no allocation, no system call, no reference to the
//! rest of the crate.
//!
//! # The record (`runs/<digest of the program's path>` in the state dir)
//!
//! ```text
//! /usr/bin/prog                   the program's path (tells two digests apart)
//! v2 17 412                       format, runs folded in so far, copy rate (µs per MiB)
//! 612c 640p kc 598c               the last RUNS_KEPT runs, oldest first
//! s 4242 918273 c                 a run started: PID, start time (clock ticks), arm
//! e 4242 918273 588 c             ... and ended: its lifetime (ms) and arm
//! ```
//!
//! A run is its lifetime in ms and its arm (`c` copy: text moved to huge
//! pages in that process; `p` plain), or `k` and its arm: it ended without
//! saying how long it lived (killed by a signal), which counts as a long
//! life. Processes only ever append their `s` and `e` lines (one `write`
//! each, with `O_APPEND`: from `_exit` too, where nothing may allocate);
//! the next process that reads the record folds them into the runs line
//! (see `state`), and a start line whose process is gone becomes a `k` run.
//!
//! # The rule (see [`decide`])
//!
//! A copy costs `c` now (from the rate measured on this machine); what it
//! gains is a share of the run, unknown until measured. In order:
//!
//! 1. a process already old (a library loaded late) copies when the copy is
//!    under 1 % of its age;
//! 2. no history: a program the user named (to the wrapper, by a hand-made
//!    `LD_PRELOAD`, or by linking tiexec in) asked for huge text and gets
//!    it; a program started by another is measured first;
//! 3. a copy under 1 % of a typical run (median lifetime) is always made
//!    (servers: killed runs count as long);
//! 4. with at least [`MIN_SAMPLES`] runs of each arm, the medians decide:
//!    copy where runs with huge text (copy included) were at least 1 %
//!    faster; one run in [`EXPLORE_EVERY`] takes the other arm, to keep the
//!    comparison current (a copy only within the learning limit below);
//! 5. while learning, copy where the copy costs at most [`CHILD_LIMIT`] of a
//!    typical run (a named program: [`NAMED_LIMIT`]), and run plain one run
//!    in [`LEARN_PLAIN_EVERY`] until the plain arm has its samples; else
//!    plain.

/// Runs remembered per program.
pub const RUNS_KEPT: usize = 16;
/// Runs under way remembered per program.
pub const STARTS_KEPT: usize = 16;
/// Runs of each arm needed before their medians decide.
pub const MIN_SAMPLES: usize = 2;
/// Once measured, one run in this many takes the other arm.
pub const EXPLORE_EVERY: u32 = 8;
/// While learning, one run in this many runs plain (until the plain arm
/// has [`MIN_SAMPLES`]): the second, the tenth. (Each costs that run its
/// gain; a named program is presumed to gain.)
pub const LEARN_PLAIN_EVERY: u32 = 8;
/// A copy under this share of a run (per mille) is always made.
pub const NEGLIGIBLE: u64 = 10;
/// While learning, a program started by another copies up to this share of
/// a typical run (per mille).
pub const CHILD_LIMIT: u64 = 20;
/// While learning, a program named by the user copies up to this share (per
/// mille): about what huge text can gain at best.
pub const NAMED_LIMIT: u64 = 100;
/// Runs with huge text must be this much faster (per mille) to count as a
/// gain.
pub const MIN_GAIN: u64 = 10;
/// The copy rate assumed before any copy was measured (µs per MiB): a
/// populate and one memcpy run at ~0.4 ms/MiB in steady state; fresh memory
/// in a VM whose host took it back costs up to 2.5 ms/MiB.
pub const DEFAULT_RATE_US_PER_MIB: u32 = 500;
/// The lifetime a run that ended unrecorded counts as (ms): long.
pub const LONG_MS: u32 = u32::MAX;

/// FNV-1a, 64 bits: digests for file names (not for security).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for &b in bytes {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The record's file name for `program` (its path): 16 hex digits of the
/// path's digest.
pub fn file_name(program: &[u8]) -> [u8; 16] {
    hex16(fnv1a(program))
}

/// `v` as 16 lower-case hex digits.
pub fn hex16(v: u64) -> [u8; 16] {
    let mut out = [b'0'; 16];
    for (i, slot) in out.iter_mut().enumerate() {
        let nibble = (v >> (60 - 4 * i)) & 0xf;
        *slot = b"0123456789abcdef"
            .get(nibble as usize)
            .copied()
            .unwrap_or(b'0');
    }
    out
}

/// Which way a run went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arm {
    /// Its text was moved to huge pages (a copy, or an image).
    Copy,
    /// Its text stayed on 4 KiB pages.
    Plain,
}

impl Arm {
    /// Its letter in the record.
    pub fn letter(self) -> u8 {
        match self {
            Arm::Copy => b'c',
            Arm::Plain => b'p',
        }
    }

    fn from_letter(b: u8) -> Option<Arm> {
        match b {
            b'c' => Some(Arm::Copy),
            b'p' => Some(Arm::Plain),
            _ => None,
        }
    }

    fn other(self) -> Arm {
        match self {
            Arm::Copy => Arm::Plain,
            Arm::Plain => Arm::Copy,
        }
    }
}

/// One finished run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    /// Its lifetime in ms; `None` when it ended without saying (counts as
    /// [`LONG_MS`]).
    pub ms: Option<u32>,
    /// Its arm.
    pub arm: Arm,
}

impl Run {
    /// Its lifetime for medians.
    pub fn lifetime(&self) -> u32 {
        self.ms.unwrap_or(LONG_MS)
    }
}

/// A run under way, as its start line says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Start {
    /// Its process.
    pub pid: u32,
    /// The process's start time (clock ticks since boot, `/proc/PID/stat`
    /// field 22): tells a reused PID from the process.
    pub ticks: u64,
    /// The arm it was decided to take.
    pub arm: Arm,
}

impl Start {
    /// Whether `other` names the same process.
    pub fn same_process(&self, other: &Start) -> bool {
        self.pid == other.pid && self.ticks == other.ticks
    }
}

const NO_START: Start = Start {
    pid: 0,
    ticks: 0,
    arm: Arm::Plain,
};

const NO_RUN: Run = Run {
    ms: None,
    arm: Arm::Plain,
};

/// A program's record, parsed.
#[derive(Clone, Copy, Debug)]
pub struct History {
    runs: [Run; RUNS_KEPT],
    len: usize,
    starts: [Start; STARTS_KEPT],
    starts_len: usize,
    /// Runs started so far (the exploration schedule counts them).
    pub started: u32,
    /// The copy rate (µs per MiB) when it was last written; 0: none known.
    pub rate_us_per_mib: u32,
}

impl Default for History {
    fn default() -> Self {
        History {
            runs: [NO_RUN; RUNS_KEPT],
            len: 0,
            starts: [NO_START; STARTS_KEPT],
            starts_len: 0,
            started: 0,
            rate_us_per_mib: 0,
        }
    }
}

impl PartialEq for History {
    fn eq(&self, other: &History) -> bool {
        self.runs() == other.runs()
            && self.starts() == other.starts()
            && self.started == other.started
            && self.rate_us_per_mib == other.rate_us_per_mib
    }
}

impl Eq for History {}

impl History {
    /// The runs kept, oldest first.
    pub fn runs(&self) -> &[Run] {
        self.runs.get(..self.len).unwrap_or(&[])
    }

    /// The runs under way (or ended unrecorded), oldest first.
    pub fn starts(&self) -> &[Start] {
        self.starts.get(..self.starts_len).unwrap_or(&[])
    }

    /// Adds a finished run, dropping the oldest beyond [`RUNS_KEPT`].
    pub fn push(&mut self, run: Run) {
        if self.len == RUNS_KEPT {
            shift_out_first(&mut self.runs);
            self.len -= 1;
        }
        if let Some(slot) = self.runs.get_mut(self.len) {
            *slot = run;
            self.len += 1;
        }
    }

    /// Adds a run under way, dropping the oldest beyond [`STARTS_KEPT`].
    pub fn push_start(&mut self, start: Start) {
        if self.starts_len == STARTS_KEPT {
            shift_out_first(&mut self.starts);
            self.starts_len -= 1;
        }
        if let Some(slot) = self.starts.get_mut(self.starts_len) {
            *slot = start;
            self.starts_len += 1;
        }
    }

    /// Forgets the start lines for which `gone` holds, returning how many.
    pub fn drop_starts(&mut self, mut gone: impl FnMut(&Start) -> bool) -> usize {
        let mut kept = 0;
        let mut dropped = 0;
        for i in 0..self.starts_len {
            let Some(s) = self.starts.get(i).copied() else {
                continue;
            };
            if gone(&s) {
                dropped += 1;
            } else if let Some(slot) = self.starts.get_mut(kept) {
                *slot = s;
                kept += 1;
            }
        }
        self.starts_len = kept;
        dropped
    }

    /// The copy rate to assume (µs per MiB).
    pub fn rate(&self) -> u32 {
        if self.rate_us_per_mib == 0 {
            DEFAULT_RATE_US_PER_MIB
        } else {
            self.rate_us_per_mib
        }
    }
}

/// Moves every element one place down, dropping the first. (By hand:
/// `copy_within` brings in core's out-of-line range check, whose object
/// needs the unwinder, which the preload stub must not.)
fn shift_out_first<T: Copy>(items: &mut [T]) {
    for i in 1..items.len() {
        if let Some(&v) = items.get(i) {
            if let Some(slot) = items.get_mut(i - 1) {
                *slot = v;
            }
        }
    }
}

/// Parses a record for `program`: the path on the first line must be
/// `program`'s, and the format the current one; anything else (another
/// program with the same digest, the older format) is an empty history.
/// End lines become runs (taking their start line's place); unknown words
/// are skipped. `started` counts the folded runs, every start line and
/// every end line without one: the number of this run, for the exploration
/// schedule.
pub fn parse(text: &[u8], program: &[u8]) -> History {
    let mut h = History::default();
    let mut lines = text.split(|&b| b == b'\n');
    if lines.next() != Some(program) {
        return h;
    }
    let Some(head) = lines.next() else {
        return h;
    };
    let mut words = head.split(|&b| b == b' ');
    if words.next() != Some(b"v2") {
        return h;
    }
    h.started = words.next().and_then(parse_u32).unwrap_or(0);
    h.rate_us_per_mib = words.next().and_then(parse_u32).unwrap_or(0);
    let Some(runs) = lines.next() else {
        return h;
    };
    for word in runs.split(|&b| b == b' ') {
        let Some((&letter, number)) = word.split_last() else {
            continue;
        };
        let Some(arm) = Arm::from_letter(letter) else {
            continue;
        };
        let ms = match number {
            b"k" => None,
            n => match parse_u32(n) {
                Some(v) => Some(v),
                None => continue,
            },
        };
        h.push(Run { ms, arm });
    }
    for line in lines {
        let mut words = line.split(|&b| b == b' ');
        let kind = words.next();
        let pid = words.next().and_then(parse_u32);
        let ticks = words.next().and_then(parse_u64);
        let (Some(pid), Some(ticks)) = (pid, ticks) else {
            continue;
        };
        let arm_word = |w: Option<&[u8]>| {
            w.and_then(|w| w.first().copied())
                .and_then(Arm::from_letter)
        };
        match kind {
            Some(b"s") => {
                let Some(arm) = arm_word(words.next()) else {
                    continue;
                };
                h.started = h.started.saturating_add(1);
                h.push_start(Start { pid, ticks, arm });
            }
            Some(b"e") => {
                let ms = words.next().and_then(parse_u32);
                let (Some(ms), Some(arm)) = (ms, arm_word(words.next())) else {
                    continue;
                };
                let ended = Start { pid, ticks, arm };
                if h.drop_starts(|s| s.same_process(&ended)) == 0 {
                    // Its start line is not here (lost in a concurrent
                    // rewrite, or a tool wrote the run): it started too.
                    h.started = h.started.saturating_add(1);
                }
                h.push(Run { ms: Some(ms), arm });
            }
            _ => {}
        }
    }
    h
}

/// A start line: `s PID TICKS ARM\n`, into `buf`; its length.
pub fn start_line(start: Start, buf: &mut [u8; 64]) -> usize {
    let mut w = LineWriter { buf, n: 0 };
    w.bytes(b"s ");
    w.number(u64::from(start.pid));
    w.bytes(b" ");
    w.number(start.ticks);
    w.bytes(&[b' ', start.arm.letter(), b'\n']);
    w.n
}

/// An end line: `e PID TICKS MS ARM\n`, into `buf`; its length. `arm` is
/// the arm the run took in the end (a copy decided may have failed).
pub fn end_line(start: Start, ms: u32, arm: Arm, buf: &mut [u8; 64]) -> usize {
    let mut w = LineWriter { buf, n: 0 };
    w.bytes(b"e ");
    w.number(u64::from(start.pid));
    w.bytes(b" ");
    w.number(start.ticks);
    w.bytes(b" ");
    w.number(u64::from(ms));
    w.bytes(b" ");
    w.bytes(&[arm.letter(), b'\n']);
    w.n
}

/// Formats into a fixed buffer, without allocating (for `_exit`).
struct LineWriter<'a> {
    buf: &'a mut [u8; 64],
    n: usize,
}

impl LineWriter<'_> {
    fn bytes(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if let Some(slot) = self.buf.get_mut(self.n) {
                *slot = b;
                self.n += 1;
            }
        }
    }

    fn number(&mut self, mut v: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            if let Some(d) = digits.get_mut(i) {
                *d = b'0' + (v % 10) as u8;
            }
            v /= 10;
            if v == 0 || i == 0 {
                break;
            }
        }
        let tail = digits.get(i..).unwrap_or(&[]);
        let mut copy = [0u8; 20];
        let len = tail.len();
        if let Some(dst) = copy.get_mut(..len) {
            dst.copy_from_slice(tail);
        }
        self.bytes(copy.get(..len).unwrap_or(&[]));
    }
}

fn parse_u64(word: &[u8]) -> Option<u64> {
    if word.is_empty() {
        return None;
    }
    let mut v: u64 = 0;
    for &d in word {
        if !d.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
    }
    Some(v)
}

fn parse_u32(word: &[u8]) -> Option<u32> {
    parse_u64(word).and_then(|v| u32::try_from(v).ok())
}

/// Why a process copies or not, with the figures that decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    /// No run recorded yet. `named`: the user named this program (it
    /// copies); else it is measured first (plain).
    FirstRun {
        /// Named by the user.
        named: bool,
    },
    /// The process is old already (a library loaded late): the copy is a
    /// negligible share of what it has lived.
    OldProcess {
        /// Its age (ms).
        age_ms: u64,
        /// The copy's estimated cost (ms).
        copy_ms: u64,
    },
    /// The copy is under 1 % of a typical run.
    Negligible {
        /// The copy's estimated cost (ms).
        copy_ms: u64,
        /// The median lifetime (ms; [`LONG_MS`]: most runs ended unrecorded,
        /// as servers killed by a signal do).
        median_ms: u64,
        /// Runs it is the median of.
        runs: usize,
    },
    /// Runs of both arms were compared.
    Measured {
        /// Median lifetime of runs with huge text, copy included (ms).
        copy_ms: u64,
        /// Median lifetime of runs on 4 KiB pages (ms).
        plain_ms: u64,
        /// Runs with huge text compared.
        copy_runs: usize,
        /// Runs on 4 KiB pages compared.
        plain_runs: usize,
    },
    /// Not measured yet: the copy's share of a typical run decides.
    Learning {
        /// The copy's estimated cost (ms).
        copy_ms: u64,
        /// The median lifetime (ms).
        median_ms: u64,
        /// Runs it is the median of.
        runs: usize,
        /// The share allowed while learning (per mille).
        limit: u64,
    },
}

impl Rule {
    /// The arm this rule gives.
    pub fn arm(&self) -> Arm {
        match *self {
            Rule::FirstRun { named } => {
                if named {
                    Arm::Copy
                } else {
                    Arm::Plain
                }
            }
            Rule::OldProcess { .. } | Rule::Negligible { .. } => Arm::Copy,
            Rule::Measured {
                copy_ms, plain_ms, ..
            } => {
                if gains(copy_ms, plain_ms) {
                    Arm::Copy
                } else {
                    Arm::Plain
                }
            }
            Rule::Learning {
                copy_ms,
                median_ms,
                limit,
                ..
            } => {
                if within(copy_ms, median_ms, limit) {
                    Arm::Copy
                } else {
                    Arm::Plain
                }
            }
        }
    }
}

/// Runs with huge text at `copy_ms` beat runs on 4 KiB pages at `plain_ms`.
fn gains(copy_ms: u64, plain_ms: u64) -> bool {
    copy_ms.saturating_mul(1000) < plain_ms.saturating_mul(1000 - MIN_GAIN)
}

/// `cost` is at most `limit` per mille of `of`.
fn within(cost: u64, of: u64, limit: u64) -> bool {
    cost.saturating_mul(1000) <= of.saturating_mul(limit)
}

/// What one process does, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    /// The arm this process takes.
    pub arm: Arm,
    /// The rule that decided.
    pub rule: Rule,
    /// This run takes the other arm than the rule gives, to measure it.
    pub explores: bool,
    /// The copy's estimated cost (ms), and the rate it came from.
    pub copy_ms: u64,
    /// The rate the estimate used (µs per MiB).
    pub rate_us_per_mib: u32,
}

/// What is known about the process that decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Asking {
    /// The user named this program (see the module doc).
    pub named: bool,
    /// Bytes a copy would move.
    pub copy_bytes: u64,
    /// The process's age now (ms).
    pub age_ms: u64,
}

/// The median of `values` (the mean of the middle two for an even count),
/// sorted in place. 0 for none.
fn median(values: &mut [u32]) -> u64 {
    // Insertion sort: a handful of values, and no code from core's sort
    // (the stub, which compiles this file, must stay small and free of
    // anything that unwinds).
    for i in 1..values.len() {
        let mut j = i;
        while j > 0 && values.get(j - 1) > values.get(j) {
            values.swap(j - 1, j);
            j -= 1;
        }
    }
    let n = values.len();
    let at = |i: usize| u64::from(values.get(i).copied().unwrap_or(0));
    if n == 0 {
        0
    } else if n % 2 == 1 {
        at(n / 2)
    } else {
        (at(n / 2 - 1) + at(n / 2)) / 2
    }
}

/// Lifetimes of `h`'s runs that `keep` selects, into `buf`; their median
/// and count. Runs that ended unrecorded count as [`LONG_MS`] when
/// `unrecorded` holds, else they are left out.
fn median_of(h: &History, unrecorded: bool, keep: impl Fn(&Run) -> bool) -> (u64, usize) {
    let mut buf = [0u32; RUNS_KEPT];
    let mut n = 0;
    for r in h.runs().iter().filter(|r| keep(r)) {
        if r.ms.is_none() && !unrecorded {
            continue;
        }
        if let Some(slot) = buf.get_mut(n) {
            *slot = r.lifetime();
            n += 1;
        }
    }
    (median(buf.get_mut(..n).unwrap_or(&mut [])), n)
}

/// The estimated cost (ms) of copying `bytes` at `rate` µs per MiB: at
/// least 1 for anything.
pub fn copy_cost_ms(bytes: u64, rate_us_per_mib: u32) -> u64 {
    if bytes == 0 {
        return 0;
    }
    let us = (bytes.saturating_mul(u64::from(rate_us_per_mib))) >> 20;
    us.div_ceil(1000).max(1)
}

/// Decides whether this process copies (see the module doc for the rule).
/// `h.started` is this run's number (runs started before it): it places the
/// run in the exploration schedule, so that a forecast made from the same
/// history decides as the run will.
pub fn decide(h: &History, asking: Asking) -> Decision {
    let rate = h.rate();
    let copy_ms = copy_cost_ms(asking.copy_bytes, rate);
    let decision = |rule: Rule, explores: bool| Decision {
        arm: if explores {
            rule.arm().other()
        } else {
            rule.arm()
        },
        rule,
        explores,
        copy_ms,
        rate_us_per_mib: rate,
    };
    if asking.age_ms > 0 && within(copy_ms, asking.age_ms, NEGLIGIBLE) {
        return decision(
            Rule::OldProcess {
                age_ms: asking.age_ms,
                copy_ms,
            },
            false,
        );
    }
    if h.runs().is_empty() {
        return decision(
            Rule::FirstRun {
                named: asking.named,
            },
            false,
        );
    }
    let (median_ms, runs) = median_of(h, true, |_| true);
    if within(copy_ms, median_ms, NEGLIGIBLE) {
        return decision(
            Rule::Negligible {
                copy_ms,
                median_ms,
                runs,
            },
            false,
        );
    }
    let limit = if asking.named {
        NAMED_LIMIT
    } else {
        CHILD_LIMIT
    };
    let (copy_median, copy_runs) = median_of(h, false, |r| r.arm == Arm::Copy);
    let (plain_median, plain_runs) = median_of(h, false, |r| r.arm == Arm::Plain);
    let n = h.started;
    if copy_runs >= MIN_SAMPLES && plain_runs >= MIN_SAMPLES {
        let rule = Rule::Measured {
            copy_ms: copy_median,
            plain_ms: plain_median,
            copy_runs,
            plain_runs,
        };
        // Exploring a copy the learning rule would not allow is not done.
        let explores = n % EXPLORE_EVERY == 1
            && (rule.arm() == Arm::Copy || within(copy_ms, median_ms, limit));
        return decision(rule, explores);
    }
    let rule = Rule::Learning {
        copy_ms,
        median_ms,
        runs,
        limit,
    };
    let explores =
        rule.arm() == Arm::Copy && plain_runs < MIN_SAMPLES && n % LEARN_PLAIN_EVERY == 1;
    decision(rule, explores)
}

impl core::fmt::Display for Decision {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let copied = match self.arm {
            Arm::Copy => "copy",
            Arm::Plain => "no copy",
        };
        match self.rule {
            Rule::FirstRun { named: true } => write!(
                f,
                "{copied}: first run of a program named to tiexec (its next runs measure whether it pays)"
            )?,
            Rule::FirstRun { named: false } => write!(
                f,
                "{copied}: first run of a program started by another, measured first (--backend thp copies now)"
            )?,
            Rule::OldProcess { age_ms, copy_ms } => write!(
                f,
                "{copied}: the copy (~{copy_ms} ms) is under 1% of the process's age ({age_ms} ms)"
            )?,
            Rule::Negligible {
                copy_ms,
                median_ms,
                runs,
            } => {
                if median_ms < u64::from(LONG_MS) {
                    write!(
                        f,
                        "{copied}: the copy (~{copy_ms} ms) is under 1% of a typical run (median {median_ms} ms over {runs} runs)"
                    )?
                } else {
                    write!(
                        f,
                        "{copied}: the copy (~{copy_ms} ms) is negligible: its runs live long (most of {runs} ended without exiting)"
                    )?
                }
            }
            Rule::Measured {
                copy_ms,
                plain_ms,
                copy_runs,
                plain_runs,
            } => {
                let faster = plain_ms.saturating_sub(copy_ms) * 1000 / plain_ms.max(1);
                if gains(copy_ms, plain_ms) {
                    write!(
                        f,
                        "{copied}: measured, runs with huge text {copy_ms} ms (copy included, {copy_runs} runs) against {plain_ms} ms on 4 KiB pages ({plain_runs} runs): {}.{}% faster",
                        faster / 10,
                        faster % 10
                    )?
                } else {
                    write!(
                        f,
                        "{copied}: measured, no gain: runs with huge text {copy_ms} ms (copy included, {copy_runs} runs) against {plain_ms} ms on 4 KiB pages ({plain_runs} runs)"
                    )?
                }
            }
            Rule::Learning {
                copy_ms,
                median_ms,
                runs,
                limit,
            } => {
                let share = copy_ms.saturating_mul(1000) / median_ms.max(1);
                if within(copy_ms, median_ms, limit) {
                    write!(
                        f,
                        "{copied}: the copy (~{copy_ms} ms) is {}.{}% of a typical run (median {median_ms} ms over {runs} runs), within the {}% allowed while its gain is measured",
                        share / 10,
                        share % 10,
                        limit / 10
                    )?
                } else {
                    write!(
                        f,
                        "{copied}: a copy (~{copy_ms} ms) would cost {}.{}% of a typical run (median {median_ms} ms over {runs} runs), more than the {}% allowed while its gain is unmeasured",
                        share / 10,
                        share % 10,
                        limit / 10
                    )?
                }
            }
        }
        if self.explores {
            write!(
                f,
                "; this run explores the other way, to measure it (one run in {})",
                match self.rule {
                    Rule::Measured { .. } => EXPLORE_EVERY,
                    _ => LEARN_PLAIN_EVERY,
                }
            )?;
        }
        if self.copy_ms > 0 && !matches!(self.rule, Rule::FirstRun { .. }) {
            write!(
                f,
                " [copy rate {}.{:02} ms/MiB]",
                self.rate_us_per_mib / 1000,
                self.rate_us_per_mib % 1000 / 10
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn history(runs: &[(u32, Arm)], started: u32) -> History {
        let mut h = History {
            started,
            rate_us_per_mib: 400,
            ..History::default()
        };
        for &(ms, arm) in runs {
            h.push(Run {
                ms: (ms != LONG_MS).then_some(ms),
                arm,
            });
        }
        h
    }

    fn ask(named: bool, mib: u64) -> Asking {
        Asking {
            named,
            copy_bytes: mib * MIB,
            age_ms: 0,
        }
    }

    use Arm::{Copy as C, Plain as P};

    #[test]
    fn names_are_the_path_digest_in_hex() {
        assert_eq!(
            &file_name(b"/usr/bin/rustc"),
            format!("{:016x}", fnv1a(b"/usr/bin/rustc")).as_bytes()
        );
    }

    #[test]
    fn start_and_end_lines_fold_into_runs() {
        let s = Start {
            pid: 42,
            ticks: 9000,
            arm: C,
        };
        let mut buf = [0u8; 64];
        let n = start_line(s, &mut buf);
        assert_eq!(&buf[..n], b"s 42 9000 c\n");
        let mut text = b"/p\nv2 3 0\n10p\n".to_vec();
        text.extend_from_slice(&buf[..n]);
        text.extend_from_slice(b"s 43 9001 p\n");
        let n = end_line(s, 612, Arm::Copy, &mut buf);
        assert_eq!(&buf[..n], b"e 42 9000 612 c\n");
        text.extend_from_slice(&buf[..n]);
        let h = parse(&text, b"/p");
        assert_eq!(h.started, 5, "3 folded, 2 started since");
        assert_eq!(
            h.runs(),
            [
                Run {
                    ms: Some(10),
                    arm: P
                },
                Run {
                    ms: Some(612),
                    arm: C
                }
            ]
        );
        assert_eq!(
            h.starts(),
            [Start {
                pid: 43,
                ticks: 9001,
                arm: P
            }]
        );
        let worst = Start {
            pid: u32::MAX,
            ticks: u64::MAX,
            arm: P,
        };
        let n = end_line(worst, u32::MAX, P, &mut buf);
        assert!(n < 64 && buf[n - 1] == b'\n');
    }

    #[test]
    fn records_parse_their_own_program_and_format_only() {
        let text = b"/p\nv2 7 412\n612c 640p kc zz 12q\ns 42 9000 c\ns x 1 c\ns 43 1\n";
        let h = parse(text, b"/p");
        assert_eq!(h.started, 8);
        assert_eq!(h.rate_us_per_mib, 412);
        assert_eq!(
            h.runs(),
            [
                Run {
                    ms: Some(612),
                    arm: C
                },
                Run {
                    ms: Some(640),
                    arm: P
                },
                Run { ms: None, arm: C }
            ]
        );
        assert_eq!(
            h.starts(),
            [Start {
                pid: 42,
                ticks: 9000,
                arm: C
            }]
        );
        assert_eq!(parse(text, b"/q"), History::default());
        // The first format (lifetimes only) is started afresh.
        assert_eq!(parse(b"/p\n66 70 1200\n", b"/p"), History::default());
        assert_eq!(parse(b"", b"/p"), History::default());
    }

    #[test]
    fn the_history_keeps_its_last_runs_and_starts() {
        let mut h = History::default();
        for ms in 0..40 {
            h.push(Run {
                ms: Some(ms),
                arm: P,
            });
            h.push_start(Start {
                pid: ms,
                ticks: 1,
                arm: P,
            });
        }
        assert_eq!(h.runs().len(), RUNS_KEPT);
        assert_eq!(h.runs()[0].ms, Some(40 - RUNS_KEPT as u32));
        assert_eq!(h.starts().len(), STARTS_KEPT);
        assert_eq!(h.drop_starts(|s| s.pid % 2 == 0), STARTS_KEPT / 2);
        assert!(h.starts().iter().all(|s| s.pid % 2 == 1));
    }

    #[test]
    fn a_first_run_copies_only_when_the_user_named_the_program() {
        let h = History::default();
        let named = decide(&h, ask(true, 64));
        assert_eq!((named.arm, named.rule), (C, Rule::FirstRun { named: true }));
        let child = decide(&h, ask(false, 64));
        assert_eq!(
            (child.arm, child.rule),
            (P, Rule::FirstRun { named: false })
        );
        // Before any copy was measured, the default rate.
        assert_eq!(named.rate_us_per_mib, DEFAULT_RATE_US_PER_MIB);
        assert_eq!(named.copy_ms, 32);
    }

    #[test]
    fn a_negligible_copy_is_made_and_killed_runs_count_as_long() {
        // 64 MiB at 0.4 ms/MiB: 26 ms, under 1 % of 3 s.
        let h = history(&[(3000, P)], 1);
        let d = decide(&h, ask(false, 64));
        assert_eq!(d.arm, C);
        assert!(matches!(d.rule, Rule::Negligible { copy_ms: 26, .. }));
        // A server killed by a signal: its run counts as long.
        let h = history(&[(LONG_MS, C)], 1);
        let d = decide(&h, ask(false, 256));
        assert_eq!(d.arm, C);
        assert!(!d.explores);
    }

    #[test]
    fn a_named_program_copies_while_learning_and_runs_plain_one_run_in_eight() {
        // The 64 MiB, 0.6 s program: the copy is ~4 % of a run.
        let mut h = history(&[(560, C)], 1);
        let d = decide(&h, ask(true, 64));
        assert!(matches!(
            d.rule,
            Rule::Learning {
                limit: NAMED_LIMIT,
                ..
            }
        ));
        assert_eq!((d.arm, d.explores), (P, true), "run 2 explores plain");
        h.push(Run {
            ms: Some(630),
            arm: P,
        });
        for started in 2..9 {
            h.started = started;
            let d = decide(&h, ask(true, 64));
            assert_eq!((d.arm, d.explores), (C, false), "run {}", started + 1);
            h.push(Run {
                ms: Some(550),
                arm: C,
            });
        }
        h.started = 9;
        assert_eq!(decide(&h, ask(true, 64)).arm, P, "run 10 explores plain");
        // The same costs for a program started by another: over 2 %.
        let d = decide(&h, ask(false, 64));
        assert_eq!((d.arm, d.explores), (P, false));
    }

    #[test]
    fn measured_runs_decide_and_one_in_eight_explores() {
        let gain = history(&[(560, C), (630, P), (550, C), (620, P)], 6);
        let d = decide(&gain, ask(true, 64));
        assert_eq!(d.arm, C);
        assert_eq!(
            d.rule,
            Rule::Measured {
                copy_ms: 555,
                plain_ms: 625,
                copy_runs: 2,
                plain_runs: 2
            }
        );
        let explore = History { started: 9, ..gain };
        assert_eq!(decide(&explore, ask(true, 64)).arm, P);
        // No gain: plain, whoever asks; exploring a copy only within limits.
        let none = history(&[(630, C), (620, P), (640, C), (600, P)], 9);
        assert_eq!(decide(&none, ask(true, 64)).arm, C, "named: 4 % < 10 %");
        assert_eq!(decide(&none, ask(false, 64)).arm, P, "child: 4 % > 2 %");
        let none = History {
            started: 10,
            ..none
        };
        let d = decide(&none, ask(true, 64));
        assert_eq!((d.arm, d.explores), (P, false));
    }

    #[test]
    fn a_short_lived_child_is_never_copied_and_an_old_process_is() {
        // rustc hello: 200 MiB in a 70 ms process.
        let h = history(&[(70, P), (72, P), (68, P)], 3);
        for started in 0..20 {
            let d = decide(&History { started, ..h }, ask(false, 200));
            assert_eq!(d.arm, P, "run {started}");
        }
        let old = Asking {
            age_ms: 60_000,
            ..ask(false, 200)
        };
        assert!(matches!(decide(&h, old).rule, Rule::OldProcess { .. }));
    }

    #[test]
    fn costs_and_medians() {
        assert_eq!(copy_cost_ms(0, 500), 0);
        assert_eq!(copy_cost_ms(1, 500), 1);
        assert_eq!(copy_cost_ms(64 * MIB, 400), 26);
        assert_eq!(median(&mut [3, 1, 2]), 2);
        assert_eq!(median(&mut [4, 1, 3, 2]), 2);
        assert_eq!(median(&mut []), 0);
    }

    #[test]
    fn decisions_say_which_rule_and_the_figures() {
        let h = history(&[(560, C), (630, P), (550, C), (620, P)], 6);
        let text = format!("{}", decide(&h, ask(true, 64)));
        assert!(text.contains("555 ms") && text.contains("625 ms"), "{text}");
        assert!(text.contains("11.2% faster"), "{text}");
        assert!(text.contains("0.40 ms/MiB"), "{text}");
    }
}
