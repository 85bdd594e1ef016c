//! The fuzz targets: every decoder of bytes from the network or from disk, and the cores
//! those bytes drive. Each function takes arbitrary bytes and must neither panic nor
//! allocate from a length it was given. `fuzz/` runs them under libFuzzer (`just fuzz`);
//! the test suite replays their corpora and the inputs of crashes fixed (`fuzz/corpus/`,
//! `fuzz/regressions/`, one directory per target).
//!
//! Inputs that carry several messages are split by [`frames`]: a 2-byte length before
//! each, so the fuzzer can grow a conversation one message at a time.
#![allow(clippy::disallowed_methods, reason = "the cores are driven on a clock of the fuzzer's choosing")]

use std::cell::RefCell;
use std::time::{Duration, Instant, SystemTime};

use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::config::ServerConfig;
use crate::crypto::sframe;
use crate::e2ee::E2ee;
use crate::protocol::bundle::{BundleUpload, PeerBundle};
use crate::protocol::{ClientMsg, Fingerprint, MediaHeader, ServerLink, ServerMsg, decode_frame};
use crate::relay::route::MediaPaths;
use crate::relay::{ConnId, Input, Relay, RelayConfig, Source};
use crate::session::{Chat, Session};

/// A fuzz target: any bytes in, no panic out.
pub type Target = fn(&[u8]);

/// Every target, by the name its corpus directory and fuzz binary have.
pub const TARGETS: [(&str, Target); 9] = [
    ("client_messages", client_messages),
    ("server_messages", server_messages),
    ("media_header", media_header),
    ("sframe", sframe_packet),
    ("links", links),
    ("vault_file", vault_file),
    ("bundles", bundles),
    ("screen_fragments", screen_fragments),
    ("y4m_file", y4m_file),
];

/// Splits `data` into messages, each a 2-byte big-endian length and that many bytes (the
/// last one may be short).
fn frames(mut data: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || {
        let (len, rest) = data.split_first_chunk::<2>()?;
        let len = usize::from(u16::from_be_bytes(*len)).min(rest.len());
        let (frame, rest) = rest.split_at(len);
        data = rest;
        Some(frame)
    })
}

/// Client messages from three connections (the first byte of each frame picks which,
/// and whether it is a message, a disconnect or the passing of time) into a relay.
pub fn client_messages(data: &[u8]) {
    let mut relay = Relay::new(RelayConfig::from_server_config(&mut ServerConfig::default()), [1; 32]);
    let mut now = Instant::now();
    let source = Source::of(std::net::Ipv4Addr::LOCALHOST.into());
    for conn in 0..3 {
        let _ = relay.handle_input(now, ConnId(conn), Input::Connected { source, started_lately: 1 });
    }
    let mut paths = MediaPaths::default();
    for frame in frames(data) {
        let Some((&control, body)) = frame.split_first() else { continue };
        let conn = ConnId(u64::from(control % 3));
        let input = match control >> 6 {
            0 => match decode_frame::<ClientMsg>(body) {
                Ok(msg) => Input::Control(msg),
                Err(_) => continue,
            },
            1 => {
                let _ = paths.route(&relay, now, conn, body);
                continue;
            }
            2 => {
                now += Duration::from_millis(u64::from(control & 0x3f) * 100);
                relay.handle_timeout(now);
                continue;
            }
            _ => Input::Disconnected,
        };
        let _ = relay.handle_input(now, conn, input);
        while relay.poll_output().is_some() {}
    }
}

thread_local! {
    /// One identity per fuzzing thread: making one costs more than thousands of runs.
    static E2EE: RefCell<Option<Vec<u8>>> = const { RefCell::new(None) };
}

/// A fresh copy of this thread's identity (the same keys every run).
fn identity() -> E2ee {
    E2EE.with(|cell| {
        let mut cell = cell.borrow_mut();
        let bytes = cell.get_or_insert_with(|| {
            let e2ee = E2ee::generate(&mut StdRng::seed_from_u64(7), SystemTime::UNIX_EPOCH)
                .expect("generating an identity does not fail");
            e2ee.to_bytes().to_vec()
        });
        E2ee::from_bytes(bytes).expect("our own identity reads back")
    })
}

/// Server messages into a client session: what a hostile server can make a client do.
pub fn server_messages(data: &[u8]) {
    let chat = Chat::new(identity(), Default::default(), [2; 32], "h:1".into(), "ab".repeat(32));
    let now = Instant::now();
    let mut session = Session::new("alice", None, "voipc://h:1/?fp=ab".into(), chat, now, SystemTime::UNIX_EPOCH);
    for frame in frames(data) {
        match frame.split_first() {
            Some((0, datagram)) => session.handle_datagram(now, datagram),
            _ => {
                if let Ok(msg) = decode_frame::<ServerMsg>(frame) {
                    let _ = session.handle_message(now, msg);
                }
            }
        }
        while session.poll_event().is_some() {}
        while session.poll_transmit().is_some() {}
    }
}

