//! Attacks on a running `voipc serve`, each with what it costs the people using it:
//! a handshake flood with garbage beside it, amplification towards an address that never
//! proves itself, and handshakes through a lossy network. Loopback (and namespaces) only.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::Rng;
use serde::Serialize;
use tokio::net::UdpSocket;
use tokio::task::JoinSet;

use super::load::percentile_ms;
use crate::net::client::{connect_from, resolve};
use crate::net::framing::read_frame;
use crate::net::tls::PinPolicy;
use crate::protocol::{ClientMsg, Fingerprint, PROTOCOL_VERSION, ServerLink, ServerMsg, encode_frame};

/// The flood's connections come from 127.0.1.1 on (its garbage from 127.1.0.1), this many per address: within the
/// per-source limits, so that only the server's global bounds and Retry stand in the way.
const FLOOD_PER_SOURCE: usize = 4;

#[derive(Debug, Default, Serialize)]
pub struct FloodReport {
    pub flood_handshakes_started: u64,
    pub flood_handshakes_completed: u64,
    pub garbage_datagrams_sent: u64,
    /// How long a newcomer took from its first packet to its welcome, a second into the flood.
    pub newcomer_welcome_ms: f64,
}

/// `handshakes` connections at once that never say hello (each starts again when the
/// server lets it go), and `garbage_per_sec` datagrams of random bytes, for `window`;
/// meanwhile a newcomer joins. (What it does to people talking is measured apart, by
/// `bench flood` in another process.)
pub async fn handshake_flood(
    target: &ServerLink,
    fingerprint: Fingerprint,
    handshakes: usize,
    garbage_per_sec: u32,
    window: Duration,
) -> anyhow::Result<FloodReport> {
    let server = resolve(&target.authority()).await?;
    let end = Instant::now() + window;
    let started = Arc::new(AtomicU64::new(0));
    let completed = Arc::new(AtomicU64::new(0));
    let mut flood = JoinSet::new();
    for i in 0..handshakes {
        let n = i / FLOOD_PER_SOURCE;
        let source = Ipv4Addr::new(127, 0, 1 + (n / 250) as u8, 1 + (n % 250) as u8);
        let (target, started, completed) = (target.clone(), started.clone(), completed.clone());
        flood.spawn(async move {
            while Instant::now() < end {
                started.fetch_add(1, Ordering::Relaxed);
                let local = SocketAddr::new(IpAddr::V4(source), 0);
                let attempt = tokio::time::timeout_at(
                    end.into(),
                    connect_from(&target, PinPolicy::Pinned(fingerprint), Some(local)),
                );
                let Ok(Ok(connected)) = attempt.await else { continue };
                completed.fetch_add(1, Ordering::Relaxed);
                // Say nothing; hold the connection until the server lets it go.
                let _ = tokio::time::timeout_at(end.into(), connected.connection.closed()).await;
            }
        });
    }
    let garbage = tokio::spawn(send_garbage(server, garbage_per_sec, end));
    let newcomer = async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let local = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3)), 0);
        let began = Instant::now();
        say_hello(target, fingerprint, "newcomer", local).await?;
        anyhow::Ok(began.elapsed())
    };
    let newcomer = newcomer.await;
    while flood.join_next().await.is_some() {}
    Ok(FloodReport {
        flood_handshakes_started: started.load(Ordering::Relaxed),
        flood_handshakes_completed: completed.load(Ordering::Relaxed),
        garbage_datagrams_sent: garbage.await?,
        newcomer_welcome_ms: newcomer.context("the newcomer did not get in")?.as_secs_f64() * 1000.0,
    })
}

/// Datagrams of random bytes and sizes, some shaped like QUIC long headers, from one socket.
async fn send_garbage(server: SocketAddr, per_sec: u32, end: Instant) -> u64 {
    let Ok(socket) = UdpSocket::bind("127.1.0.1:0").await else { return 0 };
    let batch = (per_sec / 100).max(1);
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut sent = 0;
    let mut datagram = vec![0u8; 1500];
    while Instant::now() < end {
        tick.tick().await;
        for _ in 0..batch {
            let len = {
                let mut rng = rand::rng();
                let len = rng.random_range(1..=1400);
                rng.fill(&mut datagram[..len]);
                // Half look like the start of an Initial (long header, QUIC v1).
                if rng.random_bool(0.5) && len > 5 {
                    datagram[0] = 0xc0 | (datagram[0] & 0x0f);
                    datagram[1..5].copy_from_slice(&1u32.to_be_bytes());
                }
                len
            };
            if socket.send_to(&datagram[..len], server).await.is_ok() {
                sent += 1;
            }
        }
    }
    sent
}

