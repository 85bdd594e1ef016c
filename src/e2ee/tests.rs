//! Signal sessions and sender keys between simulated clients, with the server's part
//! (handing out one bundle with one one-time key of each kind) done by hand.

use std::time::{Duration, SystemTime};

use rand::SeedableRng;
use rand::rngs::StdRng;

use super::*;
use crate::protocol::MAX_FRAME_LEN;
use crate::relay::keys::StoredBundle;

fn now() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

struct Client {
    name: &'static str,
    e2ee: E2ee,
    rng: StdRng,
}

impl Client {
    fn new(name: &'static str, seed: u64) -> Client {
        let mut rng = StdRng::seed_from_u64(seed);
        Client { name, e2ee: E2ee::generate(&mut rng, now()).unwrap(), rng }
    }

    /// What the server hands out for this client: the first one-time key of each kind.
    /// What the server hands out for this client: `one_time_keys` as for a first fetch.
    fn bundle(&self, one_time_keys: bool) -> PeerBundle {
        StoredBundle::new(self.e2ee.bundle_upload().unwrap()).unwrap().hand_out(one_time_keys)
    }

    fn fetched_bundle(&self) -> PeerBundle {
        self.bundle(true)
    }

    fn send(&mut self, to: &str, text: &str) -> Sealed {
        self.e2ee.encrypt(to, text.as_bytes(), now(), &mut self.rng).unwrap()
    }

    fn receive(&mut self, from: &str, sealed: &Sealed) -> (String, IdentityStatus) {
        let opened = self.e2ee.decrypt(from, sealed, &mut self.rng).unwrap();
        (String::from_utf8(opened.plaintext).unwrap(), opened.identity)
    }

    fn connect(&mut self, other: &Client) -> IdentityStatus {
        self.e2ee.start_session(other.name, &other.fetched_bundle(), now(), &mut self.rng).unwrap()
    }

    /// Our sender key for `distribution`, delivered to each of `to` over pairwise sessions.
    fn distribute(&mut self, distribution: Uuid, to: &mut [&mut Client]) {
        let skdm = self.e2ee.sender_key_distribution(self.name, distribution, &mut self.rng).unwrap();
        for member in to.iter_mut() {
            let sealed = self.e2ee.encrypt(member.name, &skdm, now(), &mut self.rng).unwrap();
            let opened = member.e2ee.decrypt(self.name, &sealed, &mut member.rng).unwrap();
            member.e2ee.accept_sender_key(self.name, &opened.plaintext).unwrap();
        }
    }

    fn say(&mut self, distribution: Uuid, text: &str) -> Vec<u8> {
        self.e2ee.group_encrypt(self.name, distribution, text.as_bytes(), &mut self.rng).unwrap()
    }
}

#[test]
fn direct_messages_use_pqxdh_then_the_double_ratchet() {
    let mut alice = Client::new("alice", 1);
    let mut bob = Client::new("bob", 2);
    assert_eq!(bob.e2ee.one_time_keys_left(), (ONE_TIME_PRE_KEYS, KYBER_ONE_TIME_PRE_KEYS));
    assert_eq!(alice.connect(&bob), IdentityStatus::Trusted);
    assert!(alice.e2ee.has_session("bob"));

    let first = alice.send("bob", "hello bob");
    assert!(first.pre_key, "the first message carries the PQXDH pre-key material");
    assert!(!first.bytes.windows(5).any(|w| w == b"hello"));
    assert_eq!(bob.receive("alice", &first), ("hello bob".to_owned(), IdentityStatus::Trusted));
    assert_eq!(
        bob.e2ee.one_time_keys_left(),
        (ONE_TIME_PRE_KEYS - 1, KYBER_ONE_TIME_PRE_KEYS - 1),
        "one-time keys are used once"
    );

    let reply = bob.send("alice", "hi alice");
    assert!(!reply.pre_key);
    assert_eq!(alice.receive("bob", &reply).0, "hi alice");
    for i in 0..5 {
        let text = format!("message {i}");
        let sealed = alice.send("bob", &text);
        assert_eq!(bob.receive("alice", &sealed).0, text);
    }
    // A replayed message does not decrypt twice.
    let again = alice.send("bob", "once");
    bob.receive("alice", &again);
    assert!(bob.e2ee.decrypt("alice", &again, &mut bob.rng).is_err());
}

