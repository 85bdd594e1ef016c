//! Relay scenarios on a virtual clock.
#![allow(clippy::disallowed_methods, reason = "the virtual clock starts at an arbitrary real instant")]

use super::route::MediaPaths;
use super::*;
use crate::config::ChannelConfig;
use crate::protocol::{MediaHeader, ScreenReport, StreamType};

const LOCAL: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

/// A relay plus the messages each connection has received, with the shell's password
/// work done inline.
struct Sim {
    relay: Relay,
    now: Instant,
    next_conn: u64,
    inbox: HashMap<ConnId, Vec<ServerMsg>>,
    closed: HashMap<ConnId, ErrorCode>,
    sessions: HashMap<ConnId, SessionId>,
    /// When set, password work waits here instead of being answered at once.
    held: Option<Vec<Output>>,
    /// Each connection's datagram path, as the shell keeps them.
    paths: MediaPaths,
}

fn config(channels: Vec<ChannelConfig>, limits: Limits) -> RelayConfig {
    let mut server = ServerConfig { channels, limits, max_users: 4, ..ServerConfig::default() };
    RelayConfig::from_server_config(&mut server)
}

fn channel(name: &str, password: Option<&str>, user_limit: u32) -> ChannelConfig {
    let password = password.map(|p| Zeroizing::new(p.to_owned()));
    ChannelConfig { name: name.into(), description: String::new(), password, user_limit }
}

impl Sim {
    fn new() -> Self {
        Self::with(config(
            vec![channel("Lobby", None, 0), channel("Staff", Some("s3cret"), 0), channel("Duo", None, 2)],
            Limits::default(),
        ))
    }

    fn with(config: RelayConfig) -> Self {
        Sim {
            relay: Relay::new(config, [7; 32]),
            now: Instant::now(),
            next_conn: 1,
            inbox: HashMap::new(),
            closed: HashMap::new(),
            sessions: HashMap::new(),
            held: None,
            paths: MediaPaths::default(),
        }
    }

    fn pump(&mut self) {
        while let Some(out) = self.relay.poll_output() {
            match out {
                Output::Send { to, msg } => {
                    if let ServerMsg::Welcome { session, .. } = &msg {
                        self.sessions.insert(to, *session);
                    }
                    self.inbox.entry(to).or_default().push(msg);
                }
                Output::Broadcast { to, msg } => {
                    for conn in to {
                        self.inbox.entry(conn).or_default().push(msg.clone());
                    }
                }
                Output::Close { conn, code } => {
                    self.closed.insert(conn, code);
                }
                out if self.held.is_some() => self.held.as_mut().expect("checked").push(out),
                Output::VerifyPassword { conn, password, hash } => {
                    let matched = password::verify(&password, &hash);
                    self.relay.handle_input(self.now, conn, Input::PasswordChecked { matched }).unwrap();
                }
                Output::HashPassword { conn, password } => {
                    let hash = password::hash(&password, &[1; password::SALT_LEN]);
                    self.relay.handle_input(self.now, conn, Input::PasswordHashed { hash }).unwrap();
                }
            }
        }
    }

    fn input(&mut self, conn: ConnId, input: Input) {
        if matches!(input, Input::Connected { .. }) {
            self.paths.connected(&self.relay, self.now, conn);
        }
        self.relay.handle_input(self.now, conn, input).unwrap();
        self.pump();
    }

    fn open(&mut self) -> ConnId {
        self.open_from(LOCAL)
    }

    fn open_from(&mut self, source: std::net::IpAddr) -> ConnId {
        let conn = ConnId(self.next_conn);
        self.next_conn += 1;
        self.input(conn, Input::Connected { source: Source::of(source), started_lately: 1 });
        conn
    }

    fn hello_from(&mut self, name: &str, source: std::net::IpAddr) -> ConnId {
        let conn = self.open_from(source);
        let hello = ClientMsg::Hello { version: PROTOCOL_VERSION, name: name.into(), join: None, bundle: None };
        self.input(conn, Input::Control(hello));
        conn
    }

    fn hello(&mut self, name: &str, join: Option<JoinRequest>) -> ConnId {
        let conn = self.open();
        self.input(
            conn,
            Input::Control(ClientMsg::Hello { version: PROTOCOL_VERSION, name: name.into(), join, bundle: None }),
        );
        conn
    }

    fn send(&mut self, conn: ConnId, msg: ClientMsg) {
        self.input(conn, Input::Control(msg));
    }

    fn advance(&mut self, by: Duration) {
        self.now += by;
        self.relay.handle_timeout(self.now);
        self.pump();
    }

    fn take(&mut self, conn: ConnId) -> Vec<ServerMsg> {
        self.inbox.remove(&conn).unwrap_or_default()
    }

    /// The refusals `conn` got: errors, and messages not delivered.
    fn errors(&mut self, conn: ConnId) -> Vec<ErrorCode> {
        self.take(conn)
            .into_iter()
            .filter_map(|m| match m {
                ServerMsg::Error { code, .. } | ServerMsg::NotDelivered { code, .. } => Some(code),
                _ => None,
            })
            .collect()
    }

    fn channel_id(&self, name: &str) -> ChannelId {
        self.relay.find_channel(name).unwrap_or_else(|| panic!("no channel {name}"))
    }

    fn channel_of(&self, conn: ConnId) -> Option<ChannelId> {
        self.relay.conns[&conn].user.as_ref().unwrap().channel
    }

    fn datagram(&self, conn: ConnId, channel: ChannelId) -> Vec<u8> {
        MediaHeader {
            stream: StreamType::Voice,
            flags: 0,
            channel,
            sender: self.sessions[&conn],
            sequence: 1,
            timestamp: 0,
        }
        .to_datagram(&[0xab; 140])
    }

    fn route(&mut self, conn: ConnId, datagram: &[u8]) -> Result<Vec<ConnId>, DropReason> {
        self.paths.route(&self.relay, self.now, conn, datagram).map(|mut to| {
            to.sort();
            to
        })
    }
}

fn join(name: &str) -> ClientMsg {
    ClientMsg::Join(JoinRequest::named(name))
}

fn join_with(name: &str, password: Option<&str>, invite: Option<&str>) -> ClientMsg {
    ClientMsg::Join(JoinRequest {
        channel: name.into(),
        password: password.map(Into::into),
        invite: invite.map(Into::into),
    })
}

#[test]
fn hello_gets_welcome_channels_and_a_first_page_then_others_hear_in_a_batch() {
    let mut sim = Sim::new();
    let alice = sim.hello("alice", None);
    let msgs = sim.take(alice);
    assert!(matches!(&msgs[0], ServerMsg::Welcome { name, server_version: PROTOCOL_VERSION, .. } if name == "alice"));
    let channels: Vec<_> = msgs
        .iter()
        .filter_map(|m| if let ServerMsg::ChannelAdded(c) = m { Some(c.name.as_str()) } else { None })
        .collect();
    assert_eq!(channels, ["Lobby", "Staff", "Duo"]);
    let lobby = sim.channel_id("Lobby");
    let alice_info = UserInfo {
        session: sim.sessions[&alice],
        name: "alice".into(),
        channel: Some(lobby),
        voice: Default::default(),
        share: None,
    };
    // The first page already shows where she landed.
    assert_eq!(msgs.last(), Some(&ServerMsg::Users { users: vec![alice_info.clone()], more: false }));
    sim.advance(PRESENCE_DELAY);
    sim.take(alice);

    let bob = sim.hello("bob", None);
    let bob_info = UserInfo {
        session: sim.sessions[&bob],
        name: "bob".into(),
        channel: Some(lobby),
        voice: Default::default(),
        share: None,
    };
    let bobs = sim.take(bob);
    assert_eq!(bobs.last(), Some(&ServerMsg::Users { users: vec![bob_info.clone(), alice_info], more: false }));
    // Alice hears of bob (arrived and placed: one entry) when the batch is due.
    sim.advance(PRESENCE_DELAY - Duration::from_millis(1));
    assert_eq!(sim.take(alice), []);
    sim.advance(Duration::from_millis(1));
    assert_eq!(sim.take(alice), [ServerMsg::Presence { users: vec![bob_info.clone()], gone: vec![] }]);
    assert_eq!(sim.relay.user_count(), 2);

    sim.send(bob, ClientMsg::SetVoiceState(VoiceState { muted: true, deafened: false }));
    sim.send(bob, ClientMsg::Leave);
    sim.advance(PRESENCE_DELAY);
    let bob_now = UserInfo { channel: None, voice: VoiceState { muted: true, deafened: false }, ..bob_info };
    assert_eq!(sim.take(alice), [ServerMsg::Presence { users: vec![bob_now], gone: vec![] }]);
    assert_eq!(sim.relay.poll_timeout(), None, "nothing left to tell");
}

#[test]
fn a_message_never_overtakes_the_news_of_who_sent_it() {
    let mut sim = Sim::new();
    let alice = sim.hello("alice", None);
    sim.advance(PRESENCE_DELAY);
    sim.take(alice);
    let bob = sim.hello("bob", None);
    let bob_session = sim.sessions[&bob];
    sim.send(bob, ClientMsg::Direct { to: sim.sessions[&alice], ciphertext: vec![1] });
    sim.send(bob, ClientMsg::Channel { channel: sim.channel_id("Lobby"), ciphertext: vec![2] });
    let bob_info = UserInfo {
        session: bob_session,
        name: "bob".into(),
        channel: Some(sim.channel_id("Lobby")),
        voice: Default::default(),
        share: None,
    };
    let introduced = ServerMsg::Presence { users: vec![bob_info], gone: vec![] };
    let direct = ServerMsg::Direct { from: bob_session, ciphertext: vec![1] };
    let channel = ServerMsg::Channel { from: bob_session, channel: sim.channel_id("Lobby"), ciphertext: vec![2] };
    assert_eq!(sim.take(alice), [introduced.clone(), direct, introduced.clone(), channel]);
    sim.advance(PRESENCE_DELAY);
    assert_eq!(sim.take(alice), [introduced], "the batch says it again");
}

