//! Pre-key bundles as they cross the wire: public keys and signatures only, as the
//! serialized bytes libsignal produces. The relay keeps them in memory and hands each
//! one-time key out once; it can read nothing with them.

use serde::{Deserialize, Serialize};

/// A signed pre-key (EC) or a Kyber pre-key, with the identity key's signature over it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedPreKey {
    pub id: u32,
    pub public: Vec<u8>,
    pub signature: Vec<u8>,
}

/// A one-time EC pre-key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OneTimePreKey {
    pub id: u32,
    pub public: Vec<u8>,
}

/// What a client publishes: its identity, a signed pre-key, a Kyber last-resort key and
/// batches of one-time keys (EC and Kyber) for the server to hand out one per fetch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleUpload {
    pub registration_id: u32,
    pub identity_key: Vec<u8>,
    pub signed_pre_key: SignedPreKey,
    pub kyber_last_resort: SignedPreKey,
    pub kyber_one_time: Vec<SignedPreKey>,
    pub one_time: Vec<OneTimePreKey>,
}

/// What a client fetching a peer's bundle receives: everything needed for PQXDH, with
/// at most one one-time key of each kind (the Kyber one falls back to the last-resort key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerBundle {
    pub registration_id: u32,
    pub identity_key: Vec<u8>,
    pub signed_pre_key: SignedPreKey,
    pub one_time: Option<OneTimePreKey>,
    pub kyber: SignedPreKey,
}
