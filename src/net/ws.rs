//! WebSocket framing of the MQTT byte stream, once tungstenite has done the handshake.
//!
//! Not tungstenite's `WebSocket` itself: it holds each incoming message whole in memory, up to
//! a size limit past which it fails the connection. A retained command bigger than that would
//! bring the link down again on every reconnect, keeping the device offline for good. Here a
//! binary payload streams straight into the MQTT decoder as it arrives, whatever its size, and
//! the decoder skips oversized packets on its own (as it does over plain TCP and TLS).

use bytes::{BufMut, BytesMut};
use std::io::{self, Cursor};
use tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

/// Control frames carry at most this much (RFC 6455, 5.5).
const MAX_CONTROL_PAYLOAD: u64 = 125;
/// The longest frame header: 2 bytes, a 64-bit length, a mask.
const MAX_HEADER: usize = 14;

/// What the bytes of the frame being read are for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// MQTT bytes (binary message).
    Mqtt,
    /// Not MQTT (a text message, an unsolicited pong): dropped.
    Ignored,
    Ping,
    Close,
}

struct Frame {
    kind: Kind,
    remaining: u64,
    mask: Option<[u8; 4]>,
    /// Payload bytes read so far: where the mask stands.
    offset: usize,
    /// The payload of a control frame (at most 125 bytes).
    control: Vec<u8>,
}

/// Turns the bytes a broker sends into MQTT bytes, answering pings on the way.
#[derive(Default)]
pub struct Deframer {
    /// The start of a frame header that the last read cut (under `MAX_HEADER` bytes): the
    /// rest of the bytes are taken where they were read, never copied here.
    pending: Vec<u8>,
    frame: Option<Frame>,
    /// The kind of the fragmented message under way, for its continuation frames.
    message: Option<Kind>,
}

/// What the broker's bytes held besides MQTT bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    Open,
    /// The broker sent a close frame.
    Closed,
}

impl Deframer {
    /// Appends the MQTT bytes in `input` to `mqtt` (unmasking them in place, if masked); a
    /// pong for each ping goes to `out`.
    pub fn decode(
        &mut self,
        input: &mut [u8],
        mqtt: &mut BytesMut,
        out: &mut BytesMut,
    ) -> io::Result<Decoded> {
        let mut pos = 0;
        if !self.pending.is_empty() {
            // The header the last read cut, completed from the front of this one.
            let before = self.pending.len();
            let taken = input.len().min(MAX_HEADER - before);
            self.pending.extend_from_slice(&input[..taken]);
            let mut cursor = Cursor::new(&self.pending[..]);
            match FrameHeader::parse(&mut cursor) {
                Ok(None) if taken == input.len() => return Ok(Decoded::Open),
                Ok(None) => return Err(protocol_error("a frame header longer than 14 bytes")),
                Ok(Some((header, len))) => {
                    pos = cursor.position() as usize - before;
                    self.pending.clear();
                    self.frame = Some(self.start(&header, len)?);
                }
                Err(e) => return Err(protocol_error(&e.to_string())),
            }
        }
        loop {
            if let Some(frame) = &mut self.frame {
                let n = frame.remaining.min((input.len() - pos) as u64) as usize;
                let bytes = &mut input[pos..pos + n];
                if let Some(mask) = frame.mask {
                    apply_mask(bytes, mask, frame.offset);
                }
                match frame.kind {
                    Kind::Mqtt => mqtt.extend_from_slice(bytes),
                    Kind::Ping | Kind::Close => frame.control.extend_from_slice(bytes),
                    Kind::Ignored => {}
                }
                frame.offset += n;
                frame.remaining -= n as u64;
                pos += n;
                if frame.remaining > 0 {
                    break Ok(Decoded::Open);
                }
                match self.frame.take().map(|f| (f.kind, f.control)) {
                    Some((Kind::Ping, payload)) => encode(OpCode::Control(Control::Pong), &payload, out),
                    Some((Kind::Close, _)) => break Ok(Decoded::Closed),
                    _ => {}
                }
                continue;
            }
            let mut cursor = Cursor::new(&input[pos..]);
            match FrameHeader::parse(&mut cursor) {
                Ok(None) => {
                    self.pending.extend_from_slice(&input[pos..]);
                    break Ok(Decoded::Open);
                }
                Ok(Some((header, len))) => {
                    pos += cursor.position() as usize;
                    match self.start(&header, len) {
                        Ok(frame) => self.frame = Some(frame),
                        Err(e) => break Err(e),
                    }
                }
                Err(e) => break Err(protocol_error(&e.to_string())),
            }
        }
    }

