//! The client's brain, sans-IO: what the server told us, what the user asked for, and
//! the events a front end (the headless client's JSON lines, later the GUI) shows.
//!
//! The shell feeds it server messages and datagrams and typed commands, sends what
//! [`Session::poll_transmit`] yields on the control stream, and shows what
//! [`Session::poll_event`] yields.

pub mod chat;
pub mod command;
pub mod history;
pub mod media;
pub mod screen;

use std::collections::{BTreeMap, VecDeque};
use std::time::{Instant, SystemTime};

pub use chat::REKEY_INTERVAL;

use serde::Serialize;

use crate::audio::cues::Cue;
use crate::protocol::{
    ChannelId, ChannelInfo, ClientMsg, JoinRequest, MEDIA_HEADER_LEN, MediaHeader, PROTOCOL_VERSION, ScreenReport,
    ServerMsg, SessionId, ShareInfo, StreamType, UserInfo, VoiceState, canonical_name, percent_encode,
};
pub use chat::Chat;
pub use command::{Command, ParseError, parse_line};
use media::MediaKeys;
pub use media::{MediaCounters, MediaFrame};

/// A channel as a front end shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChannelView {
    pub id: u32,
    pub name: String,
    pub description: String,
    pub has_password: bool,
    pub user_limit: u32,
    pub temporary: bool,
    pub users: Vec<String>,
}

/// What happened, for a front end. The headless client prints each as one JSON line,
/// `{"event":"joined",...}`; the names are stable.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// `identity` is our identity key's fingerprint: what an operator lists under
    /// `admins` in server.toml.
    Connected {
        session: u32,
        name: String,
        identity: String,
    },
    /// The server accepted our admin proof: moderation commands work.
    Admin,
    Channels {
        channels: Vec<ChannelView>,
    },
    Joined {
        channel: u32,
        name: String,
        users: Vec<String>,
    },
    Left {
        channel: u32,
        name: String,
    },
    UserJoined {
        user: String,
        session: u32,
        channel: u32,
    },
    UserLeft {
        user: String,
        session: u32,
        channel: u32,
    },
    ChannelCreated {
        channel: ChannelView,
    },
    ChannelRemoved {
        channel: u32,
        name: String,
    },
    InviteCreated {
        token: String,
        channel: u32,
        name: String,
        expires_in_secs: u32,
        max_uses: u32,
        link: String,
    },
    /// `from` is null when the datagram overtook the message that names its sender.
    Datagram {
        from: Option<String>,
        session: u32,
        channel: u32,
        stream: StreamType,
        sequence: u32,
        bytes: usize,
    },
    /// A decrypted chat message; `channel` is null for a direct message.
    Message {
        from: String,
        channel: Option<String>,
        dm: bool,
        text: String,
        /// When the sender says it wrote the message (its clock, its word).
        time_ms: u64,
        /// When it arrived here, by our clock.
        received_ms: u64,
        /// The sender's identity was accepted after comparing safety numbers.
        verified: bool,
        /// The sender's identity key differs from the one pinned earlier.
        identity_changed: bool,
    },
    /// How many online recipients our last message reached.
    Delivered {
        reached: u32,
        total: u32,
    },
    Safety {
        user: String,
        number: String,
        verified: bool,
        identity_changed: bool,
    },
    /// Our channel message waits: these members have no key of ours yet (their keys are
    /// being fetched), or a new epoch is due (someone just joined or left). It is sent
    /// once they have it.
    WaitingForKeys {
        channel: String,
        members: Vec<String>,
    },
    /// Our waiting channel messages went after [`chat::CHANNEL_KEY_WAIT`] without these
    /// members' keys: they cannot read them (what is sent after their keys come, they can).
    WentWithoutKeys {
        channel: String,
        members: Vec<String>,
    },
    /// What this device knows of a user's identity on this server (by the server's
    /// certificate and the user's pinned key, never by the display name alone): sent when
    /// a user with a verified or changed identity appears.
    Trust {
        user: String,
        verified: bool,
        identity_changed: bool,
    },
    /// A peer's identity key is not the one pinned earlier: it receives nothing from us
    /// until the user compares the safety number and accepts the new key.
    IdentityChanged {
        user: String,
    },
    /// A user started sharing a screen, changed what the share is, or stopped (`share`
    /// null).
    Sharing {
        user: String,
        session: u32,
        share: Option<ShareInfo>,
    },
    /// We started or stopped receiving a user's screen.
    Watching {
        user: String,
        session: u32,
        watching: bool,
    },
    /// What we received of a share we watch over the last second (also sent to the
    /// sharer): whole frames, kilobits, and the fragments that never came in percent.
    WatchStats {
        user: String,
        session: u32,
        fps: u32,
        kbps: u32,
        loss_percent: f32,
    },
    /// How many watch our share.
    Viewers {
        count: u32,
    },
    /// Our share runs (again, after a change of size or rate) with this encoder.
    ShareStarted {
        encoder: String,
        width: u32,
        height: u32,
        fps: u32,
    },
    ShareStopped {
        reason: String,
    },
    /// What happened to screen share over the session, when it ends.
    VideoStats {
        stats: Box<screen::VideoStats>,
    },
    /// A user muted or deafened themselves, or stopped.
    VoiceState {
        user: String,
        session: u32,
        muted: bool,
        deafened: bool,
    },
    /// Someone started or stopped talking (`user` is null when the name is not known yet).
    Speaking {
        user: Option<String>,
        session: u32,
        speaking: bool,
    },
    /// The `--play` file has been sent.
    PlayFinished,
    /// A sound device changed: what was asked for is gone or missing, and what is used.
    Device {
        message: String,
    },
    /// The microphone's level in dBFS, when it moved (for the desktop app's meter).
    InputLevel {
        dbfs: f32,
    },
    /// Connection health, every second (for the desktop app's plots).
    Health {
        rtt_ms: f32,
        /// Packets the connection lost, of those sent in the last second, in percent.
        loss_percent: f32,
        /// Interarrival jitter of the voice we receive.
        jitter_ms: f32,
        kbps_up: f32,
        kbps_down: f32,
    },
    /// What happened to voice over the session, when it ends.
    VoiceStats {
        media: Box<MediaCounters>,
        playback: Box<crate::audio::pipeline::PlaybackStats>,
    },
    Error {
        code: String,
        message: String,
    },
}

