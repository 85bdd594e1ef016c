//! The server's brain, sans-IO: users, channels, invites, limits and fan-out decisions.
//!
//! The shell in `net/` feeds it what happened ([`Relay::handle_input`],
//! [`Relay::handle_timeout`]) with the time as an argument, and carries out what it asks
//! for ([`Relay::poll_output`]). Media takes its own way, outside the relay's lock: each
//! sender's [`route::MediaPath`] routes with a copy of what it needs. Nothing here touches a
//! socket or reads the clock, so every scenario here runs in tests on a virtual clock.

pub mod handshakes;
pub mod keys;
pub mod leg;
pub mod limits;
pub mod metrics;
pub mod password;
pub mod presence;
pub mod route;
pub mod screen;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::Bound;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use zeroize::Zeroizing;

use crate::config::{Limits, ServerConfig};
use crate::protocol::{
    ChannelId, ChannelInfo, ClientMsg, ErrorCode, Fingerprint, JoinRequest, MediaHeaderError, PROTOCOL_VERSION,
    ServerMsg, SessionId, ShareInfo, UserInfo, VoiceState, canonical_name, check_visible,
};
use keys::{BundleError, StoredBundle};
use limits::TokenBucket;
pub use presence::PRESENCE_DELAY;
pub use screen::KEYFRAME_MERGE;

/// Within this time, a second fetch of the same identity's bundle by the same requester
/// (the same identity key, or the same source address, whatever its connections) gets no
/// one-time keys, only the reusable ones: draining a user's one-time keys takes a source
/// address per key.
const REFETCH_WINDOW: Duration = Duration::from_secs(60);
/// Requests over its rate a connection may make, on average and at once, before it is
/// disconnected: a client that slows down when told stays well inside them.
const OVER_RATE_PER_SEC: u32 = 5;
const OVER_RATE_BURST: u32 = 50;

/// Wrong-password records (source and channel) kept at most; when full, those no longer
/// waiting are forgotten first.
const MAX_PASSWORD_BACKOFFS: usize = 100_000;
/// A source's wrong guesses are forgotten this long after its last one.
const PASSWORD_MEMORY: Duration = Duration::from_secs(3600);

/// The most (requester, target) one-time key hand-outs remembered; when full, fetches
/// get the reusable keys only until old entries expire.
const MAX_KEY_FETCH_RECORDS: usize = 100_000;

/// Bans last at most a week, and at most this many are kept (when full, the one ending
/// soonest makes room).
const MAX_BAN_MINUTES: u32 = 7 * 24 * 60;
const MAX_BANS: usize = 100_000;

/// Where a connection comes from, as per-source limits count it: an IPv4 address, or the
/// /64 of an IPv6 address (one subscriber's usual allocation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Source(std::net::IpAddr);

impl Source {
    pub fn of(ip: std::net::IpAddr) -> Source {
        use std::net::{IpAddr, Ipv6Addr};
        match ip {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source(IpAddr::V4(v4)),
                None => Source(IpAddr::V6(Ipv6Addr::from_bits(v6.to_bits() & !((1u128 << 64) - 1)))),
            },
            v4 => Source(v4),
        }
    }
}

/// Who took one of a user's one-time keys, for [`REFETCH_WINDOW`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Requester {
    /// The SHA-256 of the requester's identity key.
    Identity([u8; 32]),
    Source(Source),
}

/// The shell's handle for one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// A permanent channel as the relay keeps it: the password only as a hash.
#[derive(Debug, Clone)]
pub struct PermanentChannel {
    pub name: String,
    pub description: String,
    pub password_hash: Option<String>,
    pub user_limit: u32,
}

#[derive(Debug, Clone)]
pub struct RelayConfig {
    pub max_users: u32,
    pub limits: Limits,
    /// The first is where users land.
    pub channels: Vec<PermanentChannel>,
    /// Identity keys (their fingerprints) that may moderate once proved.
    pub admins: Vec<Fingerprint>,
    /// This server's certificate fingerprint, which admin proofs are bound to: set by
    /// [`Relay::set_server_id`] when the shell binds (left zero, no proof holds).
    pub server_id: Fingerprint,
}

impl RelayConfig {
    /// Takes a server config, hashing the permanent channels' passwords (slow; do it
    /// once at start). The passwords are taken out of `config` and wiped: from here on
    /// the server holds only their hashes.
    pub fn from_server_config(config: &mut ServerConfig) -> Self {
        let channels = config
            .channels
            .iter_mut()
            .map(|c| PermanentChannel {
                name: c.name.clone(),
                description: c.description.clone(),
                password_hash: c.password.take().map(|password| password::hash_with_random_salt(&password)),
                user_limit: c.user_limit,
            })
            .collect();
        Self {
            max_users: config.max_users,
            limits: config.limits.clone(),
            channels,
            admins: config.admins.clone(),
            server_id: Fingerprint([0; 32]),
        }
    }
}

/// What happened on a connection.
#[derive(Debug)]
pub enum Input {
    /// A new connection, not yet introduced, and how many handshakes its source started
    /// lately (the shell's handshake rate, [`handshakes::HandshakeSlots::started_lately`]).
    Connected {
        source: Source,
        started_lately: u32,
    },
    Control(ClientMsg),
    /// The control stream carried something that is not a message
    /// (`MalformedFrame` or `FrameTooLarge`); the connection is closed.
    BadFrame {
        code: ErrorCode,
        detail: String,
    },
    /// The answer to [`Output::VerifyPassword`].
    PasswordChecked {
        matched: bool,
    },
    /// The answer to [`Output::HashPassword`]: a PHC string.
    PasswordHashed {
        hash: String,
    },
    /// The shell is doing as much password work as it takes: the pending request is
    /// refused (server busy), not queued without bound.
    PasswordBusy,
    Disconnected,
}

/// What the shell must do.
#[derive(Debug)]
pub enum Output {
    Send {
        to: ConnId,
        msg: ServerMsg,
    },
    /// The same message to each of `to`: encoded once.
    Broadcast {
        to: Vec<ConnId>,
        msg: ServerMsg,
    },
    /// Close the connection after the messages queued for it so far.
    Close {
        conn: ConnId,
        code: ErrorCode,
    },
    /// Check a password against a hash off the relay's thread and answer with
    /// [`Input::PasswordChecked`].
    VerifyPassword {
        conn: ConnId,
        password: Zeroizing<String>,
        hash: String,
    },
    /// Hash a password off the relay's thread and answer with [`Input::PasswordHashed`].
    HashPassword {
        conn: ConnId,
        password: Zeroizing<String>,
    },
}

/// Why a datagram was not forwarded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DropReason {
    #[error("sender has not said hello")]
    NotIntroduced,
    #[error("bad media header: {0}")]
    Header(#[from] MediaHeaderError),
    #[error("header names another sender")]
    WrongSender,
    #[error("sender is not in the header's channel")]
    NotInChannel,
    #[error("over the media rate cap")]
    RateLimited,
    #[error("screen datagram from a user who is not sharing")]
    NotSharing,
}

