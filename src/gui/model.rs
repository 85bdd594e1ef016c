//! What the window shows, as plain data: the client core's events fold into it, the
//! views draw from it. Only the drafts (text being typed) are edited by the views.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::audio::check::{CheckEvent, Phase};
use crate::audio::device::DeviceList;
use crate::protocol::{Resolution, ShareInfo};
use crate::session::command::ShareRequest;
use crate::session::history::History;
use crate::session::{ChannelView, Event};

use super::settings::Settings;

/// Which screen is up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Screen {
    /// First start: no vault yet. Choose a name and a vault password.
    #[default]
    Setup,
    /// The vault exists: its password opens it.
    Unlock,
    /// Where to connect.
    Connect,
    Connecting {
        server: String,
    },
    /// An unknown server: its certificate's fingerprint, to check and trust (or not).
    Trust {
        target: String,
        server: String,
        fingerprint: String,
    },
    /// A pinned server presented another certificate (or a link named another one): a
    /// full stop, past which only the deliberate replace step goes.
    CertificateChanged {
        target: String,
        server: String,
        expected: String,
        actual: String,
    },
    /// The connection dropped; the next attempt is due in `in_secs`.
    Reconnecting {
        server: String,
        in_secs: u64,
        reason: String,
    },
    /// Connected: channels, chat, voice.
    Main,
}

/// A chat pane: a channel's (by name) or a direct conversation (by the peer's name).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Conversation {
    Channel(String),
    Direct(String),
}

impl Conversation {
    /// The vault's key for this conversation on `server` (as the client core records it).
    pub fn history_key(&self, server: &str) -> String {
        match self {
            Conversation::Channel(name) => format!("{server}#{name}"),
            Conversation::Direct(peer) => format!("{server}@{peer}"),
        }
    }

    pub fn title(&self) -> String {
        match self {
            Conversation::Channel(name) => format!("# {name}"),
            Conversation::Direct(peer) => format!("@ {peer}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub from: String,
    pub text: String,
    /// The time the sender claims; for our own lines, when we sent it.
    pub time_ms: u64,
    /// When a received line arrived, by our clock.
    pub received_ms: Option<u64>,
    pub mine: bool,
    /// For our own lines: how many online recipients it reached, of how many.
    pub delivered: Option<(u32, u32)>,
    pub identity_changed: bool,
}

/// The text being typed, by the views.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Drafts {
    pub name: String,
    pub password: String,
    pub password_again: String,
    pub address: String,
    /// The address came from a `voipc://` link the app was opened with.
    pub from_link: bool,
    pub message: String,
    /// A password for the channel being joined.
    pub channel_password: Option<(String, String)>,
    pub new_channel: Option<NewChannel>,
    pub host_port: String,
    /// The host name or address the hosted server's invite link names.
    pub host_address: String,
    /// On the certificate-changed screen: the beginning of the new fingerprint, typed.
    pub replace_confirmation: String,
    /// The share dialog, while it is open.
    pub share: Option<ShareDraft>,
}

/// The share dialog: what can be shared here and what is picked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareDraft {
    /// Monitors by name, then `window:TITLE` for each titled window (the first is the
    /// primary monitor).
    pub sources: Vec<String>,
    pub source: usize,
    pub resolution: Resolution,
    pub fps: u32,
    pub audio: bool,
}

impl ShareDraft {
    pub fn new(sources: Vec<String>) -> Self {
        let (resolution, fps) = (ShareRequest::DEFAULT_RESOLUTION, ShareRequest::DEFAULT_FPS);
        ShareDraft { sources, source: 0, resolution, fps, audio: false }
    }

    pub fn request(&self) -> ShareRequest {
        let source = self.sources.get(self.source).cloned();
        ShareRequest { source, resolution: self.resolution, fps: self.fps, audio: self.audio }
    }
}

/// Our own share while it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MyShare {
    pub encoder: String,
    pub width: u32,
    pub height: u32,
    pub fps: u32,
    pub viewers: u32,
}

