//! `TIEXEC_*` settings. Pure: parsing takes a lookup function, so tests and
//! the CLI use the same rules as the constructor. A value that does not parse
//! is reported and the default is used; it never stops the target.

use crate::log::Level;

/// Where the huge pages come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// The image cache where it is set up; private THP copies only where
    /// they pay off; never the hugetlb pool (see `plan::supplies`).
    Auto,
    /// Only images from the cache (shared hugetlbfs files).
    Cache,
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
            Backend::Cache => "cache",
            Backend::Hugetlb => "hugetlb",
            Backend::Thp => "thp",
            Backend::Off => "off",
        }
    }

    /// Parses a backend name (exact, lower case).
    pub fn parse(value: &[u8]) -> Option<Backend> {
        match value {
            b"auto" => Some(Backend::Auto),
            b"cache" => Some(Backend::Cache),
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

/// How far a plan reaches beyond the executable segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// Only whole 2 MiB pages inside the segment.
    Conservative,
    /// Also the 2 MiB pages the segment only partly fills, when the rest of
    /// the page is unmapped or read-only bytes of the same object (headers,
    /// rodata): those bytes are copied too and become readable+executable.
    Aggressive,
}

impl Strategy {
    /// The name used in `TIEXEC_STRATEGY`.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Conservative => "conservative",
            Strategy::Aggressive => "aggressive",
        }
    }

    /// Parses a strategy name (exact, lower case).
    pub fn parse(value: &[u8]) -> Option<Strategy> {
        match value {
            b"conservative" => Some(Strategy::Conservative),
            b"aggressive" => Some(Strategy::Aggressive),
            _ => None,
        }
    }
}

/// Parses a byte count: digits with an optional `K`, `M` or `G` suffix
/// (powers of 1024).
pub fn parse_size(value: &[u8]) -> Option<u64> {
    let (digits, unit) = match value.last()? {
        b'K' => (&value[..value.len() - 1], 1u64 << 10),
        b'M' => (&value[..value.len() - 1], 1 << 20),
        b'G' => (&value[..value.len() - 1], 1 << 30),
        _ => (value, 1),
    };
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let mut n: u64 = 0;
    for d in digits {
        n = n.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
    }
    n.checked_mul(unit)
}

/// Where the image cache is (`TIEXEC_CACHE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CachePath<'a> {
    /// [`crate::cache::DEFAULT_ROOT`].
    Default,
    /// No cache.
    Off,
    /// A hugetlbfs mount at this absolute path.
    At(&'a [u8]),
}

impl CachePath<'_> {
    /// Parses `off` or an absolute path.
    pub fn parse(value: &[u8]) -> Option<CachePath<'_>> {
        match value {
            b"off" => Some(CachePath::Off),
            v if v.first() == Some(&b'/') && !v.contains(&0) => Some(CachePath::At(v)),
            _ => None,
        }
    }
}

/// Everything the preload library reads from the environment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config<'a> {
    /// `TIEXEC_BACKEND`, default `auto`.
    pub backend: Backend,
    /// `TIEXEC_LOG`, default `warn`.
    pub log: Level,
    /// `TIEXEC_CHILDREN`, default `1`: children started by the target keep
    /// the preload. `0` removes libtiexec from `LD_PRELOAD` and `LD_AUDIT`
    /// before `main`.
    pub children: bool,
    /// `TIEXEC_STRATEGY`, default `aggressive`.
    pub strategy: Strategy,
    /// `TIEXEC_INCLUDE`: ':'-separated patterns; when set, only objects
    /// matching one of them are considered.
    pub include: Option<&'a [u8]>,
    /// `TIEXEC_EXCLUDE`: ':'-separated patterns of objects to leave alone.
    pub exclude: Option<&'a [u8]>,
    /// `TIEXEC_MIN_TEXT`: objects with less executable text are left alone.
    pub min_text: u64,
    /// `TIEXEC_FAULT`: a step to make fail, for tests (see `fault`).
    pub fault: Option<crate::fault::Step>,
    /// `TIEXEC_REPORT`: where to write a JSON report: a path (`%p` becomes
    /// the PID), or `fd:N`.
    pub report: Option<&'a [u8]>,
    /// `TIEXEC_PERF_MAP`: `1` writes `/tmp/perf-PID.map` with the functions
    /// of the ranges moved to anonymous memory, for `perf report`.
    pub perf_map: bool,
    /// `TIEXEC_CACHE`: where the image cache is, or `off`.
    pub cache: CachePath<'a>,
}