/// The reason of a `ShareStopped` that the user asked for (every other one is a failure).
pub const SHARE_STOPPED_BY_USER: &str = "stopped by you";

impl Event {
    /// An error of the client's own (not one the server sent).
    pub fn local_error(code: &str, message: impl std::fmt::Display) -> Event {
        Event::Error { code: code.to_owned(), message: message.to_string() }
    }

    /// The app's sound for this event: someone joined or left our channel (the session
    /// reports those only for ours), or a direct message came.
    pub fn cue(&self) -> Option<Cue> {
        match self {
            Event::UserJoined { .. } => Some(Cue::Joined),
            Event::UserLeft { .. } => Some(Cue::Left),
            Event::Message { dm: true, .. } => Some(Cue::Message),
            _ => None,
        }
    }

    /// The figures of a second of `user`'s share, from the report we send them.
    pub(super) fn watch_stats(user: String, sharer: SessionId, report: &ScreenReport) -> Event {
        let loss_percent = (100.0 * report.loss()) as f32;
        Event::WatchStats {
            user,
            session: sharer.0,
            fps: report.frames_decoded,
            kbps: u32::try_from(u64::from(report.bytes_received) * 8 / 1000).unwrap_or(u32::MAX),
            loss_percent,
        }
    }
}

/// Text from peers or the server, as a terminal is to show it: control characters
/// (escape sequences, carriage returns, newlines), bidirectional overrides and invisible
/// characters are written as `\u{..}` escapes, so nobody can forge a line or drive the
/// terminal with what they send.
pub struct Shown<'a>(pub &'a str);

/// Characters shown escaped: those that move or hide text rather than show it.
pub fn is_hidden_char(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2060}'..='\u{2069}' | '\u{061c}' | '\u{feff}')
}

impl std::fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use std::fmt::Write;
        for c in self.0.chars() {
            if is_hidden_char(c) {
                write!(f, "\\u{{{:x}}}", u32::from(c))?;
            } else {
                f.write_char(c)?;
            }
        }
        Ok(())
    }
}

/// Names joined by ", ", each shown safely.
struct ShownList<'a>(&'a [String]);

impl std::fmt::Display for ShownList<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, name) in self.0.iter().enumerate() {
            write!(f, "{}{}", if i == 0 { "" } else { ", " }, Shown(name))?;
        }
        Ok(())
    }
}

/// One line of text per event, for people at a terminal. Every string that came from a
/// peer or the server goes through [`Shown`].
impl std::fmt::Display for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Event::Connected { session, name, identity } => {
                write!(f, "* connected as {} (session {session}, identity {identity})", Shown(name))
            }
            Event::Admin => write!(f, "* you are an admin of this server: /kick, /ban, /close and /move work"),
            Event::Channels { channels } => {
                write!(f, "* channels:")?;
                for c in channels {
                    let lock = if c.has_password { " [password]" } else { "" };
                    write!(f, "\n    {}{lock} ({}): {}", Shown(&c.name), c.users.len(), ShownList(&c.users))?;
                }
                Ok(())
            }
            Event::Joined { name, users, .. } => {
                write!(f, "* you joined {}; here: {}", Shown(name), ShownList(users))
            }
            Event::Left { name, .. } => write!(f, "* you left {}", Shown(name)),
            Event::UserJoined { user, .. } => write!(f, "* {} joined the channel", Shown(user)),
            Event::UserLeft { user, .. } => write!(f, "* {} left the channel", Shown(user)),
            Event::ChannelCreated { channel } => write!(f, "* channel {} created", Shown(&channel.name)),
            Event::ChannelRemoved { name, .. } => write!(f, "* channel {} removed", Shown(name)),
            Event::InviteCreated { name, link, max_uses, expires_in_secs, .. } => {
                write!(f, "* invite to {} ({max_uses} uses, {expires_in_secs} s): {}", Shown(name), Shown(link))
            }
            Event::Datagram { from, session, stream, sequence, bytes, .. } => {
                let from = from.clone().unwrap_or_else(|| format!("session {session}"));
                write!(f, "* {stream:?} datagram #{sequence} from {}: {bytes} bytes", Shown(&from))
            }
            Event::Error { code, message } => write!(f, "! {}: {}", Shown(code), Shown(message)),
            Event::Message { from, channel, text, identity_changed, .. } => {
                let warning = if *identity_changed { " [identity changed]" } else { "" };
                let (from, text) = (Shown(from), Shown(text));
                match channel {
                    Some(channel) => write!(f, "[{}] <{from}>{warning} {text}", Shown(channel)),
                    None => write!(f, "[dm] <{from}>{warning} {text}"),
                }
            }
            Event::Delivered { reached, total } => write!(f, "* delivered to {reached} of {total}"),
            Event::WaitingForKeys { channel, members } if members.is_empty() => write!(
                f,
                "* [{}] your message waits for the channel's new key (someone joined or left)",
                Shown(channel)
            ),
            Event::WaitingForKeys { channel, members } => write!(
                f,
                "* [{}] your message waits for keys from {} members: {}",
                Shown(channel),
                members.len(),
                ShownList(members)
            ),
            Event::WentWithoutKeys { channel, members } => write!(
                f,
                "* [{}] your message went without waiting longer for {}: they cannot read it",
                Shown(channel),
                ShownList(members)
            ),
            Event::Safety { user, number, verified, .. } => {
                let state = if *verified { "verified" } else { "not verified" };
                write!(f, "* safety number with {} ({state}): {number}", Shown(user))
            }
            Event::Trust { user, verified, identity_changed } => {
                let state = match (verified, identity_changed) {
                    (_, true) => "identity changed",
                    (true, false) => "verified",
                    (false, false) => "not verified",
                };
                write!(f, "* {} is {state}", Shown(user))
            }
            Event::IdentityChanged { user } => {
                let user = Shown(user);
                write!(
                    f,
                    "! the identity key of {user} CHANGED: they receive none of your messages or voice until you \
                     compare safety numbers (/safety {user}) and accept the new key (/verify {user})"
                )
            }
            Event::Speaking { user, session, speaking } => {
                let who = user.clone().unwrap_or_else(|| format!("session {session}"));
                write!(f, "* {} {}", Shown(&who), if *speaking { "is talking" } else { "stopped talking" })
            }
            Event::PlayFinished => write!(f, "* finished playing the file"),
            Event::Sharing { user, share: Some(share), .. } => {
                write!(f, "* {} shares a screen ({}x{}, {} fps)", Shown(user), share.width, share.height, share.fps)
            }
            Event::Sharing { user, share: None, .. } => write!(f, "* {} stopped sharing", Shown(user)),
            Event::Watching { user, watching: true, .. } => write!(f, "* watching {}", Shown(user)),
            Event::Watching { user, watching: false, .. } => write!(f, "* no longer watching {}", Shown(user)),
            Event::Viewers { count } => write!(f, "* {count} watching your screen"),
            Event::WatchStats { user, fps, kbps, loss_percent, .. } => {
                write!(f, "* {}'s screen: {fps} fps, {kbps} kbit/s, {loss_percent:.1} % lost", Shown(user))
            }
            Event::ShareStarted { encoder, width, height, fps } => {
                write!(f, "* sharing your screen: {width}x{height} at {fps} fps with {encoder}")
            }
            Event::ShareStopped { reason } => write!(f, "! your screen share stopped: {}", Shown(reason)),
            Event::VideoStats { stats } => write!(
                f,
                "* screen: {} encoded, {} sent, {} received, {} decoded, {} dropped",
                stats.frames_encoded,
                stats.frames_sent,
                stats.frames_received,
                stats.frames_decoded,
                stats.frames_dropped
            ),
            Event::VoiceState { user, muted, deafened, .. } => {
                let state = match (muted, deafened) {
                    (_, true) => "deafened",
                    (true, false) => "muted",
                    (false, false) => "unmuted",
                };
                write!(f, "* {} is {state}", Shown(user))
            }
            Event::InputLevel { dbfs } => write!(f, "* microphone at {dbfs:.0} dBFS"),
            Event::Health { rtt_ms, loss_percent, jitter_ms, kbps_up, kbps_down } => write!(
                f,
                "* ping {rtt_ms:.0} ms, loss {loss_percent:.1} %, jitter {jitter_ms:.1} ms, up {kbps_up:.0} kbit/s, down \
                 {kbps_down:.0} kbit/s"
            ),
            Event::Device { message } => write!(f, "* sound device: {}", Shown(message)),
            Event::VoiceStats { media, playback } => {
                let j = &playback.jitter;
                write!(
                    f,
                    "* voice: sent {}, opened {}, played {}, recovered by FEC {}, concealed {}, late {}; dropped: no key {}, \
                     unauthentic {}, replayed {}",
                    media.sent,
                    media.opened,
                    j.played,
                    j.recovered,
                    j.concealed,
                    j.late,
                    media.no_key,
                    media.unauthentic,
                    media.duplicate + media.too_old
                )
            }
        }
    }
}