/// A media datagram's plaintext header.
pub fn media_header(data: &[u8]) {
    if let Ok((header, payload)) = MediaHeader::parse(data) {
        assert_eq!(header.to_datagram(payload), data, "a parsed header writes back as it was");
    }
}

/// An SFrame packet: its header, its key id, and opening it under a fixed key (the first
/// 20 bytes stand for the media header it is bound to).
pub fn sframe_packet(data: &[u8]) {
    let _ = sframe::Header::parse(data);
    let _ = sframe::peek_kid(data);
    let (metadata, packet) = data.split_at(data.len().min(crate::protocol::MEDIA_HEADER_LEN));
    let _ = sframe::Opener::new(5, &[9; 32]).open(metadata, packet);
}

/// Invite links, addresses and fingerprints as a user pastes them.
pub fn links(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = text.parse::<Fingerprint>();
    if let Ok(link) = text.parse::<ServerLink>() {
        // What we make of a link we can write and read again.
        let again: ServerLink = link.invite_base(&Fingerprint([0; 32])).parse().expect("our own link reads back");
        assert_eq!((again.host, again.port), (link.host, link.port));
    }
}

/// A vault file, opened with a password.
pub fn vault_file(data: &[u8]) {
    let _ = crate::crypto::vault::Vault::open_bytes(std::path::Path::new("fuzz.vault"), data.to_vec(), b"password");
}

/// Pre-key bundles: one a user uploads (the server keeps it), one a peer's (our client
/// starts a session with it).
pub fn bundles(data: &[u8]) {
    let mut frames = frames(data);
    if let Some(upload) = frames.next().and_then(|f| decode_frame::<BundleUpload>(f).ok())
        && let Ok(mut stored) = crate::relay::keys::StoredBundle::new(upload)
    {
        let _ = stored.hand_out(true);
        let _ = stored.hand_out(false);
    }
    if let Some(peer) = frames.next().and_then(|f| decode_frame::<PeerBundle>(f).ok()) {
        let _ = identity().start_session("h:1/bob", &peer, SystemTime::UNIX_EPOCH, &mut StdRng::seed_from_u64(3));
    }
}

/// Screen datagrams (one per frame of [`frames`]; the first byte of each advances the
/// clock) into one viewer's reassembly, and what completes opened under a fixed key:
/// memory stays within the bound whatever the fragments claim.
pub fn screen_fragments(data: &[u8]) {
    use crate::protocol::fragment::{MAX_FRAME_BYTES, PARTIAL_FRAMES, Reassembler};
    let sender = crate::protocol::SessionId(7);
    let mut now = Instant::now();
    let mut reassembler = Reassembler::new(sender, now);
    let mut opener = sframe::Opener::new(sframe::screen_kid(7, 0), &[9; 32]);
    for frame in frames(data) {
        let Some((tick, datagram)) = frame.split_first() else { continue };
        now += Duration::from_millis(u64::from(*tick));
        reassembler.handle_timeout(now);
        let Ok((mut header, _)) = MediaHeader::parse(datagram) else { continue };
        header.sender = sender;
        if let Ok(Some(sealed)) = reassembler.push(now, header, datagram) {
            let _ = opener.open(&sealed.aad(), &sealed.sealed);
        }
        let _ = reassembler.take_keyframe_request(now);
        assert!(reassembler.buffered_bytes() <= PARTIAL_FRAMES * MAX_FRAME_BYTES);
    }
}

