//! `voipc serve`'s IO shell: a quinn endpoint that drives the sans-IO [`Relay`].
//!
//! One task per connection reads its control stream, one reads its datagrams, one
//! writes its control frames; a timer task runs the relay's timeouts, and a flush task
//! sends what waited on the receivers' legs (see [`Leg`]). The relay sits behind one
//! mutex that is held only for a relay call and never across an await; the datagram
//! tasks route with their own copies of their routes and take it only when those change.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use quinn::VarInt;
use tokio::sync::{Notify, Semaphore, mpsc};
use tracing::{Instrument, debug, info, info_span, warn};

use super::framing::{ReadFrameError, read_frame};
use super::timer::PreciseTimer;
use super::tls::{Identity, server_tls};
use crate::config::Limits;
use crate::protocol::{ClientMsg, ErrorCode, Fingerprint, FrameError, ServerMsg, encode_frame};
use crate::relay::handshakes::{Admission, HandshakeSlots};
use crate::relay::leg::{LegDrops, LegQueue};
use crate::relay::metrics::ShellCounts;
use crate::relay::route::MediaPath;
use crate::relay::{ConnId, Input, Output, Relay, Source, password};

/// Control frames queued for one slow client before it is disconnected.
const CONTROL_QUEUE: usize = 1024;

/// Media waiting for a receiver's full link is dropped after this long: late voice is
/// worse than none. quinn's own buffer ([`super::SERVER_DATAGRAM_BUFFER`]) comes first.
const LEG_MAX_AGE: Duration = Duration::from_millis(60);
/// Bytes of media waiting for one receiver at most.
const LEG_MAX_BYTES: usize = 64 * 1024;

/// Packets a client may receive from the server before it must acknowledge them.
const ACK_EVERY: u32 = 10;

/// How long a QUIC handshake may take: long enough for one through heavy loss (each lost
/// flight doubles the wait), and a slot held that long is the first to go when a newcomer
/// needs one.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a closing connection gets to read its last error message.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// The application close code a server uses; the reason names the [`ErrorCode`].
pub const CLOSE_ERROR: u32 = 1;
/// The close code of an orderly end (client quit, server shutdown).
pub const CLOSE_NORMAL: u32 = 0;

pub struct Server {
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
    fingerprint: Fingerprint,
    /// With this many handshakes under way, new ones get a QUIC Retry first.
    retry_above: u32,
}

struct Shared {
    state: Mutex<State>,
    /// Whether log lines may carry client addresses (`serve --log-addresses`).
    log_addresses: bool,
    /// Bounds the Argon2 work (password checks and hashes) over all connections.
    passwords: PasswordGate,
    /// What the shell counts itself, for the metrics.
    counts: ShellCounters,
    /// Wakes the timer task when the relay's next timeout may have moved earlier.
    timer: Notify,
    /// Connections still in the QUIC handshake.
    handshakes: Mutex<Handshakes>,
    flushes: Flushes,
    /// The relay's [`Relay::routes_version`] after its last call.
    routes_version: AtomicU64,
    /// `Limits::media_coalesce_ms`.
    coalesce: Duration,
}

/// The handshakes under way and their tasks, to abandon one when a newcomer needs its
/// slot.
struct Handshakes {
    slots: HandshakeSlots,
    tasks: HashMap<u64, tokio::task::AbortHandle>,
}

struct State {
    relay: Relay,
    /// Bytes of control frames one client may have queued (`Limits::max_queued_control_bytes`).
    max_queued: usize,
    conns: HashMap<ConnId, ConnHandle>,
    next_conn: u64,
}

struct ConnHandle {
    connection: quinn::Connection,
    control: mpsc::Sender<Outgoing>,
    /// Bytes in `control` not written yet.
    queued: Arc<AtomicUsize>,
    leg: Arc<Leg>,
}

/// Media on its way to one receiver: straight to quinn when the leg has been quiet for a
/// coalescing window, else held in the per-sender queues of [`LegQueue`] until the next
/// flush round ([`run_flushes`]), so that what gathers meanwhile shares a QUIC packet.
struct Leg {
    connection: quinn::Connection,
    queue: Mutex<LegQueue>,
    /// Whether the leg is in the flush list.
    listed: AtomicBool,
}

