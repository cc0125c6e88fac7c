//! One tunnel's state, without I/O: sequence numbers, acknowledgements, resending, windows.
//!
//! Frames (docs/protocol.md, "Frames"): `kind: u8 | counter: u64 BE | sealed body`. A reliable
//! frame (kind 0) carries one `Message` and its counter is its sequence number; the receiver
//! takes them strictly in order. An ack frame (kind 1) carries `next expected seq: u64 | flags:
//! u8 | (stream: u32, consumed: u64)*`: the cumulative acknowledgement and, per stream, the
//! bytes delivered so far, which move the sender's window. Ack frames are never resent; each
//! carries the whole truth, so a lost one is replaced by the next.
//!
//! Loss (a broker dropping messages, either side reconnecting) is repaired go-back-N: the
//! sender keeps every frame until acknowledged, and resends from the first unacknowledged one
//! when the receiver reports a gap or a reconnect, or when no acknowledgement came for a while.
//! A frame that fails authentication, or comes again, changes nothing.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use super::crypto::Keys;
use super::message::{Message, StreamId};

/// Bytes of data per frame at most. A frame's MQTT packet stays under 4 KiB: Mosquitto 2.0's
/// WebSockets send bigger packets to a client at a few per second (docs/brokers.md), and it
/// keeps a frame within the connection's share for bulk data, so that a frame never crowds out
/// a heartbeat. Framing costs about 3 %.
pub const MAX_DATA: usize = 3584;

const RELIABLE: u8 = 0;
const ACK: u8 = 1;
/// Ack flag: the receiver lost frames (a gap, or its connection dropped); resend from `ack`.
const RESEND: u8 = 1;

/// How long an acknowledgement may wait for company: keystrokes and their echo are not held
/// up (the data goes at once; only the ack waits), and a stream of frames is acked in batches.
const ACK_DELAY: Duration = Duration::from_millis(10);
/// Resend requests at most this often: after a gap, every frame that follows shows it.
const RESEND_REQUEST_GAP: Duration = Duration::from_millis(200);
const MIN_RTO: Duration = Duration::from_secs(2);
const MAX_RTO: Duration = Duration::from_secs(30);

/// Why a frame changed nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejected {
    /// It did not authenticate: not sealed by the peer, or altered on the way.
    BadTag,
    /// A frame already taken (a resend, or a replay).
    Replayed,
    /// Frames before it are missing; the peer is asked to resend them.
    Gap,
    /// Authentic but not understood: a broken peer.
    Malformed,
    /// The peer sent more on `stream` than its window allows: the stream must be closed.
    OverWindow(StreamId),
}

/// One stream's accounting, both ways.
#[derive(Default)]
struct Flow {
    /// Data bytes sent, and how many of them the peer has delivered.
    sent: u64,
    peer_consumed: u64,
    /// Data bytes received, delivered by our owner, and the delivered count last told.
    received: u64,
    consumed: u64,
    consumed_told: u64,
}

pub struct Tunnel {
    keys: Keys,
    /// Bytes each stream may have in flight towards the peer, and from it.
    peer_window: u64,
    window: u64,
    next_seq: u64,
    /// Sealed reliable frames not acknowledged yet.
    unacked: Unacked,
    /// The next sequence number to transmit; moved back to resend.
    send_from: u64,
    rto: Duration,
    rto_at: Option<Instant>,
    ack_counter: u64,
    /// The next sequence number expected from the peer.
    expected: u64,
    peer_ack_counter: Option<u64>,
    ack_due: Option<Instant>,
    resend_wanted: bool,
    resend_asked_at: Option<Instant>,
    flows: BTreeMap<StreamId, Flow>,
    last_heard: Instant,
    /// When the peer's last message (a reliable frame) was taken: acks alone are no activity.
    last_message: Instant,
}

