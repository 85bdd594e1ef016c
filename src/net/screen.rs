//! The screen share's shell: a thread that captures and encodes, a thread that decodes
//! and records, the pacing of each frame's fragments onto the connection, and the
//! adapter that the viewers' reports and the send buffer steer.
//!
//! Voice goes first: it is sent at once, never paced. A frame is admitted only while what
//! waits in the connection's datagram buffer plus the frame stays under
//! [`SCREEN_QUEUE_TIME`] of the share's bitrate (a frame larger than that only into an
//! empty buffer) and the pacer has room ([`PACER_WAITING`] frames), and its fragments are
//! handed over as the buffer has room, never pushing queued voice out. A frame not admitted is dropped whole and the next one is a
//! keyframe, so a viewer never waits on a frame that will not come.
//!
//! A share's desktop audio has a thread of its own (capture and Opus); its packets go
//! out at once, like voice, timestamped on the video's clock. A viewer records them
//! (`--record-screen-audio`); the client plays them with voice.

use std::collections::VecDeque;
use std::io::BufWriter;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::audio::STEREO_20MS;
use crate::audio::codec::{StereoDecoder, StereoEncoder};
use crate::audio::wav::Recorder;
use crate::protocol::{Resolution, ScreenReport, SessionId, ShareInfo};
use crate::session::command::ShareRequest;
use crate::session::screen::{MAX_WATCHED, ScreenFrame, VideoStats};
use crate::session::{Event, Session};
use crate::video::adapt::{Adapter, KeepingUp, Rung, ViewerLoss, start_bitrate};
use crate::video::capture::{CaptureError, FileSource, Screen, Source};
use crate::video::codec::{
    EncodedFrame, EncoderSettings, HevcDecoder, HevcEncoder, VideoError, choose_encoder, proven_encoder,
};
use crate::video::picture::{Rgba, Scaler, from_ffmpeg, share_size, to_ffmpeg};
use crate::video::y4m::{Y4mWriter, YuvFrame};

/// How much of the share's bitrate may wait in the connection at once: beyond it frames
/// are dropped, not queued in front of voice.
pub const SCREEN_QUEUE_TIME: Duration = Duration::from_millis(100);
/// A frame's fragments go out in at most this many bursts across half its interval.
const PACE_BURSTS: usize = 8;
/// Frames waiting for the pacer while it spaces out the one before. Two: frames that come
/// together (the encoder catching up after a slow first keyframe) wait their turn; with
/// room for one, the second was dropped, the next frame had to be a keyframe, and the
/// share stepped down for nothing (a 720p share ran at 5 fps where 10 kept up). Sending
/// the rest of a frame at once instead made the relay drop fragments.
const PACER_WAITING: usize = 2;
/// Keyframes are at least this far apart, however often viewers ask.
pub const KEYFRAME_SPACING: Duration = Duration::from_millis(500);
/// A request this soon after a keyframe was made is taken as answered by it: it was
/// asked before that keyframe arrived (a new viewer's, asked by the relay and by the end
/// of the pause at once). One that was not re-asks after `fragment::KEYFRAME_RETRY`.
const ANSWERED_WITHIN: Duration = Duration::from_millis(250);
/// Encoded frames waiting for the network side; a full queue drops the frame.
const ENCODED_WAITING: usize = 2;
/// Decrypted frames waiting for the decoder.
const DECODE_WAITING: usize = 8;
/// Desktop audio packets waiting for the network side (100 ms).
const DESKTOP_WAITING: usize = 5;
/// Desktop audio packets a recording conceals in a row (1 s); a longer gap is a pause.
const MAX_CONCEALED: u32 = 50;
/// How far (in 20 ms packets) a desktop audio recording may run ahead of the time it has
/// been recording: packets come in bursts, but a sharer that sends faster than real time,
/// or numbers its packets with gaps to be concealed, does not grow the file faster than
/// real time beyond this.
const RECORDING_AHEAD: u64 = 50;

/// What `voipc join` (or the desktop app) was asked to do with screens.
#[derive(Debug, Clone, Default)]
pub struct ScreenOptions {
    /// Share this once in a channel ([`crate::session::Command::Share`] starts, changes
    /// and stops a share later).
    pub share: Option<ShareRequest>,
    /// Force this encoder instead of probing.
    pub encoder: Option<String>,
    /// Watch this user's share as soon as it is there.
    pub watch: Option<String>,
    /// Write every decoded frame here (4:2:0 Y4M, at the first frame's size).
    pub record: Option<PathBuf>,
    /// Write the desktop audio of the share watched here (48 kHz stereo WAV).
    pub record_audio: Option<PathBuf>,
    /// Show every decoded frame (the desktop app).
    pub show: Option<PictureSink>,
}

