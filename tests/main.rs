//! The one integration test binary: the real `voipc` executable, driven as a user would.

mod support;

mod cli;
mod relay;
