//! Wayland capture: the XDG desktop portal's ScreenCast interface lets the user pick a
//! monitor or a window (the compositor draws the cursor in), and hands over a PipeWire
//! remote whose stream carries the pictures. A thread of its own runs the PipeWire loop
//! and keeps only the newest picture; nothing queues.
//!
//! The portal gives a restore token with each grant: passed back at the next share, the
//! same screen is shared without asking again (the caller keeps it in the vault: it is
//! a standing permission to record the screen).
//!
//! Who could abuse it: the compositor is trusted (it shows the screen); what PipeWire
//! hands over is still checked (sizes, strides, offsets against the mapped buffer) so
//! that a wrong buffer drops a picture instead of reading out of bounds.

use std::os::fd::OwnedFd;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use ashpd::desktop::screencast::{CursorMode, Screencast, SelectSourcesOptions, SourceType};
use ashpd::desktop::{PersistMode, Session};
use ashpd::enumflags2::BitFlags;
use pipewire as pw;
use pw::spa;
use pw::spa::param::video::VideoFormat;

use super::capture::{CaptureError, Source};
use super::picture::Bgra;

/// How long the first picture may take after the user said yes.
const FIRST_PICTURE: Duration = Duration::from_secs(5);
/// The largest picture taken from PipeWire (8K), whatever the stream says.
const MAX_SIDE: u32 = 7680;

/// The channel order of 32-bit pixels the stream may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// B, G, R, then alpha or padding: what the encoder side takes as it is.
    Bgr,
    /// R, G, B, then alpha or padding: red and blue are swapped on the way.
    Rgb,
}

/// Why a buffer from PipeWire was not taken.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum BufferError {
    #[error("a {width}x{height} picture is outside the bounds taken")]
    Size { width: u32, height: u32 },
    #[error("a stride of {stride} bytes for rows of {width} pixels")]
    Stride { stride: i32, width: u32 },
    #[error("the picture runs past its buffer ({needed} bytes of {len})")]
    Short { needed: usize, len: usize },
}

/// Copies a picture of `width` × `height` pixels that starts `offset` bytes into `src`,
/// rows `stride` bytes apart, into `into` (packed BGRA rows), reusing its memory. A
/// stride of 0 means packed rows (GStreamer's `pipewiresink` leaves it so).
pub fn copy_picture(
    src: &[u8],
    offset: usize,
    stride: i32,
    (width, height): (u32, u32),
    order: Order,
    into: &mut Bgra,
) -> Result<(), BufferError> {
    if width == 0 || height == 0 || width > MAX_SIDE || height > MAX_SIDE {
        return Err(BufferError::Size { width, height });
    }
    let row = width as usize * 4;
    let stride = match stride {
        0 => row,
        _ => usize::try_from(stride).ok().filter(|s| *s >= row).ok_or(BufferError::Stride { stride, width })?,
    };
    let needed = stride.saturating_mul(height as usize - 1).saturating_add(offset).saturating_add(row);
    if needed > src.len() {
        return Err(BufferError::Short { needed, len: src.len() });
    }
    (into.width, into.height, into.stride) = (width, height, row);
    into.data.resize(row * height as usize, 0);
    for (y, out) in into.data.chunks_exact_mut(row).enumerate() {
        let from = offset + y * stride;
        out.copy_from_slice(&src[from..from + row]);
        if order == Order::Rgb {
            for px in out.chunks_exact_mut(4) {
                px.swap(0, 2);
            }
        }
    }
    Ok(())
}

/// The newest picture, between the PipeWire thread and the share.
#[derive(Default)]
struct Newest {
    slot: Mutex<Slot>,
    arrived: Condvar,
}

#[derive(Default)]
struct Slot {
    picture: Option<Bgra>,
    /// Why the stream ended, once it has.
    ended: Option<String>,
    /// Buffers that were not taken (see [`BufferError`]).
    refused: u64,
}

impl Newest {
    fn end(&self, why: String) {
        self.slot.lock().expect("not poisoned").ended.get_or_insert(why);
        self.arrived.notify_all();
    }
}

/// From the share to the PipeWire thread.
enum ToStream {
    /// Take pictures (or stop taking them while nobody watches).
    Active(bool),
    Stop,
}

/// A screen or window shared through the portal.
pub struct PortalCapture {
    newest: Arc<Newest>,
    size: (u32, u32),
    to_stream: pw::channel::Sender<ToStream>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Open while we capture: the portal ends the cast when it closes.
    session: Session<Screencast>,
    restore_token: Option<String>,
}

