//! The datagram path, apart from the rest of the relay: media is routed without the
//! relay's lock.
//!
//! Each sender's datagram path keeps a [`MediaPath`]: a copy of what routing needs about
//! that sender (its session, its channel, who else is in it, who watches its screen),
//! with the targets already resolved to whatever the shell sends through, and the
//! sender's rate limits. The relay counts its changes to membership and to screen
//! watches ([`Relay::routes_version`]); a path whose copy is older takes the relay's lock
//! once to refresh it, and routes every other datagram with no lock at all. Joins and
//! leaves are rare next to 50 voice datagrams a second per speaker, so the control path
//! and the datagram path do not wait for each other.
//!
//! The tests drive these paths exactly as the shell does, on a virtual clock
//! ([`MediaPaths`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use super::limits::TokenBucket;
use super::{ConnId, DropReason, Relay};
use crate::config::Limits;
use crate::protocol::{ChannelId, MediaHeader, SessionId, StreamType};

/// Media counters, added to by every datagram path at once.
#[derive(Debug, Default)]
pub struct MediaCounts {
    pub datagrams_in: AtomicU64,
    pub datagrams_forwarded: AtomicU64,
    pub bytes_forwarded: AtomicU64,
    pub dropped_rate_limited: AtomicU64,
    pub dropped_invalid: AtomicU64,
}

impl MediaCounts {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// A sender's rate limits: all media, and voice (with probes) within it, in packets and
/// in bytes.
#[derive(Debug, Clone)]
pub struct MediaGate {
    media_packets: TokenBucket,
    media_bytes: TokenBucket,
    voice_packets: TokenBucket,
    voice_bytes: TokenBucket,
}

impl MediaGate {
    pub fn new(now: Instant, limits: &Limits) -> MediaGate {
        MediaGate {
            media_packets: TokenBucket::new(now, limits.media_packets_per_sec, limits.media_packets_per_sec / 2),
            media_bytes: TokenBucket::new(now, limits.media_bytes_per_sec, limits.media_bytes_per_sec / 2),
            // A quarter of a second's worth at once: a talker catching up after a stall.
            voice_packets: TokenBucket::new(now, limits.voice_packets_per_sec, limits.voice_packets_per_sec / 4),
            voice_bytes: TokenBucket::new(now, limits.voice_bytes_per_sec, limits.voice_bytes_per_sec / 4),
        }
    }

    fn admit(&mut self, now: Instant, stream: StreamType, bytes: u32) -> bool {
        let voice_ok = match stream {
            StreamType::Voice | StreamType::Probe => {
                self.voice_packets.try_take(now, 1) && self.voice_bytes.try_take(now, bytes)
            }
            StreamType::Screen | StreamType::ScreenAudio => true,
        };
        voice_ok && self.media_packets.try_take(now, 1) && self.media_bytes.try_take(now, bytes)
    }
}

/// What the relay says about one sender, for its datagram path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaRoute {
    pub session: SessionId,
    /// `None` while the user is in no channel.
    pub channel: Option<ChannelId>,
    /// The channel's other members.
    pub listeners: Vec<ConnId>,
    /// Who watches its screen, when it shares one.
    pub viewers: Option<Vec<ConnId>>,
}

/// A route with its targets resolved by the shell.
#[derive(Debug)]
struct Resolved<T> {
    session: SessionId,
    channel: Option<ChannelId>,
    listeners: Vec<T>,
    viewers: Option<Vec<T>>,
}

/// One sender's datagram path: its copy of its route and its rate limits.
#[derive(Debug)]
pub struct MediaPath<T> {
    /// The relay's [`Relay::routes_version`] when `route` was copied; `None` before the first copy.
    version: Option<u64>,
    /// `None` until the sender is introduced, and once it is gone.
    route: Option<Resolved<T>>,
    gate: MediaGate,
    counts: Arc<MediaCounts>,
}

impl<T: Clone> MediaPath<T> {
    /// A path for a connection that just arrived, with full rate-limit buckets.
    pub fn new(relay: &Relay, now: Instant) -> MediaPath<T> {
        MediaPath {
            version: None,
            route: None,
            gate: MediaGate::new(now, &relay.config.limits),
            counts: relay.media_counts.clone(),
        }
    }

