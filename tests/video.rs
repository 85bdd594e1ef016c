//! Screen share through the real binary and a real server: HEVC encoded by libx265,
//! sealed, fragmented, forwarded only to who watches, decoded and recorded.

use std::path::Path;

use serde_json::Value;
use voipc::video::y4m::{Y4mReader, Y4mWriter, YuvFrame, psnr};

use crate::support::{Impairer, TestClient, TestServer};

const W: u32 = 848;
const H: u32 = 480;
const FRAMES: u32 = 30;
const FPS: u32 = 10;

/// A page of text: words of dark one-pixel strokes on a light background (about a quarter
/// of each character cell inked, as in real text), with one line that changes from frame
/// to frame and a box that moves.
fn screen_clip(path: &Path) -> Vec<YuvFrame> {
    let mut frames = Vec::new();
    for i in 0..FRAMES {
        let mut data = vec![128u8; YuvFrame::len_for(W, H)];
        let luma = &mut data[..(W * H) as usize];
        luma.fill(235);
        let mut set = |x: u32, y: u32, v: u8| luma[(y * W + x) as usize] = v;
        for line in 0..18u32 {
            let mut k = line * 977 + if line == 3 { i } else { 0 };
            let mut col = 0;
            while col < 100 {
                k = k.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                let word = 2 + (k >> 16) % 7;
                for c in 0..word.min(100 - col) {
                    let (x0, y0, bits) = (10 + (col + c) * 8, 16 + line * 22, k >> (c * 3 % 16));
                    // Two or three of: left and right stems, top, middle and bottom bars.
                    for stroke in 0..5 {
                        if (bits >> stroke) & 1 == 0 && stroke != (bits % 5) {
                            continue;
                        }
                        for t in 0..12 {
                            match stroke {
                                0 => set(x0, y0 + t, 30),
                                1 => set(x0 + 5, y0 + t, 30),
                                2 if t < 6 => set(x0 + t, y0, 30),
                                3 if t < 6 => set(x0 + t, y0 + 6, 30),
                                4 if t < 6 => set(x0 + t, y0 + 11, 30),
                                _ => {}
                            }
                        }
                    }
                }
                col += word + 1;
            }
        }
        let bx = (i * 24) % (W - 60);
        for y in 410..470 {
            for x in bx..bx + 60 {
                set(x, y, 60);
            }
        }
        frames.push(YuvFrame { width: W, height: H, data });
    }
    let mut writer = Y4mWriter::new(std::fs::File::create(path).unwrap(), W, H, FPS).unwrap();
    for frame in &frames {
        writer.write(frame).unwrap();
    }
    frames
}

/// Every recorded frame's luma PSNR against the source frame it is closest to, printed
/// as `COUNT WHAT, Y-PSNR worst …, median …, best … dB`.
fn scored(recording: &Path, source: &[YuvFrame], what: &str) -> Vec<f64> {
    let scores: Vec<f64> = recorded_frames(recording, source).into_iter().map(|(_, score)| score).collect();
    let (worst, median, best) = summary(&scores);
    println!("{} {what}, Y-PSNR worst {worst:.1}, median {median:.1}, best {best:.1} dB", scores.len());
    scores
}

/// Each recorded frame's closest source frame (its index in the clip) and Y-PSNR against it.
fn recorded_frames(recording: &Path, source: &[YuvFrame]) -> Vec<(usize, f64)> {
    let mut reader = Y4mReader::new(std::io::BufReader::new(std::fs::File::open(recording).unwrap())).unwrap();
    assert_eq!((reader.width, reader.height), (source[0].width, source[0].height), "recorded at the share's size");
    let mut frames = Vec::new();
    while let Some(frame) = reader.next_frame().unwrap() {
        let scores = source.iter().map(|s| psnr(s.luma(), frame.luma())).enumerate();
        frames.push(scores.fold((0, 0.0), |best, (i, score)| if score > best.1 { (i, score) } else { best }));
    }
    frames
}

