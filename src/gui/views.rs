//! The views: functions of the model that turn clicks into [`UiCommand`]s. They edit
//! nothing but the drafts (text being typed) and never block.

use std::sync::mpsc::Sender;

use egui::{Color32, RichText, Ui};

use super::UiCommand;
use super::icons;
use super::model::{Conversation, Model, NewChannel, Screen, Watching, clock, password_strength};
use crate::audio::check::Phase;
use crate::audio::device::DeviceName;
use crate::audio::dsp::VoiceMode;
use crate::protocol::Resolution;
use crate::session::chat::MAX_TEXT_CHARS;
use crate::session::command::ShareRequest;
use crate::session::{ChannelView, Command};

const SPEAKING: Color32 = Color32::from_rgb(67, 181, 129);
const WARNING: Color32 = Color32::from_rgb(240, 71, 71);

fn send(tx: &Sender<UiCommand>, command: UiCommand) {
    // The receiver lives as long as the app; a send can only fail while it shuts down.
    let _ = tx.send(command);
}

fn client(tx: &Sender<UiCommand>, command: Command) {
    send(tx, UiCommand::Client(command));
}

/// The whole window for the current screen.
pub fn window(ui: &mut Ui, model: &mut Model, tx: &Sender<UiCommand>) {
    match model.screen.clone() {
        Screen::Setup => centered(ui, |ui| setup(ui, model, tx)),
        Screen::Unlock => centered(ui, |ui| unlock(ui, model, tx)),
        Screen::Connect => centered(ui, |ui| connect(ui, model, tx)),
        Screen::Connecting { server } => centered(ui, |ui| {
            ui.spinner();
            ui.label(format!("Connecting to {server}..."));
        }),
        Screen::Reconnecting { server, in_secs, reason } => centered(ui, |ui| {
            ui.heading(format!("Connection to {server} lost"));
            ui.label(reason);
            ui.label(format!("Reconnecting in {in_secs} s..."));
            if ui.button("Cancel").clicked() {
                send(tx, UiCommand::Disconnect);
            }
        }),
        Screen::Trust { target, server, fingerprint } => {
            centered(ui, |ui| trust(ui, &target, &server, &fingerprint, tx))
        }
        Screen::CertificateChanged { target, server, expected, actual } => {
            centered(ui, |ui| certificate_changed(ui, model, &target, &server, &expected, &actual, tx));
        }
        Screen::Main => main(ui, model, tx),
    }
    if model.show_settings {
        settings(ui.ctx(), model, tx);
    }
    if model.audio_check.is_some() {
        audio_setup(ui.ctx(), model, tx);
    }
    if model.screen == Screen::Main {
        share_dialog(ui.ctx(), model, tx);
        popped_out_viewer(ui.ctx(), model, tx);
    }
}

/// A text field with its label in front, which also names it for screen readers.
fn labelled(ui: &mut Ui, label: &str, edit: egui::TextEdit<'_>) -> egui::Response {
    ui.horizontal(|ui| {
        let label = ui.label(label);
        ui.add(edit).labelled_by(label.id)
    })
    .inner
}

/// A labelled text field as one row of a grid.
fn grid_field(ui: &mut Ui, label: &str, edit: egui::TextEdit<'_>) {
    let label = ui.label(label);
    ui.add(edit).labelled_by(label.id);
    ui.end_row();
}

fn centered(ui: &mut Ui, add: impl FnOnce(&mut Ui)) {
    egui::CentralPanel::default().show(ui, |ui| {
        ui.vertical_centered(|ui| {
            ui.add_space(ui.available_height() / 6.0);
            ui.set_max_width(460.0);
            add(ui);
        });
    });
}

/// First start: a display name and the vault password that protects this device's keys.
pub fn setup(ui: &mut Ui, model: &mut Model, tx: &Sender<UiCommand>) {
    ui.heading("Welcome to VoIPC");
    ui.label("Your identity lives only on this device, in a vault locked by a password.");
    ui.add_space(12.0);
    let drafts = &mut model.drafts;
    egui::Grid::new("setup").num_columns(2).show(ui, |ui| {
        grid_field(ui, "Display name", egui::TextEdit::singleline(&mut drafts.name));
        grid_field(ui, "Vault password", egui::TextEdit::singleline(&mut drafts.password).password(true));
        grid_field(ui, "Repeat the password", egui::TextEdit::singleline(&mut drafts.password_again).password(true));
    });
    if !drafts.password.is_empty() {
        let (hint, strength) = password_strength(&drafts.password);
        ui.add(egui::ProgressBar::new(strength).text(format!("password strength: {hint}")));
    }
    let ready =
        !drafts.name.trim().is_empty() && !drafts.password.is_empty() && drafts.password == drafts.password_again;
    if !drafts.password_again.is_empty() && drafts.password != drafts.password_again {
        ui.colored_label(WARNING, "The passwords differ.");
    }
    if ui.add_enabled(ready, egui::Button::new("Create identity")).clicked() {
        let name = drafts.name.trim().to_owned();
        let password = std::mem::take(&mut drafts.password).into();
        drafts.password_again.clear();
        send(tx, UiCommand::CreateIdentity { name, password });
    }
    error_line(ui, model);
}

/// Later starts: the vault password.
pub fn unlock(ui: &mut Ui, model: &mut Model, tx: &Sender<UiCommand>) {
    ui.heading(format!("Welcome back, {}", model.settings.name));
    ui.label("Unlock your vault to use your identity.");
    let response =
        labelled(ui, "Vault password", egui::TextEdit::singleline(&mut model.drafts.password).password(true));
    let enter = response.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter));
    if ui.button("Unlock").clicked() || enter {
        let password = std::mem::take(&mut model.drafts.password).into();
        send(tx, UiCommand::Unlock { password });
    }
    error_line(ui, model);
}

