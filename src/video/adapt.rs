//! How good a screen share can be right now: a ladder of (resolution, frame rate,
//! bitrate) rungs from what the sharer chose down to a floor, and a controller that
//! moves along it on what it hears, on a clock it is given.
//!
//! Screen content wants sharp text, so under pressure the frame rate goes first, then the
//! bitrate, and the resolution last; coming back up retraces the same rungs. The rules
//! follow Sunshine's adaptive bitrate: decide at most once a second; step down on any
//! frame a viewer lost (one the erasure code could not rebuild), a loss of fragments too
//! large for the code ([`LOSS_TOLERATED`]), a frame the send buffer had no room for, or
//! an encoder that fell behind; step up only after [`STABLE_BEFORE_UP`]
//! without trouble and at most every [`UP_EVERY`]; and after a step up that had to be
//! taken back, hold for [`REVERSAL_HOLD`] before trying again.
//!
//! The adapter also remembers the worst loss viewers reported lately
//! ([`Adapter::loss_to_cover`]): the recovery fragments sent with each frame are sized
//! on it.

use std::time::{Duration, Instant};

use crate::protocol::Resolution;

/// Decisions are at most this frequent.
pub const DECIDE_EVERY: Duration = Duration::from_secs(1);
/// Trouble-free time before the first step up.
pub const STABLE_BEFORE_UP: Duration = Duration::from_secs(10);
/// Steps up are at least this far apart.
pub const UP_EVERY: Duration = Duration::from_secs(2);
/// A step down within this of a step up makes it a reversal.
pub const REVERSAL_WINDOW: Duration = Duration::from_secs(10);
/// After a reversal, no step up for this long.
pub const REVERSAL_HOLD: Duration = Duration::from_secs(30);
/// Loss of fragments a viewer may report in a second without it counting as trouble: the
/// recovery fragments make up for it (a frame they could not rebuild is trouble anyway).
pub const LOSS_TOLERATED: f64 = 0.10;
/// How long a viewer's report of loss keeps sizing the recovery fragments.
pub const LOSS_MEMORY: Duration = Duration::from_secs(10);
/// A new viewer's loss is not known until it reports (its first report comes 400 ms into
/// the watch, `session::screen::FIRST_REPORT`): for this long after the viewers grow, the
/// frames carry recovery fragments for [`NEW_VIEWER_LOSS`]. Without them, one lost
/// fragment of an early frame made the new viewer wait for the next keyframe (skips of
/// 4-5 frames at the start of a watch over a lossy link).
pub const NEW_VIEWER_COVER: Duration = Duration::from_secs(1);
/// The loss assumed for a viewer that has not reported yet: a poor Wi-Fi link's. A frame
/// of 3 fragments then carries 2 recovery fragments, a keyframe of 50 carries 9.
pub const NEW_VIEWER_LOSS: f64 = 0.05;
/// Frame rates the ladder steps through below the chosen one.
const FPS_STEPS: [u32; 3] = [15, 10, 5];
/// Bitrate cuts at the lowest frame rate of each resolution, before the resolution goes.
const BITRATE_CUTS: [f64; 2] = [0.75, 0.5625];

/// Bits per second at `fps` to start from, after LiveKit's screen-share presets
/// (720p: 5 fps 0.8, 15 fps 1.5, 30 fps 2 Mbit/s; 1080p: 15 fps 2.5, 30 fps 5), in
/// straight lines between them.
pub fn start_bitrate(resolution: Resolution, fps: u32) -> u32 {
    let points: &[(u32, u32)] = match resolution {
        Resolution::P480 => &[(5, 400_000), (15, 800_000), (30, 1_200_000)],
        Resolution::P720 => &[(5, 800_000), (15, 1_500_000), (30, 2_000_000)],
        Resolution::P1080 => &[(5, 1_500_000), (15, 2_500_000), (30, 5_000_000)],
    };
    let fps = fps.clamp(points[0].0, points[points.len() - 1].0);
    let at = points.windows(2).find(|w| fps <= w[1].0).expect("fps is clamped into the table");
    let ((f0, b0), (f1, b1)) = (at[0], at[1]);
    b0 + (b1 - b0) * (fps - f0) / (f1 - f0)
}

/// One quality a share can run at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Rung {
    pub resolution: Resolution,
    pub fps: u32,
    pub bitrate: u32,
}

