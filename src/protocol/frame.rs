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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{ClientMsg, PROTOCOL_VERSION};

    #[test]
    fn frame_is_a_length_prefix_and_a_body() {
        let msg = ClientMsg::Hello { version: PROTOCOL_VERSION, name: "alice".into(), join: None, bundle: None };
        let frame = encode_frame(&msg).unwrap();
        let prefix = *frame.first_chunk::<LEN_PREFIX>().unwrap();
        assert_eq!(body_len(prefix), Ok(frame.len() - LEN_PREFIX));
        assert_eq!(decode_frame::<ClientMsg>(&frame[LEN_PREFIX..]).unwrap(), msg);
    }

    #[test]
    fn oversized_prefix_is_refused_before_the_body_arrives() {
        assert_eq!(body_len((MAX_FRAME_LEN as u32).to_be_bytes()), Ok(MAX_FRAME_LEN));
        assert_eq!(
            body_len((MAX_FRAME_LEN as u32 + 1).to_be_bytes()),
            Err(FrameError::TooLarge { len: MAX_FRAME_LEN + 1, max: MAX_FRAME_LEN })
        );
    }

    #[test]
    fn oversized_message_is_refused_by_the_encoder() {
        let msg = ClientMsg::Hello { version: 1, name: "x".repeat(MAX_FRAME_LEN), join: None, bundle: None };
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
