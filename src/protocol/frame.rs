//! Control-stream framing: a 4-byte big-endian length, then that many bytes of postcard.
//!
//! The length is checked against [`MAX_FRAME_LEN`] before anything is allocated, so a
//! peer cannot make us reserve memory by announcing a large frame.

use serde::{Serialize, de::DeserializeOwned};

/// The largest control frame body either side accepts (64 KiB).
pub const MAX_FRAME_LEN: usize = 64 * 1024;

/// Bytes of the length prefix.
pub const LEN_PREFIX: usize = 4;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {len} bytes is larger than the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("frame body is not a valid message: {0}")]
    Malformed(String),
    #[error("frame body has {0} trailing bytes after the message")]
    TrailingBytes(usize),
}

/// Encodes one message as a length-prefixed frame.
pub fn encode_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut out = vec![0u8; LEN_PREFIX];
    out = postcard::to_extend(msg, out).map_err(|e| FrameError::Malformed(e.to_string()))?;
    let body_len = out.len() - LEN_PREFIX;
    if body_len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge { len: body_len, max: MAX_FRAME_LEN });
    }
    let prefix = u32::try_from(body_len).expect("body_len <= MAX_FRAME_LEN fits in u32");
    out[..LEN_PREFIX].copy_from_slice(&prefix.to_be_bytes());
    Ok(out)
}

/// Decodes one frame body (without its length prefix), rejecting trailing bytes.
pub fn decode_frame<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    if body.len() > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge { len: body.len(), max: MAX_FRAME_LEN });
    }
    let (msg, rest) = postcard::take_from_bytes(body).map_err(|e| FrameError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(FrameError::TrailingBytes(rest.len()));
    }
    Ok(msg)
}

/// Reads the length prefix and checks it against the cap.
pub fn body_len(prefix: [u8; LEN_PREFIX]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge { len, max: MAX_FRAME_LEN });
    }
    Ok(len)
}

/// Splits a byte stream into frames, sans-IO: feed it bytes, take whole bodies out.
/// Used where frames arrive in arbitrary chunks (tests, fuzzing, any byte transport).
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes.
    pub fn extend(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Takes the next whole frame body, `Ok(None)` while one is incomplete.
    /// After an error the stream is unusable: the peer must be disconnected.
    pub fn next_body(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        let Some(prefix) = self.buf.first_chunk::<LEN_PREFIX>() else {
            return Ok(None);
        };
        let len = body_len(*prefix)?;
        if self.buf.len() < LEN_PREFIX + len {
            return Ok(None);
        }
        let body = self.buf[LEN_PREFIX..LEN_PREFIX + len].to_vec();
        self.buf.drain(..LEN_PREFIX + len);
        Ok(Some(body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{ClientMsg, PROTOCOL_VERSION};

    #[test]
    fn frame_round_trips_through_chunked_decoder() {
        let msg = ClientMsg::Hello { version: PROTOCOL_VERSION, name: "alice".into(), join: None };
        let frame = encode_frame(&msg).unwrap();
        let mut dec = FrameDecoder::new();
        for byte in &frame[..frame.len() - 1] {
            dec.extend(std::slice::from_ref(byte));
            assert_eq!(dec.next_body().unwrap(), None);
        }
        dec.extend(&frame[frame.len() - 1..]);
        let body = dec.next_body().unwrap().expect("whole frame");
        assert_eq!(decode_frame::<ClientMsg>(&body).unwrap(), msg);
        assert_eq!(dec.next_body().unwrap(), None);
    }

    #[test]
    fn oversized_prefix_is_refused_before_the_body_arrives() {
        let mut dec = FrameDecoder::new();
        dec.extend(&(MAX_FRAME_LEN as u32 + 1).to_be_bytes());
        assert_eq!(dec.next_body(), Err(FrameError::TooLarge { len: MAX_FRAME_LEN + 1, max: MAX_FRAME_LEN }));
    }

    #[test]
    fn oversized_message_is_refused_by_the_encoder() {
        let msg = ClientMsg::Hello { version: 1, name: "x".repeat(MAX_FRAME_LEN), join: None };
        assert!(matches!(encode_frame(&msg), Err(FrameError::TooLarge { .. })));
    }

    #[test]
    fn trailing_and_garbage_bytes_are_errors() {
        let mut body = postcard::to_allocvec(&ClientMsg::Leave).unwrap();
        body.push(0);
        assert_eq!(decode_frame::<ClientMsg>(&body), Err(FrameError::TrailingBytes(1)));
        assert!(matches!(decode_frame::<ClientMsg>(&[0xff, 0xff, 0xff]), Err(FrameError::Malformed(_))));
        assert!(matches!(decode_frame::<ClientMsg>(&[]), Err(FrameError::Malformed(_))));
    }
}
