//! Load generators: groups of members that all speak at voice rate through a relay,
//! over QUIC through `voipc serve` or over plain UDP through the baseline.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use serde::Serialize;
use tokio::net::UdpSocket;
use tokio::task::JoinSet;

use super::udp_relay::REGISTER;
use crate::net::client::{Connected, connect};
use crate::net::framing::read_frame;
use crate::net::tls::PinPolicy;
use crate::protocol::{
    ChannelId, ClientMsg, Fingerprint, JoinRequest, MEDIA_HEADER_LEN, MediaHeader, PROTOCOL_VERSION, ServerLink,
    ServerMsg, encode_frame,
};

/// Voice rate: one datagram every 20 ms.
pub const PACKET_INTERVAL: Duration = Duration::from_millis(20);
/// Bytes per datagram, header included: a 48 kbit/s Opus frame plus SFrame overhead.
pub const DATAGRAM_LEN: usize = 160;
/// Offset of the send time (nanoseconds since the run's base instant) in a datagram.
const STAMP_AT: usize = MEDIA_HEADER_LEN;

/// One level's measurement window and what happened in it.
#[derive(Debug, Clone, Default)]
pub struct Measured {
    /// Datagrams sent inside the window.
    pub sent: u64,
    /// Deliveries expected: each datagram sent to every other member.
    pub expected: u64,
    /// Deliveries of datagrams sent inside the window.
    pub received: u64,
    /// One-way latency of each delivery, microseconds.
    pub latencies_us: Vec<u32>,
}

/// How a member reaches the relay.
#[derive(Clone)]
enum Path {
    Quic { connection: quinn::Connection, header: MediaHeader },
    Udp { socket: Arc<UdpSocket>, relay: SocketAddr },
}

impl Path {
    async fn send(&self, datagram: Vec<u8>) {
        match self {
            Path::Quic { connection, .. } => {
                let _ = connection.send_datagram(Bytes::from(datagram));
            }
            Path::Udp { socket, relay } => {
                let _ = socket.send_to(&datagram, relay).await;
            }
        }
    }

    async fn recv(&self, buf: &mut [u8]) -> Option<usize> {
        match self {
            Path::Quic { connection, .. } => {
                let datagram = connection.read_datagram().await.ok()?;
                let len = datagram.len().min(buf.len());
                buf[..len].copy_from_slice(&datagram[..len]);
                Some(len)
            }
            Path::Udp { socket, .. } => socket.recv(buf).await.ok(),
        }
    }

    /// Waits for datagrams and takes what is there, each into a buffer of `batch` (their
    /// lengths into `lens`): over UDP up to a whole batch with one `recvmmsg`, as the
    /// QUIC path's endpoint takes its packets, so that neither path is limited by the
    /// generator's system calls.
    async fn recv_batch(&self, batch: &mut [[u8; 2048]], lens: &mut Vec<usize>) -> Option<()> {
        lens.clear();
        match self {
            Path::Quic { .. } => {
                let len = self.recv(&mut batch[0]).await?;
                lens.push(len);
                Some(())
            }
            Path::Udp { socket, .. } => {
                socket.async_io(tokio::io::Interest::READABLE, || recv_many(socket, batch, lens)).await.ok()
            }
        }
    }

    fn datagram(&self, sequence: u32, stamp_ns: u64) -> Vec<u8> {
        let mut datagram = vec![0u8; DATAGRAM_LEN];
        if let Path::Quic { header, .. } = self {
            let mut head = [0u8; MEDIA_HEADER_LEN];
            MediaHeader { sequence, ..*header }.write(&mut head);
            datagram[..MEDIA_HEADER_LEN].copy_from_slice(&head);
        }
        datagram[STAMP_AT..STAMP_AT + 8].copy_from_slice(&stamp_ns.to_be_bytes());
        datagram
    }
}

/// Datagrams one `recvmmsg` of a load client takes at most.
const RECV_BATCH: usize = 32;

