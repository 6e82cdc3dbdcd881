//! Huge pages for one range: the glue between the policy (`policy`: which
//! ways, in which order) and the sources (the image cache, private copies).
//!
//! Inputs: a planned range, what is known of its object (its file, checked
//! to be the one mapped; its image regions) and the context. Result: the
//! first way that served (a [`Staged`] replacement, or in a forecast the
//! source it would be), or why none did. Effects: an image found is mapped,
//! one missing is built (and published when shared); a copy is made. Nothing
//! here touches the text itself (that is `swap`'s).

use std::fs::File;
use std::os::fd::AsFd;

use crate::cache::{Cache, Content, FileIdentity, ImageKey, Piece};
use crate::context::Context;
use crate::discover::LoadedObject;
use crate::pagesize::huge_page;
use crate::plan::SwapRange;
use crate::policy::{self, Copying, NoSupply, NotCacheable, RangeFacts, Source, Supply};
use crate::range::{align_down, align_up, Range};
use crate::smaps::Vma;
use crate::staging::{Staged, SwapError};
use crate::sys;

/// The object's file, opened and checked to be the very file its text maps.
pub struct ObjectFile {
    /// Open for reading.
    pub file: File,
    /// Its identity when opened.
    pub identity: FileIdentity,
}

/// Opens `object`'s file, if it is the file its text is mapped from.
pub fn open_object_file(object: &LoadedObject, vmas: &[Vma]) -> Option<ObjectFile> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(&object.path)
        .ok()?;
    let identity = FileIdentity::of_fd(file.as_fd()).ok()?;
    let maps_it = vmas.iter().any(|v| {
        v.inode == identity.ino
            && v.dev == identity.dev
            && object
                .text_segments
                .iter()
                .any(|s| s.intersect(v.range()).is_some())
    });
    maps_it.then_some(ObjectFile { file, identity })
}

/// One region of an object's text as a cache image holds it (see `cache`):
/// the huge pages its text segments span, merged where they share one.
pub struct ImageRegion {
    /// Its addresses in this process.
    pub window: Range,
    /// The file's bytes in it, at offsets from `window.start`.
    pub pieces: Vec<Piece>,
    /// The image's name: the whole key.
    pub name: String,
}

/// The object's text regions (see [`ImageRegion`]), each with the file's
/// bytes that a process maps there: every mapping of the object's own file
/// that is not writable and lies in one of its read-only segments (text,
/// headers, rodata; never RELRO or data). The same for every process that
/// loads the object at the same phase, whatever the page cache maps huge.
pub fn image_regions(object: &LoadedObject, file: &ObjectFile, vmas: &[Vma]) -> Vec<ImageRegion> {
    let huge = huge_page();
    let mut windows: Vec<Range> = Vec::new();
    for s in &object.text_segments {
        let w = Range::new(align_down(s.start, huge), align_up(s.end, huge));
        match windows.last_mut() {
            Some(last) if last.end >= w.start => last.end = last.end.max(w.end),
            _ => windows.push(w),
        }
    }
    windows
        .into_iter()
        .map(|window| {
            let pieces: Vec<Piece> = vmas
                .iter()
                .filter(|v| {
                    v.inode == file.identity.ino
                        && v.dev == file.identity.dev
                        && !v.write
                        && !v.is_hugetlb()
                        && v.range().covered_by_union(&object.read_only_segments)
                })
                .filter_map(|v| {
                    let part = v.range().intersect(window)?;
                    Some(Piece {
                        at: part.start - window.start,
                        file_offset: v.offset + (part.start - v.start),
                        len: part.len(),
                    })
                })
                .collect();
            let name = ImageKey {
                file: file.identity,
                build_id: object.build_id.clone(),
                offset: window.start.wrapping_sub(object.bias),
                len: window.len(),
                phase: object.bias % huge,
                layout: crate::cache::layout_digest(&pieces),
            }
            .file_name(&object.path);
            ImageRegion {
                window,
                pieces,
                name,
            }
        })
        .collect()
}

/// What the cache needs to know about one range, and where its bytes come
/// from in the file (pieces at offsets from the range's start, for a
/// private image of the range alone).
pub struct Facts {
    /// For the policy.
    pub policy: RangeFacts,
    /// The region whose image holds the range (shared images).
    pub region: Option<usize>,
    /// The range's own pieces (private images).
    pub pieces: Vec<Piece>,
}

