//! The baseline: a plain-UDP fan-out relay with no encryption, no congestion control and
//! no checks, in its own process. Whatever it reaches is what the machine itself allows.
//!
//! Two of them: the batched one (the default, and the baseline the bench compares with)
//! takes up to [`BATCH`] datagrams with one `recvmmsg` and sends every delivery of the
//! whole batch with `sendmmsg`, pointing at the received bytes (no copy); the naive one
//! makes one `recv_from` and one `send_to` per datagram and delivery, as a relay written
//! the obvious way does.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};

/// What a load client sends first, then its channel's number (u16, big-endian); the
/// relay answers with the same bytes.
pub const REGISTER: &[u8] = b"voipc-bench-register";
/// Datagrams taken by one `recvmmsg`.
const BATCH: usize = 32;
/// Deliveries handed to one `sendmmsg` at most (the kernel's own limit is 1024).
const SEND_BATCH: usize = 1024;
const MAX_DATAGRAM: usize = 2048;

/// Who is in which channel.
#[derive(Default)]
struct Channels {
    members: HashMap<u16, Vec<SocketAddr>>,
    channel_of: HashMap<SocketAddr, u16>,
}

impl Channels {
    /// Takes a registration (adding `from` to its channel once, and out of any other: a
    /// later level's socket may get the port of an earlier one); whether it was one.
    fn register(&mut self, datagram: &[u8], from: SocketAddr) -> bool {
        let Some(rest) = datagram.strip_prefix(REGISTER) else { return false };
        let channel = match rest {
            [a, b] => u16::from_be_bytes([*a, *b]),
            _ => 0,
        };
        match self.channel_of.insert(from, channel) {
            Some(old) if old == channel => {}
            old => {
                if let Some(members) = old.and_then(|old| self.members.get_mut(&old)) {
                    members.retain(|m| *m != from);
                }
                self.members.entry(channel).or_default().push(from);
            }
        }
        true
    }

    /// Everyone in the channel of `from` but `from` (nobody for a stranger).
    fn others(&self, from: SocketAddr) -> impl Iterator<Item = &SocketAddr> {
        let members = self.channel_of.get(&from).and_then(|c| self.members.get(c));
        members.into_iter().flatten().filter(move |m| **m != from)
    }
}

/// Runs forever: every datagram from a registered address goes to every other member of
/// its channel.
pub fn run(listen: SocketAddr, naive: bool) -> anyhow::Result<()> {
    let socket = UdpSocket::bind(listen)?;
    let line = serde_json::json!({ "event": "listening", "addr": socket.local_addr()?.to_string() });
    println!("{line}");
    if naive { run_naive(&socket) } else { run_batched(&socket) }
}

fn run_naive(socket: &UdpSocket) -> anyhow::Result<()> {
    let mut channels = Channels::default();
    let mut buf = [0u8; MAX_DATAGRAM];
    loop {
        let (len, from) = socket.recv_from(&mut buf)?;
        if channels.register(&buf[..len], from) {
            socket.send_to(&buf[..len], from)?;
            continue;
        }
        for member in channels.others(from) {
            // A full socket buffer loses the datagram, as a real relay would.
            let _ = socket.send_to(&buf[..len], member);
        }
    }
}

