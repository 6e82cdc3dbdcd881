//! Where a range's huge pages come from: the supply policy. Pure: a table
//! from the backend, what the machine offers, what is known of the range's
//! bytes and whether this process copies, to the ways to try in order.
//! Tested with tables, like the planner.

use crate::config::Backend;
use crate::history::Decision;

/// Whether this process makes private copies (the run history's decision,
/// see `history::decide`), as far as one range is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Copying {
    /// It does.
    Yes,
    /// It does not, for this reason.
    No(Decision),
    /// Not asked: no range needed a private copy (every one is served by a
    /// shared image, or by nothing whatever the decision).
    Undecided,
}

/// What this process may use for copies, as far as choosing goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offer {
    /// Free 2 MiB pages in the hugetlb pool not already promised to others
    /// (`free_hugepages - resv_hugepages`). Only an explicit `hugetlb`
    /// backend takes them: the pool belongs to the machine's applications
    /// (and for any other backend it is not read: 0).
    pub pool_available: u64,
    /// THP usable here: not `never` system-wide, not disabled for this
    /// process.
    pub thp_usable: bool,
    /// The image cache is set up and usable by this user.
    pub cache: bool,
    /// Memory-deny-write-execute is on: no copy written in place can become
    /// executable; only mappings executable from the start (images) work.
    pub mdwe: bool,
    /// The program's `mprotect` calls reach tiexec's, which puts text on
    /// hugetlb pages (pool copies, cache images) back on small pages before
    /// a call that would split it (`interpose`). Without it no text goes to
    /// hugetlb pages: such a call would fail where it succeeds without
    /// tiexec.
    pub mprotect_guarded: bool,
}

/// Where the pages for a range came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The file's own page cache, collapsed in place (no copy).
    PageCache,
    /// A shared image from the cache, built by an earlier process (a hit).
    CacheHit,
    /// A shared image from the cache, built by this process (a miss).
    CacheBuilt,
    /// A private copy on hugetlb pages: from the pool (explicit `hugetlb`),
    /// or from the cache's pages for text whose load address is random.
    Hugetlb,
    /// A private copy on anonymous transparent huge pages.
    Thp,
}

impl Source {
    /// Its name in logs and reports.
    pub fn name(self) -> &'static str {
        match self {
            Source::PageCache => "page cache",
            Source::CacheHit => "cache (hit)",
            Source::CacheBuilt => "cache (built)",
            Source::Hugetlb => "hugetlb",
            Source::Thp => "thp",
        }
    }

    /// Its key in JSON reports.
    pub fn key(self) -> &'static str {
        match self {
            Source::PageCache => "page_cache",
            Source::CacheHit => "cache_hit",
            Source::CacheBuilt => "cache_built",
            Source::Hugetlb => "hugetlb",
            Source::Thp => "thp",
        }
    }

    /// Whether its pages are hugetlb pages (which cannot be split: see
    /// `interpose`).
    pub fn on_hugetlb(self) -> bool {
        matches!(
            self,
            Source::CacheHit | Source::CacheBuilt | Source::Hugetlb
        )
    }

    /// Every source, in report order.
    pub const ALL: [Source; 5] = [
        Source::PageCache,
        Source::CacheHit,
        Source::CacheBuilt,
        Source::Hugetlb,
        Source::Thp,
    ];
}

/// A way to get huge pages for a range that is not served in place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Supply {
    /// The range's image in the cache: found, or built and published.
    SharedImage,
    /// An unnamed image on the cache's pages, private to this process.
    PrivateImage,
    /// A private copy on pages of the hugetlb pool.
    Pool,
    /// A private copy on anonymous THP.
    Thp,
}

impl Supply {
    /// Its name in logs.
    pub fn name(self) -> &'static str {
        match self {
            Supply::SharedImage => "the shared image",
            Supply::PrivateImage => "a private image",
            Supply::Pool => "a copy on pool pages",
            Supply::Thp => "a THP copy",
        }
    }
}

/// What is known about one range's bytes, for the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RangeFacts {
    /// An image built from the file would hold exactly the range's bytes
    /// (else why not).
    pub cacheable: Result<(), NotCacheable>,
    /// The object's load address modulo 2 MiB is the same in every process
    /// (libraries and non-PIE programs; PIE programs linked 2 MiB aligned):
    /// an image can serve other processes.
    pub phase_stable: bool,
}

/// Why a range's bytes cannot come from a cache image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotCacheable {
    /// Its object's file could not be opened, or is not the file mapped
    /// (replaced or deleted since it was loaded).
    FileNotMapped,
    /// Its object has text relocations: its text differs from its file.
    TextRelocations,
    /// Some of its pages were written (a breakpoint, a hot patch): they
    /// differ from the file.
    Modified,
    /// Part of it is not mapped from the object's file.
    NotFromFile,
}

impl NotCacheable {
    /// The reason in words.
    pub fn describe(self) -> &'static str {
        match self {
            NotCacheable::FileNotMapped => "its file is not the one mapped (replaced or deleted?)",
            NotCacheable::TextRelocations => "it has text relocations",
            NotCacheable::Modified => "some of its text pages were written",
            NotCacheable::NotFromFile => "part of it is not mapped from its file",
        }
    }
}