/// The share we watch.
#[derive(Debug, Clone, PartialEq)]
pub struct Watching {
    pub user: String,
    /// The sharer's session, which the decoded pictures name.
    pub session: u32,
    /// The last second's figures, once there are some.
    pub stats: Option<WatchFigures>,
    /// The newest picture, as the app uploaded it: its texture and size.
    pub picture: Option<(egui::TextureId, [usize; 2])>,
    /// Shown in a window of its own.
    pub popped_out: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WatchFigures {
    pub fps: u32,
    pub kbps: u32,
    pub loss_percent: f32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewChannel {
    pub name: String,
    pub description: String,
    pub password: String,
    pub user_limit: String,
}

/// A safety number on show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Safety {
    pub user: String,
    pub number: String,
    pub verified: bool,
    /// The number is for a new identity key, not accepted yet.
    pub identity_changed: bool,
}

#[derive(Debug, Clone, Default)]
pub struct Model {
    pub screen: Screen,
    pub settings: Settings,
    pub drafts: Drafts,
    /// Our name on the server.
    pub me: Option<String>,
    /// The server accepted us as one of its admins: its context menus offer moderation.
    pub admin: bool,
    pub server: String,
    pub channels: Vec<ChannelView>,
    pub my_channel: Option<u32>,
    pub speaking: BTreeSet<String>,
    /// Others who muted or deafened themselves (ourselves too, as the server echoes it).
    pub muted_users: BTreeSet<String>,
    pub deafened_users: BTreeSet<String>,
    /// Who shares a screen, at what size and rate.
    pub sharing: BTreeMap<String, ShareInfo>,
    /// Our share, while it runs.
    pub my_share: Option<MyShare>,
    /// The share we watch (one at a time in the app).
    pub watching: Option<Watching>,
    pub muted: bool,
    pub deafened: bool,
    pub conversations: BTreeMap<Conversation, Vec<Line>>,
    pub unread: BTreeMap<Conversation, u32>,
    pub selected: Option<Conversation>,
    pub identity_changed: BTreeSet<String>,
    pub verified: BTreeSet<String>,
    /// Our channel message waits for these members' keys (empty: for a new epoch).
    pub waiting_for_keys: Option<Vec<String>>,
    pub safety: Option<Safety>,
    /// Per-user volume in percent, and users muted locally.
    pub volumes: BTreeMap<String, u32>,
    pub locally_muted: BTreeSet<String>,
    pub invite: Option<String>,
    /// The last error, shown until dismissed.
    pub error: Option<String>,
    pub history: History,
    pub devices: DeviceList,
    pub show_settings: bool,
    /// A server hosted in this process: its invite link.
    pub hosting: Option<String>,
    /// The connection's health, a sample a second, newest last.
    pub health: VecDeque<Health>,
    /// The microphone's level in dBFS, once it has been heard.
    pub input_level: Option<f32>,
    /// The audio setup and microphone test, while its window is open.
    pub audio_check: Option<AudioCheck>,
}

/// The microphone test as the audio setup shows it ([`crate::audio::check`]).
#[derive(Debug, Clone, PartialEq)]
pub struct AudioCheck {
    pub level: Option<f32>,
    /// The gate is open: this would be on the air.
    pub talking: bool,
    pub phase: Phase,
    /// After a recording: the threshold it suggests, or `None` when it could not tell
    /// the voice from the background.
    pub suggested: Option<Option<f32>>,
    /// A device notice, or why the test stopped.
    pub notice: Option<String>,
}

impl Default for AudioCheck {
    fn default() -> Self {
        AudioCheck { level: None, talking: false, phase: Phase::Idle, suggested: None, notice: None }
    }
}

impl AudioCheck {
    /// Folds one of the test's events in.
    pub fn apply(&mut self, event: CheckEvent) {
        match event {
            CheckEvent::Level(dbfs) => self.level = Some(dbfs),
            CheckEvent::Talking(on) => self.talking = on,
            CheckEvent::Phase(phase) => self.phase = phase,
            CheckEvent::Suggested(threshold) => self.suggested = Some(threshold),
            CheckEvent::Device(message) => self.notice = Some(message),
        }
    }
}

/// Seconds of connection health kept for the plots.
pub const HEALTH_HISTORY: usize = 60;
/// Lines a conversation's pane keeps: as many as the vault's history keeps of it; older
/// ones go, so that neither memory nor the layout of a pane grows with a chatty channel.
pub const PANE_LINES: usize = crate::session::history::PER_CONVERSATION;

/// One second of connection health.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Health {
    pub rtt_ms: f32,
    pub loss_percent: f32,
    pub jitter_ms: f32,
    /// Both directions.
    pub kbps: f32,
}