/// Many users on distinct addresses, in the one channel of a large server.
fn crowd(count: u32) -> (Sim, Vec<ConnId>) {
    let mut server =
        ServerConfig { channels: vec![channel("Lobby", None, 0)], max_users: 10_000, ..ServerConfig::default() };
    let mut sim = Sim::with(RelayConfig::from_server_config(&mut server));
    let conns = (0..count).map(|i| sim.hello_from(&format!("user-{i:05}"), ip(i))).collect();
    (sim, conns)
}

fn ip(i: u32) -> std::net::IpAddr {
    std::net::IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i))
}

#[test]
fn a_newcomer_pages_through_a_large_listing_in_bounded_pieces() {
    let (mut sim, _) = crowd(3_000);
    sim.advance(PRESENCE_DELAY);
    let newcomer = sim.hello_from("newcomer", ip(5_000));
    let me = sim.sessions[&newcomer];
    let mut pages = vec![sim.take(newcomer).pop().unwrap()];
    loop {
        let ServerMsg::Users { users, more } = pages.last().unwrap() else { panic!("not a page: {pages:?}") };
        if !more {
            break;
        }
        let after = users.last().unwrap().session;
        sim.send(newcomer, ClientMsg::ListUsers { after });
        pages.extend(sim.take(newcomer));
    }
    let mut listed = Vec::new();
    for page in &pages {
        let frame = crate::protocol::encode_frame(page).unwrap();
        assert!(frame.len() <= presence::PAGE_BYTES + 16, "a page of {} bytes", frame.len());
        let ServerMsg::Users { users, .. } = page else { unreachable!() };
        listed.extend(users.iter().map(|u| u.session));
    }
    assert!(pages.len() >= 4, "{} pages", pages.len());
    assert_eq!(listed[0], me, "the first page starts with the newcomer");
    let mut sorted = listed.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), 3_001, "everyone once");
    assert_eq!(listed.len(), 3_001);
}

#[test]
fn when_thousands_leave_at_once_every_batch_still_fits_a_frame() {
    let (mut sim, conns) = crowd(4_000);
    sim.advance(PRESENCE_DELAY);
    let watcher = conns[0];
    sim.take(watcher);
    // Half change channel, everyone else but the watcher drops (a network outage).
    for (i, conn) in conns.iter().enumerate().skip(1) {
        if i % 2 == 0 {
            sim.send(*conn, ClientMsg::Leave);
        } else {
            sim.input(*conn, Input::Disconnected);
        }
    }
    sim.advance(PRESENCE_DELAY);
    let (mut changed, mut gone) = (0, 0);
    for batch in sim.take(watcher) {
        let frame = crate::protocol::encode_frame(&batch).expect("fits a frame");
        assert!(frame.len() <= 2 * presence::PAGE_BYTES + 16, "{} bytes", frame.len());
        let ServerMsg::Presence { users, gone: left } = batch else { panic!("not a batch") };
        changed += users.len();
        gone += left.len();
    }
    assert_eq!((changed, gone), (1_999, 2_000));
}

#[test]
fn a_join_storm_reaches_each_user_as_a_few_batches_and_a_visit_inside_one_costs_an_id() {
    let (mut sim, conns) = crowd(200);
    sim.advance(PRESENCE_DELAY);
    let watcher = conns[0];
    sim.take(watcher);
    // 300 arrive within one interval; one of them leaves again inside it.
    let storm: Vec<ConnId> = (0..300).map(|i| sim.hello_from(&format!("storm-{i}"), ip(1_000 + i))).collect();
    let visitor = sim.sessions[&storm[7]];
    sim.input(storm[7], Input::Disconnected);
    sim.advance(PRESENCE_DELAY);
    let batches = sim.take(watcher);
    assert!(batches.len() <= 2, "{} messages for 300 arrivals", batches.len());
    let mut arrived = 0;
    for batch in &batches {
        let ServerMsg::Presence { users, gone } = batch else { panic!("not a batch: {batch:?}") };
        assert!(users.iter().all(|u| u.session != visitor));
        assert!(gone.iter().all(|g| *g == visitor));
        arrived += users.len();
    }
    assert_eq!(arrived, 299);
    assert!(batches.iter().any(|b| matches!(b, ServerMsg::Presence { gone, .. } if gone == &[visitor])));
}

#[test]
fn hello_can_ask_for_a_first_channel_and_falls_back_to_the_default() {
    let mut sim = Sim::new();
    let alice = sim.hello("alice", Some(JoinRequest::named("duo")));
    assert_eq!(sim.channel_of(alice), Some(sim.channel_id("Duo")));
    let bob = sim.hello("bob", Some(JoinRequest::named("Nowhere")));
    assert_eq!(sim.errors(bob), [ErrorCode::NoSuchChannel]);
    assert_eq!(sim.channel_of(bob), Some(sim.channel_id("Lobby")));
    let carol = sim.hello("carol", Some(JoinRequest { password: Some("bad".into()), ..JoinRequest::named("Staff") }));
    assert_eq!(sim.errors(carol), [ErrorCode::WrongPassword]);
    assert_eq!(sim.channel_of(carol), Some(sim.channel_id("Lobby")));
}

#[test]
fn bad_hellos_are_refused_and_closed() {
    let mut sim = Sim::new();
    let conn = sim.open();
    sim.send(conn, ClientMsg::Hello { version: 99, name: "x".into(), join: None, bundle: None });
    let msgs = sim.take(conn);
    assert!(matches!(&msgs[0], ServerMsg::Error { code: ErrorCode::VersionMismatch, message }
        if message.contains(&format!("version {PROTOCOL_VERSION}")) && message.contains("version 99")));
    assert_eq!(sim.closed[&conn], ErrorCode::VersionMismatch);

    let conn = sim.open();
    sim.send(conn, join("Lobby"));
    assert_eq!(sim.closed[&conn], ErrorCode::HelloRequired);

    let _alice = sim.hello("Alice", None);
    let again = sim.hello("alice", None);
    assert_eq!(sim.errors(again), [ErrorCode::NameTaken]);
    assert_eq!(sim.closed[&again], ErrorCode::NameTaken);
    let blank = sim.hello("   ", None);
    assert_eq!(sim.closed[&blank], ErrorCode::NameInvalid);
    let long = sim.hello(&"n".repeat(33), None);
    assert_eq!(sim.closed[&long], ErrorCode::NameTooLong);
    assert_eq!(sim.relay.user_count(), 1);
}

#[test]
fn a_freed_name_can_be_taken_again() {
    let mut sim = Sim::new();
    let alice = sim.hello("alice", None);
    sim.input(alice, Input::Disconnected);
    let again = sim.hello("alice", None);
    assert!(sim.errors(again).is_empty());
    assert_eq!(sim.relay.user_count(), 1);
}

#[test]
fn max_users_is_enforced() {
    let mut sim = Sim::new(); // max_users = 4
    for i in 0..4 {
        sim.hello(&format!("u{i}"), None);
    }
    let late = sim.hello("late", None);
    assert_eq!(sim.errors(late), [ErrorCode::ServerFull]);
    assert_eq!(sim.closed[&late], ErrorCode::ServerFull);
}

#[test]
fn a_churning_flood_of_silent_connections_makes_room_among_its_own() {
    let limits = Limits { max_pending_connections: 3, ..Limits::default() };
    let mut sim = Sim::with(config(vec![channel("Lobby", None, 0)], limits));
    // Sources that keep starting handshakes (their connections arrive marked so).
    let flood = |sim: &mut Sim, n: u8| {
        let conn = ConnId(sim.next_conn);
        sim.next_conn += 1;
        sim.input(conn, Input::Connected { source: Source::of([10, 0, 0, n].into()), started_lately: 12 });
        conn
    };
    let early = flood(&mut sim, 1);
    sim.advance(Duration::from_secs(1));
    let newcomer = sim.open_from([192, 0, 2, 1].into());
    // Dozens more while the newcomer's hello is on its way: they push out each other.
    for n in 2..40 {
        sim.advance(Duration::from_millis(10));
        flood(&mut sim, n);
    }
    assert_eq!(sim.closed.get(&early), Some(&ErrorCode::ServerBusy), "waited longest of the flood");
    assert!(!sim.closed.contains_key(&newcomer), "the newcomer kept its place");
    sim.send(newcomer, ClientMsg::Hello { version: PROTOCOL_VERSION, name: "new".into(), join: None, bundle: None });
    assert_eq!(sim.relay.user_count(), 1);
}