/// Takes the datagrams waiting on `socket` with one `recvmmsg` (would-block when none),
/// with its headers on the stack: nothing is allocated per call.
#[cfg(target_os = "linux")]
fn recv_many(socket: &UdpSocket, batch: &mut [[u8; 2048]], lens: &mut Vec<usize>) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let n = batch.len().min(RECV_BATCH);
    let mut iovecs = [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; RECV_BATCH];
    // SAFETY: a zeroed header is valid (no name, no control data).
    let mut headers: [libc::mmsghdr; RECV_BATCH] = unsafe { std::mem::zeroed() };
    for ((buf, iovec), header) in batch.iter_mut().zip(&mut iovecs).zip(&mut headers).take(n) {
        *iovec = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
        header.msg_hdr.msg_iov = iovec;
        header.msg_hdr.msg_iovlen = 1;
    }
    // SAFETY: the first `n` headers each point at one live iovec and its buffer; the
    // kernel writes at most each iovec's length.
    let got = unsafe {
        libc::recvmmsg(socket.as_raw_fd(), headers.as_mut_ptr(), n as u32, libc::MSG_DONTWAIT, std::ptr::null_mut())
    };
    if got < 0 {
        return Err(std::io::Error::last_os_error());
    }
    lens.extend(headers[..got as usize].iter().map(|h| h.msg_len as usize));
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn recv_many(socket: &UdpSocket, batch: &mut [[u8; 2048]], lens: &mut Vec<usize>) -> std::io::Result<()> {
    lens.push(socket.try_recv(&mut batch[0])?);
    Ok(())
}

/// A group of members in one channel of one relay.
pub struct Group {
    members: Vec<Path>,
    /// QUIC members keep their connections, control streams and endpoints open.
    _keep: Vec<Box<dyn std::any::Any + Send>>,
}

impl Group {
    /// `n` QUIC members in a fresh temporary channel of a `voipc serve`.
    pub async fn quic(server: &ServerLink, fingerprint: Fingerprint, n: usize, tag: &str) -> anyhow::Result<Group> {
        let channel = format!("bench-{tag}");
        let mut group = Group { members: Vec::new(), _keep: Vec::new() };
        for i in 0..n {
            let name = format!("bench-{tag}-{i}");
            // The first member creates the channel; the others ask for it in their hello.
            let join = (i > 0).then(|| JoinRequest::named(&channel));
            let (path, keep) = quic_member(server, fingerprint, &name, join, &channel).await?;
            group.members.push(path);
            group._keep.push(keep);
        }
        Ok(group)
    }

    /// Each QUIC member's connection and the media header it sends with.
    pub fn quic_members(&self) -> Vec<(quinn::Connection, MediaHeader)> {
        self.members
            .iter()
            .filter_map(|m| match m {
                Path::Quic { connection, header } => Some((connection.clone(), *header)),
                Path::Udp { .. } => None,
            })
            .collect()
    }

    /// `n` UDP members of the baseline relay, in its channel `channel`.
    pub async fn udp(relay: SocketAddr, n: usize, channel: u16) -> anyhow::Result<Group> {
        let mut members = Vec::new();
        let register = [REGISTER, &channel.to_be_bytes()].concat();
        for _ in 0..n {
            let socket = UdpSocket::bind("127.0.0.1:0").await?;
            let mut buf = [0u8; 64];
            let registered = async {
                loop {
                    socket.send_to(&register, relay).await?;
                    match tokio::time::timeout(Duration::from_millis(200), socket.recv(&mut buf)).await {
                        Ok(Ok(len)) if buf[..len] == register[..] => return anyhow::Ok(()),
                        _ => continue,
                    }
                }
            };
            tokio::time::timeout(Duration::from_secs(5), registered)
                .await
                .context("baseline relay does not answer")??;
            members.push(Path::Udp { socket: Arc::new(socket), relay });
        }
        Ok(Group { members, _keep: Vec::new() })
    }

