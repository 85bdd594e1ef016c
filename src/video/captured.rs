//! Pictures from a capture API that delivers them on its own thread (the Wayland portal's
//! PipeWire stream, Windows.Graphics.Capture): copied in with their row stride and
//! bounds checked against the buffer, so that a wrong buffer is dropped instead of read
//! out of bounds, and only the newest kept.

use std::sync::{Condvar, Mutex};
use std::time::Duration;

use super::capture::CaptureError;
use super::picture::Bgra;

/// The largest picture taken (8K), whatever a capture API says.
pub const MAX_SIDE: u32 = 7680;

/// The channel order of 32-bit pixels the stream may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// B, G, R, then alpha or padding: what the encoder side takes as it is.
    Bgr,
    /// R, G, B, then alpha or padding: red and blue are swapped on the way.
    Rgb,
}

/// Why a captured buffer was not taken.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum BufferError {
    #[error("a {width}x{height} picture is outside the bounds taken")]
    Size { width: u32, height: u32 },
    #[error("a stride of {stride} bytes for rows of {width} pixels")]
    Stride { stride: i32, width: u32 },
    #[error("the picture runs past its buffer ({needed} bytes of {len})")]
    Short { needed: usize, len: usize },
}

/// Copies a picture of `width` × `height` pixels that starts `offset` bytes into `src`,
/// rows `stride` bytes apart, into `into` (packed BGRA rows), reusing its memory. A
/// stride of 0 means packed rows (GStreamer's `pipewiresink` leaves it so).
pub fn copy_picture(
    src: &[u8],
    offset: usize,
    stride: i32,
    (width, height): (u32, u32),
    order: Order,
    into: &mut Bgra,
) -> Result<(), BufferError> {
    if width == 0 || height == 0 || width > MAX_SIDE || height > MAX_SIDE {
        return Err(BufferError::Size { width, height });
    }
    let row = width as usize * 4;
    let stride = match stride {
        0 => row,
        _ => usize::try_from(stride).ok().filter(|s| *s >= row).ok_or(BufferError::Stride { stride, width })?,
    };
    let needed = stride.saturating_mul(height as usize - 1).saturating_add(offset).saturating_add(row);
    if needed > src.len() {
        return Err(BufferError::Short { needed, len: src.len() });
    }
    (into.width, into.height, into.stride) = (width, height, row);
    into.data.resize(row * height as usize, 0);
    for (y, out) in into.data.chunks_exact_mut(row).enumerate() {
        let from = offset + y * stride;
        out.copy_from_slice(&src[from..from + row]);
        if order == Order::Rgb {
            for px in out.chunks_exact_mut(4) {
                px.swap(0, 2);
            }
        }
    }
    Ok(())
}

/// The newest picture, between a capture API's thread and the share: each new one
/// replaces the last (reusing its memory), and the share takes a copy of whichever is
/// newest when it wants one.
#[derive(Default)]
pub struct NewestPicture {
    slot: Mutex<Slot>,
    arrived: Condvar,
}

#[derive(Default)]
struct Slot {
    picture: Option<Bgra>,
    /// Why the capture ended, once it has.
    ended: Option<String>,
    /// Buffers that were not taken (see [`BufferError`]): the first is logged.
    refused: u64,
}

impl NewestPicture {
    /// Takes a picture that `fill` copies in over the last one (as [`copy_picture`] does,
    /// which checks everything before it writes); one it refuses is counted (and the
    /// first logged), and the last picture stays.
    pub fn put(&self, fill: impl FnOnce(&mut Bgra) -> Result<(), BufferError>) {
        let mut slot = self.slot.lock().expect("not poisoned");
        let mut picture = slot.picture.take().unwrap_or(Bgra { width: 0, height: 0, stride: 0, data: Vec::new() });
        match fill(&mut picture) {
            Ok(()) => slot.picture = Some(picture),
            Err(e) => {
                // Untouched: still the last picture, if there was one.
                slot.picture = (picture.width > 0).then_some(picture);
                slot.refused += 1;
                if slot.refused == 1 {
                    tracing::warn!("a captured picture was not taken: {e}");
                }
            }
        }
        drop(slot);
        self.arrived.notify_all();
    }

    /// The capture ended (the first reason is kept).
    pub fn end(&self, why: String) {
        self.slot.lock().expect("not poisoned").ended.get_or_insert(why);
        self.arrived.notify_all();
    }

