//! The relay's counts in the Prometheus text format, for an operator's monitoring: counts
//! only, never a name, an address or anything a user sent.

use std::fmt::Write;

use super::Relay;

/// What the shell counts itself (handshakes happen before the relay sees a connection).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShellCounts {
    pub handshakes_refused: u64,
    /// Handshakes under way longest, dropped to make room for a new one.
    pub handshakes_abandoned: u64,
    pub retries_sent: u64,
    pub handshakes_failed: u64,
    pub slow_clients_disconnected: u64,
    /// Media dropped on the way to a receiver whose link was full (see [`super::leg`]).
    pub media_dropped_stale: u64,
    pub media_dropped_overflow: u64,
}

/// The text served at `/metrics`.
pub fn render(relay: &Relay, shell: &ShellCounts) -> String {
    let stats = relay.stats();
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, u64)]| {
        let _ = writeln!(out, "# HELP voipc_{name} {help}\n# TYPE voipc_{name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "voipc_{name}{labels} {value}");
        }
    };
    let one = |value: u64| [(String::new(), value)];
    metric("users", "gauge", "Users online.", &one(u64::from(relay.user_count())));
    metric("channels", "gauge", "Channels, permanent and temporary.", &one(relay.channel_count() as u64));
    metric("pending_connections", "gauge", "Connections that have not said hello.", &one(relay.pending_count() as u64));
    metric("datagrams_received_total", "counter", "Media datagrams received.", &one(stats.datagrams_in));
    metric(
        "datagrams_forwarded_total",
        "counter",
        "Media datagrams routed to receivers (one per receiver).",
        &one(stats.datagrams_forwarded),
    );
    metric("bytes_forwarded_total", "counter", "Media bytes sent on, per receiver.", &one(stats.bytes_forwarded));
    let dropped = [
        ("{reason=\"rate_limited\"}".to_owned(), stats.dropped_rate_limited),
        ("{reason=\"invalid\"}".to_owned(), stats.dropped_invalid),
        ("{reason=\"stale\"}".to_owned(), shell.media_dropped_stale),
        ("{reason=\"queue_full\"}".to_owned(), shell.media_dropped_overflow),
    ];
    metric("datagrams_dropped_total", "counter", "Media datagrams dropped, by reason.", &dropped);
    metric("connections_refused_total", "counter", "Connections refused at once.", &one(stats.refused_connections));
    let refusals: Vec<(String, u64)> =
        stats.refusals.iter().map(|(code, n)| (format!("{{code=\"{}\"}}", code.as_str()), *n)).collect();
    metric("refusals_total", "counter", "Requests refused, by error code.", &refusals);
    metric(
        "handshakes_refused_total",
        "counter",
        "QUIC handshakes refused (too many at once from one source).",
        &one(shell.handshakes_refused),
    );
    metric(
        "handshakes_abandoned_total",
        "counter",
        "QUIC handshakes dropped to make room for newer ones.",
        &one(shell.handshakes_abandoned),
    );
    metric("retries_sent_total", "counter", "QUIC Retry packets sent (address validation).", &one(shell.retries_sent));
    metric(
        "handshakes_failed_total",
        "counter",
        "QUIC handshakes that failed or timed out.",
        &one(shell.handshakes_failed),
    );
    metric(
        "slow_clients_disconnected_total",
        "counter",
        "Clients disconnected for not reading their control stream.",
        &one(shell.slow_clients_disconnected),
    );
    out
}

#[cfg(test)]
#[allow(clippy::disallowed_methods, reason = "the virtual clock starts at an arbitrary real instant")]
mod tests {
    use super::*;
    use crate::config::ServerConfig;
    use crate::relay::{ConnId, Input, RelayConfig, Source};

    #[test]
    fn counts_in_the_text_format_and_nothing_that_names_anyone() {
        let mut config = ServerConfig::default();
        let mut relay = Relay::new(RelayConfig::from_server_config(&mut config), [1; 32]);
        let now = std::time::Instant::now();
        let source = Source::of(std::net::Ipv4Addr::new(203, 0, 113, 7).into());
        relay.handle_input(now, ConnId(1), Input::Connected { source, started_lately: 1 }).unwrap();
        let hello = crate::protocol::ClientMsg::Hello {
            version: crate::protocol::PROTOCOL_VERSION,
            name: "alice".into(),
            join: None,
            bundle: None,
        };
        relay.handle_input(now, ConnId(1), Input::Control(hello)).unwrap();
        relay.handle_input(now, ConnId(1), Input::Control(crate::protocol::ClientMsg::Leave)).unwrap();
        let shell = ShellCounts { retries_sent: 3, ..ShellCounts::default() };
        let text = render(&relay, &shell);
        for line in ["voipc_users 1", "voipc_channels 1", "voipc_retries_sent_total 3", "# TYPE voipc_users gauge"] {
            assert!(text.lines().any(|l| l == line), "{line:?} in\n{text}");
        }
        assert!(!text.contains("alice") && !text.contains("203.0.113"), "{text}");
        // Every sample line is a name, optional labels and a number.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.rsplit_once(' ').unwrap();
            assert!(name.starts_with("voipc_") && value.parse::<u64>().is_ok(), "{line}");
        }
    }
}
