//! End-to-end encrypted chat inside the client session: pairwise sessions on demand,
//! our sender key per channel epoch, and the messages themselves. Everything the server
//! sees is ciphertext plus routing (to a session, to a channel).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::SystemTime;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::history::{History, StoredMessage};
use super::media::MediaKeyShare;
use super::{Event, Session};
use crate::e2ee::{E2ee, E2eeError, IdentityStatus, Sealed, unix_millis};
use crate::protocol::bundle::PeerBundle;
use crate::protocol::{ChannelId, ClientMsg, SessionId};

/// The longest chat message, in characters.
pub const MAX_TEXT_CHARS: usize = 5000;
/// Direct messages kept for one peer while its session cannot be used yet.
const MAX_QUEUED_PER_PEER: usize = 100;

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

/// What travels inside a sender-key-encrypted channel message.
#[derive(Serialize, Deserialize)]
struct ChannelPayload {
    text: String,
    time_ms: u64,
}

/// What a `Delivered` from the server answers, in order.
enum Sent {
    /// A message the user wrote: report how many it reached.
    Text,
    /// Key material: nothing to report.
    Key,
}

/// The client's end-to-end encryption state within one server session.
pub struct Chat {
    e2ee: E2ee,
    rng: StdRng,
    /// `host:port`, so that pinned identities are per server.
    server: String,
    /// Our current sender key: the channel and its epoch.
    epoch: Option<(ChannelId, Uuid)>,
    /// Members who still need our current sender key (waiting for their bundle).
    need_sender_key: BTreeSet<SessionId>,
    awaiting_bundle: BTreeSet<SessionId>,
    /// Members whose identity key changed and who the user has not accepted again: they
    /// get nothing from us (no sender key, no media key, no direct message).
    withheld: BTreeSet<SessionId>,
    /// Direct messages waiting for a session (a bundle, or the user's acceptance).
    queued: BTreeMap<SessionId, Vec<String>>,
    /// Channel messages written while some member still waits for our sender key:
    /// sent once everyone has it, so that nobody gets one they cannot read.
    queued_channel: Vec<String>,
    sent: VecDeque<Sent>,
    history: History,
    /// Whether the Signal state or the history changed since the shell last saved them.
    dirty: bool,
}

