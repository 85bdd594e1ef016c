//! Every view driven like a user would: find a widget by its label, click or type,
//! and check the command the view sent (egui_kittest, no display, no GPU).

use std::sync::mpsc::{Receiver, channel};

use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;

use super::model::{Conversation, Model, Screen, ShareDraft};
use super::{UiCommand, views};
use crate::protocol::{JoinRequest, Resolution, ShareInfo};
use crate::session::command::ShareRequest;
use crate::session::{ChannelView, Command, Event};

/// A harness showing `view` over `model`, and the commands it sends.
fn harness<'a>(
    model: Model,
    view: fn(&mut egui::Ui, &mut Model, &std::sync::mpsc::Sender<UiCommand>),
) -> (Harness<'a, Model>, Receiver<UiCommand>) {
    let (tx, rx) = channel();
    let mut harness = Harness::builder()
        .with_size(egui::vec2(1000.0, 700.0))
        .with_context_setup(super::icons::install)
        .build_ui_state(move |ui, model: &mut Model| view(ui, model, &tx), model);
    harness.run();
    (harness, rx)
}

/// Clicks into the field labelled `label` and types `text`.
fn type_into(h: &mut Harness<'_, Model>, label: &str, text: &str) {
    h.get_by_label(label).click();
    h.run();
    h.get_by_label(label).type_text(text);
    h.run();
}

/// Joins a channel the way the tests can: its context menu's "Join channel" (a mouse
/// double-clicks the row; kittest's synthetic clicks do not count as one).
fn join_from_menu(h: &mut Harness<'_, Model>, label: &str) {
    h.get_by_label(label).click_secondary();
    h.run();
    h.get_by_label("Join channel").click();
    h.run();
}

/// A channel someone made, with nobody in it.
fn empty_temporary_channel(id: u32, name: &str) -> ChannelView {
    ChannelView {
        id,
        name: name.into(),
        description: String::new(),
        has_password: false,
        user_limit: 0,
        temporary: true,
        users: vec![],
    }
}

fn sent(rx: &Receiver<UiCommand>) -> Vec<UiCommand> {
    rx.try_iter().collect()
}

#[test]
fn first_start_creates_an_identity_with_a_matching_password() {
    let (mut h, rx) = harness(Model::default(), views::setup);
    type_into(&mut h, "Display name", "alice");
    type_into(&mut h, "Vault password", "correct horse battery");
    type_into(&mut h, "Repeat the password", "correct horse battry");
    assert!(h.query_by_label("The passwords differ.").is_some());
    h.state_mut().drafts.password_again = "correct horse battery".into();
    h.run();
    assert!(h.query_by_label_contains("password strength: strong").is_some());
    h.get_by_label("Create identity").click();
    h.run();
    let commands = sent(&rx);
    assert!(
        matches!(&commands[..], [UiCommand::CreateIdentity { name, password }] if name == "alice" && password.as_str() == "correct horse battery"),
        "{commands:?}"
    );
}

#[test]
fn unlock_sends_the_password_and_shows_a_wrong_one() {
    let model = Model {
        screen: Screen::Unlock,
        error: Some("Wrong password. Nothing was changed; try again.".into()),
        ..Model::default()
    };
    let (mut h, rx) = harness(model, views::unlock);
    assert!(h.query_by_label("Wrong password. Nothing was changed; try again.").is_some());
    type_into(&mut h, "Vault password", "secret");
    h.get_by_label("Unlock").click();
    h.run();
    assert!(matches!(&sent(&rx)[..], [UiCommand::Unlock { password }] if password.as_str() == "secret"));
}

#[test]
fn connect_takes_an_address_a_saved_server_or_hosts_one() {
    let mut model = Model { screen: Screen::Connect, ..Model::default() };
    model.settings.saved_servers.push("voice.example.org:9987".into());
    let (mut h, rx) = harness(model, views::connect);
    type_into(&mut h, "Server", "127.0.0.1:9987");
    h.get_by_label("Connect").click();
    h.run();
    h.get_by_label("Connect to voice.example.org:9987").click();
    h.run();
    type_into(&mut h, "Address others reach this computer at", "voice.example.org");
    h.get_by_label("Host and connect").click();
    h.run();
    assert_eq!(
        sent(&rx),
        [
            UiCommand::Connect { target: "127.0.0.1:9987".into() },
            UiCommand::Connect { target: "voice.example.org:9987".into() },
            UiCommand::Host { port: 9987, public: Some("voice.example.org".into()) },
        ]
    );
}