impl PortalCapture {
    /// Asks the portal for `source` (a monitor, or a window: the user picks which in the
    /// portal's dialog, or not at all when `restore_token` still holds), then connects to
    /// the stream it opened.
    pub fn open(source: &Source, restore_token: Option<&str>) -> Result<Self, CaptureError> {
        let kind = match source {
            Source::Monitor(_) => SourceType::Monitor,
            Source::Window(_) => SourceType::Window,
            Source::File(path) => {
                return Err(CaptureError::Portal(format!("{} is a file, not a screen", path.display())));
            }
        };
        let (proxy, session, node, size, restore_token) = futures::executor::block_on(start_cast(kind, restore_token))
            .map_err(|e| CaptureError::Portal(e.to_string()))?;
        let fd = futures::executor::block_on(proxy.open_pipe_wire_remote(&session, Default::default()))
            .map_err(|e| CaptureError::Portal(e.to_string()))?;
        let newest = Arc::new(Newest::default());
        let (to_stream, from_share) = pw::channel::channel();
        let (started_tx, started) = std::sync::mpsc::channel();
        let for_thread = newest.clone();
        let thread = std::thread::Builder::new()
            .name("voipc-pipewire".into())
            .spawn(move || {
                if let Err(e) = run_stream(fd, node, &for_thread, from_share, &started_tx) {
                    let _ = started_tx.send(Err(e.to_string()));
                    for_thread.end(format!("PipeWire: {e}"));
                }
            })
            .expect("a thread can be spawned");
        let mut capture = PortalCapture { newest, size, to_stream, thread: Some(thread), session, restore_token };
        match started.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(CaptureError::Portal(format!("PipeWire: {e}"))),
            Err(_) => return Err(CaptureError::Portal("the PipeWire thread ended".into())),
        }
        if capture.size.0 == 0 || capture.size.1 == 0 {
            let first = capture.capture()?;
            capture.size = (first.width, first.height);
        }
        Ok(capture)
    }

    /// The size the portal gave for the stream (the first picture's, if it gave none).
    pub fn size(&self) -> (u32, u32) {
        self.size
    }

    /// The token that shares the same screen next time without asking, if the portal
    /// gave one.
    pub fn restore_token(&self) -> Option<&str> {
        self.restore_token.as_deref()
    }

    /// Pictures are taken only while something wants them.
    pub fn set_active(&self, active: bool) {
        let _ = self.to_stream.send(ToStream::Active(active));
    }

    /// The newest picture (the same again when the screen has not changed); waits for
    /// the first one.
    pub fn capture(&mut self) -> Result<Bgra, CaptureError> {
        let slot = self.newest.slot.lock().expect("not poisoned");
        let (slot, _) = self
            .newest
            .arrived
            .wait_timeout_while(slot, FIRST_PICTURE, |s| s.picture.is_none() && s.ended.is_none())
            .expect("not poisoned");
        if let Some(why) = &slot.ended {
            return Err(CaptureError::Portal(why.clone()));
        }
        slot.picture.clone().ok_or_else(|| CaptureError::Portal("no picture came from the screen cast".into()))
    }

    /// Buffers from PipeWire that were not taken.
    pub fn refused(&self) -> u64 {
        self.newest.slot.lock().expect("not poisoned").refused
    }
}

impl Drop for PortalCapture {
    fn drop(&mut self) {
        let _ = self.to_stream.send(ToStream::Stop);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = futures::executor::block_on(self.session.close());
    }
}

type Cast = (Screencast, Session<Screencast>, u32, (u32, u32), Option<String>);

/// The portal's part: a session, what to share (the cursor drawn in where it can be),
/// and the user's answer.
async fn start_cast(kind: SourceType, restore_token: Option<&str>) -> ashpd::Result<Cast> {
    let proxy = Screencast::new().await?;
    let session = proxy.create_session(Default::default()).await?;
    let cursor = match proxy.available_cursor_modes().await {
        Ok(modes) if modes.contains(CursorMode::Embedded) => CursorMode::Embedded,
        _ => CursorMode::Hidden,
    };
    let mut options =
        SelectSourcesOptions::default().set_cursor_mode(cursor).set_sources(BitFlags::from(kind)).set_multiple(false);
    // Restoring came with the interface's fourth version.
    if proxy.version() >= 4 {
        options = options.set_persist_mode(PersistMode::ExplicitlyRevoked).set_restore_token(restore_token);
    }
    proxy.select_sources(&session, options).await?.response()?;
    let streams = proxy.start(&session, None, Default::default()).await?.response()?;
    let stream = streams.streams().first().ok_or(ashpd::Error::NoResponse)?;
    let size = stream.size().map_or((0, 0), |(w, h)| (w.max(0) as u32, h.max(0) as u32));
    let (node, token) = (stream.pipe_wire_node_id(), streams.restore_token().map(str::to_owned));
    Ok((proxy, session, node, size, token))
}

