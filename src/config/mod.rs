//! `server.toml`: what a server operator configures. Pure data plus validation.
//!
//! An invalid file is refused with the file, the line and what is wrong, e.g.
//! `server.toml:7:1: channel name "A very long…" is 40 characters, more than max_channel_name_len (32)`.

pub mod client_store;
pub mod files;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use toml::Spanned;
use zeroize::Zeroizing;

use crate::protocol::DEFAULT_PORT;

/// The channel every server has when its configuration names none.
pub const DEFAULT_CHANNEL: &str = "Lobby";

/// The largest `max_users` a server accepts: beyond it one relay process is the wrong tool.
pub const MAX_USERS_CAP: u32 = 10_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// The host name put in invite links when `listen` is a wildcard address.
    pub public_host: Option<String>,
    pub max_users: u32,
    /// PEM certificate chain and private key; generated beside the config when absent.
    pub certificate: Option<PathBuf>,
    pub private_key: Option<PathBuf>,
    /// Permanent channels; the first is where users land.
    pub channels: Vec<ChannelConfig>,
    pub limits: Limits,
    /// Where to serve metrics (Prometheus text at `/metrics`); a loopback address only.
    pub metrics_listen: Option<SocketAddr>,
    /// Fingerprints of the identity keys that may moderate, once their holder proves it
    /// (`voipc join` prints yours in its `connected` event as `identity`).
    pub admins: Vec<crate::protocol::Fingerprint>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelConfig {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Wiped from memory once the relay has hashed it ([`crate::relay::RelayConfig`]).
    #[serde(default)]
    pub password: Option<Zeroizing<String>>,
    /// 0 means no limit.
    #[serde(default)]
    pub user_limit: u32,
}

