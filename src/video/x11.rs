//! X11 capture: a monitor or a window of the display, read through shared memory
//! (MIT-SHM: one copy, no image on the socket) with the cursor drawn in (XFixes). Each
//! capture reads the screen as it is now.

use x11rb::connection::{Connection, RequestConnection as _};
use x11rb::protocol::randr::ConnectionExt as _;
use x11rb::protocol::shm::ConnectionExt as _;
use x11rb::protocol::xfixes::ConnectionExt as _;
use x11rb::protocol::xproto::{self, ConnectionExt as _, ImageFormat};
use x11rb::rust_connection::RustConnection;

use super::capture::{CaptureError, Source};
use super::picture::Bgra;

fn x11(e: impl std::fmt::Display) -> CaptureError {
    CaptureError::X11(e.to_string())
}

/// A monitor of the display, where it is on the root window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Monitor {
    pub name: String,
    pub primary: bool,
    pub x: i16,
    pub y: i16,
    pub width: u16,
    pub height: u16,
}

/// A System V shared memory segment attached here and to the X server.
struct ShmSegment {
    addr: *mut libc::c_void,
    len: usize,
    seg: u32,
}

impl ShmSegment {
    fn new(conn: &RustConnection, len: usize) -> Result<Self, CaptureError> {
        // SAFETY: plain System V calls; the segment is marked for removal at once so
        // that it goes when both sides detach, whatever happens to this process.
        unsafe {
            let id = libc::shmget(libc::IPC_PRIVATE, len, libc::IPC_CREAT | 0o600);
            if id < 0 {
                return Err(CaptureError::Shm(std::io::Error::last_os_error()));
            }
            let addr = libc::shmat(id, std::ptr::null(), 0);
            let attached = addr as isize != -1;
            let seg = conn.generate_id().map_err(x11)?;
            let result = if attached {
                conn.shm_attach(seg, id as u32, false).map_err(x11).and_then(|c| c.check().map_err(x11))
            } else {
                Err(CaptureError::Shm(std::io::Error::last_os_error()))
            };
            libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut());
            match result {
                Ok(()) => Ok(ShmSegment { addr, len, seg }),
                Err(e) => {
                    if attached {
                        libc::shmdt(addr);
                    }
                    Err(e)
                }
            }
        }
    }

    fn bytes(&self, len: usize) -> &[u8] {
        // SAFETY: the segment is `self.len` bytes, mapped while `self` lives; the X server
        // wrote it before the reply that the caller waited for.
        unsafe { std::slice::from_raw_parts(self.addr as *const u8, len.min(self.len)) }
    }
}

impl Drop for ShmSegment {
    fn drop(&mut self) {
        // SAFETY: attached in `new`, detached once here.
        unsafe {
            libc::shmdt(self.addr);
        }
    }
}

/// Captures one area of the root window of an X11 display.
pub struct X11Capture {
    conn: RustConnection,
    root: xproto::Window,
    area: (i16, i16, u16, u16),
    shm: ShmSegment,
    cursor: bool,
}

impl X11Capture {
    /// Connects to `display` (or `$DISPLAY`) and prepares to capture `source` (a monitor
    /// or a window; the cursor is drawn in when XFixes is there).
    pub fn open(display: Option<&str>, source: &Source) -> Result<Self, CaptureError> {
        let (conn, screen) = x11rb::connect(display).map_err(|e| CaptureError::Connect(e.to_string()))?;
        let root = conn.setup().roots[screen].root;
        conn.extension_information(x11rb::protocol::shm::X11_EXTENSION_NAME)
            .map_err(x11)?
            .ok_or(CaptureError::NoShm)?;
        let area = match source {
            Source::Monitor(wanted) => {
                // A server without RandR 1.5 lists none: the root window is the screen.
                let all = monitors(&conn, root).unwrap_or_default();
                let found = match wanted {
                    None => all.iter().find(|m| m.primary).or(all.first()),
                    Some(w) => {
                        all.iter().enumerate().find(|(i, m)| m.name == *w || i.to_string() == *w).map(|(_, m)| m)
                    }
                };
                match found {
                    Some(m) => (m.x, m.y, m.width, m.height),
                    None if wanted.is_none() => {
                        let g = conn.get_geometry(root).map_err(x11)?.reply().map_err(x11)?;
                        (0, 0, g.width, g.height)
                    }
                    None => {
                        let known = all.into_iter().map(|m| m.name).collect();
                        return Err(CaptureError::NoMonitor { wanted: wanted.clone().unwrap_or_default(), known });
                    }
                }
            }
            Source::Window(title) => window_area(&conn, root, title)?,
            Source::File(path) => return Err(CaptureError::X11(format!("{} is a file, not a screen", path.display()))),
        };
        let cursor = conn.xfixes_query_version(4, 0).map_err(x11)?.reply().is_ok();
        let shm = ShmSegment::new(&conn, usize::from(area.2) * usize::from(area.3) * 4)?;
        Ok(X11Capture { conn, root, area, shm, cursor })
    }