#[test]
fn silent_connections_time_out_and_the_longest_waiting_makes_room() {
    let limits = Limits { max_pending_connections: 2, hello_timeout_secs: 5, ..Limits::default() };
    let mut sim = Sim::with(config(vec![channel("Lobby", None, 0)], limits));
    let a = sim.open();
    sim.advance(Duration::from_secs(1));
    let b = sim.open();
    // A third while two wait for their hello: the one waiting longest goes.
    let c = sim.open();
    assert_eq!(sim.closed.get(&a), Some(&ErrorCode::ServerBusy));
    assert!(!sim.closed.contains_key(&b) && !sim.closed.contains_key(&c));
    assert_eq!(sim.relay.pending_count(), 2);
    assert_eq!(sim.relay.poll_timeout(), Some(sim.now + Duration::from_secs(5)));
    sim.advance(Duration::from_secs(4));
    sim.send(b, ClientMsg::Hello { version: PROTOCOL_VERSION, name: "b".into(), join: None, bundle: None });
    sim.advance(Duration::from_secs(1));
    assert_eq!(sim.closed.get(&c), Some(&ErrorCode::HelloTimeout));
    assert!(!sim.closed.contains_key(&b), "b said hello in time");
    assert_eq!(sim.relay.poll_timeout(), None);
}

#[test]
fn password_channel_admits_the_right_password_only() {
    let mut sim = Sim::new();
    let alice = sim.hello("alice", None);
    sim.take(alice);
    sim.send(alice, join("Staff"));
    assert_eq!(sim.errors(alice), [ErrorCode::PasswordRequired]);
    sim.send(alice, join_with("Staff", Some("wrong"), None));
    assert_eq!(sim.errors(alice), [ErrorCode::WrongPassword]);
    assert_eq!(sim.channel_of(alice), Some(sim.channel_id("Lobby")));
    sim.send(alice, join_with("staff", Some("s3cret"), None));
    assert!(sim.errors(alice).is_empty());
    assert_eq!(sim.channel_of(alice), Some(sim.channel_id("Staff")));
}

#[test]
fn repeated_wrong_passwords_are_slowed_down() {
    let mut sim = Sim::new(); // 3 free attempts, then 1 s, 2 s, 4 s ...
    let alice = sim.hello("alice", None);
    sim.take(alice);
    for _ in 0..3 {
        sim.send(alice, join_with("Staff", Some("guess"), None));
        assert_eq!(sim.errors(alice), [ErrorCode::WrongPassword]);
    }
    // The right password is refused too while the connection waits.
    sim.send(alice, join_with("Staff", Some("s3cret"), None));
    assert_eq!(sim.errors(alice), [ErrorCode::TooManyAttempts]);
    sim.advance(Duration::from_secs(1));
    sim.send(alice, join_with("Staff", Some("guess"), None));
    assert_eq!(sim.errors(alice), [ErrorCode::WrongPassword]);
    sim.advance(Duration::from_secs(1));
    sim.send(alice, join_with("Staff", Some("guess"), None));
    assert_eq!(sim.errors(alice), [ErrorCode::TooManyAttempts], "the wait doubled to 2 s");
    sim.advance(Duration::from_secs(1));
    sim.send(alice, join_with("Staff", Some("s3cret"), None));
    assert!(sim.errors(alice).is_empty());
    assert_eq!(sim.channel_of(alice), Some(sim.channel_id("Staff")));
}

#[test]
fn reconnecting_does_not_renew_password_guesses_but_another_address_has_its_own() {
    let mut sim = Sim::new();
    for _ in 0..3 {
        let guesser = sim.hello("guesser", None);
        sim.take(guesser);
        sim.send(guesser, join_with("Staff", Some("guess"), None));
        assert_eq!(sim.errors(guesser), [ErrorCode::WrongPassword]);
        sim.input(guesser, Input::Disconnected);
    }
    let again = sim.hello("guesser", None);
    sim.take(again);
    sim.send(again, join_with("Staff", Some("s3cret"), None));
    assert_eq!(sim.errors(again), [ErrorCode::TooManyAttempts], "the wait follows the address");
    let elsewhere = sim.hello_from("honest", std::net::Ipv4Addr::new(192, 0, 2, 9).into());
    sim.take(elsewhere);
    sim.send(elsewhere, join_with("Staff", Some("s3cret"), None));
    assert!(sim.errors(elsewhere).is_empty());
    assert_eq!(sim.channel_of(elsewhere), Some(sim.channel_id("Staff")));
}

#[test]
fn one_address_gets_only_so_many_connections_and_starting_ones() {
    let limits = Limits { max_connections_per_source: 3, max_pending_per_source: 2, ..Limits::default() };
    let mut sim = Sim::with(config(vec![channel("Lobby", None, 0)], limits));
    let here: std::net::IpAddr = std::net::Ipv4Addr::new(198, 51, 100, 1).into();
    let (a, b) = (sim.open_from(here), sim.open_from(here));
    let third = sim.open_from(here);
    assert_eq!(sim.closed.get(&third), Some(&ErrorCode::TooManyFromSource), "two may be starting at once");
    for (conn, name) in [(a, "a"), (b, "b")] {
        let hello = ClientMsg::Hello { version: PROTOCOL_VERSION, name: name.into(), join: None, bundle: None };
        sim.send(conn, hello);
    }
    let c = sim.open_from(here);
    assert!(!sim.closed.contains_key(&c));
    let fourth = sim.open_from(here);
    assert_eq!(sim.closed.get(&fourth), Some(&ErrorCode::TooManyFromSource), "three in all");
    // The same /64 is one source; another address is not.
    let v6 = |last: u16| std::net::IpAddr::V6(std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 0, 0, 0, last));
    let (_, _) = (sim.open_from(v6(1)), sim.open_from(v6(2)));
    let third_v6 = sim.open_from(v6(3));
    assert_eq!(sim.closed.get(&third_v6), Some(&ErrorCode::TooManyFromSource));
    let other = sim.open_from(std::net::Ipv4Addr::new(198, 51, 100, 2).into());
    assert!(!sim.closed.contains_key(&other));
    assert_eq!(sim.relay.stats().refused_connections, 3);
}

#[test]
fn temporary_channels_are_bounded_per_user_and_by_creation_rate() {
    let mut sim = Sim::new();
    let create = |name: &str| ClientMsg::CreateChannel {
        name: name.into(),
        description: String::new(),
        password: None,
        user_limit: 0,
    };
    let alice = sim.hello("alice", None);
    sim.take(alice);
    for name in ["one", "two", "three"] {
        sim.send(alice, create(name));
        assert!(sim.errors(alice).is_empty(), "{name}");
    }
    // Left empty, her three channels still count until they are removed.
    sim.send(alice, create("four"));
    assert_eq!(sim.errors(alice), [ErrorCode::TooManyChannels]);
    // Coming back as someone new does not renew the rate: 6 a minute, 3 at once.
    sim.input(alice, Input::Disconnected);
    let again = sim.hello("alice", None);
    sim.take(again);
    sim.send(again, create("four"));
    assert_eq!(sim.errors(again), [ErrorCode::RateLimited]);
    sim.advance(Duration::from_secs(10));
    sim.send(again, create("four"));
    assert!(sim.errors(again).is_empty(), "a token came back after 10 s");
}

#[test]
fn a_password_check_the_shell_has_no_room_for_is_refused_as_busy() {
    let mut sim = Sim::new();
    sim.held = Some(Vec::new());
    let alice = sim.hello("alice", None);
    sim.take(alice);
    sim.send(alice, join_with("Staff", Some("s3cret"), None));
    assert!(matches!(sim.held.take().unwrap()[..], [Output::VerifyPassword { .. }]));
    sim.input(alice, Input::PasswordBusy);
    assert_eq!(sim.errors(alice), [ErrorCode::ServerBusy]);
    assert_eq!(sim.channel_of(alice), Some(sim.channel_id("Lobby")), "still where she was");
    // A late answer to the refused check changes nothing.
    sim.input(alice, Input::PasswordChecked { matched: true });
    assert_eq!(sim.channel_of(alice), Some(sim.channel_id("Lobby")));
}

#[test]
fn messages_are_limited_in_bytes_as_well_as_in_number() {
    let limits = Limits { chat_burst_bytes: 100_000, chat_bytes_per_sec: 10_000, ..Limits::default() };
    let mut sim = Sim::with(config(vec![channel("Lobby", None, 0)], limits));
    let alice = sim.hello("alice", None);
    let _bob = sim.hello("bob", None);
    sim.take(alice);
    let lobby = sim.channel_id("Lobby");
    let big = || ClientMsg::Channel { channel: lobby, ciphertext: vec![1; 30_000] };
    for _ in 0..3 {
        sim.send(alice, big());
        assert!(sim.errors(alice).is_empty());
    }
    sim.send(alice, big());
    assert_eq!(sim.errors(alice), [ErrorCode::RateLimited], "the fourth 30 kB in a burst of 100 kB");
    sim.advance(Duration::from_secs(3));
    sim.send(alice, big());
    assert!(sim.errors(alice).is_empty(), "30 kB back after 3 s at 10 kB/s");
}

#[test]
fn a_client_that_keeps_flooding_after_being_told_is_disconnected() {
    let mut sim = Sim::new();
    let flooder = sim.hello("flooder", None);
    let bob = sim.hello("bob", None);
    sim.take(flooder);
    sim.take(bob);
    // The rest of the burst (40, less the hello) goes through, then refusals, then the door.
    for _ in 0..39 + OVER_RATE_BURST {
        sim.send(flooder, ClientMsg::SetVoiceState(VoiceState::default()));
    }
    assert!(!sim.closed.contains_key(&flooder), "told, not yet dropped");
    assert!(sim.errors(flooder).iter().all(|c| *c == ErrorCode::RateLimited));
    sim.send(flooder, ClientMsg::SetVoiceState(VoiceState::default()));
    assert_eq!(sim.closed.get(&flooder), Some(&ErrorCode::RateLimited));
    assert!(!sim.closed.contains_key(&bob), "nobody else");
    // A client that slows down when told is never disconnected.
    let polite = sim.hello("polite", None);
    for _ in 0..200 {
        sim.send(polite, ClientMsg::SetVoiceState(VoiceState::default()));
        sim.advance(Duration::from_millis(60));
    }
    assert!(!sim.closed.contains_key(&polite));
}