/// Counters the shell can log or export.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RelayStats {
    pub datagrams_in: u64,
    pub datagrams_forwarded: u64,
    pub bytes_forwarded: u64,
    pub dropped_rate_limited: u64,
    pub dropped_invalid: u64,
    /// Connections refused at once: too many from their source, or starting at once.
    pub refused_connections: u64,
    /// Every refusal sent, by its code.
    pub refusals: BTreeMap<ErrorCode, u64>,
}

/// Errors in the shell's use of the relay (never caused by a peer's bytes).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RelayError {
    #[error("connection {0:?} is not known to the relay")]
    UnknownConnection(ConnId),
    #[error("connection {0:?} was announced twice")]
    DuplicateConnection(ConnId),
}

struct Conn {
    user: Option<User>,
    /// Set until hello: the time by which it must arrive.
    hello_deadline: Option<Instant>,
    /// Handshakes its source had started lately when it connected.
    started_lately: u32,
    control: TokenBucket,
    chat: TokenBucket,
    chat_bytes: TokenBucket,
    /// Control requests over the rate the connection may make before it is disconnected.
    strikes: TokenBucket,
    fetches: TokenBucket,
    source: Source,
    /// A slow password operation the shell is doing for this connection.
    pending: Option<Pending>,
}

struct User {
    session: SessionId,
    name: String,
    channel: Option<ChannelId>,
    voice: VoiceState,
    bundle: Option<StoredBundle>,
    /// Proved it holds an admin key ([`ClientMsg::ProveAdmin`]).
    admin: bool,
    /// What it signs to prove that, fresh for this connection.
    challenge: [u8; 32],
}

enum Pending {
    /// Waiting for a password check; on failure, land in the default channel if `fallback`.
    Join { channel: ChannelId, fallback: bool },
    /// Waiting for a new channel's password hash.
    Create(NewChannel),
}

struct NewChannel {
    name: String,
    description: String,
    user_limit: u32,
}

struct Channel {
    info: ChannelInfo,
    password_hash: Option<String>,
    members: Vec<ConnId>,
    /// For temporary channels: the session that made it, which may keep only so many.
    creator: Option<SessionId>,
    /// For temporary channels: since when nobody has been in it.
    empty_since: Option<Instant>,
}

struct Invite {
    channel: ChannelId,
    expires_at: Instant,
    uses_left: u32,
}

/// What an admin may ask for (see [`ClientMsg::Kick`] and those after it).
enum Moderation {
    Kick(SessionId),
    Ban(SessionId, u32),
    Close(ChannelId),
    Move(SessionId, ChannelId),
}

/// A refusal sent back to one connection.
struct Refusal(ErrorCode, String);

impl Refusal {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Refusal(code, message.into())
    }
}

pub struct Relay {
    config: RelayConfig,
    conns: HashMap<ConnId, Conn>,
    channels: BTreeMap<ChannelId, Channel>,
    invites: HashMap<String, Invite>,
    /// Introduced users' connections, for messages addressed by session, in session
    /// order for the pages of the listing.
    sessions: BTreeMap<SessionId, ConnId>,
    /// Users who came, changed or went since the last presence batch.
    changes: presence::Changes,
    default_channel: Option<ChannelId>,
    next_session: u32,
    next_channel: u32,
    users: u32,
    outputs: VecDeque<Output>,
    rng: StdRng,
    stats: RelayStats,
    /// Added to by the datagram paths, outside the relay's lock.
    media_counts: Arc<route::MediaCounts>,
    /// Counts changes to channel membership and to who is introduced (see
    /// [`Relay::routes_version`]).
    members_version: u64,
    /// Who took one-time keys of which identity (the SHA-256 of its key), and when:
    /// outlives connections, so reconnecting does not renew a requester's budget.
    key_fetches: HashMap<(Requester, [u8; 32]), Instant>,
    /// Wrong channel passwords by source and channel: outlives connections, so
    /// reconnecting does not renew the guesses.
    password_backoff: HashMap<(Source, ChannelId), Backoff>,
    /// Temporary channel creations per source.
    creations: HashMap<Source, TokenBucket>,
    /// Sources an admin banned, until when.
    bans: HashMap<Source, Instant>,
    /// Screen shares and who watches them.
    screens: screen::Screens,
}

/// Wrong guesses of one channel's password from one source.
#[derive(Debug)]
struct Backoff {
    failures: u32,
    last_failure: Instant,
    next_try: Option<Instant>,
}

impl Relay {
    /// `seed` feeds invite tokens: the shell passes OS randomness, tests a constant.
    pub fn new(config: RelayConfig, seed: [u8; 32]) -> Self {
        let mut relay = Relay {
            conns: HashMap::new(),
            channels: BTreeMap::new(),
            invites: HashMap::new(),
            sessions: BTreeMap::new(),
            changes: presence::Changes::default(),
            default_channel: None,
            next_session: 1,
            next_channel: 1,
            users: 0,
            outputs: VecDeque::new(),
            rng: StdRng::from_seed(seed),
            stats: RelayStats::default(),
            media_counts: Arc::default(),
            members_version: 0,
            key_fetches: HashMap::new(),
            password_backoff: HashMap::new(),
            creations: HashMap::new(),
            bans: HashMap::new(),
            screens: screen::Screens::default(),
            config,
        };
        for permanent in relay.config.channels.clone() {
            let id = relay.add_channel(
                permanent.name,
                permanent.description,
                permanent.password_hash,
                permanent.user_limit,
                false,
            );
            relay.default_channel.get_or_insert(id);
        }
        relay
    }

    /// The certificate fingerprint clients pinned: admin proofs must name it.
    pub fn set_server_id(&mut self, server: Fingerprint) {
        self.config.server_id = server;
    }

    pub fn stats(&self) -> RelayStats {
        let counts = &self.media_counts;
        RelayStats {
            datagrams_in: counts.datagrams_in.load(Ordering::Relaxed),
            datagrams_forwarded: counts.datagrams_forwarded.load(Ordering::Relaxed),
            bytes_forwarded: counts.bytes_forwarded.load(Ordering::Relaxed),
            dropped_rate_limited: counts.dropped_rate_limited.load(Ordering::Relaxed),
            dropped_invalid: counts.dropped_invalid.load(Ordering::Relaxed),
            ..self.stats.clone()
        }
    }

    /// Channels that exist now, permanent and temporary.
    pub fn channel_count(&self) -> usize {
        self.channels.len()
    }

    /// Connections that have not said hello yet.
    pub fn pending_count(&self) -> usize {
        self.conns.values().filter(|c| c.user.is_none()).count()
    }

    /// Users that have said hello.
    pub fn user_count(&self) -> u32 {
        self.users
    }