impl Model {
    /// Folds one event of the client core into the model.
    pub fn apply(&mut self, event: &Event) {
        match event {
            Event::Connected { name, .. } => {
                // Who is verified, changed, muted or talking is this server's to say anew:
                // a name here is not the same person as that name elsewhere.
                self.me = Some(name.clone());
                self.admin = false;
                self.screen = Screen::Main;
                for set in
                    [&mut self.verified, &mut self.identity_changed, &mut self.muted_users, &mut self.deafened_users]
                {
                    set.clear();
                }
                self.speaking.clear();
                self.sharing.clear();
                (self.my_share, self.watching) = (None, None);
            }
            Event::Admin => self.admin = true,
            Event::Sharing { user, share: Some(share), .. } => {
                self.sharing.insert(user.clone(), *share);
            }
            Event::Sharing { user, share: None, .. } => {
                self.sharing.remove(user);
            }
            Event::Watching { user, session, watching: true } => {
                let watching =
                    Watching { user: user.clone(), session: *session, stats: None, picture: None, popped_out: false };
                self.watching = Some(watching);
            }
            Event::Watching { session, watching: false, .. } => {
                self.watching.take_if(|w| w.session == *session);
            }
            Event::WatchStats { session, fps, kbps, loss_percent, .. } => {
                if let Some(watching) = self.watching.as_mut().filter(|w| w.session == *session) {
                    watching.stats = Some(WatchFigures { fps: *fps, kbps: *kbps, loss_percent: *loss_percent });
                }
            }
            Event::ShareStarted { encoder, width, height, fps } => {
                let viewers = self.my_share.as_ref().map_or(0, |s| s.viewers);
                let share = MyShare { encoder: encoder.clone(), width: *width, height: *height, fps: *fps, viewers };
                self.my_share = Some(share);
            }
            Event::Viewers { count } => {
                if let Some(share) = &mut self.my_share {
                    share.viewers = *count;
                }
            }
            Event::ShareStopped { reason } => {
                self.my_share = None;
                if reason != crate::session::SHARE_STOPPED_BY_USER {
                    self.error = Some(format!("your screen share stopped: {reason}"));
                }
            }
            Event::VideoStats { .. } => {}
            Event::Trust { user, verified, identity_changed } => {
                for (set, on) in [(&mut self.verified, *verified), (&mut self.identity_changed, *identity_changed)] {
                    if on {
                        set.insert(user.clone());
                    } else {
                        set.remove(user);
                    }
                }
            }
            Event::Channels { channels } => {
                self.channels = channels.clone();
                let me = self.me.clone().unwrap_or_default();
                self.my_channel = channels.iter().find(|c| c.users.contains(&me)).map(|c| c.id);
            }
            Event::Joined { channel, name, users } => {
                self.my_channel = Some(*channel);
                if let Some(view) = self.channels.iter_mut().find(|c| c.id == *channel) {
                    view.users = users.clone();
                }
                self.open(Conversation::Channel(name.clone()));
                self.select(Conversation::Channel(name.clone()));
            }
            Event::Left { channel, .. } => {
                if self.my_channel == Some(*channel) {
                    self.my_channel = None;
                }
                let me = self.me.clone().unwrap_or_default();
                if let Some(view) = self.channels.iter_mut().find(|c| c.id == *channel) {
                    view.users.retain(|u| *u != me);
                }
            }
            Event::UserJoined { user, channel, .. } => {
                if let Some(view) = self.channels.iter_mut().find(|c| c.id == *channel)
                    && !view.users.contains(user)
                {
                    view.users.push(user.clone());
                }
            }
            Event::UserLeft { user, channel, .. } => {
                if let Some(view) = self.channels.iter_mut().find(|c| c.id == *channel) {
                    view.users.retain(|u| u != user);
                }
                // Voice state is a session's: whoever comes back under the name says theirs.
                self.speaking.remove(user);
                self.muted_users.remove(user);
                self.deafened_users.remove(user);
                self.sharing.remove(user);
            }
            Event::ChannelCreated { channel } => {
                self.channels.retain(|c| c.id != channel.id);
                self.channels.push(channel.clone());
            }
            Event::ChannelRemoved { channel, .. } => self.channels.retain(|c| c.id != *channel),
            Event::InviteCreated { link, .. } => self.invite = Some(link.clone()),
            Event::Message { from, channel, text, time_ms, received_ms, identity_changed, .. } => {
                let conversation = match channel {
                    Some(name) => Conversation::Channel(name.clone()),
                    None => Conversation::Direct(from.clone()),
                };
                self.open(conversation.clone());
                let line = Line {
                    from: from.clone(),
                    text: text.clone(),
                    time_ms: *time_ms,
                    received_ms: Some(*received_ms),
                    mine: false,
                    delivered: None,
                    identity_changed: *identity_changed,
                };
                self.add_line(conversation.clone(), line);
                if self.selected.as_ref() != Some(&conversation) {
                    *self.unread.entry(conversation).or_default() += 1;
                }
            }
            Event::WaitingForKeys { members, .. } => self.waiting_for_keys = Some(members.clone()),
            Event::WentWithoutKeys { members, .. } => {
                self.waiting_for_keys = None;
                self.error =
                    Some(format!("{} cannot read your last messages: their keys did not come", members.join(", ")));
            }
            Event::Delivered { reached, total } => {
                self.waiting_for_keys = None;
                let line = self
                    .conversations
                    .values_mut()
                    .flat_map(|lines| lines.iter_mut())
                    .filter(|l| l.mine && l.delivered.is_none())
                    .min_by_key(|l| l.time_ms);
                if let Some(line) = line {
                    line.delivered = Some((*reached, *total));
                }
            }
            Event::Safety { user, number, verified, identity_changed } => {
                if *verified {
                    self.verified.insert(user.clone());
                    self.identity_changed.remove(user);
                }
                self.safety = Some(Safety {
                    user: user.clone(),
                    number: number.clone(),
                    verified: *verified,
                    identity_changed: *identity_changed,
                });
            }
            Event::IdentityChanged { user } => {
                self.identity_changed.insert(user.clone());
                self.verified.remove(user);
            }
            Event::Speaking { user: Some(user), speaking, .. } => {
                if *speaking {
                    self.speaking.insert(user.clone());
                } else {
                    self.speaking.remove(user);
                }
            }
            Event::Health { rtt_ms, loss_percent, jitter_ms, kbps_up, kbps_down } => {
                if self.health.len() == HEALTH_HISTORY {
                    self.health.pop_front();
                }
                self.health.push_back(Health {
                    rtt_ms: *rtt_ms,
                    loss_percent: *loss_percent,
                    jitter_ms: *jitter_ms,
                    kbps: kbps_up + kbps_down,
                });
            }
            Event::InputLevel { dbfs } => self.input_level = Some(*dbfs),
            Event::VoiceState { user, muted, deafened, .. } => {
                for (set, on) in [(&mut self.muted_users, *muted), (&mut self.deafened_users, *deafened)] {
                    if on {
                        set.insert(user.clone());
                    } else {
                        set.remove(user);
                    }
                }
            }
            Event::Error { code, message } => self.error = Some(format!("{code}: {message}")),
            Event::Device { message } => self.error = Some(format!("sound device: {message}")),
            Event::Speaking { user: None, .. }
            | Event::Datagram { .. }
            | Event::PlayFinished
            | Event::VoiceStats { .. } => {}
        }
    }

