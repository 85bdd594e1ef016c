//! The per-sender adaptive jitter buffer, sans-IO: packets go in with their arrival
//! time, and every 20 ms the playback asks what to play.
//!
//! It measures how much later than its timestamp each packet arrives and holds packets
//! for about the 95th percentile of that spread plus one frame (starting at 40 ms,
//! never above 200 ms). A missing packet becomes FEC from the next one when that is
//! there, concealment otherwise; a buffer that grew in a burst drains by a frame a tick,
//! and one that holds packets longer than the network needs skips a frame to catch up.
//! Timestamps and sequence numbers are extended to 64 bits before any comparison.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use super::{FRAME_20MS, SAMPLE_RATE};

const FRAME: u64 = FRAME_20MS as u64;
const FRAME_TIME: Duration = Duration::from_millis(20);
/// The delay before anything is measured.
pub const START_DELAY: Duration = Duration::from_millis(40);
pub const MIN_DELAY: Duration = Duration::from_millis(20);
pub const MAX_DELAY: Duration = Duration::from_millis(200);
/// Arrivals the jitter estimate looks back over (2 s of voice).
const HISTORY: usize = 100;
/// Arrivals needed before the estimate replaces the start delay.
const MIN_HISTORY: usize = 10;
/// Ticks with nothing to play before the talker counts as silent again.
const IDLE_AFTER_EMPTY: u32 = 3;
/// Packets held at most (1.28 s), whatever a sender does.
const MAX_PACKETS: usize = 64;
/// Played packets over which the shortest wait is taken (1 s of voice): when even that
/// is well above the target, the buffer holds more than the network needs.
const WAIT_HISTORY: usize = 50;

/// What to play for one 20 ms tick.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Playout {
    Packet(Vec<u8>),
    /// The packet for this tick was lost; this is the next one, whose FEC data rebuilds it.
    Recover(Vec<u8>),
    /// Nothing to rebuild from: conceal (Opus PLC).
    Conceal,
    /// The sender is not talking.
    Silent,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct JitterStats {
    pub received: u64,
    pub played: u64,
    /// Lost packets rebuilt from the next packet's FEC data.
    pub recovered: u64,
    /// Ticks filled by concealment: losses FEC could not rebuild, and underruns.
    pub concealed: u64,
    /// Packets lost for good (never arrived in time, no FEC).
    pub lost: u64,
    /// Packets that arrived after their time had passed.
    pub late: u64,
    /// Packets skipped to shrink the delay after a burst.
    pub drained: u64,
}

/// Extends a wrapping 32-bit counter to 64 bits, relative to the newest value seen.
#[derive(Debug, Default, Clone, Copy)]
struct Unwrapper {
    newest: Option<u64>,
}

impl Unwrapper {
    fn extend(&mut self, value: u32) -> u64 {
        let Some(newest) = self.newest else {
            self.newest = Some(u64::from(value));
            return u64::from(value);
        };
        let delta = i64::from(value.wrapping_sub(newest as u32) as i32);
        let extended = (newest as i64 + delta).max(0) as u64;
        self.newest = Some(newest.max(extended));
        extended
    }
}

struct Buffered {
    seq: u64,
    arrival: Instant,
    payload: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Idle,
    Buffering { until: Instant },
    Playing { empty_ticks: u32 },
}

pub struct JitterBuffer {
    packets: BTreeMap<u64, Buffered>,
    timestamps: Unwrapper,
    sequences: Unwrapper,
    state: State,
    /// The timestamp to play next, and the sequence number played last.
    next_ts: Option<u64>,
    last_seq: u64,
    /// Arrival time minus media time, in seconds since the first arrival.
    transit: VecDeque<f64>,
    /// The delay to hold packets for, measured again on each arrival (not on every
    /// packet played).
    target: Duration,
    /// How long recently played packets waited in the buffer.
    waits: VecDeque<Duration>,
    first_arrival: Option<Instant>,
    stats: JitterStats,
}

