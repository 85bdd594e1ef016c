//! libsignal's stores, kept as serialized records in plain maps so that the whole state
//! can be sealed in the vault and restored. One struct per store trait, because
//! libsignal borrows several stores mutably at once.
//!
//! Identities are trusted on first use and pinned: a peer whose identity key changes is
//! still let through (the conversation goes on) but recorded as changed until the user
//! accepts the new key, which [`Identities::status`] reports.

use std::collections::{BTreeMap, BTreeSet};

use async_trait::async_trait;
use libsignal_protocol::{
    Direction, GenericSignedPreKey, IdentityChange, IdentityKey, IdentityKeyPair, IdentityKeyStore, KyberPreKeyId,
    KyberPreKeyRecord, KyberPreKeyStore, PreKeyId, PreKeyRecord, PreKeyStore, ProtocolAddress, PublicKey,
    SenderKeyRecord, SenderKeyStore, SessionRecord, SessionStore, SignalProtocolError, SignedPreKeyId,
    SignedPreKeyRecord, SignedPreKeyStore,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;
use zeroize::Zeroizing;

type Result<T> = std::result::Result<T, SignalProtocolError>;

/// What we know of a peer's identity key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum IdentityStatus {
    /// First seen now, or the same as pinned.
    Trusted,
    /// Differs from the key pinned earlier, and the user has not accepted it yet.
    Changed,
}

fn missing(what: &str) -> SignalProtocolError {
    SignalProtocolError::InvalidArgument(format!("no such {what}"))
}

/// Our identity and the identities of peers, pinned at first sight.
#[derive(Serialize, Deserialize)]
pub struct Identities {
    /// `IdentityKeyPair::serialize`.
    own: Zeroizing<Vec<u8>>,
    registration_id: u32,
    /// Peer address → pinned identity key.
    peers: BTreeMap<String, Vec<u8>>,
    /// Peers whose key changed since it was pinned and who are not accepted again yet.
    changed: BTreeSet<String>,
    /// Peers whose current key the user accepted after comparing safety numbers.
    verified: BTreeSet<String>,
}

impl Identities {
    pub fn new(own: &IdentityKeyPair, registration_id: u32) -> Self {
        Identities {
            own: Zeroizing::new(own.serialize().into_vec()),
            registration_id,
            peers: BTreeMap::new(),
            changed: BTreeSet::new(),
            verified: BTreeSet::new(),
        }
    }

    pub fn own(&self) -> Result<IdentityKeyPair> {
        IdentityKeyPair::try_from(&self.own[..])
    }

    pub fn registration_id(&self) -> u32 {
        self.registration_id
    }

    pub fn pinned(&self, peer: &str) -> Option<Result<IdentityKey>> {
        self.peers.get(peer).map(|key| IdentityKey::decode(key))
    }

    pub fn status(&self, peer: &str) -> IdentityStatus {
        if self.changed.contains(peer) { IdentityStatus::Changed } else { IdentityStatus::Trusted }
    }

    /// The user compared safety numbers and accepts the peer's current key.
    pub fn accept(&mut self, peer: &str) {
        self.changed.remove(peer);
        self.verified.insert(peer.to_owned());
    }

    pub fn is_verified(&self, peer: &str) -> bool {
        self.verified.contains(peer)
    }
}

#[async_trait(?Send)]
impl IdentityKeyStore for Identities {
    async fn get_identity_key_pair(&self) -> Result<IdentityKeyPair> {
        self.own()
    }

    async fn get_local_registration_id(&self) -> Result<u32> {
        Ok(self.registration_id)
    }

    async fn save_identity(&mut self, address: &ProtocolAddress, identity: &IdentityKey) -> Result<IdentityChange> {
        let key = identity.serialize().into_vec();
        let name = address.name().to_owned();
        let changed = self.peers.get(&name).is_some_and(|pinned| *pinned != key);
        if changed {
            self.verified.remove(&name);
            self.changed.insert(name.clone());
        }
        self.peers.insert(name, key);
        Ok(IdentityChange::from_changed(changed))
    }

    async fn is_trusted_identity(
        &self,
        _address: &ProtocolAddress,
        _identity: &IdentityKey,
        _direction: Direction,
    ) -> Result<bool> {
        // Trust on first use; a changed key is let through and flagged (see save_identity),
        // so that the user decides with the safety number in front of them.
        Ok(true)
    }

    async fn get_identity(&self, address: &ProtocolAddress) -> Result<Option<IdentityKey>> {
        self.pinned(address.name()).transpose()
    }
}

/// Pairwise sessions by peer address.
#[derive(Default, Serialize, Deserialize)]
pub struct Sessions(BTreeMap<String, Zeroizing<Vec<u8>>>);

