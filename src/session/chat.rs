//! End-to-end encrypted chat inside the client session: pairwise sessions on demand,
//! our sender key per channel epoch, and the messages themselves. Everything the server
//! sees is ciphertext plus routing (to a session, to a channel).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use uuid::Uuid;
use zeroize::Zeroizing;

use super::history::{History, StoredMessage};
use super::media::MediaKeyShare;
use super::{Event, Session};
use crate::e2ee::{E2ee, E2eeError, IdentityStatus, Sealed, unix_millis};
use crate::protocol::bundle::PeerBundle;
use crate::protocol::{ChannelId, ClientMsg, ErrorCode, SessionId, canonical_name};

/// The longest chat message, in characters.
pub const MAX_TEXT_CHARS: usize = 5000;
/// Direct messages kept for one peer while its session cannot be used yet.
const MAX_QUEUED_PER_PEER: usize = 100;
/// Channel messages kept while members wait for our key.
const MAX_QUEUED_CHANNEL: usize = 100;
/// Joins and leaves in our channel start at most one new epoch of our keys per this
/// long, however many arrive: the rest wait for the next (and chat waits with them).
pub const REKEY_INTERVAL: Duration = Duration::from_secs(1);
/// A bundle fetch unanswered this long is asked again, each time waiting twice as long.
/// The answer comes on the reliable control stream, so only a refusal (over the fetch
/// rate) goes unanswered; a busy server or client is merely slow, and asking it again
/// sooner only adds to what it has to do.
const BUNDLE_ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest a channel message waits for members' keys: then it goes to everyone who
/// has ours, and the user hears who cannot read it. One member whose keys never come
/// (a stuck client, a relay that withholds a bundle) holds up nobody's chat for longer.
pub const CHANNEL_KEY_WAIT: Duration = Duration::from_secs(5);
/// Tries of a bundle fetch or a key delivery before the member is reported as unreachable.
const MAX_TRIES: u32 = 6;

/// The wait before try `attempt` (from 1) of something the server refused: 1 s doubling
/// to 16 s.
fn backoff(attempt: u32) -> Duration {
    Duration::from_secs(1 << attempt.saturating_sub(1).min(4))
}

/// Something to do again unless it succeeds first.
#[derive(Debug, Clone, Copy)]
struct Retry {
    due: Instant,
    /// Tries made so far.
    attempt: u32,
}

/// What travels inside a pairwise-encrypted message.
#[derive(Serialize, Deserialize)]
enum DirectPayload {
    Text {
        text: String,
        time_ms: u64,
    },
    /// The sender's keys from now on: for its channel messages (a sender-key
    /// distribution message, which names its own epoch) and for its media.
    SenderKey {
        message: Vec<u8>,
        media: MediaKeyShare,
    },
}

/// What travels inside a sender-key-encrypted channel message. The channel and the
/// sender's epoch are inside the encrypted, signed payload: a relay can neither relabel a
/// message as another channel's nor hold one back and deliver it epochs later.
#[derive(Serialize, Deserialize)]
struct ChannelPayload {
    text: String,
    time_ms: u64,
    channel: ChannelId,
    epoch: [u8; 16],
}

/// How long a sender's previous epoch still counts for its channel messages (those in
/// flight when it started a new one).
const PREVIOUS_EPOCH_GRACE: Duration = Duration::from_secs(5);

/// Plaintext sizes: every payload, pairwise or for a channel, is padded with zeros (which
/// postcard leaves unread after the value) to the smallest that fits, so that a length
/// tells only the bucket, and a key message looks like a short text.
const PAD_BUCKETS: [usize; 5] = [256, 1024, 4096, 16384, 24576];

/// `payload` encoded and padded to its bucket.
fn padded(payload: &impl Serialize) -> Zeroizing<Vec<u8>> {
    let encoded = Zeroizing::new(postcard::to_allocvec(payload).expect("payloads encode"));
    let bucket = PAD_BUCKETS.into_iter().find(|b| *b >= encoded.len()).unwrap_or(encoded.len());
    let mut out = Zeroizing::new(Vec::with_capacity(bucket));
    out.extend_from_slice(&encoded);
    out.resize(bucket, 0);
    out
}

/// A sender's epochs as its key messages told us: the current one, and the one before
/// with the instant from which it no longer counts.
#[derive(Debug, Clone, Copy)]
struct PeerEpoch {
    current: Uuid,
    previous: Option<(Uuid, Instant)>,
}

/// What a `Delivered` from the server answers, in order.
enum Sent {
    /// A message the user wrote: report how many it reached.
    Text,
    /// Our sender and media key for `distribution`, to `to`, on try `attempt`: retried
    /// if the server refused it.
    Key { to: SessionId, distribution: Uuid, attempt: u32 },
}

