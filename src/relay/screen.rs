//! Screen shares at the relay: who shares, who watches whom, and the keyframe requests
//! on their way to a sharer.
//!
//! Watching is opt-in: a screen datagram goes only to the members of the sharer's channel
//! who asked to watch it, so a channel of 20 does not carry video nobody looks at. A
//! sharer and its viewers are always in one channel: leaving it ends a share and every
//! watch that crossed it. Keyframe requests from all viewers (and the relay's own, for a
//! new viewer) reach the sharer at most once per [`KEYFRAME_MERGE`]; one arriving inside
//! that window is held and sent when it ends, so none is lost and none is repeated.
//! Viewers' reports (one a second) reach the sharer at most once per [`REPORT_INTERVAL`]
//! from each viewer: viewers cannot flood a sharer's control stream through the relay.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::ConnId;
pub use crate::protocol::MAX_WATCHING;
use crate::protocol::ShareInfo;

/// Keyframe requests to one sharer are merged over this window (a sender makes at most
/// one keyframe per 500 ms anyway).
pub const KEYFRAME_MERGE: Duration = Duration::from_millis(250);

/// The least time between two reports from one viewer that the relay passes on (viewers
/// report every second: `session::screen::REPORT_EVERY`; half that leaves room for jitter).
pub const REPORT_INTERVAL: Duration = Duration::from_millis(500);

#[derive(Debug)]
struct Share {
    info: ShareInfo,
    /// In the order they started watching.
    viewers: Vec<ConnId>,
    last_keyframe_request: Option<Instant>,
    /// A request arrived inside the merge window: send it when the window ends.
    held_request: bool,
    /// Per viewer, when its last report was passed on.
    last_report: HashMap<ConnId, Instant>,
}

/// Why a watch was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchError {
    NotSharing,
    TooMany,
}

#[derive(Debug, Default)]
pub struct Screens {
    shares: HashMap<ConnId, Share>,
    /// Per viewer, the sharers it watches.
    watching: HashMap<ConnId, Vec<ConnId>>,
    /// Counts changes to who shares and who watches.
    version: u64,
}

impl Screens {
    /// Changes whenever [`Screens::viewers`] may answer differently.
    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn info(&self, sharer: ConnId) -> Option<ShareInfo> {
        self.shares.get(&sharer).map(|s| s.info)
    }

    /// Starts a share or changes what it announces; returns whether the announcement changed.
    pub fn set(&mut self, sharer: ConnId, info: ShareInfo) -> bool {
        match self.shares.get_mut(&sharer) {
            Some(share) => std::mem::replace(&mut share.info, info) != info,
            None => {
                let share = Share {
                    info,
                    viewers: Vec::new(),
                    last_keyframe_request: None,
                    held_request: false,
                    last_report: HashMap::new(),
                };
                self.shares.insert(sharer, share);
                self.version += 1;
                true
            }
        }
    }

    /// Ends `conn`'s share, if any, and every watch of it; returns whether it was sharing.
    pub fn stop(&mut self, sharer: ConnId) -> bool {
        let Some(share) = self.shares.remove(&sharer) else { return false };
        self.version += 1;
        for viewer in share.viewers {
            if let Some(list) = self.watching.get_mut(&viewer) {
                list.retain(|s| *s != sharer);
                if list.is_empty() {
                    self.watching.remove(&viewer);
                }
            }
        }
        true
    }

    /// `conn` leaves its channel or the server: its share ends and it stops watching.
    /// Returns whether it was sharing and the sharers that lost it as a viewer.
    pub fn forget(&mut self, conn: ConnId) -> (bool, Vec<ConnId>) {
        let was_sharing = self.stop(conn);
        let watched = self.watching.remove(&conn).unwrap_or_default();
        self.version += 1;
        for sharer in &watched {
            if let Some(share) = self.shares.get_mut(sharer) {
                share.viewers.retain(|v| *v != conn);
                share.last_report.remove(&conn);
            }
        }
        (was_sharing, watched)
    }

