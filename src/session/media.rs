//! Media keys inside the client session: our own SFrame key for the current epoch, and
//! the key of every other member of our channel, each received over the pairwise Signal
//! session with that member. The server never sees one.
//!
//! Every join and leave in our channel starts a new epoch for every sender (see
//! `Session::rekey`), so a newcomer cannot open what was said before and a leaver cannot
//! open what is said after. A receiver keeps a sender's previous key for
//! [`PREVIOUS_KEY_GRACE`] for packets still in flight, and holds a few packets that
//! arrive before the key that opens them (the key travels on the control stream, the
//! packets as datagrams, and either may win).

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use rand::Rng;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::crypto::sframe::{self, EPOCH_MASK, Opener, Sealer, SframeError, media_kid, screen_kid};
use crate::protocol::fragment::{self, SealedFrame};
use crate::protocol::{ChannelId, MEDIA_HEADER_LEN, MediaHeader, SessionId, StreamType};

/// How long a sender's previous key still opens packets after its new one arrived.
pub const PREVIOUS_KEY_GRACE: Duration = Duration::from_secs(3);
/// Packets held per sender while waiting for the key that opens them (half a second of
/// voice at 50 packets a second).
const HELD_PER_SENDER: usize = 25;
/// Senders whose packets may be held at once: whatever sender ids a datagram names, the
/// memory this takes stays bounded.
const HELD_SENDERS: usize = 32;

/// A sender's media key for one epoch, as it travels to each member.
#[derive(Clone, Serialize, Deserialize)]
pub struct MediaKeyShare {
    pub epoch: u32,
    pub base_key: Zeroizing<[u8; 32]>,
}

/// A decrypted media frame for the audio (or video) pipeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaFrame {
    pub sender: SessionId,
    pub stream: StreamType,
    pub flags: u8,
    pub sequence: u32,
    pub timestamp: u32,
    pub payload: Vec<u8>,
}

/// What happened to media datagrams that were not played, and how many were.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct MediaCounters {
    pub sent: u64,
    pub opened: u64,
    /// No key for the sender and epoch (never received, or expired).
    pub no_key: u64,
    /// Failed authentication: damaged, forged, or moved to another channel/sender/stream.
    pub unauthentic: u64,
    pub duplicate: u64,
    pub too_old: u64,
    /// For a channel we are not in, or from a sender not in ours.
    pub misrouted: u64,
    /// Keys for an epoch older than the sender's current one, refused.
    pub stale_keys: u64,
    /// Screen frames sealed and screen frames opened.
    pub screen_frames_sent: u64,
    pub screen_frames_opened: u64,
}

struct OwnKey {
    channel: ChannelId,
    share: MediaKeyShare,
    sealer: Sealer,
    /// The same epoch's screen key: its own KID and counter.
    screen: Sealer,
}

impl OwnKey {
    fn new(me: SessionId, channel: ChannelId, share: MediaKeyShare) -> Self {
        let sealer = Sealer::new(media_kid(me.0, share.epoch), share.base_key.as_slice());
        let screen = Sealer::new(screen_kid(me.0, share.epoch), share.base_key.as_slice());
        OwnKey { channel, share, sealer, screen }
    }
}

struct PeerKey {
    epoch: u32,
    opener: Opener,
    screen: Opener,
    /// When a newer key replaced this one: `None` while current, then the instant from
    /// which it no longer opens anything (set on the first tick after replacement).
    retire: Retirement,
}

impl PeerKey {
    /// What opens a packet of `stream`: desktop audio comes under the screen key.
    fn opener(&mut self, stream: StreamType) -> &mut Opener {
        if stream == StreamType::ScreenAudio { &mut self.screen } else { &mut self.opener }
    }

    fn opens(&self, stream: StreamType, kid: u64) -> bool {
        let opener = if stream == StreamType::ScreenAudio { &self.screen } else { &self.opener };
        opener.kid() == kid
    }
}

enum Retirement {
    Current,
    Replaced,
    Until(Instant),
}

