//! The voice pipelines, sans-IO: [`Capture`] turns 10 ms of microphone into Opus packets
//! when the gate is open; [`Playback`] turns every sender's packets into one mixed
//! 20 ms frame per tick. The engine's threads drive them with samples and time.

use std::collections::BTreeMap;
use std::time::Instant;

use super::codec::{CodecError, EncoderSettings, VoiceDecoder, VoiceEncoder};
use super::cues::{Cue, CuePlayer};
use super::dsp::{Denoiser, Gate, VoiceMode, level_dbfs};
use super::echo::EchoCanceller;
use super::fill::FillStats;
use super::jitter::{JitterBuffer, JitterStats, Playout};
use super::mixer::Mixer;
use super::{FRAME_10MS, FRAME_20MS};

/// How the microphone side runs; the GUI's voice settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CaptureSettings {
    pub mode: VoiceMode,
    /// The level a voice must reach to open the voice-activity gate, in dBFS.
    pub threshold_dbfs: f32,
    /// RNNoise noise suppression (its voice probability drives the gate either way).
    pub denoise: bool,
    /// Acoustic echo cancellation, when the engine has a canceller (a microphone and a
    /// speaker): the far end taken out of the microphone before noise suppression.
    pub echo_cancel: bool,
    pub encoder: EncoderSettings,
}

impl Default for CaptureSettings {
    fn default() -> Self {
        CaptureSettings {
            mode: VoiceMode::VoiceActivity,
            threshold_dbfs: -50.0,
            denoise: true,
            echo_cancel: true,
            encoder: EncoderSettings::default(),
        }
    }
}

/// One Opus packet and where it sits in the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedVoice {
    pub sequence: u32,
    /// In 48 kHz samples; advances 960 every 20 ms, sent or not, so that receivers tell
    /// a pause from a loss.
    pub timestamp: u32,
    pub payload: Vec<u8>,
}

/// What 10 ms of microphone gave.
#[derive(Debug, Default)]
pub struct CaptureReport {
    pub packet: Option<EncodedVoice>,
    /// Whether we are on the air, when that changed.
    pub talking: Option<bool>,
    /// The input level after noise suppression, for the meter.
    pub level_dbfs: f32,
}

pub struct Capture {
    denoiser: Denoiser,
    gate: Gate,
    encoder: VoiceEncoder,
    denoise: bool,
    echo: Option<EchoCanceller>,
    echo_cancel: bool,
    frame: Box<[f32; FRAME_20MS]>,
    /// Which half of the 20 ms frame the next 10 ms fill.
    second_half: bool,
    open_in_frame: bool,
    sequence: u32,
    timestamp: u32,
    talking: bool,
    pub muted: bool,
    pub push_to_talk_held: bool,
}

impl Capture {
    pub fn new(settings: CaptureSettings) -> Result<Capture, CodecError> {
        Ok(Capture {
            denoiser: Denoiser::default(),
            gate: Gate::new(settings.mode, settings.threshold_dbfs),
            encoder: VoiceEncoder::new(settings.encoder)?,
            denoise: settings.denoise,
            echo: None,
            echo_cancel: settings.echo_cancel,
            frame: Box::new([0.0; FRAME_20MS]),
            second_half: false,
            open_in_frame: false,
            sequence: 0,
            timestamp: 0,
            talking: false,
            muted: false,
            push_to_talk_held: false,
        })
    }

    pub fn set_mode(&mut self, mode: VoiceMode, threshold_dbfs: f32) {
        self.gate.mode = mode;
        self.gate.threshold_dbfs = threshold_dbfs;
    }

    pub fn set_denoise(&mut self, on: bool) {
        self.denoise = on;
    }

    /// The canceller whose far end is what the speaker plays (the engine's).
    pub fn set_echo_canceller(&mut self, echo: EchoCanceller) {
        self.echo = Some(echo);
    }

    pub fn set_echo_cancel(&mut self, on: bool) {
        self.echo_cancel = on;
    }

    /// Tells the encoder how much loss to plan its FEC for.
    pub fn set_loss_hint(&mut self, percent: i32) -> Result<(), CodecError> {
        self.encoder.set_loss_hint(percent)
    }

