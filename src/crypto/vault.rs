//! The local vault: one password-protected file per client data directory.
//!
//! The key comes from the password with Argon2id (RFC 9106's second recommendation by
//! default: m = 64 MiB, t = 3, p = 4), the contents are sealed with AES-256-GCM under a
//! fresh random nonce on every write, and writes are atomic, so a crash leaves the old
//! vault or the new one, never a broken one. Layout (big-endian):
//!
//! ```text
//! magic "VOIPCVLT" | version u16 | kdf u8 | m_kib u32 | t u32 | p u32 | salt_len u8 | salt
//! | nonce [12] | key_check [32] | body_len u64 | header_sum [8] | body (ciphertext + tag)
//! ```
//!
//! `key_check` is a hash of the derived key, so a wrong password is told apart from a
//! damaged body; `header_sum` is a hash of the header, so a damaged header is told apart
//! from a wrong password. The whole header is the body's associated data.

use std::path::{Path, PathBuf};

use argon2::{Algorithm, Argon2, Params, Version};
use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::config::files::write_private_atomic;

const MAGIC: &[u8; 8] = b"VOIPCVLT";
const FORMAT_VERSION: u16 = 1;
const KDF_ARGON2ID: u8 = 1;
const SALT_LEN: usize = 16;
const KEY_CHECK_LEN: usize = 32;
const HEADER_SUM_LEN: usize = 8;
const TAG_LEN: usize = 16;

/// The largest vault read: far above 500 messages × many conversations, far below harm.
pub const MAX_VAULT_BYTES: u64 = 256 * 1024 * 1024;

/// Argon2id cost. Stored in the header, so a vault opens with the cost it was made with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KdfParams {
    pub m_kib: u32,
    pub t: u32,
    pub p: u32,
}

impl KdfParams {
    /// RFC 9106, second recommended option: 64 MiB, 3 passes, 4 lanes.
    pub const RECOMMENDED: KdfParams = KdfParams { m_kib: 64 * 1024, t: 3, p: 4 };

    /// Bounds on what a header may ask for, so that a tampered file cannot make us
    /// allocate gigabytes or spin for minutes.
    fn check(self) -> Result<Params, VaultError> {
        let sane = (1..=16).contains(&self.t)
            && (1..=16).contains(&self.p)
            && self.m_kib >= 8 * self.p
            && self.m_kib <= 1024 * 1024;
        if !sane {
            return Err(VaultError::UnsafeParameters(self));
        }
        Params::new(self.m_kib, self.t, self.p, Some(32)).map_err(|_| VaultError::UnsafeParameters(self))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("{path}: no vault here")]
    NotFound { path: PathBuf },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("not a VoIPC vault (wrong magic bytes)")]
    NotAVault,
    #[error("vault format version {0} is newer than this build understands ({FORMAT_VERSION})")]
    UnsupportedVersion(u16),
    #[error("the vault header is damaged (its checksum does not match)")]
    HeaderCorrupt,
    #[error("the vault asks for key-derivation parameters outside safe bounds: {0:?}")]
    UnsafeParameters(KdfParams),
    #[error("the vault is truncated: {actual} bytes of {expected}")]
    Truncated { expected: u64, actual: u64 },
    #[error("the vault has {0} unexpected bytes after its end")]
    TrailingBytes(u64),
    #[error("the vault is larger than {MAX_VAULT_BYTES} bytes")]
    TooLarge,
    #[error("wrong vault password")]
    WrongPassword,
    #[error("the vault contents are damaged (authentication failed with the right password)")]
    BodyCorrupt,
    #[error("the vault already exists at {path}")]
    Exists { path: PathBuf },
}

/// An open vault: where it lives and the key that seals it. Saving does not repeat the
/// slow key derivation; every save gets a fresh nonce.
pub struct Vault {
    path: PathBuf,
    params: KdfParams,
    salt: [u8; SALT_LEN],
    key: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vault").field("path", &self.path).field("params", &self.params).finish_non_exhaustive()
    }
}

struct Header {
    params: KdfParams,
    salt: [u8; SALT_LEN],
    nonce: [u8; NONCE_LEN],
    key_check: [u8; KEY_CHECK_LEN],
    body_len: u64,
}

