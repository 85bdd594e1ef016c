//! Wire types shared by the relay and the clients. Pure: no IO, no clock, no tokio.
//!
//! Two kinds of traffic cross a connection:
//! - control: one bidirectional QUIC stream of length-prefixed postcard frames
//!   ([`frame`], [`ClientMsg`], [`ServerMsg`]);
//! - media: QUIC datagrams that start with a small plaintext [`MediaHeader`] the relay
//!   reads to route them; the rest is end-to-end encrypted and never looked at.

pub mod bundle;
pub mod fragment;
pub mod frame;
pub mod link;
pub mod media;
mod messages;
pub mod names;

pub use fragment::{FragmentError, FragmentHeader, Reassembler, SealedFrame};
pub use frame::{FrameError, MAX_FRAME_LEN, decode_frame, encode_frame};
pub use link::{Fingerprint, LinkError, ServerLink, percent_encode};
pub use media::{MEDIA_HEADER_LEN, MediaHeader, MediaHeaderError, StreamType};
pub use messages::*;
pub use names::{NameError, canonical_name, check_visible};

/// The version a hello carries; peers with another version are refused with both named.
/// 2: the user listing in pages, presence changes in batches. 3: screen share (watching,
/// keyframe requests, viewer reports; a user shows its share). 4: screen frames carry
/// recovery fragments (an erasure code), counted in the fragment header's flags byte.
/// 5: a share's desktop audio (a media stream type of its own).
pub const PROTOCOL_VERSION: u16 = 5;

/// The TLS ALPN token of this protocol version.
pub const ALPN: &[u8] = b"voipc/1";

/// The UDP port a server listens on when none is configured.
pub const DEFAULT_PORT: u16 = 9987;

/// Every decoder of bytes from the network, fed random and mutated input: errors are
/// fine, panics are not. (Deterministic and quick, for `just test`; the coverage-guided
/// fuzzing is `just fuzz`, over the targets in `crate::fuzz`.)
#[cfg(test)]
mod robustness_tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    fn valid_frames() -> Vec<Vec<u8>> {
        let join = JoinRequest { channel: "Staff".into(), password: Some("pw".into()), invite: Some("t".into()) };
        let client = [
            ClientMsg::Hello {
                version: PROTOCOL_VERSION,
                name: "alice".into(),
                join: Some(join.clone()),
                bundle: None,
            },
            ClientMsg::Join(join),
            ClientMsg::CreateChannel { name: "a".into(), description: "b".into(), password: None, user_limit: 3 },
            ClientMsg::CreateInvite { max_uses: 1, ttl_secs: 2 },
        ];
        let server = [
            ServerMsg::Welcome {
                session: SessionId(1),
                name: "alice".into(),
                server_version: PROTOCOL_VERSION,
                challenge: [0; 32],
            },
            ServerMsg::Presence {
                users: vec![UserInfo {
                    session: SessionId(2),
                    name: "b".into(),
                    channel: Some(ChannelId(1)),
                    voice: Default::default(),
                    share: None,
                }],
                gone: vec![SessionId(3)],
            },
            ServerMsg::Error { code: ErrorCode::ChannelFull, message: "full".into() },
        ];
        let mut frames: Vec<Vec<u8>> = client.iter().map(|m| encode_frame(m).unwrap()).collect();
        frames.extend(server.iter().map(|m| encode_frame(m).unwrap()));
        frames
    }

    fn try_every_decoder(bytes: &[u8]) {
        let _ = decode_frame::<ClientMsg>(bytes);
        let _ = decode_frame::<ServerMsg>(bytes);
        let _ = MediaHeader::parse(bytes);
        if let Some(prefix) = bytes.first_chunk::<{ frame::LEN_PREFIX }>() {
            let _ = frame::body_len(*prefix);
        }
        if let Ok(text) = std::str::from_utf8(bytes) {
            let _ = text.parse::<ServerLink>();
            let _ = text.parse::<Fingerprint>();
        }
    }

    #[test]
    fn decoders_survive_random_and_mutated_input() {
        let mut rng = StdRng::seed_from_u64(1);
        let seeds = valid_frames();
        for round in 0..50_000 {
            let bytes: Vec<u8> = if round % 2 == 0 {
                (0..rng.random_range(0..64)).map(|_| rng.random()).collect()
            } else {
                let mut bytes = seeds[rng.random_range(0..seeds.len())].clone();
                for _ in 0..rng.random_range(1..4) {
                    let at = rng.random_range(0..bytes.len());
                    match rng.random_range(0..3) {
                        0 => bytes[at] = rng.random(),
                        1 => bytes.truncate(at),
                        _ => bytes.insert(at, rng.random()),
                    }
                    if bytes.is_empty() {
                        break;
                    }
                }
                bytes
            };
            try_every_decoder(&bytes);
            if bytes.len() > frame::LEN_PREFIX {
                try_every_decoder(&bytes[frame::LEN_PREFIX..]);
            }
        }
        try_every_decoder(b"voipc://[::1]:99999/?fp=%ff%");
    }
}
