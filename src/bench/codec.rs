//! `voipc bench codec`: the voice path's costs, each beside a baseline from the same run.
//! Opus and RNNoise as multiples of real time; SFrame packets per second beside the TLS
//! provider's own AES-256-GCM (aws-lc-rs) on the same bytes; and the whole client
//! pipeline (capture side with echo cancellation, and the receive side of a 5-speaker
//! channel) as a share of one core; and the echo canceller on a simulated room.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use serde_json::json;

use crate::audio::codec::{EncoderSettings, VoiceDecoder, VoiceEncoder};
use crate::audio::dsp::Denoiser;
use crate::audio::echo::{self, EchoCanceller};
use crate::audio::pipeline::{Capture, CaptureSettings, Playback};
use crate::audio::wav::read_voice;
use crate::audio::{FRAME_10MS, FRAME_20MS, SAMPLE_RATE};
use crate::crypto::sframe::{Opener, Sealer, media_kid};
use crate::protocol::{ChannelId, MediaHeader, SessionId, StreamType};
use crate::session::media::MediaKeys;

/// Speakers in the receive-side case.
const SPEAKERS: u32 = 5;

/// The voice the bench encodes: the speech sample when run from the source tree, else a
/// synthetic voiced signal of the same length.
fn voice() -> Vec<f32> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/speech.wav");
    read_voice(&path).unwrap_or_else(|_| {
        (0..5 * SAMPLE_RATE as usize)
            .map(|n| ((n % 400) as f32 / 400.0 - 0.5) * 0.2 * (n as f32 * 0.0005).sin())
            .collect()
    })
}

/// Repeats `op` for at least `window`; returns runs per second.
fn rate(window: Duration, mut op: impl FnMut()) -> f64 {
    let start = Instant::now();
    let mut runs = 0u64;
    while start.elapsed() < window {
        op();
        runs += 1;
    }
    runs as f64 / start.elapsed().as_secs_f64()
}