/// A Y4M file, as `--share-screen FILE.y4m` reads it: its frames until the end or an error.
pub fn y4m_file(data: &[u8]) {
    if let Ok(mut reader) = crate::video::y4m::Y4mReader::new(data) {
        while let Ok(Some(_)) = reader.next_frame() {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::encode_frame;

    /// A message's encoding, as a control frame carries it after its length.
    fn body<T: serde::Serialize>(msg: &T) -> Vec<u8> {
        encode_frame(msg).unwrap()[crate::protocol::frame::LEN_PREFIX..].to_vec()
    }

    /// `body` as one of [`frames`]' messages, behind a `control` byte when given.
    fn framed(control: Option<u8>, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let len = body.len() + usize::from(control.is_some());
        out.extend_from_slice(&(len as u16).to_be_bytes());
        out.extend(control);
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn frames_split_on_their_lengths_and_stop_at_the_end() {
        let data = [0, 2, 7, 8, 0, 0, 0, 5, 1];
        let split: Vec<&[u8]> = frames(&data).collect();
        assert_eq!(split, [&[7u8, 8][..], &[][..], &[1][..]]);
        assert_eq!(frames(&[9]).count(), 0);
    }

    #[test]
    fn the_targets_take_real_inputs_and_garbage() {
        // Real messages, so that the test drives the cores past their decoders.
        let hello =
            ClientMsg::Hello { version: crate::protocol::PROTOCOL_VERSION, name: "a".into(), join: None, bundle: None };
        let mut conversation = framed(Some(0), &body(&hello));
        conversation.extend(framed(Some(0x80 | 3), &[]));
        client_messages(&conversation);
        let welcome = ServerMsg::Welcome {
            session: crate::protocol::SessionId(1),
            name: "alice".into(),
            server_version: crate::protocol::PROTOCOL_VERSION,
            challenge: [0; 32],
        };
        server_messages(&framed(None, &body(&welcome)));
        links(b"voipc://example.org:9987/?fp=ab");
        for (_, target) in TARGETS {
            for garbage in [&[][..], &[0xff; 64][..], &[0, 3, 0, 1, 2][..]] {
                target(garbage);
            }
        }
    }

    /// Every input the fuzzer kept, and every input of a crash since fixed, runs clean.
    #[test]
    fn every_corpus_and_regression_input_runs_clean() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
        let mut ran = 0;
        for (name, target) in TARGETS {
            for kind in ["corpus", "regressions"] {
                let Ok(entries) = std::fs::read_dir(root.join(kind).join(name)) else { continue };
                for entry in entries {
                    let path = entry.unwrap().path();
                    let input = std::fs::read(&path).unwrap();
                    let outcome = std::panic::catch_unwind(|| target(&input));
                    assert!(outcome.is_ok(), "{name}: {} panics", path.display());
                    ran += 1;
                }
            }
        }
        println!("{ran} fuzz inputs replayed");
    }

    /// Mutants of `input`: bits flipped, bytes set to edge values, spans cut, repeated or
    /// inserted, the end cut off, or a piece of `other` spliced in; a few at once.
    fn mutate(rng: &mut StdRng, input: &[u8], other: &[u8]) -> Vec<u8> {
        use rand::Rng;
        let mut out = input.to_vec();
        for _ in 0..rng.random_range(1..=4) {
            let len = out.len();
            let at = if len == 0 { 0 } else { rng.random_range(0..len) };
            let span = rng.random_range(1..=16).min(len - at.min(len)).max(1);
            match rng.random_range(0..7) {
                0 if len > 0 => out[at] ^= 1 << rng.random_range(0..8),
                1 if len > 0 => out[at] = [0, 1, 0x7f, 0x80, 0xff][rng.random_range(0..5)],
                2 if len > 0 => drop(out.drain(at..(at + span).min(len))),
                3 if len > 0 => {
                    let piece = out[at..(at + span).min(len)].to_vec();
                    out.splice(at..at, piece);
                }
                4 => {
                    let piece: Vec<u8> = (0..rng.random_range(1..=8)).map(|_| rng.random()).collect();
                    out.splice(at..at, piece);
                }
                5 => out.truncate(at),
                _ if !other.is_empty() => {
                    let from = rng.random_range(0..other.len());
                    let piece = &other[from..(from + rng.random_range(1..=64)).min(other.len())];
                    out.splice(at..at, piece.iter().copied());
                }
                _ => {}
            }
        }
        out
    }

    /// What CI can afford of fuzzing (the coverage-guided build, `just fuzz`, takes longer
    /// than CI has): blind mutants of every target's corpus for a moment each, from a seed
    /// that changes each run (`VOIPC_FUZZ_SEED` replays one).
    #[test]
    fn mutants_of_every_corpus_run_clean() {
        const PER_TARGET: Duration = Duration::from_secs(2);
        let seed = std::env::var("VOIPC_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
        println!("fuzz mutants from seed {seed} (VOIPC_FUZZ_SEED={seed} replays them)");
        let mut rng = StdRng::seed_from_u64(seed);
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
        for (name, target) in TARGETS {
            let mut inputs: Vec<Vec<u8>> = std::fs::read_dir(root.join(name))
                .map(|entries| entries.map(|e| std::fs::read(e.unwrap().path()).unwrap()).collect())
                .unwrap_or_default();
            inputs.push(Vec::new());
            let (began, mut ran) = (Instant::now(), 0);
            while began.elapsed() < PER_TARGET {
                ran += 1;
                use rand::seq::IndexedRandom;
                let (input, other) = (inputs.choose(&mut rng).unwrap(), inputs.choose(&mut rng).unwrap());
                let mutant = mutate(&mut rng, input, other);
                let outcome = std::panic::catch_unwind(|| target(&mutant));
                assert!(outcome.is_ok(), "{name} panics on its mutant {ran} (seed {seed}): {mutant:02x?}");
            }
            println!("fuzz: {name}: {ran} mutants, 0 panics");
        }
    }
}
