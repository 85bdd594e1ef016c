//! The microphone test, with no server: the voice engine runs on its own, the level
//! meter and the talk gate show live, and "record" keeps a few seconds of what would be
//! sent (Opus packets, after echo cancellation, noise suppression and the gate) and
//! plays them back through the speaker as the others would hear it. From the levels
//! heard while recording, it suggests a voice-activity threshold.
//!
//! [`MicCheck`] is the sans-IO core (packets, levels and the time go in); [`run`] is its
//! shell around an [`Engine`].

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::SAMPLE_RATE;
use super::dsp::VoiceMode;
use super::engine::{Engine, EngineConfig, EngineError, EngineEvent, LOOPBACK_SENDER, Source};
use super::pipeline::{CaptureSettings, EncodedVoice, PlaybackStats};

/// How long a recording lasts.
pub const RECORD_FOR: Duration = Duration::from_secs(5);
/// Packets a recording keeps at most: 20 ms each (what a hostile encoder setting or a
/// stuck clock could add beyond that is dropped, never kept).
const MAX_PACKETS: usize = (RECORD_FOR.as_millis() / 20) as usize + 10;
/// How far past the recording's end a packet's timestamp may put it (the capture's own
/// delay, at most).
const MAX_LATE: Duration = Duration::from_secs(1);
/// Level readings a recording keeps at most (the meter reads every 100 ms).
const MAX_LEVELS: usize = (RECORD_FOR.as_millis() / 100) as usize + 10;
/// The voice must stand this far above the background for a threshold to be told.
const MIN_SPREAD_DB: f32 = 10.0;
/// How far under the voice's peaks its soft syllables go, about.
const SOFT_SPEECH_DB: f32 = 25.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Idle,
    Recording,
    Playing,
}

/// Records a few seconds of encoded voice and plays it back at the pace the microphone
/// made it (its timestamps), pauses included.
#[derive(Debug)]
pub struct MicCheck {
    phase: Phase,
    /// When the recording began, or the playback.
    since: Instant,
    /// Each packet with when it plays, after `since`.
    packets: VecDeque<(Duration, EncodedVoice)>,
    levels: Vec<f32>,
    suggested: Option<f32>,
    /// The microphone has been heard (a level came): it is open.
    heard: bool,
    /// A recording asked for before the microphone was heard: its clock starts then, so
    /// that the time it takes a device to open is not recorded as silence.
    waiting: bool,
}

