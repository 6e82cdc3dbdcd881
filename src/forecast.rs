//! What a run would do with a program, without moving anything: the
//! forecast behind `tiexec --check PROGRAM`.
//!
//! The CLI starts PROGRAM with this library preloaded and [`VAR`] naming
//! where to write. The constructor, at the very point where a run would
//! move text, takes the same settings, selects the same objects and plans
//! them with the same planner and policy ([`pipeline::forecast_objects`]),
//! writes the forecast, and ends the process with `_exit`. By then the
//! loader has mapped and relocated every start-up object and run the
//! initializers of the libraries that come before the preload, as in any
//! run; the program's own initializers and `main` never run. The effects of
//! the forecast itself are a run's read faults on congruent text; nothing is
//! mapped, copied or cached (the cache is only looked into).
//!
//! Inputs: the loaded objects, the `TIEXEC_*` settings, the machine.
//! Result: the forecast as JSON or text ([`FORMAT_VAR`]) and an exit status
//! ([`ALL_HUGE`], [`SOME_LEFT`], [`FAILED`]).

use crate::config::{self, CachePath};
use crate::context::{Context, Origin, Program, Request};
use crate::log::Bytes;
use crate::pagesize::huge_page;
use crate::pipeline;
use crate::policy::{NoSupply, Source};
use crate::report::ObjectReport;
use crate::session::Refusal;
use crate::staging::SwapError;

/// An address in this library's code: its own object is never a target.
fn tiexec_address() -> u64 {
    tiexec_address as *const () as usize as u64
}

/// Where to write the forecast: `fd:N` or a path created new (set by the
/// CLI; its presence is what turns the forecast on).
pub const VAR: &str = "TIEXEC_FORECAST";
/// `json` (default) or `text`.
pub const FORMAT_VAR: &str = "TIEXEC_FORECAST_FORMAT";
/// `1` when the kernel collapses file text in place (the CLI probes it; a
/// forecast must not try, that would change the page cache).
pub const IN_PLACE_VAR: &str = "TIEXEC_FORECAST_IN_PLACE";

/// Exit status: every range the plan would move would be on 2 MiB pages.
pub const ALL_HUGE: i32 = 0;
/// Exit status: some planned text would stay on 4 KiB pages.
pub const SOME_LEFT: i32 = 3;
/// Exit status: no forecast could be made.
pub const FAILED: i32 = 4;

/// Whether this process was started for a forecast.
pub fn wanted() -> bool {
    static WANTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *WANTED.get_or_init(|| std::env::var_os(VAR).is_some())
}

/// A program's forecast.
pub struct Forecast {
    /// The image cache is set up and usable by this user.
    pub cache_set_up: bool,
    /// Why a run would do nothing at all, when it would not.
    pub refused: Option<String>,
    /// What a run would do now, per object worth planning.
    pub now: Vec<ObjectReport>,
    /// What a run would do with the cache set up (`None` when it is, or
    /// when the settings turn it off).
    pub with_setup: Option<Vec<ObjectReport>>,
    /// Whose run history the decisions come from: the user and the state
    /// directory (`None`: no state directory could be used).
    pub history: Option<(u32, String)>,
}

/// Bytes the plans would move, and bytes they would leave on 4 KiB pages.
fn moved_and_left(reports: &[ObjectReport]) -> (u64, u64) {
    let moved = reports.iter().map(ObjectReport::swapped_bytes).sum();
    (moved, reports.iter().map(left_bytes).sum())
}

/// Bytes `r`'s plan would move but could not. The 2 MiB page holding the
/// object's ELF header, planned where a PIE happened to load 2 MiB-aligned
/// (1 in 512 bases with 4 KiB alignment, 1 in 32 with 64 KiB), is left on
/// purpose (it names the object to symbolizers) and is not counted: the
/// forecast would otherwise say "not ready" by the luck of the base.
fn left_bytes(r: &ObjectReport) -> u64 {
    let on_purpose: u64 = r
        .failed
        .iter()
        .filter(|(_, e)| *e == SwapError::NoSupply(NoSupply::NamesProgram))
        .map(|(range, _)| range.len())
        .sum();
    r.planned_bytes
        .saturating_sub(r.swapped_bytes())
        .saturating_sub(on_purpose)
}

