//! Text a peer sent (an error message, a close reason, a version string), made safe to log: control
//! characters (newlines, carriage returns, ANSI escapes) written as escapes, and the length bounded, so that
//! no peer can forge a log line or colour a terminal.

/// The most characters of a peer's text that reach a log.
pub const MAX_PEER_TEXT: usize = 512;

/// `text` with every control character escaped (`\n`, `\u{1b}`) and at most [`MAX_PEER_TEXT`] characters kept.
pub fn escape_peer(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(MAX_PEER_TEXT));
    for (i, c) in text.chars().enumerate() {
        if i == MAX_PEER_TEXT {
            out.push_str("...");
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_the_length_bounded() {
        let forged = "bye\n2026-11-30T00:00:00Z  INFO run completed rounds=99\r\u{1b}[31mred";
        let safe = escape_peer(forged);
        assert!(!safe.chars().any(char::is_control), "{safe}");
        assert!(
            safe.contains("\\n2026") && safe.contains("\\u{1b}[31m"),
            "{safe}"
        );
        assert_eq!(escape_peer("centre ünïcode ok"), "centre ünïcode ok");
        let long = "x".repeat(10 * MAX_PEER_TEXT);
        assert_eq!(escape_peer(&long).chars().count(), MAX_PEER_TEXT + 3);
    }
}