/// What the stream negotiated.
#[derive(Default)]
struct Negotiated {
    size: (u32, u32),
    order: Option<Order>,
    active: bool,
}

/// The PipeWire thread: connects to the portal's node through its remote and keeps the
/// newest picture until told to stop.
fn run_stream(
    fd: OwnedFd,
    node: u32,
    newest: &Arc<Newest>,
    from_share: pw::channel::Receiver<ToStream>,
    started: &std::sync::mpsc::Sender<Result<(), String>>,
) -> Result<(), pw::Error> {
    pw::init();
    let mainloop = pw::main_loop::MainLoopRc::new(None)?;
    let context = pw::context::ContextRc::new(&mainloop, None)?;
    let core = context.connect_fd_rc(fd, None)?;
    let stream = pw::stream::StreamRc::new(
        core,
        "voipc-screen",
        pw::properties::properties! {
            *pw::keys::MEDIA_TYPE => "Video",
            *pw::keys::MEDIA_CATEGORY => "Capture",
            *pw::keys::MEDIA_ROLE => "Screen",
        },
    )?;
    let (on_state, on_picture) = (newest.clone(), newest.clone());
    let _listener = stream
        .add_local_listener_with_user_data(Negotiated { active: true, ..Negotiated::default() })
        .state_changed(move |_, _, old, new| {
            tracing::debug!("screen cast stream: {old:?} -> {new:?}");
            match new {
                pw::stream::StreamState::Error(e) => on_state.end(format!("the screen cast failed: {e}")),
                pw::stream::StreamState::Unconnected => on_state.end("the screen cast ended".into()),
                _ => {}
            }
        })
        .param_changed(|_, negotiated, id, param| {
            let Some(param) = param else { return };
            if id != spa::param::ParamType::Format.as_raw() {
                return;
            }
            let mut info = spa::param::video::VideoInfoRaw::default();
            if info.parse(param).is_ok() {
                negotiated.size = (info.size().width, info.size().height);
                negotiated.order = match info.format() {
                    VideoFormat::BGRx | VideoFormat::BGRA => Some(Order::Bgr),
                    VideoFormat::RGBx | VideoFormat::RGBA => Some(Order::Rgb),
                    _ => None,
                };
                tracing::debug!("screen cast format: {:?} {:?}", info.format(), negotiated.size);
            }
        })
        .process(move |stream, negotiated| {
            let Some(mut buffer) = stream.dequeue_buffer() else { return };
            let (Some(order), true) = (negotiated.order, negotiated.active) else { return };
            let Some(data) = buffer.datas_mut().first_mut() else { return };
            let (offset, size, stride) = (data.chunk().offset(), data.chunk().size(), data.chunk().stride());
            // An empty chunk: the screen did not change (or the buffer is corrupt).
            if size == 0 || data.chunk().flags().contains(spa::buffer::ChunkFlags::CORRUPTED) {
                return;
            }
            let Some(bytes) = data.data() else { return };
            // What the chunk says it filled, never more than was mapped.
            let bytes = &bytes[..(offset as usize).saturating_add(size as usize).min(bytes.len())];
            let mut slot = on_picture.slot.lock().expect("not poisoned");
            let mut picture = slot.picture.take().unwrap_or(Bgra { width: 0, height: 0, stride: 0, data: Vec::new() });
            match copy_picture(bytes, offset as usize, stride, negotiated.size, order, &mut picture) {
                Ok(()) => slot.picture = Some(picture),
                Err(e) => {
                    slot.refused += 1;
                    if slot.refused == 1 {
                        tracing::warn!("a screen cast buffer was not taken: {e}");
                    }
                }
            }
            drop(slot);
            on_picture.arrived.notify_all();
        })
        .register()?;
    let format = format_pod();
    let mut params = [spa::pod::Pod::from_bytes(&format).expect("a pod we serialized")];
    stream.connect(
        spa::utils::Direction::Input,
        Some(node),
        pw::stream::StreamFlags::AUTOCONNECT | pw::stream::StreamFlags::MAP_BUFFERS,
        &mut params,
    )?;
    let (quit, for_stream) = (mainloop.clone(), stream.clone());
    let _control = from_share.attach(mainloop.loop_(), move |message| match message {
        ToStream::Active(active) => {
            let _ = for_stream.set_active(active);
        }
        ToStream::Stop => quit.quit(),
    });
    let _ = started.send(Ok(()));
    mainloop.run();
    let _ = stream.disconnect();
    Ok(())
}