/// A channel message waiting for keys: where it was written, and since when.
struct Queued {
    channel: ChannelId,
    text: String,
    since: Instant,
}

/// The client's end-to-end encryption state within one server session.
pub struct Chat {
    e2ee: E2ee,
    rng: StdRng,
    /// `host:port`, the history's name for this server.
    server: String,
    /// The server's certificate fingerprint: peers' Signal addresses are `{this}/{name}`
    /// (the name in its canonical form), so pins, sessions and safety numbers belong to
    /// the server's identity, however its address was spelled.
    server_id: String,
    /// Our current sender key: the channel and its epoch.
    epoch: Option<(ChannelId, Uuid)>,
    /// When our current epoch started, and when the next is due (a join or leave in our
    /// channel came within [`REKEY_INTERVAL`] of the last one).
    last_rekey: Option<Instant>,
    rekey_due: Option<Instant>,
    /// Members who still need our current sender key (waiting for their bundle).
    need_sender_key: BTreeSet<SessionId>,
    /// Those of them our chat no longer waits for in this epoch ([`CHANNEL_KEY_WAIT`]).
    not_waited_for: BTreeSet<SessionId>,
    /// Bundle fetches under way: when to ask again, unanswered.
    awaiting_bundle: BTreeMap<SessionId, Retry>,
    /// Key deliveries the server refused: when to send again, and the tries so far.
    key_retries: BTreeMap<SessionId, Retry>,
    /// Each sender's current and previous epoch, for its channel messages.
    peer_epochs: BTreeMap<SessionId, PeerEpoch>,
    /// Members whose identity key changed and who the user has not accepted again: they
    /// get nothing from us (no sender key, no media key, no direct message).
    withheld: BTreeSet<SessionId>,
    /// Direct messages waiting for a session (a bundle, or the user's acceptance).
    queued: BTreeMap<SessionId, Vec<String>>,
    /// Channel messages written while some member still waits for our sender key (or a
    /// new epoch is due), with the channel they were written in: sent once everyone
    /// there has the key, so that nobody gets one they cannot read, or once the oldest
    /// has waited [`CHANNEL_KEY_WAIT`].
    queued_channel: Vec<Queued>,
    sent: VecDeque<Sent>,
    history: History,
    /// Whether the Signal state or the history changed since the shell last saved them.
    dirty: bool,
}

impl Chat {
    /// `server` names the server in the history (`host:port`); `server_id` is its
    /// certificate's fingerprint, which names it for identities.
    pub fn new(e2ee: E2ee, history: History, seed: [u8; 32], server: String, server_id: String) -> Chat {
        Chat {
            e2ee,
            rng: StdRng::from_seed(seed),
            server,
            server_id,
            epoch: None,
            last_rekey: None,
            rekey_due: None,
            need_sender_key: BTreeSet::new(),
            not_waited_for: BTreeSet::new(),
            awaiting_bundle: BTreeMap::new(),
            key_retries: BTreeMap::new(),
            peer_epochs: BTreeMap::new(),
            withheld: BTreeSet::new(),
            queued: BTreeMap::new(),
            queued_channel: Vec::new(),
            sent: VecDeque::new(),
            history,
            dirty: true,
        }
    }

    pub fn e2ee(&self) -> &E2ee {
        &self.e2ee
    }

    pub fn history(&self) -> &History {
        &self.history
    }

    fn record(&mut self, conversation: &str, from: &str, text: &str, time_ms: u64) {
        let key = format!("{}{conversation}", self.server);
        self.history.record(&key, StoredMessage { from: from.to_owned(), text: text.to_owned(), time_ms });
        self.dirty = true;
    }
}

impl Session {
    /// The Signal address of a user on this server: the server's identity and the
    /// user's name in its canonical form ("Bob" and "bob" are one person to pin).
    fn address(&self, session: SessionId) -> Option<String> {
        self.users.get(&session).map(|u| format!("{}/{}", self.chat.server_id, canonical_name(&u.name)))
    }

    /// Whether `session` is in the channel we are in (never when we are in none).
    fn in_our_channel(&self, session: SessionId) -> bool {
        let theirs = self.users.get(&session).and_then(|u| u.channel);
        theirs.is_some() && theirs == self.channel()
    }

    /// What we know of `session`'s identity, if there is anything to show (verified, or
    /// changed); never for ourselves.
    pub(super) fn trust_event(&self, session: SessionId) -> Option<Event> {
        let address = self.address(session).filter(|_| Some(session) != self.me)?;
        let verified = self.chat.e2ee.is_verified(&address);
        let identity_changed = self.chat.e2ee.identity_status(&address) == IdentityStatus::Changed;
        let user = self.users.get(&session)?.name.clone();
        (verified || identity_changed).then_some(Event::Trust { user, verified, identity_changed })
    }