/// The rungs from the best (`resolution` at `max_fps`) down to the floor, 480p at 5 fps.
pub fn ladder(resolution: Resolution, max_fps: u32) -> Vec<Rung> {
    let max_fps = max_fps.clamp(1, 30);
    let mut rungs = Vec::new();
    for res in Resolution::ALL.into_iter().rev().filter(|r| *r <= resolution) {
        // The best resolution steps through every frame rate; lower ones start where the
        // one above ended, at the lowest.
        let rates: Vec<u32> = if res == resolution {
            std::iter::once(max_fps).chain(FPS_STEPS.into_iter().filter(|f| *f < max_fps)).collect()
        } else {
            vec![FPS_STEPS[FPS_STEPS.len() - 1].min(max_fps)]
        };
        for fps in &rates {
            rungs.push(Rung { resolution: res, fps: *fps, bitrate: start_bitrate(res, *fps) });
        }
        let lowest = *rates.last().expect("at least one rate");
        for cut in BITRATE_CUTS {
            rungs.push(Rung {
                resolution: res,
                fps: lowest,
                bitrate: (f64::from(start_bitrate(res, lowest)) * cut) as u32,
            });
        }
    }
    rungs
}

/// What one viewer reported about the last second.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ViewerLoss {
    /// Fraction of fragments lost.
    pub loss: f64,
    pub frames_lost: u32,
}

pub struct Adapter {
    ladder: Vec<Rung>,
    /// Index into the ladder: 0 is the best.
    at: usize,
    next_decision: Instant,
    trouble: bool,
    trouble_free_since: Instant,
    last_up: Option<Instant>,
    hold_until: Option<Instant>,
    /// The worst loss reported lately, and when.
    worst_loss: Option<(f64, Instant)>,
    /// How many watch, and when that count last grew.
    viewers: u32,
    new_viewer_at: Option<Instant>,
}

impl Adapter {
    /// Starts at the best rung.
    pub fn new(now: Instant, resolution: Resolution, max_fps: u32) -> Self {
        Self {
            ladder: ladder(resolution, max_fps),
            at: 0,
            next_decision: now + DECIDE_EVERY,
            trouble: false,
            trouble_free_since: now,
            last_up: None,
            hold_until: None,
            worst_loss: None,
            viewers: 0,
            new_viewer_at: None,
        }
    }

    /// How many watch now (as the relay says): when it grew, someone's link is unknown.
    pub fn viewers(&mut self, now: Instant, count: u32) {
        if count > self.viewers {
            self.new_viewer_at = Some(now);
        }
        self.viewers = count;
    }

    pub fn current(&self) -> Rung {
        self.ladder[self.at]
    }

    pub fn viewer_report(&mut self, now: Instant, report: ViewerLoss) {
        if report.frames_lost > 0 || report.loss >= LOSS_TOLERATED || report.loss.is_nan() {
            self.trouble = true;
        }
        if report.loss > 0.0 && report.loss >= self.loss_to_cover(now) {
            self.worst_loss = Some((report.loss.min(1.0), now));
        }
    }

    /// The worst fragment loss a viewer reported in the last [`LOSS_MEMORY`] (0 when
    /// none did), and at least [`NEW_VIEWER_LOSS`] within [`NEW_VIEWER_COVER`] of a new
    /// viewer.
    pub fn loss_to_cover(&self, now: Instant) -> f64 {
        let reported = match self.worst_loss {
            Some((loss, at)) if now < at + LOSS_MEMORY => loss,
            _ => 0.0,
        };
        let unknown = self.new_viewer_at.is_some_and(|at| now < at + NEW_VIEWER_COVER);
        if unknown { reported.max(NEW_VIEWER_LOSS) } else { reported }
    }

    /// A frame was dropped before sending: the send buffer had no room for it and voice.
    pub fn send_buffer_full(&mut self) {
        self.trouble = true;
    }

    /// The encoder did not keep up with the frame rate ([`KeepingUp`]).
    pub fn encoder_behind(&mut self) {
        self.trouble = true;
    }

    /// Decides, at most once a [`DECIDE_EVERY`]; returns the new rung when it changed.
    pub fn handle_timeout(&mut self, now: Instant) -> Option<Rung> {
        if now < self.next_decision {
            return None;
        }
        self.next_decision = now + DECIDE_EVERY;
        let before = self.at;
        if std::mem::take(&mut self.trouble) {
            self.trouble_free_since = now;
            if self.at + 1 < self.ladder.len() {
                self.at += 1;
                if self.last_up.is_some_and(|up| now < up + REVERSAL_WINDOW) {
                    self.hold_until = Some(now + REVERSAL_HOLD);
                }
            }
        } else {
            let stable = now >= self.trouble_free_since + STABLE_BEFORE_UP;
            let spaced = self.last_up.is_none_or(|up| now >= up + UP_EVERY);
            let held = self.hold_until.is_some_and(|until| now < until);
            if self.at > 0 && stable && spaced && !held {
                self.at -= 1;
                self.last_up = Some(now);
            }
        }
        (self.at != before).then(|| self.current())
    }

    pub fn poll_timeout(&self) -> Instant {
        self.next_decision
    }
}

/// Below this share of the frame rate asked, over a second, the encoder is behind.
pub const KEEP_UP_SHARE: f64 = 0.8;