/// The most source frames in a row that a recording of the looping clip skipped, and
/// after which recorded frame.
fn longest_skip(frames: &[(usize, f64)], clip_len: usize) -> (usize, usize) {
    let skips = frames.windows(2).map(|w| (w[1].0 + clip_len - w[0].0 - 1) % clip_len);
    skips.enumerate().map(|(at, skip)| (skip, at)).max().unwrap_or((0, 0))
}

/// The worst, the median and the best of the scores.
fn summary(scores: &[f64]) -> (f64, f64, f64) {
    let mut sorted = scores.to_vec();
    sorted.sort_by(f64::total_cmp);
    let at = |i: usize| sorted.get(i).copied().unwrap_or(0.0);
    (at(0), at(sorted.len() / 2), at(sorted.len().saturating_sub(1)))
}

/// The figures of `client`'s `video_stats` event.
fn video_stats(client: &TestClient) -> Value {
    client.seen_events("video_stats").first().map(|v| v["stats"].clone()).unwrap_or(Value::Null)
}

/// The media counters of `client`'s `voice_stats` event.
fn voice_media(client: &TestClient) -> Value {
    client.seen_events("voice_stats").first().map(|v| v["media"].clone()).unwrap_or(Value::Null)
}

fn share_args(clip: &Path, seconds: &str) -> Vec<String> {
    let clip = clip.to_str().unwrap().to_owned();
    ["--share-screen", &clip, "--share-resolution", "480p", "--share-fps", "10", "--encoder", "libx265"]
        .into_iter()
        .map(str::to_owned)
        .chain(["--duration".to_owned(), seconds.to_owned()])
        .collect()
}

/// Alice shares; bob watches and records; carol, in the channel, and dave, elsewhere,
/// receive nothing of it; erin's voice to frank keeps its packets while it runs.
#[test]
#[ignore = "encodes video in real time: `just test` runs it alone, after the rest"]
fn a_shared_screen_reaches_its_viewer_whole_and_no_one_else() {
    let dir = tempfile::tempdir().unwrap();
    let config = "[[channels]]\nname = \"Lobby\"\n\n[[channels]]\nname = \"Elsewhere\"\n";
    let server = TestServer::start(dir.path(), Some(config));
    let clip = dir.path().join("clip.y4m");
    let source = screen_clip(&clip);
    let recording = dir.path().join("bob.y4m");
    let speech = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/speech.wav");

    let record = ["--watch", "alice", "--record-screen", recording.to_str().unwrap(), "--duration", "16"];
    let mut bob = TestClient::join(&server.invite, "bob", &record);
    bob.expect_joined("Lobby");
    let mut carol = TestClient::join(&server.invite, "carol", &["--duration", "16"]);
    carol.expect_joined("Lobby");
    let mut dave = TestClient::join(&server.invite, "dave", &["--channel", "Elsewhere", "--duration", "16"]);
    dave.expect_joined("Elsewhere");
    let mut frank = TestClient::join(&server.invite, "frank", &["--duration", "16"]);
    frank.expect_joined("Lobby");
    let args = share_args(&clip, "12");
    let mut alice = TestClient::join(&server.invite, "alice", &args.iter().map(String::as_str).collect::<Vec<_>>());
    let started = alice.expect_event("share_started");
    assert_eq!(
        (started["encoder"].as_str(), started["width"].as_u64(), started["height"].as_u64()),
        (Some("libx265"), Some(848), Some(480))
    );
    let mut erin = TestClient::join(&server.invite, "erin", &["--play", speech.to_str().unwrap(), "--duration", "11"]);
    erin.expect_joined("Lobby");
    bob.expect("watching alice", |e| e["event"] == "watching" && e["user"] == "alice" && e["watching"] == true);
    alice.expect("a viewer", |e| e["event"] == "viewers" && e["count"] == 1);
    for client in [&mut alice, &mut erin, &mut bob, &mut carol, &mut dave, &mut frank] {
        assert!(client.wait().success());
    }

    let sent = video_stats(&alice);
    let watched = video_stats(&bob);
    println!("alice {sent}\nbob {watched}");
    assert!(watched["frames_decoded"].as_u64().unwrap() >= 40, "{watched}");
    assert_eq!(watched["decode_errors"], 0);
    assert!(carol.seen_events("video_stats").is_empty(), "carol watched nothing and got nothing");
    assert!(dave.seen_events("video_stats").is_empty(), "dave is elsewhere");
    let scores = scored(&recording, &source, "frames recorded");
    // Every frame shown is sharp, the first keyframe too (the target: 35 dB).
    assert!(scores.len() >= 40 && summary(&scores).0 >= 35.0, "{scores:?}");
    // Voice beside the share.
    let (erin_sent, frank_opened) =
        (voice_media(&erin)["sent"].as_f64().unwrap(), voice_media(&frank)["opened"].as_f64().unwrap());
    assert!(erin_sent > 200.0 && frank_opened / erin_sent >= 0.99, "{frank_opened} of {erin_sent}");
}