impl Tunnel {
    pub fn new(keys: Keys, window: u32, peer_window: u32, now: Instant) -> Tunnel {
        Tunnel {
            keys,
            peer_window: peer_window.into(),
            window: window.into(),
            next_seq: 0,
            unacked: Unacked::default(),
            send_from: 0,
            rto: MIN_RTO,
            rto_at: None,
            ack_counter: 0,
            expected: 0,
            peer_ack_counter: None,
            ack_due: None,
            resend_wanted: false,
            resend_asked_at: None,
            flows: BTreeMap::new(),
            last_heard: now,
            last_message: now,
        }
    }

    /// Bytes of data `stream` may send now.
    pub fn room(&self, stream: StreamId) -> usize {
        let in_flight = self.flows.get(&stream).map_or(0, |f| f.sent - f.peer_consumed);
        self.peer_window.saturating_sub(in_flight) as usize
    }

    /// Queues as much of `bytes` as the stream's window takes now; returns how much.
    pub fn send_data(&mut self, stream: StreamId, bytes: &[u8]) -> usize {
        let taken = bytes.len().min(self.room(stream));
        for chunk in bytes[..taken].chunks(MAX_DATA) {
            self.send(Message::Data { stream, bytes: chunk.to_vec() });
        }
        taken
    }

    /// Queues a message (data should go through `send_data`, which keeps to the window).
    pub fn send(&mut self, message: Message) {
        if let Message::Data { stream, bytes } = &message {
            self.flows.entry(*stream).or_default().sent += bytes.len() as u64;
        }
        let start = self.unacked.bytes.len();
        self.keys.seal_into(header(RELIABLE, self.next_seq), &message.encode(), &mut self.unacked.bytes);
        self.unacked.frames.push_back((self.next_seq, start, self.unacked.bytes.len() - start));
        self.next_seq += 1;
    }

    /// A frame from the peer: the message it carries (None for an ack frame), or why it was
    /// ignored.
    pub fn receive(&mut self, frame: &[u8], now: Instant) -> Result<Option<Message>, Rejected> {
        let plain = self.keys.open(frame).ok_or(Rejected::BadTag)?;
        let counter = u64::from_be_bytes(frame[1..9].try_into().map_err(|_| Rejected::Malformed)?);
        match frame[0] {
            RELIABLE => self.receive_reliable(counter, &plain, now),
            ACK => self.receive_ack(counter, &plain, now).map(|()| None),
            _ => Err(Rejected::Malformed),
        }
    }

    fn receive_reliable(
        &mut self,
        seq: u64,
        plain: &[u8],
        now: Instant,
    ) -> Result<Option<Message>, Rejected> {
        if seq < self.expected {
            self.ack_soon(now); // the peer resent it: it has not seen our ack
            return Err(Rejected::Replayed);
        }
        if seq > self.expected {
            self.resend_wanted = true;
            return Err(Rejected::Gap);
        }
        let message = Message::decode(plain).ok_or(Rejected::Malformed)?;
        self.expected += 1;
        self.last_heard = now;
        self.last_message = now;
        self.ack_soon(now);
        if let Message::Data { stream, bytes } = &message {
            let flow = self.flows.entry(*stream).or_default();
            flow.received += bytes.len() as u64;
            if flow.received > flow.consumed_told + self.window {
                return Err(Rejected::OverWindow(*stream));
            }
        }
        Ok(Some(message))
    }

    fn receive_ack(&mut self, counter: u64, plain: &[u8], now: Instant) -> Result<(), Rejected> {
        if self.peer_ack_counter.is_some_and(|last| counter <= last) {
            return Err(Rejected::Replayed);
        }
        let ack = u64::from_be_bytes(plain.get(..8).ok_or(Rejected::Malformed)?.try_into().unwrap());
        let flags = *plain.get(8).ok_or(Rejected::Malformed)?;
        let credits = &plain[9..];
        if ack > self.next_seq || credits.len() % 12 != 0 {
            return Err(Rejected::Malformed);
        }
        self.peer_ack_counter = Some(counter);
        self.last_heard = now;
        for credit in credits.chunks(12) {
            let stream = u32::from_be_bytes(credit[..4].try_into().unwrap());
            let consumed = u64::from_be_bytes(credit[4..].try_into().unwrap());
            if let Some(flow) = self.flows.get_mut(&stream) {
                flow.peer_consumed = flow.peer_consumed.max(consumed.min(flow.sent));
            }
        }
        self.acknowledged(ack, now);
        if flags & RESEND != 0 {
            self.send_from = ack;
        }
        Ok(())
    }