    /// Whether the Signal state or the history changed since the last call; the shell
    /// then saves both.
    pub fn take_e2ee_changed(&mut self) -> bool {
        std::mem::take(&mut self.chat.dirty)
    }

    pub fn e2ee(&self) -> &E2ee {
        self.chat.e2ee()
    }

    pub fn history(&self) -> &History {
        self.chat.history()
    }

    /// Someone joined or left our channel: a new epoch now, or when the last is
    /// [`REKEY_INTERVAL`] old. Until then our voice goes under the current key (a leaver
    /// with a hostile relay could hear up to that long more) and our chat waits.
    pub(super) fn request_rekey(&mut self, now: Instant) {
        match self.chat.last_rekey {
            Some(last) if now < last + REKEY_INTERVAL => {
                self.chat.rekey_due.get_or_insert(last + REKEY_INTERVAL);
            }
            _ => self.rekey(now),
        }
    }

    /// Starts a new epoch of our sender key for the channel we are in (or ends it when
    /// we are in none) and gives it to every other member: after a leave, the leaver
    /// does not get it; after a join, the newcomer gets only this one.
    pub(super) fn rekey(&mut self, now: Instant) {
        self.chat.need_sender_key.clear();
        self.chat.not_waited_for.clear();
        self.chat.key_retries.clear();
        self.chat.rekey_due = None;
        self.chat.last_rekey = Some(now);
        let (Some(channel), Some(me)) = (self.channel(), self.me) else {
            self.chat.epoch = None;
            self.media.clear();
            return self.flush_channel_queue(now);
        };
        let distribution = Uuid::from_bytes(self.chat.rng.random());
        self.chat.epoch = Some((channel, distribution));
        self.media.start_epoch(me, channel, &mut self.chat.rng);
        // The sender key exists from the epoch's start, so that a message to a channel
        // nobody else is in yet is sent (to nobody), not refused.
        if let Some(address) = self.address(me)
            && let Err(e) = self.chat.e2ee.sender_key_distribution(&address, distribution, &mut self.chat.rng)
        {
            self.events.push_back(Event::local_error("e2ee", e));
        }
        let members: Vec<SessionId> = self
            .users
            .values()
            .filter(|u| u.channel == Some(channel) && Some(u.session) != self.me)
            .map(|u| u.session)
            .collect();
        for member in members {
            self.send_sender_key(member, now, 1);
        }
        self.flush_channel_queue(now);
    }

    /// Sends the channel messages that waited, once every member has our key or the
    /// oldest has waited [`CHANNEL_KEY_WAIT`] (then [`Event::WentWithoutKeys`] says who
    /// cannot read them); those written in a channel we have left since are dropped, and
    /// said so.
    fn flush_channel_queue(&mut self, now: Instant) {
        let Some(oldest) = self.chat.queued_channel.first().map(|q| q.since) else { return };
        let waited_out = now >= oldest + CHANNEL_KEY_WAIT;
        if self.chat.rekey_due.is_some() || (self.awaiting_keys() && !waited_out) {
            return;
        }
        let current = self.chat.epoch.map(|(channel, _)| channel);
        let late = self.waiting_for();
        if let Some(channel) = current
            && !late.is_empty()
        {
            let channel = self.channel_name(channel);
            self.events.push_back(Event::WentWithoutKeys { channel, members: late });
            // Nothing more waits for them in this epoch; their key still goes when it can.
            self.chat.not_waited_for.extend(self.chat.need_sender_key.iter().copied());
        }
        for Queued { channel, text, .. } in std::mem::take(&mut self.chat.queued_channel) {
            if Some(channel) == current {
                self.send_channel_text(text, now);
            } else {
                let name = self.channel_name(channel);
                self.events.push_back(Event::local_error(
                    "not_sent",
                    format!("you left {name} before your message could go: {text:?} was not sent"),
                ));
            }
        }
    }

    /// Whether our channel messages wait for some member's keys.
    fn awaiting_keys(&self) -> bool {
        self.chat.need_sender_key.iter().any(|m| !self.chat.not_waited_for.contains(m))
    }

    /// The members our channel messages wait for, by name.
    fn waiting_for(&self) -> Vec<String> {
        let awaited = self.chat.need_sender_key.iter().filter(|m| !self.chat.not_waited_for.contains(m));
        awaited.filter_map(|s| self.users.get(s)).map(|u| u.name.clone()).collect()
    }

