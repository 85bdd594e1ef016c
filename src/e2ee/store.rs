//! libsignal's stores, kept as serialized records in plain maps so that the whole state
//! can be sealed in the vault and restored. One struct per store trait, because
//! libsignal borrows several stores mutably at once.
//!
//! Identities are trusted on first use and pinned. A key that differs from the pinned one
//! is kept aside as pending: what it sends is still read (and flagged), but libsignal
//! refuses to encrypt anything to it, or to start a session with it, until the user
//! compared safety numbers and accepted it ([`Identities::accept`]). So a relay that
//! hands out another key under a known name learns nothing.

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

use crate::crypto::SecretBytes;

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

/// Moves the entries `rename` gives a new key to; an entry already at the new key stays.
fn rename_keys<V>(map: &mut BTreeMap<String, V>, rename: &dyn Fn(&str) -> Option<String>) {
    let moving: Vec<(String, String)> = map.keys().filter_map(|k| rename(k).map(|new| (k.clone(), new))).collect();
    for (old, new) in moving {
        if let Some(value) = map.remove(&old) {
            map.entry(new).or_insert(value);
        }
    }
}

fn missing(what: &str) -> SignalProtocolError {
    SignalProtocolError::InvalidArgument(format!("no such {what}"))
}

/// Identities pinned per server at most. A pin is never dropped for room: that would let a
/// hostile server that makes up people push a real peer's pin out and then hand out another
/// key for it as a first sight. So past the bound new people on that server cannot be
/// pinned (nor written to) and the server can only fill its own share of the vault: about
/// 1.3 MB of keys and names.
pub const MAX_PINS_PER_SERVER: usize = 10_000;

/// The server part of a peer's address (`server/name`; see `Chat::new`).
fn server_of(peer: &str) -> &str {
    peer.split_once('/').map_or(peer, |(server, _)| server)
}

/// Our identity and the identities of peers, pinned at first sight.
#[derive(Serialize, Deserialize)]
pub struct Identities {
    /// `IdentityKeyPair::serialize`.
    own: SecretBytes,
    registration_id: u32,
    /// Peer address → pinned identity key: the one we encrypt to.
    peers: BTreeMap<String, Vec<u8>>,
    /// Peer address → a key seen since that differs from the pinned one, not accepted yet.
    pending: BTreeMap<String, Vec<u8>>,
    /// Peers whose current key the user accepted after comparing safety numbers.
    verified: BTreeSet<String>,
}

impl Identities {
    pub fn new(own: &IdentityKeyPair, registration_id: u32) -> Self {
        Identities {
            own: SecretBytes::new(own.serialize().into_vec()),
            registration_id,
            peers: BTreeMap::new(),
            pending: BTreeMap::new(),
            verified: BTreeSet::new(),
        }
    }

    pub fn own(&self) -> Result<IdentityKeyPair> {
        IdentityKeyPair::try_from(&self.own[..])
    }

    pub fn registration_id(&self) -> u32 {
        self.registration_id
    }

    /// The key pinned for `peer`, the one we encrypt to.
    pub fn pinned(&self, peer: &str) -> Option<Result<IdentityKey>> {
        self.peers.get(peer).map(|key| IdentityKey::decode(key))
    }

    /// The newest key seen for `peer`: the pending one if its key changed, else the
    /// pinned one. Its safety number is the one to compare before accepting.
    pub fn newest(&self, peer: &str) -> Option<Result<IdentityKey>> {
        self.pending.get(peer).or_else(|| self.peers.get(peer)).map(|key| IdentityKey::decode(key))
    }

    pub fn status(&self, peer: &str) -> IdentityStatus {
        if self.pending.contains_key(peer) { IdentityStatus::Changed } else { IdentityStatus::Trusted }
    }

    /// Pins `key` for `peer` if it has none (first use); a different key from the pinned
    /// one becomes pending. Whether the key differs from the pinned one (or is pending).
    /// A first key for a server that has [`MAX_PINS_PER_SERVER`] pinned already is refused.
    pub fn see(&mut self, peer: &str, key: &IdentityKey) -> Result<bool> {
        let key = key.serialize().into_vec();
        Ok(match self.peers.get(peer) {
            None if !self.pending.contains_key(peer) => {
                let prefix = format!("{}/", server_of(peer));
                let pinned = self.peers.range(prefix.clone()..).take_while(|(p, _)| p.starts_with(&prefix)).count();
                if pinned >= MAX_PINS_PER_SERVER {
                    return Err(SignalProtocolError::InvalidArgument(format!(
                        "{MAX_PINS_PER_SERVER} identities are pinned for this server already: no more are taken"
                    )));
                }
                self.peers.insert(peer.to_owned(), key);
                false
            }
            Some(pinned) if *pinned == key => false,
            _ => {
                self.verified.remove(peer);
                self.pending.insert(peer.to_owned(), key);
                true
            }
        })
    }

