//! Acoustic echo cancellation: WebRTC's audio processing module (PulseAudio's packaging of
//! it, Debian's `libwebrtc-audio-processing`), through the `webrtc-audio-processing`
//! crate. What the speaker plays goes in as the far end ([`EchoCanceller::far_end`],
//! from the playback thread); every 10 ms of microphone goes through
//! [`EchoCanceller::near_end`] before noise suppression (on the capture thread). Only
//! echo cancellation is enabled: RNNoise and the gate do the rest, as without it.
//!
//! The delay between playing a sound and hearing it back is not known (the speaker's
//! ring, the sound server, the room), so the module estimates it (delay-agnostic mode,
//! with its extended filter for long and unsteady delays).
//!
//! Pure computation on the samples it is given, like the rest of the voice DSP; the two
//! halves share one module (the crate's `Processor` clones share it and lock inside).

use webrtc_audio_processing::{
    Config, EchoCancellation, EchoCancellationSuppressionLevel, InitializationConfig, NUM_SAMPLES_PER_FRAME, Processor,
};

use super::FRAME_10MS;
use super::quality::compare;

const _: () = assert!(NUM_SAMPLES_PER_FRAME as usize == FRAME_10MS, "the module works on 10 ms at 48 kHz");

#[derive(Debug, thiserror::Error)]
#[error("echo cancellation: {0}")]
pub struct EchoError(String);

/// One end of the canceller: each thread holds a clone.
#[derive(Clone)]
pub struct EchoCanceller {
    processor: Processor,
}

impl EchoCanceller {
    pub fn new() -> Result<EchoCanceller, EchoError> {
        let init = InitializationConfig { num_capture_channels: 1, num_render_channels: 1, ..Default::default() };
        let mut processor = Processor::new(&init).map_err(|e| EchoError(e.to_string()))?;
        processor.set_config(Config {
            echo_cancellation: Some(EchoCancellation {
                suppression_level: EchoCancellationSuppressionLevel::High,
                enable_extended_filter: true,
                enable_delay_agnostic: true,
                stream_delay_ms: None,
            }),
            ..Config::default()
        });
        Ok(EchoCanceller { processor })
    }

    /// 10 ms of what the speaker is about to play.
    pub fn far_end(&mut self, frame: &[f32; FRAME_10MS]) {
        // The module may process the render stream in place; ours is already played.
        let mut copy = *frame;
        if let Err(e) = self.processor.process_render_frame(&mut copy) {
            tracing::debug!(error = %e, "echo canceller refused a far-end frame");
        }
    }

    /// 10 ms of microphone, the echo of the far end taken out in place.
    pub fn near_end(&mut self, frame: &mut [f32; FRAME_10MS]) {
        if let Err(e) = self.processor.process_capture_frame(frame) {
            tracing::debug!(error = %e, "echo canceller refused a near-end frame");
        }
    }
}

/// How well the canceller does on a simulated room ([`measure`]).
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct EchoFigures {
    pub delay_ms: usize,
    /// Echo return loss enhancement where only the far end talks, after 2 s.
    pub erle_db: f64,
    /// The near end's speech in the output during double talk, and in the microphone
    /// (with the echo) for comparison: the voice tests' envelope correlation.
    pub near_end_kept: f32,
    pub near_end_in_microphone: f32,
}

/// A room: the far end played, `delay_ms` later, attenuated and muffled (a one-pole
/// low-pass), at the microphone.
fn echo_of(far: &[f32], delay_ms: usize) -> Vec<f32> {
    let delay = delay_ms * 48;
    let mut echo = vec![0.0; far.len()];
    let mut muffled = 0.0;
    for i in delay..far.len() {
        muffled = 0.6 * muffled + 0.4 * far[i - delay];
        echo[i] = 0.4 * muffled;
    }
    echo
}

fn energy(samples: &[f32]) -> f64 {
    samples.iter().map(|s| f64::from(*s).powi(2)).sum()
}

/// The far end says `speech` twice; the near end (another voice: `speech` backwards)
/// joins for the second time, over the echo of the far end `delay_ms` late. The figures
/// of the canceller on it.
pub fn measure(speech: &[f32], delay_ms: usize) -> Result<EchoFigures, EchoError> {
    let far: Vec<f32> = speech.iter().chain(speech).copied().collect();
    let near_voice: Vec<f32> = speech.iter().rev().copied().collect();
    let echo = echo_of(&far, delay_ms);
    let mut near = echo.clone();
    let joins = speech.len();
    for (i, s) in near_voice.iter().enumerate() {
        near[joins + i] += s;
    }
    let mut canceller = EchoCanceller::new()?;
    let mut far_end = canceller.clone();
    let mut out = Vec::with_capacity(near.len());
    for (f, n) in far.chunks_exact(FRAME_10MS).zip(near.chunks_exact(FRAME_10MS)) {
        far_end.far_end(f.try_into().expect("chunks of 10 ms"));
        let mut frame: [f32; FRAME_10MS] = n.try_into().expect("chunks of 10 ms");
        canceller.near_end(&mut frame);
        out.extend_from_slice(&frame);
    }
    let converged = (2 * 48_000).min(joins)..joins;
    let erle_db = 10.0 * (energy(&echo[converged.clone()]) / energy(&out[converged]).max(1e-12)).log10();
    Ok(EchoFigures {
        delay_ms,
        erle_db,
        near_end_kept: compare(&near_voice, &out[joins..]).correlation,
        near_end_in_microphone: compare(&near_voice, &near[joins..]).correlation,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audio::wav::read_voice;

    /// ERLE at least 20 dB once converged, and the near end's speech through the double
    /// talk at the voice tests' threshold, at the ends of the delays a room and a sound
    /// system make.
    #[test]
    fn echo_is_taken_out_and_the_near_end_survives() {
        let speech = read_voice(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/speech.wav")).unwrap();
        for delay_ms in [30, 120] {
            let figures = measure(&speech, delay_ms).unwrap();
            println!("{figures:?}");
            assert!(figures.erle_db >= 20.0, "{figures:?}");
            assert!(figures.near_end_kept >= 0.85, "{figures:?}");
            assert!(figures.near_end_in_microphone < figures.near_end_kept, "the echo hid it: {figures:?}");
        }
    }
}