/// Every bound the relay enforces. Defaults suit a community server on a small VPS.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// A temporary channel is removed after being empty this long.
    pub empty_channel_timeout_secs: u64,
    /// Permanent and temporary channels together.
    pub max_channels: u32,
    pub max_channel_name_len: u32,
    pub max_user_name_len: u32,
    pub max_description_len: u32,
    pub max_password_len: u32,
    /// Connections that have not said hello yet, at once.
    pub max_pending_connections: u32,
    /// A connection that has not said hello by then is closed. Long, for clients on bad
    /// networks: when connections that have not said hello fill `max_pending_connections`,
    /// the one waiting longest is closed for a newcomer anyway.
    pub hello_timeout_secs: u64,
    /// Control messages per second per connection (token bucket), and the burst allowed.
    pub control_messages_per_sec: u32,
    pub control_burst: u32,
    /// Media datagrams and bytes per second per connection; excess is dropped and counted.
    /// The defaults carry 1080p screen share plus voice with room for keyframe bursts.
    pub media_packets_per_sec: u32,
    pub media_bytes_per_sec: u32,
    /// Within those, voice (and probe) datagrams per second per connection and their
    /// bytes: twice what a talker sends, so that a member flooding a channel with voice
    /// reaches the others (and their links) at no more than that.
    pub voice_packets_per_sec: u32,
    pub voice_bytes_per_sec: u32,
    /// Wrong channel passwords a connection may try before each further try waits,
    /// with the wait doubling up to `password_backoff_max_secs`.
    pub password_attempts_before_delay: u32,
    pub password_backoff_max_secs: u64,
    /// Invites: the longest lifetime and the most uses one may be given.
    pub max_invite_ttl_secs: u32,
    pub max_invite_uses: u32,
    /// Live invites per channel.
    pub max_invites_per_channel: u32,
    /// End-to-end encrypted messages (direct and channel) per second per connection, and
    /// the burst allowed: joining a channel sends a sender key to every member at once.
    pub chat_messages_per_sec: u32,
    pub chat_burst: u32,
    /// The largest end-to-end encrypted message (a 5000-character text fits easily).
    pub max_message_bytes: u32,
    /// End-to-end encrypted bytes per second per connection, and the burst allowed: what
    /// one sender can put into every receiver's queue at once.
    pub chat_bytes_per_sec: u32,
    pub chat_burst_bytes: u32,
    /// Bytes of control messages queued for one client (beyond what QUIC holds for it)
    /// before it is disconnected as too slow (`too_slow`).
    pub max_queued_control_bytes: u32,
    /// Pre-key bundle fetches per second per connection, and the burst allowed.
    pub bundle_fetches_per_sec: u32,
    pub bundle_fetch_burst: u32,
    /// Connections from one source (an IPv4 address, an IPv6 /64) at once, and how many
    /// of those may not have said hello yet.
    pub max_connections_per_source: u32,
    pub max_pending_per_source: u32,
    /// Temporary channels a user's creations may keep alive at once (empty ones count
    /// until they are removed), and how many one source may create a minute.
    pub max_temporary_channels_per_user: u32,
    pub channel_creations_per_minute: u32,
    /// With this many QUIC handshakes under way, new ones must first prove their source
    /// address (a stateless QUIC Retry), so spoofed packets hold no handshake slot. The
    /// default, 0, sends every handshake a Retry: one more round trip per join, but the
    /// only way the server never answers an unproven address with more than three times
    /// what it sent (without it quinn overshoots that by up to one datagram, quinn issue 1082).
    pub retry_above_pending_handshakes: u32,
    /// QUIC handshakes one source may start a minute, twice `max_connections_per_source` at once.
    pub handshakes_per_source_per_minute: u32,
    /// Milliseconds media for a receiver that was just sent some may wait for more, so that
    /// frames from several speakers share one QUIC packet: each packet costs the server a
    /// system call, a seal and an acknowledgement back, so a busy channel costs about half
    /// the CPU at 2 ms. 0 sends every frame at once (the least delay). At most 20.
    pub media_coalesce_ms: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            empty_channel_timeout_secs: 300,
            max_channels: 50,
            max_channel_name_len: 32,
            max_user_name_len: 32,
            max_description_len: 200,
            max_password_len: 128,
            max_pending_connections: 64,
            hello_timeout_secs: 30,
            control_messages_per_sec: 20,
            control_burst: 40,
            media_packets_per_sec: 4000,
            media_bytes_per_sec: 4_000_000,
            voice_packets_per_sec: 100,
            voice_bytes_per_sec: 24_000,
            password_attempts_before_delay: 3,
            password_backoff_max_secs: 60,
            max_invite_ttl_secs: 7 * 24 * 3600,
            max_invite_uses: 1000,
            max_invites_per_channel: 50,
            chat_messages_per_sec: 50,
            chat_burst: 200,
            max_message_bytes: 32 * 1024,
            chat_bytes_per_sec: 256 * 1024,
            chat_burst_bytes: 1024 * 1024,
            max_queued_control_bytes: 4 * 1024 * 1024,
            bundle_fetches_per_sec: 5,
            bundle_fetch_burst: 100,
            max_connections_per_source: 8,
            max_pending_per_source: 4,
            max_temporary_channels_per_user: 3,
            channel_creations_per_minute: 6,
            retry_above_pending_handshakes: 0,
            handshakes_per_source_per_minute: 60,
            media_coalesce_ms: 2,
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT)),
            public_host: None,
            max_users: 100,
            certificate: None,
            private_key: None,
            channels: vec![ChannelConfig {
                name: DEFAULT_CHANNEL.into(),
                description: "Where everyone lands".into(),
                password: None,
                user_limit: 0,
            }],
            limits: Limits::default(),
            metrics_listen: None,
            admins: Vec::new(),
        }
    }
}

/// An invalid configuration: where and what.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}:{line}:{column}: {message}")]
    Invalid { path: PathBuf, line: usize, column: usize, message: String },
}

/// The file as written; `Spanned` keeps where each checked value stood.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<Spanned<String>>,
    public_host: Option<String>,
    max_users: Option<Spanned<u32>>,
    certificate: Option<PathBuf>,
    private_key: Option<PathBuf>,
    #[serde(default)]
    channels: Vec<Spanned<ChannelConfig>>,
    limits: Option<Spanned<Limits>>,
    metrics_listen: Option<Spanned<String>>,
    #[serde(default)]
    admins: Vec<Spanned<String>>,
}