#[derive(Default)]
pub struct MediaKeys {
    own: Option<OwnKey>,
    next_epoch: u32,
    /// Per sender: its current key last, a previous one (retiring) before it.
    peers: BTreeMap<SessionId, Vec<PeerKey>>,
    /// Per sender: packets that arrived before their key.
    held: BTreeMap<SessionId, VecDeque<(MediaHeader, Vec<u8>)>>,
    counters: MediaCounters,
}

impl MediaKeys {
    /// Starts our next epoch in `channel` with a fresh random key, and returns it for
    /// the other members.
    pub fn start_epoch(&mut self, me: SessionId, channel: ChannelId, rng: &mut impl Rng) -> MediaKeyShare {
        let share = MediaKeyShare { epoch: self.next_epoch, base_key: Zeroizing::new(rng.random()) };
        self.next_epoch = self.next_epoch.wrapping_add(1) & EPOCH_MASK;
        self.own = Some(OwnKey::new(me, channel, share.clone()));
        share
    }

    /// Our current key, to give to a member who did not get it yet.
    pub fn own_share(&self) -> Option<MediaKeyShare> {
        self.own.as_ref().map(|own| own.share.clone())
    }

    /// We left our channel: forget every key.
    pub fn clear(&mut self) {
        self.own = None;
        self.peers.clear();
        self.held.clear();
    }

    /// A member left our channel: its keys go.
    pub fn forget(&mut self, peer: SessionId) {
        self.peers.remove(&peer);
        self.held.remove(&peer);
    }

    /// A member's key for a new epoch; packets held for it are opened into `out`.
    pub fn install(
        &mut self,
        peer: SessionId,
        share: &MediaKeyShare,
        channel: ChannelId,
        out: &mut VecDeque<MediaFrame>,
    ) {
        if share.epoch > EPOCH_MASK {
            self.counters.stale_keys += 1;
            return;
        }
        let kid = media_kid(peer.0, share.epoch);
        let keys = self.peers.entry(peer).or_default();
        // Only a newer epoch than the current one (wrap-aware on 31 bits): a relay that
        // reorders key messages cannot make an old key current again.
        let current = keys.iter().find(|k| matches!(k.retire, Retirement::Current)).map(|k| k.epoch);
        if current.is_some_and(|epoch| (share.epoch.wrapping_sub(epoch) << 1) as i32 <= 0) {
            self.counters.stale_keys += u64::from(current != Some(share.epoch));
            return;
        }
        keys.retain(|k| matches!(k.retire, Retirement::Current));
        for key in keys.iter_mut() {
            key.retire = Retirement::Replaced;
        }
        let opener = Opener::new(kid, share.base_key.as_slice());
        let screen = Opener::new(screen_kid(peer.0, share.epoch), share.base_key.as_slice());
        keys.push(PeerKey { epoch: share.epoch, opener, screen, retire: Retirement::Current });
        for (header, packet) in self.held.remove(&peer).unwrap_or_default() {
            self.open(header, channel, &packet, out);
        }
    }

    /// Starts the grace period of replaced keys and drops those past it.
    pub fn handle_timeout(&mut self, now: Instant) {
        for keys in self.peers.values_mut() {
            for key in keys.iter_mut() {
                if matches!(key.retire, Retirement::Replaced) {
                    key.retire = Retirement::Until(now + PREVIOUS_KEY_GRACE);
                }
            }
            keys.retain(|k| !matches!(k.retire, Retirement::Until(until) if now >= until));
        }
    }

