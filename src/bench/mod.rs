//! `voipc bench`: figures measured as ratios against a baseline in the same run.
//!
//! `voipc bench relay` loads a real `voipc serve` in its own process (so its CPU is
//! measured apart from the load generators') with groups in which everyone speaks at
//! voice rate, level by level, and does the same against a plain-UDP fan-out relay.
#![allow(clippy::disallowed_methods, reason = "a benchmark measures wall-clock time")]

mod attack;
mod chat;
mod codec;
mod impair;
mod load;
mod shape;
pub mod udp_relay;
mod video;
mod voice;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::audio::quality::compare;
use crate::audio::wav::read_voice;
use crate::config::Limits;
use crate::crypto::vault::{KdfParams, Vault};
use crate::protocol::{Fingerprint, ServerLink};
use load::{DATAGRAM_LEN, Group, Measured, PACKET_INTERVAL, percentile_ms};

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    what: BenchCommand,
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Relay throughput and latency, against a plain-UDP fan-out relay.
    Relay(RelayArgs),
    /// End-to-end encrypted messages per second (DMs, and a 20-member channel), against
    /// plain AES-256-GCM sealing and opening of the same bytes.
    Chat {
        /// Seconds measured per case.
        #[arg(long, default_value_t = 2.0)]
        secs: f64,
        #[arg(long)]
        json: bool,
    },
    /// Opus and RNNoise speed, SFrame against the TLS provider's AES-256-GCM, and the
    /// client voice pipeline's share of a core.
    Codec {
        /// Seconds measured per case.
        #[arg(long, default_value_t = 1.0)]
        secs: f64,
        #[arg(long)]
        json: bool,
    },
    /// Screen share: each HEVC encoder that opens here at 480p, 720p and 1080p (encode
    /// speed, bitrate, Y-PSNR, capture-to-picture time), beside raw capture speed.
    Video {
        /// Seconds measured per case.
        #[arg(long, default_value_t = 2.0)]
        secs: f64,
        #[arg(long)]
        json: bool,
    },
    /// Mouth-to-ear voice latency through a loopback relay (device buffers excluded),
    /// beside the relay's own one-way time.
    Voice {
        /// Times the speech sample is sent (the median is reported).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        #[arg(long)]
        json: bool,
    },
    /// How well a recording reproduces a source (envelope correlation, longest dropout).
    Compare { source: std::path::PathBuf, recording: std::path::PathBuf },
    /// Vault unlock time, against opening the same vault without the key-derivation cost.
    Vault {
        /// Unlocks timed (the median is reported).
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        #[arg(long)]
        json: bool,
    },
    /// One member floods a channel at `factor` times voice rate while another speaks:
    /// how much of the speaker's voice a third member gets, and how late.
    Flood {
        /// A running `voipc serve` (or an impairer in front of one).
        #[arg(long, value_name = "ADDR")]
        target: ServerLink,
        #[arg(long, value_name = "FP")]
        fingerprint: Fingerprint,
        /// 0: the flooder stays silent (a plain talker and listener).
        #[arg(long, default_value_t = 10)]
        factor: u32,
        #[arg(long, default_value_t = 8.0)]
        secs: f64,
    },
    /// `handshakes` connections at once that never say hello, and garbage datagrams,
    /// while a newcomer joins: how long the newcomer took.
    HandshakeFlood {
        #[arg(long, value_name = "ADDR")]
        target: ServerLink,
        #[arg(long, value_name = "FP")]
        fingerprint: Fingerprint,
        #[arg(long, default_value_t = 640)]
        handshakes: usize,
        #[arg(long, default_value_t = 2000)]
        garbage_per_sec: u32,
        #[arg(long, default_value_t = 8.0)]
        secs: f64,
    },
    /// `count` clients connecting and saying hello at once (through an impairer: the
    /// handshake-under-loss case).
    Handshakes {
        #[arg(long, value_name = "ADDR")]
        target: ServerLink,
        #[arg(long, value_name = "FP")]
        fingerprint: Fingerprint,
        #[arg(long, default_value_t = 50)]
        count: usize,
    },
    /// Bytes the server sends to an address that never proves itself, against the bytes
    /// it got from there.
    Amplification {
        #[arg(long, value_name = "ADDR")]
        target: ServerLink,
        #[arg(long, value_name = "FP")]
        fingerprint: Fingerprint,
        #[arg(long, default_value_t = 4.0)]
        secs: f64,
    },
    /// A UDP forwarder that loses and delays datagrams (`just bad-network` puts it
    /// between clients and server where the kernel has no tc netem).
    #[command(hide = true)]
    Impair {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        to: SocketAddr,
        /// Chance of loss per direction, 0-1.
        #[arg(long, default_value_t = 0.0)]
        loss: f64,
        /// Maximum added delay per direction, milliseconds.
        #[arg(long, default_value_t = 0)]
        jitter_ms: u64,
        /// The server-to-client link's rate, kilobits per second (a queue of at most
        /// 100 ms, then drops); unlimited when absent.
        #[arg(long)]
        down_kbps: Option<u32>,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// The plain-UDP baseline relay (started by `bench relay`).
    #[command(hide = true)]
    UdpRelay {
        #[arg(long)]
        listen: SocketAddr,
        /// One system call per datagram and per delivery, instead of batches.
        #[arg(long)]
        naive: bool,
    },
}