/// Whether the capture and encoder keep up with the frame rate asked: counted a second
/// at a time, so that one slow frame (a moment without a core) is not taken for a machine
/// too slow, while 10 frames a second at 30 asked is. A keyframe (several frames' work,
/// at most two a second) starts the count again: what it costs is not the encoder's
/// pace.
#[derive(Debug, Clone, Copy)]
pub struct KeepingUp {
    since: Instant,
    frames: u32,
}

impl KeepingUp {
    pub fn new(now: Instant) -> Self {
        KeepingUp { since: now, frames: 0 }
    }

    /// A frame was made at `now` at `fps` asked; at the end of each second, whether
    /// fewer than [`KEEP_UP_SHARE`] of the frames asked were made.
    pub fn frame(&mut self, now: Instant, fps: u32, keyframe: bool) -> bool {
        if keyframe {
            *self = KeepingUp::new(now);
            return false;
        }
        self.frames += 1;
        let elapsed = now.saturating_duration_since(self.since);
        if elapsed < Duration::from_secs(1) {
            return false;
        }
        let behind = f64::from(self.frames) < KEEP_UP_SHARE * f64::from(fps) * elapsed.as_secs_f64();
        *self = KeepingUp::new(now);
        behind
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods, reason = "the virtual clock starts at an arbitrary real instant")]
mod tests {
    use super::*;