/// A server that broke the protocol; the connection cannot go on.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SessionError {
    #[error("the server sent {0} before its welcome")]
    NotWelcomed(&'static str),
    #[error("the server sent a second welcome")]
    SecondWelcome,
}

/// Wall-clock time for what needs it (message times, Signal's key ages), from the one
/// clock the session is driven by: the instant and the wall time it started at.
#[derive(Debug, Clone, Copy)]
struct WallClock {
    start: Instant,
    wall: SystemTime,
}

pub struct Session {
    clock: WallClock,
    name: String,
    /// `voipc://host:port/?fp=...`, the base of the invite links we print.
    server_link: String,
    me: Option<SessionId>,
    ready: bool,
    channels: BTreeMap<ChannelId, ChannelInfo>,
    users: BTreeMap<SessionId, UserInfo>,
    events: VecDeque<Event>,
    transmit: VecDeque<ClientMsg>,
    probe_sequence: u32,
    chat: Chat,
    media: MediaKeys,
    /// Decrypted media frames for the audio and video pipelines.
    media_out: VecDeque<MediaFrame>,
    /// Our own mute and deafen state, as last told to the server.
    voice: VoiceState,
    screen: screen::ScreenState,
}

impl Session {
    /// A session that introduces itself as `name`, entering `join` instead of the
    /// server's default channel if given. Every later call passes the time as an
    /// `Instant` on the same clock as `now`; `wall` is the wall-clock time at `now`.
    pub fn new(
        name: &str,
        join: Option<JoinRequest>,
        server_link: String,
        chat: Chat,
        now: Instant,
        wall: SystemTime,
    ) -> Self {
        let mut session = Session {
            clock: WallClock { start: now, wall },
            name: name.to_owned(),
            server_link,
            me: None,
            ready: false,
            channels: BTreeMap::new(),
            users: BTreeMap::new(),
            events: VecDeque::new(),
            transmit: VecDeque::new(),
            probe_sequence: 0,
            chat,
            media: MediaKeys::default(),
            media_out: VecDeque::new(),
            voice: VoiceState::default(),
            screen: screen::ScreenState::default(),
        };
        let bundle = match session.chat.e2ee().bundle_upload() {
            Ok(bundle) => Some(Box::new(bundle)),
            Err(e) => {
                session.events.push_back(Event::local_error("e2ee", e));
                None
            }
        };
        session.transmit.push_back(ClientMsg::Hello { version: PROTOCOL_VERSION, name: name.to_owned(), join, bundle });
        session
    }

    /// The wall-clock time at `now`.
    fn wall(&self, now: Instant) -> SystemTime {
        self.clock.wall + now.saturating_duration_since(self.clock.start)
    }