/// Takes each decoded picture of a share we watch, with its sharer, on the decoding
/// thread: it keeps what it needs and returns at once (the desktop app keeps the newest
/// and asks for a repaint).
#[derive(Clone)]
pub struct PictureSink(pub Arc<dyn Fn(SessionId, Rgba) + Send + Sync>);

impl std::fmt::Debug for PictureSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PictureSink")
    }
}

/// From the network side to the encoding thread.
enum ToSender {
    Rung(Rung),
    /// A viewer asked (it may have asked before the last keyframe reached it).
    Keyframe,
    /// A frame was dropped before it was sent: only a keyframe helps, even right after one.
    Dropped,
    /// Nobody watches: capture and encode nothing (and start with a keyframe after).
    Pause(bool),
}

/// From the encoding thread.
pub enum FromSender {
    Started {
        encoder: String,
        width: u32,
        height: u32,
        fps: u32,
        bitrate: u32,
    },
    /// The screen cast portal's token for sharing the same screen next time unasked.
    Granted(String),
    Frame {
        frame: EncodedFrame,
        timestamp: u32,
    },
    Failed(String),
}

/// What the encoding thread notes without waiting for the network side.
#[derive(Default)]
struct SenderNotes {
    /// The encoder did not keep up with the frame rate since the adapter last looked.
    behind: AtomicBool,
    /// Frames encoded that the network side had no room for.
    skipped: AtomicU64,
    /// Desktop audio packets the network side had no room for.
    audio_dropped: AtomicU64,
}

/// From the desktop audio thread.
pub enum FromDesktop {
    Packet { payload: Vec<u8>, timestamp: u32 },
    Failed(String),
}

/// A share's desktop audio as it is written to a file: decoded in order, a lost packet
/// concealed, a late one dropped, never more than [`RECORDING_AHEAD`] ahead of real time.
struct AudioRecording {
    recorder: Recorder,
    decoder: StereoDecoder,
    next: Option<u32>,
    started: Instant,
    /// 20 ms frames written.
    written: u64,
}

/// From the decoding thread.
pub enum FromViewer {
    Decoded,
    Unusable(SessionId),
    Failed(String),
}

pub struct ScreenShell {
    options: ScreenOptions,
    sender: Option<(std_mpsc::Sender<ToSender>, mpsc::Receiver<FromSender>)>,
    notes: Arc<SenderNotes>,
    adapter: Option<Adapter>,
    pacer: Option<mpsc::Sender<(Vec<Bytes>, Duration)>>,
    fps: u32,
    bitrate: u32,
    /// The most room the connection's datagram buffer ever had: what it has when empty
    /// (quinn counts some bookkeeping of its own against the configured size).
    empty_space: usize,
    viewer: Option<(std_mpsc::SyncSender<ScreenFrame>, mpsc::Receiver<FromViewer>)>,
    stats: VideoStats,
    watch_asked: bool,
    /// A frame was dropped since the last keyframe sent.
    broken: bool,
    /// Our desktop audio's packets, while we share it.
    desktop: Option<mpsc::Receiver<FromDesktop>>,
    /// Nobody watches: the desktop audio thread lets the sound go.
    nobody_watches: Arc<AtomicBool>,
    audio_recording: Option<AudioRecording>,
    /// The screen cast portal's newest grant, and whether it is not saved yet.
    screen_grant: Option<String>,
    grant_unsaved: bool,
}

impl ScreenShell {
    /// `screen_grant` is the portal's last grant, from the vault.
    pub fn new(options: ScreenOptions, screen_grant: Option<String>) -> Self {
        ScreenShell {
            options,
            sender: None,
            notes: Arc::default(),
            adapter: None,
            pacer: None,
            fps: 0,
            bitrate: 0,
            empty_space: 0,
            viewer: None,
            stats: VideoStats::default(),
            watch_asked: false,
            broken: false,
            desktop: None,
            nobody_watches: Arc::new(AtomicBool::new(true)),
            audio_recording: None,
            screen_grant,
            grant_unsaved: false,
        }
    }

    /// The portal's newest grant, to be saved.
    pub fn screen_grant(&self) -> Option<&str> {
        self.screen_grant.as_deref()
    }

    /// Whether the portal gave a grant that is not saved yet (and it is taken as saved).
    pub fn take_grant_unsaved(&mut self) -> bool {
        std::mem::take(&mut self.grant_unsaved)
    }

