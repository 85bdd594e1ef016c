//! Control messages. Every field a peer sends is bounded by the frame cap and checked
//! again by the receiver (name lengths, counts) before it is used.

use serde::{Deserialize, Serialize};

use super::bundle::{BundleUpload, OneTimePreKey, PeerBundle, SignedPreKey};

/// A connected user's server-assigned id; never reused while the server runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SessionId(pub u32);

/// A channel's server-assigned id; never reused while the server runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ChannelId(pub u32);

/// Which channel to enter, and the credential for it if it has a password.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinRequest {
    /// The channel's name (matched without regard to case).
    pub channel: String,
    pub password: Option<String>,
    /// An invite token, which admits without the password.
    pub invite: Option<String>,
}

impl JoinRequest {
    pub fn named(channel: impl Into<String>) -> Self {
        Self { channel: channel.into(), password: None, invite: None }
    }
}

/// What a client sends on its control stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientMsg {
    /// Must be the first frame. `join` asks for a first channel instead of the default one;
    /// `bundle` publishes the client's pre-keys before anyone can ask for them.
    Hello {
        version: u16,
        name: String,
        join: Option<JoinRequest>,
        bundle: Option<Box<BundleUpload>>,
    },
    Join(JoinRequest),
    Leave,
    /// A temporary channel; the creator enters it. `user_limit` 0 means no limit.
    CreateChannel {
        name: String,
        description: String,
        password: Option<String>,
        user_limit: u32,
    },
    /// An invite to the sender's current channel.
    CreateInvite {
        max_uses: u32,
        ttl_secs: u32,
    },
    /// The sender muted or deafened itself (or stopped): shown to everyone.
    SetVoiceState(VoiceState),
    /// More one-time keys, after the server said they run low.
    AddOneTimeKeys {
        one_time: Vec<OneTimePreKey>,
        kyber_one_time: Vec<SignedPreKey>,
    },
    /// Asks for a peer's bundle, to set up a pairwise session.
    FetchBundle {
        peer: SessionId,
    },
    /// An end-to-end encrypted message for one peer; the server passes it on unread.
    Direct {
        to: SessionId,
        ciphertext: Vec<u8>,
    },
    /// An end-to-end encrypted message for the sender's channel.
    Channel {
        channel: ChannelId,
        ciphertext: Vec<u8>,
    },
    /// A signature with the identity key of the hello's bundle over
    /// [`admin_proof_message`]: an operator's proof of holding a key `server.toml` names.
    /// Every client sends one; the server only looks at those from listed keys.
    ProveAdmin {
        signature: Vec<u8>,
    },
    /// Moderation, for admins only: end a session; end it and refuse its source address
    /// for `minutes`; remove a temporary channel (its members go to the default one);
    /// move a user.
    Kick {
        session: SessionId,
    },
    Ban {
        session: SessionId,
        minutes: u32,
    },
    CloseChannel {
        channel: ChannelId,
    },
    MoveUser {
        session: SessionId,
        channel: ChannelId,
    },
    /// The next page of the user listing: users whose session comes after `after`.
    ListUsers {
        after: SessionId,
    },
    /// Starts our screen share or changes what it announces; `None` ends it. A share
    /// ends by itself when its sharer leaves the channel.
    SetShare(Option<ShareInfo>),
    /// Starts or stops receiving a sharer's screen datagrams (a member of our channel).
    Watch {
        sharer: SessionId,
        watch: bool,
    },
    /// A viewer lost a frame and waits for a keyframe; the server merges these.
    RequestKeyframe {
        sharer: SessionId,
    },
    /// A viewer's figures for the last second, passed to the sharer.
    ScreenReport {
        sharer: SessionId,
        report: ScreenReport,
    },
}

