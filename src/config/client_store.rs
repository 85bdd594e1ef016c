//! What a client keeps between runs, in its vault (`vault` in the data directory): the
//! pinned server certificates and the end-to-end encryption state (identity, pre-keys,
//! sessions, sender keys, pinned peer identities).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::crypto::vault::{KdfParams, Vault, VaultError};
use crate::protocol::Fingerprint;
use crate::session::history::History;

/// The vault's file name in a client data directory.
pub const VAULT_FILE: &str = "vault";

/// The contents' own version, first in the sealed bytes.
const CONTENTS_VERSION: u16 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Vault(#[from] VaultError),
    #[error("cannot create the data directory {path}: {source}")]
    DataDir { path: std::path::PathBuf, source: std::io::Error },
    #[error("the vault opened but its contents are not readable by this build: {0}")]
    Contents(String),
}

impl StoreError {
    /// The stable `code` of the JSON error event.
    pub fn code(&self) -> &'static str {
        match self {
            StoreError::Vault(VaultError::WrongPassword) => "vault_wrong_password",
            StoreError::Vault(_) | StoreError::Contents(_) => "vault_damaged",
            StoreError::DataDir { .. } => "data_dir",
        }
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Contents {
    version: u16,
    /// `host:port` → certificate fingerprint.
    pinned_servers: BTreeMap<String, [u8; 32]>,
    /// `E2ee::to_bytes`, once created.
    e2ee: Option<Zeroizing<Vec<u8>>>,
    history: History,
}

/// The client's persistent state, sealed in its vault; every change is saved at once.
pub struct ClientStore {
    vault: Vault,
    contents: Contents,
}

impl ClientStore {
    /// Opens the vault in `data_dir`, or creates it there (and the directory) on first use.
    pub fn open_or_create(data_dir: &Path, password: &[u8], params: KdfParams) -> Result<ClientStore, StoreError> {
        let path = data_dir.join(VAULT_FILE);
        match Vault::open(&path, password) {
            Ok((vault, bytes)) => {
                let contents: Contents =
                    postcard::from_bytes(&bytes).map_err(|e| StoreError::Contents(e.to_string()))?;
                if contents.version != CONTENTS_VERSION {
                    return Err(StoreError::Contents(format!("contents version {}", contents.version)));
                }
                Ok(ClientStore { vault, contents })
            }
            Err(VaultError::NotFound { .. }) => {
                std::fs::create_dir_all(data_dir)
                    .map_err(|source| StoreError::DataDir { path: data_dir.to_owned(), source })?;
                let contents = Contents { version: CONTENTS_VERSION, ..Contents::default() };
                let vault = Vault::create(&path, password, params, &encode(&contents))?;
                Ok(ClientStore { vault, contents })
            }
            Err(e) => Err(e.into()),
        }
    }

    pub fn pinned(&self, server: &str) -> Option<Fingerprint> {
        self.contents.pinned_servers.get(server).copied().map(Fingerprint)
    }

    /// Pins `server` to `fingerprint` and saves.
    pub fn pin(&mut self, server: &str, fingerprint: Fingerprint) -> Result<(), StoreError> {
        self.contents.pinned_servers.insert(server.to_owned(), fingerprint.0);
        self.save()
    }

    /// The saved end-to-end encryption state, if any.
    pub fn e2ee_state(&self) -> Option<&[u8]> {
        self.contents.e2ee.as_deref().map(Vec::as_slice)
    }

    pub fn history(&self) -> &History {
        &self.contents.history
    }

    /// Replaces the end-to-end encryption state and the history, and saves.
    pub fn save_chat(&mut self, e2ee: Zeroizing<Vec<u8>>, history: &History) -> Result<(), StoreError> {
        self.contents.e2ee = Some(e2ee);
        self.contents.history = history.clone();
        self.save()
    }

    fn save(&self) -> Result<(), StoreError> {
        self.vault.save(&encode(&self.contents))?;
        Ok(())
    }
}

fn encode(contents: &Contents) -> Zeroizing<Vec<u8>> {
    Zeroizing::new(postcard::to_allocvec(contents).expect("postcard encodes maps of strings and byte arrays"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAST: KdfParams = KdfParams { m_kib: 64, t: 1, p: 1 };

    #[test]
    fn pins_survive_reopening_and_need_the_password() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("client");
        let mut store = ClientStore::open_or_create(&data, b"pw", FAST).unwrap();
        assert_eq!(store.pinned("a:1"), None);
        store.pin("a:1", Fingerprint([1; 32])).unwrap();
        store.pin("[::1]:2", Fingerprint([2; 32])).unwrap();
        let store = ClientStore::open_or_create(&data, b"pw", FAST).unwrap();
        assert_eq!(store.pinned("a:1"), Some(Fingerprint([1; 32])));
        assert_eq!(store.pinned("[::1]:2"), Some(Fingerprint([2; 32])));
        let wrong = ClientStore::open_or_create(&data, b"not pw", FAST).err().unwrap();
        assert_eq!(wrong.code(), "vault_wrong_password");
        let mut store = ClientStore::open_or_create(&data, b"pw", FAST).unwrap();
        let mut history = History::default();
        let message = crate::session::history::StoredMessage { from: "bob".into(), text: "hi".into(), time_ms: 1 };
        history.record("a:1#Lobby", message.clone());
        store.save_chat(Zeroizing::new(vec![1, 2, 3]), &history).unwrap();
        let store = ClientStore::open_or_create(&data, b"pw", FAST).unwrap();
        assert_eq!(store.e2ee_state(), Some(&[1u8, 2, 3][..]));
        assert_eq!(store.history().conversation("a:1#Lobby").collect::<Vec<_>>(), [&message]);
        assert_eq!(store.pinned("a:1"), Some(Fingerprint([1; 32])), "a later save keeps the pins");
        let names: Vec<_> = std::fs::read_dir(&data).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, [VAULT_FILE], "one file per data directory, nothing in the clear beside it");
    }
}