impl ServerConfig {
    /// Reads and validates a config file. Relative certificate paths are taken
    /// relative to the file's directory.
    pub fn load(path: &Path) -> Result<ServerConfig, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        let base = path.parent().unwrap_or(Path::new("."));
        ServerConfig::parse(&text, base).map_err(|(offset, message)| {
            let (line, column) = line_and_column(&text, offset);
            ConfigError::Invalid { path: path.to_owned(), line, column, message }
        })
    }

    /// Parses config text; an error is the byte offset it concerns and what is wrong.
    pub fn parse(text: &str, base: &Path) -> Result<ServerConfig, (usize, String)> {
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| (e.span().map_or(0, |s| s.start), e.message().to_owned()))?;
        let mut config = ServerConfig::default();
        if let Some(listen) = raw.listen {
            config.listen = listen.get_ref().parse().map_err(|e| {
                (listen.span().start, format!("listen: {:?} is not an address:port ({e})", listen.get_ref()))
            })?;
        }
        config.public_host = raw.public_host;
        if let Some(metrics) = raw.metrics_listen {
            let at = metrics.span().start;
            let addr: SocketAddr = metrics
                .get_ref()
                .parse()
                .map_err(|e| (at, format!("metrics_listen: {:?} is not an address:port ({e})", metrics.get_ref())))?;
            if !addr.ip().is_loopback() {
                return Err((at, "metrics_listen must be a loopback address (127.0.0.1 or [::1])".into()));
            }
            config.metrics_listen = Some(addr);
        }
        for admin in raw.admins {
            let fingerprint = admin.get_ref().parse().map_err(|e| (admin.span().start, format!("admins: {e}")))?;
            config.admins.push(fingerprint);
        }
        if let Some(max_users) = raw.max_users {
            if !(1..=MAX_USERS_CAP).contains(max_users.get_ref()) {
                return Err((max_users.span().start, format!("max_users must be 1 to {MAX_USERS_CAP}")));
            }
            config.max_users = max_users.into_inner();
        }
        if raw.certificate.is_some() != raw.private_key.is_some() {
            return Err((0, "certificate and private_key must be given together".into()));
        }
        config.certificate = raw.certificate.map(|p| base.join(p));
        config.private_key = raw.private_key.map(|p| base.join(p));
        if let Some(limits) = raw.limits {
            let at = limits.span().start;
            let limits = limits.into_inner();
            limits.validate().map_err(|message| (at, message))?;
            config.limits = limits;
        }
        if !raw.channels.is_empty() {
            config.channels.clear();
            for channel in raw.channels {
                let at = channel.span().start;
                let channel = channel.into_inner();
                config.check_channel(&channel).map_err(|message| (at, message))?;
                config.channels.push(channel);
            }
        }
        if config.channels.len() > config.limits.max_channels as usize {
            return Err((
                0,
                format!(
                    "{} permanent channels are more than max_channels ({})",
                    config.channels.len(),
                    config.limits.max_channels
                ),
            ));
        }
        Ok(config)
    }

    fn check_channel(&self, channel: &ChannelConfig) -> Result<(), String> {
        let limits = &self.limits;
        let len = channel.name.chars().count();
        match crate::protocol::check_visible(&channel.name) {
            Err(crate::protocol::NameError::Empty) => return Err("channel name is empty".into()),
            Err(e) => return Err(format!("channel name {:?}: {e}", channel.name)),
            Ok(()) => {}
        }
        if len > limits.max_channel_name_len as usize {
            return Err(format!(
                "channel name {:?} is {len} characters, more than max_channel_name_len ({})",
                channel.name, limits.max_channel_name_len
            ));
        }
        if channel.description.chars().count() > limits.max_description_len as usize {
            return Err(format!("channel {:?}: description longer than max_description_len", channel.name));
        }
        if let Some(password) = &channel.password
            && (password.is_empty() || password.chars().count() > limits.max_password_len as usize)
        {
            return Err(format!(
                "channel {:?}: password must be 1 to {} characters",
                channel.name, limits.max_password_len
            ));
        }
        let key = crate::protocol::canonical_name(&channel.name);
        if self.channels.iter().any(|c| crate::protocol::canonical_name(&c.name) == key) {
            return Err(format!("channel {:?} is listed twice", channel.name));
        }
        Ok(())
    }
}