/// Connects from `local`, says hello and waits for the welcome.
async fn say_hello(
    target: &ServerLink,
    fingerprint: Fingerprint,
    name: &str,
    local: SocketAddr,
) -> anyhow::Result<(quinn::Endpoint, quinn::Connection)> {
    let connected = connect_from(target, PinPolicy::Pinned(fingerprint), Some(local)).await?;
    let (mut send, mut recv) = connected.connection.open_bi().await?;
    let hello = ClientMsg::Hello { version: PROTOCOL_VERSION, name: name.to_owned(), join: None, bundle: None };
    send.write_all(&encode_frame(&hello)?).await?;
    loop {
        match read_frame(&mut recv).await?.context("the server ended the control stream")? {
            ServerMsg::Welcome { .. } => return Ok((connected.endpoint, connected.connection)),
            ServerMsg::Error { code, message } => anyhow::bail!("{name}: {code}: {message}"),
            _ => {}
        }
    }
}

#[derive(Debug, Default, Serialize)]
pub struct HandshakesReport {
    pub attempted: usize,
    pub welcomed: usize,
    pub median_ms: f64,
    pub max_ms: f64,
    pub errors: Vec<String>,
}

/// `count` clients at once, each connecting and saying hello (through an impairer, the
/// quic-interop `handshakeloss` case); how many got their welcome and how long it took.
pub async fn handshakes(target: &ServerLink, fingerprint: Fingerprint, count: usize) -> HandshakesReport {
    let mut clients = JoinSet::new();
    for i in 0..count {
        let target = target.clone();
        clients.spawn(async move {
            let began = Instant::now();
            let local = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
            let welcomed = say_hello(&target, fingerprint, &format!("lossy-{i}"), local).await;
            // Stay until everyone is done, so that the server sees them all at once.
            welcomed.map(|kept| (began.elapsed(), kept))
        });
    }
    let mut report = HandshakesReport { attempted: count, ..HandshakesReport::default() };
    let mut times_us = Vec::new();
    let mut kept = Vec::new();
    while let Some(joined) = clients.join_next().await {
        match joined {
            Ok(Ok((took, connection))) => {
                times_us.push(took.as_micros().min(u128::from(u32::MAX)) as u32);
                kept.push(connection);
            }
            Ok(Err(e)) => report.errors.push(format!("{e:#}")),
            Err(e) => report.errors.push(e.to_string()),
        }
    }
    times_us.sort_unstable();
    report.welcomed = times_us.len();
    report.median_ms = percentile_ms(&times_us, 0.5);
    report.max_ms = percentile_ms(&times_us, 1.0);
    report
}

#[derive(Debug, Default, Serialize)]
pub struct AmplificationReport {
    /// Bytes that reached the server from the client, and the server's answer to them.
    pub client_bytes: u64,
    pub server_bytes: u64,
    pub ratio: f64,
}

/// A client whose address never proves itself: a proxy in front of the server passes on
/// the client's datagrams that hold one Initial packet without a token and nothing else
/// (its ClientHello, two with a post-quantum key share, and their repeats), never one
/// with a token (from a Retry: a spoofer never sees one) or a Handshake packet (either
/// would prove the address), and everything the server sends back, counting both, for
/// `window`.
///
/// (It once passed on whatever came before the server's first answer: a server quick to
/// acknowledge the first Initial then never got the second, and so never answered.)
/// Whether a datagram is exactly one QUIC v1 Initial packet (long header, type 0) that
/// carries no token, with nothing coalesced after it.
fn only_an_initial(datagram: &[u8]) -> bool {
    fn varint(bytes: &[u8], at: &mut usize) -> Option<u64> {
        let first = *bytes.get(*at)?;
        let len = 1usize << (first >> 6);
        let raw = bytes.get(*at..*at + len)?;
        *at += len;
        Some(raw.iter().skip(1).fold(u64::from(first & 0x3f), |v, b| v << 8 | u64::from(*b)))
    }
    let parse = || -> Option<bool> {
        let first = *datagram.first()?;
        if first & 0xc0 != 0xc0 || (first >> 4) & 0x03 != 0 || datagram.get(1..5)? != [0, 0, 0, 1] {
            return Some(false);
        }
        let mut at = 5;
        for _ in 0..2 {
            // Destination, then source connection id.
            at += 1 + usize::from(*datagram.get(at)?);
        }
        if varint(datagram, &mut at)? != 0 {
            return Some(false);
        }
        let length = varint(datagram, &mut at)?;
        Some(at.checked_add(usize::try_from(length).ok()?)? == datagram.len())
    };
    parse().unwrap_or(false)
}

