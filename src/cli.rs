//! Command-line definitions and dispatch: every flag and its help text live here.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use zeroize::Zeroizing;

use crate::audio::codec::EncoderSettings;
use crate::audio::dsp::VoiceMode;
use crate::audio::pipeline::CaptureSettings;
use crate::audio::wav::read_voice;
use crate::bench::{self, BenchArgs};
use crate::config::ServerConfig;
use crate::net::client::{self, JoinOptions, VoiceOptions};
use crate::net::server::Server;
use crate::net::tls::Identity;
use crate::protocol::{Fingerprint, JoinRequest, ServerLink};
use crate::relay::{Relay, RelayConfig};
use crate::session::Event;

#[derive(Debug, Parser)]
#[command(
    name = "voipc",
    version,
    about = "Private, self-hosted voice and chat. Without a subcommand, opens the desktop app.",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// A voipc:// link to open in the desktop app: its connect screen, filled in (the
    /// desktop entry hands links from the browser over this way).
    #[arg(value_name = "voipc://LINK", value_parser = app_link)]
    link: Option<String>,
}

/// A link for the desktop app: only a `voipc://` link that parses, so that a mistyped
/// subcommand is an error and not a server address.
fn app_link(text: &str) -> Result<String, String> {
    if !text.starts_with("voipc://") {
        return Err("not a subcommand, nor a voipc:// link".into());
    }
    text.parse::<ServerLink>().map(|_| text.to_owned()).map_err(|e| e.to_string())
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a relay server (QUIC on UDP port 9987 by default).
    Serve(ServeArgs),
    /// Connect as a headless client: events on stdout, commands on stdin.
    Join(Box<JoinArgs>),
    /// Measure throughput and latency.
    Bench(BenchArgs),
    /// List the sound devices (names for --input-device and --output-device).
    Devices,
    /// Test the microphone, no server needed: shows its level, records a few seconds and
    /// plays them back as others would hear them, and suggests a voice-activity threshold
    /// (push-to-talk is tested as voice activity).
    MicTest(MicTestArgs),
}

#[derive(Debug, Args)]
struct MicTestArgs {
    #[command(flatten)]
    microphone: MicrophoneArgs,
}

/// The sound devices and how the microphone goes on the air: `join`'s and `mic-test`'s.
#[derive(Debug, Args)]
struct MicrophoneArgs {
    /// The microphone, by name or PulseAudio name (`voipc devices` lists them; "default"
    /// for the system's).
    #[arg(long, value_name = "NAME")]
    input_device: Option<String>,
    /// The speaker, by name ("default" for the system's).
    #[arg(long, value_name = "NAME")]
    output_device: Option<String>,
    /// When the microphone is on the air: voice-activity, push-to-talk (/talk on|off) or always-on.
    #[arg(long, default_value = "voice-activity", value_name = "MODE")]
    voice_mode: VoiceMode,
    /// The level a voice must reach to open the voice-activity gate, in dBFS.
    #[arg(long, default_value_t = -50.0, value_name = "DBFS", allow_negative_numbers = true)]
    vad_threshold: f32,
    /// Without RNNoise noise suppression.
    #[arg(long)]
    no_denoise: bool,
    /// Turn echo cancellation off (it takes what the speaker plays out of the microphone).
    #[arg(long)]
    no_echo_cancel: bool,
}

impl MicrophoneArgs {
    /// How the capture hears the microphone (its encoder as `encoder` says).
    fn capture(&self, encoder: EncoderSettings) -> CaptureSettings {
        CaptureSettings {
            mode: self.voice_mode,
            threshold_dbfs: self.vad_threshold,
            denoise: !self.no_denoise,
            echo_cancel: !self.no_echo_cancel,
            encoder,
        }
    }