    /// `viewer` starts watching `sharer` (the caller checked they share a channel).
    /// Returns `Ok(true)` when it is a new viewer.
    pub fn watch(&mut self, viewer: ConnId, sharer: ConnId) -> Result<bool, WatchError> {
        let share = self.shares.get_mut(&sharer).ok_or(WatchError::NotSharing)?;
        if share.viewers.contains(&viewer) {
            return Ok(false);
        }
        let list = self.watching.entry(viewer).or_default();
        if list.len() >= MAX_WATCHING {
            return Err(WatchError::TooMany);
        }
        list.push(sharer);
        share.viewers.push(viewer);
        self.version += 1;
        Ok(true)
    }

    /// Returns whether `viewer` was watching `sharer`.
    pub fn unwatch(&mut self, viewer: ConnId, sharer: ConnId) -> bool {
        let Some(list) = self.watching.get_mut(&viewer) else { return false };
        let before = list.len();
        list.retain(|s| *s != sharer);
        let was = list.len() != before;
        if list.is_empty() {
            self.watching.remove(&viewer);
        }
        if let Some(share) = self.shares.get_mut(&sharer) {
            share.viewers.retain(|v| *v != viewer);
            share.last_report.remove(&viewer);
        }
        self.version += 1;
        was
    }

    pub fn is_watching(&self, viewer: ConnId, sharer: ConnId) -> bool {
        self.watching.get(&viewer).is_some_and(|list| list.contains(&sharer))
    }

    /// Where a screen datagram from `sharer` goes; `None` when it is not sharing.
    pub fn viewers(&self, sharer: ConnId) -> Option<&[ConnId]> {
        self.shares.get(&sharer).map(|s| &s.viewers[..])
    }

    /// A keyframe request for `sharer`: returns whether to pass it on now (otherwise it
    /// is merged with one just sent, or held for the end of the window).
    pub fn request_keyframe(&mut self, now: Instant, sharer: ConnId) -> bool {
        let Some(share) = self.shares.get_mut(&sharer) else { return false };
        if share.last_keyframe_request.is_some_and(|at| now < at + KEYFRAME_MERGE) {
            share.held_request = true;
            return false;
        }
        share.last_keyframe_request = Some(now);
        true
    }

    /// A report from `viewer` on `sharer`'s stream: whether to pass it on (it watches, and
    /// its last report passed at least [`REPORT_INTERVAL`] ago).
    pub fn take_report(&mut self, now: Instant, viewer: ConnId, sharer: ConnId) -> bool {
        let Some(share) = self.shares.get_mut(&sharer) else { return false };
        if !share.viewers.contains(&viewer) {
            return false;
        }
        match share.last_report.get(&viewer) {
            Some(at) if now < *at + REPORT_INTERVAL => false,
            _ => {
                share.last_report.insert(viewer, now);
                true
            }
        }
    }

    /// Sharers whose held request is due now.
    pub fn due_keyframe_requests(&mut self, now: Instant) -> Vec<ConnId> {
        let mut due = Vec::new();
        for (sharer, share) in &mut self.shares {
            if share.held_request && share.last_keyframe_request.is_none_or(|at| now >= at + KEYFRAME_MERGE) {
                share.held_request = false;
                share.last_keyframe_request = Some(now);
                due.push(*sharer);
            }
        }
        due.sort();
        due
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.shares
            .values()
            .filter(|s| s.held_request)
            .filter_map(|s| s.last_keyframe_request.map(|at| at + KEYFRAME_MERGE))
            .min()
    }

    /// Memory held: never more entries than connections times [`MAX_WATCHING`].
    #[cfg(test)]
    pub fn watch_entries(&self) -> usize {
        self.watching.values().map(Vec::len).sum::<usize>()
            + self.shares.values().map(|s| s.viewers.len() + s.last_report.len()).sum::<usize>()
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods, reason = "the virtual clock starts at an arbitrary real instant")]
mod tests {
    use super::*;

    const INFO: ShareInfo = ShareInfo { width: 1280, height: 720, fps: 30 };

