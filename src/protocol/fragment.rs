//! Screen frames on the wire: one encrypted frame split into fragments that each fit a
//! QUIC datagram at the 1200-byte path MTU, and the receiver's bounded reassembly.
//!
//! A screen datagram is the media header (stream `Screen`, its sequence the frame id and
//! its timestamp the frame's capture time, the same in every fragment), this fragment
//! header, and one slice of the frame's SFrame packet, or one recovery slice. Layout
//! (big-endian):
//!
//! ```text
//! 0               2               4                 5                        8
//! +---------------+---------------+--------+--------+------------------------+
//! |  index u16    |  count u16    | recovery u7 | K |  frame length u24      |
//! +---------------+---------------+--------+--------+------------------------+
//! ```
//!
//! `count` slices carry the frame ([`CHUNK_BYTES`] each, the last shorter); `recovery`
//! more (indexes `count..count + recovery`) carry a Reed-Solomon erasure code over the
//! slices (each padded to [`CHUNK_BYTES`]), so that any `count` of the `count + recovery`
//! rebuild the frame: a keyframe of fifty fragments still arrives through a few percent
//! of loss, where without a code one lost fragment in fifty loses it (at 5 % loss, 92 %
//! of such keyframes). `K` is the keyframe flag. [`recovery_fragments`] says how many
//! to send.
//!
//! The frame is sealed once, whole, with [`frame_aad`] as its authenticated data: the
//! media header and this header with the index zeroed, identical in every fragment. So
//! frame id, count, keyframe flag and length are authenticated, and so is each index: a
//! slice moved to another index changes the reassembled ciphertext and the frame fails to
//! open. The relay reads none of this.
//!
//! Reassembly lives here, beside the format, because the client session (which holds the
//! keys that open a frame) drives it: a pure state machine on a clock it is given.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::{MEDIA_HEADER_LEN, MediaHeader, SessionId};

/// Bytes of the fragment header.
pub const FRAGMENT_HEADER_LEN: usize = 8;
/// The largest encrypted frame a receiver reassembles.
pub const MAX_FRAME_BYTES: usize = 2 << 20;
/// The largest screen datagram a sender makes: under what QUIC carries in one packet at
/// the 1200-byte MTU every hop is set to (quinn's `max_datagram_size()` is then about
/// 1160), so every fragment fits WireGuard and OpenVPN tunnels.
pub const MAX_DATAGRAM_BYTES: usize = 1100;
/// Frame bytes in a full fragment.
pub const CHUNK_BYTES: usize = MAX_DATAGRAM_BYTES - MEDIA_HEADER_LEN - FRAGMENT_HEADER_LEN;
/// Fragments of the largest frame; a count above it is refused.
pub const MAX_FRAGMENTS: usize = MAX_FRAME_BYTES.div_ceil(CHUNK_BYTES);
/// Frames of one sender being put together at once; a fragment of a newer frame evicts
/// the oldest.
pub const PARTIAL_FRAMES: usize = 3;
/// A partial frame that received nothing for this long is lost (three frame intervals at
/// 30 fps, and a frame is paced over at most one interval).
pub const FRAGMENT_GAP: Duration = Duration::from_millis(100);
/// A partial frame older than this is lost, however its fragments trickle in.
pub const FRAME_TIMEOUT: Duration = Duration::from_millis(500);
/// While a receiver waits for a keyframe it asks again this often (the request or the
/// keyframe itself may be lost).
pub const KEYFRAME_RETRY: Duration = Duration::from_secs(1);
/// A keyframe lost on the way (the answer to a request, most likely) is asked for again
/// this long after its first fragment came, not a whole [`KEYFRAME_RETRY`] later: the
/// sender takes a request sooner than 250 ms after making a keyframe as answered by it
/// (`net::screen::ANSWERED_WITHIN`). Never more often than this, whatever a sender marks
/// as a keyframe.
pub const LOST_KEYFRAME_REASK: Duration = Duration::from_millis(300);
/// Recovery fragments a frame may have (seven bits), and never more than its own count.
pub const MAX_RECOVERY: u8 = 127;
/// The most bytes one partial frame holds: every slice of the largest frame and of its
/// recovery.
pub const MAX_PARTIAL_BYTES: usize = (MAX_FRAGMENTS + MAX_RECOVERY as usize) * CHUNK_BYTES;

const FLAG_KEYFRAME: u8 = 0x01;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FragmentHeader {
    pub index: u16,
    /// Fragments that carry the frame.
    pub count: u16,
    /// Fragments after them that carry its erasure code.
    pub recovery: u8,
    pub keyframe: bool,
    /// Bytes of the whole encrypted frame.
    pub frame_len: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FragmentError {
    #[error("screen datagram of {0} bytes is too short for its headers")]
    TooShort(usize),
    #[error("fragment {index} of a frame of {count} and {recovery} recovery fragments")]
    Index { index: u16, count: u16, recovery: u8 },
    #[error(
        "a frame of {len} bytes in {count} fragments and {recovery} recovery fragments is impossible (at most {MAX_FRAME_BYTES} bytes, and as many recovery fragments as fragments)"
    )]
    Shape { len: u32, count: u16, recovery: u8 },
}