pub fn run(window: Duration, json: bool) -> anyhow::Result<()> {
    let voice = voice();
    let seconds_of_voice = voice.len() as f64 / f64::from(SAMPLE_RATE);
    let frames: Vec<[f32; FRAME_20MS]> = voice.chunks_exact(FRAME_20MS).map(|c| c.try_into().expect("20 ms")).collect();

    let mut results = Vec::new();
    for complexity in [10, 5] {
        let mut encoder = VoiceEncoder::new(EncoderSettings { complexity, ..EncoderSettings::default() })?;
        let encode = rate(window, || {
            for frame in &frames {
                let _ = encoder.encode(frame);
            }
        }) * seconds_of_voice;
        results.push((format!("opus encode, complexity {complexity}"), encode, "x real time"));
    }
    let mut encoder = VoiceEncoder::new(EncoderSettings::default())?;
    let packets: Vec<Vec<u8>> =
        frames.iter().map(|f| encoder.encode(f).map(<[u8]>::to_vec)).collect::<Result<_, _>>()?;
    let mut decoder = VoiceDecoder::new()?;
    let mut out = [0.0; FRAME_20MS];
    let decode = rate(window, || {
        for packet in &packets {
            let _ = decoder.decode(packet, &mut out);
        }
    }) * seconds_of_voice;
    results.push(("opus decode".into(), decode, "x real time"));
    let mut denoiser = Denoiser::default();
    let mut frame = [0.0; FRAME_10MS];
    let denoise = rate(window, || {
        for chunk in voice.chunks_exact(FRAME_10MS) {
            frame.copy_from_slice(chunk);
            denoiser.process(&mut frame, true);
        }
    }) * seconds_of_voice;
    results.push(("rnnoise".into(), denoise, "x real time"));
    let mut near_end = EchoCanceller::new()?;
    let mut far_end = near_end.clone();
    let cancel = rate(window, || {
        for chunk in voice.chunks_exact(FRAME_10MS) {
            frame.copy_from_slice(chunk);
            far_end.far_end(&frame);
            near_end.near_end(&mut frame);
        }
    }) * seconds_of_voice;
    results.push(("echo cancellation (far + near end)".into(), cancel, "x real time"));
    let echo_rows =
        [30, 120].map(|delay_ms| echo::measure(&voice, delay_ms)).into_iter().collect::<Result<Vec<_>, _>>()?;

    // SFrame against aws-lc-rs's AES-256-GCM on the same payload and header.
    let header = [0u8; 20];
    let mut sframe_rows = Vec::new();
    for size in [160usize, 1200] {
        let payload = vec![7u8; size];
        let mut sealer = Sealer::new(media_kid(1, 0), &[9; 32]);
        let mut packet = Vec::with_capacity(size + 64);
        let seal = rate(window, || {
            packet.clear();
            let _ = sealer.seal(&header, &payload, &mut packet);
        });
        let mut fresh = Sealer::new(media_kid(1, 0), &[9; 32]);
        let sealed: Vec<Vec<u8>> = (0..4096)
            .map(|_| {
                let mut p = Vec::new();
                fresh.seal(&header, &payload, &mut p).map(|()| p)
            })
            .collect::<Result<_, _>>()?;
        let mut i = 0;
        let mut opener = Opener::new(media_kid(1, 0), &[9; 32]);
        let open = rate(window, || {
            // A new opener every 4096 packets: the replay window refuses repeats.
            if i % sealed.len() == 0 {
                opener = Opener::new(media_kid(1, 0), &[9; 32]);
            }
            let _ = opener.open(&header, &sealed[i % sealed.len()]);
            i += 1;
        });
        let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[9; 32]).map_err(|_| anyhow::anyhow!("aws-lc key"))?);
        let mut buffer = Vec::with_capacity(size + 16);
        let mut counter = 0u64;
        let baseline = rate(window, || {
            counter += 1;
            let mut nonce = [0u8; 12];
            nonce[4..].copy_from_slice(&counter.to_be_bytes());
            buffer.clear();
            buffer.extend_from_slice(&payload);
            let _ = key.seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(&header), &mut buffer);
            let _ = key.open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(&header), &mut buffer);
        });
        sframe_rows.push(json!({
            "bytes": size,
            "sframe_seal_per_sec": seal,
            "sframe_open_per_sec": open,
            "aws_lc_seal_and_open_per_sec": baseline,
            "ratio": 1.0 / (1.0 / seal + 1.0 / open) / baseline,
        }));
    }

    // The whole client pipeline over the sample: capture (echo cancellation, denoise, gate, encode, seal)
    // and the receive side of SPEAKERS senders (open, jitter buffer, decode, mix).
    let started = Instant::now();
    let mut capture = Capture::new(CaptureSettings::default())?;
    let canceller = EchoCanceller::new()?;
    capture.set_echo_canceller(canceller.clone());
    let mut far_end = canceller;
    let mut mine = MediaKeys::default();
    mine.start_epoch(SessionId(1), ChannelId(1), &mut rand::rng());
    for chunk in voice.chunks_exact(FRAME_10MS) {
        // The speaker's side of the canceller runs on the playback thread; it is counted here.
        far_end.far_end(chunk.try_into().expect("10 ms"));
        let report = capture.push_10ms(chunk.try_into().expect("10 ms"))?;
        if let Some(p) = report.packet {
            let _ = mine.seal(SessionId(1), StreamType::Voice, p.sequence, p.timestamp, &p.payload);
        }
    }
    let capture_share = started.elapsed().as_secs_f64() / seconds_of_voice;

    let mut senders: Vec<MediaKeys> = (0..SPEAKERS).map(|_| MediaKeys::default()).collect();
    let mut receiver = MediaKeys::default();
    let mut datagrams = Vec::new();
    for (i, keys) in senders.iter_mut().enumerate() {
        let who = SessionId(10 + i as u32);
        let share = keys.start_epoch(who, ChannelId(1), &mut rand::rng());
        receiver.install(who, &share, ChannelId(1), &mut VecDeque::new());
        for (n, packet) in packets.iter().enumerate() {
            let at = n as u32;
            datagrams.push((n, keys.seal(who, StreamType::Voice, at, at * FRAME_20MS as u32, packet).expect("keyed")));
        }
    }
    datagrams.sort_by_key(|(n, _)| *n);
    let base = Instant::now();
    let started = Instant::now();
    let mut playback = Playback::default();
    let (mut opened, mut changes) = (VecDeque::new(), Vec::new());
    let mut next = 0;
    for tick in 0..packets.len() + 10 {
        let now = base + Duration::from_millis(20 * tick as u64);
        while next < datagrams.len() && datagrams[next].0 <= tick {
            let datagram = &datagrams[next].1;
            if let Ok((header, _)) = MediaHeader::parse(datagram) {
                receiver.open(header, ChannelId(1), datagram, &mut opened);
            }
            for frame in opened.drain(..) {
                playback.push(now, frame.sender.0, frame.sequence, frame.timestamp, frame.payload)?;
            }
            next += 1;
        }
        playback.tick(now, &mut out, &mut changes);
    }
    let receive_share = started.elapsed().as_secs_f64() / seconds_of_voice;

    if json {
        let rows: Vec<_> =
            results.iter().map(|(what, value, unit)| json!({"what": what, "value": value, "unit": unit})).collect();
        let report = json!({
            "codec": rows,
            "sframe": sframe_rows,
            "echo": echo_rows,
            "pipeline": {"capture_share_of_core": capture_share, "receive_share_of_core_5_speakers": receive_share,
                         "total": capture_share + receive_share, "target": 0.05},
        });
        println!("{report}");
        return Ok(());
    }
    for (what, value, unit) in &results {
        println!("{what:<32} {value:>10.1} {unit}");
    }
    for row in &sframe_rows {
        println!(
            "sframe {:>4} bytes: seal {:>9.0}/s, open {:>9.0}/s; aws-lc-rs AES-256-GCM seal+open {:>9.0}/s; \
             sframe seal+open / baseline = {:.2}",
            row["bytes"],
            row["sframe_seal_per_sec"].as_f64().unwrap_or(0.0),
            row["sframe_open_per_sec"].as_f64().unwrap_or(0.0),
            row["aws_lc_seal_and_open_per_sec"].as_f64().unwrap_or(0.0),
            row["ratio"].as_f64().unwrap_or(0.0)
        );
    }
    for row in &echo_rows {
        println!(
            "echo cancellation, echo {} ms late: ERLE {:.1} dB; the near end through double talk {:.3} (with the echo, \
             before: {:.3})",
            row.delay_ms, row.erle_db, row.near_end_kept, row.near_end_in_microphone
        );
    }
    println!(
        "client pipeline: capture {:.2} % of a core, receive ({SPEAKERS} speakers) {:.2} %, total {:.2} % (target <= 5 %)",
        capture_share * 100.0,
        receive_share * 100.0,
        (capture_share + receive_share) * 100.0
    );
    Ok(())
}
