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

/// When every slot is taken, the handshake under way longest from the source with the
/// most under way makes room: a real client finishes in a round trip or two, so a flood of
/// handshakes that never finish (or finish slowly) cannot keep a newcomer out, only churn
/// among themselves. Each source
/// may also start only so many a minute, so that a flood from many addresses churns
/// slowly enough for a newcomer's handshake to finish.
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
        let abandon = if self.under_way.len() >= self.max { self.make_room() } else { None };
        let id = self.next;
        self.next += 1;
        self.under_way.push_back((id, source));
        Admission::Admitted { id, abandon }
    }

    /// Drops the handshake under way longest from the source with the most under way: a
    /// flood's sources hold several each, a newcomer one.
    fn make_room(&mut self) -> Option<u64> {
        let count = |source: &Source| self.under_way.iter().filter(|(_, s)| s == source).count();
        let most = self.under_way.iter().map(|(_, s)| count(s)).max()?;
        let at = self.under_way.iter().position(|(_, s)| count(s) == most)?;
        self.under_way.remove(at).map(|(id, _)| id)
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
        // from the source with most under way.
        assert_eq!(slots.admit(now, source(3)), Admission::Admitted { id: 3, abandon: Some(0) });
        assert_eq!(slots.len(), 3);
        // Source 1 has one under way again, so it may start another; every source has one,
        // so the oldest (1) goes.
        assert_eq!(slots.admit(now, source(1)), Admission::Admitted { id: 4, abandon: Some(1) });
        assert_eq!(slots.admit(now, source(1)), Admission::Admitted { id: 5, abandon: Some(2) });
        // Now source 1 holds two (4, 5) beside source 3's one (3): a newcomer pushes out 4,
        // not the older 3.
        assert_eq!(slots.admit(now, source(6)), Admission::Admitted { id: 6, abandon: Some(4) });
        for id in [3, 5, 6] {
            slots.finish(id);
        }
        assert!(slots.is_empty());
        slots.finish(6);
        assert_eq!(slots.admit(now, source(9)), Admission::Admitted { id: 7, abandon: None });
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
