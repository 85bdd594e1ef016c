//! Media frame encryption (SFrame with its replay window) and encryption at rest (the vault).

pub mod replay;
pub mod sframe;
pub mod vault;
