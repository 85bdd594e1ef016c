//! Media frame encryption (SFrame with its replay window) and encryption at rest (the vault).

pub mod replay;
pub mod secret_bytes;
pub mod sframe;
pub mod vault;

pub use secret_bytes::SecretBytes;