/// Where to connect: an address or invite link, saved and recent servers, or host one.
pub fn connect(ui: &mut Ui, model: &mut Model, tx: &Sender<UiCommand>) {
    ui.heading("Connect to a server");
    let response = labelled(
        ui,
        "Server",
        egui::TextEdit::singleline(&mut model.drafts.address).hint_text("host:port or a voipc:// invite link"),
    );
    let enter = response.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter));
    if model.drafts.from_link {
        ui.label(
            RichText::new(
                "Opened from a link: connect only if it came from someone you trust. A server this device \
                 has pinned keeps its certificate whatever a link says.",
            )
            .small(),
        );
    }
    let address = model.drafts.address.trim().to_owned();
    ui.horizontal(|ui| {
        if ui.add_enabled(!address.is_empty(), egui::Button::new("Connect")).clicked() || (enter && !address.is_empty())
        {
            send(tx, UiCommand::Connect { target: address.clone() });
        }
        if ui.add_enabled(!address.is_empty(), egui::Button::new("Save server")).clicked() {
            send(tx, UiCommand::SaveServer(address.clone()));
        }
    });
    for (title, servers) in
        [("Saved servers", &model.settings.saved_servers), ("Recent servers", &model.settings.recent_servers)]
    {
        if servers.is_empty() {
            continue;
        }
        ui.separator();
        ui.label(RichText::new(title).strong());
        for server in servers {
            ui.horizontal(|ui| {
                ui.label(shorten(server));
                if ui.button(format!("Connect to {}", shorten(server))).clicked() {
                    send(tx, UiCommand::Connect { target: server.clone() });
                }
            });
        }
    }
    ui.separator();
    ui.label(RichText::new("Host a server here").strong());
    ui.horizontal(|ui| {
        let label = ui.label("UDP port");
        ui.add(egui::TextEdit::singleline(&mut model.drafts.host_port).hint_text("9987").desired_width(60.0))
            .labelled_by(label.id);
        let port = if model.drafts.host_port.trim().is_empty() {
            Some(9987)
        } else {
            model.drafts.host_port.trim().parse().ok()
        };
        if ui.add_enabled(port.is_some(), egui::Button::new("Host and connect")).clicked() {
            let public = model.drafts.host_address.trim();
            let public = (!public.is_empty()).then(|| public.to_owned());
            send(tx, UiCommand::Host { port: port.unwrap_or(9987), public });
        }
    });
    labelled(
        ui,
        "Address others reach this computer at",
        egui::TextEdit::singleline(&mut model.drafts.host_address)
            .hint_text("for the invite link, e.g. voice.example.org"),
    );
    error_line(ui, model);
}

/// An invite link without its query shown in full is unreadable: keep its host.
fn shorten(server: &str) -> String {
    match server.split_once("/?") {
        Some((host, _)) => format!("{host} (invite)"),
        None => server.to_owned(),
    }
}

/// An unknown server: show the fingerprint, let the user check it.
pub fn trust(ui: &mut Ui, target: &str, server: &str, fingerprint: &str, tx: &Sender<UiCommand>) {
    ui.heading("Unknown server");
    ui.label(format!("{server} presents a certificate this device has not seen. Its fingerprint is:"));
    ui.add_space(6.0);
    ui.code(fingerprint_lines(fingerprint));
    ui.add_space(6.0);
    ui.label("Compare it with the one the server's operator gave you. Connect only if they match.");
    ui.horizontal(|ui| {
        if ui.button("They match: trust and connect").clicked() {
            send(tx, UiCommand::Trust { target: target.to_owned(), fingerprint: fingerprint.to_owned() });
        }
        if ui.button("Cancel").clicked() {
            send(tx, UiCommand::Disconnect);
        }
    });
}

/// How many characters of the new fingerprint the user types to replace a pin.
pub const REPLACE_CONFIRMATION_CHARS: usize = 8;

/// A pinned server changed its certificate (or a link named another one): stop, show
/// both. The only way past is deliberate: the user types the beginning of the new
/// fingerprint, as the operator gave it to them, and replaces the pin.
pub fn certificate_changed(
    ui: &mut Ui,
    model: &mut Model,
    target: &str,
    server: &str,
    expected: &str,
    actual: &str,
    tx: &Sender<UiCommand>,
) {
    ui.heading(RichText::new("STOP: the server's certificate has CHANGED").color(WARNING));
    ui.label(format!(
        "{server} presented (or the link you used named) a different certificate from the one pinned on this \
         device. This can be an attack on your connection. VoIPC did not connect."
    ));
    ui.add_space(6.0);
    ui.label("Pinned:");
    ui.code(fingerprint_lines(expected));
    ui.label("New:");
    ui.code(fingerprint_lines(actual));
    ui.add_space(6.0);
    if ui.button("Back").clicked() {
        model.drafts.replace_confirmation.clear();
        send(tx, UiCommand::Disconnect);
    }
    ui.add_space(12.0);
    ui.collapsing("Replace the pinned certificate", |ui| {
        ui.label(format!(
            "Only if the server's operator told you they replaced the certificate and gave you its new \
             fingerprint. Type the first {REPLACE_CONFIRMATION_CHARS} characters of the new fingerprint as they \
             gave it to you:"
        ));
        labelled(
            ui,
            "New fingerprint begins with",
            egui::TextEdit::singleline(&mut model.drafts.replace_confirmation).desired_width(100.0),
        );
        let typed: String =
            model.drafts.replace_confirmation.chars().filter(|c| *c != ':' && !c.is_whitespace()).collect();
        let confirmed = typed.len() == REPLACE_CONFIRMATION_CHARS
            && actual.get(..REPLACE_CONFIRMATION_CHARS).is_some_and(|start| start.eq_ignore_ascii_case(&typed));
        if ui.add_enabled(confirmed, egui::Button::new("Replace the pinned certificate and connect")).clicked() {
            model.drafts.replace_confirmation.clear();
            send(tx, UiCommand::ReplacePin { target: target.to_owned(), fingerprint: actual.to_owned() });
        }
    });
}

/// Text from others with the characters that reorder or hide text (bidirectional
/// overrides, zero-width and control characters) shown as `[U+202E]` marks.
pub fn visible(text: &str) -> String {
    let mut shown = String::with_capacity(text.len());
    for c in text.chars() {
        if crate::session::is_hidden_char(c) {
            shown.push_str(&format!("[U+{:04X}]", u32::from(c)));
        } else {
            shown.push(c);
        }
    }
    shown
}