    /// Frames before `ack` arrived: forget them.
    fn acknowledged(&mut self, ack: u64, now: Instant) {
        let popped = self.unacked.forget_before(ack);
        self.send_from = self.send_from.max(ack);
        if popped {
            self.rto = MIN_RTO;
            self.rto_at = (!self.unacked.is_empty()).then(|| now + self.rto);
        }
    }

    /// The owner delivered `n` bytes of `stream`'s data (wrote them to the terminal, the socket):
    /// the peer may send that much more.
    pub fn consumed(&mut self, stream: StreamId, n: usize, now: Instant) {
        let Some(flow) = self.flows.get_mut(&stream) else { return };
        flow.consumed = (flow.consumed + n as u64).min(flow.received);
        self.ack_soon(now);
    }

    /// The stream is closed: its accounting goes.
    pub fn forget(&mut self, stream: StreamId) {
        self.flows.remove(&stream);
    }

    /// Streams it keeps accounts of.
    #[cfg(test)]
    fn streams(&self) -> usize {
        self.flows.len()
    }

    /// After the owner's connection to the broker came back: frames may have been lost both
    /// ways, so everything unacknowledged goes again and the peer is asked to do the same.
    pub fn on_reconnect(&mut self) {
        self.rewind();
        self.ask_resend();
    }

    /// Frames from the peer may have been dropped before this side could take them: the peer is
    /// asked at once to send again everything not acknowledged (rather than after its timeout).
    pub fn ask_resend(&mut self) {
        self.resend_wanted = true;
        self.resend_asked_at = None;
    }

    /// The next frame to publish, if any is due: an acknowledgement first (it opens windows),
    /// then frames not sent or to be sent again.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Vec<u8>> {
        if self.ack_is_due(now) {
            return Some(self.ack_frame(now));
        }
        let frame = self.unacked.get(self.send_from)?.to_vec();
        self.send_from += 1;
        self.rto_at.get_or_insert(now + self.rto);
        Some(frame)
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        let resend_ask = self.resend_wanted.then(|| self.resend_ask_at());
        [self.ack_due, self.rto_at, resend_ask].into_iter().flatten().min()
    }

    /// No acknowledgement for a while: the frames sent since may be lost.
    pub fn on_timer(&mut self, now: Instant) {
        if self.rto_at.is_some_and(|at| at <= now) {
            self.rewind();
            self.rto = (self.rto * 2).min(MAX_RTO);
            self.rto_at = (!self.unacked.is_empty()).then(|| now + self.rto);
        }
    }

    /// When a frame from the peer last authenticated.
    pub fn last_heard(&self) -> Instant {
        self.last_heard
    }

    /// When a message (not an ack) from the peer was last taken.
    pub fn last_message(&self) -> Instant {
        self.last_message
    }

    /// Sends an ack now, even with nothing new to acknowledge: a probe whose only answer is
    /// the peer saying it does not know the tunnel (an empty payload, docs/protocol.md).
    pub fn probe(&mut self, now: Instant) {
        self.ack_due = Some(now);
    }

    /// Frames queued and not transmitted yet (resends included).
    pub fn unsent(&self) -> usize {
        (self.next_seq - self.send_from) as usize
    }

    /// Everything queued has been acknowledged.
    pub fn all_acked(&self) -> bool {
        self.unacked.is_empty()
    }

    /// Frames from the peer await our acknowledgement (or a resend request is to go): a side
    /// that leaves before sending it keeps the peer waiting for it.
    pub fn owes_ack(&self) -> bool {
        self.ack_due.is_some() || self.resend_wanted
    }

    fn rewind(&mut self) {
        self.send_from = self.unacked.frames.front().map_or(self.next_seq, |&(seq, _, _)| seq);
    }

    fn ack_soon(&mut self, now: Instant) {
        self.ack_due.get_or_insert(now + ACK_DELAY);
    }

    fn resend_ask_at(&self) -> Instant {
        self.resend_asked_at.map_or(self.last_heard, |at| at + RESEND_REQUEST_GAP)
    }

    fn ack_is_due(&self, now: Instant) -> bool {
        let big_credit = self.flows.values().any(|f| f.consumed - f.consumed_told >= self.window / 4);
        big_credit
            || self.ack_due.is_some_and(|at| at <= now)
            || (self.resend_wanted && self.resend_ask_at() <= now)
    }

    fn ack_frame(&mut self, now: Instant) -> Vec<u8> {
        let mut plain = Vec::with_capacity(9 + 12 * self.flows.len());
        plain.extend_from_slice(&self.expected.to_be_bytes());
        plain.push(if self.resend_wanted { RESEND } else { 0 });
        for (stream, flow) in &mut self.flows {
            if flow.consumed > flow.consumed_told || self.resend_wanted {
                plain.extend_from_slice(&stream.to_be_bytes());
                plain.extend_from_slice(&flow.consumed.to_be_bytes());
                flow.consumed_told = flow.consumed;
            }
        }
        if self.resend_wanted {
            self.resend_asked_at = Some(now);
            self.resend_wanted = false;
        }
        self.ack_due = None;
        let frame = self.keys.seal(header(ACK, self.ack_counter), &plain);
        self.ack_counter += 1;
        frame
    }
}