impl Default for Config<'_> {
    fn default() -> Self {
        Config {
            backend: Backend::Auto,
            log: Level::Warn,
            children: true,
            strategy: Strategy::Aggressive,
            include: None,
            exclude: None,
            min_text: 0,
            fault: None,
            report: None,
            perf_map: false,
            cache: CachePath::Default,
        }
    }
}

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

/// How a setting is given on the `tiexec` command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flag {
    /// The long option, without the dashes: `backend` for `--backend`.
    pub long: &'static str,
    /// The one-letter option, if any.
    pub short: Option<char>,
    /// `None`: the option takes a value (`--backend thp`); `Some(v)`: it
    /// takes none and stands for the value `v` (`--no-children` for `0`).
    pub switch: Option<&'static str>,
    /// What the value is, for the usage text (`NAME`, `SIZE`).
    pub value_name: &'static str,
}

/// One setting: its variable, its command-line option, what it accepts, and
/// how it applies a value (false when the value is not understood). The CLI
/// is derived from this table, so options and variables cannot drift apart.
pub struct Setting {
    /// The environment variable.
    pub var: &'static str,
    /// The `tiexec` option that sets it, if any.
    pub flag: Option<Flag>,
    /// The accepted values, for messages.
    pub expected: &'static str,
    /// One line of help for the usage text.
    pub help: &'static str,
    apply: for<'a> fn(&mut Config<'a>, &'a [u8]) -> bool,
}

const fn flag(long: &'static str, short: Option<char>, value_name: &'static str) -> Option<Flag> {
    Some(Flag {
        long,
        short,
        switch: None,
        value_name,
    })
}

const fn switch(long: &'static str, value: &'static str) -> Option<Flag> {
    Some(Flag {
        long,
        short: None,
        switch: Some(value),
        value_name: "",
    })
}

/// Every variable, in the order they are reported.
pub const SETTINGS: [Setting; 12] = [
    Setting {
        var: "TIEXEC_BACKEND",
        flag: flag("backend", Some('b'), "NAME"),
        expected: "auto|cache|hugetlb|thp|off",
        help: "where huge pages come from: auto (default), cache, hugetlb, thp, off",
        apply: |c, v| Backend::parse(v).map(|b| c.backend = b).is_some(),
    },
    Setting {
        var: "TIEXEC_LOG",
        flag: flag("log", Some('l'), "LEVEL"),
        expected: "off|error|warn|info|debug",
        help: "off, error, warn (default), info, debug",
        apply: |c, v| parse_level(v).map(|l| c.log = l).is_some(),
    },
    Setting {
        var: "TIEXEC_CHILDREN",
        flag: switch("no-children", "0"),
        expected: "1|0",
        help: "programs started by PROGRAM run without tiexec",
        apply: |c, v| parse_switch(v).map(|b| c.children = b).is_some(),
    },
    Setting {
        var: "TIEXEC_STRATEGY",
        flag: flag("strategy", Some('s'), "NAME"),
        expected: "conservative|aggressive",
        help: "aggressive (default: also the 2 MiB pages text shares with read-only data) or conservative",
        apply: |c, v| Strategy::parse(v).map(|s| c.strategy = s).is_some(),
    },
    Setting {
        var: "TIEXEC_INCLUDE",
        flag: flag("include", None, "PATS"),
        expected: "patterns separated by ':'",
        help: "only objects matching these ':'-separated globs",
        apply: |c, v| {
            c.include = Some(v);
            true
        },
    },
    Setting {
        var: "TIEXEC_EXCLUDE",
        flag: flag("exclude", None, "PATS"),
        expected: "patterns separated by ':'",
        help: "leave objects matching these ':'-separated globs alone",
        apply: |c, v| {
            c.exclude = Some(v);
            true
        },
    },
    Setting {
        var: "TIEXEC_MIN_TEXT",
        flag: flag("min-text", None, "SIZE"),
        expected: "a byte count such as 4194304 or 4M",
        help: "leave objects with less text alone (e.g. 8M)",
        apply: |c, v| parse_size(v).map(|n| c.min_text = n).is_some(),
    },
    Setting {
        var: "TIEXEC_FAULT",
        flag: None,
        expected:
            "a step name (tests only): staging-map, staging-advise, staging-populate, \
                   staging-not-huge, trampoline-map, trampoline-protect, protect, remap, remap-hole",
        help: "tests only: make one step of the swap fail",
        apply: |c, v| {
            crate::fault::Step::parse(v)
                .map(|s| c.fault = Some(s))
                .is_some()
        },
    },
    Setting {
        var: "TIEXEC_REPORT",
        flag: flag("report", None, "PATH"),
        expected: "a file path (%p for the PID) or fd:N",
        help: "write a JSON report per process to PATH (%p: the PID) or fd:N",
        apply: |c, v| {
            c.report = Some(v);
            true
        },
    },
    Setting {
        var: "TIEXEC_PERF_MAP",
        flag: switch("perf-map", "1"),
        expected: "1|0",
        help: "append moved functions to /tmp/perf-PID.map for perf",
        apply: |c, v| parse_switch(v).map(|b| c.perf_map = b).is_some(),
    },
    Setting {
        var: "TIEXEC_CACHE",
        flag: flag("cache-dir", None, "DIR"),
        expected: "an absolute path of a hugetlbfs mount, or off",
        help: "the image cache's hugetlbfs mount (default /run/tiexec), or off",
        apply: |c, v| CachePath::parse(v).map(|p| c.cache = p).is_some(),
    },
    Setting {
        var: "TIEXEC_STATE",
        flag: flag("state-dir", None, "DIR"),
        expected: "an absolute path",
        help: "where run histories live (default: $XDG_CACHE_HOME/tiexec, $CACHE_DIRECTORY/tiexec, ~/.cache/tiexec, /var/tmp/tiexec-UID)",
        apply: |_, v| v.first() == Some(&b'/'),
    },
];

