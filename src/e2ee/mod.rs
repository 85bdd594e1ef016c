//! End-to-end encryption with the Signal protocol (Signal's official libsignal code),
//! behind our own types so that nothing else sees libsignal's.
//!
//! Sans-IO and synchronous: the stores are in memory ([`store::Stores`]), so libsignal's
//! async functions finish on their first poll and are driven by [`ready`]; the caller
//! passes the time and the randomness. Direct messages use pairwise sessions set up with
//! PQXDH from a peer's bundle (Double Ratchet after that); channel messages use Sender
//! Keys, distributed to each member over the pairwise sessions.

pub mod store;

use std::collections::{BTreeMap, BTreeSet};
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::SystemTime;

use libsignal_protocol::{
    CiphertextMessage, DeviceId, Fingerprint, GenericSignedPreKey, IdentityKey, IdentityKeyPair, KeyPair,
    KyberPreKeyRecord, KyberPreKeyStore, PreKeyBundle, PreKeyRecord, PreKeySignalMessage, PreKeyStore, ProtocolAddress,
    PublicKey, SenderKeyDistributionMessage, SessionStore, SignalMessage, SignalProtocolError, SignedPreKeyRecord,
    SignedPreKeyStore, Timestamp, kem,
};
use rand::{CryptoRng, Rng};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::crypto::SecretBytes;
use crate::protocol::bundle::{BundleUpload, OneTimePreKey, PeerBundle, SignedPreKey};
pub use store::IdentityStatus;
use store::{Identities, KyberPreKeys, PreKeys, SenderKeys, Sessions, SignedPreKeys};

/// One-time EC pre-keys a client keeps published.
pub const ONE_TIME_PRE_KEYS: usize = 100;
/// One-time Kyber pre-keys a client keeps published (1.6 KiB each: a full set fits one
/// 64 KiB control frame together with everything else in a bundle).
pub const KYBER_ONE_TIME_PRE_KEYS: usize = 25;
/// One-time keys of each kind kept at most. Keys the server handed out stay until a peer
/// uses them, or until this many newer ones push them out (the oldest go first): a peer
/// uses the key it fetched within seconds, so only keys that nobody will use are lost.
const MAX_KEPT_ONE_TIME: usize = 2 * ONE_TIME_PRE_KEYS;
const MAX_KEPT_KYBER_ONE_TIME: usize = 2 * KYBER_ONE_TIME_PRE_KEYS;
/// A signed pre-key older than this is replaced when the client connects (Signal's
/// clients rotate theirs every few days to weeks).
pub const SIGNED_PRE_KEY_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// Whether `signature` over `message` was made with the private half of `identity_key`
/// (serialized as in a bundle); anything malformed is simply not a valid signature.
pub fn verify_identity_signature(identity_key: &[u8], message: &[u8], signature: &[u8]) -> bool {
    IdentityKey::decode(identity_key).is_ok_and(|key| key.public_key().verify_signature(message, signature))
}

/// Signal's safety-number format: version 2, 5200 hash iterations (as the Signal apps).
const FINGERPRINT_VERSION: u32 = 2;
const FINGERPRINT_ITERATIONS: u32 = 5200;

#[derive(Debug, thiserror::Error)]
pub enum E2eeError {
    #[error("signal protocol: {0}")]
    Signal(#[from] SignalProtocolError),
    #[error("no pinned identity for {0}")]
    UnknownPeer(String),
    #[error("the identity key of {0} changed and is not accepted: nothing is encrypted to it")]
    UntrustedIdentity(String),
    #[error("stored end-to-end state is unreadable: {0}")]
    State(String),
}

type Result<T> = std::result::Result<T, E2eeError>;

/// A pairwise-encrypted message: the first ones of a session carry the PQXDH pre-key
/// material, the rest are plain Double Ratchet messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sealed {
    pub pre_key: bool,
    pub bytes: Vec<u8>,
}

/// A decrypted pairwise message and what we know of its sender's identity.
#[derive(Debug)]
pub struct Opened {
    pub plaintext: Vec<u8>,
    pub identity: IdentityStatus,
}