    fn send_sender_key(&mut self, member: SessionId, now: Instant, attempt: u32) {
        if self.chat.withheld.contains(&member) {
            return;
        }
        let (Some((_, distribution)), Some(media)) = (self.chat.epoch, self.media.own_share()) else { return };
        let (Some(me), Some(peer)) = (self.me.and_then(|me| self.address(me)), self.address(member)) else { return };
        if !self.chat.e2ee.has_session(&peer) {
            self.chat.need_sender_key.insert(member);
            self.fetch_bundle(member, now);
            return;
        }
        let message = match self.chat.e2ee.sender_key_distribution(&me, distribution, &mut self.chat.rng) {
            Ok(message) => message,
            Err(e) => return self.events.push_back(Event::local_error("e2ee", e)),
        };
        let payload = DirectPayload::SenderKey { message, media };
        self.send_direct(member, &payload, Sent::Key { to: member, distribution, attempt }, now);
    }

    fn fetch_bundle(&mut self, peer: SessionId, now: Instant) {
        if let std::collections::btree_map::Entry::Vacant(entry) = self.chat.awaiting_bundle.entry(peer) {
            entry.insert(Retry { due: now + BUNDLE_ANSWER_TIMEOUT, attempt: 1 });
            self.transmit.push_back(ClientMsg::FetchBundle { peer });
        }
    }

    /// The next time [`Session::chat_timeout`] has something to do.
    pub(super) fn chat_poll_timeout(&self) -> Option<Instant> {
        let retries = self.chat.awaiting_bundle.values().chain(self.chat.key_retries.values()).map(|r| r.due);
        // While an epoch is due the queue waits for it (which flushes it), not for the clock.
        let waited_out = self.chat.queued_channel.first().map(|q| q.since + CHANNEL_KEY_WAIT);
        let waited_out = waited_out.filter(|_| self.chat.rekey_due.is_none());
        retries.chain(self.chat.rekey_due).chain(waited_out).min()
    }

    /// Starts a due epoch, asks again for bundles that got no answer, sends again the
    /// keys the server refused, and sends channel messages that waited long enough; a
    /// member still unreachable after [`MAX_TRIES`] is reported and no longer waited for.
    pub(super) fn chat_timeout(&mut self, now: Instant) {
        if self.chat.rekey_due.is_some_and(|due| due <= now) {
            self.rekey(now);
        }
        self.flush_channel_queue(now);
        let unanswered: Vec<(SessionId, Retry)> =
            self.chat.awaiting_bundle.iter().filter(|(_, r)| r.due <= now).map(|(s, r)| (*s, *r)).collect();
        for (peer, retry) in unanswered {
            if retry.attempt >= MAX_TRIES {
                self.chat.awaiting_bundle.remove(&peer);
                self.unreachable(peer, now);
                continue;
            }
            let wait = BUNDLE_ANSWER_TIMEOUT * (1 << retry.attempt.min(4));
            self.chat.awaiting_bundle.insert(peer, Retry { due: now + wait, attempt: retry.attempt + 1 });
            self.transmit.push_back(ClientMsg::FetchBundle { peer });
        }
        let due: Vec<(SessionId, u32)> =
            self.chat.key_retries.iter().filter(|(_, r)| r.due <= now).map(|(s, r)| (*s, r.attempt)).collect();
        for (member, attempt) in due {
            self.chat.key_retries.remove(&member);
            if self.in_our_channel(member) {
                self.send_sender_key(member, now, attempt + 1);
            }
        }
    }

    /// `peer` went offline: nothing more is asked or retried for that session, and direct
    /// messages still waiting for it are reported as not sent.
    pub(super) fn forget_peer(&mut self, peer: SessionId) {
        self.chat.awaiting_bundle.remove(&peer);
        self.chat.key_retries.remove(&peer);
        self.chat.withheld.remove(&peer);
        self.chat.peer_epochs.remove(&peer);
        if let Some(waiting) = self.chat.queued.remove(&peer) {
            let name = self.users.get(&peer).map_or_else(|| format!("session {}", peer.0), |u| u.name.clone());
            self.events.push_back(Event::local_error(
                "not_sent",
                format!("{name} went offline: {} direct messages to them were not sent", waiting.len()),
            ));
        }
    }

    /// No keys could be had for `peer`: say so, and let what waited for it go on.
    fn unreachable(&mut self, peer: SessionId, now: Instant) {
        self.chat.need_sender_key.remove(&peer);
        let name = self.users.get(&peer).map_or_else(|| format!("session {}", peer.0), |u| u.name.clone());
        let dropped = self.chat.queued.remove(&peer).map_or(0, |q| q.len());
        self.events.push_back(Event::local_error(
            "keys_unavailable",
            format!(
                "no encryption keys could be exchanged with {name} after {MAX_TRIES} tries; they cannot read your \
                 messages or hear you ({dropped} direct messages to them not sent)"
            ),
        ));
        self.flush_channel_queue(now);
    }

