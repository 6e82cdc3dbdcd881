//! Logging from inside a constructor: format into a stack buffer, one
//! `write(2)` to stderr per line. No allocation, no locks, no panics: a line
//! too long for the buffer is cut, and a failed write is ignored.

use core::fmt;
use core::sync::atomic::{AtomicU8, Ordering};

/// How much tiexec says on stderr.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Nothing at all.
    Off = 0,
    /// Something went wrong that the user must know (text could not be
    /// restored).
    Error = 1,
    /// A setting was ignored, or nothing could be done although asked.
    Warn = 2,
    /// One line per object: what was moved, how, how long it took.
    Info = 3,
    /// Every decision and step.
    Debug = 4,
}

impl Level {
    /// The name used in `TIEXEC_LOG`.
    pub fn name(self) -> &'static str {
        match self {
            Level::Off => "off",
            Level::Error => "error",
            Level::Warn => "warn",
            Level::Info => "info",
            Level::Debug => "debug",
        }
    }
}

static LEVEL: AtomicU8 = AtomicU8::new(Level::Warn as u8);

/// Sets the process-wide level.
pub fn set_level(level: Level) {
    LEVEL.store(level as u8, Ordering::Relaxed);
}

/// True when a message at `level` would be written.
pub fn enabled(level: Level) -> bool {
    level != Level::Off && (level as u8) <= LEVEL.load(Ordering::Relaxed)
}

/// A fixed-size line buffer; writes past its end are dropped.
pub struct LineBuf {
    buf: [u8; 1024],
    len: usize,
}

impl LineBuf {
    /// An empty buffer.
    pub const fn new() -> Self {
        LineBuf {
            buf: [0; 1024],
            len: 0,
        }
    }

    /// Appends raw bytes (paths need not be UTF-8), cutting at capacity.
    pub fn push_bytes(&mut self, bytes: &[u8]) {
        let room = self.buf.len().saturating_sub(self.len);
        let n = bytes.len().min(room);
        if let (Some(dst), Some(src)) = (self.buf.get_mut(self.len..self.len + n), bytes.get(..n)) {
            dst.copy_from_slice(src);
            self.len += n;
        }
    }

    /// What has been written so far.
    pub fn as_bytes(&self) -> &[u8] {
        self.buf.get(..self.len).unwrap_or(&[])
    }

    /// Writes the buffer plus a newline to stderr, in one call.
    pub fn write_line_to_stderr(&mut self) {
        if self.len == self.buf.len() {
            self.len -= 1; // room for the newline
        }
        self.push_bytes(b"\n");
        crate::sys::write_stderr(self.as_bytes());
    }
}

impl Default for LineBuf {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Write for LineBuf {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.push_bytes(s.as_bytes());
        Ok(())
    }
}

/// Writes one line `tiexec: ...` to stderr if `level` is enabled.
#[macro_export]
#[doc(hidden)]
macro_rules! tlog {
    ($level:expr, $($arg:tt)*) => {{
        if $crate::log::enabled($level) {
            let mut line = $crate::log::LineBuf::new();
            line.push_bytes(b"tiexec: ");
            let _ = core::fmt::Write::write_fmt(&mut line, format_args!($($arg)*));
            line.write_line_to_stderr();
        }
    }};
}

/// A byte count shown the way people read memory sizes: `512 KiB`, `34.2 MiB`.
#[derive(Clone, Copy, Debug)]
pub struct Bytes(pub u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const KIB: u64 = 1024;
        const MIB: u64 = 1024 * KIB;
        const GIB: u64 = 1024 * MIB;
        let b = self.0;
        if b >= GIB {
            write!(f, "{}.{} GiB", b / GIB, (b % GIB) * 10 / GIB)
        } else if b >= MIB {
            write!(f, "{}.{} MiB", b / MIB, (b % MIB) * 10 / MIB)
        } else if b >= KIB {
            write!(f, "{} KiB", b / KIB)
        } else {
            write!(f, "{b} B")
        }
    }
}

/// A name from somewhere else (a file name another user chose, a path in
/// another process), shown so that it cannot drive a terminal: control
/// characters, and the Unicode ones that reorder text, become escapes
/// (`\x1b`, `\u{202e}`); everything else is shown as it is.
#[derive(Clone, Copy, Debug)]
pub struct Shown<'a>(pub &'a str);

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in self.0.chars() {
            let reorders = matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
            if c.is_control() || reorders {
                if (c as u32) < 0x100 {
                    write!(f, "\\x{:02x}", c as u32)?;
                } else {
                    write!(f, "\\u{{{:x}}}", c as u32)?;
                }
            } else {
                fmt::Write::write_char(f, c)?;
            }
        }
        Ok(())
    }
}

/// A duration in nanoseconds shown as milliseconds with two decimals.
#[derive(Clone, Copy, Debug)]
pub struct Millis(pub u64);

impl fmt::Display for Millis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let us = self.0 / 1000;
        write!(f, "{}.{:02} ms", us / 1000, (us % 1000) / 10)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::fmt::Write;

    #[test]
    fn long_lines_are_cut_not_panicking() {
        let mut line = LineBuf::new();
        for _ in 0..200 {
            let _ = write!(line, "0123456789");
        }
        assert_eq!(line.as_bytes().len(), 1024);
    }

    #[test]
    fn names_from_elsewhere_cannot_drive_a_terminal() {
        assert_eq!(
            Shown("lib\x1b[2Jx\nforged line\u{202e}.so").to_string(),
            "lib\\x1b[2Jx\\x0aforged line\\u{202e}.so"
        );
        assert_eq!(Shown("/usr/lib/libé.so").to_string(), "/usr/lib/libé.so");
    }

    #[test]
    fn sizes_read_like_people_write_them() {
        assert_eq!(Bytes(512).to_string(), "512 B");
        assert_eq!(Bytes(8 * 1024).to_string(), "8 KiB");
        assert_eq!(Bytes(34 * 1024 * 1024 + 200 * 1024).to_string(), "34.1 MiB");
        assert_eq!(Millis(12_345_678).to_string(), "12.34 ms");
    }
}