#[test]
fn a_bundle_without_one_time_keys_still_works() {
    let mut alice = Client::new("alice", 3);
    let mut bob = Client::new("bob", 4);
    let bundle = bob.bundle(false);
    assert!(bundle.one_time.is_none());
    alice.e2ee.start_session("bob", &bundle, now(), &mut alice.rng).unwrap();
    let sealed = alice.send("bob", "drained");
    assert_eq!(bob.receive("alice", &sealed).0, "drained");
    assert_eq!(
        bob.e2ee.one_time_keys_left(),
        (ONE_TIME_PRE_KEYS, KYBER_ONE_TIME_PRE_KEYS),
        "the last-resort key stays"
    );
}

#[test]
fn the_bundle_fits_a_control_frame_and_replenishing_tops_it_up() {
    let mut bob = Client::new("bob", 5);
    let upload = bob.e2ee.bundle_upload().unwrap();
    assert_eq!((upload.one_time.len(), upload.kyber_one_time.len()), (ONE_TIME_PRE_KEYS, KYBER_ONE_TIME_PRE_KEYS));
    let encoded = postcard::to_allocvec(&upload).unwrap();
    assert!(encoded.len() < MAX_FRAME_LEN - 1024, "{} bytes", encoded.len());

    let mut alice = Client::new("alice", 6);
    alice.connect(&bob);
    let sealed = alice.send("bob", "x");
    bob.receive("alice", &sealed);
    // The server says how many of ours it holds: the keys it handed out are made anew,
    // even though bob still has them (a peer may yet use one).
    let old_max = upload.one_time.iter().map(|k| k.id).max().unwrap();
    let (one_time, kyber) = bob.e2ee.replenish(&mut bob.rng, now(), (ONE_TIME_PRE_KEYS - 30, 3)).unwrap();
    assert_eq!((one_time.len(), kyber.len()), (30, KYBER_ONE_TIME_PRE_KEYS - 3));
    assert!(one_time[0].id > old_max, "ids are never reused");
    // A bundle handed out before (the server's second: alice used the first) still opens
    // a session.
    let mut carol = Client::new("carol", 7);
    let mut stored = StoredBundle::new(upload).unwrap();
    stored.hand_out(true);
    let early = stored.hand_out(true);
    carol.e2ee.start_session("bob", &early, now(), &mut carol.rng).unwrap();
    let sealed = carol.send("bob", "late but fine");
    assert_eq!(bob.receive("carol", &sealed).0, "late but fine");
    // What bob keeps is bounded (the oldest unused keys go), and he publishes the newest.
    for _ in 0..10 {
        bob.e2ee.replenish(&mut bob.rng, now(), (0, 0)).unwrap();
    }
    assert_eq!(bob.e2ee.one_time_keys_left(), (2 * ONE_TIME_PRE_KEYS, 2 * KYBER_ONE_TIME_PRE_KEYS));
    let newest = bob.e2ee.bundle_upload().unwrap();
    assert_eq!((newest.one_time.len(), newest.kyber_one_time.len()), (ONE_TIME_PRE_KEYS, KYBER_ONE_TIME_PRE_KEYS));
    assert!(newest.one_time.iter().all(|k| k.id > old_max + 30));
}

#[test]
fn channel_messages_use_sender_keys_and_a_leaver_cannot_read_what_follows() {
    let mut alice = Client::new("alice", 10);
    let mut bob = Client::new("bob", 11);
    let mut carol = Client::new("carol", 12);
    alice.connect(&bob);
    alice.connect(&carol);
    let epoch1 = Uuid::from_bytes([1; 16]);
    alice.distribute(epoch1, &mut [&mut bob, &mut carol]);
    let hello = alice.say(epoch1, "hello channel");
    assert_eq!(bob.e2ee.group_decrypt("alice", &hello).unwrap(), b"hello channel");
    assert_eq!(carol.e2ee.group_decrypt("alice", &hello).unwrap(), b"hello channel");

    // Carol leaves: alice starts a new sender key and gives it to those who remain.
    let epoch2 = Uuid::from_bytes([2; 16]);
    alice.distribute(epoch2, &mut [&mut bob]);
    let after = alice.say(epoch2, "carol is gone");
    assert_eq!(bob.e2ee.group_decrypt("alice", &after).unwrap(), b"carol is gone");
    assert!(carol.e2ee.group_decrypt("alice", &after).is_err(), "the leaver cannot read what follows");

    // Dave joins later and gets only the current key: earlier ciphertext stays closed.
    let mut dave = Client::new("dave", 13);
    alice.connect(&dave);
    let epoch3 = Uuid::from_bytes([3; 16]);
    alice.distribute(epoch3, &mut [&mut bob, &mut dave]);
    assert!(dave.e2ee.group_decrypt("alice", &hello).is_err());
    assert!(dave.e2ee.group_decrypt("alice", &after).is_err());
    let welcome = alice.say(epoch3, "welcome dave");
    assert_eq!(dave.e2ee.group_decrypt("alice", &welcome).unwrap(), b"welcome dave");
}

