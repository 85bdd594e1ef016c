//! The desktop client: an eframe window over the same client core as `voipc join`.
//!
//! The app drains the client's events at the start of a frame into a plain [`Model`],
//! draws the [`views`] from it, and turns clicks into [`UiCommand`]s that it carries out
//! without blocking: the vault's key derivation runs on the blocking pool, the client
//! on the tokio runtime (its events arrive over a channel with a repaint request), so
//! the window only repaints when something happened.

pub mod icons;
pub mod model;
pub mod notify;
pub mod settings;
pub mod views;

#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use zeroize::Zeroizing;

use crate::audio::check::{self, CheckControl, CheckEvent};
use crate::audio::device;
use crate::audio::pipeline::CaptureSettings;
use crate::config::client_store::{ClientStore, StoreError, VAULT_FILE};
use crate::crypto::vault::{KdfParams, VaultError};
use crate::e2ee::E2ee;
use crate::net::client::{ClientError, JoinOptions, VoiceOptions, run_client};
use crate::net::screen::{PictureSink, ScreenOptions};
use crate::protocol::{ServerLink, SessionId};
use crate::session::{Command, Event};
use crate::video::picture::Rgba;
use model::{Conversation, Model, Screen, ShareDraft};
use settings::Settings;

/// What the views ask for.
#[derive(Debug, Clone, PartialEq)]
pub enum UiCommand {
    CreateIdentity {
        name: String,
        password: Zeroizing<String>,
    },
    Unlock {
        password: Zeroizing<String>,
    },
    Connect {
        target: String,
    },
    /// Trust the certificate an unknown server showed, and connect.
    Trust {
        target: String,
        fingerprint: String,
    },
    /// Replace the pinned certificate of the server behind `target` with `fingerprint`
    /// (the one it presents now), after the user typed its beginning on the stop screen.
    ReplacePin {
        target: String,
        fingerprint: String,
    },
    SaveServer(String),
    /// Run a relay in this process on `port` and connect to it; the invite link to share
    /// names `public` (this computer's address for the others) when given.
    Host {
        port: u16,
        public: Option<String>,
    },
    Disconnect,
    Send {
        to: Conversation,
        text: String,
    },
    ToggleMute,
    ToggleDeafen,
    /// Find what can be shared and open the share dialog.
    OpenShareDialog,
    /// Open (and start) or close the audio setup and its microphone test.
    AudioCheck(bool),
    /// Record a few seconds in the microphone test and play them back.
    RecordCheck,
    SaveSettings(Box<Settings>),
    /// Anything the client core takes as it is.
    Client(Command),
}

/// Which certificate a connection accepts.
enum Pin {
    /// The one pinned in the vault (or the link's, for a server not pinned yet).
    Stored,
    /// An unknown server's, which the user checked.
    Trust(String),
    /// This one, in place of the pinned one: the user confirmed the change.
    Replace(String),
}

/// What the background work reports to the app.
enum Update {
    /// The vault opened, or why not (for the user).
    Unlocked(Result<ClientStore, String>),
    Event(Event),
    /// The client ended: why, and for which target.
    Ended {
        target: String,
        result: Result<(), ClientError>,
    },
    /// The hosted relay: the link to connect over loopback, the link to share, its task.
    Hosting(Result<(String, String, tokio::task::JoinHandle<()>), String>),
    /// The global push-to-talk key went down or up.
    GlobalPushToTalk(bool),
    /// What a microphone test shows, or why it stopped; from the test started as the
    /// number given (a restarted test's old one may still be winding down).
    Check(u64, Result<CheckEvent, String>),
}

/// Where the app keeps its files.
pub struct Paths {
    pub data_dir: PathBuf,
    pub settings_file: PathBuf,
}

impl Paths {
    pub fn default_paths() -> anyhow::Result<Paths> {
        let dirs = directories::ProjectDirs::from("", "", "voipc")
            .ok_or_else(|| anyhow::anyhow!("no home directory to keep client data in"))?;
        Ok(Paths { data_dir: dirs.data_dir().to_owned(), settings_file: dirs.config_dir().join("settings.toml") })
    }
}

