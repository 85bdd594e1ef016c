//! Who is online, told in bounded pieces: the listing a new user pages through, and the
//! changes everyone gets in batches.
//!
//! Both carry users as they are when the message is made, never as events: a client that
//! applies them in the order they arrive ends up with the server's view whatever overlaps
//! (a change batched before a page and sent after it repeats what the page said).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use crate::protocol::{SessionId, UserInfo};

/// How long changes gather before they go out together: a join storm costs each user one
/// message per interval instead of two per joiner, and someone who comes and goes inside
/// it costs nothing but a session id.
pub const PRESENCE_DELAY: Duration = Duration::from_millis(100);

/// Bytes of users one page or one presence message carries at most (far below the frame
/// cap, so that one connect is answered with a bounded amount).
pub const PAGE_BYTES: usize = 16 * 1024;

/// Departures one presence message carries at most (a session id takes at most 5 bytes):
/// with a page of users, still far below the frame cap when everyone leaves at once.
pub const GONE_PER_MESSAGE: usize = PAGE_BYTES / 5;

/// An upper bound of a user's encoded length: the name with its length prefix, the
/// session and channel ids as varints, the option tag and the voice flags, and the share
/// (an option tag, then two u16 varints and a byte).
fn encoded_len_bound(user: &UserInfo) -> usize {
    user.name.len() + 5 + 5 + 6 + 2 + 1 + user.share.map_or(0, |_| 3 + 3 + 1)
}

/// Takes users from `users` while they fit in [`PAGE_BYTES`] (at least one); the flag says
/// whether any are left.
pub fn page(users: &mut std::iter::Peekable<impl Iterator<Item = UserInfo>>) -> (Vec<UserInfo>, bool) {
    let mut page = Vec::new();
    let mut bytes = 0;
    while let Some(user) = users.peek() {
        let len = encoded_len_bound(user);
        if !page.is_empty() && bytes + len > PAGE_BYTES {
            break;
        }
        bytes += len;
        page.extend(users.next());
    }
    let more = users.peek().is_some();
    (page, more)
}

/// Sessions whose state changed since the last batch, and when the batch is due.
#[derive(Debug, Default)]
pub struct Changes {
    changed: BTreeSet<SessionId>,
    due: Option<Instant>,
}

impl Changes {
    /// `session` came, changed or went: everyone hears of it within [`PRESENCE_DELAY`].
    pub fn mark(&mut self, now: Instant, session: SessionId) {
        self.changed.insert(session);
        self.due.get_or_insert(now + PRESENCE_DELAY);
    }

    /// Whether `session`'s change has not gone out yet.
    pub fn pending(&self, session: SessionId) -> bool {
        self.changed.contains(&session)
    }

    pub fn due(&self) -> Option<Instant> {
        self.due
    }

    /// The sessions to tell about, once the batch is due.
    pub fn take_due(&mut self, now: Instant) -> Option<BTreeSet<SessionId>> {
        self.due.filter(|due| *due <= now)?;
        self.due = None;
        Some(std::mem::take(&mut self.changed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{ChannelId, ShareInfo, VoiceState, encode_frame};

    fn user(session: u32, name_len: usize) -> UserInfo {
        UserInfo {
            session: SessionId(u32::MAX - session),
            name: "é".repeat(name_len / 2),
            channel: Some(ChannelId(u32::MAX)),
            voice: VoiceState { muted: true, deafened: true },
            share: Some(ShareInfo { width: u16::MAX, height: u16::MAX, fps: u8::MAX }),
        }
    }

    #[test]
    fn pages_stay_under_their_byte_budget_and_lose_no_one() {
        let users: Vec<UserInfo> = (0..5_000).map(|i| user(i, 64)).collect();
        let mut rest = users.clone().into_iter().peekable();
        let mut seen = Vec::new();
        loop {
            let (page, more) = page(&mut rest);
            let frame = encode_frame(&crate::protocol::ServerMsg::Users { users: page.clone(), more }).unwrap();
            assert!(frame.len() <= PAGE_BYTES + 16, "a page of {} bytes", frame.len());
            assert!(!more || page.len() > 150, "pages are not tiny: {}", page.len());
            seen.extend(page);
            if !more {
                break;
            }
        }
        assert_eq!(seen, users);
    }

    #[test]
    #[allow(clippy::disallowed_methods, reason = "the virtual clock starts at an arbitrary real instant")]
    fn changes_are_gathered_until_due_and_then_start_afresh() {
        let start = Instant::now();
        let mut changes = Changes::default();
        assert_eq!(changes.due(), None);
        changes.mark(start, SessionId(2));
        changes.mark(start + Duration::from_millis(60), SessionId(1));
        changes.mark(start + Duration::from_millis(70), SessionId(2));
        assert_eq!(changes.due(), Some(start + PRESENCE_DELAY));
        assert_eq!(changes.take_due(start + Duration::from_millis(99)), None);
        let batch = changes.take_due(start + PRESENCE_DELAY).unwrap();
        assert_eq!(batch.into_iter().collect::<Vec<_>>(), [SessionId(1), SessionId(2)]);
        assert_eq!((changes.due(), changes.take_due(start + PRESENCE_DELAY * 5)), (None, None));
        changes.mark(start + PRESENCE_DELAY * 5, SessionId(3));
        assert_eq!(changes.due(), Some(start + PRESENCE_DELAY * 6));
    }
}