    /// Our own line, shown as sent (the client core records it in the vault itself).
    pub fn sent(&mut self, conversation: Conversation, text: String, time_ms: u64) {
        self.open(conversation.clone());
        let from = self.me.clone().unwrap_or_default();
        let line =
            Line { from, text, time_ms, received_ms: None, mine: true, delivered: None, identity_changed: false };
        self.add_line(conversation, line);
    }

    /// A line at the end of a pane, the oldest going beyond [`PANE_LINES`] (in steps
    /// of a tenth, so that the pane is not shifted on every line).
    fn add_line(&mut self, conversation: Conversation, line: Line) {
        let lines = self.conversations.entry(conversation).or_default();
        lines.push(line);
        if lines.len() > PANE_LINES + PANE_LINES / 10 {
            lines.drain(..lines.len() - PANE_LINES);
        }
    }

    pub fn select(&mut self, conversation: Conversation) {
        self.unread.remove(&conversation);
        self.selected = Some(conversation);
    }

    /// A conversation's pane, filled from the vault's history the first time.
    fn open(&mut self, conversation: Conversation) {
        if self.conversations.contains_key(&conversation) {
            return;
        }
        let me = self.me.clone().unwrap_or_default();
        let lines = self
            .history
            .conversation(&conversation.history_key(&self.server))
            .map(|m| Line {
                mine: m.from == me,
                from: m.from.clone(),
                text: m.text.clone(),
                time_ms: m.time_ms,
                received_ms: None,
                delivered: None,
                identity_changed: false,
            })
            .collect();
        self.conversations.insert(conversation, lines);
    }

