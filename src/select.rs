//! Which loaded objects to consider. Pure.
//!
//! Patterns (`TIEXEC_INCLUDE`, `TIEXEC_EXCLUDE`) are separated by ':'. A
//! pattern is a glob (`*` any run of bytes, `?` one byte). A pattern with a
//! '/' is matched against the whole path, one without against the file name:
//! `libLLVM*` and `*/lib/libLLVM*` both pick the LLVM library.

use crate::config::Config;

/// Why an object is left alone before any planning.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Excluded {
    /// The kernel's vDSO: not a file, and tiny.
    Vdso,
    /// tiexec's own library.
    Tiexec,
    /// Matches `TIEXEC_EXCLUDE`.
    ByExclude,
    /// `TIEXEC_INCLUDE` is set and it matches none of it.
    NotIncluded,
    /// Less executable text than `TIEXEC_MIN_TEXT`.
    BelowMinimum,
}

impl Excluded {
    /// The reason in words.
    pub fn describe(self) -> &'static str {
        match self {
            Excluded::Vdso => "the vDSO",
            Excluded::Tiexec => "tiexec itself",
            Excluded::ByExclude => "matches TIEXEC_EXCLUDE",
            Excluded::NotIncluded => "not in TIEXEC_INCLUDE",
            Excluded::BelowMinimum => "less text than TIEXEC_MIN_TEXT",
        }
    }
}

/// Glob match of `pattern` against all of `text`.
pub fn glob(pattern: &[u8], text: &[u8]) -> bool {
    // Iterative matcher with one backtrack point (the last '*'): linear in
    // practice, never recursive.
    let (mut p, mut t) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(&c) if c == b'?' || Some(&c) == text.get(t) => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pattern
        .get(p..)
        .is_some_and(|rest| rest.iter().all(|&c| c == b'*'))
}

fn file_name(path: &[u8]) -> &[u8] {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => path.get(i + 1..).unwrap_or(&[]),
        None => path,
    }
}

/// True when any pattern of the ':'-separated `list` matches `path`.
pub fn matches_any(list: &[u8], path: &[u8]) -> bool {
    list.split(|&b| b == b':')
        .filter(|p| !p.is_empty())
        .any(|p| {
            if p.contains(&b'/') {
                glob(p, path)
            } else {
                glob(p, file_name(path))
            }
        })
}

/// Decides whether to consider an object.
pub fn select(
    path: &[u8],
    text_bytes: u64,
    is_tiexec: bool,
    config: &Config<'_>,
) -> Result<(), Excluded> {
    if is_tiexec {
        return Err(Excluded::Tiexec);
    }
    if path.starts_with(b"linux-vdso") || path.starts_with(b"linux-gate") {
        return Err(Excluded::Vdso);
    }
    if config.exclude.is_some_and(|list| matches_any(list, path)) {
        return Err(Excluded::ByExclude);
    }
    if config.include.is_some_and(|list| !matches_any(list, path)) {
        return Err(Excluded::NotIncluded);
    }
    if text_bytes < config.min_text {
        return Err(Excluded::BelowMinimum);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        let table: &[(&str, &str, bool)] = &[
            ("*", "", true),
            ("*", "anything", true),
            ("libLLVM*", "libLLVM.so.22.1-rust-1.95.0-stable", true),
            ("libLLVM*", "librustc_driver-61.so", false),
            ("*driver*", "librustc_driver-61.so", true),
            ("lib?.so", "libm.so", true),
            ("lib?.so", "libmm.so", false),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
            ("a*b", "abab", true),
            ("", "", true),
            ("", "x", false),
            ("**x", "abx", true),
        ];
        for (p, t, want) in table {
            assert_eq!(glob(p.as_bytes(), t.as_bytes()), *want, "{p} ~ {t}");
        }
    }

    #[test]
    fn patterns_without_a_slash_match_the_file_name() {
        let llvm = b"/opt/rust/lib/libLLVM.so.22";
        assert!(matches_any(b"libLLVM*", llvm));
        assert!(matches_any(b"x:libLLVM*", llvm));
        assert!(matches_any(b"/opt/*/libLLVM*", llvm));
        assert!(!matches_any(b"/lib/libLLVM*", llvm));
        assert!(!matches_any(b"::", llvm));
    }

    #[test]
    fn selection_rules_in_order() {
        let mut c = Config::default();
        assert_eq!(select(b"/usr/bin/cc1plus", 21 << 20, false, &c), Ok(()));
        assert_eq!(
            select(b"/x/libtiexec.so", 1 << 20, true, &c),
            Err(Excluded::Tiexec)
        );
        assert_eq!(
            select(b"linux-vdso.so.1", 8192, false, &c),
            Err(Excluded::Vdso)
        );
        c.exclude = Some(b"cc1*");
        assert_eq!(
            select(b"/usr/bin/cc1plus", 21 << 20, false, &c),
            Err(Excluded::ByExclude)
        );
        c.exclude = None;
        c.include = Some(b"libLLVM*");
        assert_eq!(
            select(b"/usr/bin/cc1plus", 21 << 20, false, &c),
            Err(Excluded::NotIncluded)
        );
        assert_eq!(select(b"/l/libLLVM.so", 21 << 20, false, &c), Ok(()));
        c.min_text = 32 << 20;
        assert_eq!(
            select(b"/l/libLLVM.so", 21 << 20, false, &c),
            Err(Excluded::BelowMinimum)
        );
    }
}
