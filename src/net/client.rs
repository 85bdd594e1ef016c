//! The client's IO shell: connect with a pinned certificate, then drive a [`Session`]
//! from the control stream, datagrams and typed commands.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;
use tracing::debug;
use zeroize::Zeroizing;

use super::framing::{ReadFrameError, read_frame};
use super::screen::ScreenShell;
use super::server::{CLOSE_ERROR, CLOSE_NORMAL};
use super::tls::{PinPolicy, PinningVerifier, client_tls};
use crate::audio::cues::CueSettings;
use crate::audio::engine::{Control, Engine, EngineConfig, EngineError, EngineEvent, SHARE_AUDIO_SENDER, Source};
use crate::audio::jitter::InterarrivalJitter;
use crate::audio::pipeline::CaptureSettings;
use crate::config::client_store::{ClientStore, StoreError};
use crate::crypto::vault::KdfParams;
use crate::e2ee::E2ee;
use crate::protocol::{
    ErrorCode, Fingerprint, FrameError, JoinRequest, ServerLink, ServerMsg, SessionId, StreamType, canonical_name,
    encode_frame,
};
use crate::session::{Chat, Command, Event, Session, parse_line};

/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one handshake may take before a new one replaces it (see [`connect_from`]).
const HANDSHAKE_ATTEMPT: Duration = Duration::from_secs(20);
/// How often a finished handshake is looked at for the server's confirmation (see
/// [`confirmed`]): a few milliseconds added to a connection at most.
const CONFIRM_POLL: Duration = Duration::from_millis(5);

/// Bytes of payload in a `/probe` datagram: about one 20 ms Opus voice frame.
pub const PROBE_PAYLOAD: usize = 160;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot resolve {server}: {reason}")]
    Resolve { server: String, reason: String },
    #[error(
        "{server} presents certificate {seen}, which is not pinned. Check it with the server's operator, then pass \
         --fingerprint {seen} (or --trust-on-first-use to accept it unchecked)"
    )]
    UnknownCertificate { server: String, seen: Fingerprint },
    #[error(
        "the certificate of {server} has CHANGED: pinned {expected}, presented {actual}. This can be an attack; if the \
         operator really changed it, connect with --fingerprint {actual}"
    )]
    CertificateChanged { server: String, expected: Fingerprint, actual: Fingerprint },
    #[error("cannot connect to {server}: {reason}")]
    Connect { server: String, reason: String },
    #[error("the server refused: {code}: {message}")]
    Refused { code: String, message: String },
    #[error("connection lost: {0}")]
    Lost(String),
    #[error("the server broke the protocol: {0}")]
    Protocol(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("no vault password: set VOIPC_VAULT_PASSWORD or pass --vault-password-file FILE")]
    NoVaultPassword,
    #[error("voice: {0}")]
    Voice(#[from] EngineError),
    #[error("{0}")]
    Setup(String),
}

impl ClientError {
    /// The stable `code` of the JSON error event.
    pub fn code(&self) -> &str {
        match self {
            ClientError::Resolve { .. } => "resolve_failed",
            ClientError::UnknownCertificate { .. } => "unknown_certificate",
            ClientError::CertificateChanged { .. } => "certificate_changed",
            ClientError::Connect { .. } => "connect_failed",
            ClientError::Refused { code, .. } => code,
            ClientError::Lost(_) => "connection_lost",
            ClientError::Protocol(_) => "protocol_error",
            ClientError::Store(e) => e.code(),
            ClientError::NoVaultPassword => "vault_password_missing",
            ClientError::Voice(_) => "voice",
            ClientError::Setup(_) => "setup",
        }
    }
}

/// How `voipc join` was asked to connect.
#[derive(Debug, Clone)]
pub struct JoinOptions {
    /// Where, with the fingerprint the link carried (if any): it pins a server this
    /// device has not pinned yet, and never replaces a pin.
    pub link: ServerLink,
    /// A fingerprint given explicitly (`--fingerprint`, or the desktop app's "replace the
    /// pinned certificate" step): the only thing that replaces a stored pin.
    pub replace_pin: Option<Fingerprint>,
    /// The local address to connect from (`--bind`), on a machine with several.
    pub bind: Option<SocketAddr>,
    pub name: String,
    pub join: Option<JoinRequest>,
    pub trust_on_first_use: bool,
    pub data_dir: PathBuf,
    /// Unlocks (or, on first use, creates) the vault in `data_dir`.
    pub vault_password: Zeroizing<String>,
    /// One channel message to send once in a channel.
    pub say: Option<String>,
    pub voice: VoiceOptions,
    pub screen: super::screen::ScreenOptions,
    /// End the session after this long (stdin's end then no longer ends it).
    pub duration: Option<Duration>,
    /// Report the connection's health every second and the microphone's level (`health`
    /// and `input_level` events), for the desktop app.
    pub health: bool,
    pub json: bool,
}