    /// The first format's identities: `peers` held the newest key seen, `changed` the
    /// peers whose key had changed unaccepted. Those keys become pending, with no key
    /// pinned for them: nothing is encrypted to them until the user accepts one.
    pub fn from_first_format(
        own: SecretBytes,
        registration_id: u32,
        mut peers: BTreeMap<String, Vec<u8>>,
        changed: BTreeSet<String>,
        verified: BTreeSet<String>,
    ) -> Identities {
        let pending = changed.iter().filter_map(|name| peers.remove_entry(name)).collect();
        Identities { own, registration_id, peers, pending, verified }
    }

    /// Renames peers' addresses (see `E2ee::rename_peers`).
    pub fn rename(&mut self, rename: &dyn Fn(&str) -> Option<String>) {
        rename_keys(&mut self.peers, rename);
        rename_keys(&mut self.pending, rename);
        let verified = std::mem::take(&mut self.verified);
        self.verified = verified.into_iter().map(|peer| rename(&peer).unwrap_or(peer)).collect();
    }

    /// The user compared safety numbers and accepts the peer's newest key: it is pinned.
    pub fn accept(&mut self, peer: &str) {
        if let Some(key) = self.pending.remove(peer) {
            self.peers.insert(peer.to_owned(), key);
        }
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
        Ok(IdentityChange::from_changed(self.see(address.name(), identity)?))
    }

    async fn is_trusted_identity(
        &self,
        address: &ProtocolAddress,
        identity: &IdentityKey,
        direction: Direction,
    ) -> Result<bool> {
        // Trust on first use. A key other than the pinned one may be read from (what it
        // says is flagged as from a changed identity), never encrypted to.
        let name = address.name();
        Ok(match self.peers.get(name) {
            None => !self.pending.contains_key(name) || direction == Direction::Receiving,
            Some(pinned) => *pinned == identity.serialize().as_ref() || direction == Direction::Receiving,
        })
    }

    async fn get_identity(&self, address: &ProtocolAddress) -> Result<Option<IdentityKey>> {
        self.pinned(address.name()).transpose()
    }
}

/// Pairwise sessions kept in all: each is several KiB (the post-quantum ratchet), the
/// whole state is sealed into the vault on every save, and on a public server people
/// keep coming. Room for everyone in a full channel (the default server holds 100); a
/// session dropped for room is set up again from a fresh bundle when next needed.
pub const MAX_SESSIONS: usize = 256;

/// Pairwise sessions by peer address, the least recently stored going first beyond
/// [`MAX_SESSIONS`]. When each was stored is not saved (the records are, as in the
/// earlier formats): after a restart the loaded ones count as older than any stored since.
#[derive(Default, Serialize, Deserialize)]
pub struct Sessions {
    records: BTreeMap<String, SecretBytes>,
    #[serde(skip)]
    stored: BTreeMap<String, u64>,
    #[serde(skip)]
    next_store: u64,
}

impl Sessions {
    pub fn rename(&mut self, rename: &dyn Fn(&str) -> Option<String>) {
        rename_keys(&mut self.records, rename);
        rename_keys(&mut self.stored, rename);
    }

    /// Sessions kept.
    pub fn count(&self) -> usize {
        self.records.len()
    }
}

#[async_trait(?Send)]
impl SessionStore for Sessions {
    async fn load_session(&self, address: &ProtocolAddress) -> Result<Option<SessionRecord>> {
        self.records.get(address.name()).map(|bytes| SessionRecord::deserialize(bytes)).transpose()
    }

    async fn store_session(&mut self, address: &ProtocolAddress, record: &SessionRecord) -> Result<()> {
        // Serialized first: a record that cannot be leaves no stamp behind.
        let bytes = SecretBytes::new(record.serialize()?);
        let name = address.name().to_owned();
        self.next_store += 1;
        self.stored.insert(name.clone(), self.next_store);
        self.records.insert(name, bytes);
        while self.records.len() > MAX_SESSIONS {
            // Never stored since loading counts as 0: the oldest.
            let oldest = self.records.keys().min_by_key(|name| self.stored.get(*name).copied().unwrap_or(0)).cloned();
            let oldest = oldest.expect("over the bound, so not empty");
            self.records.remove(&oldest);
            self.stored.remove(&oldest);
        }
        Ok(())
    }
}

