//! `voipc bench video`: for each HEVC encoder that opens here and each resolution, how
//! fast it encodes screen content (frames a second, and as a multiple of real time at
//! 30 fps), the bitrate it kept, and the luma PSNR of the decoded frames against what
//! went in; the whole sender and receiver path in one process (scale, encode, seal,
//! fragment, reassemble, open, decode) as capture-to-picture time; and, beside them as
//! the baseline, how fast the screen itself can be captured (with a display); and
//! glass-to-glass delay through a real relay (with a display, see [`glass_to_glass`]).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;

use ffmpeg_next::format::Pixel;
use serde_json::json;

use crate::net::client::{JoinOptions, VoiceOptions, run_client};
use crate::net::screen::{PictureSink, ScreenOptions};
use crate::protocol::fragment::Reassembler;
use crate::protocol::{ChannelId, MediaHeader, Resolution, ServerLink, SessionId};
use crate::session::Event;
use crate::session::command::ShareRequest;
use crate::session::media::MediaKeys;
use crate::video::adapt::start_bitrate;
use crate::video::capture::Source;
use crate::video::codec::{ENCODER_ORDER, EncoderSettings, HevcDecoder, proven_encoder};
use crate::video::picture::{Bgra, Scaler, from_ffmpeg, share_size};
use crate::video::x11::X11Capture;
use crate::video::y4m::psnr;

const SOURCE: (u32, u32) = (1920, 1080);

/// A desktop at 1080p: windows of text on a background, one line of text that changes
/// and a box that moves (frame `i`).
fn desktop(i: u32) -> Bgra {
    let (w, h) = SOURCE;
    let mut data = vec![0u8; (w * h * 4) as usize];
    for y in 0..h {
        for x in 0..w {
            let at = ((y * w + x) * 4) as usize;
            let window = (160..1200).contains(&x) && (120..900).contains(&y);
            let line = y / 24;
            let shift = if line == 10 { i * 5 } else { 0 };
            let glyph = window && y > 150 && (y % 24) < 16 && (x % 11) < 8 && ((x / 11 + line * 7 + shift) % 6) < 4;
            let moving = (x + 1600 - (i * 16) % 1600) % 1600 < 120 && (950..1050).contains(&y);
            let v: [u8; 3] = match () {
                () if y < 32 => [90, 60, 40],
                () if moving => [40, 160, 240],
                () if glyph => [25, 25, 25],
                () if window => [248, 248, 248],
                () => [150, 110, 60],
            };
            data[at..at + 3].copy_from_slice(&v);
            data[at + 3] = 255;
        }
    }
    Bgra { width: w, height: h, stride: (w * 4) as usize, data }
}

struct Case {
    encoder: String,
    resolution: Resolution,
    width: u32,
    height: u32,
    fps: f64,
    kbps: f64,
    psnr_db: f64,
    capture_to_picture_ms: f64,
}