/// One client's Signal state.
#[derive(Serialize, Deserialize)]
pub struct E2ee {
    identities: Identities,
    sessions: Sessions,
    pre_keys: PreKeys,
    signed_pre_keys: SignedPreKeys,
    kyber_pre_keys: KyberPreKeys,
    sender_keys: SenderKeys,
    next_pre_key_id: u32,
    next_kyber_id: u32,
    signed_pre_key_id: u32,
    /// When the current signed pre-key was made (ms since the epoch).
    signed_pre_key_made_ms: u64,
    kyber_last_resort_id: u32,
}

/// The format [`E2ee::to_bytes`] writes: 2 since changed identities are kept apart
/// (pending) and sender keys are bounded.
pub const STATE_FORMAT: u16 = 2;

/// The state as the first format wrote it, for [`E2ee::from_stored`].
#[derive(Serialize, Deserialize)]
struct FirstFormat {
    own: SecretBytes,
    registration_id: u32,
    peers: BTreeMap<String, Vec<u8>>,
    changed: BTreeSet<String>,
    verified: BTreeSet<String>,
    sessions: Sessions,
    pre_keys: PreKeys,
    signed_pre_keys: SignedPreKeys,
    kyber_pre_keys: KyberPreKeys,
    sender_keys: BTreeMap<(String, [u8; 16]), SecretBytes>,
    next_pre_key_id: u32,
    next_kyber_id: u32,
    signed_pre_key_id: u32,
    signed_pre_key_made_ms: u64,
    kyber_last_resort_id: u32,
}

impl FirstFormat {
    fn into_current(self) -> E2ee {
        E2ee {
            identities: Identities::from_first_format(
                self.own,
                self.registration_id,
                self.peers,
                self.changed,
                self.verified,
            ),
            sessions: self.sessions,
            pre_keys: self.pre_keys,
            signed_pre_keys: self.signed_pre_keys,
            kyber_pre_keys: self.kyber_pre_keys,
            sender_keys: SenderKeys::from_first_format(self.sender_keys),
            next_pre_key_id: self.next_pre_key_id,
            next_kyber_id: self.next_kyber_id,
            signed_pre_key_id: self.signed_pre_key_id,
            signed_pre_key_made_ms: self.signed_pre_key_made_ms,
            kyber_last_resort_id: self.kyber_last_resort_id,
        }
    }
}

/// Drives a libsignal future over our in-memory stores, which never wait.
fn ready<T>(future: impl Future<Output = T>) -> T {
    let mut future = pin!(future);
    match future.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(value) => value,
        Poll::Pending => unreachable!("libsignal only awaits our stores, which answer at once"),
    }
}

fn address(peer: &str) -> ProtocolAddress {
    ProtocolAddress::new(peer.to_owned(), DeviceId::new(1).expect("1 is a valid device id"))
}