    #[must_use]
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// The next time [`Relay::handle_timeout`] has work to do.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        let hellos = self.conns.values().filter_map(|c| c.hello_deadline);
        let empty_timeout = Duration::from_secs(self.config.limits.empty_channel_timeout_secs);
        let channels = self.channels.values().filter_map(|c| c.empty_since.map(|t| t + empty_timeout));
        let invites = self.invites.values().map(|i| i.expires_at);
        hellos.chain(channels).chain(invites).chain(self.changes.due()).chain(self.screens.poll_timeout()).min()
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        let late: Vec<ConnId> =
            self.conns.iter().filter(|(_, c)| c.hello_deadline.is_some_and(|d| d <= now)).map(|(id, _)| *id).collect();
        for conn in late {
            self.close(now, conn, Refusal::new(ErrorCode::HelloTimeout, "no hello in time"));
        }
        let empty_timeout = Duration::from_secs(self.config.limits.empty_channel_timeout_secs);
        let expired: Vec<ChannelId> = self
            .channels
            .iter()
            .filter(|(_, c)| c.empty_since.is_some_and(|t| t + empty_timeout <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            self.remove_channel(id);
        }
        self.invites.retain(|_, invite| invite.expires_at > now);
        self.bans.retain(|_, until| *until > now);
        self.key_fetches.retain(|_, at| now.saturating_duration_since(*at) < REFETCH_WINDOW);
        self.password_backoff.retain(|_, b| now.saturating_duration_since(b.last_failure) < PASSWORD_MEMORY);
        if let Some(changed) = self.changes.take_due(now) {
            self.send_presence(changed);
        }
        for sharer in self.screens.due_keyframe_requests(now) {
            self.send(sharer, ServerMsg::KeyframeRequested);
        }
    }

    pub fn handle_input(&mut self, now: Instant, conn: ConnId, input: Input) -> Result<(), RelayError> {
        let Some(state) = self.conns.get_mut(&conn) else {
            return match input {
                Input::Connected { source, started_lately } => {
                    self.connect(now, conn, source, started_lately);
                    Ok(())
                }
                // A connection the relay already closed can still report its end or a late answer.
                Input::Disconnected
                | Input::PasswordChecked { .. }
                | Input::PasswordHashed { .. }
                | Input::PasswordBusy => Ok(()),
                _ => Err(RelayError::UnknownConnection(conn)),
            };
        };
        match input {
            Input::Connected { .. } => return Err(RelayError::DuplicateConnection(conn)),
            Input::Disconnected => self.disconnect(now, conn),
            Input::BadFrame { code, detail } => self.close(now, conn, Refusal(code, detail)),
            Input::PasswordChecked { matched } => self.password_checked(now, conn, matched),
            Input::PasswordHashed { hash } => self.password_hashed(now, conn, hash),
            Input::PasswordBusy => self.password_busy(now, conn),
            Input::Control(msg) => {
                // Every message sent gets exactly one Delivered or NotDelivered, so that the
                // sender can match answers to messages in order.
                let is_message = matches!(msg, ClientMsg::Direct { .. } | ClientMsg::Channel { .. });
                let bucket = match msg {
                    ClientMsg::Direct { .. } | ClientMsg::Channel { .. } => &mut state.chat,
                    ClientMsg::FetchBundle { .. } => &mut state.fetches,
                    _ => &mut state.control,
                };
                // Messages also count in bytes: what one sender may put into everyone's queue
                // at once stays far below what a receiver's queue holds.
                let bytes = match &msg {
                    ClientMsg::Direct { ciphertext, .. } | ClientMsg::Channel { ciphertext, .. } => ciphertext.len(),
                    _ => 0,
                };
                let bytes = u32::try_from(bytes).unwrap_or(u32::MAX);
                let over_rate = !bucket.try_take(now, 1) || (bytes > 0 && !state.chat_bytes.try_take(now, bytes));
                // A client that keeps sending control requests over its rate after being
                // refused is let go: refusing costs the server too. Messages and bundle
                // fetches over their rates are only refused: our clients send them again with
                // back-off (key deliveries in a large channel can run over for a while).
                let control = !is_message && !matches!(msg, ClientMsg::FetchBundle { .. });
                if over_rate && control && !state.strikes.try_take(now, 1) {
                    self.close(now, conn, Refusal::new(ErrorCode::RateLimited, "far too many requests; disconnected"));
                    return Ok(());
                }
                let refused = if over_rate {
                    Some(Refusal::new(ErrorCode::RateLimited, "too many requests; slow down"))
                } else if state.user.is_none() {
                    self.hello(now, conn, msg);
                    None
                } else {
                    self.request(now, conn, msg).err()
                };
                match refused {
                    Some(Refusal(code, message)) if is_message && self.conns[&conn].user.is_some() => {
                        *self.stats.refusals.entry(code).or_default() += 1;
                        self.send(conn, ServerMsg::NotDelivered { code, message });
                    }
                    Some(refusal) => self.refuse(conn, refusal),
                    None => {}
                }
            }
        }
        Ok(())
    }

    /// What `conn`'s datagram path needs to route its media (see [`route`]); `None`
    /// until it is introduced.
    pub fn media_route(&self, conn: ConnId) -> Option<route::MediaRoute> {
        let user = self.conns.get(&conn)?.user.as_ref()?;
        let members = user.channel.and_then(|id| self.channels.get(&id)).map_or(&[][..], |c| &c.members[..]);
        Some(route::MediaRoute {
            session: user.session,
            channel: user.channel,
            listeners: members.iter().copied().filter(|m| *m != conn).collect(),
            viewers: self.screens.viewers(conn).map(<[ConnId]>::to_vec),
        })
    }

    /// Changes with every change to what [`Relay::media_route`] answers for anyone: a
    /// datagram path with a copy taken at another version refreshes it.
    pub fn routes_version(&self) -> u64 {
        self.members_version.wrapping_add(self.screens.version())
    }

    fn connect(&mut self, now: Instant, conn: ConnId, source: Source, started_lately: u32) {
        let pending = self.pending_count();
        let limits = &self.config.limits;
        let from_source = self.conns.values().filter(|c| c.source == source);
        let (here, pending_here) = from_source.fold((0, 0), |(n, p), c| (n + 1, p + usize::from(c.user.is_none())));
        let banned = self.bans.get(&source).is_some_and(|until| *until > now);
        let refusal = if banned {
            Some((ErrorCode::Banned, "your address is banned from this server for now"))
        } else if here >= limits.max_connections_per_source as usize {
            Some((ErrorCode::TooManyFromSource, "too many connections from your address"))
        } else if pending_here >= limits.max_pending_per_source as usize {
            Some((ErrorCode::TooManyFromSource, "too many connections from your address are starting"))
        } else {
            None
        };
        if let Some((code, message)) = refusal {
            self.stats.refused_connections += 1;
            self.send(conn, error_msg(code, message));
            self.outputs.push_back(Output::Close { conn, code });
            return;
        }
        if pending >= self.config.limits.max_pending_connections as usize {
            // Full of connections that have not said hello: of those from the sources that
            // started the most lately, the one that has waited longest goes, not the
            // newcomer. A real client says hello as soon as it is connected, so a flood of
            // silent connections cannot keep people out, even one from many addresses
            // that connects again as fast as its connections go (it churns among its own).
            let pending = self.conns.iter().filter(|(_, c)| c.user.is_none());
            let oldest = pending.min_by_key(|(id, c)| (std::cmp::Reverse(c.started_lately), c.hello_deadline, **id));
            if let Some((&oldest, _)) = oldest {
                self.stats.refused_connections += 1;
                let busy =
                    Refusal::new(ErrorCode::ServerBusy, "too many connections are starting; yours waited longest");
                self.close(now, oldest, busy);
            }
        }
        let limits = &self.config.limits;
        self.conns.insert(
            conn,
            Conn {
                user: None,
                hello_deadline: Some(now + Duration::from_secs(limits.hello_timeout_secs)),
                started_lately,
                control: TokenBucket::new(now, limits.control_messages_per_sec, limits.control_burst),
                chat: TokenBucket::new(now, limits.chat_messages_per_sec, limits.chat_burst),
                chat_bytes: TokenBucket::new(now, limits.chat_bytes_per_sec, limits.chat_burst_bytes),
                strikes: TokenBucket::new(now, OVER_RATE_PER_SEC, OVER_RATE_BURST),
                fetches: TokenBucket::new(now, limits.bundle_fetches_per_sec, limits.bundle_fetch_burst),
                source,
                pending: None,
            },
        );
    }

