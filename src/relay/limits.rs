//! Token buckets driven by the caller's clock.

use std::time::Instant;

/// Allows `rate` units per second on average and bursts of up to `burst` units.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(now: Instant, rate: u32, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Self { rate: f64::from(rate), burst, tokens: burst, last: now }
    }

    /// A full bucket allowing `count` units a minute.
    pub fn per_minute(now: Instant, count: u32, burst: u32) -> Self {
        Self { rate: f64::from(count) / 60.0, ..Self::new(now, 0, burst) }
    }

    /// Whether it is full again (a bucket in that state can be forgotten).
    pub fn is_full(&self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens + elapsed * self.rate >= self.burst
    }

    /// Units it holds at `now`: the fewer, the more was taken lately.
    pub fn available(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        (self.tokens + elapsed * self.rate).min(self.burst)
    }

    /// Takes `amount` units if the bucket holds them; otherwise takes nothing.
    pub fn try_take(&mut self, now: Instant, amount: u32) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now.max(self.last);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        let amount = f64::from(amount);
        if self.tokens >= amount {
            self.tokens -= amount;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods, reason = "the virtual clock starts at an arbitrary real instant")]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bucket_allows_burst_then_refills_at_rate() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(t0, 10, 5);
        assert_eq!((0..8).filter(|_| bucket.try_take(t0, 1)).count(), 5);
        let t1 = t0 + Duration::from_millis(300);
        assert_eq!((0..8).filter(|_| bucket.try_take(t1, 1)).count(), 3);
        let t2 = t1 + Duration::from_secs(60);
        assert_eq!((0..8).filter(|_| bucket.try_take(t2, 1)).count(), 5, "refill is capped at the burst");
        assert!(!bucket.try_take(t2, 1));
    }

    #[test]
    fn a_clock_going_backwards_does_not_mint_tokens() {
        let t0 = Instant::now() + Duration::from_secs(10);
        let mut bucket = TokenBucket::new(t0, 10, 1);
        assert!(bucket.try_take(t0, 1));
        assert!(!bucket.try_take(t0 - Duration::from_secs(5), 1));
    }
}
