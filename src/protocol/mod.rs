//! Wire types shared by the relay and the clients. Pure: no IO, no clock, no tokio.
//!
//! Two kinds of traffic cross a connection:
//! - control: one bidirectional QUIC stream of length-prefixed postcard frames
//!   ([`frame`], [`ClientMsg`], [`ServerMsg`]);
//! - media: QUIC datagrams that start with a small plaintext [`MediaHeader`] the relay
//!   reads to route them; the rest is end-to-end encrypted and never looked at.

pub mod frame;
pub mod link;
pub mod media;
mod messages;

pub use frame::{FrameDecoder, FrameError, MAX_FRAME_LEN, decode_frame, encode_frame};
pub use link::{Fingerprint, LinkError, ServerLink, percent_encode};
pub use media::{MEDIA_HEADER_LEN, MediaHeader, MediaHeaderError, StreamType};
pub use messages::*;

/// The version a hello carries; peers with another version are refused with both named.
pub const PROTOCOL_VERSION: u16 = 1;

/// The TLS ALPN token of this protocol version.
pub const ALPN: &[u8] = b"voipc/1";

/// The UDP port a server listens on when none is configured.
pub const DEFAULT_PORT: u16 = 9987;
