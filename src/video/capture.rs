//! What a share shows, and which backend reads it: a monitor or a window of an X11
//! display ([`super::x11`]), what the Wayland ScreenCast portal streams
//! ([`super::portal`]), Windows.Graphics.Capture ([`super::windows`]), or a Y4M file for
//! tests. Each capture gives the screen as it is now; nothing queues, so the encoder
//! always gets the newest picture.

use std::io::BufReader;
use std::path::PathBuf;

use super::picture::Bgra;
#[cfg(unix)]
use super::x11::X11Capture;
use super::y4m::{Y4mError, Y4mReader, YuvFrame};

/// What to share, as `--share-screen` names it: nothing or a monitor's name or number,
/// `window:TITLE`, or a `.y4m` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Monitor(Option<String>),
    Window(String),
    File(PathBuf),
}

impl Source {
    pub fn parse(spec: Option<&str>) -> Source {
        match spec.map(str::trim) {
            None | Some("") => Source::Monitor(None),
            Some(s) if s.starts_with("window:") => Source::Window(s["window:".len()..].to_owned()),
            Some(s) if s.ends_with(".y4m") => Source::File(PathBuf::from(s)),
            Some(s) => Source::Monitor(Some(s.to_owned())),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("cannot reach the X display: {0}")]
    Connect(String),
    #[error("the X server has no MIT-SHM (shared memory) extension")]
    NoShm,
    #[error("no monitor {wanted:?}; there are: {}", .known.join(", "))]
    NoMonitor { wanted: String, known: Vec<String> },
    #[error("no window titled {0:?}")]
    NoWindow(String),
    #[error("shared memory: {0}")]
    Shm(std::io::Error),
    #[error("X11: {0}")]
    X11(String),
    #[error("{0}")]
    File(#[from] Y4mError),
    #[error("cannot open {path}: {error}")]
    Open { path: PathBuf, error: std::io::Error },
    #[error("screen cast portal: {0}")]
    Portal(String),
    #[error("Windows screen capture: {0}")]
    Windows(String),
    #[error("the capture ended: {0}")]
    Ended(String),
    #[error("no picture came from the screen capture")]
    NoPicture,
}

/// How this desktop's screen is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    #[cfg(unix)]
    X11,
    /// Wayland: the XDG desktop portal (an X11 client there sees only other X11 windows).
    Portal,
    #[cfg(windows)]
    Windows,
}

impl Backend {
    #[cfg(windows)]
    pub fn of_session() -> Backend {
        Backend::Windows
    }

    /// This session's: Wayland when the session says so, or when there is a Wayland
    /// display and no X11 one.
    #[cfg(unix)]
    pub fn of_session() -> Backend {
        let var = |name| std::env::var_os(name).filter(|v| !v.is_empty());
        let session_type = std::env::var("XDG_SESSION_TYPE").ok();
        Backend::choose(session_type.as_deref(), var("WAYLAND_DISPLAY").is_some(), var("DISPLAY").is_some())
    }

    #[cfg(unix)]
    fn choose(session_type: Option<&str>, wayland_display: bool, x11_display: bool) -> Backend {
        match session_type {
            Some("wayland") => Backend::Portal,
            Some("x11") => Backend::X11,
            _ if wayland_display && !x11_display => Backend::Portal,
            _ => Backend::X11,
        }
    }
}

/// A screen or window being captured, by whichever backend the session has.
pub enum Screen {
    #[cfg(unix)]
    X11(Box<X11Capture>),
    #[cfg(target_os = "linux")]
    Portal(super::portal::PortalCapture),
    #[cfg(windows)]
    Windows(super::windows::WindowsCapture),
}

impl Screen {
    /// Opens `source` on this session's backend; the portal is given `restore_token`
    /// (from its last grant) so that it need not ask the user again.
    pub fn open(source: &Source, restore_token: Option<&str>) -> Result<Screen, CaptureError> {
        match Backend::of_session() {
            #[cfg(unix)]
            Backend::X11 => X11Capture::open(None, source).map(|c| Screen::X11(Box::new(c))),
            #[cfg(windows)]
            Backend::Windows => super::windows::WindowsCapture::open(source).map(Screen::Windows),
            #[cfg(target_os = "linux")]
            Backend::Portal => super::portal::PortalCapture::open(source, restore_token).map(Screen::Portal),
            #[cfg(not(target_os = "linux"))]
            Backend::Portal => Err(CaptureError::Portal("not built for this system".into())),
        }
    }