/// One-time EC pre-keys, removed when used.
#[derive(Default, Serialize, Deserialize)]
pub struct PreKeys(BTreeMap<u32, SecretBytes>);

impl PreKeys {
    pub fn ids(&self) -> impl DoubleEndedIterator<Item = u32> + '_ {
        self.0.keys().copied()
    }

    pub fn count(&self) -> usize {
        self.0.len()
    }

    /// Drops the oldest keys beyond `max` (ids grow, so the lowest are the oldest).
    pub fn keep_newest(&mut self, max: usize) {
        while self.0.len() > max {
            self.0.pop_first();
        }
    }
}

#[async_trait(?Send)]
impl PreKeyStore for PreKeys {
    async fn get_pre_key(&self, id: PreKeyId) -> Result<PreKeyRecord> {
        PreKeyRecord::deserialize(self.0.get(&u32::from(id)).ok_or_else(|| missing("pre-key"))?)
    }

    async fn save_pre_key(&mut self, id: PreKeyId, record: &PreKeyRecord) -> Result<()> {
        self.0.insert(id.into(), SecretBytes::new(record.serialize()?));
        Ok(())
    }

    async fn remove_pre_key(&mut self, id: PreKeyId) -> Result<()> {
        self.0.remove(&u32::from(id));
        Ok(())
    }
}

/// Signed EC pre-keys; old ones stay for sessions begun with them.
#[derive(Default, Serialize, Deserialize)]
pub struct SignedPreKeys(BTreeMap<u32, SecretBytes>);

#[async_trait(?Send)]
impl SignedPreKeyStore for SignedPreKeys {
    async fn get_signed_pre_key(&self, id: SignedPreKeyId) -> Result<SignedPreKeyRecord> {
        SignedPreKeyRecord::deserialize(self.0.get(&u32::from(id)).ok_or_else(|| missing("signed pre-key"))?)
    }

    async fn save_signed_pre_key(&mut self, id: SignedPreKeyId, record: &SignedPreKeyRecord) -> Result<()> {
        self.0.insert(id.into(), SecretBytes::new(record.serialize()?));
        Ok(())
    }
}

/// Kyber pre-keys: one-time ones are removed when used, the last-resort one stays.
#[derive(Default, Serialize, Deserialize)]
pub struct KyberPreKeys {
    records: BTreeMap<u32, SecretBytes>,
    one_time: BTreeSet<u32>,
}

impl KyberPreKeys {
    pub fn mark_one_time(&mut self, id: u32) {
        self.one_time.insert(id);
    }

    pub fn one_time_ids(&self) -> impl DoubleEndedIterator<Item = u32> + '_ {
        self.one_time.iter().copied()
    }

    pub fn one_time_len(&self) -> usize {
        self.one_time.len()
    }

    /// Drops the oldest one-time keys beyond `max`; the last-resort key stays.
    pub fn keep_newest_one_time(&mut self, max: usize) {
        while self.one_time.len() > max {
            if let Some(id) = self.one_time.pop_first() {
                self.records.remove(&id);
            }
        }
    }
}

#[async_trait(?Send)]
impl KyberPreKeyStore for KyberPreKeys {
    async fn get_kyber_pre_key(&self, id: KyberPreKeyId) -> Result<KyberPreKeyRecord> {
        KyberPreKeyRecord::deserialize(self.records.get(&u32::from(id)).ok_or_else(|| missing("Kyber pre-key"))?)
    }

