//! SFrame (RFC 9605) with the cipher suite AES_256_GCM_SHA512_128, the media frame
//! encryption of every voice and screen packet.
//!
//! A packet on the wire is `metadata || sframe header || ciphertext || tag`, where the
//! metadata is our media header (stream type, channel, sender, sequence, timestamp,
//! flags): it is authenticated as part of the AAD, so a packet moved to another channel,
//! sender or stream fails to open. The nonce is the key's salt XOR the packet counter,
//! and a [`Sealer`] never uses a counter twice.

use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce, Tag};
use hkdf::Hkdf;
use sha2::Sha512;
use zeroize::Zeroizing;

use super::replay::{ReplayError, ReplayWindow};

/// RFC 9605 section 8.1: AES_256_GCM_SHA512_128.
pub const CIPHER_SUITE: u16 = 0x0005;
const KEY_LEN: usize = 32;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// The longest SFrame header: a config byte, an 8-byte KID and an 8-byte counter.
pub const MAX_HEADER_LEN: usize = 17;
/// What SFrame adds to a payload at most.
pub const MAX_OVERHEAD: usize = MAX_HEADER_LEN + TAG_LEN;

/// Packets sealed under one key before its sender must start a new epoch. AES-GCM's
/// confidentiality bound for one key is about 2^32 messages; a counter nonce never
/// repeats below 2^64, so this is the tighter of the two, with margin.
pub const KEY_PACKET_LIMIT: u64 = 1 << 32;
/// A sender asks for a new epoch this many packets before the limit.
pub const REKEY_MARGIN: u64 = 1 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SframeError {
    #[error("the sframe header is truncated")]
    Truncated,
    #[error("the packet is for key {got:#x}, not {want:#x}")]
    WrongKey { got: u64, want: u64 },
    #[error("the packet does not authenticate")]
    Authentication,
    #[error("this key has sealed all the packets it may")]
    KeyExhausted,
    #[error(transparent)]
    Replay(#[from] ReplayError),
}

/// The SFrame header: key id and counter, each either inline (values below 8) or as a
/// minimal big-endian integer of 1-8 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kid: u64,
    pub ctr: u64,
}

impl Header {
    pub fn encode(&self, out: &mut Vec<u8>) {
        let (kid_bits, kid_len) = field(self.kid);
        let (ctr_bits, ctr_len) = field(self.ctr);
        out.push((kid_bits << 4) | ctr_bits);
        out.extend_from_slice(&self.kid.to_be_bytes()[8 - kid_len..]);
        out.extend_from_slice(&self.ctr.to_be_bytes()[8 - ctr_len..]);
    }

    /// Bytes of the encoded header.
    pub fn encoded_len(&self) -> usize {
        1 + field(self.kid).1 + field(self.ctr).1
    }

    /// The header at the start of `bytes` and its length.
    pub fn parse(bytes: &[u8]) -> Result<(Header, usize), SframeError> {
        let config = *bytes.first().ok_or(SframeError::Truncated)?;
        let mut at = 1;
        let mut read = |bits: u8| -> Result<u64, SframeError> {
            if bits & 0b1000 == 0 {
                return Ok(u64::from(bits));
            }
            let len = usize::from(bits & 0b111) + 1;
            let slice = bytes.get(at..at + len).ok_or(SframeError::Truncated)?;
            at += len;
            Ok(slice.iter().fold(0, |value, byte| (value << 8) | u64::from(*byte)))
        };
        let kid = read(config >> 4)?;
        let ctr = read(config & 0x0f)?;
        Ok((Header { kid, ctr }, at))
    }
}

/// The 4 header bits of one field (X/K or Y/C) and how many bytes follow.
fn field(value: u64) -> (u8, usize) {
    if value < 8 {
        return (value as u8, 0);
    }
    let len = 8 - (value.leading_zeros() / 8) as usize;
    (0b1000 | (len as u8 - 1), len)
}

/// A key derived from a base key for one KID (RFC 9605 section 4.4.2).
pub struct Key {
    kid: u64,
    cipher: Aes256Gcm,
    salt: [u8; NONCE_LEN],
}