#[cfg(target_os = "linux")]
fn run_batched(socket: &UdpSocket) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd;

    use socket2::{SockAddr, SockAddrStorage};

    let fd = socket.as_raw_fd();
    let mut channels = Channels::default();
    let mut bufs = vec![[0u8; MAX_DATAGRAM]; BATCH];
    // SAFETY (for all the zeroed C structs below): plain old data, valid when zeroed.
    let mut names: Vec<SockAddrStorage> = (0..BATCH).map(|_| SockAddrStorage::zeroed()).collect();
    let mut iovecs: Vec<libc::iovec> = vec![libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; BATCH];
    let mut headers: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; BATCH];
    // Where each delivery goes.
    let mut out_names: Vec<SockAddr> = Vec::new();
    let mut out_iovecs: Vec<libc::iovec> = Vec::with_capacity(SEND_BATCH);
    let mut out_headers: Vec<libc::mmsghdr> = Vec::with_capacity(SEND_BATCH);
    // Which received datagram (and how long) each delivery carries.
    let mut carries: Vec<(usize, usize)> = Vec::new();
    loop {
        for i in 0..BATCH {
            iovecs[i] = libc::iovec { iov_base: bufs[i].as_mut_ptr().cast(), iov_len: MAX_DATAGRAM };
            headers[i].msg_hdr.msg_name = (&raw mut names[i]).cast();
            headers[i].msg_hdr.msg_namelen = names[i].size_of();
            headers[i].msg_hdr.msg_iov = &raw mut iovecs[i];
            headers[i].msg_hdr.msg_iovlen = 1;
            headers[i].msg_len = 0;
        }
        // SAFETY: every header points at a live buffer, name and iovec of this function,
        // sized as declared; the kernel writes at most that.
        let received = unsafe {
            libc::recvmmsg(fd, headers.as_mut_ptr(), BATCH as u32, libc::MSG_WAITFORONE, std::ptr::null_mut())
        };
        if received < 0 {
            let error = std::io::Error::last_os_error();
            if error.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(error.into());
        }
        out_names.clear();
        carries.clear();
        for i in 0..received as usize {
            let len = headers[i].msg_len as usize;
            // SAFETY: the kernel wrote a socket address of `msg_namelen` bytes.
            let from = unsafe {
                SockAddr::new(
                    std::mem::replace(&mut names[i], SockAddrStorage::zeroed()),
                    headers[i].msg_hdr.msg_namelen,
                )
            };
            let Some(from) = from.as_socket() else { continue };
            if channels.register(&bufs[i][..len], from) {
                let _ = socket.send_to(&bufs[i][..len], from);
                continue;
            }
            for member in channels.others(from) {
                out_names.push(SockAddr::from(*member));
                carries.push((i, len));
            }
        }
        for (names, carried) in out_names.chunks(SEND_BATCH).zip(carries.chunks(SEND_BATCH)) {
            out_iovecs.clear();
            out_headers.clear();
            for &(i, len) in carried {
                out_iovecs.push(libc::iovec { iov_base: bufs[i].as_mut_ptr().cast(), iov_len: len });
            }
            for (name, iovec) in names.iter().zip(out_iovecs.iter_mut()) {
                let mut header: libc::mmsghdr = unsafe { std::mem::zeroed() };
                header.msg_hdr.msg_name = name.as_ptr().cast_mut().cast();
                header.msg_hdr.msg_namelen = name.len();
                header.msg_hdr.msg_iov = iovec;
                header.msg_hdr.msg_iovlen = 1;
                out_headers.push(header);
            }
            let mut at = 0;
            while at < out_headers.len() {
                // SAFETY: the headers point at names, iovecs and receive buffers that live
                // until this loop ends.
                let sent =
                    unsafe { libc::sendmmsg(fd, out_headers[at..].as_mut_ptr(), (out_headers.len() - at) as u32, 0) };
                if sent <= 0 {
                    // A full socket buffer (or an unreachable member) loses the rest of
                    // this batch's first delivery, as a real relay would; go on past it.
                    at += 1;
                } else {
                    at += sent as usize;
                }
            }
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn run_batched(socket: &UdpSocket) -> anyhow::Result<()> {
    run_naive(socket)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_hear_only_their_own_channel_and_not_themselves() {
        let mut channels = Channels::default();
        let addr = |port| SocketAddr::from(([127, 0, 0, 1], port));
        assert!(channels.register(REGISTER, addr(1)));
        assert!(channels.register(&[REGISTER, &[0, 0]].concat(), addr(2)));
        assert!(channels.register(&[REGISTER, &[0, 7]].concat(), addr(3)));
        assert!(channels.register(REGISTER, addr(1)), "again: still one membership");
        assert!(!channels.register(b"voice", addr(1)));
        assert_eq!(channels.others(addr(1)).collect::<Vec<_>>(), [&addr(2)]);
        assert_eq!(channels.others(addr(3)).count(), 0);
        assert_eq!(channels.others(addr(9)).count(), 0, "a stranger reaches nobody");
        // A new socket on an old one's port, in another channel, moves.
        assert!(channels.register(&[REGISTER, &[0, 7]].concat(), addr(2)));
        assert_eq!(channels.others(addr(1)).count(), 0);
        assert_eq!(channels.others(addr(3)).collect::<Vec<_>>(), [&addr(2)]);
    }
}
