//! The voice engine: the IO shell around the sans-IO pipelines, on two threads of its
//! own. Capture takes 10 ms frames from a microphone or a WAV file through
//! [`Capture`]; playback ticks every 20 ms, feeding [`Playback`] the packets the
//! network handed over and sending the mix to a speaker and/or a WAV recording. Both
//! talk to the network task over channels and never wait for it.

#![allow(clippy::disallowed_methods, reason = "the engine is a shell: it reads the clock to pace real time")]

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc as tokio_mpsc;

use super::device::{self, DeviceHealth};
use super::dsp::{Resampler, VoiceMode};
use super::pipeline::{Capture, CaptureSettings, EncodedVoice, Playback, PlaybackStats, SpeakingChange};
use super::wav::{Recorder, WavError};
use super::{FRAME_10MS, FRAME_20MS, SAMPLE_RATE};

const TEN_MS: Duration = Duration::from_millis(10);
const TWENTY_MS: Duration = Duration::from_millis(20);
/// Packets waiting for the playback thread at most (a second from 50 senders).
const PLAYBACK_QUEUE: usize = 2500;
/// Events waiting for the network task at most.
const EVENT_QUEUE: usize = 1024;

/// Where the microphone side's sound comes from.
pub enum Source {
    /// Samples at 48 kHz mono, played once in real time (a WAV file, for `--play`).
    Samples(Vec<f32>),
    /// A capture device by name, or the default one.
    Device(Option<String>),
    /// Nothing: listen only.
    Nothing,
}

pub struct EngineConfig {
    /// A playback device by name (`Some(None)`: the default one); `None`: no device.
    pub output_device: Option<Option<String>>,
    /// Where to record what this client plays.
    pub record: Option<PathBuf>,
}

/// What the engine tells the network task.
#[derive(Debug)]
pub enum EngineEvent {
    /// A packet to seal and send.
    Packet(EncodedVoice),
    /// We went on or off the air.
    Talking(bool),
    /// Someone else started or stopped talking.
    Speaking(SpeakingChange),
    /// The `--play` file is over.
    PlayFinished,
    /// A device vanished, or the one asked for was not there: what we use instead.
    Device(String),
    /// The microphone's level in dBFS (the loudest 10 ms of the last 100 ms), when it
    /// moved by a decibel or more.
    Level(f32),
}

/// Turns 10 ms levels into a meter reading every 100 ms, and only when it moved.
#[derive(Default)]
struct LevelMeter {
    frames: u32,
    peak: f32,
    shown: f32,
}

impl LevelMeter {
    fn push(&mut self, level_dbfs: f32) -> Option<f32> {
        self.peak = if self.frames == 0 { level_dbfs } else { self.peak.max(level_dbfs) };
        self.frames += 1;
        if self.frames < 10 {
            return None;
        }
        self.frames = 0;
        ((self.peak - self.shown).abs() >= 1.0).then(|| {
            self.shown = self.peak;
            self.peak
        })
    }
}

/// What the user changes while talking.
#[derive(Debug, Clone, Copy)]
pub enum Control {
    Mute(bool),
    PushToTalk(bool),
    Mode(VoiceMode, f32),
    Denoise(bool),
    LossHint(i32),
    Deafen(bool),
    /// Per-user volume in percent (0-200).
    Volume {
        sender: u32,
        percent: u32,
    },
    LocalMute {
        sender: u32,
        muted: bool,
    },
    /// The sender left: drop its state.
    Forget(u32),
    /// Play our own encoded voice back to us (the microphone test).
    Loopback(bool),
}

/// The sender id our own voice plays under in the microphone test.
pub const LOOPBACK_SENDER: u32 = u32::MAX;
/// The sender id the desktop audio of the share we watch plays under (a relay could give
/// a member this session id; its voice and the share's sound would then share a jitter
/// buffer, and nothing else).
pub const SHARE_AUDIO_SENDER: u32 = u32::MAX - 1;

