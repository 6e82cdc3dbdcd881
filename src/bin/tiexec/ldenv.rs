//! The loader's variables for a run of PROGRAM (and for `--check`'s
//! forecast): `LD_PRELOAD` and `LD_AUDIT` lists with tiexec first, and the
//! static TLS surplus an audit module needs.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;

use crate::libs;

/// `lib` first, then the entries of `existing` (':' or ' ' separated) other
/// than `lib`, joined by ':'. For `LD_PRELOAD` and `LD_AUDIT` alike.
pub fn ld_list_with(existing: Option<OsString>, lib: &Path) -> OsString {
    let lib = lib.as_os_str().as_bytes();
    let mut out = lib.to_vec();
    if let Some(existing) = existing {
        for entry in existing.as_bytes().split(|&b| b == b':' || b == b' ') {
            if entry.is_empty() || entry == lib {
                continue;
            }
            out.push(b':');
            out.extend_from_slice(entry);
        }
    }
    OsString::from_vec(out)
}

const TLS_SURPLUS_TUNABLE: &str = "glibc.rtld.optional_static_tls";

/// `existing` tunables with the static TLS surplus `bytes`, unless the user
/// already chose one.
pub fn tunables_with_tls_surplus(existing: Option<&OsStr>, bytes: u64) -> Option<OsString> {
    let mut out = existing.map(OsStr::to_os_string).unwrap_or_default();
    if out
        .as_bytes()
        .windows(TLS_SURPLUS_TUNABLE.len())
        .any(|w| w == TLS_SURPLUS_TUNABLE.as_bytes())
    {
        return None;
    }
    if !out.is_empty() {
        out.push(":");
    }
    out.push(format!("{TLS_SURPLUS_TUNABLE}={bytes}"));
    Some(out)
}

/// `GLIBC_TUNABLES` for a program with `libraries` and one audit module:
/// the user's, plus the static TLS surplus they need (`None`: leave it).
pub fn tunables_for_audit(libraries: &[libs::Object]) -> Option<OsString> {
    let bytes = libs::optional_static_tls(libraries)?;
    tunables_with_tls_surplus(std::env::var_os("GLIBC_TUNABLES").as_deref(), bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ld_lists_keep_existing_entries() {
        let lib = Path::new("/c/libtiexec.so");
        assert_eq!(ld_list_with(None, lib), "/c/libtiexec.so");
        assert_eq!(
            ld_list_with(Some("/a.so /c/libtiexec.so:/b.so".into()), lib),
            "/c/libtiexec.so:/a.so:/b.so"
        );
    }

    #[test]
    fn tls_surplus_is_added_once_and_never_overrides_the_user() {
        assert_eq!(
            tunables_with_tls_surplus(None, 18880).unwrap(),
            "glibc.rtld.optional_static_tls=18880"
        );
        assert_eq!(
            tunables_with_tls_surplus(Some(OsStr::new("glibc.malloc.arena_max=2")), 1024).unwrap(),
            "glibc.malloc.arena_max=2:glibc.rtld.optional_static_tls=1024"
        );
        let mine = OsStr::new("glibc.rtld.optional_static_tls=1024");
        assert_eq!(tunables_with_tls_surplus(Some(mine), 4096), None);
    }
}
