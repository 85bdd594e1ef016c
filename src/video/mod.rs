//! Screen share, the media side: how good the stream can be right now ([`adapt`]), and
//! (to come) capture, the FFmpeg HEVC encoder and decoder. The wire format of a frame's
//! fragments and their reassembly are in `protocol::fragment`; the keys that seal a
//! frame are the session's.

pub mod adapt;