impl Key {
    pub fn derive(kid: u64, base_key: &[u8]) -> Key {
        let (key, salt) = derive_key_salt(kid, base_key);
        let cipher = Aes256Gcm::new_from_slice(key.as_slice()).expect("the derived key has the cipher's length");
        Key { kid, cipher, salt }
    }

    pub fn kid(&self) -> u64 {
        self.kid
    }

    fn nonce(&self, ctr: u64) -> [u8; NONCE_LEN] {
        let mut nonce = self.salt;
        for (n, c) in nonce[NONCE_LEN - 8..].iter_mut().zip(ctr.to_be_bytes()) {
            *n ^= c;
        }
        nonce
    }

    /// Seals `plaintext` under counter `ctr`, appending `header || ciphertext || tag` to
    /// `out` (which already holds `metadata` or not; only the AAD needs it).
    fn seal_at(&self, ctr: u64, metadata: &[u8], plaintext: &[u8], out: &mut Vec<u8>) {
        let start = out.len();
        Header { kid: self.kid, ctr }.encode(out);
        let header_end = out.len();
        out.extend_from_slice(plaintext);
        let (head, body) = out.split_at_mut(header_end);
        let aad = [&head[start..], metadata].concat();
        let tag = self
            .cipher
            .encrypt_in_place_detached(Nonce::from_slice(&self.nonce(ctr)), &aad, body)
            .expect("AES-GCM seals any payload shorter than 64 GiB");
        out.extend_from_slice(&tag);
    }

    /// Opens `packet` (header, ciphertext, tag) whose header is already parsed.
    fn open_parsed(
        &self,
        header: Header,
        header_len: usize,
        metadata: &[u8],
        packet: &[u8],
    ) -> Result<Vec<u8>, SframeError> {
        if header.kid != self.kid {
            return Err(SframeError::WrongKey { got: header.kid, want: self.kid });
        }
        let body = &packet[header_len..];
        if body.len() < TAG_LEN {
            return Err(SframeError::Truncated);
        }
        let (ciphertext, tag) = body.split_at(body.len() - TAG_LEN);
        let aad = [&packet[..header_len], metadata].concat();
        let mut plaintext = ciphertext.to_vec();
        self.cipher
            .decrypt_in_place_detached(
                Nonce::from_slice(&self.nonce(header.ctr)),
                &aad,
                &mut plaintext,
                Tag::from_slice(tag),
            )
            .map_err(|_| SframeError::Authentication)?;
        Ok(plaintext)
    }
}

fn derive_key_salt(kid: u64, base_key: &[u8]) -> (Zeroizing<[u8; KEY_LEN]>, [u8; NONCE_LEN]) {
    let secret = Hkdf::<Sha512>::new(Some(&[]), base_key);
    let label = |what: &[u8]| [b"SFrame 1.0 Secret ", what, &kid.to_be_bytes(), &CIPHER_SUITE.to_be_bytes()].concat();
    let mut key = Zeroizing::new([0; KEY_LEN]);
    let mut salt = [0; NONCE_LEN];
    secret.expand(&label(b"key "), key.as_mut()).expect("32 bytes is a valid HKDF-SHA512 output length");
    secret.expand(&label(b"salt "), &mut salt).expect("12 bytes is a valid HKDF-SHA512 output length");
    (key, salt)
}

/// The sending side of one key: its counter only goes up.
pub struct Sealer {
    key: Key,
    next_ctr: u64,
    limit: u64,
}

impl Sealer {
    pub fn new(kid: u64, base_key: &[u8]) -> Sealer {
        Sealer::with_limit(kid, base_key, KEY_PACKET_LIMIT)
    }

    /// A sealer that stops after `limit` packets (tests use small limits).
    pub fn with_limit(kid: u64, base_key: &[u8], limit: u64) -> Sealer {
        Sealer { key: Key::derive(kid, base_key), next_ctr: 0, limit }
    }

    pub fn kid(&self) -> u64 {
        self.key.kid
    }

    /// Appends the SFrame packet for `plaintext` to `out`; `metadata` is authenticated.
    pub fn seal(&mut self, metadata: &[u8], plaintext: &[u8], out: &mut Vec<u8>) -> Result<(), SframeError> {
        if self.next_ctr >= self.limit {
            return Err(SframeError::KeyExhausted);
        }
        self.key.seal_at(self.next_ctr, metadata, plaintext, out);
        self.next_ctr += 1;
        Ok(())
    }

