//! The desktop client's settings: not secret, so a plain TOML file in the config
//! directory, replaced atomically.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::audio::cues::CueSettings;
use crate::audio::dsp::VoiceMode;
use crate::config::files::write_private_atomic;
use crate::protocol::ServerLink;

/// Servers remembered as recent, newest first.
pub const MAX_RECENT: usize = 8;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    /// The display name chosen at first start.
    pub name: String,
    pub dark: bool,
    /// UI scale (1.0 = the platform's).
    pub scale: f32,
    /// Sound devices by name; `None` is the system default.
    pub input_device: Option<String>,
    pub output_device: Option<String>,
    pub voice_mode: VoiceMode,
    /// The voice-activity threshold in dBFS.
    pub vad_threshold: f32,
    pub denoise: bool,
    /// Echo cancellation (what the speaker plays, taken out of the microphone).
    pub echo_cancel: bool,
    /// Sounds when someone joins or leaves our channel and when a direct message comes.
    pub cues: CueSettings,
    /// A desktop notification for a direct message while the window is not focused.
    pub notify_direct_messages: bool,
    /// Whether that notification shows the message's text (the notification server may
    /// keep it, outside the vault), or only who wrote.
    pub notification_text: bool,
    /// The push-to-talk key, by name ("Space", "F13", "A").
    pub push_to_talk_key: String,
    /// Whether the push-to-talk key works in every window (X11, Windows, macOS): it is then
    /// grabbed system-wide, so choose a key you do not type with.
    pub global_push_to_talk: bool,
    /// Servers the user saved, and the recent ones: `host:port` only. A link's fingerprint
    /// never pins from here (the vault holds the pins) and its invite token is a secret.
    pub saved_servers: Vec<String>,
    pub recent_servers: Vec<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            name: String::new(),
            dark: true,
            scale: 1.0,
            input_device: None,
            output_device: None,
            voice_mode: VoiceMode::VoiceActivity,
            vad_threshold: -50.0,
            denoise: true,
            echo_cancel: true,
            cues: CueSettings::ALL,
            notify_direct_messages: true,
            notification_text: false,
            push_to_talk_key: "Space".into(),
            global_push_to_talk: false,
            saved_servers: Vec::new(),
            recent_servers: Vec::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} is not valid settings: {source}")]
    Parse { path: PathBuf, source: toml::de::Error },
    #[error("cannot save {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

impl Settings {
    /// The settings in `path`, or the defaults when there is no file yet.
    pub fn load(path: &Path) -> Result<Settings, SettingsError> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let mut settings: Settings =
                    toml::from_str(&text).map_err(|source| SettingsError::Parse { path: path.to_owned(), source })?;
                // Older files kept whole invite links: keep only where they point.
                for list in [&mut settings.saved_servers, &mut settings.recent_servers] {
                    let mut seen = std::collections::BTreeSet::new();
                    *list = list.iter().map(|s| remembered(s)).filter(|s| seen.insert(s.clone())).collect();
                }
                Ok(settings)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Settings::default()),
            Err(source) => Err(SettingsError::Read { path: path.to_owned(), source }),
        }
    }

    pub fn save(&self, path: &Path) -> Result<(), SettingsError> {
        let write = |source| SettingsError::Write { path: path.to_owned(), source };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(write)?;
        }
        let text = toml::to_string_pretty(self).expect("settings are plain values");
        write_private_atomic(path, text.as_bytes()).map_err(write)
    }

    /// Remembers `target` (an address or an invite link) as the most recent server.
    pub fn used(&mut self, target: &str) {
        let server = remembered(target);
        self.recent_servers.retain(|s| *s != server);
        self.recent_servers.insert(0, server);
        self.recent_servers.truncate(MAX_RECENT);
    }

    /// Saves `target` (an address or an invite link) among the saved servers.
    pub fn save_server(&mut self, target: &str) {
        let server = remembered(target);
        if !self.saved_servers.contains(&server) {
            self.saved_servers.push(server);
        }
    }
}

/// What is remembered of a server the user connected to: its `host:port`, without the
/// link's fingerprint, channel or invite token.
fn remembered(target: &str) -> String {
    target.parse::<ServerLink>().map_or_else(|_| target.to_owned(), |link| link.authority())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_round_trip_and_recent_servers_stay_short() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("voipc/settings.toml");
        assert_eq!(Settings::load(&path).unwrap(), Settings::default());
        let mut settings = Settings { name: "alice".into(), dark: false, scale: 1.25, ..Settings::default() };
        for i in 0..12 {
            settings.used(&format!("host{i}:9987"));
        }
        settings.used("host3:9987");
        assert_eq!(settings.recent_servers.len(), MAX_RECENT);
        assert_eq!(settings.recent_servers[0], "host3:9987");
        settings.save(&path).unwrap();
        assert_eq!(Settings::load(&path).unwrap(), settings);
        // An invite link is remembered as its address: no fingerprint, no token.
        let fp = "ab".repeat(32);
        settings.used(&format!("voipc://host3:9987/?fp={fp}&channel=Den&invite=secret"));
        settings.save_server(&format!("voipc://saved.example:1/?fp={fp}&invite=secret"));
        assert_eq!(settings.recent_servers[0], "host3:9987");
        assert_eq!(settings.recent_servers.len(), MAX_RECENT, "the same server once");
        assert_eq!(settings.saved_servers, ["saved.example:1"]);
        settings.save(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains("secret") && !text.contains(&fp), "{text}");
        // A file an older version wrote with whole links is cleaned when read.
        std::fs::write(&path, format!("recent_servers = [\"voipc://a:1/?fp={fp}&invite=secret\", \"a:1\"]")).unwrap();
        assert_eq!(Settings::load(&path).unwrap().recent_servers, ["a:1"]);
        std::fs::write(&path, "scale = \"big\"").unwrap();
        assert!(matches!(Settings::load(&path), Err(SettingsError::Parse { .. })));
    }
}
