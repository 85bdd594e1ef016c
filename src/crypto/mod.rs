//! Encryption at rest and, later, of media frames.

pub mod vault;