    #[must_use]
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<ClientMsg> {
        self.transmit.pop_front()
    }

    /// Our session id once welcomed.
    pub fn me(&self) -> Option<SessionId> {
        self.me
    }

    /// Whether the server has sent everything it had to say at the start.
    pub fn is_ready(&self) -> bool {
        self.ready
    }

    /// The channel we are in.
    pub fn channel(&self) -> Option<ChannelId> {
        self.me.and_then(|me| self.users.get(&me)).and_then(|u| u.channel)
    }

    pub fn handle_message(&mut self, now: Instant, msg: ServerMsg) -> Result<(), SessionError> {
        if self.me.is_none() && !matches!(msg, ServerMsg::Welcome { .. } | ServerMsg::Error { .. }) {
            return Err(SessionError::NotWelcomed(message_name(&msg)));
        }
        match msg {
            ServerMsg::Welcome { session, name, challenge, .. } => {
                if self.me.is_some() {
                    return Err(SessionError::SecondWelcome);
                }
                self.me = Some(session);
                self.name = name.clone();
                let identity = self.prove_admin(session, &challenge);
                self.events.push_back(Event::Connected { session: session.0, name, identity });
            }
            ServerMsg::AdminGranted => self.events.push_back(Event::Admin),
            ServerMsg::Users { users, more } => {
                let last = users.last().map(|u| u.session);
                for user in users {
                    self.user_seen(now, user);
                }
                match last.filter(|_| more) {
                    Some(after) => self.transmit.push_back(ClientMsg::ListUsers { after }),
                    None if !self.ready => self.listing_done(now),
                    None => {}
                }
            }
            ServerMsg::Presence { users, gone } => {
                for user in users {
                    self.user_seen(now, user);
                }
                for session in gone {
                    self.user_moved(now, session, None);
                    self.forget_peer(session);
                    self.users.remove(&session);
                }
            }
            ServerMsg::ChannelAdded(info) => {
                let id = info.id;
                self.channels.insert(id, info);
                if self.ready {
                    self.events.push_back(Event::ChannelCreated { channel: self.channel_view(id) });
                }
            }
            ServerMsg::ChannelRemoved(id) => {
                if let Some(info) = self.channels.remove(&id) {
                    self.events.push_back(Event::ChannelRemoved { channel: id.0, name: info.name });
                }
            }
            ServerMsg::Bundle { peer, bundle } => self.bundle_arrived(peer, bundle.as_ref(), now),
            ServerMsg::KeysLow { one_time, kyber_one_time } => self.keys_low(now, (one_time, kyber_one_time)),
            ServerMsg::Direct { from, ciphertext } => self.direct_arrived(from, &ciphertext, now),
            ServerMsg::Channel { from, channel, ciphertext } => {
                self.channel_message_arrived(from, channel, &ciphertext, now)
            }
            ServerMsg::Delivered { reached, total } => self.delivered(reached, total, now),
            ServerMsg::NotDelivered { code, message } => self.not_delivered(code, message, now),
            ServerMsg::InviteCreated { token, channel, expires_in_secs, max_uses } => {
                let name = self.channel_name(channel);
                let link = format!("{}&channel={}&invite={token}", self.server_link, percent_encode(&name));
                self.events.push_back(Event::InviteCreated {
                    token,
                    channel: channel.0,
                    name,
                    expires_in_secs,
                    max_uses,
                    link,
                });
            }
            ServerMsg::Error { code, message } => {
                self.events.push_back(Event::Error { code: code.as_str().to_owned(), message });
            }
            ServerMsg::KeyframeRequested => self.screen_message_keyframe(),
            ServerMsg::Viewers { count } => self.screen_message_viewers(count),
            ServerMsg::ScreenReport { viewer, report } => self.screen_message_report(viewer, report),
        }
        // Keys replaced by what arrived start their grace period now.
        self.media.handle_timeout(now);
        Ok(())
    }

    /// The whole listing has arrived: what it showed becomes events, and we are in the
    /// channel we landed in.
    fn listing_done(&mut self, now: Instant) {
        self.ready = true;
        self.events.push_back(Event::Channels { channels: self.channel_views() });
        let trust: Vec<Event> = self.users.keys().filter_map(|s| self.trust_event(*s)).collect();
        self.events.extend(trust);
        let voices: Vec<Event> = self
            .users
            .values()
            .filter(|u| u.voice != VoiceState::default())
            .map(|u| voice_event(u.session, &u.name, u.voice))
            .collect();
        self.events.extend(voices);
        let shares: Vec<Event> = self
            .users
            .values()
            .filter(|u| u.share.is_some())
            .map(|u| Event::Sharing { user: u.name.clone(), session: u.session.0, share: u.share })
            .collect();
        self.events.extend(shares);
        if let Some(channel) = self.channel() {
            let users = self.members(channel);
            self.events.push_back(Event::Joined { channel: channel.0, name: self.channel_name(channel), users });
            self.rekey(now);
        }
    }

    /// A user as the server sees them now, from the listing or a presence batch. Every
    /// member who will get our keys is shown: one who comes online straight into our
    /// channel arrives as a join. A session we know under another name (it would rename
    /// someone under our eyes) is refused and reported.
    fn user_seen(&mut self, now: Instant, user: UserInfo) {
        let session = user.session;
        match self.users.get_mut(&session) {
            Some(known) if known.name != user.name => {
                let message = format!(
                    "the server announced session {} ({:?}) again as {:?}; ignored",
                    session.0, known.name, user.name
                );
                self.events.push_back(Event::local_error("server_misbehaved", message));
            }
            // While the listing arrives, the state is only taken in: it is shown at its end.
            _ if !self.ready => {
                self.users.insert(session, user);
            }
            Some(known) => {
                if known.voice != user.voice {
                    known.voice = user.voice;
                    let event = voice_event(session, &known.name, user.voice);
                    self.events.push_back(event);
                }
                if known.share != user.share {
                    known.share = user.share;
                    let event = Event::Sharing { user: known.name.clone(), session: session.0, share: user.share };
                    self.events.push_back(event);
                }
                self.user_moved(now, session, user.channel);
                self.screen_user_changed(session);
            }
            None => {
                let (channel, voice, share) = (user.channel, user.voice, user.share);
                if voice != VoiceState::default() {
                    self.events.push_back(voice_event(session, &user.name, voice));
                }
                if share.is_some() {
                    self.events.push_back(Event::Sharing { user: user.name.clone(), session: session.0, share });
                }
                self.users.insert(session, UserInfo { channel: None, ..user });
                self.events.extend(self.trust_event(session));
                self.user_moved(now, session, channel);
            }
        }
    }