/// 64 hex digits in groups of four, two lines.
fn fingerprint_lines(fingerprint: &str) -> String {
    let groups: Vec<&str> = fingerprint.as_bytes().chunks(4).map(|c| std::str::from_utf8(c).unwrap_or("")).collect();
    groups.chunks(8).map(|line| line.join(" ")).collect::<Vec<_>>().join("\n")
}

fn error_line(ui: &mut Ui, model: &mut Model) {
    if let Some(error) = model.error.clone() {
        ui.horizontal(|ui| {
            ui.colored_label(WARNING, error);
            if ui.small_button("Dismiss").clicked() {
                model.error = None;
            }
        });
    }
}

/// Connected: the channel list and voice controls on the left, the chat on the right.
pub fn main(ui: &mut Ui, model: &mut Model, tx: &Sender<UiCommand>) {
    egui::Panel::top("top").show(ui, |ui| top_bar(ui, model, tx));
    egui::Panel::left("channels").resizable(true).default_size(300.0).show(ui, |ui| {
        egui::Panel::bottom("voice").show(ui, |ui| {
            health(ui, model);
            ui.separator();
            voice_bar(ui, model, tx)
        });
        egui::ScrollArea::vertical().show(ui, |ui| channels(ui, model, tx));
    });
    egui::CentralPanel::default().show(ui, |ui| {
        if model.watching.as_ref().is_some_and(|w| !w.popped_out) {
            let height = ui.available_height() * 0.6;
            egui::Panel::top("screen").resizable(true).default_size(height).show(ui, |ui| viewer(ui, model, tx));
        }
        chat(ui, model, tx)
    });
}

fn top_bar(ui: &mut Ui, model: &mut Model, tx: &Sender<UiCommand>) {
    ui.horizontal(|ui| {
        ui.label(RichText::new(format!("Connected to {}", model.server)).color(SPEAKING));
        if let Some(me) = &model.me {
            ui.label(format!("as {me}"));
        }
        if let Some(link) = &model.hosting
            && ui.button("Copy this server's invite").clicked()
        {
            ui.ctx().copy_text(link.clone());
        }
        ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
            if ui.button(format!("{} Disconnect", icons::SIGN_OUT)).clicked() {
                send(tx, UiCommand::Disconnect);
            }
            if ui.button(format!("{} Settings", icons::GEAR)).clicked() {
                model.show_settings = true;
            }
        });
    });
    error_line(ui, model);
}

/// Channels with their users: double-click to join, right-click a user for more.
pub fn channels(ui: &mut Ui, model: &mut Model, tx: &Sender<UiCommand>) {
    let list = model.channels.clone();
    for channel in &list {
        let here = model.my_channel == Some(channel.id);
        let limit = if channel.user_limit > 0 { format!("/{}", channel.user_limit) } else { String::new() };
        let title = format!("{}  ({}{limit})", channel.name, channel.users.len());
        let response = ui
            .horizontal(|ui| {
                let response = ui.selectable_label(here, RichText::new(title).strong());
                if channel.has_password {
                    badge(ui, icons::LOCK_SIMPLE, "needs a password", ui.visuals().weak_text_color());
                }
                response
            })
            .inner;
        if response.double_clicked() && !here {
            join(channel, model, tx);
        }
        let hint = if channel.description.is_empty() { "Double-click to join" } else { &channel.description };
        response.on_hover_text(hint).context_menu(|ui| {
            if ui.add_enabled(!here, egui::Button::new("Join channel")).clicked() {
                join(channel, model, tx);
                ui.close();
            }
            if model.admin && channel.temporary && ui.button("Close channel (admin)").clicked() {
                client(tx, Command::Close(channel.name.clone()));
                ui.close();
            }
        });
        for user in &channel.users {
            user_row(ui, model, user, &list, tx);
        }
    }
    if let Some((channel, password)) = &mut model.drafts.channel_password {
        let mut close = false;
        ui.separator();
        labelled(ui, &format!("Password for {channel}"), egui::TextEdit::singleline(password).password(true));
        ui.horizontal(|ui| {
            if ui.button("Join with password").clicked() {
                client(
                    tx,
                    Command::Join(crate::protocol::JoinRequest {
                        channel: channel.clone(),
                        password: Some(password.clone()),
                        invite: None,
                    }),
                );
                close = true;
            }
            close |= ui.button("Cancel").clicked();
        });
        if close {
            model.drafts.channel_password = None;
        }
    }
    ui.separator();
    ui.horizontal(|ui| {
        if ui.button("New channel").clicked() {
            model.drafts.new_channel = Some(NewChannel::default());
        }
        if model.my_channel.is_some() && ui.button("Invite").clicked() {
            client(tx, Command::Invite { max_uses: 5, ttl_secs: 24 * 3600 });
        }
    });
    if let Some(link) = model.invite.clone() {
        ui.horizontal(|ui| {
            ui.label("Invite ready");
            if ui.button("Copy invite link").clicked() {
                ui.ctx().copy_text(link);
            }
        });
    }
    new_channel(ui, model, tx);
}

/// An icon standing for a state: its name is what a screen reader says and what
/// hovering shows.
fn badge(ui: &mut Ui, icon: &str, what: &str, color: Color32) -> egui::Response {
    let response = ui.label(RichText::new(icon).color(color));
    response.widget_info(|| egui::WidgetInfo::labeled(egui::Role::Label, true, what));
    response.on_hover_text(what)
}

/// A button showing only an icon, named for screen readers and on hover.
fn icon_button(ui: &mut Ui, icon: &str, name: &str, selected: bool) -> egui::Response {
    let response = ui.add(egui::Button::selectable(selected, RichText::new(icon).size(20.0)));
    response.widget_info(|| egui::WidgetInfo::selected(egui::Role::Button, true, selected, name));
    response.on_hover_text(name)
}