/// Sealed frames kept for resending, in one buffer: a window's worth of frames held one by one
/// (each under a page) would stay with the allocator's small blocks once the tunnel is idle; a
/// buffer of a page or more gets pages of its own (`memory`), given back when it goes.
#[derive(Default)]
struct Unacked {
    bytes: Vec<u8>,
    /// (seq, start in `bytes`, length), oldest first; the seqs follow each other.
    frames: VecDeque<(u64, usize, usize)>,
}

impl Unacked {
    fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    fn get(&self, seq: u64) -> Option<&[u8]> {
        let first = self.frames.front()?.0;
        let &(_, start, len) = self.frames.get(usize::try_from(seq.checked_sub(first)?).ok()?)?;
        Some(&self.bytes[start..start + len])
    }

    /// Drops the frames before `ack`; whether any went.
    fn forget_before(&mut self, ack: u64) -> bool {
        let before = self.frames.len();
        while self.frames.front().is_some_and(|&(seq, _, _)| seq < ack) {
            self.frames.pop_front();
        }
        match self.frames.front() {
            None => self.bytes = Vec::new(),
            // Once the dead front is most of the buffer, the live part moves down.
            Some(&(_, cut, _)) if cut > self.bytes.len() / 2 => {
                self.bytes.drain(..cut);
                self.frames.iter_mut().for_each(|frame| frame.1 -= cut);
            }
            Some(_) => {}
        }
        self.frames.len() < before
    }
}

