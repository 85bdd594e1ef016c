//! Desktop audio for a screen share: what the applications on the default output play,
//! less what VoIPC itself plays (the others would hear themselves), as 20 ms stereo
//! frames at 48 kHz. Captured on Linux through the PulseAudio protocol ([`pulse`]: one
//! stream per application) and on Windows through WASAPI's process loopback (`wasapi`:
//! everything but our own process tree). [`DesktopMix`] (sans-IO) adds the streams up on
//! the capture's own 20 ms clock ([`mix_in_real_time`]).
//!
//! Bounds: at most [`MAX_APPLICATIONS`] streams, each holding at most [`MAX_BUFFERED`];
//! a stream that runs dry waits for [`PREBUFFER`] again before it is heard.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{FRAME_20MS, STEREO_20MS};

#[cfg(unix)]
mod pulse;
#[cfg(unix)]
pub use pulse::capture;
#[cfg(windows)]
mod wasapi;
#[cfg(windows)]
pub use wasapi::capture;

/// Applications recorded at once; beyond them the newest are not heard.
pub const MAX_APPLICATIONS: usize = 16;
/// What one application's stream may hold (in frames of two samples): 200 ms. A stream
/// whose clock runs ahead of ours loses its oldest samples.
pub const MAX_BUFFERED: usize = 10 * FRAME_20MS;
/// What a stream must hold (in frames) before it is heard, after its start or after it
/// ran dry: 40 ms, the jitter of the server's deliveries.
pub const PREBUFFER: usize = 2 * FRAME_20MS;
/// How far behind its clock the capture catches up (a longer stall is let go).
const CATCH_UP: Duration = Duration::from_millis(200);
/// The mix's clock: one 20 ms frame a tick.
const TICK: Duration = Duration::from_millis(20);

/// One application's samples waiting to be mixed.
#[derive(Default)]
struct Pending {
    samples: std::collections::VecDeque<f32>,
    /// Heard since it last held [`PREBUFFER`].
    flowing: bool,
}

/// Adds up the streams of several applications, 20 ms at a time.
#[derive(Default)]
pub struct DesktopMix {
    streams: BTreeMap<u32, Pending>,
}

impl DesktopMix {
    /// Interleaved stereo samples from the stream of `application` (by any id); a new
    /// one beyond [`MAX_APPLICATIONS`] is not taken.
    pub fn push(&mut self, application: u32, samples: &[f32]) {
        if !self.streams.contains_key(&application) && self.streams.len() >= MAX_APPLICATIONS {
            return;
        }
        // Whole frames only: left stays left.
        let samples = &samples[..samples.len() & !1];
        let pending = &mut self.streams.entry(application).or_default().samples;
        pending.extend(samples.iter().map(|s| if s.is_finite() { *s } else { 0.0 }));
        let excess = pending.len().saturating_sub(2 * MAX_BUFFERED);
        pending.drain(..excess);
    }

    /// Forgets the streams `keep` says no to.
    pub fn retain(&mut self, keep: impl Fn(u32) -> bool) {
        self.streams.retain(|id, _| keep(*id));
    }

    /// Empties every stream (nobody listens; what waits would be stale after).
    pub fn clear(&mut self) {
        for pending in self.streams.values_mut() {
            pending.samples.clear();
            pending.flowing = false;
        }
    }

