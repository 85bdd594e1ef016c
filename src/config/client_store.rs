//! What a client keeps between runs, in its vault (`vault` in the data directory): the
//! pinned server certificates, the end-to-end encryption state (identity, pre-keys,
//! sessions, sender keys, pinned peer identities), and the screen cast portal's grant (a
//! standing permission to record the screen: not for a plaintext file).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::crypto::SecretBytes;
use crate::crypto::vault::{KdfParams, Vault, VaultError};
use crate::protocol::Fingerprint;
use crate::session::history::History;

/// The vault's file name in a client data directory.
pub const VAULT_FILE: &str = "vault";
/// An empty file whose lock says a process has the data directory open.
pub const LOCK_FILE: &str = "lock";
/// Opening waits for another holder of the directory to let go (this process ending one
/// connection as it starts the next) this many times [`LOCK_RETRY`], about 3 s; another
/// process is refused after that.
const LOCK_TRIES: u32 = 60;
const LOCK_RETRY: std::time::Duration = std::time::Duration::from_millis(50);

/// The contents' own version, first in the sealed bytes; the first version is still read.
const CONTENTS_VERSION: u16 = 3;
const SECOND_CONTENTS_VERSION: u16 = 2;
const OLDEST_CONTENTS_VERSION: u16 = 1;
/// The end-to-end state's format that the first version held (`e2ee::STATE_FORMAT` then).
const FIRST_STATE_FORMAT: u16 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Vault(#[from] VaultError),
    #[error("cannot create the data directory {path}: {source}")]
    DataDir { path: std::path::PathBuf, source: std::io::Error },
    #[error("the vault opened but its contents are not readable by this build: {0}")]
    Contents(String),
    #[error("{path} is in use by another VoIPC; quit it first, or pass another --data-dir")]
    InUse { path: std::path::PathBuf },
}

impl StoreError {
    /// The stable `code` of the JSON error event.
    pub fn code(&self) -> &'static str {
        match self {
            StoreError::Vault(VaultError::WrongPassword) => "vault_wrong_password",
            StoreError::Vault(_) | StoreError::Contents(_) => "vault_damaged",
            StoreError::DataDir { .. } => "data_dir",
            StoreError::InUse { .. } => "data_dir_in_use",
        }
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Contents {
    version: u16,
    /// `host:port` → certificate fingerprint.
    pinned_servers: BTreeMap<String, [u8; 32]>,
    /// `E2ee::to_bytes`, once created.
    e2ee: Option<SecretBytes>,
    history: History,
    /// The format of `e2ee`: converted by the end-to-end layer when it loads an older one.
    e2ee_format: u16,
    /// The screen cast portal's restore token, from the last share it granted.
    screen_grant: Option<String>,
}

/// The client's persistent state, sealed in its vault; every change is saved at once.
/// While it is open, no other process can open the same data directory.
pub struct ClientStore {
    vault: Vault,
    contents: Contents,
    _lock: std::fs::File,
}

/// Takes the data directory's lock, waiting a little for a holder to let go.
fn lock(data_dir: &Path) -> Result<std::fs::File, StoreError> {
    std::fs::create_dir_all(data_dir).map_err(|source| StoreError::DataDir { path: data_dir.to_owned(), source })?;
    let path = data_dir.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| StoreError::DataDir { path: path.clone(), source })?;
    for _ in 0..LOCK_TRIES {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(std::fs::TryLockError::WouldBlock) => std::thread::sleep(LOCK_RETRY),
            Err(std::fs::TryLockError::Error(source)) => return Err(StoreError::DataDir { path, source }),
        }
    }
    Err(StoreError::InUse { path: data_dir.to_owned() })
}