    /// The devices asked for: `Some(None)` is the system's default.
    fn devices(&self) -> (Option<Option<String>>, Option<Option<String>>) {
        let device = |name: &Option<String>| name.clone().map(|n| (n != "default").then_some(n));
        (device(&self.input_device), device(&self.output_device))
    }
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// server.toml; without it, defaults (one channel, Lobby).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address and UDP port to listen on (port 0 picks a free one).
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Keep a fresh self-signed certificate in memory only (clients see a new one each start).
    #[arg(long)]
    ephemeral_cert: bool,
    /// Host name for the invite link when listening on a wildcard address.
    #[arg(long, value_name = "HOST")]
    public_host: Option<String>,
    /// Let log lines name client addresses (by default they name none).
    #[arg(long)]
    log_addresses: bool,
    /// Print the listening event as one JSON line.
    #[arg(long)]
    json: bool,
    /// Threads that run connections. One is the most efficient on small servers: it
    /// avoids cross-thread wake-ups, which cost more than forwarding a datagram.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    threads: u16,
}

#[derive(Debug, Args)]
pub struct JoinArgs {
    /// HOST[:PORT] or a voipc:// invite link.
    target: String,
    /// Your display name on the server.
    #[arg(long)]
    name: String,
    /// Channel to enter instead of the server's default.
    #[arg(long)]
    channel: Option<String>,
    /// A file whose first line is that channel's password (or set VOIPC_CHANNEL_PASSWORD).
    /// Never an argument: anyone on the machine can read those in the process list.
    #[arg(long, value_name = "FILE")]
    channel_password_file: Option<PathBuf>,
    /// An invite token for that channel.
    #[arg(long, value_name = "TOKEN")]
    invite: Option<String>,
    /// The server certificate's SHA-256 fingerprint, as the server printed it. It replaces
    /// a pin stored for the server (a link's fingerprint never does).
    #[arg(long, value_name = "FP", conflicts_with = "trust_on_first_use")]
    fingerprint: Option<Fingerprint>,
    /// Accept and pin an unknown server certificate without checking it.
    #[arg(long)]
    trust_on_first_use: bool,
    /// Connect from this local address (and port, 0 for any), on a machine with several.
    #[arg(long, value_name = "ADDR")]
    bind: Option<SocketAddr>,
    /// Where the vault (pinned certificates, later keys and history) is kept.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// A file holding the vault password (otherwise VOIPC_VAULT_PASSWORD; never an argument).
    #[arg(long, value_name = "FILE")]
    vault_password_file: Option<PathBuf>,
    /// Send this message to the channel once joined.
    #[arg(long, value_name = "TEXT")]
    say: Option<String>,
    #[command(flatten)]
    voice: VoiceArgs,
    #[command(flatten)]
    screen: ScreenArgs,
    /// End the session after this many seconds (the end of stdin then does not).
    #[arg(long, value_name = "SECS")]
    duration: Option<f64>,
    /// Print events as JSON lines.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct ScreenArgs {
    /// Share a screen once in a channel: a monitor's name or number (nothing: the
    /// primary one), window:TITLE, or a .y4m file (played over and over).
    #[arg(long, value_name = "SOURCE", num_args = 0..=1, default_missing_value = "")]
    share_screen: Option<String>,
    /// The most the share may be: 480p, 720p or 1080p (it goes lower when the network
    /// or the encoder cannot keep up).
    #[arg(long, value_name = "RES")]
    share_resolution: Option<crate::protocol::Resolution>,
    /// The most frames a second the share may have (1-30).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=30))]
    share_fps: Option<u32>,
    /// Share desktop audio with the screen: what the other applications play on the
    /// default output (PulseAudio or PipeWire), never what this client plays.
    #[arg(long, requires = "share_screen")]
    share_audio: bool,
    /// Encode with this FFmpeg encoder (e.g. libx265) instead of the first that works;
    /// fails if it cannot.
    #[arg(long, value_name = "NAME")]
    encoder: Option<String>,
    /// Watch this user's screen share as soon as they share in our channel.
    #[arg(long, value_name = "NAME")]
    watch: Option<String>,
    /// Write every decoded frame of the share watched to this 4:2:0 Y4M file.
    #[arg(long, value_name = "FILE.y4m", requires = "watch")]
    record_screen: Option<PathBuf>,
    /// Write the desktop audio of the share watched to this 48 kHz stereo WAV file.
    #[arg(long, value_name = "FILE.wav", requires = "watch")]
    record_screen_audio: Option<PathBuf>,
}

