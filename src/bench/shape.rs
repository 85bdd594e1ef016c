//! One load shape, measured the same way on three relays: `voipc serve`, the batched
//! plain-UDP baseline (the best a plain relay does here) and the naive one. N clients in
//! C channels (spread evenly), M of them speaking (spread evenly over the channels), each
//! speaker sending 50 datagrams a second; every other member of its channel should get
//! each one. Set beside murmur's figures from murmur-load's JSON line when given.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

use super::load::{DATAGRAM_LEN, Group, Measured, percentile_ms};
use super::{cpu_seconds, json_field, spawn_self, spawn_server};

/// Speaking before the window, so that every path is warm.
const WARMUP: Duration = Duration::from_millis(1000);

/// What to measure.
#[derive(Debug, Clone)]
pub struct Shape {
    pub clients: usize,
    pub speakers: usize,
    pub channels: usize,
    pub window: Duration,
    /// `voipc serve --threads`.
    pub server_threads: usize,
    /// The server's `limits.media_coalesce_ms`.
    pub coalesce_ms: u32,
    /// CPUs (a `taskset` list) for the relays; the bench itself stays where it was put.
    pub server_cpus: Option<String>,
    /// murmur-load's JSON line, to set beside ours.
    pub peer: Option<PathBuf>,
}

impl Shape {
    /// Members of channel `c`, and how many of them speak.
    fn channel(&self, c: usize) -> (usize, usize) {
        let share = |total: usize| total / self.channels + usize::from(c < total % self.channels);
        let members = share(self.clients);
        (members, share(self.speakers).min(members))
    }
}

/// One relay's figures at the shape.
#[derive(Debug, Clone, Serialize)]
pub struct Line {
    pub sent: u64,
    pub expected: u64,
    pub received: u64,
    pub loss: f64,
    pub forwarded_per_sec: f64,
    /// The relay process's CPU seconds over the window and the drain.
    pub cpu_s: Option<f64>,
    /// The load generator's (this process's) CPU seconds over the same span: when it
    /// nears the window's length times the cores it has, the generator, not the relay,
    /// is what ran out.
    pub generator_cpu_s: Option<f64>,
    pub cpu_s_per_million: Option<f64>,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

impl Line {
    fn of(m: &Measured, window: Duration, cpu: Option<f64>, generator_cpu_s: Option<f64>) -> Line {
        let mut latencies = m.latencies_us.clone();
        latencies.sort_unstable();
        Line {
            sent: m.sent,
            expected: m.expected,
            received: m.received,
            loss: if m.expected == 0 { 0.0 } else { (1.0 - m.received as f64 / m.expected as f64).max(0.0) },
            forwarded_per_sec: m.received as f64 / window.as_secs_f64(),
            cpu_s: cpu,
            generator_cpu_s,
            cpu_s_per_million: cpu.filter(|_| m.received > 0).map(|c| c / m.received as f64 * 1e6),
            p50_ms: percentile_ms(&latencies, 0.50),
            p99_ms: percentile_ms(&latencies, 0.99),
        }
    }
}

/// murmur's figures, as murmur-load printed them.
#[derive(Debug, Clone, Serialize)]
pub struct PeerLine {
    pub server_version: String,
    pub clients: u64,
    pub speakers: u64,
    pub loss: f64,
    pub forwarded_per_sec: f64,
    pub cpu_s_per_million: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub clients: usize,
    pub speakers: usize,
    pub channels: usize,
    pub secs: f64,
    pub datagram_bytes: usize,
    pub server_threads: usize,
    pub coalesce_ms: u32,
    pub voipc: Line,
    pub udp_batched: Line,
    pub udp_naive: Line,
    /// voipc's forwarded rate over the batched baseline's at this shape (its peak only
    /// when the shape is past what the baseline carries within 0.1 % loss).
    pub ratio_to_batched: f64,
    pub murmur: Option<PeerLine>,
    /// murmur's CPU per delivery over ours: how many times less CPU we spend.
    pub cpu_efficiency_vs_murmur: Option<f64>,
}

/// Measures `shape` on the three relays, one after the other.
pub async fn run(shape: Shape, json: bool) -> anyhow::Result<()> {
    let base = Instant::now();
    let peer = shape.peer.as_deref().map(read_peer).transpose()?;
    let voipc = {
        let (child, link, fingerprint) =
            spawn_server(shape.clients + 10, shape.coalesce_ms, shape.server_threads, shape.server_cpus.as_deref())
                .await?;
        let mut groups = Vec::new();
        for c in 0..shape.channels {
            let tag = format!("{}-{c}", std::process::id());
            groups.push(Group::quic(&link, fingerprint, shape.channel(c).0, &tag).await?);
        }
        if !json {
            eprintln!("voipc serve: {} clients connected", shape.clients);
        }
        measure(&shape, &groups, base, child.id()).await
    };
    let mut udp = Vec::new();
    for naive in [false, true] {
        let args = ["bench", "udp-relay", "--listen", "127.0.0.1:0"];
        let args = if naive { [&args[..], &["--naive"]].concat() } else { args.to_vec() };
        let (child, line) = spawn_self(&args, shape.server_cpus.as_deref()).await?;
        let addr = json_field(&line, "addr")?.parse()?;
        let mut groups = Vec::new();
        for c in 0..shape.channels {
            groups.push(Group::udp(addr, shape.channel(c).0, c as u16).await?);
        }
        udp.push(measure(&shape, &groups, base, child.id()).await);
    }
    let [udp_batched, udp_naive] = <[Line; 2]>::try_from(udp).expect("two lines");
    let cpu_efficiency_vs_murmur =
        peer.as_ref().zip(voipc.cpu_s_per_million).map(|(p, ours)| p.cpu_s_per_million / ours.max(1e-9));
    let report = Report {
        clients: shape.clients,
        speakers: shape.speakers,
        channels: shape.channels,
        secs: shape.window.as_secs_f64(),
        datagram_bytes: DATAGRAM_LEN,
        server_threads: shape.server_threads,
        coalesce_ms: shape.coalesce_ms,
        ratio_to_batched: voipc.forwarded_per_sec / udp_batched.forwarded_per_sec.max(1.0),
        voipc,
        udp_batched,
        udp_naive,
        murmur: peer,
        cpu_efficiency_vs_murmur,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print(&report);
    }
    Ok(())
}

/// Everyone speaks and listens as the shape says, on every channel at once; the relay's
/// CPU is read from its own process around it.
async fn measure(shape: &Shape, groups: &[Group], base: Instant, pid: Option<u32>) -> Line {
    let before = pid.and_then(cpu_seconds);
    let generator_before = cpu_seconds(std::process::id());
    let runs = groups.iter().enumerate().map(|(c, g)| g.measure(base, WARMUP, shape.window, shape.channel(c).1));
    let parts = futures::future::join_all(runs).await;
    let cpu = pid.and_then(cpu_seconds).zip(before).map(|(after, before)| after - before);
    let generator = cpu_seconds(std::process::id()).zip(generator_before).map(|(after, before)| after - before);
    let mut total = Measured::default();
    for part in parts {
        total.sent += part.sent;
        total.expected += part.expected;
        total.received += part.received;
        total.latencies_us.extend(part.latencies_us);
    }
    Line::of(&total, shape.window, cpu, generator)
}

/// The figures we compare from murmur-load's JSON line (its README names them).
fn read_peer(path: &std::path::Path) -> anyhow::Result<PeerLine> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let line = text.lines().rev().find(|l| l.trim_start().starts_with('{')).context("no JSON line from murmur-load")?;
    let v: serde_json::Value = serde_json::from_str(line).context("murmur-load's line is not JSON")?;
    let number = |field: &str| v[field].as_f64().with_context(|| format!("no {field} in murmur-load's line"));
    Ok(PeerLine {
        server_version: v["server_version"].as_str().unwrap_or("murmur").to_owned(),
        clients: number("clients")? as u64,
        speakers: number("speakers")? as u64,
        loss: number("loss")?,
        forwarded_per_sec: number("forwarded_pps")?,
        cpu_s_per_million: number("server_cpu_s_per_million")?,
        p50_ms: number("latency_p50_ms")?,
        p99_ms: number("latency_p99_ms")?,
    })
}

