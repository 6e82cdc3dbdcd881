//! What one pass of the pipeline shares: the request, what the machine
//! offers, the image cache, the user's state, and the program whose text it
//! is: who asked for it, its run history, its hot map and the process's
//! copy decision (made once, from an estimate taken before any planning, so
//! that a forecast decides as the run will).

use std::cell::{OnceCell, RefCell};
use std::rc::Rc;

use crate::cache::{self, Cache, Image};
use crate::config::{Backend, Strategy};
use crate::discover::{self, LoadedObject};
use crate::history::{self, Arm, Decision, History, Start};
use crate::hotmap::HotMap;
use crate::pagesize::huge_page;
use crate::policy::{Copying, Offer};
use crate::range::{align_down, align_up};
use crate::state::{RateKind, StateDir};

/// What to do, beyond which objects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Where huge pages come from.
    pub backend: Backend,
    /// How far plans reach beyond the text.
    pub strategy: Strategy,
}

/// Who asked for this process's text to be huge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The user named this program: to the wrapper (`tiexec PROGRAM`, the
    /// same process after `exec` too), or by preloading the library by hand.
    Named,
    /// A program started, directly or not, by a named one: it inherited the
    /// preload.
    Child,
    /// The program links tiexec in (`libtiexec.a`, or the Rust crate with
    /// its `constructor` feature, or a call to `remap_text`).
    Linked,
}

impl Origin {
    /// Whether the user asked for this very program.
    pub fn named(self) -> bool {
        matches!(self, Origin::Named | Origin::Linked)
    }

    /// From the marker the wrapper, or the first preloaded process, leaves
    /// in the environment ([`NAMED_PID_VAR`]): absent or this process's
    /// PID means named, another PID a child.
    pub fn from_marker(marker: Option<&[u8]>, pid: u32) -> Origin {
        match marker {
            None | Some(b"") => Origin::Named,
            Some(v) if v == pid.to_string().as_bytes() => Origin::Named,
            Some(_) => Origin::Child,
        }
    }
}

/// The process the user named (its PID): set by the wrapper before `exec`,
/// or by the first preloaded process for its children when unset.
pub const NAMED_PID_VAR: &str = "TIEXEC_NAMED_PID";

/// The program whose text it is, and what tiexec remembers of it.
pub struct Program {
    /// Its path (`/proc/self/exe`).
    pub path: String,
    /// Who asked.
    pub origin: Origin,
    history: OnceCell<History>,
    hot: OnceCell<HotMap>,
}

impl Program {
    /// A program, nothing read yet.
    pub fn new(path: String, origin: Origin) -> Program {
        Program {
            path,
            origin,
            history: OnceCell::new(),
            hot: OnceCell::new(),
        }
    }
}

/// Everything one pass over objects shares.
pub struct Context {
    /// What to do.
    pub request: Request,
    /// What this process may use.
    pub offer: Offer,
    /// The image cache, when set up and usable.
    pub cache: Option<Cache>,
    /// The user's state directory (run history, hot maps, rates, image
    /// records), opened on first use.
    state: OnceCell<Option<StateDir>>,
    /// The program.
    pub program: Program,
    /// The copy decision, made once (see [`Context::decide`]).
    decision: OnceCell<Option<Decision>>,
    /// Read smaps after the swap for coverage by kind (someone will look:
    /// info logging, a JSON report). Otherwise the report's coverage is what
    /// the swap did, as the routine reported it.
    pub verify: bool,
    /// Shared images opened in this pass, by name (one serves every range
    /// of its region).
    images: RefCell<Vec<Rc<Image>>>,
}

/// Whether the process of `start` is still the one that wrote it.
pub fn still_running(start: &Start) -> bool {
    crate::sys::process_start_ticks(start.pid).is_some_and(|t| t == start.ticks)
}

impl Context {
    /// A context for `request`: opens the cache at `cache_root` (None: no
    /// cache) and reads what the machine offers. Also returns why the cache
    /// is not used, when it is not.
    pub fn new(
        request: Request,
        cache_root: Option<&std::path::Path>,
        program: Program,
        verify: bool,
    ) -> (Context, Option<cache::Unusable>) {
        let (cache, why) = match cache_root.map(Cache::open) {
            None => (None, Some(cache::Unusable::Off)),
            Some(Ok(c)) => (Some(c), None),
            Some(Err(e)) => (None, Some(e)),
        };
        let offer = discover::offer(
            cache.is_some(),
            request.backend,
            crate::interpose::hugetlb_text_guarded(),
        );
        (
            Context {
                request,
                offer,
                cache,
                state: OnceCell::new(),
                program,
                decision: OnceCell::new(),
                verify,
                images: RefCell::new(Vec::new()),
            },
            why,
        )
    }