pub fn run(window: Duration, json: bool, glass: Result<GlassToGlass, String>) -> anyhow::Result<()> {
    let frames: Vec<Bgra> = (0..30).map(desktop).collect();
    let mut cases = Vec::new();
    let mut unavailable = Vec::new();
    for name in ENCODER_ORDER {
        for resolution in Resolution::ALL {
            let (width, height) = share_size(SOURCE.0, SOURCE.1, resolution.height());
            let settings = EncoderSettings { width, height, fps: 30, bitrate: start_bitrate(resolution, 30) };
            let mut encoder = match proven_encoder(name, settings) {
                Ok(e) => e,
                Err(e) => {
                    unavailable.push((name, e.to_string()));
                    break;
                }
            };
            cases.push(measure(&mut encoder, resolution, &frames, window)?);
        }
    }
    let capture = capture_rate(window);
    if json {
        let cases: Vec<_> = cases
            .iter()
            .map(|c| {
                json!({"encoder": c.encoder, "resolution": c.resolution.to_string(), "width": c.width, "height": c.height,
                       "fps": c.fps, "x_real_time_at_30fps": c.fps / 30.0, "kbps": c.kbps, "y_psnr_db": c.psnr_db,
                       "capture_to_picture_ms": c.capture_to_picture_ms})
            })
            .collect();
        let unavailable: Vec<_> = unavailable.iter().map(|(n, why)| json!({"encoder": n, "why": why})).collect();
        let glass = glass.as_ref().ok().map(|g| {
            json!({"encoder": g.encoder, "fps": g.fps, "markers": g.markers, "seen": g.seen, "median_ms": g.median_ms,
                   "p95_ms": g.p95_ms})
        });
        let capture = capture.as_ref().ok();
        println!(
            "{}",
            json!({"cases": cases, "unavailable": unavailable, "capture_fps": capture, "glass_to_glass": glass})
        );
        return Ok(());
    }
    println!("screen share: HEVC on 1080p desktop content scaled to each size, 30 fps asked");
    println!(
        "{:<10} {:>6} {:>10} {:>9} {:>8} {:>8} {:>12}",
        "encoder", "size", "fps", "x real", "kbit/s", "Y-PSNR", "capture->pic"
    );
    for c in &cases {
        println!(
            "{:<10} {:>6} {:>10.1} {:>8.2}x {:>8.0} {:>6.1}dB {:>10.1}ms",
            c.encoder,
            format!("{}x{}", c.width, c.height),
            c.fps,
            c.fps / 30.0,
            c.kbps,
            c.psnr_db,
            c.capture_to_picture_ms
        );
    }
    for (name, why) in &unavailable {
        println!("{name:<10} not available: {why}");
    }
    match capture {
        Ok(fps) => println!("baseline: raw X11 capture (MIT-SHM) of this display at {fps:.0} frames/s"),
        Err(why) => println!("baseline: no capture measured ({why})"),
    }
    match glass {
        Ok(g) => println!(
            "glass to glass through a loopback relay (720p, 30 fps asked, {}, voice beside it): median {:.0} ms, \
             p95 {:.0} ms ({} of {} markers seen), {:.1} frames/s decoded",
            g.encoder, g.median_ms, g.p95_ms, g.seen, g.markers, g.fps
        ),
        Err(why) => println!("glass to glass: not measured ({why})"),
    }
    Ok(())
}