enum PlaybackInput {
    Packet { arrival: Instant, sender: u32, sequence: u32, timestamp: u32, payload: Vec<u8> },
    Control(Control),
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Codec(#[from] super::codec::CodecError),
    #[error(transparent)]
    Wav(#[from] WavError),
    #[error(transparent)]
    Device(#[from] device::DeviceError),
    #[error("cannot start the {0} thread: {1}")]
    Thread(&'static str, std::io::Error),
}

pub struct Engine {
    events: tokio_mpsc::Sender<EngineEvent>,
    capture_control: mpsc::Sender<Control>,
    /// The capture thread's end of `capture_control`, until it starts: controls given
    /// before then wait in the channel.
    capture_controls: Option<Receiver<Control>>,
    playback: SyncSender<PlaybackInput>,
    stop: Arc<AtomicBool>,
    capture_thread: Option<JoinHandle<()>>,
    playback_thread: JoinHandle<Result<PlaybackStats, EngineError>>,
    dropped: u64,
    loopback: bool,
}

impl Engine {
    /// Starts playback (and recording); events arrive on the returned receiver.
    pub fn start(config: EngineConfig) -> Result<(Engine, tokio_mpsc::Receiver<EngineEvent>), EngineError> {
        let (events, events_rx) = tokio_mpsc::channel(EVENT_QUEUE);
        let stop = Arc::new(AtomicBool::new(false));
        let recorder = config.record.as_deref().map(Recorder::create).transpose()?;
        let (playback, playback_rx) = mpsc::sync_channel(PLAYBACK_QUEUE);
        let output_device = config.output_device;
        let (stop_playback, playback_events) = (stop.clone(), events.clone());
        let playback_thread = std::thread::Builder::new()
            .name("voipc-playback".into())
            .spawn(move || run_playback(output_device, recorder, &playback_rx, &playback_events, &stop_playback))
            .map_err(|e| EngineError::Thread("playback", e))?;
        let (capture_control, capture_controls) = mpsc::channel();
        let engine = Engine {
            events,
            capture_control,
            capture_controls: Some(capture_controls),
            playback,
            stop,
            capture_thread: None,
            playback_thread,
            dropped: 0,
            loopback: false,
        };
        Ok((engine, events_rx))
    }

    /// Starts sending from `source` (once; a second call does nothing).
    pub fn start_capture(&mut self, source: Source, settings: CaptureSettings) -> Result<(), EngineError> {
        let Some(controls) = self.capture_controls.take() else { return Ok(()) };
        let mut capture = Capture::new(settings)?;
        let (events, stop) = (self.events.clone(), self.stop.clone());
        let thread = std::thread::Builder::new()
            .name("voipc-capture".into())
            .spawn(move || run_capture(source, &mut capture, &controls, &events, &stop))
            .map_err(|e| EngineError::Thread("capture", e))?;
        self.capture_thread = Some(thread);
        Ok(())
    }

    /// A decrypted voice packet for the playback.
    pub fn play(&mut self, arrival: Instant, sender: u32, sequence: u32, timestamp: u32, payload: Vec<u8>) {
        let input = PlaybackInput::Packet { arrival, sender, sequence, timestamp, payload };
        if let Err(TrySendError::Full(_)) = self.playback.try_send(input) {
            self.dropped += 1;
        }
    }

    pub fn control(&mut self, control: Control) {
        match control {
            Control::Mute(_)
            | Control::PushToTalk(_)
            | Control::Mode(..)
            | Control::Denoise(_)
            | Control::LossHint(_) => {
                let _ = self.capture_control.send(control);
            }
            Control::Deafen(_) | Control::Volume { .. } | Control::LocalMute { .. } | Control::Forget(_) => {
                let _ = self.playback.send(PlaybackInput::Control(control));
            }
            Control::Loopback(on) => self.loopback = on,
        }
    }

    /// Whether our own packets should also be played to us (the microphone test).
    pub fn loopback(&self) -> bool {
        self.loopback
    }

    /// Stops both threads, completes the recording, and returns what playback counted.
    pub fn finish(self) -> Result<PlaybackStats, EngineError> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.capture_thread {
            let _ = thread.join();
        }
        let mut stats = self
            .playback_thread
            .join()
            .map_err(|_| EngineError::Thread("playback", std::io::Error::other("the playback thread panicked")))??;
        stats.jitter.lost += self.dropped;
        Ok(stats)
    }
}

fn send_event(events: &tokio_mpsc::Sender<EngineEvent>, event: EngineEvent) {
    // A full queue means the network task is stuck; dropping beats blocking audio.
    let _ = events.try_send(event);
}

/// Waits until `deadline`, or returns at once when it has passed.
fn sleep_until(deadline: Instant) {
    let now = Instant::now();
    if deadline > now {
        std::thread::sleep(deadline - now);
    }
}

fn run_capture(
    source: Source,
    capture: &mut Capture,
    controls: &Receiver<Control>,
    events: &tokio_mpsc::Sender<EngineEvent>,
    stop: &AtomicBool,
) {
    let mut meter = LevelMeter::default();
    let mut push = |frame: &[f32; FRAME_10MS]| {
        while let Ok(control) = controls.try_recv() {
            match control {
                Control::Mute(on) => capture.muted = on,
                Control::PushToTalk(held) => capture.push_to_talk_held = held,
                Control::Mode(mode, threshold) => capture.set_mode(mode, threshold),
                Control::Denoise(on) => capture.set_denoise(on),
                Control::LossHint(percent) => {
                    let _ = capture.set_loss_hint(percent);
                }
                _ => {}
            }
        }
        match capture.push_10ms(frame) {
            Ok(report) => {
                if let Some(packet) = report.packet {
                    send_event(events, EngineEvent::Packet(packet));
                }
                if let Some(talking) = report.talking {
                    send_event(events, EngineEvent::Talking(talking));
                }
                if let Some(level) = meter.push(report.level_dbfs) {
                    send_event(events, EngineEvent::Level(level));
                }
            }
            Err(e) => tracing::warn!(error = %e, "voice encoder failed"),
        }
    };
    match source {
        Source::Samples(samples) => {
            let start = Instant::now();
            for (n, chunk) in samples.chunks(FRAME_10MS).enumerate() {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                sleep_until(start + TEN_MS * n as u32);
                let mut frame = [0.0; FRAME_10MS];
                frame[..chunk.len()].copy_from_slice(chunk);
                push(&frame);
            }
            // A few frames of silence let the gate close and the listeners hear the end.
            for _ in 0..40 {
                push(&[0.0; FRAME_10MS]);
            }
            send_event(events, EngineEvent::PlayFinished);
        }
        Source::Device(name) => capture_device(name, &mut push, events, stop),
        Source::Nothing => {}
    }
}

/// Reads the microphone until stopped, reopening the default one if it vanishes.
fn capture_device(
    name: Option<String>,
    push: &mut dyn FnMut(&[f32; FRAME_10MS]),
    events: &tokio_mpsc::Sender<EngineEvent>,
    stop: &AtomicBool,
) {
    let mut wanted = name;
    let mut pending = Vec::with_capacity(4 * FRAME_10MS);
    let mut raw = Vec::with_capacity(4096);
    while !stop.load(Ordering::Relaxed) {
        let mut input = match device::open_input(wanted.as_deref()) {
            Ok(input) => input,
            Err(e) => {
                send_event(events, EngineEvent::Device(format!("no microphone: {e}")));
                return;
            }
        };
        if input.fell_back {
            send_event(events, EngineEvent::Device(format!("microphone not found; using {}", input.name)));
        }
        let mut resampler = (input.rate != SAMPLE_RATE).then(|| Resampler::new(input.rate, SAMPLE_RATE)).transpose();
        let Ok(ref mut resampler) = resampler else {
            send_event(events, EngineEvent::Device(format!("cannot resample {} Hz from {}", input.rate, input.name)));
            return;
        };
        while !stop.load(Ordering::Relaxed) && !lost(&input.health) {
            std::thread::sleep(Duration::from_millis(5));
            raw.clear();
            while let Ok(sample) = input.ring.pop() {
                raw.push(sample);
            }
            match resampler {
                Some(resampler) => {
                    let _ = resampler.push(&raw, &mut pending);
                }
                None => pending.extend_from_slice(&raw),
            }
            while pending.len() >= FRAME_10MS {
                let frame: [f32; FRAME_10MS] = pending[..FRAME_10MS].try_into().expect("checked length");
                push(&frame);
                pending.drain(..FRAME_10MS);
            }
        }
        if lost(&input.health) {
            send_event(
                events,
                EngineEvent::Device(format!("microphone {} vanished; switching to the default", input.name)),
            );
            wanted = None;
        }
    }
}

fn lost(health: &DeviceHealth) -> bool {
    health.failed.load(Ordering::Relaxed)
}

fn run_playback(
    output_device: Option<Option<String>>,
    mut recorder: Option<Recorder>,
    inputs: &Receiver<PlaybackInput>,
    events: &tokio_mpsc::Sender<EngineEvent>,
    stop: &AtomicBool,
) -> Result<PlaybackStats, EngineError> {
    let mut playback = Playback::default();
    let mut speaker = output_device.map(|name| Speaker::open(name, events));
    let mut out = [0.0; FRAME_20MS];
    let mut changes = Vec::new();
    let start = Instant::now();
    let mut tick = 0u32;
    while !stop.load(Ordering::Relaxed) {
        let deadline = start + TWENTY_MS * tick;
        // Take packets as they come until the tick is due.
        loop {
            let input = match deadline.checked_duration_since(Instant::now()) {
                Some(wait) if !wait.is_zero() => match inputs.recv_timeout(wait) {
                    Ok(input) => input,
                    Err(RecvTimeoutError::Timeout) => break,
                    Err(RecvTimeoutError::Disconnected) => return finish(playback, recorder),
                },
                _ => match inputs.try_recv() {
                    Ok(input) => input,
                    Err(_) => break,
                },
            };
            match input {
                PlaybackInput::Packet { arrival, sender, sequence, timestamp, payload } => {
                    playback.push(arrival, sender, sequence, timestamp, payload)?;
                }
                PlaybackInput::Control(control) => match control {
                    Control::Deafen(on) => playback.deafened = on,
                    Control::Volume { sender, percent } => playback.set_volume(sender, percent),
                    Control::LocalMute { sender, muted } => playback.set_muted(sender, muted),
                    Control::Forget(sender) => changes.extend(playback.remove(sender)),
                    _ => {}
                },
            }
        }
        playback.tick(deadline, &mut out, &mut changes);
        for change in changes.drain(..) {
            send_event(events, EngineEvent::Speaking(change));
        }
        if let Some(recorder) = &mut recorder {
            recorder.write(&out)?;
        }
        if let Some(Some(speaker)) = &mut speaker {
            speaker.play(&out, events);
        }
        tick += 1;
    }
    finish(playback, recorder)
}

fn finish(playback: Playback, recorder: Option<Recorder>) -> Result<PlaybackStats, EngineError> {
    if let Some(recorder) = recorder {
        recorder.finish()?;
    }
    Ok(playback.stats())
}

/// The playback device with its resampler; reopened on the default device if it vanishes.
struct Speaker {
    device: device::OpenDevice<rtrb::Producer<f32>>,
    resampler: Option<Resampler>,
    scratch: Vec<f32>,
}

impl Speaker {
    fn open(name: Option<String>, events: &tokio_mpsc::Sender<EngineEvent>) -> Option<Speaker> {
        let device = match device::open_output(name.as_deref()) {
            Ok(device) => device,
            Err(e) => {
                send_event(events, EngineEvent::Device(format!("no speaker: {e}")));
                return None;
            }
        };
        if device.fell_back {
            send_event(events, EngineEvent::Device(format!("speaker not found; using {}", device.name)));
        }
        let resampler = (device.rate != SAMPLE_RATE).then(|| Resampler::new(SAMPLE_RATE, device.rate).ok()).flatten();
        Some(Speaker { device, resampler, scratch: Vec::with_capacity(4 * FRAME_20MS) })
    }

    fn play(&mut self, frame: &[f32; FRAME_20MS], events: &tokio_mpsc::Sender<EngineEvent>) {
        if lost(&self.device.health) {
            let name = self.device.name.clone();
            send_event(events, EngineEvent::Device(format!("speaker {name} vanished; switching to the default")));
            if let Some(speaker) = Speaker::open(None, events) {
                *self = speaker;
            }
            return;
        }
        self.scratch.clear();
        match &mut self.resampler {
            Some(resampler) => {
                let _ = resampler.push(frame, &mut self.scratch);
            }
            None => self.scratch.extend_from_slice(frame),
        }
        for &sample in &self.scratch {
            // A full ring: the device clock runs slower than ours; drop rather than wait.
            if self.device.ring.push(sample).is_err() {
                self.device.health.xruns.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::LevelMeter;

    #[test]
    fn the_meter_reads_the_peak_of_100_ms_and_only_when_it_moved() {
        let mut meter = LevelMeter::default();
        let mut readings = Vec::new();
        for level in [-30.0, -30.4, -60.0, -20.0] {
            for frame in 0..10 {
                // The loudest 10 ms counts, wherever it falls.
                readings.extend(meter.push(if frame == 3 { level } else { level - 15.0 }));
            }
        }
        assert_eq!(readings, [-30.0, -60.0, -20.0]);
    }
}