    /// Starts sharing once in a channel (if asked to).
    pub fn start_when_ready(&mut self, session: &mut Session, connection: &quinn::Connection) {
        if self.sender.is_none()
            && session.channel().is_some()
            && let Some(request) = self.options.share.clone()
        {
            let resolution = request.resolution;
            let fps = request.fps.clamp(1, ShareRequest::MAX_FPS);
            let (to_tx, to_rx) = std_mpsc::channel();
            let (from_tx, from_rx) = mpsc::channel(ENCODED_WAITING);
            let notes = self.notes.clone();
            // The video's and the desktop audio's timestamps count from here.
            let clock = Instant::now();
            let start = SenderStart {
                source: Source::parse(request.source.as_deref()),
                resolution,
                max_fps: fps,
                forced: self.options.encoder.clone(),
                clock,
                restore_token: self.screen_grant.clone(),
            };
            std::thread::Builder::new()
                .name("voipc-share".into())
                .spawn(move || run_sender(start, to_rx, from_tx, &notes))
                .expect("a thread can be spawned");
            if request.audio {
                // Nobody watches yet (a previous share's viewers are not this one's).
                self.nobody_watches = Arc::new(AtomicBool::new(true));
                let (audio_tx, audio_rx) = mpsc::channel(DESKTOP_WAITING);
                let (nobody_watches, notes) = (self.nobody_watches.clone(), self.notes.clone());
                std::thread::Builder::new()
                    .name("voipc-desktop-audio".into())
                    .spawn(move || run_desktop_audio(clock, &nobody_watches, &notes.audio_dropped, &audio_tx))
                    .expect("a thread can be spawned");
                self.desktop = Some(audio_rx);
            }
            self.sender = Some((to_tx, from_rx));
            self.adapter = Some(Adapter::new(Instant::now(), resolution, fps));
            let (pace_tx, pace_rx) = mpsc::channel(PACER_WAITING);
            tokio::spawn(pace(connection.clone(), pace_rx));
            self.pacer = Some(pace_tx);
            // Nobody watches yet.
            self.control(ToSender::Pause(true));
        }
    }

    /// Starts sharing `request` (in place of what is shared now), or stops.
    pub fn share(
        &mut self,
        request: Option<ShareRequest>,
        session: &mut Session,
        emit: &mut (dyn FnMut(&Event) + Send),
    ) {
        if self.sender.is_some() {
            self.stop_sharing(session);
            emit(&Event::ShareStopped { reason: crate::session::SHARE_STOPPED_BY_USER.into() });
        }
        self.options.share = request;
    }

    /// Lets the encoding thread go (it ends when it finds its control channel closed)
    /// and tells the others.
    fn stop_sharing(&mut self, session: &mut Session) {
        session.set_share(None);
        (self.sender, self.adapter, self.pacer, self.broken, self.desktop) = (None, None, None, false, None);
    }

    fn control(&self, message: ToSender) {
        if let Some((tx, _)) = &self.sender {
            let _ = tx.send(message);
        }
    }

    /// Events the shell acts on: a sharer to watch appeared, our viewers changed, we left
    /// the channel we share in.
    pub fn on_event(&mut self, session: &mut Session, event: &Event, emit: &mut (dyn FnMut(&Event) + Send)) {
        match event {
            // A share ends with its channel (the server ends it too) and does not follow
            // us into the next one: those people were not meant to see it.
            Event::Left { .. } if self.sender.is_some() || self.options.share.is_some() => {
                self.options.share = None;
                if self.sender.is_some() {
                    self.stop_sharing(session);
                    emit(&Event::ShareStopped { reason: "you left the channel".into() });
                }
            }
            Event::Sharing { user, share: Some(_), .. }
                if !self.watch_asked && self.options.watch.as_deref().is_some_and(|w| w == user.as_str()) =>
            {
                self.watch_asked = true;
                session.command(Instant::now(), crate::session::Command::Watch { user: user.clone(), watch: true });
            }
            Event::Watching { watching: true, .. } if self.viewer.is_none() => {
                let (tx, rx) = std_mpsc::sync_channel(DECODE_WAITING);
                let (events_tx, events_rx) = mpsc::channel(64);
                let (record, show) = (self.options.record.clone(), self.options.show.clone());
                std::thread::Builder::new()
                    .name("voipc-watch".into())
                    .spawn(move || run_viewer(record, show, rx, events_tx))
                    .expect("a thread can be spawned");
                self.viewer = Some((tx, events_rx));
            }
            Event::Viewers { count } => {
                if let Some(adapter) = &mut self.adapter {
                    adapter.viewers(Instant::now(), *count);
                }
                self.nobody_watches.store(*count == 0, Ordering::Relaxed);
                self.control(ToSender::Pause(*count == 0));
            }
            _ => {}
        }
    }