pub struct App {
    model: Model,
    runtime: tokio::runtime::Handle,
    paths: Paths,
    commands: (Sender<UiCommand>, Receiver<UiCommand>),
    updates: (Sender<Update>, Receiver<Update>),
    ctx: egui::Context,
    password: Option<Zeroizing<String>>,
    /// The running client's command channel.
    client: Option<tokio::sync::mpsc::Sender<Command>>,
    /// The target to reconnect to after a lost connection, the attempts so far, and when
    /// the next is due (in egui's clock, seconds).
    reconnect: Option<(String, u32, f64)>,
    hosted: Option<tokio::task::JoinHandle<()>>,
    /// The microphone test's controls, while it runs.
    check: Option<tokio::sync::mpsc::Sender<CheckControl>>,
    /// How many microphone tests were started: the number of the one running.
    checks_started: u64,
    /// The system-wide push-to-talk key, while one is registered.
    global_key: Option<(global_hotkey::GlobalHotKeyManager, global_hotkey::hotkey::HotKey)>,
    /// With `VOIPC_FRAME_STATS` set: frames drawn and the time spent drawing them, logged
    /// every 100 frames.
    frame_stats: Option<(u32, Duration)>,
    /// The newest decoded picture of the share watched, left here by the decoding thread.
    picture: Arc<Mutex<Option<(SessionId, Rgba)>>>,
    /// The texture it is shown from.
    texture: Option<egui::TextureHandle>,
    notifier: notify::Notifier,
    /// An identity is being made: the audio setup follows.
    first_run: bool,
}

impl App {
    /// The app; `link`, a `voipc://` link it was opened with, fills the connect screen in
    /// (nothing connects before the user says so).
    pub fn new(ctx: egui::Context, runtime: tokio::runtime::Handle, paths: Paths, link: Option<String>) -> App {
        // A settings file that does not parse is reported, and the defaults used.
        let (settings, error) = match Settings::load(&paths.settings_file) {
            Ok(settings) => (settings, None),
            Err(e) => (Settings::default(), Some(e.to_string())),
        };
        let screen = if paths.data_dir.join(VAULT_FILE).exists() { Screen::Unlock } else { Screen::Setup };
        let mut model = Model { screen, settings, error, devices: device::list(&device::host()), ..Model::default() };
        if let Some(link) = link {
            model.drafts.address = link;
            model.drafts.from_link = true;
        }
        let mut app = App {
            model,
            runtime,
            paths,
            commands: mpsc::channel(),
            updates: mpsc::channel(),
            ctx,
            password: None,
            client: None,
            reconnect: None,
            hosted: None,
            check: None,
            checks_started: 0,
            global_key: None,
            frame_stats: std::env::var_os("VOIPC_FRAME_STATS").map(|_| (0, Duration::ZERO)),
            picture: Arc::default(),
            texture: None,
            notifier: notify::Notifier::default(),
            first_run: false,
        };
        icons::install(&app.ctx);
        app.apply_look();
        let (updates, ctx) = (app.updates.0.clone(), app.ctx.clone());
        // The key's events come from global-hotkey's own thread; one handler per process.
        global_hotkey::GlobalHotKeyEvent::set_event_handler(Some(move |event: global_hotkey::GlobalHotKeyEvent| {
            let held = event.state == global_hotkey::HotKeyState::Pressed;
            if updates.send(Update::GlobalPushToTalk(held)).is_ok() {
                ctx.request_repaint();
            }
        }));
        app.sync_global_key();
        app
    }

    /// Registers the push-to-talk key system-wide when the settings ask for it, and
    /// releases it when they no longer do.
    fn sync_global_key(&mut self) {
        let settings = &self.model.settings;
        let wanted = (settings.global_push_to_talk && settings.voice_mode == crate::audio::dsp::VoiceMode::PushToTalk)
            .then(|| settings.push_to_talk_key.parse::<global_hotkey::hotkey::HotKey>());
        if let Some((manager, key)) = self.global_key.take() {
            let _ = manager.unregister(key);
        }
        match wanted {
            None => {}
            Some(Err(e)) => self.model.error = Some(format!("push-to-talk key: {e}")),
            Some(Ok(key)) => {
                match global_hotkey::GlobalHotKeyManager::new().and_then(|m| m.register(key).map(|()| m)) {
                    Ok(manager) => self.global_key = Some((manager, key)),
                    Err(e) => self.model.error = Some(format!("cannot take the push-to-talk key system-wide: {e}")),
                }
            }
        }
    }