/// Encodes the frames over and over for `window`, each through the whole path.
fn measure(
    encoder: &mut crate::video::codec::HevcEncoder,
    resolution: Resolution,
    frames: &[Bgra],
    window: Duration,
) -> anyhow::Result<Case> {
    let settings = encoder.settings();
    let mut scaler = Scaler::new(settings.width, settings.height);
    let mut decoder = HevcDecoder::new()?;
    let mut rng = rand::rng();
    let (me, channel) = (SessionId(1), ChannelId(1));
    let (mut alice, mut bob) = (MediaKeys::default(), MediaKeys::default());
    let share = alice.start_epoch(me, channel, &mut rng);
    bob.install(me, &share, channel, &mut VecDeque::new());
    let mut reassembler = Reassembler::new(me, Instant::now());
    let (mut count, mut bytes, mut psnr_sum, mut delay_sum) = (0u64, 0u64, 0.0, Duration::ZERO);
    let mut out = Vec::new();
    let start = Instant::now();
    while start.elapsed() < window || count == 0 {
        let captured = Instant::now();
        let input = scaler.scale_bgra(&frames[count as usize % frames.len()])?;
        let reference = from_ffmpeg(input);
        out.clear();
        encoder.encode(input, count == 0, &mut out)?;
        for frame in out.drain(..) {
            bytes += frame.data.len() as u64;
            let datagrams =
                alice.seal_screen(me, count as u32, 0, frame.keyframe, &frame.data, 0.0).expect("in a channel");
            for datagram in datagrams {
                let (header, _) = MediaHeader::parse(&datagram)?;
                let Some(sealed) = reassembler.push(Instant::now(), header, &datagram)? else { continue };
                reassembler.opened(sealed.shape.keyframe);
                let payload = bob.open_screen(&sealed, channel).expect("the frame opens");
                if let Some(picture) = decoder.decode(&payload)? {
                    debug_assert_eq!(picture.format(), Pixel::YUV420P);
                    delay_sum += captured.elapsed();
                    psnr_sum += psnr(reference.luma(), from_ffmpeg(picture).luma());
                }
            }
        }
        count += 1;
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok(Case {
        encoder: encoder.name().to_owned(),
        resolution,
        width: settings.width,
        height: settings.height,
        fps: count as f64 / seconds,
        // The bitrate at 30 fps: bytes per frame times 30.
        kbps: bytes as f64 * 8.0 / count as f64 * 30.0 / 1000.0,
        psnr_db: psnr_sum / count as f64,
        capture_to_picture_ms: delay_sum.as_secs_f64() * 1000.0 / count as f64,
    })
}

/// Raw captures a second of `$DISPLAY`'s primary monitor.
fn capture_rate(window: Duration) -> Result<f64, String> {
    let mut capture = X11Capture::open(None, &Source::Monitor(None)).map_err(|e| e.to_string())?;
    let start = Instant::now();
    let mut count = 0u32;
    while start.elapsed() < window || count == 0 {
        capture.capture().map_err(|e| e.to_string())?;
        count += 1;
    }
    Ok(f64::from(count) / start.elapsed().as_secs_f64())
}

/// Marker blocks painted on the screen for glass-to-glass: a white guard, 14 bits of the
/// marker's number, a black guard, each a square of this many pixels in a row at the top
/// left (48 on a 1080p screen are 32 in a 720p share, 21 in a 480p one).
const MARK_BLOCK: u32 = 48;
const MARK_BITS: u32 = 14;
/// Markers change this often: slower than a frame, so each is captured.
const MARK_EVERY: Duration = Duration::from_millis(150);

/// Glass-to-glass delay through a real relay: a `voipc serve` child and two real clients
/// in this process, alice sharing `$DISPLAY`'s primary monitor (a desktop of text windows
/// painted on it) at 720p and 30 fps with the first encoder that works while she talks
/// (voice encoding beside it), bob watching. Numbered markers are painted on the screen;
/// the delay is from the X server having drawn one to bob holding the first decoded
/// picture that shows it. Also the frames a second bob decoded meanwhile.
pub async fn glass_to_glass(window: Duration) -> anyhow::Result<GlassToGlass> {
    let (_server, line) =
        super::spawn_self(&["serve", "--listen", "127.0.0.1:0", "--ephemeral-cert", "--json"], None).await?;
    let link: ServerLink = super::json_field(&line, "invite")?.parse()?;
    let painter = MarkerPainter::open().context("glass-to-glass paints on $DISPLAY")?;
    let root_width = painter.width;
    let seen: Arc<Mutex<Vec<(u32, Instant)>>> = Arc::default();
    let pictures = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (seen_by_bob, pictures_bob) = (seen.clone(), pictures.clone());
    let show = PictureSink(Arc::new(move |_, picture| {
        pictures_bob.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(number) = read_marker(&picture, root_width) {
            seen_by_bob.lock().expect("no panics while held").push((number, Instant::now()));
        }
    }));
    let work = std::env::temp_dir().join(format!("voipc-glass-to-glass-{}", std::process::id()));
    let speech =
        crate::audio::wav::read_voice(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/speech.wav"))
            .context("glass-to-glass talks with assets/speech.wav: run it from the source tree")?;
    let talk = Arc::new(speech.repeat(8));
    let client = |name: &str, screen: ScreenOptions, voice: VoiceOptions| JoinOptions {
        link: link.clone(),
        replace_pin: None,
        bind: None,
        name: name.to_owned(),
        join: None,
        trust_on_first_use: false,
        data_dir: work.join(name),
        vault_password: zeroize::Zeroizing::new("glass to glass".to_owned()),
        say: None,
        voice,
        screen,
        duration: None,
        health: false,
        json: false,
    };
    let share = ShareRequest { source: None, resolution: Resolution::P720, fps: 30, audio: false };
    let talking = VoiceOptions { play: Some(talk), ..VoiceOptions::default() };
    let alice = client("alice", ScreenOptions { share: Some(share), ..ScreenOptions::default() }, talking);
    let watching = ScreenOptions { watch: Some("alice".into()), show: Some(show), ..ScreenOptions::default() };
    let bob = client("bob", watching, VoiceOptions::default());
    let encoder: Arc<Mutex<Option<String>>> = Arc::default();
    let started = encoder.clone();
    let (alice_commands, alice_rx) = tokio::sync::mpsc::channel(1);
    let (bob_commands, bob_rx) = tokio::sync::mpsc::channel(1);
    let alice = tokio::spawn(async move {
        run_client(alice, alice_rx, &mut |event| {
            if let Event::ShareStarted { encoder, .. } = event {
                *started.lock().expect("no panics while held") = Some(encoder.clone());
            }
        })
        .await
    });
    let bob = tokio::spawn(async move { run_client(bob, bob_rx, &mut |_| {}).await });
    // Until bob sees the screen (vaults made, keys exchanged, the first keyframe).
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut painted = std::collections::BTreeMap::new();
    let mut number = 0;
    while seen.lock().expect("no panics while held").is_empty() {
        anyhow::ensure!(Instant::now() < deadline, "bob saw no marker within 30 s");
        painted.insert(number, painter.paint(number)?);
        tokio::time::sleep(MARK_EVERY).await;
    }
    seen.lock().expect("no panics while held").clear();
    let start = Instant::now();
    let pictures_before = pictures.load(std::sync::atomic::Ordering::Relaxed);
    while start.elapsed() < window.max(Duration::from_secs(5)) {
        number = (number + 1) % (1 << MARK_BITS);
        painted.insert(number, painter.paint(number)?);
        tokio::time::sleep(MARK_EVERY).await;
    }
    let pictures = pictures.load(std::sync::atomic::Ordering::Relaxed) - pictures_before;
    let fps = pictures as f64 / start.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop((alice_commands, bob_commands));
    let _ = tokio::time::timeout(Duration::from_secs(5), async { (alice.await, bob.await) }).await;
    let _ = std::fs::remove_dir_all(&work);
    // The first picture showing each marker painted since the clear.
    let mut delays: Vec<f64> = Vec::new();
    let mut counted = std::collections::BTreeSet::new();
    for (number, at) in seen.lock().expect("no panics while held").iter() {
        if let Some(drawn) = painted.get(number).filter(|d| **d >= start && *at >= **d)
            && counted.insert(*number)
        {
            delays.push(at.duration_since(*drawn).as_secs_f64() * 1000.0);
        }
    }
    anyhow::ensure!(!delays.is_empty(), "bob saw none of the markers");
    delays.sort_by(f64::total_cmp);
    let at = |q: f64| delays[((delays.len() - 1) as f64 * q).round() as usize];
    let encoder = encoder.lock().expect("no panics while held").clone().unwrap_or_default();
    let (markers, seen) = (painted.values().filter(|drawn| **drawn >= start).count(), delays.len());
    Ok(GlassToGlass { encoder, fps, markers, seen, median_ms: at(0.5), p95_ms: at(0.95) })
}

pub struct GlassToGlass {
    pub encoder: String,
    /// Pictures bob decoded a second.
    pub fps: f64,
    pub markers: usize,
    pub seen: usize,
    pub median_ms: f64,
    pub p95_ms: f64,
}

/// Paints numbered markers on the root window of `$DISPLAY`.
struct MarkerPainter {
    conn: x11rb::rust_connection::RustConnection,
    root: u32,
    black: u32,
    white: u32,
    width: u32,
}

impl MarkerPainter {
    fn open() -> anyhow::Result<MarkerPainter> {
        use x11rb::connection::Connection;
        use x11rb::protocol::xproto::{ConnectionExt as _, CreateGCAux, ImageFormat};
        let (conn, screen) = x11rb::connect(None)?;
        let screen = &conn.setup().roots[screen];
        let (root, width, height) = (screen.root, screen.width_in_pixels, screen.height_in_pixels);
        let (black, white) = (conn.generate_id()?, conn.generate_id()?);
        conn.create_gc(black, root, &CreateGCAux::new().foreground(screen.black_pixel))?;
        conn.create_gc(white, root, &CreateGCAux::new().foreground(screen.white_pixel))?;
        // The desktop, cut to the screen, in bands of rows (a request has a size limit).
        if screen.root_depth == 24 {
            let picture = desktop(0);
            let (w, h) = (u32::from(width).min(picture.width), u32::from(height).min(picture.height));
            for y0 in (0..h).step_by(32) {
                let rows = (y0..(y0 + 32).min(h)).flat_map(|y| {
                    let at = (y * picture.width * 4) as usize;
                    picture.data[at..at + (w * 4) as usize].iter().copied()
                });
                let band: Vec<u8> = rows.collect();
                let rows = (band.len() as u32 / (w * 4)) as u16;
                conn.put_image(ImageFormat::Z_PIXMAP, root, white, w as u16, rows, 0, y0 as i16, 0, 24, &band)?;
            }
        }
        Ok(MarkerPainter { conn, root, black, white, width: u32::from(width) })
    }

    /// Paints marker `number` and returns when the X server has drawn it.
    fn paint(&self, number: u32) -> anyhow::Result<Instant> {
        use x11rb::protocol::xproto::{ConnectionExt as _, Rectangle};
        let block = |i: u32| Rectangle {
            x: (i * MARK_BLOCK) as i16,
            y: 0,
            width: MARK_BLOCK as u16,
            height: MARK_BLOCK as u16,
        };
        let ones = (0..MARK_BITS).filter(|bit| number >> bit & 1 == 1).map(|bit| block(bit + 1));
        let zeros = (0..MARK_BITS).filter(|bit| number >> bit & 1 == 0).map(|bit| block(bit + 1));
        let white: Vec<_> = std::iter::once(block(0)).chain(ones).collect();
        let black: Vec<_> = std::iter::once(block(MARK_BITS + 1)).chain(zeros).collect();
        self.conn.poly_fill_rectangle(self.root, self.white, &white)?;
        self.conn.poly_fill_rectangle(self.root, self.black, &black)?;
        // A round trip: everything before it has been drawn.
        self.conn.get_input_focus()?.reply()?;
        Ok(Instant::now())
    }
}

/// The marker number a picture of a `root_width`-wide screen shows, if it shows one.
fn read_marker(picture: &crate::video::picture::Rgba, root_width: u32) -> Option<u32> {
    let scale = f64::from(picture.width) / f64::from(root_width);
    let bright = |i: u32| -> Option<bool> {
        let centre = ((f64::from(i * MARK_BLOCK + MARK_BLOCK / 2)) * scale) as u32;
        let y = (f64::from(MARK_BLOCK / 2) * scale) as u32;
        let at = ((y * picture.width + centre) * 4) as usize;
        let px = picture.data.get(at..at + 3)?;
        let luma = (u32::from(px[0]) + u32::from(px[1]) + u32::from(px[2])) / 3;
        // A block half-way between two markers (neither black nor white) reads as none.
        match luma {
            0..=60 => Some(false),
            196.. => Some(true),
            _ => None,
        }
    };
    if bright(0)? && !bright(MARK_BITS + 1)? {
        (0..MARK_BITS).try_fold(0, |n, bit| Some(n | u32::from(bright(bit + 1)?) << bit))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::video::picture::Rgba;

    /// A 1280×720 picture of a 1920-wide screen showing marker `number` the way
    /// `MarkerPainter::paint` draws it, and a grey background; `grey` blocks are mid-grey
    /// (a picture caught between two markers).
    fn picture(number: u32, grey: &[u32]) -> Rgba {
        let (width, height) = (1280u32, 720u32);
        let mut data = vec![128u8; (width * height * 4) as usize];
        let scale = 1280.0 / 1920.0;
        for block in 0..MARK_BITS + 2 {
            let value = match block {
                _ if grey.contains(&block) => 128,
                0 => 255,
                b if b == MARK_BITS + 1 => 0,
                b if number >> (b - 1) & 1 == 1 => 255,
                _ => 0,
            };
            let (x0, x1) =
                ((f64::from(block * MARK_BLOCK) * scale) as u32, (f64::from((block + 1) * MARK_BLOCK) * scale) as u32);
            for y in 0..(f64::from(MARK_BLOCK) * scale) as u32 {
                for x in x0..x1 {
                    let at = ((y * width + x) * 4) as usize;
                    data[at..at + 3].fill(value);
                }
            }
        }
        Rgba { width, height, data }
    }

    #[test]
    fn markers_read_back_from_a_scaled_picture_and_a_torn_one_reads_as_none() {
        for number in [0, 1, 0b10_1010_1010_1010, (1 << MARK_BITS) - 1] {
            assert_eq!(read_marker(&picture(number, &[]), 1920), Some(number));
        }
        assert_eq!(read_marker(&picture(5, &[3]), 1920), None, "a block between black and white");
        assert_eq!(read_marker(&picture(5, &[0]), 1920), None, "no white guard: no marker");
        let plain = Rgba { width: 1280, height: 720, data: vec![200; 1280 * 720 * 4] };
        assert_eq!(read_marker(&plain, 1920), None, "a desktop with no marker");
        let tiny = Rgba { width: 8, height: 8, data: vec![255; 8 * 8 * 4] };
        assert_eq!(read_marker(&tiny, 1920), None);
    }
}
