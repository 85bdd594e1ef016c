//! Channel passwords, kept only as Argon2id hashes (PHC strings).
//!
//! Hashing is deliberately slow, so the relay core never does it inline: it asks its
//! shell to (see [`super::Output::HashPassword`] and [`super::Output::VerifyPassword`]).

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};

/// Bytes of random salt per hash.
pub const SALT_LEN: usize = 16;

/// Hashes a password with Argon2id (the crate's defaults: m = 19 MiB, t = 2, p = 1).
pub fn hash(password: &str, salt: &[u8; SALT_LEN]) -> String {
    let salt = SaltString::encode_b64(salt).expect("16 bytes are a valid Argon2 salt");
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .expect("Argon2 with fixed parameters hashes any password shorter than 4 GiB")
        .to_string()
}

/// Hashes with a fresh random salt from the operating system.
pub fn hash_with_random_salt(password: &str) -> String {
    hash(password, &rand::random())
}

/// Whether `password` matches the PHC string `phc`; an unreadable hash matches nothing.
pub fn verify(password: &str, phc: &str) -> bool {
    PasswordHash::new(phc).is_ok_and(|parsed| Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_verifies_only_the_right_password() {
        let phc = hash("hunter2", &[7; SALT_LEN]);
        assert!(phc.starts_with("$argon2id$"), "{phc}");
        assert!(!phc.contains("hunter2"));
        assert!(verify("hunter2", &phc));
        assert!(!verify("hunter3", &phc));
        assert!(!verify("hunter2", "not a hash"));
    }
}
