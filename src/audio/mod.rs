//! Voice: devices, DSP (RNNoise, the talk gate, resampling), Opus, the jitter buffer and
//! the mixer; and a screen share's desktop audio ([`desktop`]). Everything but
//! [`engine`], [`device`] and desktop's capture is sans-IO: it takes samples, packets and
//! the time as arguments. Depends on nothing of ours but plain numbers.

pub mod check;
pub mod codec;
pub mod cues;
#[cfg(unix)]
pub mod desktop;
pub mod device;
pub mod dsp;
pub mod echo;
pub mod engine;
pub mod fill;
pub mod follow;
pub mod jitter;
pub mod mixer;
pub mod pipeline;
pub mod quality;
pub mod wav;

/// Voice runs at 48 kHz mono throughout.
pub const SAMPLE_RATE: u32 = 48_000;
/// 10 ms: what RNNoise and the gate work on.
pub const FRAME_10MS: usize = 480;
/// 20 ms: one Opus packet.
pub const FRAME_20MS: usize = 960;
/// 20 ms of interleaved stereo (desktop audio).
pub const STEREO_20MS: usize = 2 * FRAME_20MS;