    pub fn size(&self) -> (u32, u32) {
        (u32::from(self.area.2), u32::from(self.area.3))
    }

    /// The area as it is now, with the cursor.
    pub fn capture(&mut self) -> Result<Bgra, CaptureError> {
        let (x, y, w, h) = self.area;
        let format = u8::from(ImageFormat::Z_PIXMAP);
        let reply = self
            .conn
            .shm_get_image(self.root, x, y, w, h, !0, format, self.shm.seg, 0)
            .map_err(x11)?
            .reply()
            .map_err(x11)?;
        let len = (usize::from(w) * usize::from(h) * 4).min(reply.size as usize);
        let mut frame = Bgra {
            width: u32::from(w),
            height: u32::from(h),
            stride: usize::from(w) * 4,
            data: self.shm.bytes(len).to_vec(),
        };
        frame.data.resize(frame.stride * usize::from(h), 0);
        if self.cursor
            && let Ok(cursor) = self.conn.xfixes_get_cursor_image().map_err(x11)?.reply()
        {
            draw_cursor(&mut frame, &cursor, x, y);
        }
        Ok(frame)
    }
}

impl Drop for X11Capture {
    fn drop(&mut self) {
        let _ = self.conn.shm_detach(self.shm.seg);
        let _ = self.conn.flush();
    }
}

/// The display's monitors (RandR), primary first when there is one.
pub fn monitors(conn: &RustConnection, root: xproto::Window) -> Result<Vec<Monitor>, CaptureError> {
    let reply = conn.randr_get_monitors(root, true).map_err(x11)?.reply().map_err(x11)?;
    let mut out = Vec::new();
    for m in reply.monitors {
        let name = conn.get_atom_name(m.name).map_err(x11)?.reply().map_err(x11)?;
        let name = String::from_utf8_lossy(&name.name).into_owned();
        out.push(Monitor { name, primary: m.primary, x: m.x, y: m.y, width: m.width, height: m.height });
    }
    Ok(out)
}

/// What can be shared on `display` (or `$DISPLAY`), as `--share-screen` names it: each
/// monitor by name, the primary first (an empty name, the whole screen, where RandR lists
/// none), then `window:TITLE` for each top-level window with a title.
pub fn sources(display: Option<&str>) -> Result<Vec<String>, CaptureError> {
    let (conn, screen) = x11rb::connect(display).map_err(|e| CaptureError::Connect(e.to_string()))?;
    let root = conn.setup().roots[screen].root;
    let mut monitors = monitors(&conn, root).unwrap_or_default();
    monitors.sort_by_key(|m| !m.primary);
    let mut out: Vec<String> = monitors.into_iter().map(|m| m.name).collect();
    if out.is_empty() {
        out.push(String::new());
    }
    let mut titles: Vec<String> = titled_windows(&conn, root)?
        .into_iter()
        .flat_map(|(_, names)| names.into_iter().next())
        .filter(|t| !t.is_empty())
        .collect();
    titles.sort();
    titles.dedup();
    out.extend(titles.into_iter().map(|t| format!("window:{t}")));
    Ok(out)
}

