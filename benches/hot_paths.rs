//! The relay's per-datagram path, the control-frame codec, SFrame and the jitter buffer, each beside a baseline
//! measured in the same run (these machines are noisy: read ratios, not absolutes).
#![allow(clippy::disallowed_methods, reason = "benchmarks read the clock")]

use std::hint::black_box;
use std::time::Instant;

use criterion::{Criterion, criterion_group, criterion_main};
use voipc::config::ServerConfig;
use voipc::protocol::{
    ChannelId, ClientMsg, JoinRequest, MediaHeader, PROTOCOL_VERSION, SessionId, StreamType, decode_frame, encode_frame,
};
use voipc::relay::route::MediaPath;
use voipc::relay::{ConnId, Input, Relay, RelayConfig, Source};

/// A relay with `members` users in the Lobby; returns it and the first user's id.
fn relay_with(members: u64, now: Instant) -> (Relay, ConnId) {
    let mut config = ServerConfig { max_users: members as u32, ..ServerConfig::default() };
    config.limits.media_packets_per_sec = u32::MAX / 2;
    config.limits.media_bytes_per_sec = u32::MAX / 2;
    config.limits.voice_packets_per_sec = u32::MAX / 2;
    config.limits.voice_bytes_per_sec = u32::MAX / 2;
    let mut relay = Relay::new(RelayConfig::from_server_config(&mut config), [1; 32]);
    for i in 1..=members {
        // Each member from an address of its own, as on a real server.
        let source = Source::of(std::net::Ipv4Addr::from_bits(0x0a00_0000 + i as u32).into());
        relay.handle_input(now, ConnId(i), Input::Connected { source, started_lately: 1 }).unwrap();
        let hello = ClientMsg::Hello { version: PROTOCOL_VERSION, name: format!("user{i}"), join: None, bundle: None };
        relay.handle_input(now, ConnId(i), Input::Control(hello)).unwrap();
    }
    while relay.poll_output().is_some() {}
    (relay, ConnId(1))
}

fn route(c: &mut Criterion) {
    let now = Instant::now();
    let mut group = c.benchmark_group("route_datagram");
    for members in [2u64, 10, 50] {
        let (relay, sender) = relay_with(members, now);
        let datagram = MediaHeader {
            stream: StreamType::Voice,
            flags: 0,
            channel: ChannelId(1),
            sender: SessionId(1),
            sequence: 7,
            timestamp: 960,
        }
        .to_datagram(&[0u8; 140]);
        // The datagram path as the server runs it: a copy of the route, no lock.
        let mut path = MediaPath::<ConnId>::new(&relay, now);
        path.refresh(&relay, sender, Some);
        group.bench_function(format!("relay/{members}_members"), |b| {
            b.iter(|| black_box(path.route(now, black_box(&datagram)).unwrap().len()))
        });
        let mut to = Vec::with_capacity(members as usize);
        // Baseline: the least a fan-out must do, listing the other members.
        let members_list: Vec<ConnId> = (1..=members).map(ConnId).collect();
        group.bench_function(format!("baseline_list_copy/{members}_members"), |b| {
            b.iter(|| {
                to.clear();
                to.extend(members_list.iter().copied().filter(|m| *m != black_box(sender)));
                black_box(to.len())
            })
        });
    }
    group.finish();
}

fn codec(c: &mut Criterion) {
    let msg = ClientMsg::Join(JoinRequest {
        channel: "Late Night".into(),
        password: Some("correct horse".into()),
        invite: None,
    });
    let frame = encode_frame(&msg).unwrap();
    let mut group = c.benchmark_group("control_frame");
    group.bench_function("encode_decode", |b| {
        b.iter(|| {
            let frame = encode_frame(black_box(&msg)).unwrap();
            black_box(decode_frame::<ClientMsg>(&frame[4..]).unwrap())
        })
    });
    // Baseline: copying the frame's bytes once.
    group.bench_function("baseline_copy", |b| b.iter(|| black_box(black_box(&frame).to_vec())));
    group.finish();
}

/// SFrame seal and open of a voice-sized and a screen-sized packet, beside aws-lc-rs's
/// AES-256-GCM (the TLS provider's) on the same bytes.
fn sframe(c: &mut Criterion) {
    use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
    use voipc::crypto::sframe::{Opener, Sealer};
    let header = [0u8; 20];
    let mut group = c.benchmark_group("sframe");
    for size in [160usize, 1200] {
        let payload = vec![7u8; size];
        let mut sealer = Sealer::new(1, &[9; 32]);
        let mut packet = Vec::with_capacity(size + 64);
        group.bench_function(format!("seal_open/{size}"), |b| {
            b.iter(|| {
                packet.clear();
                sealer.seal(&header, black_box(&payload), &mut packet).unwrap();
                // A fresh opener each time: the replay window refuses repeats.
                black_box(Opener::new(1, &[9; 32]).open(&header, &packet).unwrap())
            })
        });
        let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[9; 32]).unwrap());
        let mut buffer = Vec::with_capacity(size + 16);
        group.bench_function(format!("baseline_aws_lc_seal_open/{size}"), |b| {
            b.iter(|| {
                buffer.clear();
                buffer.extend_from_slice(black_box(&payload));
                key.seal_in_place_append_tag(Nonce::assume_unique_for_key([1; 12]), Aad::from(&header), &mut buffer)
                    .unwrap();
                black_box(
                    key.open_in_place(Nonce::assume_unique_for_key([1; 12]), Aad::from(&header), &mut buffer)
                        .unwrap()
                        .len(),
                )
            })
        });
    }
    group.finish();
}

/// One packet in and one 20 ms tick out of a jitter buffer, beside moving the same
/// payload through a plain queue.
fn jitter(c: &mut Criterion) {
    use std::collections::VecDeque;
    use std::time::Duration;
    use voipc::audio::jitter::{JitterBuffer, Playout};
    let start = Instant::now();
    let payload = vec![0u8; 120];
    let mut group = c.benchmark_group("jitter_buffer");
    let mut buffer = JitterBuffer::default();
    let mut n = 0u32;
    group.bench_function("push_pop", |b| {
        b.iter(|| {
            let now = start + Duration::from_millis(20 * u64::from(n));
            buffer.push(now, n, n.wrapping_mul(960), payload.clone());
            n = n.wrapping_add(1);
            black_box(matches!(buffer.pop(now + Duration::from_millis(45)), Playout::Packet(_)))
        })
    });
    let mut queue = VecDeque::new();
    group.bench_function("baseline_queue", |b| {
        b.iter(|| {
            queue.push_back(payload.clone());
            black_box(queue.pop_front())
        })
    });
    group.finish();
}

criterion_group!(benches, route, codec, sframe, jitter);
criterion_main!(benches);
