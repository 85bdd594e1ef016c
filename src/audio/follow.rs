//! Which sound device to use, sans-IO: the one the user chose while it is there, the
//! default while it is not, and the chosen one again as soon as it is back. A device
//! that fails while still there is reopened with backoff, not on every tick; the user
//! hears of each change once (the notices become `device` events and a line in the app).
//!
//! Whether the chosen device is there is looked up every [`LOOK_EVERY`], while it is in
//! use too: a sound server may move a stream whose device went away to the default one
//! without a word to the application (PulseAudio 16 does), so a stream that goes on is
//! no proof that its device is still there.
//!
//! The engine's threads drive it: they do what [`DeviceFollow::poll`] asks (open a
//! device, or look whether the chosen one is listed) and report what happened.

use std::time::{Duration, Instant};

/// How often to look whether the chosen device is (still, or again) there.
pub const LOOK_EVERY: Duration = Duration::from_secs(1);
/// The first wait before reopening a device that failed; it doubles each time after.
pub const FIRST_RETRY: Duration = Duration::from_millis(250);
/// The longest wait between reopening attempts.
pub const MAX_RETRY: Duration = Duration::from_secs(8);

/// What to do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Close whatever is open and open this device (`None`: the default one).
    Open(Option<String>),
    /// Look whether the chosen device is listed, and say with [`DeviceFollow::listed`].
    Look(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Nothing open: open at this time.
    Closed { at: Instant },
    /// The chosen device is open (or the default, when none was chosen: then there is
    /// nothing to look for).
    OnChosen { look_at: Option<Instant> },
    /// The default is open because the chosen device is not there.
    OnDefault { look_at: Instant },
}

#[derive(Debug)]
pub struct DeviceFollow {
    /// "microphone" or "speaker", for the notices.
    kind: &'static str,
    wanted: Option<String>,
    /// The chosen device was not there: the default is used until it is back.
    on_default: bool,
    /// The chosen device is listed again and being opened, from the default.
    returning: bool,
    state: State,
    /// Failures in a row, for the backoff.
    failures: u32,
}

impl DeviceFollow {
    /// Follows `wanted` (`None`: always the default), opening it at once.
    pub fn new(kind: &'static str, wanted: Option<String>, now: Instant) -> DeviceFollow {
        DeviceFollow {
            kind,
            wanted,
            on_default: false,
            returning: false,
            state: State::Closed { at: now },
            failures: 0,
        }
    }

    /// What to do at `now`, if anything.
    pub fn poll(&mut self, now: Instant) -> Option<Action> {
        match self.state {
            State::Closed { at } if now >= at => {
                Some(Action::Open(if self.on_default { None } else { self.wanted.clone() }))
            }
            State::OnDefault { look_at } if now >= look_at => {
                self.state = State::OnDefault { look_at: now + LOOK_EVERY };
                self.wanted.clone().map(Action::Look)
            }
            State::OnChosen { look_at: Some(look_at) } if now >= look_at => {
                self.state = State::OnChosen { look_at: Some(now + LOOK_EVERY) };
                self.wanted.clone().map(Action::Look)
            }
            _ => None,
        }
    }

    /// When [`DeviceFollow::poll`] has something to do next (`None`: only after a report).
    pub fn next_wake(&self) -> Option<Instant> {
        match self.state {
            State::Closed { at } => Some(at),
            State::OnDefault { look_at } => Some(look_at),
            State::OnChosen { look_at } => look_at,
        }
    }

    /// A device opened: `name` is what it is called, and `fell_back` says the chosen one
    /// was not there and this is the default.
    pub fn opened(&mut self, now: Instant, name: &str, fell_back: bool) -> Option<String> {
        let kind = self.kind;
        let was_failing = std::mem::take(&mut self.failures) > 0;
        let was_on_default = self.on_default || std::mem::take(&mut self.returning);
        self.on_default = self.wanted.is_some() && (fell_back || self.on_default);
        let look_at = now + LOOK_EVERY;
        self.state = match (self.on_default, &self.wanted) {
            (true, _) => State::OnDefault { look_at },
            (false, Some(_)) => State::OnChosen { look_at: Some(look_at) },
            (false, None) => State::OnChosen { look_at: None },
        };
        match &self.wanted {
            Some(wanted) if self.on_default && !was_on_default => {
                Some(format!("{kind} {wanted} is not there; using {name}"))
            }
            Some(_) if was_on_default && !self.on_default => Some(format!("{kind} {name} is back; using it again")),
            _ if was_failing => Some(format!("{kind} {name} works again")),
            _ => None,
        }
    }