/// The top-level windows with the titles they give (`_NET_WM_NAME`, then `WM_NAME`).
fn titled_windows(
    conn: &RustConnection,
    root: xproto::Window,
) -> Result<Vec<(xproto::Window, Vec<String>)>, CaptureError> {
    let atom = |name: &[u8]| -> Result<u32, CaptureError> {
        Ok(conn.intern_atom(false, name).map_err(x11)?.reply().map_err(x11)?.atom)
    };
    let (net_name, utf8) = (atom(b"_NET_WM_NAME")?, atom(b"UTF8_STRING")?);
    let tree = conn.query_tree(root).map_err(x11)?.reply().map_err(x11)?;
    let mut out = Vec::new();
    for window in tree.children {
        let mut names = Vec::new();
        for (property, kind) in
            [(net_name, utf8), (u32::from(xproto::AtomEnum::WM_NAME), u32::from(xproto::AtomEnum::STRING))]
        {
            if let Ok(reply) = conn.get_property(false, window, property, kind, 0, 1024).map_err(x11)?.reply()
                && !reply.value.is_empty()
            {
                names.push(String::from_utf8_lossy(&reply.value).into_owned());
            }
        }
        if !names.is_empty() {
            out.push((window, names));
        }
    }
    Ok(out)
}

/// Where the top-level window titled `title` is on the root window.
fn window_area(conn: &RustConnection, root: xproto::Window, title: &str) -> Result<(i16, i16, u16, u16), CaptureError> {
    let found = titled_windows(conn, root)?.into_iter().find(|(_, names)| names.iter().any(|n| n == title));
    let Some((window, _)) = found else { return Err(CaptureError::NoWindow(title.to_owned())) };
    let g = conn.get_geometry(window).map_err(x11)?.reply().map_err(x11)?;
    let at = conn.translate_coordinates(window, root, 0, 0).map_err(x11)?.reply().map_err(x11)?;
    Ok((at.dst_x, at.dst_y, g.width, g.height))
}

/// Blends the cursor (premultiplied ARGB) into the picture of the area at `(ax, ay)`.
fn draw_cursor(frame: &mut Bgra, cursor: &x11rb::protocol::xfixes::GetCursorImageReply, ax: i16, ay: i16) {
    let left = i32::from(cursor.x) - i32::from(cursor.xhot) - i32::from(ax);
    let top = i32::from(cursor.y) - i32::from(cursor.yhot) - i32::from(ay);
    let (cw, ch) = (i32::from(cursor.width), i32::from(cursor.height));
    for cy in 0..ch {
        let y = top + cy;
        if y < 0 || y >= frame.height as i32 {
            continue;
        }
        for cx in 0..cw {
            let x = left + cx;
            if x < 0 || x >= frame.width as i32 {
                continue;
            }
            let Some(&argb) = cursor.cursor_image.get((cy * cw + cx) as usize) else { return };
            let alpha = argb >> 24;
            if alpha == 0 {
                continue;
            }
            let at = y as usize * frame.stride + x as usize * 4;
            let px = &mut frame.data[at..at + 4];
            for (channel, shift) in [(0, 0), (1, 8), (2, 16)] {
                let src = (argb >> shift) & 0xff;
                px[channel] = (src + u32::from(px[channel]) * (255 - alpha) / 255).min(255) as u8;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cursor_is_blended_where_it_is_and_clipped() {
        let mut frame = Bgra { width: 4, height: 4, stride: 16, data: vec![0; 64] };
        let cursor = x11rb::protocol::xfixes::GetCursorImageReply {
            sequence: 0,
            length: 0,
            x: 11,
            y: 11,
            width: 2,
            height: 2,
            xhot: 0,
            yhot: 0,
            cursor_serial: 0,
            cursor_image: vec![0xffff_ffff, 0, 0x8080_8080, 0xffff_ffff],
        };
        draw_cursor(&mut frame, &cursor, 8, 8);
        let px = |x: usize, y: usize| &frame.data[y * 16 + x * 4..y * 16 + x * 4 + 3];
        assert_eq!(px(3, 3), [255, 255, 255]);
        assert_eq!(px(0, 0), [0, 0, 0]);
        // The half-transparent pixel at (3, 4) is outside: clipped, no panic.
        let off = x11rb::protocol::xfixes::GetCursorImageReply { x: 100, y: -5, ..cursor };
        draw_cursor(&mut frame, &off, 0, 0);
    }
}