impl ScreenArgs {
    fn options(self) -> crate::net::screen::ScreenOptions {
        use crate::session::command::ShareRequest;
        let share = self.share_screen.map(|source| ShareRequest {
            source: Some(source).filter(|s| !s.is_empty()),
            resolution: self.share_resolution.unwrap_or(ShareRequest::DEFAULT_RESOLUTION),
            fps: self.share_fps.unwrap_or(ShareRequest::DEFAULT_FPS),
            audio: self.share_audio,
        });
        crate::net::screen::ScreenOptions {
            share,
            encoder: self.encoder,
            watch: self.watch,
            record: self.record_screen,
            record_audio: self.record_screen_audio,
            show: None,
        }
    }
}

#[derive(Debug, Args)]
struct VoiceArgs {
    /// Send this WAV file (any rate, mono or stereo) as voice once in a channel; without it
    /// and without --input-device the client only listens.
    #[arg(long, value_name = "FILE.wav")]
    play: Option<PathBuf>,
    /// Record what this client plays (the mixed channel audio) to a 48 kHz WAV file.
    #[arg(long, value_name = "FILE.wav")]
    record: Option<PathBuf>,
    #[command(flatten)]
    microphone: MicrophoneArgs,
    /// Opus complexity, 0 (fastest) to 10 (best).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(i32).range(0..=10))]
    complexity: i32,
    /// Start muted (`/unmute` to talk); everyone sees it.
    #[arg(long)]
    muted: bool,
    /// Start deafened (`/undeafen` to hear); everyone sees it.
    #[arg(long)]
    deafened: bool,
}

impl VoiceArgs {
    fn options(self) -> anyhow::Result<VoiceOptions> {
        let play = match &self.play {
            Some(path) => Some(std::sync::Arc::new(read_voice(path)?)),
            None => None,
        };
        let capture =
            self.microphone.capture(EncoderSettings { complexity: self.complexity, ..EncoderSettings::default() });
        let (input_device, output_device) = self.microphone.devices();
        Ok(VoiceOptions {
            play,
            input_device,
            output_device,
            record: self.record,
            capture,
            muted: self.muted,
            deafened: self.deafened,
            // A script's client makes no sounds of its own (a recording holds voices only).
            cues: crate::audio::cues::CueSettings::default(),
        })
    }
}

