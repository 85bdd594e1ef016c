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

use super::cues::Cue;
use super::device::{self, DeviceWatch};
use super::dsp::{Resampler, VoiceMode};
use super::echo::EchoCanceller;
use super::fill::{FillKeeper, FillStats, Plan, stretch};
use super::follow::{Action, DeviceFollow, LOOK_EVERY};
use super::pipeline::{Capture, CaptureSettings, EncodedVoice, Playback, PlaybackStats, SpeakingChange};
use super::wav::{Recorder, WavError};
use super::{FRAME_10MS, FRAME_20MS, SAMPLE_RATE};

const TEN_MS: Duration = Duration::from_millis(10);
const TWENTY_MS: Duration = Duration::from_millis(20);
/// Packets waiting for the playback thread at most (a second from 50 senders).
const PLAYBACK_QUEUE: usize = 2500;
/// Events waiting for the network task at most.
const EVENT_QUEUE: usize = 1024;
/// Controls waiting for a thread at most (each thread takes them every 10-20 ms).
const CONTROL_QUEUE: usize = 1024;

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
    /// Echo cancellation on or off.
    EchoCancel(bool),
    /// Play one of the app's sounds.
    Cue(Cue),
}

/// The sender id our own voice plays under in the microphone test ([`super::check`]).
pub const LOOPBACK_SENDER: u32 = u32::MAX;
/// The sender id the desktop audio of the share we watch plays under (a relay could give
/// a member this session id; its voice and the share's sound would then share a jitter
/// buffer, and nothing else).
pub const SHARE_AUDIO_SENDER: u32 = u32::MAX - 1;

struct PlaybackPacket {
    arrival: Instant,
    sender: u32,
    sequence: u32,
    timestamp: u32,
    payload: Vec<u8>,
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
    capture_control: SyncSender<Control>,
    /// The capture thread's end of `capture_control`, until it starts: controls given
    /// before then wait in the channel.
    capture_controls: Option<Receiver<Control>>,
    playback: SyncSender<PlaybackPacket>,
    playback_control: SyncSender<Control>,
    stop: Arc<AtomicBool>,
    capture_thread: Option<JoinHandle<()>>,
    playback_thread: JoinHandle<Result<PlaybackStats, EngineError>>,
    /// The device lists both threads look at, once one of them uses a device chosen by
    /// name (the default needs no looking for).
    watch: Option<Arc<DeviceWatch>>,
    /// The echo canceller whose far end the speaker feeds (with a speaker only).
    echo: Option<EchoCanceller>,
    dropped: u64,
}

impl Engine {
    /// Starts playback (and recording); events arrive on the returned receiver.
    pub fn start(config: EngineConfig) -> Result<(Engine, tokio_mpsc::Receiver<EngineEvent>), EngineError> {
        let (events, events_rx) = tokio_mpsc::channel(EVENT_QUEUE);
        let stop = Arc::new(AtomicBool::new(false));
        let recorder = config.record.as_deref().map(Recorder::create).transpose()?;
        let (playback, playback_rx) = mpsc::sync_channel(PLAYBACK_QUEUE);
        let (playback_control, playback_controls) = mpsc::sync_channel(CONTROL_QUEUE);
        let output_device = config.output_device;
        let watch = matches!(output_device, Some(Some(_))).then(start_watch).transpose()?;
        let speaker_watch = watch.clone();
        let echo = output_device.as_ref().and_then(|_| match EchoCanceller::new() {
            Ok(echo) => Some(echo),
            Err(e) => {
                tracing::warn!(error = %e, "no echo cancellation");
                None
            }
        });
        let far_end = echo.clone();
        let (stop_playback, playback_events) = (stop.clone(), events.clone());
        let playback_thread = std::thread::Builder::new()
            .name("voipc-playback".into())
            .spawn(move || {
                let inputs = PlaybackInputs { packets: playback_rx, controls: playback_controls };
                let speaker = output_device.map(|name| Speaker::new(name, speaker_watch, far_end));
                run_playback(speaker, recorder, &inputs, &playback_events, &stop_playback)
            })
            .map_err(|e| EngineError::Thread("playback", e))?;
        let (capture_control, capture_controls) = mpsc::sync_channel(CONTROL_QUEUE);
        let engine = Engine {
            events,
            capture_control,
            capture_controls: Some(capture_controls),
            playback,
            playback_control,
            stop,
            capture_thread: None,
            playback_thread,
            watch,
            echo,
            dropped: 0,
        };
        Ok((engine, events_rx))
    }