    #[test]
    fn keeping_up_is_judged_on_a_second_of_frames_not_one_slow_frame() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut check = KeepingUp::new(start);
        // 30 fps asked: 25 frames in a second, one of them (a keyframe) 200 ms late.
        let times: Vec<u64> = (1..=25).map(|i| i * 40).collect();
        let behind: Vec<bool> = times.iter().map(|t| check.frame(at(*t), 30, false)).collect();
        assert!(behind.iter().all(|b| !b), "25 of 30 is keeping up");
        // The next second: 10 frames.
        let behind: Vec<bool> = (1..=10).map(|i| check.frame(at(1000 + i * 100), 30, false)).collect();
        assert_eq!(behind.iter().filter(|b| **b).count(), 1, "judged once, at the end of the second");
        assert!(*behind.last().unwrap());
        // A keyframe that took 300 ms starts a new count, and so does a new rung.
        assert!(!check.frame(at(2300), 30, true));
        assert!(!(1..=24).any(|i| check.frame(at(2300 + i * 41), 30, false)));
        let mut check = KeepingUp::new(at(5000));
        assert!(!(1..=6).any(|i| check.frame(at(5000 + i * 200), 5, false)), "5 fps asked, 5 made");
    }

    #[test]
    fn the_ladder_drops_frame_rate_then_bitrate_then_resolution() {
        let rungs = ladder(Resolution::P1080, 30);
        let names: Vec<String> =
            rungs.iter().map(|r| format!("{}{}@{}", r.resolution, r.fps, r.bitrate / 1000)).collect();
        assert_eq!(
            names,
            [
                "1080p30@5000",
                "1080p15@2500",
                "1080p10@2000",
                "1080p5@1500",
                "1080p5@1125",
                "1080p5@843",
                "720p5@800",
                "720p5@600",
                "720p5@450",
                "480p5@400",
                "480p5@300",
                "480p5@225",
            ]
        );
        for pair in rungs.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            assert!(b.resolution <= a.resolution && b.bitrate <= a.bitrate, "{a:?} then {b:?}");
            if b.resolution < a.resolution {
                assert_eq!(b.fps, a.fps, "the resolution goes only when the frame rate is already down");
            }
        }
        assert_eq!(ladder(Resolution::P480, 12)[0], Rung { resolution: Resolution::P480, fps: 12, bitrate: 680_000 });
        assert_eq!(ladder(Resolution::P720, 30)[0].bitrate, 2_000_000);
    }

    #[test]
    fn trouble_steps_down_once_a_second_and_calm_brings_it_back() {
        let start = Instant::now();
        let mut a = Adapter::new(start, Resolution::P720, 30);
        let top = a.current();
        let mut now = start;
        // Trouble in every second: one rung a second, to the floor and no further.
        let mut changes = 0;
        for _ in 0..30 {
            a.viewer_report(now, ViewerLoss { loss: 0.2, frames_lost: 0 });
            a.viewer_report(now, ViewerLoss { loss: 0.0, frames_lost: 0 });
            now += Duration::from_millis(500);
            changes += usize::from(a.handle_timeout(now).is_some());
        }
        assert_eq!(changes, a.ladder.len() - 1);
        assert_eq!(a.current(), *a.ladder.last().unwrap());
        // Quiet: nothing for 10 s, then a rung every 2 s.
        let calm_from = now;
        let mut ups = Vec::new();
        while a.current() != top {
            now += Duration::from_millis(100);
            if a.handle_timeout(now).is_some() {
                ups.push(now - calm_from);
            }
        }
        assert!(ups[0] >= STABLE_BEFORE_UP, "{:?}", ups[0]);
        assert!(ups.windows(2).all(|w| w[1] - w[0] >= UP_EVERY));
        assert_eq!(ups.len(), a.ladder.len() - 1);
    }

    #[test]
    fn tolerated_loss_is_not_trouble_but_a_lost_frame_is() {
        let mut now = Instant::now();
        let mut a = Adapter::new(now, Resolution::P720, 30);
        a.viewer_report(now, ViewerLoss { loss: 0.05, frames_lost: 0 });
        now += DECIDE_EVERY;
        assert_eq!(a.handle_timeout(now), None, "the recovery fragments cover 5 %");
        a.viewer_report(now, ViewerLoss { loss: 0.0, frames_lost: 1 });
        now += DECIDE_EVERY;
        assert_eq!(a.handle_timeout(now).map(|r| r.fps), Some(15));
        a.send_buffer_full();
        now += DECIDE_EVERY;
        assert_eq!(a.handle_timeout(now).map(|r| r.fps), Some(10));
        a.encoder_behind();
        now += DECIDE_EVERY;
        assert_eq!(a.handle_timeout(now).map(|r| r.fps), Some(5));
    }

    #[test]
    fn the_worst_loss_lately_sizes_the_recovery() {
        let start = Instant::now();
        let mut a = Adapter::new(start, Resolution::P720, 30);
        assert_eq!(a.loss_to_cover(start), 0.0);
        a.viewer_report(start, ViewerLoss { loss: 0.05, frames_lost: 0 });
        a.viewer_report(start + Duration::from_secs(1), ViewerLoss { loss: 0.01, frames_lost: 0 });
        a.viewer_report(start + Duration::from_secs(2), ViewerLoss { loss: 0.0, frames_lost: 0 });
        assert_eq!(a.loss_to_cover(start + Duration::from_secs(9)), 0.05, "the worst, not the last");
        assert_eq!(a.loss_to_cover(start + LOSS_MEMORY), 0.0, "forgotten after a calm while");
        a.viewer_report(start + LOSS_MEMORY, ViewerLoss { loss: 0.02, frames_lost: 0 });
        assert_eq!(a.loss_to_cover(start + LOSS_MEMORY), 0.02);
    }

    #[test]
    fn a_new_viewers_first_frames_carry_recovery_until_it_can_have_reported() {
        let start = Instant::now();
        let mut a = Adapter::new(start, Resolution::P720, 30);
        a.viewers(start, 1);
        assert_eq!(a.loss_to_cover(start), NEW_VIEWER_LOSS, "nothing known of its link yet");
        let p_frame = crate::protocol::fragment::recovery_fragments(3, false, a.loss_to_cover(start));
        assert_eq!(p_frame, 2, "an early P-frame of 3 fragments survives a lost one");
        a.viewer_report(start + Duration::from_millis(400), ViewerLoss { loss: 0.2, frames_lost: 0 });
        assert_eq!(a.loss_to_cover(start + Duration::from_millis(500)), 0.2, "a worse link reported: that");
        let later = start + LOSS_MEMORY + NEW_VIEWER_COVER;
        assert_eq!(a.loss_to_cover(later), 0.0, "then only what is reported");
        a.viewers(later, 0);
        a.viewers(later, 0);
        assert_eq!(a.loss_to_cover(later), 0.0, "nobody new");
        a.viewers(later, 1);
        assert_eq!(a.loss_to_cover(later + NEW_VIEWER_COVER / 2), NEW_VIEWER_LOSS, "the next one who watches");
        assert_eq!(a.loss_to_cover(later + NEW_VIEWER_COVER), 0.0);
    }

    #[test]
    fn a_step_up_taken_back_holds_for_the_cool_down() {
        let mut now = Instant::now();
        let mut a = Adapter::new(now, Resolution::P720, 30);
        a.encoder_behind();
        now += DECIDE_EVERY;
        a.handle_timeout(now);
        a.encoder_behind();
        now += DECIDE_EVERY;
        a.handle_timeout(now);
        // Calm until one step up.
        let mut up_at = None;
        while up_at.is_none() {
            now += DECIDE_EVERY;
            up_at = a.handle_timeout(now).map(|_| now);
        }
        // Trouble right after it: down, then no step up for the hold.
        a.encoder_behind();
        now += DECIDE_EVERY;
        assert!(a.handle_timeout(now).is_some());
        let down_at = now;
        let mut next_up = None;
        while next_up.is_none() {
            now += DECIDE_EVERY;
            next_up = a.handle_timeout(now).map(|_| now);
        }
        assert!(next_up.unwrap() - down_at >= REVERSAL_HOLD);
    }
}
