//! The one integration test binary: the real `voipc` executable, driven as a user would.
#![allow(clippy::disallowed_methods, reason = "tests wait on real processes with real deadlines")]

mod support;

mod chat;
mod cli;
mod devices;
mod relay;
mod screen;
mod video;
mod voice;
