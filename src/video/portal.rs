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
use std::sync::Arc;
use std::time::Duration;

use ashpd::desktop::screencast::{CursorMode, Screencast, SelectSourcesOptions, SourceType};
use ashpd::desktop::{PersistMode, Session};
use ashpd::enumflags2::BitFlags;
use pipewire as pw;
use pw::spa;
use pw::spa::param::video::VideoFormat;

use super::capture::{CaptureError, Source};
use super::captured::{MAX_SIDE, NewestPicture, Order, copy_picture};
use super::picture::Bgra;

/// How long the first picture may take after the user said yes.
const FIRST_PICTURE: Duration = Duration::from_secs(5);

/// From the share to the PipeWire thread.
enum ToStream {
    /// Take pictures (or stop taking them while nobody watches).
    Active(bool),
    Stop,
}

/// A screen or window shared through the portal.
pub struct PortalCapture {
    newest: Arc<NewestPicture>,
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
        let newest = Arc::new(NewestPicture::default());
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
        self.newest.newest(FIRST_PICTURE)
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
    newest: &Arc<NewestPicture>,
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
            on_picture.put(|picture| copy_picture(bytes, offset as usize, stride, negotiated.size, order, picture));
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

    #[test]
    fn the_format_offered_parses_back() {
        let bytes = format_pod();
        let (_, value) = spa::pod::deserialize::PodDeserializer::deserialize_any_from(&bytes).unwrap();
        let spa::pod::Value::Object(object) = value else { panic!("an object") };
        assert_eq!(object.properties.len(), 5);
    }
}