impl Default for JitterBuffer {
    fn default() -> Self {
        JitterBuffer {
            packets: BTreeMap::new(),
            timestamps: Unwrapper::default(),
            sequences: Unwrapper::default(),
            state: State::Idle,
            next_ts: None,
            last_seq: 0,
            transit: VecDeque::with_capacity(HISTORY),
            target: START_DELAY,
            waits: VecDeque::with_capacity(WAIT_HISTORY),
            first_arrival: None,
            stats: JitterStats::default(),
        }
    }
}

impl JitterBuffer {
    /// A packet arrived at `now`.
    pub fn push(&mut self, now: Instant, sequence: u32, timestamp: u32, payload: Vec<u8>) {
        let (ts, seq) = (self.timestamps.extend(timestamp), self.sequences.extend(sequence));
        self.stats.received += 1;
        let first = *self.first_arrival.get_or_insert(now);
        if self.transit.len() == HISTORY {
            self.transit.pop_front();
        }
        self.transit.push_back(now.duration_since(first).as_secs_f64() - ts as f64 / f64::from(SAMPLE_RATE));
        self.target = self.measure_target();
        if self.next_ts.is_some_and(|next| ts < next) {
            self.stats.late += 1;
            return;
        }
        if self.packets.len() == MAX_PACKETS {
            self.packets.pop_first();
            self.stats.lost += 1;
        }
        self.packets.entry(ts).or_insert(Buffered { seq, arrival: now, payload });
        if self.state == State::Idle {
            self.state = State::Buffering { until: now + self.target_delay() };
        }
    }

    /// How long packets are held: the measured spread of arrival times (95th
    /// percentile) plus one frame, within [`MIN_DELAY`, `MAX_DELAY`].
    pub fn target_delay(&self) -> Duration {
        self.target
    }

    /// [`JitterBuffer::target_delay`] from the arrivals now in the history, without
    /// allocating (a copy on the stack, partly ordered).
    fn measure_target(&self) -> Duration {
        let n = self.transit.len();
        if n < MIN_HISTORY {
            return START_DELAY;
        }
        let mut transit = [0.0; HISTORY];
        for (slot, t) in transit.iter_mut().zip(&self.transit) {
            *slot = *t;
        }
        let transit = &mut transit[..n];
        let lowest = transit.iter().copied().fold(f64::INFINITY, f64::min);
        let (_, p95, _) = transit.select_nth_unstable_by((n * 95 / 100).min(n - 1), f64::total_cmp);
        let spread = Duration::from_secs_f64((*p95 - lowest).max(0.0));
        (spread + FRAME_TIME).clamp(MIN_DELAY, MAX_DELAY)
    }

    /// How much audio is buffered ahead of the playout point.
    pub fn buffered(&self) -> Duration {
        match (self.next_ts, self.packets.last_key_value()) {
            (Some(next), Some((&newest, _))) if newest + FRAME > next => {
                Duration::from_secs_f64((newest + FRAME - next) as f64 / f64::from(SAMPLE_RATE))
            }
            _ => Duration::ZERO,
        }
    }

    /// Whether the sender is talking (something is buffered or playing).
    pub fn is_active(&self) -> bool {
        self.state != State::Idle
    }

    pub fn stats(&self) -> JitterStats {
        self.stats
    }