    /// The first `speakers` members speak for `warmup + window` and everyone listens;
    /// deliveries of what was sent inside the window are counted until `drain` after it.
    pub async fn measure(&self, base: Instant, warmup: Duration, window: Duration, speakers: usize) -> Measured {
        let drain = Duration::from_millis(500);
        let start = Instant::now() + warmup;
        let end = start + window;
        let in_window = move |ns: u64| {
            let at = base + Duration::from_nanos(ns);
            at >= start && at < end
        };
        let mut tasks = JoinSet::new();
        let receivers = self.members.len() as u64 - 1;
        let speakers = speakers.min(self.members.len());
        for (i, member) in self.members.iter().enumerate() {
            let sender = member.clone();
            // Spread the speakers over the 20 ms so that they do not all send at once.
            let offset = PACKET_INTERVAL * i as u32 / speakers.max(1) as u32;
            tasks.spawn(async move {
                if i >= speakers {
                    return Measured::default();
                }
                let mut tick = tokio::time::interval_at((Instant::now() + offset).into(), PACKET_INTERVAL);
                let mut sent = 0u64;
                for sequence in 0u32.. {
                    let at = tick.tick().await.into_std();
                    if at >= end {
                        break;
                    }
                    let ns = Instant::now().duration_since(base).as_nanos() as u64;
                    if in_window(ns) {
                        sent += 1;
                    }
                    sender.send(sender.datagram(sequence, ns)).await;
                }
                Measured { sent, expected: sent * receivers, ..Measured::default() }
            });
            let receiver = member.clone();
            tasks.spawn(async move {
                let mut measured = Measured::default();
                let mut batch = vec![[0u8; 2048]; RECV_BATCH];
                let mut lens = Vec::with_capacity(RECV_BATCH);
                let stop = tokio::time::sleep_until((end + drain).into());
                tokio::pin!(stop);
                loop {
                    tokio::select! {
                        () = &mut stop => break,
                        got = receiver.recv_batch(&mut batch, &mut lens) => if got.is_none() { break },
                    }
                    let now = Instant::now().duration_since(base).as_nanos() as u64;
                    for (buf, &len) in batch.iter().zip(&lens) {
                        let Some(stamp) = buf[..len].get(STAMP_AT..STAMP_AT + 8) else { continue };
                        let ns = u64::from_be_bytes(stamp.try_into().expect("8 bytes"));
                        if in_window(ns) {
                            measured.received += 1;
                            let latency_us = (now.saturating_sub(ns) / 1000).min(u64::from(u32::MAX)) as u32;
                            measured.latencies_us.push(latency_us);
                        }
                    }
                }
                measured
            });
        }
        let mut total = Measured::default();
        while let Some(Ok(part)) = tasks.join_next().await {
            total.sent += part.sent;
            total.expected += part.expected;
            total.received += part.received;
            total.latencies_us.extend(part.latencies_us);
        }
        total
    }
}

/// What one speaker's voice went through while another member flooded the channel.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FloodMeasured {
    pub speaker_sent: u64,
    pub speaker_received: u64,
    pub flooder_sent: u64,
    pub flooder_received: u64,
    /// The speaker's one-way latency, ms: median and 95th percentile in the first and the
    /// second half of the window (a queue that grows shows as a later half slower).
    pub first_half_p50_ms: f64,
    pub first_half_p95_ms: f64,
    pub second_half_p50_ms: f64,
    pub second_half_p95_ms: f64,
}

impl Group {
    /// The first member listens, the second speaks at voice rate and the third sends
    /// `factor` times as many datagrams of the same size, evenly spread, for `window`.
    pub async fn flood(&self, base: Instant, factor: u32, window: Duration) -> anyhow::Result<FloodMeasured> {
        let [listener, speaker, flooder, ..] = &self.members[..] else { bail!("a flood needs three members") };
        let Path::Quic { header: speaker_header, .. } = speaker else { bail!("the flood bench runs over QUIC") };
        let speaker_id = speaker_header.sender;
        let start = Instant::now() + Duration::from_millis(500);
        let end = start + window;
        let half = start + window / 2;
        let send = |member: &Path, interval: Duration| {
            let member = member.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval_at(start.into(), interval);
                let mut sent = 0u64;
                for sequence in 0u32.. {
                    if tick.tick().await.into_std() >= end {
                        break;
                    }
                    let ns = Instant::now().duration_since(base).as_nanos() as u64;
                    member.send(member.datagram(sequence, ns)).await;
                    sent += 1;
                }
                sent
            })
        };
        let speaking = send(speaker, PACKET_INTERVAL);
        let flooding = match factor {
            0 => tokio::spawn(async { 0 }),
            _ => send(flooder, PACKET_INTERVAL / factor),
        };
        let mut measured = FloodMeasured::default();
        let (mut first, mut second) = (Vec::new(), Vec::new());
        let mut buf = [0u8; 2048];
        let stop = tokio::time::sleep_until((end + Duration::from_millis(500)).into());
        tokio::pin!(stop);
        loop {
            let len = tokio::select! {
                () = &mut stop => break,
                len = listener.recv(&mut buf) => match len { Some(len) => len, None => break },
            };
            let Ok((header, _)) = MediaHeader::parse(&buf[..len]) else { continue };
            let Some(stamp) = buf[..len].get(STAMP_AT..STAMP_AT + 8) else { continue };
            let sent_at = base + Duration::from_nanos(u64::from_be_bytes(stamp.try_into().expect("8 bytes")));
            if header.sender != speaker_id {
                measured.flooder_received += 1;
                continue;
            }
            measured.speaker_received += 1;
            let latency_us = Instant::now().saturating_duration_since(sent_at).as_micros();
            if sent_at < half { &mut first } else { &mut second }.push(latency_us.min(u128::from(u32::MAX)) as u32);
        }
        measured.speaker_sent = speaking.await?;
        measured.flooder_sent = flooding.await?;
        first.sort_unstable();
        second.sort_unstable();
        (measured.first_half_p50_ms, measured.first_half_p95_ms) =
            (percentile_ms(&first, 0.5), percentile_ms(&first, 0.95));
        (measured.second_half_p50_ms, measured.second_half_p95_ms) =
            (percentile_ms(&second, 0.5), percentile_ms(&second, 0.95));
        Ok(measured)
    }
}

