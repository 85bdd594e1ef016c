//! The way from the relay to one receiver when its link is full: each sender's media
//! waits in its own queue and the queues are served in turn, by bytes (deficit round
//! robin), so one sender's flood cannot push the others' voice out. Media is real time:
//! what has waited longer than [`LegQueue::max_age`] is dropped unsent, and when the
//! leg holds [`LegQueue::max_bytes`] the oldest datagram of the sender holding most goes
//! first. Sans-IO: the shell pushes, pops and passes the time.
//!
//! The leg is also where frames for one receiver gather to share a QUIC packet: a
//! datagram goes straight out only when the leg sent nothing within its coalescing window;
//! otherwise it waits for the shell's next flush, with whatever else arrives by then.
//! Sending a packet costs far more than adding a frame to one (a system call, a seal, and
//! an acknowledgement back), so a listener in a busy channel costs a packet per window
//! instead of one per speaker's frame.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rustc_hash::FxHashMap;

use super::ConnId;

/// Bytes a sender's turn adds to what it may send: one full-size datagram.
const QUANTUM: usize = 1500;

/// Datagrams dropped on a leg, by why.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LegDrops {
    /// Waited longer than the leg's maximum age.
    pub stale: u64,
    /// Pushed out to keep the leg within its bytes.
    pub overflow: u64,
}

#[derive(Debug, Default)]
struct SenderQueue {
    waiting: VecDeque<(Instant, Bytes)>,
    bytes: usize,
    /// Bytes this sender may still send in its turn.
    deficit: usize,
}

impl SenderQueue {
    fn pop_front(&mut self) -> Option<Bytes> {
        let (_, datagram) = self.waiting.pop_front()?;
        self.bytes -= datagram.len();
        Some(datagram)
    }
}

#[derive(Debug)]
pub struct LegQueue {
    max_age: Duration,
    max_bytes: usize,
    coalesce: Duration,
    /// When a datagram last left the leg.
    last_sent: Option<Instant>,
    /// Keyed by the server's own connection numbers, which no peer chooses: a fast hash
    /// without a random key is safe here (it is hashed twice for every frame).
    senders: FxHashMap<ConnId, SenderQueue>,
    /// Senders with something waiting, in the order of their turns.
    turns: VecDeque<ConnId>,
    bytes: usize,
    drops: LegDrops,
}

