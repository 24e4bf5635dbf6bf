//! The text of Login and Text PDUs (RFC 7143 §6): `key=value` pairs, each
//! ended by a NUL, in UTF-8.
//!
//! An exchange's text may span several PDUs (the C bit): the caller joins
//! their data with [`Accumulator`], bounded, then parses the whole.
//! Parsing refuses what no initiator sends: a key twice, a key over 63
//! bytes or outside the RFC's characters, a value over its limit, more
//! pairs than any negotiation needs; each with an error that names it.

use crate::TextError;

/// Longest key (RFC 7143 §6.1).
pub const MAX_KEY: usize = 63;
/// Longest value accepted: long enough for a hex CHAP challenge or
/// response of 1024 bytes (RFC 7143 §12.1.3).
pub const MAX_VALUE: usize = 4096;
/// Most pairs in one exchange: a login sends about 20.
pub const MAX_PAIRS: usize = 256;
/// Most text bytes in one exchange, across its PDUs.
pub const MAX_TEXT: usize = 64 * 1024;

/// The pairs of one exchange, in the order sent.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Pairs(pub Vec<(String, String)>);

impl Pairs {
    /// The value of `key`, if sent.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn push(&mut self, key: &str, value: impl Into<String>) {
        self.0.push((key.to_owned(), value.into()));
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Parses the text `data` of one exchange.
    pub fn parse(data: &[u8]) -> Result<Pairs, TextError> {
        if data.len() > MAX_TEXT {
            return Err(TextError::TooLong(data.len()));
        }
        let mut pairs: Vec<(String, String)> = Vec::new();
        // A last pair without its NUL is accepted (some initiators pad
        // with NULs instead of ending with one).
        for item in data.split(|&b| b == 0).filter(|s| !s.is_empty()) {
            if pairs.len() == MAX_PAIRS {
                return Err(TextError::TooManyPairs);
            }
            let text = std::str::from_utf8(item).map_err(|_| TextError::NotUtf8)?;
            let (key, value) = text
                .split_once('=')
                .ok_or_else(|| TextError::NoValue(shorten(text)))?;
            check_key(key)?;
            if value.len() > MAX_VALUE {
                return Err(TextError::ValueTooLong(key.to_owned()));
            }
            if pairs.iter().any(|(k, _)| k == key) {
                return Err(TextError::Repeated(key.to_owned()));
            }
            pairs.push((key.to_owned(), value.to_owned()));
        }
        Ok(Pairs(pairs))
    }

    /// Appends `key=value\0` for each pair.
    pub fn encode(&self, out: &mut Vec<u8>) {
        for (k, v) in &self.0 {
            out.extend_from_slice(k.as_bytes());
            out.push(b'=');
            out.extend_from_slice(v.as_bytes());
            out.push(0);
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }
}

/// At most 40 characters of `s`, for an error message.
fn shorten(s: &str) -> String {
    s.chars().take(40).collect()
}

fn check_key(key: &str) -> Result<(), TextError> {
    let ok = !key.is_empty()
        && key.len() <= MAX_KEY
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-+@_".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(TextError::BadKey(shorten(key)))
    }
}

/// Joins the data of an exchange's PDUs (C bit set on all but the last),
/// refusing more than [`MAX_TEXT`] bytes.
#[derive(Debug, Default)]
pub struct Accumulator {
    data: Vec<u8>,
}

impl Accumulator {
    pub fn add(&mut self, data: &[u8]) -> Result<(), TextError> {
        if self.data.len() + data.len() > MAX_TEXT {
            return Err(TextError::TooLong(self.data.len() + data.len()));
        }
        self.data.extend_from_slice(data);
        Ok(())
    }

    /// The text so far, which starts the next exchange afresh.
    pub fn take(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.data)
    }
}

/// A numerical value (RFC 7143 §6.1): decimal, or `0x` hexadecimal.
pub fn number(value: &str) -> Option<u64> {
    match value
        .strip_prefix("0x")
        .or_else(|| value.strip_prefix("0X"))
    {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
            value.parse().ok()
        }
        None => None,
    }
}