#[test]
fn invites_admit_to_a_password_channel_until_used_up_or_expired() {
    let mut sim = Sim::new();
    let alice =
        sim.hello("alice", Some(JoinRequest { password: Some("s3cret".into()), ..JoinRequest::named("Staff") }));
    sim.take(alice);
    sim.send(alice, ClientMsg::CreateInvite { max_uses: 1, ttl_secs: 60 });
    let token = match sim.take(alice).pop() {
        Some(ServerMsg::InviteCreated { token, channel, expires_in_secs: 60, max_uses: 1 }) => {
            assert_eq!(channel, sim.channel_id("Staff"));
            token
        }
        other => panic!("expected an invite, got {other:?}"),
    };
    assert_eq!(token.len(), 32);

    let bob = sim.hello("bob", None);
    sim.take(bob);
    sim.send(bob, join_with("Duo", None, Some(&token)));
    assert_eq!(sim.errors(bob), [ErrorCode::InviteInvalid], "an invite is for its own channel only");
    sim.send(bob, join_with("Staff", None, Some(&token)));
    assert!(sim.errors(bob).is_empty());
    assert_eq!(sim.channel_of(bob), Some(sim.channel_id("Staff")));

    let carol = sim.hello("carol", None);
    sim.take(carol);
    sim.send(carol, join_with("Staff", None, Some(&token)));
    assert_eq!(sim.errors(carol), [ErrorCode::InviteInvalid], "single-use invite is spent");

    sim.send(alice, ClientMsg::CreateInvite { max_uses: 5, ttl_secs: 30 });
    let Some(ServerMsg::InviteCreated { token, .. }) = sim.take(alice).pop() else { panic!("no invite") };
    sim.now += Duration::from_secs(31); // expired, not yet swept
    sim.send(carol, join_with("Staff", None, Some(&token)));
    assert_eq!(sim.errors(carol), [ErrorCode::InviteExpired]);
}

#[test]
fn invite_requests_are_checked() {
    let mut sim = Sim::new();
    let alice = sim.hello("alice", None);
    sim.send(alice, ClientMsg::Leave);
    sim.take(alice);
    sim.send(alice, ClientMsg::CreateInvite { max_uses: 1, ttl_secs: 60 });
    assert_eq!(sim.errors(alice), [ErrorCode::NotInChannel]);
    sim.send(alice, join("Lobby"));
    sim.send(alice, ClientMsg::CreateInvite { max_uses: 0, ttl_secs: 60 });
    sim.send(alice, ClientMsg::CreateInvite { max_uses: 1, ttl_secs: 0 });
    assert_eq!(sim.errors(alice), [ErrorCode::InvalidRequest, ErrorCode::InvalidRequest]);
}

#[test]
fn full_channel_refuses_the_next_user() {
    let mut sim = Sim::new();
    let a = sim.hello("a", Some(JoinRequest::named("Duo")));
    let b = sim.hello("b", Some(JoinRequest::named("Duo")));
    let c = sim.hello("c", None);
    sim.take(c);
    sim.send(c, join("Duo"));
    assert_eq!(sim.errors(c), [ErrorCode::ChannelFull]);
    sim.send(b, ClientMsg::Leave);
    sim.send(c, join("Duo"));
    assert!(sim.errors(c).is_empty());
    assert_eq!(sim.channel_of(a), sim.channel_of(c));
}

#[test]
fn temporary_channels_are_created_joined_and_removed_when_empty_long_enough() {
    let mut sim = Sim::new();
    let alice = sim.hello("alice", None);
    let bob = sim.hello("bob", None);
    sim.take(alice);
    sim.take(bob);
    let create =
        ClientMsg::CreateChannel { name: "Raid".into(), description: "tonight".into(), password: None, user_limit: 0 };
    sim.send(alice, create.clone());
    let raid = sim.channel_id("Raid");
    assert!(sim.take(bob).iter().any(|m| matches!(m, ServerMsg::ChannelAdded(c) if c.id == raid && c.temporary)));
    assert_eq!(sim.channel_of(alice), Some(raid));
    sim.send(bob, create);
    assert_eq!(sim.errors(bob), [ErrorCode::ChannelExists]);

    sim.send(alice, join("Lobby"));
    sim.advance(Duration::from_secs(299));
    sim.send(bob, join("Raid"));
    sim.send(bob, ClientMsg::Leave);
    sim.advance(Duration::from_secs(299));
    assert!(sim.relay.find_channel("Raid").is_some(), "rejoining restarted the timer");
    sim.take(bob);
    sim.advance(Duration::from_secs(1));
    assert!(sim.relay.find_channel("Raid").is_none());
    assert!(sim.take(bob).contains(&ServerMsg::ChannelRemoved(raid)));
    assert!(sim.relay.find_channel("Lobby").is_some(), "permanent channels stay");
}

#[test]
fn temporary_channel_left_by_a_disconnect_is_removed_too() {
    let mut sim = Sim::new();
    let alice = sim.hello("alice", None);
    sim.send(
        alice,
        ClientMsg::CreateChannel { name: "Tmp".into(), description: String::new(), password: None, user_limit: 0 },
    );
    sim.input(alice, Input::Disconnected);
    sim.advance(PRESENCE_DELAY);
    assert_eq!(sim.relay.poll_timeout(), Some(sim.now - PRESENCE_DELAY + Duration::from_secs(300)));
    sim.advance(Duration::from_secs(300));
    assert!(sim.relay.find_channel("Tmp").is_none());
}

#[test]
fn temporary_channel_with_a_password_is_hashed_and_enforced() {
    let mut sim = Sim::new();
    let alice = sim.hello("alice", None);
    sim.send(
        alice,
        ClientMsg::CreateChannel {
            name: "Secret".into(),
            description: String::new(),
            password: Some("pw".into()),
            user_limit: 3,
        },
    );
    let id = sim.channel_id("Secret");
    assert_eq!(sim.channel_of(alice), Some(id));
    let stored = sim.relay.channels[&id].password_hash.clone().unwrap();
    assert!(stored.starts_with("$argon2id$") && password::verify("pw", &stored));
    let bob = sim.hello("bob", None);
    sim.take(bob);
    sim.send(bob, join_with("Secret", Some("nope"), None));
    sim.send(bob, join_with("Secret", Some("pw"), None));
    assert_eq!(sim.errors(bob), [ErrorCode::WrongPassword]);
    assert_eq!(sim.channel_of(bob), Some(id));
}

#[test]
fn channel_creation_limits_are_typed_errors() {
    let limits = Limits { max_channels: 2, ..Limits::default() };
    let mut sim = Sim::with(config(vec![channel("Lobby", None, 0)], limits));
    let alice = sim.hello("alice", None);
    sim.take(alice);
    let create = |name: &str| ClientMsg::CreateChannel {
        name: name.into(),
        description: String::new(),
        password: None,
        user_limit: 0,
    };
    sim.send(alice, create(&"x".repeat(33)));
    sim.send(alice, create(""));
    sim.send(alice, create("lobby"));
    sim.send(alice, create("One"));
    sim.send(alice, create("Two"));
    let errors = sim.errors(alice);
    assert_eq!(
        errors,
        [ErrorCode::NameTooLong, ErrorCode::NameInvalid, ErrorCode::ChannelExists, ErrorCode::TooManyChannels]
    );
}

#[test]
fn control_messages_are_rate_limited() {
    let limits = Limits { control_messages_per_sec: 1, control_burst: 3, ..Limits::default() };
    let mut sim = Sim::with(config(vec![channel("Lobby", None, 0)], limits));
    let alice = sim.hello("alice", None); // uses one token
    sim.take(alice);
    for _ in 0..4 {
        sim.send(alice, ClientMsg::Leave);
    }
    let errors = sim.errors(alice);
    assert_eq!(errors, [ErrorCode::NotInChannel, ErrorCode::RateLimited, ErrorCode::RateLimited]);
    sim.advance(Duration::from_secs(1));
    sim.send(alice, join("Lobby"));
    assert!(sim.errors(alice).is_empty());
}

#[test]
fn datagrams_go_to_every_other_member_of_the_channel_only() {
    let mut sim = Sim::new();
    let a = sim.hello("a", None);
    let b = sim.hello("b", None);
    let c = sim.hello("c", None);
    let d = sim.hello("d", Some(JoinRequest::named("Duo")));
    let lobby = sim.channel_id("Lobby");
    let datagram = sim.datagram(a, lobby);
    assert_eq!(sim.route(a, &datagram), Ok(vec![b, c]));
    assert_eq!(sim.route(d, &sim.datagram(d, sim.channel_id("Duo"))), Ok(vec![]));

    // Forging: another sender, a channel one is not in, garbage, a stranger.
    let forged = MediaHeader::parse(&datagram)
        .map(|(h, p)| MediaHeader { sender: sim.sessions[&b], ..h }.to_datagram(p))
        .unwrap();
    assert_eq!(sim.route(a, &forged), Err(DropReason::WrongSender));
    assert_eq!(sim.route(d, &sim.datagram(d, lobby)), Err(DropReason::NotInChannel));
    assert_eq!(sim.route(a, &datagram[..10]), Err(DropReason::Header(MediaHeaderError::TooShort(10))));
    let stranger = sim.open();
    assert_eq!(sim.route(stranger, &datagram), Err(DropReason::NotIntroduced));

    sim.send(b, ClientMsg::Leave);
    assert_eq!(sim.route(a, &datagram), Ok(vec![c]));
    sim.input(c, Input::Disconnected);
    assert_eq!(sim.route(a, &datagram), Ok(vec![]));
    let stats = sim.relay.stats();
    assert_eq!(stats.datagrams_forwarded, 3);
    assert_eq!(stats.dropped_invalid, 4);
}

