//! A program's run history and the rule that weighs a private copy against
//! it: one source for the library (`state`, `plan::payoff`) and for the
//! preload stub, which compiles this same file (`#[path]`) to skip loading
//! the library where no copy could pay off.
//!
//! Pure and `no_std`: no allocation, no system call, no reference to the
//! rest of the crate.

/// Runs remembered per program.
pub const RUNS_KEPT: usize = 8;

/// Estimated cost of a private copy: milliseconds per MiB. The copy writes
/// fresh memory: at least the kernel zeroing it plus one memcpy (about
/// 0.2 ms/MiB on bare metal); in a VM whose host takes freed memory back,
/// up to 2.5 ms/MiB. The estimate leans to the slow side.
pub const COPY_MS_PER_MIB: u64 = 1;

/// A copy must cost at most this share of the program's lifetime
/// (1/50 = 2 %): gains from huge pages are a few percent at best, so a
/// copy costing more could make the program slower.
pub const PAYOFF_FACTOR: u64 = 50;

/// FNV-1a, 64 bits: digests for file names (not for security).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for &b in bytes {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The history file's name for `program` (its path): 16 hex digits of the
/// path's digest.
pub fn file_name(program: &[u8]) -> [u8; 16] {
    let digest = fnv1a(program);
    let mut out = [b'0'; 16];
    for (i, slot) in out.iter_mut().enumerate() {
        let nibble = (digest >> (60 - 4 * i)) & 0xf;
        *slot = b"0123456789abcdef"
            .get(nibble as usize)
            .copied()
            .unwrap_or(b'0');
    }
    out
}

/// The lifetimes (ms) in a history file's `text`, oldest first, the last
/// [`RUNS_KEPT`] of them, into `out`; returns how many. The file holds the
/// program's path on its first line (telling apart two paths with one
/// digest), then the lifetimes, space-separated. A file of another program
/// holds none.
pub fn parse(text: &[u8], program: &[u8], out: &mut [u32; RUNS_KEPT]) -> usize {
    let mut lines = text.split(|&b| b == b'\n');
    if lines.next() != Some(program) {
        return 0;
    }
    let Some(line) = lines.next() else {
        return 0;
    };
    let mut n = 0;
    for word in line.split(|&b| b == b' ') {
        let Some(v) = parse_u32(word) else {
            continue;
        };
        if n == RUNS_KEPT {
            out.copy_within(1.., 0);
            n -= 1;
        }
        if let Some(slot) = out.get_mut(n) {
            *slot = v;
            n += 1;
        }
    }
    n
}

fn parse_u32(word: &[u8]) -> Option<u32> {
    if word.is_empty() {
        return None;
    }
    let mut v: u32 = 0;
    for &d in word {
        if !d.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u32::from(d - b'0'))?;
    }
    Some(v)
}

/// What a private copy's payoff comes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The process lives (or has lived) long enough.
    Pays,
    /// No run recorded yet: this run is measured.
    Unknown,
    /// The program's runs are too short for the copy.
    TooShort {
        /// Median lifetime of its recorded runs, in ms.
        median_ms: u64,
        /// How many runs were recorded.
        runs: usize,
        /// What the copy would cost, in ms (estimated).
        copy_ms: u64,
    },
}

/// Whether copying `copy_bytes` privately can pay off, from the lifetimes
/// of the program's last runs (ms, at most [`RUNS_KEPT`] are looked at) and
/// the age of this process when the copy would be made (libraries loaded
/// late).
pub fn weigh(runs: &[u32], copy_bytes: u64, age_ms: u64) -> Verdict {
    let copy_ms = (copy_bytes >> 20).saturating_mul(COPY_MS_PER_MIB).max(1);
    let needed = copy_ms.saturating_mul(PAYOFF_FACTOR);
    if age_ms >= needed {
        return Verdict::Pays;
    }
    let mut sorted = [0u32; RUNS_KEPT];
    let n = runs.len().min(RUNS_KEPT);
    let Some(recent) = runs.get(runs.len() - n..) else {
        return Verdict::Unknown;
    };
    for (slot, &r) in sorted.iter_mut().zip(recent) {
        *slot = r;
    }
    let Some(sorted) = sorted.get_mut(..n) else {
        return Verdict::Unknown;
    };
    if sorted.is_empty() {
        return Verdict::Unknown;
    }
    // Insertion sort: a handful of values, and no code from core's sort
    // (the stub, which compiles this file, must stay small and free of
    // anything that unwinds).
    for i in 1..sorted.len() {
        let mut j = i;
        while j > 0 && sorted.get(j - 1) > sorted.get(j) {
            sorted.swap(j - 1, j);
            j -= 1;
        }
    }
    let median_ms = u64::from(sorted.get(n / 2).copied().unwrap_or(0));
    if median_ms >= needed {
        Verdict::Pays
    } else {
        Verdict::TooShort {
            median_ms,
            runs: n,
            copy_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_path_digest_in_hex() {
        assert_eq!(
            &file_name(b"/usr/bin/rustc"),
            format!("{:016x}", fnv1a(b"/usr/bin/rustc")).as_bytes()
        );
    }

    #[test]
    fn histories_parse_the_last_runs_of_their_own_program() {
        let mut out = [0; RUNS_KEPT];
        assert_eq!(parse(b"/p\n66 70 1200\n", b"/p", &mut out), 3);
        assert_eq!(out[..3], [66, 70, 1200]);
        assert_eq!(parse(b"/p\n66 70\n", b"/q", &mut out), 0);
        assert_eq!(parse(b"", b"/p", &mut out), 0);
        assert_eq!(parse(b"/p\n1 zz 3\n", b"/p", &mut out), 2);
        assert_eq!(out[..2], [1, 3]);
        let many = b"/p\n1 2 3 4 5 6 7 8 9 10\n";
        assert_eq!(parse(many, b"/p", &mut out), RUNS_KEPT);
        assert_eq!(out, [3, 4, 5, 6, 7, 8, 9, 10]);
    }

    #[test]
    fn a_copy_pays_when_runs_last_fifty_times_its_cost() {
        let mib = 1u64 << 20;
        assert_eq!(weigh(&[], 60 * mib, 0), Verdict::Unknown);
        assert_eq!(weigh(&[3000, 3100, 2900], 60 * mib, 0), Verdict::Pays);
        assert_eq!(
            weigh(&[53, 60, 50], 60 * mib, 0),
            Verdict::TooShort {
                median_ms: 53,
                runs: 3,
                copy_ms: 60
            }
        );
        // An old process (a library loaded late) pays by its age alone.
        assert_eq!(weigh(&[53], 60 * mib, 3000), Verdict::Pays);
        // One 2 MiB page: 2 ms, needs runs of 100 ms.
        assert_eq!(weigh(&[100; 8], 2 * mib, 0), Verdict::Pays);
        assert!(matches!(
            weigh(&[99; 8], 2 * mib, 0),
            Verdict::TooShort { .. }
        ));
    }
}