impl FragmentHeader {
    pub fn write(&self, out: &mut [u8; FRAGMENT_HEADER_LEN]) {
        debug_assert!(self.recovery <= MAX_RECOVERY);
        out[0..2].copy_from_slice(&self.index.to_be_bytes());
        out[2..4].copy_from_slice(&self.count.to_be_bytes());
        out[4] = (self.recovery << 1) | if self.keyframe { FLAG_KEYFRAME } else { 0 };
        out[5..8].copy_from_slice(&self.frame_len.to_be_bytes()[1..]);
    }

    /// Fragments of the frame in all, recovery included.
    pub fn total(&self) -> usize {
        usize::from(self.count) + usize::from(self.recovery)
    }

    /// The length of data slice `index` (recovery slices are all [`CHUNK_BYTES`]).
    fn slice_len(&self, index: usize) -> usize {
        if index + 1 == usize::from(self.count) { self.frame_len as usize - (index * CHUNK_BYTES) } else { CHUNK_BYTES }
    }

    /// The header at the start of `bytes` (what follows the media header) and the slice
    /// of the frame after it. The shape is checked here: a count and length that no
    /// frame within the bounds can have are refused before anything is stored.
    pub fn parse(bytes: &[u8]) -> Result<(FragmentHeader, &[u8]), FragmentError> {
        let Some((head, chunk)) = bytes.split_first_chunk::<FRAGMENT_HEADER_LEN>() else {
            return Err(FragmentError::TooShort(MEDIA_HEADER_LEN + bytes.len()));
        };
        let header = FragmentHeader {
            index: u16::from_be_bytes([head[0], head[1]]),
            count: u16::from_be_bytes([head[2], head[3]]),
            recovery: head[4] >> 1,
            keyframe: head[4] & FLAG_KEYFRAME != 0,
            frame_len: u32::from_be_bytes([0, head[5], head[6], head[7]]),
        };
        let (len, count) = (header.frame_len as usize, usize::from(header.count));
        // Every slice but the last is full, and the last holds at least a byte.
        let sliced = count > 0 && len > (count - 1) * CHUNK_BYTES && len <= count * CHUNK_BYTES;
        if !sliced || count > MAX_FRAGMENTS || len > MAX_FRAME_BYTES || usize::from(header.recovery) > count {
            return Err(FragmentError::Shape { len: header.frame_len, count: header.count, recovery: header.recovery });
        }
        if usize::from(header.index) >= header.total() {
            let FragmentHeader { index, count, recovery, .. } = header;
            return Err(FragmentError::Index { index, count, recovery });
        }
        Ok((header, chunk))
    }
}

/// The authenticated data of a frame: its media header and its fragment header with the
/// index zeroed, the same bytes for every fragment.
pub fn frame_aad(media: &MediaHeader, fragment: &FragmentHeader) -> [u8; MEDIA_HEADER_LEN + FRAGMENT_HEADER_LEN] {
    let mut aad = [0; MEDIA_HEADER_LEN + FRAGMENT_HEADER_LEN];
    let (head, frag) = aad.split_at_mut(MEDIA_HEADER_LEN);
    media.write(head.try_into().expect("the split is the header's length"));
    FragmentHeader { index: 0, ..*fragment }.write(frag.try_into().expect("the split is the header's length"));
    aad
}

/// How many recovery fragments to send with a frame of `count` fragments when viewers
/// lose about `loss` (a fraction) of what is sent. Without loss, keyframes get a fifth
/// more (losing one costs a viewer half a second of waiting or more, and a new viewer's
/// first keyframe goes out before it has reported its link's loss: at 5 % loss, one of
/// 50 fragments with a fifth more fails about once in 6 000, with a tenth once in 18)
/// and other frames none; with loss, three times the expected losses and one more, so
/// that the frame comes through nearly always (at 5 % loss: 9 for a keyframe of 50
/// fragments, which then fails about once in 1 500; 2 for a frame of 3).
pub fn recovery_fragments(count: u16, keyframe: bool, loss: f64) -> u8 {
    let count_f = f64::from(count);
    let wanted = if loss > 0.0 {
        (count_f * loss.min(0.25) * 3.0).ceil() + 1.0
    } else if keyframe {
        (count_f / 5.0).ceil()
    } else {
        0.0
    };
    wanted.min(count_f).min(f64::from(MAX_RECOVERY)) as u8
}

/// The fragment header (index 0) of a frame of `sealed_len` encrypted bytes sent while
/// viewers lose about `loss` of what is sent, or `None` when the frame is too large.
pub fn frame_shape(sealed_len: usize, keyframe: bool, loss: f64) -> Option<FragmentHeader> {
    if sealed_len == 0 || sealed_len > MAX_FRAME_BYTES {
        return None;
    }
    let count = u16::try_from(sealed_len.div_ceil(CHUNK_BYTES)).ok()?;
    let recovery = recovery_fragments(count, keyframe, loss);
    Some(FragmentHeader { index: 0, count, recovery, keyframe, frame_len: sealed_len as u32 })
}

/// `slice` padded with zeros to [`CHUNK_BYTES`], as the erasure code sees it.
fn padded(slice: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    if slice.len() == CHUNK_BYTES {
        slice.into()
    } else {
        let mut full = slice.to_vec();
        full.resize(CHUNK_BYTES, 0);
        full.into()
    }
}