impl Header {
    const LEN: usize = 8 + 2 + 1 + 4 + 4 + 4 + 1 + SALT_LEN + NONCE_LEN + KEY_CHECK_LEN + 8 + HEADER_SUM_LEN;

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(Self::LEN);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
        out.push(KDF_ARGON2ID);
        out.extend_from_slice(&self.params.m_kib.to_be_bytes());
        out.extend_from_slice(&self.params.t.to_be_bytes());
        out.extend_from_slice(&self.params.p.to_be_bytes());
        out.push(SALT_LEN as u8);
        out.extend_from_slice(&self.salt);
        out.extend_from_slice(&self.nonce);
        out.extend_from_slice(&self.key_check);
        out.extend_from_slice(&self.body_len.to_be_bytes());
        let sum = header_sum(&out);
        out.extend_from_slice(&sum);
        out
    }

    /// Reads and checks a header; the file's length is checked against it by the caller.
    fn decode(bytes: &[u8]) -> Result<Header, VaultError> {
        if !bytes.starts_with(MAGIC) {
            return Err(VaultError::NotAVault);
        }
        let header = bytes
            .get(..Self::LEN)
            .ok_or(VaultError::Truncated { expected: Self::LEN as u64, actual: bytes.len() as u64 })?;
        let (fields, sum) = header.split_at(Self::LEN - HEADER_SUM_LEN);
        if header_sum(fields) != sum {
            return Err(VaultError::HeaderCorrupt);
        }
        let mut reader = Reader(&fields[MAGIC.len()..]);
        let version = u16::from_be_bytes(reader.take());
        if version != FORMAT_VERSION {
            return Err(VaultError::UnsupportedVersion(version));
        }
        let [kdf] = reader.take();
        let params = KdfParams {
            m_kib: u32::from_be_bytes(reader.take()),
            t: u32::from_be_bytes(reader.take()),
            p: u32::from_be_bytes(reader.take()),
        };
        let [salt_len] = reader.take();
        // Only one KDF and salt size exist in this version; the sum vouches for the bytes.
        if kdf != KDF_ARGON2ID || usize::from(salt_len) != SALT_LEN {
            return Err(VaultError::HeaderCorrupt);
        }
        Ok(Header {
            params,
            salt: reader.take(),
            nonce: reader.take(),
            key_check: reader.take(),
            body_len: u64::from_be_bytes(reader.take()),
        })
    }
}

/// Fixed-size reads from a header whose length was checked up front.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let (head, rest) = self.0.split_first_chunk::<N>().expect("header length was checked before reading");
        self.0 = rest;
        *head
    }
}

fn header_sum(fields: &[u8]) -> [u8; HEADER_SUM_LEN] {
    let digest = Sha256::new_with_prefix(b"voipc vault header").chain_update(fields).finalize();
    *digest.first_chunk().expect("SHA-256 is 32 bytes")
}

/// The sealing key: Argon2id of the password.
fn derive(password: &[u8], salt: &[u8; SALT_LEN], params: KdfParams) -> Result<Zeroizing<[u8; 32]>, VaultError> {
    let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params.check()?);
    let mut key = Zeroizing::new([0u8; 32]);
    argon.hash_password_into(password, salt, key.as_mut()).map_err(|_| VaultError::UnsafeParameters(params))?;
    Ok(key)
}

/// A value stored in the header that shows whether a derived key is the right one, so a
/// wrong password is told apart from a damaged body. It reveals no more about the key
/// than the ciphertext does: either lets a guesser test a password, at Argon2's cost.
fn key_check(key: &[u8; 32]) -> [u8; KEY_CHECK_LEN] {
    Sha256::new_with_prefix(b"voipc vault key check").chain_update(key).finalize().into()
}

impl Vault {
    /// Creates a new vault holding `contents`; refuses to overwrite one.
    pub fn create(path: &Path, password: &[u8], params: KdfParams, contents: &[u8]) -> Result<Vault, VaultError> {
        if path.exists() {
            return Err(VaultError::Exists { path: path.to_owned() });
        }
        params.check()?;
        let salt: [u8; SALT_LEN] = rand::random();
        let key = derive(password, &salt, params)?;
        let vault = Vault { path: path.to_owned(), params, salt, key };
        vault.save(contents)?;
        Ok(vault)
    }

    /// Opens a vault and returns it with its contents.
    pub fn open(path: &Path, password: &[u8]) -> Result<(Vault, Zeroizing<Vec<u8>>), VaultError> {
        Vault::open_bytes(path, read_bounded(path)?, password)
    }