/// A round avatar with the name's initial in a colour of its own, and a ring around it
/// while they speak (what Discord and Mumble users read at a glance).
fn avatar(ui: &mut Ui, user: &str, speaking: bool) {
    let size = ui.text_style_height(&egui::TextStyle::Body) + 6.0;
    let (rect, response) = ui.allocate_exact_size(egui::vec2(size, size), egui::Sense::hover());
    let hue = user.bytes().fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b))) % 360;
    let fill = egui::ecolor::Hsva::new(hue as f32 / 360.0, 0.45, 0.55, 1.0);
    let painter = ui.painter();
    let radius = size / 2.0 - 2.0;
    painter.circle_filled(rect.center(), radius, fill);
    let initial = user.chars().find(|c| c.is_alphanumeric()).map_or('?', |c| c.to_ascii_uppercase());
    let font = egui::FontId::proportional(size * 0.55);
    painter.text(rect.center(), egui::Align2::CENTER_CENTER, initial, font, Color32::WHITE);
    if speaking {
        painter.circle_stroke(rect.center(), radius + 1.5, egui::Stroke::new(2.0, SPEAKING));
        response.widget_info(|| egui::WidgetInfo::labeled(egui::Role::Label, true, format!("{user} is speaking")));
    }
}

fn join(channel: &ChannelView, model: &mut Model, tx: &Sender<UiCommand>) {
    if channel.has_password {
        model.drafts.channel_password = Some((channel.name.clone(), String::new()));
    } else {
        client(tx, Command::Join(crate::protocol::JoinRequest::named(&channel.name)));
    }
}

fn user_row(ui: &mut Ui, model: &mut Model, user: &str, channels: &[ChannelView], tx: &Sender<UiCommand>) {
    let speaking = model.speaking.contains(user);
    let me = model.me.as_deref() == Some(user);
    let name = RichText::new(visible(user));
    let response = ui.horizontal(|ui| {
        ui.add_space(8.0);
        avatar(ui, user, speaking);
        let response =
            ui.add(egui::Label::new(if speaking { name.color(SPEAKING) } else { name }).sense(egui::Sense::click()));
        // Badges are widgets of their own, drawn as icons: a name that spells one out
        // ("bob [verified]") stays plain text beside none.
        let muted = ui.visuals().weak_text_color();
        for (shown, icon, what, color) in [
            ((me && model.muted) || model.muted_users.contains(user), icons::MICROPHONE_SLASH, "muted", muted),
            ((me && model.deafened) || model.deafened_users.contains(user), icons::SPEAKER_SLASH, "deafened", muted),
            (model.verified.contains(user), icons::SEAL_CHECK, "verified", SPEAKING),
            (
                model.identity_changed.contains(user),
                icons::SEAL_WARNING,
                "identity changed: not receiving your messages or voice",
                WARNING,
            ),
            (model.locally_muted.contains(user), icons::SPEAKER_X, "muted for you", muted),
        ] {
            if shown {
                badge(ui, icon, what, color);
            }
        }
        if let Some(share) = model.sharing.get(user) {
            badge(
                ui,
                icons::SCREENCAST,
                &format!("sharing {}×{}, {} fps", share.width, share.height, share.fps),
                SPEAKING,
            );
            if !me {
                watch_button(ui, model, user, tx);
            }
        }
        response
    });
    if me {
        return;
    }
    response.inner.on_hover_text("Right-click for volume, mute, messages and the safety number").context_menu(|ui| {
        ui.label(RichText::new(user).strong());
        let mut volume = model.volumes.get(user).copied().unwrap_or(100);
        if ui.add(egui::Slider::new(&mut volume, 0..=200).suffix(" %").text("volume")).changed() {
            model.volumes.insert(user.to_owned(), volume);
            client(tx, Command::Volume { user: user.to_owned(), percent: volume });
        }
        let mut muted = model.locally_muted.contains(user);
        if ui.checkbox(&mut muted, "Mute for me").changed() {
            if muted {
                model.locally_muted.insert(user.to_owned());
            } else {
                model.locally_muted.remove(user);
            }
            client(tx, Command::LocalMute { user: user.to_owned(), muted });
        }
        if ui.button("Message").clicked() {
            model.conversations.entry(Conversation::Direct(user.to_owned())).or_default();
            model.select(Conversation::Direct(user.to_owned()));
            ui.close();
        }
        if ui.button("Safety number").clicked() {
            client(tx, Command::Safety(user.to_owned()));
            ui.close();
        }
        if model.admin {
            admin_menu(ui, user, channels, tx);
        }
    });
}

/// "Watch" on a sharer, or "Stop watching": the app shows one share at a time, so
/// watching another lets the one watched go.
fn watch_button(ui: &mut Ui, model: &Model, user: &str, tx: &Sender<UiCommand>) {
    let watching = model.watching.as_ref().is_some_and(|w| w.user == user);
    if ui.small_button(if watching { "Stop watching" } else { "Watch" }).clicked() {
        if let Some(other) = model.watching.as_ref().filter(|w| w.user != user) {
            client(tx, Command::Watch { user: other.user.clone(), watch: false });
        }
        client(tx, Command::Watch { user: user.to_owned(), watch: !watching });
    }
}

/// The share watched, in the channel view: whose, its figures, the buttons, the picture.
fn viewer(ui: &mut Ui, model: &mut Model, tx: &Sender<UiCommand>) {
    let Some(watching) = model.watching.clone() else { return };
    ui.horizontal(|ui| {
        ui.label(RichText::new(format!("{}'s screen", visible(&watching.user))).strong());
        ui.label(stream_figures(model, &watching));
        ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
            if ui.button("Stop watching").clicked() {
                client(tx, Command::Watch { user: watching.user.clone(), watch: false });
            }
            if ui.button("Pop out").clicked()
                && let Some(w) = &mut model.watching
            {
                w.popped_out = true;
            }
        });
    });
    picture(ui, &watching);
}

/// The size and rate the sharer announces, and what arrived of it in the last second.
fn stream_figures(model: &Model, watching: &Watching) -> String {
    let size = model.sharing.get(&watching.user).map(|s| format!("{}×{}", s.width, s.height));
    let figures = watching.stats.map(|s| format!("{} fps, {} kbit/s, {:.1} % lost", s.fps, s.kbps, s.loss_percent));
    [size, figures].into_iter().flatten().collect::<Vec<_>>().join(", ")
}

/// The newest picture, as large as the space allows without changing its shape.
fn picture(ui: &mut Ui, watching: &Watching) {
    match watching.picture {
        Some((texture, [w, h])) => {
            let size = egui::vec2(w as f32, h as f32);
            let image = egui::Image::from_texture(egui::load::SizedTexture::new(texture, size));
            ui.centered_and_justified(|ui| ui.add(image.max_size(ui.available_size()).maintain_aspect_ratio(true)));
        }
        None => {
            ui.centered_and_justified(|ui| ui.label("Waiting for a picture..."));
        }
    }
}