    fn hello(&mut self, now: Instant, conn: ConnId, msg: ClientMsg) {
        let ClientMsg::Hello { version, name, join, bundle } = msg else {
            return self.close(now, conn, Refusal::new(ErrorCode::HelloRequired, "the first message must be a hello"));
        };
        if version != PROTOCOL_VERSION {
            return self.close(
                now,
                conn,
                Refusal::new(
                    ErrorCode::VersionMismatch,
                    format!("server speaks protocol version {PROTOCOL_VERSION}, client speaks version {version}"),
                ),
            );
        }
        let name = name.trim().to_owned();
        if let Err(refusal) = check_name(&name, self.config.limits.max_user_name_len, "user name") {
            return self.close(now, conn, refusal);
        }
        if self.users >= self.config.max_users {
            return self.close(
                now,
                conn,
                Refusal::new(ErrorCode::ServerFull, format!("server is full ({} users)", self.users)),
            );
        }
        let bundle = match bundle.map(|b| StoredBundle::new(*b)).transpose() {
            Ok(bundle) => bundle,
            Err(e) => return self.close(now, conn, bundle_refusal(e)),
        };
        let key = canonical_name(&name);
        let taken = self.conns.values().any(|c| c.user.as_ref().is_some_and(|u| canonical_name(&u.name) == key));
        if taken {
            return self.close(
                now,
                conn,
                Refusal::new(ErrorCode::NameTaken, format!("the name {name:?} is in use on this server")),
            );
        }

        let session = SessionId(self.next_session);
        self.next_session += 1;
        self.users += 1;
        let state = self.conns.get_mut(&conn).expect("hello comes from a known connection");
        state.hello_deadline = None;
        let challenge: [u8; 32] = self.rng.random();
        state.user = Some(User {
            session,
            name: name.clone(),
            channel: None,
            voice: VoiceState::default(),
            bundle,
            admin: false,
            challenge,
        });
        self.sessions.insert(session, conn);
        self.members_version += 1;
        self.changes.mark(now, session);

        self.send(conn, ServerMsg::Welcome { session, name, server_version: PROTOCOL_VERSION, challenge });
        let channels: Vec<ServerMsg> =
            self.channels.values().map(|c| ServerMsg::ChannelAdded(c.info.clone())).collect();
        for msg in channels {
            self.send(conn, msg);
        }
        match join {
            Some(request) => {
                if let Err(refusal) = self.join(now, conn, request, true) {
                    self.refuse(conn, refusal);
                    self.join_default(now, conn);
                }
            }
            None => self.join_default(now, conn),
        }
        // After the join, so that the first page shows where the user landed (unless a
        // password check is still under way: then a presence batch tells).
        let first = self.listing_page(conn, None);
        self.send(conn, first);
    }

    /// A page of the listing for `conn`: the users after `after`, or for the first page
    /// the user itself and then everyone else from the start. Others are told as they
    /// are now; those who come later arrive in presence batches.
    fn listing_page(&self, conn: ConnId, after: Option<SessionId>) -> ServerMsg {
        let me = self.user(conn);
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        let others = self
            .sessions
            .range((start, Bound::Unbounded))
            .filter(|(session, _)| **session != me.session)
            .map(|(_, other)| self.user_info(*other));
        let first = after.is_none().then(|| self.user_info(conn));
        let (users, more) = presence::page(&mut first.into_iter().chain(others).peekable());
        ServerMsg::Users { users, more }
    }

    /// A message from `conn` may overtake the batch that tells its receivers who sent
    /// it (and from which channel): they learn that first. The batch repeats it.
    fn introduce(&mut self, conn: ConnId, to: Vec<ConnId>) {
        if self.changes.pending(self.user(conn).session) && !to.is_empty() {
            let msg = ServerMsg::Presence { users: vec![self.user_info(conn)], gone: vec![] };
            self.outputs.push_back(Output::Broadcast { to, msg });
        }
    }

    /// Tells everyone how the `changed` users are now, in messages of bounded size.
    fn send_presence(&mut self, changed: std::collections::BTreeSet<SessionId>) {
        let (here, gone): (Vec<SessionId>, Vec<SessionId>) =
            changed.into_iter().partition(|session| self.sessions.contains_key(session));
        let here: Vec<UserInfo> = here.into_iter().map(|session| self.user_info(self.sessions[&session])).collect();
        let mut users = here.into_iter().peekable();
        let mut gone = gone.into_iter();
        loop {
            let (page, _) = presence::page(&mut users);
            let gone: Vec<SessionId> = gone.by_ref().take(presence::GONE_PER_MESSAGE).collect();
            if page.is_empty() && gone.is_empty() {
                break;
            }
            self.broadcast(ServerMsg::Presence { users: page, gone });
        }
    }