    /// [`Vault::open`] of a file's bytes, read already (`path` is where it stays).
    pub(crate) fn open_bytes(
        path: &Path,
        bytes: Vec<u8>,
        password: &[u8],
    ) -> Result<(Vault, Zeroizing<Vec<u8>>), VaultError> {
        let header = Header::decode(&bytes)?;
        let expected = Header::LEN as u64 + header.body_len;
        let actual = bytes.len() as u64;
        if actual < expected {
            return Err(VaultError::Truncated { expected, actual });
        }
        if actual > expected {
            return Err(VaultError::TrailingBytes(actual - expected));
        }
        let key = derive(password, &header.salt, header.params)?;
        if key_check(&key) != header.key_check {
            return Err(VaultError::WrongPassword);
        }
        let (aad, body) = bytes.split_at(Header::LEN);
        let mut plaintext = Zeroizing::new(body.to_vec());
        let opened = sealing_key(&key)
            .open_in_place(Nonce::assume_unique_for_key(header.nonce), Aad::from(aad), plaintext.as_mut())
            .map_err(|_| VaultError::BodyCorrupt)?
            .len();
        plaintext.truncate(opened);
        let vault = Vault { path: path.to_owned(), params: header.params, salt: header.salt, key };
        Ok((vault, plaintext))
    }

    /// Seals `contents` under a fresh nonce and replaces the file atomically. Contents
    /// that would make a file larger than [`Vault::open`] reads are refused, and the old
    /// file stays.
    pub fn save(&self, contents: &[u8]) -> Result<(), VaultError> {
        if (Header::LEN + contents.len() + TAG_LEN) as u64 > MAX_VAULT_BYTES {
            return Err(VaultError::TooLarge);
        }
        let nonce: [u8; NONCE_LEN] = rand::random();
        let header = Header {
            params: self.params,
            salt: self.salt,
            nonce,
            key_check: key_check(&self.key),
            body_len: (contents.len() + TAG_LEN) as u64,
        }
        .encode();
        // Plaintext only until it is sealed in place: the capacity is exact, so no copy of
        // it is left behind by a reallocation, and what is dropped is ciphertext (nothing
        // to zero, which costs as much as the rest of a save in a debug build).
        let mut sealed = Vec::with_capacity(header.len() + contents.len() + TAG_LEN);
        sealed.extend_from_slice(&header);
        sealed.extend_from_slice(contents);
        let tag = sealing_key(&self.key)
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&header[..]),
                &mut sealed[Header::LEN..],
            )
            .expect("AES-GCM seals any message shorter than 64 GiB");
        sealed.extend_from_slice(tag.as_ref());
        write_private_atomic(&self.path, &sealed).map_err(|source| VaultError::Io { path: self.path.clone(), source })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn sealing_key(key: &[u8; 32]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).expect("a 32-byte key fits AES-256-GCM"))
}