    /// What the session has for the threads: decrypted frames to the decoder (one that
    /// does not fit waits for a keyframe), a viewer's keyframe request to the encoder,
    /// viewers' reports to the adapter.
    pub fn poll_session(&mut self, session: &mut Session) {
        if session.take_keyframe_request() {
            self.stats.keyframes_requested += 1;
            self.control(ToSender::Keyframe);
        }
        while let Some(frame) = session.poll_screen_frame() {
            self.stats.frames_received += 1;
            let sender = frame.sender;
            let Some((tx, _)) = &self.viewer else { continue };
            if tx.try_send(frame).is_err() {
                self.stats.frames_dropped += 1;
                session.screen_frame_unusable(Instant::now(), sender);
            }
        }
        while let Some((viewer, report)) = session.poll_viewer_report() {
            self.viewer_report(viewer, report);
        }
    }

    fn viewer_report(&mut self, _viewer: SessionId, report: ScreenReport) {
        let Some(adapter) = &mut self.adapter else { return };
        adapter.viewer_report(Instant::now(), ViewerLoss { loss: report.loss(), frames_lost: report.frames_lost });
    }

    /// Waits for what the threads have to say, or for the adapter's next decision
    /// (forever when there is nothing).
    pub async fn next(&mut self) -> ShellInput {
        let adapter_due = self.adapter.as_ref().map(|a| tokio::time::Instant::from_std(a.poll_timeout()));
        let (sender, viewer, desktop) = (&mut self.sender, &mut self.viewer, &mut self.desktop);
        tokio::select! {
            Some(from) = async { sender.as_mut()?.1.recv().await } => ShellInput::Sender(from),
            Some(from) = async { desktop.as_mut()?.recv().await } => ShellInput::Desktop(from),
            Some(from) = async { viewer.as_mut()?.1.recv().await } => ShellInput::Viewer(from),
            () = super::client::sleep_until(adapter_due), if adapter_due.is_some() => ShellInput::Decide,
            else => std::future::pending().await,
        }
    }

    /// Acts on what [`ScreenShell::next`] returned.
    pub fn handle(
        &mut self,
        input: ShellInput,
        session: &mut Session,
        connection: &quinn::Connection,
        emit: &mut (dyn FnMut(&Event) + Send),
    ) {
        match input {
            ShellInput::Sender(FromSender::Started { encoder, width, height, fps, bitrate }) => {
                (self.fps, self.bitrate) = (fps, bitrate);
                self.stats.encoder = encoder.clone();
                (self.stats.width, self.stats.height, self.stats.fps) = (width, height, fps);
                let info = ShareInfo { width: width as u16, height: height as u16, fps: fps as u8 };
                session.set_share(Some(info));
                emit(&Event::ShareStarted { encoder, width, height, fps });
            }
            ShellInput::Sender(FromSender::Granted(token)) => {
                self.grant_unsaved |= self.screen_grant.as_ref() != Some(&token);
                self.screen_grant = Some(token);
            }
            ShellInput::Sender(FromSender::Frame { frame, timestamp }) => {
                self.send_frame(session, connection, frame, timestamp)
            }
            ShellInput::Sender(FromSender::Failed(reason)) => {
                self.stop_sharing(session);
                self.options.share = None;
                emit(&Event::ShareStopped { reason });
            }
            ShellInput::Desktop(FromDesktop::Packet { payload, timestamp }) => {
                if let Some(datagram) = session.desktop_audio_datagram(Instant::now(), timestamp, &payload) {
                    self.stats.audio_packets_sent += 1;
                    // Small and steady, like voice: sent at once.
                    let _ = connection.send_datagram(datagram.into());
                }
            }
            ShellInput::Desktop(FromDesktop::Failed(reason)) => {
                self.desktop = None;
                emit(&Event::local_error("desktop_audio", format!("desktop audio stopped: {reason}")));
            }
            ShellInput::Viewer(FromViewer::Decoded) => self.stats.frames_decoded += 1,
            ShellInput::Viewer(FromViewer::Unusable(sender)) => {
                self.stats.decode_errors += 1;
                session.screen_frame_unusable(Instant::now(), sender);
            }
            ShellInput::Viewer(FromViewer::Failed(reason)) => {
                self.viewer = None;
                emit(&Event::local_error("watch", reason));
            }
            ShellInput::Decide => {
                let behind = self.notes.behind.swap(false, Ordering::Relaxed);
                if let (true, Some(a)) = (behind, &mut self.adapter) {
                    a.encoder_behind();
                }
                if let Some(rung) = self.adapter.as_mut().and_then(|a| a.handle_timeout(Instant::now())) {
                    self.control(ToSender::Rung(rung));
                }
            }
        }
        self.poll_session(session);
    }

