//! What the commands print comes in part from agents (paths, names,
//! errors): a compromised node must not be able to drive the operator's
//! terminal (escape sequences that move the cursor, rewrite the screen,
//! set the title or the clipboard) or forge lines. Control characters —
//! C0 (ESC, CR, BS…), DEL and C1 (U+0080–U+009F, which some terminals
//! read as CSI) — are shown escaped, as `\u{1b}`.
use std::{borrow::Cow, fmt::Write};

/// `s` with every control character escaped: one line, always.
pub fn printable(s: &str) -> Cow<'_, str> {
    escape(s, false)
}

/// The same, but line breaks stay (for a rendered table or report).
pub fn printable_lines(s: &str) -> Cow<'_, str> {
    escape(s, true)
}

fn escape(s: &str, keep_lines: bool) -> Cow<'_, str> {
    let bad = |c: char| c.is_control() && !(keep_lines && c == '\n');
    if !s.chars().any(bad) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if bad(c) {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_reach_the_terminal_only_as_text() {
        assert_eq!(printable("/api/users"), "/api/users");
        assert!(matches!(printable("plain"), Cow::Borrowed(_)));
        assert_eq!(
            printable("/x\u{1b}]0;pwned\u{7}\r\nreq id=fake"),
            "/x\\u{1b}]0;pwned\\u{7}\\u{d}\\u{a}req id=fake"
        );
        // C1 CSI and DEL too; printable non-ASCII stays.
        assert_eq!(printable("\u{9b}2J\u{7f}ü"), "\\u{9b}2J\\u{7f}ü");
        assert_eq!(printable_lines("a\tb\nc\u{1b}"), "a\\u{9}b\nc\\u{1b}");
    }
}