fn read_bounded(path: &Path) -> Result<Vec<u8>, VaultError> {
    let io = |source: std::io::Error| VaultError::Io { path: path.to_owned(), source };
    let metadata = match std::fs::metadata(path) {
        Ok(metadata) => metadata,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(VaultError::NotFound { path: path.to_owned() });
        }
        Err(e) => return Err(io(e)),
    };
    if metadata.len() > MAX_VAULT_BYTES {
        return Err(VaultError::TooLarge);
    }
    std::fs::read(path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cheap parameters: these tests are about the format, not the cost.
    const FAST: KdfParams = KdfParams { m_kib: 64, t: 1, p: 1 };

    fn vault_in(dir: &Path, contents: &[u8]) -> PathBuf {
        let path = dir.join("vault");
        Vault::create(&path, b"correct horse", FAST, contents).unwrap();
        path
    }

    #[test]
    fn round_trip_and_resave() {
        let dir = tempfile::tempdir().unwrap();
        let path = vault_in(dir.path(), b"identity and history");
        let (vault, contents) = Vault::open(&path, b"correct horse").unwrap();
        assert_eq!(&contents[..], b"identity and history");
        let first = std::fs::read(&path).unwrap();
        vault.save(b"more history").unwrap();
        let second = std::fs::read(&path).unwrap();
        assert_ne!(first[..Header::LEN], second[..Header::LEN], "every write has a fresh nonce");
        let (_, contents) = Vault::open(&path, b"correct horse").unwrap();
        assert_eq!(&contents[..], b"more history");
        assert!(!String::from_utf8_lossy(&second).contains("history"), "contents are not in the clear");
        assert!(matches!(Vault::create(&path, b"x", FAST, b""), Err(VaultError::Exists { .. })));
    }

    #[test]
    fn save_refuses_what_open_would_refuse() {
        let dir = tempfile::tempdir().unwrap();
        let path = vault_in(dir.path(), b"small");
        let (vault, _) = Vault::open(&path, b"correct horse").unwrap();
        let largest = MAX_VAULT_BYTES as usize - Header::LEN - TAG_LEN;
        let too_big = vec![0u8; largest + 1];
        assert!(matches!(vault.save(&too_big), Err(VaultError::TooLarge)));
        let (_, contents) = Vault::open(&path, b"correct horse").unwrap();
        assert_eq!(&contents[..], b"small", "the old vault stays");
    }

    #[test]
    fn recommended_parameters_are_stored_in_the_header() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vault");
        Vault::create(&path, b"pw", KdfParams::RECOMMENDED, b"x").unwrap();
        let header = Header::decode(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(header.params, KdfParams { m_kib: 65536, t: 3, p: 4 });
        let (vault, contents) = Vault::open(&path, b"pw").unwrap();
        assert_eq!((vault.params, &contents[..]), (KdfParams::RECOMMENDED, &b"x"[..]));
    }

    #[test]
    fn wrong_password_is_reported_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let path = vault_in(dir.path(), b"secret");
        assert!(matches!(Vault::open(&path, b"Correct horse"), Err(VaultError::WrongPassword)));
        assert!(matches!(Vault::open(&dir.path().join("none"), b"x"), Err(VaultError::NotFound { .. })));
    }

    #[test]
    fn truncation_and_extra_bytes_are_reported_and_the_file_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = vault_in(dir.path(), b"secret contents");
        let whole = std::fs::read(&path).unwrap();
        for len in [0, 5, Header::LEN - 1, Header::LEN, whole.len() - 1] {
            std::fs::write(&path, &whole[..len]).unwrap();
            let result = Vault::open(&path, b"correct horse");
            match len {
                0 | 5 => assert!(matches!(result, Err(VaultError::NotAVault)), "{len}: {result:?}"),
                _ => assert!(matches!(result, Err(VaultError::Truncated { .. })), "{len}: {result:?}"),
            }
            assert_eq!(std::fs::read(&path).unwrap(), &whole[..len], "opening never writes");
        }
        let mut longer = whole.clone();
        longer.push(0);
        std::fs::write(&path, &longer).unwrap();
        assert!(matches!(Vault::open(&path, b"correct horse"), Err(VaultError::TrailingBytes(1))));
    }

    #[test]
    fn every_single_bit_flip_is_reported_as_damage_never_as_a_wrong_password() {
        let dir = tempfile::tempdir().unwrap();
        let path = vault_in(dir.path(), b"secret");
        let whole = std::fs::read(&path).unwrap();
        for bit in 0..whole.len() * 8 {
            let mut flipped = whole.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            std::fs::write(&path, &flipped).unwrap();
            let result = Vault::open(&path, b"correct horse");
            let in_header = bit / 8 < Header::LEN;
            let ok = match &result {
                Err(VaultError::NotAVault) => bit / 8 < MAGIC.len(),
                Err(VaultError::HeaderCorrupt) => in_header,
                Err(VaultError::BodyCorrupt) => !in_header,
                _ => false,
            };
            assert!(ok, "bit {bit} (byte {}): {result:?}", bit / 8);
        }
    }

    #[test]
    fn a_tampered_header_cannot_ask_for_huge_costs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vault");
        let header = Header {
            params: KdfParams { m_kib: u32::MAX, t: 3, p: 4 },
            salt: [0; SALT_LEN],
            nonce: [0; NONCE_LEN],
            key_check: [0; KEY_CHECK_LEN],
            body_len: 0,
        };
        std::fs::write(&path, header.encode()).unwrap();
        assert!(matches!(Vault::open(&path, b"x"), Err(VaultError::UnsafeParameters(_))));
    }

    #[test]
    fn an_interrupted_write_leaves_the_old_vault() {
        let dir = tempfile::tempdir().unwrap();
        let path = vault_in(dir.path(), b"old");
        let (vault, _) = Vault::open(&path, b"correct horse").unwrap();
        // A crash mid-write leaves at most a partial temporary file beside the vault ...
        let tmp = dir.path().join(format!(".vault.tmp-{}-0123456789abcdef", std::process::id()));
        std::fs::write(&tmp, b"VOIPCVLT partial").unwrap();
        let (_, contents) = Vault::open(&path, b"correct horse").unwrap();
        assert_eq!(&contents[..], b"old");
        // (A write that fails before its rename leaves the old file: `config::files`.)
        std::fs::remove_file(&tmp).unwrap();
        vault.save(b"new").unwrap();
        assert_eq!(&Vault::open(&path, b"correct horse").unwrap().1[..], b"new");
    }
}