    /// Seals one encoded frame and hands its fragments to the pacer, if the connection
    /// has room for it beside voice.
    fn send_frame(
        &mut self,
        session: &mut Session,
        connection: &quinn::Connection,
        frame: EncodedFrame,
        timestamp: u32,
    ) {
        self.stats.frames_encoded += 1;
        self.stats.keyframes += u64::from(frame.keyframe);
        // After a frame dropped here, the frames that refer to it are no use to anyone
        // until the next keyframe (asked for when it was dropped).
        if self.broken && !frame.keyframe {
            self.stats.frames_dropped += 1;
            return;
        }
        let now = Instant::now();
        let loss = self.adapter.as_ref().map_or(0.0, |a| a.loss_to_cover(now));
        let Some(datagrams) = session.screen_datagrams(now, timestamp, frame.keyframe, &frame.data, loss) else {
            return;
        };
        let bytes: usize = datagrams.iter().map(Vec::len).sum();
        let space = connection.datagram_send_buffer_space();
        self.empty_space = self.empty_space.max(space);
        let waiting = self.empty_space - space;
        let limit = (SCREEN_QUEUE_TIME.as_secs_f64() * f64::from(self.bitrate) / 8.0) as usize;
        let datagrams: Vec<Bytes> = datagrams.into_iter().map(Bytes::from).collect();
        let interval = Duration::from_secs(1) / self.fps.max(1);
        let admitted = (waiting == 0 || waiting + bytes <= limit)
            && self.pacer.as_ref().is_some_and(|p| p.try_send((datagrams, interval)).is_ok());
        self.broken = !admitted;
        if admitted {
            self.stats.frames_sent += 1;
        } else {
            self.stats.frames_dropped += 1;
            self.control(ToSender::Dropped);
            if let Some(a) = &mut self.adapter {
                a.send_buffer_full();
            }
        }
    }

    /// A packet of desktop audio from a share we watch, arrived at `now`: counted, and
    /// written to the recording if there is one.
    pub fn desktop_audio(&mut self, now: Instant, sequence: u32, payload: &[u8]) -> Result<(), String> {
        self.stats.audio_packets_received += 1;
        let Some(path) = &self.options.record_audio else { return Ok(()) };
        if self.audio_recording.is_none() {
            let recorder = Recorder::stereo(path).map_err(|e| e.to_string())?;
            let decoder = StereoDecoder::new().map_err(|e| e.to_string())?;
            self.audio_recording = Some(AudioRecording { recorder, decoder, next: None, started: now, written: 0 });
        }
        let recording = self.audio_recording.as_mut().expect("made above");
        let elapsed = (now.saturating_duration_since(recording.started).as_millis() / 20) as u64;
        let room = (elapsed + RECORDING_AHEAD).saturating_sub(recording.written);
        let missing = recording.next.map_or(0, |next| sequence.wrapping_sub(next));
        // Late (reordered), or ahead of real time: dropped.
        if (missing as i32) < 0 || room == 0 {
            return Ok(());
        }
        // A gap longer than concealment is a pause (nobody listened, or the sharer's
        // applications were silent).
        let concealed = if missing > MAX_CONCEALED { 0 } else { u64::from(missing).min(room - 1) };
        let mut pcm = [0.0; STEREO_20MS];
        for _ in 0..concealed {
            recording.decoder.decode(None, &mut pcm).map_err(|e| e.to_string())?;
            recording.recorder.write(&pcm).map_err(|e| e.to_string())?;
        }
        recording.decoder.decode(Some(payload), &mut pcm).map_err(|e| e.to_string())?;
        recording.recorder.write(&pcm).map_err(|e| e.to_string())?;
        recording.written += concealed + 1;
        recording.next = Some(sequence.wrapping_add(1));
        Ok(())
    }

    /// Completes the desktop audio recording, if there is one.
    pub fn finish_recording(&mut self) -> Result<(), String> {
        match self.audio_recording.take() {
            Some(recording) => recording.recorder.finish().map_err(|e| e.to_string()),
            None => Ok(()),
        }
    }

    /// What happened, for the `video_stats` event at the end.
    pub fn stats(&self, session: &Session) -> Option<VideoStats> {
        let mut stats = self.stats.clone();
        stats.viewers = session.viewers();
        stats.frames_dropped += self.notes.skipped.load(Ordering::Relaxed);
        stats.audio_packets_dropped = self.notes.audio_dropped.load(Ordering::Relaxed);
        (stats.unwatched_datagrams, stats.malformed_datagrams) = session.dropped_screen_datagrams();
        let idle = self.sender.is_none() && self.viewer.is_none() && stats == VideoStats::default();
        (!idle).then_some(stats)
    }
}

pub enum ShellInput {
    Sender(FromSender),
    Desktop(FromDesktop),
    Viewer(FromViewer),
    Decide,
}

