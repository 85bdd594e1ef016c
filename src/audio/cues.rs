//! The app's sounds: someone joined our channel, someone left it, a direct message came.
//! Each is two short notes made here (no sound files to ship or to load), played into
//! the mix like a voice.
//!
//! Abuse: a member who joins and leaves in a loop, or a stranger who sends direct
//! messages, would make a client chime without end. [`CuePlayer`] plays one cue at a
//! time and drops the ones that come while [`CUE_GAP`] has not passed since the last
//! began: a storm of events is one chime a quarter second at most.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{FRAME_20MS, SAMPLE_RATE};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cue {
    /// Someone joined the channel we are in.
    Joined,
    /// Someone left it.
    Left,
    /// A direct message came.
    Message,
}

/// Which cues the listener wants. The default is none: a headless client (a bot, a
/// test recording what it hears) plays no sounds of its own; the app turns them on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CueSettings {
    pub joined: bool,
    pub left: bool,
    pub message: bool,
}

impl CueSettings {
    pub const ALL: CueSettings = CueSettings { joined: true, left: true, message: true };

    pub fn allows(self, cue: Cue) -> bool {
        match cue {
            Cue::Joined => self.joined,
            Cue::Left => self.left,
            Cue::Message => self.message,
        }
    }
}

/// A new cue plays no sooner than this after the last one began.
pub const CUE_GAP: Duration = Duration::from_millis(250);
/// Each cue's peak, in full scale (about -12 dBFS): heard over a voice, not over it.
const LEVEL: f32 = 0.25;

impl Cue {
    /// The sound at 48 kHz mono: two notes, rising for a join, falling for a leave, two
    /// quick high ones for a message.
    pub fn samples(self) -> Vec<f32> {
        let (notes, note_ms): ([f32; 2], u32) = match self {
            Cue::Joined => ([659.3, 880.0], 90),
            Cue::Left => ([880.0, 659.3], 90),
            Cue::Message => ([1046.5, 1318.5], 60),
        };
        let per_note = (SAMPLE_RATE * note_ms / 1000) as usize;
        let mut samples = Vec::with_capacity(2 * per_note);
        for frequency in notes {
            for n in 0..per_note {
                let t = n as f32 / SAMPLE_RATE as f32;
                // 5 ms rise, then an exponential fall: a soft bell, no click at either end.
                let envelope = (t / 0.005).min(1.0) * (-t / (note_ms as f32 / 1000.0 / 4.0)).exp();
                let phase = std::f32::consts::TAU * frequency * t;
                samples.push(LEVEL * envelope * (0.8 * phase.sin() + 0.2 * (2.0 * phase).sin()));
            }
        }
        samples
    }
}

/// Plays cues into 20 ms frames, one at a time and no more often than [`CUE_GAP`].
#[derive(Default)]
pub struct CuePlayer {
    playing: Vec<f32>,
    at: usize,
    last_start: Option<Instant>,
}

impl CuePlayer {
    /// Starts `cue` now, unless one began less than [`CUE_GAP`] ago; says whether it did.
    pub fn start(&mut self, cue: Cue, now: Instant) -> bool {
        if self.last_start.is_some_and(|last| now.duration_since(last) < CUE_GAP) {
            return false;
        }
        self.last_start = Some(now);
        self.playing = cue.samples();
        self.at = 0;
        true
    }

    /// The next 20 ms of the cue playing (silence when none is).
    pub fn next_frame(&mut self, frame: &mut [f32; FRAME_20MS]) -> bool {
        frame.fill(0.0);
        let rest = &self.playing[self.at.min(self.playing.len())..];
        if rest.is_empty() {
            return false;
        }
        let len = rest.len().min(FRAME_20MS);
        frame[..len].copy_from_slice(&rest[..len]);
        self.at += len;
        true
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods, reason = "the virtual clock starts at an arbitrary real instant")]
mod tests {
    use super::*;

    fn rms(samples: &[f32]) -> f32 {
        (samples.iter().map(|s| s * s).sum::<f32>() / samples.len() as f32).sqrt()
    }

    #[test]
    fn each_cue_is_short_audible_and_starts_and_ends_softly() {
        for cue in [Cue::Joined, Cue::Left, Cue::Message] {
            let samples = cue.samples();
            let ms = samples.len() * 1000 / SAMPLE_RATE as usize;
            assert!((100..=200).contains(&ms), "{cue:?}: {ms} ms");
            let peak = samples.iter().fold(0.0f32, |m, s| m.max(s.abs()));
            assert!(peak > 0.15 && peak <= LEVEL, "{cue:?}: peak {peak}");
            assert!(samples[0].abs() < 0.01 && samples.last().unwrap().abs() < 0.02, "{cue:?}: clicks");
        }
        assert_ne!(Cue::Joined.samples(), Cue::Left.samples(), "a join and a leave sound different");
    }

    #[test]
    fn a_storm_of_cues_is_one_chime_a_quarter_second() {
        let start = Instant::now();
        let mut player = CuePlayer::default();
        let mut frame = [0.0; FRAME_20MS];
        let mut started = 0;
        let mut sounding = 0;
        // A member joins and leaves 50 times a second for two seconds.
        for tick in 0..100u32 {
            let now = start + Duration::from_millis(20) * tick;
            started += u32::from(player.start(if tick % 2 == 0 { Cue::Joined } else { Cue::Left }, now));
            if player.next_frame(&mut frame) {
                sounding += 1;
                assert!(rms(&frame) > 0.0);
            }
        }
        assert_eq!(started, 8, "one every 260 ms (the 20 ms tick after each 250 ms)");
        assert_eq!(sounding, 8 * 9, "each played whole: 180 ms, nine frames");
        // After the storm: silence once the last cue has played out.
        for _ in 0..10 {
            player.next_frame(&mut frame);
        }
        assert!(!player.next_frame(&mut frame) && frame.iter().all(|s| *s == 0.0));
    }
}
