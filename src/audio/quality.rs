//! How close a recording is to its source: the measure behind the voice tests, the
//! bad-network figures and `voipc bench compare`.
//!
//! Both signals are cut into 10 ms frames and reduced to their level in dB (the
//! envelope that makes speech intelligible). The recording is aligned to the source at
//! the lag (up to 10 s) where the envelopes agree best; the score is the Pearson
//! correlation of the aligned envelopes over the source's length: 1 for a perfect copy,
//! about 0 for unrelated sound or silence. A dropout is a run of frames where the
//! source speaks and the recording is silent.

use super::FRAME_10MS;
use super::dsp::level_dbfs;

/// Frames of the source louder than this count as speech.
const SPEECH_DBFS: f32 = -45.0;
/// Frames of the recording quieter than this count as silent.
const SILENT_DBFS: f32 = -65.0;
const MAX_LAG_FRAMES: usize = 1_000;

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Match {
    /// Envelope correlation, -1 to 1.
    pub correlation: f32,
    /// Where the source starts in the recording, in milliseconds.
    pub lag_ms: u32,
    /// The longest dropout in milliseconds.
    pub longest_gap_ms: u32,
}

fn envelope(samples: &[f32]) -> Vec<f32> {
    samples.chunks(FRAME_10MS).map(level_dbfs).collect()
}

fn pearson(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    if n < 2 {
        return 0.0;
    }
    let (a, b) = (&a[..n], &b[..n]);
    let (ma, mb) = (a.iter().sum::<f32>() / n as f32, b.iter().sum::<f32>() / n as f32);
    let (mut ab, mut aa, mut bb) = (0.0, 0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        ab += (x - ma) * (y - mb);
        aa += (x - ma) * (x - ma);
        bb += (y - mb) * (y - mb);
    }
    if aa == 0.0 || bb == 0.0 { 0.0 } else { ab / (aa * bb).sqrt() }
}

/// How well `recording` (48 kHz) reproduces `source` (48 kHz).
pub fn compare(source: &[f32], recording: &[f32]) -> Match {
    let (src, rec) = (envelope(source), envelope(recording));
    let mut best = (f32::MIN, 0);
    for lag in 0..=MAX_LAG_FRAMES.min(rec.len().saturating_sub(src.len() / 2)) {
        let r = pearson(&src, &rec[lag..]);
        if r > best.0 {
            best = (r, lag);
        }
    }
    let (correlation, lag) = best;
    let aligned = &rec[lag.min(rec.len())..];
    let (mut gap, mut longest) = (0u32, 0u32);
    for (s, r) in src.iter().zip(aligned) {
        if *s > SPEECH_DBFS && *r < SILENT_DBFS {
            gap += 1;
            longest = longest.max(gap);
        } else {
            gap = 0;
        }
    }
    Match { correlation: correlation.max(-1.0), lag_ms: lag as u32 * 10, longest_gap_ms: longest * 10 }
}

/// The lag of `recording` behind `source` in samples, to the sample: the peak of their
/// waveform cross-correlation within 10 ms of the envelope's lag `around_ms`.
pub fn fine_lag(source: &[f32], recording: &[f32], around_ms: u32) -> usize {
    let centre = around_ms as usize * (FRAME_10MS / 10);
    let len = source.len().min(recording.len().saturating_sub(centre + FRAME_10MS));
    let score = |lag: usize| -> f32 { source[..len].iter().zip(&recording[lag..lag + len]).map(|(a, b)| a * b).sum() };
    (centre.saturating_sub(FRAME_10MS)..=centre + FRAME_10MS)
        .filter(|lag| lag + len <= recording.len())
        .max_by(|a, b| score(*a).total_cmp(&score(*b)))
        .unwrap_or(centre)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bursts(seed: u32, len: usize) -> Vec<f32> {
        // Noise bursts of varying loudness, like syllables.
        let (mut x, mut loudness) = (seed, 0.0);
        (0..len)
            .map(|n| {
                x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                if n % 1_200 == 0 {
                    loudness = (x >> 28) as f32 * 0.05;
                }
                ((x >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * loudness
            })
            .collect()
    }

    #[test]
    fn a_delayed_copy_matches_and_other_sound_does_not() {
        let source = bursts(7, 96_000);
        let mut delayed = vec![0.0; 4_800];
        delayed.extend(source.iter().map(|x| x * 0.5));
        let m = compare(&source, &delayed);
        assert!(m.correlation > 0.99, "{m:?}");
        assert_eq!((m.lag_ms, m.longest_gap_ms), (100, 0));
        let mut late = vec![0.0; 4_803];
        late.extend(&source);
        assert_eq!(fine_lag(&source, &late, compare(&source, &late).lag_ms), 4_803);

        let other = compare(&source, &bursts(11, 96_000));
        assert!(other.correlation < 0.5, "{other:?}");
        let silence = compare(&source, &vec![0.0; 96_000]);
        assert!(silence.correlation.abs() < 0.01 && silence.longest_gap_ms >= 200, "{silence:?}");
    }
}