    fn apply_look(&self) {
        let settings = &self.model.settings;
        self.ctx.set_theme(if settings.dark { egui::Theme::Dark } else { egui::Theme::Light });
        self.ctx.set_zoom_factor(settings.scale.clamp(0.5, 3.0));
    }

    /// Runs `work` on the blocking pool; its result comes back as an update.
    fn background(&self, work: impl FnOnce() -> Update + Send + 'static) {
        let (updates, ctx) = (self.updates.0.clone(), self.ctx.clone());
        self.runtime.spawn_blocking(move || {
            let _ = updates.send(work());
            ctx.request_repaint();
        });
    }

    fn handle(&mut self, command: UiCommand) {
        match command {
            UiCommand::CreateIdentity { name, password } => {
                self.first_run = true;
                self.model.settings.name = name;
                self.save_settings();
                self.unlock(password, true);
            }
            UiCommand::Unlock { password } => self.unlock(password, false),
            UiCommand::Connect { target } => self.connect(target, Pin::Stored),
            UiCommand::Trust { target, fingerprint } => self.connect(target, Pin::Trust(fingerprint)),
            UiCommand::ReplacePin { target, fingerprint } => self.connect(target, Pin::Replace(fingerprint)),
            UiCommand::SaveServer(server) => {
                self.model.settings.save_server(&server);
                self.save_settings();
            }
            UiCommand::Host { port, public } => self.host(port, public),
            UiCommand::Disconnect => {
                self.reconnect = None;
                self.stop_client();
                self.model.screen = Screen::Connect;
            }
            UiCommand::Send { to, text } => {
                let now = crate::e2ee::unix_millis(std::time::SystemTime::now());
                let command = match &to {
                    Conversation::Channel(channel) => Command::SayIn { channel: channel.clone(), text: text.clone() },
                    Conversation::Direct(peer) => Command::Msg { to: peer.clone(), text: text.clone() },
                };
                self.model.sent(to, text, now);
                self.send_to_client(command);
            }
            UiCommand::ToggleMute => {
                self.model.muted = !self.model.muted;
                self.send_to_client(Command::Mute(self.model.muted));
            }
            UiCommand::ToggleDeafen => {
                self.model.deafened = !self.model.deafened;
                self.send_to_client(Command::Deafen(self.model.deafened));
            }
            UiCommand::OpenShareDialog => match crate::video::capture::sources() {
                Ok(sources) => self.model.drafts.share = Some(ShareDraft::new(sources)),
                Err(e) => self.model.error = Some(format!("cannot share a screen: {e}")),
            },
            UiCommand::AudioCheck(true) => self.start_check(),
            UiCommand::AudioCheck(false) => {
                self.check = None;
                self.model.audio_check = None;
            }
            UiCommand::RecordCheck => {
                if let Some(check) = &self.check {
                    let _ = check.try_send(CheckControl::Record);
                }
            }
            UiCommand::SaveSettings(settings) => {
                let voice = |s: &Settings| (s.voice_mode, s.vad_threshold, s.denoise, s.echo_cancel);
                let voice_changed = voice(&settings) != voice(&self.model.settings);
                let key_changed = (&settings.push_to_talk_key, settings.global_push_to_talk, settings.voice_mode)
                    != (
                        &self.model.settings.push_to_talk_key,
                        self.model.settings.global_push_to_talk,
                        self.model.settings.voice_mode,
                    );
                let cues_changed = settings.cues != self.model.settings.cues;
                let devices = |s: &Settings| (s.input_device.clone(), s.output_device.clone());
                let devices_changed = devices(&settings) != devices(&self.model.settings);
                self.model.settings = *settings;
                self.save_settings();
                if cues_changed {
                    self.send_to_client(Command::Cues(self.model.settings.cues));
                }
                if devices_changed && self.check.is_some() {
                    self.start_check();
                } else if voice_changed && let Some(check) = &self.check {
                    let _ = check.try_send(CheckControl::Settings(self.capture_settings()));
                }
                self.apply_look();
                if key_changed {
                    self.sync_global_key();
                }
                if voice_changed {
                    let s = &self.model.settings;
                    let command = Command::VoiceSettings {
                        mode: s.voice_mode,
                        threshold_dbfs: s.vad_threshold.round() as i16,
                        denoise: s.denoise,
                        echo_cancel: s.echo_cancel,
                    };
                    self.send_to_client(command);
                }
            }
            UiCommand::Client(command) => self.send_to_client(command),
        }
    }

