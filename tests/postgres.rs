//! A real server under load: Debian's PostgreSQL started under tiexec, on
//! loopback, serves a sustained pgbench run with zero errors, and its text
//! is on 2 MiB pages in the postmaster and in every backend it forks.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(300);

fn pg_bin() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|b| b.join("postgres").exists() && b.join("pgbench").exists())
        .collect();
    dirs.sort();
    dirs.pop()
}

fn as_postgres(program: &Path) -> Command {
    let mut c = Command::new("runuser");
    c.args(["-u", "postgres", "--"]).arg(program);
    c
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Stops the server and removes its directory, whatever happens.
struct Server {
    bin: PathBuf,
    dir: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = as_postgres(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["stop", "-m", "immediate"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn postgres_under_tiexec_serves_pgbench_with_every_process_on_huge_pages() {
    let Some(bin) = pg_bin() else {
        common::skip("no PostgreSQL server installed");
        return;
    };
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 || Command::new("runuser").arg("--help").output().is_err() {
        common::skip(format_args!(
            "needs root and runuser to start PostgreSQL as its user"
        ));
        return;
    }
    let dir = std::env::temp_dir().join(format!("tiexec-pg-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    assert!(Command::new("chown")
        .arg("postgres")
        .arg(&dir)
        .status()
        .unwrap()
        .success());
    let server = Server {
        bin: bin.clone(),
        dir: dir.clone(),
    };
    let init = common::run(
        as_postgres(&bin.join("initdb"))
            .arg("-D")
            .arg(dir.join("data"))
            .args(["-A", "trust", "-U", "postgres"]),
        T,
    );
    init.check(init.status.success(), "initdb");

    let port = free_port().to_string();
    let log = std::fs::File::create(dir.join("log")).unwrap();
    let mut postmaster = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(common::tiexec_bin())
        .args(["-v", "-b", "thp"])
        .arg(bin.join("postgres"))
        .arg("-D")
        .arg(dir.join("data"))
        .args(["-p", &port, "-c", "listen_addresses=127.0.0.1", "-k"])
        .arg(&dir)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start postgres");
    let pgbench = |args: &[&str]| {
        let mut c = Command::new(bin.join("pgbench"));
        c.args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres"])
            .args(args)
            .arg("postgres");
        c
    };
    let started = Instant::now();
    loop {
        let ready = Command::new(bin.join("pg_isready"))
            .args(["-h", "127.0.0.1", "-p", &port])
            .output()
            .is_ok_and(|o| o.status.success());
        if ready {
            break;
        }
        assert!(
            started.elapsed() < T,
            "postgres did not start: {}",
            std::fs::read_to_string(dir.join("log")).unwrap_or_default()
        );
        assert!(
            postmaster.try_wait().unwrap().is_none(),
            "postgres exited: {}",
            std::fs::read_to_string(dir.join("log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let init = common::run(&mut pgbench(&["-i", "-s", "4"]), T);
    init.check(init.status.success(), "pgbench -i");

    // A sustained run; halfway through, look at every server process.
    let run = pgbench(&["-c", "8", "-j", "2", "-T", "12"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("pgbench");
    std::thread::sleep(Duration::from_secs(5));
    let pid = postmaster.id();
    let stat = common::run(
        common::tiexec_cmd().args(["--stat", "--tree", "--json", &pid.to_string()]),
        T,
    );
    let out = run.wait_with_output().unwrap();
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "pgbench: {report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        report.contains("number of failed transactions: 0 (0.000%)"),
        "{report}"
    );

    let v: serde_json::Value = serde_json::from_str(&stat.stdout).expect("stat JSON");
    let mut servers = 0;
    for process in v.as_array().unwrap() {
        let objects = process["objects"].as_array().unwrap();
        let Some(postgres) = objects
            .iter()
            .find(|o| o["path"].as_str().unwrap_or("").ends_with("/bin/postgres"))
        else {
            continue;
        };
        servers += 1;
        let pct = postgres["percent_huge"].as_f64().unwrap();
        // All of its text but the huge page that also holds its ELF
        // header (kept the file's, to name it to symbolizers).
        let text = postgres["text_bytes"].as_f64().unwrap();
        let start = postgres["text"][0]["start"].as_u64().unwrap();
        let huge = 2u64 << 20;
        let head = ((start / huge + 1) * huge - start) as f64;
        let expected = 100.0 * (text - head) / text - 1.0;
        assert!(
            pct >= expected,
            "process {}: {pct} % of postgres text huge, {expected} % expected\n{}",
            process["pid"],
            stat.stdout
        );
    }
    // The postmaster and its children: checkpointer, writers, 8 backends...
    assert!(
        servers >= 10,
        "only {servers} server processes seen\n{}",
        stat.stdout
    );
    let log = std::fs::read_to_string(dir.join("log")).unwrap_or_default();
    assert!(log.contains("bin/postgres: text"), "tiexec reported: {log}");
    drop(server);
    let _ = postmaster.wait();
}