    /// The next 20 ms: the sum of what each flowing stream has for it, limited to ±1.
    /// Returns whether anything was heard.
    pub fn mix(&mut self, out: &mut [f32; STEREO_20MS]) -> bool {
        out.fill(0.0);
        let mut heard = false;
        for pending in self.streams.values_mut() {
            pending.flowing |= pending.samples.len() >= 2 * PREBUFFER;
            if !pending.flowing {
                continue;
            }
            let take = pending.samples.len().min(STEREO_20MS);
            for (o, s) in out.iter_mut().zip(pending.samples.drain(..take)) {
                *o += s;
            }
            heard |= take > 0;
            pending.flowing = take == STEREO_20MS;
        }
        for o in out.iter_mut() {
            *o = o.clamp(-1.0, 1.0);
        }
        heard
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DesktopAudioError {
    #[error("no PulseAudio or PipeWire sound server to take desktop audio from (PULSE_SERVER, XDG_RUNTIME_DIR)")]
    NoServer,
    #[error("sound server: {0}")]
    Server(String),
}

/// What the capture is to do next, asked every 20 ms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wanted {
    Record,
    /// Nobody listens: what the applications play is let go.
    Pause,
    Stop,
}

/// The capture's own 20 ms clock: `between` feeds the mix (it is given the time), then
/// every 20 ms that passed is mixed and handed to `frame` with its time, so that the
/// streams are taken at the rate they come; a wake-up late (this thread shares the cores
/// with the encoder) mixes several, up to [`CATCH_UP`]. Until `wanted` says stop.
#[allow(clippy::disallowed_methods, reason = "the capture is a shell: it reads the clock to pace real time")]
fn mix_in_real_time(
    wanted: &dyn Fn() -> Wanted,
    mix: &Mutex<DesktopMix>,
    frame: &mut dyn FnMut(&[f32; STEREO_20MS], Instant),
    between: &mut dyn FnMut(Instant) -> Result<(), DesktopAudioError>,
) -> Result<(), DesktopAudioError> {
    let mut next_tick = Instant::now();
    let mut samples = [0.0; STEREO_20MS];
    loop {
        between(Instant::now())?;
        let now = Instant::now();
        if now > next_tick + CATCH_UP {
            next_tick = now;
        }
        while next_tick <= now {
            match wanted() {
                Wanted::Stop => return Ok(()),
                Wanted::Pause => mix.lock().expect("no panics while held").clear(),
                Wanted::Record => {
                    if mix.lock().expect("no panics while held").mix(&mut samples) {
                        frame(&samples, next_tick);
                    }
                }
            }
            next_tick += TICK;
        }
        std::thread::sleep(next_tick.saturating_duration_since(Instant::now()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stereo(frames: usize, left: f32, right: f32) -> Vec<f32> {
        (0..frames).flat_map(|_| [left, right]).collect()
    }

    #[test]
    fn streams_are_heard_after_their_prebuffer_and_added_up() {
        let mut mix = DesktopMix::default();
        let mut out = [0.0; STEREO_20MS];
        mix.push(1, &stereo(FRAME_20MS, 0.25, -0.25));
        assert!(!mix.mix(&mut out), "20 ms is less than the prebuffer");
        mix.push(1, &stereo(FRAME_20MS, 0.25, -0.25));
        mix.push(2, &stereo(PREBUFFER, 0.5, 0.5));
        assert!(mix.mix(&mut out));
        assert_eq!((out[0], out[1]), (0.75, 0.25), "left stays left");
        // Stream 1 held 40 ms: one frame left; then it runs dry and waits again.
        assert!(mix.mix(&mut out));
        assert!(!mix.mix(&mut out) && out.iter().all(|s| *s == 0.0));
        mix.push(1, &stereo(FRAME_20MS, 0.25, -0.25));
        assert!(!mix.mix(&mut out), "a stream that ran dry waits for its prebuffer again");
    }

    #[test]
    fn loud_sums_are_limited_and_bad_samples_are_silence() {
        let mut mix = DesktopMix::default();
        let mut out = [0.0; STEREO_20MS];
        mix.push(1, &stereo(PREBUFFER, 0.9, f32::NAN));
        mix.push(2, &stereo(PREBUFFER, 0.9, f32::INFINITY));
        assert!(mix.mix(&mut out));
        assert_eq!((out[0], out[1]), (1.0, 0.0));
    }

    #[test]
    fn memory_stays_bounded_whatever_the_streams_send() {
        let mut mix = DesktopMix::default();
        for application in 0..100 {
            for _ in 0..50 {
                // An odd count: a torn frame must not swap the channels.
                mix.push(application, &stereo(FRAME_20MS, 0.1, -0.1)[..2 * FRAME_20MS - 1]);
            }
        }
        assert_eq!(mix.streams.len(), MAX_APPLICATIONS);
        for pending in mix.streams.values() {
            assert!(pending.samples.len() <= 2 * MAX_BUFFERED);
            assert_eq!(pending.samples.front(), Some(&0.1), "left first");
        }
        mix.retain(|id| id == 3);
        assert_eq!(mix.streams.keys().copied().collect::<Vec<_>>(), [3]);
        mix.clear();
        let mut out = [0.0; STEREO_20MS];
        assert!(!mix.mix(&mut out));
    }
}
