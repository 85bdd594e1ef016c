//! `voipc bench voice`: mouth-to-ear latency through a loopback relay, excluding device
//! buffers. One process runs two clients' real voice engines (capture: RNNoise, gate,
//! Opus; playback: jitter buffer, decoder, mixer) over QUIC through a real `voipc serve`
//! with real SFrame; the recording's lag behind the speech, measured by cross-correlation,
//! is the latency. The baseline in the same run is the relay's own one-way time for the
//! same packets.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use serde_json::json;

use super::load::Group;
use super::{json_field, spawn_self};
use crate::audio::dsp::VoiceMode;
use crate::audio::engine::{Engine, EngineConfig, EngineEvent, Source};
use crate::audio::pipeline::CaptureSettings;
use crate::audio::quality::{compare, fine_lag};
use crate::audio::wav::read_voice;
use crate::audio::{FRAME_20MS, SAMPLE_RATE};
use crate::protocol::{Fingerprint, MediaHeader, ServerLink, StreamType};
use crate::session::media::MediaKeys;

pub async fn run(rounds: usize, json: bool) -> anyhow::Result<()> {
    let speech = read_voice(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/speech.wav"))
        .context("the latency bench plays assets/speech.wav: run it from the source tree")?;
    let (_server, line) = spawn_self(&["serve", "--listen", "127.0.0.1:0", "--ephemeral-cert", "--json"], None).await?;
    let fingerprint: Fingerprint = json_field(&line, "fingerprint")?.parse()?;
    let link: ServerLink = json_field(&line, "addr")?.parse()?;
    let group = Group::quic(&link, fingerprint, 2, "voice").await?;
    let members = group.quic_members();
    let [(alice, alice_header), (bob, _)] = &members[..] else { anyhow::bail!("expected two members") };

    let mut latencies = Vec::new();
    let mut relay_ms = Vec::new();
    for round in 0..rounds {
        let (mut sender, mut receiver) = (MediaKeys::default(), MediaKeys::default());
        let share = sender.start_epoch(alice_header.sender, alice_header.channel, &mut rand::rng());
        receiver.install(alice_header.sender, &share, alice_header.channel, &mut VecDeque::new());
        let recording = std::env::temp_dir().join(format!("voipc-latency-{}-{round}.wav", std::process::id()));
        let (mut listener, mut listener_events) =
            Engine::start(EngineConfig { output_device: None, record: Some(recording.clone()) })?;
        let recording_started = Instant::now();
        let (mut talker, mut events) = Engine::start(EngineConfig { output_device: None, record: None })?;
        // Always on: the gate's decisions are not what is measured.
        let settings = CaptureSettings { mode: VoiceMode::AlwaysOn, ..CaptureSettings::default() };
        talker.start_capture(Source::Samples(speech.clone()), settings)?;
        let speaking_started = Instant::now();
        let mut sent_at = std::collections::HashMap::new();
        let mut opened = VecDeque::new();
        let deadline =
            tokio::time::Instant::now() + Duration::from_secs_f64(speech.len() as f64 / f64::from(SAMPLE_RATE) + 3.0);
        loop {
            tokio::select! {
                event = events.recv() => match event {
                    Some(EngineEvent::Packet(packet)) => {
                        let datagram = sender
                            .seal(alice_header.sender, StreamType::Voice, packet.sequence, packet.timestamp, &packet.payload)
                            .context("the sender has a key")?;
                        sent_at.insert(packet.sequence, Instant::now());
                        alice.send_datagram(Bytes::from(datagram))?;
                    }
                    Some(_) => {}
                    None => break,
                },
                datagram = bob.read_datagram() => {
                    let datagram = datagram?;
                    let arrival = Instant::now();
                    let Ok((header, _)) = MediaHeader::parse(&datagram) else { continue };
                    if let Some(sent) = sent_at.get(&header.sequence) {
                        relay_ms.push(arrival.duration_since(*sent).as_secs_f64() * 1000.0);
                    }
                    receiver.open(header, header.channel, &datagram, &mut opened);
                    for frame in opened.drain(..) {
                        listener.play(arrival, frame.sender.0, frame.sequence, frame.timestamp, frame.payload);
                    }
                }
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        talker.finish()?;
        listener.finish()?;
        while listener_events.try_recv().is_ok() {}
        let recorded = read_voice(&recording)?;
        let _ = std::fs::remove_file(&recording);
        let matched = compare(&speech, &recorded);
        let lag = fine_lag(&speech, &recorded, matched.lag_ms) as f64 / f64::from(SAMPLE_RATE) * 1000.0;
        // The recording began before the speech did; what is left is mouth to ear.
        let head_start = speaking_started.duration_since(recording_started).as_secs_f64() * 1000.0;
        latencies.push(lag - head_start);
    }
    latencies.sort_by(f64::total_cmp);
    relay_ms.sort_by(f64::total_cmp);
    let median = |v: &[f64]| v.get(v.len() / 2).copied().unwrap_or(f64::NAN);
    let (mouth_to_ear, relay) = (median(&latencies), median(&relay_ms));
    if json {
        println!(
            "{}",
            json!({"mouth_to_ear_ms": latencies, "median_ms": mouth_to_ear, "relay_one_way_median_ms": relay,
                   "frame_ms": FRAME_20MS as f64 / 48.0, "target_ms": 60})
        );
    } else {
        let rounds: Vec<String> = latencies.iter().map(|l| format!("{l:.1}")).collect();
        println!(
            "mouth to ear through a loopback relay: median {mouth_to_ear:.1} ms over {} rounds ({} ms; target <= 60 ms); \
             of which the relay's one-way time (baseline, same packets): median {relay:.2} ms",
            latencies.len(),
            rounds.join(", ")
        );
    }
    Ok(())
}