    /// The shared image `name`, if this pass opened it already.
    pub fn opened_image(&self, name: &str) -> Option<Rc<Image>> {
        self.images
            .borrow()
            .iter()
            .find(|i| i.name == name)
            .cloned()
    }

    /// Keeps a shared image opened in this pass, for its region's other
    /// ranges.
    pub fn keep_image(&self, image: Rc<Image>) {
        self.images.borrow_mut().push(image);
    }

    /// The user's state directory, if usable.
    pub fn state(&self) -> Option<&StateDir> {
        self.state.get_or_init(StateDir::open_default).as_ref()
    }

    /// The copy rate to assume (µs per MiB): the best measured here
    /// lately (see `state::Rates::best`), else 0 (none yet).
    fn measured_rate(&self) -> u32 {
        self.state()
            .and_then(|s| {
                s.rates()
                    .best(RateKind::Copy, history::DEFAULT_RATE_US_PER_MIB)
            })
            .unwrap_or(0)
    }

    /// The program's run history (read once; what other processes appended
    /// is folded in, and the rate measured here put in its header).
    pub fn history(&self) -> &History {
        self.program.history.get_or_init(|| {
            self.state()
                .map(|s| s.history(&self.program.path, still_running, self.measured_rate()))
                .unwrap_or_default()
        })
    }

    /// The program's hot map (read once).
    pub fn hot_map(&self) -> &HotMap {
        self.program.hot.get_or_init(|| {
            self.state()
                .map(|s| s.hot_map(&self.program.path))
                .unwrap_or_default()
        })
    }

    /// Whether private copies take only hot huge pages: `auto` does.
    pub fn copies_hot_only(&self) -> bool {
        self.request.backend == Backend::Auto
    }

    /// True when a shared image will most likely serve `object`'s text:
    /// `auto` or `cache`, the cache set up, a load phase the same in every
    /// process, no text relocations.
    pub fn image_likely(&self, object: &LoadedObject) -> bool {
        matches!(self.request.backend, Backend::Auto | Backend::Cache)
            && self.offer.cache
            && object.bias % huge_page() == 0
            && !object.text_relocations
    }

    /// Bytes a private copy of `objects` would move, before any planning:
    /// the huge pages their text spans that no shared image is likely to
    /// serve, hot ones only under `auto` (see `hotmap`).
    pub fn copy_estimate(&self, objects: &[LoadedObject]) -> u64 {
        let huge = huge_page();
        let mut total = 0;
        for o in objects.iter().filter(|o| !self.image_likely(o)) {
            let map = self
                .copies_hot_only()
                .then(|| self.hot_map().object(&o.path, o.identity_digest()))
                .flatten();
            total += match map {
                Some(map) => map.hot_bytes(&o.text_segments, huge, o.bias),
                None => o
                    .text_segments
                    .iter()
                    .map(|s| align_up(s.end, huge) - align_down(s.start, huge))
                    .sum(),
            };
        }
        total
    }

    /// Decides, once, whether this process copies (see `history::decide`),
    /// for `objects` (the targets). `None` when no decision is needed: an
    /// explicit backend copies anyway, and where every object is likely
    /// served by a shared image there is nothing to copy privately.
    pub fn decide(&self, objects: &[LoadedObject]) -> Option<Decision> {
        *self.decision.get_or_init(|| {
            if self.request.backend != Backend::Auto {
                return None;
            }
            let bytes = self.copy_estimate(objects);
            if bytes == 0 {
                return None;
            }
            Some(history::decide(
                self.history(),
                history::Asking {
                    named: self.program.origin.named(),
                    copy_bytes: bytes,
                    age_ms: discover::process_age_ms().unwrap_or(0),
                },
            ))
        })
    }

    /// The decision made, if any.
    pub fn decision(&self) -> Option<Decision> {
        self.decision.get().copied().flatten()
    }

    /// What the policy needs of the decision.
    pub fn copying(&self) -> Copying {
        match self.request.backend {
            Backend::Auto => match self.decision() {
                Some(d) if d.arm == Arm::Copy => Copying::Yes,
                Some(d) => Copying::No(d),
                None => Copying::Undecided,
            },
            _ => Copying::Yes,
        }
    }
}
