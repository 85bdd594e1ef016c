//! The only home of sockets, tasks and the wall clock: quinn endpoints that drive the
//! sans-IO cores in `relay/` and `session/`.
#![allow(clippy::disallowed_methods, reason = "net/ is the shell that reads the clock for the cores")]

pub mod client;
pub mod framing;
pub mod screen;
pub mod server;
mod timer;
pub mod tls;

use std::net::SocketAddr;
use std::time::Duration;

/// Bytes of datagrams quinn holds for one receiver at the server; media beyond it waits
/// in the receiver's leg (fair between senders, dropped when late). Meant to be small
/// (4 KiB: about 33 ms at 1 Mbit/s); kept large until the handshake-flood test, which
/// lost 4-9 of a talker's 600 packets here with either size, says which costs what.
pub const SERVER_DATAGRAM_BUFFER: usize = 2 * 1024 * 1024;
/// Bytes of datagrams quinn holds for a client's uplink: voice goes straight in, screen
/// fragments only while little waits (see `screen::ScreenShell`).
pub const CLIENT_DATAGRAM_BUFFER: usize = 64 * 1024;

/// QUIC transport settings both sides share: one control stream, datagrams on (holding
/// at most `datagram_send_buffer` bytes before quinn drops the oldest), keep-alives well
/// inside the idle timeout, and a fixed 1200-byte path MTU (no discovery): every hop then
/// carries the same datagram sizes, and a screen fragment fits WireGuard and OpenVPN
/// tunnels.
///
/// Until the first round trip is measured, quinn takes it to be `initial_rtt`, and a lost
/// handshake packet is sent again after three times that, doubling each time.
pub fn transport_config(datagram_send_buffer: usize, initial_rtt: Duration) -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(1u8.into())
        .max_concurrent_uni_streams(0u8.into())
        .stream_receive_window((256u32 * 1024).into())
        .initial_rtt(initial_rtt)
        .max_idle_timeout(Some(Duration::from_secs(30).try_into().expect("30 s is a valid idle timeout")))
        .keep_alive_interval(Some(Duration::from_secs(5)))
        .datagram_receive_buffer_size(Some(2 * 1024 * 1024))
        .datagram_send_buffer_size(datagram_send_buffer)
        .initial_mtu(1200)
        .mtu_discovery_config(None);
    transport
}

/// The round trip a client assumes before it has measured one: 100 ms, as Chromium's QUIC
/// does, not RFC 9002's 333 ms. At 333 ms a lost first flight is probed again only after
/// 1 s, doubling: through the impairer at 30 % loss each way, the median of 50 concurrent
/// handshakes (to the welcome) was 1.05-1.83 s in 15 runs of `bench handshakes`, and
/// 0.38-1.0 s in 18 runs at 100 ms (both sides). A path slower than 100 ms (a satellite
/// link) pays a spurious probe or two of at most 1200 bytes.
pub const CLIENT_INITIAL_RTT: Duration = Duration::from_millis(100);

/// The server keeps RFC 9002's 333 ms. Towards an address not yet validated quinn lets
/// the server send one full datagram past three times what it received (quinn issue
/// 1082). By default every address is validated first (a Retry), but with Retry only
/// under load (`retry_above_pending_handshakes` above 0) a server probing every 300 ms
/// whose answers never arrived reached that within 4 s (3.15x, `bench amplification`);
/// at 333 ms it got there too, later (within 12 s). Under the default Retry, 100 ms would
/// be safe here as well: not measured yet.
pub const SERVER_INITIAL_RTT: Duration = Duration::from_millis(333);

/// Bytes the kernel may hold for the server's UDP socket while the server is busy (a burst
/// of handshakes, a flood): beyond it every datagram is dropped, the talk of everyone
/// else with it. The kernel's default (208 KiB here) is a few milliseconds of a busy
/// server's traffic; Linux grants up to `net.core.rmem_max` (4 MiB on Debian 12).
pub const SERVER_SOCKET_BUFFER: usize = 4 * 1024 * 1024;

/// A UDP socket bound to `addr` whose kernel buffers (both ways) hold up to `buffer`
/// bytes, or as much as the kernel allows; the receive buffer it got, in bytes.
pub fn bind_udp(addr: SocketAddr, buffer: usize) -> std::io::Result<(std::net::UdpSocket, usize)> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    // Asking for more than the kernel allows is not an error: it grants its maximum.
    socket.set_recv_buffer_size(buffer)?;
    socket.set_send_buffer_size(buffer)?;
    socket.bind(&addr.into())?;
    // Linux reports twice what it grants (the rest is its bookkeeping).
    let granted = socket.recv_buffer_size()? / 2;
    Ok((socket.into(), granted))
}