#[test]
fn media_over_the_rate_cap_is_dropped_and_counted() {
    let limits = Limits { media_packets_per_sec: 100, media_bytes_per_sec: 1_000_000, ..Limits::default() };
    let mut sim = Sim::with(config(vec![channel("Lobby", None, 0)], limits));
    let a = sim.hello("a", None);
    let _b = sim.hello("b", None);
    sim.send(a, ClientMsg::SetShare(Some(SHARE)));
    let screen = |sim: &Sim| {
        let voice = sim.datagram(a, sim.channel_id("Lobby"));
        let (header, payload) = MediaHeader::parse(&voice).unwrap();
        MediaHeader { stream: StreamType::Screen, ..header }.to_datagram(payload)
    };
    let datagram = screen(&sim);
    let sent = (0..80).filter(|_| sim.route(a, &datagram).is_ok()).count();
    assert_eq!(sent, 50, "burst is half a second of the rate");
    assert_eq!(sim.relay.stats().dropped_rate_limited, 30);
    sim.now += Duration::from_millis(100);
    assert_eq!((0..80).filter(|_| sim.route(a, &datagram).is_ok()).count(), 10);
}

#[test]
fn voice_beyond_twice_a_talkers_rate_is_dropped_and_screen_share_is_not_held_to_it() {
    let mut sim = Sim::new();
    let a = sim.hello("a", None);
    let _b = sim.hello("b", None);
    let voice = sim.datagram(a, sim.channel_id("Lobby"));
    // 100 a second, a quarter of a second of that at once.
    assert_eq!((0..200).filter(|_| sim.route(a, &voice).is_ok()).count(), 25);
    sim.now += Duration::from_millis(200);
    assert_eq!((0..200).filter(|_| sim.route(a, &voice).is_ok()).count(), 20);
    let (header, payload) = MediaHeader::parse(&voice).unwrap();
    let screen = MediaHeader { stream: StreamType::Screen, ..header }.to_datagram(payload);
    sim.send(a, ClientMsg::SetShare(Some(SHARE)));
    assert_eq!((0..200).filter(|_| sim.route(a, &screen).is_ok()).count(), 200, "under the media cap");
    // A talker at 50 a second never meets the cap.
    sim.now += Duration::from_secs(1);
    let talked = (0..500).filter(|_| {
        sim.now += Duration::from_millis(20);
        sim.route(a, &voice).is_ok()
    });
    assert_eq!(talked.count(), 500);
}

#[test]
fn malformed_frames_close_only_their_connection() {
    let mut sim = Sim::new();
    let a = sim.hello("a", None);
    let b = sim.hello("b", None);
    sim.advance(PRESENCE_DELAY);
    sim.take(b);
    sim.input(a, Input::BadFrame { code: ErrorCode::FrameTooLarge, detail: "frame of 70000 bytes".into() });
    assert_eq!(sim.closed[&a], ErrorCode::FrameTooLarge);
    sim.advance(PRESENCE_DELAY);
    assert_eq!(sim.take(b), [ServerMsg::Presence { users: vec![], gone: vec![sim.sessions[&a]] }]);
    assert!(!sim.closed.contains_key(&b));
    // The shell's late report of the same end is harmless.
    sim.input(a, Input::Disconnected);
    assert_eq!(sim.relay.user_count(), 1);
}

#[test]
fn a_channel_that_vanishes_during_a_password_check_is_refused_cleanly() {
    let mut sim = Sim::new();
    let alice = sim.hello("alice", None);
    let create = ClientMsg::CreateChannel {
        name: "Tmp".into(),
        description: String::new(),
        password: Some("pw".into()),
        user_limit: 0,
    };
    sim.send(alice, create);
    sim.send(alice, join("Lobby"));
    let bob = sim.hello("bob", None);
    sim.take(bob);
    sim.held = Some(Vec::new());
    sim.send(bob, join_with("Tmp", Some("pw"), None));
    sim.advance(Duration::from_secs(300));
    assert!(sim.relay.find_channel("Tmp").is_none());
    let held = sim.held.take().unwrap();
    assert_eq!(held.len(), 1);
    let Output::VerifyPassword { password, hash, .. } = &held[0] else { panic!("{held:?}") };
    let matched = password::verify(password, hash);
    assert!(matched);
    sim.input(bob, Input::PasswordChecked { matched });
    assert_eq!(sim.errors(bob), [ErrorCode::NoSuchChannel]);
    assert_eq!(sim.channel_of(bob), Some(sim.channel_id("Lobby")));
}

/// Random traffic from many connections, answers to password work arriving late or
/// never: the relay must not panic and its books must stay consistent.
#[test]
fn random_traffic_keeps_the_relay_consistent() {
    use rand::{Rng, SeedableRng, rngs::StdRng};
    let limits = Limits { max_channels: 6, control_burst: 1000, control_messages_per_sec: 1000, ..Limits::default() };
    let mut config = config(vec![channel("Lobby", None, 0), channel("Pw", Some("pw"), 2)], limits);
    config.max_users = 8;
    let mut relay = Relay::new(config, [3; 32]);
    let mut rng = StdRng::seed_from_u64(7);
    let mut now = Instant::now();
    let names = ["a", "b", "c", "d", "Pw", "Tmp", "tmp", "x y", ""];
    // Password work the "shell" has not answered yet.
    let mut pending: Vec<(ConnId, Input)> = Vec::new();
    let mut tokens: Vec<String> = Vec::new();
    let mut paths = MediaPaths::default();
    let mut routes_checked = 0;
    for _ in 0..20_000 {
        let conn = ConnId(rng.random_range(1..=6));
        // Drawn from the seeded generator, so that a failure replays exactly.
        let name = names[rng.random_range(0..names.len())].to_owned();
        let input = match rng.random_range(0..14) {
            0 => Input::Connected { source: Source::of(LOCAL), started_lately: 1 },
            1 => Input::Disconnected,
            2 => Input::Control(ClientMsg::Hello { version: PROTOCOL_VERSION, name, join: None, bundle: None }),
            3 | 4 => {
                let invite = if rng.random_bool(0.3) { tokens.last().cloned() } else { None };
                let password = rng.random_bool(0.5).then(|| if rng.random_bool(0.5) { "pw" } else { "no" }.to_owned());
                Input::Control(ClientMsg::Join(JoinRequest { channel: name, password, invite }))
            }
            5 => Input::Control(ClientMsg::Leave),
            6 => Input::Control(ClientMsg::CreateChannel {
                name,
                description: String::new(),
                password: rng.random_bool(0.3).then(|| "pw".to_owned()),
                user_limit: rng.random_range(0..3),
            }),
            7 => Input::Control(ClientMsg::CreateInvite {
                max_uses: rng.random_range(0..3),
                ttl_secs: rng.random_range(0..30),
            }),
            8 => Input::BadFrame { code: ErrorCode::MalformedFrame, detail: String::new() },
            9 if !pending.is_empty() => {
                let (conn, input) = pending.swap_remove(rng.random_range(0..pending.len()));
                relay.handle_input(now, conn, input).unwrap();
                continue;
            }
            10 => {
                let datagram: Vec<u8> = (0..rng.random_range(0..40)).map(|_| rng.random()).collect();
                let _ = paths.route(&relay, now, conn, &datagram);
                routes_checked += check_routes(&relay, &mut paths, now);
                continue;
            }
            11 => {
                let header = MediaHeader {
                    stream: StreamType::Voice,
                    flags: 0,
                    channel: ChannelId(rng.random_range(0..8)),
                    sender: SessionId(rng.random_range(0..12)),
                    sequence: 0,
                    timestamp: 0,
                };
                let _ = paths.route(&relay, now, conn, &header.to_datagram(b"x"));
                routes_checked += check_routes(&relay, &mut paths, now);
                continue;
            }
            _ => {
                now += Duration::from_secs(rng.random_range(0..120));
                relay.handle_timeout(now);
                continue;
            }
        };
        if matches!(input, Input::Connected { .. }) && !relay.conns.contains_key(&conn) {
            paths.connected(&relay, now, conn);
        }
        match relay.handle_input(now, conn, input) {
            Ok(()) | Err(RelayError::UnknownConnection(_)) | Err(RelayError::DuplicateConnection(_)) => {}
        }
        while let Some(output) = relay.poll_output() {
            match output {
                Output::VerifyPassword { conn, password, .. } => {
                    pending.push((conn, Input::PasswordChecked { matched: password.as_str() == "pw" }));
                }
                Output::HashPassword { conn, .. } => {
                    pending.push((conn, Input::PasswordHashed { hash: "$argon2id$x".into() }))
                }
                Output::Send { msg: ServerMsg::InviteCreated { token, .. }, .. } => tokens.push(token),
                Output::Send { .. } | Output::Broadcast { .. } | Output::Close { .. } => {}
            }
        }
        check_books(&relay);
        routes_checked += check_routes(&relay, &mut paths, now);
    }
    assert!(routes_checked > 1000, "only {routes_checked} routes were checked");
}

