//! Transparent huge pages switched off system-wide: tiexec does nothing and
//! the program runs as usual. In a test binary of its own (cargo runs test
//! binaries one at a time), since the setting is global; restored on exit.

mod common;

use std::process::Command;
use std::time::Duration;

const THP: &str = "/sys/kernel/mm/transparent_hugepage/enabled";

struct ThpMode(String);

impl ThpMode {
    fn set(mode: &str) -> Option<ThpMode> {
        let text = std::fs::read_to_string(THP).ok()?;
        let old = text
            .split_whitespace()
            .find(|w| w.starts_with('['))?
            .trim_matches(['[', ']'])
            .to_string();
        std::fs::write(THP, mode).ok()?;
        Some(ThpMode(old))
    }
}

impl Drop for ThpMode {
    fn drop(&mut self) {
        let _ = std::fs::write(THP, &self.0);
    }
}

#[test]
fn with_thp_never_and_no_pool_nothing_is_done() {
    let Some(_pool) = common::PoolGuard::set(0) else {
        return;
    };
    let Some(_never) = ThpMode::set("never") else {
        common::skip("cannot switch THP off (not root?)");
        return;
    };
    let exe = common::fixture(common::PIE);
    let plain = common::run(
        Command::new(&exe).args(["20000", "run"]),
        Duration::from_secs(60),
    );
    for (backend, says) in [
        ("thp", "transparent huge pages are disabled"),
        (
            "auto",
            "transparent huge pages are disabled and no cache is set up",
        ),
    ] {
        let w = common::Waiting::start(
            common::preloaded(&exe, &[("TIEXEC_BACKEND", backend), ("TIEXEC_LOG", "info")])
                .args(["20000", "wait"]),
            Duration::from_secs(60),
        );
        let segments = common::text_segments(w.pid(), &exe);
        let cov = common::coverage(w.pid(), &segments);
        let first = w.first_line.clone();
        let o = w.finish(Duration::from_secs(60));
        o.check(o.status.success() && first == plain.stdout, "runs the same");
        o.check(cov.huge() == 0, &format!("untouched: {cov:?}"));
        o.check(o.stderr.contains(says), says);
    }
}