    /// Bytes the next [`Sealer::seal`] of `plaintext_len` bytes appends.
    pub fn sealed_len(&self, plaintext_len: usize) -> usize {
        Header { kid: self.key.kid, ctr: self.next_ctr }.encoded_len() + plaintext_len + TAG_LEN
    }

    /// Whether the sender should start a new epoch soon, before the key runs out.
    pub fn needs_new_key(&self) -> bool {
        self.next_ctr.saturating_add(REKEY_MARGIN.min(self.limit / 2)) >= self.limit
    }
}

/// The receiving side of one key: authenticated packets move its replay window.
pub struct Opener {
    key: Key,
    window: ReplayWindow,
}

impl Opener {
    pub fn new(kid: u64, base_key: &[u8]) -> Opener {
        Opener { key: Key::derive(kid, base_key), window: ReplayWindow::default() }
    }

    pub fn kid(&self) -> u64 {
        self.key.kid
    }

    /// Opens an SFrame packet. A duplicate or a packet too old for the window is refused
    /// before decrypting; the window moves only once the packet authenticates.
    pub fn open(&mut self, metadata: &[u8], packet: &[u8]) -> Result<Vec<u8>, SframeError> {
        let (header, header_len) = Header::parse(packet)?;
        self.window.check(header.ctr)?;
        let plaintext = self.key.open_parsed(header, header_len, metadata, packet)?;
        self.window.accept(header.ctr);
        Ok(plaintext)
    }
}

/// The KID of a sender's key in one epoch: the sender's session id above, the epoch below.
pub fn media_kid(sender: u32, epoch: u32) -> u64 {
    (u64::from(sender) << 32) | u64::from(epoch & EPOCH_MASK)
}

/// Epoch numbers use 31 bits: the top bit of a KID's lower half marks the screen key.
pub const EPOCH_MASK: u32 = 0x7fff_ffff;
const SCREEN_BIT: u32 = 0x8000_0000;

/// The KID of a sender's screen-share key in one epoch: a key of its own beside the
/// voice key, derived from the same base key (the KID is part of the derivation), so
/// the two never share a counter.
pub fn screen_kid(sender: u32, epoch: u32) -> u64 {
    media_kid(sender, (epoch & EPOCH_MASK) | SCREEN_BIT)
}