/// Parses the command line, runs it and maps the outcome to an exit code.
pub fn main() -> ExitCode {
    let Cli { command, link } = Cli::parse();
    init_logging(match command {
        Some(Command::Serve(_)) => "info",
        // libsignal warns about every message it could not decrypt at first try, which
        // it then may well decrypt with an older session state; our events say what failed.
        _ => "warn,libsignal_protocol_syft=error",
    });
    let mut builder = match &command {
        Some(Command::Serve(args)) if args.threads == 1 => tokio::runtime::Builder::new_current_thread(),
        Some(Command::Serve(args)) => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(usize::from(args.threads));
            builder
        }
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match command {
        // No subcommand: the desktop app, its network work on this runtime.
        None => crate::gui::run(runtime.handle().clone(), link),
        Some(Command::Serve(args)) => runtime.block_on(serve(args)),
        Some(Command::Join(args)) => runtime.block_on(join(*args)),
        Some(Command::Bench(args)) => runtime.block_on(bench::run(args)),
        Some(Command::Devices) => devices(),
        Some(Command::MicTest(args)) => runtime.block_on(mic_test(args)),
    };
    // A blocking read of stdin never returns while stdin stays open; do not wait for it.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr only, never to a file; `RUST_LOG` overrides the level.
fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut config = match &args.config {
        Some(path) => ServerConfig::load(path)?,
        None => ServerConfig::default(),
    };
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if args.public_host.is_some() {
        config.public_host = args.public_host;
    }
    let identity = if args.ephemeral_cert {
        Identity::generate()?.0
    } else if let (Some(cert), Some(key)) = (&config.certificate, &config.private_key) {
        Identity::load(cert, key)?
    } else {
        let dir = args.config.as_deref().and_then(Path::parent).filter(|p| !p.as_os_str().is_empty());
        let (identity, created) = Identity::load_or_create(dir.unwrap_or(Path::new(".")))?;
        if let Some(path) = created {
            tracing::info!(path = %path.display(), "generated a self-signed certificate");
        }
        identity
    };
    let relay_config = RelayConfig::from_server_config(&mut config);
    let relay = Relay::new(relay_config, rand::random());
    let server = Server::bind(config.listen, identity, relay, &config.limits)?.log_addresses(args.log_addresses);
    let shutdown = shutdown_signal()?;
    let addr = server.local_addr()?;
    let fingerprint = server.fingerprint();
    let link = ServerLink {
        host: invite_host(addr.ip(), config.public_host.as_deref()),
        port: addr.port(),
        fingerprint: Some(fingerprint),
        channel: None,
        invite: None,
    };
    let invite = link.invite_base(&fingerprint);
    let metrics = config.metrics_listen.map(|at| server.serve_metrics(at)).transpose()?;
    if args.json {
        #[derive(serde::Serialize)]
        struct Listening {
            event: &'static str,
            addr: String,
            fingerprint: String,
            invite: String,
            #[serde(skip_serializing_if = "Option::is_none")]
            metrics: Option<String>,
        }
        let (addr, fingerprint) = (addr.to_string(), fingerprint.to_string());
        let metrics = metrics.map(|at| format!("http://{at}/metrics"));
        let line = Listening { event: "listening", addr, fingerprint, invite, metrics };
        println!("{}", serde_json::to_string(&line)?);
    } else {
        println!("VoIPC server listening on {addr} (UDP/QUIC)");
        println!("certificate fingerprint (SHA-256): {fingerprint}");
        println!("invite link: {invite}");
        if let Some(at) = metrics {
            println!("metrics: http://{at}/metrics");
        }
    }
    server.run(shutdown).await;
    Ok(())
}

/// The host an invite names: the configured public name, the listen address if it is a
/// specific one, else this machine's host name.
fn invite_host(ip: IpAddr, public_host: Option<&str>) -> String {
    if let Some(host) = public_host {
        return host.to_owned();
    }
    if !ip.is_unspecified() {
        return ip.to_string();
    }
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed now, not when first polled,
/// so that a signal right after the server announced itself is not fatal.
#[cfg(unix)]
fn shutdown_signal() -> anyhow::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = interrupt.recv() => {}
        }
    })
}

#[cfg(not(unix))]
fn shutdown_signal() -> anyhow::Result<impl Future<Output = ()>> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}

async fn join(args: JoinArgs) -> anyhow::Result<()> {
    let json = args.json;
    let result = async {
        let link: ServerLink = args.target.parse()?;
        let channel = args.channel.or(link.channel.clone());
        let invite = args.invite.or(link.invite.clone());
        let password = secret(args.channel_password_file.as_deref(), CHANNEL_PASSWORD_ENV)?;
        let join = channel.map(|channel| JoinRequest { channel, password: password.map(|p| p.to_string()), invite });
        let data_dir = match args.data_dir {
            Some(dir) => dir,
            None => default_data_dir()?,
        };
        let vault_password = vault_password(args.vault_password_file.as_deref())?;
        let options = JoinOptions {
            link,
            replace_pin: args.fingerprint,
            bind: args.bind,
            name: args.name,
            join,
            trust_on_first_use: args.trust_on_first_use,
            data_dir,
            vault_password,
            say: args.say,
            voice: args.voice.options()?,
            screen: args.screen.options(),
            duration: args
                .duration
                .map(std::time::Duration::try_from_secs_f64)
                .transpose()
                .context("--duration takes a number of seconds")?,
            health: false,
            json,
        };
        client::run_headless(options).await.map_err(anyhow::Error::from)
    }
    .await;
    if let (true, Err(e)) = (json, &result) {
        let code = e.downcast_ref::<client::ClientError>().map_or("usage", |c| c.code());
        let line = serde_json::to_string(&Event::local_error(code, format!("{e:#}"))).expect("plain strings serialise");
        println!("{line}");
    }
    result
}

