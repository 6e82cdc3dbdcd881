//! One list of refusals (`session::Refusal`), three ways in: a run (the
//! preloaded constructor), the forecast (`tiexec --check`) and a program
//! calling `remap_text` itself. Under the same conditions all three refuse,
//! and say the same words.

mod common;

use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use common::{Waiting, PIE};

const T: Duration = Duration::from_secs(120);
const CALLS: &str = "20000";
/// Set in the child that calls `remap_text` (this test binary, run again).
const CHILD: &str = "TIEXEC_TEST_REFUSAL_CHILD";

#[derive(Clone, Copy, Debug, PartialEq)]
enum Case {
    /// `TIEXEC_BACKEND=off`.
    Off,
    /// A second thread runs before tiexec looks.
    Threads,
    /// `RLIMIT_AS` leaves less than tiexec's working margin.
    AddressSpace,
}

impl Case {
    const ALL: [Case; 3] = [Case::Off, Case::Threads, Case::AddressSpace];

    fn name(self) -> &'static str {
        match self {
            Case::Off => "off",
            Case::Threads => "threads",
            Case::AddressSpace => "address-space",
        }
    }

    /// What each way in must say.
    fn words(self) -> &'static str {
        match self {
            Case::Off => "backend off",
            Case::Threads => "threads already running",
            Case::AddressSpace => "address-space limit (RLIMIT_AS) leaves only",
        }
    }
}

/// The process's mapped size (`VmSize`), bytes.
fn vm_size(pid: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmSize:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmSize");
    kib << 10
}

/// Limits the address space of the process about to exec to `limit`.
fn limit_address_space(cmd: &mut Command, limit: u64) {
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between
    // fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let rl = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &rl) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The child: sets the condition up in this very process and calls
/// `remap_text` from its only thread (the harness runs a single test on
/// the main thread), printing what it returned.
fn remap_text_child(case: &str) {
    let mut options = tiexec::Options {
        backend: tiexec::Backend::Thp,
        ..tiexec::Options::default()
    };
    match case {
        "off" => options.backend = tiexec::Backend::Off,
        "threads" => {
            std::thread::spawn(|| loop {
                std::thread::park();
            });
        }
        "address-space" => {
            let limit = vm_size("self") + (16 << 20);
            let rl = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            // SAFETY: a plain system call with a valid struct.
            assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_AS, &rl) }, 0);
        }
        _ => panic!("unknown case {case}"),
    }
    match tiexec::remap_text(&options) {
        Ok(_) => println!("remap_text: ran"),
        Err(e) => println!("remap_text: {e}"),
    }
}

#[test]
fn a_run_the_forecast_and_remap_text_refuse_the_same_cases() {
    if let Ok(case) = std::env::var(CHILD) {
        remap_text_child(&case);
        return;
    }
    let exe = common::fixture(PIE);
    let lib = common::preload_lib();
    let starter = common::fixture::thread_starter_library(&common::scratch_dir().join("fixtures"));
    // The program's mapped size with the library loaded (doing nothing):
    // the address-space case leaves it 16 MiB more, less than the 64 MiB
    // tiexec keeps free for the program.
    let baseline = {
        let w = Waiting::start(
            common::isolate(&mut Command::new(&exe))
                .env("LD_PRELOAD", &lib)
                .env("TIEXEC_BACKEND", "off")
                .args([CALLS, "wait"]),
            T,
        );
        let size = vm_size(&w.pid().to_string());
        w.finish(T);
        size
    };
    let forecast_file = common::scratch_dir().join(format!("refusal-{}", std::process::id()));
    for case in Case::ALL {
        let program = |forecast: bool| {
            let mut cmd = Command::new(&exe);
            common::isolate(&mut cmd)
                .env("TIEXEC_LOG", "debug")
                .env("TIEXEC_BACKEND", "thp")
                .args([CALLS, "run"]);
            let mut preload = lib.clone().into_os_string();
            match case {
                Case::Off => {
                    cmd.env("TIEXEC_BACKEND", "off");
                }
                Case::Threads => {
                    // Preloaded constructors run last-listed first: the
                    // thread runs when tiexec's constructor looks.
                    preload.push(":");
                    preload.push(&starter);
                }
                Case::AddressSpace => limit_address_space(&mut cmd, baseline + (16 << 20)),
            }
            cmd.env("LD_PRELOAD", preload);
            if forecast {
                let _ = std::fs::remove_file(&forecast_file);
                cmd.env(tiexec::internal::forecast::VAR, &forecast_file)
                    .env(tiexec::internal::forecast::FORMAT_VAR, "text");
            }
            cmd
        };
        let words = case.words();

        let run = common::run(&mut program(false), T);
        run.check(
            run.status.success()
                && run
                    .stderr
                    .lines()
                    .any(|l| l.contains(words) && l.ends_with("left alone")),
            &format!("{case:?}: the run says '{words}: ... left alone'"),
        );

        let check = common::run(&mut program(true), T);
        let forecast = std::fs::read_to_string(&forecast_file).unwrap_or_default();
        check.check(
            forecast
                .lines()
                .any(|l| l.trim_start().starts_with("nothing: ") && l.contains(words)),
            &format!("{case:?}: the forecast says 'nothing: {words}'; it wrote:\n{forecast}"),
        );

        let child = common::run(
            Command::new(std::env::current_exe().expect("test binary"))
                .args([
                    "--exact",
                    "a_run_the_forecast_and_remap_text_refuse_the_same_cases",
                    "--test-threads=1",
                    "--nocapture",
                ])
                .env(CHILD, case.name())
                .env_remove("TIEXEC_BACKEND")
                .env_remove("LD_PRELOAD"),
            T,
        );
        child.check(
            child
                .stdout
                .lines()
                .filter_map(|l| l.split_once("remap_text: "))
                .any(|(_, said)| said.contains(words)),
            &format!("{case:?}: remap_text says '{words}'"),
        );
    }
    let _ = std::fs::remove_file(&forecast_file);
}