    /// What to play for the 20 ms tick at `now`.
    pub fn pop(&mut self, now: Instant) -> Playout {
        if let State::Buffering { until } = self.state {
            if now < until {
                return Playout::Silent;
            }
            let Some((&first, packet)) = self.packets.first_key_value() else {
                self.state = State::Idle;
                return Playout::Silent;
            };
            self.next_ts = Some(first);
            self.last_seq = packet.seq.wrapping_sub(1);
            self.state = State::Playing { empty_ticks: 0 };
        }
        let State::Playing { empty_ticks } = self.state else { return Playout::Silent };
        let next = self.next_ts.expect("playing has a playout point");
        let Some((&first, packet)) = self.packets.first_key_value() else {
            // Nothing here: a late packet (wait a tick, which adds to the delay) or the
            // end of the talk spurt.
            if empty_ticks >= IDLE_AFTER_EMPTY {
                self.state = State::Idle;
                return Playout::Silent;
            }
            self.state = State::Playing { empty_ticks: empty_ticks + 1 };
            self.stats.concealed += 1;
            return Playout::Conceal;
        };
        self.state = State::Playing { empty_ticks: 0 };
        if first == next {
            let packet = self.packets.pop_first().expect("just looked at it").1;
            self.play(packet.seq);
            self.trim_if_slow(now.saturating_duration_since(packet.arrival));
            self.drain_if_behind();
            return Playout::Packet(packet.payload);
        }
        if packet.seq == self.last_seq + 1 {
            // Nothing missing in between: the talker paused (the gate or DTX) and goes
            // on. Hold this new spurt for the target delay like the first one.
            self.next_ts = Some(first);
            let until = packet.arrival + self.target_delay();
            self.state = State::Buffering { until };
            return self.pop(now);
        }
        // The packet for this tick is lost.
        self.stats.lost += 1;
        self.next_ts = Some(next + FRAME);
        self.last_seq += 1;
        if first == next + FRAME && packet.seq == self.last_seq + 1 {
            self.stats.recovered += 1;
            Playout::Recover(packet.payload.clone())
        } else {
            self.stats.concealed += 1;
            Playout::Conceal
        }
    }

    fn play(&mut self, seq: u64) {
        self.stats.played += 1;
        self.last_seq = seq;
        self.next_ts = self.next_ts.map(|next| next + FRAME);
    }

    /// After a burst the buffer holds more than it should: skip a frame to catch up.
    fn drain_if_behind(&mut self) {
        if self.buffered() > self.target_delay() + 2 * FRAME_TIME {
            self.skip_next();
        }
    }

    /// When every packet of the last second waited longer than the target plus half a
    /// frame (the spurt began with the start delay, or the jitter went away), skip a
    /// frame: the delay comes down by 20 ms.
    fn trim_if_slow(&mut self, waited: Duration) {
        if self.waits.len() == WAIT_HISTORY {
            self.waits.pop_front();
        }
        self.waits.push_back(waited);
        let shortest = self.waits.iter().min().copied().unwrap_or_default();
        if self.waits.len() == WAIT_HISTORY && shortest > self.target_delay() + FRAME_TIME / 2 {
            self.waits.clear();
            self.skip_next();
        }
    }

    fn skip_next(&mut self) {
        if let Some(entry) = self.packets.first_entry()
            && Some(*entry.key()) == self.next_ts
        {
            let packet = entry.remove();
            self.stats.drained += 1;
            self.last_seq = packet.seq;
            self.next_ts = self.next_ts.map(|next| next + FRAME);
        }
    }
}

/// The interarrival jitter of a stream (RFC 3550 section 6.4.1): how much the spacing of
/// arrivals differs from the spacing of their timestamps, smoothed over about 16 packets.
#[derive(Debug, Default, Clone)]
pub struct InterarrivalJitter {
    last: Option<(Instant, u32)>,
    jitter_secs: f64,
}

impl InterarrivalJitter {
    pub fn update(&mut self, arrival: Instant, timestamp: u32) {
        if let Some((last_arrival, last_timestamp)) = self.last.replace((arrival, timestamp)) {
            let arrived = arrival.saturating_duration_since(last_arrival).as_secs_f64();
            let stamped = f64::from(timestamp.wrapping_sub(last_timestamp) as i32) / f64::from(SAMPLE_RATE);
            self.jitter_secs += ((arrived - stamped).abs() - self.jitter_secs) / 16.0;
        }
    }