/// The datagrams of one sealed frame, in order: each the media header, its fragment
/// header and a [`CHUNK_BYTES`] slice (the frame's last one shorter), then the recovery
/// slices.
pub fn fragment_datagrams(media: &MediaHeader, shape: &FragmentHeader, sealed: &[u8]) -> Vec<Vec<u8>> {
    debug_assert_eq!(sealed.len(), shape.frame_len as usize);
    let mut head = [0; MEDIA_HEADER_LEN];
    media.write(&mut head);
    let recovery = if shape.recovery == 0 {
        Vec::new()
    } else {
        let slices = sealed.chunks(CHUNK_BYTES).map(padded);
        reed_solomon_simd::encode(usize::from(shape.count), usize::from(shape.recovery), slices)
            .expect("the counts and the even slice length are within the code's limits")
    };
    let slices = sealed.chunks(CHUNK_BYTES).chain(recovery.iter().map(Vec::as_slice));
    slices
        .enumerate()
        .map(|(index, slice)| {
            let mut frag = [0; FRAGMENT_HEADER_LEN];
            FragmentHeader { index: index as u16, ..*shape }.write(&mut frag);
            [&head[..], &frag, slice].concat()
        })
        .collect()
}

/// A frame put back together, still encrypted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedFrame {
    pub media: MediaHeader,
    pub shape: FragmentHeader,
    pub sealed: Vec<u8>,
}

impl SealedFrame {
    pub fn aad(&self) -> [u8; MEDIA_HEADER_LEN + FRAGMENT_HEADER_LEN] {
        frame_aad(&self.media, &self.shape)
    }
}

/// What a receiver counts of one sender's stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReassemblyCounters {
    pub fragments: u64,
    /// Bytes of the datagrams that carried them.
    pub bytes: u64,
    pub frames_complete: u64,
    /// Fragments the frames finished (complete or lost) were sent in, recovery included:
    /// beside `fragments`, what the network lost before the erasure code.
    pub fragments_expected: u64,
    /// Missing fragments that the erasure code rebuilt.
    pub fragments_recovered: u64,
    /// Complete frames handed on (a keyframe, or any frame while none is awaited).
    pub frames_delivered: u64,
    /// Frames that never completed (too many fragments lost, evicted, timed out), and
    /// the fragments they lacked.
    pub frames_lost: u64,
    pub fragments_missing: u64,
    /// Complete frames not given to the decoder because a keyframe was awaited.
    pub frames_skipped: u64,
    /// Fragments of a frame already complete, dropped or older.
    pub late: u64,
    pub duplicates: u64,
    /// Fragments that disagree with the others of their frame.
    pub inconsistent: u64,
}

struct Partial {
    media: MediaHeader,
    shape: FragmentHeader,
    chunks: Vec<Option<Box<[u8]>>>,
    received: usize,
    bytes: usize,
    started: Instant,
    last: Instant,
}

impl Partial {
    /// The frame, once `count` of its fragments are here: the slices that came, and
    /// those that did not rebuilt from the recovery slices. `None` when they do not fit
    /// together.
    fn rebuild(&self) -> Option<Vec<u8>> {
        let count = usize::from(self.shape.count);
        let (slices, recovery) = self.chunks.split_at(count);
        let missing = slices.iter().any(Option::is_none);
        let restored = if missing {
            let originals = slices.iter().enumerate().filter_map(|(i, c)| c.as_deref().map(|c| (i, padded(c))));
            let recovery = recovery.iter().enumerate().filter_map(|(i, c)| c.as_deref().map(|c| (i, c)));
            reed_solomon_simd::decode(count, usize::from(self.shape.recovery), originals, recovery).ok()?
        } else {
            Default::default()
        };
        let frame_len = self.shape.frame_len as usize;
        let mut sealed = Vec::with_capacity(count * CHUNK_BYTES);
        for (i, slice) in slices.iter().enumerate() {
            sealed.extend_from_slice(slice.as_deref().or_else(|| restored.get(&i).map(Vec::as_slice))?);
        }
        // A rebuilt last slice comes back padded.
        sealed.truncate(frame_len);
        (sealed.len() == frame_len).then_some(sealed)
    }

    fn expired(&self, now: Instant) -> bool {
        now >= self.last + FRAGMENT_GAP || now >= self.started + FRAME_TIMEOUT
    }

    fn deadline(&self) -> Instant {
        (self.last + FRAGMENT_GAP).min(self.started + FRAME_TIMEOUT)
    }
}

/// One sender's screen stream at a receiver. Fragments go in, complete frames that the
/// decoder can use come out in order: after any lost frame nothing but a keyframe does,
/// and [`Reassembler::take_keyframe_request`] says when to ask for one. Memory is bounded
/// by [`PARTIAL_FRAMES`] frames of at most [`MAX_PARTIAL_BYTES`], holding only bytes
/// that arrived.
pub struct Reassembler {
    sender: SessionId,
    /// Oldest first.
    partial: VecDeque<Partial>,
    /// The newest frame completed or given up: fragments of it or older are late.
    done: Option<u32>,
    waiting_keyframe: bool,
    /// When to ask for a keyframe next (while waiting).
    ask_at: Option<Instant>,
    /// When a keyframe was last asked for.
    asked: Option<Instant>,
    counters: ReassemblyCounters,
}