/// What an admin signs: a fixed context (so that the signature can never pass for one
/// made for anything else with the same key), the server's certificate fingerprint (so
/// that a hostile server cannot pass another server's challenge on to its client and
/// make itself admin there), the challenge of this connection, and the session.
pub fn admin_proof_message(server: &super::Fingerprint, challenge: &[u8; 32], session: SessionId) -> Vec<u8> {
    let mut message = b"voipc admin proof v1\0".to_vec();
    message.extend_from_slice(&server.0);
    message.extend_from_slice(challenge);
    message.extend_from_slice(&session.0.to_be_bytes());
    message
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelInfo {
    pub id: ChannelId,
    pub name: String,
    pub description: String,
    pub has_password: bool,
    /// 0 means no limit.
    pub user_limit: u32,
    /// Created by a user; removed after it has been empty for a while.
    pub temporary: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserInfo {
    pub session: SessionId,
    pub name: String,
    pub channel: Option<ChannelId>,
    pub voice: VoiceState,
    /// What the user's screen share is, while it shares.
    pub share: Option<ShareInfo>,
}

/// What a sharer announces about its screen stream, shown beside its name: the size and
/// frame rate it encodes at now (they change as the sender adapts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareInfo {
    pub width: u16,
    pub height: u16,
    pub fps: u8,
}

impl ShareInfo {
    /// Whether a server accepts the announcement: a size an encoder can make, 1-60 fps.
    pub fn is_plausible(&self) -> bool {
        (16..=8192).contains(&self.width) && (16..=8192).contains(&self.height) && (1..=60).contains(&self.fps)
    }
}

/// The sizes a share can be asked for, by height (the width follows the source's shape).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Resolution {
    P480,
    P720,
    P1080,
}

impl Resolution {
    pub const ALL: [Resolution; 3] = [Resolution::P480, Resolution::P720, Resolution::P1080];

    pub fn height(self) -> u32 {
        match self {
            Resolution::P480 => 480,
            Resolution::P720 => 720,
            Resolution::P1080 => 1080,
        }
    }
}

impl std::str::FromStr for Resolution {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "480p" => Ok(Resolution::P480),
            "720p" => Ok(Resolution::P720),
            "1080p" => Ok(Resolution::P1080),
            other => Err(format!("unknown resolution {other:?}: use 480p, 720p or 1080p")),
        }
    }
}

impl std::fmt::Display for Resolution {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}p", self.height())
    }
}

/// Screen shares one viewer may watch at once.
pub const MAX_WATCHING: usize = 4;

/// What a viewer saw of one screen stream over about a second, for the sharer to adapt.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScreenReport {
    pub fragments_received: u32,
    /// Fragments sent that did not arrive, whether or not the erasure code made up for
    /// them (the network's loss, which the sender sizes its recovery fragments on).
    pub fragments_lost: u32,
    pub frames_decoded: u32,
    pub frames_lost: u32,
    pub bytes_received: u32,
}

impl ScreenReport {
    /// The fraction of fragments sent that did not arrive (0 when none were sent).
    pub fn loss(&self) -> f64 {
        let sent = f64::from(self.fragments_received) + f64::from(self.fragments_lost);
        if sent > 0.0 { f64::from(self.fragments_lost) / sent } else { 0.0 }
    }
}

/// Whether a user has muted their microphone or deafened themselves, for others to see.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VoiceState {
    pub muted: bool,
    pub deafened: bool,
}

/// What the server sends on a client's control stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerMsg {
    /// The answer to a hello. The server's channels follow one message each, then the
    /// first page of [`ServerMsg::Users`]. `challenge` is fresh for this connection, for
    /// [`ClientMsg::ProveAdmin`].
    Welcome {
        session: SessionId,
        name: String,
        server_version: u16,
        challenge: [u8; 32],
    },
    /// The proof held: this connection may moderate.
    AdminGranted,
    ChannelAdded(ChannelInfo),
    ChannelRemoved(ChannelId),
    /// A page of the users online, in session order (the first page starts with the
    /// client itself); while `more`, the client asks for the next with
    /// [`ClientMsg::ListUsers`]. Each user is as they are when the page is made.
    Users {
        users: Vec<UserInfo>,
        more: bool,
    },
    /// Users who came online or changed (channel, mute, deafen) and users who left,
    /// gathered over [`crate::relay::PRESENCE_DELAY`]: each as they are when it is sent.
    Presence {
        users: Vec<UserInfo>,
        gone: Vec<SessionId>,
    },
    InviteCreated {
        token: String,
        channel: ChannelId,
        expires_in_secs: u32,
        max_uses: u32,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
    /// The answer to a bundle fetch: `None` when the peer has published no keys, or is
    /// not online (any more).
    Bundle {
        peer: SessionId,
        bundle: Option<PeerBundle>,
    },
    /// The server holds fewer than `relay::keys::LOW_WATER` of our one-time keys of a kind.
    KeysLow {
        one_time: u32,
        kyber_one_time: u32,
    },
    Direct {
        from: SessionId,
        ciphertext: Vec<u8>,
    },
    Channel {
        from: SessionId,
        channel: ChannelId,
        ciphertext: Vec<u8>,
    },
    /// How many online recipients a Direct or Channel message reached; nothing is stored.
    Delivered {
        reached: u32,
        total: u32,
    },
    /// A Direct or Channel message was refused, and why: the only answer to it (every
    /// message gets one `Delivered` or `NotDelivered`, in order).
    NotDelivered {
        code: ErrorCode,
        message: String,
    },
    /// To a sharer: a viewer needs a keyframe (merged over `relay::KEYFRAME_MERGE`).
    KeyframeRequested,
    /// To a sharer: how many watch its stream now (none: it need not encode at all).
    Viewers {
        count: u32,
    },
    /// To a sharer: what one of its viewers saw.
    ScreenReport {
        viewer: SessionId,
        report: ScreenReport,
    },
}