impl LegQueue {
    /// A leg that drops what waited longer than `max_age`, holds at most `max_bytes`, and
    /// sends at most one packet per `coalesce` while media keeps coming.
    pub fn new(max_age: Duration, max_bytes: usize, coalesce: Duration) -> Self {
        Self {
            max_age,
            max_bytes,
            coalesce,
            last_sent: None,
            senders: FxHashMap::default(),
            turns: VecDeque::new(),
            bytes: 0,
            drops: LegDrops::default(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.turns.is_empty()
    }

    /// Whether a datagram arriving `now` may go straight out: nothing waits, and nothing
    /// left within the coalescing window. If so, it counts as sent. Otherwise the caller
    /// [`push`](Self::push)es it and flushes the leg within the window.
    pub fn send_now(&mut self, now: Instant) -> bool {
        let quiet = self.last_sent.is_none_or(|at| now.saturating_duration_since(at) >= self.coalesce);
        let now_ok = self.is_empty() && quiet;
        if now_ok {
            self.last_sent = Some(now);
        }
        now_ok
    }

    /// Bytes waiting, over all senders.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Queues `datagram` from `sender`, making room first by dropping the oldest datagram
    /// of whichever sender holds the most bytes (the flooder, when there is one).
    pub fn push(&mut self, now: Instant, sender: ConnId, datagram: Bytes) {
        if datagram.len() > self.max_bytes {
            self.drops.overflow += 1;
            return;
        }
        while self.bytes + datagram.len() > self.max_bytes {
            let largest = self.senders.iter().max_by_key(|(_, q)| q.bytes).map(|(id, _)| *id);
            let Some(largest) = largest else { break };
            self.drop_front(largest);
            self.drops.overflow += 1;
        }
        let queue = self.senders.entry(sender).or_default();
        if queue.waiting.is_empty() {
            self.turns.push_back(sender);
        }
        queue.bytes += datagram.len();
        self.bytes += datagram.len();
        queue.waiting.push_back((now, datagram));
    }

    /// The next datagram to send, from the sender whose turn it is, if it fits in `room`
    /// bytes (else it keeps its place); stale ones on the way are dropped and counted.
    pub fn pop(&mut self, now: Instant, room: usize) -> Option<Bytes> {
        loop {
            let sender = *self.turns.front()?;
            let queue = self.senders.get_mut(&sender).expect("a sender with a turn has a queue");
            while queue.waiting.front().is_some_and(|(at, _)| now.saturating_duration_since(*at) > self.max_age) {
                let stale = queue.pop_front().expect("checked above");
                self.bytes -= stale.len();
                self.drops.stale += 1;
            }
            let Some((_, next)) = queue.waiting.front() else {
                self.forget_front();
                continue;
            };
            if queue.deficit < next.len() {
                // Its turn is spent: it gets more for the next one, behind the others.
                queue.deficit += QUANTUM;
                self.turns.rotate_left(1);
                continue;
            }
            if next.len() > room {
                return None;
            }
            let datagram = queue.pop_front().expect("checked above");
            queue.deficit -= datagram.len();
            self.bytes -= datagram.len();
            if queue.waiting.is_empty() {
                self.forget_front();
            }
            self.last_sent = Some(now);
            return Some(datagram);
        }
    }

    /// The drops counted since the last call.
    pub fn take_drops(&mut self) -> LegDrops {
        std::mem::take(&mut self.drops)
    }

    fn drop_front(&mut self, sender: ConnId) {
        let Some(queue) = self.senders.get_mut(&sender) else { return };
        if let Some(dropped) = queue.pop_front() {
            self.bytes -= dropped.len();
        }
        if queue.waiting.is_empty() {
            self.forget(sender);
        }
    }

    /// The sender whose turn it is has nothing left: as [`Self::forget`], without looking
    /// for it (every frame of a flush ends this way).
    fn forget_front(&mut self) {
        if let Some(sender) = self.turns.pop_front() {
            self.senders.remove(&sender);
        }
    }

    /// A sender with nothing waiting loses its place and what was left of its turn.
    fn forget(&mut self, sender: ConnId) {
        self.senders.remove(&sender);
        self.turns.retain(|s| *s != sender);
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods, reason = "the virtual clock starts at an arbitrary real instant")]
mod tests {
    use super::*;

    const FLOODER: ConnId = ConnId(1);
    const SPEAKER: ConnId = ConnId(2);
    const WINDOW: Duration = Duration::from_millis(2);

    fn datagram(from: ConnId, len: usize) -> Bytes {
        Bytes::from(vec![from.0 as u8; len])
    }

    /// Pops `n`, as a full link would let them out, and says whose each was.
    fn drain(leg: &mut LegQueue, now: Instant, n: usize) -> Vec<u8> {
        (0..n).map_while(|_| leg.pop(now, usize::MAX)).map(|d| d[0]).collect()
    }

    #[test]
    fn a_flood_gets_its_share_and_the_voice_beside_it_all_of_its_own() {
        let t0 = Instant::now();
        let mut leg = LegQueue::new(Duration::from_millis(100), 64 * 1024, WINDOW);
        // Ten of the flooder's datagrams for each of the speaker's, queued first.
        for round in 0..20 {
            for _ in 0..10 {
                leg.push(t0, FLOODER, datagram(FLOODER, 160));
            }
            if round % 2 == 0 {
                leg.push(t0, SPEAKER, datagram(SPEAKER, 160));
            }
        }
        // The link lets out 40 datagrams: every one of the speaker's 10 is among them.
        let sent = drain(&mut leg, t0, 40);
        assert_eq!(sent.iter().filter(|s| **s == SPEAKER.0 as u8).count(), 10);
        assert_eq!(sent.len(), 40);
        assert_eq!(leg.take_drops(), LegDrops::default());
    }

    #[test]
    fn two_floods_share_the_link_by_bytes() {
        let t0 = Instant::now();
        let mut leg = LegQueue::new(Duration::from_secs(1), 1 << 20, WINDOW);
        for _ in 0..300 {
            leg.push(t0, FLOODER, datagram(FLOODER, 1200));
            leg.push(t0, SPEAKER, datagram(SPEAKER, 300));
            leg.push(t0, SPEAKER, datagram(SPEAKER, 300));
            leg.push(t0, SPEAKER, datagram(SPEAKER, 300));
            leg.push(t0, SPEAKER, datagram(SPEAKER, 300));
        }
        let sent = drain(&mut leg, t0, 200);
        let big = sent.iter().filter(|s| **s == FLOODER.0 as u8).count();
        let small = sent.len() - big;
        let (big_bytes, small_bytes) = (big * 1200, small * 300);
        assert!(big_bytes.abs_diff(small_bytes) <= 2 * QUANTUM, "{big_bytes} vs {small_bytes}");
    }

    #[test]
    fn media_that_waited_too_long_is_dropped_and_counted() {
        let t0 = Instant::now();
        let mut leg = LegQueue::new(Duration::from_millis(100), 64 * 1024, WINDOW);
        for _ in 0..5 {
            leg.push(t0, SPEAKER, datagram(SPEAKER, 160));
        }
        let later = t0 + Duration::from_millis(80);
        leg.push(later, SPEAKER, datagram(SPEAKER, 160));
        let sent = drain(&mut leg, t0 + Duration::from_millis(150), 10);
        assert_eq!(sent.len(), 1, "only the one sent 70 ms before is still fresh");
        assert_eq!(leg.take_drops(), LegDrops { stale: 5, overflow: 0 });
        assert!(leg.is_empty());
        assert_eq!(leg.bytes(), 0);
    }

    #[test]
    fn a_full_leg_drops_the_largest_senders_oldest_first() {
        let t0 = Instant::now();
        let mut leg = LegQueue::new(Duration::from_secs(1), 1000, WINDOW);
        leg.push(t0, SPEAKER, datagram(SPEAKER, 100));
        // The flooder's datagrams are numbered from 100 on, in the order sent.
        for i in 100..109u8 {
            leg.push(t0, FLOODER, Bytes::from(vec![i; 100]));
        }
        assert_eq!(leg.bytes(), 1000);
        leg.push(t0, FLOODER, Bytes::from(vec![109; 100]));
        assert_eq!(leg.bytes(), 1000, "never above its bytes");
        assert_eq!(leg.take_drops(), LegDrops { stale: 0, overflow: 1 });
        // The speaker's one datagram survives; the flooder's first (100) is the one gone.
        let out = drain(&mut leg, t0, 11);
        assert!(out.contains(&(SPEAKER.0 as u8)));
        assert!(!out.contains(&100), "the oldest of the largest went first");
        assert_eq!(out.len(), 10);
        // One datagram larger than the whole leg is refused, not allowed to empty it.
        leg.push(t0, SPEAKER, datagram(SPEAKER, 100));
        leg.push(t0, FLOODER, datagram(FLOODER, 1001));
        assert_eq!(leg.bytes(), 100);
        assert_eq!(leg.take_drops().overflow, 1);
    }

    #[test]
    fn a_frame_after_a_quiet_window_goes_at_once_and_the_next_ones_wait_to_share_a_packet() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut leg = LegQueue::new(ms(60), 64 * 1024, WINDOW);
        assert!(leg.send_now(t0), "the first frame of a quiet leg waits for nothing");
        assert!(!leg.send_now(t0 + ms(1)), "one within the window waits");
        leg.push(t0 + ms(1), SPEAKER, datagram(SPEAKER, 160));
        assert!(!leg.send_now(t0 + ms(3)), "nor may another pass what waits");
        leg.push(t0 + ms(3), FLOODER, datagram(FLOODER, 160));
        // The flush sends both, as far as the link has room: one frame's worth first.
        assert_eq!(leg.pop(t0 + ms(3), 200).map(|d| d[0]), Some(SPEAKER.0 as u8));
        assert_eq!(leg.pop(t0 + ms(3), 100), None, "no room: the frame keeps its place");
        assert_eq!(leg.pop(t0 + ms(3), 200).map(|d| d[0]), Some(FLOODER.0 as u8));
        assert!(leg.is_empty());
        assert!(!leg.send_now(t0 + ms(4)), "the flush counts as a send");
        assert!(leg.send_now(t0 + ms(5)), "a window after it, the leg is quiet again");
    }
}