/// The share watched in a window of its own: resizable, fullscreen on request; closing
/// it puts the share back in the channel view.
fn popped_out_viewer(ctx: &egui::Context, model: &mut Model, tx: &Sender<UiCommand>) {
    let Some(watching) = model.watching.clone().filter(|w| w.popped_out) else { return };
    let title = format!("{}'s screen - VoIPC", visible(&watching.user));
    let builder = egui::ViewportBuilder::default().with_title(title).with_inner_size([960.0, 600.0]);
    let id = egui::ViewportId::from_hash_of("watched screen");
    let put_back = ctx.show_viewport_immediate(id, builder, |ui, _| {
        let mut put_back = ui.ctx().input(|i| i.viewport().close_requested());
        egui::Panel::top("figures").show(ui, |ui| {
            ui.horizontal(|ui| {
                ui.label(stream_figures(model, &watching));
                let fullscreen = ui.ctx().input(|i| i.viewport().fullscreen.unwrap_or(false));
                if ui.button(if fullscreen { "Leave fullscreen" } else { "Fullscreen" }).clicked() {
                    ui.ctx().send_viewport_cmd(egui::ViewportCommand::Fullscreen(!fullscreen));
                }
                put_back |= ui.button("Back to the channel").clicked();
                if ui.button("Stop watching").clicked() {
                    client(tx, Command::Watch { user: watching.user.clone(), watch: false });
                }
            });
        });
        egui::CentralPanel::default().show(ui, |ui| picture(ui, &watching));
        put_back
    });
    if put_back && let Some(w) = &mut model.watching {
        w.popped_out = false;
    }
}

/// Picks what to share and how well, at most.
fn share_dialog(ctx: &egui::Context, model: &mut Model, tx: &Sender<UiCommand>) {
    let Some(draft) = &mut model.drafts.share else { return };
    let (mut open, mut close) = (true, false);
    egui::Window::new("Share your screen").collapsible(false).resizable(false).open(&mut open).show(ctx, |ui| {
        match draft.sources.get(draft.source) {
            None => {
                ui.label("No screen or window to share was found.");
            }
            Some(chosen) => {
                egui::ComboBox::from_label("what to share").selected_text(source_name(chosen)).show_ui(ui, |ui| {
                    for (i, source) in draft.sources.iter().enumerate() {
                        ui.selectable_value(&mut draft.source, i, source_name(source));
                    }
                });
            }
        }
        ui.horizontal(|ui| {
            ui.label("Size, at most:");
            for resolution in Resolution::ALL {
                ui.radio_value(&mut draft.resolution, resolution, resolution.to_string());
            }
        });
        ui.add(egui::Slider::new(&mut draft.fps, 1..=ShareRequest::MAX_FPS).text("frames a second, at most"));
        ui.checkbox(&mut draft.audio, "Share desktop audio (what other applications play; never your call)");
        ui.label(
            RichText::new(
                "When the network or the encoder cannot keep up, the frame rate goes down first, then the \
                 bitrate, then the size. It is encoded only while someone watches.",
            )
            .small(),
        );
        ui.horizontal(|ui| {
            if ui.add_enabled(!draft.sources.is_empty(), egui::Button::new("Share")).clicked() {
                client(tx, Command::Share(Some(draft.request())));
                close = true;
            }
            close |= ui.button("Cancel").clicked();
        });
    });
    if close || !open {
        model.drafts.share = None;
    }
}

/// A source as the picker shows it: "Window: Title", "Screen NAME" or "Whole screen".
fn source_name(source: &str) -> String {
    match source.strip_prefix("window:") {
        // The screen cast portal asks which window itself.
        Some("") => "A window (the system asks which)".to_owned(),
        Some(title) => format!("Window: {}", visible(title)),
        None if source.is_empty() => "Whole screen".to_owned(),
        None => format!("Screen {}", visible(source)),
    }
}

/// What an admin of the server may do to a user.
fn admin_menu(ui: &mut Ui, user: &str, channels: &[ChannelView], tx: &Sender<UiCommand>) {
    ui.separator();
    ui.label(RichText::new("Admin").small());
    if ui.button("Kick").clicked() {
        client(tx, Command::Kick(user.to_owned()));
        ui.close();
    }
    if ui.button("Ban their address for an hour").clicked() {
        client(tx, Command::Ban { user: user.to_owned(), minutes: 60 });
        ui.close();
    }
    ui.menu_button("Move to", |ui| {
        for channel in channels.iter().filter(|c| !c.users.iter().any(|u| u == user)) {
            if ui.button(&channel.name).clicked() {
                client(tx, Command::Move { user: user.to_owned(), channel: channel.name.clone() });
                ui.close();
            }
        }
    });
}

fn new_channel(ui: &mut Ui, model: &mut Model, tx: &Sender<UiCommand>) {
    let Some(draft) = &mut model.drafts.new_channel else { return };
    let mut close = false;
    ui.group(|ui| {
        ui.label(RichText::new("New channel").strong());
        labelled(ui, "Name", egui::TextEdit::singleline(&mut draft.name));
        labelled(ui, "Description", egui::TextEdit::singleline(&mut draft.description));
        labelled(
            ui,
            "Channel password",
            egui::TextEdit::singleline(&mut draft.password).password(true).hint_text("optional"),
        );
        labelled(ui, "User limit", egui::TextEdit::singleline(&mut draft.user_limit).hint_text("0 = none"));
        let limit = if draft.user_limit.trim().is_empty() { Some(0) } else { draft.user_limit.trim().parse().ok() };
        ui.horizontal(|ui| {
            let ready = !draft.name.trim().is_empty() && limit.is_some();
            if ui.add_enabled(ready, egui::Button::new("Create")).clicked() {
                client(
                    tx,
                    Command::Create {
                        name: draft.name.trim().to_owned(),
                        description: draft.description.trim().to_owned(),
                        password: (!draft.password.is_empty()).then(|| draft.password.clone()),
                        user_limit: limit.unwrap_or(0),
                    },
                );
                close = true;
            }
            close |= ui.button("Cancel").clicked();
        });
    });
    if close {
        model.drafts.new_channel = None;
    }
}