    /// Someone changed channels. When that changes who is in ours, we start a new
    /// sender-key epoch.
    fn user_moved(&mut self, now: Instant, session: SessionId, to: Option<ChannelId>) {
        let Some(user) = self.users.get_mut(&session) else { return };
        let from = std::mem::replace(&mut user.channel, to);
        if from == to {
            return;
        }
        let name = user.name.clone();
        if Some(session) == self.me {
            self.screen_left_channel();
            if let Some(old) = from {
                self.events.push_back(Event::Left { channel: old.0, name: self.channel_name(old) });
            }
            if let Some(new) = to {
                let users = self.members(new);
                self.events.push_back(Event::Joined { channel: new.0, name: self.channel_name(new), users });
            }
            return self.rekey(now);
        }
        let mine = self.channel();
        let mut ours_changed = false;
        if let Some(old) = from.filter(|c| Some(*c) == mine) {
            self.media.forget(session);
            self.screen_user_changed(session);
            self.events.push_back(Event::UserLeft { user: name.clone(), session: session.0, channel: old.0 });
            ours_changed = true;
        }
        if let Some(new) = to.filter(|c| Some(*c) == mine) {
            self.events.push_back(Event::UserJoined { user: name, session: session.0, channel: new.0 });
            ours_changed = true;
        }
        if ours_changed {
            self.request_rekey(now);
        }
    }

    /// A typed command: requests go to the server, local ones answer at once.
    /// `Probe` and `Quit` are the shell's: it sends datagrams and ends the session.
    pub fn command(&mut self, now: Instant, command: Command) {
        match command {
            Command::Join(request) => self.transmit.push_back(ClientMsg::Join(request)),
            Command::Kick(user) => self.moderate(&user, |session| ClientMsg::Kick { session }),
            Command::Watch { user, watch } => self.watch(now, &user, watch),
            Command::Ban { user, minutes } => self.moderate(&user, |session| ClientMsg::Ban { session, minutes }),
            Command::Move { user, channel } => match self.channel_named(&channel) {
                Some(channel) => self.moderate(&user, |session| ClientMsg::MoveUser { session, channel }),
                None => self.events.push_back(no_such_channel(&channel)),
            },
            Command::Close(channel) => match self.channel_named(&channel) {
                Some(channel) => self.transmit.push_back(ClientMsg::CloseChannel { channel }),
                None => self.events.push_back(no_such_channel(&channel)),
            },
            Command::Leave => self.transmit.push_back(ClientMsg::Leave),
            Command::Create { name, description, password, user_limit } => {
                self.transmit.push_back(ClientMsg::CreateChannel { name, description, password, user_limit });
            }
            Command::Invite { max_uses, ttl_secs } => {
                self.transmit.push_back(ClientMsg::CreateInvite { max_uses, ttl_secs });
            }
            Command::Channels => self.events.push_back(Event::Channels { channels: self.channel_views() }),
            Command::Say(text) => self.say(text, now),
            Command::SayIn { channel, text } => {
                let here = self.channel().map(|id| canonical_name(&self.channel_name(id)));
                if here == Some(canonical_name(&channel)) {
                    self.say(text, now);
                } else {
                    self.events.push_back(Event::local_error(
                        "not_in_channel",
                        format!("you are not in {channel}: your message there was not sent"),
                    ));
                }
            }
            Command::Msg { to, text } => self.message_user(&to, text, now),
            Command::Safety(name) => self.safety(&name),
            Command::Verify(name) => self.verify(&name, now),
            Command::Mute(muted) => self.set_voice_state(VoiceState { muted, ..self.voice }),
            Command::Deafen(deafened) => self.set_voice_state(VoiceState { deafened, ..self.voice }),
            // The shell's: it owns the capture and the encoder.
            Command::Share(_)
            | Command::Probe { .. }
            | Command::Quit
            | Command::Talk(_)
            | Command::Volume { .. }
            | Command::LocalMute { .. }
            | Command::VoiceSettings { .. }
            | Command::Cues(_) => {}
        }
    }

    /// Tells everyone we muted or deafened ourselves (the shell stops the sound itself).
    fn set_voice_state(&mut self, voice: VoiceState) {
        if voice != self.voice {
            self.voice = voice;
            self.transmit.push_back(ClientMsg::SetVoiceState(voice));
        }
    }

    /// A probe datagram for the current channel: the media header and `payload`.
    pub fn probe_datagram(&mut self, payload: &[u8]) -> Option<Vec<u8>> {
        let (me, channel) = (self.me?, self.channel()?);
        self.probe_sequence = self.probe_sequence.wrapping_add(1);
        let header = MediaHeader {
            stream: StreamType::Probe,
            flags: 0,
            channel,
            sender: me,
            sequence: self.probe_sequence,
            timestamp: 0,
        };
        Some(header.to_datagram(payload))
    }

    /// A datagram the relay forwarded to us. Media (voice, and the desktop audio of a
    /// share we watch) opens into [`Session::poll_media`]; probes become events.
    pub fn handle_datagram(&mut self, now: Instant, datagram: &[u8]) {
        let header = match MediaHeader::parse(datagram) {
            Ok((header, _)) => header,
            Err(e) => return self.events.push_back(Event::local_error("bad_datagram", e)),
        };
        if header.stream == StreamType::Screen {
            return self.screen_datagram(now, header, datagram);
        }
        if header.stream == StreamType::ScreenAudio && !self.take_desktop_audio_from(header.sender) {
            return;
        }
        if header.stream != StreamType::Probe {
            self.media.handle_timeout(now);
            let channel = self.channel().unwrap_or(ChannelId(u32::MAX));
            return self.media.open(header, channel, datagram, &mut self.media_out);
        }
        self.events.push_back(Event::Datagram {
            from: self.users.get(&header.sender).map(|u| u.name.clone()),
            session: header.sender.0,
            channel: header.channel.0,
            stream: header.stream,
            sequence: header.sequence,
            bytes: datagram.len() - MEDIA_HEADER_LEN,
        });
    }

