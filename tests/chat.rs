//! End-to-end encrypted chat between client sessions through the relay core, on a
//! simulated network that records every byte the relay receives and sends.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use rand::SeedableRng;
use rand::rngs::StdRng;
use voipc::config::{ChannelConfig, ServerConfig};
use voipc::e2ee::E2ee;
use voipc::protocol::{ChannelId, ClientMsg, ServerMsg, SessionId, encode_frame};
use voipc::relay::route::MediaPaths;
use voipc::relay::{ConnId, Input, Output, PRESENCE_DELAY, Relay, RelayConfig, Source};
use voipc::session::history::History;
use voipc::session::{Chat, Event, REKEY_INTERVAL, Session};

const SERVER: &str = "chat.test:9987";
/// The test server's certificate fingerprint, which names it in Signal addresses.
const SERVER_ID: &str = "5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e";

pub(crate) struct Net {
    pub(crate) relay: Relay,
    /// Each connection's datagram path, as the server keeps them.
    pub(crate) paths: MediaPaths,
    pub(crate) clients: BTreeMap<&'static str, (ConnId, Session)>,
    events: BTreeMap<&'static str, Vec<Event>>,
    /// Every frame the relay received or sent, as encoded on the wire.
    wire: Vec<Vec<u8>>,
    /// Channel ciphertext the relay sent, by recipient, for replaying elsewhere.
    channel_frames: Vec<(&'static str, ServerMsg)>,
    /// Every message a client sent, by sender, as the relay received it.
    pub(crate) sent: Vec<(&'static str, ClientMsg)>,
    /// A hostile relay's part: channel messages for this member are held here instead.
    hold_channel_for: Option<(&'static str, Vec<ServerMsg>)>,
    /// What the relay sent to connections that are not sessions (bots), by connection.
    bot_inbox: BTreeMap<ConnId, Vec<ServerMsg>>,
    /// A hostile relay's part: this bundle instead of the real one for that session.
    swap_bundle: Option<(SessionId, voipc::protocol::bundle::PeerBundle)>,
    next_conn: u64,
    pub(crate) now: Instant,
    seed: u64,
}

impl Net {
    pub(crate) fn new() -> Net {
        Net::with(ServerConfig::default())
    }

    pub(crate) fn with(mut server: ServerConfig) -> Net {
        let config = RelayConfig::from_server_config(&mut server);
        Net {
            relay: Relay::new(config, [5; 32]),
            paths: MediaPaths::default(),
            clients: BTreeMap::new(),
            events: BTreeMap::new(),
            wire: Vec::new(),
            channel_frames: Vec::new(),
            sent: Vec::new(),
            swap_bundle: None,
            bot_inbox: BTreeMap::new(),
            hold_channel_for: None,
            next_conn: 1,
            now: Instant::now(),
            seed: 100,
        }
    }

    /// `name` connects from an address of its own, as people do.
    pub(crate) fn connect(&mut self, name: &'static str) {
        let n = self.next_conn;
        self.connect_from(name, std::net::Ipv4Addr::new(10, 7, (n / 250) as u8, (n % 250) as u8).into());
    }

    pub(crate) fn connect_from(&mut self, name: &'static str, source: std::net::IpAddr) {
        self.seed += 1;
        let mut rng = StdRng::seed_from_u64(self.seed);
        let e2ee = E2ee::generate(&mut rng, SystemTime::now()).unwrap();
        let mut seed = [0; 32];
        seed[..8].copy_from_slice(&self.seed.to_le_bytes());
        let chat = Chat::new(e2ee, History::default(), seed, SERVER.into(), SERVER_ID.into());
        let session = Session::new(name, None, String::new(), chat, self.now, SystemTime::now());
        let conn = ConnId(self.next_conn);
        self.next_conn += 1;
        self.relay
            .handle_input(self.now, conn, Input::Connected { source: Source::of(source), started_lately: 1 })
            .unwrap();
        self.clients.insert(name, (conn, session));
        self.run();
        // People arrive a moment apart: the new epochs their arrival calls for start.
        self.advance(REKEY_INTERVAL);
    }

    /// A member that publishes `e2ee`'s keys and only listens: what it receives stays in
    /// [`Net::bot_inbox`].
    fn connect_bot(&mut self, name: &str, e2ee: &E2ee) -> ConnId {
        let conn = ConnId(self.next_conn);
        self.next_conn += 1;
        let source = Source::of(std::net::Ipv4Addr::new(10, 9, (conn.0 / 250) as u8, (conn.0 % 250) as u8).into());
        self.relay.handle_input(self.now, conn, Input::Connected { source, started_lately: 1 }).unwrap();
        let bundle = Some(Box::new(e2ee.bundle_upload().unwrap()));
        let hello =
            ClientMsg::Hello { version: voipc::protocol::PROTOCOL_VERSION, name: name.into(), join: None, bundle };
        self.relay.handle_input(self.now, conn, Input::Control(hello)).unwrap();
        self.run();
        // Until the relay's next presence batch, nobody knows it is there.
        self.advance(PRESENCE_DELAY);
        conn
    }

    pub(crate) fn disconnect(&mut self, name: &str) {
        let (conn, _) = self.clients.remove(name).unwrap();
        self.relay.handle_input(self.now, conn, Input::Disconnected).unwrap();
        self.run();
        self.advance(REKEY_INTERVAL);
    }

    /// Lets `by` pass on the virtual clock, running every session's and the relay's
    /// timers as they fall due.
    pub(crate) fn advance(&mut self, by: Duration) {
        let end = self.now + by;
        loop {
            let sessions = self.clients.values().filter_map(|(_, s)| s.poll_timeout());
            let next = sessions.chain(self.relay.poll_timeout()).min().filter(|t| *t <= end);
            let Some(next) = next else { break };
            self.now = self.now.max(next);
            for (_, session) in self.clients.values_mut() {
                if session.poll_timeout().is_some_and(|t| t <= self.now) {
                    session.handle_timeout(self.now);
                }
            }
            if self.relay.poll_timeout().is_some_and(|t| t <= self.now) {
                self.relay.handle_timeout(self.now);
            }
            self.run();
        }
        self.now = end;
    }

    pub(crate) fn command(&mut self, name: &str, line: &str) {
        let command = voipc::session::parse_line(line).unwrap().unwrap();
        self.clients.get_mut(name).unwrap().1.command(self.now, command);
        self.run();
    }

    /// Delivers everything in flight, in order, until the network is quiet.
    pub(crate) fn run(&mut self) {
        loop {
            let mut moved = false;
            for (name, (conn, session)) in &mut self.clients {
                while let Some(msg) = session.poll_transmit() {
                    self.wire.push(encode_frame(&msg).unwrap());
                    self.sent.push((name, msg.clone()));
                    match self.relay.handle_input(self.now, *conn, Input::Control(msg)) {
                        // The relay closed this connection a moment ago; the rest is not read.
                        Err(voipc::relay::RelayError::UnknownConnection(_)) => break,
                        result => result.unwrap(),
                    }
                    moved = true;
                }
                let events = self.events.entry(name).or_default();
                events.extend(std::iter::from_fn(|| session.poll_event()));
            }
            while let Some(output) = self.relay.poll_output() {
                moved = true;
                match output {
                    Output::Send { to, msg } => self.deliver(to, msg),
                    Output::Broadcast { to, msg } => {
                        for conn in to {
                            self.deliver(conn, msg.clone());
                        }
                    }
                    // The server let a client go (it flooded): it is gone from the network.
                    Output::Close { conn, .. } => self.clients.retain(|_, (c, _)| *c != conn),
                    _ => {}
                }
            }
            if !moved {
                return;
            }
        }
    }

    /// Sends a media datagram from `from` through the relay, as the shells would, and
    /// returns who it reached.
    pub(crate) fn datagram(&mut self, from: &str, datagram: &[u8]) -> Vec<&'static str> {
        let conn = self.clients[from].0;
        let Ok(to) = self.paths.route(&self.relay, self.now, conn, datagram) else { return Vec::new() };
        let mut reached = Vec::new();
        for (name, (c, session)) in &mut self.clients {
            if to.contains(c) {
                session.handle_datagram(self.now, datagram);
                reached.push(*name);
            }
        }
        self.run();
        reached
    }

    pub(crate) fn session(&mut self, name: &str) -> &mut Session {
        &mut self.clients.get_mut(name).unwrap().1
    }

    pub(crate) fn events_of(&self, name: &str) -> &[Event] {
        self.events.get(name).map_or(&[], Vec::as_slice)
    }

    /// Hands `msg` to the client on `to`, as the relay's shell would.
    fn deliver(&mut self, to: ConnId, mut msg: ServerMsg) {
        if let (ServerMsg::Bundle { peer, bundle }, Some((swapped, fake))) = (&mut msg, &self.swap_bundle)
            && peer == swapped
        {
            *bundle = Some(fake.clone());
        }
        self.wire.push(encode_frame(&msg).unwrap());
        let Some((name, (_, session))) = self.clients.iter_mut().find(|(_, (c, _))| *c == to) else {
            self.bot_inbox.entry(to).or_default().push(msg);
            return;
        };
        if matches!(msg, ServerMsg::Channel { .. }) {
            self.channel_frames.push((name, msg.clone()));
            if let Some((held_for, held)) = &mut self.hold_channel_for
                && held_for == name
            {
                held.push(msg);
                return;
            }
        }
        session.handle_message(self.now, msg).unwrap();
    }

    fn messages(&self, name: &str) -> Vec<(String, Option<String>, String)> {
        self.events[name]
            .iter()
            .filter_map(|e| match e {
                Event::Message { from, channel, text, .. } => Some((from.clone(), channel.clone(), text.clone())),
                _ => None,
            })
            .collect()
    }

    fn errors(&self, name: &str) -> Vec<String> {
        self.events[name]
            .iter()
            .filter_map(|e| match e {
                Event::Error { code, .. } => Some(code.clone()),
                _ => None,
            })
            .collect()
    }

    /// Feeds `name` a frame as the relay would send it: one it sent someone else, or one
    /// a hostile relay made up.
    fn replay_to(&mut self, name: &'static str, frame: ServerMsg) {
        let now = self.now;
        let session = &mut self.clients.get_mut(name).unwrap().1;
        session.handle_message(now, frame).unwrap();
        let events: Vec<Event> = std::iter::from_fn(|| session.poll_event()).collect();
        self.events.entry(name).or_default().extend(events);
    }

    fn session_of(&self, name: &str) -> SessionId {
        self.clients[name].1.me().unwrap()
    }

    /// The pairwise ciphertexts `from` sent to `to`'s session since the `since`th message.
    fn directs(&self, from: &str, to: SessionId, since: usize) -> Vec<Vec<u8>> {
        self.sent[since..]
            .iter()
            .filter_map(|(sender, msg)| match msg {
                ClientMsg::Direct { to: peer, ciphertext } if *sender == from && *peer == to => {
                    Some(ciphertext.clone())
                }
                _ => None,
            })
            .collect()
    }

    fn last_channel_frame_for(&self, name: &str) -> ServerMsg {
        self.channel_frames.iter().rev().find(|(to, _)| *to == name).unwrap().1.clone()
    }
}

fn text(from: &str, channel: Option<&str>, text: &str) -> (String, Option<String>, String) {
    (from.into(), channel.map(Into::into), text.into())
}

#[test]
fn a_newcomer_to_a_crowded_server_pages_through_everyone_and_the_crowd_hears_of_it_in_one_batch() {
    let lobby = ChannelConfig { name: "Lobby".into(), description: String::new(), password: None, user_limit: 0 };
    let crowd_room = ChannelConfig { name: "Crowd".into(), ..lobby.clone() };
    let mut net = Net::with(ServerConfig { channels: vec![lobby, crowd_room], max_users: 1_000, ..Default::default() });
    // 999 bare clients (no keys, so that alice has nobody to key in her channel).
    let crowd: Vec<ConnId> = (0..999u32)
        .map(|i| {
            let conn = ConnId(10_000 + u64::from(i));
            let source = Source::of(std::net::Ipv4Addr::from(0x0a10_0000 + i).into());
            net.relay.handle_input(net.now, conn, Input::Connected { source, started_lately: 1 }).unwrap();
            let join = Some(voipc::protocol::JoinRequest::named("Crowd"));
            let hello = ClientMsg::Hello {
                version: voipc::protocol::PROTOCOL_VERSION,
                name: format!("member-{i:03}"),
                join,
                bundle: None,
            };
            net.relay.handle_input(net.now, conn, Input::Control(hello)).unwrap();
            conn
        })
        .collect();
    net.run();
    net.advance(PRESENCE_DELAY);
    net.bot_inbox.clear();

    net.connect("alice");
    let pages = net.sent.iter().filter(|(who, m)| *who == "alice" && matches!(m, ClientMsg::ListUsers { .. })).count();
    // About 600 short names fit in a page of 16 KiB: the welcome's page and one more.
    assert_eq!(pages, 1, "alice asked for {pages} more pages");
    let channels = net.events["alice"].iter().find_map(|e| match e {
        Event::Channels { channels } => Some(channels.clone()),
        _ => None,
    });
    let channels = channels.expect("the listing ended");
    let crowd_seen = channels.iter().find(|c| c.name == "Crowd").unwrap().users.len();
    assert_eq!(crowd_seen, 999, "every member of the crowd, once");
    assert!(net.events["alice"].contains(&Event::Joined {
        channel: 1,
        name: "Lobby".into(),
        users: vec!["alice".into()]
    }));
    // Each of the crowd heard of alice in one message.
    for conn in &crowd {
        let heard = &net.bot_inbox[conn];
        assert!(
            matches!(&heard[..], [ServerMsg::Presence { users, gone }] if users.len() == 1 && gone.is_empty()),
            "{heard:?}"
        );
    }
}

#[test]
fn channel_messages_and_direct_messages_arrive_and_the_relay_sees_no_plaintext() {
    let mut net = Net::new();
    net.connect("alice");
    net.connect("bob");
    net.connect("carol");
    net.command("alice", "good morning, Lobby");
    net.command("bob", "/msg carol the secret word is zanzibar");
    net.command("carol", "/msg bob got it");
    net.command("carol", "channel reply from carol");

    assert_eq!(
        net.messages("bob"),
        [
            text("alice", Some("Lobby"), "good morning, Lobby"),
            text("carol", None, "got it"),
            text("carol", Some("Lobby"), "channel reply from carol"),
        ]
    );
    assert_eq!(
        net.messages("carol"),
        [text("alice", Some("Lobby"), "good morning, Lobby"), text("bob", None, "the secret word is zanzibar"),]
    );
    assert!(net.events["alice"].contains(&Event::Delivered { reached: 2, total: 2 }));
    assert!(net.errors("alice").is_empty() && net.errors("bob").is_empty() && net.errors("carol").is_empty());

    for plaintext in ["good morning", "zanzibar", "got it", "channel reply"] {
        let needle = plaintext.as_bytes();
        let leaked = net.wire.iter().any(|frame| frame.windows(needle.len()).any(|w| w == needle));
        assert!(!leaked, "{plaintext:?} crossed the relay in the clear");
    }
    assert!(net.wire.len() > 20, "the scan saw the traffic ({} frames)", net.wire.len());
}

#[test]
fn a_leaver_cannot_read_what_follows_and_a_newcomer_cannot_read_what_came_before() {
    let mut net = Net::new();
    net.connect("alice");
    net.connect("bob");
    net.connect("carol");
    net.command("alice", "before carol leaves");
    assert_eq!(net.messages("carol"), [text("alice", Some("Lobby"), "before carol leaves")]);
    let before = net.last_channel_frame_for("bob");

    net.command("carol", "/leave");
    net.advance(PRESENCE_DELAY);
    net.command("alice", "after carol left");
    assert_eq!(net.messages("bob").last().unwrap(), &text("alice", Some("Lobby"), "after carol left"));
    // Carol keeps the ciphertext she would have got, and tries.
    let after = net.last_channel_frame_for("bob");
    net.replay_to("carol", after);
    assert_eq!(net.messages("carol").len(), 1, "carol read nothing new");
    // Sealed under a key she was never given: dropped unread, no error to show.
    assert!(net.errors("carol").is_empty(), "{:?}", net.errors("carol"));

    net.connect("dave");
    net.replay_to("dave", before);
    assert!(net.messages("dave").is_empty());
    assert!(net.errors("dave").is_empty(), "{:?}", net.errors("dave"));
    net.command("alice", "welcome dave");
    assert_eq!(net.messages("dave"), [text("alice", Some("Lobby"), "welcome dave")]);
}

#[test]
fn a_changed_identity_is_flagged_until_verified() {
    let mut net = Net::new();
    net.connect("alice");
    net.connect("bob");
    net.command("bob", "/msg alice hi, it is bob");
    net.command("alice", "/safety bob");
    let first = net.events["alice"].iter().find_map(|e| match e {
        Event::Safety { number, identity_changed: false, .. } => Some(number.clone()),
        _ => None,
    });
    let first = first.expect("a safety number for bob");

    // "bob" comes back with another identity key (a reinstall, or an impostor).
    net.disconnect("bob");
    net.seed += 50;
    net.connect("bob");
    net.command("bob", "/msg alice trust me, it is bob");
    let flagged = net.events["alice"]
        .iter()
        .any(|e| matches!(e, Event::Message { text, identity_changed: true, .. } if text == "trust me, it is bob"));
    assert!(flagged, "{:#?}", net.events["alice"]);
    net.command("alice", "/verify bob");
    let verified = net.events["alice"].iter().rev().find_map(|e| match e {
        Event::Safety { number, verified: true, identity_changed: false, .. } => Some(number.clone()),
        _ => None,
    });
    assert_ne!(verified.expect("verified after /verify"), first);
}

#[test]
fn a_relay_that_swaps_in_its_own_key_for_bob_is_sent_nothing() {
    use voipc::e2ee::Sealed;
    use voipc::relay::keys::StoredBundle;
    let mut net = Net::new();
    net.connect("alice");
    net.connect("bob");
    net.connect("carol");
    net.command("alice", "hello both");
    assert_eq!(net.messages("bob"), [text("alice", Some("Lobby"), "hello both")], "bob is pinned now");
    let (alice, bob) = (format!("{SERVER_ID}/alice"), net.session_of("bob"));

    // The relay holds alice's bundle: it opens a session with her under its own identity
    // key and sends her a message "from bob"; from now on it also answers her fetches of
    // bob's bundle with its own.
    let mut rng = StdRng::seed_from_u64(666);
    let mut mallory = E2ee::generate(&mut rng, SystemTime::now()).unwrap();
    let upload = net.clients["alice"].1.e2ee().bundle_upload().unwrap();
    let bundle = StoredBundle::new(upload).unwrap().hand_out(true);
    mallory.start_session(&alice, &bundle, SystemTime::now(), &mut rng).unwrap();
    let text_payload = postcard::to_allocvec(&(0u8, "it is me, bob, on a new phone", 1u64)).unwrap();
    let sealed = mallory.encrypt(&alice, &text_payload, SystemTime::now(), &mut rng).unwrap();
    let ciphertext = postcard::to_allocvec(&sealed).unwrap();
    net.replay_to("alice", ServerMsg::Direct { from: bob, ciphertext });
    net.swap_bundle = Some((bob, StoredBundle::new(mallory.bundle_upload().unwrap()).unwrap().hand_out(true)));
    let flagged = net.events["alice"].iter().any(|e| matches!(e, Event::Message { identity_changed: true, .. }));
    assert!(flagged, "what the new key says is read, flagged: {:#?}", net.events["alice"]);
    assert!(net.events["alice"].contains(&Event::IdentityChanged { user: "bob".into() }));

    // Someone joins: alice starts a new epoch and hands out her keys; she writes to bob.
    let since = net.sent.len();
    net.connect("dave");
    net.command("alice", "/msg bob what did we eat yesterday?");
    net.command("alice", "after the swap");
    let sent = net.directs("alice", bob, since);
    for ciphertext in &sent {
        let sealed: Sealed = postcard::from_bytes(ciphertext).unwrap();
        assert!(mallory.decrypt(&alice, &sealed, &mut rng).is_err(), "the relay opened what alice sent to bob");
    }
    // Only the pinned key's session is used: the real bob, still online and still using
    // it, reads her; so does everyone else in the channel.
    assert!(net.messages("bob").contains(&text("alice", None, "what did we eat yesterday?")));
    for member in ["bob", "carol", "dave"] {
        assert_eq!(net.messages(member).last(), Some(&text("alice", Some("Lobby"), "after the swap")), "{member}");
    }

    // Alice accepts the new key (she should have compared the safety number first): now,
    // and only now, the key the relay offers gets her keys.
    let since = net.sent.len();
    net.command("alice", "/verify bob");
    let opened = net
        .directs("alice", bob, since)
        .iter()
        .filter(|c| mallory.decrypt(&alice, &postcard::from_bytes(c).unwrap(), &mut rng).is_ok())
        .count();
    assert!(opened >= 1, "after acceptance the new key is encrypted to");
}

#[test]
fn sybils_that_drain_bobs_one_time_keys_make_him_upload_new_ones() {
    use voipc::e2ee::{KYBER_ONE_TIME_PRE_KEYS, ONE_TIME_PRE_KEYS};
    let mut net = Net::new();
    net.connect("bob");
    // Reconnecting from one address gets bob's one-time keys once, whatever the identity.
    for i in 0..5 {
        let name: &'static str = Box::leak(format!("sybil{i}").into_boxed_str());
        net.connect_from(name, [10, 0, 0, 1].into());
        net.command(name, "/msg bob hi");
        net.disconnect(name);
    }
    let added = |net: &Net| {
        net.sent
            .iter()
            .filter_map(|(who, msg)| match msg {
                ClientMsg::AddOneTimeKeys { one_time, kyber_one_time } if *who == "bob" => {
                    Some((one_time.len(), kyber_one_time.len()))
                }
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    assert!(added(&net).is_empty(), "one key went, no reason to top up");
    // An address per sybil drains the pool below its low-water mark: the server tells bob
    // how many it holds and bob makes up the difference, though his own store is full.
    for i in 0..30u8 {
        let name: &'static str = Box::leak(format!("far{i}").into_boxed_str());
        net.connect_from(name, [10, 1, 0, i].into());
        net.command(name, "/msg bob hi");
        net.disconnect(name);
    }
    // The Kyber pool (25) passes below 20 first: the server then holds 94 and 19 of bob's
    // keys; after the first time, every 6 fetches.
    let top_ups = added(&net);
    assert_eq!(top_ups.len(), 5, "{top_ups:?}");
    assert!(top_ups.iter().all(|&n| n == (ONE_TIME_PRE_KEYS - 94, KYBER_ONE_TIME_PRE_KEYS - 19)), "{top_ups:?}");
    assert!(net.errors("bob").is_empty(), "{:?}", net.errors("bob"));
}

#[test]
fn a_newcomer_to_a_channel_of_150_gets_its_key_to_every_member() {
    let mut config = ServerConfig { max_users: 200, ..ServerConfig::default() };
    let mut net = Net::new();
    net.relay = Relay::new(RelayConfig::from_server_config(&mut config), [5; 32]);
    let mut rng = StdRng::seed_from_u64(150);
    let bots: Vec<(ConnId, String, E2ee)> = (0..149)
        .map(|i| {
            let e2ee = E2ee::generate(&mut rng, SystemTime::now()).unwrap();
            let name = format!("member{i}");
            (net.connect_bot(&name, &e2ee), name, e2ee)
        })
        .collect();
    // Alice needs 149 bundles; the server hands out 100 at once and 5 a second after
    // that, refusing the rest: she asks again until she has them all.
    net.connect("alice");
    net.command("alice", "hello, all 149 of you");
    let waiting = net.events["alice"].iter().find_map(|e| match e {
        Event::WaitingForKeys { members, .. } => Some(members.len()),
        _ => None,
    });
    assert!(waiting.is_some_and(|n| n > 0), "the message waits, and says for whom: {waiting:?}");
    net.advance(Duration::from_secs(60));
    assert!(net.events["alice"].contains(&Event::Delivered { reached: 149, total: 149 }), "{:?}", net.errors("alice"));
    let alice = format!("{SERVER_ID}/alice");
    for (conn, name, mut e2ee) in bots {
        let inbox = net.bot_inbox.remove(&conn).unwrap_or_default();
        let keys = inbox.iter().filter(|m| matches!(m, ServerMsg::Direct { .. })).count();
        assert_eq!(keys, 1, "{name} got alice's key once");
        let ServerMsg::Direct { ciphertext, .. } =
            inbox.iter().find(|m| matches!(m, ServerMsg::Direct { .. })).unwrap()
        else {
            unreachable!()
        };
        let sealed: voipc::e2ee::Sealed = postcard::from_bytes(ciphertext).unwrap();
        e2ee.decrypt(&alice, &sealed, &mut rng).unwrap_or_else(|e| panic!("{name} cannot open alice's key: {e}"));
        let channel = inbox.iter().filter(|m| matches!(m, ServerMsg::Channel { .. })).count();
        assert_eq!(channel, 1, "{name} got the message");
    }
}

#[test]
fn a_peer_that_sends_more_than_the_limit_is_neither_shown_nor_kept() {
    let mut net = Net::new();
    net.connect("alice");
    net.connect("eve");
    // Eve's own client would refuse; she uses another.
    let mut rng = StdRng::seed_from_u64(77);
    let mut eve = E2ee::generate(&mut rng, SystemTime::now()).unwrap();
    let alice = format!("{SERVER_ID}/alice");
    let upload = net.clients["alice"].1.e2ee().bundle_upload().unwrap();
    let bundle = voipc::relay::keys::StoredBundle::new(upload).unwrap().hand_out(true);
    eve.start_session(&alice, &bundle, SystemTime::now(), &mut rng).unwrap();
    let huge = "x".repeat(voipc::session::chat::MAX_TEXT_CHARS + 1);
    let payload = postcard::to_allocvec(&(0u8, huge.as_str(), 1u64)).unwrap();
    let sealed = eve.encrypt(&alice, &payload, SystemTime::now(), &mut rng).unwrap();
    let from = net.session_of("eve");
    net.replay_to("alice", ServerMsg::Direct { from, ciphertext: postcard::to_allocvec(&sealed).unwrap() });
    assert!(net.errors("alice").contains(&"message_too_long".to_owned()), "{:?}", net.errors("alice"));
    assert!(net.messages("alice").is_empty());
    assert_eq!(net.clients["alice"].1.history().conversation(&format!("{SERVER}@eve")).count(), 0);
}

#[test]
fn a_relay_can_neither_relabel_a_channel_message_nor_deliver_it_late() {
    let mut net = Net::new();
    net.connect("alice");
    net.connect("bob");
    net.connect("dave");
    net.command("dave", "/create Den");
    net.advance(PRESENCE_DELAY);
    // Relabelled: written in the Lobby, handed to bob as the Den's.
    net.hold_channel_for = Some(("bob", Vec::new()));
    net.command("alice", "lobby only");
    let (_, mut held) = net.hold_channel_for.take().unwrap();
    let Some(ServerMsg::Channel { from, ciphertext, .. }) = held.pop() else { panic!("no message held") };
    let den = ChannelId(2);
    net.replay_to("bob", ServerMsg::Channel { from, channel: den, ciphertext });
    assert!(net.messages("bob").is_empty(), "{:?}", net.messages("bob"));
    assert_eq!(net.errors("bob"), ["misrouted"]);

    // Held back: alice starts a new epoch (carol arrives) and the relay delivers late.
    net.hold_channel_for = Some(("bob", Vec::new()));
    net.command("alice", "meet at noon");
    net.command("alice", "or at one");
    let (_, held) = net.hold_channel_for.take().unwrap();
    net.connect("carol");
    // Within a few seconds of the new epoch, what was in flight still counts ...
    net.replay_to("bob", held[0].clone());
    assert_eq!(net.messages("bob"), [text("alice", Some("Lobby"), "meet at noon")]);
    // ... later it does not.
    net.advance(Duration::from_secs(6));
    net.replay_to("bob", held[1].clone());
    assert_eq!(net.messages("bob").len(), 1);
    assert_eq!(net.errors("bob").last().map(String::as_str), Some("stale_message"));
    // Alice's current messages reach him as ever.
    net.command("alice", "now");
    assert_eq!(net.messages("bob").last(), Some(&text("alice", Some("Lobby"), "now")));
}

#[test]
fn ciphertext_lengths_do_not_tell_what_was_written() {
    // The same conversation twice, with the same keys and randomness, once with short
    // texts and once with long ones: the relay sees the same lengths.
    let lengths = |texts: [&str; 2]| {
        let mut net = Net::new();
        net.connect("alice");
        net.connect("bob");
        net.command("alice", "/msg bob hello");
        net.command("bob", "/msg alice hi back");
        net.connect("carol");
        for text in texts {
            net.command("alice", &format!("/msg bob {text}"));
            net.command("alice", text);
        }
        let sent: Vec<(bool, usize)> = net
            .sent
            .iter()
            .filter(|(who, _)| *who == "alice")
            .filter_map(|(_, msg)| match msg {
                ClientMsg::Direct { ciphertext, .. } => Some((true, ciphertext.len())),
                ClientMsg::Channel { ciphertext, .. } => Some((false, ciphertext.len())),
                _ => None,
            })
            .collect();
        sent
    };
    let short = lengths(["a", "b"]);
    let long = lengths(["a much longer message, of about a hundred characters, that its length would tell apart", "c"]);
    assert!(short.len() >= 6, "{short:?}");
    assert_eq!(short, long);
}

#[test]
fn a_name_in_another_case_is_the_same_person_and_a_new_key_under_it_is_flagged() {
    let mut net = Net::new();
    net.connect("alice");
    net.connect("bob");
    net.command("alice", "/msg bob are you there?");
    assert_eq!(net.messages("bob"), [text("alice", None, "are you there?")]);
    net.disconnect("bob");
    // Someone else takes the name while bob is away, in other letters.
    net.connect("Bob");
    net.command("alice", "/msg bob the usual place?");
    assert!(net.events["alice"].contains(&Event::IdentityChanged { user: "Bob".into() }), "{:?}", net.errors("alice"));
    assert!(net.messages("Bob").is_empty(), "the new key reads nothing meant for bob");
}

#[test]
fn a_message_waiting_for_keys_never_lands_in_another_channel() {
    let mut net = Net::new();
    net.connect("alice");
    net.connect("bob");
    // Two arrive within a second: the second's epoch waits, and alice's message with it.
    let mut rng = StdRng::seed_from_u64(9);
    for name in ["newcomer", "another"] {
        net.connect_bot(name, &E2ee::generate(&mut rng, SystemTime::now()).unwrap());
    }
    net.command("alice", "for the lobby");
    assert!(
        net.events["alice"].iter().any(|e| matches!(e, Event::WaitingForKeys { channel, .. } if channel == "Lobby"))
    );
    // She moves before it could go: it is dropped, and she is told, not sent to the Den.
    net.command("alice", "/create Den");
    net.advance(Duration::from_secs(2));
    assert!(net.errors("alice").contains(&"not_sent".to_owned()), "{:?}", net.errors("alice"));
    assert!(net.messages("bob").is_empty());
    let sent_in_den = net.sent.iter().any(|(who, m)| *who == "alice" && matches!(m, ClientMsg::Channel { .. }));
    assert!(!sent_in_den, "nothing went out as a channel message");
}

#[test]
fn a_message_too_long_is_refused_before_it_is_sent() {
    let mut net = Net::new();
    net.connect("alice");
    net.connect("bob");
    let frames = net.wire.len();
    net.command("alice", &"x".repeat(5001));
    assert_eq!(net.errors("alice"), ["message_too_long"]);
    assert_eq!(net.wire.len(), frames, "nothing was sent");
}

#[test]
fn safety_numbers_match_however_the_server_was_reached() {
    use crate::support::{TestClient, TestServer};
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(dir.path(), None, &["--listen", "0.0.0.0:0"]);
    let port = server.addr.rsplit_once(':').unwrap().1;
    // Two addresses of this machine, both on loopback.
    let fp = ["--fingerprint", server.fingerprint.as_str()];
    let mut alice = TestClient::join(&format!("127.0.0.1:{port}"), "alice", &fp);
    let mut bob = TestClient::join(&format!("127.0.0.2:{port}"), "bob", &fp);
    let joined = alice.expect_joined("Lobby");
    bob.expect_joined("Lobby");
    // Alice writes once she knows bob is there (he may have come before her or after).
    if !joined["users"].as_array().unwrap().iter().any(|u| u == "bob") {
        alice.expect("bob arriving", |e| e["event"] == "user_joined" && e["user"] == "bob");
    }
    alice.send("/msg bob hello");
    bob.expect("alice's dm", |e| e["event"] == "message" && e["from"] == "alice");
    alice.send("/safety bob");
    bob.send("/safety Alice");
    let from_alice = alice.expect_event("safety")["number"].clone();
    let from_bob = bob.expect_event("safety")["number"].clone();
    assert_eq!(from_alice, from_bob, "the same digits on both sides");
}

#[test]
fn three_real_clients_chat_through_a_real_server() {
    use crate::support::{TestClient, TestServer};
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), None);
    let mut bob = TestClient::join(&server.invite, "bob", &[]);
    let mut carol = TestClient::join(&server.invite, "carol", &[]);
    bob.expect_joined("Lobby");
    carol.expect_joined("Lobby");
    let mut alice = TestClient::join(&server.invite, "alice", &["--say", "hello over quic"]);
    alice.expect_joined("Lobby");
    let delivered = alice.expect_event("delivered");
    assert_eq!((delivered["reached"].as_u64(), delivered["total"].as_u64()), (Some(2), Some(2)));
    for client in [&mut bob, &mut carol] {
        let message = client.expect("alice's message", |e| e["event"] == "message" && e["from"] == "alice");
        assert_eq!(message["text"], "hello over quic");
        assert_eq!(message["channel"], "Lobby");
        assert_eq!(message["identity_changed"], false);
    }
    bob.send("/msg carol just between us");
    let dm = carol.expect("bob's dm", |e| e["event"] == "message" && e["from"] == "bob");
    assert_eq!((dm["dm"].as_bool(), dm["text"].as_str()), (Some(true), Some("just between us")));
    bob.send("/safety carol");
    carol.send("/safety bob");
    let from_bob = bob.expect_event("safety")["number"].as_str().unwrap().to_owned();
    let from_carol = carol.expect_event("safety")["number"].as_str().unwrap().to_owned();
    assert_eq!(from_bob.len(), 60);
    assert_eq!(from_bob, from_carol, "both sides show the same safety number");
}

#[test]
fn a_member_without_keys_does_not_hold_up_the_channel() {
    use voipc::protocol::{ClientMsg, PROTOCOL_VERSION};
    let mut net = Net::new();
    net.connect("alice");
    // A bot that speaks the protocol but publishes no keys (like the relay bench's).
    let bot = ConnId(999);
    net.relay
        .handle_input(net.now, bot, Input::Connected { source: Source::of([127, 0, 0, 1].into()), started_lately: 1 })
        .unwrap();
    let hello = ClientMsg::Hello { version: PROTOCOL_VERSION, name: "bot".into(), join: None, bundle: None };
    net.relay.handle_input(net.now, bot, Input::Control(hello)).unwrap();
    net.run();
    net.connect("bob");
    net.command("alice", "hello despite the bot");
    assert_eq!(net.messages("bob"), [text("alice", Some("Lobby"), "hello despite the bot")]);
    net.command("alice", "/msg bot are you there?");
    assert!(net.errors("alice").contains(&"no_keys".to_owned()), "{:?}", net.errors("alice"));
}
