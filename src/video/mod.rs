//! Screen share, the media side: how good the stream can be right now ([`adapt`]), what
//! it shows ([`capture`]: [`x11`], on Wayland [`portal`], `windows`; [`captured`]), HEVC through FFmpeg ([`codec`], [`picture`]) and Y4M files
//! ([`y4m`]). The wire format of a frame's fragments and their reassembly are in
//! `protocol::fragment`; the keys that seal a frame are the session's; the threads that
//! run all this are in `net::screen`.

pub mod adapt;
pub mod capture;
pub mod captured;
pub mod codec;
pub mod picture;
#[cfg(target_os = "linux")]
pub mod portal;
#[cfg(windows)]
pub mod windows;
#[cfg(unix)]
pub mod x11;
pub mod y4m;