    fn save_settings(&mut self) {
        if let Err(e) = self.model.settings.save(&self.paths.settings_file) {
            self.model.error = Some(e.to_string());
        }
    }

    /// Opens (or creates) the vault off the UI thread: Argon2 takes a quarter second.
    fn unlock(&mut self, password: Zeroizing<String>, create_identity: bool) {
        self.password = Some(password.clone());
        let data_dir = self.paths.data_dir.clone();
        self.background(move || {
            let explain = |e: StoreError| match e {
                StoreError::Vault(VaultError::WrongPassword) => {
                    "Wrong password. Nothing was changed; try again.".into()
                }
                other => other.to_string(),
            };
            let opened =
                ClientStore::open_or_create(&data_dir, password.as_bytes(), KdfParams::RECOMMENDED).map_err(explain);
            Update::Unlocked(opened.and_then(|mut store| {
                if create_identity && store.e2ee_state().is_none() {
                    // The identity key pair is made now, not at the first connection.
                    let e2ee =
                        E2ee::generate(&mut rand::rng(), std::time::SystemTime::now()).map_err(|e| e.to_string())?;
                    let (history, grant) = (store.history().clone(), store.screen_grant().map(str::to_owned));
                    let format = crate::e2ee::STATE_FORMAT;
                    store.save_session(e2ee.to_bytes(), format, &history, grant.as_deref()).map_err(explain)?;
                }
                Ok(store)
            }))
        });
    }

    fn connect(&mut self, target: String, pin: Pin) {
        self.stop_client();
        let mut link: ServerLink = match target.parse() {
            Ok(link) => link,
            Err(e) => {
                self.model.error = Some(format!("{target}: {e}"));
                return;
            }
        };
        let mut replace_pin = None;
        if let Pin::Trust(fp) | Pin::Replace(fp) = &pin {
            match fp.parse() {
                Ok(fp) if matches!(pin, Pin::Replace(_)) => replace_pin = Some(fp),
                Ok(fp) => link.fingerprint = Some(fp),
                Err(e) => {
                    self.model.error = Some(format!("fingerprint: {e}"));
                    return;
                }
            }
        }
        let Some(password) = self.password.clone() else { return };
        let settings = &self.model.settings;
        let join = link.channel.clone().map(|channel| crate::protocol::JoinRequest {
            channel,
            password: None,
            invite: link.invite.clone(),
        });
        let options = JoinOptions {
            replace_pin,
            bind: None,
            name: settings.name.clone(),
            join,
            trust_on_first_use: false,
            data_dir: self.paths.data_dir.clone(),
            vault_password: password,
            say: None,
            voice: VoiceOptions {
                play: None,
                input_device: Some(settings.input_device.clone()),
                output_device: Some(settings.output_device.clone()),
                record: None,
                capture: self.capture_settings(),
                // What the voice bar shows is what the new connection does.
                muted: self.model.muted,
                deafened: self.model.deafened,
                cues: settings.cues,
            },
            screen: ScreenOptions { show: Some(self.picture_sink()), ..ScreenOptions::default() },
            duration: None,
            health: true,
            json: false,
            link: link.clone(),
        };
        self.model.settings.used(&target);
        self.save_settings();
        self.model.server = link.authority();
        self.model.screen = Screen::Connecting { server: link.authority() };
        self.model.error = None;
        let (commands, receiver) = tokio::sync::mpsc::channel(256);
        self.client = Some(commands);
        // Who the user turned down or muted stays so on the new connection.
        let volumes: Vec<Command> = (self.model.volumes.iter())
            .map(|(user, percent)| Command::Volume { user: user.clone(), percent: *percent })
            .chain(self.model.locally_muted.iter().map(|user| Command::LocalMute { user: user.clone(), muted: true }))
            .collect();
        for command in volumes {
            self.send_to_client(command);
        }
        let (updates, ctx) = (self.updates.0.clone(), self.ctx.clone());
        self.runtime.spawn(async move {
            let (events, events_ctx) = (updates.clone(), ctx.clone());
            let mut emit = move |event: &Event| {
                let _ = events.send(Update::Event(event.clone()));
                events_ctx.request_repaint();
            };
            let result = run_client(options, receiver, &mut emit).await;
            let _ = updates.send(Update::Ended { target, result });
            ctx.request_repaint();
        });
    }