#[test]
fn safety_numbers_match_on_both_sides_and_a_changed_identity_is_flagged() {
    let mut alice = Client::new("alice", 20);
    let mut bob = Client::new("bob", 21);
    alice.connect(&bob);
    let sealed = alice.send("bob", "hi");
    bob.receive("alice", &sealed);
    let number = alice.e2ee.safety_number("alice", "bob").unwrap();
    assert_eq!(number.len(), 60);
    assert!(number.chars().all(|c| c.is_ascii_digit()));
    assert_eq!(number, bob.e2ee.safety_number("bob", "alice").unwrap());
    assert!(matches!(alice.e2ee.safety_number("alice", "nobody"), Err(E2eeError::UnknownPeer(_))));

    // Bob reinstalls, or a relay hands out someone else's key under his name.
    let mut new_bob = Client::new("bob", 22);
    assert_eq!(alice.connect(&new_bob), IdentityStatus::Changed);
    assert!(alice.e2ee.has_session("bob"), "the session with the pinned key stays; none with the new one");
    let changed_number = alice.e2ee.safety_number("alice", "bob").unwrap();
    assert_ne!(changed_number, number, "the number to compare is the new key's");
    assert_eq!(alice.e2ee.identity_status("bob"), IdentityStatus::Changed);
    assert!(!alice.e2ee.is_verified("bob"));
    // Whatever alice encrypts for "bob" now is for the pinned key: the new one opens nothing.
    let sealed = alice.send("bob", "still for the old bob");
    assert!(new_bob.e2ee.decrypt("alice", &sealed, &mut new_bob.rng).is_err());

    // The new key speaks first: it is read, flagged, and still not encrypted to.
    let carol = Client::new("carol", 23);
    let mut new_carol = Client::new("carol", 24);
    alice.connect(&carol);
    new_carol.connect(&alice);
    let sealed = new_carol.send("alice", "it is me, carol");
    assert_eq!(alice.receive("carol", &sealed), ("it is me, carol".into(), IdentityStatus::Changed));
    assert!(!alice.e2ee.has_session("carol"));
    assert!(matches!(
        alice.e2ee.encrypt("carol", b"secret", now(), &mut alice.rng),
        Err(E2eeError::UntrustedIdentity(_))
    ));

    // Accepted after comparing: the new key is pinned and sessions start with it.
    alice.e2ee.accept_identity("bob");
    assert_eq!(alice.e2ee.identity_status("bob"), IdentityStatus::Trusted);
    assert!(alice.e2ee.is_verified("bob"));
    assert_eq!(alice.e2ee.safety_number("alice", "bob").unwrap(), changed_number);
    assert_eq!(alice.connect(&new_bob), IdentityStatus::Trusted);
    let sealed = alice.send("bob", "is that you?");
    assert_eq!(new_bob.receive("alice", &sealed).0, "is that you?");
    alice.e2ee.accept_identity("carol");
    assert!(alice.e2ee.has_session("carol"), "the session the accepted key began");
    let sealed = alice.send("carol", "welcome back");
    assert_eq!(new_carol.receive("alice", &sealed).0, "welcome back");
}

#[test]
fn state_survives_a_round_trip_through_bytes() {
    let mut alice = Client::new("alice", 30);
    let mut bob = Client::new("bob", 31);
    alice.connect(&bob);
    let sealed = alice.send("bob", "before");
    bob.receive("alice", &sealed);
    let epoch = Uuid::from_bytes([9; 16]);
    alice.distribute(epoch, &mut [&mut bob]);

    bob.e2ee = E2ee::from_bytes(&bob.e2ee.to_bytes()).unwrap();
    alice.e2ee = E2ee::from_bytes(&alice.e2ee.to_bytes()).unwrap();
    let sealed = alice.send("bob", "after");
    assert_eq!(bob.receive("alice", &sealed).0, "after");
    let said = alice.say(epoch, "still here");
    assert_eq!(bob.e2ee.group_decrypt("alice", &said).unwrap(), b"still here");
    assert!(matches!(E2ee::from_bytes(b"garbage"), Err(E2eeError::State(_))));
}

