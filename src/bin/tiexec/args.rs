//! The wrapper's command line: `tiexec [OPTIONS] [--] PROGRAM [ARGS...]`.
//!
//! Options that stand for a setting come from the settings table
//! (`tiexec::internal::config::SETTINGS`): each sets its `TIEXEC_*` variable for the
//! program, checked by the same rules the library applies. The first word
//! that is not an option is PROGRAM; everything after it is PROGRAM's.

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use tiexec::internal::config::{self, SETTINGS};

/// What the wrapper was asked to do.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Args {
    /// `TIEXEC_*` variables to set for the program, in option order.
    pub settings: Vec<(&'static str, OsString)>,
    /// `--dlopen`: also cover libraries loaded later, through an audit module.
    pub dlopen: bool,
    /// `--no-prime`: do not prime the page cache before exec.
    pub no_prime: bool,
    /// `--library PATH`: preload this library instead of the built-in one.
    pub library: Option<PathBuf>,
    /// The program and its arguments.
    pub program: OsString,
    /// See above.
    pub program_args: Vec<OsString>,
}

impl Args {
    /// The value given for `var`, if any (the last one wins).
    pub fn setting(&self, var: &str) -> Option<&OsString> {
        self.settings
            .iter()
            .rev()
            .find(|(v, _)| *v == var)
            .map(|(_, value)| value)
    }
}

/// What parsing came to.
pub enum Parsed {
    /// Run the program.
    Run(Box<Args>),
    /// Print this on stdout and exit 0 (help, version).
    Print(String),
    /// A usage error.
    Usage(String),
}

/// The management commands: synopsis (after `tiexec `) and what each does.
/// One list for `--help`, the man page and the shell completions.
pub const COMMANDS: [(&str, &str); 9] = [
    (
        "--setup [--pages N] [--persist]",
        "(root) reserve pages, mount the image cache",
    ),
    ("--setup --remove", "(root) undo it"),
    (
        "--cache [--clear [PATTERN]]",
        "list or evict the image cache",
    ),
    (
        "--stat [--tree] [--json] PID...",
        "what a running process's text is mapped with",
    ),
    ("--stat [--json]", "every process tiexec serves now"),
    (
        "--check [PROGRAM]",
        "is the machine ready, and what a run would do",
    ),
    ("--prime FILE...", "cache files' text as 2 MiB folios"),
    ("--print-library", "the libtiexec.so to name in LD_PRELOAD"),
    (
        "--man | --completions SHELL",
        "this manual as a man page; bash, zsh or fish completions",
    ),
];

/// The wrapper's options that are not settings: (short, long, value, help).
pub const OWN_OPTIONS: [(Option<char>, &str, &str, &str); 6] = [
    (Some('v'), "verbose", "", "same as --log info: one line per object"),
    (
        None,
        "dlopen",
        "",
        "also cover libraries PROGRAM loads later with dlopen (an audit module; PROGRAM itself only, not its children)",
    ),
    (
        None,
        "no-prime",
        "",
        "do not cache PROGRAM's text (and its libraries') as 2 MiB folios first",
    ),
    (
        None,
        "library",
        "PATH",
        "preload this libtiexec.so instead of the built-in one",
    ),
    (Some('h'), "help", "", "show this help"),
    (Some('V'), "version", "", "show the version"),
];

/// Every option of a run: (short, long, value name, help, variable).
pub fn run_options() -> Vec<(
    Option<char>,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
)> {
    let mut out = Vec::new();
    for s in SETTINGS.iter() {
        let Some(f) = s.flag else {
            continue;
        };
        let value = if f.switch.is_some() { "" } else { f.value_name };
        out.push((f.short, f.long, value, s.help, s.var));
    }
    for (short, long, value, help) in OWN_OPTIONS {
        out.push((short, long, value, help, ""));
    }
    out
}

/// The usage text, its options listed from the settings table.
pub fn usage() -> String {
    let mut options = String::new();
    for (short, long, value, help, var) in run_options() {
        let short = short.map_or("    ".to_string(), |c| format!("-{c}, "));
        let value = if value.is_empty() {
            String::new()
        } else {
            format!(" {value}")
        };
        let mut l = format!("  {:<22} {help}", format!("{short}--{long}{value}"));
        if !var.is_empty() {
            l.push_str(&format!(" [{var}]"));
        }
        options.push_str(&l);
        options.push('\n');
    }
    let mut commands = String::new();
    for (synopsis, help) in COMMANDS {
        commands.push_str(&format!("       tiexec {synopsis:<32} {help}\n"));
    }
    format!(
        "\
Usage: tiexec [OPTIONS] [--] PROGRAM [ARGS...]
{commands}
Runs PROGRAM with its executable text on 2 MiB huge pages. PROGRAM keeps
tiexec's PID, and tiexec exits with PROGRAM's status. A word is always a
program: the management commands are options, and count only as the first
argument (`tiexec stat FILE` runs stat).

Options:
{options}
Exit status: PROGRAM's, or 127 when PROGRAM is not found, 126 when it
cannot be executed, 2 for a usage error.
"
    )
}

/// Parses the wrapper's arguments (those after `tiexec`).
pub fn parse(argv: impl IntoIterator<Item = OsString>) -> Parsed {
    match parse_inner(argv) {
        Ok(p) => p,
        Err(e) => Parsed::Usage(e.to_string()),
    }
}

