//! User and channel names: one canonical form for every comparison, and the characters a
//! name may not hold. The relay, the server's config and the clients all use these.

use unicode_general_category::{GeneralCategory, get_general_category};
use unicode_normalization::UnicodeNormalization;

/// The form in which two names are the same name: Unicode NFC, full case folding, NFC
/// again (folding can leave text unnormalised). "Bob", "BOB" and "bob" are one name, and
/// so are "é" composed and decomposed, and "STRASSE" and "straße".
pub fn canonical_name(name: &str) -> String {
    let composed: String = name.trim().nfc().collect();
    caseless::default_case_fold_str(&composed).nfc().collect()
}

/// Why a name is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("a name must have visible characters")]
    Empty,
    #[error("a name may not hold U+{0:04X}: an invisible or control character")]
    Invisible(u32),
}

/// Checks that `name` (as trimmed) shows what it is: not empty, and without characters
/// that are invisible or act on the text around them: controls (Cc), format characters
/// such as zero-width spaces and bidirectional overrides (Cf), private use (Co),
/// surrogates (Cs), line and paragraph separators (Zl, Zp).
pub fn check_visible(name: &str) -> Result<(), NameError> {
    let name = name.trim();
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    let hidden = name.chars().find(|c| {
        matches!(
            get_general_category(*c),
            GeneralCategory::Control
                | GeneralCategory::Format
                | GeneralCategory::PrivateUse
                | GeneralCategory::Surrogate
                | GeneralCategory::LineSeparator
                | GeneralCategory::ParagraphSeparator
        )
    });
    match hidden {
        Some(c) => Err(NameError::Invisible(u32::from(c))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_name_whatever_the_case_or_composition() {
        for (a, b) in [("Bob", "bOB"), ("caf\u{e9}", "CAFE\u{301}"), ("STRASSE", "stra\u{df}e"), (" Lobby ", "lobby")] {
            assert_eq!(canonical_name(a), canonical_name(b), "{a:?} and {b:?}");
        }
        assert_ne!(canonical_name("bob"), canonical_name("b\u{f6}b"));
    }

    #[test]
    fn invisible_and_control_characters_are_refused() {
        assert_eq!(check_visible("  "), Err(NameError::Empty));
        for bad in ["bo\u{200b}b", "\u{202e}evil", "a\u{2028}b", "x\u{2029}y", "p\u{e000}", "tab\there", "zw\u{feff}"] {
            assert!(matches!(check_visible(bad), Err(NameError::Invisible(_))), "{bad:?}");
        }
        for good in ["bob", "Zoë", "北京", "Late Night", "o'brien-2"] {
            assert_eq!(check_visible(good), Ok(()), "{good:?}");
        }
    }
}