/// Opened with a link: the connect screen is filled in, says where the address came
/// from, and nothing connects until the user does.
#[test]
fn a_link_fills_the_connect_screen_and_connects_nobody() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let link = format!("voipc://voice.example.org:9987/?fp={}&channel=Den", "ab".repeat(32));
    let paths = super::Paths { data_dir: dir.path().join("data"), settings_file: dir.path().join("settings.toml") };
    let app = super::App::new(egui::Context::default(), runtime.handle().clone(), paths, Some(link.clone()));
    assert_eq!((app.model.drafts.address.as_str(), app.model.drafts.from_link), (link.as_str(), true));
    assert!(app.client.is_none() && app.model.screen == Screen::Setup, "first an identity, then the user connects");
    let model = Model { screen: Screen::Connect, drafts: app.model.drafts.clone(), ..Model::default() };
    let (mut h, rx) = harness(model, views::connect);
    assert!(h.query_by_label_contains("Opened from a link").is_some());
    h.get_by_label("Connect").click();
    h.run();
    assert_eq!(sent(&rx), [UiCommand::Connect { target: link }]);
}

#[test]
fn an_unknown_server_asks_and_a_changed_certificate_stops_until_replaced_deliberately() {
    let fingerprint = "ab".repeat(32);
    let (tx, rx) = channel();
    let fp = fingerprint.clone();
    let mut h = Harness::new_ui(move |ui| views::trust(ui, "h:1", "h:1", &fp, &tx));
    h.run();
    assert!(h.query_by_label_contains("abab abab").is_some(), "the fingerprint in groups");
    h.get_by_label("They match: trust and connect").click();
    h.run();
    assert_eq!(sent(&rx), [UiCommand::Trust { target: "h:1".into(), fingerprint: fingerprint.clone() }]);

    let (expected, actual) = ("11".repeat(32), "2a".repeat(32));
    let model = Model {
        screen: Screen::CertificateChanged {
            target: "h:1".into(),
            server: "h:1".into(),
            expected: expected.clone(),
            actual: actual.clone(),
        },
        ..Model::default()
    };
    let (mut h, rx) = harness(model, views::window);
    assert!(h.query_by_label_contains("1111 1111").is_some() && h.query_by_label_contains("2a2a 2a2a").is_some());
    h.get_by_label("Back").click();
    h.run();
    assert_eq!(sent(&rx), [UiCommand::Disconnect]);
    // Replacing the pin is a deliberate step: open it, type the new fingerprint's start.
    h.get_by_label("Replace the pinned certificate").click();
    h.run();
    let replace = "Replace the pinned certificate and connect";
    for wrong in ["", "2a2a", "11111111", "2a2a2a2b"] {
        h.state_mut().drafts.replace_confirmation = wrong.into();
        h.run();
        h.get_by_label(replace).click();
        h.run();
        assert_eq!(sent(&rx), [], "{wrong:?} does not confirm");
    }
    h.state_mut().drafts.replace_confirmation = "2A:2A:2A:2A".into();
    h.run();
    h.get_by_label(replace).click();
    h.run();
    assert_eq!(sent(&rx), [UiCommand::ReplacePin { target: "h:1".into(), fingerprint: actual }]);
}

#[test]
fn badges_are_widgets_a_name_cannot_spell_out() {
    let mut model = Model::fixture();
    model.channels[0].users.push("dave [verified]".into());
    model.apply(&Event::Trust { user: "bob".into(), verified: true, identity_changed: false });
    let (h, _rx) = harness(model, views::channels);
    assert!(h.query_by_label("dave [verified]").is_some(), "dave's name, as he chose it");
    let badges: Vec<_> = h.query_all_by_label("verified").collect();
    assert_eq!(badges.len(), 1, "one verified badge, bob's");
    // Another server: bob there is not the bob verified here.
    let mut model = Model::fixture();
    model.apply(&Event::Trust { user: "bob".into(), verified: true, identity_changed: false });
    model.apply(&Event::Connected { session: 1, name: "alice".into(), identity: "ab".repeat(32) });
    assert!(!model.verified.contains("bob"));
}

#[test]
fn the_channel_list_shows_who_shares_a_screen_and_how() {
    let mut model = Model::fixture();
    let share = crate::protocol::ShareInfo { width: 1280, height: 720, fps: 30 };
    model.apply(&Event::Sharing { user: "bob".into(), session: 2, share: Some(share) });
    let (h, _rx) = harness(model.clone(), views::channels);
    assert_eq!(h.query_all_by_label("sharing 1280×720, 30 fps").count(), 1);
    model.apply(&Event::Sharing { user: "bob".into(), session: 2, share: None });
    let (h, _rx) = harness(model, views::channels);
    assert_eq!(h.query_all_by_label("sharing 1280×720, 30 fps").count(), 0);
}