fn print(report: &Report) {
    println!(
        "relay shape: {} clients in {} channel(s), {} speaking, {} B datagrams at 50/s, {:.1} s; \
         voipc serve --threads {}, media_coalesce_ms {}",
        report.clients,
        report.channels,
        report.speakers,
        report.datagram_bytes,
        report.secs,
        report.server_threads,
        report.coalesce_ms
    );
    println!(
        "{:<28} {:>12} {:>8} {:>10} {:>8} {:>8} {:>12}",
        "relay", "forwarded/s", "loss", "cpu s/M", "p50 ms", "p99 ms", "load cpu s"
    );
    let cpu = |c: Option<f64>| c.map_or_else(|| "-".to_owned(), |c| format!("{c:.2}"));
    for (name, l) in [
        ("voipc serve (QUIC)", &report.voipc),
        ("plain UDP, batched", &report.udp_batched),
        ("plain UDP, naive", &report.udp_naive),
    ] {
        println!(
            "{name:<28} {:>12.0} {:>7.3}% {:>10} {:>8.2} {:>8.2} {:>12}",
            l.forwarded_per_sec,
            l.loss * 100.0,
            cpu(l.cpu_s_per_million),
            l.p50_ms,
            l.p99_ms,
            cpu(l.generator_cpu_s)
        );
    }
    if let Some(m) = &report.murmur {
        let name = format!("murmur {}", m.server_version);
        println!(
            "{name:<28} {:>12.0} {:>7.3}% {:>10.2} {:>8.2} {:>8.2}",
            m.forwarded_per_sec,
            m.loss * 100.0,
            m.cpu_s_per_million,
            m.p50_ms,
            m.p99_ms
        );
    }
    println!("voipc / batched plain UDP, forwarded: {:.2} (target >= 0.6 at the peak)", report.ratio_to_batched);
    if let Some(e) = report.cpu_efficiency_vs_murmur {
        println!("murmur's CPU per delivery / voipc's: {e:.2} (target >= 2)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(clients: usize, speakers: usize, channels: usize) -> Shape {
        let window = Duration::from_secs(1);
        Shape { clients, speakers, channels, window, server_threads: 1, coalesce_ms: 2, server_cpus: None, peer: None }
    }

    #[test]
    fn clients_and_speakers_are_spread_evenly_and_all_placed() {
        let s = shape(1000, 200, 100);
        assert!((0..100).all(|c| s.channel(c) == (10, 2)));
        let s = shape(10, 3, 4);
        let spread: Vec<_> = (0..4).map(|c| s.channel(c)).collect();
        assert_eq!(spread, [(3, 1), (3, 1), (2, 1), (2, 0)]);
        assert_eq!(spread.iter().map(|(m, _)| m).sum::<usize>(), 10);
        let s = shape(4, 9, 2);
        assert_eq!((s.channel(0), s.channel(1)), ((2, 2), (2, 2)), "never more speakers than members");
    }
}
