//! Voice DSP on 10 ms frames at 48 kHz: RNNoise noise suppression (which also gives a
//! voice probability), the level meter, the talk gate, and resampling to 48 kHz.

use nnnoiseless::DenoiseState;
use rubato::audioadapter_buffers::direct::InterleavedSlice;
use rubato::{Fft, FixedSync, Resampler as _};

use super::{FRAME_10MS, SAMPLE_RATE};

/// RNNoise works on the 16-bit scale.
const RNNOISE_SCALE: f32 = 32768.0;

/// RNNoise over 10 ms frames.
pub struct Denoiser {
    state: Box<DenoiseState<'static>>,
    scratch: Box<[f32; FRAME_10MS]>,
}

impl Default for Denoiser {
    fn default() -> Self {
        Denoiser { state: DenoiseState::new(), scratch: Box::new([0.0; FRAME_10MS]) }
    }
}

impl Denoiser {
    /// Runs RNNoise on `frame` and returns its voice probability (0-1). With `suppress`
    /// the frame is replaced by the denoised one; without, it is left as it was (the
    /// probability still drives the voice-activity gate).
    pub fn process(&mut self, frame: &mut [f32; FRAME_10MS], suppress: bool) -> f32 {
        for (s, x) in self.scratch.iter_mut().zip(frame.iter()) {
            *s = x * RNNOISE_SCALE;
        }
        let input = *self.scratch;
        let probability = self.state.process_frame(&mut self.scratch[..], &input);
        if suppress {
            for (x, s) in frame.iter_mut().zip(self.scratch.iter()) {
                *x = s / RNNOISE_SCALE;
            }
        }
        probability
    }
}

/// The RMS level of a frame in dBFS (full scale = 0 dB; silence is -100).
pub fn level_dbfs(frame: &[f32]) -> f32 {
    if frame.is_empty() {
        return -100.0;
    }
    let mean_square = frame.iter().map(|x| x * x).sum::<f32>() / frame.len() as f32;
    (10.0 * mean_square.max(1e-10).log10()).max(-100.0)
}

/// When the microphone is on the air.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VoiceMode {
    /// Only while the push-to-talk key is held.
    PushToTalk,
    /// When RNNoise hears a voice above the level threshold.
    VoiceActivity,
    AlwaysOn,
}

impl std::str::FromStr for VoiceMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "push-to-talk" | "ptt" => Ok(VoiceMode::PushToTalk),
            "voice-activity" | "vad" => Ok(VoiceMode::VoiceActivity),
            "always-on" | "always" => Ok(VoiceMode::AlwaysOn),
            other => Err(format!("unknown voice mode {other:?}: use push-to-talk, voice-activity or always-on")),
        }
    }
}

/// The talk gate, decided every 10 ms.
#[derive(Debug, Clone)]
pub struct Gate {
    pub mode: VoiceMode,
    /// The level a voice must reach, in dBFS.
    pub threshold_dbfs: f32,
    /// The voice probability a frame must reach.
    pub min_probability: f32,
    /// 10 ms frames the gate stays open after the last voiced one, so that word
    /// endings and short pauses are not cut.
    pub hangover_frames: u32,
    hold: u32,
}

impl Gate {
    pub fn new(mode: VoiceMode, threshold_dbfs: f32) -> Gate {
        Gate { mode, threshold_dbfs, min_probability: 0.6, hangover_frames: 30, hold: 0 }
    }