#[test]
fn channels_join_and_ask_for_a_password() {
    let mut model = Model::fixture();
    model.channels.push(empty_temporary_channel(3, "Games"));
    let (mut h, rx) = harness(model, views::channels);
    assert!(h.query_by_label("Lobby  (2)").is_some());
    assert!(h.query_by_label("Staff  (1/5)").is_some(), "user count against the limit");
    assert_eq!(h.query_all_by_label("needs a password").count(), 1, "Staff's lock");
    assert!(h.query_by_label("bob is speaking").is_some(), "the ring around bob");
    assert!(h.query_by_label("alice is speaking").is_none());
    join_from_menu(&mut h, "Games  (0)");
    assert_eq!(sent(&rx), [UiCommand::Client(Command::Join(JoinRequest::named("Games")))]);

    join_from_menu(&mut h, "Staff  (1/5)");
    assert!(sent(&rx).is_empty(), "a password comes first");
    h.state_mut().drafts.channel_password.as_mut().unwrap().1 = "pw".into();
    h.run();
    h.get_by_label("Join with password").click();
    h.run();
    let join = JoinRequest { channel: "Staff".into(), password: Some("pw".into()), invite: None };
    assert_eq!(sent(&rx), [UiCommand::Client(Command::Join(join))]);

    h.get_by_label("Invite").click();
    h.run();
    assert!(matches!(&sent(&rx)[..], [UiCommand::Client(Command::Invite { .. })]));
}

#[test]
fn a_users_menu_sets_volume_mutes_and_shows_the_safety_number() {
    let (mut h, rx) = harness(Model::fixture(), views::channels);
    h.get_by_label("bob").click_secondary();
    h.run();
    h.get_by_label("Mute for me").click();
    h.run();
    assert_eq!(sent(&rx), [UiCommand::Client(Command::LocalMute { user: "bob".into(), muted: true })]);
    assert!(h.query_by_label("muted for you").is_some(), "the badge beside bob");
    h.get_by_label("bob").click_secondary();
    h.run();
    h.get_by_label("Safety number").click();
    h.run();
    assert_eq!(sent(&rx), [UiCommand::Client(Command::Safety("bob".into()))]);
}

#[test]
fn an_admins_menus_kick_ban_move_and_close_and_nobody_elses_offer_them() {
    let (mut h, _rx) = harness(Model::fixture(), views::channels);
    h.get_by_label("bob").click_secondary();
    h.run();
    assert!(h.query_by_label("Kick").is_none(), "not an admin: no moderation");

    let mut model = Model::fixture();
    model.apply(&Event::Admin);
    model.channels.push(empty_temporary_channel(3, "Spam"));
    let (mut h, rx) = harness(model, views::channels);
    for (button, command) in [
        ("Kick", Command::Kick("bob".into())),
        ("Ban their address for an hour", Command::Ban { user: "bob".into(), minutes: 60 }),
    ] {
        h.get_by_label("bob").click_secondary();
        h.run();
        h.get_by_label(button).click();
        h.run();
        assert_eq!(sent(&rx), [UiCommand::Client(command)]);
    }
    h.get_by_label("bob").click_secondary();
    h.run();
    h.get_by_label("Move to").click();
    h.run();
    h.get_by_label("Staff").click();
    h.run();
    assert_eq!(sent(&rx), [UiCommand::Client(Command::Move { user: "bob".into(), channel: "Staff".into() })]);
    // Only temporary channels can be closed.
    h.get_by_label("Spam  (0)").click_secondary();
    h.run();
    h.get_by_label("Close channel (admin)").click();
    h.run();
    assert_eq!(sent(&rx), [UiCommand::Client(Command::Close("Spam".into()))]);
    h.get_by_label("Lobby  (2)").click_secondary();
    h.run();
    assert!(h.query_by_label("Close channel (admin)").is_none());
}

#[test]
fn a_channel_pane_left_behind_does_not_send() {
    let mut model = Model::fixture();
    model.conversations.insert(Conversation::Channel("Den".into()), Vec::new());
    model.select(Conversation::Channel("Den".into()));
    let (mut h, rx) = harness(model, views::chat);
    assert!(h.query_by_label_contains("You are not in Den").is_some());
    type_into(&mut h, "Message", "for the den");
    h.get_by_label("Send").click();
    h.run();
    assert_eq!(sent(&rx), [], "nothing goes from a channel we are not in");
}

