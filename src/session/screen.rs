//! Screen share in the client session: our own share (what we announce, how many watch,
//! whether a viewer needs a keyframe) and the streams we watch, each reassembled within
//! bounds, opened with its sender's screen key and handed to the video pipeline.
//!
//! Abuse this has to hold against: a member sending fragments of any shape or number
//! (reassembly keeps [`PARTIAL_FRAMES`] frames of at most [`MAX_FRAME_BYTES`] per
//! stream, and only for streams we chose to watch, at most [`MAX_WATCHED`]); a relay
//! that forwards us screen datagrams we did not ask for (dropped and counted); a shell
//! that does not take decrypted frames (at most [`FRAMES_WAITING`] wait, then the
//! stream waits for a keyframe again).
//!
//! [`PARTIAL_FRAMES`]: crate::protocol::fragment::PARTIAL_FRAMES
//! [`MAX_FRAME_BYTES`]: crate::protocol::fragment::MAX_FRAME_BYTES

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use super::{Event, Session};
use crate::protocol::fragment::{Reassembler, ReassemblyCounters};
use crate::protocol::{ClientMsg, MediaHeader, ScreenReport, SessionId, ShareInfo, StreamType};

/// Streams watched at once (the server allows as many).
pub const MAX_WATCHED: usize = crate::protocol::MAX_WATCHING;
/// Decrypted frames waiting for the shell; beyond it the oldest goes.
pub const FRAMES_WAITING: usize = 8;
/// Viewer reports and their pace.
pub const REPORT_EVERY: Duration = Duration::from_secs(1);
/// A new viewer's first report comes sooner: until the sharer hears of the loss on the
/// viewer's link, it sends frames without recovery fragments sized for it.
pub const FIRST_REPORT: Duration = Duration::from_millis(400);
/// Reports from viewers kept for the sharer's adapter.
const REPORTS_WAITING: usize = 32;

/// What a client's screen share did, for the `video_stats` event.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct VideoStats {
    pub encoder: String,
    pub width: u32,
    pub height: u32,
    pub fps: u32,
    pub frames_encoded: u64,
    pub frames_sent: u64,
    /// Sending: frames the connection had no room for. Watching: frames the decoder
    /// could not take in time.
    pub frames_dropped: u64,
    pub keyframes: u64,
    pub keyframes_requested: u64,
    pub viewers: u32,
    pub frames_received: u64,
    pub frames_decoded: u64,
    pub decode_errors: u64,
    /// Screen datagrams that came for streams we do not watch (a relay's doing), and
    /// ones with a fragment header that makes no sense.
    pub unwatched_datagrams: u64,
    pub malformed_datagrams: u64,
    /// Desktop audio packets sent, and dropped before they could be (sharing); received
    /// (watching).
    pub audio_packets_sent: u64,
    pub audio_packets_dropped: u64,
    pub audio_packets_received: u64,
}

/// One decrypted encoded frame of a stream we watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScreenFrame {
    pub sender: SessionId,
    pub frame: u32,
    /// The capture time, 90 kHz.
    pub timestamp: u32,
    pub keyframe: bool,
    pub payload: Vec<u8>,
}

struct Watched {
    reassembler: Reassembler,
    /// The counters at the last report.
    reported: ReassemblyCounters,
    next_report: Instant,
}

#[derive(Default)]
pub struct ScreenState {
    /// What we announce while we share.
    sharing: Option<ShareInfo>,
    next_frame: u32,
    /// The sequence number of our desktop audio's next packet.
    next_audio: u32,
    viewers: u32,
    keyframe_wanted: bool,
    watched: BTreeMap<SessionId, Watched>,
    frames: VecDeque<ScreenFrame>,
    reports: VecDeque<(SessionId, ScreenReport)>,
    /// Screen datagrams from streams we do not watch, and ones whose fragment header
    /// makes no sense (counted, not reported one by one: a sender could flood those).
    unwatched: u64,
    malformed: u64,
}

impl Session {
    /// Starts, changes or ends our share's announcement.
    pub fn set_share(&mut self, share: Option<ShareInfo>) {
        if self.screen.sharing != share {
            if share.is_none() || self.screen.sharing.is_none() {
                self.screen.viewers = 0;
            }
            self.screen.sharing = share;
            self.transmit.push_back(ClientMsg::SetShare(share));
        }
    }

    /// Screen datagrams dropped unread: for streams we do not watch, and malformed.
    pub fn dropped_screen_datagrams(&self) -> (u64, u64) {
        (self.screen.unwatched, self.screen.malformed)
    }

    pub fn sharing(&self) -> Option<ShareInfo> {
        self.screen.sharing
    }

