//! QUIC handshakes under way, bounded in all and per source. Sans-IO: the shell starts
//! and abandons the handshakes this admits.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use super::Source;
use super::limits::TokenBucket;

/// Sources whose handshake rate is remembered at most; when full, those whose bucket has
/// refilled are forgotten, and if none has, new sources wait.
const MAX_SOURCES: usize = 100_000;

/// What to do with a new handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Its source has as many under way as it may, or started them too fast.
    Refused,
    /// Go ahead under `id`, first abandoning the handshake `abandon` (the one under way
    /// longest) when every slot was taken.
    Admitted { id: u64, abandon: Option<u64> },
}

/// When every slot is taken, a handshake of the source that started the most lately makes
/// room (of several such, the source with the most under way; of its handshakes, the one
/// under way longest). A flood that starts handshakes again as fast as the server ends
/// them (even ones that finish: a server busy with the flood finishes them slowly) churns
/// among its own, and a newcomer that started one handshake keeps its slot until it is
/// done, however many younger ones come. Each source may also start only so many a
/// minute, so that a flood from many addresses churns slowly enough.
#[derive(Debug)]
pub struct HandshakeSlots {
    max: usize,
    per_source: usize,
    per_minute: u32,
    burst: u32,
    next: u64,
    /// In the order they started.
    under_way: VecDeque<(u64, Source)>,
    rates: HashMap<Source, TokenBucket>,
}

impl HandshakeSlots {
    /// `max` under way, `per_source` of them from one source, which may start
    /// `per_minute` a minute, `burst` at once.
    pub fn new(max: usize, per_source: usize, per_minute: u32, burst: u32) -> Self {
        Self {
            max: max.max(1),
            per_source: per_source.max(1),
            per_minute,
            burst,
            next: 0,
            under_way: VecDeque::new(),
            rates: HashMap::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.under_way.len()
    }

    pub fn is_empty(&self) -> bool {
        self.under_way.is_empty()
    }

    pub fn admit(&mut self, now: Instant, source: Source) -> Admission {
        if self.under_way.iter().filter(|(_, s)| *s == source).count() >= self.per_source {
            return Admission::Refused;
        }
        if self.rates.len() >= MAX_SOURCES && !self.rates.contains_key(&source) {
            self.rates.retain(|_, bucket| !bucket.is_full(now));
            if self.rates.len() >= MAX_SOURCES {
                return Admission::Refused;
            }
        }
        let (per_minute, burst) = (self.per_minute, self.burst);
        let rate = self.rates.entry(source).or_insert_with(|| TokenBucket::per_minute(now, per_minute, burst));
        if !rate.try_take(now, 1) {
            return Admission::Refused;
        }
        let abandon = if self.under_way.len() >= self.max { self.make_room(now) } else { None };
        let id = self.next;
        self.next += 1;
        self.under_way.push_back((id, source));
        Admission::Admitted { id, abandon }
    }

    /// Drops the handshake under way longest from the source that started the most
    /// lately (the emptiest rate bucket), then the most under way.
    fn make_room(&mut self, now: Instant) -> Option<u64> {
        let count = |source: &Source| self.under_way.iter().filter(|(_, s)| s == source).count();
        // Every source under way has a bucket: admitting one makes it.
        let left = |source: &Source| self.rates.get(source).map_or(f64::MAX, |bucket| bucket.available(now));
        let busiest = |a: &Source, b: &Source| left(b).total_cmp(&left(a)).then(count(a).cmp(&count(b)));
        // `max_by` keeps the last of equals: reversed, the first (the oldest) wins ties.
        let (_, victim) = self.under_way.iter().rev().max_by(|(_, a), (_, b)| busiest(a, b))?;
        let at = self.under_way.iter().position(|(_, s)| s == victim)?;
        self.under_way.remove(at).map(|(id, _)| id)
    }

    /// Handshakes `source` started lately: its rate bucket's burst less what is left (0
    /// for a source not seen lately).
    pub fn started_lately(&self, now: Instant, source: Source) -> u32 {
        let left = self.rates.get(&source).map_or(f64::from(self.burst), |bucket| bucket.available(now));
        (f64::from(self.burst) - left).max(0.0).ceil() as u32
    }

    /// The handshake ended (done, failed or timed out): its slot is free.
    pub fn finish(&mut self, id: u64) {
        self.under_way.retain(|(h, _)| *h != id);
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods, reason = "the virtual clock starts at an arbitrary real instant")]
mod tests {
    use super::*;
    use std::time::Duration;