    /// When the next retiring key stops opening anything.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let until = self.peers.values().flatten().filter_map(|k| match k.retire {
            Retirement::Until(until) => Some(until),
            Retirement::Current | Retirement::Replaced => None,
        });
        until.min()
    }

    /// Whether our key is close to its packet limit and a new epoch should start.
    pub fn needs_new_key(&self) -> bool {
        self.own.as_ref().is_some_and(|own| own.sealer.needs_new_key())
    }

    /// A datagram carrying `payload` encrypted under our current key (desktop audio
    /// under our screen key: it shares that key's counter, never voice's), or `None` when
    /// we have no key (not in a channel).
    pub fn seal(
        &mut self,
        me: SessionId,
        stream: StreamType,
        sequence: u32,
        timestamp: u32,
        payload: &[u8],
    ) -> Option<Vec<u8>> {
        let own = self.own.as_mut()?;
        let header = MediaHeader { stream, flags: 0, channel: own.channel, sender: me, sequence, timestamp };
        let mut metadata = [0; MEDIA_HEADER_LEN];
        header.write(&mut metadata);
        let mut datagram = Vec::with_capacity(MEDIA_HEADER_LEN + sframe::MAX_OVERHEAD + payload.len());
        datagram.extend_from_slice(&metadata);
        let sealer = if stream == StreamType::ScreenAudio { &mut own.screen } else { &mut own.sealer };
        sealer.seal(&metadata, payload, &mut datagram).ok()?;
        self.counters.sent += 1;
        Some(datagram)
    }

    /// One encoded screen frame, sealed whole under our screen key with its shape in the
    /// AAD, as the datagrams that carry it (with recovery fragments for viewers who lose
    /// about `loss` of them); `None` when we are in no channel or the frame is larger
    /// than a receiver takes.
    pub fn seal_screen(
        &mut self,
        me: SessionId,
        frame: u32,
        timestamp: u32,
        keyframe: bool,
        payload: &[u8],
        loss: f64,
    ) -> Option<Vec<Vec<u8>>> {
        let own = self.own.as_mut()?;
        let media = MediaHeader {
            stream: StreamType::Screen,
            flags: 0,
            channel: own.channel,
            sender: me,
            sequence: frame,
            timestamp,
        };
        let shape = fragment::frame_shape(own.screen.sealed_len(payload.len()), keyframe, loss)?;
        let mut sealed = Vec::with_capacity(shape.frame_len as usize);
        own.screen.seal(&fragment::frame_aad(&media, &shape), payload, &mut sealed).ok()?;
        self.counters.screen_frames_sent += 1;
        Some(fragment::fragment_datagrams(&media, &shape, &sealed))
    }

    /// Opens a reassembled screen frame from a member of `channel`; `None` (counted) when
    /// there is no key for it or it does not authenticate.
    pub fn open_screen(&mut self, frame: &SealedFrame, channel: ChannelId) -> Option<Vec<u8>> {
        let sender = frame.media.sender;
        if frame.media.channel != channel {
            self.counters.misrouted += 1;
            return None;
        }
        let kid = sframe::peek_kid(&frame.sealed).ok();
        let key = self.peers.get_mut(&sender).and_then(|keys| keys.iter_mut().find(|k| Some(k.screen.kid()) == kid));
        let Some(key) = key else {
            self.counters.no_key += 1;
            return None;
        };
        match key.screen.open(&frame.aad(), &frame.sealed) {
            Ok(payload) => {
                self.counters.screen_frames_opened += 1;
                Some(payload)
            }
            Err(e) => {
                self.count_failure(&e);
                None
            }
        }
    }

    fn count_failure(&mut self, e: &SframeError) {
        use crate::crypto::replay::ReplayError;
        match e {
            SframeError::Replay(ReplayError::Duplicate(_)) => self.counters.duplicate += 1,
            SframeError::Replay(ReplayError::TooOld { .. }) => self.counters.too_old += 1,
            _ => self.counters.unauthentic += 1,
        }
    }

    /// Opens an encrypted media packet (`header` parsed from its first bytes) into `out`,
    /// or counts why not.
    pub fn open(&mut self, header: MediaHeader, channel: ChannelId, packet: &[u8], out: &mut VecDeque<MediaFrame>) {
        if header.channel != channel {
            self.counters.misrouted += 1;
            return;
        }
        let Some(sframe_packet) = packet.get(MEDIA_HEADER_LEN..) else { return };
        let Ok(kid) = sframe::peek_kid(sframe_packet) else {
            self.counters.unauthentic += 1;
            return;
        };
        if kid >> 32 != u64::from(header.sender.0) {
            // A key id naming another sender than the header: never ours to open.
            self.counters.unauthentic += 1;
            return;
        }
        let key =
            self.peers.get_mut(&header.sender).and_then(|keys| keys.iter_mut().find(|k| k.opens(header.stream, kid)));
        let Some(key) = key else {
            if self.held.len() >= HELD_SENDERS && !self.held.contains_key(&header.sender) {
                self.counters.no_key += 1;
                return;
            }
            let held = self.held.entry(header.sender).or_default();
            if held.len() == HELD_PER_SENDER {
                held.pop_front();
                self.counters.no_key += 1;
            }
            held.push_back((header, packet.to_vec()));
            return;
        };
        match key.opener(header.stream).open(&packet[..MEDIA_HEADER_LEN], sframe_packet) {
            Ok(payload) => {
                self.counters.opened += 1;
                out.push_back(MediaFrame {
                    sender: header.sender,
                    stream: header.stream,
                    flags: header.flags,
                    sequence: header.sequence,
                    timestamp: header.timestamp,
                    payload,
                });
            }
            Err(e) => self.count_failure(&e),
        }
    }

    /// Packets still held for a key that never came count as unopened.
    pub fn counters(&self) -> MediaCounters {
        let held: usize = self.held.values().map(VecDeque::len).sum();
        MediaCounters { no_key: self.counters.no_key + held as u64, ..self.counters }
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods, reason = "the virtual clock starts at an arbitrary real instant")]
mod tests {
    use super::*;
    use rand::SeedableRng;