impl Chat {
    pub fn new(e2ee: E2ee, history: History, seed: [u8; 32], server: String) -> Chat {
        Chat {
            e2ee,
            rng: StdRng::from_seed(seed),
            server,
            epoch: None,
            need_sender_key: BTreeSet::new(),
            awaiting_bundle: BTreeSet::new(),
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
    /// The Signal address of a user on this server.
    fn address(&self, session: SessionId) -> Option<String> {
        self.users.get(&session).map(|u| format!("{}/{}", self.chat.server, u.name))
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

    /// Starts a new epoch of our sender key for the channel we are in (or ends it when
    /// we are in none) and gives it to every other member: after a leave, the leaver
    /// does not get it; after a join, the newcomer gets only this one.
    pub(super) fn rekey(&mut self, now: SystemTime) {
        self.chat.need_sender_key.clear();
        let (Some(channel), Some(me)) = (self.channel(), self.me) else {
            self.chat.epoch = None;
            self.media.clear();
            return;
        };
        self.chat.epoch = Some((channel, Uuid::from_bytes(self.chat.rng.random())));
        self.media.start_epoch(me, channel, &mut self.chat.rng);
        let members: Vec<SessionId> = self
            .users
            .values()
            .filter(|u| u.channel == Some(channel) && Some(u.session) != self.me)
            .map(|u| u.session)
            .collect();
        for member in members {
            self.send_sender_key(member, now);
        }
        self.flush_channel_queue(now);
    }

    fn flush_channel_queue(&mut self, now: SystemTime) {
        if self.chat.need_sender_key.is_empty() {
            for text in std::mem::take(&mut self.chat.queued_channel) {
                self.say(text, now);
            }
        }
    }

    fn send_sender_key(&mut self, member: SessionId, now: SystemTime) {
        if self.chat.withheld.contains(&member) {
            return;
        }
        let (Some((_, distribution)), Some(media)) = (self.chat.epoch, self.media.own_share()) else { return };
        let (Some(me), Some(peer)) = (self.me.and_then(|me| self.address(me)), self.address(member)) else { return };
        if !self.chat.e2ee.has_session(&peer) {
            self.chat.need_sender_key.insert(member);
            self.fetch_bundle(member);
            return;
        }
        let message = match self.chat.e2ee.sender_key_distribution(&me, distribution, &mut self.chat.rng) {
            Ok(message) => message,
            Err(e) => return self.events.push_back(Event::local_error("e2ee", e)),
        };
        let payload = DirectPayload::SenderKey { message, media };
        self.send_direct(member, &payload, Sent::Key, now);
    }

    fn fetch_bundle(&mut self, peer: SessionId) {
        if self.chat.awaiting_bundle.insert(peer) {
            self.transmit.push_back(ClientMsg::FetchBundle { peer });
        }
    }

    fn send_direct(&mut self, to: SessionId, payload: &DirectPayload, kind: Sent, now: SystemTime) {
        let Some(peer) = self.address(to) else { return };
        let plaintext = postcard::to_allocvec(payload).expect("payloads encode");
        match self.chat.e2ee.encrypt(&peer, &plaintext, now, &mut self.chat.rng) {
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
    pub(super) fn bundle_arrived(&mut self, peer: SessionId, bundle: Option<&PeerBundle>, now: SystemTime) {
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
        match self.chat.e2ee.start_session(&address, bundle, now, &mut self.chat.rng) {
            Ok(IdentityStatus::Changed) => {
                self.chat.dirty = true;
                self.withhold(peer);
                return self.flush_channel_queue(now);
            }
            Ok(IdentityStatus::Trusted) => {}
            Err(e) => return self.events.push_back(Event::local_error("e2ee", e)),
        }
        self.chat.dirty = true;
        if self.chat.need_sender_key.remove(&peer) && self.users.get(&peer).and_then(|u| u.channel) == self.channel() {
            self.send_sender_key(peer, now);
        }
        self.flush_channel_queue(now);
        for text in self.chat.queued.remove(&peer).unwrap_or_default() {
            self.send_text_direct(peer, text, now);
        }
    }

    /// `/msg NAME TEXT`.
    pub(super) fn message_user(&mut self, name: &str, text: String, now: SystemTime) {
        if let Err(event) = check_text(&text) {
            return self.events.push_back(event);
        }
        let Some(peer) = self.users.values().find(|u| u.name.eq_ignore_ascii_case(name)).map(|u| u.session) else {
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
        self.fetch_bundle(peer);
    }

    fn send_text_direct(&mut self, peer: SessionId, text: String, now: SystemTime) {
        if let Some(peer_name) = self.users.get(&peer).map(|u| u.name.clone()) {
            let me = self.name.clone();
            self.chat.record(&format!("@{peer_name}"), &me, &text, unix_millis(now));
        }
        let payload = DirectPayload::Text { text, time_ms: unix_millis(now) };
        self.send_direct(peer, &payload, Sent::Text, now);
    }

    /// A line typed without a slash: to everyone in our channel.
    pub(super) fn say(&mut self, text: String, now: SystemTime) {
        if let Err(event) = check_text(&text) {
            return self.events.push_back(event);
        }
        let (Some((channel, distribution)), Some(me)) = (self.chat.epoch, self.me.and_then(|me| self.address(me)))
        else {
            return self.events.push_back(Event::local_error("not_in_channel", "join a channel to talk in it"));
        };
        if !self.chat.need_sender_key.is_empty() {
            return self.chat.queued_channel.push(text);
        }
        let (conversation, my_name) = (format!("#{}", self.channel_name(channel)), self.name.clone());
        self.chat.record(&conversation, &my_name, &text, unix_millis(now));
        let payload =
            postcard::to_allocvec(&ChannelPayload { text, time_ms: unix_millis(now) }).expect("payloads encode");
        match self.chat.e2ee.group_encrypt(&me, distribution, &payload, &mut self.chat.rng) {
            Ok(ciphertext) => {
                self.transmit.push_back(ClientMsg::Channel { channel, ciphertext });
                self.chat.sent.push_back(Sent::Text);
                self.chat.dirty = true;
            }
            Err(e) => self.events.push_back(Event::local_error("e2ee", e)),
        }
    }

    pub(super) fn direct_arrived(&mut self, from: SessionId, ciphertext: &[u8], now: SystemTime) {
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
            if self.chat.withheld.remove(&from) && self.users.get(&from).and_then(|u| u.channel) == self.channel() {
                self.send_sender_key(from, now);
            }
        } else if opened.identity == IdentityStatus::Changed {
            self.withhold(from);
        }
        match postcard::from_bytes::<DirectPayload>(&opened.plaintext) {
            Ok(DirectPayload::Text { text, time_ms }) => {
                self.chat.record(&format!("@{user}"), &user, &text, time_ms);
                let event = self.message_event(&peer, user, None, text, time_ms);
                self.events.push_back(event);
            }
            Ok(DirectPayload::SenderKey { message, media }) => {
                if let Err(e) = self.chat.e2ee.accept_sender_key(&peer, &message) {
                    self.events.push_back(Event::local_error("undecryptable", format!("sender key from {user}: {e}")));
                }
                if let Some(channel) = self.channel() {
                    self.media.install(from, &media, channel, &mut self.media_out);
                }
            }
            Err(e) => self.events.push_back(Event::local_error("undecryptable", format!("from {user}: {e}"))),
        }
    }

    pub(super) fn channel_message_arrived(&mut self, from: SessionId, channel: ChannelId, ciphertext: &[u8]) {
        let (Some(peer), Some(user)) = (self.address(from), self.users.get(&from).map(|u| u.name.clone())) else {
            return self.events.push_back(Event::local_error("undecryptable", "a message from an unknown sender"));
        };
        let payload = self
            .chat
            .e2ee
            .group_decrypt(&peer, ciphertext)
            .map_err(|e| e.to_string())
            .and_then(|plain| postcard::from_bytes::<ChannelPayload>(&plain).map_err(|e| e.to_string()));
        match payload {
            Ok(ChannelPayload { text, time_ms }) => {
                self.chat.dirty = true;
                let name = self.channel_name(channel);
                self.chat.record(&format!("#{name}"), &user, &text, time_ms);
                let event = self.message_event(&peer, user, Some(name), text, time_ms);
                self.events.push_back(event);
            }
            Err(e) => self.events.push_back(Event::local_error("undecryptable", format!("from {user}: {e}"))),
        }
    }

    fn message_event(&self, peer: &str, from: String, channel: Option<String>, text: String, time_ms: u64) -> Event {
        let e2ee = &self.chat.e2ee;
        Event::Message {
            from,
            dm: channel.is_none(),
            channel,
            text,
            time_ms,
            verified: e2ee.is_verified(peer),
            identity_changed: e2ee.identity_status(peer) == IdentityStatus::Changed,
        }
    }

    pub(super) fn delivered(&mut self, reached: u32, total: u32) {
        if let Some(Sent::Text) = self.chat.sent.pop_front() {
            self.events.push_back(Event::Delivered { reached, total });
        }
    }

    /// The server holds only `published` of our one-time keys (EC, Kyber): make and
    /// upload enough new ones to fill its pool again.
    pub(super) fn keys_low(&mut self, now: SystemTime, published: (u32, u32)) {
        let published = (published.0 as usize, published.1 as usize);
        match self.chat.e2ee.replenish(&mut self.chat.rng, now, published) {
            Ok((one_time, kyber_one_time)) => {
                self.chat.dirty = true;
                self.transmit.push_back(ClientMsg::AddOneTimeKeys { one_time, kyber_one_time });
            }
            Err(e) => self.events.push_back(Event::local_error("e2ee", e)),
        }
    }

    /// `/safety NAME`: the safety number to compare out of band.
    pub(super) fn safety(&mut self, name: &str) {
        let Some(user) = self.users.values().find(|u| u.name.eq_ignore_ascii_case(name)) else {
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
    pub(super) fn verify(&mut self, name: &str, now: SystemTime) {
        let Some(user) = self.users.values().find(|u| u.name.eq_ignore_ascii_case(name)).map(|u| u.session) else {
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
            self.fetch_bundle(user);
        }
        if self.channel().is_some() && self.users.get(&user).and_then(|u| u.channel) == self.channel() {
            self.send_sender_key(user, now);
        }
    }
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