    fn source(last: u8) -> Source {
        Source::of(std::net::Ipv4Addr::new(192, 0, 2, last).into())
    }

    #[test]
    fn a_full_table_abandons_the_oldest_and_one_source_gets_only_its_share() {
        let now = Instant::now();
        let mut slots = HandshakeSlots::new(3, 2, 60, 10);
        assert_eq!(slots.admit(now, source(1)), Admission::Admitted { id: 0, abandon: None });
        assert_eq!(slots.admit(now, source(1)), Admission::Admitted { id: 1, abandon: None });
        assert_eq!(slots.admit(now, source(1)), Admission::Refused, "two per source");
        assert_eq!(slots.admit(now, source(2)), Admission::Admitted { id: 2, abandon: None });
        // Full: a newcomer from elsewhere takes the place of the one under way longest
        // from the source that started the most.
        assert_eq!(slots.admit(now, source(3)), Admission::Admitted { id: 3, abandon: Some(0) });
        assert_eq!(slots.len(), 3);
        // Source 1 starts again and again: it churns among its own, and the newcomers of
        // sources 2 and 3 keep their slots.
        assert_eq!(slots.admit(now, source(1)), Admission::Admitted { id: 4, abandon: Some(1) });
        assert_eq!(slots.admit(now, source(1)), Admission::Admitted { id: 5, abandon: Some(4) });
        assert_eq!(slots.admit(now, source(1)), Admission::Admitted { id: 6, abandon: Some(5) });
        // Source 1 still started the most; then sources 2, 3 and 4 have started as many,
        // one under way each: the one under way longest goes.
        assert_eq!(slots.admit(now, source(4)), Admission::Admitted { id: 7, abandon: Some(6) });
        assert_eq!(slots.admit(now, source(5)), Admission::Admitted { id: 8, abandon: Some(2) });
        for id in [3, 7, 8] {
            slots.finish(id);
        }
        assert!(slots.is_empty());
        slots.finish(6);
        assert_eq!(slots.admit(now, source(9)), Admission::Admitted { id: 9, abandon: None });
    }

    #[test]
    fn a_newcomer_keeps_its_slot_through_a_churning_flood_from_many_addresses() {
        let mut now = Instant::now();
        // The flood test's shape: 64 slots, 4 per source, 60 a minute with bursts of 16.
        let mut slots = HandshakeSlots::new(64, 4, 60, 16);
        let flood: Vec<Source> = (1..=160).map(source).collect();
        let mut flood_ids = std::collections::HashSet::new();
        let mut start_flood = |slots: &mut HandshakeSlots, now: Instant, round: usize| {
            for source in &flood[(round * 40) % 160..(round * 40) % 160 + 40] {
                if let Admission::Admitted { id, abandon } = slots.admit(now, *source) {
                    flood_ids.insert(id);
                    if let Some(gone) = abandon {
                        assert!(flood_ids.contains(&gone), "only the flood makes room");
                    }
                }
            }
        };
        for round in 0..8 {
            start_flood(&mut slots, now, round);
            now += Duration::from_millis(50);
        }
        let Admission::Admitted { id: newcomer, .. } = slots.admit(now, source(250)) else { panic!("refused") };
        // Hundreds more from the flood while the newcomer's handshake takes its time.
        for round in 8..40 {
            now += Duration::from_millis(50);
            start_flood(&mut slots, now, round);
        }
        assert!(slots.under_way.iter().any(|(id, _)| *id == newcomer), "the newcomer is still under way");
    }

    #[test]
    fn a_source_starts_its_burst_then_one_a_second() {
        let mut now = Instant::now();
        let mut slots = HandshakeSlots::new(100, 100, 60, 4);
        let mut started = || (0..10).filter(|_| slots.admit(now, source(1)) != Admission::Refused).count();
        assert_eq!(started(), 4);
        now += Duration::from_secs(2);
        let mut started = || (0..10).filter(|_| slots.admit(now, source(1)) != Admission::Refused).count();
        assert_eq!(started(), 2);
        assert!(matches!(slots.admit(now, source(2)), Admission::Admitted { .. }), "another source is not held back");
    }
}
