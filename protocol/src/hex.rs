//! Lowercase hexadecimal, for hashes and serial numbers in configuration files and messages for people.

pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes of an even-length hexadecimal string (either case), or `None`.
pub fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.is_ascii() {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn round_trip_and_refusals() {
        assert_eq!(super::to_hex(&[0, 0xab, 0x10]), "00ab10");
        assert_eq!(super::from_hex("00AB10"), Some(vec![0, 0xab, 0x10]));
        assert_eq!(super::from_hex("abc"), None);
        assert_eq!(super::from_hex("zz"), None);
        assert_eq!(super::from_hex("é1"), None);
    }
}
