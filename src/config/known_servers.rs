//! The client's pinned server certificates: one `host:port fingerprint` line each.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::protocol::Fingerprint;

/// The file in a client's data directory.
pub const FILE_NAME: &str = "known_servers";

#[derive(Debug, thiserror::Error)]
pub enum KnownServersError {
    #[error("{path}: cannot read: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}:{line}: not `host:port fingerprint`")]
    Line { path: PathBuf, line: usize },
    #[error("{path}: cannot write: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

#[derive(Debug, Default)]
pub struct KnownServers {
    path: PathBuf,
    pins: BTreeMap<String, Fingerprint>,
}

impl KnownServers {
    /// Reads the pins in `data_dir`; none yet is an empty set.
    pub fn load(data_dir: &Path) -> Result<Self, KnownServersError> {
        let path = data_dir.join(FILE_NAME);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(source) => return Err(KnownServersError::Read { path, source }),
        };
        let mut pins = BTreeMap::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let bad = || KnownServersError::Line { path: path.clone(), line: i + 1 };
            let (server, fp) = line.split_once(' ').ok_or_else(bad)?;
            pins.insert(server.to_owned(), fp.trim().parse().map_err(|_| bad())?);
        }
        Ok(KnownServers { path, pins })
    }

    pub fn get(&self, server: &str) -> Option<Fingerprint> {
        self.pins.get(server).copied()
    }

    /// Pins `server` to `fingerprint` and saves the file atomically.
    pub fn pin(&mut self, server: &str, fingerprint: Fingerprint) -> Result<(), KnownServersError> {
        self.pins.insert(server.to_owned(), fingerprint);
        let text: String = self.pins.iter().map(|(s, fp)| format!("{s} {fp}\n")).collect();
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|source| KnownServersError::Write { path: self.path.clone(), source })?;
        }
        super::files::write_private_atomic(&self.path, text.as_bytes())
            .map_err(|source| KnownServersError::Write { path: self.path.clone(), source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_survive_a_reload_and_bad_lines_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let mut known = KnownServers::load(dir.path()).unwrap();
        assert_eq!(known.get("a:1"), None);
        known.pin("a:1", Fingerprint([1; 32])).unwrap();
        known.pin("[::1]:2", Fingerprint([2; 32])).unwrap();
        let known = KnownServers::load(dir.path()).unwrap();
        assert_eq!(known.get("a:1"), Some(Fingerprint([1; 32])));
        assert_eq!(known.get("[::1]:2"), Some(Fingerprint([2; 32])));

        std::fs::write(dir.path().join(FILE_NAME), "a:1 nothex\n").unwrap();
        let err = KnownServers::load(dir.path()).unwrap_err().to_string();
        assert!(err.ends_with("known_servers:1: not `host:port fingerprint`"), "{err}");
    }
}