/// One figure of a health sample.
type HealthValue = fn(&super::model::Health) -> f32;

/// Connection health: the latest figures, each over a small plot of the last minute.
pub fn health(ui: &mut Ui, model: &Model) {
    egui::CollapsingHeader::new("Connection").default_open(true).show(ui, |ui| {
        let Some(latest) = model.health.back() else {
            ui.label("measuring...");
            return;
        };
        let series: [(&str, String, HealthValue); 4] = [
            ("ping", format!("ping {:.0} ms", latest.rtt_ms), |h| h.rtt_ms),
            ("loss", format!("loss {:.1} %", latest.loss_percent), |h| h.loss_percent),
            ("jitter", format!("jitter {:.1} ms", latest.jitter_ms), |h| h.jitter_ms),
            ("bitrate", format!("{:.0} kbit/s", latest.kbps), |h| h.kbps),
        ];
        egui::Grid::new("health").num_columns(2).show(ui, |ui| {
            for (id, label, value) in series {
                ui.label(label);
                let points: Vec<[f64; 2]> =
                    model.health.iter().enumerate().map(|(i, h)| [i as f64, f64::from(value(h))]).collect();
                egui_plot::Plot::new(id)
                    .height(28.0)
                    .width(120.0)
                    .show_axes(false)
                    .show_grid(false)
                    .allow_zoom(false)
                    .allow_drag(false)
                    .allow_scroll(false)
                    .allow_boxed_zoom(false)
                    .show_x(false)
                    .show_y(false)
                    .include_y(0.0)
                    .show(ui, |plot| plot.line(egui_plot::Line::new(id, points)));
                ui.end_row();
            }
        });
    });
}

/// Mute, deafen, the voice mode and its threshold, noise suppression.
pub fn voice_bar(ui: &mut Ui, model: &mut Model, tx: &Sender<UiCommand>) {
    ui.horizontal(|ui| {
        let (icon, mute) = if model.muted {
            (icons::MICROPHONE_SLASH, "Unmute (Ctrl+M)")
        } else {
            (icons::MICROPHONE, "Mute (Ctrl+M)")
        };
        if icon_button(ui, icon, mute, model.muted).clicked() {
            send(tx, UiCommand::ToggleMute);
        }
        let (icon, deafen) = if model.deafened {
            (icons::SPEAKER_SLASH, "Undeafen (Ctrl+D)")
        } else {
            (icons::SPEAKER_HIGH, "Deafen (Ctrl+D)")
        };
        if icon_button(ui, icon, deafen, model.deafened).clicked() {
            send(tx, UiCommand::ToggleDeafen);
        }
    });
    let mut settings = model.settings.clone();
    egui::ComboBox::from_label("mode").selected_text(mode_name(settings.voice_mode)).show_ui(ui, |ui| {
        for mode in [VoiceMode::VoiceActivity, VoiceMode::PushToTalk, VoiceMode::AlwaysOn] {
            ui.selectable_value(&mut settings.voice_mode, mode, mode_name(mode));
        }
    });
    if settings.voice_mode == VoiceMode::VoiceActivity {
        ui.add(egui::Slider::new(&mut settings.vad_threshold, -80.0..=-10.0).suffix(" dBFS").text("threshold"));
        level_meter(ui, model.input_level, settings.vad_threshold);
    }
    if settings.voice_mode == VoiceMode::PushToTalk {
        ui.label(format!("Hold {} to talk (in this window)", settings.push_to_talk_key));
    }
    ui.checkbox(&mut settings.denoise, "Noise suppression");
    ui.checkbox(&mut settings.echo_cancel, "Echo cancellation");
    if settings != model.settings {
        send(tx, UiCommand::SaveSettings(Box::new(settings)));
    }
    ui.separator();
    share_bar(ui, model, tx);
}

/// Our screen share: the button that opens the share dialog, or what is shared and a
/// button that stops it.
fn share_bar(ui: &mut Ui, model: &Model, tx: &Sender<UiCommand>) {
    ui.horizontal_wrapped(|ui| match &model.my_share {
        Some(share) => {
            let text =
                format!("Sharing {}×{} at {} fps, {} watching", share.width, share.height, share.fps, share.viewers);
            ui.label(RichText::new(text).color(SPEAKING)).on_hover_text(format!("encoder: {}", share.encoder));
            if ui.button("Stop sharing").clicked() {
                client(tx, Command::Share(None));
            }
        }
        None => {
            let button = ui.add_enabled(
                model.my_channel.is_some(),
                egui::Button::new(format!("{} Share screen", icons::SCREENCAST)),
            );
            if button.on_disabled_hover_text("Join a channel first").clicked() {
                send(tx, UiCommand::OpenShareDialog);
            }
        }
    });
}

/// The microphone's level as a bar from -80 to -10 dBFS, with the threshold as a line
/// across it: green above the threshold (the gate opens), grey below.
fn level_meter(ui: &mut Ui, level: Option<f32>, threshold: f32) {
    let fraction = |dbfs: f32| ((dbfs + 80.0) / 70.0).clamp(0.0, 1.0);
    let (rect, response) =
        ui.allocate_exact_size(egui::vec2(ui.available_width().min(220.0), 8.0), egui::Sense::hover());
    let painter = ui.painter_at(rect);
    painter.rect_filled(rect, 2.0, ui.visuals().extreme_bg_color);
    if let Some(level) = level {
        let colour = if level >= threshold { SPEAKING } else { ui.visuals().weak_text_color() };
        let mut filled = rect;
        filled.set_width(rect.width() * fraction(level));
        painter.rect_filled(filled, 2.0, colour);
    }
    let x = rect.left() + rect.width() * fraction(threshold);
    painter.vline(x, rect.y_range(), egui::Stroke::new(2.0, WARNING));
    let text = level.map_or_else(|| "no input yet".to_owned(), |l| format!("input {l:.0} dBFS"));
    response.on_hover_text(text);
}

