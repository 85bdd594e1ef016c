//! The icons the window draws with: Phosphor's icon font (assets/fonts, MIT), a fallback
//! after egui's text fonts so that an icon's code point can sit in any label, and the
//! window's own icon.
//!
//! The font is the one the egui-phosphor crate ships; the crate is not a dependency
//! because its releases follow egui's and none is made for egui 0.37 yet. The code
//! points below are Phosphor's (they are the same in every release of its font).

use std::sync::Arc;

const PHOSPHOR: &[u8] = include_bytes!("../../assets/fonts/Phosphor.ttf");
/// The app's icon, 256 px (drawn from assets/icons/voipc.svg).
pub const APP_ICON_PNG: &[u8] = include_bytes!("../../assets/icons/voipc.png");

pub const MICROPHONE: &str = "\u{E326}";
pub const MICROPHONE_SLASH: &str = "\u{E328}";
pub const SPEAKER_HIGH: &str = "\u{E44A}";
pub const SPEAKER_SLASH: &str = "\u{E45A}";
pub const SPEAKER_X: &str = "\u{E45C}";
pub const LOCK_SIMPLE: &str = "\u{E308}";
pub const SEAL_CHECK: &str = "\u{E606}";
pub const SEAL_WARNING: &str = "\u{E60C}";
pub const SCREENCAST: &str = "\u{E404}";
pub const GEAR: &str = "\u{E270}";
pub const SIGN_OUT: &str = "\u{E42A}";
pub const WAVEFORM: &str = "\u{E802}";
pub const USERS: &str = "\u{E4D6}";

/// Adds the icon font right behind the first text font of the proportional and
/// monospace families: before egui's emoji fonts, which have glyphs of their own at
/// some of these private-use code points.
pub fn install(ctx: &egui::Context) {
    let mut fonts = egui::FontDefinitions::default();
    fonts.font_data.insert("phosphor".into(), Arc::new(egui::FontData::from_static(PHOSPHOR)));
    for family in [egui::FontFamily::Proportional, egui::FontFamily::Monospace] {
        let list = fonts.families.entry(family).or_default();
        list.insert(list.len().min(1), "phosphor".into());
    }
    ctx.set_fonts(fonts);
}

/// The window's icon.
pub fn app_icon() -> egui::IconData {
    eframe::icon_data::from_png_bytes(APP_ICON_PNG).expect("the app icon is a PNG built into the binary")
}

#[cfg(test)]
mod tests {
    /// Whether proportional text finds a glyph for `c`, with or without the icon font.
    fn has_glyph(with_icons: bool) -> impl Fn(char) -> bool {
        let ctx = egui::Context::default();
        if with_icons {
            super::install(&ctx);
        }
        // The fonts are loaded by a frame; its texture updates are nobody's to upload.
        ctx.run_ui(egui::RawInput::default(), |_| {}).textures_delta.clear();
        move |c| ctx.fonts_mut(|fonts| fonts.has_glyph(&egui::FontId::proportional(14.0), c))
    }

    #[test]
    fn every_icon_comes_from_the_icon_font() {
        let (with, without) = (has_glyph(true), has_glyph(false));
        for icon in [
            super::MICROPHONE,
            super::MICROPHONE_SLASH,
            super::SPEAKER_HIGH,
            super::SPEAKER_SLASH,
            super::SPEAKER_X,
            super::LOCK_SIMPLE,
            super::SEAL_CHECK,
            super::SEAL_WARNING,
            super::SCREENCAST,
            super::GEAR,
            super::SIGN_OUT,
            super::WAVEFORM,
            super::USERS,
        ] {
            let c = icon.chars().next().unwrap();
            assert!(with(c) && !without(c), "U+{:04X} is not drawn from Phosphor.ttf", u32::from(c));
        }
        let icon = super::app_icon();
        assert_eq!((icon.width, icon.height), (256, 256));
    }
}
