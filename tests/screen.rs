//! Screen share between client sessions through the relay core: opt-in watching,
//! keyframe requests after loss, viewer reports, on the virtual clock.

use std::time::Duration;

use voipc::protocol::{MEDIA_HEADER_LEN, MediaHeader, ShareInfo, StreamType};
use voipc::relay::{KEYFRAME_MERGE, PRESENCE_DELAY};
use voipc::session::Event;

use crate::chat::Net;

const SHARE: ShareInfo = ShareInfo { width: 1280, height: 720, fps: 30 };

/// An encoded frame stand-in: `len` bytes that name the frame.
fn payload(frame: u32, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u32 ^ frame) as u8).collect()
}

/// Alice shares, bob watches, carol (same channel) and dave (elsewhere) do not.
fn sharing_net() -> Net {
    let mut net = Net::new();
    for name in ["alice", "bob", "carol", "dave"] {
        net.connect(name);
    }
    net.command("dave", "/create Elsewhere");
    net.session("alice").set_share(Some(SHARE));
    net.run();
    net.advance(PRESENCE_DELAY);
    net.command("bob", "/watch alice");
    net.advance(PRESENCE_DELAY);
    net
}

/// Sends one frame of alice's; returns who received its datagrams (each receiver once).
fn send_frame(net: &mut Net, frame: u32, keyframe: bool, len: usize, drop: Option<usize>) -> Vec<&'static str> {
    let now = net.now;
    let datagrams =
        net.session("alice").screen_datagrams(now, frame * 3000, keyframe, &payload(frame, len), 0.0).unwrap();
    let mut reached = Vec::new();
    for (i, d) in datagrams.iter().enumerate() {
        assert!(d.len() <= 1100, "a fragment of {} bytes", d.len());
        if Some(i) != drop {
            reached = net.datagram("alice", d);
        }
    }
    reached
}

fn frames(net: &mut Net, name: &str) -> Vec<(u32, bool, Vec<u8>)> {
    let session = net.session(name);
    std::iter::from_fn(|| session.poll_screen_frame()).map(|f| (f.timestamp / 3000, f.keyframe, f.payload)).collect()
}

#[test]
fn only_the_viewer_receives_a_share_and_opens_it() {
    let mut net = sharing_net();
    assert!(
        net.events_of("carol")
            .iter()
            .any(|e| matches!(e, Event::Sharing { user, share: Some(s), .. } if user == "alice" && *s == SHARE))
    );
    assert!(net.events_of("alice").contains(&Event::Viewers { count: 1 }));
    assert!(net.session("alice").take_keyframe_request(), "the relay asked for a keyframe for the new viewer");
    assert_eq!(send_frame(&mut net, 0, true, 40_000, None), ["bob"]);
    assert_eq!(send_frame(&mut net, 1, false, 900, None), ["bob"]);
    assert_eq!(frames(&mut net, "bob"), [(0, true, payload(0, 40_000)), (1, false, payload(1, 900))]);
    assert!(frames(&mut net, "carol").is_empty() && frames(&mut net, "dave").is_empty());
    // A relay that hands carol the datagrams anyway: she watches nobody and opens nothing.
    let now = net.now;
    let stray = net.session("alice").screen_datagrams(now, 6000, true, b"frame", 0.0).unwrap();
    net.session("carol").handle_datagram(now, &stray[0]);
    assert!(frames(&mut net, "carol").is_empty());
    // Voice still reaches the whole channel while the share runs.
    let voice = net.session("alice").media_datagram(now, StreamType::Voice, 1, 960, b"opus").unwrap();
    assert_eq!(net.datagram("alice", &voice), ["bob", "carol"]);
    // The share's desktop audio goes where its picture goes, and opens only for bob.
    let audio = net.session("alice").desktop_audio_datagram(now, 1800, b"music").unwrap();
    assert_eq!(net.datagram("alice", &audio), ["bob"]);
    let heard: Vec<_> = std::iter::from_fn(|| net.session("bob").poll_media()).collect();
    assert!(heard.iter().any(|f| f.stream == StreamType::ScreenAudio && f.payload == b"music" && f.timestamp == 1800));
    // Handed to carol anyway, it is counted and dropped unopened.
    let (_, malformed) = net.session("carol").dropped_screen_datagrams();
    net.session("carol").handle_datagram(now, &audio);
    assert!(std::iter::from_fn(|| net.session("carol").poll_media()).all(|f| f.stream != StreamType::ScreenAudio));
    assert_eq!(net.session("carol").dropped_screen_datagrams(), (2, malformed));
    // Nothing to send once the share is over.
    net.session("alice").set_share(None);
    assert!(net.session("alice").desktop_audio_datagram(now, 3600, b"music").is_none());
}