fn devices() -> anyhow::Result<()> {
    use crate::audio::device::{self, DeviceName};
    let list = device::list(&device::host());
    let show = |title: &str, devices: &[DeviceName], default: &Option<String>| {
        println!("{title}:");
        for DeviceName { name, id } in devices {
            let mark = if Some(id) == default.as_ref() { " (default)" } else { "" };
            let id = if id != name { format!(" [{id}]") } else { String::new() };
            println!("  {name}{id}{mark}");
        }
    };
    show("input devices", &list.inputs, &list.default_input);
    show("output devices", &list.outputs, &list.default_output);
    Ok(())
}

/// Records and plays back once, printing what the test shows as JSON lines.
async fn mic_test(args: MicTestArgs) -> anyhow::Result<()> {
    use crate::audio::check::{self, CheckControl, CheckEvent, Phase};
    let capture = args.microphone.capture(EncoderSettings::default());
    let (input, output) = args.microphone.devices();
    let (controls, receiver) = tokio::sync::mpsc::channel(4);
    // Its clock starts once the microphone is heard; dropping the controls ends the test,
    // after the playback.
    controls.try_send(CheckControl::Record).expect("an empty queue");
    let mut controls = Some(controls);
    let mut played = false;
    let show = |event: &CheckEvent| match event {
        CheckEvent::Level(dbfs) => serde_json::json!({ "event": "level", "dbfs": dbfs }),
        CheckEvent::Talking(on) => serde_json::json!({ "event": "talking", "on": on }),
        CheckEvent::Phase(phase) => {
            serde_json::json!({ "event": "phase", "phase": format!("{phase:?}").to_lowercase() })
        }
        CheckEvent::Suggested(dbfs) => serde_json::json!({ "event": "suggested_threshold", "dbfs": dbfs }),
        CheckEvent::Device(message) => serde_json::json!({ "event": "device", "message": message }),
    };
    let playback = check::run(input.flatten(), output.flatten(), capture, receiver, |event| {
        println!("{}", show(&event));
        played |= event == CheckEvent::Phase(Phase::Playing);
        if played && event == CheckEvent::Phase(Phase::Idle) {
            controls = None;
        }
    })
    .await?;
    println!("{}", serde_json::json!({ "event": "playback_stats", "stats": playback }));
    Ok(())
}

/// The vault password from `--vault-password-file` (its first line) or the environment.
fn vault_password(file: Option<&Path>) -> anyhow::Result<Zeroizing<String>> {
    secret(file, VAULT_PASSWORD_ENV)?.ok_or_else(|| client::ClientError::NoVaultPassword.into())
}

/// A secret from the first line of `file`, or else from the environment variable `env`;
/// `None` when neither gives one.
fn secret(file: Option<&Path>, env: &str) -> anyhow::Result<Option<Zeroizing<String>>> {
    let secret = match file {
        Some(path) => {
            let text = Zeroizing::new(
                std::fs::read_to_string(path).with_context(|| format!("reading a secret from {}", path.display()))?,
            );
            Zeroizing::new(text.lines().next().unwrap_or_default().to_owned())
        }
        None => Zeroizing::new(std::env::var(env).unwrap_or_default()),
    };
    Ok(Some(secret).filter(|s| !s.is_empty()))
}

/// The environment variable a headless client reads its vault password from.
pub const VAULT_PASSWORD_ENV: &str = "VOIPC_VAULT_PASSWORD";
/// The environment variable `voipc join --channel` reads the channel's password from.
pub const CHANNEL_PASSWORD_ENV: &str = "VOIPC_CHANNEL_PASSWORD";

fn default_data_dir() -> anyhow::Result<PathBuf> {
    directories::ProjectDirs::from("", "", "voipc")
        .map(|dirs| dirs.data_dir().to_owned())
        .context("no home directory to keep client data in; pass --data-dir")
}