fn mode_name(mode: VoiceMode) -> &'static str {
    match mode {
        VoiceMode::VoiceActivity => "Voice activity",
        VoiceMode::PushToTalk => "Push to talk",
        VoiceMode::AlwaysOn => "Always on",
    }
}

/// The conversation tabs, the selected conversation and the line being typed.
pub fn chat(ui: &mut Ui, model: &mut Model, tx: &Sender<UiCommand>) {
    ui.horizontal_wrapped(|ui| {
        for conversation in model.conversations.keys().cloned().collect::<Vec<_>>() {
            let unread = model.unread.get(&conversation).copied().unwrap_or(0);
            let title = if unread > 0 { format!("{} ({unread})", conversation.title()) } else { conversation.title() };
            if ui.selectable_label(model.selected.as_ref() == Some(&conversation), title).clicked() {
                model.select(conversation);
            }
        }
    });
    ui.separator();
    let Some(selected) = model.selected.clone() else {
        ui.label("Join a channel to talk and chat.");
        return;
    };
    ui.label(RichText::new("End-to-end encrypted: only the people in this conversation can read it.").small());
    if let (Conversation::Channel(_), Some(members)) = (&selected, &model.waiting_for_keys) {
        let text = if members.is_empty() {
            "Your message waits for the channel's new key (someone joined or left).".to_owned()
        } else {
            format!("Your message waits for keys from {} members: {}", members.len(), members.join(", "))
        };
        ui.label(RichText::new(text).italics());
    }
    if let Conversation::Direct(peer) = &selected
        && model.identity_changed.contains(peer)
    {
        ui.colored_label(
            WARNING,
            format!(
                "{peer}'s identity key changed: they receive none of your messages or voice until you compare \
                 safety numbers and accept the new identity."
            ),
        );
    }
    let composer_height = 64.0;
    egui::ScrollArea::vertical()
        .max_height(ui.available_height() - composer_height)
        .stick_to_bottom(true)
        .auto_shrink([false, false])
        .show_viewport(ui, |ui, viewport| {
            let lines = model.conversations.get(&selected).map_or(&[][..], Vec::as_slice);
            visible_rows(ui, ui.scope_id().with(&selected), lines.len(), viewport, |ui, at| {
                let line = &lines[at];
                ui.horizontal_wrapped(|ui| {
                    // When it arrived; the sender's own claim beside it when they differ.
                    let arrived = line.received_ms.unwrap_or(line.time_ms);
                    ui.label(RichText::new(clock(arrived)).weak().monospace());
                    if arrived.abs_diff(line.time_ms) > 60_000 {
                        ui.label(RichText::new(format!("(sent {})", clock(line.time_ms))).weak().small());
                    }
                    ui.label(RichText::new(visible(&line.from)).strong());
                    if line.identity_changed {
                        ui.colored_label(WARNING, "[identity changed]");
                    }
                    ui.label(visible(&line.text));
                    if let Some((reached, total)) = line.delivered {
                        ui.label(RichText::new(format!("delivered {reached}/{total}")).weak().small());
                    }
                });
            });
        });
    ui.separator();
    let count = model.drafts.message.chars().count();
    // A channel's pane stays open after leaving it, but writes only while we are in it.
    let current = model.channels.iter().find(|c| Some(c.id) == model.my_channel).map(|c| c.name.as_str());
    let elsewhere = matches!(&selected, Conversation::Channel(name) if Some(name.as_str()) != current);
    if let (true, Conversation::Channel(name)) = (elsewhere, &selected) {
        ui.colored_label(WARNING, format!("You are not in {name}: join it again to write here."));
    }
    ui.horizontal(|ui| {
        let label = ui.label("Message");
        let response = ui
            .add(
                egui::TextEdit::singleline(&mut model.drafts.message)
                    .hint_text(selected.title())
                    .desired_width(ui.available_width() - 140.0),
            )
            .labelled_by(label.id);
        let counter = RichText::new(format!("{count}/{MAX_TEXT_CHARS}")).small();
        ui.label(if count > MAX_TEXT_CHARS { counter.color(WARNING) } else { counter.weak() });
        let enter = response.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter));
        let ready = count > 0 && count <= MAX_TEXT_CHARS && !elsewhere;
        if (ui.add_enabled(ready, egui::Button::new("Send")).clicked() || enter) && ready {
            let text = std::mem::take(&mut model.drafts.message);
            send(tx, UiCommand::Send { to: selected.clone(), text });
        }
    });
    safety(ui, model, tx);
}

fn safety(ui: &mut Ui, model: &mut Model, tx: &Sender<UiCommand>) {
    let Some(safety) = model.safety.clone() else { return };
    let mut open = true;
    egui::Window::new(format!("Safety number with {}", safety.user)).open(&mut open).show(ui.ctx(), |ui| {
        ui.label("Compare these digits with theirs, in person or on a call. If they match, nobody is in between.");
        let digits: Vec<&str> =
            safety.number.as_bytes().chunks(5).map(|c| std::str::from_utf8(c).unwrap_or("")).collect();
        ui.code(digits.chunks(4).map(|row| row.join(" ")).collect::<Vec<_>>().join("\n"));
        if safety.identity_changed {
            ui.colored_label(
                WARNING,
                "These are the digits of their NEW identity key. Until you accept it, they receive none of your \
                 messages or voice.",
            );
        }
        let accept = if safety.identity_changed { "Accept new identity" } else { "Mark as verified" };
        if safety.verified {
            ui.label(RichText::new("Verified").color(SPEAKING));
        } else if ui.button(accept).clicked() {
            client(tx, Command::Verify(safety.user.clone()));
        }
    });
    if !open {
        model.safety = None;
    }
}

