//! Screen share, the media side: how good the stream can be right now ([`adapt`]), what
//! it shows ([`capture`], and on Wayland [`portal`]), HEVC through FFmpeg ([`codec`], [`picture`]) and Y4M files
//! ([`y4m`]). The wire format of a frame's fragments and their reassembly are in
//! `protocol::fragment`; the keys that seal a frame are the session's; the threads that
//! run all this are in `net::screen`.

pub mod adapt;
pub mod capture;
pub mod codec;
pub mod picture;
#[cfg(target_os = "linux")]
pub mod portal;
pub mod y4m;
