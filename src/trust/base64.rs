//! Standard base64 (RFC 4648 §4), as SSH keys, signatures and fingerprints use it. Decoding is
//! strict like OpenSSH's: padding only at the end and the bits it drops all zero, so one key or
//! signature has one text and a lookalike cannot slip past a comparison.

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// With `=` padding: key lines and armored signatures.
pub fn encode(bytes: &[u8]) -> String {
    encode_with(bytes, true)
}

/// Without padding: `SHA256:` fingerprints, as OpenSSH prints them.
pub fn encode_unpadded(bytes: &[u8]) -> String {
    encode_with(bytes, false)
}

fn encode_with(bytes: &[u8], pad: bool) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let group = chunk.iter().enumerate().fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(group >> (18 - 6 * i) & 63) as usize]));
            } else if pad {
                out.push('=');
            }
        }
    }
    out
}

/// Padded base64 without whitespace; `None` for anything else.
pub fn decode(text: &[u8]) -> Option<Vec<u8>> {
    if text.len() % 4 != 0 {
        return None;
    }
    let groups = text.len() / 4;
    let mut out = Vec::with_capacity(groups * 3);
    for (n, chunk) in text.chunks_exact(4).enumerate() {
        let pad = chunk.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && n + 1 < groups) {
            return None;
        }
        let mut group = 0u32;
        for &c in &chunk[..4 - pad] {
            group = group << 6 | u32::from(value(c)?);
        }
        let bytes = (group << (6 * pad)).to_be_bytes();
        let kept = 3 - pad;
        if bytes[1 + kept..].iter().any(|&b| b != 0) {
            return None;
        }
        out.extend_from_slice(&bytes[1..1 + kept]);
    }
    Some(out)
}

fn value(c: u8) -> Option<u8> {
    match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 4648 §10.
    const VECTORS: &[(&str, &str)] = &[
        ("", ""),
        ("f", "Zg=="),
        ("fo", "Zm8="),
        ("foo", "Zm9v"),
        ("foob", "Zm9vYg=="),
        ("fooba", "Zm9vYmE="),
        ("foobar", "Zm9vYmFy"),
    ];

    #[test]
    fn rfc_4648_vectors_both_ways() {
        for (plain, coded) in VECTORS {
            assert_eq!(encode(plain.as_bytes()), *coded);
            assert_eq!(encode_unpadded(plain.as_bytes()), coded.trim_end_matches('='));
            assert_eq!(decode(coded.as_bytes()).as_deref(), Some(plain.as_bytes()), "{coded}");
        }
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(decode(encode(&all).as_bytes()), Some(all));
    }

    #[test]
    fn anything_but_canonical_padded_base64_is_refused() {
        for bad in ["Zg", "Zg=", "Zh==", "Zm9=", "Z===", "Zg==Zg==", "Zm 9v", "Zm9v\n", "Zm-v", "=Zm9"] {
            assert_eq!(decode(bad.as_bytes()), None, "{bad:?}");
        }
    }
}