impl Leg {
    fn new(connection: quinn::Connection, coalesce: Duration) -> Leg {
        Leg {
            connection,
            queue: Mutex::new(LegQueue::new(LEG_MAX_AGE, LEG_MAX_BYTES, coalesce)),
            listed: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> MutexGuard<'_, LegQueue> {
        self.queue.lock().expect("leg lock is never poisoned: queue calls do not panic")
    }

    fn forward(self: &Arc<Self>, now: Instant, from: ConnId, datagram: Bytes, shared: &Shared) {
        let mut queue = self.lock();
        if queue.send_now(now) && self.connection.datagram_send_buffer_space() >= datagram.len() {
            drop(queue);
            // A receiver that is gone or cannot take this size simply misses it.
            let _ = self.connection.send_datagram(datagram);
            return;
        }
        queue.push(now, from, datagram);
        shared.counts.add_media_drops(queue.take_drops());
        drop(queue);
        shared.flushes.list(self);
    }

    /// Hands quinn what waits, as far as it has room; whether anything is left.
    fn flush(&self, now: Instant, counts: &ShellCounters) -> bool {
        let mut queue = self.lock();
        let mut room = self.connection.datagram_send_buffer_space();
        while let Some(datagram) = queue.pop(now, room) {
            room -= datagram.len();
            // Too large for this receiver, or the connection is gone: it misses this one.
            let _ = self.connection.send_datagram(datagram);
        }
        counts.add_media_drops(queue.take_drops());
        !queue.is_empty()
    }
}

/// Legs holding media for the next flush round.
struct Flushes {
    legs: Mutex<Vec<Arc<Leg>>>,
    wake: Notify,
}

impl Flushes {
    fn list(&self, leg: &Arc<Leg>) {
        if !leg.listed.swap(true, Ordering::AcqRel) {
            self.legs.lock().expect("flush list lock is never poisoned").push(leg.clone());
            self.wake.notify_one();
        }
    }
}

/// Flushes the listed legs one coalescing window after the first was listed, and every
/// window after while any holds media. Every leg is flushed in one pass, so each
/// receiver's connection sends what gathered in one packet. The window is timed to the
/// microsecond ([`PreciseTimer`]).
async fn run_flushes(shared: Arc<Shared>) {
    let timer = PreciseTimer::new();
    let mut legs = Vec::new();
    // Without coalescing, only legs whose link was full wait: they are tried every
    // millisecond.
    let round = shared.coalesce.max(Duration::from_millis(1));
    loop {
        shared.flushes.wake.notified().await;
        loop {
            timer.sleep(round).await;
            std::mem::swap(&mut legs, &mut *shared.flushes.legs.lock().expect("flush list lock is never poisoned"));
            let now = Instant::now();
            for leg in legs.drain(..) {
                leg.listed.store(false, Ordering::Release);
                if leg.flush(now, &shared.counts) {
                    shared.flushes.list(&leg);
                }
            }
            if shared.flushes.legs.lock().expect("flush list lock is never poisoned").is_empty() {
                break;
            }
        }
    }
}

enum Outgoing {
    /// Shared by every receiver of a broadcast.
    Frame(Bytes),
    Close(ErrorCode),
}

impl Server {
    /// Binds the endpoint, with the shell's share of `limits`: handshakes under way (in all
    /// and per source), when Retry starts, and the queue per client.
    pub fn bind(listen: SocketAddr, identity: Identity, mut relay: Relay, limits: &Limits) -> anyhow::Result<Server> {
        let fingerprint = identity.fingerprint();
        relay.set_server_id(fingerprint);
        let tls = server_tls(identity)?;
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).context("TLS config unusable for QUIC")?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        let mut transport = super::transport_config(super::SERVER_DATAGRAM_BUFFER, super::SERVER_INITIAL_RTT);
        // A listener acknowledges every second packet unless asked otherwise: in a busy
        // channel as many packets come back as go out, each received, decrypted and
        // processed here. Once per ACK_EVERY packets (or its 25 ms delay) is plenty for
        // datagrams, which are never sent again.
        let mut acks = quinn::AckFrequencyConfig::default();
        acks.ack_eliciting_threshold(VarInt::from_u32(ACK_EVERY - 1));
        transport.ack_frequency_config(Some(acks));
        config.transport_config(Arc::new(transport));
        // A Retry token must outlive the slowest handshake it starts.
        config.retry_token_lifetime(HANDSHAKE_TIMEOUT);
        let (socket, buffer) = super::bind_udp(listen, super::SERVER_SOCKET_BUFFER)
            .with_context(|| format!("cannot listen on {listen}"))?;
        if buffer < super::SERVER_SOCKET_BUFFER {
            warn!(
                granted_kib = buffer / 1024,
                wanted_kib = super::SERVER_SOCKET_BUFFER / 1024,
                "the kernel grants a smaller UDP receive buffer: a burst may drop everyone's voice \
                 (raise net.core.rmem_max)"
            );
        }
        let runtime = quinn::default_runtime().context("quinn needs a tokio runtime")?;
        let endpoint = quinn::Endpoint::new(quinn::EndpointConfig::default(), Some(config), socket, runtime)
            .with_context(|| format!("cannot listen on {listen}"))?;
        let max_pending = limits.max_pending_connections;
        let max_queued = limits.max_queued_control_bytes as usize;
        let shared = Arc::new(Shared {
            state: Mutex::new(State { relay, max_queued, conns: HashMap::new(), next_conn: 1 }),
            log_addresses: false,
            passwords: PasswordGate::new(PASSWORD_WORKERS, PASSWORD_QUEUE),
            counts: ShellCounters::default(),
            timer: Notify::new(),
            handshakes: Mutex::new(Handshakes {
                slots: HandshakeSlots::new(
                    max_pending as usize,
                    limits.max_pending_per_source as usize,
                    limits.handshakes_per_source_per_minute,
                    // Room for a source's connections and as many again, so that a source
                    // over its connection limit hears why from the relay.
                    2 * limits.max_connections_per_source,
                ),
                tasks: HashMap::new(),
            }),
            flushes: Flushes { legs: Mutex::new(Vec::new()), wake: Notify::new() },
            routes_version: AtomicU64::new(0),
            coalesce: Duration::from_millis(u64::from(limits.media_coalesce_ms)),
        });
        Ok(Server { endpoint, shared, fingerprint, retry_above: limits.retry_above_pending_handshakes })
    }