/// The setting behind a long option (`backend`) or a one-letter one.
pub fn setting_for_flag(long: Option<&str>, short: Option<char>) -> Option<&'static Setting> {
    SETTINGS.iter().find(|s| {
        s.flag.is_some_and(|f| {
            (long.is_some() && Some(f.long) == long) || (short.is_some() && f.short == short)
        })
    })
}

/// Checks one value for a setting: `Err(expected)` when it is not understood.
pub fn check_value(setting: &Setting, value: &[u8]) -> Result<(), &'static str> {
    let mut c = Config::default();
    if (setting.apply)(&mut c, value) {
        Ok(())
    } else {
        Err(setting.expected)
    }
}

/// The names of all variables, for documentation and the CLI.
pub fn variable_names() -> impl Iterator<Item = &'static str> {
    SETTINGS.iter().map(|s| s.var)
}

/// `TIEXEC_BACKEND`.
pub const VAR_BACKEND: &str = "TIEXEC_BACKEND";
/// `TIEXEC_LOG`.
pub const VAR_LOG: &str = "TIEXEC_LOG";

/// The parsed settings, plus the values that were not understood.
pub struct Parsed<'a> {
    /// The settings to use.
    pub config: Config<'a>,
    /// The values that were ignored (at most one per variable).
    pub bad: [Option<BadValue<'a>>; SETTINGS.len()],
}

/// Parses the settings. `get(name)` returns the variable's bytes, if set.
/// Empty values count as unset.
pub fn parse<'a>(get: impl Fn(&str) -> Option<&'a [u8]>) -> Parsed<'a> {
    let mut config = Config::default();
    let mut bad = [None; SETTINGS.len()];
    for (setting, slot) in SETTINGS.iter().zip(bad.iter_mut()) {
        let Some(value) = get(setting.var).filter(|v| !v.is_empty()) else {
            continue;
        };
        if !(setting.apply)(&mut config, value) {
            *slot = Some(BadValue {
                var: setting.var,
                value,
                expected: setting.expected,
            });
        }
    }
    Parsed { config, bad }
}

/// The `TIEXEC_*` variables of this process, copied (through std's
/// environment lock, so a concurrent `std::env::set_var` cannot tear them):
/// what code that may run beside other threads parses. (The preload
/// constructor reads them in place, without allocating: see `preload`.)
pub struct EnvSnapshot(Vec<(String, Vec<u8>)>);