    pub fn jitter(&self) -> Duration {
        Duration::from_secs_f64(self.jitter_secs.max(0.0))
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods, reason = "the virtual clock starts at an arbitrary real instant")]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;

    /// A talker sending a packet every 20 ms through a simulated network, and a
    /// listener ticking every 20 ms, on a virtual clock.
    struct Sim {
        start: Instant,
        buffer: JitterBuffer,
        /// (arrival, seq, ts) in flight.
        network: Vec<(Duration, u32, u32)>,
        played: Vec<Playout>,
    }

    impl Sim {
        fn new() -> Sim {
            Sim { start: Instant::now(), buffer: JitterBuffer::default(), network: Vec::new(), played: Vec::new() }
        }

        /// Sends `count` packets from packet `from` on, each delayed by `delay(i)` or
        /// lost when that is `None`.
        fn send(&mut self, from: u32, count: u32, ts_offset: u32, mut delay: impl FnMut(u32) -> Option<Duration>) {
            for i in from..from + count {
                if let Some(d) = delay(i) {
                    let sent = FRAME_TIME * i;
                    self.network.push((sent + d, i, (i * FRAME_20MS as u32).wrapping_add(ts_offset)));
                }
            }
        }

        /// Runs the clock to `end`: deliveries as they arrive, a playout tick every 20 ms
        /// (offset by 5 ms from the sending grid).
        fn run(&mut self, end: Duration) {
            self.network.sort_by_key(|p| p.0);
            let mut tick = Duration::from_millis(5);
            let mut next = 0;
            while tick < end {
                while next < self.network.len() && self.network[next].0 <= tick {
                    let (at, seq, ts) = self.network[next];
                    self.buffer.push(self.start + at, seq, ts, seq.to_be_bytes().to_vec());
                    next += 1;
                }
                self.played.push(self.buffer.pop(self.start + tick));
                tick += FRAME_TIME;
            }
        }

        fn played_sequence(&self) -> Vec<u32> {
            self.played
                .iter()
                .filter_map(|p| match p {
                    Playout::Packet(b) => Some(u32::from_be_bytes(b[..4].try_into().unwrap())),
                    _ => None,
                })
                .collect()
        }
    }

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn a_clean_network_plays_everything_in_order_with_a_short_delay() {
        let mut sim = Sim::new();
        sim.send(0, 200, 0, |_| Some(MS(3)));
        sim.run(MS(4500));
        // The spurt starts 40 ms behind; after a second of 3 ms arrivals one frame is
        // skipped and the rest play 20 ms sooner.
        let stats = sim.buffer.stats();
        assert_eq!((stats.played, stats.drained), (199, 1));
        assert_eq!(sim.played_sequence(), (0..200).filter(|&i| i != 50).collect::<Vec<_>>());
        assert_eq!(stats.concealed, 3, "only the end of the spurt, before going idle");
        assert!(sim.buffer.target_delay() <= START_DELAY);
        assert!(!sim.buffer.is_active());
    }

    #[test]
    fn single_losses_are_recovered_by_fec_and_longer_ones_concealed() {
        let mut sim = Sim::new();
        let lost = [20, 50, 51, 52, 90];
        sim.send(0, 150, 0, |i| (!lost.contains(&i)).then_some(MS(2)));
        sim.run(MS(3500));
        let stats = sim.buffer.stats();
        // 20 and 90 alone: FEC. Of 50-52 only 52 has its next packet: 2 concealed, 1 recovered.
        assert_eq!((stats.lost, stats.recovered), (5, 3));
        // The tick for 50 finds nothing yet and waits (conceal, +20 ms of delay); then 50
        // and 51 are concealed, 52 recovered; plus three ticks at the end of the spurt.
        assert_eq!(stats.concealed, 3 + 3, "{stats:?}");
        assert_eq!(stats.played + stats.drained, 145, "{stats:?}");
        assert_eq!(stats.late, 0);
    }

    #[test]
    fn reordering_within_the_delay_loses_nothing() {
        let mut sim = Sim::new();
        // Every other packet 25 ms late: they overtake each other pairwise.
        sim.send(0, 200, 0, |i| Some(if i % 2 == 0 { MS(26) } else { MS(1) }));
        sim.run(MS(4500));
        assert_eq!(sim.played_sequence(), (0..200).collect::<Vec<_>>());
        assert_eq!(sim.buffer.stats().late, 0);
    }

    #[test]
    fn it_adapts_to_jitter_and_stays_under_the_cap() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let mut sim = Sim::new();
        sim.send(0, 500, 0, |_| Some(MS(rng.random_range(0..30))));
        sim.run(MS(10_500));
        let target = sim.buffer.target_delay();
        assert!(target > START_DELAY && target < MS(60), "30 ms of jitter gives {target:?}");
        let stats = sim.buffer.stats();
        assert!(stats.played >= 490, "{stats:?}");

        let mut rng = rand::rngs::StdRng::seed_from_u64(10);
        let mut wild = Sim::new();
        wild.send(0, 300, 0, |_| Some(MS(rng.random_range(0..900))));
        wild.run(MS(8000));
        assert_eq!(wild.buffer.target_delay(), MAX_DELAY);
    }

    #[test]
    fn a_burst_after_a_stall_is_played_then_drained() {
        let mut sim = Sim::new();
        // Packets 50-59 stall and arrive together 200 ms late, with the rest on time.
        sim.send(0, 300, 0, |i| Some(if (50..60).contains(&i) { MS(200) - FRAME_TIME * (i - 50) } else { MS(2) }));
        sim.run(MS(6500));
        let stats = sim.buffer.stats();
        assert_eq!(stats.lost + stats.late, 0, "{stats:?}");
        assert!(stats.drained > 0, "{stats:?}");
        assert!(sim.buffer.buffered() == Duration::ZERO);
        // Right after the burst the buffer is long; 100 ticks later it is back near its target.
        let seq = sim.played_sequence();
        assert!(seq.windows(2).all(|w| w[0] < w[1]), "in order");
    }

    #[test]
    fn a_pause_in_talking_is_not_a_loss() {
        let mut sim = Sim::new();
        sim.send(0, 50, 0, |_| Some(MS(2)));
        // The talker pauses for a second: sequence numbers go on, timestamps jump.
        sim.network.extend((50..100).map(|i| (FRAME_TIME * (i + 50) + MS(2), i, (i + 50) * FRAME_20MS as u32)));
        sim.run(MS(5000));
        let stats = sim.buffer.stats();
        assert_eq!((stats.lost, stats.played), (0, 100));
        assert_eq!(sim.played_sequence(), (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn interarrival_jitter_follows_the_spread_of_arrivals() {
        let start = Instant::now();
        let mut steady = InterarrivalJitter::default();
        let mut shaky = InterarrivalJitter::default();
        for i in 0..200u32 {
            steady.update(start + FRAME_TIME * i, i * FRAME_20MS as u32);
            let wobble = if i % 2 == 0 { MS(0) } else { MS(10) };
            shaky.update(start + FRAME_TIME * i + wobble, i * FRAME_20MS as u32);
        }
        assert!(steady.jitter() < MS(1));
        assert!((steady.jitter().as_secs_f64() - 0.0).abs() < 1e-6);
        assert!(shaky.jitter() > MS(9) && shaky.jitter() < MS(11), "{:?}", shaky.jitter());
    }

    #[test]
    fn counters_that_wrap_are_extended() {
        let mut sim = Sim::new();
        sim.send(0, 100, u32::MAX - 50 * FRAME_20MS as u32 + 1, |_| Some(MS(2)));
        sim.run(MS(2500));
        let stats = sim.buffer.stats();
        assert_eq!(stats.played + stats.drained, 100);
        let mut u = Unwrapper::default();
        assert_eq!(u.extend(u32::MAX), u64::from(u32::MAX));
        assert_eq!(u.extend(2), u64::from(u32::MAX) + 3);
        assert_eq!(u.extend(u32::MAX - 1), u64::from(u32::MAX) - 1, "a late one from before the wrap");
    }
}