impl MicCheck {
    pub fn new(now: Instant) -> MicCheck {
        MicCheck {
            phase: Phase::Idle,
            since: now,
            packets: VecDeque::new(),
            levels: Vec::new(),
            suggested: None,
            heard: false,
            waiting: false,
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Starts a recording (a playback under way stops).
    pub fn record(&mut self, now: Instant) {
        self.phase = Phase::Recording;
        self.since = now;
        self.waiting = !self.heard;
        self.packets.clear();
        self.levels.clear();
        self.suggested = None;
    }

    /// A packet the capture encoded. The first plays when it came; each after it by its
    /// timestamp, on the microphone's clock: when the packets reached this task depends
    /// on the capture thread's scheduling (a loaded machine delivers them in bursts), and
    /// a burst played back as it came made the playback's jitter buffer skip frames.
    pub fn packet(&mut self, packet: EncodedVoice, now: Instant) {
        if self.phase != Phase::Recording || self.waiting || self.packets.len() >= MAX_PACKETS {
            return;
        }
        let at = match self.packets.front() {
            Some((first_at, first)) => {
                let samples = packet.timestamp.wrapping_sub(first.timestamp);
                *first_at + Duration::from_micros(u64::from(samples) * 1_000_000 / u64::from(SAMPLE_RATE))
            }
            None => now.saturating_duration_since(self.since),
        };
        // A timestamp out of step with the recording (one from before it wraps around to
        // hours) is not kept: the playback would wait for it.
        if at <= RECORD_FOR + MAX_LATE {
            self.packets.push_back((at, packet));
        }
    }

    /// A reading of the level meter (the first says the microphone is open).
    pub fn level(&mut self, dbfs: f32, now: Instant) {
        self.heard = true;
        if std::mem::take(&mut self.waiting) {
            self.since = now;
        }
        if self.phase == Phase::Recording && self.levels.len() < MAX_LEVELS {
            self.levels.push(dbfs);
        }
    }

    /// Moves on with the time: the recording ends after [`RECORD_FOR`] and the playback
    /// begins; returns the packets whose time to play has come.
    pub fn poll(&mut self, now: Instant) -> Vec<EncodedVoice> {
        let elapsed = now.saturating_duration_since(self.since);
        match self.phase {
            Phase::Idle => Vec::new(),
            Phase::Recording if self.waiting || elapsed < RECORD_FOR => Vec::new(),
            Phase::Recording => {
                self.suggested = suggest_threshold(&self.levels);
                self.phase = Phase::Playing;
                self.since = now;
                self.poll(now)
            }
            Phase::Playing => {
                let mut due = Vec::new();
                while self.packets.front().is_some_and(|(at, _)| *at <= elapsed) {
                    due.extend(self.packets.pop_front().map(|(_, packet)| packet));
                }
                // The last packet played; a little more time lets the jitter buffer drain.
                if self.packets.is_empty() && elapsed >= RECORD_FOR + Duration::from_millis(200) {
                    self.phase = Phase::Idle;
                }
                due
            }
        }
    }

    /// The voice-activity threshold the last recording suggests, if it told the voice
    /// from the background.
    pub fn suggested_threshold(&self) -> Option<f32> {
        self.suggested
    }
}

/// A threshold a third of the way from the background (the quietest twentieth of the
/// readings: the pauses between words, when someone talks throughout) up to the voice
/// (the loudest tenth), the gate then opening for speech and staying shut for the room;
/// but no higher than [`SOFT_SPEECH_DB`] under the voice's peaks, so that soft syllables
/// pass, and no lower than 3 dB over the background. `None` when the background and
/// the voice are less than [`MIN_SPREAD_DB`] apart.
pub fn suggest_threshold(levels: &[f32]) -> Option<f32> {
    let mut sorted: Vec<f32> = levels.iter().copied().filter(|l| l.is_finite()).collect();
    if sorted.len() < 10 {
        return None;
    }
    sorted.sort_by(f32::total_cmp);
    let quiet = sorted[sorted.len() / 20];
    let loud = sorted[sorted.len() * 9 / 10];
    let threshold = (quiet + (loud - quiet) / 3.0).min(loud - SOFT_SPEECH_DB).max(quiet + 3.0);
    (loud - quiet >= MIN_SPREAD_DB).then(|| threshold.clamp(-80.0, -10.0).round())
}

/// What the user does in the test.
#[derive(Debug, Clone, Copy)]
pub enum CheckControl {
    Record,
    Settings(CaptureSettings),
}

/// What the test shows.
#[derive(Debug, Clone, PartialEq)]
pub enum CheckEvent {
    /// The microphone's level in dBFS.
    Level(f32),
    /// The gate opened or shut.
    Talking(bool),
    Phase(Phase),
    /// A recording ended: the threshold it suggests.
    Suggested(Option<f32>),
    /// A device notice (fallen back, back again).
    Device(String),
}

/// Runs the test on `input` and `output` (by name; `None` is the default) until the
/// controls' sender is dropped, and returns how the playback went. Push-to-talk is
/// tested as voice activity (no key is held in the test).
#[allow(clippy::disallowed_methods, reason = "the shell paces the playback by the clock")]
pub async fn run(
    input: Option<String>,
    output: Option<String>,
    settings: CaptureSettings,
    mut controls: mpsc::Receiver<CheckControl>,
    mut emit: impl FnMut(CheckEvent),
) -> Result<PlaybackStats, EngineError> {
    let testable = |mut settings: CaptureSettings| {
        if settings.mode == VoiceMode::PushToTalk {
            settings.mode = VoiceMode::VoiceActivity;
        }
        settings
    };
    let (mut engine, mut events) = Engine::start(EngineConfig { output_device: Some(output), record: None })?;
    engine.start_capture(Source::Device(input), testable(settings))?;
    let mut check = MicCheck::new(Instant::now());
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        let phase = check.phase();
        tokio::select! {
            event = events.recv() => match event {
                Some(EngineEvent::Packet(packet)) => check.packet(packet, Instant::now()),
                Some(EngineEvent::Level(dbfs)) => {
                    check.level(dbfs, Instant::now());
                    emit(CheckEvent::Level(dbfs));
                }
                Some(EngineEvent::Talking(on)) => emit(CheckEvent::Talking(on)),
                Some(EngineEvent::Device(message)) => emit(CheckEvent::Device(message)),
                Some(_) => {}
                None => break,
            },
            control = controls.recv() => match control {
                Some(CheckControl::Record) => check.record(Instant::now()),
                Some(CheckControl::Settings(settings)) => engine.apply_settings(&testable(settings)),
                None => break,
            },
            _ = tick.tick() => {
                let now = Instant::now();
                for packet in check.poll(now) {
                    engine.play(now, LOOPBACK_SENDER, packet.sequence, packet.timestamp, packet.payload);
                }
            }
        }
        if check.phase() != phase {
            if phase == Phase::Recording {
                emit(CheckEvent::Suggested(check.suggested_threshold()));
            }
            emit(CheckEvent::Phase(check.phase()));
        }
    }
    engine.finish()
}

#[cfg(test)]
#[allow(clippy::disallowed_methods, reason = "the virtual clock starts at an arbitrary real instant")]
mod tests {
    use super::*;