impl ClientStore {
    /// Opens the vault in `data_dir`, or creates it there (and the directory) on first use.
    /// Blocks (Argon2, and up to 3 s for the directory's lock): call it off
    /// any task that moves voice.
    pub fn open_or_create(data_dir: &Path, password: &[u8], params: KdfParams) -> Result<ClientStore, StoreError> {
        let lock = lock(data_dir)?;
        let path = data_dir.join(VAULT_FILE);
        match Vault::open(&path, password) {
            Ok((vault, bytes)) => Ok(ClientStore { vault, contents: decode(&bytes)?, _lock: lock }),
            Err(VaultError::NotFound { .. }) => {
                let contents = Contents { version: CONTENTS_VERSION, ..Contents::default() };
                let vault = Vault::create(&path, password, params, &encode(&contents))?;
                Ok(ClientStore { vault, contents, _lock: lock })
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

    /// The saved end-to-end encryption state, if any, and the format it is in.
    pub fn e2ee_state(&self) -> Option<(&[u8], u16)> {
        self.contents.e2ee.as_deref().map(|bytes| (bytes, self.contents.e2ee_format))
    }

    pub fn history(&self) -> &History {
        &self.contents.history
    }

    pub fn screen_grant(&self) -> Option<&str> {
        self.contents.screen_grant.as_deref()
    }

    /// Replaces the end-to-end encryption state (`E2ee::to_bytes`, in `format`), the
    /// history and the screen cast portal's grant, and saves.
    pub fn save_session(
        &mut self,
        e2ee: Zeroizing<Vec<u8>>,
        format: u16,
        history: &History,
        screen_grant: Option<&str>,
    ) -> Result<(), StoreError> {
        self.contents.e2ee = Some(e2ee.into());
        self.contents.e2ee_format = format;
        self.contents.history = history.clone();
        self.contents.screen_grant = screen_grant.map(str::to_owned);
        self.save()
    }

    fn save(&self) -> Result<(), StoreError> {
        self.vault.save(&encode(&self.contents))?;
        Ok(())
    }
}

/// The contents, in whichever version they were written (the version comes first).
fn decode(bytes: &[u8]) -> Result<Contents, StoreError> {
    let unreadable = |e: postcard::Error| StoreError::Contents(e.to_string());
    let (version, _) = postcard::take_from_bytes::<u16>(bytes).map_err(unreadable)?;
    match version {
        CONTENTS_VERSION => postcard::from_bytes(bytes).map_err(unreadable),
        SECOND_CONTENTS_VERSION => {
            let second: SecondContents = postcard::from_bytes(bytes).map_err(unreadable)?;
            Ok(Contents {
                version: CONTENTS_VERSION,
                pinned_servers: second.pinned_servers,
                e2ee: second.e2ee,
                history: second.history,
                e2ee_format: second.e2ee_format,
                screen_grant: None,
            })
        }
        OLDEST_CONTENTS_VERSION => {
            let first: FirstContents = postcard::from_bytes(bytes).map_err(unreadable)?;
            Ok(Contents {
                version: CONTENTS_VERSION,
                pinned_servers: first.pinned_servers,
                e2ee: first.e2ee,
                history: History::from_first_format(first.history),
                e2ee_format: FIRST_STATE_FORMAT,
                screen_grant: None,
            })
        }
        other => Err(StoreError::Contents(format!("contents version {other}"))),
    }
}

/// The contents as the second version wrote them.
#[derive(Serialize, Deserialize)]
struct SecondContents {
    version: u16,
    pinned_servers: BTreeMap<String, [u8; 32]>,
    e2ee: Option<SecretBytes>,
    history: History,
    e2ee_format: u16,
}

/// The contents as the first version wrote them.
#[derive(Serialize, Deserialize)]
struct FirstContents {
    version: u16,
    pinned_servers: BTreeMap<String, [u8; 32]>,
    e2ee: Option<SecretBytes>,
    history: BTreeMap<String, std::collections::VecDeque<crate::session::history::StoredMessage>>,
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
        let open = || ClientStore::open_or_create(&data, b"pw", FAST).unwrap();
        let mut store = open();
        assert_eq!(store.pinned("a:1"), None);
        store.pin("a:1", Fingerprint([1; 32])).unwrap();
        store.pin("[::1]:2", Fingerprint([2; 32])).unwrap();
        drop(store);
        let store = open();
        assert_eq!(store.pinned("a:1"), Some(Fingerprint([1; 32])));
        assert_eq!(store.pinned("[::1]:2"), Some(Fingerprint([2; 32])));
        drop(store);
        let wrong = ClientStore::open_or_create(&data, b"not pw", FAST).err().unwrap();
        assert_eq!(wrong.code(), "vault_wrong_password");
        let mut store = open();
        let mut history = History::default();
        let message = crate::session::history::StoredMessage { from: "bob".into(), text: "hi".into(), time_ms: 1 };
        history.record("a:1#Lobby", message.clone());
        store.save_session(Zeroizing::new(vec![1, 2, 3]), 2, &history, Some("grant")).unwrap();
        drop(store);
        let store = open();
        assert_eq!(store.e2ee_state(), Some((&[1u8, 2, 3][..], 2)));
        assert_eq!(store.history().conversation("a:1#Lobby").collect::<Vec<_>>(), [&message]);
        assert_eq!(store.pinned("a:1"), Some(Fingerprint([1; 32])), "a later save keeps the pins");
        assert_eq!(store.screen_grant(), Some("grant"));
        let mut names: Vec<_> = std::fs::read_dir(&data).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        assert_eq!(names, [LOCK_FILE, VAULT_FILE], "the vault and an empty lock, nothing in the clear beside it");
        assert_eq!(std::fs::metadata(data.join(LOCK_FILE)).unwrap().len(), 0);
    }

    #[test]
    fn a_second_holder_of_the_data_directory_is_refused_until_the_first_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let first = ClientStore::open_or_create(dir.path(), b"pw", FAST).unwrap();
        let second = ClientStore::open_or_create(dir.path(), b"pw", FAST).err().unwrap();
        assert_eq!(second.code(), "data_dir_in_use", "{second}");
        drop(first);
        ClientStore::open_or_create(dir.path(), b"pw", FAST).unwrap();
    }

    #[test]
    fn a_vault_of_the_second_version_opens_with_everything_in_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut history = History::default();
        let message = crate::session::history::StoredMessage { from: "bob".into(), text: "v2".into(), time_ms: 3 };
        history.record("a:1#Lobby", message.clone());
        let second = SecondContents {
            version: SECOND_CONTENTS_VERSION,
            pinned_servers: [("a:1".to_owned(), [6; 32])].into(),
            e2ee: Some(SecretBytes::new(vec![4])),
            history,
            e2ee_format: 2,
        };
        Vault::create(&dir.path().join(VAULT_FILE), b"pw", FAST, &postcard::to_allocvec(&second).unwrap()).unwrap();
        let store = ClientStore::open_or_create(dir.path(), b"pw", FAST).unwrap();
        assert_eq!(store.pinned("a:1"), Some(Fingerprint([6; 32])));
        assert_eq!(store.e2ee_state(), Some((&[4u8][..], 2)));
        assert_eq!(store.history().conversation("a:1#Lobby").collect::<Vec<_>>(), [&message]);
        assert_eq!(store.screen_grant(), None);
    }