    const ALICE: SessionId = SessionId(1);
    const LOBBY: ChannelId = ChannelId(1);

    fn rng() -> rand::rngs::StdRng {
        rand::rngs::StdRng::seed_from_u64(5)
    }

    fn open(keys: &mut MediaKeys, datagram: &[u8]) -> Vec<MediaFrame> {
        let mut out = VecDeque::new();
        let (header, _) = MediaHeader::parse(datagram).unwrap();
        keys.open(header, LOBBY, datagram, &mut out);
        out.into()
    }

    /// Nonce uniqueness, through the real epoch logic: every packet sealed across senders,
    /// epochs, key exhaustion and restarts (a restart is a new `MediaKeys`, numbering
    /// epochs from 0 again) is under a (base key, key id, counter) never used before, so
    /// no AES key and nonce pair repeats.
    #[test]
    fn no_key_and_nonce_pair_repeats_across_epochs_senders_and_restarts() {
        use rand::Rng;
        let mut rng = rng();
        let mut seen = std::collections::HashSet::new();
        for _restart in 0..3 {
            for sender in [SessionId(1), SessionId(2), SessionId(u32::MAX)] {
                let mut keys = MediaKeys::default();
                for _epoch in 0..4 {
                    keys.start_epoch(sender, LOBBY, &mut rng);
                    for sequence in 0..rng.random_range(1..200) {
                        let base = keys.own_share().expect("in a channel").base_key;
                        let datagram = keys.seal(sender, StreamType::Voice, sequence, 0, b"x").unwrap();
                        let (header, _) = sframe::Header::parse(&datagram[MEDIA_HEADER_LEN..]).unwrap();
                        assert_eq!(header.kid >> 32, u64::from(sender.0));
                        assert!(seen.insert((*base, header.kid, header.ctr)), "a key and counter sealed twice");
                    }
                }
            }
        }
        assert!(seen.len() > 1000);
    }

    #[test]
    fn an_older_epoch_never_becomes_current_again() {
        let (mut alice, mut bob) = (MediaKeys::default(), MediaKeys::default());
        let old = alice.start_epoch(ALICE, LOBBY, &mut rng());
        let new = alice.start_epoch(ALICE, LOBBY, &mut rng());
        // The relay delivers the key messages the wrong way round.
        bob.install(ALICE, &new, LOBBY, &mut VecDeque::new());
        bob.install(ALICE, &old, LOBBY, &mut VecDeque::new());
        assert_eq!(bob.counters().stale_keys, 1);
        let datagram = alice.seal(ALICE, StreamType::Voice, 1, 0, b"now").unwrap();
        assert_eq!(open(&mut bob, &datagram)[0].payload, b"now", "the newer key stays current");
        // Someone who kept the old key cannot speak as alice with it.
        let mut former = MediaKeys { own: Some(OwnKey::new(ALICE, LOBBY, old.clone())), ..MediaKeys::default() };
        let forged = former.seal(ALICE, StreamType::Voice, 2, 0, b"forged").unwrap();
        assert!(open(&mut bob, &forged).is_empty());
        // Epoch numbers wrap: after 2^31 - 1 comes 0, which is newer.
        let mut wrapping = MediaKeys { next_epoch: EPOCH_MASK, ..MediaKeys::default() };
        let last = wrapping.start_epoch(ALICE, LOBBY, &mut rng());
        let first = wrapping.start_epoch(ALICE, LOBBY, &mut rng());
        let mut carol = MediaKeys::default();
        carol.install(ALICE, &last, LOBBY, &mut VecDeque::new());
        carol.install(ALICE, &first, LOBBY, &mut VecDeque::new());
        assert_eq!(carol.counters().stale_keys, 0);
        let datagram = wrapping.seal(ALICE, StreamType::Voice, 1, 0, b"wrapped").unwrap();
        assert_eq!(open(&mut carol, &datagram)[0].payload, b"wrapped");
    }

