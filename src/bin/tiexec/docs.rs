//! `tiexec --man` and `tiexec --completions SHELL`: the manual page and the
//! shell completions, generated from the same tables as `--help` (the
//! settings table, the wrapper's own options, the commands), so that none
//! of them can name an option the others lack.

use crate::args::{run_options, COMMANDS};
use crate::ExitCode;

/// roff-escapes `text` for a man page line.
fn roff(text: &str) -> String {
    let escaped = text.replace('\\', "\\e").replace('-', "\\-");
    // A line starting with '.' or '\'' would be a request.
    if escaped.starts_with('.') || escaped.starts_with('\'') {
        format!("\\&{escaped}")
    } else {
        escaped
    }
}

/// The manual page (roff, `man 1 tiexec`).
pub fn man_page() -> String {
    let mut m = String::new();
    m.push_str(&format!(
        ".TH TIEXEC 1 \"\" \"tiexec {}\" \"User Commands\"\n",
        env!("CARGO_PKG_VERSION")
    ));
    m.push_str(".SH NAME\ntiexec \\- run a program with its machine code on huge pages\n");
    m.push_str(".SH SYNOPSIS\n.B tiexec\n[\\fIOPTIONS\\fR] [\\fB\\-\\-\\fR] \\fIPROGRAM\\fR [\\fIARGS\\fR...]\n");
    for (synopsis, _) in COMMANDS {
        m.push_str(&format!(".br\n.B tiexec\n{}\n", roff(synopsis)));
    }
    m.push_str(
        ".SH DESCRIPTION\n\
         Runs PROGRAM with the executable text of the program and of its libraries on \
         2 MiB huge pages (the kernel's PMD\\-level page), moved before \\fBmain\\fR by a \
         library preloaded into every process the command starts. PROGRAM keeps tiexec's \
         PID, and tiexec exits with PROGRAM's status. A word is always a program: the \
         management commands are options, and count only as the first argument.\n\
         .PP\n\
         By default (\\fB\\-\\-backend auto\\fR) the program named gets its text copied on \
         its first run, and from then on each program's run history decides whether \
         copies pay off for it; once the machine is set up (\\fBtiexec \\-\\-setup\\fR), \
         every run gets its text from a shared cache of ready images, with no copy.\n",
    );
    m.push_str(".SH COMMANDS\n");
    for (synopsis, help) in COMMANDS {
        m.push_str(&format!(
            ".TP\n.B tiexec {}\n{}\n",
            roff(synopsis),
            roff(help)
        ));
    }
    m.push_str(".SH OPTIONS\n");
    for (short, long, value, help, var) in run_options() {
        let mut head = String::new();
        if let Some(c) = short {
            head.push_str(&format!("\\fB\\-{c}\\fR, "));
        }
        head.push_str(&format!("\\fB\\-\\-{}\\fR", roff(long)));
        if !value.is_empty() {
            head.push_str(&format!(" \\fI{value}\\fR"));
        }
        m.push_str(&format!(".TP\n{head}\n{}", roff(help)));
        if !var.is_empty() {
            m.push_str(&format!(" (variable \\fB{}\\fR)", roff(var)));
        }
        m.push('\n');
    }
    m.push_str(".SH ENVIRONMENT\nEach option above that names a variable sets it for PROGRAM; \
                the library reads the same variables, so \\fBLD_PRELOAD\\fR=\\fI$(tiexec \\-\\-print\\-library)\\fR \
                with them set does what the options do. \\fBTIEXEC_STATE\\fR, \\fBXDG_CACHE_HOME\\fR, \
                systemd's \\fBCACHE_DIRECTORY\\fR and \\fBHOME\\fR locate the run history, in that order; \
                without any, \\fI/var/tmp/tiexec\\-UID\\fR.\n");
    m.push_str(".SH EXIT STATUS\nPROGRAM's, or 127 when PROGRAM is not found, 126 when it cannot be \
                executed, 2 for a usage error. The commands: 0 when done (\\fB\\-\\-check\\fR: ready), \
                1 when not.\n");
    m.push_str(".SH FILES\n.TP\n.I /run/tiexec\nthe image cache (a hugetlbfs, \\fBtiexec \\-\\-setup\\fR)\n\
                .TP\n.I /usr/local/lib/tiexec/libtiexec.so\nthe library for \\fBLD_PRELOAD\\fR, installed by \\fBtiexec \\-\\-setup\\fR\n\
                .TP\n.I /var/lib/tiexec/setup\nwhat \\fBtiexec \\-\\-setup\\fR did, for \\fB\\-\\-remove\\fR\n\
                .TP\n.I ~/.cache/tiexec\nrun histories, hot maps, copy rates; the extracted libraries\n");
    m
}