/// Why a request was refused. The snake_case names are stable: scripts match on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ErrorCode {
    VersionMismatch,
    HelloRequired,
    HelloTimeout,
    ServerFull,
    ServerBusy,
    NameTaken,
    NameInvalid,
    NameTooLong,
    NoSuchChannel,
    ChannelExists,
    ChannelFull,
    PasswordRequired,
    WrongPassword,
    TooManyAttempts,
    InviteInvalid,
    InviteExpired,
    TooManyChannels,
    NotInChannel,
    NoSuchUser,
    NoBundle,
    MessageTooLarge,
    InvalidRequest,
    RateLimited,
    MalformedFrame,
    FrameTooLarge,
    /// Too many connections (or connections still starting) from the sender's address.
    TooManyFromSource,
    /// The client did not read what the server sent it, and was disconnected.
    TooSlow,
    /// A moderation request from a connection that has not proved an admin key.
    NotAdmin,
    /// An admin ended this session.
    Kicked,
    /// An admin banned this source address for a while.
    Banned,
    /// A watch or keyframe request for someone who is not sharing (or not watched).
    NotSharing,
    /// Watching more streams at once than the server allows.
    TooManyStreams,
}

impl ErrorCode {
    /// The stable name scripts see in `{"event":"error","code":...}`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::VersionMismatch => "version_mismatch",
            ErrorCode::HelloRequired => "hello_required",
            ErrorCode::HelloTimeout => "hello_timeout",
            ErrorCode::ServerFull => "server_full",
            ErrorCode::ServerBusy => "server_busy",
            ErrorCode::NameTaken => "name_taken",
            ErrorCode::NameInvalid => "name_invalid",
            ErrorCode::NameTooLong => "name_too_long",
            ErrorCode::NoSuchChannel => "no_such_channel",
            ErrorCode::ChannelExists => "channel_exists",
            ErrorCode::ChannelFull => "channel_full",
            ErrorCode::PasswordRequired => "password_required",
            ErrorCode::WrongPassword => "wrong_password",
            ErrorCode::TooManyAttempts => "too_many_attempts",
            ErrorCode::InviteInvalid => "invite_invalid",
            ErrorCode::InviteExpired => "invite_expired",
            ErrorCode::TooManyChannels => "too_many_channels",
            ErrorCode::NotInChannel => "not_in_channel",
            ErrorCode::NoSuchUser => "no_such_user",
            ErrorCode::NoBundle => "no_bundle",
            ErrorCode::MessageTooLarge => "message_too_large",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::MalformedFrame => "malformed_frame",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::TooManyFromSource => "too_many_from_source",
            ErrorCode::TooSlow => "too_slow",
            ErrorCode::NotAdmin => "not_admin",
            ErrorCode::Kicked => "kicked",
            ErrorCode::Banned => "banned",
            ErrorCode::NotSharing => "not_sharing",
            ErrorCode::TooManyStreams => "too_many_streams",
        }
    }

    /// Whether the server closes the connection after this error: before the welcome
    /// (`welcomed` false) a refused hello does; afterwards only a frame it cannot read. A
    /// name refused once welcomed is a channel's, and the session goes on.
    pub fn closes_connection(self, welcomed: bool) -> bool {
        match self {
            ErrorCode::MalformedFrame
            | ErrorCode::FrameTooLarge
            | ErrorCode::TooSlow
            | ErrorCode::Kicked
            | ErrorCode::Banned => true,
            ErrorCode::VersionMismatch
            | ErrorCode::HelloRequired
            | ErrorCode::HelloTimeout
            | ErrorCode::ServerFull
            | ErrorCode::ServerBusy
            | ErrorCode::TooManyFromSource
            | ErrorCode::NameTaken
            | ErrorCode::NameInvalid
            | ErrorCode::NameTooLong
            | ErrorCode::InvalidRequest => !welcomed,
            _ => false,
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{decode_frame, encode_frame, frame::LEN_PREFIX};

    fn round_trip<T: Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug>(msg: T) {
        let frame = encode_frame(&msg).unwrap();
        assert_eq!(decode_frame::<T>(&frame[LEN_PREFIX..]).unwrap(), msg);
    }

    /// Which variant a message is. Exhaustive on purpose: a new variant does not compile
    /// until it has a number here, and the tests below then fail until it has a sample.
    fn client_variant(msg: &ClientMsg) -> usize {
        match msg {
            ClientMsg::Hello { .. } => 0,
            ClientMsg::Join(_) => 1,
            ClientMsg::Leave => 2,
            ClientMsg::CreateChannel { .. } => 3,
            ClientMsg::CreateInvite { .. } => 4,
            ClientMsg::SetVoiceState(_) => 5,
            ClientMsg::AddOneTimeKeys { .. } => 6,
            ClientMsg::FetchBundle { .. } => 7,
            ClientMsg::Direct { .. } => 8,
            ClientMsg::Channel { .. } => 9,
            ClientMsg::ProveAdmin { .. } => 10,
            ClientMsg::Kick { .. } => 11,
            ClientMsg::Ban { .. } => 12,
            ClientMsg::CloseChannel { .. } => 13,
            ClientMsg::MoveUser { .. } => 14,
            ClientMsg::ListUsers { .. } => 15,
            ClientMsg::SetShare(_) => 16,
            ClientMsg::Watch { .. } => 17,
            ClientMsg::RequestKeyframe { .. } => 18,
            ClientMsg::ScreenReport { .. } => 19,
        }
    }
    const CLIENT_VARIANTS: usize = 20;

    fn server_variant(msg: &ServerMsg) -> usize {
        match msg {
            ServerMsg::Welcome { .. } => 0,
            ServerMsg::ChannelAdded(_) => 1,
            ServerMsg::ChannelRemoved(_) => 2,
            ServerMsg::Users { .. } => 3,
            ServerMsg::Presence { .. } => 4,
            ServerMsg::InviteCreated { .. } => 5,
            ServerMsg::Error { .. } => 6,
            ServerMsg::Bundle { .. } => 7,
            ServerMsg::KeysLow { .. } => 8,
            ServerMsg::Direct { .. } => 9,
            ServerMsg::Channel { .. } => 10,
            ServerMsg::Delivered { .. } => 11,
            ServerMsg::AdminGranted => 12,
            ServerMsg::NotDelivered { .. } => 13,
            ServerMsg::KeyframeRequested => 14,
            ServerMsg::Viewers { .. } => 15,
            ServerMsg::ScreenReport { .. } => 16,
        }
    }
    const SERVER_VARIANTS: usize = 17;

    fn error_variant(code: ErrorCode) -> usize {
        match code {
            ErrorCode::VersionMismatch => 0,
            ErrorCode::HelloRequired => 1,
            ErrorCode::HelloTimeout => 2,
            ErrorCode::ServerFull => 3,
            ErrorCode::ServerBusy => 4,
            ErrorCode::NameTaken => 5,
            ErrorCode::NameInvalid => 6,
            ErrorCode::NameTooLong => 7,
            ErrorCode::NoSuchChannel => 8,
            ErrorCode::ChannelExists => 9,
            ErrorCode::ChannelFull => 10,
            ErrorCode::PasswordRequired => 11,
            ErrorCode::WrongPassword => 12,
            ErrorCode::TooManyAttempts => 13,
            ErrorCode::InviteInvalid => 14,
            ErrorCode::InviteExpired => 15,
            ErrorCode::TooManyChannels => 16,
            ErrorCode::NotInChannel => 17,
            ErrorCode::NoSuchUser => 18,
            ErrorCode::NoBundle => 19,
            ErrorCode::MessageTooLarge => 20,
            ErrorCode::InvalidRequest => 21,
            ErrorCode::RateLimited => 22,
            ErrorCode::MalformedFrame => 23,
            ErrorCode::FrameTooLarge => 24,
            ErrorCode::TooManyFromSource => 25,
            ErrorCode::TooSlow => 26,
            ErrorCode::NotAdmin => 27,
            ErrorCode::Kicked => 28,
            ErrorCode::Banned => 29,
            ErrorCode::NotSharing => 30,
            ErrorCode::TooManyStreams => 31,
        }
    }
    const ERROR_VARIANTS: usize = 32;

    /// Asserts that `samples` hold every variant (by `variant`) at least once.
    fn covers_every_variant<T>(samples: &[T], variant: impl Fn(&T) -> usize, count: usize) {
        let seen: std::collections::BTreeSet<usize> = samples.iter().map(variant).collect();
        let missing: Vec<usize> = (0..count).filter(|v| !seen.contains(v)).collect();
        assert!(missing.is_empty(), "no sample of variants {missing:?}");
    }

    fn signed(id: u32) -> SignedPreKey {
        SignedPreKey { id, public: vec![1; 33], signature: vec![2; 64] }
    }

    fn report() -> ScreenReport {
        ScreenReport {
            fragments_received: 900,
            fragments_lost: 9,
            frames_decoded: 30,
            frames_lost: 1,
            bytes_received: 1 << 20,
        }
    }

    fn client_samples() -> Vec<ClientMsg> {
        let join =
            JoinRequest { channel: "Gaming".into(), password: Some("hunter2".into()), invite: Some("abcd".into()) };
        let bundle = BundleUpload {
            registration_id: 7,
            identity_key: vec![5; 33],
            signed_pre_key: signed(1),
            kyber_last_resort: signed(2),
            kyber_one_time: vec![signed(3)],
            one_time: vec![OneTimePreKey { id: 4, public: vec![6; 33] }],
        };
        vec![
            ClientMsg::Hello { version: 1, name: "alice".into(), join: Some(join.clone()), bundle: None },
            ClientMsg::Hello { version: 7, name: "bob".into(), join: None, bundle: Some(Box::new(bundle)) },
            ClientMsg::Join(join),
            ClientMsg::Join(JoinRequest::named("Lobby")),
            ClientMsg::Leave,
            ClientMsg::CreateChannel {
                name: "Raid".into(),
                description: "tonight".into(),
                password: None,
                user_limit: 5,
            },
            ClientMsg::CreateInvite { max_uses: 3, ttl_secs: 600 },
            ClientMsg::SetVoiceState(VoiceState { muted: true, deafened: false }),
            ClientMsg::AddOneTimeKeys {
                one_time: vec![OneTimePreKey { id: 9, public: vec![3; 33] }],
                kyber_one_time: vec![signed(10)],
            },
            ClientMsg::FetchBundle { peer: SessionId(4) },
            ClientMsg::Direct { to: SessionId(4), ciphertext: vec![1, 2, 3] },
            ClientMsg::Channel { channel: ChannelId(2), ciphertext: vec![] },
            ClientMsg::ProveAdmin { signature: vec![4; 64] },
            ClientMsg::Kick { session: SessionId(4) },
            ClientMsg::Ban { session: SessionId(4), minutes: 60 },
            ClientMsg::CloseChannel { channel: ChannelId(2) },
            ClientMsg::MoveUser { session: SessionId(4), channel: ChannelId(1) },
            ClientMsg::ListUsers { after: SessionId(4) },
            ClientMsg::SetShare(Some(ShareInfo { width: 1280, height: 720, fps: 30 })),
            ClientMsg::SetShare(None),
            ClientMsg::Watch { sharer: SessionId(4), watch: true },
            ClientMsg::RequestKeyframe { sharer: SessionId(4) },
            ClientMsg::ScreenReport { sharer: SessionId(4), report: report() },
        ]
    }

    fn server_samples() -> Vec<ServerMsg> {
        let channel = ChannelInfo {
            id: ChannelId(3),
            name: "Lobby".into(),
            description: "hi".into(),
            has_password: true,
            user_limit: 10,
            temporary: false,
        };
        let voice = VoiceState { muted: false, deafened: true };
        let share = Some(ShareInfo { width: 1920, height: 1080, fps: 15 });
        let user = UserInfo { session: SessionId(9), name: "bob".into(), channel: Some(ChannelId(3)), voice, share };
        let bundle = PeerBundle {
            registration_id: 7,
            identity_key: vec![5; 33],
            signed_pre_key: signed(1),
            one_time: Some(OneTimePreKey { id: 4, public: vec![6; 33] }),
            kyber: signed(3),
        };
        vec![
            ServerMsg::Welcome { session: SessionId(1), name: "alice".into(), server_version: 1, challenge: [3; 32] },
            ServerMsg::AdminGranted,
            ServerMsg::ChannelAdded(channel),
            ServerMsg::ChannelRemoved(ChannelId(3)),
            ServerMsg::Users { users: vec![user.clone()], more: true },
            ServerMsg::Presence { users: vec![user], gone: vec![SessionId(9)] },
            ServerMsg::InviteCreated { token: "t".into(), channel: ChannelId(3), expires_in_secs: 60, max_uses: 1 },
            ServerMsg::Error { code: ErrorCode::WrongPassword, message: "no".into() },
            ServerMsg::Bundle { peer: SessionId(2), bundle: Some(bundle) },
            ServerMsg::Bundle { peer: SessionId(2), bundle: None },
            ServerMsg::KeysLow { one_time: 19, kyber_one_time: 3 },
            ServerMsg::Direct { from: SessionId(2), ciphertext: vec![9; 40] },
            ServerMsg::Channel { from: SessionId(2), channel: ChannelId(3), ciphertext: vec![8; 40] },
            ServerMsg::Delivered { reached: 2, total: 3 },
            ServerMsg::NotDelivered { code: ErrorCode::RateLimited, message: "slow down".into() },
            ServerMsg::KeyframeRequested,
            ServerMsg::Viewers { count: 3 },
            ServerMsg::ScreenReport { viewer: SessionId(5), report: report() },
        ]
    }

    #[test]
    fn every_client_message_round_trips() {
        let samples = client_samples();
        covers_every_variant(&samples, client_variant, CLIENT_VARIANTS);
        samples.into_iter().for_each(round_trip);
    }

    #[test]
    fn every_server_message_round_trips() {
        let samples = server_samples();
        covers_every_variant(&samples, server_variant, SERVER_VARIANTS);
        samples.into_iter().for_each(round_trip);
    }

    #[test]
    fn error_codes_have_distinct_stable_names() {
        use std::collections::HashSet;
        let all = [
            ErrorCode::VersionMismatch,
            ErrorCode::HelloRequired,
            ErrorCode::HelloTimeout,
            ErrorCode::ServerFull,
            ErrorCode::ServerBusy,
            ErrorCode::NameTaken,
            ErrorCode::NameInvalid,
            ErrorCode::NameTooLong,
            ErrorCode::NoSuchChannel,
            ErrorCode::ChannelExists,
            ErrorCode::ChannelFull,
            ErrorCode::PasswordRequired,
            ErrorCode::WrongPassword,
            ErrorCode::TooManyAttempts,
            ErrorCode::InviteInvalid,
            ErrorCode::InviteExpired,
            ErrorCode::TooManyChannels,
            ErrorCode::NotInChannel,
            ErrorCode::NoSuchUser,
            ErrorCode::NoBundle,
            ErrorCode::MessageTooLarge,
            ErrorCode::InvalidRequest,
            ErrorCode::RateLimited,
            ErrorCode::MalformedFrame,
            ErrorCode::FrameTooLarge,
            ErrorCode::TooManyFromSource,
            ErrorCode::TooSlow,
            ErrorCode::NotAdmin,
            ErrorCode::Kicked,
            ErrorCode::Banned,
            ErrorCode::NotSharing,
            ErrorCode::TooManyStreams,
        ];
        covers_every_variant(&all, |c| error_variant(*c), ERROR_VARIANTS);
        for code in all {
            round_trip(code);
        }
        let names: HashSet<_> = all.iter().map(|c| c.as_str()).collect();
        assert_eq!(names.len(), all.len());
        round_trip(all.to_vec());
    }
}