    pub fn my_channel_view(&self) -> Option<&ChannelView> {
        self.my_channel.and_then(|id| self.channels.iter().find(|c| c.id == id))
    }

    /// A model with a server, two channels, people and a conversation: for the view
    /// tests and for looking at the views.
    pub fn fixture() -> Model {
        let channel = |id: u32, name: &str, users: &[&str], has_password: bool| ChannelView {
            id,
            name: name.into(),
            description: String::new(),
            has_password,
            user_limit: if has_password { 5 } else { 0 },
            temporary: false,
            users: users.iter().map(|u| u.to_string()).collect(),
        };
        let mut model = Model {
            screen: Screen::Main,
            me: Some("alice".into()),
            server: "voice.example.org:9987".into(),
            channels: vec![channel(1, "Lobby", &["alice", "bob"], false), channel(2, "Staff", &["carol"], true)],
            my_channel: Some(1),
            ..Model::default()
        };
        model.speaking.insert("bob".into());
        model.apply(&Event::Message {
            from: "bob".into(),
            channel: Some("Lobby".into()),
            dm: false,
            text: "hello everyone".into(),
            time_ms: 1_700_000_000_000,
            received_ms: 1_700_000_000_000,
            verified: false,
            identity_changed: false,
        });
        model.select(Conversation::Channel("Lobby".into()));
        model
    }
}

/// Seconds since the epoch in milliseconds, shown as HH:MM (UTC).
pub fn clock(time_ms: u64) -> String {
    let minutes = time_ms / 60_000;
    format!("{:02}:{:02}", (minutes / 60) % 24, minutes % 60)
}