    #[test]
    fn watching_needs_a_share_and_is_bounded() {
        let mut s = Screens::default();
        assert_eq!(s.watch(ConnId(1), ConnId(2)), Err(WatchError::NotSharing));
        for sharer in 10..10 + MAX_WATCHING as u64 + 1 {
            assert!(s.set(ConnId(sharer), INFO));
        }
        for sharer in 10..10 + MAX_WATCHING as u64 {
            assert_eq!(s.watch(ConnId(1), ConnId(sharer)), Ok(true));
        }
        assert_eq!(s.watch(ConnId(1), ConnId(10)), Ok(false), "watching twice is one viewer");
        assert_eq!(s.watch(ConnId(1), ConnId(10 + MAX_WATCHING as u64)), Err(WatchError::TooMany));
        assert_eq!(s.viewers(ConnId(10)), Some(&[ConnId(1)][..]));
        assert!(s.unwatch(ConnId(1), ConnId(10)));
        assert!(!s.unwatch(ConnId(1), ConnId(10)));
        assert_eq!(s.viewers(ConnId(10)), Some(&[][..]));
    }

    #[test]
    fn leaving_ends_the_share_and_the_watches_both_ways() {
        let mut s = Screens::default();
        s.set(ConnId(1), INFO);
        s.set(ConnId(2), INFO);
        s.watch(ConnId(2), ConnId(1)).unwrap();
        s.watch(ConnId(1), ConnId(2)).unwrap();
        s.watch(ConnId(3), ConnId(1)).unwrap();
        assert_eq!(s.forget(ConnId(1)), (true, vec![ConnId(2)]));
        assert_eq!(s.viewers(ConnId(1)), None);
        assert_eq!(s.viewers(ConnId(2)), Some(&[][..]));
        assert!(!s.is_watching(ConnId(3), ConnId(1)));
        assert!(!s.set(ConnId(2), INFO), "the same announcement is no change");
        assert!(s.set(ConnId(2), ShareInfo { fps: 15, ..INFO }));
        assert_eq!(s.forget(ConnId(2)), (true, vec![]));
        assert_eq!(s.watch_entries(), 0);
    }

    #[test]
    fn keyframe_requests_are_merged_and_the_held_one_goes_out_once() {
        let mut s = Screens::default();
        let now = Instant::now();
        s.set(ConnId(1), INFO);
        assert!(s.request_keyframe(now, ConnId(1)));
        for ms in [1, 50, 200] {
            assert!(!s.request_keyframe(now + Duration::from_millis(ms), ConnId(1)));
        }
        assert_eq!(s.poll_timeout(), Some(now + KEYFRAME_MERGE));
        assert!(s.due_keyframe_requests(now + Duration::from_millis(249)).is_empty());
        assert_eq!(s.due_keyframe_requests(now + KEYFRAME_MERGE), vec![ConnId(1)]);
        assert_eq!(s.poll_timeout(), None);
        assert!(s.due_keyframe_requests(now + KEYFRAME_MERGE * 4).is_empty());
        assert!(s.request_keyframe(now + KEYFRAME_MERGE * 4, ConnId(1)));
        assert!(!s.request_keyframe(now, ConnId(9)), "no share, nothing to ask");
    }

    #[test]
    fn a_viewer_flooding_reports_gets_one_through_per_interval_and_others_are_untouched() {
        let mut s = Screens::default();
        let now = Instant::now();
        s.set(ConnId(1), INFO);
        assert!(!s.take_report(now, ConnId(2), ConnId(1)), "only a viewer reports");
        s.watch(ConnId(2), ConnId(1)).unwrap();
        s.watch(ConnId(3), ConnId(1)).unwrap();
        // 1 000 reports a second for 2 s: one per interval passes.
        let passed =
            (0..2000).filter(|ms| s.take_report(now + Duration::from_millis(*ms), ConnId(2), ConnId(1))).count();
        assert_eq!(passed, 4);
        assert!(s.take_report(now + Duration::from_millis(1999), ConnId(3), ConnId(1)), "another viewer's report");
        // Watching again does not carry the old stamp, nor does it pile up.
        s.unwatch(ConnId(2), ConnId(1));
        s.watch(ConnId(2), ConnId(1)).unwrap();
        assert!(s.take_report(now + Duration::from_millis(2000), ConnId(2), ConnId(1)));
        s.forget(ConnId(2));
        s.forget(ConnId(3));
        assert_eq!(s.watch_entries(), 0);
    }
}