#[derive(Debug, Args)]
struct RelayArgs {
    /// Seconds measured per load level.
    #[arg(long, default_value_t = 3.0)]
    secs: f64,
    /// Members per group at the highest level tried.
    #[arg(long, default_value_t = 64)]
    max_members: usize,
    /// Load a `voipc serve` that is already running instead of starting one.
    #[arg(long, value_name = "ADDR", requires = "fingerprint")]
    target: Option<String>,
    /// The target's certificate fingerprint.
    #[arg(long, value_name = "FP")]
    fingerprint: Option<Fingerprint>,
    /// The target's process id, to measure its CPU time.
    #[arg(long, value_name = "PID", requires = "target")]
    target_pid: Option<u32>,
    /// Print the results as one JSON object.
    #[arg(long)]
    json: bool,
    /// Measure one shape instead of climbing: this many clients (with --speakers and
    /// --channels), on voipc serve, the batched plain-UDP baseline and the naive one.
    #[arg(long, conflicts_with_all = ["target", "max_members"])]
    clients: Option<usize>,
    /// Of the shape's clients, how many speak (default: all), spread over the channels.
    #[arg(long, requires = "clients")]
    speakers: Option<usize>,
    /// Channels the shape's clients are spread over.
    #[arg(long, default_value_t = 1, requires = "clients")]
    channels: usize,
    /// `voipc serve --threads` for the server the bench starts.
    #[arg(long, default_value_t = 1, conflicts_with = "target")]
    server_threads: usize,
    /// `limits.media_coalesce_ms` for the server the bench starts (how long a receiver's
    /// media may wait to share a packet; 0: never). Default: the server's.
    #[arg(long, value_name = "MS", conflicts_with = "target")]
    coalesce_ms: Option<u32>,
    /// CPUs for the relays the shape run starts (a `taskset` list, e.g. 0): put the
    /// bench itself elsewhere (`taskset -c 1 voipc bench relay ...`).
    #[arg(long, value_name = "LIST", requires = "clients")]
    server_cpus: Option<String>,
    /// murmur-load's output (`just bench-peer` writes it) to set beside the shape's figures.
    #[arg(long, value_name = "FILE", requires = "clients")]
    compare_with: Option<std::path::PathBuf>,
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.what {
        BenchCommand::Relay(args) => match args.clients {
            Some(clients) => {
                let shape = shape::Shape {
                    clients: clients.clamp(2, 5000),
                    speakers: args.speakers.unwrap_or(clients).min(clients),
                    channels: args.channels.clamp(1, clients.max(1)),
                    window: Duration::from_secs_f64(args.secs.clamp(0.5, 600.0)),
                    server_threads: args.server_threads.clamp(1, 64),
                    coalesce_ms: args.coalesce_ms.unwrap_or(Limits::default().media_coalesce_ms),
                    server_cpus: args.server_cpus,
                    peer: args.compare_with,
                };
                shape::run(shape, args.json).await
            }
            None => relay(args).await,
        },
        BenchCommand::Chat { secs, json } => {
            let window = Duration::from_secs_f64(secs.clamp(0.1, 60.0));
            tokio::task::spawn_blocking(move || chat::run(window, json)).await.context("chat bench failed")?
        }
        BenchCommand::Codec { secs, json } => {
            let window = Duration::from_secs_f64(secs.clamp(0.1, 60.0));
            tokio::task::spawn_blocking(move || codec::run(window, json)).await.context("codec bench failed")?
        }
        BenchCommand::Voice { rounds, json } => voice::run(rounds.max(1), json).await,
        BenchCommand::Video { secs, json } => {
            let window = Duration::from_secs_f64(secs.clamp(0.1, 60.0));
            // Through a relay first, with the machine to itself; then each encoder alone.
            let glass = video::glass_to_glass(window).await.map_err(|e| format!("{e:#}"));
            tokio::task::spawn_blocking(move || video::run(window, json, glass)).await.context("video bench failed")?
        }
        BenchCommand::Impair { listen, to, loss, jitter_ms, down_kbps, seed } => {
            let how = impair::Impairment {
                loss: loss.clamp(0.0, 1.0),
                jitter: Duration::from_millis(jitter_ms),
                down_bytes_per_sec: down_kbps.map(|kbps| f64::from(kbps.max(1)) * 1000.0 / 8.0),
            };
            impair::run(listen, to, how, seed).await
        }
        BenchCommand::HandshakeFlood { target, fingerprint, handshakes, garbage_per_sec, secs } => {
            let window = Duration::from_secs_f64(secs.clamp(2.0, 600.0));
            let report =
                attack::handshake_flood(&target, fingerprint, handshakes.min(4096), garbage_per_sec, window).await?;
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
        BenchCommand::Handshakes { target, fingerprint, count } => {
            let report = attack::handshakes(&target, fingerprint, count.min(1000)).await;
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
        BenchCommand::Amplification { target, fingerprint, secs } => {
            let window = Duration::from_secs_f64(secs.clamp(0.5, 60.0));
            let report = attack::amplification(&target, fingerprint, window).await?;
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
        BenchCommand::Flood { target, fingerprint, factor, secs } => {
            let window = Duration::from_secs_f64(secs.clamp(1.0, 600.0));
            let group = Group::quic(&target, fingerprint, 3, &format!("flood-{}", std::process::id())).await?;
            let measured = group.flood(Instant::now(), factor.min(100), window).await?;
            println!("{}", serde_json::to_string(&measured)?);
            Ok(())
        }
        BenchCommand::Compare { source, recording } => {
            let (source, recording) = (read_voice(&source)?, read_voice(&recording)?);
            println!("{}", serde_json::to_string(&compare(&source, &recording))?);
            Ok(())
        }
        BenchCommand::Vault { rounds, json } => {
            tokio::task::spawn_blocking(move || vault(rounds.max(1), json)).await.context("vault bench failed")?
        }
        BenchCommand::UdpRelay { listen, naive } => tokio::task::spawn_blocking(move || udp_relay::run(listen, naive))
            .await
            .context("baseline relay stopped")?,
    }
}

/// Loss above this ends the climb: the previous level is the peak.
const MAX_LOSS: f64 = 0.001;
/// Group sizes tried, smallest first; everyone in a group speaks.
const LEVELS: [usize; 12] = [2, 4, 8, 12, 16, 20, 24, 32, 40, 48, 56, 64];

#[derive(Debug, Clone, Serialize)]
struct Level {
    members: usize,
    /// Deliveries per second the level asks for: members × (members − 1) × 50.
    offered_per_sec: f64,
    forwarded_per_sec: f64,
    loss: f64,
    /// Relay CPU seconds per million forwarded datagrams, when its process is known.
    cpu_s_per_million: Option<f64>,
    p50_ms: f64,
    p99_ms: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    datagram_bytes: usize,
    packets_per_sec_per_speaker: u32,
    secs_per_level: f64,
    quic: Vec<Level>,
    udp_baseline: Vec<Level>,
    /// Highest forwarded rate with loss ≤ 0.1 %.
    peak_forwarded_per_sec: f64,
    baseline_peak_forwarded_per_sec: f64,
    ratio_to_baseline: f64,
    /// The level nearest to half the peak rate, and its latency.
    half_peak: Option<Level>,
    baseline_at_half_peak: Option<Level>,
    /// QUIC p99 minus plain-UDP p99 at the largest group both carry within the loss
    /// bound: the latency the relay adds beyond the machine's own.
    added_p99_ms: Option<(usize, f64)>,
}

/// The bench's own server: the defaults, but room for `clients` load clients (and as
/// many channels) on one address (every load client comes from 127.0.0.1: the per-source
/// limits that a public server keeps for people are lifted, and only those).
fn bench_server_config(clients: usize, coalesce_ms: u32) -> String {
    let handshakes = 2 * clients;
    format!(
        "max_users = {clients}\n\n[limits]\nmax_connections_per_source = {clients}\n\
         max_pending_per_source = {clients}\nmax_pending_connections = {clients}\n\
         handshakes_per_source_per_minute = {handshakes}\nmax_channels = {clients}\n\
         channel_creations_per_minute = {clients}\nmedia_coalesce_ms = {coalesce_ms}\n"
    )
}

/// A `voipc serve` child for `clients` clients (its config from [`bench_server_config`]),
/// on `threads` runtime threads and, when given, only on `cpus`; its link and certificate
/// fingerprint from its first line.
async fn spawn_server(
    clients: usize,
    coalesce_ms: u32,
    threads: usize,
    cpus: Option<&str>,
) -> anyhow::Result<(Child, ServerLink, Fingerprint)> {
    let config = std::env::temp_dir().join(format!("voipc-bench-{}.toml", std::process::id()));
    std::fs::write(&config, bench_server_config(clients, coalesce_ms)).context("writing the bench server's config")?;
    let (config_arg, threads) = (config.to_string_lossy().into_owned(), threads.to_string());
    let args = [
        "serve",
        "--config",
        &config_arg,
        "--listen",
        "127.0.0.1:0",
        "--ephemeral-cert",
        "--json",
        "--threads",
        &threads,
    ];
    let spawned = spawn_self(&args, cpus).await;
    let _ = std::fs::remove_file(&config);
    let (child, line) = spawned?;
    let fingerprint: Fingerprint = json_field(&line, "fingerprint")?.parse()?;
    let link: ServerLink = json_field(&line, "addr")?.parse()?;
    Ok((child, link, fingerprint))
}

async fn relay(args: RelayArgs) -> anyhow::Result<()> {
    let window = Duration::from_secs_f64(args.secs.max(0.5));
    let levels: Vec<usize> = LEVELS.iter().copied().filter(|n| *n <= args.max_members.max(2)).collect();
    let base = Instant::now();

    let (server, _server_child) = match (&args.target, args.fingerprint) {
        (Some(target), Some(fp)) => {
            (Target { link: target.parse()?, fingerprint: Some(fp), pid: args.target_pid }, None)
        }
        _ => {
            let coalesce = args.coalesce_ms.unwrap_or(Limits::default().media_coalesce_ms);
            let (child, link, fp) = spawn_server(1000, coalesce, args.server_threads, None).await?;
            (Target { link, fingerprint: Some(fp), pid: child.id() }, Some(child))
        }
    };
    let (udp_child, line) = spawn_self(&["bench", "udp-relay", "--listen", "127.0.0.1:0"], None).await?;
    let udp_addr: SocketAddr = json_field(&line, "addr")?.parse()?;
    let udp = Target { link: udp_addr.to_string().parse()?, fingerprint: None, pid: udp_child.id() };

    let mut report = Report {
        datagram_bytes: DATAGRAM_LEN,
        packets_per_sec_per_speaker: (1000 / PACKET_INTERVAL.as_millis()) as u32,
        secs_per_level: window.as_secs_f64(),
        quic: Vec::new(),
        udp_baseline: Vec::new(),
        peak_forwarded_per_sec: 0.0,
        baseline_peak_forwarded_per_sec: 0.0,
        ratio_to_baseline: 0.0,
        half_peak: None,
        baseline_at_half_peak: None,
        added_p99_ms: None,
    };
    for (target, results) in [(&server, &mut report.quic), (&udp, &mut report.udp_baseline)] {
        for (round, &n) in levels.iter().enumerate() {
            let group = match target.fingerprint {
                Some(fp) => Group::quic(&target.link, fp, n, &format!("{}-{round}", std::process::id())).await?,
                None => Group::udp(udp_addr, n, round as u16).await?,
            };
            let cpu_before = target.pid.and_then(cpu_seconds);
            let measured = group.measure(base, Duration::from_millis(500), window, n).await;
            let cpu = target.pid.and_then(cpu_seconds).zip(cpu_before).map(|(after, before)| after - before);
            drop(group);
            let level = Level::from_measured(n, window, &measured, cpu);
            if !args.json {
                eprintln!(
                    "{} {n:>3} members: {:>9.0}/s forwarded, loss {:.3} %, p99 {:.2} ms",
                    if target.fingerprint.is_some() { "quic" } else { "udp " },
                    level.forwarded_per_sec,
                    level.loss * 100.0,
                    level.p99_ms
                );
            }
            let lossy = level.loss > MAX_LOSS;
            results.push(level);
            if lossy {
                break;
            }
        }
    }
    report.peak_forwarded_per_sec = peak(&report.quic);
    report.baseline_peak_forwarded_per_sec = peak(&report.udp_baseline);
    report.ratio_to_baseline = report.peak_forwarded_per_sec / report.baseline_peak_forwarded_per_sec.max(1.0);
    report.half_peak = nearest(&report.quic, report.peak_forwarded_per_sec / 2.0);
    if let Some(half) = &report.half_peak {
        report.baseline_at_half_peak = report.udp_baseline.iter().find(|l| l.members == half.members).cloned();
    }
    report.added_p99_ms = report
        .udp_baseline
        .iter()
        .filter(|udp| udp.loss <= MAX_LOSS)
        .filter_map(|udp| report.quic.iter().find(|q| q.members == udp.members && q.loss <= MAX_LOSS).map(|q| (q, udp)))
        .next_back()
        .map(|(q, udp)| (q.members, q.p99_ms - udp.p99_ms));

    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    drop(udp_child);
    Ok(())
}

struct Target {
    link: ServerLink,
    fingerprint: Option<Fingerprint>,
    pid: Option<u32>,
}

impl Level {
    fn from_measured(members: usize, window: Duration, m: &Measured, cpu: Option<f64>) -> Level {
        let secs = window.as_secs_f64();
        let mut latencies = m.latencies_us.clone();
        latencies.sort_unstable();
        let offered = (members * (members - 1)) as f64 * 1000.0 / PACKET_INTERVAL.as_millis() as f64;
        Level {
            members,
            offered_per_sec: offered,
            forwarded_per_sec: m.received as f64 / secs,
            loss: if m.expected == 0 { 0.0 } else { 1.0 - m.received as f64 / m.expected as f64 }.max(0.0),
            cpu_s_per_million: cpu.filter(|_| m.received > 0).map(|c| c / m.received as f64 * 1e6),
            p50_ms: percentile_ms(&latencies, 0.50),
            p99_ms: percentile_ms(&latencies, 0.99),
        }
    }
}

fn peak(levels: &[Level]) -> f64 {
    levels.iter().filter(|l| l.loss <= MAX_LOSS).map(|l| l.forwarded_per_sec).fold(0.0, f64::max)
}

fn nearest(levels: &[Level], rate: f64) -> Option<Level> {
    levels
        .iter()
        .filter(|l| l.loss <= MAX_LOSS && l.forwarded_per_sec <= rate * 1.05)
        .min_by(|a, b| (a.forwarded_per_sec - rate).abs().total_cmp(&(b.forwarded_per_sec - rate).abs()))
        .cloned()
}

fn print_table(report: &Report) {
    println!(
        "relay bench: {} B datagrams, {} per second per speaker, everyone in a group speaks, {:.1} s per level",
        report.datagram_bytes, report.packets_per_sec_per_speaker, report.secs_per_level
    );
    for (name, levels) in [("voipc serve (QUIC)", &report.quic), ("plain UDP baseline", &report.udp_baseline)] {
        println!("\n{name}\n members   offered/s  forwarded/s    loss   cpu s/M   p50 ms   p99 ms");
        for l in levels {
            let cpu = l.cpu_s_per_million.map_or_else(|| "-".to_owned(), |c| format!("{c:.2}"));
            println!(
                "{:>8} {:>11.0} {:>12.0} {:>6.3}% {:>9} {:>8.2} {:>8.2}",
                l.members,
                l.offered_per_sec,
                l.forwarded_per_sec,
                l.loss * 100.0,
                cpu,
                l.p50_ms,
                l.p99_ms
            );
        }
    }
    println!(
        "\npeak forwarded at <= 0.1 % loss: {:.0}/s; baseline {:.0}/s; ratio {:.2} (target >= 0.6)",
        report.peak_forwarded_per_sec, report.baseline_peak_forwarded_per_sec, report.ratio_to_baseline
    );
    if let Some(half) = &report.half_peak {
        let baseline = match &report.baseline_at_half_peak {
            Some(b) if b.loss <= MAX_LOSS => format!(
                "p50 {:.2} ms, p99 {:.2} ms; the relay adds {:+.2} ms at p99 (target <= 2 ms)",
                b.p50_ms,
                b.p99_ms,
                half.p99_ms - b.p99_ms
            ),
            _ => "cannot carry this load".to_owned(),
        };
        println!(
            "at half the peak ({} members, {:.0}/s): one-way p50 {:.2} ms, p99 {:.2} ms; plain UDP at the same load: {baseline}",
            half.members, half.forwarded_per_sec, half.p50_ms, half.p99_ms,
        );
    }
    if let Some((members, added)) = report.added_p99_ms {
        println!("relay-added p99 against plain UDP at {members} members (the most both carry): {added:+.2} ms");
    }
}

/// Starts this binary with `args` (on the CPUs `cpus` lists, through `taskset`, when
/// given) and reads its first stdout line (a JSON event).
async fn spawn_self(args: &[&str], cpus: Option<&str>) -> anyhow::Result<(Child, String)> {
    let exe = std::env::current_exe().context("cannot find this executable")?;
    let mut command = match cpus {
        Some(cpus) => {
            let mut taskset = Command::new("taskset");
            taskset.args(["-c", cpus]).arg(exe);
            taskset
        }
        None => Command::new(exe),
    };
    let mut child = command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting voipc {}", args.join(" ")))?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .context("the child process did not report its address")??
        .context("the child process exited before reporting its address")?;
    Ok((child, line))
}

fn json_field(line: &str, field: &str) -> anyhow::Result<String> {
    let value: serde_json::Value = serde_json::from_str(line).with_context(|| format!("not a JSON event: {line}"))?;
    match value.get(field).and_then(|v| v.as_str()) {
        Some(s) => Ok(s.to_owned()),
        None => bail!("no {field:?} in {line}"),
    }
}

/// User plus system CPU seconds a process has used so far (Linux).
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (ticks > 0).then(|| (utime + stime) / ticks as f64)
}

/// Bytes sealed in the vault bench: about 500 stored chat messages.
const VAULT_BENCH_BYTES: usize = 64 * 1024;

fn vault(rounds: usize, json: bool) -> anyhow::Result<()> {
    let dir = tempfile_dir()?;
    let contents = vec![0x5a; VAULT_BENCH_BYTES];
    let time_unlocks = |name: &str, params: KdfParams| -> anyhow::Result<f64> {
        let path = dir.join(name);
        Vault::create(&path, b"bench password", params, &contents)?;
        let mut times: Vec<f64> = (0..rounds)
            .map(|_| {
                let start = Instant::now();
                Vault::open(&path, b"bench password").map(|_| start.elapsed().as_secs_f64() * 1000.0)
            })
            .collect::<Result<_, _>>()?;
        times.sort_by(f64::total_cmp);
        Ok(times[times.len() / 2])
    };
    let unlock_ms = time_unlocks("recommended", KdfParams::RECOMMENDED)?;
    let baseline_ms = time_unlocks("cheapest", KdfParams { m_kib: 8, t: 1, p: 1 })?;
    let _ = std::fs::remove_dir_all(&dir);
    if json {
        let report = serde_json::json!({
            "vault_bytes": VAULT_BENCH_BYTES,
            "kdf": { "m_kib": KdfParams::RECOMMENDED.m_kib, "t": KdfParams::RECOMMENDED.t, "p": KdfParams::RECOMMENDED.p },
            "unlock_ms": unlock_ms,
            "baseline_open_ms": baseline_ms,
            "ratio": unlock_ms / baseline_ms,
        });
        println!("{report}");
    } else {
        println!(
            "vault unlock ({} KiB, Argon2id m = 64 MiB, t = 3, p = 4): {unlock_ms:.1} ms median of {rounds}; \
             the same vault without the key-derivation cost: {baseline_ms:.2} ms ({:.0}x)",
            VAULT_BENCH_BYTES / 1024,
            unlock_ms / baseline_ms
        );
    }
    Ok(())
}

/// A fresh private directory for the bench's files.
fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("voipc-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}