    /// Serves the metrics at `http://{addr}/metrics` (a loopback address: the config
    /// refuses others); returns the address bound.
    pub fn serve_metrics(&self, addr: SocketAddr) -> anyhow::Result<SocketAddr> {
        let listener =
            std::net::TcpListener::bind(addr).with_context(|| format!("metrics: cannot listen on {addr}"))?;
        listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let bound = listener.local_addr()?;
        tokio::spawn(serve_metrics(listener, self.shared.clone()));
        Ok(bound)
    }

    /// Lets log lines name client addresses (off by default: logs identify nobody).
    pub fn log_addresses(mut self, on: bool) -> Server {
        Arc::get_mut(&mut self.shared).expect("set before the server runs").log_addresses = on;
        self
    }

    pub fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.endpoint.local_addr()?)
    }

    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// "Host a server here" in the desktop client: a relay with the default settings on
    /// every interface at `port`, its certificate kept in `dir` so that the pins of the
    /// people invited hold across restarts. Returns the invite link for this machine
    /// (127.0.0.1) and the task serving until aborted.
    pub fn host_here(port: u16, dir: &std::path::Path) -> anyhow::Result<(String, tokio::task::JoinHandle<()>)> {
        let mut config = crate::config::ServerConfig::default();
        let (identity, _) = Identity::load_or_create(dir)?;
        let relay = Relay::new(crate::relay::RelayConfig::from_server_config(&mut config), rand::random());
        let listen = SocketAddr::from(([0, 0, 0, 0], port));
        let server = Server::bind(listen, identity, relay, &config.limits)?;
        let link = crate::protocol::ServerLink {
            host: "127.0.0.1".into(),
            port: server.local_addr()?.port(),
            fingerprint: Some(server.fingerprint),
            channel: None,
            invite: None,
        };
        let invite = link.invite_base(&server.fingerprint);
        Ok((invite, tokio::spawn(server.run(std::future::pending()))))
    }

    /// Serves until `shutdown` completes, then closes every connection.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let timer = tokio::spawn(run_timers(self.shared.clone()));
        let flushes = tokio::spawn(run_flushes(self.shared.clone()));
        let accept = async {
            while let Some(incoming) = self.endpoint.accept().await {
                // Under load, a source proves it receives at its address before it gets a
                // slot: Retry is stateless, so spoofed Initials hold nothing.
                let pending = self.shared.lock_handshakes().slots.len();
                if pending >= self.retry_above as usize && !incoming.remote_address_validated() && incoming.may_retry()
                {
                    let remote = self.shared.logged(incoming.remote_address());
                    match incoming.retry() {
                        Ok(()) => {
                            self.shared.counts.retries_sent.fetch_add(1, Ordering::Relaxed);
                            debug!(%remote, pending, "address validation: retry sent");
                        }
                        Err(e) => e.into_incoming().ignore(),
                    }
                    continue;
                }
                let mut handshakes = self.shared.lock_handshakes();
                let source = Source::of(incoming.remote_address().ip());
                let now = Instant::now();
                let (id, abandon) = match handshakes.slots.admit(now, source) {
                    Admission::Admitted { id, abandon } => (id, abandon),
                    Admission::Refused => {
                        drop(handshakes);
                        let remote = self.shared.logged(incoming.remote_address());
                        self.shared.counts.handshakes_refused.fetch_add(1, Ordering::Relaxed);
                        debug!(%remote, "refusing: too many handshakes from this source, or too fast");
                        incoming.refuse();
                        continue;
                    }
                };
                let started_lately = handshakes.slots.started_lately(now, source);
                if let Some(task) = abandon.and_then(|old| handshakes.tasks.remove(&old)) {
                    // Dropping its handshake closes that connection.
                    task.abort();
                    self.shared.counts.handshakes_abandoned.fetch_add(1, Ordering::Relaxed);
                }
                let shared = self.shared.clone();
                // The task cannot end its handshake before this lock is let go, so its
                // abort handle is in place before it removes it.
                let task = tokio::spawn(async move {
                    let remote = shared.logged(incoming.remote_address());
                    let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, async { incoming.accept()?.await }).await;
                    {
                        let mut handshakes = shared.lock_handshakes();
                        handshakes.slots.finish(id);
                        handshakes.tasks.remove(&id);
                    }
                    let connection = match handshake {
                        Ok(Ok(connection)) => connection,
                        Ok(Err(e)) => {
                            shared.counts.handshakes_failed.fetch_add(1, Ordering::Relaxed);
                            return debug!(%remote, error = %e, "handshake failed");
                        }
                        Err(_) => {
                            shared.counts.handshakes_failed.fetch_add(1, Ordering::Relaxed);
                            return debug!(%remote, "handshake timed out");
                        }
                    };
                    shared.serve_connection(connection, started_lately).await;
                });
                handshakes.tasks.insert(id, task.abort_handle());
            }
        };
        tokio::select! {
            () = accept => {}
            () = shutdown => info!("shutting down"),
        }
        timer.abort();
        flushes.abort();
        log_stats(&self.shared.lock().relay);
        self.endpoint.close(VarInt::from_u32(CLOSE_NORMAL), b"server shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
    }
}

