//! Pre-key bundles held for the users online: in memory only, each one-time key handed
//! out once, and no way for one requester to drain another user's keys.

use std::collections::VecDeque;

use crate::protocol::bundle::{BundleUpload, OneTimePreKey, PeerBundle, SignedPreKey};

/// One-time keys of each kind the server keeps per user at most.
pub const MAX_ONE_TIME: usize = 200;
pub const MAX_KYBER_ONE_TIME: usize = 50;
/// Below this many of a kind, the owner is asked for more.
pub const LOW_WATER: usize = 20;
/// The largest public key or signature accepted (a Kyber-1024 key is 1569 bytes).
const MAX_KEY_BYTES: usize = 2048;

#[derive(Debug, PartialEq, Eq)]
pub enum BundleError {
    TooManyKeys,
    KeyTooLarge,
}

/// A user's published keys.
pub struct StoredBundle {
    registration_id: u32,
    identity_key: Vec<u8>,
    signed_pre_key: SignedPreKey,
    kyber_last_resort: SignedPreKey,
    one_time: VecDeque<OneTimePreKey>,
    kyber_one_time: VecDeque<SignedPreKey>,
    /// Whether the owner was told its keys run low and has not topped them up since.
    low_reported: bool,
}

fn check_signed(key: &SignedPreKey) -> Result<(), BundleError> {
    if key.public.len() > MAX_KEY_BYTES || key.signature.len() > MAX_KEY_BYTES {
        return Err(BundleError::KeyTooLarge);
    }
    Ok(())
}

fn check_batch(one_time: &[OneTimePreKey], kyber: &[SignedPreKey]) -> Result<(), BundleError> {
    if one_time.iter().any(|k| k.public.len() > MAX_KEY_BYTES) {
        return Err(BundleError::KeyTooLarge);
    }
    kyber.iter().try_for_each(check_signed)
}

impl StoredBundle {
    pub fn new(upload: BundleUpload) -> Result<Self, BundleError> {
        if upload.one_time.len() > MAX_ONE_TIME || upload.kyber_one_time.len() > MAX_KYBER_ONE_TIME {
            return Err(BundleError::TooManyKeys);
        }
        if upload.identity_key.len() > MAX_KEY_BYTES {
            return Err(BundleError::KeyTooLarge);
        }
        check_signed(&upload.signed_pre_key)?;
        check_signed(&upload.kyber_last_resort)?;
        check_batch(&upload.one_time, &upload.kyber_one_time)?;
        Ok(StoredBundle {
            registration_id: upload.registration_id,
            identity_key: upload.identity_key,
            signed_pre_key: upload.signed_pre_key,
            kyber_last_resort: upload.kyber_last_resort,
            one_time: upload.one_time.into(),
            kyber_one_time: upload.kyber_one_time.into(),
            low_reported: false,
        })
    }

    /// Adds one-time keys, up to the caps.
    pub fn add(&mut self, one_time: Vec<OneTimePreKey>, kyber: Vec<SignedPreKey>) -> Result<(), BundleError> {
        if self.one_time.len() + one_time.len() > MAX_ONE_TIME
            || self.kyber_one_time.len() + kyber.len() > MAX_KYBER_ONE_TIME
        {
            return Err(BundleError::TooManyKeys);
        }
        check_batch(&one_time, &kyber)?;
        self.one_time.extend(one_time);
        self.kyber_one_time.extend(kyber);
        self.low_reported = false;
        Ok(())
    }

    /// A bundle for one requester. With `one_time_keys` false (the same requester asked
    /// for this user again recently) it carries only the reusable keys.
    pub fn hand_out(&mut self, one_time_keys: bool) -> PeerBundle {
        let (one_time, kyber) =
            if one_time_keys { (self.one_time.pop_front(), self.kyber_one_time.pop_front()) } else { (None, None) };
        PeerBundle {
            registration_id: self.registration_id,
            identity_key: self.identity_key.clone(),
            signed_pre_key: self.signed_pre_key.clone(),
            one_time,
            kyber: kyber.unwrap_or_else(|| self.kyber_last_resort.clone()),
        }
    }

    /// The owner's identity key, serialized.
    pub fn identity_key(&self) -> &[u8] {
        &self.identity_key
    }

    /// The SHA-256 of the owner's identity key: who this is, across connections.
    pub fn identity_hash(&self) -> [u8; 32] {
        use sha2::Digest;
        sha2::Sha256::digest(&self.identity_key).into()
    }

    /// Counts left, if they ran low and the owner has not been told yet.
    pub fn report_low(&mut self) -> Option<(u32, u32)> {
        let low = self.one_time.len() < LOW_WATER || self.kyber_one_time.len() < LOW_WATER;
        if !low || self.low_reported {
            return None;
        }
        self.low_reported = true;
        Some((self.one_time.len() as u32, self.kyber_one_time.len() as u32))
    }
}