    fn packet(sequence: u32) -> EncodedVoice {
        EncodedVoice { sequence, timestamp: sequence * 960, payload: vec![sequence as u8; 40] }
    }

    #[test]
    fn a_recording_plays_back_at_the_microphones_pace_then_stops() {
        let start = Instant::now();
        let mut check = MicCheck::new(start);
        check.level(-90.0, start);
        check.packet(packet(99), start);
        check.record(start);
        // 5 s of speech at 20 ms a packet, with a pause of a second in the middle (the
        // gate shut), reaching the test in bursts of five (a late capture thread); one
        // from a clock gone wrong; and a flood (a stuck clock) beyond what 5 s can hold.
        for n in 0..250u32 {
            let at = start + Duration::from_millis(100) * (n / 5) + Duration::from_millis(90);
            if !(50..100).contains(&n) {
                check.packet(packet(n), at);
            }
            assert!(check.poll(at).is_empty(), "nothing plays while recording");
        }
        check.packet(packet(5000), start + Duration::from_millis(4990));
        for _ in 0..1000 {
            check.packet(packet(249), start + Duration::from_millis(4990));
        }
        let play = start + RECORD_FOR;
        let mut played = Vec::new();
        let mut t = play;
        while check.phase() != Phase::Idle {
            played.extend(check.poll(t).into_iter().map(|p| (t.duration_since(play).as_millis() / 10, p.sequence)));
            t += Duration::from_millis(10);
            assert!(t < play + Duration::from_secs(10), "the playback ends");
        }
        assert_eq!(played.len(), MAX_PACKETS, "at most {MAX_PACKETS} kept; the packet before the recording is not");
        assert!(played.iter().all(|(_, sequence)| *sequence != 5000));
        // The first when it came, 90 ms in; the rest 20 ms apart.
        assert_eq!(played[0], (9, 0));
        assert_eq!(played[49], (9 + 49 * 2, 49));
        assert_eq!(played[50], (9 + 100 * 2, 100), "the pause is kept");
        assert_eq!(check.poll(t + Duration::from_secs(1)), vec![], "nothing after the end");
    }

    #[test]
    fn the_threshold_is_told_from_speech_over_a_quiet_room() {
        // A room at -65 dBFS, speech peaking at -20.
        let levels: Vec<f32> = (0..40).map(|i| if i % 2 == 0 { -65.0 } else { -20.0 }).collect();
        assert_eq!(suggest_threshold(&levels), Some(-50.0));
        // Speech from -12 down to -35 with pauses in a silent room: a third of the way up
        // from the silence, well under the softest syllables.
        let mut talk: Vec<f32> = (0..45).map(|i| -12.0 - (i % 24) as f32).collect();
        talk.extend([-90.0, -88.0, -92.0, -90.0, -91.0]);
        assert_eq!(suggest_threshold(&talk), Some(-65.0));
        // A noisy room, -45, under a voice at -30: a third of the way up (-40) would cut
        // the voice's soft syllables, so the gate sits just over the room.
        let noisy: Vec<f32> = (0..40).map(|i| if i % 2 == 0 { -45.0 } else { -30.0 }).collect();
        assert_eq!(suggest_threshold(&noisy), Some(-42.0));
        // Only noise, or only speech: no telling them apart.
        assert_eq!(suggest_threshold(&[-40.0; 40]), None);
        assert_eq!(suggest_threshold(&[-40.0, -20.0]), None, "too few readings");
        // Recording is asked for before the microphone has been heard: its 5 s start with
        // the first reading, not while the device opens.
        let start = Instant::now();
        let mut check = MicCheck::new(start);
        check.record(start);
        assert!(check.poll(start + RECORD_FOR).is_empty() && check.phase() == Phase::Recording);
        let opened = start + Duration::from_secs(2);
        for level in levels {
            check.level(level, opened);
        }
        check.poll(start + RECORD_FOR);
        assert_eq!(check.phase(), Phase::Recording, "5 s from when it was heard");
        check.poll(opened + RECORD_FOR);
        assert_eq!((check.phase(), check.suggested_threshold()), (Phase::Playing, Some(-50.0)));
    }
}