/// Where a headless client's voice comes from and goes.
#[derive(Debug, Clone, Default)]
pub struct VoiceOptions {
    /// A WAV file to send as voice once in a channel (`--play`), already read.
    pub play: Option<std::sync::Arc<Vec<f32>>>,
    /// A capture device (`Some(None)`: the default one) when nothing is played.
    pub input_device: Option<Option<String>>,
    pub output_device: Option<Option<String>>,
    pub record: Option<PathBuf>,
    pub capture: CaptureSettings,
    /// Start muted or deafened: the user's choice, kept across reconnects by the app.
    pub muted: bool,
    pub deafened: bool,
    /// The app's sounds to play (none by default).
    pub cues: CueSettings,
}

/// A connected client: the QUIC connection and the fingerprint it pinned.
pub struct Connected {
    pub endpoint: quinn::Endpoint,
    pub connection: quinn::Connection,
    pub fingerprint: Fingerprint,
}

/// Connects under a pin policy; a refused certificate becomes a clear error.
pub async fn connect(link: &ServerLink, policy: PinPolicy) -> Result<Connected, ClientError> {
    connect_from(link, policy, None).await
}

/// The wait before a handshake the server dropped is started again.
const HANDSHAKE_AGAIN_AFTER: Duration = Duration::from_millis(200);

