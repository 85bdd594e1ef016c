//! The baseline: a plain-UDP fan-out relay with no encryption, no congestion control and
//! no checks, in its own process. Whatever it reaches is what the machine itself allows.

use std::collections::HashSet;
use std::net::{SocketAddr, UdpSocket};

/// What a load client sends first; the relay answers with the same bytes.
pub const REGISTER: &[u8] = b"voipc-bench-register";

/// Runs forever: every datagram from a registered address goes to every other one.
pub fn run(listen: SocketAddr) -> anyhow::Result<()> {
    let socket = UdpSocket::bind(listen)?;
    let line = serde_json::json!({ "event": "listening", "addr": socket.local_addr()?.to_string() });
    println!("{line}");
    let mut members: Vec<SocketAddr> = Vec::new();
    let mut known: HashSet<SocketAddr> = HashSet::new();
    let mut buf = [0u8; 2048];
    loop {
        let (len, from) = socket.recv_from(&mut buf)?;
        if &buf[..len] == REGISTER {
            if known.insert(from) {
                members.push(from);
            }
            socket.send_to(REGISTER, from)?;
            continue;
        }
        if !known.contains(&from) {
            continue;
        }
        for member in members.iter().filter(|m| **m != from) {
            // A full socket buffer loses the datagram, as a real relay would.
            let _ = socket.send_to(&buf[..len], member);
        }
    }
}