/// Completions for `shell` (`bash`, `zsh`, `fish`).
pub fn completions(shell: &str) -> Option<String> {
    let commands: Vec<&str> = COMMANDS
        .iter()
        .filter_map(|(s, _)| s.split_whitespace().next())
        .chain(["--man", "--completions"])
        .collect();
    let mut commands_unique: Vec<&str> = Vec::new();
    for c in commands {
        if !commands_unique.contains(&c) {
            commands_unique.push(c);
        }
    }
    let options = run_options();
    let long: Vec<String> = options.iter().map(|o| format!("--{}", o.1)).collect();
    let with_value: Vec<String> = options
        .iter()
        .filter(|o| !o.2.is_empty())
        .map(|o| format!("--{}", o.1))
        .collect();
    match shell {
        "bash" => Some(format!(
            "# bash completion for tiexec (tiexec --completions bash)\n\
             _tiexec() {{\n\
             \x20   local cur=\"${{COMP_WORDS[COMP_CWORD]}}\" prev=\"${{COMP_WORDS[COMP_CWORD-1]}}\"\n\
             \x20   case \"$prev\" in\n\
             \x20       {values}) COMPREPLY=($(compgen -f -- \"$cur\")); return;;\n\
             \x20   esac\n\
             \x20   # After the program, its own arguments.\n\
             \x20   local i\n\
             \x20   for ((i = 1; i < COMP_CWORD; i++)); do\n\
             \x20       case \"${{COMP_WORDS[i]}}\" in -*) ;; *) _command_offset $i; return;; esac\n\
             \x20   done\n\
             \x20   if [[ \"$cur\" == -* ]]; then\n\
             \x20       COMPREPLY=($(compgen -W \"{words}\" -- \"$cur\"))\n\
             \x20   else\n\
             \x20       COMPREPLY=($(compgen -c -- \"$cur\"))\n\
             \x20   fi\n\
             }}\n\
             complete -F _tiexec tiexec\n",
            values = with_value.join("|"),
            words = commands_unique
                .iter()
                .map(|s| s.to_string())
                .chain(long.iter().cloned())
                .collect::<Vec<_>>()
                .join(" ")
        )),
        "zsh" => {
            let mut specs = String::new();
            for (_, long, value, help, _) in &options {
                let help = help.replace(['[', ']', '\''], "");
                if value.is_empty() {
                    specs.push_str(&format!("  '--{long}[{help}]' \\\n"));
                } else {
                    specs.push_str(&format!("  '--{long}=[{help}]:{value}:_files' \\\n"));
                }
            }
            for c in &commands_unique {
                specs.push_str(&format!("  '{c}[a tiexec command]' \\\n"));
            }
            Some(format!(
                "#compdef tiexec\n# zsh completion for tiexec (tiexec --completions zsh)\n\
                 _arguments -s \\\n{specs}  '*::program:_normal'\n"
            ))
        }
        "fish" => {
            let mut out = String::from("# fish completion for tiexec (tiexec --completions fish)\n");
            for (short, long, value, help, _) in &options {
                let help = help.replace('\'', "");
                let short = short.map_or(String::new(), |c| format!(" -s {c}"));
                let takes = if value.is_empty() { "" } else { " -r" };
                out.push_str(&format!(
                    "complete -c tiexec{short} -l {long}{takes} -d '{help}'\n"
                ));
            }
            for c in &commands_unique {
                out.push_str(&format!(
                    "complete -c tiexec -n __fish_is_first_arg -l {} -d 'tiexec command'\n",
                    c.trim_start_matches("--")
                ));
            }
            Some(out)
        }
        _ => None,
    }
}

/// Runs `tiexec --man`.
pub fn man_main(mut argv: impl Iterator<Item = std::ffi::OsString>) -> ExitCode {
    if argv.next().is_some() {
        eprintln!("tiexec --man: takes no argument (tiexec --man > tiexec.1; man -l tiexec.1)");
        return ExitCode::from(2);
    }
    print!("{}", man_page());
    ExitCode::SUCCESS
}

/// Runs `tiexec --completions SHELL`.
pub fn completions_main(mut argv: impl Iterator<Item = std::ffi::OsString>) -> ExitCode {
    let shell = argv.next();
    match shell
        .as_ref()
        .and_then(|s| s.to_str())
        .and_then(completions)
    {
        Some(text) if argv.next().is_none() => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!(
                "Usage: tiexec --completions bash|zsh|fish\n\
                 e.g. tiexec --completions bash > /etc/bash_completion.d/tiexec"
            );
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_option_and_command_is_in_the_manual_and_the_completions() {
        let man = man_page();
        let shells: Vec<String> = ["bash", "zsh", "fish"]
            .iter()
            .map(|s| completions(s).expect("a shell"))
            .collect();
        for (_, long, _, _, var) in run_options() {
            let roffed = format!("\\-\\-{}", long.replace('-', "\\-"));
            assert!(man.contains(&roffed), "man page lacks --{long}");
            if !var.is_empty() {
                assert!(
                    man.contains(&var.replace('-', "\\-")),
                    "man page lacks {var}"
                );
            }
            for (shell, text) in ["bash", "zsh", "fish"].iter().zip(&shells) {
                let named =
                    text.contains(&format!("--{long}")) || text.contains(&format!("-l {long}"));
                assert!(named, "{shell} completions lack --{long}");
            }
        }
        for (synopsis, _) in COMMANDS {
            let cmd = synopsis.split_whitespace().next().expect("a command");
            assert!(man.contains(&roff(cmd)), "man page lacks {cmd}");
            assert!(shells[0].contains(cmd), "bash completions lack {cmd}");
        }
        assert!(completions("tcsh").is_none());
    }
}
