//! A Wayland-style screen cast desktop without a compositor: a private D-Bus session bus,
//! PipeWire with WirePlumber, a GStreamer test picture published as a PipeWire video
//! source, Debian's real `xdg-desktop-portal` frontend, and a ScreenCast portal backend
//! of our own that offers that source where a compositor's backend would offer a monitor.
//!
//! Why our own backend: sway's (xdg-desktop-portal-wlr 0.7) will not cast without DMA-BUF,
//! and this machine has no GPU. Everything the client talks to is real: the frontend (which
//! checks the caller, keeps restore tokens in the permission store and opens the PipeWire
//! remote), D-Bus and PipeWire. The backend writes down what it was asked, so a test can
//! see whether the user would have been shown the dialog.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use zbus::zvariant::{OwnedObjectPath, OwnedValue, Value};

const TIMEOUT: Duration = Duration::from_secs(20);
const BACKEND: &str = "org.freedesktop.impl.portal.desktop.voipctest";
/// The test picture's size.
pub const SIZE: (i32, i32) = (1280, 720);
/// The test picture: GStreamer's still gradient of every hue and brightness.
pub const PATTERN: &str = "pattern=colors";

/// What the backend was asked.
#[derive(Debug, Default, Clone)]
pub struct Asked {
    /// Source selections made without restore data: each would show the user a dialog.
    pub dialogs: u32,
    /// Source selections that came with the data of an earlier grant.
    pub restored: u32,
    /// Sessions the frontend closed.
    pub closed: u32,
}

struct ScreenCast {
    node: u32,
    asked: Arc<Mutex<Asked>>,
}

#[zbus::interface(name = "org.freedesktop.impl.portal.ScreenCast")]
impl ScreenCast {
    async fn create_session(
        &self,
        #[zbus(object_server)] server: &zbus::ObjectServer,
        _handle: OwnedObjectPath,
        session_handle: OwnedObjectPath,
        _app_id: String,
        _options: HashMap<String, OwnedValue>,
    ) -> (u32, HashMap<String, OwnedValue>) {
        let session = CastSession { asked: self.asked.clone() };
        let ok = server.at(session_handle, session).await.unwrap_or(false);
        (if ok { 0 } else { 2 }, HashMap::new())
    }

    fn select_sources(
        &self,
        _handle: OwnedObjectPath,
        _session_handle: OwnedObjectPath,
        _app_id: String,
        options: HashMap<String, OwnedValue>,
    ) -> (u32, HashMap<String, OwnedValue>) {
        let mut asked = self.asked.lock().unwrap();
        if options.contains_key("restore_data") {
            asked.restored += 1;
        } else {
            asked.dialogs += 1;
        }
        (0, HashMap::new())
    }

    fn start(
        &self,
        _handle: OwnedObjectPath,
        _session_handle: OwnedObjectPath,
        _app_id: String,
        _parent_window: String,
        _options: HashMap<String, OwnedValue>,
    ) -> (u32, HashMap<String, OwnedValue>) {
        let stream: HashMap<&str, Value> = [("size", Value::from(SIZE)), ("source_type", Value::from(1u32))].into();
        let streams = vec![(self.node, stream)];
        let owned = |v: Value| OwnedValue::try_from(v).unwrap();
        let results = [
            ("streams".to_owned(), owned(Value::from(streams))),
            ("persist_mode".to_owned(), owned(Value::from(2u32))),
            ("restore_data".to_owned(), owned(Value::from(("voipctest", 1u32, Value::from("monitor-1"))))),
        ];
        (0, results.into())
    }

    #[zbus(property)]
    fn available_source_types(&self) -> u32 {
        3
    }

    #[zbus(property)]
    fn available_cursor_modes(&self) -> u32 {
        3
    }

    #[zbus(property, name = "version")]
    fn version(&self) -> u32 {
        4
    }
}

struct CastSession {
    asked: Arc<Mutex<Asked>>,
}

#[zbus::interface(name = "org.freedesktop.impl.portal.Session")]
impl CastSession {
    async fn close(
        &self,
        #[zbus(object_server)] server: &zbus::ObjectServer,
        #[zbus(header)] header: zbus::message::Header<'_>,
    ) {
        self.asked.lock().unwrap().closed += 1;
        if let Some(path) = header.path() {
            let _ = server.remove::<CastSession, _>(path.to_owned()).await;
        }
    }

    #[zbus(property, name = "version")]
    fn version(&self) -> u32 {
        1
    }
}

/// The running desktop; everything stops on drop.
pub struct ScreenCastDesktop {
    children: Vec<Child>,
    dir: tempfile::TempDir,
    asked: Arc<Mutex<Asked>>,
    backend: Option<zbus::blocking::Connection>,
}

