//! Mixing the decoded voices into one output, with a limiter so that loud moments are
//! turned down smoothly instead of clipping (and never wrap around).

use super::FRAME_20MS;

/// The limiter keeps peaks at or below this.
pub const CEILING: f32 = 0.97;
/// How fast the gain recovers after a peak: about 50 ms back to full.
const RELEASE_PER_SAMPLE: f32 = 1.0 / (0.05 * 48_000.0);

/// Sums sources with their gains into 20 ms and limits the sum.
pub struct Mixer {
    sum: [f32; FRAME_20MS],
    gain: f32,
}

impl Default for Mixer {
    fn default() -> Self {
        Mixer { sum: [0.0; FRAME_20MS], gain: 1.0 }
    }
}

impl Mixer {
    /// Starts a new 20 ms mix.
    pub fn clear(&mut self) {
        self.sum.fill(0.0);
    }

    /// Adds a source at `gain` (1.0 = as is; per-user volume 0-200 % is 0.0-2.0).
    pub fn add(&mut self, source: &[f32; FRAME_20MS], gain: f32) {
        for (s, x) in self.sum.iter_mut().zip(source) {
            *s += x * gain;
        }
    }

    /// The limited mix: the gain drops at once to keep a peak under [`CEILING`] and
    /// comes back smoothly; whatever still exceeds full scale is clamped.
    pub fn finish(&mut self, out: &mut [f32; FRAME_20MS]) {
        for (o, s) in out.iter_mut().zip(&self.sum) {
            let peak = s.abs();
            let limit = if peak > CEILING { CEILING / peak } else { 1.0 };
            self.gain = if limit < self.gain { limit } else { (self.gain + RELEASE_PER_SAMPLE).min(limit) };
            *o = (s * self.gain).clamp(-1.0, 1.0);
        }
    }
}

/// Converts to 16-bit samples, saturating (never wrapping).
pub fn to_i16(sample: f32) -> i16 {
    (sample * 32767.0).round().clamp(-32768.0, 32767.0) as i16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quiet_voices_pass_unchanged() {
        let mut mixer = Mixer::default();
        let a = [0.2; FRAME_20MS];
        let b = [-0.1; FRAME_20MS];
        mixer.clear();
        mixer.add(&a, 1.0);
        mixer.add(&b, 1.5);
        let mut out = [0.0; FRAME_20MS];
        mixer.finish(&mut out);
        assert!(out.iter().all(|x| (x - 0.05).abs() < 1e-6));
    }

    #[test]
    fn loud_sums_are_limited_not_wrapped() {
        let mut mixer = Mixer::default();
        let loud: [f32; FRAME_20MS] = std::array::from_fn(|n| (n as f32 * 0.05).sin() * 0.9);
        mixer.clear();
        for _ in 0..4 {
            mixer.add(&loud, 2.0);
        }
        let mut out = [0.0; FRAME_20MS];
        mixer.finish(&mut out);
        assert!(out.iter().all(|x| x.abs() <= CEILING + 1e-6), "peaks stay under the ceiling");
        // The shape survives: every output sample has the sign of its input.
        assert!(out.iter().zip(&loud).all(|(o, l)| o * l >= 0.0), "no wrap-around");
        assert_eq!(to_i16(7.0), i16::MAX);
        assert_eq!(to_i16(-7.0), i16::MIN);

        // After the loud part the gain comes back: 100 ms of quiet later it is full again.
        let quiet = [0.1; FRAME_20MS];
        for _ in 0..5 {
            mixer.clear();
            mixer.add(&quiet, 1.0);
            mixer.finish(&mut out);
        }
        assert!((out[FRAME_20MS - 1] - 0.1).abs() < 1e-4, "{}", out[FRAME_20MS - 1]);
    }
}