/// How hard a vault password is to guess, roughly: length and the kinds of characters.
pub fn password_strength(password: &str) -> (&'static str, f32) {
    let kinds = [
        password.chars().any(|c| c.is_ascii_lowercase()),
        password.chars().any(|c| c.is_ascii_uppercase()),
        password.chars().any(|c| c.is_ascii_digit()),
        password.chars().any(|c| !c.is_ascii_alphanumeric()),
    ]
    .iter()
    .filter(|k| **k)
    .count();
    let alphabet: f32 = [0.0, 26.0, 52.0, 62.0, 94.0][kinds];
    let bits = password.chars().count() as f32 * f32::log2(alphabet.max(1.0));
    match bits {
        b if b < 40.0 => ("weak", b / 100.0),
        b if b < 70.0 => ("fair", b / 100.0),
        b => ("strong", (b / 100.0).min(1.0)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_fold_into_the_model() {
        let mut model = Model::fixture();
        model.apply(&Event::Message {
            from: "carol".into(),
            channel: None,
            dm: true,
            text: "psst".into(),
            time_ms: 1,
            received_ms: 1,
            verified: false,
            identity_changed: true,
        });
        let dm = Conversation::Direct("carol".into());
        assert_eq!(
            Event::Message {
                from: "carol".into(),
                channel: None,
                dm: true,
                text: String::new(),
                time_ms: 1,
                received_ms: 1,
                verified: false,
                identity_changed: false
            }
            .cue(),
            Some(crate::audio::cues::Cue::Message)
        );
        assert_eq!(model.unread.get(&dm), Some(&1), "not the selected pane: unread");
        assert!(model.conversations[&dm][0].identity_changed);
        model.sent(Conversation::Channel("Lobby".into()), "hi".into(), 2);
        model.apply(&Event::Delivered { reached: 1, total: 1 });
        assert_eq!(model.conversations[&Conversation::Channel("Lobby".into())].last().unwrap().delivered, Some((1, 1)));
        model.apply(&Event::UserLeft { user: "bob".into(), session: 2, channel: 1 });
        assert_eq!(model.channels[0].users, ["alice"]);
        assert!(!model.speaking.contains("bob"));
        model.apply(&Event::IdentityChanged { user: "carol".into() });
        model.apply(&Event::Safety {
            user: "carol".into(),
            number: "1".repeat(60),
            verified: true,
            identity_changed: false,
        });
        assert!(model.verified.contains("carol") && !model.identity_changed.contains("carol"));
    }

    #[test]
    fn history_fills_a_pane_the_first_time() {
        let mut model = Model { me: Some("alice".into()), server: "h:1".into(), ..Model::default() };
        let stored = |from: &str, text: &str| crate::session::history::StoredMessage {
            from: from.into(),
            text: text.into(),
            time_ms: 5,
        };
        model.history.record("h:1#Lobby", stored("bob", "earlier"));
        model.history.record("h:1#Lobby", stored("alice", "mine"));
        model.apply(&Event::Joined { channel: 1, name: "Lobby".into(), users: vec!["alice".into()] });
        let lines = &model.conversations[&Conversation::Channel("Lobby".into())];
        assert_eq!(
            lines.iter().map(|l| (l.text.as_str(), l.mine)).collect::<Vec<_>>(),
            [("earlier", false), ("mine", true)]
        );
    }

    #[test]
    fn a_pane_keeps_its_newest_lines_only() {
        let mut model = Model { me: Some("alice".into()), server: "h:1".into(), ..Model::default() };
        let lobby = Conversation::Channel("Lobby".into());
        for i in 0..3 * PANE_LINES {
            model.sent(lobby.clone(), format!("line {i}"), i as u64);
            assert!(model.conversations[&lobby].len() <= PANE_LINES + PANE_LINES / 10);
        }
        let lines = &model.conversations[&lobby];
        assert_eq!(lines.last().unwrap().text, format!("line {}", 3 * PANE_LINES - 1), "the newest stays");
    }

    #[test]
    fn password_hints() {
        assert_eq!(password_strength("abc").0, "weak");
        assert_eq!(password_strength("correct horse battery").0, "strong");
        assert_eq!(password_strength("Tr0ub4dor").0, "fair");
    }
}
