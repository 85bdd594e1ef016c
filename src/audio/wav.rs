//! WAV files for the headless client: any WAV in (resampled to 48 kHz mono), 48 kHz
//! mono 16-bit out, written to a temporary file and renamed into place when complete.

use std::path::{Path, PathBuf};

use super::SAMPLE_RATE;
use super::dsp::resample_clip;
use super::mixer::to_i16;

#[derive(Debug, thiserror::Error)]
pub enum WavError {
    #[error("{path}: {source}")]
    Format { path: PathBuf, source: hound::Error },
    #[error("{path}: {reason}")]
    Unsupported { path: PathBuf, reason: String },
}

/// Reads a WAV file (8-32 bit integer or 32-bit float, any rate, any channel count) as
/// 48 kHz mono samples in [-1, 1]; channels are averaged.
pub fn read_voice(path: &Path) -> Result<Vec<f32>, WavError> {
    let format = |source| WavError::Format { path: path.to_owned(), source };
    let mut reader = hound::WavReader::open(path).map_err(format)?;
    let spec = reader.spec();
    if spec.sample_format == hound::SampleFormat::Int && !(8..=32).contains(&spec.bits_per_sample) {
        let reason = format!("{}-bit samples", spec.bits_per_sample);
        return Err(WavError::Unsupported { path: path.to_owned(), reason });
    }
    let interleaved: Vec<f32> = match spec.sample_format {
        hound::SampleFormat::Float => reader.samples::<f32>().collect::<Result<_, _>>().map_err(format)?,
        hound::SampleFormat::Int => {
            let scale = 1.0 / (1u64 << (spec.bits_per_sample - 1)) as f32;
            reader.samples::<i32>().map(|s| s.map(|s| s as f32 * scale)).collect::<Result<_, _>>().map_err(format)?
        }
    };
    let channels = usize::from(spec.channels.max(1));
    let mono: Vec<f32> = interleaved.chunks_exact(channels).map(|f| f.iter().sum::<f32>() / channels as f32).collect();
    resample_clip(&mono, spec.sample_rate)
        .map_err(|e| WavError::Unsupported { path: path.to_owned(), reason: e.to_string() })
}

/// A 48 kHz 16-bit recording (mono, or interleaved stereo) that appears at its path
/// only when finished.
pub struct Recorder {
    writer: hound::WavWriter<std::io::BufWriter<std::fs::File>>,
    temporary: PathBuf,
    path: PathBuf,
}

impl Recorder {
    pub fn create(path: &Path) -> Result<Recorder, WavError> {
        Self::with_channels(path, 1)
    }

    pub fn stereo(path: &Path) -> Result<Recorder, WavError> {
        Self::with_channels(path, 2)
    }

    fn with_channels(path: &Path, channels: u16) -> Result<Recorder, WavError> {
        let spec = hound::WavSpec {
            channels,
            sample_rate: SAMPLE_RATE,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        let mut temporary = path.as_os_str().to_owned();
        temporary.push(".partial");
        let temporary = PathBuf::from(temporary);
        let writer = hound::WavWriter::create(&temporary, spec)
            .map_err(|source| WavError::Format { path: temporary.clone(), source })?;
        Ok(Recorder { writer, temporary, path: path.to_owned() })
    }

    pub fn write(&mut self, samples: &[f32]) -> Result<(), WavError> {
        for &s in samples {
            self.writer
                .write_sample(to_i16(s))
                .map_err(|source| WavError::Format { path: self.temporary.clone(), source })?;
        }
        Ok(())
    }

    /// Completes the file and moves it into place.
    pub fn finish(self) -> Result<(), WavError> {
        let format = |source| WavError::Format { path: self.temporary.clone(), source };
        self.writer.finalize().map_err(format)?;
        std::fs::rename(&self.temporary, &self.path)
            .map_err(|e| WavError::Format { path: self.path.clone(), source: hound::Error::IoError(e) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_wav_comes_back_as_48k_mono() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stereo.wav");
        let spec = hound::WavSpec {
            channels: 2,
            sample_rate: 16_000,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        let mut writer = hound::WavWriter::create(&path, spec).unwrap();
        for n in 0..16_000 {
            let s = ((n as f32 * 300.0 * std::f32::consts::TAU / 16_000.0).sin() * 16_000.0) as i16;
            writer.write_sample(s).unwrap();
            writer.write_sample(s).unwrap();
        }
        writer.finalize().unwrap();
        let voice = read_voice(&path).unwrap();
        assert!((voice.len() as i64 - 48_000).abs() <= 3, "{}", voice.len());
        let peak = voice.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        assert!((peak - 0.488).abs() < 0.02, "peak {peak}");

        let out = dir.path().join("out.wav");
        let mut recorder = Recorder::create(&out).unwrap();
        recorder.write(&voice).unwrap();
        assert!(!out.exists(), "nothing at the path until finished");
        recorder.finish().unwrap();
        let reader = hound::WavReader::open(&out).unwrap();
        assert_eq!(
            (reader.spec().sample_rate, reader.spec().channels, reader.len() as usize),
            (48_000, 1, voice.len())
        );

        std::fs::write(dir.path().join("bad.wav"), b"RIFF....WAVEjunk").unwrap();
        assert!(matches!(read_voice(&dir.path().join("bad.wav")), Err(WavError::Format { .. })));
    }
}
