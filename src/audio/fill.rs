//! The speaker's ring kept near a target fill, sans-IO. The playback ticks on our clock
//! and the device pulls on its own; clocks drift apart (0.1 % is 3.6 s an hour), and a
//! stalled tick followed by the ticks catching up leaves the stall in the ring for good.
//! Before each 20 ms frame goes into the ring, [`FillKeeper::plan`] looks at what is
//! queued there and says how to play it:
//!
//! - near the target, stretch or squeeze the frame by a few samples (at most
//!   [`MAX_STRETCH`], about 1 %: no pitch change a listener hears) in proportion to the
//!   smoothed distance from the target, so drift never accumulates;
//! - far above it for [`SURPLUS_FRAMES`] frames in a row (our stall caught up), drop the
//!   frame: the ring is back within [`RESYNC_ABOVE`] of the target at once. One reading
//!   above is not enough: a device that pulls late (a sound server without a core for
//!   50 ms) pulls what it owes when it wakes, and a frame dropped then is a hole in the
//!   speech for nothing (a loaded machine showed it);
//! - nearly empty (the start, an underrun), put silence in front, up to the target.
//!
//! All figures are in 48 kHz samples; the shell converts the ring's fill from the
//! device's rate.

use super::FRAME_20MS;

/// Samples to keep queued before the device: room for the playback thread's scheduling
/// jitter and the device's own period (40 ms).
pub const TARGET: usize = 2 * FRAME_20MS;
/// Queued this far above the target, a frame is dropped instead of played.
pub const RESYNC_ABOVE: usize = 2 * FRAME_20MS;
/// Readings in a row above the resync line before frames are dropped: a device late by
/// up to two frames catches up by itself, while our own catch-up after a stall puts
/// frames in faster than any device pulls, and is cut 40 ms later.
pub const SURPLUS_FRAMES: u32 = 3;
/// Queued fewer than this, silence is put in front of the frame up to the target.
pub const REFILL_BELOW: usize = FRAME_20MS / 4;
/// The most samples a frame is lengthened or shortened by.
pub const MAX_STRETCH: usize = 10;
/// Samples of distance from the target per sample of stretch (a millisecond of error
/// asks for one sample a frame, which covers 0.1 % of drift).
const ERROR_PER_SAMPLE: f64 = 48.0;
/// The weight of each new reading in the smoothed fill (the ring's fill jumps by the
/// device's period with every pull; a second of readings settles it).
const SMOOTHING: f64 = 0.05;

/// How to play one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Put `silence` zero samples in the ring, then the frame stretched to `len` samples.
    Play { silence: usize, len: usize },
    /// Drop the frame: the ring holds more than it should.
    Drop,
}

/// What the keeper did, for the playback's statistics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct FillStats {
    /// Frames dropped to come back down to the target.
    pub dropped: u64,
    /// Samples of silence put in front of frames to refill the ring.
    pub refilled: u64,
    /// Samples added or removed by stretching, in all.
    pub stretched: u64,
    /// Samples (at the device's rate) the device asked for and the ring did not have.
    pub missing: u64,
}

#[derive(Debug, Default)]
pub struct FillKeeper {
    /// The smoothed fill, once there was a reading.
    smoothed: Option<f64>,
    /// Readings in a row above the resync line.
    surplus: u32,
    stats: FillStats,
}

impl FillKeeper {
    /// How to play the next frame when `queued` samples wait in the ring before it.
    pub fn plan(&mut self, queued: usize) -> Plan {
        self.surplus = if queued > TARGET + RESYNC_ABOVE { self.surplus + 1 } else { 0 };
        if self.surplus >= SURPLUS_FRAMES {
            self.stats.dropped += 1;
            // Judge what follows from where the ring is now, not from before the jump.
            self.smoothed = Some(queued as f64);
            return Plan::Drop;
        }
        let silence = if queued < REFILL_BELOW { TARGET - queued } else { 0 };
        self.stats.refilled += silence as u64;
        let level = (queued + silence) as f64;
        let smoothed = match self.smoothed {
            // After a refill the old readings are of a ring that ran dry.
            Some(s) if silence == 0 => s + SMOOTHING * (level - s),
            _ => level,
        };
        self.smoothed = Some(smoothed);
        let error = smoothed - TARGET as f64;
        let stretch = (-error / ERROR_PER_SAMPLE).round().clamp(-(MAX_STRETCH as f64), MAX_STRETCH as f64) as i64;
        self.stats.stretched += stretch.unsigned_abs();
        Plan::Play { silence, len: (FRAME_20MS as i64 + stretch) as usize }
    }