/// The shell's own counts (see [`ShellCounts`]).
#[derive(Default)]
struct ShellCounters {
    handshakes_refused: std::sync::atomic::AtomicU64,
    handshakes_abandoned: std::sync::atomic::AtomicU64,
    retries_sent: std::sync::atomic::AtomicU64,
    handshakes_failed: std::sync::atomic::AtomicU64,
    slow_clients_disconnected: std::sync::atomic::AtomicU64,
    media_dropped_stale: std::sync::atomic::AtomicU64,
    media_dropped_overflow: std::sync::atomic::AtomicU64,
}

impl ShellCounters {
    fn read(&self) -> ShellCounts {
        let read = |n: &std::sync::atomic::AtomicU64| n.load(Ordering::Relaxed);
        ShellCounts {
            handshakes_refused: read(&self.handshakes_refused),
            handshakes_abandoned: read(&self.handshakes_abandoned),
            retries_sent: read(&self.retries_sent),
            handshakes_failed: read(&self.handshakes_failed),
            slow_clients_disconnected: read(&self.slow_clients_disconnected),
            media_dropped_stale: read(&self.media_dropped_stale),
            media_dropped_overflow: read(&self.media_dropped_overflow),
        }
    }

    fn add_media_drops(&self, drops: LegDrops) {
        if drops != LegDrops::default() {
            self.media_dropped_stale.fetch_add(drops.stale, Ordering::Relaxed);
            self.media_dropped_overflow.fetch_add(drops.overflow, Ordering::Relaxed);
        }
    }
}