/// Devices, theme and scale; they persist in the settings file.
pub fn settings(ctx: &egui::Context, model: &mut Model, tx: &Sender<UiCommand>) {
    let mut settings = model.settings.clone();
    let mut open = true;
    egui::Window::new("Settings").open(&mut open).show(ctx, |ui| {
        device_choice(ui, "Microphone", &model.devices.inputs, &mut settings.input_device);
        device_choice(ui, "Speaker", &model.devices.outputs, &mut settings.output_device);
        if ui.button("Audio setup and microphone test").clicked() {
            send(tx, UiCommand::AudioCheck(true));
        }
        ui.separator();
        ui.horizontal(|ui| {
            ui.label("Theme");
            ui.selectable_value(&mut settings.dark, true, "Dark");
            ui.selectable_value(&mut settings.dark, false, "Light");
        });
        ui.add(egui::Slider::new(&mut settings.scale, 0.75..=2.0).text("UI scale"));
        labelled(ui, "Push-to-talk key", egui::TextEdit::singleline(&mut settings.push_to_talk_key));
        ui.checkbox(&mut settings.global_push_to_talk, "Push-to-talk in every window (takes the key from other apps)");
        ui.separator();
        ui.label(RichText::new("Sounds and notifications").strong());
        ui.checkbox(&mut settings.cues.joined, "Sound when someone joins your channel");
        ui.checkbox(&mut settings.cues.left, "Sound when someone leaves it");
        ui.checkbox(&mut settings.cues.message, "Sound for a direct message");
        ui.checkbox(
            &mut settings.notify_direct_messages,
            "Notify of direct messages while the window is in the background",
        );
        ui.add_enabled(
            settings.notify_direct_messages,
            egui::Checkbox::new(&mut settings.notification_text, "Show the message in the notification"),
        )
        .on_hover_text("The system's notification history keeps what it shows, outside the vault");
    });
    model.show_settings = open;
    if settings != model.settings {
        send(tx, UiCommand::SaveSettings(Box::new(settings)));
    }
}

/// The audio setup (shown at first start, and from the settings): the devices, the
/// microphone's level against the threshold, and a test that records a few seconds
/// and plays them back as the others would hear them. No server is needed.
pub fn audio_setup(ctx: &egui::Context, model: &mut Model, tx: &Sender<UiCommand>) {
    let Some(check) = model.audio_check.clone() else { return };
    let mut settings = model.settings.clone();
    let mut open = true;
    let window = egui::Window::new("Audio setup").collapsible(false).open(&mut open);
    let centered = window.pivot(egui::Align2::CENTER_CENTER).default_pos(ctx.content_rect().center());
    centered.show(ctx, |ui| {
        device_choice(ui, "Microphone", &model.devices.inputs, &mut settings.input_device);
        device_choice(ui, "Speaker", &model.devices.outputs, &mut settings.output_device);
        ui.separator();
        ui.horizontal(|ui| {
            let (color, what) = if check.talking {
                (SPEAKING, "On the air: the others would hear this")
            } else {
                (ui.visuals().weak_text_color(), "Quiet: the gate is shut")
            };
            ui.label(RichText::new(format!("{} {what}", icons::WAVEFORM)).color(color));
        });
        level_meter(ui, check.level, settings.vad_threshold);
        if settings.voice_mode != VoiceMode::AlwaysOn {
            ui.add(egui::Slider::new(&mut settings.vad_threshold, -80.0..=-10.0).suffix(" dBFS").text("threshold"));
        }
        ui.checkbox(&mut settings.denoise, "Noise suppression");
        ui.checkbox(&mut settings.echo_cancel, "Echo cancellation");
        ui.separator();
        let seconds = crate::audio::check::RECORD_FOR.as_secs();
        match check.phase {
            Phase::Idle => {
                if ui.button(format!("{} Record {seconds} s and play back", icons::MICROPHONE)).clicked() {
                    send(tx, UiCommand::RecordCheck);
                }
            }
            Phase::Recording => {
                ui.label(RichText::new("Recording: speak as you would in a call...").color(WARNING));
            }
            Phase::Playing => {
                ui.label(RichText::new("Playing back what the others would hear...").color(SPEAKING));
            }
        }
        match check.suggested {
            Some(Some(threshold)) if settings.voice_mode == VoiceMode::VoiceActivity => {
                ui.horizontal(|ui| {
                    ui.label(format!("Your voice suggests a threshold of {threshold:.0} dBFS."));
                    if ui.button("Use it").clicked() {
                        settings.vad_threshold = threshold;
                    }
                });
            }
            Some(None) => {
                ui.label("Your voice did not stand out from the background: speak closer, or turn the room down.");
            }
            _ => {}
        }
        if let Some(notice) = &check.notice {
            ui.colored_label(WARNING, notice);
        }
        ui.separator();
        if ui.button("Done").clicked() {
            send(tx, UiCommand::AudioCheck(false));
        }
    });
    if !open {
        send(tx, UiCommand::AudioCheck(false));
    }
    if settings != model.settings {
        send(tx, UiCommand::SaveSettings(Box::new(settings)));
    }
}

/// Lays out only the rows of a list that fall in `viewport` (a scroll area's, in its
/// content's coordinates); the others are empty space of the height each had when last
/// drawn (or one line's, before that), remembered under `id`. A pane of hundreds of
/// wrapped messages then costs what its visible ones do.
fn visible_rows(ui: &mut Ui, id: egui::Id, rows: usize, viewport: egui::Rect, mut row: impl FnMut(&mut Ui, usize)) {
    let mut heights: Vec<f32> = ui.data(|d| d.get_temp(id)).unwrap_or_default();
    let guess = ui.text_style_height(&egui::TextStyle::Body) + ui.spacing().item_spacing.y;
    heights.resize(rows, guess);
    let origin = ui.cursor().top();
    let mut first = 0;
    let mut above = 0.0;
    while first < rows && above + heights[first] < viewport.min.y {
        above += heights[first];
        first += 1;
    }
    ui.add_space(above);
    let mut next = first;
    while next < rows && ui.cursor().top() - origin <= viewport.max.y {
        let top = ui.cursor().top();
        row(ui, next);
        heights[next] = ui.cursor().top() - top;
        next += 1;
    }
    ui.add_space(heights[next..].iter().sum());
    ui.data_mut(|d| d.insert_temp(id, heights));
}

fn device_choice(ui: &mut Ui, label: &str, devices: &[DeviceName], chosen: &mut Option<String>) {
    egui::ComboBox::from_label(label).selected_text(chosen.clone().unwrap_or_else(|| "System default".into())).show_ui(
        ui,
        |ui| {
            ui.selectable_value(chosen, None, "System default");
            for device in devices {
                ui.selectable_value(chosen, Some(device.name.clone()), &device.name);
            }
        },
    );
}
