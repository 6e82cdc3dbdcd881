//! Where a user's state lives (run records, hot maps, copy rates, image
//! records): one rule for the library and for the preload stub, which
//! compiles this same file (`#[path]`) to find a program's run record.
//!
//! Pure and `no_std`: the caller passes the environment in.
//!
//! In order, the first that is set to an absolute path:
//! 1. `TIEXEC_STATE`: the state directory itself;
//! 2. `$XDG_CACHE_HOME/tiexec`;
//! 3. `$CACHE_DIRECTORY/tiexec`: systemd sets it for a service with
//!    `CacheDirectory=` (the first, when it lists several), where a service
//!    started with a clean environment keeps what it learns;
//! 4. `$HOME/.cache/tiexec` (not for `HOME=/`);
//!
//! and then, or when that one cannot be used (no such directory can be
//! made: `HOME=/nonexistent`), the shared fallback
//! [`SHARED_PREFIX`]`UID` (`/var/tmp`: kept across reboots), used only
//! when the user owns it and no one else can write to it.

/// The shared fallback's prefix; the user's numeric ID follows.
pub const SHARED_PREFIX: &[u8] = b"/var/tmp/tiexec-";

/// The variables the rule reads, in its order, with what follows each.
pub const SOURCES: [(&str, &[u8]); 4] = [
    ("TIEXEC_STATE", b""),
    ("XDG_CACHE_HOME", b"/tiexec"),
    ("CACHE_DIRECTORY", b"/tiexec"),
    ("HOME", b"/.cache/tiexec"),
];

/// The state directory named by the environment, as `(base, suffix)` to
/// be joined, or `None`: only the shared fallback remains. `get` reads one
/// variable.
pub fn from_env<'a>(get: impl Fn(&str) -> Option<&'a [u8]>) -> Option<(&'a [u8], &'static [u8])> {
    for (var, suffix) in SOURCES {
        let Some(mut value) = get(var) else {
            continue;
        };
        if var == "CACHE_DIRECTORY" {
            // systemd joins several directories with ':'.
            value = value.split(|&b| b == b':').next().unwrap_or(value);
        }
        let usable = value.first() == Some(&b'/') && !(var == "HOME" && value == b"/");
        if usable {
            return Some((value, suffix));
        }
    }
    None
}

/// Writes the decimal digits of `v` into `buf`, returning them.
pub fn decimal(mut v: u32, buf: &mut [u8; 10]) -> &[u8] {
    let mut at = buf.len();
    loop {
        at -= 1;
        if let Some(d) = buf.get_mut(at) {
            *d = b'0' + (v % 10) as u8;
        }
        v /= 10;
        if v == 0 || at == 0 {
            break;
        }
    }
    buf.get(at..).unwrap_or(&[])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn locate(vars: &[(&str, &'static [u8])]) -> Option<(Vec<u8>, &'static [u8])> {
        let vars = vars.to_vec();
        from_env(|name| vars.iter().find(|(n, _)| *n == name).map(|(_, v)| *v))
            .map(|(b, s)| (b.to_vec(), s))
    }

    #[test]
    fn the_first_absolute_setting_wins() {
        let all: [(&str, &'static [u8]); 4] = [
            ("TIEXEC_STATE", b"/srv/state"),
            ("XDG_CACHE_HOME", b"/home/u/.xdg"),
            ("CACHE_DIRECTORY", b"/var/cache/svc:/var/cache/other"),
            ("HOME", b"/home/u"),
        ];
        assert_eq!(locate(&all), Some((b"/srv/state".to_vec(), &b""[..])));
        assert_eq!(
            locate(&all[1..]),
            Some((b"/home/u/.xdg".to_vec(), &b"/tiexec"[..]))
        );
        assert_eq!(
            locate(&all[2..]),
            Some((b"/var/cache/svc".to_vec(), &b"/tiexec"[..]))
        );
        assert_eq!(
            locate(&all[3..]),
            Some((b"/home/u".to_vec(), &b"/.cache/tiexec"[..]))
        );
        // Relative paths and HOME=/ do not count; nothing left: the
        // shared fallback.
        assert_eq!(locate(&[("XDG_CACHE_HOME", b"rel"), ("HOME", b"/")]), None);
        assert_eq!(locate(&[]), None);
    }

    #[test]
    fn decimals() {
        let mut b = [0u8; 10];
        assert_eq!(decimal(0, &mut b), b"0");
        assert_eq!(decimal(65534, &mut b), b"65534");
        assert_eq!(decimal(u32::MAX, &mut b), b"4294967295");
    }
}