/// Whether an image built from the file holds `req`'s bytes: its object's
/// file is the one mapped, has no text relocations, every mapped byte of
/// the range is the file's (mapped from it, and not written since: a
/// debugger's breakpoint or a patch must never be shared), and one region's
/// image holds it all.
pub fn range_facts(
    req: &SwapRange,
    object: &LoadedObject,
    file: Option<&ObjectFile>,
    regions: &[ImageRegion],
    vmas: &[Vma],
) -> Facts {
    let phase_stable = object.bias % huge_page() == 0;
    let fail = |why| Facts {
        policy: RangeFacts {
            cacheable: Err(why),
            phase_stable,
        },
        region: None,
        pieces: Vec::new(),
    };
    let Some(file) = file else {
        return fail(NotCacheable::FileNotMapped);
    };
    if object.text_relocations {
        return fail(NotCacheable::TextRelocations);
    }
    let mut pieces = Vec::with_capacity(req.pieces.len());
    for p in req.pieces.iter().filter_map(|p| p.intersect(req.range)) {
        let Some(v) = vmas.iter().find(|v| v.start <= p.start && p.end <= v.end) else {
            return fail(NotCacheable::NotFromFile);
        };
        if v.inode != file.identity.ino || v.dev != file.identity.dev {
            return fail(NotCacheable::NotFromFile);
        }
        pieces.push(Piece {
            at: p.start - req.range.start,
            file_offset: v.offset + (p.start - v.start),
            len: p.len(),
        });
    }
    // Written pages (relocations, breakpoints, patches) differ from the file.
    match sys::modified_file_pages(req.range.start, req.range.end) {
        Ok(written) if written.is_empty() => {}
        // Written, or the page tables could not be read: not from the file.
        _ => return fail(NotCacheable::Modified),
    }
    // The region's image must hold every byte the range maps, from the same
    // place in the file.
    let region = regions.iter().position(|r| {
        r.window.contains(req.range)
            && pieces.iter().all(|p| {
                let at = req.range.start - r.window.start + p.at;
                r.pieces.iter().any(|q| {
                    q.at <= at
                        && at + p.len <= q.at + q.len
                        && q.file_offset + (at - q.at) == p.file_offset
                })
            })
    });
    if region.is_none() {
        return fail(NotCacheable::NotFromFile);
    }
    Facts {
        policy: RangeFacts {
            cacheable: Ok(()),
            phase_stable,
        },
        region,
        pieces,
    }
}

/// True when a shared image is the first way for a range with `facts`.
pub fn image_serves(ctx: &Context, facts: &Facts) -> bool {
    matches!(
        ctx.request.backend,
        crate::config::Backend::Auto | crate::config::Backend::Cache
    ) && ctx.offer.cache
        && facts.policy.cacheable.is_ok()
        && facts.policy.phase_stable
}

/// One way of supplying a range, tried: for real (mapped pages) or in a
/// forecast (the source it would be).
pub type Attempt<'a, T> = dyn FnMut(Supply) -> Result<T, SwapError> + 'a;

/// Gets huge pages holding `req`'s bytes: tries each way `policy::supplies`
/// allows, in order, through `attempt`; returns the first that works, or
/// the last error. The order lives here once, for a real run (`attempt`
/// maps pages) and a forecast (`attempt` only says what would happen).
pub fn supply_range<T>(
    req: &SwapRange,
    object: &LoadedObject,
    facts: &Facts,
    ctx: &Context,
    attempt: &mut Attempt<'_, T>,
) -> Result<T, SwapError> {
    let backend = ctx.request.backend;
    let copying = ctx.copying();
    let serves = image_serves(ctx, facts);
    let mut ways =
        policy::supplies(backend, ctx.offer, facts.policy, copying).map_err(SwapError::NoSupply)?;
    if backend == crate::config::Backend::Auto && serves && policy::supplies_thp(ctx.offer) {
        // Should the image fail (the cache is full, the builder too slow), a
        // private copy may still be made, where this process copies.
        ways.push(Supply::Thp);
    }
    if req.names_program {
        // Only the page cache, in place, keeps the mapping the file's.
        return Err(SwapError::NoSupply(NoSupply::NamesProgram));
    }
    let mut last = SwapError::NoSupply(NoSupply::Nothing);
    for way in ways {
        if way == Supply::Thp && backend == crate::config::Backend::Auto && serves {
            if let Copying::No(d) = copying {
                last = match last {
                    SwapError::Cache(_) => last,
                    _ => SwapError::NoSupply(NoSupply::NoCopy(d)),
                };
                continue;
            }
        }
        match attempt(way) {
            Ok(got) => return Ok(got),
            Err(e) => {
                // What the cache refused or lacked is worth knowing when a
                // copy serves instead; the rest is detail.
                let level = if matches!(e, SwapError::Cache(_)) {
                    crate::log::Level::Info
                } else {
                    crate::log::Level::Debug
                };
                crate::tlog!(
                    level,
                    "{}: {:#x}-{:#x}: {} did not serve: {e}",
                    object.path,
                    req.range.start,
                    req.range.end,
                    way.name()
                );
                last = e;
            }
        }
    }
    Err(last)
}