impl Forecast {
    /// Bytes of planned text that would stay on 4 KiB pages now.
    pub fn left_small(&self) -> u64 {
        moved_and_left(&self.now).1
    }

    /// The forecast as one JSON object.
    pub fn to_json(&self, j: &mut crate::json::Json) {
        j.begin_object(None).bool("cache_set_up", self.cache_set_up);
        match &self.history {
            Some((uid, dir)) => {
                j.begin_object(Some("history"))
                    .uint("uid", u64::from(*uid))
                    .str("dir", dir)
                    .end_object();
            }
            None => {
                j.null("history");
            }
        }
        match &self.refused {
            Some(why) => j.str("refused", why),
            None => j.null("refused"),
        };
        j.begin_array(Some("objects"));
        for r in &self.now {
            r.to_json(j);
        }
        j.end_array();
        match &self.with_setup {
            Some(reports) => {
                j.begin_array(Some("with_setup"));
                for r in reports {
                    r.to_json(j);
                }
                j.end_array();
            }
            None => {
                j.null("with_setup");
            }
        }
        j.end_object();
    }

    /// The forecast in words, one block per object, then what setup would
    /// change.
    pub fn render(&self) -> String {
        use core::fmt::Write;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "what a run would do (tiexec's own plan, made in the program as loaded, \
             stopped before main)"
        );
        if let Some(why) = &self.refused {
            let _ = writeln!(out, "  nothing: {why}");
        } else if self.now.is_empty() {
            let _ = writeln!(
                out,
                "  no object with a whole 2 MiB page of text: nothing to move \
                 (the programs it starts may have: check them)"
            );
        }
        if let Some(d) = self.now.iter().find_map(|r| r.decision) {
            let _ = writeln!(out, "  private copies: {d}");
            let _ = match &self.history {
                Some((uid, dir)) => writeln!(
                    out,
                    "    (from the run history of uid {uid} in {dir}: a service's own user and \
                     environment may have another; --state-dir names one)"
                ),
                None => writeln!(out, "    (no run history can be kept for this user)"),
            };
        }
        for r in &self.now {
            let _ = writeln!(out, "  {}: text {}", r.path, Bytes(r.text_bytes));
            if r.already_huge_bytes > 0 {
                let _ = writeln!(
                    out,
                    "    {} already on {} pages (the page cache maps it so)",
                    Bytes(r.already_huge_bytes),
                    crate::pagesize::huge_page_name()
                );
            }
            for source in Source::ALL {
                let n: u64 = r
                    .swapped
                    .iter()
                    .filter(|(_, s)| *s == source)
                    .map(|(range, _)| range.len())
                    .sum();
                if n > 0 {
                    let _ = writeln!(out, "    {} moved, from {}", Bytes(n), source.name());
                }
            }
            // What stays small, by reason: the plan counts whole 2 MiB
            // ranges (headers and rodata beside the text included), so each
            // figure is bounded by the text still small, and they add up to
            // at most that.
            let mut small = r
                .text_bytes
                .saturating_sub(r.after.huge().min(r.text_bytes));
            let left = left_bytes(r).min(small);
            if left > 0 {
                small -= left;
                let why = match (r.not_attempted, r.failed.first()) {
                    (Some(why), _) => why.describe(),
                    (None, Some((_, e))) => e.to_string(),
                    (None, None) => "not moved".to_string(),
                };
                let _ = writeln!(out, "    {} would stay on 4 KiB pages: {why}", Bytes(left));
            }
            for (reason, bytes) in &r.kept {
                let shown = (*bytes).min(small);
                if *reason != crate::plan::Skip::AlreadyHuge && shown > 0 {
                    small -= shown;
                    let _ = writeln!(
                        out,
                        "    {} kept on 4 KiB pages: {}",
                        Bytes(shown),
                        reason.describe()
                    );
                }
            }
            let huge = r.after.huge().min(r.text_bytes);
            let _ = writeln!(
                out,
                "    => {}% of its text on {} pages",
                (huge * 100).checked_div(r.text_bytes).unwrap_or(0),
                crate::pagesize::huge_page_name()
            );
        }
        if let Some(with) = &self.with_setup {
            let (moved_now, _) = moved_and_left(&self.now);
            let (moved_then, _) = moved_and_left(with);
            let images: u64 = with
                .iter()
                .flat_map(|r| &r.swapped)
                .filter(|(_, s)| matches!(s, Source::CacheBuilt | Source::CacheHit))
                .map(|(range, _)| range.len() / huge_page())
                .sum();
            if moved_then > moved_now {
                let _ = writeln!(
                    out,
                    "with the image cache set up (tiexec --setup, once, as root): {} more on \
                     2 MiB pages, shared by every process of the program ({images} pages of \
                     the cache)",
                    Bytes(moved_then - moved_now)
                );
            } else if images > 0 {
                let _ = writeln!(
                    out,
                    "with the image cache set up (tiexec --setup, once, as root): the same \
                     text from shared images ({images} pages of the cache) instead of private \
                     copies: one copy per machine, not per process"
                );
            }
        }
        out
    }
}