#[test]
fn a_long_pane_lays_out_only_the_lines_in_view() {
    let mut model = Model::fixture();
    let den = Conversation::Channel("Den".into());
    for i in 0..super::model::PANE_LINES {
        model.sent(den.clone(), format!("line number {i}"), i as u64);
    }
    model.select(den);
    let (mut h, _rx) = harness(model, views::chat);
    // Stuck to the bottom: the newest is shown; the oldest is not laid out at all.
    h.run();
    let last = format!("line number {}", super::model::PANE_LINES - 1);
    assert!(h.query_by_label(&last).is_some(), "the newest line is in view");
    assert!(h.query_by_label("line number 0").is_none(), "the oldest is not laid out");
    let laid_out =
        (0..super::model::PANE_LINES).filter(|i| h.query_by_label(&format!("line number {i}")).is_some()).count();
    assert!(laid_out < 60, "{laid_out} lines laid out for a pane of 700 px");
}

#[test]
fn chat_sends_counts_characters_and_marks_encryption() {
    let (mut h, rx) = harness(Model::fixture(), views::chat);
    assert!(h.query_by_label_contains("End-to-end encrypted").is_some());
    assert!(h.query_by_label("hello everyone").is_some());
    type_into(&mut h, "Message", "hi bob");
    assert!(h.query_by_label("6/5000").is_some());
    h.get_by_label("Send").click();
    h.run();
    assert_eq!(sent(&rx), [UiCommand::Send { to: Conversation::Channel("Lobby".into()), text: "hi bob".into() }]);
    // Unread counts on other panes, and the warning for a changed identity.
    // Text that would reorder itself shows its tricks; a late message shows both times.
    h.state_mut().apply(&Event::Message {
        from: "bob".into(),
        channel: Some("Lobby".into()),
        dm: false,
        text: "pay \u{202e}01$".into(),
        time_ms: 1_700_000_000_000,
        received_ms: 1_700_000_000_000 + 3_600_000,
        verified: false,
        identity_changed: false,
    });
    h.run();
    assert!(h.query_by_label_contains("pay [U+202E]01$").is_some());
    assert!(h.query_by_label_contains("(sent ").is_some(), "the sender's claimed time beside the arrival");
    h.state_mut().apply(&Event::Message {
        from: "carol".into(),
        channel: None,
        dm: true,
        text: "psst".into(),
        time_ms: 0,
        received_ms: 0,
        verified: false,
        identity_changed: true,
    });
    h.state_mut().apply(&Event::IdentityChanged { user: "carol".into() });
    h.run();
    h.get_by_label("@ carol (1)").click();
    h.run();
    assert!(h.query_by_label_contains("carol's identity key changed").is_some());
    h.state_mut().drafts.message = "x".repeat(5001);
    h.run();
    assert!(h.query_by_label("5001/5000").is_some());
}

#[test]
fn the_voice_bar_mutes_deafens_and_changes_the_mode() {
    let (mut h, rx) = harness(Model::fixture(), views::voice_bar);
    h.get_by_label("Mute (Ctrl+M)").click();
    h.run();
    h.get_by_label("Deafen (Ctrl+D)").click();
    h.run();
    h.get_by_label("Noise suppression").click();
    h.run();
    h.get_by_label("Echo cancellation").click();
    h.run();
    let commands = sent(&rx);
    assert_eq!(commands[..2], [UiCommand::ToggleMute, UiCommand::ToggleDeafen]);
    assert!(matches!(&commands[2], UiCommand::SaveSettings(s) if !s.denoise && s.echo_cancel));
    assert!(matches!(&commands[3], UiCommand::SaveSettings(s) if !s.echo_cancel), "on by default, switched off");
}

#[test]
fn settings_change_the_theme_and_test_the_microphone() {
    let (tx, rx) = channel();
    let mut model = Model::fixture();
    model.show_settings = true;
    let mut h = Harness::builder()
        .with_context_setup(super::icons::install)
        .build_ui_state(move |ui, model: &mut Model| views::settings(ui.ctx(), model, &tx), model);
    h.run();
    h.get_by_label("Light").click();
    h.run();
    h.get_by_label("Audio setup and microphone test").click();
    h.run();
    h.get_by_label("Push-to-talk in every window (takes the key from other apps)").click();
    h.run();
    h.get_by_label("Sound for a direct message").click();
    h.run();
    let commands = sent(&rx);
    assert!(matches!(commands.last(), Some(UiCommand::SaveSettings(s)) if !s.cues.message && s.cues.joined));
    let commands = &commands[..commands.len() - 1];
    assert!(matches!(&commands[0], UiCommand::SaveSettings(s) if !s.dark));
    assert!(commands.contains(&UiCommand::AudioCheck(true)));
    assert!(matches!(commands.last(), Some(UiCommand::SaveSettings(s)) if s.global_push_to_talk));
}

