//! What the program's children inherit from tiexec, and how the wrapper and
//! the preloaded library agree on it.
//!
//! - `--dlopen` loads the library as an audit module for PROGRAM only: the
//!   wrapper sets `LD_AUDIT` (and, when PROGRAM's libraries need it, a larger
//!   static TLS surplus in `GLIBC_TUNABLES`), and records the values they had
//!   in [`RESTORE_AUDIT`]; PROGRAM's constructor puts both back before
//!   `main`, so its children start the way they would without tiexec (with
//!   the preload only, unless `TIEXEC_CHILDREN=0`).
//! - Children that keep the preload also get `verify_asan_link_order=0` in
//!   `ASAN_OPTIONS`: a program built with GCC's AddressSanitizer refuses to
//!   start when another library precedes its runtime in the initial library
//!   list, which a preload always does (tiexec interposes nothing ASan
//!   watches).
//!
//! Pure functions here; the constructor applies them.

/// The variable in which the wrapper records `LD_AUDIT` and
/// `GLIBC_TUNABLES` as they were, for PROGRAM's constructor to restore.
pub const RESTORE_AUDIT: &str = "TIEXEC_RESTORE_AUDIT";

/// [`RESTORE_AUDIT`] for `getenv`.
pub const RESTORE_AUDIT_C: &core::ffi::CStr = c"TIEXEC_RESTORE_AUDIT";

/// The ASan option that lets a preload come first.
pub const ASAN_LINK_ORDER: &str = "verify_asan_link_order=0";

fn hex(bytes: Option<&[u8]>) -> String {
    match bytes {
        None => "-".into(),
        Some(b) => b.iter().map(|x| format!("{x:02x}")).collect(),
    }
}

fn unhex(text: &[u8]) -> Option<Option<Vec<u8>>> {
    if text == b"-" {
        return Some(None);
    }
    if text.len() % 2 != 0 {
        return None;
    }
    let digit = |c: u8| char::from(c).to_digit(16).map(|d| d as u8);
    text.chunks(2)
        .map(|p| Some(digit(*p.first()?)? << 4 | digit(*p.get(1)?)?))
        .collect::<Option<Vec<u8>>>()
        .map(Some)
}

/// The value of [`RESTORE_AUDIT`] for `LD_AUDIT` and `GLIBC_TUNABLES` as they
/// were (`None`: unset).
pub fn encode_restore(
    ld_audit: Option<&std::ffi::OsStr>,
    tunables: Option<&std::ffi::OsStr>,
) -> String {
    use std::os::unix::ffi::OsStrExt;
    format!(
        "{},{}",
        hex(ld_audit.map(OsStrExt::as_bytes)),
        hex(tunables.map(OsStrExt::as_bytes))
    )
}

/// What to put back: `(LD_AUDIT, GLIBC_TUNABLES)`, each `None` for unset.
pub type Restore = (Option<Vec<u8>>, Option<Vec<u8>>);

/// Decodes [`RESTORE_AUDIT`]; `None` when it is not ours.
pub fn decode_restore(value: &[u8]) -> Option<Restore> {
    let mut parts = value.split(|&b| b == b',');
    let audit = unhex(parts.next()?)?;
    let tunables = unhex(parts.next()?)?;
    parts.next().is_none().then_some((audit, tunables))
}

/// `ASAN_OPTIONS` with the link-order check off, or `None` when it already
/// says something about it.
pub fn asan_options_with_link_order(existing: Option<&[u8]>) -> Option<Vec<u8>> {
    let existing = existing.unwrap_or_default();
    if existing
        .windows(b"verify_asan_link_order".len())
        .any(|w| w == b"verify_asan_link_order")
    {
        return None;
    }
    let mut out = existing.to_vec();
    if !out.is_empty() {
        out.push(b':');
    }
    out.extend_from_slice(ASAN_LINK_ORDER.as_bytes());
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn one_name_two_spellings() {
        assert_eq!(RESTORE_AUDIT_C.to_bytes(), RESTORE_AUDIT.as_bytes());
    }

    #[test]
    fn restore_values_round_trip_whatever_they_hold() {
        let v = encode_restore(Some(OsStr::new("/a.so:/b,c.so")), None);
        assert_eq!(
            decode_restore(v.as_bytes()),
            Some((Some(b"/a.so:/b,c.so".to_vec()), None))
        );
        let v = encode_restore(None, Some(OsStr::new("")));
        assert_eq!(decode_restore(v.as_bytes()), Some((None, Some(Vec::new()))));
        assert_eq!(decode_restore(b"zz,-"), None);
        assert_eq!(decode_restore(b"-"), None);
        assert_eq!(decode_restore(b"-,-,-"), None);
    }

    #[test]
    fn asan_options_get_the_link_order_check_off_once() {
        assert_eq!(
            asan_options_with_link_order(None).unwrap(),
            b"verify_asan_link_order=0"
        );
        assert_eq!(
            asan_options_with_link_order(Some(b"detect_leaks=0")).unwrap(),
            b"detect_leaks=0:verify_asan_link_order=0"
        );
        assert_eq!(
            asan_options_with_link_order(Some(b"verify_asan_link_order=1")),
            None
        );
    }
}
