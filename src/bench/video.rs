//! `voipc bench video`: for each HEVC encoder that opens here and each resolution, how
//! fast it encodes screen content (frames a second, and as a multiple of real time at
//! 30 fps), the bitrate it kept, and the luma PSNR of the decoded frames against what
//! went in; the whole sender and receiver path in one process (scale, encode, seal,
//! fragment, reassemble, open, decode) as capture-to-picture time; and, beside them as
//! the baseline, how fast the screen itself can be captured (with a display).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use ffmpeg_next::format::Pixel;
use serde_json::json;

use crate::protocol::Resolution;
use crate::protocol::fragment::Reassembler;
use crate::protocol::{ChannelId, MediaHeader, SessionId};
use crate::session::media::MediaKeys;
use crate::video::adapt::start_bitrate;
use crate::video::capture::{Source, X11Capture};
use crate::video::codec::{ENCODER_ORDER, EncoderSettings, HevcDecoder, proven_encoder};
use crate::video::picture::{Bgra, Scaler, from_ffmpeg, share_size};
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

pub fn run(window: Duration, json: bool) -> anyhow::Result<()> {
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
        println!("{}", json!({"cases": cases, "unavailable": unavailable, "capture_fps": capture.as_ref().ok()}));
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
