//! Chat history: the newest messages of each conversation, kept in the vault.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

/// Messages kept per conversation (a channel or a direct conversation).
pub const PER_CONVERSATION: usize = 500;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMessage {
    pub from: String,
    pub text: String,
    pub time_ms: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    conversations: BTreeMap<String, VecDeque<StoredMessage>>,
}

impl History {
    /// Appends a message, dropping the oldest beyond [`PER_CONVERSATION`].
    pub fn record(&mut self, conversation: &str, message: StoredMessage) {
        let messages = self.conversations.entry(conversation.to_owned()).or_default();
        messages.push_back(message);
        while messages.len() > PER_CONVERSATION {
            messages.pop_front();
        }
    }

    /// A conversation's messages, oldest first.
    pub fn conversation(&self, conversation: &str) -> impl Iterator<Item = &StoredMessage> {
        self.conversations.get(conversation).into_iter().flatten()
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
}
