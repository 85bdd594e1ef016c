//! Chat history: the newest messages of each conversation, kept in the vault.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

/// Messages kept per conversation (a channel or a direct conversation).
pub const PER_CONVERSATION: usize = 500;
/// Bytes of text (sender and message) kept per conversation: the oldest go first.
pub const BYTES_PER_CONVERSATION: usize = 512 * 1024;
/// Conversations kept: beyond it the one quiet for longest goes. With the byte bound this
/// keeps what peers (or a server that makes up peers) can make us store to 100 MiB,
/// well inside what the vault opens.
pub const MAX_CONVERSATIONS: usize = 200;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMessage {
    pub from: String,
    pub text: String,
    pub time_ms: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    conversations: BTreeMap<String, Conversation>,
    /// Counts recordings, so that the conversation quiet for longest is known.
    clock: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Conversation {
    messages: VecDeque<StoredMessage>,
    bytes: usize,
    last_recorded: u64,
}

fn size(message: &StoredMessage) -> usize {
    message.from.len() + message.text.len()
}

impl History {
    /// Appends a message, dropping the oldest beyond [`PER_CONVERSATION`] messages or
    /// [`BYTES_PER_CONVERSATION`], and the quietest conversation beyond
    /// [`MAX_CONVERSATIONS`].
    pub fn record(&mut self, conversation: &str, message: StoredMessage) {
        self.clock += 1;
        if !self.conversations.contains_key(conversation) && self.conversations.len() >= MAX_CONVERSATIONS {
            let quietest = self.conversations.iter().min_by_key(|(_, c)| c.last_recorded).map(|(k, _)| k.clone());
            self.conversations.remove(&quietest.expect("at the bound, so not empty"));
        }
        let kept = self.conversations.entry(conversation.to_owned()).or_default();
        kept.last_recorded = self.clock;
        kept.bytes += size(&message);
        kept.messages.push_back(message);
        while kept.messages.len() > PER_CONVERSATION || kept.bytes > BYTES_PER_CONVERSATION {
            let Some(oldest) = kept.messages.pop_front() else { break };
            kept.bytes -= size(&oldest);
        }
    }

    /// The first format's history (messages by conversation), within today's bounds.
    pub fn from_first_format(conversations: BTreeMap<String, VecDeque<StoredMessage>>) -> History {
        let mut history = History::default();
        for (conversation, messages) in conversations {
            for message in messages {
                history.record(&conversation, message);
            }
        }
        history
    }

    /// A conversation's messages, oldest first.
    pub fn conversation(&self, conversation: &str) -> impl Iterator<Item = &StoredMessage> {
        self.conversations.get(conversation).into_iter().flat_map(|c| c.messages.iter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_keeps_the_newest_500_per_conversation() {
        let mut history = History::default();
        for i in 0..(PER_CONVERSATION as u64 + 20) {
            history.record("h:1#Lobby", StoredMessage { from: "a".into(), text: format!("m{i}"), time_ms: i });
        }
        history.record("h:1@bob", StoredMessage { from: "bob".into(), text: "dm".into(), time_ms: 0 });
        let lobby: Vec<_> = history.conversation("h:1#Lobby").collect();
        assert_eq!(lobby.len(), PER_CONVERSATION);
        assert_eq!(lobby[0].text, "m20");
        assert_eq!(lobby.last().unwrap().text, "m519");
        assert_eq!(history.conversation("h:1@bob").count(), 1, "conversations are capped apart");
        assert_eq!(history.conversation("nowhere").count(), 0);
    }

    #[test]
    fn what_peers_can_make_us_keep_is_bounded_in_bytes_and_conversations() {
        let mut history = History::default();
        let big = "x".repeat(20_000);
        for i in 0..100u64 {
            history.record("h:1@bob", StoredMessage { from: "bob".into(), text: format!("{i}{big}"), time_ms: i });
        }
        let kept: Vec<_> = history.conversation("h:1@bob").collect();
        let bytes: usize = kept.iter().map(|m| size(m)).sum();
        assert!(bytes <= BYTES_PER_CONVERSATION && bytes > BYTES_PER_CONVERSATION - 20_100, "{bytes}");
        assert!(kept.last().unwrap().text.starts_with("99"), "the newest stay");
        // A server that makes up a peer per message: the quietest conversations go.
        history.record("h:1#Lobby", StoredMessage { from: "me".into(), text: "mine".into(), time_ms: 0 });
        for i in 0..(MAX_CONVERSATIONS + 50) {
            history.record(&format!("h:1@sybil{i}"), StoredMessage { from: "s".into(), text: "hi".into(), time_ms: 0 });
        }
        assert_eq!(history.conversations.len(), MAX_CONVERSATIONS);
        assert_eq!(history.conversation("h:1#Lobby").count(), 0, "the quietest went first");
        assert_eq!(history.conversation(&format!("h:1@sybil{}", MAX_CONVERSATIONS + 49)).count(), 1);
    }
}