/// Through 5 % loss: frames with a lost fragment are never shown, the viewer asks for a
/// keyframe and gets it, and the picture keeps coming.
#[test]
#[ignore = "encodes video in real time: `just test` runs it alone, after the rest"]
fn a_lossy_link_never_shows_a_corrupt_frame_and_recovers_by_keyframe() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), None);
    let lossy = Impairer::start(&server.addr, &["--loss", "0.05", "--seed", "12"]);
    let clip = dir.path().join("clip.y4m");
    let source = screen_clip(&clip);
    let recording = dir.path().join("bob.y4m");
    let record = [
        "--fingerprint",
        &server.fingerprint,
        "--watch",
        "alice",
        "--record-screen",
        recording.to_str().unwrap(),
        "--duration",
        "16",
    ];
    let mut bob = TestClient::join(&lossy.addr, "bob", &record);
    bob.expect_joined("Lobby");
    let args = share_args(&clip, "12");
    let mut alice = TestClient::join(&server.invite, "alice", &args.iter().map(String::as_str).collect::<Vec<_>>());
    alice.expect_event("share_started");
    assert!(alice.wait().success());
    assert!(bob.wait().success());
    let sent = video_stats(&alice);
    let watched = video_stats(&bob);
    println!("alice {sent}\nbob {watched}");
    // The recovery fragments rebuild most frames through 5 % loss, so how often the viewer
    // must ask again varies from run to run (0-3 times here); asking after a loss is
    // shown step by step on the virtual clock (`screen::a_lost_fragment_…`).
    assert!(sent["keyframes_requested"].as_u64().unwrap() >= 1, "the new viewer's request: {sent}");
    assert!(sent["keyframes"].as_u64().unwrap() >= 1, "answered: {sent}");
    assert_eq!(watched["decode_errors"], 0, "{watched}");
    let frames = recorded_frames(&recording, &source);
    let scores: Vec<f64> = frames.iter().map(|(_, score)| *score).collect();
    let (worst, median, best) = summary(&scores);
    let (skip, skip_at) = longest_skip(&frames, source.len());
    println!(
        "{} frames recorded through 5 % loss, Y-PSNR worst {worst:.1}, median {median:.1}, best {best:.1} dB; \
         at most {skip} frames in a row not shown (after recorded frame {skip_at})",
        scores.len()
    );
    // No frame with a lost fragment reached the decoder (it never errs); the recovery
    // fragments rebuild most frames, so the picture keeps coming, and mostly sharp (a
    // keyframe soon after another is blurry: the first one spent the rate buffer); every
    // frame shown is the source's picture, never something else (a flat frame scores
    // about 7 dB against this page).
    assert!(scores.len() >= 40, "the picture kept coming: {} frames", scores.len());
    assert!(median >= 35.0 && worst >= 15.0, "{scores:?}");
    // Back soon: the sender goes no lower than 5 fps, so k frames skipped in a row are
    // an outage of at most (k + 1) / 5 s. Runs here skipped 0-5 while a new viewer's first
    // frames had no recovery fragments (the skips were all at the start of the watch), 0
    // in six runs since they have; a frame the code cannot rebuild (about one run in eight
    // at 5 % loss) still costs a wait for a keyframe. This holds the line at 2 s.
    assert!(skip <= 9, "{frames:?}");
}