fn parse_inner(argv: impl IntoIterator<Item = OsString>) -> Result<Parsed, lexopt::Error> {
    use lexopt::Arg::{Long, Short, Value};
    let mut parser = lexopt::Parser::from_args(argv);
    let mut args = Args::default();
    while let Some(arg) = parser.next()? {
        let setting = match &arg {
            Long(name) => config::setting_for_flag(Some(name), None),
            Short(c) => config::setting_for_flag(None, Some(*c)),
            Value(_) => None,
        };
        if let Some(s) = setting {
            let flag = s.flag.ok_or(lexopt::Error::from("no such option"))?;
            let value = match flag.switch {
                Some(v) => OsString::from(v),
                None => parser.value()?,
            };
            if let Err(expected) = config::check_value(s, value.as_bytes()) {
                return Ok(Parsed::Usage(format!(
                    "--{} {}: expected {expected}",
                    flag.long,
                    value.to_string_lossy()
                )));
            }
            args.settings.push((s.var, value));
            continue;
        }
        match arg {
            Short('h') | Long("help") => return Ok(Parsed::Print(usage())),
            Short('V') | Long("version") => {
                return Ok(Parsed::Print(format!(
                    "tiexec {}\n",
                    env!("CARGO_PKG_VERSION")
                )))
            }
            Short('v') | Long("verbose") => args.settings.push((config::VAR_LOG, "info".into())),
            Long("dlopen") => args.dlopen = true,
            Long("no-prime") => args.no_prime = true,
            Long("library") => args.library = Some(parser.value()?.into()),
            Value(program) => {
                args.program = program;
                args.program_args = parser.raw_args()?.collect();
                return Ok(Parsed::Run(Box::new(args)));
            }
            Long(name) => {
                let name = name.to_string();
                return Ok(Parsed::Usage(match did_you_mean(&name) {
                    Some(known) => format!("unknown option --{name}; did you mean --{known}?"),
                    None => format!("unknown option --{name}"),
                }));
            }
            other => return Err(other.unexpected()),
        }
    }
    Ok(Parsed::Usage("missing PROGRAM".into()))
}

/// The known long option nearest `name`, when it is a likely typo (at most
/// two edits away): the commands and every option.
fn did_you_mean(name: &str) -> Option<&'static str> {
    const OWN: [&str; 11] = [
        "setup",
        "cache",
        "stat",
        "check",
        "prime",
        "print-library",
        "verbose",
        "dlopen",
        "no-prime",
        "library",
        "help",
    ];
    let settings = config::SETTINGS
        .iter()
        .filter_map(|s| s.flag.map(|f| f.long));
    OWN.into_iter()
        .chain(settings)
        .map(|known| (edit_distance(name, known), known))
        .filter(|&(d, _)| d <= 2)
        .min_by_key(|&(d, _)| d)
        .map(|(_, known)| known)
}

/// Levenshtein distance between two short strings.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(v: &[&str]) -> Option<Args> {
        match parse(v.iter().map(OsString::from)) {
            Parsed::Run(a) => Some(*a),
            _ => None,
        }
    }

    #[test]
    fn a_near_miss_is_named() {
        assert_eq!(did_you_mean("stats"), Some("stat"));
        assert_eq!(did_you_mean("bakend"), Some("backend"));
        assert_eq!(did_you_mean("cache-directory"), None);
        match parse(["--stats".into(), "1".into()]) {
            Parsed::Usage(msg) => assert!(msg.contains("did you mean --stat?"), "{msg}"),
            _ => panic!("--stats is not an option"),
        }
    }

    #[test]
    fn options_stop_at_the_program() {
        let a = run(&["-b", "thp", "--log=info", "g++", "-O2", "--backend", "x"]).unwrap();
        assert_eq!(a.setting("TIEXEC_BACKEND").unwrap(), "thp");
        assert_eq!(a.setting("TIEXEC_LOG").unwrap(), "info");
        assert_eq!(a.program, "g++");
        assert_eq!(a.program_args, ["-O2", "--backend", "x"]);
        let a = run(&["--", "-weird-name", "--help"]).unwrap();
        assert_eq!(a.program, "-weird-name");
        assert_eq!(a.program_args, ["--help"]);
        let a = run(&["--no-children", "-v", "--min-text", "8M", "stat", "/etc"]).unwrap();
        assert_eq!(a.setting("TIEXEC_CHILDREN").unwrap(), "0");
        assert_eq!(a.setting("TIEXEC_MIN_TEXT").unwrap(), "8M");
        assert_eq!(a.program, "stat", "a word is always a program");
    }

    #[test]
    fn bad_values_and_unknown_options_are_usage_errors() {
        for bad in [
            &["--backend", "bogus", "ls"][..],
            &["--frobnicate", "ls"],
            &["--min-text", "4 M", "ls"],
            &["--cache-dir", "relative", "ls"],
            &[],
            &["-b"],
        ] {
            assert!(
                matches!(parse(bad.iter().map(OsString::from)), Parsed::Usage(_)),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn every_settings_option_is_in_the_help() {
        let text = usage();
        for s in SETTINGS.iter() {
            if let Some(f) = s.flag {
                assert!(text.contains(&format!("--{}", f.long)), "{}", f.long);
                assert!(text.contains(s.var), "{}", s.var);
            }
        }
    }
}