/// Sends each frame's datagrams in a few bursts across half its interval, so that a
/// keyframe does not leave as one block of hundreds of packets.
async fn pace(connection: quinn::Connection, mut frames: mpsc::Receiver<(Vec<Bytes>, Duration)>) {
    while let Some((datagrams, interval)) = frames.recv().await {
        let bursts = datagrams.len().clamp(1, PACE_BURSTS);
        let per_burst = datagrams.len().div_ceil(bursts);
        let gap = interval / 2 / bursts as u32;
        for (i, burst) in datagrams.chunks(per_burst).enumerate() {
            if i > 0 {
                tokio::time::sleep(gap).await;
            }
            for datagram in burst {
                // Waits for room rather than pushing out what is queued (voice).
                match connection.send_datagram_wait(datagram.clone()).await {
                    Ok(()) => {}
                    Err(quinn::SendDatagramError::ConnectionLost(_)) => return,
                    // Too large for the path (never at the fixed MTU), or datagrams off.
                    Err(e) => tracing::warn!("a screen fragment was not sent: {e}"),
                }
            }
        }
    }
}

/// What the encoding thread captures from.
enum Capture {
    Screen(Screen),
    File(FileSource),
}

impl Capture {
    fn open(source: Source, restore_token: Option<&str>) -> Result<Capture, CaptureError> {
        match source {
            Source::File(path) => FileSource::open(path).map(Capture::File),
            other => Screen::open(&other, restore_token).map(Capture::Screen),
        }
    }