    /// How many watch our share, as the server last said.
    pub fn viewers(&self) -> u32 {
        self.screen.viewers
    }

    /// Whether a viewer needs a keyframe; asking clears it.
    pub fn take_keyframe_request(&mut self) -> bool {
        std::mem::take(&mut self.screen.keyframe_wanted)
    }

    /// One encoded frame of our share as sealed datagrams, with recovery fragments for
    /// viewers who lose about `loss` of them, or `None` when we share nothing, are in no
    /// channel, or the frame is too large.
    pub fn screen_datagrams(
        &mut self,
        now: Instant,
        timestamp: u32,
        keyframe: bool,
        payload: &[u8],
        loss: f64,
    ) -> Option<Vec<Vec<u8>>> {
        self.screen.sharing?;
        if self.media.needs_new_key() {
            self.rekey(now);
        }
        let frame = self.screen.next_frame;
        let datagrams = self.media.seal_screen(self.me?, frame, timestamp, keyframe, payload, loss)?;
        self.screen.next_frame = frame.wrapping_add(1);
        Some(datagrams)
    }

    /// 20 ms of our share's desktop audio (an Opus packet) as a sealed datagram, or
    /// `None` when we share nothing or are in no channel.
    pub fn desktop_audio_datagram(&mut self, now: Instant, timestamp: u32, payload: &[u8]) -> Option<Vec<u8>> {
        self.screen.sharing?;
        let sequence = self.screen.next_audio;
        let datagram = self.media_datagram(now, StreamType::ScreenAudio, sequence, timestamp, payload)?;
        self.screen.next_audio = sequence.wrapping_add(1);
        Some(datagram)
    }

    /// Whether we watch `sharer`'s stream: its desktop audio is opened only then, and
    /// counted as unwatched otherwise.
    pub(super) fn take_desktop_audio_from(&mut self, sharer: SessionId) -> bool {
        let watched = self.screen.watched.contains_key(&sharer);
        self.screen.unwatched += u64::from(!watched);
        watched
    }

    /// Starts or stops watching a member of our channel who shares.
    pub(super) fn watch(&mut self, now: Instant, name: &str, watch: bool) {
        let Some(sharer) = self.user_session(name) else {
            return self.events.push_back(Event::local_error("no_such_user", format!("{name} is not online")));
        };
        if !watch {
            if self.screen.watched.remove(&sharer).is_some() {
                self.transmit.push_back(ClientMsg::Watch { sharer, watch: false });
                self.events.push_back(Event::Watching { user: name.to_owned(), session: sharer.0, watching: false });
            }
            return;
        }
        let user = &self.users[&sharer];
        if user.share.is_none() || user.channel.is_none() || user.channel != self.channel() || Some(sharer) == self.me {
            let message = format!("{name} is not sharing a screen in your channel");
            return self.events.push_back(Event::local_error("not_sharing", message));
        }
        if self.screen.watched.contains_key(&sharer) {
            return;
        }
        if self.screen.watched.len() >= MAX_WATCHED {
            let message = format!("you can watch {MAX_WATCHED} streams at once");
            return self.events.push_back(Event::local_error("too_many_streams", message));
        }
        let watched = Watched {
            reassembler: Reassembler::new(sharer, now),
            reported: Default::default(),
            next_report: now + FIRST_REPORT,
        };
        self.screen.watched.insert(sharer, watched);
        self.transmit.push_back(ClientMsg::Watch { sharer, watch: true });
        self.events.push_back(Event::Watching { user: user.name.clone(), session: sharer.0, watching: true });
    }

    /// A user's share or channel changed: a stream we watch that ended is let go.
    pub(super) fn screen_user_changed(&mut self, session: SessionId) {
        let mine = self.channel();
        let still =
            self.users.get(&session).is_some_and(|u| u.share.is_some() && u.channel.is_some() && u.channel == mine);
        if !still && self.screen.watched.remove(&session).is_some() {
            let user = self.users.get(&session).map_or_else(String::new, |u| u.name.clone());
            self.events.push_back(Event::Watching { user, session: session.0, watching: false });
        }
    }

    /// We left our channel: our share ended with it (the server ends it too), and every
    /// watch.
    pub(super) fn screen_left_channel(&mut self) {
        self.screen.sharing = None;
        self.screen.viewers = 0;
        let watched = std::mem::take(&mut self.screen.watched);
        for session in watched.into_keys() {
            let user = self.users.get(&session).map_or_else(String::new, |u| u.name.clone());
            self.events.push_back(Event::Watching { user, session: session.0, watching: false });
        }
    }