/// How long to wait for another process building `region`'s image (ms).
fn wait_ms(ctx: &Context, region: &ImageRegion) -> u64 {
    let rate = ctx
        .state()
        .and_then(|s| s.rates().median(crate::state::RateKind::Image))
        .unwrap_or(0);
    Cache::wait_for_build_ms(region.window.len(), rate)
}

/// An object as the supply of its ranges sees it: its file (checked to be
/// the one mapped) and its image regions.
pub struct ObjectSupply<'a> {
    /// The object.
    pub object: &'a LoadedObject,
    /// Its file.
    pub file: &'a ObjectFile,
    /// Its text regions, for shared images.
    pub regions: &'a [ImageRegion],
}

/// `req`'s pages from the cache: its region's shared image (found, or built
/// now) mapped at the range's offset, or (`shared` false) a private image
/// of the range alone. Mapped r-x.
pub fn image_for(
    req: &SwapRange,
    facts: &Facts,
    of: &ObjectSupply<'_>,
    cache: &Cache,
    ctx: &Context,
    shared: bool,
) -> Result<Staged, SwapError> {
    let (object, file, regions) = (of.object, of.file, of.regions);
    let (name, content, offset, wait) = if shared {
        let region = facts
            .region
            .and_then(|i| regions.get(i))
            .ok_or(SwapError::NoSupply(NoSupply::NotCacheable(
                NotCacheable::NotFromFile,
            )))?;
        (
            region.name.clone(),
            Content {
                file: file.file.as_fd(),
                identity: file.identity,
                pieces: &region.pieces,
                len: region.window.len(),
            },
            req.range.start - region.window.start,
            wait_ms(ctx, region),
        )
    } else {
        (
            format!("private image of {}", object.path),
            Content {
                file: file.file.as_fd(),
                identity: file.identity,
                pieces: &facts.pieces,
                len: req.range.len(),
            },
            0,
            0,
        )
    };
    crate::staging::check_address_space(content.len + if shared { 0 } else { req.range.len() })?;
    // A region's image serves all of its ranges: found or built once per
    // pass (a range after the first is no new hit).
    let found = shared.then(|| ctx.opened_image(&name)).flatten();
    let image = match found {
        Some(image) => image,
        None => {
            let image = cache
                .get_or_build(&name, &content, shared, wait, ctx.state(), &object.path)
                .map_err(SwapError::Cache)?;
            let image = std::rc::Rc::new(image);
            if shared {
                ctx.keep_image(std::rc::Rc::clone(&image));
            }
            image
        }
    };
    let mapping = image
        .map(offset, req.range.len())
        .map_err(SwapError::ImageMap)?;
    let source = match (shared, image.hit) {
        (true, true) => Source::CacheHit,
        (true, false) => Source::CacheBuilt,
        (false, _) => Source::Hugetlb,
    };
    let fd = sys::reopen_read_only(image.fd()).map_err(SwapError::ImageMap)?;
    Ok(Staged {
        mapping,
        fd: Some(fd),
        fd_offset: offset,
        source,
    })
}

/// What an attempt would get for `way`, without getting it: the image found
/// (a hit) or one that could be built (room in the cache, counting what
/// eviction could free); a copy where the machine offers its kind. Without
/// a cache (`ctx.cache` none while the offer says there is one: the
/// forecast of what `tiexec --setup` would bring) an image would be built.
pub fn foresee(
    way: Supply,
    req: &SwapRange,
    facts: &Facts,
    regions: &[ImageRegion],
    identity: Option<&FileIdentity>,
    ctx: &Context,
) -> Result<Source, SwapError> {
    match way {
        Supply::SharedImage | Supply::PrivateImage => {
            let shared = way == Supply::SharedImage;
            let Some(cache) = ctx.cache.as_ref() else {
                return if ctx.offer.cache {
                    Ok(if shared {
                        Source::CacheBuilt
                    } else {
                        Source::Hugetlb
                    })
                } else {
                    Err(SwapError::NoSupply(NoSupply::NoCache))
                };
            };
            let (name, len) = match (shared, facts.region.and_then(|i| regions.get(i))) {
                (true, Some(region)) => (region.name.as_str(), region.window.len()),
                (true, None) => {
                    return Err(SwapError::NoSupply(NoSupply::NotCacheable(
                        NotCacheable::NotFromFile,
                    )))
                }
                (false, _) => ("", req.range.len()),
            };
            let hit = cache
                .foresee(name, len, shared, identity)
                .map_err(SwapError::Cache)?;
            Ok(match (shared, hit) {
                (true, true) => Source::CacheHit,
                (true, false) => Source::CacheBuilt,
                (false, _) => Source::Hugetlb,
            })
        }
        Supply::Pool => Ok(Source::Hugetlb),
        Supply::Thp => Ok(Source::Thp),
    }
}