fn header(kind: u8, counter: u64) -> [u8; 9] {
    let mut header = [0u8; 9];
    header[0] = kind;
    header[1..].copy_from_slice(&counter.to_be_bytes());
    header
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::{Handshake, Role};

    const WINDOW: u32 = 64 * 1024;

    fn pair() -> (Tunnel, Tunnel, Instant) {
        let operator = Handshake::new().unwrap();
        let device = Handshake::new().unwrap();
        let (op_pub, dev_pub) = (*operator.public(), *device.public());
        let now = Instant::now();
        let op = operator.finish(Role::Operator, &dev_pub, b"request").unwrap();
        let dev = device.finish(Role::Device, &op_pub, b"request").unwrap();
        (Tunnel::new(op, WINDOW, WINDOW, now), Tunnel::new(dev, WINDOW, WINDOW, now), now)
    }

    /// Moves every due frame from `from` to `to`, returning the messages delivered.
    fn deliver(from: &mut Tunnel, to: &mut Tunnel, now: Instant) -> Vec<Message> {
        let mut out = Vec::new();
        while let Some(frame) = from.poll_transmit(now) {
            if let Ok(Some(message)) = to.receive(&frame, now) {
                out.push(message);
            }
        }
        out
    }

    fn data(stream: StreamId, bytes: &[u8]) -> Message {
        Message::Data { stream, bytes: bytes.to_vec() }
    }

    #[test]
    fn messages_arrive_in_order_and_acks_free_the_sender() {
        let (mut op, mut dev, now) = pair();
        op.send_data(0, b"ls\n");
        op.send(Message::Resize { rows: 40, cols: 100 });
        assert_eq!(
            deliver(&mut op, &mut dev, now),
            [data(0, b"ls\n"), Message::Resize { rows: 40, cols: 100 }]
        );
        assert!(!op.all_acked());
        assert!(dev.poll_transmit(now).is_none(), "the ack waits a little for company");
        let later = now + ACK_DELAY;
        deliver(&mut dev, &mut op, later);
        assert!(op.all_acked());
    }

    #[test]
    fn data_for_streams_without_an_end_leaves_no_accounts_behind() {
        let (mut op, mut dev, now) = pair();
        let poll = mio::Poll::new().unwrap();
        let mut endpoints = crate::stream::endpoint::Endpoints::new();
        for stream in 0..1000 {
            op.send_data(stream, b"x");
        }
        for message in deliver(&mut op, &mut dev, now) {
            let Message::Data { stream, bytes } = message else { panic!("{message:?}") };
            let delivered = crate::stream::endpoint::deliver(
                &mut endpoints,
                &mut dev,
                stream,
                &bytes,
                poll.registry(),
                now,
            );
            assert!(delivered.is_ok());
        }
        assert_eq!(dev.streams(), 0);
    }

    #[test]
    fn a_stream_stops_at_its_window_until_the_peer_consumes() {
        let (mut op, mut dev, now) = pair();
        let big = vec![7u8; WINDOW as usize + 1000];
        assert_eq!(op.send_data(1, &big), WINDOW as usize);
        assert_eq!(op.room(1), 0);
        assert_eq!(op.room(2), WINDOW as usize, "windows are per stream");
        let got: usize = deliver(&mut op, &mut dev, now)
            .iter()
            .map(|m| match m {
                Message::Data { bytes, .. } => bytes.len(),
                _ => 0,
            })
            .sum();
        assert_eq!(got, WINDOW as usize);
        deliver(&mut dev, &mut op, now + ACK_DELAY);
        assert_eq!(op.room(1), 0, "received is not consumed");
        dev.consumed(1, 1000, now);
        deliver(&mut dev, &mut op, now + 2 * ACK_DELAY);
        assert_eq!(op.room(1), 1000, "a small credit goes out with the delayed ack");
        dev.consumed(1, WINDOW as usize / 2, now);
        deliver(&mut dev, &mut op, now + 2 * ACK_DELAY);
        assert_eq!(op.room(1), 1000 + WINDOW as usize / 2, "a big credit goes at once");
    }

    #[test]
    fn a_peer_over_its_window_is_caught() {
        let (mut op, mut dev, now) = pair();
        op.send(data(3, &vec![0; WINDOW as usize]));
        op.send(data(3, b"x"));
        let first = op.poll_transmit(now).unwrap();
        assert!(dev.receive(&first, now).is_ok());
        let second = op.poll_transmit(now).unwrap();
        assert_eq!(dev.receive(&second, now), Err(Rejected::OverWindow(3)));
    }

    #[test]
    fn forged_replayed_and_reordered_frames_change_nothing() {
        let (mut op, mut dev, now) = pair();
        op.send_data(0, b"a");
        op.send_data(0, b"b");
        let a = op.poll_transmit(now).unwrap();
        let b = op.poll_transmit(now).unwrap();
        let mut forged = a.clone();
        forged[12] ^= 0x20;
        assert_eq!(dev.receive(&forged, now), Err(Rejected::BadTag));
        let (mut stranger, _, _) = pair();
        stranger.send_data(0, b"rm -rf /\n");
        assert_eq!(dev.receive(&stranger.poll_transmit(now).unwrap(), now), Err(Rejected::BadTag));
        assert_eq!(dev.receive(&b, now), Err(Rejected::Gap));
        assert_eq!(dev.receive(&a, now), Ok(Some(data(0, b"a"))));
        assert_eq!(dev.receive(&a, now), Err(Rejected::Replayed));
        assert_eq!(dev.receive(&b, now), Ok(Some(data(0, b"b"))));
    }

    #[test]
    fn a_gap_is_repaired_by_resending_from_the_first_frame_missing() {
        let (mut op, mut dev, now) = pair();
        for byte in b"abcd" {
            op.send_data(0, &[*byte]);
        }
        let frames: Vec<_> = std::iter::from_fn(|| op.poll_transmit(now)).collect();
        dev.receive(&frames[0], now).unwrap();
        assert_eq!(dev.receive(&frames[2], now), Err(Rejected::Gap), "frame 1 was lost");
        assert_eq!(dev.receive(&frames[3], now), Err(Rejected::Gap));
        let asked = deliver(&mut dev, &mut op, now);
        assert!(asked.is_empty());
        let resent = deliver(&mut op, &mut dev, now);
        assert_eq!(resent, [data(0, b"b"), data(0, b"c"), data(0, b"d")]);
    }

    #[test]
    fn after_a_reconnect_both_sides_resend_what_was_not_acknowledged() {
        let (mut op, mut dev, now) = pair();
        op.send_data(0, b"lost on the way");
        let _lost = op.poll_transmit(now).unwrap();
        dev.send(Message::Exit { code: 0 });
        let _lost_too = dev.poll_transmit(now).unwrap();
        op.on_reconnect();
        dev.on_reconnect();
        assert_eq!(deliver(&mut op, &mut dev, now), [data(0, b"lost on the way")]);
        assert_eq!(deliver(&mut dev, &mut op, now), [Message::Exit { code: 0 }]);
    }

    #[test]
    fn an_ack_is_owed_from_a_frame_taken_until_it_goes_out() {
        let (mut op, mut dev, now) = pair();
        assert!(!dev.owes_ack());
        op.send(Message::Eof { stream: 0 });
        dev.receive(&op.poll_transmit(now).unwrap(), now).unwrap();
        assert!(dev.all_acked() && dev.owes_ack(), "nothing of its own to resend, but an ack to send");
        assert!(dev.poll_transmit(now).is_none(), "the ack waits for company");
        let ack = dev.poll_transmit(now + ACK_DELAY).unwrap();
        assert!(!dev.owes_ack());
        op.receive(&ack, now + ACK_DELAY).unwrap();
        assert!(op.all_acked());
    }

    #[test]
    fn a_receiver_that_missed_the_first_frames_asks_and_gets_them_at_once() {
        let (mut op, mut dev, now) = pair();
        dev.send_data(0, b"$ ");
        dev.send(Message::Exit { code: 0 });
        let _dropped: Vec<_> = std::iter::from_fn(|| dev.poll_transmit(now)).collect();
        op.ask_resend();
        assert!(deliver(&mut op, &mut dev, now).is_empty(), "only the request goes");
        assert!(dev.next_deadline().is_some_and(|at| at > now), "the device's timer has not fired");
        assert_eq!(deliver(&mut dev, &mut op, now), [data(0, b"$ "), Message::Exit { code: 0 }]);
    }

    #[test]
    fn a_tail_loss_is_resent_after_the_timeout_which_backs_off() {
        let (mut op, mut dev, now) = pair();
        op.send_data(0, b"last words");
        let _lost = op.poll_transmit(now).unwrap();
        assert!(op.poll_transmit(now).is_none());
        let first_timeout = op.next_deadline().unwrap();
        assert_eq!(first_timeout, now + MIN_RTO);
        op.on_timer(first_timeout);
        let _lost_again = op.poll_transmit(first_timeout).unwrap();
        op.on_timer(first_timeout + MIN_RTO);
        assert!(op.poll_transmit(first_timeout + MIN_RTO).is_none(), "the timeout doubled");
        let second_timeout = first_timeout + 2 * MIN_RTO;
        op.on_timer(second_timeout);
        assert_eq!(deliver(&mut op, &mut dev, second_timeout), [data(0, b"last words")]);
    }
}