    async fn save_kyber_pre_key(&mut self, id: KyberPreKeyId, record: &KyberPreKeyRecord) -> Result<()> {
        self.records.insert(id.into(), SecretBytes::new(record.serialize()?));
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

/// Sender-key records kept per sender: its current epoch and a few before it, for
/// messages still in flight across a rekey. Older ones go (the least recently used first).
pub const SENDER_KEYS_PER_SENDER: usize = 4;
/// Sender-key records kept in all: however many peers a server makes up, what they can
/// make us store stays bounded.
pub const MAX_SENDER_KEYS: usize = 2000;

/// Sender keys by (sender address, distribution id), each with when it was last used
/// (a counter), so that the least recently used go first.
#[derive(Default, Serialize, Deserialize)]
pub struct SenderKeys {
    records: BTreeMap<SenderKeyId, (u64, SecretBytes)>,
    next_use: u64,
}

/// A sender's address and a distribution id.
type SenderKeyId = (String, [u8; 16]);

impl SenderKeys {
    /// The first format's records (a plain map), as if used in their order.
    pub fn from_first_format(records: BTreeMap<SenderKeyId, SecretBytes>) -> SenderKeys {
        let next_use = records.len() as u64;
        SenderKeys {
            records: records.into_iter().zip(0..).map(|((key, record), n)| (key, (n, record))).collect(),
            next_use,
        }
    }

    /// Renames senders' addresses (see `E2ee::rename_peers`).
    pub fn rename(&mut self, rename: &dyn Fn(&str) -> Option<String>) {
        let records = std::mem::take(&mut self.records);
        for ((sender, distribution), record) in records {
            let key = (rename(&sender).unwrap_or(sender), distribution);
            self.records.entry(key).or_insert(record);
        }
    }

    /// Records kept, over all senders.
    pub fn total(&self) -> usize {
        self.records.len()
    }

    /// Records kept for `sender`.
    pub fn count_for(&self, sender: &str) -> usize {
        self.records.keys().filter(|(name, _)| name == sender).count()
    }

    /// Drops the least recently used records beyond the bounds, per sender and in all.
    fn evict(&mut self, sender: &str) {
        while self.count_for(sender) > SENDER_KEYS_PER_SENDER {
            let oldest = self.records.iter().filter(|((name, _), _)| name == sender).min_by_key(|(_, (used, _))| *used);
            let key = oldest.map(|(key, _)| key.clone()).expect("over the bound, so not empty");
            self.records.remove(&key);
        }
        while self.records.len() > MAX_SENDER_KEYS {
            let oldest = self.records.iter().min_by_key(|(_, (used, _))| *used).map(|(key, _)| key.clone());
            self.records.remove(&oldest.expect("over the bound, so not empty"));
        }
    }
}

#[async_trait(?Send)]
impl SenderKeyStore for SenderKeys {
    async fn store_sender_key(
        &mut self,
        sender: &ProtocolAddress,
        distribution: Uuid,
        record: &SenderKeyRecord,
    ) -> Result<()> {
        let key = (sender.name().to_owned(), *distribution.as_bytes());
        self.next_use += 1;
        self.records.insert(key, (self.next_use, SecretBytes::new(record.serialize()?)));
        self.evict(sender.name());
        Ok(())
    }

    async fn load_sender_key(
        &mut self,
        sender: &ProtocolAddress,
        distribution: Uuid,
    ) -> Result<Option<SenderKeyRecord>> {
        let key = (sender.name().to_owned(), *distribution.as_bytes());
        self.records.get(&key).map(|(_, bytes)| SenderKeyRecord::deserialize(bytes)).transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_gets_its_share_of_pins_and_no_more_and_no_pin_is_dropped_for_room() {
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(9);
        let own = IdentityKeyPair::generate(&mut rng);
        let key = *IdentityKeyPair::generate(&mut rng).identity_key();
        let mut identities = Identities::new(&own, 1);
        assert!(!identities.see("honest/alice", &key).unwrap());
        // Sorts between "hostile" and "hostile/...": must not hide the hostile server's pins.
        assert!(!identities.see("hostile-too/eve", &key).unwrap());
        for i in 0..MAX_PINS_PER_SERVER {
            identities.see(&format!("hostile/made-up-{i}"), &key).unwrap();
        }
        assert!(identities.see("hostile/one-more", &key).is_err());
        assert!(identities.pinned("hostile/one-more").is_none());
        // Those pinned stay so, a changed key is still caught, and other servers are free.
        assert!(identities.pinned("hostile/made-up-0").is_some());
        let other = *IdentityKeyPair::generate(&mut rng).identity_key();
        assert!(identities.see("hostile/made-up-0", &other).unwrap());
        assert!(!identities.see("honest/alice", &key).unwrap());
        assert!(!identities.see("honest/bob", &key).unwrap());
    }

    #[test]
    fn sessions_are_saved_as_the_plain_map_the_earlier_formats_wrote() {
        let mut sessions = Sessions::default();
        sessions.records.insert("server/bob".into(), SecretBytes::new(vec![1, 2, 3]));
        sessions.stored.insert("server/bob".into(), 7);
        let plain = postcard::to_allocvec(&sessions.records).unwrap();
        assert_eq!(postcard::to_allocvec(&sessions).unwrap(), plain);
        let back: Sessions = postcard::from_bytes(&plain).unwrap();
        assert_eq!(back.count(), 1);
    }
}