/// A request to the metrics endpoint: its head, read within this long and this size.
const METRICS_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
const METRICS_REQUEST_BYTES: usize = 1024;

/// Serves `GET /metrics` on `listener`, one request at a time (it is on loopback, for
/// the operator's monitoring; a slow or odd request is answered or dropped, never queued).
async fn serve_metrics(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    while let Ok((mut stream, _)) = listener.accept().await {
        let mut head = Vec::with_capacity(METRICS_REQUEST_BYTES);
        let read = tokio::time::timeout(METRICS_REQUEST_TIMEOUT, async {
            let mut buf = [0u8; 256];
            while head.len() < METRICS_REQUEST_BYTES && !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = stream.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                head.extend_from_slice(&buf[..n.min(METRICS_REQUEST_BYTES - head.len())]);
            }
            Ok::<_, std::io::Error>(())
        })
        .await;
        if !matches!(read, Ok(Ok(()))) {
            continue;
        }
        let response = if head.starts_with(b"GET /metrics ") || head.starts_with(b"GET /metrics\r") {
            let body = crate::relay::metrics::render(&shared.lock().relay, &shared.counts.read());
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
        } else {
            "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_owned()
        };
        let _ = tokio::time::timeout(METRICS_REQUEST_TIMEOUT, stream.write_all(response.as_bytes())).await;
    }
}

/// Argon2 checks at once (each takes 64 MiB and a few hundred milliseconds), and how many
/// more may wait for a turn.
const PASSWORD_WORKERS: usize = 2;
const PASSWORD_QUEUE: usize = 16;

/// At most `workers` holders at once and `queue` waiting for a turn; others are turned
/// away at once.
struct PasswordGate {
    permits: Arc<Semaphore>,
    /// Holders and waiters together.
    admitted: Arc<std::sync::atomic::AtomicUsize>,
    limit: usize,
}

/// A place in the gate: a permit once it comes, and the place back when dropped.
struct Admitted(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

impl PasswordGate {
    fn new(workers: usize, queue: usize) -> PasswordGate {
        PasswordGate {
            permits: Arc::new(Semaphore::new(workers)),
            admitted: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            limit: workers + queue,
        }
    }

    /// A turn, to await; `None` when the gate and its queue are full.
    fn enter(&self) -> Option<impl Future<Output = Result<(tokio::sync::OwnedSemaphorePermit, Admitted), ()>> + use<>> {
        use std::sync::atomic::Ordering;
        let taken =
            self.admitted.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < self.limit).then_some(n + 1));
        taken.ok()?;
        let (permits, place) = (self.permits.clone(), Admitted(self.admitted.clone()));
        Some(async move { permits.acquire_owned().await.map(|permit| (permit, place)).map_err(|_| ()) })
    }
}

/// A client's address as log lines show it: only when the operator asked for addresses.
struct LoggedAddress(Option<SocketAddr>);

impl std::fmt::Display for LoggedAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(addr) => write!(f, "{addr}"),
            None => f.write_str("hidden"),
        }
    }
}

impl Shared {
    fn logged(&self, addr: SocketAddr) -> LoggedAddress {
        LoggedAddress(self.log_addresses.then_some(addr))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("relay lock is never poisoned: relay calls do not panic")
    }