#[test]
fn garbage_and_tampered_ciphertext_are_errors() {
    let mut alice = Client::new("alice", 40);
    let mut bob = Client::new("bob", 41);
    alice.connect(&bob);
    let mut sealed = alice.send("bob", "intact");
    let last = sealed.bytes.len() - 1;
    sealed.bytes[last] ^= 1;
    assert!(bob.e2ee.decrypt("alice", &sealed, &mut bob.rng).is_err());

    let mut rng = StdRng::seed_from_u64(42);
    for len in [0, 1, 33, 200] {
        let junk: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        for pre_key in [true, false] {
            let sealed = Sealed { pre_key, bytes: junk.clone() };
            assert!(bob.e2ee.decrypt("alice", &sealed, &mut bob.rng).is_err());
        }
        assert!(bob.e2ee.group_decrypt("alice", &junk).is_err());
        assert!(bob.e2ee.accept_sender_key("alice", &junk).is_err());
    }
}

#[test]
fn the_signed_pre_key_rotates_when_due_and_old_sessions_still_start() {
    let mut alice = Client::new("alice", 50);
    let mut bob = Client::new("bob", 51);
    let old_bundle = bob.fetched_bundle();
    let day = Duration::from_secs(24 * 3600);
    assert!(!bob.e2ee.rotate_signed_pre_key_if_due(&mut bob.rng, now() + day * 6).unwrap());
    assert!(bob.e2ee.rotate_signed_pre_key_if_due(&mut bob.rng, now() + day * 8).unwrap());
    let new_id = bob.e2ee.bundle_upload().unwrap().signed_pre_key.id;
    assert_eq!(new_id, old_bundle.signed_pre_key.id + 1);
    assert!(!bob.e2ee.rotate_signed_pre_key_if_due(&mut bob.rng, now() + day * 9).unwrap());
    // A peer that fetched the old bundle before the rotation can still begin a session.
    alice.e2ee.start_session("bob", &old_bundle, now(), &mut alice.rng).unwrap();
    let sealed = alice.send("bob", "from an old bundle");
    assert_eq!(bob.receive("alice", &sealed).0, "from an old bundle");
}

#[test]
fn sender_keys_kept_are_bounded_per_sender_and_in_all() {
    use super::store::{MAX_SENDER_KEYS, SENDER_KEYS_PER_SENDER};
    let mut alice = Client::new("alice", 40);
    let mut bob = Client::new("bob", 41);
    alice.connect(&bob);
    let epochs: Vec<Uuid> = (0..10u8).map(|i| Uuid::from_bytes([i + 1; 16])).collect();
    let mut said = Vec::new();
    for epoch in &epochs {
        alice.distribute(*epoch, &mut [&mut bob]);
        said.push(alice.say(*epoch, "x"));
    }
    assert_eq!(bob.e2ee.sender_keys.count_for("alice"), SENDER_KEYS_PER_SENDER);
    assert!(bob.e2ee.group_decrypt("alice", said.last().unwrap()).is_ok(), "the newest epoch opens");
    assert!(bob.e2ee.group_decrypt("alice", &said[0]).is_err(), "the oldest is gone");

    // A server that makes up senders cannot grow the store without bound either.
    let mut sybil_rng = StdRng::seed_from_u64(42);
    for i in 0..(MAX_SENDER_KEYS + 20) {
        let message = {
            let mut sybil = SenderKeys::default();
            let address = address(&format!("sybil{i}"));
            ready(libsignal_protocol::create_sender_key_distribution_message(
                &address,
                Uuid::from_bytes([7; 16]),
                &mut sybil,
                &mut sybil_rng,
            ))
            .unwrap()
        };
        bob.e2ee.accept_sender_key(&format!("sybil{i}"), message.serialized()).unwrap();
    }
    assert_eq!(bob.e2ee.sender_keys.total(), MAX_SENDER_KEYS);
}