    /// Whether this frame goes out.
    pub fn decide(&mut self, probability: f32, level_dbfs: f32, push_to_talk_held: bool) -> bool {
        match self.mode {
            VoiceMode::AlwaysOn => true,
            VoiceMode::PushToTalk => push_to_talk_held,
            VoiceMode::VoiceActivity => {
                if probability >= self.min_probability && level_dbfs >= self.threshold_dbfs {
                    self.hold = self.hangover_frames;
                    true
                } else if self.hold > 0 {
                    self.hold -= 1;
                    true
                } else {
                    false
                }
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot resample from {from} Hz: {reason}")]
pub struct ResampleError {
    from: u32,
    reason: String,
}

/// Streaming mono resampler from a device or file rate to 48 kHz (or back).
pub struct Resampler {
    fft: Fft<f32>,
    from: u32,
    pending: Vec<f32>,
    out: Vec<f32>,
}

impl Resampler {
    pub fn new(from: u32, to: u32) -> Result<Resampler, ResampleError> {
        let error = |e: &dyn std::fmt::Display| ResampleError { from, reason: e.to_string() };
        // Chunks of 10 ms of input.
        let chunk = (from as usize / 100).max(1);
        let fft = Fft::<f32>::new(from as usize, to as usize, chunk, 1, FixedSync::Input).map_err(|e| error(&e))?;
        let out = vec![0.0; fft.output_frames_max()];
        Ok(Resampler { fft, from, pending: Vec::with_capacity(chunk * 2), out })
    }

    /// Resamples what can be of `input` (the rest waits for the next call) into `output`.
    pub fn push(&mut self, input: &[f32], output: &mut Vec<f32>) -> Result<(), ResampleError> {
        self.pending.extend_from_slice(input);
        loop {
            let needed = self.fft.input_frames_next();
            if self.pending.len() < needed {
                return Ok(());
            }
            let error = |e: &dyn std::fmt::Display| ResampleError { from: self.from, reason: e.to_string() };
            let frames_out = self.out.len();
            let input = InterleavedSlice::new(&self.pending[..needed], 1, needed).map_err(|e| error(&e))?;
            let mut out = InterleavedSlice::new_mut(&mut self.out[..], 1, frames_out).map_err(|e| error(&e))?;
            let (used, made) = self.fft.process_into_buffer(&input, &mut out, None).map_err(|e| error(&e))?;
            output.extend_from_slice(&self.out[..made]);
            self.pending.drain(..used);
        }
    }
}

/// A whole clip at `rate` resampled to 48 kHz, with the resampler's delay trimmed.
pub fn resample_clip(samples: &[f32], rate: u32) -> Result<Vec<f32>, ResampleError> {
    if rate == SAMPLE_RATE {
        return Ok(samples.to_vec());
    }
    let error = |e: &dyn std::fmt::Display| ResampleError { from: rate, reason: e.to_string() };
    let mut fft =
        Fft::<f32>::new(rate as usize, SAMPLE_RATE as usize, 1024, 1, FixedSync::Input).map_err(|e| error(&e))?;
    let needed = fft.process_all_needed_output_len(samples.len());
    let mut out = vec![0.0; needed];
    let input = InterleavedSlice::new(samples, 1, samples.len()).map_err(|e| error(&e))?;
    let mut output = InterleavedSlice::new_mut(&mut out[..], 1, needed).map_err(|e| error(&e))?;
    let (_, made) = fft.process_all_into_buffer(&input, &mut output, samples.len(), None).map_err(|e| error(&e))?;
    out.truncate(made);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gate_holds_over_word_endings_then_closes() {
        let mut gate = Gate::new(VoiceMode::VoiceActivity, -50.0);
        assert!(!gate.decide(0.1, -20.0, false), "loud but not a voice");
        assert!(!gate.decide(0.9, -70.0, false), "a voice, but below the threshold");
        assert!(gate.decide(0.95, -25.0, false));
        // The hangover: 30 frames (300 ms) of quiet still go out, the 31st does not.
        for frame in 0..30 {
            assert!(gate.decide(0.05, -80.0, false), "frame {frame} of the hangover");
        }
        assert!(!gate.decide(0.05, -80.0, false));
        // A voiced frame inside a pause restarts the hangover.
        assert!(gate.decide(0.9, -30.0, false));
        for _ in 0..20 {
            gate.decide(0.0, -90.0, false);
        }
        assert!(gate.decide(0.9, -30.0, false));
        for _ in 0..30 {
            assert!(gate.decide(0.0, -90.0, false));
        }
        assert!(!gate.decide(0.0, -90.0, false));
    }

    #[test]
    fn push_to_talk_and_always_on() {
        let mut ptt = Gate::new(VoiceMode::PushToTalk, -50.0);
        assert!(!ptt.decide(1.0, 0.0, false));
        assert!(ptt.decide(0.0, -100.0, true));
        assert!(Gate::new(VoiceMode::AlwaysOn, 0.0).decide(0.0, -100.0, false));
    }

    #[test]
    fn levels() {
        assert_eq!(level_dbfs(&[0.0; 480]), -100.0);
        assert!((level_dbfs(&[1.0; 480])).abs() < 0.01);
        assert!((level_dbfs(&[0.1; 480]) + 20.0).abs() < 0.01);
    }

    #[test]
    fn resampling_keeps_length_and_pitch() {
        let rate = 44_100;
        let tone: Vec<f32> =
            (0..rate).map(|n| (n as f32 * 440.0 * std::f32::consts::TAU / rate as f32).sin() * 0.5).collect();
        let clip = resample_clip(&tone, rate).unwrap();
        assert!((clip.len() as i64 - 48_000).abs() <= 2, "{} samples", clip.len());
        // 440 Hz at 48 kHz: count zero crossings over the middle half second.
        let crossings = clip[12_000..36_000].windows(2).filter(|w| w[0] < 0.0 && w[1] >= 0.0).count();
        assert!((219..=221).contains(&crossings), "{crossings} upward crossings in 0.5 s");

        let mut streaming = Resampler::new(rate, 48_000).unwrap();
        let mut out = Vec::new();
        for chunk in tone.chunks(441) {
            streaming.push(chunk, &mut out).unwrap();
        }
        assert!(out.len() >= 47_000 && out.len() <= 48_000, "{}", out.len());
    }
}
