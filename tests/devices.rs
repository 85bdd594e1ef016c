//! Voice through real sound devices: a private PulseAudio server whose virtual
//! microphones are fed from a WAV file and whose virtual speaker is recorded, reached
//! through cpal's PulseAudio host as a desktop's devices are.

use std::path::Path;
use std::time::Duration;

use voipc::audio::quality::compare;
use voipc::audio::wav::read_voice;

use crate::support::{SoundServer, TestClient, TestServer, read_raw, voipc};

/// Alice's headset: a 44.1 kHz microphone (so her client resamples) fed by what is
/// played on the `headset_feed` output. Its module index, to unplug it with.
fn plug_headset(sound: &SoundServer) -> u32 {
    sound.load(
        "module-remap-source",
        &[
            "source_name=headset_mic",
            "master=headset_feed.monitor",
            "rate=44100",
            "source_properties=device.description=Headset",
        ],
    )
}

/// Where the recording is loud: 10 ms frames above -60 dBFS, joined across quiet of
/// less than a second (the pauses within the speech), kept when at least 2 s long. Each
/// is one time the speech came through; where it lies in the recording depends on how
/// long each `paplay` took to start, so it is found, not computed.
fn loud_spans(recording: &[f32]) -> Vec<std::ops::Range<usize>> {
    const FRAME: usize = 480;
    let mut spans: Vec<std::ops::Range<usize>> = Vec::new();
    for (i, frame) in recording.chunks(FRAME).enumerate() {
        if voipc::audio::dsp::level_dbfs(frame) < -60.0 {
            continue;
        }
        let at = i * FRAME;
        match spans.last_mut() {
            Some(last) if at - last.end < 48_000 => last.end = at + frame.len(),
            _ => spans.push(at..at + frame.len()),
        }
    }
    spans.retain(|span| span.len() >= 2 * 48_000);
    spans
}

/// Alice picks her headset by name (not the default microphone) and bob plays through a
/// 44.1 kHz speaker picked by its PulseAudio name: bob's speaker plays her speech. Then
/// the headset is unplugged mid-call: her client says so, falls back to the default
/// microphone and voice resumes from it; plugged back, her client takes it again by
/// itself and says so.
#[test]
#[ignore = "plays sound in real time: `just test` runs it alone, after the rest"]
fn voice_goes_through_real_devices_and_follows_an_unplugged_microphone() {
    let dir = tempfile::tempdir().unwrap();
    let sound = SoundServer::start();
    sound.load("module-null-sink", &["sink_name=headset_feed", "rate=48000"]);
    sound.load("module-null-sink", &["sink_name=room_feed", "rate=48000"]);
    let headset = plug_headset(&sound);
    sound.load(
        "module-remap-source",
        &["source_name=builtin_mic", "master=room_feed.monitor", "source_properties=device.description=Built-in"],
    );
    sound.pactl(&["set-default-source", "builtin_mic"]);
    sound.load(
        "module-null-sink",
        &["sink_name=bob_speaker", "rate=44100", "sink_properties=device.description=Speakers"],
    );
    let env = sound.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();

    // The device list names them as the user sees them, with PulseAudio's own names.
    let listed = voipc().env_clear().envs(env.iter().copied()).arg("devices").output().unwrap();
    let listed = String::from_utf8(listed.stdout).unwrap();
    println!("{listed}");
    assert!(listed.contains("Headset [headset_mic]\n"), "{listed}");
    assert!(listed.contains("Built-in [builtin_mic] (default)"), "{listed}");
    assert!(listed.contains("Speakers [bob_speaker]"), "{listed}");

    let server = TestServer::start(dir.path(), None);
    // Bob also records what his client plays: the sound before his speaker.
    let mix = dir.path().join("bob_mix.wav");
    let bob_args = ["--output-device", "bob_speaker", "--record", mix.to_str().unwrap(), "--duration", "45"];
    let mut bob = TestClient::join_with_env(&server.invite, "bob", &bob_args, &env);
    bob.expect_joined("Lobby");
    let output = dir.path().join("bob_speaker.raw");
    let mut monitor = sound.record("bob_speaker.monitor", &output);
    // Always on the air: what is measured is the devices' path, not where the voice gate
    // opens (the voice tests measure that through the same server).
    let alice_args = ["--input-device", "Headset", "--voice-mode", "always-on", "--duration", "40"];
    let mut alice = TestClient::join_with_env(&server.invite, "alice", &alice_args, &env);
    alice.expect_joined("Lobby");
    bob.expect("alice joined", |e| e["event"] == "user_joined" && e["user"] == "alice");
    std::thread::sleep(Duration::from_millis(500));

    let speech_file = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/speech.wav");
    let say = |sink: &str| {
        assert!(sound.play_on(sink, &speech_file).wait().unwrap().success());
        std::thread::sleep(Duration::from_secs(1));
    };
    // 1. Into the headset, the device she chose.
    say("headset_feed");
    // 2. Unplugged: her client falls back to the default microphone.
    sound.unload(headset);
    let gone = alice.expect("the headset gone", |e| e["event"] == "device");
    println!("{gone}");
    assert!(gone["message"].as_str().unwrap().contains("Headset is gone; switching to the default"), "{gone}");
    // The switch itself takes a moment (opening a stream); speech resumes after it.
    std::thread::sleep(Duration::from_secs(1));
    say("room_feed");
    // 3. Plugged back in: her client takes it again.
    plug_headset(&sound);
    let back = alice.expect("the headset back", |e| e["event"] == "device" && e != &gone);
    println!("{back}");
    assert!(back["message"].as_str().unwrap().contains("Headset is back"), "{back}");
    std::thread::sleep(Duration::from_secs(1));
    say("headset_feed");
    alice.quit();
    bob.quit();
    let _ = monitor.kill();
    let _ = monitor.wait();

    let speech = read_voice(&speech_file).unwrap();
    let recording = read_raw(&output);
    let mixed = read_voice(&mix).unwrap();
    println!("bob's playback: {}", bob.seen_events("voice_stats")[0]["playback"]);
    let around = |samples: &[f32], span: &std::ops::Range<usize>| {
        samples[span.start.saturating_sub(4_800)..(span.end + 4_800).min(samples.len())].to_vec()
    };
    let (spans, played) = (loud_spans(&recording), loud_spans(&mixed));
    assert_eq!(spans.len(), 3, "the speech came through three times: {spans:?}");
    assert_eq!(played.len(), 3, "{played:?}");
    for (what, (span, mix_span)) in ["headset", "built-in", "headset again"].into_iter().zip(spans.iter().zip(&played))
    {
        let heard = compare(&speech, &around(&recording, span));
        // The speaker's own path: what bob's client played against what his speaker did.
        let device = compare(&around(&mixed, mix_span), &around(&recording, span));
        println!(
            "{what} at {:.1} s: {heard:?}; the speaker against the client's mix {device:?}",
            span.start as f64 / 48_000.0
        );
        // The voice tests' threshold (a clean call scores above 0.9): bob's speaker
        // played what went into the microphone alice's client was meant to use then,
        // and nothing came from the one it was not (the other feed is silent meanwhile).
        assert!(heard.correlation > 0.85, "{what}: {heard:?}");
        // And it played what the client gave it: the resampling to 44.1 kHz, the ring
        // and the keeper of its fill lose next to nothing (0.95-0.99 here).
        assert!(device.correlation > 0.9, "{what}: {device:?}");
    }
    let errors = alice.seen_events("error");
    assert!(errors.is_empty(), "{errors:?}");
}