    #[test]
    fn desktop_audio_travels_under_the_screen_key_and_cannot_pass_for_voice() {
        let (mut alice, mut bob) = (MediaKeys::default(), MediaKeys::default());
        let share = alice.start_epoch(ALICE, LOBBY, &mut rng());
        bob.install(ALICE, &share, LOBBY, &mut VecDeque::new());
        let audio = alice.seal(ALICE, StreamType::ScreenAudio, 1, 90, b"music").unwrap();
        let (header, _) = sframe::Header::parse(&audio[MEDIA_HEADER_LEN..]).unwrap();
        assert_eq!(header.kid, screen_kid(ALICE.0, share.epoch));
        let voice = alice.seal(ALICE, StreamType::Voice, 1, 90, b"voice").unwrap();
        let (voice_header, _) = sframe::Header::parse(&voice[MEDIA_HEADER_LEN..]).unwrap();
        assert_eq!((voice_header.kid, voice_header.ctr), (media_kid(ALICE.0, share.epoch), 0), "voice's own counter");
        let frames = open(&mut bob, &audio);
        assert_eq!((frames[0].stream, &frames[0].payload[..]), (StreamType::ScreenAudio, &b"music"[..]));
        // Relabelled, neither opens as the other.
        let mut as_voice = alice.seal(ALICE, StreamType::ScreenAudio, 2, 0, b"x").unwrap();
        as_voice[1] = 1;
        let mut as_audio = alice.seal(ALICE, StreamType::Voice, 2, 0, b"x").unwrap();
        as_audio[1] = 4;
        assert!(open(&mut bob, &as_voice).is_empty() && open(&mut bob, &as_audio).is_empty());
    }

    #[test]
    fn a_packet_opens_once_and_only_where_it_was_sent() {
        let (mut alice, mut bob) = (MediaKeys::default(), MediaKeys::default());
        let share = alice.start_epoch(ALICE, LOBBY, &mut rng());
        bob.install(ALICE, &share, LOBBY, &mut VecDeque::new());
        let datagram = alice.seal(ALICE, StreamType::Voice, 7, 960, b"opus").unwrap();
        let frames = open(&mut bob, &datagram);
        assert_eq!(frames[0].payload, b"opus");
        assert_eq!((frames[0].sequence, frames[0].timestamp), (7, 960));
        assert!(open(&mut bob, &datagram).is_empty(), "a replay");
        assert_eq!(bob.counters().duplicate, 1);

        // The header is the AAD: another channel, sender or stream type does not open.
        for (offset, value) in [(1, 2u8), (7, 9), (11, 3)] {
            let mut moved = alice.seal(ALICE, StreamType::Voice, 8, 0, b"x").unwrap();
            moved[offset] = value;
            let (header, _) = MediaHeader::parse(&moved).unwrap();
            let mut out = VecDeque::new();
            bob.install(header.sender, &share, header.channel, &mut out);
            bob.open(header, header.channel, &moved, &mut out);
            assert!(out.is_empty(), "byte {offset} changed and the packet still opened");
        }
        assert!(bob.counters().unauthentic >= 2);
    }