/// Why no huge pages can be had for a range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoSupply {
    /// The backend is `off`.
    Off,
    /// `hugetlb` was asked for and the pool has no free page.
    PoolEmpty,
    /// `thp` was asked for and THP is `never` or disabled for the process.
    ThpUnusable,
    /// `cache` was asked for and there is no usable cache.
    NoCache,
    /// Memory-deny-write-execute forbids making a private copy executable,
    /// and no cache image can serve.
    Mdwe,
    /// THP unusable and no cache: nothing to copy to.
    Nothing,
    /// This process makes no private copy: the decision says why (see
    /// `history::decide`).
    NoCopy(Decision),
    /// It holds an object's ELF header (see `plan::SwapRange::names_program`)
    /// and the page cache could not map it huge in place.
    NamesProgram,
    /// The cache could serve, but not this range's bytes.
    NotCacheable(NotCacheable),
    /// hugetlb pages (the pool, cache images) would serve, but the
    /// program's `mprotect` does not reach tiexec's (see
    /// [`Offer::mprotect_guarded`]).
    Unguarded,
}

impl core::fmt::Display for NoSupply {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            NoSupply::Off => write!(f, "backend off"),
            NoSupply::PoolEmpty => write!(f, "hugetlb pool has no free pages"),
            NoSupply::ThpUnusable => write!(f, "transparent huge pages are disabled"),
            NoSupply::NoCache => write!(f, "no usable cache"),
            NoSupply::Mdwe => write!(
                f,
                "memory-deny-write-execute forbids private copies, and no cache image serves"
            ),
            NoSupply::Nothing => write!(
                f,
                "transparent huge pages are disabled and no cache is set up"
            ),
            NoSupply::NoCopy(d) => write!(f, "{d}"),
            NoSupply::NotCacheable(why) => write!(f, "not cacheable: {}", why.describe()),
            NoSupply::Unguarded => write!(
                f,
                "the program's mprotect does not reach tiexec's, which hugetlb text needs"
            ),
            NoSupply::NamesProgram => write!(
                f,
                "holds the object's ELF header, by whose mapping symbolizers name the object: only the page cache, in place, may replace it"
            ),
        }
    }
}

/// True when a private THP copy can be made at all here.
pub fn supplies_thp(offer: Offer) -> bool {
    offer.thp_usable && !offer.mdwe
}

