//! SSH's wire encoding (RFC 4251 §5) of keys, signatures and agent messages. The reader takes
//! untrusted bytes: every read is bounds-checked and says `None` rather than panic.

pub struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Reader<'a> {
        Reader { rest: bytes }
    }

    pub fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let (taken, rest) = self.rest.split_at_checked(n)?;
        self.rest = rest;
        Some(taken)
    }

    pub fn u32(&mut self) -> Option<u32> {
        let bytes = self.bytes(4)?;
        Some(u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    pub fn string(&mut self) -> Option<&'a [u8]> {
        let len = self.u32()?;
        self.bytes(usize::try_from(len).ok()?)
    }

    /// A non-negative mpint's magnitude, big-endian without leading zeros (empty for zero);
    /// `None` for a negative one, which no key or signature has.
    pub fn positive_mpint(&mut self) -> Option<&'a [u8]> {
        let bytes = self.string()?;
        if bytes.first().is_some_and(|&b| b & 0x80 != 0) {
            return None;
        }
        let zeros = bytes.iter().take_while(|&&b| b == 0).count();
        Some(&bytes[zeros..])
    }

    /// `Some(())` when every byte was read: trailing bytes make a message malformed, so that
    /// one message cannot be read two ways.
    pub fn end(&self) -> Option<()> {
        self.rest.is_empty().then_some(())
    }
}

pub fn put_u32(out: &mut Vec<u8>, n: u32) {
    out.extend_from_slice(&n.to_be_bytes());
}

/// Every string written here is far below 4 GiB (keys, signatures, hashes, a 64 KiB request).
pub fn put_string(out: &mut Vec<u8>, bytes: &[u8]) {
    put_u32(out, bytes.len() as u32);
    out.extend_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_stop_at_the_end_instead_of_panicking() {
        let mut out = Vec::new();
        put_string(&mut out, b"ssh-ed25519");
        put_u32(&mut out, 7);
        let mut r = Reader::new(&out);
        assert_eq!(r.string(), Some(&b"ssh-ed25519"[..]));
        assert_eq!(r.end(), None);
        assert_eq!(r.u32(), Some(7));
        assert_eq!((r.u32(), r.string(), r.end()), (None, None, Some(())));
        assert_eq!(Reader::new(&[0, 0, 0, 9, 1]).string(), None);
        assert_eq!(Reader::new(&[0xff, 0xff, 0xff, 0xff]).string(), None);
    }

    #[test]
    fn mpints_lose_their_leading_zeros_and_negative_ones_are_refused() {
        assert_eq!(Reader::new(&[0, 0, 0, 3, 0, 0x80, 1]).positive_mpint(), Some(&[0x80, 1][..]));
        assert_eq!(Reader::new(&[0, 0, 0, 0]).positive_mpint(), Some(&[][..]));
        assert_eq!(Reader::new(&[0, 0, 0, 1, 0x80]).positive_mpint(), None);
    }
}