/// Every user's datagram path routes its voice to exactly the other members of its
/// channel, as the relay's books have them now: no copy of a route outlives a change.
/// Returns how many users it checked.
fn check_routes(relay: &Relay, paths: &mut MediaPaths, now: Instant) -> usize {
    let mut checked = 0;
    for (conn, state) in &relay.conns {
        let Some(user) = &state.user else { continue };
        let mut expected: Vec<ConnId> = user
            .channel
            .map(|channel| relay.channels[&channel].members.iter().copied().filter(|m| m != conn).collect())
            .unwrap_or_default();
        expected.sort();
        let mut to = paths.listeners(relay, now, *conn).expect("an introduced user has a route");
        to.sort();
        assert_eq!(to, expected, "{conn:?} routes to its channel's other members");
        checked += 1;
    }
    checked
}

/// Every member of a channel is a user who is in that channel, and the reverse; the
/// user count matches; names are unique.
fn check_books(relay: &Relay) {
    let mut names = std::collections::HashSet::new();
    let mut users = 0;
    for (conn, state) in &relay.conns {
        let Some(user) = &state.user else { continue };
        users += 1;
        assert!(names.insert(user.name.to_lowercase()), "duplicate name {}", user.name);
        if let Some(channel) = user.channel {
            assert!(relay.channels[&channel].members.contains(conn), "{conn:?} missing from its channel");
        }
    }
    assert_eq!(users, relay.user_count());
    assert!(relay.user_count() <= relay.config.max_users);
    assert!(relay.channels.len() <= relay.config.limits.max_channels as usize);
    for (id, channel) in &relay.channels {
        for member in &channel.members {
            let user = relay.conns[member].user.as_ref().expect("members are users");
            assert_eq!(user.channel, Some(*id));
        }
        let limit = channel.info.user_limit as usize;
        assert!(limit == 0 || channel.members.len() <= limit, "{} over its limit", channel.info.name);
    }
}

fn upload(one_time: u32, kyber: u32) -> Box<crate::protocol::bundle::BundleUpload> {
    upload_for(5, one_time, kyber)
}

/// Keys of the identity `identity` (its key's bytes are all that value).
fn upload_for(identity: u8, one_time: u32, kyber: u32) -> Box<crate::protocol::bundle::BundleUpload> {
    use crate::protocol::bundle::{BundleUpload, OneTimePreKey, SignedPreKey};
    let signed = |id: u32| SignedPreKey { id, public: vec![id as u8; 33], signature: vec![7; 64] };
    Box::new(BundleUpload {
        registration_id: 42,
        identity_key: vec![identity; 33],
        signed_pre_key: signed(1),
        kyber_last_resort: signed(1000),
        kyber_one_time: (1..=kyber).map(signed).collect(),
        one_time: (1..=one_time).map(|id| OneTimePreKey { id, public: vec![id as u8; 33] }).collect(),
    })
}

impl Sim {
    fn hello_with_keys(&mut self, name: &str, one_time: u32, kyber: u32) -> ConnId {
        self.hello_as(name, 5, LOCAL, one_time, kyber)
    }

    /// `name` with the keys of `identity`, connecting from `source`.
    fn hello_as(&mut self, name: &str, identity: u8, source: std::net::IpAddr, one_time: u32, kyber: u32) -> ConnId {
        let conn = self.open_from(source);
        let hello = ClientMsg::Hello {
            version: PROTOCOL_VERSION,
            name: name.into(),
            join: None,
            bundle: Some(upload_for(identity, one_time, kyber)),
        };
        self.input(conn, Input::Control(hello));
        conn
    }

    fn fetch(&mut self, conn: ConnId, peer: ConnId) -> crate::protocol::bundle::PeerBundle {
        let peer = self.sessions[&peer];
        self.send(conn, ClientMsg::FetchBundle { peer });
        match self.take(conn).pop() {
            Some(ServerMsg::Bundle { bundle: Some(bundle), .. }) => bundle,
            other => panic!("expected a bundle, got {other:?}"),
        }
    }
}

#[test]
fn bundles_hand_out_each_one_time_key_once_and_cannot_be_drained() {
    let mut sim = Sim::new();
    let bob = sim.hello_with_keys("bob", 22, 21);
    let alice = sim.hello("alice", None);
    // Carol comes from elsewhere: one-time keys are budgeted per source address too.
    let carol = sim.open_from(std::net::Ipv4Addr::new(192, 0, 2, 7).into());
    let hello = ClientMsg::Hello { version: PROTOCOL_VERSION, name: "carol".into(), join: None, bundle: None };
    sim.send(carol, hello);
    sim.advance(PRESENCE_DELAY);
    sim.take(bob);
    sim.take(alice);
    sim.take(carol);

    let first = sim.fetch(alice, bob);
    assert_eq!((first.one_time.as_ref().map(|k| k.id), first.kyber.id), (Some(1), 1));
    assert_eq!(first.registration_id, 42);
    // Asking again at once gets no one-time keys: only the reusable ones.
    let again = sim.fetch(alice, bob);
    assert_eq!((again.one_time, again.kyber.id), (None, 1000));
    let other = sim.fetch(carol, bob);
    assert_eq!((other.one_time.map(|k| k.id), other.kyber.id), (Some(2), 2));
    // Bob is now below 20 Kyber one-time keys and is asked for more, once.
    assert_eq!(sim.take(bob), [ServerMsg::KeysLow { one_time: 20, kyber_one_time: 19 }]);
    sim.advance(Duration::from_secs(61));
    let later = sim.fetch(alice, bob);
    assert_eq!(later.one_time.map(|k| k.id), Some(3), "after a minute the requester gets fresh keys again");
    assert!(sim.take(bob).is_empty(), "KeysLow is not repeated until keys are added");

    let more =
        ClientMsg::AddOneTimeKeys { one_time: upload(5, 5).one_time, kyber_one_time: upload(5, 5).kyber_one_time };
    sim.send(bob, more);
    assert!(sim.errors(bob).is_empty());
    let carol_session = sim.sessions[&carol];
    sim.send(alice, ClientMsg::FetchBundle { peer: carol_session });
    assert_eq!(sim.take(alice), [ServerMsg::Bundle { peer: carol_session, bundle: None }]);
    // Nobody (or someone who just left): no keys, and no error for a background fetch.
    sim.send(alice, ClientMsg::FetchBundle { peer: SessionId(999) });
    assert_eq!(sim.take(alice), [ServerMsg::Bundle { peer: SessionId(999), bundle: None }]);
}

#[test]
fn reconnecting_sybils_get_one_one_time_key_per_source_and_per_identity() {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    let mut sim = Sim::new();
    let bob = sim.hello_as("bob", 1, LOCAL, 40, 40);
    sim.take(bob);
    let drain = |sim: &mut Sim, tries: u8, who: &dyn Fn(u8) -> (u8, IpAddr)| {
        let mut handed = 0;
        for i in 0..tries {
            let (identity, source) = who(i);
            let sybil = sim.hello_as(&format!("sybil{i}"), identity, source, 0, 0);
            let bundle = sim.fetch(sybil, bob);
            handed += usize::from(bundle.one_time.is_some());
            if bundle.one_time.is_none() {
                assert_eq!(bundle.kyber.id, 1000, "the Kyber last-resort key instead of a one-time one");
            }
            sim.input(sybil, Input::Disconnected);
        }
        handed
    };
    // One address, a new connection and a new identity key every time.
    assert_eq!(drain(&mut sim, 30, &|i| (100 + i, IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)))), 1);
    // One identity key, hopping addresses.
    assert_eq!(drain(&mut sim, 30, &|i| (2, IpAddr::V4(Ipv4Addr::new(10, 1, 0, i)))), 1);
    // One IPv6 /64, many addresses in it (and identities).
    let v6 = |i: u8| IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 7, 0, 0, 0, u16::from(i)));
    assert_eq!(drain(&mut sim, 30, &|i| (150 + i, v6(i))), 1);
    // A minute later each of them may take one again.
    sim.advance(REFETCH_WINDOW);
    assert_eq!(drain(&mut sim, 5, &|i| (100 + i, IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)))), 1);
    // An address and an identity per key does take them all: then the reusable keys are
    // handed out, and bob is told how few the server holds.
    assert_eq!(drain(&mut sim, 60, &|i| (200 - i, IpAddr::V4(Ipv4Addr::new(10, 2, 0, i)))), 36);
    assert!(sim.take(bob).contains(&ServerMsg::KeysLow { one_time: 19, kyber_one_time: 19 }));
}

#[test]
fn permanent_channel_passwords_leave_the_config_as_hashes() {
    let mut server = ServerConfig { channels: vec![channel("Staff", Some("s3cret"), 0)], ..ServerConfig::default() };
    let relay = RelayConfig::from_server_config(&mut server);
    assert!(server.channels[0].password.is_none(), "the text is taken out (and wiped on drop)");
    let hash = relay.channels[0].password_hash.as_deref().unwrap();
    assert!(!hash.contains("s3cret") && password::verify("s3cret", hash));
}

#[test]
fn oversized_bundles_are_refused() {
    let mut sim = Sim::new();
    let greedy = sim.hello_with_keys("greedy", keys::MAX_ONE_TIME as u32 + 1, 1);
    assert_eq!(sim.errors(greedy), [ErrorCode::InvalidRequest]);
    assert_eq!(sim.closed[&greedy], ErrorCode::InvalidRequest);
    let bob = sim.hello_with_keys("bob", 10, 10);
    sim.take(bob);
    let too_many =
        ClientMsg::AddOneTimeKeys { one_time: upload(keys::MAX_ONE_TIME as u32, 0).one_time, kyber_one_time: vec![] };
    sim.send(bob, too_many);
    assert_eq!(sim.errors(bob), [ErrorCode::InvalidRequest]);
}