    /// Opening failed (no device at all, or it refused).
    pub fn open_failed(&mut self, now: Instant, error: &str) -> Option<String> {
        if std::mem::take(&mut self.returning) {
            // Listed but not to be opened after all: back to the default, still looking.
            self.on_default = true;
            self.state = State::Closed { at: now };
            return None;
        }
        self.retry_later(now);
        (self.failures == 1).then(|| format!("no {}: {error}; trying again", self.kind))
    }

    /// The open device stopped with `error`; `listed` says whether the chosen device is
    /// still listed (ask only when one was chosen).
    pub fn broke(&mut self, now: Instant, name: &str, error: &str, listed: bool) -> Option<String> {
        if self.wanted.is_some() && !self.on_default && !listed {
            return Some(self.gone(now, name));
        }
        self.retry_later(now);
        (self.failures == 1).then(|| format!("{} {name} failed ({error}); opening it again", self.kind))
    }

    /// The answer to [`Action::Look`]: the chosen device back is opened again at once;
    /// the chosen device in use but no longer listed is given up for the default.
    pub fn listed(&mut self, now: Instant, listed: bool) -> Option<String> {
        match self.state {
            State::OnDefault { .. } if listed => {
                self.on_default = false;
                self.returning = true;
                self.state = State::Closed { at: now };
                None
            }
            State::OnChosen { look_at: Some(_) } if !listed => {
                let name = self.wanted.clone().unwrap_or_default();
                Some(self.gone(now, &name))
            }
            _ => None,
        }
    }

    /// The chosen device went away: the default at once, and the chosen one again when
    /// it is back.
    fn gone(&mut self, now: Instant, name: &str) -> String {
        self.on_default = true;
        self.state = State::Closed { at: now };
        format!("{} {name} is gone; switching to the default", self.kind)
    }

    fn retry_later(&mut self, now: Instant) {
        self.failures += 1;
        let wait = FIRST_RETRY.saturating_mul(1 << (self.failures - 1).min(16)).min(MAX_RETRY);
        self.state = State::Closed { at: now + wait };
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods, reason = "the virtual clock starts at an arbitrary real instant")]
mod tests {
    use super::*;

    fn open(name: Option<&str>) -> Option<Action> {
        Some(Action::Open(name.map(str::to_owned)))
    }

    #[test]
    fn a_chosen_device_that_goes_falls_back_and_returns() {
        let mut now = Instant::now();
        let mut f = DeviceFollow::new("microphone", Some("Headset".into()), now);
        assert_eq!(f.poll(now), open(Some("Headset")));
        assert_eq!(f.opened(now, "Headset", false), None);
        assert_eq!(f.poll(now), None);
        assert_eq!(f.next_wake(), Some(now + LOOK_EVERY), "still there?");
        assert_eq!(f.poll(now + LOOK_EVERY), Some(Action::Look("Headset".into())));
        assert_eq!(f.listed(now + LOOK_EVERY, true), None);
        // Unplugged: the default at once.
        let notice = f.broke(now, "Headset", "the device is not available", false);
        assert_eq!(notice.as_deref(), Some("microphone Headset is gone; switching to the default"));
        assert_eq!(f.poll(now), open(None));
        assert_eq!(f.opened(now, "Built-in", false), None, "said once already");
        // Looked for every second, not before.
        assert_eq!(f.poll(now + LOOK_EVERY / 2), None);
        now += LOOK_EVERY;
        assert_eq!(f.poll(now), Some(Action::Look("Headset".into())));
        assert_eq!(f.listed(now, false), None);
        assert_eq!(f.poll(now), None);
        now += LOOK_EVERY;
        assert_eq!(f.poll(now), Some(Action::Look("Headset".into())));
        // Plugged back in: chosen again.
        f.listed(now, true);
        assert_eq!(f.poll(now), open(Some("Headset")));
        assert_eq!(f.opened(now, "Headset", false).as_deref(), Some("microphone Headset is back; using it again"));
        // A sound server that moves the stream to the default when the device goes says
        // nothing to the stream: the next look finds it gone.
        now += LOOK_EVERY;
        assert_eq!(f.poll(now), Some(Action::Look("Headset".into())));
        let notice = f.listed(now, false);
        assert_eq!(notice.as_deref(), Some("microphone Headset is gone; switching to the default"));
        assert_eq!(f.poll(now), open(None));
    }

