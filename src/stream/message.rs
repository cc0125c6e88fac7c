//! What a tunnel's reliable frames carry, one message each, and their encoding:
//! `type: u8 | stream: u32 BE | body`.

/// A stream inside a tunnel: 0 is the terminal or the exec's stdin/stdout; 1 the exec's stderr;
/// a forward numbers its connections from 1.
pub type StreamId = u32;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Operator to device: a new stream to `target` (`host:port`), for a forward.
    Open { stream: StreamId, target: String },
    /// Bytes, within the stream's window.
    Data { stream: StreamId, bytes: Vec<u8> },
    /// The sender will send no more on this stream (stdin closed, a socket half-closed).
    Eof { stream: StreamId },
    /// The stream is over in both directions; `reason` empty when nothing went wrong.
    Close { stream: StreamId, reason: String },
    /// Operator to device: the terminal's new size.
    Resize { rows: u16, cols: u16 },
    /// Device to operator: the process ended with `code` (128+n for signal n).
    Exit { code: i32 },
    /// The tunnel is over; `reason` empty when nothing went wrong.
    End { reason: String },
    /// Device to operator: how a file transfer ended, as a JSON object (the sha256 of what a
    /// `get` sent, the outcome of a `put`), sent before End.
    Report { json: String },
}

const OPEN: u8 = 0;
const DATA: u8 = 1;
const EOF: u8 = 2;
const CLOSE: u8 = 3;
const RESIZE: u8 = 4;
const EXIT: u8 = 5;
const END: u8 = 6;
const REPORT: u8 = 7;

impl Message {
    pub fn encode(&self) -> Vec<u8> {
        let (kind, stream, body): (u8, StreamId, &[u8]) = match self {
            Message::Open { stream, target } => (OPEN, *stream, target.as_bytes()),
            Message::Data { stream, bytes } => (DATA, *stream, bytes),
            Message::Eof { stream } => (EOF, *stream, &[]),
            Message::Close { stream, reason } => (CLOSE, *stream, reason.as_bytes()),
            Message::Resize { rows, cols } => {
                let size = [rows.to_be_bytes(), cols.to_be_bytes()].concat();
                return frame(RESIZE, 0, &size);
            }
            Message::Exit { code } => return frame(EXIT, 0, &code.to_be_bytes()),
            Message::End { reason } => (END, 0, reason.as_bytes()),
            Message::Report { json } => (REPORT, 0, json.as_bytes()),
        };
        frame(kind, stream, body)
    }

    /// None for anything malformed: an authenticated peer sending it is broken, not hostile,
    /// and the frame is dropped.
    pub fn decode(bytes: &[u8]) -> Option<Message> {
        let (&kind, rest) = bytes.split_first()?;
        let stream = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?);
        let body = &rest[4..];
        let text = || String::from_utf8(body.to_vec()).ok();
        Some(match kind {
            OPEN => Message::Open { stream, target: text()? },
            DATA => Message::Data { stream, bytes: body.to_vec() },
            EOF => Message::Eof { stream },
            CLOSE => Message::Close { stream, reason: text()? },
            RESIZE if body.len() == 4 => Message::Resize {
                rows: u16::from_be_bytes([body[0], body[1]]),
                cols: u16::from_be_bytes([body[2], body[3]]),
            },
            EXIT if body.len() == 4 => Message::Exit { code: i32::from_be_bytes(body.try_into().ok()?) },
            END => Message::End { reason: text()? },
            REPORT => Message::Report { json: text()? },
            _ => return None,
        })
    }
}

fn frame(kind: u8, stream: StreamId, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + body.len());
    out.push(kind);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_message_survives_encoding() {
        let all = [
            Message::Open { stream: 3, target: "127.0.0.1:8080".into() },
            Message::Data { stream: 1, bytes: vec![0, 255, 10] },
            Message::Data { stream: 0, bytes: vec![] },
            Message::Eof { stream: 7 },
            Message::Close { stream: 2, reason: "connection refused".into() },
            Message::Resize { rows: 50, cols: 132 },
            Message::Exit { code: 130 },
            Message::End { reason: String::new() },
            Message::Report { json: r#"{"sha256":"00"}"#.into() },
        ];
        for message in all {
            assert_eq!(Message::decode(&message.encode()), Some(message));
        }
    }

    #[test]
    fn malformed_messages_are_none() {
        for bad in [&[][..], &[1, 0, 0], &[9, 0, 0, 0, 0], &[4, 0, 0, 0, 0, 1], &[3, 0, 0, 0, 0, 0xff]] {
            assert_eq!(Message::decode(bad), None, "{bad:?}");
        }
    }
}