    pub fn size(&self) -> (u32, u32) {
        match self {
            Screen::X11(c) => c.size(),
            #[cfg(target_os = "linux")]
            Screen::Portal(c) => c.size(),
            #[cfg(windows)]
            Screen::Windows(c) => c.size(),
        }
    }

    pub fn capture(&mut self) -> Result<Bgra, CaptureError> {
        match self {
            Screen::X11(c) => c.capture(),
            #[cfg(target_os = "linux")]
            Screen::Portal(c) => c.capture(),
            #[cfg(windows)]
            Screen::Windows(c) => c.capture(),
        }
    }

    /// Whether anything will be captured soon: the portal's stream stops copying
    /// pictures while nobody watches.
    pub fn set_active(&self, active: bool) {
        match self {
            #[cfg(unix)]
            Screen::X11(_) => {}
            #[cfg(target_os = "linux")]
            Screen::Portal(c) => c.set_active(active),
            #[cfg(windows)]
            Screen::Windows(c) => c.set_active(active),
        }
    }

    /// The portal's token for sharing the same screen next time without asking.
    pub fn restore_token(&self) -> Option<&str> {
        match self {
            #[cfg(target_os = "linux")]
            Screen::Portal(c) => c.restore_token(),
            // Only the portal grants.
            _ => None,
        }
    }
}

/// What can be shared on this session, as `--share-screen` names it. On X11 and Windows
/// each monitor by name, the primary first, then `window:TITLE` for each window with a
/// title; through the portal a screen or a window, which the portal's own dialog asks
/// the user to pick.
pub fn sources() -> Result<Vec<String>, CaptureError> {
    match Backend::of_session() {
        #[cfg(unix)]
        Backend::X11 => super::x11::sources(None),
        Backend::Portal => Ok(vec![String::new(), "window:".to_owned()]),
        #[cfg(windows)]
        Backend::Windows => super::windows::sources(),
    }
}

/// Frames from a Y4M file, over and over (a test stands in for a screen with it).
pub struct FileSource {
    path: PathBuf,
    reader: Y4mReader<BufReader<std::fs::File>>,
}

impl FileSource {
    pub fn open(path: PathBuf) -> Result<Self, CaptureError> {
        let reader = Self::reader(&path)?;
        Ok(FileSource { path, reader })
    }

    fn reader(path: &PathBuf) -> Result<Y4mReader<BufReader<std::fs::File>>, CaptureError> {
        let file = std::fs::File::open(path).map_err(|error| CaptureError::Open { path: path.clone(), error })?;
        Ok(Y4mReader::new(BufReader::new(file))?)
    }

    pub fn size(&self) -> (u32, u32) {
        (self.reader.width, self.reader.height)
    }

    pub fn fps(&self) -> u32 {
        self.reader.fps
    }

    /// The next frame, starting again at the end.
    pub fn next_frame(&mut self) -> Result<YuvFrame, CaptureError> {
        if let Some(frame) = self.reader.next_frame()? {
            return Ok(frame);
        }
        self.reader = Self::reader(&self.path)?;
        self.reader.next_frame()?.ok_or(CaptureError::File(Y4mError::Truncated))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_parse_as_named() {
        assert_eq!(Source::parse(None), Source::Monitor(None));
        assert_eq!(Source::parse(Some("")), Source::Monitor(None));
        assert_eq!(Source::parse(Some("HDMI-1")), Source::Monitor(Some("HDMI-1".into())));
        assert_eq!(Source::parse(Some("window:Firefox")), Source::Window("Firefox".into()));
        assert_eq!(Source::parse(Some("/tmp/a.y4m")), Source::File("/tmp/a.y4m".into()));
    }

    #[cfg(unix)]
    #[test]
    fn wayland_sessions_capture_through_the_portal() {
        assert_eq!(Backend::choose(Some("wayland"), true, true), Backend::Portal, "Xwayland sees only X11 windows");
        assert_eq!(Backend::choose(Some("x11"), true, true), Backend::X11);
        assert_eq!(Backend::choose(None, true, false), Backend::Portal);
        assert_eq!(Backend::choose(Some("tty"), true, true), Backend::X11);
        assert_eq!(Backend::choose(None, false, true), Backend::X11);
        assert_eq!(Backend::choose(None, false, false), Backend::X11, "and X11 says why it cannot connect");
    }
}