    /// The next 10 ms of microphone.
    pub fn push_10ms(&mut self, input: &[f32; FRAME_10MS]) -> Result<CaptureReport, CodecError> {
        let half = if self.second_half { &mut self.frame[FRAME_10MS..] } else { &mut self.frame[..FRAME_10MS] };
        let half: &mut [f32; FRAME_10MS] = half.try_into().expect("half of 20 ms is 10 ms");
        half.copy_from_slice(input);
        if let (Some(echo), true) = (&mut self.echo, self.echo_cancel) {
            echo.near_end(half);
        }
        let probability = self.denoiser.process(half, self.denoise);
        let level_dbfs = level_dbfs(half);
        let open = self.gate.decide(probability, level_dbfs, self.push_to_talk_held) && !self.muted;
        self.open_in_frame |= open;
        let mut report = CaptureReport { level_dbfs, ..CaptureReport::default() };
        if !self.second_half {
            self.second_half = true;
            return Ok(report);
        }
        self.second_half = false;
        let sent = std::mem::take(&mut self.open_in_frame);
        if sent {
            let payload = self.encoder.encode(&self.frame)?;
            report.packet =
                Some(EncodedVoice { sequence: self.sequence, timestamp: self.timestamp, payload: payload.to_vec() });
            self.sequence = self.sequence.wrapping_add(1);
        }
        self.timestamp = self.timestamp.wrapping_add(FRAME_20MS as u32);
        if sent != self.talking {
            self.talking = sent;
            report.talking = Some(sent);
        }
        Ok(report)
    }
}

/// One sender as the playback hears it.
struct Voice {
    jitter: JitterBuffer,
    decoder: VoiceDecoder,
    /// Per-user volume: 0.0-2.0 (0-200 %).
    volume: f32,
    muted: bool,
    talking: bool,
    undecodable: u64,
}

/// A sender started or stopped talking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpeakingChange {
    pub sender: u32,
    pub speaking: bool,
}

/// Everything the playback side counted, over all senders.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct PlaybackStats {
    #[serde(flatten)]
    pub jitter: JitterStats,
    pub undecodable: u64,
    /// 20 ms frames that went to the output.
    pub frames_out: u64,
    /// How the speaker's ring was kept (zero without a speaker).
    pub speaker: FillStats,
}

pub struct Playback {
    voices: BTreeMap<u32, Voice>,
    /// The listener's volume (0.0-2.0) and local mute per sender, kept whether or not
    /// the sender has spoken yet, and applied when its voice starts.
    choices: BTreeMap<u32, (f32, bool)>,
    mixer: Mixer,
    frame: Box<[f32; FRAME_20MS]>,
    /// What senders who left had counted.
    departed: PlaybackStats,
    frames_out: u64,
    pub deafened: bool,
    cues: CuePlayer,
}

impl Default for Playback {
    fn default() -> Self {
        Playback {
            voices: BTreeMap::new(),
            choices: BTreeMap::new(),
            mixer: Mixer::default(),
            frame: Box::new([0.0; FRAME_20MS]),
            departed: PlaybackStats::default(),
            frames_out: 0,
            deafened: false,
            cues: CuePlayer::default(),
        }
    }
}