/// The KID of an SFrame packet, without opening it.
pub fn peek_kid(packet: &[u8]) -> Result<u64, SframeError> {
    Header::parse(packet).map(|(header, _)| header.kid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unhex(s: &str) -> Vec<u8> {
        hex::decode(s.split_whitespace().collect::<String>()).unwrap()
    }

    /// RFC 9605 appendix C.1: header encodings, a sample across all lengths.
    #[test]
    fn headers_match_the_rfc_vectors() {
        let vectors: &[(u64, u64, &str)] = &[
            (0, 0, "00"),
            (7, 7, "77"),
            (0x100, 0, "900100"),
            (0x100, 0xff, "980100ff"),
            (0xffff, 0x100, "99ffff0100"),
            (0x10000, 0xffff_ffff_ffff_ffff, "af010000ffffffffffffffff"),
            (0xffff_ffff, 0x0100_0000_0000_0000, "bfffffffff0100000000000000"),
            (0x0001_0000_0000_0000, 0, "e001000000000000"),
            (0xffff_ffff_ffff_ffff, 0x0100_0000_0000_0000, "ffffffffffffffffff0100000000000000"),
            (0x123, 0x4567, "9901234567"),
        ];
        for &(kid, ctr, hex) in vectors {
            let mut out = Vec::new();
            Header { kid, ctr }.encode(&mut out);
            assert_eq!(hex::encode(&out), hex, "kid {kid:#x} ctr {ctr:#x}");
            assert_eq!(Header { kid, ctr }.encoded_len(), out.len());
            assert_eq!(Header::parse(&out), Ok((Header { kid, ctr }, out.len())));
        }
    }

    /// RFC 9605 appendix C.3, cipher suite 0x0005 (AES_256_GCM_SHA512_128).
    #[test]
    fn encryption_matches_the_rfc_vector() {
        let base_key = unhex("000102030405060708090a0b0c0d0e0f");
        let (key, salt) = derive_key_salt(0x123, &base_key);
        assert_eq!(key.as_slice(), unhex("d3e27b0d4a5ae9e55df01a70e6d4d28d 969b246e2936f4b7a5d9b494da6b9633"));
        assert_eq!(salt.as_slice(), unhex("84991c167b8cd23c93708ec7"));
        let key = Key::derive(0x123, &base_key);
        assert_eq!(key.nonce(0x4567).as_slice(), unhex("84991c167b8cd23c9370cba0"));

        let metadata = unhex("4945544620534672616d65205747");
        let plaintext = unhex("64726166742d696574662d736672616d 652d656e63");
        let expected = unhex("990123456794f509d36e9beacb0e261d 99c7d1e972f1fed787d4049f17ca2135 3c1cc24d56ceabced279");
        let mut out = Vec::new();
        key.seal_at(0x4567, &metadata, &plaintext, &mut out);
        assert_eq!(out, expected);

        let mut opener = Opener::new(0x123, &base_key);
        assert_eq!(opener.open(&metadata, &expected).unwrap(), plaintext);
    }

    #[test]
    fn the_metadata_is_bound() {
        let mut sealer = Sealer::new(media_kid(1, 0), &[7; 32]);
        let mut packet = Vec::new();
        sealer.seal(b"channel 1 sender 1 voice", b"opus", &mut packet).unwrap();
        let mut opener = Opener::new(media_kid(1, 0), &[7; 32]);
        assert_eq!(opener.open(b"channel 2 sender 1 voice", &packet), Err(SframeError::Authentication));
        assert_eq!(opener.open(b"channel 1 sender 1 voice", &packet).unwrap(), b"opus");
    }

    #[test]
    fn damage_anywhere_is_refused_and_moves_nothing() {
        let mut sealer = Sealer::new(9, &[3; 32]);
        let mut packet = Vec::new();
        sealer.seal(b"m", b"payload", &mut packet).unwrap();
        for i in 0..packet.len() {
            for bit in 0..8 {
                let mut bad = packet.clone();
                bad[i] ^= 1 << bit;
                let mut opener = Opener::new(9, &[3; 32]);
                assert!(opener.open(b"m", &bad).is_err(), "byte {i} bit {bit}");
                // The damaged copy did not move the window: the real packet still opens.
                assert_eq!(opener.open(b"m", &packet).unwrap(), b"payload", "byte {i} bit {bit}");
            }
        }
        for len in 0..packet.len() {
            assert!(Opener::new(9, &[3; 32]).open(b"m", &packet[..len]).is_err());
        }
    }

    #[test]
    fn headers_from_random_bytes_parse_or_fail_cleanly() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let mut opener = Opener::new(5, &[1; 32]);
        for _ in 0..50_000 {
            let bytes: Vec<u8> = (0..rng.random_range(0..40)).map(|_| rng.random()).collect();
            if let Ok((header, len)) = Header::parse(&bytes) {
                assert!(len <= bytes.len() && len <= MAX_HEADER_LEN);
                let mut again = Vec::new();
                header.encode(&mut again);
                assert!(again.len() <= len, "a minimal encoding is never longer");
            }
            assert!(opener.open(b"", &bytes).is_err());
        }
    }

    #[test]
    fn a_key_stops_at_its_limit_and_asks_for_a_new_one_before() {
        let mut sealer = Sealer::with_limit(1, &[1; 32], 8);
        let mut out = Vec::new();
        for _ in 0..3 {
            sealer.seal(b"", b"x", &mut out).unwrap();
        }
        assert!(!sealer.needs_new_key());
        sealer.seal(b"", b"x", &mut out).unwrap();
        assert!(sealer.needs_new_key());
        for _ in 4..8 {
            sealer.seal(b"", b"x", &mut out).unwrap();
        }
        assert_eq!(sealer.seal(b"", b"x", &mut out), Err(SframeError::KeyExhausted));
    }

    #[test]
    fn the_cipher_state_is_wiped_when_a_key_is_dropped() {
        fn wiped_on_drop<T: zeroize::ZeroizeOnDrop>() {}
        wiped_on_drop::<aes::Aes256>();
    }
}