pub async fn amplification(
    target: &ServerLink,
    fingerprint: Fingerprint,
    window: Duration,
) -> anyhow::Result<AmplificationReport> {
    let server = resolve(&target.authority()).await?;
    let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
    let upstream = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
    let proxy_link: ServerLink = front.local_addr()?.to_string().parse()?;
    let client_bytes = Arc::new(AtomicU64::new(0));
    let server_bytes = Arc::new(AtomicU64::new(0));
    let client_addr = Arc::new(std::sync::Mutex::new(None));
    let up = {
        let (front, upstream, client_bytes, client_addr) =
            (front.clone(), upstream.clone(), client_bytes.clone(), client_addr.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            while let Ok((len, from)) = front.recv_from(&mut buf).await {
                *client_addr.lock().expect("never poisoned") = Some(from);
                if only_an_initial(&buf[..len]) {
                    client_bytes.fetch_add(len as u64, Ordering::Relaxed);
                    let _ = upstream.send_to(&buf[..len], server).await;
                }
            }
        })
    };
    let down = {
        let (front, upstream, server_bytes, client_addr) =
            (front.clone(), upstream.clone(), server_bytes.clone(), client_addr.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            while let Ok((len, _)) = upstream.recv_from(&mut buf).await {
                server_bytes.fetch_add(len as u64, Ordering::Relaxed);
                let to = *client_addr.lock().expect("never poisoned");
                if let Some(to) = to {
                    let _ = front.send_to(&buf[..len], to).await;
                }
            }
        })
    };
    let local = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
    let _ = tokio::time::timeout(window, connect_from(&proxy_link, PinPolicy::Pinned(fingerprint), Some(local))).await;
    up.abort();
    down.abort();
    let (client_bytes, server_bytes) = (client_bytes.load(Ordering::Relaxed), server_bytes.load(Ordering::Relaxed));
    Ok(AmplificationReport { client_bytes, server_bytes, ratio: server_bytes as f64 / client_bytes.max(1) as f64 })
}

#[cfg(test)]
mod tests {
    use super::only_an_initial;

    /// A long-header packet of `kind` (0 Initial, 2 Handshake) with a 1 100-byte payload
    /// (and for an Initial, a token of `token` bytes).
    fn packet(kind: u8, token: u8) -> Vec<u8> {
        let mut p = vec![0xc0 | kind << 4 | 0x03, 0, 0, 0, 1, 8];
        p.extend([7; 8]);
        p.push(8);
        p.extend([9; 8]);
        if kind == 0 {
            p.push(token);
            p.extend(std::iter::repeat_n(5, usize::from(token)));
        }
        p.extend([0x40 | (1100u16 >> 8) as u8, (1100 & 0xff) as u8]);
        p.extend([0; 1100]);
        p
    }

    #[test]
    fn only_a_lone_initial_passes_for_an_address_that_never_proves_itself() {
        assert!(only_an_initial(&packet(0, 0)));
        assert!(!only_an_initial(&packet(0, 40)), "a Retry's token would prove the address");
        let coalesced = [packet(0, 0), packet(2, 0)].concat();
        assert!(!only_an_initial(&coalesced), "a Handshake packet after it would prove the address");
        assert!(!only_an_initial(&packet(2, 0)));
        assert!(!only_an_initial(&[0x40, 1, 2, 3]), "a short header");
        let initial = packet(0, 0);
        assert!(!only_an_initial(&initial[..initial.len() - 1]), "cut short");
        assert!(!only_an_initial(&[]));
    }
}