impl EnvSnapshot {
    /// Copies the variables now.
    pub fn take() -> EnvSnapshot {
        use std::os::unix::ffi::OsStrExt;
        EnvSnapshot(
            std::env::vars_os()
                .filter_map(|(k, v)| {
                    let k = k.into_string().ok()?;
                    k.starts_with("TIEXEC_").then(|| (k, v.as_bytes().to_vec()))
                })
                .collect(),
        )
    }

    /// The settings they make.
    pub fn parse(&self) -> Parsed<'_> {
        parse(|name| self.get(name))
    }

    /// One `TIEXEC_*` variable's value, if set.
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
    }
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
            ("cache", Backend::Cache),
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
            ("TIEXEC_STRATEGY", b"conservative"),
            ("TIEXEC_INCLUDE", b"*/libLLVM*:cc1plus"),
            ("TIEXEC_EXCLUDE", b"libc.so.6"),
            ("TIEXEC_MIN_TEXT", b"8M"),
            ("TIEXEC_CACHE", b"/mnt/huge"),
        ]);
        assert_eq!(
            p.config,
            Config {
                backend: Backend::Thp,
                log: Level::Debug,
                children: false,
                strategy: Strategy::Conservative,
                include: Some(b"*/libLLVM*:cc1plus"),
                exclude: Some(b"libc.so.6"),
                min_text: 8 << 20,
                fault: None,
                report: None,
                perf_map: false,
                cache: CachePath::At(b"/mnt/huge"),
            }
        );
        assert_eq!(CachePath::parse(b"off"), Some(CachePath::Off));
        assert_eq!(CachePath::parse(b"relative/dir"), None);
        assert!(p.bad.iter().all(Option::is_none));
    }

    #[test]
    fn garbage_is_reported_and_the_default_kept() {
        let p = parse_pairs(&[
            ("TIEXEC_BACKEND", b"HUGETLB"),
            ("TIEXEC_LOG", b"\xff\xfe"),
            ("TIEXEC_CHILDREN", b"yes"),
            ("TIEXEC_STRATEGY", b"bold"),
            ("TIEXEC_MIN_TEXT", b"4 M"),
        ]);
        assert_eq!(p.config, Config::default());
        let bad: Vec<_> = p.bad.iter().flatten().map(|b| b.var).collect();
        assert_eq!(
            bad,
            [
                "TIEXEC_BACKEND",
                "TIEXEC_LOG",
                "TIEXEC_CHILDREN",
                "TIEXEC_STRATEGY",
                "TIEXEC_MIN_TEXT"
            ]
        );
        // Strict: no trimming, no case folding.
        assert_eq!(Backend::parse(b" thp"), None);
        assert_eq!(Backend::parse(b"thp\n"), None);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size(b"0"), Some(0));
        assert_eq!(parse_size(b"4096"), Some(4096));
        assert_eq!(parse_size(b"2K"), Some(2048));
        assert_eq!(parse_size(b"64M"), Some(64 << 20));
        assert_eq!(parse_size(b"1G"), Some(1 << 30));
        for bad in [
            &b""[..],
            b"M",
            b"4m",
            b"-1",
            b"4MB",
            b" 4",
            b"99999999999999999999",
            b"17179869184G",
        ] {
            assert_eq!(parse_size(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn options_and_variables_come_from_one_table() {
        let b = setting_for_flag(Some("backend"), None).expect("--backend");
        assert_eq!(b.var, "TIEXEC_BACKEND");
        assert_eq!(
            setting_for_flag(None, Some('b')).map(|s| s.var),
            Some(b.var)
        );
        assert!(check_value(b, b"thp").is_ok());
        assert_eq!(check_value(b, b"fast"), Err("auto|cache|hugetlb|thp|off"));
        let c = setting_for_flag(Some("no-children"), None).expect("--no-children");
        assert_eq!(c.flag.and_then(|f| f.switch), Some("0"));
        assert!(
            setting_for_flag(Some("fault"), None).is_none(),
            "tests only"
        );
        let mut longs: Vec<&str> = SETTINGS
            .iter()
            .filter_map(|s| s.flag)
            .map(|f| f.long)
            .collect();
        longs.sort_unstable();
        longs.dedup();
        assert_eq!(
            longs.len(),
            SETTINGS.iter().filter(|s| s.flag.is_some()).count()
        );
    }

    #[test]
    fn every_variable_is_read_from_the_environment() {
        // The name -> C string conversion must fit every name.
        for name in variable_names() {
            assert!(name.len() < 32, "{name}");
        }
    }
}
