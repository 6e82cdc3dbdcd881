//! `TIEXEC_*` settings. Pure: parsing takes a lookup function, so tests and
//! the CLI use the same rules as the constructor. A value that does not parse
//! is reported and the default is used; it never stops the target.

use crate::log::Level;

/// Where the huge pages come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// hugetlb when the pool has enough free pages, else THP, else nothing.
    Auto,
    /// Only the hugetlb pool (`MAP_HUGETLB`).
    Hugetlb,
    /// Only transparent huge pages (anonymous, `MADV_HUGEPAGE`).
    Thp,
    /// Do nothing.
    Off,
}

impl Backend {
    /// The name used in `TIEXEC_BACKEND` and `--backend`.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Auto => "auto",
            Backend::Hugetlb => "hugetlb",
            Backend::Thp => "thp",
            Backend::Off => "off",
        }
    }

    /// Parses a backend name (exact, lower case).
    pub fn parse(value: &[u8]) -> Option<Backend> {
        match value {
            b"auto" => Some(Backend::Auto),
            b"hugetlb" => Some(Backend::Hugetlb),
            b"thp" => Some(Backend::Thp),
            b"off" => Some(Backend::Off),
            _ => None,
        }
    }
}

/// Parses a log level name (exact, lower case).
pub fn parse_level(value: &[u8]) -> Option<Level> {
    match value {
        b"off" => Some(Level::Off),
        b"error" => Some(Level::Error),
        b"warn" => Some(Level::Warn),
        b"info" => Some(Level::Info),
        b"debug" => Some(Level::Debug),
        _ => None,
    }
}

/// Parses `1` / `0`.
pub fn parse_switch(value: &[u8]) -> Option<bool> {
    match value {
        b"1" => Some(true),
        b"0" => Some(false),
        _ => None,
    }
}

/// Everything the preload library reads from the environment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// `TIEXEC_BACKEND`, default `auto`.
    pub backend: Backend,
    /// `TIEXEC_LOG`, default `warn`.
    pub log: Level,
    /// `TIEXEC_CHILDREN`, default `1`: children started by the target keep
    /// the preload. `0` removes libtiexec from `LD_PRELOAD` before `main`.
    pub children: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            backend: Backend::Auto,
            log: Level::Warn,
            children: true,
        }
    }
}

/// The names of the variables, for documentation and the CLI.
pub const VAR_BACKEND: &str = "TIEXEC_BACKEND";
/// See [`Config::log`].
pub const VAR_LOG: &str = "TIEXEC_LOG";
/// See [`Config::children`].
pub const VAR_CHILDREN: &str = "TIEXEC_CHILDREN";

/// A variable whose value was not understood; the default was used instead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadValue<'a> {
    /// The variable's name.
    pub var: &'static str,
    /// What it held (may be anything, even non-UTF-8).
    pub value: &'a [u8],
    /// The accepted values.
    pub expected: &'static str,
}

/// The parsed settings, plus up to one complaint per variable.
pub struct Parsed<'a> {
    /// The settings to use.
    pub config: Config,
    /// The values that were ignored.
    pub bad: [Option<BadValue<'a>>; 3],
}

/// Parses the settings. `get(name)` returns the variable's bytes, if set.
/// Empty values count as unset.
pub fn parse<'a>(get: impl Fn(&str) -> Option<&'a [u8]>) -> Parsed<'a> {
    let mut config = Config::default();
    let mut bad = [None, None, None];
    let present = |name: &str| get(name).filter(|v| !v.is_empty());

    if let Some(v) = present(VAR_BACKEND) {
        match Backend::parse(v) {
            Some(b) => config.backend = b,
            None => {
                bad[0] = Some(BadValue {
                    var: VAR_BACKEND,
                    value: v,
                    expected: "auto|hugetlb|thp|off",
                })
            }
        }
    }
    if let Some(v) = present(VAR_LOG) {
        match parse_level(v) {
            Some(l) => config.log = l,
            None => {
                bad[1] = Some(BadValue {
                    var: VAR_LOG,
                    value: v,
                    expected: "off|error|warn|info|debug",
                })
            }
        }
    }
    if let Some(v) = present(VAR_CHILDREN) {
        match parse_switch(v) {
            Some(c) => config.children = c,
            None => {
                bad[2] = Some(BadValue {
                    var: VAR_CHILDREN,
                    value: v,
                    expected: "1|0",
                })
            }
        }
    }
    Parsed { config, bad }
}

/// Reads one variable from the process environment without allocating.
/// Valid until the environment is changed.
pub fn getenv_bytes(name: &core::ffi::CStr) -> Option<&'static [u8]> {
    // SAFETY: getenv returns NULL or a pointer to a NUL-terminated string in
    // the environment block. Nothing here changes the environment while the
    // returned slice is in use (the constructor runs single-threaded).
    let p = unsafe { libc::getenv(name.as_ptr()) };
    if p.is_null() {
        None
    } else {
        // SAFETY: non-null and NUL-terminated (see above).
        Some(unsafe { core::ffi::CStr::from_ptr(p) }.to_bytes())
    }
}

/// The settings of this process.
pub fn from_process_env() -> Parsed<'static> {
    parse(|name| match name {
        VAR_BACKEND => getenv_bytes(c"TIEXEC_BACKEND"),
        VAR_LOG => getenv_bytes(c"TIEXEC_LOG"),
        VAR_CHILDREN => getenv_bytes(c"TIEXEC_CHILDREN"),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_pairs<'a>(pairs: &'a [(&'a str, &'a [u8])]) -> Parsed<'a> {
        parse(move |name| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| *v))
    }

    #[test]
    fn defaults_when_unset_or_empty() {
        let p = parse_pairs(&[("TIEXEC_BACKEND", b"")]);
        assert_eq!(p.config, Config::default());
        assert!(p.bad.iter().all(Option::is_none));
    }

    #[test]
    fn every_documented_value_parses() {
        for (v, b) in [
            ("auto", Backend::Auto),
            ("hugetlb", Backend::Hugetlb),
            ("thp", Backend::Thp),
            ("off", Backend::Off),
        ] {
            assert_eq!(Backend::parse(v.as_bytes()), Some(b));
            assert_eq!(b.name(), v);
        }
        for l in [
            Level::Off,
            Level::Error,
            Level::Warn,
            Level::Info,
            Level::Debug,
        ] {
            assert_eq!(parse_level(l.name().as_bytes()), Some(l));
        }
        let p = parse_pairs(&[
            ("TIEXEC_BACKEND", b"thp"),
            ("TIEXEC_LOG", b"debug"),
            ("TIEXEC_CHILDREN", b"0"),
        ]);
        assert_eq!(
            p.config,
            Config {
                backend: Backend::Thp,
                log: Level::Debug,
                children: false
            }
        );
    }

    #[test]
    fn garbage_is_reported_and_the_default_kept() {
        let p = parse_pairs(&[
            ("TIEXEC_BACKEND", b"HUGETLB"),
            ("TIEXEC_LOG", b"\xff\xfe"),
            ("TIEXEC_CHILDREN", b"yes"),
        ]);
        assert_eq!(p.config, Config::default());
        let bad: Vec<_> = p.bad.iter().flatten().map(|b| b.var).collect();
        assert_eq!(bad, ["TIEXEC_BACKEND", "TIEXEC_LOG", "TIEXEC_CHILDREN"]);
        // Strict: no trimming, no case folding.
        assert_eq!(Backend::parse(b" thp"), None);
        assert_eq!(Backend::parse(b"thp\n"), None);
    }
}