/// An Xvfb display of `width` × `height` showing `pattern` (BGRA) as its root window's
/// background; killed on drop.
struct Display {
    child: std::process::Child,
    name: String,
    /// The connection that drew the background, held open: an X server whose last client
    /// leaves resets, and its root shows the default weave again.
    _painter: x11rb::rust_connection::RustConnection,
}

impl Display {
    fn start(number: u32, width: u16, height: u16, pattern: &[u8]) -> Display {
        use x11rb::connection::Connection;
        use x11rb::protocol::xproto::{ChangeWindowAttributesAux, ConnectionExt as _, CreateGCAux, ImageFormat};
        let name = format!(":{number}");
        let child = std::process::Command::new("Xvfb")
            .args([&name, "-screen", "0", &format!("{width}x{height}x24"), "-nolisten", "tcp", "-noreset"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("Xvfb runs (just setup installs it)");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let (conn, screen) = loop {
            match x11rb::connect(Some(&name)) {
                Ok(c) => break c,
                Err(e) if std::time::Instant::now() > deadline => panic!("Xvfb {name} did not come up: {e}"),
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(50)),
            }
        };
        let screen = &conn.setup().roots[screen];
        let (root, depth) = (screen.root, screen.root_depth);
        let pixmap = conn.generate_id().unwrap();
        conn.create_pixmap(depth, pixmap, root, width, height).unwrap();
        let gc = conn.generate_id().unwrap();
        conn.create_gc(gc, pixmap, &CreateGCAux::new()).unwrap();
        // In bands of rows: one request stays under the server's request size.
        let row = usize::from(width) * 4;
        for (band, rows) in pattern.chunks(row * 32).enumerate() {
            let h = (rows.len() / row) as u16;
            conn.put_image(ImageFormat::Z_PIXMAP, pixmap, gc, width, h, 0, (band * 32) as i16, 0, depth, rows).unwrap();
        }
        conn.change_window_attributes(root, &ChangeWindowAttributesAux::new().background_pixmap(pixmap)).unwrap();
        conn.clear_area(false, root, 0, 0, 0, 0).unwrap();
        conn.get_input_focus().unwrap().reply().unwrap();
        Display { child, name, _painter: conn }
    }
}

impl Drop for Display {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A desktop-like picture: a title bar, windows of text, a dark panel.
fn desktop(width: u16, height: u16) -> Vec<u8> {
    let (w, h) = (usize::from(width), usize::from(height));
    let mut bgra = vec![0u8; w * h * 4];
    for y in 0..h {
        for x in 0..w {
            let px = &mut bgra[(y * w + x) * 4..][..4];
            let in_window = (100..700).contains(&x) && (80..560).contains(&y);
            let glyph = in_window && y > 110 && (y / 4 + x / 3 * 7) % 5 < 2 && (y % 20) < 14 && (x % 9) < 7;
            let v: [u8; 3] = if y < 28 {
                [90, 60, 40]
            } else if glyph {
                [30, 30, 30]
            } else if in_window {
                [245, 245, 245]
            } else {
                [150, 110, 60]
            };
            px[..3].copy_from_slice(&v);
            px[3] = 255;
        }
    }
    bgra
}

/// Alice shares a real (virtual) X11 screen: bob's frames match a capture of it.
#[test]
#[ignore = "needs the machine to itself: `just test` runs it alone, after the rest"]
fn an_xvfb_screen_shared_matches_what_is_on_it() {
    use voipc::video::capture::Source;
    use voipc::video::picture::{Scaler, from_ffmpeg};
    use voipc::video::x11::X11Capture;
    let (width, height) = (1280u16, 720u16);
    let display = Display::start(50 + std::process::id() % 400, width, height, &desktop(width, height));
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), None);
    let recording = dir.path().join("bob.y4m");
    let record = ["--watch", "alice", "--record-screen", recording.to_str().unwrap(), "--duration", "12"];
    let mut bob = TestClient::join(&server.invite, "bob", &record);
    bob.expect_joined("Lobby");
    let share = [
        "--share-screen",
        "--share-resolution",
        "720p",
        "--share-fps",
        "10",
        "--encoder",
        "libx265",
        "--duration",
        "9",
    ];
    let mut alice = TestClient::join_with_env(&server.invite, "alice", &share, &[("DISPLAY", &display.name)]);
    let started = alice.expect_event("share_started");
    assert_eq!((started["width"].as_u64(), started["height"].as_u64()), (Some(1280), Some(720)));
    assert!(alice.wait().success());
    assert!(bob.wait().success());