    fn start(&mut self, header: &FrameHeader, len: u64) -> io::Result<Frame> {
        if header.rsv1 || header.rsv2 || header.rsv3 {
            return Err(protocol_error("reserved bits set (no extension was negotiated)"));
        }
        let kind = match header.opcode {
            OpCode::Data(data) => {
                let kind = match data {
                    Data::Binary if self.message.is_none() => Kind::Mqtt,
                    Data::Text if self.message.is_none() => Kind::Ignored,
                    Data::Continue => {
                        self.message.ok_or_else(|| protocol_error("stray continuation frame"))?
                    }
                    _ => return Err(protocol_error(&format!("unexpected data frame {data}"))),
                };
                self.message = if header.is_final { None } else { Some(kind) };
                kind
            }
            OpCode::Control(control) => {
                if !header.is_final || len > MAX_CONTROL_PAYLOAD {
                    return Err(protocol_error("fragmented or oversized control frame"));
                }
                match control {
                    Control::Ping => Kind::Ping,
                    Control::Close => Kind::Close,
                    Control::Pong => Kind::Ignored,
                    Control::Reserved(op) => {
                        return Err(protocol_error(&format!("unknown control frame {op}")))
                    }
                }
            }
        };
        Ok(Frame { kind, remaining: len, mask: header.mask, offset: 0, control: Vec::new() })
    }
}

/// Appends `mqtt` to `out` as one binary frame, masked as a client must.
pub fn encode_mqtt(mqtt: &[u8], out: &mut BytesMut) {
    encode(OpCode::Data(Data::Binary), mqtt, out);
}

fn encode(opcode: OpCode, payload: &[u8], out: &mut BytesMut) {
    let mask = random_mask();
    let header = FrameHeader { opcode, mask: Some(mask), ..FrameHeader::default() };
    // Writing into memory cannot fail.
    let _ = header.format(payload.len() as u64, &mut (&mut *out).writer());
    let start = out.len();
    out.extend_from_slice(payload);
    apply_mask(&mut out[start..], mask, 0);
}

fn random_mask() -> [u8; 4] {
    let mut mask = [0u8; 4];
    crate::random::fill(&mut mask);
    mask
}

/// XORs `bytes`, which start `offset` bytes into a payload, with the frame's mask: a machine
/// word at a time (byte by byte, the mask took a tenth of the agent's CPU sending a file; words
/// copied in and out of the bytes call memcpy at this opt-level, which costs more still).
fn apply_mask(bytes: &mut [u8], mask: [u8; 4], offset: usize) {
    const WORD: usize = std::mem::size_of::<usize>();
    let at = |i: usize| mask[(offset + i) % 4];
    // SAFETY: every bit pattern is a valid usize, and a valid u8 for each of its bytes.
    let (head, words, tail) = unsafe { bytes.align_to_mut::<usize>() };
    head.iter_mut().enumerate().for_each(|(i, byte)| *byte ^= at(i));
    // A word is a whole number of masks: the one it starts with fits every word.
    let mut first = [0u8; WORD];
    first.iter_mut().enumerate().for_each(|(i, byte)| *byte = at(head.len() + i));
    let word = usize::from_ne_bytes(first);
    words.iter_mut().for_each(|w| *w ^= word);
    let done = head.len() + words.len() * WORD;
    tail.iter_mut().enumerate().for_each(|(i, byte)| *byte ^= at(done + i));
}