    #[test]
    fn packets_before_their_key_are_held_and_opened_when_it_comes() {
        let (mut alice, mut bob) = (MediaKeys::default(), MediaKeys::default());
        let share = alice.start_epoch(ALICE, LOBBY, &mut rng());
        let early = alice.seal(ALICE, StreamType::Voice, 1, 0, b"early").unwrap();
        assert!(open(&mut bob, &early).is_empty());
        let mut out = VecDeque::new();
        bob.install(ALICE, &share, LOBBY, &mut out);
        assert_eq!(out.pop_front().unwrap().payload, b"early");
        assert_eq!(bob.counters().no_key, 0);
    }

    #[test]
    fn the_previous_key_works_for_the_grace_period_only() {
        let start = Instant::now();
        let (mut alice, mut bob) = (MediaKeys::default(), MediaKeys::default());
        let mut rng = rng();
        let old = alice.start_epoch(ALICE, LOBBY, &mut rng);
        bob.install(ALICE, &old, LOBBY, &mut VecDeque::new());
        let in_flight: Vec<_> = (0..3).map(|i| alice.seal(ALICE, StreamType::Voice, i, 0, b"old").unwrap()).collect();
        let new = alice.start_epoch(ALICE, LOBBY, &mut rng);
        bob.install(ALICE, &new, LOBBY, &mut VecDeque::new());
        bob.handle_timeout(start);
        assert_eq!(open(&mut bob, &in_flight[0]).len(), 1, "still inside the grace period");
        bob.handle_timeout(start + PREVIOUS_KEY_GRACE);
        assert!(open(&mut bob, &in_flight[1]).is_empty(), "after the grace period");
        let fresh = alice.seal(ALICE, StreamType::Voice, 4, 0, b"new").unwrap();
        assert_eq!(open(&mut bob, &fresh).len(), 1);
    }

    #[test]
    fn random_bytes_never_open_and_never_panic() {
        use rand::Rng;
        let mut rng = rng();
        let (mut alice, mut bob) = (MediaKeys::default(), MediaKeys::default());
        let share = alice.start_epoch(ALICE, LOBBY, &mut rng);
        bob.install(ALICE, &share, LOBBY, &mut VecDeque::new());
        let genuine = alice.seal(ALICE, StreamType::Voice, 1, 0, b"opus").unwrap();
        let mut out = VecDeque::new();
        for i in 0..20_000 {
            let mut packet = if i % 2 == 0 {
                let len = rng.random_range(0..200);
                (0..len).map(|_| rng.random()).collect::<Vec<u8>>()
            } else {
                let mut p = genuine.clone();
                let at = rng.random_range(0..p.len());
                p[at] = rng.random();
                p.truncate(rng.random_range(at..=p.len()));
                p
            };
            // Every sender id a datagram may name: held packets stay bounded.
            if packet.len() >= MEDIA_HEADER_LEN {
                packet[8..12].copy_from_slice(&rng.random_range(0u32..5000).to_be_bytes());
            }
            if let Ok((header, _)) = MediaHeader::parse(&packet) {
                bob.open(header, header.channel, &packet, &mut out);
            }
        }
        assert!(out.iter().all(|f| f.payload == b"opus"), "only the genuine packet can open");
        let held: usize = bob.held.values().map(VecDeque::len).sum();
        assert!(bob.held.len() <= HELD_SENDERS && held <= HELD_SENDERS * HELD_PER_SENDER);
    }

    #[test]
    fn a_forgotten_sender_opens_nothing() {
        let (mut alice, mut bob) = (MediaKeys::default(), MediaKeys::default());
        let share = alice.start_epoch(ALICE, LOBBY, &mut rng());
        bob.install(ALICE, &share, LOBBY, &mut VecDeque::new());
        bob.forget(ALICE);
        assert!(open(&mut bob, &alice.seal(ALICE, StreamType::Voice, 1, 0, b"x").unwrap()).is_empty());
        let mut out = VecDeque::new();
        let datagram = alice.seal(ALICE, StreamType::Voice, 2, 0, b"x").unwrap();
        let (header, _) = MediaHeader::parse(&datagram).unwrap();
        bob.open(header, ChannelId(9), &datagram, &mut out);
        assert_eq!(bob.counters().misrouted, 1);
    }
}