#[test]
fn sessions_are_bounded_and_the_least_recently_used_go_first() {
    use super::store::MAX_SESSIONS;
    let mut alice = Client::new("alice", 60);
    let bob = Client::new("bob", 61);
    // A server full of newcomers: one bundle under many names is enough for the store.
    let bundle = bob.bundle(false);
    for i in 0..(MAX_SESSIONS + 10) {
        alice.e2ee.start_session(&format!("peer{i}"), &bundle, now(), &mut alice.rng).unwrap();
        if i % 16 == 0 {
            alice.send("peer0", "still talking");
        }
    }
    assert_eq!(alice.e2ee.sessions.count(), MAX_SESSIONS);
    assert!(alice.e2ee.has_session("peer0"), "used all along, so kept");
    assert!(!alice.e2ee.has_session("peer1") && !alice.e2ee.has_session("peer10"), "the least recently used went");
    assert!(alice.e2ee.has_session("peer11") && alice.e2ee.has_session(&format!("peer{}", MAX_SESSIONS + 9)));
    // The records are saved as before; a restored state keeps them all.
    let restored = E2ee::from_bytes(&alice.e2ee.to_bytes()).unwrap();
    assert_eq!(restored.sessions.count(), MAX_SESSIONS);
    assert!(restored.has_session("peer0"));
}

#[test]
fn state_in_the_first_format_keeps_the_identity_and_holds_back_changed_peers() {
    let mut rng = StdRng::seed_from_u64(50);
    let own = IdentityKeyPair::generate(&mut rng);
    let (bob, carol) = (IdentityKeyPair::generate(&mut rng), IdentityKeyPair::generate(&mut rng));
    let first = FirstFormat {
        own: SecretBytes::new(own.serialize().into_vec()),
        registration_id: 7,
        peers: [
            ("bob".to_owned(), bob.identity_key().serialize().into_vec()),
            ("carol".to_owned(), carol.identity_key().serialize().into_vec()),
        ]
        .into(),
        changed: ["carol".to_owned()].into(),
        verified: ["bob".to_owned()].into(),
        sessions: Sessions::default(),
        pre_keys: PreKeys::default(),
        signed_pre_keys: SignedPreKeys::default(),
        kyber_pre_keys: KyberPreKeys::default(),
        sender_keys: BTreeMap::new(),
        next_pre_key_id: 1,
        next_kyber_id: 1,
        signed_pre_key_id: 0,
        signed_pre_key_made_ms: 0,
        kyber_last_resort_id: 0,
    };
    let bytes = postcard::to_allocvec(&first).unwrap();
    assert!(E2ee::from_stored(&bytes, 9).is_err(), "a newer format is refused, not misread");
    let e2ee = E2ee::from_stored(&bytes, 1).unwrap();
    assert_eq!(e2ee.identities.own().unwrap().identity_key(), own.identity_key(), "the same identity");
    assert_eq!((e2ee.identity_status("bob"), e2ee.is_verified("bob")), (IdentityStatus::Trusted, true));
    // Carol's key had changed and was not accepted: it is pending, and not encrypted to.
    assert_eq!(e2ee.identity_status("carol"), IdentityStatus::Changed);
    assert!(e2ee.identities.pinned("carol").is_none());
    let mut again = E2ee::from_stored(&e2ee.to_bytes(), STATE_FORMAT).unwrap();
    assert_eq!(again.identity_status("carol"), IdentityStatus::Changed);
    // A bundle for carol starts no session until the user accepts a key for her.
    let mut rng = StdRng::seed_from_u64(51);
    let new_carol = Client::new("carol", 52);
    let status = again.start_session("carol", &new_carol.fetched_bundle(), now(), &mut rng).unwrap();
    assert_eq!(status, IdentityStatus::Changed);
    assert!(!again.has_session("carol"));
}

#[test]
fn peers_addressed_the_first_way_keep_their_pins_under_the_servers_identity() {
    let mut alice = Client::new("alice", 60);
    let bob = Client::new("Bob", 61);
    let old = "chat.test:9987/Bob";
    alice.e2ee.start_session(old, &bob.fetched_bundle(), now(), &mut alice.rng).unwrap();
    alice.e2ee.accept_identity(old);
    alice.e2ee.rename_peers("chat.test:9987/", "5e5e/");
    let new = "5e5e/bob";
    assert!(alice.e2ee.has_session(new) && !alice.e2ee.has_session(old));
    assert!(alice.e2ee.is_verified(new));
    assert!(alice.e2ee.identities.pinned(old).is_none());
    // Another key under the name is a changed identity, not a new person.
    let impostor = Client::new("bob", 62);
    assert_eq!(
        alice.e2ee.start_session(new, &impostor.fetched_bundle(), now(), &mut alice.rng).unwrap(),
        IdentityStatus::Changed
    );
    // Renaming again (every connection does) changes nothing.
    alice.e2ee.rename_peers("chat.test:9987/", "5e5e/");
    assert!(alice.e2ee.has_session(new));
}