impl Playback {
    /// A packet from `sender` arrived at `now`.
    pub fn push(
        &mut self,
        now: Instant,
        sender: u32,
        sequence: u32,
        timestamp: u32,
        payload: Vec<u8>,
    ) -> Result<(), CodecError> {
        let voice = match self.voices.entry(sender) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(e) => e.insert(Voice {
                jitter: JitterBuffer::default(),
                decoder: VoiceDecoder::new()?,
                volume: self.choices.get(&sender).map_or(1.0, |c| c.0),
                muted: self.choices.get(&sender).is_some_and(|c| c.1),
                talking: false,
                undecodable: 0,
            }),
        };
        voice.jitter.push(now, sequence, timestamp, payload);
        Ok(())
    }

    /// Sets a user's volume (percent, 0-200) and local mute, from now on, whether or
    /// not they have spoken yet.
    pub fn set_volume(&mut self, sender: u32, percent: u32) {
        let volume = percent.min(200) as f32 / 100.0;
        self.choices.entry(sender).or_insert((1.0, false)).0 = volume;
        if let Some(voice) = self.voices.get_mut(&sender) {
            voice.volume = volume;
        }
    }

    pub fn set_muted(&mut self, sender: u32, muted: bool) {
        self.choices.entry(sender).or_insert((1.0, false)).1 = muted;
        if let Some(voice) = self.voices.get_mut(&sender) {
            voice.muted = muted;
        }
    }

    /// A sender left: its buffer, decoder and the choices for its session go (the shell
    /// applies the person's choices again to a session they come back with).
    pub fn remove(&mut self, sender: u32) -> Option<SpeakingChange> {
        self.choices.remove(&sender);
        let voice = self.voices.remove(&sender)?;
        self.departed.add(&voice);
        voice.talking.then_some(SpeakingChange { sender, speaking: false })
    }

    /// The 20 ms to play at `now`, mixed from every sender; who started or stopped
    /// talking goes to `changes`.
    pub fn tick(&mut self, now: Instant, out: &mut [f32; FRAME_20MS], changes: &mut Vec<SpeakingChange>) {
        self.mixer.clear();
        for (&sender, voice) in &mut self.voices {
            let decoded = match voice.jitter.pop(now) {
                Playout::Packet(packet) => Some(voice.decoder.decode(&packet, &mut self.frame)),
                Playout::Recover(next) => Some(voice.decoder.recover(&next, &mut self.frame)),
                Playout::Conceal => Some(voice.decoder.conceal(&mut self.frame)),
                Playout::Silent => None,
            };
            if let Some(Err(_)) = decoded {
                voice.undecodable += 1;
                if voice.decoder.conceal(&mut self.frame).is_err() {
                    self.frame.fill(0.0);
                }
            }
            if decoded.is_some() && !voice.muted && !self.deafened {
                self.mixer.add(&self.frame, voice.volume);
            }
            let talking = voice.jitter.is_active();
            if talking != voice.talking {
                voice.talking = talking;
                changes.push(SpeakingChange { sender, speaking: talking });
            }
        }
        if self.cues.next_frame(&mut self.frame) {
            self.mixer.add(&self.frame, 1.0);
        }
        self.mixer.finish(out);
        self.frames_out += 1;
    }

    /// Plays `cue` into the mix from the next tick (not while deafened: then the speaker
    /// stays silent). Says whether it will be heard ([`CuePlayer`] spaces cues out).
    pub fn cue(&mut self, cue: Cue, now: Instant) -> bool {
        !self.deafened && self.cues.start(cue, now)
    }

    pub fn stats(&self) -> PlaybackStats {
        let mut stats = PlaybackStats { frames_out: self.frames_out, ..self.departed };
        for voice in self.voices.values() {
            stats.add(voice);
        }
        stats
    }
}

impl PlaybackStats {
    fn add(&mut self, voice: &Voice) {
        let (j, s) = (voice.jitter.stats(), &mut self.jitter);
        s.received += j.received;
        s.played += j.played;
        s.recovered += j.recovered;
        s.concealed += j.concealed;
        s.lost += j.lost;
        s.late += j.late;
        s.drained += j.drained;
        self.undecodable += voice.undecodable;
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods, reason = "the virtual clock starts at an arbitrary real instant")]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    /// Ticks `playback` for `frames` 20 ms frames from `start`; the energy of each.
    fn energies(playback: &mut Playback, start: Instant, frames: u32) -> Vec<f32> {
        let (mut out, mut changes) = ([0.0; FRAME_20MS], Vec::new());
        (0..frames)
            .map(|n| {
                playback.tick(start + Duration::from_millis(20) * n, &mut out, &mut changes);
                out.iter().map(|s| s * s).sum::<f32>()
            })
            .collect()
    }

    #[test]
    fn a_cue_is_mixed_in_once_and_not_while_deafened() {
        let start = Instant::now();
        let mut playback = Playback::default();
        assert!(playback.cue(Cue::Joined, start));
        let heard = energies(&mut playback, start, 15);
        let expected = Cue::Joined.samples().len().div_ceil(FRAME_20MS);
        assert!(heard[..expected].iter().all(|e| *e > 0.0), "{heard:?}");
        assert!(heard[expected..].iter().all(|e| *e == 0.0), "then silence: {heard:?}");
        playback.deafened = true;
        assert!(!playback.cue(Cue::Message, start + Duration::from_secs(1)));
        assert!(energies(&mut playback, start, 10).iter().all(|e| *e == 0.0));
    }
}