    // The screen as this test captures it, in the share's format.
    let mut capture = X11Capture::open(Some(&display.name), &Source::Monitor(None)).unwrap();
    let reference = from_ffmpeg(Scaler::new(1280, 720).scale_bgra(&capture.capture().unwrap()).unwrap());
    let scores = scored(&recording, std::slice::from_ref(&reference), "frames of an Xvfb screen");
    // What this test checks is the capture: that every frame is this screen (a capture
    // with red and blue swapped scores 26.8 dB here, one a row off 19.1).
    // How sharp the frames are depends on the rung the share is on: when it steps down,
    // the keyframes at lower rungs are softer. One CI run recorded 45 frames in 9 s of
    // 10 fps asked, dipping to 36.9 and then 34.9 dB (a frame dropped at the pacer had
    // stepped it down; fixed since, `PACER_WAITING`). The sharpness target, 35 dB for
    // every frame, is the test of a shared clip's above, at 480p.
    let (worst, median, _) = summary(&scores);
    println!("alice {}", video_stats(&alice));
    assert!(scores.len() >= 30 && worst >= 30.0 && median >= 40.0, "{scores:?}");
}

/// A Wayland desktop's screen, shared through the ScreenCast portal and its PipeWire
/// stream (RGBx, so red and blue must be swapped on the way), matches the picture the
/// desktop shows; the portal's grant is kept in the vault, so the second share is not
/// asked for again.
#[test]
#[ignore = "starts a desktop of its own (D-Bus, PipeWire, the portal): `just test` runs it alone, after the rest"]
fn a_wayland_screen_is_shared_through_the_portal_and_asked_for_once() {
    use crate::support::screencast::{PATTERN, SIZE, ScreenCastDesktop};
    use voipc::video::picture::{Bgra, Scaler, from_ffmpeg};

    let desktop = ScreenCastDesktop::start();
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), None);
    let recording = dir.path().join("bob.y4m");
    let record = ["--watch", "alice", "--record-screen", recording.to_str().unwrap(), "--duration", "12"];
    let mut bob = TestClient::join(&server.invite, "bob", &record);
    bob.expect_joined("Lobby");
    let env = desktop.client_env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let alice_data = dir.path().join("alice");
    let share = ["--share-screen", "--share-resolution", "480p", "--share-fps", "10", "--encoder", "libx265"];
    let first = [&share[..], &["--duration", "7"]].concat();
    let mut alice = TestClient::join_with_data_and_env(&server.invite, "alice", &first, &alice_data, &env);
    let started = alice.expect_event("share_started");
    assert_eq!((started["width"].as_u64(), started["height"].as_u64()), (Some(852), Some(480)), "{}", desktop.logs());
    assert!(alice.wait().success());
    assert!(bob.wait().success());
    assert!(alice.seen_events("error").is_empty(), "{:?}", alice.seen_events("error"));

    // The desktop's picture, as GStreamer draws it, in the share's format.
    let raw = dir.path().join("picture.rgbx");
    let caps = format!("video/x-raw,format=RGBx,width={},height={}", SIZE.0, SIZE.1);
    let drawn = std::process::Command::new("gst-launch-1.0")
        .args(["-q", "videotestsrc", PATTERN, "num-buffers=1", "!", &caps, "!", "filesink"])
        .arg(format!("location={}", raw.display()))
        .status()
        .unwrap();
    assert!(drawn.success());
    let mut data = std::fs::read(&raw).unwrap();
    for px in data.chunks_exact_mut(4) {
        px.swap(0, 2);
    }
    let (width, height) = (SIZE.0 as u32, SIZE.1 as u32);
    let picture = Bgra { width, height, stride: width as usize * 4, data };
    let reference = from_ffmpeg(Scaler::new(852, 480).scale_bgra(&picture).unwrap());
    let scores = scored(&recording, std::slice::from_ref(&reference), "frames of the portal's stream");
    assert!(scores.len() >= 20 && summary(&scores).0 >= 35.0, "{scores:?}");
    let asked = desktop.asked_after_closing(1);
    assert_eq!((asked.dialogs, asked.restored, asked.closed), (1, 0, 1), "{asked:?}");

    // Again: the vault kept the grant, so the portal is handed it and does not ask.
    let again = [&share[..], &["--duration", "3"]].concat();
    let mut alice = TestClient::join_with_data_and_env(&server.invite, "alice", &again, &alice_data, &env);
    alice.expect_event("share_started");
    assert!(alice.wait().success());
    let asked = desktop.asked_after_closing(2);
    assert_eq!((asked.dialogs, asked.restored, asked.closed), (1, 1, 2), "{asked:?}");
}

