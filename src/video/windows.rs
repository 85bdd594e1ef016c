//! Windows capture through Windows.Graphics.Capture (`windows-capture`): a monitor or a
//! window, the cursor drawn in, BGRA pictures delivered on the capture's own thread and
//! only the newest kept.
//!
//! NOT BUILT AND NOT TESTED: the development machine cannot compile for Windows. Written
//! against the sources of windows-capture 2.0.1; the README says so.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use windows_capture::capture::{CaptureControl, Context, GraphicsCaptureApiHandler};
use windows_capture::frame::Frame;
use windows_capture::graphics_capture_api::InternalCaptureControl;
use windows_capture::monitor::Monitor;
use windows_capture::settings::{
    ColorFormat, CursorCaptureSettings, DirtyRegionSettings, DrawBorderSettings, MinimumUpdateIntervalSettings,
    SecondaryWindowSettings, Settings,
};
use windows_capture::window::Window;

use super::capture::{CaptureError, Source};
use super::captured::{NewestPicture, Order, copy_picture};
use super::picture::Bgra;

/// How long the first picture may take.
const FIRST_PICTURE: Duration = Duration::from_secs(5);

type Shared = (Arc<NewestPicture>, Arc<AtomicBool>);

/// Runs on the capture's thread for each picture.
struct Handler {
    newest: Arc<NewestPicture>,
    active: Arc<AtomicBool>,
}

impl GraphicsCaptureApiHandler for Handler {
    type Flags = Shared;
    type Error = String;

    fn new(context: Context<Shared>) -> Result<Self, String> {
        let (newest, active) = context.flags;
        Ok(Handler { newest, active })
    }

    fn on_frame_arrived(&mut self, frame: &mut Frame, _control: InternalCaptureControl) -> Result<(), String> {
        if !self.active.load(Ordering::Relaxed) {
            return Ok(());
        }
        let mut buffer = frame.buffer().map_err(|e| e.to_string())?;
        let (width, height) = (buffer.width(), buffer.height());
        let stride = i32::try_from(buffer.row_pitch()).unwrap_or(-1);
        let bytes = buffer.as_raw_buffer();
        self.newest.put(|picture| copy_picture(bytes, 0, stride, (width, height), Order::Bgr, picture));
        Ok(())
    }

    fn on_closed(&mut self) -> Result<(), String> {
        self.newest.end("the shared window was closed".into());
        Ok(())
    }
}

/// A monitor or a window being captured.
pub struct WindowsCapture {
    newest: Arc<NewestPicture>,
    active: Arc<AtomicBool>,
    size: (u32, u32),
    control: Option<CaptureControl<Handler, String>>,
}

fn windows(e: impl std::fmt::Display) -> CaptureError {
    CaptureError::Windows(e.to_string())
}

fn settings<T: TryInto<windows_capture::settings::GraphicsCaptureItemType>>(
    item: T,
    shared: Shared,
) -> Settings<Shared, T> {
    Settings::new(
        item,
        CursorCaptureSettings::WithCursor,
        // Windows' border around what is shared shows the user what others see.
        DrawBorderSettings::Default,
        SecondaryWindowSettings::Default,
        MinimumUpdateIntervalSettings::Default,
        DirtyRegionSettings::Default,
        ColorFormat::Bgra8,
        shared,
    )
}

impl WindowsCapture {
    /// Starts capturing `source`: a monitor by name or number (the primary when none is
    /// named), or the window titled so.
    pub fn open(source: &Source) -> Result<Self, CaptureError> {
        let (newest, active) = (Arc::new(NewestPicture::default()), Arc::new(AtomicBool::new(true)));
        let shared = (newest.clone(), active.clone());
        let (size, control) = match source {
            Source::Monitor(wanted) => {
                let monitor = monitor(wanted.as_deref())?;
                let size = (monitor.width().map_err(windows)?, monitor.height().map_err(windows)?);
                (size, Handler::start_free_threaded(settings(monitor, shared)).map_err(windows)?)
            }
            Source::Window(title) => {
                let window = Window::from_name(title).map_err(|_| CaptureError::NoWindow(title.clone()))?;
                let (w, h) = (window.width().map_err(windows)?, window.height().map_err(windows)?);
                let size = (w.max(0) as u32, h.max(0) as u32);
                (size, Handler::start_free_threaded(settings(window, shared)).map_err(windows)?)
            }
            Source::File(path) => return Err(windows(format!("{} is a file, not a screen", path.display()))),
        };
        Ok(WindowsCapture { newest, active, size, control: Some(control) })
    }

    pub fn size(&self) -> (u32, u32) {
        self.size
    }

    /// The newest picture; waits for the first one.
    pub fn capture(&mut self) -> Result<Bgra, CaptureError> {
        self.newest.newest(FIRST_PICTURE)
    }

    /// Pictures are copied only while something wants them.
    pub fn set_active(&self, active: bool) {
        self.active.store(active, Ordering::Relaxed);
    }
}

impl Drop for WindowsCapture {
    fn drop(&mut self) {
        if let Some(control) = self.control.take() {
            let _ = control.stop();
        }
    }
}

/// The monitor `wanted` names (its name, or its number from 1 as Windows counts), or the
/// primary one.
fn monitor(wanted: Option<&str>) -> Result<Monitor, CaptureError> {
    let Some(wanted) = wanted else { return Monitor::primary().map_err(windows) };
    let all = Monitor::enumerate().map_err(windows)?;
    let found = all
        .iter()
        .position(|m| m.name().is_ok_and(|n| n == wanted) || m.index().is_ok_and(|i| i.to_string() == wanted));
    match found {
        Some(at) => Ok(all.into_iter().nth(at).expect("found in the list")),
        None => Err(CaptureError::NoMonitor {
            wanted: wanted.to_owned(),
            known: all.iter().filter_map(|m| m.name().ok()).collect(),
        }),
    }
}

/// Each monitor by name, the primary first, then `window:TITLE` for each window with a
/// title.
pub fn sources() -> Result<Vec<String>, CaptureError> {
    let primary = Monitor::primary().ok().and_then(|m| m.name().ok());
    let mut out: Vec<String> = Monitor::enumerate().map_err(windows)?.iter().filter_map(|m| m.name().ok()).collect();
    out.sort_by_key(|name| Some(name) != primary.as_ref());
    let mut titles: Vec<String> =
        Window::enumerate().map_err(windows)?.iter().filter_map(|w| w.title().ok()).filter(|t| !t.is_empty()).collect();
    titles.sort();
    titles.dedup();
    out.extend(titles.into_iter().map(|t| format!("window:{t}")));
    Ok(out)
}
