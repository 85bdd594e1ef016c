//! `voipc bench impair`: a UDP forwarder that loses and delays datagrams, for voice
//! tests on a bad network where the kernel has no `tc netem`. Each client address gets
//! its own upstream socket to the server; both directions are impaired alike, and the
//! way down to each client can be a slow link.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::net::UdpSocket;

pub struct Impairment {
    /// Chance that a datagram is dropped, per direction.
    pub loss: f64,
    /// Each datagram is held for a uniform random time up to this (so datagrams reorder).
    pub jitter: Duration,
    /// The rate of each server-to-client link, when it is limited.
    pub down_bytes_per_sec: Option<f64>,
}

/// A datagram that would wait longer than this for a slow link is lost (drop-tail).
const LINK_QUEUE: Duration = Duration::from_millis(100);

/// A link of a fixed rate: datagrams leave one after another, each taking its length's
/// worth of time, behind a queue of at most [`LINK_QUEUE`].
struct Link {
    bytes_per_sec: f64,
    free_at: Instant,
}

impl Link {
    /// How long a datagram of `len` bytes takes from now to the far end, or `None` when
    /// the queue is full and it is lost.
    fn delay(&mut self, len: usize) -> Option<Duration> {
        let now = Instant::now();
        let start = self.free_at.max(now);
        if start - now > LINK_QUEUE {
            return None;
        }
        self.free_at = start + Duration::from_secs_f64(len as f64 / self.bytes_per_sec);
        Some(self.free_at - now)
    }
}

/// Sends `bytes` to `to` from `socket` after the impairment's delay (and the link's, if
/// it crosses one), unless it is lost.
fn impaired_send(
    socket: &Arc<UdpSocket>,
    to: SocketAddr,
    bytes: Vec<u8>,
    rng: &Mutex<StdRng>,
    how: &Impairment,
    link: Option<&mut Link>,
) {
    let (lost, mut delay) = {
        let mut rng = rng.lock().expect("the rng lock is never poisoned: nothing panics holding it");
        (rng.random_bool(how.loss), how.jitter.mul_f64(rng.random()))
    };
    if lost {
        return;
    }
    if let Some(link) = link {
        let Some(on_link) = link.delay(bytes.len()) else { return };
        delay += on_link;
    }
    let socket = socket.clone();
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        let _ = socket.send_to(&bytes, to).await;
    });
}

pub async fn run(listen: SocketAddr, server: SocketAddr, how: Impairment, seed: u64) -> anyhow::Result<()> {
    let front = Arc::new(UdpSocket::bind(listen).await?);
    println!("{}", serde_json::json!({"event": "listening", "addr": front.local_addr()?.to_string()}));
    let how = Arc::new(how);
    let rng = Arc::new(Mutex::new(StdRng::seed_from_u64(seed)));
    let mut upstreams: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut buf = vec![0u8; 65_536];
    loop {
        let (len, client) = front.recv_from(&mut buf).await?;
        let upstream = match upstreams.get(&client) {
            Some(upstream) => upstream.clone(),
            None => {
                let upstream = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
                let (back, front, how, rng) = (upstream.clone(), front.clone(), how.clone(), rng.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65_536];
                    let mut link =
                        how.down_bytes_per_sec.map(|bytes_per_sec| Link { bytes_per_sec, free_at: Instant::now() });
                    while let Ok((len, _)) = back.recv_from(&mut buf).await {
                        impaired_send(&front, client, buf[..len].to_vec(), &rng, &how, link.as_mut());
                    }
                });
                upstreams.insert(client, upstream.clone());
                upstream
            }
        };
        impaired_send(&upstream, server, buf[..len].to_vec(), &rng, &how, None);
    }
}