    /// How the microphone is to be heard, from the settings.
    fn capture_settings(&self) -> CaptureSettings {
        let settings = &self.model.settings;
        CaptureSettings {
            mode: settings.voice_mode,
            threshold_dbfs: settings.vad_threshold,
            denoise: settings.denoise,
            echo_cancel: settings.echo_cancel,
            ..CaptureSettings::default()
        }
    }

    /// Starts the microphone test on the chosen devices (again, when they changed): it
    /// needs no server. The test ends when its controls' sender is dropped.
    fn start_check(&mut self) {
        let (controls, receiver) = tokio::sync::mpsc::channel(16);
        self.check = Some(controls);
        self.checks_started += 1;
        let number = self.checks_started;
        self.model.audio_check = Some(model::AudioCheck::default());
        let settings = &self.model.settings;
        let (input, output) = (settings.input_device.clone(), settings.output_device.clone());
        let capture = self.capture_settings();
        let (updates, ctx) = (self.updates.0.clone(), self.ctx.clone());
        self.runtime.spawn(async move {
            let emit = |event| {
                let _ = updates.send(Update::Check(number, Ok(event)));
                ctx.request_repaint();
            };
            if let Err(e) = check::run(input, output, capture, receiver, emit).await {
                let _ = updates.send(Update::Check(number, Err(e.to_string())));
                ctx.request_repaint();
            }
        });
    }

    /// Where the decoding thread leaves each picture: only the newest waits, and the
    /// window repaints to show it.
    fn picture_sink(&self) -> PictureSink {
        let (slot, ctx) = (self.picture.clone(), self.ctx.clone());
        PictureSink(Arc::new(move |sender, picture| {
            *slot.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some((sender, picture));
            ctx.request_repaint();
        }))
    }

    /// Puts the newest picture of the share watched on its texture.
    fn show_picture(&mut self) {
        let newest = self.picture.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        let Some(watching) = &mut self.model.watching else {
            self.texture = None;
            return;
        };
        let Some((_, picture)) = newest.filter(|(sender, _)| sender.0 == watching.session) else { return };
        let size = [picture.width as usize, picture.height as usize];
        let image = egui::ColorImage::from_rgba_unmultiplied(size, &picture.data);
        let texture = match &mut self.texture {
            Some(texture) => {
                texture.set(image, egui::TextureOptions::LINEAR);
                texture
            }
            None => self.texture.insert(self.ctx.load_texture("watched screen", image, egui::TextureOptions::LINEAR)),
        };
        watching.picture = Some((texture.id(), size));
    }

    fn send_to_client(&mut self, command: Command) {
        if let Some(client) = &self.client
            && client.try_send(command).is_err()
        {
            self.model.error = Some("the connection is busy; try again".into());
        }
    }

    fn stop_client(&mut self) {
        if let Some(client) = self.client.take() {
            let _ = client.try_send(Command::Quit);
        }
    }

