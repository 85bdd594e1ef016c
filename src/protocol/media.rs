//! The plaintext header at the start of every media datagram.
//!
//! The relay reads only this to route a datagram; everything after it is end-to-end
//! encrypted payload that the relay forwards byte for byte. Layout (big-endian):
//!
//! ```text
//! 0        1        2        3        4               8               12              16              20
//! +--------+--------+--------+--------+---------------+---------------+---------------+---------------+
//! |version | stream | flags  |reserved|  channel u32  |  sender u32   | sequence u32  | timestamp u32 |
//! +--------+--------+--------+--------+---------------+---------------+---------------+---------------+
//! ```
//!
//! Sequence and timestamp wrap; receivers extend them to 64 bits before comparing.

use super::{ChannelId, SessionId};

/// Bytes of the media header.
pub const MEDIA_HEADER_LEN: usize = 20;

/// The media header layout version carried in byte 0.
pub const MEDIA_VERSION: u8 = 1;

/// What a media datagram carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamType {
    Voice,
    Screen,
    /// A screen share's desktop audio: Opus stereo, sealed under the screen key, routed
    /// like the screen (only to who watches).
    ScreenAudio,
    /// Test and benchmark traffic: opaque payload, routed like voice.
    Probe,
}

impl StreamType {
    fn to_byte(self) -> u8 {
        match self {
            StreamType::Voice => 1,
            StreamType::Screen => 2,
            StreamType::Probe => 3,
            StreamType::ScreenAudio => 4,
        }
    }

    fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            1 => Some(StreamType::Voice),
            2 => Some(StreamType::Screen),
            3 => Some(StreamType::Probe),
            4 => Some(StreamType::ScreenAudio),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MediaHeader {
    pub stream: StreamType,
    pub flags: u8,
    pub channel: ChannelId,
    pub sender: SessionId,
    pub sequence: u32,
    pub timestamp: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MediaHeaderError {
    #[error("datagram of {0} bytes is shorter than the {MEDIA_HEADER_LEN}-byte media header")]
    TooShort(usize),
    #[error("media header version {0} is not supported (this build speaks {MEDIA_VERSION})")]
    Version(u8),
    #[error("unknown media stream type {0}")]
    StreamType(u8),
    #[error("reserved media header byte is {0}, not 0")]
    Reserved(u8),
}

impl MediaHeader {
    /// Writes the header into the first [`MEDIA_HEADER_LEN`] bytes of `out`.
    pub fn write(&self, out: &mut [u8; MEDIA_HEADER_LEN]) {
        out[0] = MEDIA_VERSION;
        out[1] = self.stream.to_byte();
        out[2] = self.flags;
        out[3] = 0;
        out[4..8].copy_from_slice(&self.channel.0.to_be_bytes());
        out[8..12].copy_from_slice(&self.sender.0.to_be_bytes());
        out[12..16].copy_from_slice(&self.sequence.to_be_bytes());
        out[16..20].copy_from_slice(&self.timestamp.to_be_bytes());
    }

    /// A datagram: this header followed by `payload`.
    pub fn to_datagram(&self, payload: &[u8]) -> Vec<u8> {
        let mut header = [0u8; MEDIA_HEADER_LEN];
        self.write(&mut header);
        let mut out = Vec::with_capacity(MEDIA_HEADER_LEN + payload.len());
        out.extend_from_slice(&header);
        out.extend_from_slice(payload);
        out
    }

    /// Parses the header at the start of a datagram; the payload is what follows it.
    pub fn parse(datagram: &[u8]) -> Result<(MediaHeader, &[u8]), MediaHeaderError> {
        let Some((head, payload)) = datagram.split_first_chunk::<MEDIA_HEADER_LEN>() else {
            return Err(MediaHeaderError::TooShort(datagram.len()));
        };
        if head[0] != MEDIA_VERSION {
            return Err(MediaHeaderError::Version(head[0]));
        }
        let stream = StreamType::from_byte(head[1]).ok_or(MediaHeaderError::StreamType(head[1]))?;
        if head[3] != 0 {
            return Err(MediaHeaderError::Reserved(head[3]));
        }
        let word = |at: usize| u32::from_be_bytes([head[at], head[at + 1], head[at + 2], head[at + 3]]);
        let header = MediaHeader {
            stream,
            flags: head[2],
            channel: ChannelId(word(4)),
            sender: SessionId(word(8)),
            sequence: word(12),
            timestamp: word(16),
        };
        Ok((header, payload))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> MediaHeader {
        MediaHeader {
            stream: StreamType::Voice,
            flags: 0x5a,
            channel: ChannelId(0x0102_0304),
            sender: SessionId(0xdead_beef),
            sequence: u32::MAX,
            timestamp: 960,
        }
    }

    #[test]
    fn header_round_trips_with_payload() {
        for stream in [StreamType::Voice, StreamType::Screen, StreamType::Probe] {
            let h = MediaHeader { stream, ..header() };
            let datagram = h.to_datagram(b"opaque");
            assert_eq!(datagram.len(), MEDIA_HEADER_LEN + 6);
            assert_eq!(MediaHeader::parse(&datagram), Ok((h, &b"opaque"[..])));
        }
    }

    #[test]
    fn bad_headers_are_typed_errors() {
        let good = header().to_datagram(&[]);
        assert_eq!(MediaHeader::parse(&good[..19]), Err(MediaHeaderError::TooShort(19)));
        let mut bad = good.clone();
        bad[0] = 9;
        assert_eq!(MediaHeader::parse(&bad), Err(MediaHeaderError::Version(9)));
        let mut bad = good.clone();
        bad[1] = 0;
        assert_eq!(MediaHeader::parse(&bad), Err(MediaHeaderError::StreamType(0)));
        let mut bad = good;
        bad[3] = 1;
        assert_eq!(MediaHeader::parse(&bad), Err(MediaHeaderError::Reserved(1)));
    }
}