    fn send_direct(&mut self, to: SessionId, payload: &DirectPayload, kind: Sent, now: Instant) {
        let Some(peer) = self.address(to) else { return };
        let plaintext = padded(payload);
        let wall = self.wall(now);
        match self.chat.e2ee.encrypt(&peer, &plaintext, wall, &mut self.chat.rng) {
            Ok(sealed) => {
                let ciphertext = postcard::to_allocvec(&sealed).expect("sealed messages encode");
                self.transmit.push_back(ClientMsg::Direct { to, ciphertext });
                self.chat.sent.push_back(kind);
                self.chat.dirty = true;
            }
            Err(E2eeError::UntrustedIdentity(_)) => self.withhold(to),
            Err(e) => self.events.push_back(Event::local_error("e2ee", e)),
        }
    }

    /// `peer`'s identity key changed: send it nothing until the user accepts the new key,
    /// and let the channel go on without it.
    fn withhold(&mut self, peer: SessionId) {
        if !self.chat.withheld.insert(peer) {
            return;
        }
        self.chat.need_sender_key.remove(&peer);
        if let Some(user) = self.users.get(&peer).map(|u| u.name.clone()) {
            self.events.push_back(Event::IdentityChanged { user });
        }
    }

    /// A peer's bundle arrived: set up the session, then send what waited for it. A peer
    /// without keys cannot take part in encrypted chat: nothing waits for it any longer.
    pub(super) fn bundle_arrived(&mut self, peer: SessionId, bundle: Option<&PeerBundle>, now: Instant) {
        self.chat.awaiting_bundle.remove(&peer);
        let Some(address) = self.address(peer) else { return };
        let Some(bundle) = bundle else {
            self.chat.need_sender_key.remove(&peer);
            if self.chat.queued.remove(&peer).is_some() {
                let user = self.users[&peer].name.clone();
                self.events
                    .push_back(Event::local_error("no_keys", format!("{user} has published no encryption keys")));
            }
            return self.flush_channel_queue(now);
        };
        let wall = self.wall(now);
        match self.chat.e2ee.start_session(&address, bundle, wall, &mut self.chat.rng) {
            Ok(IdentityStatus::Changed) => {
                self.chat.dirty = true;
                self.withhold(peer);
                return self.flush_channel_queue(now);
            }
            Ok(IdentityStatus::Trusted) => {}
            Err(e) => return self.events.push_back(Event::local_error("e2ee", e)),
        }
        self.chat.dirty = true;
        if self.chat.need_sender_key.remove(&peer) && self.in_our_channel(peer) {
            self.send_sender_key(peer, now, 1);
        }
        self.flush_channel_queue(now);
        for text in self.chat.queued.remove(&peer).unwrap_or_default() {
            self.send_text_direct(peer, text, now);
        }
    }

    /// `/msg NAME TEXT`.
    pub(super) fn message_user(&mut self, name: &str, text: String, now: Instant) {
        if let Err(event) = check_text(&text) {
            return self.events.push_back(event);
        }
        let Some(peer) = self.user_session(name) else {
            return self.events.push_back(Event::local_error("no_such_user", format!("{name} is not online")));
        };
        let has_session = self.address(peer).is_some_and(|a| self.chat.e2ee.has_session(&a));
        if has_session {
            return self.send_text_direct(peer, text, now);
        }
        let queue = self.chat.queued.entry(peer).or_default();
        if queue.len() >= MAX_QUEUED_PER_PEER {
            return self.events.push_back(Event::local_error(
                "queue_full",
                format!("{MAX_QUEUED_PER_PEER} messages to {name} are waiting already; this one was not sent"),
            ));
        }
        queue.push(text);
        if self.chat.withheld.contains(&peer) {
            let user = self.users[&peer].name.clone();
            return self.events.push_back(Event::local_error(
                "identity_changed",
                format!(
                    "{user}'s identity key changed: your message waits until you compare safety numbers (/safety \
                     {user}) and accept the new key (/verify {user})"
                ),
            ));
        }
        self.fetch_bundle(peer, now);
    }

    fn send_text_direct(&mut self, peer: SessionId, text: String, now: Instant) {
        let time_ms = unix_millis(self.wall(now));
        if let Some(peer_name) = self.users.get(&peer).map(|u| u.name.clone()) {
            let me = self.name.clone();
            self.chat.record(&format!("@{peer_name}"), &me, &text, time_ms);
        }
        let payload = DirectPayload::Text { text, time_ms };
        self.send_direct(peer, &payload, Sent::Text, now);
    }