/// Makes the forecast for this process (from the preload constructor, in
/// the program's namespace), writes it where [`VAR`] says, and returns the
/// exit status. Never returns to the program: the caller exits.
pub fn run_in_constructor() -> i32 {
    match forecast_here() {
        Ok(status) => status,
        Err(e) => {
            crate::tlog!(crate::log::Level::Error, "forecast failed: {e}");
            FAILED
        }
    }
}

fn forecast_here() -> Result<i32, String> {
    use std::os::unix::ffi::OsStrExt;
    let target = std::env::var_os(VAR).ok_or("no target")?;
    let text = std::env::var_os(FORMAT_VAR).is_some_and(|v| v == "text");
    let in_place = std::env::var_os(IN_PLACE_VAR).is_some_and(|v| v == "1");
    let env = config::EnvSnapshot::take();
    let parsed = env.parse();
    crate::log::set_level(parsed.config.log);
    let config = parsed.config;
    let objects = crate::discover::loaded_objects();
    let program = objects.first().map(|o| o.path.clone()).unwrap_or_default();
    // What would stop a run before any plan: the run's own list, in its
    // order.
    let refused = Refusal::any(config.backend).map(|why| why.to_string());
    let targets = if refused.is_some() {
        Vec::new()
    } else {
        crate::session::targets(&objects, &config, tiexec_address(), false)
    };
    // `tiexec PROGRAM` names PROGRAM (see `context::Origin`).
    let ctx = crate::session::open_context(&config, program.clone(), Origin::Named, false);
    let now = pipeline::forecast_objects(&targets, &ctx, in_place);
    let with_setup = (ctx.cache.is_none() && config.cache != CachePath::Off).then(|| {
        let request = Request {
            backend: config.backend,
            strategy: config.strategy,
        };
        let (mut hypothetical, _) =
            Context::new(request, None, Program::new(program, Origin::Named), false);
        hypothetical.offer.cache = true;
        pipeline::forecast_objects(&targets, &hypothetical, in_place)
    });
    let history = ctx
        .state()
        .map(|s| (crate::sys::effective_uid(), s.path().display().to_string()));
    let forecast = Forecast {
        cache_set_up: ctx.cache.is_some(),
        refused,
        now,
        with_setup,
        history,
    };
    let bytes = if text {
        forecast.render()
    } else {
        let mut j = crate::json::Json::new();
        forecast.to_json(&mut j);
        j.finish()
    };
    crate::report::write_target(target.as_bytes(), bytes.as_bytes())?;
    Ok(
        if forecast.left_small() == 0 && forecast.refused.is_none() {
            ALL_HUGE
        } else {
            SOME_LEFT
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::range::Range;

    #[test]
    fn the_page_naming_the_object_is_not_counted_as_left() {
        let mib = 1u64 << 20;
        let header = Range::new(0x4000_0000, 0x4000_0000 + 2 * mib);
        let body = Range::new(header.end, header.end + 30 * mib);
        let mut r = ObjectReport {
            planned_bytes: 32 * mib,
            swapped: vec![(body, Source::Thp)],
            failed: vec![(header, SwapError::NoSupply(NoSupply::NamesProgram))],
            ..ObjectReport::default()
        };
        assert_eq!(left_bytes(&r), 0);
        // Any other reason leaves it.
        r.failed = vec![(header, SwapError::NoSupply(NoSupply::PoolEmpty))];
        assert_eq!(left_bytes(&r), 2 * mib);
    }
}