    /// Starts sending from `source` (once; a second call does nothing).
    pub fn start_capture(&mut self, source: Source, settings: CaptureSettings) -> Result<(), EngineError> {
        let Some(controls) = self.capture_controls.take() else { return Ok(()) };
        let mut capture = Capture::new(settings)?;
        // A microphone can hear the speaker; a file cannot.
        if let (Source::Device(_), Some(echo)) = (&source, &self.echo) {
            capture.set_echo_canceller(echo.clone());
        }
        let (events, stop) = (self.events.clone(), self.stop.clone());
        let watch = match (&source, &self.watch) {
            (Source::Device(Some(_)), Some(watch)) => Some(watch.clone()),
            (Source::Device(Some(_)), None) => Some(start_watch()?),
            _ => None,
        };
        let thread = std::thread::Builder::new()
            .name("voipc-capture".into())
            .spawn(move || run_capture(source, watch, &mut capture, &controls, &events, &stop))
            .map_err(|e| EngineError::Thread("capture", e))?;
        self.capture_thread = Some(thread);
        Ok(())
    }

    /// A decrypted voice packet for the playback.
    pub fn play(&mut self, arrival: Instant, sender: u32, sequence: u32, timestamp: u32, payload: Vec<u8>) {
        let packet = PlaybackPacket { arrival, sender, sequence, timestamp, payload };
        if let Err(TrySendError::Full(_)) = self.playback.try_send(packet) {
            self.dropped += 1;
        }
    }

    /// Hands a control to the thread it concerns; never waits (this runs on the network
    /// task). A queue full of controls means that thread is stuck: the control is dropped.
    pub fn control(&mut self, control: Control) {
        let queue = match control {
            Control::Mute(_)
            | Control::PushToTalk(_)
            | Control::Mode(..)
            | Control::Denoise(_)
            | Control::EchoCancel(_)
            | Control::LossHint(_) => &self.capture_control,
            Control::Deafen(_)
            | Control::Volume { .. }
            | Control::LocalMute { .. }
            | Control::Forget(_)
            | Control::Cue(_) => &self.playback_control,
        };
        if let Err(TrySendError::Full(control)) = queue.try_send(control) {
            tracing::warn!(?control, "the audio thread is not taking controls; dropped");
        }
    }