    /// Starts a relay in this process and connects to it once it listens.
    fn host(&mut self, port: u16, public: Option<String>) {
        let dir = self.paths.data_dir.join("hosted-server");
        let runtime = self.runtime.clone();
        self.background(move || {
            let _guard = runtime.enter();
            let hosted = std::fs::create_dir_all(&dir)
                .map_err(anyhow::Error::from)
                .and_then(|()| crate::net::server::Server::host_here(port, &dir));
            let hosted = hosted.map(|(invite, task)| {
                // We connect over loopback; the others need the address they can reach.
                let share = public.map_or_else(|| invite.clone(), |host| invite.replacen("127.0.0.1", &host, 1));
                (invite, share, task)
            });
            Update::Hosting(hosted.map_err(|e| format!("cannot host on port {port}: {e:#}")))
        });
    }

    fn drain_updates(&mut self) {
        while let Ok(update) = self.updates.1.try_recv() {
            match update {
                Update::Unlocked(Ok(store)) => {
                    self.model.history = store.history().clone();
                    self.model.error = None;
                    self.model.screen = Screen::Connect;
                    // First start: set the sound up before the first server.
                    if std::mem::take(&mut self.first_run) {
                        self.start_check();
                    }
                }
                Update::Unlocked(Err(message)) => {
                    self.password = None;
                    self.model.error = Some(message);
                }
                Update::Event(event) => {
                    if let Event::Message { from, text, dm: true, .. } = &event {
                        self.notify_direct_message(from, text);
                    }
                    self.model.apply(&event);
                    if matches!(event, Event::Connected { .. }) {
                        self.reconnect = None;
                    }
                }
                Update::Ended { target, result } => self.ended(target, result),
                Update::Hosting(Ok((invite, share, task))) => {
                    self.hosted = Some(task);
                    self.model.hosting = Some(share);
                    self.connect(invite, Pin::Stored);
                }
                Update::Hosting(Err(e)) => self.model.error = Some(e),
                Update::Check(number, event) => {
                    if let Some(check) = self.model.audio_check.as_mut().filter(|_| number == self.checks_started) {
                        match event {
                            Ok(event) => check.apply(event),
                            Err(e) => check.notice = Some(format!("the test stopped: {e}")),
                        }
                    }
                }
                Update::GlobalPushToTalk(held) => {
                    tracing::info!(held, "push-to-talk key (system-wide)");
                    self.send_to_client(Command::Talk(held));
                }
            }
        }
    }

    /// A desktop notification for a direct message, when the window is not focused and
    /// the settings want one ([`notify`] says what it shows and how often).
    fn notify_direct_message(&mut self, from: &str, text: &str) {
        let settings = &self.model.settings;
        let unfocused = self.ctx.input(|i| i.viewport().focused) == Some(false);
        if !settings.notify_direct_messages || !unfocused {
            return;
        }
        let now = self.ctx.input(|i| i.time);
        if let Some(notice) = self.notifier.message(from, text, settings.notification_text, now) {
            self.runtime.spawn_blocking(move || notify::show(&notice));
        }
    }

    /// The client stopped: show why, and reconnect with backoff when the line dropped.
    fn ended(&mut self, target: String, result: Result<(), ClientError>) {
        if self.client.as_ref().is_some_and(|c| !c.is_closed()) {
            return; // an older client's end, after a newer one started
        }
        self.client = None;
        match result {
            Ok(()) => {}
            Err(ClientError::UnknownCertificate { server, seen }) => {
                self.model.screen = Screen::Trust { target, server, fingerprint: seen.to_string() };
            }
            Err(ClientError::CertificateChanged { server, expected, actual }) => {
                self.model.screen = Screen::CertificateChanged {
                    target,
                    server,
                    expected: expected.to_string(),
                    actual: actual.to_string(),
                };
            }
            Err(e @ (ClientError::Lost(_) | ClientError::Connect { .. }))
                if self.model.me.is_some() || self.reconnect.is_some() =>
            {
                let attempt = self.reconnect.as_ref().map_or(0, |r| r.1) + 1;
                let wait = Duration::from_secs((1u64 << attempt.min(5)).min(30));
                let now = self.ctx.input(|i| i.time);
                self.reconnect = Some((target, attempt, now + wait.as_secs_f64()));
                self.model.screen = Screen::Reconnecting {
                    server: self.model.server.clone(),
                    in_secs: wait.as_secs(),
                    reason: e.to_string(),
                };
            }
            Err(e) => {
                self.model.error = Some(e.to_string());
                self.model.screen = Screen::Connect;
            }
        }
        self.model.me = None;
    }