impl Limits {
    fn validate(&self) -> Result<(), String> {
        let positive = [
            ("max_channels", u64::from(self.max_channels)),
            ("max_channel_name_len", u64::from(self.max_channel_name_len)),
            ("max_user_name_len", u64::from(self.max_user_name_len)),
            ("max_password_len", u64::from(self.max_password_len)),
            ("max_pending_connections", u64::from(self.max_pending_connections)),
            ("hello_timeout_secs", self.hello_timeout_secs),
            ("control_messages_per_sec", u64::from(self.control_messages_per_sec)),
            ("control_burst", u64::from(self.control_burst)),
            ("media_packets_per_sec", u64::from(self.media_packets_per_sec)),
            ("media_bytes_per_sec", u64::from(self.media_bytes_per_sec)),
            ("voice_packets_per_sec", u64::from(self.voice_packets_per_sec)),
            ("voice_bytes_per_sec", u64::from(self.voice_bytes_per_sec)),
            ("max_invite_ttl_secs", u64::from(self.max_invite_ttl_secs)),
            ("max_invite_uses", u64::from(self.max_invite_uses)),
            ("chat_messages_per_sec", u64::from(self.chat_messages_per_sec)),
            ("chat_burst", u64::from(self.chat_burst)),
            ("chat_bytes_per_sec", u64::from(self.chat_bytes_per_sec)),
            ("bundle_fetches_per_sec", u64::from(self.bundle_fetches_per_sec)),
            ("bundle_fetch_burst", u64::from(self.bundle_fetch_burst)),
            ("max_connections_per_source", u64::from(self.max_connections_per_source)),
            ("max_pending_per_source", u64::from(self.max_pending_per_source)),
            ("max_temporary_channels_per_user", u64::from(self.max_temporary_channels_per_user)),
            ("channel_creations_per_minute", u64::from(self.channel_creations_per_minute)),
            ("handshakes_per_source_per_minute", u64::from(self.handshakes_per_source_per_minute)),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("limits.{name} must be greater than 0"));
        }
        if self.chat_burst_bytes < self.max_message_bytes {
            return Err("limits.chat_burst_bytes must be at least max_message_bytes".into());
        }
        if self.max_queued_control_bytes < 2 * crate::protocol::MAX_FRAME_LEN as u32 {
            return Err(format!(
                "limits.max_queued_control_bytes must be at least {}",
                2 * crate::protocol::MAX_FRAME_LEN
            ));
        }
        if self.media_coalesce_ms > 20 {
            return Err("limits.media_coalesce_ms must be at most 20 (late voice is worse than none)".into());
        }
        if !(256..=60 * 1024).contains(&self.max_message_bytes) {
            return Err("limits.max_message_bytes must be 256 to 61440 (a message travels in one 64 KiB frame)".into());
        }
        // Names travel in control frames; keep them far below the frame cap.
        for (name, value) in [
            ("max_channel_name_len", self.max_channel_name_len),
            ("max_user_name_len", self.max_user_name_len),
            ("max_description_len", self.max_description_len),
            ("max_password_len", self.max_password_len),
        ] {
            if value > 1024 {
                return Err(format!("limits.{name} must be at most 1024"));
            }
        }
        Ok(())
    }
}