/// The `p` quantile of sorted latencies in microseconds, in milliseconds (NaN when
/// there are none).
pub fn percentile_ms(sorted_us: &[u32], p: f64) -> f64 {
    match sorted_us.len() {
        0 => f64::NAN,
        n => f64::from(sorted_us[((n - 1) as f64 * p).round() as usize]) / 1000.0,
    }
}

/// Connects one QUIC member and waits until it is in `channel`.
async fn quic_member(
    server: &ServerLink,
    fingerprint: Fingerprint,
    name: &str,
    join: Option<JoinRequest>,
    channel: &str,
) -> anyhow::Result<(Path, Box<dyn std::any::Any + Send>)> {
    let Connected { endpoint, connection, .. } = connect(server, PinPolicy::Pinned(fingerprint)).await?;
    let (mut send, mut recv) = connection.open_bi().await?;
    // The bench speaks the control protocol directly: its members only need a channel,
    // not the end-to-end chat layer of a full session.
    let create = join.is_none();
    let mut requests = vec![ClientMsg::Hello { version: PROTOCOL_VERSION, name: name.to_owned(), join, bundle: None }];
    if create {
        requests.push(ClientMsg::CreateChannel {
            name: channel.to_owned(),
            description: "voipc bench".into(),
            password: None,
            user_limit: 0,
        });
    }
    for msg in &requests {
        send.write_all(&encode_frame(msg)?).await?;
    }
    let joined = async {
        let mut me = None;
        let mut channel_id = None;
        loop {
            match read_frame(&mut recv).await?.context("server ended the control stream")? {
                ServerMsg::Welcome { session, .. } => me = Some(session),
                ServerMsg::ChannelAdded(info) if info.name == channel => channel_id = Some(info.id),
                // Where we are shows in the listing's first page (joined with the hello)
                // or in a presence batch (the channel we created).
                ServerMsg::Users { users, .. } | ServerMsg::Presence { users, .. } => {
                    let placed = |c: ChannelId| users.iter().find(|u| Some(u.session) == me && u.channel == Some(c));
                    if let Some((user, to)) = channel_id.and_then(|c| placed(c).map(|u| (u, c))) {
                        return anyhow::Ok((user.session, to));
                    }
                }
                ServerMsg::Error { code, message } => bail!("{name}: {code}: {message}"),
                _ => {}
            }
        }
    };
    let (me, channel_id) = tokio::time::timeout(Duration::from_secs(10), joined)
        .await
        .context("joining the bench channel timed out")??;
    // Keep reading control frames so the server's queue for us never fills.
    let drain = tokio::spawn(async move { while let Ok(Some(_)) = read_frame::<ServerMsg>(&mut recv).await {} });
    let header = MediaHeader {
        stream: crate::protocol::StreamType::Probe,
        flags: 0,
        channel: channel_id,
        sender: me,
        sequence: 0,
        timestamp: 0,
    };
    let keep: Box<dyn std::any::Any + Send> = Box::new((endpoint, send, DrainOnDrop(drain)));
    Ok((Path::Quic { connection, header }, keep))
}

/// Stops a background task when the group it served is dropped.
struct DrainOnDrop(tokio::task::JoinHandle<()>);

impl Drop for DrainOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
