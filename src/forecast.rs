//! What a run would do with a program, without running it: the forecast
//! behind `tiexec --check PROGRAM`.
//!
//! The CLI starts PROGRAM with this library as its audit module and
//! [`VAR`] naming where to write. The loader maps and relocates every
//! start-up object; at `la_preinit`, before any initializer of the program,
//! [`run`] plans each object with the very planner and policy of a real run
//! ([`remap::forecast_objects`]), writes the forecast, and the process ends
//! with `_exit`: no code of the program runs. Its effects are a run's read
//! faults on congruent text, nothing else (the cache is only looked into).
//!
//! Inputs: the start-up objects the audit hook saw (bias, name), the
//! `TIEXEC_*` settings, the machine. Result: the forecast as JSON or text
//! ([`FORMAT_VAR`]) and an exit status ([`ALL_HUGE`], [`SOME_LEFT`],
//! [`FAILED`]).

use crate::config::{self, CachePath};
use crate::log::Bytes;
use crate::plan::{Source, HUGE_PAGE};
use crate::remap;
use crate::report::ObjectReport;
use crate::select;

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
    /// What a run would do now, per object worth planning.
    pub now: Vec<ObjectReport>,
    /// What a run would do with the cache set up (`None` when it is, or
    /// when the settings turn it off).
    pub with_setup: Option<Vec<ObjectReport>>,
}

/// Bytes the plans would move, and bytes they would leave on 4 KiB pages.
fn moved_and_left(reports: &[ObjectReport]) -> (u64, u64) {
    let moved = reports.iter().map(ObjectReport::swapped_bytes).sum();
    (moved, reports.iter().map(left_bytes).sum())
}

/// Bytes `r`'s plan would move but could not.
fn left_bytes(r: &ObjectReport) -> u64 {
    r.planned_bytes.saturating_sub(r.swapped_bytes())
}

impl Forecast {
    /// Bytes of planned text that would stay on 4 KiB pages now.
    pub fn left_small(&self) -> u64 {
        moved_and_left(&self.now).1
    }

    /// The forecast as one JSON object.
    pub fn to_json(&self, j: &mut crate::json::Json) {
        j.begin_object(None).bool("cache_set_up", self.cache_set_up);
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
            "what a run would do (the library's own plan, on the program as the loader \
             mapped it; none of its code ran)"
        );
        if self.now.is_empty() {
            let _ = writeln!(
                out,
                "  no object with a whole 2 MiB page of text: nothing to move \
                 (the programs it starts may have: check them)"
            );
        }
        for r in &self.now {
            let _ = writeln!(out, "  {}: text {}", r.path, Bytes(r.text_bytes));
            if r.already_huge_bytes > 0 {
                let _ = writeln!(
                    out,
                    "    {} already on 2 MiB pages (the page cache maps it so)",
                    Bytes(r.already_huge_bytes)
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
            let left = left_bytes(r);
            if left > 0 {
                let why = match (r.not_attempted, r.failed.first()) {
                    (Some(why), _) => why.describe(),
                    (None, Some((_, e))) => e.to_string(),
                    (None, None) => "not moved".to_string(),
                };
                let _ = writeln!(out, "    {} would stay on 4 KiB pages: {why}", Bytes(left));
            }
            for (reason, bytes) in &r.kept {
                if *reason != crate::plan::Skip::AlreadyHuge {
                    let _ = writeln!(
                        out,
                        "    {} kept on 4 KiB pages: {}",
                        Bytes(*bytes),
                        reason.describe()
                    );
                }
            }
            let huge = r.after.huge().min(r.text_bytes);
            let _ = writeln!(
                out,
                "    => {}% of its text on 2 MiB pages",
                (huge * 100).checked_div(r.text_bytes).unwrap_or(0)
            );
        }
        if let Some(with) = &self.with_setup {
            let (moved_now, _) = moved_and_left(&self.now);
            let (moved_then, _) = moved_and_left(with);
            let images: u64 = with
                .iter()
                .flat_map(|r| &r.swapped)
                .filter(|(_, s)| matches!(s, Source::CacheBuilt | Source::CacheHit))
                .map(|(range, _)| range.len() / HUGE_PAGE)
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

/// Makes the forecast for the start-up objects `startup` (bias and name as
/// the loader reported them, the main program first), writes it where
/// [`VAR`] says, and returns the exit status.
pub fn run(startup: &[(u64, Vec<u8>)]) -> Result<i32, String> {
    use std::os::unix::ffi::OsStrExt;
    let target = std::env::var_os(VAR).ok_or("no target")?;
    let text = std::env::var_os(FORMAT_VAR).is_some_and(|v| v == "text");
    let in_place = std::env::var_os(IN_PLACE_VAR).is_some_and(|v| v == "1");
    let parsed = config::from_process_env();
    crate::log::set_level(parsed.config.log);
    let config = parsed.config;
    let vmas = crate::smaps::read_maps(None).map_err(|e| format!("/proc/self/maps: {e}"))?;
    let exe = std::fs::read_link("/proc/self/exe")
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut objects = Vec::new();
    for (i, (bias, name)) in startup.iter().enumerate() {
        let is_main = i == 0;
        let path = if is_main {
            exe.clone()
        } else {
            String::from_utf8_lossy(name).into_owned()
        };
        if path.is_empty() {
            continue;
        }
        // Not a file (the vDSO), or not the file mapped: as a run, skipped.
        let Some(mut object) = crate::audit::object_from_mappings(&path, *bias, &vmas) else {
            continue;
        };
        object.is_main = is_main;
        if select::select(path.as_bytes(), object.text_bytes(), false, &config).is_ok()
            && remap::worth_planning(&object, config.strategy)
        {
            objects.push(object);
        }
    }
    let request = remap::Request {
        backend: config.backend,
        strategy: config.strategy,
    };
    let ctx = crate::preload::context(request, &config, exe.clone(), false);
    let now = remap::forecast_objects(&objects, &ctx, in_place);
    let with_setup = (ctx.cache.is_none() && config.cache != CachePath::Off).then(|| {
        let (mut hypothetical, _) = remap::Context::new(request, None, exe, false);
        hypothetical.offer.cache = true;
        remap::forecast_objects(&objects, &hypothetical, in_place)
    });
    let forecast = Forecast {
        cache_set_up: ctx.cache.is_some(),
        now,
        with_setup,
    };
    let bytes = if text {
        forecast.render()
    } else {
        let mut j = crate::json::Json::new();
        forecast.to_json(&mut j);
        j.finish()
    };
    crate::report::write_target(target.as_bytes(), bytes.as_bytes())?;
    Ok(if forecast.left_small() == 0 {
        ALL_HUGE
    } else {
        SOME_LEFT
    })
}