fn protocol_error(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("WebSocket: {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame as a broker sends it (unmasked), or masked with `mask`.
    fn frame(first: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
        let mut bytes = vec![first];
        let mask_bit = if mask.is_some() { 0x80 } else { 0 };
        match payload.len() {
            n @ 0..=125 => bytes.push(mask_bit | n as u8),
            n @ 126..=65535 => {
                bytes.push(mask_bit | 126);
                bytes.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                bytes.push(mask_bit | 127);
                bytes.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        let start = bytes.len() + mask.map_or(0, |_| 4);
        bytes.extend(mask.into_iter().flatten());
        bytes.extend_from_slice(payload);
        if let Some(mask) = mask {
            apply_mask(&mut bytes[start..], mask, 0);
        }
        bytes
    }

    /// Feeds `input` in pieces of `step` bytes; returns the MQTT bytes, what was sent back, and
    /// how it ended.
    fn feed(input: &[u8], step: usize) -> (Vec<u8>, Vec<u8>, io::Result<Decoded>) {
        let (mut deframer, mut mqtt, mut out) = (Deframer::default(), BytesMut::new(), BytesMut::new());
        let mut last = Ok(Decoded::Open);
        for piece in input.chunks(step) {
            last = deframer.decode(&mut piece.to_vec(), &mut mqtt, &mut out);
            if !matches!(last, Ok(Decoded::Open)) {
                break;
            }
        }
        (mqtt.to_vec(), out.to_vec(), last)
    }

    /// Whatever the bytes' alignment in memory, their length and where the mask stands.
    #[test]
    fn the_mask_applies_byte_for_byte() {
        let mask = [0x12, 0x34, 0x56, 0x78];
        let payload: Vec<u8> = (0..64u8).collect();
        for start in 0..8 {
            for len in 0..payload.len() - start {
                for offset in 0..4 {
                    let mut bytes = payload.clone();
                    apply_mask(&mut bytes[start..start + len], mask, offset);
                    let masked = |i: usize| (start..start + len).contains(&i);
                    let want: Vec<u8> =
                        (0..payload.len())
                            .map(|i| {
                                if masked(i) {
                                    payload[i] ^ mask[(offset + i - start) % 4]
                                } else {
                                    payload[i]
                                }
                            })
                            .collect();
                    assert_eq!(bytes, want, "from byte {start}, {len} bytes, mask offset {offset}");
                }
            }
        }
    }

    #[test]
    fn binary_frames_stream_whatever_the_split() {
        let big: Vec<u8> = (0..70_000u32).map(|i| i as u8).collect();
        let mut input = frame(0x82, b"hello", None);
        input.extend(frame(0x82, &big, None));
        input.extend(frame(0x82, b"", None));
        input.extend(frame(0x82, b"masked", Some([1, 2, 3, 4])));
        let mut want = b"hello".to_vec();
        want.extend(&big);
        want.extend(b"masked");
        for step in [1, 3, 7, 4096, input.len()] {
            let (mqtt, out, end) = feed(&input, step);
            assert!(mqtt == want, "step {step}: wrong MQTT bytes ({} of {})", mqtt.len(), want.len());
            assert!(out.is_empty() && matches!(end, Ok(Decoded::Open)), "step {step}");
        }
    }

    #[test]
    fn fragments_pings_text_and_close() {
        let mut input = frame(0x02, b"frag", None); // binary, not final
        input.extend(frame(0x89, b"are you there", None)); // ping between fragments
        input.extend(frame(0x80, b"mented", None)); // final continuation
        input.extend(frame(0x81, b"not mqtt", None)); // text: dropped
        input.extend(frame(0x8A, b"", None)); // unsolicited pong: dropped
        input.extend(frame(0x88, &[0x03, 0xE8], None)); // close
        input.extend(frame(0x82, b"after close", None));
        for step in [1, 5, input.len()] {
            let (mqtt, out, end) = feed(&input, step);
            assert_eq!(mqtt, b"fragmented", "step {step}");
            assert!(matches!(end, Ok(Decoded::Closed)), "step {step}: {end:?}");
            // The pong: final, opcode 0xA, masked, 13 bytes, the ping's payload once unmasked.
            assert_eq!(&out[..2], &[0x8A, 0x80 | 13]);
            let mask = [out[2], out[3], out[4], out[5]];
            let mut payload = out[6..].to_vec();
            apply_mask(&mut payload, mask, 0);
            assert_eq!(payload, b"are you there");
        }
    }

    #[test]
    fn protocol_violations_are_errors() {
        let oversized_ping = frame(0x89, &[0; 126], None);
        let stray_continuation = frame(0x80, b"x", None);
        let reserved_bits = frame(0xC2, b"x", None);
        let unknown_control = frame(0x8B, b"", None);
        let binary_inside_fragments = [frame(0x02, b"a", None), frame(0x82, b"b", None)].concat();
        for input in
            [oversized_ping, stray_continuation, reserved_bits, unknown_control, binary_inside_fragments]
        {
            let (_, _, end) = feed(&input, input.len());
            let err = end.expect_err("a protocol violation");
            assert!(err.to_string().starts_with("WebSocket: "), "{err}");
        }
    }

    #[test]
    fn encoded_frames_decode_back() {
        let mut out = BytesMut::new();
        encode_mqtt(b"\x30\x03abc", &mut out);
        assert_eq!(out[0], 0x82, "final binary frame");
        assert_eq!(out[1] & 0x80, 0x80, "a client's frames are masked");
        let (mqtt, _, end) = feed(&out, out.len());
        assert_eq!(mqtt, b"\x30\x03abc");
        assert!(matches!(end, Ok(Decoded::Open)));
    }

    #[test]
    fn a_frame_of_any_size_streams_through_a_small_buffer() {
        // A header claiming 1 TiB, then 1 MiB of it in reads of 4 KiB.
        let mut header = vec![0x82, 127];
        header.extend_from_slice(&(1u64 << 40).to_be_bytes());
        let (mut deframer, mut mqtt, mut out) = (Deframer::default(), BytesMut::new(), BytesMut::new());
        deframer.decode(&mut header, &mut mqtt, &mut out).unwrap();
        for _ in 0..256 {
            assert_eq!(deframer.decode(&mut [7u8; 4096], &mut mqtt, &mut out).unwrap(), Decoded::Open);
            assert!(deframer.pending.capacity() <= 2 * MAX_HEADER, "{}", deframer.pending.capacity());
            mqtt.clear();
        }
        assert_eq!(deframer.frame.as_ref().map(|f| f.remaining), Some((1 << 40) - (1 << 20)));
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut seed = 0x1234_5678_9abc_def0u64;
        for _ in 0..2000 {
            let len = (seed % 64) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            let _ = feed(&bytes, 1 + (seed % 8) as usize);
        }
    }
}