    /// Changes how the capture decides what goes on the air (its encoder stays).
    pub fn apply_settings(&mut self, settings: &CaptureSettings) {
        self.control(Control::Mode(settings.mode, settings.threshold_dbfs));
        self.control(Control::Denoise(settings.denoise));
        self.control(Control::EchoCancel(settings.echo_cancel));
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

fn start_watch() -> Result<Arc<DeviceWatch>, EngineError> {
    DeviceWatch::start(LOOK_EVERY).map(Arc::new).map_err(|e| EngineError::Thread("devices", e))
}

/// Whether the latest listing has `wanted`: `None` without a watch or before its first.
fn is_listed(watch: Option<&DeviceWatch>, input: bool, wanted: &str) -> Option<bool> {
    watch?.has(input, wanted)
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
    watch: Option<Arc<DeviceWatch>>,
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
                Control::EchoCancel(on) => capture.set_echo_cancel(on),
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
        Source::Device(name) => capture_device(name, watch.as_deref(), &mut push, events, stop),
        Source::Nothing => {}
    }
}

/// An open microphone and the resampler from its rate to ours.
struct Microphone {
    device: device::OpenDevice<rtrb::Consumer<f32>>,
    resampler: Option<Resampler>,
}

impl Microphone {
    fn open(host: &cpal::Host, wanted: Option<&str>) -> Result<Microphone, String> {
        let device = device::open_input(host, wanted).map_err(|e| e.to_string())?;
        let resampler = (device.rate != SAMPLE_RATE)
            .then(|| Resampler::new(device.rate, SAMPLE_RATE))
            .transpose()
            .map_err(|e| format!("cannot resample {} Hz from {}: {e}", device.rate, device.name))?;
        Ok(Microphone { device, resampler })
    }
}

/// Reads the microphone until stopped, following the chosen device ([`DeviceFollow`]):
/// the default while it is gone, the chosen one again when it is back.
fn capture_device(
    name: Option<String>,
    watch: Option<&DeviceWatch>,
    push: &mut dyn FnMut(&[f32; FRAME_10MS]),
    events: &tokio_mpsc::Sender<EngineEvent>,
    stop: &AtomicBool,
) {
    let host = device::host();
    let mut follow = DeviceFollow::new("microphone", name.clone(), Instant::now());
    let mut microphone: Option<Microphone> = None;
    let mut pending = Vec::with_capacity(4 * FRAME_10MS);
    let mut raw = Vec::with_capacity(4096);
    let notice = |notice: Option<String>| {
        if let Some(message) = notice {
            send_event(events, EngineEvent::Device(message));
        }
    };
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        match follow.poll(now) {
            Some(Action::Open(wanted)) => {
                microphone = None;
                match Microphone::open(&host, wanted.as_deref()) {
                    Ok(opened) => {
                        notice(follow.opened(now, &opened.device.name, opened.device.fell_back));
                        microphone = Some(opened);
                    }
                    Err(e) => notice(follow.open_failed(now, &e)),
                }
            }
            Some(Action::Look(wanted)) => {
                if let Some(listed) = is_listed(watch, true, &wanted) {
                    notice(follow.listed(now, listed));
                }
            }
            None => {}
        }
        std::thread::sleep(Duration::from_millis(5));
        let Some(mic) = &mut microphone else { continue };
        if let Some(error) = mic.device.health.broken() {
            let listed = name.as_deref().is_some_and(|wanted| is_listed(watch, true, wanted).unwrap_or(true));
            notice(follow.broke(Instant::now(), &mic.device.name, &error, listed));
            microphone = None;
            continue;
        }
        raw.clear();
        while let Ok(sample) = mic.device.ring.pop() {
            raw.push(sample);
        }
        match &mut mic.resampler {
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
}

/// What the network task hands the playback thread.
struct PlaybackInputs {
    packets: Receiver<PlaybackPacket>,
    controls: Receiver<Control>,
}

fn run_playback(
    mut speaker: Option<Speaker>,
    mut recorder: Option<Recorder>,
    inputs: &PlaybackInputs,
    events: &tokio_mpsc::Sender<EngineEvent>,
    stop: &AtomicBool,
) -> Result<PlaybackStats, EngineError> {
    let mut playback = Playback::default();
    let mut out = [0.0; FRAME_20MS];
    let mut changes = Vec::new();
    let start = Instant::now();
    let mut tick = 0u32;
    while !stop.load(Ordering::Relaxed) {
        let deadline = start + TWENTY_MS * tick;
        // Take packets as they come until the tick is due.
        loop {
            let packet = match deadline.checked_duration_since(Instant::now()) {
                Some(wait) if !wait.is_zero() => match inputs.packets.recv_timeout(wait) {
                    Ok(packet) => packet,
                    Err(RecvTimeoutError::Timeout) => break,
                    Err(RecvTimeoutError::Disconnected) => return finish(playback, speaker, recorder),
                },
                _ => match inputs.packets.try_recv() {
                    Ok(packet) => packet,
                    Err(_) => break,
                },
            };
            let PlaybackPacket { arrival, sender, sequence, timestamp, payload } = packet;
            playback.push(arrival, sender, sequence, timestamp, payload)?;
        }
        while let Ok(control) = inputs.controls.try_recv() {
            match control {
                Control::Deafen(on) => playback.deafened = on,
                Control::Volume { sender, percent } => playback.set_volume(sender, percent),
                Control::LocalMute { sender, muted } => playback.set_muted(sender, muted),
                Control::Forget(sender) => changes.extend(playback.remove(sender)),
                Control::Cue(cue) => {
                    playback.cue(cue, deadline);
                }
                _ => {}
            }
        }
        playback.tick(deadline, &mut out, &mut changes);
        for change in changes.drain(..) {
            send_event(events, EngineEvent::Speaking(change));
        }
        if let Some(recorder) = &mut recorder {
            recorder.write(&out)?;
        }
        if let Some(speaker) = &mut speaker {
            speaker.play(&out, events);
        }
        tick += 1;
    }
    finish(playback, speaker, recorder)
}

fn finish(
    playback: Playback,
    speaker: Option<Speaker>,
    recorder: Option<Recorder>,
) -> Result<PlaybackStats, EngineError> {
    if let Some(recorder) = recorder {
        recorder.finish()?;
    }
    let speaker = speaker.map(|s| s.stats()).unwrap_or_default();
    Ok(PlaybackStats { speaker, ..playback.stats() })
}

/// The playback device, followed like the microphone ([`DeviceFollow`]), with the
/// resampler to its rate and the keeper of its ring's fill ([`FillKeeper`]).
struct Speaker {
    host: cpal::Host,
    watch: Option<Arc<DeviceWatch>>,
    /// The echo canceller's far end: what this speaker plays.
    far_end: Option<EchoCanceller>,
    wanted: Option<String>,
    follow: DeviceFollow,
    open: Option<OpenSpeaker>,
    keeper: FillKeeper,
    /// What devices closed before the open one had missed.
    missing_before: u64,
    /// A frame as it goes to the device: at 48 kHz after the keeper's plan, then at the
    /// device's rate.
    planned: Vec<f32>,
    resampled: Vec<f32>,
}

struct OpenSpeaker {
    device: device::OpenDevice<rtrb::Producer<f32>>,
    resampler: Option<Resampler>,
}

impl Speaker {
    fn new(wanted: Option<String>, watch: Option<Arc<DeviceWatch>>, far_end: Option<EchoCanceller>) -> Speaker {
        Speaker {
            host: device::host(),
            watch,
            far_end,
            follow: DeviceFollow::new("speaker", wanted.clone(), Instant::now()),
            wanted,
            open: None,
            keeper: FillKeeper::default(),
            missing_before: 0,
            planned: Vec::with_capacity(2 * FRAME_20MS),
            resampled: Vec::with_capacity(4 * FRAME_20MS),
        }
    }

    fn notice(events: &tokio_mpsc::Sender<EngineEvent>, notice: Option<String>) {
        if let Some(message) = notice {
            send_event(events, EngineEvent::Device(message));
        }
    }

    /// Does what following the device asks now.
    fn follow(&mut self, events: &tokio_mpsc::Sender<EngineEvent>) {
        let now = Instant::now();
        match self.follow.poll(now) {
            Some(Action::Open(wanted)) => {
                self.close();
                let opened =
                    device::open_output(&self.host, wanted.as_deref()).map_err(|e| e.to_string()).and_then(|device| {
                        let resampler = (device.rate != SAMPLE_RATE)
                            .then(|| Resampler::new(SAMPLE_RATE, device.rate))
                            .transpose()
                            .map_err(|e| format!("cannot resample to {} Hz for {}: {e}", device.rate, device.name))?;
                        Ok(OpenSpeaker { device, resampler })
                    });
                match opened {
                    Ok(speaker) => {
                        Self::notice(events, self.follow.opened(now, &speaker.device.name, speaker.device.fell_back));
                        self.open = Some(speaker);
                    }
                    Err(e) => Self::notice(events, self.follow.open_failed(now, &e)),
                }
            }
            Some(Action::Look(wanted)) => {
                if let Some(listed) = is_listed(self.watch.as_deref(), false, &wanted) {
                    Self::notice(events, self.follow.listed(now, listed));
                }
            }
            None => {}
        }
        let Some(open) = &self.open else { return };
        if let Some(error) = open.device.health.broken() {
            let listed = self
                .wanted
                .as_deref()
                .is_some_and(|wanted| is_listed(self.watch.as_deref(), false, wanted).unwrap_or(true));
            Self::notice(events, self.follow.broke(now, &open.device.name, &error, listed));
            self.close();
        }
    }

    fn close(&mut self) {
        if let Some(open) = self.open.take() {
            self.missing_before += open.device.health.xruns.load(Ordering::Relaxed);
        }
    }

    fn stats(&self) -> FillStats {
        let open = self.open.as_ref().map_or(0, |open| open.device.health.xruns.load(Ordering::Relaxed));
        FillStats { missing: self.missing_before + open, ..self.keeper.stats() }
    }

    fn play(&mut self, frame: &[f32; FRAME_20MS], events: &tokio_mpsc::Sender<EngineEvent>) {
        self.follow(events);
        let Some(open) = &mut self.open else { return };
        let ring = &mut open.device.ring;
        let queued =
            (device::RING_SAMPLES - ring.slots()) as u64 * u64::from(SAMPLE_RATE) / u64::from(open.device.rate);
        let Plan::Play { silence, len } = self.keeper.plan(queued as usize) else { return };
        // What is played is what the microphone may hear again (a dropped frame is not).
        if let Some(far_end) = &mut self.far_end {
            for half in frame.chunks_exact(FRAME_10MS) {
                far_end.far_end(half.try_into().expect("chunks of 10 ms"));
            }
        }
        self.planned.clear();
        self.planned.resize(silence, 0.0);
        stretch(frame, len, &mut self.planned);
        let samples = match &mut open.resampler {
            Some(resampler) => {
                self.resampled.clear();
                let _ = resampler.push(&self.planned, &mut self.resampled);
                &self.resampled
            }
            None => &self.planned,
        };
        for &sample in samples {
            // The keeper keeps the ring far from full (it holds a second); the rest of a
            // frame that does not fit is dropped, and the keeper drops the next ones.
            if ring.push(sample).is_err() {
                break;
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