/// Whether frame id `a` comes after `b` on a wrapping 32-bit counter.
fn newer(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

impl Reassembler {
    /// A new stream starts by waiting for a keyframe. The relay asks the sharer for one
    /// when a viewer starts watching, so the viewer asks itself only if none came within
    /// [`KEYFRAME_RETRY`].
    pub fn new(sender: SessionId, now: Instant) -> Self {
        Self {
            sender,
            partial: VecDeque::new(),
            done: None,
            waiting_keyframe: true,
            ask_at: Some(now + KEYFRAME_RETRY),
            asked: None,
            counters: ReassemblyCounters::default(),
        }
    }

    pub fn counters(&self) -> ReassemblyCounters {
        self.counters
    }

    /// Bytes held in partial frames.
    pub fn buffered_bytes(&self) -> usize {
        self.partial.iter().map(|p| p.bytes).sum()
    }

    /// One fragment (`datagram` is the whole screen datagram, `media` its parsed media
    /// header). Returns a frame when this fragment completed one the decoder can take.
    pub fn push(
        &mut self,
        now: Instant,
        media: MediaHeader,
        datagram: &[u8],
    ) -> Result<Option<SealedFrame>, FragmentError> {
        debug_assert_eq!(media.sender, self.sender);
        let body = datagram.get(MEDIA_HEADER_LEN..).ok_or(FragmentError::TooShort(datagram.len()))?;
        let (header, chunk) = FragmentHeader::parse(body)?;
        self.counters.fragments += 1;
        self.counters.bytes += datagram.len() as u64;
        let frame = media.sequence;
        if self.done.is_some_and(|done| !newer(frame, done)) {
            self.counters.late += 1;
            return Ok(None);
        }
        let at = match self.partial.iter().position(|p| p.media.sequence == frame) {
            Some(at) => at,
            None => self.start(now, media, header),
        };
        let partial = &mut self.partial[at];
        let shape = FragmentHeader { index: 0, ..header };
        let index = usize::from(header.index);
        let slice_len = if index < usize::from(header.count) { header.slice_len(index) } else { CHUNK_BYTES };
        if partial.media != media || partial.shape != shape || chunk.len() != slice_len {
            self.counters.inconsistent += 1;
            return Ok(None);
        }
        let slot = &mut partial.chunks[index];
        if slot.is_some() {
            self.counters.duplicates += 1;
            return Ok(None);
        }
        *slot = Some(chunk.into());
        partial.received += 1;
        partial.bytes += chunk.len();
        partial.last = now;
        if partial.received < usize::from(partial.shape.count) {
            return Ok(None);
        }
        let partial = self.partial.remove(at).expect("the index was just found");
        let Some(sealed) = partial.rebuild() else {
            self.counters.inconsistent += 1;
            self.lose(now, &partial);
            return Ok(None);
        };
        self.counters.fragments_expected += partial.shape.total() as u64;
        let count = usize::from(partial.shape.count);
        self.counters.fragments_recovered += partial.chunks[..count].iter().filter(|c| c.is_none()).count() as u64;
        // Frames between the last one finished and this one: those begun can no longer
        // be decoded in order; those of which nothing came were lost whole (or dropped
        // by their sender). Either way what follows them cannot be decoded.
        let between = self.done.map_or(0, |done| frame.wrapping_sub(done).wrapping_sub(1));
        let mut begun = 0;
        while self.partial.front().is_some_and(|p| newer(frame, p.media.sequence)) {
            let older = self.partial.pop_front().expect("front exists");
            self.lose(now, &older);
            begun += 1;
        }
        let unseen = between.saturating_sub(begun);
        if unseen > 0 {
            self.counters.frames_lost += u64::from(unseen);
            self.wait_for_keyframe(now);
        }
        self.done = Some(frame);
        self.counters.frames_complete += 1;
        if self.waiting_keyframe && !partial.shape.keyframe {
            self.counters.frames_skipped += 1;
            return Ok(None);
        }
        self.counters.frames_delivered += 1;
        Ok(Some(SealedFrame { media: partial.media, shape: partial.shape, sealed }))
    }

    /// The frame handed on opened: a keyframe ends the wait.
    pub fn opened(&mut self, keyframe: bool) {
        if keyframe {
            self.waiting_keyframe = false;
            self.ask_at = None;
        }
    }

    /// A complete frame could not be used (it failed to open or to decode): wait for a
    /// keyframe as after a loss.
    pub fn unusable(&mut self, now: Instant) {
        self.wait_for_keyframe(now);
    }

    /// Starts a partial frame for the first fragment of `media.sequence`, evicting the
    /// oldest when full, and returns its index.
    fn start(&mut self, now: Instant, media: MediaHeader, header: FragmentHeader) -> usize {
        if self.partial.len() == PARTIAL_FRAMES {
            let oldest = self.partial.pop_front().expect("full");
            self.lose(now, &oldest);
        }
        let partial = Partial {
            media,
            shape: FragmentHeader { index: 0, ..header },
            chunks: vec![None; header.total()],
            received: 0,
            bytes: 0,
            started: now,
            last: now,
        };
        let at =
            self.partial.iter().position(|p| newer(p.media.sequence, media.sequence)).unwrap_or(self.partial.len());
        self.partial.insert(at, partial);
        at
    }

    fn lose(&mut self, now: Instant, partial: &Partial) {
        let frame = partial.media.sequence;
        self.counters.frames_lost += 1;
        self.counters.fragments_expected += partial.chunks.len() as u64;
        self.counters.fragments_missing += (partial.chunks.len() - partial.received) as u64;
        if self.done.is_none_or(|done| newer(frame, done)) {
            self.done = Some(frame);
        }
        self.wait_for_keyframe(now);
        if partial.shape.keyframe {
            let again = [Some(partial.started), self.asked].into_iter().flatten().max().expect("started is some")
                + LOST_KEYFRAME_REASK;
            self.ask_at = self.ask_at.map(|at| at.min(again));
        }
    }

    fn wait_for_keyframe(&mut self, now: Instant) {
        if !self.waiting_keyframe {
            self.waiting_keyframe = true;
            self.ask_at = Some(now);
        }
    }

    /// Whether to send a keyframe request now: at once when a wait starts after a loss,
    /// then every [`KEYFRAME_RETRY`] while it lasts, or sooner when the keyframe that came
    /// was lost too ([`LOST_KEYFRAME_REASK`]).
    pub fn take_keyframe_request(&mut self, now: Instant) -> bool {
        if !self.waiting_keyframe {
            return false;
        }
        match self.ask_at {
            Some(at) if now < at => false,
            _ => {
                self.ask_at = Some(now + KEYFRAME_RETRY);
                self.asked = Some(now);
                true
            }
        }
    }

    /// Gives up partial frames that waited too long.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(at) = self.partial.iter().position(|p| p.expired(now)) {
            let partial = self.partial.remove(at).expect("found");
            self.lose(now, &partial);
        }
    }

    /// When a partial frame expires or a keyframe request is due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let ask = if self.waiting_keyframe { self.ask_at } else { None };
        self.partial.iter().map(Partial::deadline).chain(ask).min()
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods, reason = "the virtual clock starts at an arbitrary real instant")]
mod tests {
    use super::*;
    use crate::protocol::{ChannelId, StreamType};
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};

    const ALICE: SessionId = SessionId(7);

    fn media(frame: u32) -> MediaHeader {
        MediaHeader {
            stream: StreamType::Screen,
            flags: 0,
            channel: ChannelId(1),
            sender: ALICE,
            sequence: frame,
            timestamp: frame.wrapping_mul(3000),
        }
    }

    /// The datagrams of frame `frame` whose "sealed" bytes are `len` bytes of a pattern,
    /// without recovery fragments.
    fn frame(frame: u32, len: usize, keyframe: bool) -> (Vec<u8>, Vec<Vec<u8>>) {
        coded_frame(frame, len, keyframe, 0)
    }

    /// The same with `recovery` recovery fragments after the frame's own.
    fn coded_frame(frame: u32, len: usize, keyframe: bool, recovery: u8) -> (Vec<u8>, Vec<Vec<u8>>) {
        let sealed: Vec<u8> = (0..len).map(|i| (i * 31 + frame as usize) as u8).collect();
        let shape = FragmentHeader { recovery, ..frame_shape(len, keyframe, 0.0).unwrap() };
        let datagrams = fragment_datagrams(&media(frame), &shape, &sealed);
        (sealed, datagrams)
    }

    fn push_all(r: &mut Reassembler, now: Instant, datagrams: &[Vec<u8>]) -> Vec<SealedFrame> {
        let mut out = Vec::new();
        for d in datagrams {
            let (m, _) = MediaHeader::parse(d).unwrap();
            out.extend(r.push(now, m, d).unwrap());
        }
        for f in &out {
            r.opened(f.shape.keyframe);
        }
        out
    }

    #[test]
    fn every_datagram_fits_the_tunnel_budget_and_the_header_round_trips() {
        for len in [1, CHUNK_BYTES - 1, CHUNK_BYTES, CHUNK_BYTES + 1, 100_000, MAX_FRAME_BYTES] {
            let (_, datagrams) = frame(1, len, true);
            assert_eq!(datagrams.len(), len.div_ceil(CHUNK_BYTES));
            for (i, d) in datagrams.iter().enumerate() {
                assert!(d.len() <= MAX_DATAGRAM_BYTES);
                let (h, chunk) = FragmentHeader::parse(&d[MEDIA_HEADER_LEN..]).unwrap();
                assert_eq!((h.index as usize, h.count as usize, h.frame_len as usize), (i, datagrams.len(), len));
                assert!(h.keyframe);
                assert!(!chunk.is_empty());
            }
        }
        assert_eq!(frame_shape(MAX_FRAME_BYTES + 1, false, 0.0), None);
        assert_eq!(frame_shape(0, false, 0.0), None);
        // Recovery fragments are full slices, and say what they are.
        let (_, datagrams) = coded_frame(1, 5 * CHUNK_BYTES + 7, false, 3);
        assert_eq!(datagrams.len(), 9);
        for (i, d) in datagrams.iter().enumerate().skip(6) {
            let (h, chunk) = FragmentHeader::parse(&d[MEDIA_HEADER_LEN..]).unwrap();
            assert_eq!((usize::from(h.index), h.count, h.recovery, chunk.len()), (i, 6, 3, CHUNK_BYTES));
            assert!(d.len() <= MAX_DATAGRAM_BYTES);
        }
    }

    #[test]
    fn recovery_grows_with_the_loss_viewers_report() {
        assert_eq!(recovery_fragments(50, true, 0.0), 10, "a fifth more for a keyframe");
        assert_eq!(recovery_fragments(3, false, 0.0), 0, "nothing for other frames");
        assert_eq!(recovery_fragments(50, true, 0.05), 9);
        assert_eq!(recovery_fragments(3, false, 0.05), 2);
        assert_eq!(recovery_fragments(1, false, 0.05), 1, "never more than the frame's own");
        assert_eq!(recovery_fragments(1900, true, 0.5), MAX_RECOVERY);
        assert_eq!(recovery_fragments(10, false, f64::NAN), 0);
    }

    #[test]
    fn the_erasure_code_rebuilds_a_frame_from_any_count_of_its_fragments() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let now = Instant::now();
        let mut r = Reassembler::new(ALICE, now);
        let mut id = 0;
        for (len, recovery) in
            [(1, 1), (CHUNK_BYTES, 1), (CHUNK_BYTES + 1, 2), (50 * CHUNK_BYTES - 3, 9), (300_000, 40)]
        {
            for attempt in 0..4 {
                let (sealed, mut datagrams) = coded_frame(id, len, true, recovery);
                let rebuilt_before = r.counters().fragments_recovered;
                if attempt == 0 {
                    // The frame's own first slices lost: each rebuilt.
                    datagrams.drain(..usize::from(recovery));
                } else {
                    datagrams.shuffle(&mut rng);
                    datagrams.truncate(datagrams.len() - usize::from(recovery));
                }
                let out = push_all(&mut r, now, &datagrams);
                if attempt == 0 {
                    assert_eq!(r.counters().fragments_recovered - rebuilt_before, u64::from(recovery));
                }
                assert_eq!(out.len(), 1, "{len} bytes with {recovery} of its fragments lost");
                assert_eq!(out[0].sealed, sealed);
                id += 1;
            }
            // One more lost than the code covers: the frame is lost (a frame of one slice
            // and one recovery fragment then left nothing to see).
            let (_, mut datagrams) = coded_frame(id, len, false, recovery);
            datagrams.shuffle(&mut rng);
            datagrams.truncate(datagrams.len() - usize::from(recovery) - 1);
            assert!(push_all(&mut r, now, &datagrams).is_empty());
            id += 1;
            r.handle_timeout(now + FRAME_TIMEOUT);
            assert_eq!(r.counters().frames_lost, u64::from(!datagrams.is_empty()));
            r = Reassembler::new(ALICE, now);
        }
    }

    #[test]
    fn impossible_shapes_are_typed_errors() {
        let bad = |index: u16, count: u16, recovery: u8, len: u32| {
            let mut b = [0u8; FRAGMENT_HEADER_LEN];
            FragmentHeader { index, count, recovery, keyframe: false, frame_len: len }.write(&mut b);
            FragmentHeader::parse(&b).unwrap_err()
        };
        assert_eq!(bad(0, 0, 0, 0), FragmentError::Shape { len: 0, count: 0, recovery: 0 });
        assert_eq!(bad(0, 2, 0, 1), FragmentError::Shape { len: 1, count: 2, recovery: 0 });
        let over = CHUNK_BYTES as u32 + 1;
        assert_eq!(bad(0, 1, 0, over), FragmentError::Shape { len: over, count: 1, recovery: 0 });
        let too_big = MAX_FRAME_BYTES as u32 + 1;
        let count = MAX_FRAGMENTS as u16 + 1;
        assert_eq!(bad(0, count, 0, too_big), FragmentError::Shape { len: too_big, count, recovery: 0 });
        let three = 2 * CHUNK_BYTES as u32 + 1;
        assert_eq!(bad(3, 3, 0, three), FragmentError::Index { index: 3, count: 3, recovery: 0 });
        assert_eq!(bad(5, 3, 2, three), FragmentError::Index { index: 5, count: 3, recovery: 2 });
        assert_eq!(bad(0, 1, 2, 1), FragmentError::Shape { len: 1, count: 1, recovery: 2 }, "more recovery than frame");
        assert_eq!(FragmentHeader::parse(&[0; 7]), Err(FragmentError::TooShort(27)));
    }

    #[test]
    fn the_aad_is_the_same_for_every_fragment_and_covers_the_shape() {
        let shape = frame_shape(5000, true, 0.0).unwrap();
        let aad = frame_aad(&media(4), &shape);
        let (_, datagrams) = coded_frame(4, 5000, true, shape.recovery);
        assert_eq!(datagrams.len(), 5 + 1);
        for d in &datagrams {
            let (m, _) = MediaHeader::parse(d).unwrap();
            let (h, _) = FragmentHeader::parse(&d[MEDIA_HEADER_LEN..]).unwrap();
            assert_eq!(frame_aad(&m, &h), aad);
        }
        assert_ne!(frame_aad(&media(4), &FragmentHeader { keyframe: false, ..shape }), aad);
        assert_ne!(frame_aad(&media(5), &shape), aad);
        assert_ne!(frame_aad(&media(4), &FragmentHeader { frame_len: 4999, ..shape }), aad);
        assert_ne!(frame_aad(&media(4), &FragmentHeader { recovery: shape.recovery + 1, ..shape }), aad);
    }

    #[test]
    fn every_size_comes_back_whole_in_any_order_with_duplicates() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let now = Instant::now();
        let mut r = Reassembler::new(ALICE, now);
        let sizes = (1..=3 * CHUNK_BYTES + 1).step_by(97).chain([MAX_FRAME_BYTES, CHUNK_BYTES, 2 * CHUNK_BYTES]);
        for (id, len) in sizes.enumerate() {
            let (sealed, mut datagrams) = frame(id as u32, len, id == 0);
            let again = datagrams[rng.random_range(0..datagrams.len())].clone();
            datagrams.push(again);
            datagrams.shuffle(&mut rng);
            let out = push_all(&mut r, now, &datagrams);
            assert_eq!(out.len(), 1, "frame {id} of {len} bytes");
            assert_eq!(out[0].sealed, sealed);
            assert_eq!(out[0].media, media(id as u32));
            assert_eq!(r.buffered_bytes(), 0);
        }
        assert_eq!(r.counters().frames_lost, 0);
        assert!(r.counters().duplicates > 0);
    }

    #[test]
    fn a_lost_fragment_drops_the_frame_and_only_a_keyframe_resumes() {
        let mut now = Instant::now();
        let mut r = Reassembler::new(ALICE, now);
        assert!(!r.take_keyframe_request(now), "the relay asks for a new viewer");
        assert!(r.take_keyframe_request(now + KEYFRAME_RETRY), "and the viewer if no keyframe came");
        assert_eq!(push_all(&mut r, now, &frame(1, 5000, true).1).len(), 1);
        assert!(!r.take_keyframe_request(now));
        // Frame 2 loses its third fragment; frame 3 completes.
        let mut two = frame(2, 5000, false).1;
        two.remove(2);
        assert!(push_all(&mut r, now, &two).is_empty());
        assert!(push_all(&mut r, now, &frame(3, 5000, false).1).is_empty(), "a frame after a loss is not decodable");
        assert_eq!(r.counters().frames_lost, 1);
        assert_eq!(r.counters().fragments_missing, 1);
        assert_eq!(r.counters().frames_skipped, 1);
        assert!(r.take_keyframe_request(now));
        assert!(!r.take_keyframe_request(now), "asked once, not on every fragment");
        now += KEYFRAME_RETRY;
        assert!(r.take_keyframe_request(now), "asked again while still waiting");
        assert!(push_all(&mut r, now, &frame(4, 5000, false).1).is_empty());
        assert_eq!(push_all(&mut r, now, &frame(5, 20_000, true).1).len(), 1);
        assert!(!r.take_keyframe_request(now + KEYFRAME_RETRY));
        assert_eq!(push_all(&mut r, now, &frame(6, 500, false).1).len(), 1);
        // The lost fragment of frame 2 arriving now is late.
        let late = frame(2, 5000, false).1;
        assert!(push_all(&mut r, now, &late[2..3]).is_empty());
        assert_eq!(r.counters().late, 1);
    }

    /// The keyframe that answers a request can be lost too: the viewer asks again soon
    /// after it, not a whole retry later, and no more often than the re-ask spacing however
    /// many frames a sender marks as keyframes.
    #[test]
    fn a_lost_keyframe_is_asked_for_again_soon() {
        let now = Instant::now();
        let mut r = Reassembler::new(ALICE, now);
        assert_eq!(push_all(&mut r, now, &frame(1, 3000, true).1).len(), 1);
        // Frame 2 never comes; frame 3 shows the loss and the viewer asks.
        assert!(push_all(&mut r, now, &frame(3, 900, false).1).is_empty());
        assert!(r.take_keyframe_request(now));
        // The answer, keyframe 4, loses a fragment and is given up when frame 5 completes.
        let at = now + Duration::from_millis(100);
        let mut four = frame(4, 5000, true).1;
        four.remove(1);
        assert!(push_all(&mut r, at, &four).is_empty());
        assert!(push_all(&mut r, at + Duration::from_millis(100), &frame(5, 900, false).1).is_empty());
        assert_eq!(r.counters().frames_lost, 2);
        assert_eq!(r.poll_timeout(), Some(at + LOST_KEYFRAME_REASK));
        assert!(!r.take_keyframe_request(at + LOST_KEYFRAME_REASK - Duration::from_millis(1)));
        assert!(r.take_keyframe_request(at + LOST_KEYFRAME_REASK), "asked again before the retry");
        // A storm of broken "keyframes" right after it asks no sooner than the spacing.
        let asked = at + LOST_KEYFRAME_REASK;
        for id in 6..20 {
            let mut broken = frame(id, 5000, true).1;
            broken.remove(0);
            push_all(&mut r, asked, &broken);
            r.handle_timeout(asked + FRAGMENT_GAP);
            assert!(!r.take_keyframe_request(asked + FRAGMENT_GAP), "frame {id}");
        }
        assert!(r.take_keyframe_request(asked + LOST_KEYFRAME_REASK));
        assert_eq!(push_all(&mut r, asked, &frame(20, 3000, true).1).len(), 1, "a whole keyframe resumes");
    }

    /// A frame of which no fragment came (lost whole, or dropped by its sender) breaks
    /// the chain as a half-arrived one does: the next frame is not decoded against a
    /// picture the decoder never had (FFmpeg would show grey in its place).
    #[test]
    fn a_frame_that_never_came_is_a_loss_too() {
        let now = Instant::now();
        let mut r = Reassembler::new(ALICE, now);
        assert_eq!(push_all(&mut r, now, &frame(1, 3000, true).1).len(), 1);
        assert_eq!(push_all(&mut r, now, &frame(2, 900, false).1).len(), 1);
        // Frames 3 and 4 never arrive.
        assert!(push_all(&mut r, now, &frame(5, 900, false).1).is_empty());
        assert_eq!(r.counters().frames_lost, 2);
        assert!(r.take_keyframe_request(now));
        assert_eq!(push_all(&mut r, now, &frame(6, 3000, true).1).len(), 1, "a keyframe resumes");
        // A gap just before a keyframe costs nothing.
        assert_eq!(push_all(&mut r, now, &frame(8, 3000, true).1).len(), 1);
        assert_eq!(push_all(&mut r, now, &frame(9, 900, false).1).len(), 1);
    }

    #[test]
    fn a_stalled_frame_times_out_on_the_clock() {
        let now = Instant::now();
        let mut r = Reassembler::new(ALICE, now);
        push_all(&mut r, now, &frame(1, 100, true).1);
        let two = frame(2, 3000, false).1;
        push_all(&mut r, now, &two[..1]);
        assert_eq!(r.poll_timeout(), Some(now + FRAGMENT_GAP));
        r.handle_timeout(now + FRAGMENT_GAP - Duration::from_millis(1));
        assert_eq!(r.counters().frames_lost, 0);
        r.handle_timeout(now + FRAGMENT_GAP);
        assert_eq!(r.counters().frames_lost, 1);
        assert_eq!(r.buffered_bytes(), 0);
        assert!(r.take_keyframe_request(now + FRAGMENT_GAP));
        // A frame whose fragments trickle in just within the gap still ends at the timeout.
        let mut r = Reassembler::new(ALICE, now);
        let slow = frame(9, 20 * CHUNK_BYTES, true).1;
        let step = FRAGMENT_GAP - Duration::from_millis(1);
        for (i, d) in slow.iter().enumerate().take(8) {
            let at = now + step * i as u32;
            r.handle_timeout(at);
            let (m, _) = MediaHeader::parse(d).unwrap();
            assert!(r.push(at, m, d).unwrap().is_none());
        }
        assert_eq!(r.counters().frames_lost, 1, "given up at {FRAME_TIMEOUT:?}");
    }

    #[test]
    fn fragments_that_disagree_with_their_frame_are_not_stored() {
        let now = Instant::now();
        let mut r = Reassembler::new(ALICE, now);
        let good = frame(1, 3 * CHUNK_BYTES, true).1;
        push_all(&mut r, now, &good[..1]);
        // The same frame id with another length, keyframe flag or timestamp.
        let other_len = frame(1, 3 * CHUNK_BYTES - 1, true).1;
        let other_kind = frame(1, 3 * CHUNK_BYTES, false).1;
        let mut other_time = good[1].clone();
        other_time[16] ^= 1;
        // A short middle fragment.
        let mut short = good[1].clone();
        short.pop();
        push_all(&mut r, now, &[other_len[1].clone(), other_kind[1].clone(), other_time, short]);
        assert_eq!(r.counters().inconsistent, 4);
        assert_eq!(push_all(&mut r, now, &good[1..]).len(), 1);
    }

    #[test]
    fn random_fragment_storms_stay_within_the_bound() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        let mut now = Instant::now();
        let mut r = Reassembler::new(ALICE, now);
        let mut most = 0;
        for _ in 0..20_000 {
            let mut d = media(rng.random_range(0..50)).to_datagram(&[]);
            let count = rng.random_range(1..=MAX_FRAGMENTS as u16);
            let slices = u32::from(count - 1) * CHUNK_BYTES as u32;
            let len = rng.random_range(slices + 1..=(slices + CHUNK_BYTES as u32).min(MAX_FRAME_BYTES as u32));
            let recovery = rng.random_range(0..=count.min(u16::from(MAX_RECOVERY))) as u8;
            let index = rng.random_range(0..count + u16::from(recovery));
            let mut frag = [0; FRAGMENT_HEADER_LEN];
            FragmentHeader { index, count, recovery, keyframe: rng.random(), frame_len: len }.write(&mut frag);
            d.extend_from_slice(&frag);
            let chunk = if rng.random() { CHUNK_BYTES } else { rng.random_range(1..=CHUNK_BYTES) };
            d.extend((0..chunk).map(|_| rng.random::<u8>()));
            let (m, _) = MediaHeader::parse(&d).unwrap();
            let _ = r.push(now, m, &d);
            most = most.max(r.buffered_bytes());
            assert!(r.partial.len() <= PARTIAL_FRAMES);
            assert!(r.buffered_bytes() <= PARTIAL_FRAMES * MAX_PARTIAL_BYTES);
            now += Duration::from_micros(rng.random_range(0..2000));
            r.handle_timeout(now);
        }
        assert!(most > 0);
    }

    #[test]
    fn frame_ids_wrap() {
        let now = Instant::now();
        let mut r = Reassembler::new(ALICE, now);
        for id in [u32::MAX - 1, u32::MAX, 0, 1] {
            assert_eq!(push_all(&mut r, now, &frame(id, 3000, id == u32::MAX - 1).1).len(), 1, "frame {id}");
        }
        assert!(push_all(&mut r, now, &frame(u32::MAX, 3000, true).1).is_empty(), "older than the last");
    }
}