/// 1-based line and column of a byte offset.
fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ServerConfig, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.toml");
        std::fs::write(&path, text).unwrap();
        ServerConfig::load(&path).map_err(|e| match e {
            ConfigError::Invalid { line, column, message, .. } => {
                ConfigError::Invalid { path: "server.toml".into(), line, column, message }
            }
            other => other,
        })
    }

    #[test]
    fn empty_file_gives_the_defaults() {
        let config = parse("").unwrap();
        assert_eq!(config, ServerConfig::default());
        assert_eq!(config.channels[0].name, DEFAULT_CHANNEL);
        assert_eq!(config.limits.empty_channel_timeout_secs, 300);
        assert_eq!(config.limits.max_channels, 50);
        assert_eq!(config.limits.max_channel_name_len, 32);
    }

    #[test]
    fn full_file_is_read() {
        let config = parse(
            r#"
listen = "127.0.0.1:4000"
max_users = 12
certificate = "c.pem"
private_key = "k.pem"

[limits]
empty_channel_timeout_secs = 10
max_channels = 5

[[channels]]
name = "General"
description = "talk"

[[channels]]
name = "Staff"
password = "s3cret"
user_limit = 4
"#,
        )
        .unwrap();
        assert_eq!(config.listen, "127.0.0.1:4000".parse().unwrap());
        assert_eq!(config.max_users, 12);
        assert!(config.certificate.unwrap().ends_with("c.pem"));
        assert_eq!(config.limits.empty_channel_timeout_secs, 10);
        assert_eq!(config.limits.max_channels, 5);
        assert_eq!(config.limits.max_channel_name_len, 32, "unset limits keep defaults");
        assert_eq!(config.channels.len(), 2);
        assert_eq!(config.channels[1].password.as_deref().map(String::as_str), Some("s3cret"));
        assert_eq!(config.channels[1].user_limit, 4);
    }

    /// The example server.toml in the README is a valid file whose limits are the
    /// defaults: the table a reader copies from says what the server does.
    #[test]
    fn the_readmes_example_config_holds_the_defaults() {
        let readme = include_str!("../../README.md");
        let start = readme.find("```toml\nlisten").expect("the README shows a server.toml") + "```toml\n".len();
        let example = &readme[start..][..readme[start..].find("```").unwrap()];
        let config = ServerConfig::parse(example, Path::new(".")).unwrap_or_else(|(at, e)| panic!("at {at}: {e}"));
        assert_eq!(config.limits, Limits::default());
        let lines = example.lines().skip_while(|l| *l != "[limits]").skip(1).take_while(|l| !l.starts_with('['));
        let documented: std::collections::BTreeSet<String> =
            lines.filter_map(|l| l.split_once(" = ").map(|(key, _)| key.trim().to_owned())).collect();
        let every: std::collections::BTreeSet<String> =
            toml::Table::try_from(Limits::default()).unwrap().keys().cloned().collect();
        assert_eq!(documented, every, "every limit is in the README's table, and nothing else");
    }

    #[test]
    fn admins_are_identity_fingerprints() {
        let fp = "ab".repeat(32);
        let config = parse(&format!("admins = [\"{fp}\"]\n")).unwrap();
        assert_eq!(config.admins, [fp.parse().unwrap()]);
        let err = parse("max_users = 3\nadmins = [\"alice\"]\n").unwrap_err().to_string();
        assert!(err.starts_with("server.toml:2:11: admins: a fingerprint is 64 hex digits"), "{err}");
    }

    #[test]
    fn errors_name_the_file_line_and_problem() {
        let err = parse("max_users = 3\nbogus = 1\n").unwrap_err().to_string();
        assert!(err.starts_with("server.toml:2:1: "), "{err}");
        assert!(err.contains("bogus"), "{err}");

        let err = parse("listen = \"nowhere\"\n").unwrap_err().to_string();
        assert!(err.starts_with("server.toml:1:10: listen"), "{err}");

        let long = "x".repeat(40);
        let err = parse(&format!("\n\n[[channels]]\nname = \"{long}\"\n")).unwrap_err().to_string();
        assert!(err.starts_with("server.toml:3:"), "{err}");
        assert!(err.contains("40 characters, more than max_channel_name_len (32)"), "{err}");

        let err = parse("[[channels]]\nname = \"a\"\n[[channels]]\nname = \"A\"\n").unwrap_err().to_string();
        assert!(err.contains("listed twice"), "{err}");
        // The same folding as the relay's (Unicode, not ASCII), so the relay never sees two.
        let err = parse("[[channels]]\nname = \"Stra\u{df}e\"\n[[channels]]\nname = \"STRASSE\"\n").unwrap_err();
        assert!(err.to_string().contains("listed twice"), "{err}");
        let err = parse("[[channels]]\nname = \"Lob\u{200b}by\"\n").unwrap_err().to_string();
        assert!(err.contains("U+200B"), "{err}");

        let err = parse("[limits]\nmax_channels = 0\n").unwrap_err().to_string();
        assert!(err.contains("limits.max_channels must be greater than 0"), "{err}");
        let err = parse("[limits]\nmedia_coalesce_ms = 21\n").unwrap_err().to_string();
        assert!(err.contains("limits.media_coalesce_ms must be at most 20"), "{err}");
        assert_eq!(parse("[limits]\nmedia_coalesce_ms = 0\n").unwrap().limits.media_coalesce_ms, 0);

        let err = parse("max_users = \"many\"\n").unwrap_err().to_string();
        assert!(err.starts_with("server.toml:1:13: "), "{err}");
    }
}