    fn tick_reconnect(&mut self) {
        let Some((target, attempt, due)) = self.reconnect.clone() else { return };
        let now = self.ctx.input(|i| i.time);
        if now >= due {
            self.connect(target.clone(), Pin::Stored);
            // Due again only when this attempt fails (see `ended`).
            self.reconnect = Some((target, attempt, f64::INFINITY));
        } else if let Screen::Reconnecting { in_secs, .. } = &mut self.model.screen {
            *in_secs = (due - now).ceil() as u64;
            self.ctx.request_repaint_after(Duration::from_millis(500));
        }
    }

    /// Keyboard shortcuts: Ctrl+M mutes, Ctrl+D deafens; the push-to-talk key talks.
    fn shortcuts(&mut self, ctx: &egui::Context) {
        if self.model.screen != Screen::Main {
            return;
        }
        let (mute, deafen) = ctx.input(|i| {
            (i.modifiers.command && i.key_pressed(egui::Key::M), i.modifiers.command && i.key_pressed(egui::Key::D))
        });
        if mute {
            self.handle(UiCommand::ToggleMute);
        }
        if deafen {
            self.handle(UiCommand::ToggleDeafen);
        }
        // The system-wide key, when registered, reports itself; this is the in-window one.
        if self.model.settings.voice_mode == crate::audio::dsp::VoiceMode::PushToTalk
            && self.global_key.is_none()
            && let Some(key) = egui::Key::from_name(&self.model.settings.push_to_talk_key)
        {
            let typing = ctx.memory(|m| m.focused().is_some());
            let (pressed, released) = ctx.input(|i| (i.key_pressed(key), i.key_released(key)));
            if pressed && !typing {
                self.send_to_client(Command::Talk(true));
            }
            if released {
                self.send_to_client(Command::Talk(false));
            }
        }
    }
}

impl eframe::App for App {
    fn logic(&mut self, ctx: &egui::Context, _frame: &mut eframe::Frame) {
        self.drain_updates();
        self.show_picture();
        self.tick_reconnect();
        self.shortcuts(ctx);
    }

    #[allow(clippy::disallowed_methods, reason = "the frame statistics time the drawing")]
    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        let started = std::time::Instant::now();
        views::window(ui, &mut self.model, &self.commands.0);
        while let Ok(command) = self.commands.1.try_recv() {
            self.handle(command);
        }
        if let Some((frames, spent)) = &mut self.frame_stats {
            *frames += 1;
            *spent += started.elapsed();
            if *frames == 100 {
                tracing::warn!(mean_ms = spent.as_secs_f64() * 10.0, "100 frames drawn");
                (*frames, *spent) = (0, Duration::ZERO);
            }
        }
    }

    fn on_exit(&mut self, _gl: Option<&eframe::glow::Context>) {
        self.stop_client();
        if let Some(task) = self.hosted.take() {
            task.abort();
        }
    }
}

/// Opens the window; returns when it is closed.
pub fn run(runtime: tokio::runtime::Handle, link: Option<String>) -> anyhow::Result<()> {
    let paths = Paths::default_paths()?;
    let options = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default()
            .with_title("VoIPC")
            .with_app_id("voipc")
            .with_icon(Arc::new(icons::app_icon()))
            .with_inner_size([1000.0, 680.0]),
        renderer: eframe::Renderer::Glow,
        ..eframe::NativeOptions::default()
    };
    eframe::run_native(
        "VoIPC",
        options,
        Box::new(move |cc| Ok(Box::new(App::new(cc.egui_ctx.clone(), runtime, paths, link)))),
    )
    .map_err(|e| anyhow::anyhow!("cannot open the window: {e}"))
}