    fn size(&self) -> (u32, u32) {
        match self {
            Capture::Screen(c) => c.size(),
            Capture::File(f) => f.size(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum ShareError {
    #[error(transparent)]
    Capture(#[from] CaptureError),
    #[error(transparent)]
    Video(#[from] VideoError),
}

/// What the encoding thread starts with.
struct SenderStart {
    source: Source,
    resolution: Resolution,
    max_fps: u32,
    /// Force this encoder instead of probing.
    forced: Option<String>,
    /// Where the share's timestamps count from.
    clock: Instant,
    /// The screen cast portal's last grant.
    restore_token: Option<String>,
}

/// The encoding thread: captures at the frame rate, scales, encodes, and passes each
/// frame on (or drops it when the network side has not taken the last ones).
fn run_sender(
    start: SenderStart,
    control: std_mpsc::Receiver<ToSender>,
    out: mpsc::Sender<FromSender>,
    notes: &SenderNotes,
) {
    if let Err(e) = share(start, &control, &out, notes) {
        let _ = out.blocking_send(FromSender::Failed(e.to_string()));
    }
}

fn share(
    start: SenderStart,
    control: &std_mpsc::Receiver<ToSender>,
    out: &mpsc::Sender<FromSender>,
    notes: &SenderNotes,
) -> Result<(), ShareError> {
    let SenderStart { source, resolution, max_fps, forced, clock, restore_token } = start;
    let mut capture = Capture::open(source, restore_token.as_deref())?;
    if let Capture::Screen(screen) = &capture
        && let Some(token) = screen.restore_token()
        && out.blocking_send(FromSender::Granted(token.to_owned())).is_err()
    {
        return Ok(());
    }
    let (src_w, src_h) = capture.size();
    let mut rung = Rung { resolution, fps: max_fps, bitrate: start_bitrate(resolution, max_fps) };
    let settings = |rung: &Rung| {
        let (width, height) = share_size(src_w, src_h, rung.resolution.height());
        EncoderSettings { width, height, fps: rung.fps, bitrate: rung.bitrate }
    };
    let mut encoder = choose_encoder(forced.as_deref(), settings(&rung))?;
    let started = |encoder: &HevcEncoder| {
        let s = encoder.settings();
        let (width, height, fps, bitrate) = (s.width, s.height, s.fps, s.bitrate);
        FromSender::Started { encoder: encoder.name().to_owned(), width, height, fps, bitrate }
    };
    if out.blocking_send(started(&encoder)).is_err() {
        return Ok(());
    }
    let mut scaler = Scaler::new(encoder.settings().width, encoder.settings().height);
    let (mut keyframe_due, mut last_keyframe, mut paused) = (true, None::<Instant>, false);
    // A frame was skipped since the last keyframe: the frames after it refer to it.
    let mut broken = false;
    let mut next = Instant::now();
    let mut keeping_up = KeepingUp::new(next);
    let mut encoded = Vec::new();
    loop {
        loop {
            match control.try_recv() {
                Ok(ToSender::Dropped) => keyframe_due = true,
                Ok(ToSender::Keyframe) => {
                    keyframe_due |= last_keyframe.is_none_or(|at| at.elapsed() > ANSWERED_WITHIN);
                }
                Ok(ToSender::Pause(p)) => {
                    keyframe_due |= paused && !p;
                    paused = p;
                    if let Capture::Screen(screen) = &capture {
                        screen.set_active(!p);
                    }
                }
                Ok(ToSender::Rung(new)) => {
                    let changed = settings(&new) != settings(&rung);
                    rung = new;
                    keeping_up = KeepingUp::new(Instant::now());
                    if changed {
                        // libx265 cannot change its bitrate while running, and no encoder
                        // its size: reopen, and start with a keyframe.
                        encoder = proven_encoder(encoder.name(), settings(&rung))?;
                        scaler = Scaler::new(encoder.settings().width, encoder.settings().height);
                        keyframe_due = true;
                        last_keyframe = None;
                        if out.blocking_send(started(&encoder)).is_err() {
                            return Ok(());
                        }
                    }
                }
                Err(std_mpsc::TryRecvError::Empty) => break,
                Err(std_mpsc::TryRecvError::Disconnected) => return Ok(()),
            }
        }
        let interval = Duration::from_secs(1) / rung.fps.max(1);
        if paused {
            std::thread::sleep(interval);
            next = Instant::now();
            keeping_up = KeepingUp::new(next);
            continue;
        }
        let captured = Instant::now();
        let picture = match &mut capture {
            Capture::Screen(screen) => scaler.scale_bgra(&screen.capture()?)?,
            Capture::File(f) => scaler.scale(&to_ffmpeg(&f.next_frame()?))?,
        };
        let keyframe = keyframe_due && last_keyframe.is_none_or(|at| captured >= at + KEYFRAME_SPACING);
        encoded.clear();
        encoder.encode(picture, keyframe, &mut encoded)?;
        if keyframe {
            keyframe_due = false;
            last_keyframe = Some(captured);
            broken = false;
        }
        let timestamp = media_timestamp(clock, captured);
        for frame in encoded.drain(..) {
            // After a frame skipped, the frames that refer to it are no use to anyone
            // until the next keyframe.
            if broken && !frame.keyframe {
                notes.skipped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            match out.try_send(FromSender::Frame { frame, timestamp }) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    notes.skipped.fetch_add(1, Ordering::Relaxed);
                    (keyframe_due, broken) = (true, true);
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return Ok(()),
            }
        }
        next += interval;
        let now = Instant::now();
        if keeping_up.frame(now, rung.fps, keyframe) {
            notes.behind.store(true, Ordering::Relaxed);
        }
        if now > next {
            next = now;
        } else {
            std::thread::sleep(next - now);
        }
    }
}

/// When something was captured, on the share's 90 kHz clock (as video timestamps are).
fn media_timestamp(clock: Instant, captured: Instant) -> u32 {
    (captured.saturating_duration_since(clock).as_micros() * 9 / 100) as u32
}

/// The desktop audio thread: records what the other applications play, encodes it and
/// passes each 20 ms on (dropped when the network side has not taken the last ones),
/// until the share ends.
fn run_desktop_audio(
    clock: Instant,
    nobody_watches: &AtomicBool,
    dropped: &AtomicU64,
    out: &mpsc::Sender<FromDesktop>,
) {
    if let Err(e) = desktop_audio(clock, nobody_watches, dropped, out) {
        let _ = out.blocking_send(FromDesktop::Failed(e));
    }
}

#[cfg(any(unix, windows))]
fn desktop_audio(
    clock: Instant,
    nobody_watches: &AtomicBool,
    dropped: &AtomicU64,
    out: &mpsc::Sender<FromDesktop>,
) -> Result<(), String> {
    use crate::audio::desktop::{Wanted, capture};
    let mut encoder = StereoEncoder::new().map_err(|e| e.to_string())?;
    let failed = std::cell::RefCell::new(None);
    let wanted = || match () {
        () if out.is_closed() || failed.borrow().is_some() => Wanted::Stop,
        () if nobody_watches.load(Ordering::Relaxed) => Wanted::Pause,
        () => Wanted::Record,
    };
    capture(&wanted, &mut |samples, captured| {
        let payload = match encoder.encode(samples) {
            Ok(packet) => packet.to_vec(),
            Err(e) => return *failed.borrow_mut() = Some(e.to_string()),
        };
        let timestamp = media_timestamp(clock, captured);
        // Full: the network side is behind, and 20 ms of sound is let go.
        if out.try_send(FromDesktop::Packet { payload, timestamp }).is_err() {
            dropped.fetch_add(1, Ordering::Relaxed);
        }
    })
    .map_err(|e| e.to_string())?;
    failed.into_inner().map_or(Ok(()), Err)
}

#[cfg(not(any(unix, windows)))]
fn desktop_audio(_: Instant, _: &AtomicBool, _: &AtomicU64, _: &mpsc::Sender<FromDesktop>) -> Result<(), String> {
    Err("desktop audio is captured on Linux and Windows only".into())
}

/// The decoding thread: decodes each whole frame, records it and shows it.
fn run_viewer(
    record: Option<PathBuf>,
    show: Option<PictureSink>,
    frames: std_mpsc::Receiver<ScreenFrame>,
    events: mpsc::Sender<FromViewer>,
) {
    if let Err(e) = watch(record, show, &frames, &events) {
        let _ = events.blocking_send(FromViewer::Failed(e));
    }
}

/// A decoder for each stream watched (their frames must not mix), the most recently
/// used last; no more than can be watched at once.
struct Decoders(VecDeque<(SessionId, HevcDecoder)>);

impl Decoders {
    fn of(&mut self, sender: SessionId) -> Result<&mut HevcDecoder, String> {
        if let Some(at) = self.0.iter().position(|(s, _)| *s == sender) {
            let used = self.0.remove(at).expect("found");
            self.0.push_back(used);
        } else {
            if self.0.len() == MAX_WATCHED {
                self.0.pop_front();
            }
            self.0.push_back((sender, HevcDecoder::new().map_err(|e| e.to_string())?));
        }
        Ok(&mut self.0.back_mut().expect("pushed").1)
    }
}

fn watch(
    record: Option<PathBuf>,
    show: Option<PictureSink>,
    frames: &std_mpsc::Receiver<ScreenFrame>,
    events: &mpsc::Sender<FromViewer>,
) -> Result<(), String> {
    let mut decoders = Decoders(VecDeque::new());
    let mut writer: Option<(Y4mWriter<BufWriter<std::fs::File>>, Scaler)> = None;
    let mut to_rgba = Scaler::rgba(2, 2);
    for frame in frames {
        let picture = match decoders.of(frame.sender)?.decode(&frame.payload) {
            Ok(Some(picture)) => picture,
            Ok(None) => continue,
            Err(_) => {
                let _ = events.blocking_send(FromViewer::Unusable(frame.sender));
                continue;
            }
        };
        if let Some(path) = &record {
            if writer.is_none() {
                let file = std::fs::File::create(path).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
                let y4m = Y4mWriter::new(BufWriter::new(file), picture.width(), picture.height(), 30)
                    .map_err(|e| e.to_string())?;
                writer = Some((y4m, Scaler::new(picture.width(), picture.height())));
            }
            let (y4m, scaler) = writer.as_mut().expect("made above");
            // The file keeps the first frame's size when the share's changes.
            let yuv: YuvFrame = if scaler.size() == (picture.width(), picture.height())
                && picture.format() == ffmpeg_next::format::Pixel::YUV420P
            {
                from_ffmpeg(picture)
            } else {
                from_ffmpeg(scaler.scale(picture).map_err(|e| e.to_string())?)
            };
            y4m.write(&yuv).and_then(|()| y4m.flush()).map_err(|e| e.to_string())?;
        }
        if let Some(PictureSink(show)) = &show {
            if to_rgba.size() != (picture.width(), picture.height()) {
                to_rgba = Scaler::rgba(picture.width(), picture.height());
            }
            show(frame.sender, to_rgba.to_rgba(picture).map_err(|e| e.to_string())?);
        }
        if events.blocking_send(FromViewer::Decoded).is_err() {
            return Ok(());
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::disallowed_methods, reason = "the virtual clock starts at an arbitrary real instant")]
mod tests {
    use super::*;

    /// A sharer that numbers its packets with gaps (each to be concealed as a second of
    /// sound) and sends them far faster than real time: the recording stays within a
    /// second of the time it was recording.
    #[test]
    fn a_desktop_audio_recording_never_outgrows_real_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("heard.wav");
        let mut shell =
            ScreenShell::new(ScreenOptions { record_audio: Some(path.clone()), ..ScreenOptions::default() }, None);
        let mut encoder = StereoEncoder::new().unwrap();
        let packet = encoder.encode(&[0.1; STEREO_20MS]).unwrap().to_vec();
        let start = Instant::now();
        // In order at the pace of real time: all of it.
        for n in 0..100u32 {
            shell.desktop_audio(start + Duration::from_millis(20 * u64::from(n)), n, &packet).unwrap();
        }
        // Then in 2 s of real time, 10 000 packets 50 apart.
        let burst = start + Duration::from_secs(2);
        for n in 0..10_000u32 {
            let at = burst + Duration::from_micros(200 * u64::from(n));
            shell.desktop_audio(at, 100 + 50 * n, &packet).unwrap();
        }
        // Late ones are dropped too.
        shell.desktop_audio(burst + Duration::from_secs(2), 5, &packet).unwrap();
        shell.finish_recording().unwrap();
        let frames = hound::WavReader::open(&path).unwrap().duration() as u64;
        let seconds = frames as f64 / 48_000.0;
        // 4 s of recording, and at most one second ahead of it.
        assert!((2.0..=5.0).contains(&seconds), "{seconds} s recorded");
        assert_eq!(shell.stats.audio_packets_received, 10_101);
    }
}