    /// A line typed without a slash: to everyone in our channel. It waits (and says for
    /// whom) while a member has no key of ours yet or a new epoch is due.
    pub(super) fn say(&mut self, text: String, now: Instant) {
        if let Err(event) = check_text(&text) {
            return self.events.push_back(event);
        }
        let Some((channel, _)) = self.chat.epoch else {
            return self.events.push_back(Event::local_error("not_in_channel", "join a channel to talk in it"));
        };
        if self.awaiting_keys() || self.chat.rekey_due.is_some() {
            if self.chat.queued_channel.len() >= MAX_QUEUED_CHANNEL {
                return self.events.push_back(Event::local_error(
                    "queue_full",
                    format!("{MAX_QUEUED_CHANNEL} messages are waiting for keys already; this one was not sent"),
                ));
            }
            self.chat.queued_channel.push(Queued { channel, text, since: now });
            let members = self.waiting_for();
            return self.events.push_back(Event::WaitingForKeys { channel: self.channel_name(channel), members });
        }
        self.send_channel_text(text, now);
    }

    /// Seals `text` under our current sender key for our channel, and sends it.
    fn send_channel_text(&mut self, text: String, now: Instant) {
        let (Some((channel, distribution)), Some(me)) = (self.chat.epoch, self.me.and_then(|me| self.address(me)))
        else {
            return;
        };
        let time_ms = unix_millis(self.wall(now));
        let (conversation, my_name) = (format!("#{}", self.channel_name(channel)), self.name.clone());
        self.chat.record(&conversation, &my_name, &text, time_ms);
        let payload = padded(&ChannelPayload { text, time_ms, channel, epoch: *distribution.as_bytes() });
        match self.chat.e2ee.group_encrypt(&me, distribution, &payload, &mut self.chat.rng) {
            Ok(ciphertext) => {
                self.transmit.push_back(ClientMsg::Channel { channel, ciphertext });
                self.chat.sent.push_back(Sent::Text);
                self.chat.dirty = true;
            }
            Err(e) => self.events.push_back(Event::local_error("e2ee", e)),
        }
    }

    pub(super) fn direct_arrived(&mut self, from: SessionId, ciphertext: &[u8], now: Instant) {
        let (Some(peer), Some(user)) = (self.address(from), self.users.get(&from).map(|u| u.name.clone())) else {
            return self.events.push_back(Event::local_error("undecryptable", "a message from an unknown sender"));
        };
        let opened = postcard::from_bytes::<Sealed>(ciphertext)
            .map_err(|e| e.to_string())
            .and_then(|sealed| self.chat.e2ee.decrypt(&peer, &sealed, &mut self.chat.rng).map_err(|e| e.to_string()));
        let opened = match opened {
            Ok(opened) => opened,
            Err(e) => return self.events.push_back(Event::local_error("undecryptable", format!("from {user}: {e}"))),
        };
        self.chat.dirty = true;
        if self.chat.e2ee.has_session(&peer) {
            // It came under the pinned key: whoever holds that is still there, so what we
            // held back from this member goes to that key again.
            if self.chat.withheld.remove(&from) && self.in_our_channel(from) {
                self.send_sender_key(from, now, 1);
            }
        } else if opened.identity == IdentityStatus::Changed {
            self.withhold(from);
        }
        // The plaintext may hold key material: wiped when dropped.
        let plaintext = Zeroizing::new(opened.plaintext);
        match postcard::from_bytes::<DirectPayload>(&plaintext) {
            Ok(DirectPayload::Text { text, .. }) if check_text(&text).is_err() => {
                self.events.push_back(too_long_from(&user, &text));
            }
            Ok(DirectPayload::Text { text, time_ms }) => {
                self.chat.record(&format!("@{user}"), &user, &text, time_ms);
                let event = self.message_event(&peer, user, None, text, time_ms, now);
                self.events.push_back(event);
            }
            Ok(DirectPayload::SenderKey { message, media }) => {
                match self.chat.e2ee.accept_sender_key(&peer, &message) {
                    Ok(epoch) => self.new_peer_epoch(from, epoch, now),
                    Err(e) => {
                        self.events
                            .push_back(Event::local_error("undecryptable", format!("sender key from {user}: {e}")));
                    }
                }
                if let Some(channel) = self.channel() {
                    self.media.install(from, &media, channel, &mut self.media_out);
                }
            }
            Err(e) => self.events.push_back(Event::local_error("undecryptable", format!("from {user}: {e}"))),
        }
    }