    fn lock_handshakes(&self) -> MutexGuard<'_, Handshakes> {
        self.handshakes.lock().expect("handshake lock is never poisoned: nothing panics holding it")
    }

    async fn serve_connection(self: Arc<Self>, connection: quinn::Connection, started_lately: u32) {
        let (tx, rx) = mpsc::channel(CONTROL_QUEUE);
        let queued = Arc::new(AtomicUsize::new(0));
        let leg = Arc::new(Leg::new(connection.clone(), self.coalesce));
        let id = {
            let mut state = self.lock();
            let id = ConnId(state.next_conn);
            state.next_conn += 1;
            let handle =
                ConnHandle { connection: connection.clone(), control: tx, queued: queued.clone(), leg: leg.clone() };
            state.conns.insert(id, handle);
            let source = Source::of(connection.remote_address().ip());
            self.input(&mut state, id, Input::Connected { source, started_lately });
            id
        };
        let span = info_span!("conn", id = id.0, remote = %self.logged(connection.remote_address()));
        async {
            debug!("connected");
            if let Some((send, recv, rx)) = wait_for_control_stream(&connection, rx, &queued).await {
                let datagrams = tokio::spawn(self.clone().forward_datagrams(id, connection.clone()));
                tokio::spawn(write_control(send, rx, connection.clone(), queued.clone()));
                self.read_control(id, recv).await;
                datagrams.abort();
            }
            let mut state = self.lock();
            state.conns.remove(&id);
            self.input(&mut state, id, Input::Disconnected);
            drop(state);
            // Who ended it and how (timed out, closed by either side and with which code,
            // reset): what a lost connection in a soak or a user's report comes down to.
            match connection.close_reason() {
                Some(reason) => debug!(%reason, "disconnected"),
                None => debug!("disconnected"),
            }
        }
        .instrument(span)
        .await;
    }

    async fn read_control(self: &Arc<Self>, id: ConnId, mut recv: quinn::RecvStream) {
        loop {
            let input = match read_frame::<ClientMsg>(&mut recv).await {
                Ok(Some(msg)) => Input::Control(msg),
                Ok(None) => return,
                Err(ReadFrameError::Frame(e)) => {
                    let code = match e {
                        FrameError::TooLarge { .. } => ErrorCode::FrameTooLarge,
                        FrameError::Malformed(_) | FrameError::TrailingBytes(_) => ErrorCode::MalformedFrame,
                    };
                    warn!(error = %e, "bad control frame");
                    let mut state = self.lock();
                    self.input(&mut state, id, Input::BadFrame { code, detail: e.to_string() });
                    return;
                }
                Err(e) => return debug!(error = %e, "control stream ended"),
            };
            let mut state = self.lock();
            self.input(&mut state, id, input);
        }
    }

    /// Routes `id`'s datagrams with its own copy of its route, taking the relay's lock
    /// only when the routes changed (see [`crate::relay::route`]).
    async fn forward_datagrams(self: Arc<Self>, id: ConnId, connection: quinn::Connection) {
        let mut path = MediaPath::new(&self.lock().relay, Instant::now());
        while let Ok(datagram) = connection.read_datagram().await {
            let now = Instant::now();
            if !path.is_current(self.routes_version.load(Ordering::Acquire)) {
                let state = self.lock();
                path.refresh(&state.relay, id, |c| state.conns.get(&c).map(|h| h.leg.clone()));
            }
            match path.route(now, &datagram) {
                Ok(legs) => {
                    for leg in legs {
                        leg.forward(now, id, Bytes::clone(&datagram), &self);
                    }
                }
                Err(reason) => debug!(%reason, "datagram dropped"),
            }
        }
    }

    /// Feeds the relay one input and carries out everything it asks for.
    fn input(self: &Arc<Self>, state: &mut State, id: ConnId, input: Input) {
        if let Err(e) = state.relay.handle_input(Instant::now(), id, input) {
            warn!(error = %e, "relay input refused");
        }
        self.carry_out(state);
        self.timer.notify_one();
    }

    /// Carries out what the relay asks for, and tells the datagram paths whether its
    /// routes changed.
    fn carry_out(self: &Arc<Self>, state: &mut State) {
        while let Some(output) = state.relay.poll_output() {
            match output {
                Output::Send { to, msg } => {
                    if let Some(frame) = encode(&msg) {
                        send_control(state, &self.counts, to, frame);
                    }
                }
                Output::Broadcast { to, msg } => {
                    if let Some(frame) = encode(&msg) {
                        for conn in to {
                            send_control(state, &self.counts, conn, Bytes::clone(&frame));
                        }
                    }
                }
                Output::Close { conn, code } => {
                    if let Some(handle) = state.conns.get(&conn) {
                        // A full queue means the writer is stuck; close without the courtesy.
                        if handle.control.try_send(Outgoing::Close(code)).is_err() {
                            handle.connection.close(VarInt::from_u32(CLOSE_ERROR), code.as_str().as_bytes());
                        }
                    }
                }
                Output::VerifyPassword { conn, password, hash } => {
                    self.off_thread(state, conn, move || Input::PasswordChecked {
                        matched: password::verify(&password, &hash),
                    });
                }
                Output::HashPassword { conn, password } => {
                    self.off_thread(state, conn, move || Input::PasswordHashed {
                        hash: password::hash_with_random_salt(&password),
                    });
                }
            }
        }
        self.routes_version.store(state.relay.routes_version(), Ordering::Release);
    }

    /// Runs slow password work on the blocking pool, then feeds its answer back: at most
    /// [`PASSWORD_WORKERS`] at once, with at most [`PASSWORD_QUEUE`] waiting; beyond that
    /// the request is refused at once (a flood of guesses cannot take the machine).
    /// `state` is the locked state of the caller, which carries out what the refusal asks.
    fn off_thread(self: &Arc<Self>, state: &mut State, conn: ConnId, work: impl FnOnce() -> Input + Send + 'static) {
        let Some(ticket) = self.passwords.enter() else {
            if let Err(e) = state.relay.handle_input(Instant::now(), conn, Input::PasswordBusy) {
                warn!(error = %e, "relay input refused");
            }
            return;
        };
        let shared = self.clone();
        tokio::spawn(async move {
            let Ok(_permit) = ticket.await else { return };
            let Ok(input) = tokio::task::spawn_blocking(work).await else { return };
            let mut state = shared.lock();
            shared.input(&mut state, conn, input);
        });
    }
}