#[async_trait(?Send)]
impl SessionStore for Sessions {
    async fn load_session(&self, address: &ProtocolAddress) -> Result<Option<SessionRecord>> {
        self.0.get(address.name()).map(|bytes| SessionRecord::deserialize(bytes)).transpose()
    }

    async fn store_session(&mut self, address: &ProtocolAddress, record: &SessionRecord) -> Result<()> {
        self.0.insert(address.name().to_owned(), Zeroizing::new(record.serialize()?));
        Ok(())
    }
}

/// One-time EC pre-keys, removed when used.
#[derive(Default, Serialize, Deserialize)]
pub struct PreKeys(BTreeMap<u32, Zeroizing<Vec<u8>>>);

impl PreKeys {
    pub fn ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.0.keys().copied()
    }

    pub fn count(&self) -> usize {
        self.0.len()
    }
}

#[async_trait(?Send)]
impl PreKeyStore for PreKeys {
    async fn get_pre_key(&self, id: PreKeyId) -> Result<PreKeyRecord> {
        PreKeyRecord::deserialize(self.0.get(&u32::from(id)).ok_or_else(|| missing("pre-key"))?)
    }

    async fn save_pre_key(&mut self, id: PreKeyId, record: &PreKeyRecord) -> Result<()> {
        self.0.insert(id.into(), Zeroizing::new(record.serialize()?));
        Ok(())
    }

    async fn remove_pre_key(&mut self, id: PreKeyId) -> Result<()> {
        self.0.remove(&u32::from(id));
        Ok(())
    }
}

/// Signed EC pre-keys; old ones stay for sessions begun with them.
#[derive(Default, Serialize, Deserialize)]
pub struct SignedPreKeys(BTreeMap<u32, Zeroizing<Vec<u8>>>);

#[async_trait(?Send)]
impl SignedPreKeyStore for SignedPreKeys {
    async fn get_signed_pre_key(&self, id: SignedPreKeyId) -> Result<SignedPreKeyRecord> {
        SignedPreKeyRecord::deserialize(self.0.get(&u32::from(id)).ok_or_else(|| missing("signed pre-key"))?)
    }

    async fn save_signed_pre_key(&mut self, id: SignedPreKeyId, record: &SignedPreKeyRecord) -> Result<()> {
        self.0.insert(id.into(), Zeroizing::new(record.serialize()?));
        Ok(())
    }
}

/// Kyber pre-keys: one-time ones are removed when used, the last-resort one stays.
#[derive(Default, Serialize, Deserialize)]
pub struct KyberPreKeys {
    records: BTreeMap<u32, Zeroizing<Vec<u8>>>,
    one_time: BTreeSet<u32>,
}

impl KyberPreKeys {
    pub fn mark_one_time(&mut self, id: u32) {
        self.one_time.insert(id);
    }

    pub fn one_time_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.one_time.iter().copied()
    }

    pub fn one_time_len(&self) -> usize {
        self.one_time.len()
    }
}

#[async_trait(?Send)]
impl KyberPreKeyStore for KyberPreKeys {
    async fn get_kyber_pre_key(&self, id: KyberPreKeyId) -> Result<KyberPreKeyRecord> {
        KyberPreKeyRecord::deserialize(self.records.get(&u32::from(id)).ok_or_else(|| missing("Kyber pre-key"))?)
    }

    async fn save_kyber_pre_key(&mut self, id: KyberPreKeyId, record: &KyberPreKeyRecord) -> Result<()> {
        self.records.insert(id.into(), Zeroizing::new(record.serialize()?));
        Ok(())
    }

    async fn mark_kyber_pre_key_used(
        &mut self,
        id: KyberPreKeyId,
        _ec_prekey_id: SignedPreKeyId,
        _base_key: &PublicKey,
    ) -> Result<()> {
        let id = u32::from(id);
        if self.one_time.remove(&id) {
            self.records.remove(&id);
        }
        Ok(())
    }
}

/// Sender keys by (sender address, distribution id).
#[derive(Default, Serialize, Deserialize)]
pub struct SenderKeys(BTreeMap<(String, [u8; 16]), Zeroizing<Vec<u8>>>);

#[async_trait(?Send)]
impl SenderKeyStore for SenderKeys {
    async fn store_sender_key(
        &mut self,
        sender: &ProtocolAddress,
        distribution: Uuid,
        record: &SenderKeyRecord,
    ) -> Result<()> {
        let key = (sender.name().to_owned(), *distribution.as_bytes());
        self.0.insert(key, Zeroizing::new(record.serialize()?));
        Ok(())
    }

    async fn load_sender_key(
        &mut self,
        sender: &ProtocolAddress,
        distribution: Uuid,
    ) -> Result<Option<SenderKeyRecord>> {
        let key = (sender.name().to_owned(), *distribution.as_bytes());
        self.0.get(&key).map(|bytes| SenderKeyRecord::deserialize(bytes)).transpose()
    }
}