    /// Time passes: a due epoch starts, unanswered requests are made again, and media
    /// keys replaced by newer ones expire after their grace period. The shell calls it
    /// at [`Session::poll_timeout`] (and may call it any time).
    pub fn handle_timeout(&mut self, now: Instant) {
        self.media.handle_timeout(now);
        self.chat_timeout(now);
        self.screen_timeout(now);
    }

    /// The next time [`Session::handle_timeout`] has work to do.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        let screen = self.screen_poll_timeout();
        self.chat_poll_timeout().into_iter().chain(self.media.poll_timeout()).chain(screen).min()
    }

    /// A media datagram carrying `payload` (an Opus packet, a video fragment), sealed
    /// with our key for the current epoch; `None` when we are in no channel. A key near
    /// its packet limit is replaced by a new epoch first.
    pub fn media_datagram(
        &mut self,
        now: Instant,
        stream: StreamType,
        sequence: u32,
        timestamp: u32,
        payload: &[u8],
    ) -> Option<Vec<u8>> {
        if self.media.needs_new_key() {
            self.rekey(now);
        }
        self.media.seal(self.me?, stream, sequence, timestamp, payload)
    }

    #[must_use]
    pub fn poll_media(&mut self) -> Option<MediaFrame> {
        self.media_out.pop_front()
    }

    /// The event for `session` starting or stopping to talk.
    pub fn speaking(&self, session: SessionId, speaking: bool) -> Event {
        Event::Speaking { user: self.users.get(&session).map(|u| u.name.clone()), session: session.0, speaking }
    }

    /// A moderation request about the user `name`.
    fn moderate(&mut self, name: &str, request: impl FnOnce(SessionId) -> ClientMsg) {
        match self.user_session(name) {
            Some(session) => self.transmit.push_back(request(session)),
            None => self.events.push_back(Event::local_error("no_such_user", format!("{name} is not online"))),
        }
    }

    fn channel_named(&self, name: &str) -> Option<ChannelId> {
        let key = canonical_name(name);
        self.channels.values().find(|c| canonical_name(&c.name) == key).map(|c| c.id)
    }

    /// The session id of an online user, by name (in its canonical form: "Bob" and "bob"
    /// are one name, as the server holds them).
    pub fn user_session(&self, name: &str) -> Option<SessionId> {
        let key = canonical_name(name);
        self.users.values().find(|u| canonical_name(&u.name) == key).map(|u| u.session)
    }

    /// Media datagrams sent, opened, and dropped (by reason).
    pub fn media_counters(&self) -> MediaCounters {
        self.media.counters()
    }

    pub(crate) fn channel_name(&self, id: ChannelId) -> String {
        self.channels.get(&id).map_or_else(|| format!("#{}", id.0), |c| c.name.clone())
    }

    fn members(&self, channel: ChannelId) -> Vec<String> {
        self.users.values().filter(|u| u.channel == Some(channel)).map(|u| u.name.clone()).collect()
    }

    fn channel_view(&self, id: ChannelId) -> ChannelView {
        let info = &self.channels[&id];
        ChannelView {
            id: id.0,
            name: info.name.clone(),
            description: info.description.clone(),
            has_password: info.has_password,
            user_limit: info.user_limit,
            temporary: info.temporary,
            users: self.members(id),
        }
    }

    fn channel_views(&self) -> Vec<ChannelView> {
        self.channels.keys().map(|id| self.channel_view(*id)).collect()
    }
}

fn voice_event(session: SessionId, name: &str, voice: VoiceState) -> Event {
    Event::VoiceState { user: name.to_owned(), session: session.0, muted: voice.muted, deafened: voice.deafened }
}

fn no_such_channel(name: &str) -> Event {
    Event::local_error("no_such_channel", format!("there is no channel {name:?}"))
}

fn message_name(msg: &ServerMsg) -> &'static str {
    match msg {
        ServerMsg::Welcome { .. } => "welcome",
        ServerMsg::AdminGranted => "admin_granted",
        ServerMsg::ChannelAdded(_) => "channel_added",
        ServerMsg::ChannelRemoved(_) => "channel_removed",
        ServerMsg::Users { .. } => "users",
        ServerMsg::Presence { .. } => "presence",
        ServerMsg::InviteCreated { .. } => "invite_created",
        ServerMsg::Error { .. } => "error",
        ServerMsg::Bundle { .. } => "bundle",
        ServerMsg::KeysLow { .. } => "keys_low",
        ServerMsg::Direct { .. } => "direct",
        ServerMsg::Channel { .. } => "channel",
        ServerMsg::Delivered { .. } => "delivered",
        ServerMsg::NotDelivered { .. } => "not_delivered",
        ServerMsg::KeyframeRequested => "keyframe_requested",
        ServerMsg::Viewers { .. } => "viewers",
        ServerMsg::ScreenReport { .. } => "screen_report",
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods, reason = "the virtual clock starts at an arbitrary real instant")]
mod tests {
    use super::*;
    use crate::protocol::ErrorCode;

    fn chat() -> Chat {
        use rand::SeedableRng;
        let e2ee =
            crate::e2ee::E2ee::generate(&mut rand::rngs::StdRng::seed_from_u64(1), SystemTime::UNIX_EPOCH).unwrap();
        Chat::new(e2ee, history::History::default(), [0; 32], "h:1".into(), "ab".repeat(32))
    }

