//! A small JSON writer for reports (library and CLI): objects, arrays,
//! strings with proper escaping, integers, booleans. Output only; nothing
//! here parses JSON.

use core::fmt::Write;

/// Builds one JSON value into a `String`.
#[derive(Default)]
pub struct Json {
    out: String,
    /// Whether the innermost open container already has a member.
    has_member: Vec<bool>,
}

impl Json {
    /// An empty writer.
    pub fn new() -> Json {
        Json::default()
    }

    /// The text written so far.
    pub fn finish(self) -> String {
        self.out
    }

    fn separate(&mut self) {
        if let Some(has) = self.has_member.last_mut() {
            if *has {
                self.out.push(',');
            }
            *has = true;
        }
    }

    fn key(&mut self, key: &str) {
        self.separate();
        self.string_raw(key);
        self.out.push(':');
    }

    fn string_raw(&mut self, s: &str) {
        self.out.push('"');
        for c in s.chars() {
            match c {
                '"' => self.out.push_str("\\\""),
                '\\' => self.out.push_str("\\\\"),
                '\n' => self.out.push_str("\\n"),
                '\r' => self.out.push_str("\\r"),
                '\t' => self.out.push_str("\\t"),
                c if (c as u32) < 0x20 => {
                    let _ = write!(self.out, "\\u{:04x}", c as u32);
                }
                c => self.out.push(c),
            }
        }
        self.out.push('"');
    }

    /// Opens an object (as a value, or as member `key` when given).
    pub fn begin_object(&mut self, key: Option<&str>) -> &mut Self {
        match key {
            Some(k) => self.key(k),
            None => self.separate(),
        }
        self.out.push('{');
        self.has_member.push(false);
        self
    }

    /// Closes the innermost object.
    pub fn end_object(&mut self) -> &mut Self {
        self.has_member.pop();
        self.out.push('}');
        self
    }

    /// Opens an array (as a value, or as member `key` when given).
    pub fn begin_array(&mut self, key: Option<&str>) -> &mut Self {
        match key {
            Some(k) => self.key(k),
            None => self.separate(),
        }
        self.out.push('[');
        self.has_member.push(false);
        self
    }

    /// Closes the innermost array.
    pub fn end_array(&mut self) -> &mut Self {
        self.has_member.pop();
        self.out.push(']');
        self
    }

    /// A string member.
    pub fn str(&mut self, key: &str, value: &str) -> &mut Self {
        self.key(key);
        self.string_raw(value);
        self
    }

    /// A string array element.
    pub fn str_value(&mut self, value: &str) -> &mut Self {
        self.separate();
        self.string_raw(value);
        self
    }

    /// An unsigned integer in an array.
    pub fn uint_value(&mut self, value: u64) -> &mut Self {
        self.separate();
        let _ = write!(self.out, "{value}");
        self
    }

    /// An unsigned integer member.
    pub fn uint(&mut self, key: &str, value: u64) -> &mut Self {
        self.key(key);
        let _ = write!(self.out, "{value}");
        self
    }

    /// A floating-point member (finite; others are written as null).
    pub fn float(&mut self, key: &str, value: f64) -> &mut Self {
        self.key(key);
        if value.is_finite() {
            let _ = write!(self.out, "{value:.3}");
        } else {
            self.out.push_str("null");
        }
        self
    }

    /// A boolean member.
    pub fn bool(&mut self, key: &str, value: bool) -> &mut Self {
        self.key(key);
        self.out.push_str(if value { "true" } else { "false" });
        self
    }

    /// A null member.
    pub fn null(&mut self, key: &str) -> &mut Self {
        self.key(key);
        self.out.push_str("null");
        self
    }

    /// A member whose value is `json`, a complete JSON value written by
    /// another writer (taken as it is: the caller vouches for it).
    pub fn raw(&mut self, key: &str, json: &str) -> &mut Self {
        self.key(key);
        self.out.push_str(json.trim());
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_values_and_escapes() {
        let mut j = Json::new();
        j.begin_object(None)
            .str("path", "/a \"b\"\\\n\u{1}")
            .uint("n", 42)
            .bool("ok", true)
            .null("none")
            .float("pct", 97.25)
            .begin_array(Some("list"))
            .str_value("x")
            .begin_object(None)
            .uint("a", 1)
            .end_object()
            .end_array()
            .end_object();
        assert_eq!(
            j.finish(),
            r#"{"path":"/a \"b\"\\\n\u0001","n":42,"ok":true,"none":null,"pct":97.250,"list":["x",{"a":1}]}"#
        );
    }
}