    pub fn stats(&self) -> FillStats {
        self.stats
    }
}

/// `frame` stretched or squeezed to `len` samples by linear interpolation; the first and
/// last samples stay where they are, so consecutive frames join without a step.
pub fn stretch(frame: &[f32], len: usize, out: &mut Vec<f32>) {
    match (frame.len(), len) {
        (_, 0) => {}
        (n, len) if n == len => out.extend_from_slice(frame),
        (0, len) => out.extend(std::iter::repeat_n(0.0, len)),
        (1, len) => out.extend(std::iter::repeat_n(frame[0], len)),
        (n, 1) => out.push(frame[n - 1]),
        (n, len) => {
            let step = (n - 1) as f64 / (len - 1) as f64;
            out.extend((0..len).map(|i| {
                let at = i as f64 * step;
                let left = (at as usize).min(n - 2);
                let part = (at - left as f64) as f32;
                frame[left] + (frame[left + 1] - frame[left]) * part
            }));
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;

    /// A device pulling `period` samples at a time on a clock `drift` off ours, the ring
    /// between, and the playback ticking every 20 ms with scheduling jitter, on a virtual
    /// clock in microseconds.
    struct Sim {
        keeper: FillKeeper,
        queued: usize,
        /// Samples the device wanted and the ring did not have.
        underrun: u64,
        pulled: u64,
        highest: usize,
        next_tick: u64,
        /// While the clock is in here the device pulls nothing; then it pulls what it owes.
        device_stall: std::ops::Range<u64>,
    }

    const PERIOD: usize = 480;

    impl Sim {
        fn new() -> Sim {
            Sim {
                keeper: FillKeeper::default(),
                queued: 0,
                underrun: 0,
                pulled: 0,
                highest: 0,
                next_tick: 0,
                device_stall: 0..0,
            }
        }

        /// Runs from `from` to `to` µs; `late(tick_due)` is how late the tick due then
        /// runs (the engine ticks on deadlines, so late ticks catch up in a burst).
        fn run(&mut self, from: u64, to: u64, drift: f64, mut late: impl FnMut(u64) -> u64) {
            let device_rate = 48_000.0 * (1.0 + drift);
            let mut tick_at = self.next_tick + late(self.next_tick);
            for now in (from..to).step_by(250) {
                // The device's pulls due by now.
                let due = (now as f64 * device_rate / 1e6) as u64 / PERIOD as u64 * PERIOD as u64;
                while self.pulled < due && !self.device_stall.contains(&now) {
                    let take = PERIOD.min(self.queued);
                    self.underrun += (PERIOD - take) as u64;
                    self.queued -= take;
                    self.pulled += PERIOD as u64;
                }
                while tick_at <= now {
                    match self.keeper.plan(self.queued) {
                        Plan::Play { silence, len } => {
                            let mut out = Vec::new();
                            stretch(&[0.5; FRAME_20MS], len, &mut out);
                            assert_eq!(out.len(), len);
                            self.queued += silence + len;
                        }
                        Plan::Drop => {}
                    }
                    self.highest = self.highest.max(self.queued);
                    self.next_tick += 20_000;
                    tick_at = self.next_tick + late(self.next_tick);
                }
            }
        }
    }

    const SECOND: u64 = 1_000_000;

    #[test]
    fn drift_either_way_neither_underruns_nor_grows_the_delay_over_ten_minutes() {
        for drift in [0.001, -0.001] {
            let mut rng = rand::rngs::StdRng::seed_from_u64(7);
            let mut sim = Sim::new();
            let mut jitter = |_| rng.random_range(0..8_000);
            sim.run(0, SECOND, drift, &mut jitter);
            let (underrun_start, dropped_start) = (sim.underrun, sim.keeper.stats().dropped);
            sim.highest = 0;
            let mut fills = Vec::new();
            for minute in 0..10 {
                let from = SECOND + minute * 60 * SECOND;
                sim.run(from, from + 60 * SECOND, drift, &mut jitter);
                fills.push(sim.queued);
            }
            let stats = sim.keeper.stats();
            println!("drift {drift}: fill at each minute {fills:?}, highest {}, {stats:?}", sim.highest);
            assert_eq!(sim.underrun, underrun_start, "drift {drift}: underran");
            assert_eq!(stats.dropped, dropped_start, "drift {drift}: nothing dropped, only stretched");
            // The delay stays near the target: at most the frame just put in, a device
            // period and the jitter above it.
            assert!(sim.highest <= TARGET + FRAME_20MS + 2 * PERIOD, "drift {drift}: {}", sim.highest);
            assert!(fills.iter().all(|f| f.abs_diff(TARGET) <= 2 * PERIOD), "{fills:?}");
            // 0.1 % of 10 minutes is 28 800 samples: all of it made up by stretching.
            assert!(stats.stretched >= 28_000, "{stats:?}");
        }
    }

    #[test]
    fn a_stall_is_not_kept_as_delay() {
        let mut sim = Sim::new();
        sim.run(0, 5 * SECOND, 0.0, |_| 0);
        // The playback thread stalls for half a second, then catches up.
        let stall = 5 * SECOND..5 * SECOND + 500_000;
        sim.run(5 * SECOND, 7 * SECOND, 0.0, |due| if stall.contains(&due) { stall.end - due } else { 0 });
        assert!(sim.keeper.stats().dropped >= 20, "{:?}", sim.keeper.stats());
        let surplus_frames = SURPLUS_FRAMES as usize * FRAME_20MS;
        assert!(sim.highest <= TARGET + RESYNC_ABOVE + surplus_frames, "{}", sim.highest);
        let underrun = sim.underrun;
        sim.run(7 * SECOND, 20 * SECOND, 0.0, |_| 0);
        assert_eq!(sim.underrun, underrun, "nothing missing once it caught up");
        assert!(sim.queued.abs_diff(TARGET) <= PERIOD, "back near the target: {}", sim.queued);
    }

    #[test]
    fn a_device_that_pulls_late_loses_no_frame() {
        let mut sim = Sim::new();
        sim.run(0, 5 * SECOND, 0.0, |_| 0);
        // The sound server has no core for 60 ms, then pulls what it owes.
        sim.device_stall = 5 * SECOND..5 * SECOND + 60_000;
        sim.run(5 * SECOND, 7 * SECOND, 0.0, |_| 0);
        assert_eq!(sim.keeper.stats().dropped, 0, "{:?}", sim.keeper.stats());
        assert!(sim.highest > TARGET + RESYNC_ABOVE, "the ring was over the line: {}", sim.highest);
        assert!(sim.queued.abs_diff(TARGET) <= PERIOD, "back near the target: {}", sim.queued);
    }

    #[test]
    fn an_empty_ring_is_refilled_to_the_target() {
        let mut keeper = FillKeeper::default();
        assert_eq!(keeper.plan(0), Plan::Play { silence: TARGET, len: FRAME_20MS });
        assert_eq!(keeper.plan(TARGET), Plan::Play { silence: 0, len: FRAME_20MS });
        let over = TARGET + RESYNC_ABOVE + 1;
        assert!(matches!(keeper.plan(over), Plan::Play { .. }), "one reading over the line is not a surplus");
        assert!(matches!(keeper.plan(over), Plan::Play { .. }));
        assert_eq!(keeper.plan(over), Plan::Drop);
        assert_eq!(keeper.plan(over), Plan::Drop);
        assert!(matches!(keeper.plan(TARGET), Plan::Play { .. }));
        assert_eq!(keeper.stats().refilled, TARGET as u64);
    }

    #[test]
    fn stretching_keeps_the_ends_and_the_shape() {
        let ramp: Vec<f32> = (0..960).map(|i| i as f32).collect();
        for len in [950, 960, 970] {
            let mut out = Vec::new();
            stretch(&ramp, len, &mut out);
            assert_eq!(out.len(), len);
            assert_eq!((out[0], out[len - 1]), (0.0, 959.0));
            assert!(out.windows(2).all(|w| w[1] > w[0]), "still a ramp");
        }
        for (frame, len) in [(&[][..], 3), (&[1.0][..], 2), (&[1.0, 2.0][..], 1), (&[1.0, 2.0][..], 0)] {
            let mut out = Vec::new();
            stretch(frame, len, &mut out);
            assert_eq!(out.len(), len);
        }
    }
}
