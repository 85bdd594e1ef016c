//! Key material as stored: zeroed when dropped, and serialized as one byte string.
//!
//! postcard writes a byte string exactly as it writes a `Vec<u8>` (the length, then the
//! bytes), so what was saved before reads the same. But a `Vec<u8>` goes through the
//! serializer one byte at a time: saving the keys that way was most of what an idle
//! client did (a profile of the soak's clients).

use std::fmt;
use std::ops::Deref;

use serde::de::{SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeroize::Zeroizing;

#[derive(Clone, Default, PartialEq, Eq)]
pub struct SecretBytes(Zeroizing<Vec<u8>>);

impl SecretBytes {
    pub fn new(bytes: Vec<u8>) -> SecretBytes {
        SecretBytes(Zeroizing::new(bytes))
    }
}

impl From<Zeroizing<Vec<u8>>> for SecretBytes {
    fn from(bytes: Zeroizing<Vec<u8>>) -> SecretBytes {
        SecretBytes(bytes)
    }
}

impl Deref for SecretBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBytes({} bytes)", self.0.len())
    }
}

impl Serialize for SecretBytes {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for SecretBytes {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<SecretBytes, D::Error> {
        deserializer.deserialize_byte_buf(BytesVisitor)
    }
}

struct BytesVisitor;

impl<'de> Visitor<'de> for BytesVisitor {
    type Value = SecretBytes;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a byte string")
    }

    fn visit_bytes<E>(self, bytes: &[u8]) -> Result<SecretBytes, E> {
        Ok(SecretBytes::new(bytes.to_vec()))
    }

    fn visit_byte_buf<E>(self, bytes: Vec<u8>) -> Result<SecretBytes, E> {
        Ok(SecretBytes::new(bytes))
    }

    /// Formats without byte strings write a sequence of numbers.
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<SecretBytes, A::Error> {
        // Grown as the bytes come, never reserved from a length the input claims.
        let mut bytes = SecretBytes::default();
        while let Some(byte) = seq.next_element()? {
            bytes.0.push(byte);
        }
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postcard_writes_the_same_bytes_as_for_a_vec_and_reads_them_back() {
        for len in [0, 1, 127, 128, 5_000] {
            let plain: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let secret = SecretBytes::new(plain.clone());
            let written = postcard::to_allocvec(&secret).unwrap();
            assert_eq!(written, postcard::to_allocvec(&plain).unwrap());
            let read: SecretBytes = postcard::from_bytes(&written).unwrap();
            assert_eq!(&read[..], &plain[..]);
        }
        assert!(postcard::from_bytes::<SecretBytes>(&[0x80, 0x80, 0x04, 1, 2]).is_err(), "a length past the end");
        assert_eq!(format!("{:?}", SecretBytes::new(vec![42; 3])), "SecretBytes(3 bytes)");
    }

    #[test]
    fn json_numbers_read_as_bytes() {
        let read: SecretBytes = serde_json::from_str("[1,2,255]").unwrap();
        assert_eq!(&read[..], &[1, 2, 255]);
    }
}
