//! The only home of sockets, tasks and the wall clock: quinn endpoints that drive the
//! sans-IO cores in `relay/` and `session/`.
#![allow(clippy::disallowed_methods, reason = "net/ is the shell that reads the clock for the cores")]

pub mod client;
pub mod framing;
pub mod server;
pub mod tls;

use std::sync::Arc;
use std::time::Duration;

/// QUIC transport settings both sides share: one control stream, datagrams on,
/// keep-alives well inside the idle timeout.
pub fn transport_config() -> Arc<quinn::TransportConfig> {
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(1u8.into())
        .max_concurrent_uni_streams(0u8.into())
        .stream_receive_window((256u32 * 1024).into())
        .max_idle_timeout(Some(Duration::from_secs(30).try_into().expect("30 s is a valid idle timeout")))
        .keep_alive_interval(Some(Duration::from_secs(5)))
        .datagram_receive_buffer_size(Some(2 * 1024 * 1024))
        .datagram_send_buffer_size(2 * 1024 * 1024);
    Arc::new(transport)
}