    /// `from` started `epoch`: it is current, the one before still counts a few seconds.
    fn new_peer_epoch(&mut self, from: SessionId, epoch: Uuid, now: Instant) {
        let known = self.chat.peer_epochs.get(&from).copied();
        let previous = match known {
            Some(known) if known.current != epoch => Some((known.current, now + PREVIOUS_EPOCH_GRACE)),
            Some(known) => known.previous,
            None => None,
        };
        self.chat.peer_epochs.insert(from, PeerEpoch { current: epoch, previous });
    }

    /// Whether `epoch` is `from`'s current one, or its previous one still within grace.
    fn is_live_epoch(&self, from: SessionId, epoch: Uuid, now: Instant) -> bool {
        self.chat.peer_epochs.get(&from).is_some_and(|known| {
            known.current == epoch || known.previous.is_some_and(|(old, until)| old == epoch && now < until)
        })
    }

    /// A channel message, shown only if it says (inside the encryption) that it was
    /// written in this channel, which is ours, under the sender's live epoch.
    pub(super) fn channel_message_arrived(
        &mut self,
        from: SessionId,
        channel: ChannelId,
        ciphertext: &[u8],
        now: Instant,
    ) {
        let (Some(peer), Some(user)) = (self.address(from), self.users.get(&from).map(|u| u.name.clone())) else {
            return self.events.push_back(Event::local_error("undecryptable", "a message from an unknown sender"));
        };
        // Sealed under a key the sender never gave us: written for the members before we
        // came (the relay passed it on as we joined), so not for us to read, and no error.
        if let Some(distribution) = E2ee::group_message_distribution(ciphertext) {
            let known =
                self.chat.peer_epochs.get(&from).is_some_and(|k| {
                    k.current == distribution || k.previous.is_some_and(|(old, _)| old == distribution)
                });
            if !known {
                return;
            }
        }
        let payload = self
            .chat
            .e2ee
            .group_decrypt(&peer, ciphertext)
            .map(Zeroizing::new)
            .map_err(|e| e.to_string())
            .and_then(|plain| postcard::from_bytes::<ChannelPayload>(&plain).map_err(|e| e.to_string()));
        match payload {
            Ok(payload) if payload.channel != channel || Some(channel) != self.channel() => {
                let (said, labelled) = (self.channel_name(payload.channel), self.channel_name(channel));
                self.events.push_back(Event::local_error(
                    "misrouted",
                    format!("a message from {user} written in {said} came labelled {labelled}; dropped"),
                ));
            }
            Ok(payload) if !self.is_live_epoch(from, Uuid::from_bytes(payload.epoch), now) => {
                self.events.push_back(Event::local_error(
                    "stale_message",
                    format!("a message from {user} under a key it no longer uses came late; dropped"),
                ));
            }
            Ok(ChannelPayload { text, .. }) if check_text(&text).is_err() => {
                self.events.push_back(too_long_from(&user, &text));
            }
            Ok(ChannelPayload { text, time_ms, .. }) => {
                self.chat.dirty = true;
                let name = self.channel_name(channel);
                self.chat.record(&format!("#{name}"), &user, &text, time_ms);
                let event = self.message_event(&peer, user, Some(name), text, time_ms, now);
                self.events.push_back(event);
            }
            Err(e) => self.events.push_back(Event::local_error("undecryptable", format!("from {user}: {e}"))),
        }
    }

    fn message_event(
        &self,
        peer: &str,
        from: String,
        channel: Option<String>,
        text: String,
        time_ms: u64,
        now: Instant,
    ) -> Event {
        let e2ee = &self.chat.e2ee;
        Event::Message {
            from,
            dm: channel.is_none(),
            channel,
            text,
            time_ms,
            received_ms: unix_millis(self.wall(now)),
            verified: e2ee.is_verified(peer),
            identity_changed: e2ee.identity_status(peer) == IdentityStatus::Changed,
        }
    }

    /// The server's count for our oldest message still unanswered. A key delivery that
    /// reached nobody (the server refused it, say for our rate) is sent again later, as
    /// long as the member is still in our channel and the epoch is still ours.
    pub(super) fn delivered(&mut self, reached: u32, total: u32, now: Instant) {
        match self.chat.sent.pop_front() {
            Some(Sent::Text) => self.events.push_back(Event::Delivered { reached, total }),
            Some(Sent::Key { to, distribution, attempt }) if reached == 0 => {
                self.key_refused(to, distribution, attempt, now)
            }
            Some(Sent::Key { .. }) | None => {}
        }
    }

    /// The server refused a message of ours: the user hears why if they wrote it; our
    /// key deliveries are tried again (or let go, for a member who has left) without a
    /// word, since the user did not ask for them.
    pub(super) fn not_delivered(&mut self, code: ErrorCode, message: String, now: Instant) {
        match self.chat.sent.pop_front() {
            Some(Sent::Text) => self.events.push_back(Event::Error { code: code.as_str().to_owned(), message }),
            Some(Sent::Key { to, distribution, attempt }) => self.key_refused(to, distribution, attempt, now),
            None => {}
        }
    }