/// A desktop's sound: a second of quiet (the application's stream opens before it plays,
/// as a player's does), three seconds of tone bursts of changing pitch and length, then
/// eight of quiet with the stream still open; a faint hiss (-51 dBFS) throughout, as in
/// any recording (digital silence would measure the codec's fade-outs instead).
fn desktop_sound(path: &Path) -> Vec<f32> {
    let rate = 48_000usize;
    let mut samples = vec![0.0f32; rate];
    let mut k = 7u32;
    while samples.len() < 4 * rate {
        k = k.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let (on, off) = (rate * (150 + (k >> 8) as usize % 250) / 1000, rate * (100 + (k >> 18) as usize % 200) / 1000);
        let pitch = 300.0 + ((k >> 4) % 900) as f32;
        let start = samples.len();
        samples.extend((0..on).map(|n| 0.3 * (std::f32::consts::TAU * pitch * (start + n) as f32 / rate as f32).sin()));
        samples.extend(std::iter::repeat_n(0.0, off));
    }
    samples.resize(12 * rate, 0.0);
    for s in &mut samples {
        k = k.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        *s += ((k >> 16) as f32 / 65_536.0 - 0.5) * 0.01;
    }
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: 48_000,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut writer = hound::WavWriter::create(path, spec).unwrap();
    for s in &samples {
        writer.write_sample((s * 32_767.0) as i16).unwrap();
    }
    writer.finalize().unwrap();
    samples
}

/// Seconds from the first to the last 10 ms of `samples` (48 kHz) louder than -40 dBFS.
fn loud_span(samples: &[f32]) -> f32 {
    let loud: Vec<usize> = samples
        .chunks(480)
        .enumerate()
        .filter(|(_, c)| voipc::audio::dsp::level_dbfs(c) > -40.0)
        .map(|(i, _)| i)
        .collect();
    match (loud.first(), loud.last()) {
        (Some(first), Some(last)) => (last - first + 1) as f32 / 100.0,
        _ => 0.0,
    }
}