fn encode(msg: &ServerMsg) -> Option<Bytes> {
    match encode_frame(msg) {
        Ok(frame) => Some(frame.into()),
        Err(e) => {
            warn!(error = %e, "cannot encode a server message");
            None
        }
    }
}

fn send_control(state: &State, counts: &ShellCounters, to: ConnId, frame: Bytes) {
    let Some(handle) = state.conns.get(&to) else { return };
    // Bounded in bytes as well as frames: a client that does not read is let go before
    // it pins more than `max_queued`, and nobody else waits for it.
    let len = frame.len();
    let queued = handle.queued.fetch_add(len, Ordering::AcqRel) + len;
    let sent = if queued > state.max_queued {
        Err(mpsc::error::TrySendError::Full(Outgoing::Frame(frame)))
    } else {
        handle.control.try_send(Outgoing::Frame(frame))
    };
    match sent {
        Ok(()) => {}
        Err(mpsc::error::TrySendError::Full(_)) => {
            handle.queued.fetch_sub(len, Ordering::AcqRel);
            warn!(conn = to.0, queued, "control queue full; disconnecting a client that does not read");
            counts.slow_clients_disconnected.fetch_add(1, Ordering::Relaxed);
            handle.connection.close(VarInt::from_u32(CLOSE_ERROR), ErrorCode::TooSlow.as_str().as_bytes());
        }
        // The writer has stopped: the connection is ending and its reader will report it.
        Err(mpsc::error::TrySendError::Closed(_)) => {}
    }
}