#[test]
fn the_safety_number_can_be_marked_verified() {
    let mut model = Model::fixture();
    model.apply(&Event::Safety {
        user: "bob".into(),
        number: "12345".repeat(12),
        verified: false,
        identity_changed: false,
    });
    let (mut h, rx) = harness(model, views::chat);
    assert!(h.query_by_label_contains("12345 12345 12345 12345").is_some());
    h.get_by_label("Mark as verified").click();
    h.run();
    assert_eq!(sent(&rx), [UiCommand::Client(Command::Verify("bob".into()))]);
}

/// Waits (up to 20 s) until the app's model satisfies `done`, draining its updates.
fn wait_for(app: &mut super::App, what: &str, done: impl Fn(&Model) -> bool) {
    let deadline = std::time::Duration::from_secs(20);
    let start = std::time::SystemTime::now();
    loop {
        app.drain_updates();
        app.show_picture();
        if done(&app.model) {
            return;
        }
        assert!(
            start.elapsed().unwrap_or_default() < deadline,
            "waited for {what}; the model: {:#?}",
            app.model.screen
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn app_in(dir: &std::path::Path, runtime: &tokio::runtime::Runtime) -> super::App {
    let paths = super::Paths { data_dir: dir.join("data"), settings_file: dir.join("settings.toml") };
    super::App::new(egui::Context::default(), runtime.handle().clone(), paths, None)
}

/// The real client core and a relay in this process: create an identity, connect, talk
/// to a second client; then a later start unlocks the vault (and refuses a wrong password).
fn password() -> zeroize::Zeroizing<String> {
    zeroize::Zeroizing::new("correct horse battery".to_owned())
}

/// A relay in this process and two apps, alice and bob, that created their identities and
/// joined its Lobby. Returns the runtime, the folders (alice's, bob's, the relay's), the
/// invite, the relay's task and the apps.
#[allow(clippy::type_complexity, reason = "a test fixture handing back all it made")]
fn alice_and_bob_in_the_lobby()
-> (tokio::runtime::Runtime, [tempfile::TempDir; 3], String, tokio::task::JoinHandle<()>, Vec<super::App>) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let (invite, relay) = {
        let _guard = runtime.enter();
        crate::net::server::Server::host_here(0, dirs[2].path()).unwrap()
    };
    let mut apps = Vec::new();
    for (dir, name) in dirs[..2].iter().zip(["alice", "bob"]) {
        let mut app = app_in(dir.path(), &runtime);
        assert_eq!(app.model.screen, Screen::Setup);
        app.handle(UiCommand::CreateIdentity { name: name.into(), password: password() });
        wait_for(&mut app, "the vault", |m| m.screen == Screen::Connect);
        assert!(app.model.audio_check.is_some(), "first start: the audio setup opens, before any server");
        app.handle(UiCommand::AudioCheck(false));
        assert!(app.check.is_none() && app.model.audio_check.is_none());
        app.handle(UiCommand::Connect { target: invite.clone() });
        wait_for(&mut app, "joining the Lobby", |m| m.screen == Screen::Main && m.my_channel.is_some());
        apps.push(app);
    }
    (runtime, dirs, invite, relay, apps)
}

#[test]
fn unlock_connect_join_and_chat_with_a_second_client() {
    let (runtime, dirs, invite, _relay, mut apps) = alice_and_bob_in_the_lobby();
    let [alice, bob] = &mut apps[..] else { unreachable!() };
    wait_for(alice, "bob in the Lobby", |m| m.my_channel_view().is_some_and(|c| c.users.len() == 2));
    let lobby = Conversation::Channel("Lobby".into());
    alice.handle(UiCommand::Send { to: lobby.clone(), text: "hello bob".into() });
    wait_for(bob, "alice's message", |m| {
        m.conversations
            .get(&lobby)
            .is_some_and(|lines| lines.iter().any(|l| l.from == "alice" && l.text == "hello bob"))
    });
    wait_for(alice, "the delivery count", |m| m.conversations[&lobby].iter().any(|l| l.delivered == Some((1, 1))));
    alice.handle(UiCommand::Disconnect);
    drop(apps);

    // A later start: the vault is there, so it asks for the password.
    let mut again = app_in(dirs[0].path(), &runtime);
    assert_eq!((again.model.screen.clone(), again.model.settings.name.as_str()), (Screen::Unlock, "alice"));
    again.handle(UiCommand::Unlock { password: zeroize::Zeroizing::new("wrong".to_owned()) });
    wait_for(&mut again, "the refusal", |m| m.error.as_deref().is_some_and(|e| e.starts_with("Wrong password")));
    again.handle(UiCommand::Unlock { password: password() });
    wait_for(&mut again, "the vault", |m| m.screen == Screen::Connect);
    let server = invite.parse::<crate::protocol::ServerLink>().unwrap().authority();
    let kept: Vec<_> = again.model.history.conversation(&lobby.history_key(&server)).map(|m| m.text.clone()).collect();
    assert_eq!(kept, ["hello bob"], "the vault kept the conversation");
}

/// Muted means muted: the choice survives a reconnect, into the new engine and to the
/// server, so the others see it (and the new connection sends nothing).
#[test]
fn mute_holds_across_a_reconnect() {
    let (_runtime, _dirs, invite, _relay, mut apps) = alice_and_bob_in_the_lobby();
    let [alice, bob] = &mut apps[..] else { unreachable!() };
    alice.handle(UiCommand::ToggleMute);
    wait_for(bob, "alice muted", |m| m.muted_users.contains("alice"));
    // The line drops; the app connects again (as its reconnect timer would).
    alice.handle(UiCommand::Disconnect);
    wait_for(bob, "alice gone", |m| !m.muted_users.contains("alice"));
    wait_for(alice, "the old connection's end", |m| m.me.is_none());
    alice.handle(UiCommand::Connect { target: invite.clone() });
    wait_for(alice, "back in the Lobby", |m| m.screen == Screen::Main && m.my_channel.is_some());
    assert!(alice.model.muted, "the voice bar still says muted");
    wait_for(bob, "alice muted again", |m| m.muted_users.contains("alice"));
}

#[test]
fn connection_health_shows_the_latest_figures() {
    let mut model = Model::fixture();
    for second in 0..5 {
        model.apply(&Event::Health {
            rtt_ms: 10.0 + second as f32,
            loss_percent: 0.5,
            jitter_ms: 3.25,
            kbps_up: 50.0,
            kbps_down: 100.0,
        });
    }
    let (h, _rx) = harness(model, |ui, model, _| views::health(ui, model));
    assert!(h.query_by_label("ping 14 ms").is_some());
    assert!(h.query_by_label("loss 0.5 %").is_some());
    assert!(h.query_by_label("jitter 3.2 ms").is_some());
    assert!(h.query_by_label("150 kbit/s").is_some());
}

#[test]
fn the_voice_bar_opens_the_share_dialog_and_stops_a_share() {
    let (mut h, rx) = harness(Model::fixture(), views::voice_bar);
    h.get_by_label_contains("Share screen").click();
    h.run();
    assert_eq!(sent(&rx), [UiCommand::OpenShareDialog]);
    h.state_mut().apply(&Event::ShareStarted { encoder: "libx265".into(), width: 1280, height: 720, fps: 30 });
    h.state_mut().apply(&Event::Viewers { count: 2 });
    h.run();
    assert!(h.query_by_label("Sharing 1280×720 at 30 fps, 2 watching").is_some());
    h.get_by_label("Stop sharing").click();
    h.run();
    assert_eq!(sent(&rx), [UiCommand::Client(Command::Share(None))]);
    // The stop we asked for is no error; a failure is shown.
    h.state_mut().apply(&Event::ShareStopped { reason: crate::session::SHARE_STOPPED_BY_USER.into() });
    assert_eq!((h.state().my_share.clone(), h.state().error.clone()), (None, None));
    h.state_mut().apply(&Event::ShareStarted { encoder: "libx265".into(), width: 1280, height: 720, fps: 30 });
    h.state_mut().apply(&Event::ShareStopped { reason: "cannot reach the X display".into() });
    assert!(h.state().error.as_deref().is_some_and(|e| e.contains("X display")));
}

#[test]
fn the_share_dialog_sends_the_source_size_and_rate_picked() {
    let mut model = Model::fixture();
    model.drafts.share = Some(ShareDraft::new(vec!["HDMI-1".into(), "window:Editor".into()]));
    let (mut h, rx) = harness(model, views::window);
    assert!(h.query_by_label("Share your screen").is_some());
    h.get_by_label("what to share").click();
    h.run();
    h.get_by_label("Window: Editor").click();
    h.run();
    h.get_by_label("1080p").click();
    h.run();
    h.get_by_label("Share desktop audio (what other applications play; never your call)").click();
    h.run();
    h.get_by_label("Share").click();
    h.run();
    let request =
        ShareRequest { source: Some("window:Editor".into()), resolution: Resolution::P1080, fps: 30, audio: true };
    assert_eq!(sent(&rx), [UiCommand::Client(Command::Share(Some(request)))]);
    assert!(h.state().drafts.share.is_none(), "the dialog closed");
}

/// Bob shares: "Watch" beside him watches; watching carol first lets her go.
#[test]
fn watch_on_a_sharer_and_one_share_at_a_time() {
    let mut model = Model::fixture();
    let carol = model.channels[1].users.pop().unwrap();
    model.channels[0].users.push(carol);
    for (user, session) in [("bob", 2), ("carol", 3)] {
        let share = Some(ShareInfo { width: 1280, height: 720, fps: 30 });
        model.apply(&Event::Sharing { user: user.into(), session, share });
    }
    model.apply(&Event::Watching { user: "carol".into(), session: 3, watching: true });
    let (mut h, rx) = harness(model, views::channels);
    assert_eq!(h.query_all_by_label("sharing 1280×720, 30 fps").count(), 2);
    h.get_by_label("Watch").click();
    h.run();
    assert_eq!(
        sent(&rx),
        [
            UiCommand::Client(Command::Watch { user: "carol".into(), watch: false }),
            UiCommand::Client(Command::Watch { user: "bob".into(), watch: true })
        ]
    );
    h.get_by_label("Stop watching").click();
    h.run();
    assert_eq!(sent(&rx), [UiCommand::Client(Command::Watch { user: "carol".into(), watch: false })]);
}

/// The share watched shows in the channel view with its figures, pops out into a window
/// of its own and comes back.
#[test]
fn the_viewer_shows_the_picture_and_its_figures_and_pops_out() {
    let mut model = Model::fixture();
    let share = Some(ShareInfo { width: 1280, height: 720, fps: 30 });
    model.apply(&Event::Sharing { user: "bob".into(), session: 2, share });
    model.apply(&Event::Watching { user: "bob".into(), session: 2, watching: true });
    model.apply(&Event::WatchStats { user: "bob".into(), session: 2, fps: 29, kbps: 1850, loss_percent: 0.25 });
    let (mut h, rx) = harness(model, views::window);
    assert!(h.query_by_label("Waiting for a picture...").is_some());
    let image = egui::ColorImage::new([64, 36], vec![egui::Color32::from_rgb(200, 40, 40); 64 * 36]);
    let texture = h.ctx.load_texture("screen", image, egui::TextureOptions::LINEAR);
    h.state_mut().watching.as_mut().unwrap().picture = Some((texture.id(), [64, 36]));
    h.run();
    assert!(h.query_by_label("Waiting for a picture...").is_none());
    assert!(h.query_by_label("bob's screen").is_some());
    assert!(h.query_by_label("1280×720, 29 fps, 1850 kbit/s, 0.2 % lost").is_some());
    h.get_by_label("Pop out").click();
    h.run();
    assert!(h.state().watching.as_ref().unwrap().popped_out);
    // Without a second native window here, egui draws the pop-out inside this one.
    h.get_by_label("Back to the channel").click();
    h.run();
    assert!(!h.state().watching.as_ref().unwrap().popped_out);
    // One beside bob in the channel list, one over the picture: either stops.
    h.get_all_by_label("Stop watching").next().unwrap().click();
    h.run();
    assert_eq!(sent(&rx), [UiCommand::Client(Command::Watch { user: "bob".into(), watch: false })]);
    h.state_mut().apply(&Event::Watching { user: "bob".into(), session: 2, watching: false });
    assert!(h.state().watching.is_none());
}

/// Through the real client core and a relay in this process: alice's app shares (a
/// Y4M file stands in for her screen), bob's watches and gets her pictures on a texture,
/// with the figures of each second.
#[test]
fn one_app_shares_and_the_other_watches_the_pictures() {
    let (_runtime, dirs, _invite, _relay, mut apps) = alice_and_bob_in_the_lobby();
    let [alice, bob] = &mut apps[..] else { unreachable!() };
    let clip = dirs[0].path().join("screen.y4m");
    let (w, h) = (320u32, 180u32);
    let mut writer = crate::video::y4m::Y4mWriter::new(std::fs::File::create(&clip).unwrap(), w, h, 5).unwrap();
    for i in 0..5u8 {
        let mut data = vec![128u8; crate::video::y4m::YuvFrame::len_for(w, h)];
        data[..(w * h) as usize].iter_mut().enumerate().for_each(|(p, y)| *y = (p as u32 % w) as u8 / 2 + i * 10);
        writer.write(&crate::video::y4m::YuvFrame { width: w, height: h, data }).unwrap();
    }
    drop(writer);
    let request = ShareRequest {
        source: Some(clip.to_str().unwrap().into()),
        resolution: Resolution::P480,
        fps: 5,
        audio: false,
    };
    alice.handle(UiCommand::Client(Command::Share(Some(request))));
    wait_for(bob, "alice sharing", |m| m.sharing.contains_key("alice"));
    bob.handle(UiCommand::Client(Command::Watch { user: "alice".into(), watch: true }));
    wait_for(alice, "a viewer", |m| m.my_share.as_ref().is_some_and(|s| s.viewers == 1));
    wait_for(bob, "a picture", |m| m.watching.as_ref().is_some_and(|w| w.picture.is_some()));
    let texture = bob.texture.as_ref().unwrap();
    assert_eq!(texture.size(), [w as usize, h as usize]);
    wait_for(bob, "the figures", |m| m.watching.as_ref().is_some_and(|w| w.stats.is_some_and(|s| s.fps > 0)));
    alice.handle(UiCommand::Client(Command::Share(None)));
    wait_for(bob, "the share's end", |m| m.watching.is_none() && !m.sharing.contains_key("alice"));
    wait_for(alice, "her share stopped", |m| m.my_share.is_none());
    // (The machine may have no sound card: that error is the voice engine's.)
    assert!(!alice.model.error.as_deref().is_some_and(|e| e.contains("share")), "{:?}", alice.model.error);
    // A share does not follow its sharer into another channel.
    let request = ShareRequest {
        source: Some(clip.to_str().unwrap().into()),
        resolution: Resolution::P480,
        fps: 5,
        audio: false,
    };
    alice.handle(UiCommand::Client(Command::Share(Some(request))));
    wait_for(alice, "sharing again", |m| m.my_share.is_some());
    let create =
        Command::Create { name: "Elsewhere".into(), description: String::new(), password: None, user_limit: 0 };
    alice.handle(UiCommand::Client(create));
    wait_for(alice, "the share ended with the channel", |m| {
        m.my_share.is_none() && m.error.as_deref().is_some_and(|e| e.contains("you left the channel"))
    });
    wait_for(bob, "alice no longer sharing", |m| !m.sharing.contains_key("alice"));
}

#[test]
fn the_audio_setup_records_and_takes_the_threshold_the_voice_suggests() {
    let mut model = Model::fixture();
    model.audio_check = Some(super::model::AudioCheck {
        level: Some(-30.0),
        talking: true,
        suggested: Some(Some(-45.0)),
        ..super::model::AudioCheck::default()
    });
    let (mut h, rx) = harness(model, |ui, model, tx| views::audio_setup(ui.ctx(), model, tx));
    assert!(h.query_by_label_contains("On the air").is_some());
    assert!(h.query_by_label_contains("suggests a threshold of -45 dBFS").is_some());
    h.get_by_label_contains("and play back").click();
    h.run();
    h.get_by_label("Use it").click();
    h.run();
    h.get_by_label("Done").click();
    h.run();
    let commands = sent(&rx);
    assert_eq!(commands[0], UiCommand::RecordCheck);
    assert!(matches!(&commands[1], UiCommand::SaveSettings(s) if s.vad_threshold == -45.0), "{commands:?}");
    assert_eq!(commands[2], UiCommand::AudioCheck(false));
    // While it records, no second recording; a background too loud is said plainly.
    let mut model = Model::fixture();
    model.audio_check = Some(super::model::AudioCheck {
        phase: crate::audio::check::Phase::Recording,
        suggested: Some(None),
        ..super::model::AudioCheck::default()
    });
    let (h, _rx) = harness(model, |ui, model, tx| views::audio_setup(ui.ctx(), model, tx));
    assert!(h.query_by_label_contains("and play back").is_none());
    assert!(h.query_by_label_contains("did not stand out from the background").is_some());
}