#[test]
fn a_lost_fragment_means_no_corrupt_frame_a_keyframe_request_and_recovery() {
    let mut net = sharing_net();
    net.session("alice").take_keyframe_request();
    send_frame(&mut net, 0, true, 20_000, None);
    send_frame(&mut net, 1, false, 5_000, Some(2));
    send_frame(&mut net, 2, false, 5_000, None);
    assert_eq!(frames(&mut net, "bob").len(), 1, "frame 1 lost a fragment, frame 2 needs it");
    // Bob asks at once; the relay passes it on (merged) and alice is told.
    net.advance(KEYFRAME_MERGE);
    assert!(net.session("alice").take_keyframe_request());
    send_frame(&mut net, 3, true, 20_000, None);
    send_frame(&mut net, 4, false, 5_000, None);
    let got = frames(&mut net, "bob");
    assert_eq!(got.iter().map(|f| (f.0, f.1)).collect::<Vec<_>>(), [(3, true), (4, false)]);
    assert_eq!(got[0].2, payload(3, 20_000));
    // Bob's report of the second reaches alice, with the lost frame in it.
    net.advance(Duration::from_secs(1));
    let (viewer, report) = net.session("alice").poll_viewer_report().expect("a report");
    assert_eq!(viewer, net.session("bob").me().unwrap());
    assert_eq!((report.frames_lost, report.fragments_lost, report.frames_decoded), (1, 1, 3));
    // Bob is shown the same second: whole frames, kilobits, fragments lost.
    let figures = net.events_of("bob").iter().find_map(|e| match e {
        Event::WatchStats { user, fps, kbps, loss_percent, .. } if user == "alice" => {
            Some((*fps, *kbps, *loss_percent))
        }
        _ => None,
    });
    let (fps, kbps, loss) = figures.expect("bob's figures of the second");
    assert_eq!(fps, 3);
    // 20 000 + 5 000 (less a fragment) + 5 000 + 20 000 + 5 000 bytes of frames, the
    // keyframes' recovery fragments, and headers.
    assert!((400..=520).contains(&kbps), "{kbps} kbit");
    assert!(loss > 0.0 && loss < 5.0, "{loss} %");
}

#[test]
fn a_tampered_fragment_never_opens() {
    let mut net = sharing_net();
    let now = net.now;
    let mut datagrams = net.session("alice").screen_datagrams(now, 0, true, &payload(0, 3000), 0.0).unwrap();
    // The relay flips a byte of the frame, then swaps two fragments' slices.
    datagrams[1][MEDIA_HEADER_LEN + 20] ^= 1;
    for d in &datagrams {
        net.datagram("alice", d);
    }
    assert!(frames(&mut net, "bob").is_empty());
    let mut datagrams = net.session("alice").screen_datagrams(now, 3000, true, &payload(1, 3000), 0.0).unwrap();
    let (a, b) = (datagrams[0][28..].to_vec(), datagrams[1][28..].to_vec());
    datagrams[0].truncate(28);
    datagrams[0].extend_from_slice(&b);
    datagrams[1].truncate(28);
    datagrams[1].extend_from_slice(&a);
    for d in &datagrams {
        net.datagram("alice", d);
    }
    assert!(frames(&mut net, "bob").is_empty());
    let (header, _) = MediaHeader::parse(&datagrams[2]).unwrap();
    assert_eq!(header.stream, StreamType::Screen);
    // A fragment lost and a recovery fragment altered: what the code rebuilds does not open.
    let mut datagrams = net.session("alice").screen_datagrams(now, 6000, true, &payload(2, 3000), 0.05).unwrap();
    assert_eq!(datagrams.len(), 3 + 2, "three slices and two recovery fragments at 5 % loss");
    datagrams[3][40] ^= 1;
    for d in &datagrams[1..4] {
        net.datagram("alice", d);
    }
    assert!(frames(&mut net, "bob").is_empty());
    // Untouched, the same loss is made up for.
    let datagrams = net.session("alice").screen_datagrams(now, 9000, true, &payload(3, 3000), 0.05).unwrap();
    for d in &datagrams[1..4] {
        net.datagram("alice", d);
    }
    assert_eq!(frames(&mut net, "bob"), [(3, true, payload(3, 3000))]);
}

#[test]
fn leaving_the_channel_ends_the_share_and_the_watch() {
    let mut net = sharing_net();
    net.command("alice", "/join Elsewhere");
    net.advance(PRESENCE_DELAY);
    assert!(net.session("alice").sharing().is_none());
    assert!(
        net.events_of("bob")
            .iter()
            .any(|e| matches!(e, Event::Watching { user, watching: false, .. } if user == "alice"))
    );
    assert!(
        net.events_of("carol").iter().any(|e| matches!(e, Event::Sharing { user, share: None, .. } if user == "alice"))
    );
}