/// The ways to get huge pages for one range, in the order to try them, or
/// why there is none.
///
/// - `auto`: a shared cache image when the cache is set up, the range's
///   bytes are its file's and its load phase is the same in every process
///   (paid once per machine); private copies (a private image on the
///   cache's pages, else THP) only when this process copies (`copy`: the
///   run history's decision), never under memory-deny-write-execute
///   (except images, never written); never the pool.
/// - `cache`: cache images only, whatever the decision.
/// - `hugetlb`: private copies from the pool, whatever the decision.
/// - `thp`: private THP copies, whatever the decision.
pub fn supplies(
    backend: Backend,
    offer: Offer,
    facts: RangeFacts,
    copy: Copying,
) -> Result<Vec<Supply>, NoSupply> {
    let image = if facts.phase_stable {
        Supply::SharedImage
    } else {
        Supply::PrivateImage
    };
    let cache_serves = offer.cache && facts.cacheable.is_ok() && offer.mprotect_guarded;
    match backend {
        Backend::Off => Err(NoSupply::Off),
        Backend::Cache | Backend::Hugetlb if !offer.mprotect_guarded => Err(NoSupply::Unguarded),
        Backend::Cache if cache_serves => Ok(vec![image]),
        Backend::Cache => Err(match facts.cacheable {
            Err(why) if offer.cache => NoSupply::NotCacheable(why),
            _ => NoSupply::NoCache,
        }),
        Backend::Hugetlb if offer.pool_available == 0 => Err(NoSupply::PoolEmpty),
        Backend::Hugetlb => Ok(vec![Supply::Pool]),
        Backend::Thp if offer.mdwe => Err(NoSupply::Mdwe),
        Backend::Thp if !offer.thp_usable => Err(NoSupply::ThpUnusable),
        Backend::Thp => Ok(vec![Supply::Thp]),
        Backend::Auto => {
            let pays = matches!(copy, Copying::Yes);
            let thp = supplies_thp(offer);
            let mut out = Vec::with_capacity(2);
            // A shared image whenever it serves; a private one (a PIE's text
            // at a random base) only where no THP copy can be made (memory-
            // deny-write-execute): anonymous memory leaves the object's
            // mappings grouped for symbolizers, a hugetlbfs file's mapping
            // does not.
            if cache_serves && (facts.phase_stable || (pays && !thp)) {
                out.push(image);
            }
            if thp && pays {
                out.push(Supply::Thp);
            }
            if !out.is_empty() {
                Ok(out)
            } else if offer.cache && !offer.mprotect_guarded {
                Err(NoSupply::Unguarded)
            } else if let (true, Err(why)) = (offer.cache, facts.cacheable) {
                Err(NoSupply::NotCacheable(why))
            } else if !thp && !cache_serves {
                Err(if offer.mdwe {
                    NoSupply::Mdwe
                } else {
                    NoSupply::Nothing
                })
            } else {
                Err(match copy {
                    Copying::No(d) => NoSupply::NoCopy(d),
                    // Unreachable with `Yes`; a decision never asked for
                    // cannot be the reason either.
                    Copying::Yes | Copying::Undecided => NoSupply::Nothing,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{Arm, Rule};

    fn first_run() -> Decision {
        Decision {
            arm: Arm::Plain,
            rule: Rule::FirstRun { named: false },
            explores: false,
            copy_ms: 10,
            rate_us_per_mib: 500,
        }
    }

    fn no() -> Copying {
        Copying::No(first_run())
    }

    #[test]
    fn supplies_by_backend_and_offer() {
        let stable = RangeFacts {
            cacheable: Ok(()),
            phase_stable: true,
        };
        let random = RangeFacts {
            phase_stable: false,
            ..stable
        };
        let modified = RangeFacts {
            cacheable: Err(NotCacheable::Modified),
            ..stable
        };
        let laptop = Offer {
            pool_available: 0,
            thp_usable: true,
            cache: false,
            mdwe: false,
            mprotect_guarded: true,
        };
        let server = Offer {
            pool_available: 64,
            cache: true,
            ..laptop
        };
        let hardened = Offer {
            mdwe: true,
            ..server
        };
        let auto = |offer, facts, payoff| supplies(Backend::Auto, offer, facts, payoff);
        // auto never takes the pool; THP only when it pays off.
        assert_eq!(auto(laptop, stable, Copying::Yes), Ok(vec![Supply::Thp]));
        assert_eq!(
            auto(laptop, stable, no()),
            Err(NoSupply::NoCopy(first_run()))
        );
        // A set-up cache serves stable text whatever the payoff...
        assert_eq!(auto(server, stable, no()), Ok(vec![Supply::SharedImage]));
        assert_eq!(
            auto(server, stable, Copying::Yes),
            Ok(vec![Supply::SharedImage, Supply::Thp])
        );
        // ... random-phase text like any private copy...
        assert!(auto(server, random, no()).is_err());
        assert_eq!(auto(server, random, Copying::Yes), Ok(vec![Supply::Thp]));
        // (a private image only where THP cannot serve)
        let no_thp = Offer {
            thp_usable: false,
            ..server
        };
        assert_eq!(
            auto(no_thp, random, Copying::Yes),
            Ok(vec![Supply::PrivateImage])
        );
        // ... and never text that differs from its file.
        assert_eq!(auto(server, modified, Copying::Yes), Ok(vec![Supply::Thp]));
        assert_eq!(
            auto(server, modified, no()),
            Err(NoSupply::NotCacheable(NotCacheable::Modified))
        );
        // MDWE: images only.
        assert_eq!(
            auto(hardened, stable, Copying::Yes),
            Ok(vec![Supply::SharedImage])
        );
        assert_eq!(
            auto(hardened, modified, Copying::Yes),
            Err(NoSupply::NotCacheable(NotCacheable::Modified))
        );
        assert_eq!(
            supplies(Backend::Thp, hardened, stable, Copying::Yes),
            Err(NoSupply::Mdwe)
        );
        // Explicit backends do as told.
        assert_eq!(
            supplies(Backend::Hugetlb, server, stable, no()),
            Ok(vec![Supply::Pool])
        );
        assert_eq!(
            supplies(Backend::Hugetlb, laptop, stable, Copying::Yes),
            Err(NoSupply::PoolEmpty)
        );
        assert_eq!(
            supplies(Backend::Thp, laptop, stable, no()),
            Ok(vec![Supply::Thp])
        );
        assert_eq!(
            supplies(Backend::Cache, server, random, no()),
            Ok(vec![Supply::PrivateImage])
        );
        assert_eq!(
            supplies(Backend::Cache, laptop, stable, Copying::Yes),
            Err(NoSupply::NoCache)
        );
        // Without tiexec's mprotect in the program's way, nothing on
        // hugetlb pages: auto falls back to THP, explicit backends say why.
        let unguarded = Offer {
            mprotect_guarded: false,
            ..server
        };
        assert_eq!(auto(unguarded, stable, Copying::Yes), Ok(vec![Supply::Thp]));
        assert_eq!(auto(unguarded, stable, no()), Err(NoSupply::Unguarded));
        assert_eq!(
            auto(
                Offer {
                    mdwe: true,
                    ..unguarded
                },
                stable,
                Copying::Yes
            ),
            Err(NoSupply::Unguarded)
        );
        for backend in [Backend::Hugetlb, Backend::Cache] {
            assert_eq!(
                supplies(backend, unguarded, stable, Copying::Yes),
                Err(NoSupply::Unguarded)
            );
        }
        let nothing = Offer {
            thp_usable: false,
            ..laptop
        };
        assert_eq!(auto(nothing, stable, Copying::Yes), Err(NoSupply::Nothing));
        assert_eq!(
            supplies(Backend::Off, server, stable, Copying::Yes),
            Err(NoSupply::Off)
        );
    }
}