    /// A screen datagram the relay forwarded.
    pub(super) fn screen_datagram(&mut self, now: Instant, header: MediaHeader, datagram: &[u8]) {
        let Some(channel) = self.channel() else { return };
        let Some(watched) = self.screen.watched.get_mut(&header.sender) else {
            self.screen.unwatched += 1;
            return;
        };
        let frame = match watched.reassembler.push(now, header, datagram) {
            Ok(Some(frame)) => frame,
            Ok(None) => return,
            Err(_) => {
                self.screen.malformed += 1;
                return;
            }
        };
        let Some(payload) = self.media.open_screen(&frame, channel) else {
            return watched.reassembler.unusable(now);
        };
        watched.reassembler.opened(frame.shape.keyframe);
        if self.screen.frames.len() == FRAMES_WAITING {
            let dropped = self.screen.frames.pop_front().expect("full");
            if let Some(w) = self.screen.watched.get_mut(&dropped.sender) {
                w.reassembler.unusable(now);
            }
        }
        let keyframe = frame.shape.keyframe;
        let (sender, frame, timestamp) = (header.sender, frame.media.sequence, frame.media.timestamp);
        self.screen.frames.push_back(ScreenFrame { sender, frame, timestamp, keyframe, payload });
    }

    /// The next decrypted frame of a stream we watch, for the decoder.
    #[must_use]
    pub fn poll_screen_frame(&mut self) -> Option<ScreenFrame> {
        self.screen.frames.pop_front()
    }

    /// The decoder could not use a frame of `sender`'s: wait for a keyframe and ask.
    pub fn screen_frame_unusable(&mut self, now: Instant, sender: SessionId) {
        if let Some(w) = self.screen.watched.get_mut(&sender) {
            w.reassembler.unusable(now);
        }
    }

    /// What a viewer reported about our share, for the adapter.
    #[must_use]
    pub fn poll_viewer_report(&mut self) -> Option<(SessionId, ScreenReport)> {
        self.screen.reports.pop_front()
    }

    /// What we counted of a stream we watch.
    pub fn watched_counters(&self, sender: SessionId) -> Option<ReassemblyCounters> {
        self.screen.watched.get(&sender).map(|w| w.reassembler.counters())
    }

    pub(super) fn screen_message_keyframe(&mut self) {
        if self.screen.sharing.is_some() {
            self.screen.keyframe_wanted = true;
        }
    }

    pub(super) fn screen_message_viewers(&mut self, count: u32) {
        if self.screen.sharing.is_some() && self.screen.viewers != count {
            self.screen.viewers = count;
            self.events.push_back(Event::Viewers { count });
        }
    }

    pub(super) fn screen_message_report(&mut self, viewer: SessionId, report: ScreenReport) {
        if self.screen.sharing.is_none() {
            return;
        }
        if self.screen.reports.len() == REPORTS_WAITING {
            self.screen.reports.pop_front();
        }
        self.screen.reports.push_back((viewer, report));
    }

    /// Expired partial frames, keyframe requests and reports that are due.
    pub(super) fn screen_timeout(&mut self, now: Instant) {
        for (sharer, watched) in &mut self.screen.watched {
            watched.reassembler.handle_timeout(now);
            if watched.reassembler.take_keyframe_request(now) {
                self.transmit.push_back(ClientMsg::RequestKeyframe { sharer: *sharer });
            }
            if now >= watched.next_report {
                watched.next_report = now + REPORT_EVERY;
                let (was, is) = (watched.reported, watched.reassembler.counters());
                watched.reported = is;
                let delta = |f: fn(&ReassemblyCounters) -> u64| u32::try_from(f(&is) - f(&was)).unwrap_or(u32::MAX);
                let report = ScreenReport {
                    fragments_received: delta(|c| c.fragments),
                    // What the network lost, before the erasure code rebuilt any of it:
                    // what the sender sizes its recovery fragments on.
                    fragments_lost: delta(|c| c.fragments_expected).saturating_sub(delta(|c| c.fragments)),
                    frames_decoded: delta(|c| c.frames_delivered),
                    frames_lost: delta(|c| c.frames_lost),
                    bytes_received: delta(|c| c.bytes),
                };
                self.transmit.push_back(ClientMsg::ScreenReport { sharer: *sharer, report });
                let user = self.users.get(sharer).map_or_else(String::new, |u| u.name.clone());
                self.events.push_back(Event::watch_stats(user, *sharer, &report));
            }
        }
    }

    pub(super) fn screen_poll_timeout(&self) -> Option<Instant> {
        self.screen.watched.values().flat_map(|w| w.reassembler.poll_timeout().into_iter().chain([w.next_report])).min()
    }
}