/// The microphone test needs no server: `voipc mic-test` records what alice says into
/// her headset and plays it back through her speaker, and says what threshold her voice
/// suggests.
#[test]
#[ignore = "plays sound in real time: `just test` runs it alone, after the rest"]
fn the_microphone_test_plays_back_what_it_recorded_without_a_server() {
    let dir = tempfile::tempdir().unwrap();
    let sound = SoundServer::start();
    sound.load("module-null-sink", &["sink_name=headset_feed", "rate=48000"]);
    plug_headset(&sound);
    sound.load("module-null-sink", &["sink_name=alice_speaker", "rate=48000"]);
    let env = sound.env();
    let output = dir.path().join("alice_speaker.raw");
    let mut monitor = sound.record("alice_speaker.monitor", &output);
    let mut test = voipc()
        .env_clear()
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        // Always on the air, as in the call above: what is measured is the devices' path
        // and the recording, not where the gate opens.
        .args(["mic-test", "--input-device", "Headset", "--output-device", "alice_speaker"])
        .args(["--voice-mode", "always-on"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(test.stdout.take().unwrap()));
    let mut events: Vec<serde_json::Value> = Vec::new();
    // She speaks once the test has heard her microphone (its recording starts then).
    while events.last().is_none_or(|e| e["event"] != "level") {
        events.push(serde_json::from_str(&lines.next().expect("the microphone is heard").unwrap()).unwrap());
    }
    let speech_file = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/speech.wav");
    assert!(sound.play_on("headset_feed", &speech_file).wait().unwrap().success());
    events.extend(lines.map(|line| serde_json::from_str::<serde_json::Value>(&line.unwrap()).unwrap()));
    let status = test.wait().unwrap();
    let _ = monitor.kill();
    let _ = monitor.wait();
    assert!(status.success(), "{status:?}");
    let phases: Vec<&str> =
        events.iter().filter(|e| e["event"] == "phase").map(|e| e["phase"].as_str().unwrap()).collect();
    assert_eq!(phases, ["recording", "playing", "idle"], "{events:?}");
    assert!(events.iter().any(|e| e["event"] == "talking" && e["on"] == true), "on the air");
    let suggested = events.iter().find(|e| e["event"] == "suggested_threshold").unwrap();
    println!("suggested: {suggested}");
    let threshold = suggested["dbfs"].as_f64().expect("her voice stood out from the silence");
    assert!((-80.0..=-10.0).contains(&threshold), "{suggested}");

    // The speaker played what she said, scored as in the call above.
    let recording = read_raw(&output);
    let spans = loud_spans(&recording);
    assert_eq!(spans.len(), 1, "played back once: {spans:?}");
    let span = &spans[0];
    let played = &recording[span.start.saturating_sub(4_800)..(span.end + 4_800).min(recording.len())];
    let speech = read_voice(&speech_file).unwrap();
    let heard = compare(&speech, played);
    let playback = events.iter().find(|e| e["event"] == "playback_stats").map(|e| e["stats"].clone());
    println!("played back {:.1} s: {heard:?}; {}", span.len() as f64 / 48_000.0, playback.unwrap_or_default());
    assert!(heard.correlation > 0.85, "{heard:?}");
}