    /// Requests from a connection that has said hello.
    fn request(&mut self, now: Instant, conn: ConnId, msg: ClientMsg) -> Result<(), Refusal> {
        if self.conns[&conn].pending.is_some() {
            return Err(Refusal::new(ErrorCode::RateLimited, "the previous request is still being processed"));
        }
        match msg {
            ClientMsg::Hello { .. } => Err(Refusal::new(ErrorCode::InvalidRequest, "hello was already said")),
            ClientMsg::Join(request) => self.join(now, conn, request, false),
            ClientMsg::Leave => {
                if self.user(conn).channel.is_none() {
                    return Err(Refusal::new(ErrorCode::NotInChannel, "you are not in a channel"));
                }
                self.move_user(now, conn, None);
                Ok(())
            }
            ClientMsg::CreateChannel { name, description, password, user_limit } => {
                let password = password.map(Zeroizing::new);
                self.create_channel(now, conn, NewChannel { name, description, user_limit }, password)
            }
            ClientMsg::CreateInvite { max_uses, ttl_secs } => self.create_invite(now, conn, max_uses, ttl_secs),
            ClientMsg::SetVoiceState(voice) => {
                let user = self.user_mut(conn);
                if user.voice != voice {
                    user.voice = voice;
                    let session = user.session;
                    self.changes.mark(now, session);
                }
                Ok(())
            }
            ClientMsg::SetShare(share) => self.set_share(now, conn, share),
            ClientMsg::Watch { sharer, watch } => self.watch(now, conn, sharer, watch),
            // These race with the end of a share (the viewer has not heard of it yet): for
            // a share not watched they are dropped without a reply.
            ClientMsg::RequestKeyframe { sharer } => {
                if let Some(sharer) = self.watched(conn, sharer)
                    && self.screens.request_keyframe(now, sharer)
                {
                    self.send(sharer, ServerMsg::KeyframeRequested);
                }
                Ok(())
            }
            ClientMsg::ScreenReport { sharer, report } => {
                if let Some(sharer) = self.watched(conn, sharer)
                    && self.screens.take_report(now, conn, sharer)
                {
                    let viewer = self.user(conn).session;
                    self.send(sharer, ServerMsg::ScreenReport { viewer, report });
                }
                Ok(())
            }
            ClientMsg::ListUsers { after } => {
                let page = self.listing_page(conn, Some(after));
                self.send(conn, page);
                Ok(())
            }
            ClientMsg::AddOneTimeKeys { one_time, kyber_one_time } => {
                let bundle = self
                    .user_mut(conn)
                    .bundle
                    .as_mut()
                    .ok_or_else(|| Refusal::new(ErrorCode::NoBundle, "upload a bundle before adding keys to it"))?;
                bundle.add(one_time, kyber_one_time).map_err(bundle_refusal)
            }
            ClientMsg::FetchBundle { peer } => self.fetch_bundle(now, conn, peer),
            ClientMsg::Direct { to, ciphertext } => {
                self.check_message_size(&ciphertext)?;
                let target = self.conn_of(to)?;
                let from = self.user(conn).session;
                self.introduce(conn, vec![target]);
                self.send(target, ServerMsg::Direct { from, ciphertext });
                self.send(conn, ServerMsg::Delivered { reached: 1, total: 1 });
                Ok(())
            }
            ClientMsg::Channel { channel, ciphertext } => {
                self.check_message_size(&ciphertext)?;
                let user = self.user(conn);
                if user.channel != Some(channel) {
                    return Err(Refusal::new(ErrorCode::NotInChannel, "you can only write to the channel you are in"));
                }
                let from = user.session;
                let others: Vec<ConnId> =
                    self.channels[&channel].members.iter().copied().filter(|m| *m != conn).collect();
                let reached = others.len() as u32;
                self.introduce(conn, others.clone());
                self.outputs
                    .push_back(Output::Broadcast { to: others, msg: ServerMsg::Channel { from, channel, ciphertext } });
                self.send(conn, ServerMsg::Delivered { reached, total: reached });
                Ok(())
            }
            ClientMsg::ProveAdmin { signature } => {
                self.prove_admin(conn, &signature);
                Ok(())
            }
            ClientMsg::Kick { session } => self.moderate(now, conn, Moderation::Kick(session)),
            ClientMsg::Ban { session, minutes } => self.moderate(now, conn, Moderation::Ban(session, minutes)),
            ClientMsg::CloseChannel { channel } => self.moderate(now, conn, Moderation::Close(channel)),
            ClientMsg::MoveUser { session, channel } => self.moderate(now, conn, Moderation::Move(session, channel)),
        }
    }

    /// Grants moderation to a connection whose hello published a listed identity key and
    /// which signed this connection's challenge with it. Anyone else's proof is ignored:
    /// every client sends one, and a claimed key alone is nothing.
    fn prove_admin(&mut self, conn: ConnId, signature: &[u8]) {
        let server = self.config.server_id;
        let user = self.user(conn);
        let Some(bundle) = user.bundle.as_ref().filter(|_| !user.admin) else { return };
        if !self.config.admins.contains(&Fingerprint(bundle.identity_hash())) {
            return;
        }
        let message = crate::protocol::admin_proof_message(&server, &user.challenge, user.session);
        if !crate::e2ee::verify_identity_signature(bundle.identity_key(), &message, signature) {
            return self.refuse(conn, Refusal::new(ErrorCode::NotAdmin, "the admin proof does not verify"));
        }
        self.user_mut(conn).admin = true;
        self.send(conn, ServerMsg::AdminGranted);
    }

    fn moderate(&mut self, now: Instant, conn: ConnId, action: Moderation) -> Result<(), Refusal> {
        if !self.user(conn).admin {
            return Err(Refusal::new(ErrorCode::NotAdmin, "only the server's admins may do that"));
        }
        match action {
            Moderation::Kick(session) => {
                let target = self.conn_of(session)?;
                self.close(now, target, Refusal::new(ErrorCode::Kicked, "an admin ended your session"));
            }
            Moderation::Ban(session, minutes) => {
                let target = self.conn_of(session)?;
                let source = self.conns[&target].source;
                let minutes = minutes.clamp(1, MAX_BAN_MINUTES);
                self.bans.retain(|_, until| *until > now);
                if self.bans.len() >= MAX_BANS {
                    let soonest = self.bans.iter().min_by_key(|(_, until)| **until).map(|(s, _)| *s);
                    if let Some(soonest) = soonest {
                        self.bans.remove(&soonest);
                    }
                }
                self.bans.insert(source, now + Duration::from_secs(60 * u64::from(minutes)));
                // Everyone connected from there goes, not only the one named (but not the
                // admin who asked, if that is there too).
                let from_there: Vec<ConnId> =
                    self.conns.iter().filter(|(id, c)| c.source == source && **id != conn).map(|(id, _)| *id).collect();
                let message = format!("an admin banned your address for {minutes} minutes");
                for target in from_there {
                    self.close(now, target, Refusal::new(ErrorCode::Banned, message.clone()));
                }
            }
            Moderation::Close(channel) => {
                let info = &self.channels.get(&channel).ok_or_else(no_such_channel)?.info;
                if !info.temporary {
                    return Err(Refusal::new(
                        ErrorCode::InvalidRequest,
                        "permanent channels are closed in server.toml",
                    ));
                }
                let members = self.channels[&channel].members.clone();
                for member in members {
                    self.move_user(now, member, None);
                    self.join_default(now, member);
                }
                self.remove_channel(channel);
            }
            Moderation::Move(session, channel) => {
                let target = self.conn_of(session)?;
                self.channels.get(&channel).ok_or_else(no_such_channel)?;
                if self.user(target).channel != Some(channel) {
                    self.move_user(now, target, Some(channel));
                }
            }
        }
        Ok(())
    }

    fn check_message_size(&self, ciphertext: &[u8]) -> Result<(), Refusal> {
        let max = self.config.limits.max_message_bytes as usize;
        if ciphertext.len() > max {
            return Err(Refusal::new(ErrorCode::MessageTooLarge, format!("a message may have at most {max} bytes")));
        }
        Ok(())
    }