#[test]
fn ciphertext_is_routed_to_its_recipients_with_delivery_counts() {
    let mut sim = Sim::new();
    let alice = sim.hello("alice", None);
    let bob = sim.hello("bob", None);
    let carol = sim.hello("carol", None);
    let dave = sim.hello("dave", Some(JoinRequest::named("Duo")));
    sim.advance(PRESENCE_DELAY);
    for conn in [alice, bob, carol, dave] {
        sim.take(conn);
    }
    let lobby = sim.channel_id("Lobby");
    let (a, b) = (sim.sessions[&alice], sim.sessions[&bob]);

    sim.send(alice, ClientMsg::Channel { channel: lobby, ciphertext: vec![1, 2, 3] });
    assert_eq!(sim.take(alice), [ServerMsg::Delivered { reached: 2, total: 2 }]);
    for member in [bob, carol] {
        assert_eq!(sim.take(member), [ServerMsg::Channel { from: a, channel: lobby, ciphertext: vec![1, 2, 3] }]);
    }
    assert!(sim.take(dave).is_empty(), "nothing reaches another channel");
    sim.send(dave, ClientMsg::Channel { channel: lobby, ciphertext: vec![9] });
    assert_eq!(sim.errors(dave), [ErrorCode::NotInChannel]);

    sim.send(bob, ClientMsg::Direct { to: a, ciphertext: vec![4, 5] });
    assert_eq!(sim.take(alice), [ServerMsg::Direct { from: b, ciphertext: vec![4, 5] }]);
    assert_eq!(sim.take(bob), [ServerMsg::Delivered { reached: 1, total: 1 }]);
    // A refused message is answered with why, and nothing else.
    sim.send(bob, ClientMsg::Direct { to: a, ciphertext: vec![0; 32 * 1024 + 1] });
    let refused = sim.take(bob);
    assert!(matches!(refused[..], [ServerMsg::NotDelivered { code: ErrorCode::MessageTooLarge, .. }]), "{refused:?}");
    sim.input(alice, Input::Disconnected);
    sim.take(bob);
    sim.send(bob, ClientMsg::Direct { to: a, ciphertext: vec![1] });
    assert_eq!(sim.errors(bob), [ErrorCode::NoSuchUser], "nothing is stored for users who are gone");
}

/// An operator's client: a real identity key, listed (or not) in the server's config.
struct Operator {
    e2ee: crate::e2ee::E2ee,
}

impl Operator {
    fn new(seed: u8) -> Operator {
        let mut rng = StdRng::from_seed([seed; 32]);
        Operator { e2ee: crate::e2ee::E2ee::generate(&mut rng, std::time::SystemTime::now()).unwrap() }
    }

    fn fingerprint(&self) -> Fingerprint {
        self.e2ee.identity_fingerprint().unwrap()
    }

    /// Says hello from `source` with this identity's bundle; returns the connection and
    /// the welcome's challenge.
    fn hello(&self, sim: &mut Sim, name: &str, source: std::net::IpAddr) -> (ConnId, [u8; 32]) {
        let conn = sim.open_from(source);
        let bundle = Some(Box::new(self.e2ee.bundle_upload().unwrap()));
        sim.send(conn, ClientMsg::Hello { version: PROTOCOL_VERSION, name: name.into(), join: None, bundle });
        let challenge = sim.take(conn).into_iter().find_map(|m| match m {
            ServerMsg::Welcome { challenge, .. } => Some(challenge),
            _ => None,
        });
        (conn, challenge.expect("welcomed"))
    }

    fn proof(&self, server: &Fingerprint, challenge: &[u8; 32], session: SessionId) -> ClientMsg {
        let message = crate::protocol::admin_proof_message(server, challenge, session);
        let signature = self.e2ee.sign_with_identity(&message, &mut StdRng::from_seed([9; 32])).unwrap();
        ClientMsg::ProveAdmin { signature }
    }
}

const SERVER_ID: Fingerprint = Fingerprint([0x5e; 32]);

/// A relay whose config lists `admins`, bound to [`SERVER_ID`].
fn sim_with_admins(admins: Vec<Fingerprint>) -> Sim {
    let mut server = ServerConfig {
        channels: vec![channel("Lobby", None, 0), channel("Staff", Some("s3cret"), 0)],
        max_users: 20,
        admins,
        ..ServerConfig::default()
    };
    let mut sim = Sim::with(RelayConfig::from_server_config(&mut server));
    sim.relay.set_server_id(SERVER_ID);
    sim
}

fn address(last: u8) -> std::net::IpAddr {
    std::net::IpAddr::V4(std::net::Ipv4Addr::new(198, 51, 100, last))
}

#[test]
fn an_admin_proves_its_key_and_kicks_bans_moves_and_closes() {
    let operator = Operator::new(1);
    let mut sim = sim_with_admins(vec![operator.fingerprint()]);
    let (admin, challenge) = operator.hello(&mut sim, "op", address(1));
    sim.send(admin, operator.proof(&SERVER_ID, &challenge, sim.sessions[&admin]));
    assert_eq!(sim.take(admin), [ServerMsg::AdminGranted]);

    // Kick: the session ends with its reason; the user may come back.
    let mallory = sim.hello_from("mallory", address(2));
    sim.send(admin, ClientMsg::Kick { session: sim.sessions[&mallory] });
    assert_eq!(sim.closed[&mallory], ErrorCode::Kicked);
    let back = sim.hello_from("mallory", address(2));
    assert!(!sim.closed.contains_key(&back));

    // Ban: everyone from that address goes, and nobody from there gets in for the time.
    let beside = sim.hello_from("eve", address(2));
    sim.send(admin, ClientMsg::Ban { session: sim.sessions[&back], minutes: 10 });
    assert_eq!(sim.closed[&back], ErrorCode::Banned);
    assert_eq!(sim.closed[&beside], ErrorCode::Banned);
    let again = sim.open_from(address(2));
    assert_eq!(sim.closed[&again], ErrorCode::Banned);
    let elsewhere = sim.hello_from("carol", address(3));
    assert!(!sim.closed.contains_key(&elsewhere));
    sim.advance(Duration::from_secs(10 * 60 + 1));
    let later = sim.hello_from("mallory", address(2));
    assert!(!sim.closed.contains_key(&later), "the ban ended");

    // Move, into a password channel too: the admin's word is the password.
    sim.send(admin, ClientMsg::MoveUser { session: sim.sessions[&elsewhere], channel: sim.channel_id("Staff") });
    assert_eq!(sim.channel_of(elsewhere), Some(sim.channel_id("Staff")));

    // Close a temporary channel: its members land in the default channel.
    sim.send(
        later,
        ClientMsg::CreateChannel { name: "Spam".into(), description: String::new(), password: None, user_limit: 0 },
    );
    let spam = sim.channel_id("Spam");
    assert_eq!(sim.channel_of(later), Some(spam));
    sim.take(later);
    sim.send(admin, ClientMsg::CloseChannel { channel: spam });
    assert_eq!(sim.channel_of(later), Some(sim.channel_id("Lobby")));
    assert!(sim.take(later).contains(&ServerMsg::ChannelRemoved(spam)));
    // Permanent channels are the config's.
    sim.take(admin);
    sim.send(admin, ClientMsg::CloseChannel { channel: sim.channel_id("Staff") });
    assert_eq!(sim.errors(admin), [ErrorCode::InvalidRequest]);
}

#[test]
fn no_moderation_without_a_proof_of_a_listed_key() {
    let operator = Operator::new(1);
    let stranger = Operator::new(2);
    let mut sim = sim_with_admins(vec![operator.fingerprint()]);
    let victim = sim.hello_from("victim", address(9));

    // A valid proof with a key nobody listed: nothing, not even an answer.
    let (nobody, challenge) = stranger.hello(&mut sim, "nobody", address(1));
    sim.send(nobody, stranger.proof(&SERVER_ID, &challenge, sim.sessions[&nobody]));
    assert!(sim.take(nobody).is_empty());
    sim.send(nobody, ClientMsg::Kick { session: sim.sessions[&victim] });
    assert_eq!(sim.errors(nobody), [ErrorCode::NotAdmin]);

    // Claiming the operator's public key (a copy of its bundle) without its private key:
    // the signature is the stranger's, so it does not verify.
    let conn = sim.open_from(address(3));
    let bundle = Some(Box::new(operator.e2ee.bundle_upload().unwrap()));
    sim.send(conn, ClientMsg::Hello { version: PROTOCOL_VERSION, name: "claimant".into(), join: None, bundle });
    let challenge = match sim.take(conn).first() {
        Some(ServerMsg::Welcome { challenge, .. }) => *challenge,
        other => panic!("{other:?}"),
    };
    sim.send(conn, stranger.proof(&SERVER_ID, &challenge, sim.sessions[&conn]));
    assert_eq!(sim.errors(conn), [ErrorCode::NotAdmin]);
    sim.send(conn, ClientMsg::Ban { session: sim.sessions[&victim], minutes: 60 });
    assert_eq!(sim.errors(conn), [ErrorCode::NotAdmin]);

    // The operator's own signature, made for another server (a hostile one passing this
    // server's challenge on): refused. So is one for another connection's challenge.
    let (op, challenge) = operator.hello(&mut sim, "op", address(4));
    sim.send(op, operator.proof(&Fingerprint([1; 32]), &challenge, sim.sessions[&op]));
    assert_eq!(sim.errors(op), [ErrorCode::NotAdmin]);
    sim.send(op, operator.proof(&SERVER_ID, &[0; 32], sim.sessions[&op]));
    assert_eq!(sim.errors(op), [ErrorCode::NotAdmin]);
    assert!(!sim.closed.contains_key(&victim));
    // The right one still works.
    sim.send(op, operator.proof(&SERVER_ID, &challenge, sim.sessions[&op]));
    assert_eq!(sim.take(op), [ServerMsg::AdminGranted]);
}