    #[test]
    fn a_vault_of_the_first_version_opens_with_everything_in_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(VAULT_FILE);
        let message = crate::session::history::StoredMessage { from: "bob".into(), text: "old".into(), time_ms: 5 };
        let first = FirstContents {
            version: OLDEST_CONTENTS_VERSION,
            pinned_servers: [("a:1".to_owned(), [7; 32])].into(),
            e2ee: Some(SecretBytes::new(vec![9, 9])),
            history: [("a:1@bob".to_owned(), [message.clone()].into())].into(),
        };
        let bytes = postcard::to_allocvec(&first).unwrap();
        Vault::create(&path, b"pw", FAST, &bytes).unwrap();
        let mut store = ClientStore::open_or_create(dir.path(), b"pw", FAST).unwrap();
        assert_eq!(store.pinned("a:1"), Some(Fingerprint([7; 32])));
        assert_eq!(store.e2ee_state(), Some((&[9u8, 9][..], FIRST_STATE_FORMAT)), "the state says its format");
        assert_eq!(store.history().conversation("a:1@bob").collect::<Vec<_>>(), [&message]);
        store.pin("b:2", Fingerprint([8; 32])).unwrap();
        drop(store);
        let mut store = ClientStore::open_or_create(dir.path(), b"pw", FAST).unwrap();
        assert_eq!(store.e2ee_state().unwrap().1, FIRST_STATE_FORMAT, "a pin alone does not relabel the state");
        assert_eq!(store.history().conversation("a:1@bob").count(), 1, "saved in today's layout, read back");
        let history = store.history().clone();
        store.save_session(Zeroizing::new(vec![1]), 2, &history, None).unwrap();
        drop(store);
        let store = ClientStore::open_or_create(dir.path(), b"pw", FAST).unwrap();
        assert_eq!(store.e2ee_state(), Some((&[1u8][..], 2)));
        assert_eq!(store.pinned("b:2"), Some(Fingerprint([8; 32])));
    }
}