/// [`connect`] from a local address of our choosing (`None`: any).
pub async fn connect_from(
    link: &ServerLink,
    policy: PinPolicy,
    local: Option<SocketAddr>,
) -> Result<Connected, ClientError> {
    let server = link.authority();
    let addr = resolve(&server).await?;
    let verifier = PinningVerifier::new(policy);
    let tls = client_tls(verifier.clone()).map_err(|e| ClientError::Setup(e.to_string()))?;
    let crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| ClientError::Setup(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config
        .transport_config(Arc::new(super::transport_config(super::CLIENT_DATAGRAM_BUFFER, super::CLIENT_INITIAL_RTT)));
    let wildcard = if addr.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" };
    let bind: SocketAddr = local.unwrap_or_else(|| wildcard.parse().expect("valid wildcard"));
    let endpoint =
        quinn::Endpoint::client(bind).map_err(|e| ClientError::Setup(format!("cannot open a UDP socket: {e}")))?;
    let connect_error = |reason: String| ClientError::Connect { server: server.clone(), reason };
    // Each lost flight doubles the wait before a handshake tries again: on a very lossy
    // link one still under way after HANDSHAKE_ATTEMPT is deep in its back-off (or about
    // to meet quinn's 30 s idle timeout), and a fresh one, which starts again from a short
    // wait, gets through sooner. So it is given up for a new one, until CONNECT_TIMEOUT.
    // A handshake is through when the server confirms it (see `confirmed`).
    let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
    let result = loop {
        let connecting =
            endpoint.connect_with(config.clone(), addr, "voipc").map_err(|e| connect_error(e.to_string()))?;
        let attempt_end = deadline.min(tokio::time::Instant::now() + HANDSHAKE_ATTEMPT);
        let attempt = async {
            let connection = connecting.await?;
            confirmed(&connection).await?;
            Ok::<_, quinn::ConnectionError>(connection)
        };
        match tokio::time::timeout_at(attempt_end, attempt).await {
            // A reset: the server has forgotten a handshake we took as finished.
            Ok(Err(quinn::ConnectionError::TimedOut | quinn::ConnectionError::Reset)) | Err(_)
                if tokio::time::Instant::now() < deadline =>
            {
                debug!(server = %server, "no handshake yet; starting a new one");
            }
            // A server whose handshake table is full (a flood) gives up the handshake under
            // way longest for a newer one: ours, on a slow link. Start again, after a
            // moment so as not to join the flood.
            Ok(Err(quinn::ConnectionError::ConnectionClosed(close)))
                if close.error_code == quinn::TransportErrorCode::APPLICATION_ERROR
                    && tokio::time::Instant::now() < deadline =>
            {
                debug!(server = %server, "the server dropped our handshake; starting a new one");
                tokio::time::sleep(HANDSHAKE_AGAIN_AFTER).await;
            }
            result => break result,
        }
    };
    let connection = match result {
        Ok(Ok(connection)) => connection,
        Ok(Err(e)) => {
            return Err(match (policy, verifier.seen()) {
                (PinPolicy::Pinned(expected), Some(actual)) if expected != actual => {
                    ClientError::CertificateChanged { server, expected, actual }
                }
                (PinPolicy::RefuseUnknown, Some(seen)) => ClientError::UnknownCertificate { server, seen },
                _ => connection_error(e),
            });
        }
        Err(_) => return Err(connect_error(format!("no answer within {} s", CONNECT_TIMEOUT.as_secs()))),
    };
    let fingerprint = verifier.seen().expect("a finished handshake has verified a certificate");
    Ok(Connected { endpoint, connection, fingerprint })
}

/// Waits for the server to confirm the handshake (its HANDSHAKE_DONE frame), or for the
/// connection's end. Until then a client may hold a handshake as finished that the server
/// never finished: at 30 % loss each way a traced run had the server's side of one waiting
/// at the anti-amplification limit while the client held it as finished, until both met
/// the idle timeout. quinn tells of the confirmation only in its statistics.
async fn confirmed(connection: &quinn::Connection) -> Result<(), quinn::ConnectionError> {
    let mut poll = tokio::time::interval(CONFIRM_POLL);
    while connection.stats().frame_rx.handshake_done == 0 {
        tokio::select! {
            _ = poll.tick() => {}
            lost = connection.closed() => return Err(lost),
        }
    }
    Ok(())
}

/// The first address `server` (host:port) resolves to.
pub async fn resolve(server: &str) -> Result<SocketAddr, ClientError> {
    let resolve_error = |reason: String| ClientError::Resolve { server: server.to_owned(), reason };
    tokio::net::lookup_host(server)
        .await
        .map_err(|e| resolve_error(e.to_string()))?
        .next()
        .ok_or_else(|| resolve_error("no address".into()))
}

/// A lost or closed connection, with the server's reason when it gave one.
fn connection_error(error: quinn::ConnectionError) -> ClientError {
    match error {
        quinn::ConnectionError::ApplicationClosed(close)
            if close.error_code == quinn::VarInt::from_u32(CLOSE_ERROR) =>
        {
            let code = String::from_utf8_lossy(&close.reason).into_owned();
            ClientError::Refused { message: format!("the server closed the connection ({code})"), code }
        }
        quinn::ConnectionError::ApplicationClosed(close)
            if close.error_code == quinn::VarInt::from_u32(CLOSE_NORMAL) =>
        {
            ClientError::Lost(format!("the server ended the session: {}", String::from_utf8_lossy(&close.reason)))
        }
        other => ClientError::Lost(other.to_string()),
    }
}

/// Opens the vault (Argon2's 64 MiB and a few hundred milliseconds, off the runtime) and
/// makes ready our end-to-end identity (a new one, or the stored one with a fresh signed
/// pre-key when due): all the slow work done before connecting, so that the hello goes as
/// soon as the connection is up (a busy server lets the longest-silent connection go).
async fn open_store(options: &JoinOptions) -> Result<(ClientStore, E2ee), ClientError> {
    let (data_dir, password) = (options.data_dir.clone(), options.vault_password.clone());
    tokio::task::spawn_blocking(move || {
        let store = ClientStore::open_or_create(&data_dir, password.as_bytes(), KdfParams::RECOMMENDED)?;
        let setup = |e: crate::e2ee::E2eeError| ClientError::Setup(e.to_string());
        let mut e2ee = match store.e2ee_state() {
            Some((state, format)) => E2ee::from_stored(state, format).map_err(setup)?,
            None => E2ee::generate(&mut rand::rng(), SystemTime::now()).map_err(setup)?,
        };
        e2ee.rotate_signed_pre_key_if_due(&mut rand::rng(), SystemTime::now()).map_err(setup)?;
        Ok((store, e2ee))
    })
    .await
    .map_err(|e| ClientError::Setup(format!("vault task failed: {e}")))?
}

/// Connects with the pin that the options and the vault call for, and pins the server
/// afterwards when that was asked for.
async fn connect_pinned(options: &JoinOptions, known: &mut ClientStore) -> Result<Connected, ClientError> {
    let server = options.link.authority();
    let policy = pin_policy(&server, options, known.pinned(&server))?;
    let connected = connect_from(&options.link, policy, options.bind).await?;
    if known.pinned(&server) != Some(connected.fingerprint) {
        known.pin(&server, connected.fingerprint)?;
    }
    Ok(connected)
}

/// How to check the server's certificate: an explicit fingerprint first; then the stored
/// pin, which a link's different fingerprint does not replace (a crafted invite for a
/// server the user trusts stops as a changed certificate would); then the link's; then
/// trust on first use if asked for.
fn pin_policy(server: &str, options: &JoinOptions, stored: Option<Fingerprint>) -> Result<PinPolicy, ClientError> {
    Ok(match (options.replace_pin, stored, options.link.fingerprint) {
        (Some(explicit), _, _) => PinPolicy::Pinned(explicit),
        (None, Some(expected), Some(actual)) if expected != actual => {
            return Err(ClientError::CertificateChanged { server: server.to_owned(), expected, actual });
        }
        (None, Some(pinned), _) | (None, None, Some(pinned)) => PinPolicy::Pinned(pinned),
        (None, None, None) if options.trust_on_first_use => PinPolicy::TrustOnFirstUse,
        (None, None, None) => PinPolicy::RefuseUnknown,
    })
}

/// Writes events as JSON lines or as text, one per line, flushed at once so that a
/// script reading our stdout sees each as it happens.
struct EventPrinter {
    json: bool,
}

impl EventPrinter {
    fn print(&self, event: &Event) {
        let line = if self.json {
            serde_json::to_string(event).expect("events serialise: plain strings and numbers")
        } else {
            event.to_string()
        };
        let mut out = std::io::stdout().lock();
        // A closed stdout (the reader went away) is no reason to drop the session.
        let _ = writeln!(out, "{line}").and_then(|()| out.flush());
    }
}

/// `voipc join`: connect, introduce ourselves, then follow the server and stdin until
/// `/quit` or the end of input.
pub async fn run_headless(options: JoinOptions) -> Result<(), ClientError> {
    let printer = EventPrinter { json: options.json };
    let (commands_tx, commands) = mpsc::channel(64);
    tokio::spawn(read_commands(commands_tx, options.json));
    run_client(options, commands, &mut |event| printer.print(event)).await
}

/// Typed lines from stdin, as commands; a line that does not parse is reported at once.
async fn read_commands(tx: mpsc::Sender<Command>, json: bool) {
    let printer = EventPrinter { json };
    let mut stdin = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = stdin.next_line().await {
        match parse_line(&line) {
            Ok(Some(command)) => {
                if tx.send(command).await.is_err() {
                    return;
                }
            }
            Ok(None) => {}
            Err(e) => printer.print(&Event::local_error("bad_command", e)),
        }
    }
}

/// A client: connect, introduce ourselves, then follow the server and `commands` until
/// `/quit`, the end of `commands`, or `--duration`. Every event goes to `emit`; the
/// headless client prints them, the GUI draws them.
pub async fn run_client(
    options: JoinOptions,
    mut commands: mpsc::Receiver<Command>,
    emit: &mut (dyn FnMut(&Event) + Send),
) -> Result<(), ClientError> {
    let (mut store, mut e2ee) = open_store(&options).await?;
    let Connected { endpoint, connection, fingerprint } = connect_pinned(&options, &mut store).await?;
    // Peers were once named `host:port/Name`; now `fingerprint/name` (see Chat::new).
    let server_id = fingerprint.to_string();
    e2ee.rename_peers(&format!("{}/", options.link.authority()), &format!("{server_id}/"));
    let chat = Chat::new(e2ee, store.history().clone(), rand::random(), options.link.authority(), server_id);
    let mut screen = ScreenShell::new(options.screen.clone(), store.screen_grant().map(str::to_owned));
    let mut vault = VaultWriter::start(store);
    let mut unsaved = false;
    let mut save_timer = tokio::time::interval(SAVE_INTERVAL);
    let (mut send, recv) = connection.open_bi().await.map_err(connection_error)?;
    let invite_base = options.link.invite_base(&fingerprint);
    let mut session =
        Session::new(&options.name, options.join.clone(), invite_base, chat, Instant::now(), SystemTime::now());
    let mut said = options.say.is_none();

    let (frames_tx, mut frames) = mpsc::channel(256);
    tokio::spawn(read_frames(recv, frames_tx));
    let mut commands_open = true;
    let mut fatal: Option<ClientError> = None;
    let voice = &options.voice;
    let (mut engine, mut engine_events) =
        Engine::start(EngineConfig { output_device: voice.output_device.clone(), record: voice.record.clone() })?;
    // The user's mute and deafen hold from the first moment: in the engine before it
    // captures anything, and told to the server right after the hello.
    for (on, control, command) in [
        (voice.muted, Control::Mute(true), Command::Mute(true)),
        (voice.deafened, Control::Deafen(true), Command::Deafen(true)),
    ] {
        if on {
            engine.control(control);
            session.command(Instant::now(), command);
        }
    }
    let mut listening = Listening { cues: options.voice.cues, ..Listening::default() };
    let mut source = match (&voice.play, &voice.input_device) {
        (Some(samples), _) => Some(Source::Samples(samples.to_vec())),
        (None, Some(device)) => Some(Source::Device(device.clone())),
        (None, None) => None,
    };
    let end = options.duration.map(|d| tokio::time::Instant::now() + d);
    let mut health = Health::new(&connection);
    let mut health_timer = tokio::time::interval(Duration::from_secs(1));

    let result = loop {
        if !said && session.channel().is_some() {
            said = true;
            let text = options.say.clone().expect("said is false only with a message to say");
            session.command(Instant::now(), Command::Say(text));
        }
        // A microphone opens at once (the microphone test works outside channels); a
        // file plays from the start once there is a channel to hear it.
        if let Some(source) = source.take_if(|s| matches!(s, Source::Device(_)) || session.channel().is_some()) {
            engine.start_capture(source, voice.capture)?;
        }
        screen.start_when_ready(&mut session, &connection);
        screen.poll_session(&mut session);
        while let Some(frame) = session.poll_media() {
            let now = Instant::now();
            match frame.stream {
                StreamType::Voice => {
                    health.voice(frame.sender.0, now, frame.timestamp);
                    engine.play(now, frame.sender.0, frame.sequence, frame.timestamp, frame.payload);
                }
                StreamType::ScreenAudio => {
                    if let Err(e) = screen.desktop_audio(now, frame.sequence, &frame.payload) {
                        emit(&Event::local_error("record", format!("cannot record the desktop audio: {e}")));
                    }
                    // The voice decoder mixes the stereo packets down; the jitter buffer
                    // counts in 48 kHz samples, the share's clock in 90 kHz ticks.
                    let timestamp = (u64::from(frame.timestamp) * 48 / 90) as u32;
                    engine.play(now, SHARE_AUDIO_SENDER, frame.sequence, timestamp, frame.payload);
                }
                StreamType::Screen | StreamType::Probe => {}
            }
        }
        if let Err(e) = flush(&mut session, &mut send, emit, &mut engine, &listening, &mut screen).await {
            last_words(&mut frames, &mut session, &mut fatal).await;
            break Err(fatal.take().unwrap_or(e));
        }
        unsaved |= session.take_e2ee_changed() | screen.take_grant_unsaved();
        tokio::select! {
            frame = frames.recv() => match frame {
                Some(Ok(msg)) => {
                    if let Err(e) = handle_frame(&mut session, msg, &mut fatal) {
                        break Err(e);
                    }
                }
                Some(Err(e)) => break Err(fatal.take().unwrap_or(ClientError::Protocol(e.to_string()))),
                None => {
                    let lost = connection.closed().await;
                    break Err(fatal.take().unwrap_or_else(|| connection_error(lost)));
                }
            },
            datagram = connection.read_datagram() => match datagram {
                Ok(datagram) => session.handle_datagram(Instant::now(), &datagram),
                Err(e) => {
                    last_words(&mut frames, &mut session, &mut fatal).await;
                    break Err(fatal.take().unwrap_or_else(|| connection_error(e)));
                }
            },
            input = screen.next() => screen.handle(input, &mut session, &connection, emit),
            event = engine_events.recv() => match event {
                Some(event) => voice_event(&mut session, &connection, options.health, event, emit),
                None => break Err(ClientError::Setup("the voice engine stopped".into())),
            },
            () = sleep_until(session.poll_timeout().map(tokio::time::Instant::from_std)) => {
                session.handle_timeout(Instant::now());
            }
            _ = health_timer.tick(), if options.health => emit(&health.sample(&connection)),
            _ = save_timer.tick(), if unsaved => unsaved = !vault.offer(|| Snapshot::of(&session, &screen)),
            Some(e) = vault.errors.recv() => emit(&Event::local_error(e.code(), format!("cannot save the vault: {e}"))),
            () = sleep_until(end), if end.is_some() => break Ok(()),
            // Commands wait until the server has introduced itself, so that even an
            // empty input shows the connection.
            command = commands.recv(), if session.is_ready() && commands_open => match command {
                Some(Command::Quit) => break Ok(()),
                Some(Command::Probe { count }) => send_probes(&mut session, &connection, count, emit),
                Some(Command::Share(request)) => screen.share(request, &mut session, emit),
                Some(command) => voice_command(&mut session, &mut engine, &mut listening, command),
                None if end.is_some() => commands_open = false,
                None => break Ok(()),
            },
        }
    };
    while let Some(event) = session.poll_event() {
        emit(&event);
    }
    if let Err(e) = screen.finish_recording() {
        emit(&Event::local_error("record", format!("cannot record the desktop audio: {e}")));
    }
    if let Some(stats) = screen.stats(&session) {
        emit(&Event::VideoStats { stats: Box::new(stats) });
    }
    match engine.finish() {
        Ok(playback) => {
            emit(&Event::VoiceStats { media: Box::new(session.media_counters()), playback: Box::new(playback) })
        }
        Err(e) => emit(&Event::local_error("voice", e)),
    }
    if result.is_ok() {
        let _ = send.finish();
        connection.close(quinn::VarInt::from_u32(CLOSE_NORMAL), b"bye");
    }
    unsaved |= session.take_e2ee_changed() | screen.take_grant_unsaved();
    let saved = vault.finish(unsaved.then(|| Snapshot::of(&session, &screen))).await;
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    result.and(saved.map_err(ClientError::from))
}

/// How often, at most, the vault is written while a session changes it.
const SAVE_INTERVAL: Duration = Duration::from_secs(2);

/// The session's state to save.
struct Snapshot {
    e2ee: Zeroizing<Vec<u8>>,
    history: crate::session::history::History,
    screen_grant: Option<String>,
}

impl Snapshot {
    fn of(session: &Session, screen: &ScreenShell) -> Snapshot {
        Snapshot {
            e2ee: session.e2ee().to_bytes(),
            history: session.history().clone(),
            screen_grant: screen.screen_grant().map(str::to_owned),
        }
    }
}

/// Writes the vault on the blocking pool, never on the task that moves voice, so a slow
/// disk delays no packet. The shell offers a snapshot at most every [`SAVE_INTERVAL`] and
/// one at the end; an offer made while the last is still being written waits a turn.
struct VaultWriter {
    snapshots: mpsc::Sender<Snapshot>,
    /// Saves that failed (the next snapshot tries again).
    errors: mpsc::Receiver<StoreError>,
    task: tokio::task::JoinHandle<()>,
}

impl VaultWriter {
    fn start(mut store: ClientStore) -> VaultWriter {
        let (snapshots, mut pending) = mpsc::channel::<Snapshot>(1);
        let (failed, errors) = mpsc::channel(4);
        let task = tokio::spawn(async move {
            while let Some(snapshot) = pending.recv().await {
                let saving = tokio::task::spawn_blocking(move || {
                    let Snapshot { e2ee, history, screen_grant } = snapshot;
                    let format = crate::e2ee::STATE_FORMAT;
                    let result = store.save_session(e2ee, format, &history, screen_grant.as_deref());
                    (store, result)
                });
                let Ok((back, result)) = saving.await else { return };
                store = back;
                if let Err(e) = result {
                    let _ = failed.try_send(e);
                }
            }
        });
        VaultWriter { snapshots, errors, task }
    }

    /// Hands a snapshot over unless a save is still queued (then it is not even taken):
    /// whether it was. Never waits.
    fn offer(&self, snapshot: impl FnOnce() -> Snapshot) -> bool {
        match self.snapshots.try_reserve() {
            Ok(permit) => {
                permit.send(snapshot());
                true
            }
            Err(_) => false,
        }
    }

    /// Saves `last` (if given) and waits until every save is done; the first that failed.
    async fn finish(mut self, last: Option<Snapshot>) -> Result<(), StoreError> {
        if let Some(snapshot) = last {
            let _ = self.snapshots.send(snapshot).await;
        }
        drop(self.snapshots);
        let _ = self.task.await;
        self.errors.try_recv().map_or(Ok(()), Err)
    }
}

/// Hands a server message to the session, remembering an error that ends the connection.
fn handle_frame(session: &mut Session, msg: ServerMsg, fatal: &mut Option<ClientError>) -> Result<(), ClientError> {
    if let ServerMsg::Error { code, message } = &msg
        && code.closes_connection(session.me().is_some())
    {
        *fatal = Some(ClientError::Refused { code: code.as_str().to_owned(), message: message.clone() });
    }
    session.handle_message(Instant::now(), msg).map_err(|e| ClientError::Protocol(e.to_string()))
}

/// When the connection ends, the control stream may still hold the server's reason:
/// read what is left of it (briefly) before reporting the end.
async fn last_words(
    frames: &mut mpsc::Receiver<Result<ServerMsg, FrameError>>,
    session: &mut Session,
    fatal: &mut Option<ClientError>,
) {
    while let Ok(Some(Ok(msg))) = tokio::time::timeout(Duration::from_millis(500), frames.recv()).await {
        if handle_frame(session, msg, fatal).is_err() {
            return;
        }
    }
}

/// Sends what the session queued and prints what it has to say; a member who left
/// our channel is forgotten by the playback too.
async fn flush(
    session: &mut Session,
    send: &mut quinn::SendStream,
    emit: &mut (dyn FnMut(&Event) + Send),
    engine: &mut Engine,
    listening: &Listening,
    screen: &mut ScreenShell,
) -> Result<(), ClientError> {
    while let Some(event) = session.poll_event() {
        screen.on_event(session, &event, emit);
        match &event {
            Event::UserLeft { session: sender, .. } => engine.control(Control::Forget(*sender)),
            // The next share watched is another stream: its sound starts afresh.
            Event::Watching { watching: false, .. } => engine.control(Control::Forget(SHARE_AUDIO_SENDER)),
            Event::UserJoined { user, session: sender, .. } => listening.apply(user, SessionId(*sender), engine),
            Event::Joined { users, .. } => {
                for user in users {
                    if let Some(sender) = session.user_session(user) {
                        listening.apply(user, sender, engine);
                    }
                }
            }
            _ => {}
        }
        if let Some(cue) = event.cue().filter(|cue| listening.cues.allows(*cue)) {
            engine.control(Control::Cue(cue));
        }
        emit(&event);
    }
    while let Some(msg) = session.poll_transmit() {
        let frame = encode_frame(&msg).map_err(|e| ClientError::Setup(format!("cannot send: {e}")))?;
        send.write_all(&frame).await.map_err(|e| ClientError::Lost(e.to_string()))?;
    }
    Ok(())
}

/// What the connection did since the last health sample.
struct Health {
    last: quinn::ConnectionStats,
    /// Per sender: interleaved timestamps of several senders say nothing about jitter.
    jitter: std::collections::HashMap<u32, (InterarrivalJitter, bool)>,
}

impl Health {
    fn new(connection: &quinn::Connection) -> Health {
        Health { last: connection.stats(), jitter: std::collections::HashMap::new() }
    }

    /// A voice packet from `sender` arrived.
    fn voice(&mut self, sender: u32, arrival: Instant, timestamp: u32) {
        let (meter, heard) = self.jitter.entry(sender).or_default();
        meter.update(arrival, timestamp);
        *heard = true;
    }

    /// The health over the last interval (the timer's second): the jitter is the worst of
    /// the senders heard in it; the others are forgotten.
    fn sample(&mut self, connection: &quinn::Connection) -> Event {
        let now = connection.stats();
        let last = std::mem::replace(&mut self.last, now);
        let sent = now.path.sent_packets.saturating_sub(last.path.sent_packets);
        let lost = now.path.lost_packets.saturating_sub(last.path.lost_packets);
        let kbits = |bytes: u64| bytes as f32 * 8.0 / 1000.0;
        self.jitter.retain(|_, (_, heard)| std::mem::take(heard));
        let jitter = self.jitter.values().map(|(meter, _)| meter.jitter()).max().unwrap_or_default();
        Event::Health {
            rtt_ms: connection.rtt().as_secs_f32() * 1000.0,
            loss_percent: if sent == 0 { 0.0 } else { lost as f32 * 100.0 / sent as f32 },
            jitter_ms: jitter.as_secs_f32() * 1000.0,
            kbps_up: kbits(now.udp_tx.bytes.saturating_sub(last.udp_tx.bytes)),
            kbps_down: kbits(now.udp_rx.bytes.saturating_sub(last.udp_rx.bytes)),
        }
    }
}

/// Waits until `end`, or forever without one.
pub(super) async fn sleep_until(end: Option<tokio::time::Instant>) {
    match end {
        Some(end) => tokio::time::sleep_until(end).await,
        None => std::future::pending().await,
    }
}

/// Seals and sends what the engine encoded; reports who talks.
/// `meter`: whether to pass the microphone level on (the desktop app's meter).
fn voice_event(
    session: &mut Session,
    connection: &quinn::Connection,
    meter: bool,
    event: EngineEvent,
    emit: &mut (dyn FnMut(&Event) + Send),
) {
    match event {
        EngineEvent::Packet(packet) => {
            let datagram = session.media_datagram(
                Instant::now(),
                StreamType::Voice,
                packet.sequence,
                packet.timestamp,
                &packet.payload,
            );
            if let Some(datagram) = datagram
                && let Err(e) = connection.send_datagram(Bytes::from(datagram))
            {
                emit(&Event::local_error("datagram_failed", e));
            }
        }
        EngineEvent::Talking(on) => {
            if let Some(me) = session.me() {
                emit(&session.speaking(me, on));
            }
        }
        // The share's sound is not somebody speaking.
        EngineEvent::Speaking(change) if change.sender == SHARE_AUDIO_SENDER => {}
        EngineEvent::Speaking(change) => emit(&session.speaking(SessionId(change.sender), change.speaking)),
        EngineEvent::PlayFinished => emit(&Event::PlayFinished),
        EngineEvent::Device(message) => emit(&Event::Device { message }),
        EngineEvent::Level(dbfs) => {
            if meter {
                emit(&Event::InputLevel { dbfs });
            }
        }
    }
}

/// What the listener chose to hear: the volume and local mute per person (by name, in
/// its canonical form), kept whether or not they are online or have spoken and applied
/// to whichever session they have whenever they are in our channel; and the app's sounds.
#[derive(Default)]
struct Listening {
    choices: std::collections::BTreeMap<String, (Option<u32>, Option<bool>)>,
    cues: CueSettings,
}

impl Listening {
    fn set(&mut self, user: &str, percent: Option<u32>, muted: Option<bool>) {
        let choice = self.choices.entry(canonical_name(user)).or_default();
        choice.0 = percent.or(choice.0);
        choice.1 = muted.or(choice.1);
    }

    fn apply(&self, user: &str, sender: SessionId, engine: &mut Engine) {
        let Some(&(percent, muted)) = self.choices.get(&canonical_name(user)) else { return };
        if let Some(percent) = percent {
            engine.control(Control::Volume { sender: sender.0, percent });
        }
        if let Some(muted) = muted {
            engine.control(Control::LocalMute { sender: sender.0, muted });
        }
    }
}

/// Voice commands go to the engine, the rest to the session.
fn voice_command(session: &mut Session, engine: &mut Engine, listening: &mut Listening, command: Command) {
    match command {
        Command::Mute(on) => {
            engine.control(Control::Mute(on));
            session.command(Instant::now(), command);
        }
        Command::Deafen(on) => {
            engine.control(Control::Deafen(on));
            session.command(Instant::now(), command);
        }
        Command::Talk(held) => engine.control(Control::PushToTalk(held)),
        Command::Volume { user, percent } => {
            listening.set(&user, Some(percent), None);
            if let Some(sender) = session.user_session(&user) {
                listening.apply(&user, sender, engine);
            }
        }
        Command::LocalMute { user, muted } => {
            listening.set(&user, None, Some(muted));
            if let Some(sender) = session.user_session(&user) {
                listening.apply(&user, sender, engine);
            }
        }
        Command::VoiceSettings { mode, threshold_dbfs, denoise, echo_cancel } => {
            let threshold_dbfs = f32::from(threshold_dbfs);
            engine.apply_settings(&CaptureSettings {
                mode,
                threshold_dbfs,
                denoise,
                echo_cancel,
                ..CaptureSettings::default()
            });
        }
        Command::Cues(cues) => listening.cues = cues,
        command => session.command(Instant::now(), command),
    }
}

fn send_probes(
    session: &mut Session,
    connection: &quinn::Connection,
    count: u32,
    emit: &mut (dyn FnMut(&Event) + Send),
) {
    for i in 0..count {
        let payload = [i as u8; PROBE_PAYLOAD];
        let Some(datagram) = session.probe_datagram(&payload) else {
            return emit(&Event::local_error(ErrorCode::NotInChannel.as_str(), "join a channel to send media"));
        };
        if let Err(e) = connection.send_datagram(Bytes::from(datagram)) {
            return emit(&Event::local_error("datagram_failed", e));
        }
    }
}

/// Forwards the server's messages; a frame that does not decode is passed on as the
/// protocol error it is, while an ended stream just ends (the connection says why).
async fn read_frames(mut recv: quinn::RecvStream, tx: mpsc::Sender<Result<ServerMsg, FrameError>>) {
    loop {
        let frame = match read_frame::<ServerMsg>(&mut recv).await {
            Ok(Some(msg)) => Ok(msg),
            Err(ReadFrameError::Frame(e)) => Err(e),
            Ok(None) | Err(_) => return,
        };
        let stop = frame.is_err();
        if tx.send(frame).await.is_err() || stop {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::history::{History, StoredMessage};

    fn snapshot(n: u64) -> Snapshot {
        let mut history = History::default();
        history.record("h:1#Lobby", StoredMessage { from: "a".into(), text: format!("m{n}"), time_ms: n });
        Snapshot { e2ee: Zeroizing::new(n.to_le_bytes().to_vec()), history, screen_grant: None }
    }

    #[tokio::test]
    async fn the_vault_is_written_off_the_caller_coalesced_and_finished_at_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let fast = KdfParams { m_kib: 64, t: 1, p: 1 };
        let store = ClientStore::open_or_create(dir.path(), b"pw", fast).unwrap();
        let writer = VaultWriter::start(store);
        // Offers never wait: while a save is queued they are refused (and not even made).
        let taken = (0..1000).filter(|n| writer.offer(|| snapshot(*n))).count();
        assert!((1..1000).contains(&taken), "{taken} of 1000 offers were taken");
        writer.finish(Some(snapshot(5000))).await.unwrap();
        let store = ClientStore::open_or_create(dir.path(), b"pw", fast).unwrap();
        assert_eq!(store.e2ee_state().unwrap().0, 5000u64.to_le_bytes(), "the last state is the one on disk");
        assert_eq!(store.history().conversation("h:1#Lobby").next().unwrap().text, "m5000");
    }
}