    fn channel(id: u32, name: &str) -> ChannelInfo {
        ChannelInfo {
            id: ChannelId(id),
            name: name.into(),
            description: String::new(),
            has_password: false,
            user_limit: 0,
            temporary: false,
        }
    }

    fn user(id: u32, name: &str, channel: Option<u32>) -> UserInfo {
        UserInfo {
            session: SessionId(id),
            name: name.into(),
            channel: channel.map(ChannelId),
            voice: Default::default(),
            share: None,
        }
    }

    fn welcomed() -> Session {
        let mut s =
            Session::new("alice", None, "voipc://h:1/?fp=ab".into(), chat(), Instant::now(), SystemTime::UNIX_EPOCH);
        assert!(matches!(s.poll_transmit(), Some(ClientMsg::Hello { version: PROTOCOL_VERSION, .. })));
        for msg in [
            ServerMsg::Welcome {
                session: SessionId(1),
                name: "alice".into(),
                server_version: PROTOCOL_VERSION,
                challenge: [0; 32],
            },
            ServerMsg::ChannelAdded(channel(1, "Lobby")),
            ServerMsg::ChannelAdded(channel(2, "Late Night")),
            ServerMsg::Users { users: vec![user(1, "alice", Some(1))], more: true },
        ] {
            s.handle_message(Instant::now(), msg).unwrap();
        }
        assert!(!s.is_ready(), "a page is still missing");
        while let Some(sent) = s.poll_transmit() {
            if let ClientMsg::ListUsers { after } = sent {
                assert_eq!(after, SessionId(1));
            }
        }
        for msg in [
            // A batch made before the page: the page that follows says the same.
            ServerMsg::Presence { users: vec![user(2, "bob", None)], gone: vec![] },
            ServerMsg::Users { users: vec![user(2, "bob", Some(1))], more: false },
        ] {
            s.handle_message(Instant::now(), msg).unwrap();
        }
        s
    }

    fn events(s: &mut Session) -> Vec<Event> {
        std::iter::from_fn(|| s.poll_event()).collect()
    }

    #[test]
    fn welcome_lists_and_landing_become_events() {
        let mut s = welcomed();
        let ev = events(&mut s);
        let Event::Connected { session: 1, name, identity } = &ev[0] else { panic!("{ev:?}") };
        assert_eq!((name.as_str(), identity.len()), ("alice", 64), "our identity key's fingerprint");
        let Event::Channels { channels } = &ev[1] else { panic!("{ev:?}") };
        assert_eq!(channels[0].users, ["alice", "bob"]);
        assert_eq!(
            ev[2],
            Event::Joined { channel: 1, name: "Lobby".into(), users: vec!["alice".into(), "bob".into()] }
        );
        assert_eq!(s.channel(), Some(ChannelId(1)));
    }

    #[test]
    fn others_entering_and_leaving_my_channel_are_reported() {
        let mut s = welcomed();
        events(&mut s);
        let presence = |users, gone| ServerMsg::Presence { users, gone };
        s.handle_message(Instant::now(), presence(vec![user(3, "carol", Some(2))], vec![])).unwrap();
        assert!(events(&mut s).is_empty(), "carol is not in my channel");
        s.handle_message(Instant::now(), presence(vec![user(3, "carol", Some(1))], vec![SessionId(2)])).unwrap();
        let came_and_went = events(&mut s);
        assert_eq!(
            came_and_went,
            [
                Event::UserJoined { user: "carol".into(), session: 3, channel: 1 },
                Event::UserLeft { user: "bob".into(), session: 2, channel: 1 },
            ]
        );
        let cues: Vec<_> = came_and_went.iter().map(Event::cue).collect();
        assert_eq!(cues, [Some(Cue::Joined), Some(Cue::Left)], "the app's sounds for them");
        s.handle_message(Instant::now(), presence(vec![user(1, "alice", None)], vec![])).unwrap();
        let left = events(&mut s);
        assert_eq!(left, [Event::Left { channel: 1, name: "Lobby".into() }]);
        assert_eq!(left[0].cue(), None, "our own leaving makes no sound");
    }

    #[test]
    fn text_from_others_cannot_forge_lines_or_drive_the_terminal() {
        let message = Event::Message {
            from: "eve\u{202e}".into(),
            channel: Some("Lobby\n! fake".into()),
            dm: false,
            text: "hi\r\u{1b}[2K* bob is verified\nsecond line\u{200b}".into(),
            time_ms: 0,
            received_ms: 0,
            verified: false,
            identity_changed: false,
        };
        let line = message.to_string();
        assert!(!line.chars().any(is_hidden_char), "{line:?}");
        assert_eq!(line.lines().count(), 1, "{line:?}");
        assert!(line.contains(r"\u{d}\u{1b}[2K") && line.contains(r"eve\u{202e}"), "{line}");
        let error = Event::Error { code: "x".into(), message: "one\ntwo".into() }.to_string();
        assert_eq!(error, r"! x: one\u{a}two");
    }

    #[test]
    fn a_message_to_a_channel_with_nobody_else_in_it_goes_out() {
        let mut s = Session::new("alice", None, String::new(), chat(), Instant::now(), SystemTime::UNIX_EPOCH);
        let now = Instant::now();
        for msg in [
            ServerMsg::Welcome {
                session: SessionId(1),
                name: "alice".into(),
                server_version: PROTOCOL_VERSION,
                challenge: [0; 32],
            },
            ServerMsg::ChannelAdded(channel(1, "Lobby")),
            ServerMsg::Users { users: vec![user(1, "alice", Some(1))], more: false },
        ] {
            s.handle_message(now, msg).unwrap();
        }
        events(&mut s);
        while s.poll_transmit().is_some() {}
        s.command(now, Command::Say("anyone?".into()));
        assert!(events(&mut s).is_empty(), "no error");
        assert!(matches!(s.poll_transmit(), Some(ClientMsg::Channel { .. })));
    }