    /// Starts, changes or ends `conn`'s screen share; everyone sees it in the presence.
    fn set_share(&mut self, now: Instant, conn: ConnId, share: Option<ShareInfo>) -> Result<(), Refusal> {
        let user = self.user(conn);
        let session = user.session;
        let changed = match share {
            None => self.screens.stop(conn),
            Some(_) if user.channel.is_none() => {
                return Err(Refusal::new(ErrorCode::NotInChannel, "join a channel to share a screen in it"));
            }
            Some(info) if !info.is_plausible() => {
                return Err(Refusal::new(ErrorCode::InvalidRequest, "a share is 16-8192 pixels each way at 1-60 fps"));
            }
            Some(info) => self.screens.set(conn, info),
        };
        if changed {
            self.changes.mark(now, session);
        }
        Ok(())
    }

    /// `conn` starts or stops watching `sharer`, a member of its channel. A new viewer
    /// needs a keyframe to start from: the relay asks for one on its behalf.
    fn watch(&mut self, now: Instant, conn: ConnId, sharer: SessionId, watch: bool) -> Result<(), Refusal> {
        let target = self.conn_of(sharer)?;
        if !watch {
            if self.screens.unwatch(conn, target) {
                self.tell_viewer_count(target);
            }
            return Ok(());
        }
        let here = self.user(conn).channel;
        if target == conn || here.is_none() || self.user(target).channel != here {
            return Err(Refusal::new(ErrorCode::NotInChannel, "you can watch others in your channel"));
        }
        match self.screens.watch(conn, target) {
            Ok(false) => Ok(()),
            Ok(true) => {
                self.tell_viewer_count(target);
                if self.screens.request_keyframe(now, target) {
                    self.send(target, ServerMsg::KeyframeRequested);
                }
                Ok(())
            }
            Err(screen::WatchError::NotSharing) => Err(Refusal::new(ErrorCode::NotSharing, "they are not sharing")),
            Err(screen::WatchError::TooMany) => Err(Refusal::new(
                ErrorCode::TooManyStreams,
                format!("you can watch {} streams at once", screen::MAX_WATCHING),
            )),
        }
    }

    /// The connection of `sharer` when `conn` watches it: only a viewer may ask for
    /// keyframes or report.
    fn watched(&self, conn: ConnId, sharer: SessionId) -> Option<ConnId> {
        let target = *self.sessions.get(&sharer)?;
        self.screens.is_watching(conn, target).then_some(target)
    }

    fn tell_viewer_count(&mut self, sharer: ConnId) {
        let count = self.screens.viewers(sharer).map_or(0, <[ConnId]>::len) as u32;
        self.send(sharer, ServerMsg::Viewers { count });
    }

    /// `conn` left its channel (or the server): its share and its watching end, and each
    /// sharer it watched hears its new count.
    fn leave_screens(&mut self, conn: ConnId) {
        let (_, watched) = self.screens.forget(conn);
        for sharer in watched {
            self.tell_viewer_count(sharer);
        }
    }

    fn conn_of(&self, session: SessionId) -> Result<ConnId, Refusal> {
        self.sessions
            .get(&session)
            .copied()
            .ok_or_else(|| Refusal::new(ErrorCode::NoSuchUser, format!("no user with session {} is online", session.0)))
    }

    /// Hands out one bundle of `peer`'s, with one-time keys unless this requester (by
    /// identity key or by source address) took some of the same identity's within the
    /// window, and asks `peer` for more if they run low.
    fn fetch_bundle(&mut self, now: Instant, conn: ConnId, peer: SessionId) -> Result<(), Refusal> {
        // Someone who just left has no keys to hand out: an answer, not an error, since
        // the asker's own client asked in the background (it may not know yet).
        let Ok(target) = self.conn_of(peer) else {
            self.send(conn, ServerMsg::Bundle { peer, bundle: None });
            return Ok(());
        };
        let state = &self.conns[&conn];
        let mut requesters = vec![Requester::Source(state.source)];
        if let Some(bundle) = state.user.as_ref().and_then(|u| u.bundle.as_ref()) {
            requesters.push(Requester::Identity(bundle.identity_hash()));
        }
        let Some(stored) = self.user_mut(target).bundle.as_mut() else {
            self.send(conn, ServerMsg::Bundle { peer, bundle: None });
            return Ok(());
        };
        let whose = stored.identity_hash();
        if self.key_fetches.len() >= MAX_KEY_FETCH_RECORDS {
            self.key_fetches.retain(|_, at| now.saturating_duration_since(*at) < REFETCH_WINDOW);
        }
        let recent = |at: &Instant| now.saturating_duration_since(*at) < REFETCH_WINDOW;
        let fresh = self.key_fetches.len() + requesters.len() <= MAX_KEY_FETCH_RECORDS
            && requesters.iter().all(|r| !self.key_fetches.get(&(*r, whose)).is_some_and(recent));
        let stored = self.user_mut(target).bundle.as_mut().expect("checked above");
        let bundle = stored.hand_out(fresh);
        let low = stored.report_low();
        if fresh {
            self.key_fetches.extend(requesters.into_iter().map(|r| ((r, whose), now)));
        }
        self.send(conn, ServerMsg::Bundle { peer, bundle: Some(bundle) });
        if let Some((one_time, kyber_one_time)) = low {
            self.send(target, ServerMsg::KeysLow { one_time, kyber_one_time });
        }
        Ok(())
    }

    fn join(&mut self, now: Instant, conn: ConnId, request: JoinRequest, fallback: bool) -> Result<(), Refusal> {
        let JoinRequest { channel, password, invite } = request;
        let password = password.map(Zeroizing::new);
        let id = self
            .find_channel(&channel)
            .ok_or_else(|| Refusal::new(ErrorCode::NoSuchChannel, format!("there is no channel {channel:?}")))?;
        if self.user(conn).channel == Some(id) {
            return Err(Refusal::new(ErrorCode::InvalidRequest, format!("you are already in {channel:?}")));
        }
        self.check_room(id)?;
        if let Some(token) = invite {
            self.use_invite(now, id, &token)?;
            self.move_user(now, conn, Some(id));
            return Ok(());
        }
        let Some(hash) = self.channels[&id].password_hash.clone() else {
            self.move_user(now, conn, Some(id));
            return Ok(());
        };
        let password = password.filter(|p| !p.is_empty()).ok_or_else(|| {
            Refusal::new(ErrorCode::PasswordRequired, format!("{channel:?} needs a password or an invite"))
        })?;
        let source = self.conns[&conn].source;
        let wait_until = self.password_backoff.get(&(source, id)).and_then(|b| b.next_try).filter(|t| *t > now);
        if let Some(wait_until) = wait_until {
            let wait = wait_until.duration_since(now).as_secs_f64().ceil();
            return Err(Refusal::new(
                ErrorCode::TooManyAttempts,
                format!("too many wrong passwords; try again in {wait} s"),
            ));
        }
        let state = self.conns.get_mut(&conn).expect("requests come from known connections");
        state.pending = Some(Pending::Join { channel: id, fallback });
        self.outputs.push_back(Output::VerifyPassword { conn, password, hash });
        Ok(())
    }