    /// A copy of the newest picture (the same again when nothing changed); waits up to
    /// `first_within` for the first.
    pub fn newest(&self, first_within: Duration) -> Result<Bgra, CaptureError> {
        let slot = self.slot.lock().expect("not poisoned");
        let (slot, _) = self
            .arrived
            .wait_timeout_while(slot, first_within, |s| s.picture.is_none() && s.ended.is_none())
            .expect("not poisoned");
        if let Some(why) = &slot.ended {
            return Err(CaptureError::Ended(why.clone()));
        }
        slot.picture.clone().ok_or(CaptureError::NoPicture)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn empty() -> Bgra {
        Bgra { width: 0, height: 0, stride: 0, data: Vec::new() }
    }

    #[test]
    fn padded_rows_come_out_packed_and_red_and_blue_in_place() {
        // 2×2 pixels, rows 12 bytes apart (4 of padding), 3 bytes of something before.
        let mut src = vec![0xee; 3];
        src.extend([1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0]);
        src.extend([9, 10, 11, 12, 13, 14, 15, 16, 0, 0, 0, 0]);
        let mut out = empty();
        copy_picture(&src, 3, 12, (2, 2), Order::Bgr, &mut out).unwrap();
        assert_eq!((out.width, out.height, out.stride), (2, 2, 8));
        assert_eq!(out.data, (1..=16).collect::<Vec<u8>>());
        copy_picture(&src, 3, 12, (2, 2), Order::Rgb, &mut out).unwrap();
        assert_eq!(&out.data[..8], [3, 2, 1, 4, 7, 6, 5, 8]);
        // The last row needs no padding after it.
        copy_picture(&src[..src.len() - 4], 3, 12, (2, 2), Order::Bgr, &mut out).unwrap();
    }

    #[test]
    fn a_buffer_that_does_not_hold_what_it_claims_is_refused() {
        let src = vec![0; 64];
        let mut out = empty();
        let short = copy_picture(&src, 0, 16, (4, 5), Order::Bgr, &mut out);
        assert_eq!(short, Err(BufferError::Short { needed: 80, len: 64 }));
        assert_eq!(
            copy_picture(&src, 60, 16, (1, 2), Order::Bgr, &mut out),
            Err(BufferError::Short { needed: 80, len: 64 })
        );
        assert!(matches!(copy_picture(&src, 0, 8, (4, 1), Order::Bgr, &mut out), Err(BufferError::Stride { .. })));
        // No stride given: packed rows, and 64 bytes hold four of 16.
        assert!(matches!(copy_picture(&src, 0, 0, (4, 5), Order::Bgr, &mut out), Err(BufferError::Short { .. })));
        assert!(matches!(copy_picture(&src, 0, -16, (4, 1), Order::Bgr, &mut out), Err(BufferError::Stride { .. })));
        assert!(matches!(copy_picture(&src, 0, 16, (0, 1), Order::Bgr, &mut out), Err(BufferError::Size { .. })));
        let huge = copy_picture(&src, 0, i32::MAX, (MAX_SIDE + 1, 1), Order::Bgr, &mut out);
        assert!(matches!(huge, Err(BufferError::Size { .. })));
        // A huge stride with a small buffer is short, not an overflow.
        assert!(matches!(
            copy_picture(&src, 0, i32::MAX, (1, 3), Order::Bgr, &mut out),
            Err(BufferError::Short { .. })
        ));
        assert_eq!(out.data, Vec::<u8>::new(), "nothing was written by a refused buffer");
        copy_picture(&src, 0, 0, (4, 4), Order::Bgr, &mut out).unwrap();
        assert_eq!((out.stride, out.data.len()), (16, 64));
    }

    #[test]
    fn only_the_newest_picture_is_kept_and_a_refused_one_leaves_the_last() {
        let newest = NewestPicture::default();
        assert!(matches!(newest.newest(Duration::ZERO), Err(CaptureError::NoPicture)));
        let src: Vec<u8> = (0..32).collect();
        newest.put(|p| copy_picture(&src, 0, 8, (2, 2), Order::Bgr, p));
        newest.put(|p| copy_picture(&src, 16, 8, (2, 2), Order::Bgr, p));
        assert_eq!(newest.newest(Duration::ZERO).unwrap().data, (16..32).collect::<Vec<u8>>());
        newest.put(|p| copy_picture(&src, 30, 8, (2, 2), Order::Bgr, p));
        assert_eq!(newest.newest(Duration::ZERO).unwrap().data, (16..32).collect::<Vec<u8>>());
        newest.end("closed".into());
        newest.end("later".into());
        assert!(matches!(newest.newest(Duration::ZERO), Err(CaptureError::Ended(why)) if why == "closed"));
    }
}