    #[test]
    fn a_chosen_device_listed_but_refusing_leaves_the_default_in_use() {
        let now = Instant::now();
        let mut f = DeviceFollow::new("microphone", Some("Headset".into()), now);
        f.poll(now);
        f.opened(now, "Built-in", true);
        assert_eq!(f.poll(now + LOOK_EVERY), Some(Action::Look("Headset".into())));
        f.listed(now + LOOK_EVERY, true);
        assert_eq!(f.poll(now + LOOK_EVERY), open(Some("Headset")));
        assert_eq!(f.open_failed(now + LOOK_EVERY, "busy"), None);
        assert_eq!(f.poll(now + LOOK_EVERY), open(None), "the default again, at once");
        assert_eq!(f.opened(now + LOOK_EVERY, "Built-in", false), None);
        assert_eq!(f.poll(now + 2 * LOOK_EVERY), Some(Action::Look("Headset".into())), "still looking");
    }

    #[test]
    fn a_chosen_device_missing_at_the_start_is_waited_for_on_the_default() {
        let now = Instant::now();
        let mut f = DeviceFollow::new("speaker", Some("USB".into()), now);
        assert_eq!(f.poll(now), open(Some("USB")));
        assert_eq!(f.opened(now, "Built-in", true).as_deref(), Some("speaker USB is not there; using Built-in"));
        assert_eq!(f.poll(now + LOOK_EVERY), Some(Action::Look("USB".into())));
    }

    #[test]
    fn a_device_that_fails_but_is_still_there_is_reopened_with_backoff() {
        let mut now = Instant::now();
        let mut f = DeviceFollow::new("speaker", Some("USB".into()), now);
        f.poll(now);
        f.opened(now, "USB", false);
        assert!(f.broke(now, "USB", "stream invalidated", true).is_some());
        let mut waits = Vec::new();
        for _ in 0..8 {
            let at = f.next_wake().unwrap();
            waits.push(at - now);
            assert_eq!(f.poll(at - Duration::from_millis(1)), None, "not before its time");
            now = at;
            assert_eq!(f.poll(now), open(Some("USB")), "the same device, not the default");
            assert_eq!(f.open_failed(now, "busy"), None, "told once, not on every attempt");
        }
        let ms: Vec<u128> = waits.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [250, 500, 1000, 2000, 4000, 8000, 8000, 8000]);
        now = f.next_wake().unwrap();
        f.poll(now);
        assert_eq!(f.opened(now, "USB", false).as_deref(), Some("speaker USB works again"));
        // A failure after that starts the backoff afresh.
        f.broke(now, "USB", "x", true);
        assert_eq!(f.next_wake(), Some(now + FIRST_RETRY));
    }

    #[test]
    fn without_a_choice_the_default_is_reopened_and_never_looked_for() {
        let now = Instant::now();
        let mut f = DeviceFollow::new("microphone", None, now);
        assert_eq!(f.poll(now), open(None));
        assert_eq!(
            f.open_failed(now, "no input device").as_deref(),
            Some("no microphone: no input device; trying again")
        );
        assert_eq!(f.poll(now + FIRST_RETRY), open(None));
        assert_eq!(f.opened(now + FIRST_RETRY, "Built-in", false).as_deref(), Some("microphone Built-in works again"));
        assert!(f.broke(now, "Built-in", "gone", false).is_some());
        assert_eq!(f.poll(now + FIRST_RETRY), open(None));
        f.opened(now + FIRST_RETRY, "Other", false);
        assert_eq!(f.next_wake(), None, "nothing to look for");
        assert_eq!(f.listed(now, false), None);
    }
}
