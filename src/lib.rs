//! VoIPC: a privacy-first, self-hosted voice and chat system. One crate, one binary:
//! `voipc serve` (the relay), `voipc join` (a headless client), `voipc bench`.
//!
//! Layout and import direction follow `DESIGN.md`: `protocol` (pure wire types) ←
//! `relay`, `session` (sans-IO cores) ← `net` (sockets, tasks, clock) ← `cli`.

pub mod audio;
pub mod bench;
pub mod cli;
pub mod config;
pub mod crypto;
pub mod e2ee;
#[doc(hidden)]
pub mod fuzz;
pub mod gui;
pub mod net;
pub mod protocol;
pub mod relay;
pub mod session;
pub mod video;