impl ScreenCastDesktop {
    /// Starts it all (`just setup` installs the packages) with a test picture of
    /// [`SIZE`], [`PATTERN`] in RGBx.
    pub fn start() -> ScreenCastDesktop {
        let dir = tempfile::tempdir().unwrap();
        let mut desktop = ScreenCastDesktop { children: Vec::new(), dir, asked: Arc::default(), backend: None };
        let portals = desktop.dir.path().join("portals");
        std::fs::create_dir(&portals).unwrap();
        std::fs::write(
            portals.join("voipctest.portal"),
            format!(
                "[portal]\nDBusName={BACKEND}\nInterfaces=org.freedesktop.impl.portal.ScreenCast\nUseIn=voipctest\n"
            ),
        )
        .unwrap();
        let bus = desktop.dir.path().join("bus");
        desktop.spawn("dbus-daemon", &["--session", "--nofork", &format!("--address=unix:path={}", bus.display())]);
        wait_for(&bus);
        desktop.spawn("pipewire", &[]);
        wait_for(&desktop.dir.path().join("pipewire-0"));
        desktop.spawn("wireplumber", &[]);
        let caps = format!("video/x-raw,format=RGBx,width={},height={},framerate=30/1", SIZE.0, SIZE.1);
        let properties = "props,node.name=voipc-test-screen,media.class=Video/Source";
        let picture = ["-q", "videotestsrc", PATTERN, "is-live=true", "!", &caps, "!", "pipewiresink", "mode=provide"];
        desktop.spawn("gst-launch-1.0", &[&picture[..], &[&format!("stream-properties={properties}")]].concat());
        let node = desktop.node("voipc-test-screen");
        let cast = ScreenCast { node, asked: desktop.asked.clone() };
        let backend = zbus::blocking::connection::Builder::address(format!("unix:path={}", bus.display()).as_str())
            .unwrap()
            .name(BACKEND)
            .unwrap()
            .serve_at("/org/freedesktop/portal/desktop", cast)
            .unwrap()
            .build()
            .unwrap();
        desktop.spawn("/usr/libexec/xdg-desktop-portal", &[]);
        let dbus = zbus::blocking::fdo::DBusProxy::new(&backend).unwrap();
        let deadline = Instant::now() + TIMEOUT;
        while !dbus.name_has_owner("org.freedesktop.portal.Desktop".try_into().unwrap()).unwrap() {
            assert!(Instant::now() < deadline, "xdg-desktop-portal did not come up");
            std::thread::sleep(Duration::from_millis(50));
        }
        desktop.backend = Some(backend);
        desktop
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        let dir = self.dir.path().display().to_string();
        vec![
            ("PATH", std::env::var("PATH").unwrap_or_default()),
            ("HOME", dir.clone()),
            ("XDG_RUNTIME_DIR", dir.clone()),
            ("DBUS_SESSION_BUS_ADDRESS", format!("unix:path={dir}/bus")),
            ("XDG_CURRENT_DESKTOP", "voipctest".into()),
            ("XDG_DESKTOP_PORTAL_DIR", format!("{dir}/portals")),
        ]
    }

    /// What a client of this desktop has: a Wayland session and its bus.
    pub fn client_env(&self) -> Vec<(&'static str, String)> {
        let dir = self.dir.path().display().to_string();
        vec![
            ("XDG_SESSION_TYPE", "wayland".into()),
            ("WAYLAND_DISPLAY", "wayland-0".into()),
            ("XDG_RUNTIME_DIR", dir.clone()),
            ("DBUS_SESSION_BUS_ADDRESS", format!("unix:path={dir}/bus")),
        ]
    }

    fn spawn(&mut self, program: &str, args: &[&str]) {
        let log = std::fs::File::create(self.dir.path().join(format!("{}.log", log_name(program)))).unwrap();
        let child = Command::new(program)
            .env_clear()
            .envs(self.env())
            .args(args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("{program} runs (just setup installs it): {e}"));
        self.children.push(child);
    }

    /// The id of the PipeWire node named `name`, once it is there.
    fn node(&self, name: &str) -> u32 {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let out = Command::new("pw-dump").env_clear().envs(self.env()).output().expect("pw-dump runs");
            let objects: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
            let found = objects.iter().find(|o| o["info"]["props"]["node.name"] == name);
            if let Some(id) = found.and_then(|o| o["id"].as_u64()) {
                return id as u32;
            }
            assert!(Instant::now() < deadline, "no PipeWire node {name}: {}", self.logs());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// What the backend was asked, once the frontend has closed `closed` sessions (it
    /// does when their client has gone, a moment after).
    pub fn asked_after_closing(&self, closed: u32) -> Asked {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let asked = self.asked.lock().unwrap().clone();
            if asked.closed >= closed || Instant::now() > deadline {
                return asked;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The desktop's processes' logs, for a failing test to show.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for entry in std::fs::read_dir(self.dir.path()).unwrap().flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "log") {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                out += &format!("\n== {}\n{}", path.display(), tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
            }
        }
        out
    }
}

fn log_name(program: &str) -> &str {
    Path::new(program).file_name().and_then(|n| n.to_str()).unwrap_or(program)
}

fn wait_for(path: &Path) {
    let deadline = Instant::now() + TIMEOUT;
    while !path.exists() {
        assert!(Instant::now() < deadline, "{} did not appear", path.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Drop for ScreenCastDesktop {
    fn drop(&mut self) {
        self.backend = None;
        for child in self.children.iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