/// Waits for the client to open its control stream and hands back the queue to write
/// on it. A close the relay asks for before that (busy server, no hello in time) is
/// carried out here.
async fn wait_for_control_stream(
    connection: &quinn::Connection,
    mut rx: mpsc::Receiver<Outgoing>,
    queued: &AtomicUsize,
) -> Option<(quinn::SendStream, quinn::RecvStream, mpsc::Receiver<Outgoing>)> {
    loop {
        tokio::select! {
            stream = connection.accept_bi() => {
                let (send, recv) = stream.ok()?;
                return Some((send, recv, rx));
            }
            outgoing = rx.recv() => match outgoing {
                // Without a stream the error message cannot be read; the close reason names it.
                Some(Outgoing::Frame(frame)) => {
                    queued.fetch_sub(frame.len(), Ordering::AcqRel);
                }
                Some(Outgoing::Close(code)) => {
                    // A close before the client has confirmed the handshake goes without its
                    // reason: wait (briefly) for its control stream, which it opens once it
                    // has, so that it learns why (banned, too many from its address, busy).
                    let _ = tokio::time::timeout(CLOSE_GRACE, connection.accept_bi()).await;
                    connection.close(VarInt::from_u32(CLOSE_ERROR), code.as_str().as_bytes());
                    return None;
                }
                None => return None,
            }
        }
    }
}

/// Writes queued control frames; on a close, finishes the stream, gives the client a
/// moment to read the last error, then closes the connection with the error's name.
async fn write_control(
    mut send: quinn::SendStream,
    mut rx: mpsc::Receiver<Outgoing>,
    connection: quinn::Connection,
    queued: Arc<AtomicUsize>,
) {
    while let Some(outgoing) = rx.recv().await {
        match outgoing {
            Outgoing::Frame(frame) => {
                let written = send.write_all(&frame).await;
                queued.fetch_sub(frame.len(), Ordering::AcqRel);
                if written.is_err() {
                    return;
                }
            }
            Outgoing::Close(code) => {
                let _ = send.finish();
                let _ = tokio::time::timeout(CLOSE_GRACE, send.stopped()).await;
                connection.close(VarInt::from_u32(CLOSE_ERROR), code.as_str().as_bytes());
                return;
            }
        }
    }
}

fn log_stats(relay: &Relay) {
    let stats = relay.stats();
    info!(
        users = relay.user_count(),
        datagrams_in = stats.datagrams_in,
        forwarded = stats.datagrams_forwarded,
        bytes_forwarded = stats.bytes_forwarded,
        dropped_over_rate = stats.dropped_rate_limited,
        dropped_invalid = stats.dropped_invalid,
        "relay totals"
    );
}

/// How often the relay's totals are logged.
const STATS_INTERVAL: Duration = Duration::from_secs(300);

/// Runs the relay's timeouts (hello deadlines, empty channels, invites) when they fall
/// due, and logs its totals now and then.
async fn run_timers(shared: Arc<Shared>) {
    let mut stats = tokio::time::interval(STATS_INTERVAL);
    stats.tick().await;
    loop {
        let deadline = shared.lock().relay.poll_timeout();
        let due = async {
            match deadline {
                Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = due => {}
            () = shared.timer.notified() => continue,
            _ = stats.tick() => {
                log_stats(&shared.lock().relay);
                continue;
            }
        }
        let mut state = shared.lock();
        state.relay.handle_timeout(Instant::now());
        shared.carry_out(&mut state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Polls a future once without waiting.
    fn poll_once<F: Future + Unpin>(future: &mut F) -> Option<F::Output> {
        let mut context = std::task::Context::from_waker(std::task::Waker::noop());
        match std::pin::Pin::new(future).poll(&mut context) {
            std::task::Poll::Ready(output) => Some(output),
            std::task::Poll::Pending => None,
        }
    }

    #[tokio::test]
    async fn password_work_is_bounded_and_the_rest_turned_away_at_once() {
        let gate = PasswordGate::new(2, 3);
        let turns: Vec<_> = (0..5).map(|_| gate.enter().expect("two working, three waiting")).collect();
        assert!(gate.enter().is_none(), "the sixth is turned away");
        let mut turns = turns.into_iter().map(Box::pin);
        let first = turns.next().unwrap().await.unwrap();
        let _second = turns.next().unwrap().await.unwrap();
        let mut third = turns.next().unwrap();
        assert!(poll_once(&mut third).is_none(), "the third waits for a permit");
        drop(first);
        assert!(third.await.is_ok(), "and gets the first's");
        drop(turns);
        assert!(gate.enter().is_some(), "places in the queue came free");
    }
}