    fn password_checked(&mut self, now: Instant, conn: ConnId, matched: bool) {
        let state = self.conns.get_mut(&conn).expect("caller checked the connection");
        let Some(Pending::Join { channel, fallback }) = state.pending.take() else {
            return;
        };
        let key = (state.source, channel);
        let result = if matched {
            self.password_backoff.remove(&key);
            self.check_room(channel).map(|()| self.move_user(now, conn, Some(channel)))
        } else {
            if self.password_backoff.len() >= MAX_PASSWORD_BACKOFFS && !self.password_backoff.contains_key(&key) {
                self.password_backoff.retain(|_, b| b.next_try.is_some_and(|t| t > now));
            }
            let limits = &self.config.limits;
            let backoff =
                self.password_backoff.entry(key).or_insert(Backoff { failures: 0, last_failure: now, next_try: None });
            backoff.failures += 1;
            backoff.last_failure = now;
            let free = limits.password_attempts_before_delay;
            if backoff.failures >= free {
                let doublings = (backoff.failures - free).min(16);
                let wait = (1u64 << doublings).min(limits.password_backoff_max_secs);
                backoff.next_try = Some(now + Duration::from_secs(wait));
            }
            Err(Refusal::new(ErrorCode::WrongPassword, "wrong channel password"))
        };
        if let Err(refusal) = result {
            self.refuse(conn, refusal);
            if fallback {
                self.join_default(now, conn);
            }
        }
    }

    fn password_busy(&mut self, now: Instant, conn: ConnId) {
        let state = self.conns.get_mut(&conn).expect("caller checked the connection");
        let fallback = matches!(state.pending.take(), Some(Pending::Join { fallback: true, .. }));
        self.refuse(conn, Refusal::new(ErrorCode::ServerBusy, "the server is checking many passwords; try again"));
        if fallback {
            self.join_default(now, conn);
        }
    }

    fn create_channel(
        &mut self,
        now: Instant,
        conn: ConnId,
        new: NewChannel,
        password: Option<Zeroizing<String>>,
    ) -> Result<(), Refusal> {
        self.check_new_channel(&new)?;
        let limits = &self.config.limits;
        // A request that is refused anyway spends none of the creation rate.
        if let Some(password) = &password
            && (password.is_empty() || password.chars().count() > limits.max_password_len as usize)
        {
            return Err(Refusal::new(
                ErrorCode::InvalidRequest,
                format!("a password must be 1 to {} characters", limits.max_password_len),
            ));
        }
        let creator = self.user(conn).session;
        let kept = self.channels.values().filter(|c| c.creator == Some(creator)).count();
        if kept >= limits.max_temporary_channels_per_user as usize {
            return Err(Refusal::new(
                ErrorCode::TooManyChannels,
                format!(
                    "you have {kept} temporary channels already (empty ones go after {} s)",
                    limits.empty_channel_timeout_secs
                ),
            ));
        }
        let (rate, source) = (limits.channel_creations_per_minute, self.conns[&conn].source);
        self.creations.retain(|_, bucket| !bucket.is_full(now));
        let bucket =
            self.creations.entry(source).or_insert_with(|| TokenBucket::per_minute(now, rate, rate.div_ceil(2)));
        if !bucket.try_take(now, 1) {
            return Err(Refusal::new(ErrorCode::RateLimited, "channels are being created too fast from your address"));
        }
        if let Some(password) = password {
            self.conns.get_mut(&conn).expect("requests come from known connections").pending =
                Some(Pending::Create(new));
            self.outputs.push_back(Output::HashPassword { conn, password });
            return Ok(());
        }
        self.finish_create(now, conn, new, None);
        Ok(())
    }

    fn password_hashed(&mut self, now: Instant, conn: ConnId, hash: String) {
        let state = self.conns.get_mut(&conn).expect("caller checked the connection");
        let Some(Pending::Create(new)) = state.pending.take() else {
            return;
        };
        // The name may have been taken, or the limit reached, while hashing.
        match self.check_new_channel(&new) {
            Ok(()) => self.finish_create(now, conn, new, Some(hash)),
            Err(refusal) => self.refuse(conn, refusal),
        }
    }

    fn check_new_channel(&self, new: &NewChannel) -> Result<(), Refusal> {
        let limits = &self.config.limits;
        check_name(&new.name, limits.max_channel_name_len, "channel name")?;
        if new.description.chars().count() > limits.max_description_len as usize {
            return Err(Refusal::new(
                ErrorCode::InvalidRequest,
                format!("a description may have at most {} characters", limits.max_description_len),
            ));
        }
        if self.find_channel(&new.name).is_some() {
            return Err(Refusal::new(ErrorCode::ChannelExists, format!("a channel {:?} exists already", new.name)));
        }
        if self.channels.len() >= limits.max_channels as usize {
            return Err(Refusal::new(
                ErrorCode::TooManyChannels,
                format!("the server has its maximum of {} channels", limits.max_channels),
            ));
        }
        Ok(())
    }

    fn finish_create(&mut self, now: Instant, conn: ConnId, new: NewChannel, hash: Option<String>) {
        let id = self.add_channel(new.name, new.description, hash, new.user_limit, true);
        let creator = self.user(conn).session;
        self.channels.get_mut(&id).expect("just added").creator = Some(creator);
        let info = self.channels[&id].info.clone();
        self.broadcast(ServerMsg::ChannelAdded(info));
        self.move_user(now, conn, Some(id));
    }

    fn create_invite(&mut self, now: Instant, conn: ConnId, max_uses: u32, ttl_secs: u32) -> Result<(), Refusal> {
        let limits = &self.config.limits;
        let channel = self
            .user(conn)
            .channel
            .ok_or_else(|| Refusal::new(ErrorCode::NotInChannel, "join the channel to invite to it first"))?;
        if !(1..=limits.max_invite_uses).contains(&max_uses) || !(1..=limits.max_invite_ttl_secs).contains(&ttl_secs) {
            return Err(Refusal::new(
                ErrorCode::InvalidRequest,
                format!(
                    "an invite allows 1 to {} uses and lasts 1 to {} seconds",
                    limits.max_invite_uses, limits.max_invite_ttl_secs
                ),
            ));
        }
        let live = self.invites.values().filter(|i| i.channel == channel && i.expires_at > now).count();
        if live >= limits.max_invites_per_channel as usize {
            return Err(Refusal::new(
                ErrorCode::InvalidRequest,
                format!("this channel has its maximum of {} live invites", limits.max_invites_per_channel),
            ));
        }
        let token = hex::encode(self.rng.random::<[u8; 16]>());
        let expires_at = now + Duration::from_secs(u64::from(ttl_secs));
        self.invites.insert(token.clone(), Invite { channel, expires_at, uses_left: max_uses });
        self.send(conn, ServerMsg::InviteCreated { token, channel, expires_in_secs: ttl_secs, max_uses });
        Ok(())
    }