fn screen_datagram(sim: &Sim, conn: ConnId, channel: ChannelId) -> Vec<u8> {
    let mut datagram = sim.datagram(conn, channel);
    datagram[1] = 2; // StreamType::Screen
    datagram
}

fn desktop_audio_datagram(sim: &Sim, conn: ConnId, channel: ChannelId) -> Vec<u8> {
    let mut datagram = sim.datagram(conn, channel);
    datagram[1] = 4; // StreamType::ScreenAudio
    datagram
}

const SHARE: ShareInfo = ShareInfo { width: 1280, height: 720, fps: 30 };

/// Opt-in watching: screen datagrams reach those who watch, not the rest of the channel
/// nor anyone elsewhere, and a share ends (with its watches) when its sharer leaves.
#[test]
fn screen_datagrams_go_only_to_viewers() {
    let mut sim = Sim::new();
    let [alice, bob, carol, dave] = ["alice", "bob", "carol", "dave"].map(|n| sim.hello(n, None));
    sim.send(dave, join("Duo"));
    sim.advance(PRESENCE_DELAY);
    let lobby = sim.channel_id("Lobby");
    let (alice_s, bob_s) = (sim.sessions[&alice], sim.sessions[&bob]);
    assert_eq!(sim.route(alice, &screen_datagram(&sim, alice, lobby)), Err(DropReason::NotSharing));
    assert_eq!(sim.route(alice, &desktop_audio_datagram(&sim, alice, lobby)), Err(DropReason::NotSharing));
    // Watching someone who does not share, or from another channel, is refused.
    for conn in [alice, bob, carol, dave] {
        sim.take(conn);
    }
    sim.send(bob, ClientMsg::Watch { sharer: alice_s, watch: true });
    assert_eq!(sim.errors(bob), [ErrorCode::NotSharing]);
    sim.send(alice, ClientMsg::SetShare(Some(SHARE)));
    sim.advance(PRESENCE_DELAY);
    let shown = sim.take(carol).into_iter().any(|m| match m {
        ServerMsg::Presence { users, .. } => users.iter().any(|u| u.session == alice_s && u.share == Some(SHARE)),
        _ => false,
    });
    assert!(shown, "everyone sees who shares, and at what size");
    sim.take(bob);
    sim.send(dave, ClientMsg::Watch { sharer: alice_s, watch: true });
    assert_eq!(sim.errors(dave), [ErrorCode::NotInChannel]);
    sim.send(alice, ClientMsg::Watch { sharer: alice_s, watch: true });
    assert_eq!(sim.errors(alice), [ErrorCode::NotInChannel]);
    // Bob watches: alice hears of her viewer and is asked for a keyframe for him.
    sim.send(bob, ClientMsg::Watch { sharer: alice_s, watch: true });
    assert_eq!(sim.take(alice), [ServerMsg::Viewers { count: 1 }, ServerMsg::KeyframeRequested]);
    assert_eq!(sim.route(alice, &screen_datagram(&sim, alice, lobby)), Ok(vec![bob]));
    // Desktop audio goes with the screen, to its viewers only.
    assert_eq!(sim.route(alice, &desktop_audio_datagram(&sim, alice, lobby)), Ok(vec![bob]));
    // Voice still goes to the whole channel.
    assert_eq!(sim.route(alice, &sim.datagram(alice, lobby)), Ok(vec![bob, carol]));
    // Only a viewer may ask for keyframes or report; others' requests are dropped unanswered
    // (a viewer's can race with the end of the share).
    sim.advance(KEYFRAME_MERGE);
    sim.take(alice);
    sim.send(carol, ClientMsg::RequestKeyframe { sharer: alice_s });
    sim.send(carol, ClientMsg::ScreenReport { sharer: alice_s, report: ScreenReport::default() });
    assert_eq!(sim.errors(carol), []);
    assert_eq!(sim.take(alice), []);
    let report = ScreenReport { fragments_received: 10, ..ScreenReport::default() };
    sim.send(bob, ClientMsg::ScreenReport { sharer: alice_s, report });
    assert_eq!(sim.take(alice), [ServerMsg::ScreenReport { viewer: bob_s, report }]);
    // Bob moves away: his watch ends and alice hears it.
    sim.send(bob, join("Duo"));
    assert_eq!(sim.take(alice), [ServerMsg::Viewers { count: 0 }]);
    assert_eq!(sim.route(alice, &screen_datagram(&sim, alice, lobby)), Ok(vec![]));
    assert_eq!(sim.route(alice, &desktop_audio_datagram(&sim, alice, lobby)), Ok(vec![]));
    sim.send(bob, join("Lobby"));
    sim.send(bob, ClientMsg::Watch { sharer: alice_s, watch: true });
    sim.take(alice);
    // Alice leaves: her share is over, datagrams claiming it are dropped.
    sim.send(alice, join("Duo"));
    sim.advance(PRESENCE_DELAY);
    let over = sim.take(carol).into_iter().any(|m| match m {
        ServerMsg::Presence { users, .. } => users.iter().any(|u| u.session == alice_s && u.share.is_none()),
        _ => false,
    });
    assert!(over);
    let duo = sim.channel_id("Duo");
    assert_eq!(sim.route(alice, &screen_datagram(&sim, alice, duo)), Err(DropReason::NotSharing));
    assert_eq!(sim.relay.screens.watch_entries(), 0);
}

#[test]
fn keyframe_requests_from_many_viewers_reach_the_sharer_merged() {
    let mut sim = Sim::new();
    let [alice, bob, carol] = ["alice", "bob", "carol"].map(|n| sim.hello(n, None));
    let alice_s = sim.sessions[&alice];
    sim.send(alice, ClientMsg::SetShare(Some(SHARE)));
    sim.send(bob, ClientMsg::Watch { sharer: alice_s, watch: true });
    sim.send(carol, ClientMsg::Watch { sharer: alice_s, watch: true });
    sim.take(alice);
    // Carol's watch came inside the window of bob's: one request is held.
    sim.advance(KEYFRAME_MERGE);
    let asked = |msgs: Vec<ServerMsg>| msgs.iter().filter(|m| **m == ServerMsg::KeyframeRequested).count();
    assert_eq!(asked(sim.take(alice)), 1);
    for _ in 0..10 {
        sim.send(bob, ClientMsg::RequestKeyframe { sharer: alice_s });
        sim.send(carol, ClientMsg::RequestKeyframe { sharer: alice_s });
        sim.advance(KEYFRAME_MERGE / 10);
    }
    sim.advance(KEYFRAME_MERGE);
    assert_eq!(asked(sim.take(alice)), 1, "20 requests inside one window are one");
}

#[test]
fn a_viewer_flooding_reports_reaches_the_sharer_once_per_interval() {
    let mut sim = Sim::new();
    let [alice, bob, carol] = ["alice", "bob", "carol"].map(|n| sim.hello(n, None));
    let (alice_s, bob_s, carol_s) = (sim.sessions[&alice], sim.sessions[&bob], sim.sessions[&carol]);
    sim.send(alice, ClientMsg::SetShare(Some(SHARE)));
    sim.send(bob, ClientMsg::Watch { sharer: alice_s, watch: true });
    sim.send(carol, ClientMsg::Watch { sharer: alice_s, watch: true });
    sim.take(alice);
    let reports = |msgs: Vec<ServerMsg>, from: SessionId| {
        msgs.iter().filter(|m| matches!(m, ServerMsg::ScreenReport { viewer, .. } if *viewer == from)).count()
    };
    // Bob sends 10 a second for a second (within his control rate), carol her one.
    let mut to_alice = Vec::new();
    for _ in 0..10 {
        sim.send(bob, ClientMsg::ScreenReport { sharer: alice_s, report: ScreenReport::default() });
        to_alice.extend(sim.take(alice));
        sim.advance(screen::REPORT_INTERVAL / 5);
    }
    sim.send(carol, ClientMsg::ScreenReport { sharer: alice_s, report: ScreenReport::default() });
    to_alice.extend(sim.take(alice));
    assert_eq!(reports(to_alice.clone(), bob_s), 2, "one per interval: {to_alice:?}");
    assert_eq!(reports(to_alice, carol_s), 1);
    assert_eq!(sim.errors(bob), []);
}

#[test]
fn a_share_needs_a_plausible_announcement_and_a_channel() {
    let mut sim = Sim::new();
    let alice = sim.hello("alice", None);
    sim.send(alice, ClientMsg::SetShare(Some(ShareInfo { width: 0, height: 720, fps: 30 })));
    sim.send(alice, ClientMsg::SetShare(Some(ShareInfo { fps: 200, ..SHARE })));
    sim.send(alice, ClientMsg::Leave);
    sim.send(alice, ClientMsg::SetShare(Some(SHARE)));
    assert_eq!(sim.errors(alice), [ErrorCode::InvalidRequest, ErrorCode::InvalidRequest, ErrorCode::NotInChannel]);
    sim.send(alice, ClientMsg::SetShare(None));
    assert_eq!(sim.errors(alice), []);
}
