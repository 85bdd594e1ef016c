//! The replay window of one media key (RFC 9605 section 7.3): which counters arrived,
//! over the newest [`WINDOW`] of them.

/// How many counters behind the newest one a packet may still arrive: 2048 packets is
/// 41 s of voice, and several seconds of a screen share at full rate.
pub const WINDOW: u64 = 2048;
const WORDS: usize = (WINDOW / 64) as usize;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReplayError {
    #[error("packet {0} arrived before")]
    Duplicate(u64),
    #[error("packet {ctr} is older than the replay window (newest {newest})")]
    TooOld { ctr: u64, newest: u64 },
}

#[derive(Debug, Clone, Default)]
pub struct ReplayWindow {
    newest: Option<u64>,
    /// Bit `ctr % WINDOW` is set when `ctr` arrived (for counters in the window).
    seen: Box<[u64; WORDS]>,
}

impl ReplayWindow {
    /// Whether a packet with counter `ctr` may be opened. Changes nothing.
    pub fn check(&self, ctr: u64) -> Result<(), ReplayError> {
        let Some(newest) = self.newest else { return Ok(()) };
        if ctr > newest {
            return Ok(());
        }
        if newest - ctr >= WINDOW {
            return Err(ReplayError::TooOld { ctr, newest });
        }
        if self.is_set(ctr) {
            return Err(ReplayError::Duplicate(ctr));
        }
        Ok(())
    }

    /// Records an authenticated packet; call only after [`check`](Self::check) passed.
    pub fn accept(&mut self, ctr: u64) {
        match self.newest {
            Some(newest) if ctr <= newest => {}
            Some(newest) if ctr - newest < WINDOW => {
                for skipped in newest + 1..=ctr {
                    self.clear(skipped);
                }
                self.newest = Some(ctr);
            }
            _ => {
                self.seen.fill(0);
                self.newest = Some(ctr);
            }
        }
        let (word, bit) = slot(ctr);
        self.seen[word] |= bit;
    }

    fn is_set(&self, ctr: u64) -> bool {
        let (word, bit) = slot(ctr);
        self.seen[word] & bit != 0
    }

    fn clear(&mut self, ctr: u64) {
        let (word, bit) = slot(ctr);
        self.seen[word] &= !bit;
    }
}

fn slot(ctr: u64) -> (usize, u64) {
    let index = ctr % WINDOW;
    ((index / 64) as usize, 1 << (index % 64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn take(window: &mut ReplayWindow, ctr: u64) -> Result<(), ReplayError> {
        window.check(ctr)?;
        window.accept(ctr);
        Ok(())
    }

    #[test]
    fn duplicates_are_refused_anywhere_in_the_window() {
        let mut w = ReplayWindow::default();
        take(&mut w, 0).unwrap();
        assert_eq!(take(&mut w, 0), Err(ReplayError::Duplicate(0)));
        take(&mut w, 5000).unwrap();
        take(&mut w, 5000 - 2047).unwrap();
        assert_eq!(take(&mut w, 5000 - 2047), Err(ReplayError::Duplicate(2953)));
        assert_eq!(take(&mut w, 5000), Err(ReplayError::Duplicate(5000)));
    }

    #[test]
    fn the_window_edges() {
        let mut w = ReplayWindow::default();
        take(&mut w, 3000).unwrap();
        // The oldest counter still inside, and the first one outside.
        assert_eq!(w.check(3000 - (WINDOW - 1)), Ok(()));
        assert_eq!(w.check(3000 - WINDOW), Err(ReplayError::TooOld { ctr: 952, newest: 3000 }));
        // Reordered packets inside the window are all taken once.
        for ctr in (2000..3000).rev() {
            take(&mut w, ctr).unwrap();
        }
        // Moving forward by exactly the window forgets everything before.
        take(&mut w, 3000 + WINDOW).unwrap();
        assert!(matches!(w.check(3000), Err(ReplayError::TooOld { .. })));
        assert_eq!(w.check(3001), Ok(()), "3001 never arrived and is still inside");
        // A jump beyond the window starts afresh.
        take(&mut w, 100_000).unwrap();
        assert_eq!(w.check(100_000 - 1), Ok(()));
        assert_eq!(w.check(3000 + WINDOW), Err(ReplayError::TooOld { ctr: 5048, newest: 100_000 }));
    }

    #[test]
    fn slots_reused_after_a_move_are_cleared() {
        let mut w = ReplayWindow::default();
        take(&mut w, 10).unwrap();
        take(&mut w, 10 + WINDOW - 1).unwrap();
        // 10 + WINDOW shares 10's slot; it never arrived.
        take(&mut w, 10 + WINDOW).unwrap();
        assert!(matches!(w.check(10), Err(ReplayError::TooOld { .. })));
        assert_eq!(take(&mut w, 10 + WINDOW), Err(ReplayError::Duplicate(10 + WINDOW)));
    }

    #[test]
    fn matches_a_set_of_everything_seen() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut w = ReplayWindow::default();
        let mut seen = std::collections::BTreeSet::new();
        let mut newest = 0u64;
        for _ in 0..50_000 {
            let ctr = newest.saturating_sub(2100) + rng.random_range(0..2200);
            let expected = if seen.contains(&ctr) {
                Err(ReplayError::Duplicate(ctr))
            } else if !seen.is_empty() && ctr + WINDOW <= newest {
                Err(ReplayError::TooOld { ctr, newest })
            } else {
                Ok(())
            };
            // Old duplicates outside the window are reported as too old.
            let got = take(&mut w, ctr);
            match (&expected, &got) {
                (Err(ReplayError::Duplicate(_)), Err(ReplayError::TooOld { .. })) if ctr + WINDOW <= newest => {}
                _ => assert_eq!(got, expected, "ctr {ctr} newest {newest}"),
            }
            if got.is_ok() {
                seen.insert(ctr);
                newest = newest.max(ctr);
            }
        }
    }
}