/// Alice shares her desktop's sound through a real sound server: bob's recording of it
/// is what another application played, and carol's voice, which alice's client plays on
/// the same output while that application is quiet, is not in it (carol would hear
/// herself).
#[test]
#[ignore = "plays sound in real time: `just test` runs it alone, after the rest"]
fn desktop_audio_reaches_the_viewer_without_the_sharers_own_playback() {
    use voipc::audio::quality::compare;
    use voipc::audio::wav::read_voice;

    use crate::support::{SoundServer, read_raw};
    let dir = tempfile::tempdir().unwrap();
    let sound = SoundServer::start();
    let server = TestServer::start(dir.path(), None);
    let clip = dir.path().join("clip.y4m");
    screen_clip(&clip);
    let desktop_wav = dir.path().join("desktop.wav");
    let desktop = desktop_sound(&desktop_wav);
    let speech_wav = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/speech.wav");
    let heard = dir.path().join("bob-desktop.wav");

    let watch = ["--watch", "alice", "--record-screen-audio", heard.to_str().unwrap(), "--duration", "24"];
    let mut bob = TestClient::join(&server.invite, "bob", &watch);
    bob.expect_joined("Lobby");
    let clip = clip.to_str().unwrap();
    let share = ["--share-screen", clip, "--share-resolution", "480p", "--share-fps", "5", "--share-audio"];
    let env = sound.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let alice_args = [&share[..], &["--output-device", "default", "--duration", "20"]].concat();
    let mut alice = TestClient::join_with_env(&server.invite, "alice", &alice_args, &env);
    alice.expect_event("share_started");
    bob.expect("watching alice", |e| e["event"] == "watching" && e["watching"] == true);
    alice.expect("a viewer", |e| e["event"] == "viewers" && e["count"] == 1);

    // Another application plays; when it has gone quiet, carol talks and alice's client
    // plays her on the same output.
    let output = dir.path().join("output.raw");
    let mut monitor = sound.record_output(&output);
    let mut player = sound.play(&desktop_wav);
    std::thread::sleep(std::time::Duration::from_secs(4));
    let mut carol =
        TestClient::join(&server.invite, "carol", &["--play", speech_wav.to_str().unwrap(), "--duration", "8"]);
    carol.expect_joined("Lobby");
    assert!(player.wait().unwrap().success());
    carol.wait();
    let _ = monitor.kill();
    let _ = monitor.wait();
    alice.wait();
    bob.wait();

    for client in [&alice, &bob] {
        assert!(client.seen_events("error").is_empty(), "{:?}", client.seen_events("error"));
    }
    let sent = &alice.seen_events("video_stats")[0]["stats"];
    let received = bob.seen_events("video_stats")[0]["stats"]["audio_packets_received"].as_u64().unwrap();
    let shared = read_voice(&heard).unwrap();
    // Half a second into the application's quiet start: the share hears a stream from
    // at most a quarter of a second after it opens.
    let (played, application) = (loud_span(&read_raw(&output)), compare(&desktop[24_000..], &shared));
    eprintln!(
        "desktop audio: {received} packets received of {sent}; the application {application:?}; \
         sound on alice's output for {played:.2} s, in what she shared for {:.2} s",
        loud_span(&shared)
    );
    assert!(received >= 500, "the application's 12 s: {received}");
    // What must be there: the voice tests' threshold (a clean call scores above 0.9).
    assert!(application.correlation > 0.85, "{application:?}");
    // Carol played on alice's output after the application's sound, and none of it
    // was shared: the loud part of the share is the application's 3 s alone.
    assert!(played > loud_span(&desktop) + 2.0, "{played} s");
    assert!((loud_span(&shared) - loud_span(&desktop)).abs() < 0.2, "{} s", loud_span(&shared));
}