/// Milliseconds since the Unix epoch (0 before it), as messages and keys carry time.
pub fn unix_millis(now: SystemTime) -> u64 {
    now.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn timestamp(now: SystemTime) -> Timestamp {
    Timestamp::from_epoch_millis(unix_millis(now))
}

fn signed(id: u32, public: &[u8], signature: &[u8]) -> SignedPreKey {
    SignedPreKey { id, public: public.to_vec(), signature: signature.to_vec() }
}

impl E2ee {
    /// A new identity with a full set of pre-keys.
    pub fn generate<R: Rng + CryptoRng>(rng: &mut R, now: SystemTime) -> Result<E2ee> {
        let identity = IdentityKeyPair::generate(rng);
        // Registration ids are 14-bit in libsignal.
        let registration_id = rng.random_range(1..16380);
        let mut e2ee = E2ee {
            identities: Identities::new(&identity, registration_id),
            sessions: Sessions::default(),
            pre_keys: PreKeys::default(),
            signed_pre_keys: SignedPreKeys::default(),
            kyber_pre_keys: KyberPreKeys::default(),
            sender_keys: SenderKeys::default(),
            next_pre_key_id: 1,
            next_kyber_id: 1,
            signed_pre_key_id: 0,
            signed_pre_key_made_ms: 0,
            kyber_last_resort_id: 0,
        };
        e2ee.rotate_signed_pre_key(rng, now)?;
        e2ee.kyber_last_resort_id = e2ee.new_kyber_key(rng, now, false)?.id;
        e2ee.replenish(rng, now, (0, 0))?;
        Ok(e2ee)
    }

    /// Our identity key's fingerprint (what an operator lists under `admins`).
    pub fn identity_fingerprint(&self) -> Result<crate::protocol::Fingerprint> {
        Ok(crate::protocol::Fingerprint::of_identity_key(&self.identities.own()?.identity_key().serialize()))
    }

    /// A signature over `message` with our identity key (XEdDSA, as libsignal signs
    /// pre-keys; `message` must carry its own context so that it cannot pass for a key).
    pub fn sign_with_identity<R: Rng + CryptoRng>(&self, message: &[u8], rng: &mut R) -> Result<Vec<u8>> {
        let identity = self.identities.own()?;
        Ok(identity.private_key().calculate_signature(message, rng).map_err(SignalProtocolError::from)?.into_vec())
    }

    /// Every public key to publish now: the newest full set of one-time keys of each kind.
    pub fn bundle_upload(&self) -> Result<BundleUpload> {
        let identity = self.identities.own()?;
        let mut one_time = Vec::new();
        for id in self.pre_keys.ids().rev().take(ONE_TIME_PRE_KEYS) {
            let record = ready(self.pre_keys.get_pre_key(id.into()))?;
            one_time.push(OneTimePreKey { id, public: record.public_key()?.serialize().into_vec() });
        }
        let kyber_one_time = self
            .kyber_pre_keys
            .one_time_ids()
            .rev()
            .take(KYBER_ONE_TIME_PRE_KEYS)
            .map(|id| self.kyber_public(id))
            .collect::<Result<_>>()?;
        let signed_record = ready(self.signed_pre_keys.get_signed_pre_key(self.signed_pre_key_id.into()))?;
        Ok(BundleUpload {
            registration_id: self.identities.registration_id(),
            identity_key: identity.identity_key().serialize().into_vec(),
            signed_pre_key: signed(
                self.signed_pre_key_id,
                &signed_record.public_key()?.serialize(),
                &signed_record.signature()?,
            ),
            kyber_last_resort: self.kyber_public(self.kyber_last_resort_id)?,
            kyber_one_time,
            one_time,
        })
    }

    /// New one-time keys to bring the server's pool back to full sets, when it holds
    /// `published` (EC, Kyber) of ours: the server's count, not ours, since the keys it
    /// handed out are still here until a peer uses them. Returns the new ones to publish.
    pub fn replenish<R: Rng + CryptoRng>(
        &mut self,
        rng: &mut R,
        now: SystemTime,
        published: (usize, usize),
    ) -> Result<(Vec<OneTimePreKey>, Vec<SignedPreKey>)> {
        let mut one_time = Vec::new();
        for _ in published.0..ONE_TIME_PRE_KEYS {
            let id = self.next_pre_key_id;
            self.next_pre_key_id += 1;
            let pair = KeyPair::generate(rng);
            ready(self.pre_keys.save_pre_key(id.into(), &PreKeyRecord::new(id.into(), &pair)))?;
            one_time.push(OneTimePreKey { id, public: pair.public_key.serialize().into_vec() });
        }
        let mut kyber = Vec::new();
        for _ in published.1..KYBER_ONE_TIME_PRE_KEYS {
            kyber.push(self.new_kyber_key(rng, now, true)?);
        }
        self.pre_keys.keep_newest(MAX_KEPT_ONE_TIME);
        self.kyber_pre_keys.keep_newest_one_time(MAX_KEPT_KYBER_ONE_TIME);
        Ok((one_time, kyber))
    }

    /// A new signed pre-key (the old one stays usable for sessions already begun with it).
    pub fn rotate_signed_pre_key<R: Rng + CryptoRng>(&mut self, rng: &mut R, now: SystemTime) -> Result<SignedPreKey> {
        let identity = self.identities.own()?;
        let pair = KeyPair::generate(rng);
        let signature = identity
            .private_key()
            .calculate_signature(&pair.public_key.serialize(), rng)
            .map_err(SignalProtocolError::from)?;
        self.signed_pre_key_id += 1;
        let id = self.signed_pre_key_id;
        let record = SignedPreKeyRecord::new(id.into(), timestamp(now), &pair, &signature);
        ready(self.signed_pre_keys.save_signed_pre_key(id.into(), &record))?;
        self.signed_pre_key_made_ms = timestamp(now).epoch_millis();
        Ok(signed(id, &pair.public_key.serialize(), &signature))
    }

    /// Replaces the signed pre-key if it is older than [`SIGNED_PRE_KEY_MAX_AGE`]; the
    /// old ones stay, for sessions that peers began with them. Whether it rotated.
    pub fn rotate_signed_pre_key_if_due<R: Rng + CryptoRng>(&mut self, rng: &mut R, now: SystemTime) -> Result<bool> {
        let age_ms = timestamp(now).epoch_millis().saturating_sub(self.signed_pre_key_made_ms);
        if u128::from(age_ms) < SIGNED_PRE_KEY_MAX_AGE.as_millis() {
            return Ok(false);
        }
        self.rotate_signed_pre_key(rng, now)?;
        Ok(true)
    }

    fn new_kyber_key<R: Rng + CryptoRng>(
        &mut self,
        rng: &mut R,
        now: SystemTime,
        one_time: bool,
    ) -> Result<SignedPreKey> {
        let id = self.next_kyber_id;
        self.next_kyber_id += 1;
        let identity = self.identities.own()?;
        let pair = kem::KeyPair::generate(kem::KeyType::Kyber1024, rng);
        let signature = identity
            .private_key()
            .calculate_signature(&pair.public_key.serialize(), rng)
            .map_err(SignalProtocolError::from)?;
        let record = KyberPreKeyRecord::new(id.into(), timestamp(now), &pair, &signature);
        ready(self.kyber_pre_keys.save_kyber_pre_key(id.into(), &record))?;
        if one_time {
            self.kyber_pre_keys.mark_one_time(id);
        }
        Ok(signed(id, &pair.public_key.serialize(), &signature))
    }

    fn kyber_public(&self, id: u32) -> Result<SignedPreKey> {
        let record = ready(self.kyber_pre_keys.get_kyber_pre_key(id.into()))?;
        Ok(signed(id, &record.public_key()?.serialize(), &record.signature()?))
    }

    /// One-time keys of each kind still unused (the server holds the same ones).
    pub fn one_time_keys_left(&self) -> (usize, usize) {
        (self.pre_keys.count(), self.kyber_pre_keys.one_time_len())
    }

    /// Whether we can encrypt to `peer`: a session with its pinned identity key (a session
    /// begun by a changed key, or one older than the key the user accepted, is none).
    pub fn has_session(&self, peer: &str) -> bool {
        let Ok(Some(session)) = ready(self.sessions.load_session(&address(peer))) else { return false };
        let pinned = self.identities.pinned(peer).and_then(|key| key.ok()).map(|key| key.serialize());
        matches!((session.remote_identity_key_bytes(), pinned), (Ok(Some(remote)), Some(pinned)) if *remote == *pinned)
    }

    /// Sets up a pairwise session with `peer` from its bundle (PQXDH), pinning its identity
    /// on first use. A bundle whose identity key differs from the pinned one starts no
    /// session: its key is kept as pending and `Changed` is returned, so that nothing is
    /// encrypted to it until the user accepts it.
    pub fn start_session<R: Rng + CryptoRng>(
        &mut self,
        peer: &str,
        bundle: &PeerBundle,
        now: SystemTime,
        rng: &mut R,
    ) -> Result<IdentityStatus> {
        let one_time = match &bundle.one_time {
            Some(key) => Some((key.id.into(), PublicKey::deserialize(&key.public).map_err(SignalProtocolError::from)?)),
            None => None,
        };
        let identity = IdentityKey::decode(&bundle.identity_key)?;
        let known = self.identities.pinned(peer).is_some() || self.identities.status(peer) == IdentityStatus::Changed;
        if known && self.identities.see(peer, &identity)? {
            return Ok(IdentityStatus::Changed);
        }
        let bundle = PreKeyBundle::new(
            bundle.registration_id,
            DeviceId::new(1).expect("1 is a valid device id"),
            one_time,
            bundle.signed_pre_key.id.into(),
            PublicKey::deserialize(&bundle.signed_pre_key.public).map_err(SignalProtocolError::from)?,
            bundle.signed_pre_key.signature.clone(),
            bundle.kyber.id.into(),
            kem::PublicKey::deserialize(&bundle.kyber.public)?,
            bundle.kyber.signature.clone(),
            identity,
        )?;
        ready(libsignal_protocol::process_prekey_bundle(
            &address(peer),
            &mut self.sessions,
            &mut self.identities,
            &bundle,
            now,
            rng,
        ))?;
        Ok(self.identities.status(peer))
    }

    /// Encrypts for `peer` over the pairwise session.
    pub fn encrypt<R: Rng + CryptoRng>(
        &mut self,
        peer: &str,
        plaintext: &[u8],
        now: SystemTime,
        rng: &mut R,
    ) -> Result<Sealed> {
        let message = ready(libsignal_protocol::message_encrypt(
            plaintext,
            &address(peer),
            &mut self.sessions,
            &mut self.identities,
            now,
            rng,
        ))
        .map_err(|e| match e {
            SignalProtocolError::UntrustedIdentity(_) => E2eeError::UntrustedIdentity(peer.to_owned()),
            other => other.into(),
        })?;
        let pre_key = matches!(message, CiphertextMessage::PreKeySignalMessage(_));
        Ok(Sealed { pre_key, bytes: message.serialize().to_vec() })
    }

    /// Decrypts a pairwise message from `peer`; a first message sets up the session.
    pub fn decrypt<R: Rng + CryptoRng>(&mut self, peer: &str, sealed: &Sealed, rng: &mut R) -> Result<Opened> {
        let message = if sealed.pre_key {
            CiphertextMessage::PreKeySignalMessage(PreKeySignalMessage::try_from(&sealed.bytes[..])?)
        } else {
            CiphertextMessage::SignalMessage(SignalMessage::try_from(&sealed.bytes[..])?)
        };
        let plaintext = ready(libsignal_protocol::message_decrypt(
            &message,
            &address(peer),
            &mut self.sessions,
            &mut self.identities,
            &mut self.pre_keys,
            &self.signed_pre_keys,
            &mut self.kyber_pre_keys,
            rng,
        ))?;
        Ok(Opened { plaintext, identity: self.identities.status(peer) })
    }

    /// Our sender key for a channel epoch, as a distribution message to send to each
    /// member over the pairwise sessions. A new `distribution` id is a new key: a new
    /// epoch after someone leaves, which the leaver never receives.
    pub fn sender_key_distribution<R: Rng + CryptoRng>(
        &mut self,
        me: &str,
        distribution: Uuid,
        rng: &mut R,
    ) -> Result<Vec<u8>> {
        let message = ready(libsignal_protocol::create_sender_key_distribution_message(
            &address(me),
            distribution,
            &mut self.sender_keys,
            rng,
        ))?;
        Ok(message.serialized().to_vec())
    }

    /// Takes a peer's sender key from its distribution message; returns the epoch (the
    /// distribution id) it is for.
    pub fn accept_sender_key(&mut self, sender: &str, distribution_message: &[u8]) -> Result<Uuid> {
        let message = SenderKeyDistributionMessage::try_from(distribution_message)?;
        ready(libsignal_protocol::process_sender_key_distribution_message(
            &address(sender),
            &message,
            &mut self.sender_keys,
        ))?;
        Ok(message.distribution_id()?)
    }

    /// Encrypts a channel message under our sender key for `distribution`.
    pub fn group_encrypt<R: Rng + CryptoRng>(
        &mut self,
        me: &str,
        distribution: Uuid,
        plaintext: &[u8],
        rng: &mut R,
    ) -> Result<Vec<u8>> {
        let message = ready(libsignal_protocol::group_encrypt(
            &mut self.sender_keys,
            &address(me),
            distribution,
            plaintext,
            rng,
        ))?;
        Ok(message.serialized().to_vec())
    }

    /// Decrypts a channel message from `sender`.
    /// The sender-key distribution a channel message was sealed under, when it parses
    /// as one (it says nothing about whether it opens).
    pub fn group_message_distribution(ciphertext: &[u8]) -> Option<Uuid> {
        libsignal_protocol::SenderKeyMessage::try_from(ciphertext).ok().map(|m| m.distribution_id())
    }

    pub fn group_decrypt(&mut self, sender: &str, ciphertext: &[u8]) -> Result<Vec<u8>> {
        Ok(ready(libsignal_protocol::group_decrypt(ciphertext, &mut self.sender_keys, &address(sender)))?)
    }

    /// The 60-digit safety number of us (`me`) and `peer`, as Signal shows it; both sides
    /// see the same digits. For a peer whose key changed, the number of the new key: the
    /// one to compare before accepting it.
    pub fn safety_number(&self, me: &str, peer: &str) -> Result<String> {
        let own = self.identities.own()?;
        let theirs = self.identities.newest(peer).ok_or_else(|| E2eeError::UnknownPeer(peer.to_owned()))??;
        let fingerprint = Fingerprint::new(
            FINGERPRINT_VERSION,
            FINGERPRINT_ITERATIONS,
            me.as_bytes(),
            own.identity_key(),
            peer.as_bytes(),
            &theirs,
        )
        .map_err(|e| E2eeError::State(e.to_string()))?;
        fingerprint.display_string().map_err(|e| E2eeError::State(e.to_string()))
    }

    pub fn identity_status(&self, peer: &str) -> IdentityStatus {
        self.identities.status(peer)
    }

    /// Whether the user accepted `peer`'s current identity after comparing safety numbers.
    pub fn is_verified(&self, peer: &str) -> bool {
        self.identities.is_verified(peer)
    }

    /// The user compared safety numbers and accepts `peer`'s newest identity key: from now
    /// on it is pinned, and the one we encrypt to.
    pub fn accept_identity(&mut self, peer: &str) {
        self.identities.accept(peer);
    }

    /// Moves everything kept for peers addressed `{old_prefix}{Name}` (the first way of
    /// addressing them: the server as typed, the name as shown) to
    /// `{new_prefix}{canonical name}`: pins, pending keys, verifications, sessions and
    /// sender keys stay with the people they belong to. What is already kept under the
    /// new address wins.
    pub fn rename_peers(&mut self, old_prefix: &str, new_prefix: &str) {
        let rename = |address: &str| {
            address
                .strip_prefix(old_prefix)
                .map(|name| format!("{new_prefix}{}", crate::protocol::canonical_name(name)))
        };
        self.identities.rename(&rename);
        self.sessions.rename(&rename);
        self.sender_keys.rename(&rename);
    }

    /// The whole state, for the vault.
    pub fn to_bytes(&self) -> zeroize::Zeroizing<Vec<u8>> {
        zeroize::Zeroizing::new(postcard::to_allocvec(self).expect("maps of bytes and strings encode"))
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<E2ee> {
        postcard::from_bytes(bytes).map_err(|e| E2eeError::State(e.to_string()))
    }

    /// The state as stored in `format` ([`STATE_FORMAT`], or an earlier one, which is
    /// converted: the identity and everything else are kept).
    pub fn from_stored(bytes: &[u8], format: u16) -> Result<E2ee> {
        match format {
            STATE_FORMAT => E2ee::from_bytes(bytes),
            1 => {
                let first: FirstFormat = postcard::from_bytes(bytes).map_err(|e| E2eeError::State(e.to_string()))?;
                Ok(first.into_current())
            }
            other => Err(E2eeError::State(format!("state format {other} is newer than this build ({STATE_FORMAT})"))),
        }
    }
}

#[cfg(test)]
mod tests;
