//! Desktop notifications for direct messages while the window is not focused, through
//! the freedesktop notification service (notify-rust, over D-Bus).
//!
//! Abuse, and what is done about it:
//! - A notification server keeps what it shows (GNOME and KDE keep a history), outside
//!   the vault: the message text is shown only when the user asks for it; by default a
//!   notification says who wrote, not what.
//! - Bodies are markup for most servers: a hostile sender's `<a href=...>` or
//!   `<img src=...>` is escaped, and the hidden characters shown as `[U+...]` marks.
//! - A stranger sending messages in a loop: at most one notification per
//!   [`NOTIFY_GAP`]; what comes between is told in the next one's count.

use super::views::visible;

/// Notifications come no more often than this.
pub const NOTIFY_GAP: f64 = 5.0;
/// The longest message text a notification shows, in characters.
const TEXT_CHARS: usize = 200;

/// What a notification says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub summary: String,
    pub body: String,
}

/// Decides when a direct message becomes a notification (sans-IO: the time is given).
#[derive(Debug, Default)]
pub struct Notifier {
    /// When the last notification went out (egui's clock, seconds).
    last: Option<f64>,
    /// Messages that came since, without a notification of their own.
    held: u32,
}

impl Notifier {
    /// A direct message from `from` came at `now`: the notification to show, if any.
    pub fn message(&mut self, from: &str, text: &str, show_text: bool, now: f64) -> Option<Notice> {
        if self.last.is_some_and(|last| now - last < NOTIFY_GAP) {
            self.held += 1;
            return None;
        }
        self.last = Some(now);
        let summary = format!("{} (VoIPC)", visible(from));
        let mut body = if show_text {
            let shown: String = visible(text).chars().take(TEXT_CHARS).collect();
            escape_markup(&shown)
        } else {
            "sent you a direct message".to_owned()
        };
        if self.held > 0 {
            body.push_str(&format!("\n(and {} more messages)", self.held));
            self.held = 0;
        }
        Some(Notice { summary, body })
    }
}

/// The body as plain text for a server that reads markup.
fn escape_markup(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// Shows `notice`; a session without a notification service logs why and goes on.
/// This waits on D-Bus: call it off the UI thread.
pub fn show(notice: &Notice) {
    let shown = notify_rust::Notification::new()
        .appname("VoIPC")
        .summary(&notice.summary)
        .body(&notice.body)
        .icon("voipc")
        .show();
    if let Err(e) = shown {
        tracing::info!(error = %e, "no desktop notification");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_notification_says_who_wrote_and_not_what_unless_asked() {
        let mut notifier = Notifier::default();
        let notice = notifier.message("bob", "the secret plan", false, 0.0).unwrap();
        assert_eq!(notice.summary, "bob (VoIPC)");
        assert!(!notice.body.contains("secret"), "{notice:?}");
        let notice = notifier.message("bob", "<a href=\"x\">click</a> &\u{202e}", true, 10.0).unwrap();
        assert_eq!(notice.body, "&lt;a href=\"x\"&gt;click&lt;/a&gt; &amp;[U+202E]");
        let long = "x".repeat(5000);
        assert_eq!(notifier.message("bob", &long, true, 20.0).unwrap().body.len(), TEXT_CHARS);
    }

    #[test]
    fn a_flood_of_messages_is_one_notification_every_five_seconds() {
        let mut notifier = Notifier::default();
        let shown: Vec<Notice> =
            (0..100).filter_map(|i| notifier.message("eve", "spam", false, f64::from(i) * 0.1)).collect();
        assert_eq!(shown.len(), 2, "at 0 s and at 5 s");
        assert!(shown[1].body.ends_with("(and 49 more messages)"), "{:?}", shown[1]);
    }
}