    fn key_refused(&mut self, to: SessionId, distribution: Uuid, attempt: u32, now: Instant) {
        let current = self.chat.epoch.is_some_and(|(_, d)| d == distribution);
        if !(current && self.in_our_channel(to)) {
            return;
        }
        if attempt >= MAX_TRIES {
            return self.unreachable(to, now);
        }
        self.chat.key_retries.insert(to, Retry { due: now + backoff(attempt), attempt });
    }

    /// The server holds only `published` of our one-time keys (EC, Kyber): make and
    /// upload enough new ones to fill its pool again.
    pub(super) fn keys_low(&mut self, now: Instant, published: (u32, u32)) {
        let published = (published.0 as usize, published.1 as usize);
        let wall = self.wall(now);
        match self.chat.e2ee.replenish(&mut self.chat.rng, wall, published) {
            Ok((one_time, kyber_one_time)) => {
                self.chat.dirty = true;
                self.transmit.push_back(ClientMsg::AddOneTimeKeys { one_time, kyber_one_time });
            }
            Err(e) => self.events.push_back(Event::local_error("e2ee", e)),
        }
    }

    /// Signs the welcome's challenge with our identity key (an admin's proof; the server
    /// looks only at those from keys it lists) and returns our identity fingerprint.
    pub(super) fn prove_admin(&mut self, session: SessionId, challenge: &[u8; 32]) -> String {
        let identity = self.chat.e2ee.identity_fingerprint().map(|f| f.to_string()).unwrap_or_default();
        let Ok(server) = self.chat.server_id.parse::<crate::protocol::Fingerprint>() else { return identity };
        let message = crate::protocol::admin_proof_message(&server, challenge, session);
        match self.chat.e2ee.sign_with_identity(&message, &mut self.chat.rng) {
            Ok(signature) => self.transmit.push_back(ClientMsg::ProveAdmin { signature }),
            Err(e) => self.events.push_back(Event::local_error("admin_proof", e.to_string())),
        }
        identity
    }

    /// `/safety NAME`: the safety number to compare out of band.
    pub(super) fn safety(&mut self, name: &str) {
        let Some(user) = self.user_session(name).and_then(|s| self.users.get(&s)) else {
            return self.events.push_back(Event::local_error("no_such_user", format!("{name} is not online")));
        };
        let (Some(me), Some(peer)) = (self.me.and_then(|me| self.address(me)), self.address(user.session)) else {
            return;
        };
        let user = user.name.clone();
        let event = match self.chat.e2ee.safety_number(&me, &peer) {
            Ok(number) => Event::Safety {
                identity_changed: self.chat.e2ee.identity_status(&peer) == IdentityStatus::Changed,
                verified: self.chat.e2ee.is_verified(&peer),
                user,
                number,
            },
            Err(e) => {
                Event::local_error("no_identity", format!("no keys from {user} yet ({e}); exchange a message first"))
            }
        };
        self.events.push_back(event);
    }

    /// `/verify NAME`: the user compared the safety number and accepts the identity.
    pub(super) fn verify(&mut self, name: &str, now: Instant) {
        let Some(user) = self.user_session(name) else {
            return self.events.push_back(Event::local_error("no_such_user", format!("{name} is not online")));
        };
        let Some(peer) = self.address(user) else { return };
        self.chat.e2ee.accept_identity(&peer);
        self.chat.dirty = true;
        self.safety(name);
        // What was withheld goes now, under a session with the accepted key.
        self.chat.withheld.remove(&user);
        if self.chat.e2ee.has_session(&peer) {
            for text in self.chat.queued.remove(&user).unwrap_or_default() {
                self.send_text_direct(user, text, now);
            }
        } else if self.chat.queued.contains_key(&user) {
            self.fetch_bundle(user, now);
        }
        if self.in_our_channel(user) {
            self.send_sender_key(user, now, 1);
        }
    }
}

/// A peer sent more than any client of ours would: not shown, not kept.
fn too_long_from(user: &str, text: &str) -> Event {
    let chars = text.chars().count();
    Event::local_error("message_too_long", format!("{user} sent a message of {chars} characters; it was dropped"))
}

fn check_text(text: &str) -> Result<(), Event> {
    let chars = text.chars().count();
    if chars > MAX_TEXT_CHARS {
        return Err(Event::local_error(
            "message_too_long",
            format!("a message may have at most {MAX_TEXT_CHARS} characters, not {chars}"),
        ));
    }
    Ok(())
}
