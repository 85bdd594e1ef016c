//! Reading control frames from a QUIC stream, with the length checked before the body
//! is allocated.

use crate::protocol::frame::{LEN_PREFIX, body_len};
use crate::protocol::{FrameError, decode_frame};

#[derive(Debug, thiserror::Error)]
pub enum ReadFrameError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("control stream ended")]
    Closed,
    #[error("control stream failed: {0}")]
    Stream(#[from] quinn::ReadExactError),
}

/// Reads one frame and decodes it. `Ok(None)` is a clean end of the stream between frames.
pub async fn read_frame<T: serde::de::DeserializeOwned>(
    recv: &mut quinn::RecvStream,
) -> Result<Option<T>, ReadFrameError> {
    let mut prefix = [0u8; LEN_PREFIX];
    match recv.read_exact(&mut prefix).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(quinn::ReadExactError::FinishedEarly(_)) => return Err(ReadFrameError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = body_len(prefix)?;
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body).await.map_err(|e| match e {
        quinn::ReadExactError::FinishedEarly(_) => ReadFrameError::Closed,
        e => e.into(),
    })?;
    Ok(Some(decode_frame(&body)?))
}