/// The formats taken: 32-bit RGB in either order, any size up to [`MAX_SIDE`], any rate.
fn format_pod() -> Vec<u8> {
    use spa::param::format::{FormatProperties, MediaSubtype, MediaType};
    use spa::utils::{Fraction, Rectangle};
    let object = spa::pod::object!(
        spa::utils::SpaTypes::ObjectParamFormat,
        spa::param::ParamType::EnumFormat,
        spa::pod::property!(FormatProperties::MediaType, Id, MediaType::Video),
        spa::pod::property!(FormatProperties::MediaSubtype, Id, MediaSubtype::Raw),
        spa::pod::property!(
            FormatProperties::VideoFormat,
            Choice,
            Enum,
            Id,
            VideoFormat::BGRx,
            VideoFormat::BGRx,
            VideoFormat::BGRA,
            VideoFormat::RGBx,
            VideoFormat::RGBA
        ),
        spa::pod::property!(
            FormatProperties::VideoSize,
            Choice,
            Range,
            Rectangle,
            Rectangle { width: 1920, height: 1080 },
            Rectangle { width: 1, height: 1 },
            Rectangle { width: MAX_SIDE, height: MAX_SIDE }
        ),
        spa::pod::property!(
            FormatProperties::VideoFramerate,
            Choice,
            Range,
            Fraction,
            Fraction { num: 30, denom: 1 },
            Fraction { num: 0, denom: 1 },
            Fraction { num: 240, denom: 1 }
        ),
    );
    spa::pod::serialize::PodSerializer::serialize(std::io::Cursor::new(Vec::new()), &spa::pod::Value::Object(object))
        .expect("a fixed pod serializes")
        .0
        .into_inner()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn empty() -> Bgra {
        Bgra { width: 0, height: 0, stride: 0, data: Vec::new() }
    }

    #[test]
    fn padded_rows_come_out_packed_and_red_and_blue_in_place() {
        // 2×2 pixels, rows 12 bytes apart (4 of padding), 3 bytes of something before.
        let mut src = vec![0xee; 3];
        src.extend([1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0]);
        src.extend([9, 10, 11, 12, 13, 14, 15, 16, 0, 0, 0, 0]);
        let mut out = empty();
        copy_picture(&src, 3, 12, (2, 2), Order::Bgr, &mut out).unwrap();
        assert_eq!((out.width, out.height, out.stride), (2, 2, 8));
        assert_eq!(out.data, (1..=16).collect::<Vec<u8>>());
        copy_picture(&src, 3, 12, (2, 2), Order::Rgb, &mut out).unwrap();
        assert_eq!(&out.data[..8], [3, 2, 1, 4, 7, 6, 5, 8]);
        // The last row needs no padding after it.
        copy_picture(&src[..src.len() - 4], 3, 12, (2, 2), Order::Bgr, &mut out).unwrap();
    }

    #[test]
    fn a_buffer_that_does_not_hold_what_it_claims_is_refused() {
        let src = vec![0; 64];
        let mut out = empty();
        let short = copy_picture(&src, 0, 16, (4, 5), Order::Bgr, &mut out);
        assert_eq!(short, Err(BufferError::Short { needed: 80, len: 64 }));
        assert_eq!(
            copy_picture(&src, 60, 16, (1, 2), Order::Bgr, &mut out),
            Err(BufferError::Short { needed: 80, len: 64 })
        );
        assert!(matches!(copy_picture(&src, 0, 8, (4, 1), Order::Bgr, &mut out), Err(BufferError::Stride { .. })));
        // No stride given: packed rows, and 64 bytes hold four of 16.
        assert!(matches!(copy_picture(&src, 0, 0, (4, 5), Order::Bgr, &mut out), Err(BufferError::Short { .. })));
        assert!(matches!(copy_picture(&src, 0, -16, (4, 1), Order::Bgr, &mut out), Err(BufferError::Stride { .. })));
        assert!(matches!(copy_picture(&src, 0, 16, (0, 1), Order::Bgr, &mut out), Err(BufferError::Size { .. })));
        let huge = copy_picture(&src, 0, i32::MAX, (MAX_SIDE + 1, 1), Order::Bgr, &mut out);
        assert!(matches!(huge, Err(BufferError::Size { .. })));
        // A huge stride with a small buffer is short, not an overflow.
        assert!(matches!(
            copy_picture(&src, 0, i32::MAX, (1, 3), Order::Bgr, &mut out),
            Err(BufferError::Short { .. })
        ));
        assert_eq!(out.data, Vec::<u8>::new(), "nothing was written by a refused buffer");
        copy_picture(&src, 0, 0, (4, 4), Order::Bgr, &mut out).unwrap();
        assert_eq!((out.stride, out.data.len()), (16, 64));
    }

    #[test]
    fn the_format_offered_parses_back() {
        let bytes = format_pod();
        let (_, value) = spa::pod::deserialize::PodDeserializer::deserialize_any_from(&bytes).unwrap();
        let spa::pod::Value::Object(object) = value else { panic!("an object") };
        assert_eq!(object.properties.len(), 5);
    }
}