/// A binary value (RFC 7143 §6.1): `0x` hexadecimal or `0b` base64.
pub fn binary(value: &str) -> Option<Vec<u8>> {
    if let Some(hex) = value
        .strip_prefix("0x")
        .or_else(|| value.strip_prefix("0X"))
    {
        if hex.is_empty() {
            return None;
        }
        // An odd count means a leading zero nibble.
        let padded = if hex.len() % 2 == 1 {
            format!("0{hex}")
        } else {
            hex.to_owned()
        };
        return (0..padded.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&padded[i..i + 2], 16).ok())
            .collect();
    }
    let b64 = value
        .strip_prefix("0b")
        .or_else(|| value.strip_prefix("0B"))?;
    base64(b64)
}

/// `bytes` as a `0x` hexadecimal value.
pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(2 + 2 * bytes.len());
    s.push_str("0x");
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

fn base64(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let s = s.trim_end_matches('=');
    if s.is_empty() {
        return None;
    }
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes() {
        acc = acc << 6 | val(c)?;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_login_text_parses_and_encodes_back() {
        let text = b"InitiatorName=iqn.2010-04.org.ipxe:pc1\0SessionType=Normal\0\
                     AuthMethod=CHAP,None\0";
        let pairs = Pairs::parse(text).unwrap();
        assert_eq!(pairs.get("AuthMethod"), Some("CHAP,None"));
        assert_eq!(pairs.get("TargetName"), None);
        assert_eq!(pairs.to_bytes(), text.to_vec());
        // No last NUL, and NUL padding: the same pairs.
        let trimmed = &text[..text.len() - 1];
        assert_eq!(Pairs::parse(trimmed).unwrap(), pairs);
        let mut padded = text.to_vec();
        padded.extend_from_slice(&[0, 0, 0]);
        assert_eq!(Pairs::parse(&padded).unwrap(), pairs);
    }

    #[test]
    fn bad_text_gets_an_error_that_names_it() {
        assert_eq!(
            Pairs::parse(b"A=1\0A=2\0"),
            Err(TextError::Repeated("A".into()))
        );
        assert_eq!(
            Pairs::parse(b"NoEquals\0"),
            Err(TextError::NoValue("NoEquals".into()))
        );
        assert_eq!(
            Pairs::parse(b"bad key=1\0"),
            Err(TextError::BadKey("bad key".into()))
        );
        assert_eq!(Pairs::parse(b"=1\0"), Err(TextError::BadKey("".into())));
        assert_eq!(Pairs::parse(b"K=\xff\0"), Err(TextError::NotUtf8));
        let long = format!("CHAP_R=0x{}\0", "a".repeat(MAX_VALUE));
        assert_eq!(
            Pairs::parse(long.as_bytes()),
            Err(TextError::ValueTooLong("CHAP_R".into()))
        );
        // The 10,000-key login of the bad-input list.
        let many: String = (0..10_000).map(|i| format!("X{i}=1\0")).collect();
        assert!(matches!(
            Pairs::parse(many.as_bytes()),
            Err(TextError::TooLong(_))
        ));
        let many: String = (0..300).map(|i| format!("X{i}=1\0")).collect();
        assert_eq!(Pairs::parse(many.as_bytes()), Err(TextError::TooManyPairs));
        let mut acc = Accumulator::default();
        acc.add(&vec![b'a'; MAX_TEXT]).unwrap();
        assert!(acc.add(b"b").is_err());
    }

    #[test]
    fn numbers_and_binary_values() {
        assert_eq!(number("8192"), Some(8192));
        assert_eq!(number("0x2000"), Some(8192));
        assert_eq!(number("-1"), None);
        assert_eq!(number(""), None);
        assert_eq!(binary("0x0102ff"), Some(vec![1, 2, 255]));
        assert_eq!(binary("0x102"), Some(vec![1, 2]));
        assert_eq!(binary("0bAQL/"), Some(vec![1, 2, 255]));
        assert_eq!(binary("0bAQI="), Some(vec![1, 2]));
        assert_eq!(binary("0x"), None);
        assert_eq!(binary("0xzz"), None);
        assert_eq!(binary("plain"), None);
        assert_eq!(hex(&[1, 2, 255]), "0x0102ff");
    }
}