    #[test]
    fn a_member_whose_keys_never_come_holds_up_channel_chat_for_a_bounded_time() {
        let mut s = welcomed();
        events(&mut s);
        let start = Instant::now();
        let sent: Vec<ClientMsg> = std::iter::from_fn(|| s.poll_transmit()).collect();
        assert!(sent.iter().any(|m| matches!(m, ClientMsg::FetchBundle { peer: SessionId(2) })), "{sent:?}");
        // Bob's bundle never comes (a stuck client, or a relay that withholds it).
        s.command(start, Command::Say("first".into()));
        assert_eq!(events(&mut s), [Event::WaitingForKeys { channel: "Lobby".into(), members: vec!["bob".into()] }]);
        let is_channel = |m: &ClientMsg| matches!(m, ClientMsg::Channel { .. });
        assert!(!std::iter::from_fn(|| s.poll_transmit()).any(|m| is_channel(&m)));
        let due = s.poll_timeout().expect("the wait ends");
        assert!(due <= start + chat::CHANNEL_KEY_WAIT, "{:?}", due - start);
        s.handle_timeout(start + chat::CHANNEL_KEY_WAIT);
        let ev = events(&mut s);
        assert_eq!(ev, [Event::WentWithoutKeys { channel: "Lobby".into(), members: vec!["bob".into()] }]);
        assert_eq!(std::iter::from_fn(|| s.poll_transmit()).filter(is_channel).count(), 1, "the message went");
        // What is written next goes at once: nothing waits for bob again in this epoch.
        s.command(start + chat::CHANNEL_KEY_WAIT, Command::Say("second".into()));
        assert!(events(&mut s).is_empty());
        assert_eq!(std::iter::from_fn(|| s.poll_transmit()).filter(is_channel).count(), 1);
    }

    #[test]
    fn a_message_goes_only_to_the_channel_it_was_typed_in() {
        let mut s = welcomed();
        events(&mut s);
        while s.poll_transmit().is_some() {}
        s.command(Instant::now(), Command::SayIn { channel: "Late Night".into(), text: "psst".into() });
        let ev = events(&mut s);
        assert!(matches!(&ev[..], [Event::Error { code, .. }] if code == "not_in_channel"), "{ev:?}");
        assert!(s.poll_transmit().is_none(), "nothing was sent");
    }

    #[test]
    fn nobody_joins_unseen_and_nobody_is_renamed() {
        let mut s = welcomed();
        events(&mut s);
        // Announced already inside our channel: a join like any other.
        let presence = |user| ServerMsg::Presence { users: vec![user], gone: vec![] };
        s.handle_message(Instant::now(), presence(user(5, "eve", Some(1)))).unwrap();
        assert_eq!(events(&mut s), [Event::UserJoined { user: "eve".into(), session: 5, channel: 1 }]);
        // Bob's session announced again under another name.
        s.handle_message(Instant::now(), presence(user(2, "mallory", Some(1)))).unwrap();
        let ev = events(&mut s);
        assert!(matches!(&ev[..], [Event::Error { code, .. }] if code == "server_misbehaved"), "{ev:?}");
        assert_eq!(s.user_session("bob"), Some(SessionId(2)));
        assert_eq!(s.user_session("mallory"), None);
    }

    #[test]
    fn invites_get_a_link_and_errors_keep_their_code() {
        let mut s = welcomed();
        events(&mut s);
        s.handle_message(
            Instant::now(),
            ServerMsg::InviteCreated { token: "tok".into(), channel: ChannelId(2), expires_in_secs: 60, max_uses: 2 },
        )
        .unwrap();
        s.handle_message(Instant::now(), ServerMsg::Error { code: ErrorCode::ChannelFull, message: "full".into() })
            .unwrap();
        let ev = events(&mut s);
        let Event::InviteCreated { link, .. } = &ev[0] else { panic!("{ev:?}") };
        assert_eq!(link, "voipc://h:1/?fp=ab&channel=Late%20Night&invite=tok");
        assert_eq!(ev[1], Event::Error { code: "channel_full".into(), message: "full".into() });
        let json = serde_json::to_string(&ev[1]).unwrap();
        assert_eq!(json, r#"{"event":"error","code":"channel_full","message":"full"}"#);
    }

    #[test]
    fn probes_carry_our_ids_and_come_back_as_events() {
        let mut s = welcomed();
        events(&mut s);
        let datagram = s.probe_datagram(b"xyz").unwrap();
        let (header, payload) = MediaHeader::parse(&datagram).unwrap();
        assert_eq!(
            (header.sender, header.channel, header.sequence, payload),
            (SessionId(1), ChannelId(1), 1, &b"xyz"[..])
        );
        let from_bob = MediaHeader { sender: SessionId(2), ..header }.to_datagram(b"12345");
        let now = Instant::now();
        s.handle_datagram(now, &from_bob);
        s.handle_datagram(now, &[1, 2]);
        // A datagram can overtake the control message that announces its sender.
        s.handle_datagram(now, &MediaHeader { sender: SessionId(77), ..header }.to_datagram(b""));
        let ev = events(&mut s);
        assert_eq!(
            ev[0],
            Event::Datagram {
                from: Some("bob".into()),
                session: 2,
                channel: 1,
                stream: StreamType::Probe,
                sequence: 1,
                bytes: 5
            }
        );
        assert!(matches!(&ev[1], Event::Error { code, .. } if code == "bad_datagram"));
        assert!(matches!(&ev[2], Event::Datagram { from: None, session: 77, .. }));
    }

    #[test]
    fn a_server_that_skips_the_welcome_is_a_protocol_error() {
        let mut s = Session::new("alice", None, String::new(), chat(), Instant::now(), SystemTime::UNIX_EPOCH);
        let page = ServerMsg::Users { users: vec![], more: false };
        assert_eq!(s.handle_message(Instant::now(), page), Err(SessionError::NotWelcomed("users")));
        let mut s = welcomed();
        let again =
            ServerMsg::Welcome { session: SessionId(5), name: "x".into(), server_version: 1, challenge: [0; 32] };
        assert_eq!(s.handle_message(Instant::now(), again), Err(SessionError::SecondWelcome));
        assert!(s.probe_datagram(b"").is_some());
    }
}