    fn use_invite(&mut self, now: Instant, channel: ChannelId, token: &str) -> Result<(), Refusal> {
        let invalid = || Refusal::new(ErrorCode::InviteInvalid, "the invite is not valid for this channel");
        let invite = self.invites.get_mut(token).filter(|i| i.channel == channel).ok_or_else(invalid)?;
        if invite.expires_at <= now {
            self.invites.remove(token);
            return Err(Refusal::new(ErrorCode::InviteExpired, "the invite has expired"));
        }
        invite.uses_left -= 1;
        if invite.uses_left == 0 {
            self.invites.remove(token);
        }
        Ok(())
    }

    /// Whether a channel still exists and has room for one more.
    fn check_room(&self, id: ChannelId) -> Result<(), Refusal> {
        // A temporary channel can vanish while a password check for it is pending.
        let channel =
            self.channels.get(&id).ok_or_else(|| Refusal::new(ErrorCode::NoSuchChannel, "the channel is gone"))?;
        let limit = channel.info.user_limit;
        if limit > 0 && channel.members.len() >= limit as usize {
            return Err(Refusal::new(
                ErrorCode::ChannelFull,
                format!("{:?} is full ({limit} users)", channel.info.name),
            ));
        }
        Ok(())
    }

    /// Where users land: the first permanent channel, when it has room and no password.
    fn join_default(&mut self, now: Instant, conn: ConnId) {
        let Some(id) = self.default_channel else { return };
        if self.check_room(id).is_ok() && self.channels[&id].password_hash.is_none() {
            self.move_user(now, conn, Some(id));
        }
    }

    /// Moves a user between channels and tells everyone; a temporary channel left
    /// empty starts its removal timer at `now`.
    fn move_user(&mut self, now: Instant, conn: ConnId, to: Option<ChannelId>) {
        let user = self.conns.get_mut(&conn).and_then(|c| c.user.as_mut()).expect("placed users are known");
        let from = std::mem::replace(&mut user.channel, to);
        let session = user.session;
        self.members_version += 1;
        if from != to {
            self.leave_screens(conn);
        }
        if let Some(old) = from.and_then(|id| self.channels.get_mut(&id)) {
            old.members.retain(|m| *m != conn);
            if old.members.is_empty() && old.info.temporary {
                old.empty_since = Some(now);
            }
        }
        if let Some(new) = to.and_then(|id| self.channels.get_mut(&id)) {
            new.members.push(conn);
            new.empty_since = None;
        }
        self.changes.mark(now, session);
    }

    fn disconnect(&mut self, now: Instant, conn: ConnId) {
        let Some(state) = self.conns.remove(&conn) else { return };
        let Some(user) = state.user else { return };
        self.users -= 1;
        self.members_version += 1;
        self.sessions.remove(&user.session);
        self.leave_screens(conn);
        if let Some(channel) = user.channel.and_then(|id| self.channels.get_mut(&id)) {
            channel.members.retain(|m| *m != conn);
            if channel.members.is_empty() && channel.info.temporary {
                channel.empty_since = Some(now);
            }
        }
        self.changes.mark(now, user.session);
    }

    fn add_channel(
        &mut self,
        name: String,
        description: String,
        password_hash: Option<String>,
        user_limit: u32,
        temporary: bool,
    ) -> ChannelId {
        let id = ChannelId(self.next_channel);
        self.next_channel += 1;
        let has_password = password_hash.is_some();
        let info = ChannelInfo { id, name, description, has_password, user_limit, temporary };
        self.channels
            .insert(id, Channel { info, password_hash, members: Vec::new(), creator: None, empty_since: None });
        id
    }

    fn remove_channel(&mut self, id: ChannelId) {
        if self.channels.remove(&id).is_some() {
            self.invites.retain(|_, i| i.channel != id);
            self.broadcast(ServerMsg::ChannelRemoved(id));
        }
    }

    fn find_channel(&self, name: &str) -> Option<ChannelId> {
        let key = canonical_name(name);
        self.channels.values().find(|c| canonical_name(&c.info.name) == key).map(|c| c.info.id)
    }

    fn user(&self, conn: ConnId) -> &User {
        self.conns[&conn].user.as_ref().expect("requests come from introduced users")
    }

    /// How others see the user on `conn`.
    fn user_info(&self, conn: ConnId) -> UserInfo {
        let user = self.user(conn);
        let (session, name, channel, voice) = (user.session, user.name.clone(), user.channel, user.voice);
        UserInfo { session, name, channel, voice, share: self.screens.info(conn) }
    }

    fn user_mut(&mut self, conn: ConnId) -> &mut User {
        self.conns.get_mut(&conn).and_then(|c| c.user.as_mut()).expect("requests come from introduced users")
    }

    fn send(&mut self, to: ConnId, msg: ServerMsg) {
        self.outputs.push_back(Output::Send { to, msg });
    }

    /// To every user.
    fn broadcast(&mut self, msg: ServerMsg) {
        let to: Vec<ConnId> = self.sessions.values().copied().collect();
        self.outputs.push_back(Output::Broadcast { to, msg });
    }

    fn refuse(&mut self, conn: ConnId, Refusal(code, message): Refusal) {
        *self.stats.refusals.entry(code).or_default() += 1;
        self.send(conn, error_msg(code, message));
    }

    /// Refuses and closes; the user, if any, leaves at once.
    fn close(&mut self, now: Instant, conn: ConnId, refusal: Refusal) {
        let code = refusal.0;
        self.refuse(conn, refusal);
        self.outputs.push_back(Output::Close { conn, code });
        self.disconnect(now, conn);
    }
}

fn no_such_channel() -> Refusal {
    Refusal::new(ErrorCode::NoSuchChannel, "no such channel")
}

fn bundle_refusal(error: BundleError) -> Refusal {
    match error {
        BundleError::TooManyKeys => Refusal::new(
            ErrorCode::InvalidRequest,
            format!("at most {} one-time and {} Kyber one-time keys", keys::MAX_ONE_TIME, keys::MAX_KYBER_ONE_TIME),
        ),
        BundleError::KeyTooLarge => Refusal::new(ErrorCode::InvalidRequest, "a key or signature is too large"),
    }
}

fn error_msg(code: ErrorCode, message: impl Into<String>) -> ServerMsg {
    ServerMsg::Error { code, message: message.into() }
}

/// A user or channel name: 1 to `max` characters after trimming, nothing invisible.
fn check_name(name: &str, max: u32, what: &str) -> Result<(), Refusal> {
    let trimmed = name.trim();
    if let Err(e) = check_visible(trimmed) {
        return Err(Refusal::new(ErrorCode::NameInvalid, format!("a {what} must be visible text: {e}")));
    }
    let len = trimmed.chars().count();
    if len > max as usize {
        return Err(Refusal::new(
            ErrorCode::NameTooLong,
            format!("a {what} may have at most {max} characters, not {len}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