    /// Whether the copy is as new as the relay's routes at `version`.
    pub fn is_current(&self, version: u64) -> bool {
        self.version == Some(version)
    }

    /// Copies `conn`'s route from `relay`, with each target resolved by `resolve` (a
    /// target that resolves to nothing is left out: it is on its way out).
    pub fn refresh(&mut self, relay: &Relay, conn: ConnId, mut resolve: impl FnMut(ConnId) -> Option<T>) {
        self.version = Some(relay.routes_version());
        self.route = relay.media_route(conn).map(|route| Resolved {
            session: route.session,
            channel: route.channel,
            listeners: route.listeners.into_iter().filter_map(&mut resolve).collect(),
            viewers: route.viewers.map(|viewers| viewers.into_iter().filter_map(&mut resolve).collect()),
        });
    }

    /// Where `datagram` goes, or why it goes nowhere: the header must name the sender's
    /// own session and channel, and the sender must be within its rates; screen media
    /// goes only to its viewers. Only the header is read; the payload is never looked at.
    pub fn route(&mut self, now: Instant, datagram: &[u8]) -> Result<&[T], DropReason> {
        MediaCounts::add(&self.counts.datagrams_in, 1);
        let routed = check(self.route.as_ref(), &mut self.gate, now, datagram);
        match &routed {
            Ok(to) => {
                MediaCounts::add(&self.counts.datagrams_forwarded, to.len() as u64);
                MediaCounts::add(&self.counts.bytes_forwarded, (to.len() * datagram.len()) as u64);
            }
            Err(DropReason::RateLimited) => MediaCounts::add(&self.counts.dropped_rate_limited, 1),
            Err(_) => MediaCounts::add(&self.counts.dropped_invalid, 1),
        }
        routed
    }
}

/// [`MediaPath::route`]'s decision, apart from its counting.
fn check<'a, T>(
    route: Option<&'a Resolved<T>>,
    gate: &mut MediaGate,
    now: Instant,
    datagram: &[u8],
) -> Result<&'a [T], DropReason> {
    let route = route.ok_or(DropReason::NotIntroduced)?;
    let (header, _) = MediaHeader::parse(datagram)?;
    if header.sender != route.session {
        return Err(DropReason::WrongSender);
    }
    if route.channel != Some(header.channel) {
        return Err(DropReason::NotInChannel);
    }
    if !gate.admit(now, header.stream, u32::try_from(datagram.len()).unwrap_or(u32::MAX)) {
        return Err(DropReason::RateLimited);
    }
    match header.stream {
        StreamType::Voice | StreamType::Probe => Ok(&route.listeners),
        // Viewers are in the sharer's channel: a watch ends when either leaves it.
        StreamType::Screen | StreamType::ScreenAudio => route.viewers.as_deref().ok_or(DropReason::NotSharing),
    }
}

/// Every connection's path, driven the way the shell drives them (refreshed when the
/// relay's routes change, new for each new connection): for the tests and the fuzzer.
#[derive(Debug, Default)]
pub struct MediaPaths {
    paths: HashMap<ConnId, MediaPath<ConnId>>,
}

impl MediaPaths {
    /// `conn` is a new connection (its limits start full).
    pub fn connected(&mut self, relay: &Relay, now: Instant, conn: ConnId) {
        self.paths.insert(conn, MediaPath::new(relay, now));
    }

    pub fn route(
        &mut self,
        relay: &Relay,
        now: Instant,
        from: ConnId,
        datagram: &[u8],
    ) -> Result<Vec<ConnId>, DropReason> {
        self.current(relay, now, from).route(now, datagram).map(<[ConnId]>::to_vec)
    }

    /// Where `from`'s voice would go now, as its path has it (rate limits aside).
    pub fn listeners(&mut self, relay: &Relay, now: Instant, from: ConnId) -> Option<Vec<ConnId>> {
        self.current(relay, now, from).route.as_ref().map(|route| route.listeners.clone())
    }

    /// `from`'s path, refreshed if the relay's routes changed since it was copied.
    fn current(&mut self, relay: &Relay, now: Instant, from: ConnId) -> &mut MediaPath<ConnId> {
        let path = self.paths.entry(from).or_insert_with(|| MediaPath::new(relay, now));
        if !path.is_current(relay.routes_version()) {
            path.refresh(relay, from, Some);
        }
        path
    }
}
