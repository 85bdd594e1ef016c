//! HEVC through FFmpeg: the encoder, chosen by trying each in order until one really
//! encodes, and the decoder. Both are set for the least delay: no B-frames, keyframes
//! only when asked for, slice threads only, and parameter sets repeated in every keyframe
//! (the global-header flag is never set), so a viewer can start at any keyframe. The
//! bitrate is held to the share's over any [`VBV_SECONDS`], which lets a keyframe be as
//! large as a sharp page of text needs (see there).

use ffmpeg::codec::{self, threading};
use ffmpeg::format::Pixel;
use ffmpeg::{Dictionary, Packet, Rational, decoder, encoder, frame, picture};
use ffmpeg_next as ffmpeg;

/// Hardware encoders first, then the software one. Each is tried by opening it and
/// encoding a real frame with a keyframe asked for: a driver can list an encoder and
/// still fail.
pub const ENCODER_ORDER: [&str; 5] = ["hevc_nvenc", "hevc_qsv", "hevc_amf", "hevc_vaapi", "libx265"];

/// A keyframe group so long it never ends on its own (about 18 minutes at 30 fps):
/// keyframes come when a viewer asks.
const ENDLESS_GOP: u32 = i16::MAX as u32;

#[derive(Debug, thiserror::Error)]
pub enum VideoError {
    #[error("this FFmpeg has no encoder named {0:?}")]
    NoSuchEncoder(String),
    #[error("{name} did not open: {reason}")]
    Open { name: String, reason: String },
    #[error("{0} encoded no keyframe when asked for one")]
    NoKeyframe(String),
    #[error("no HEVC encoder works here: {0}")]
    NoneWorks(String),
    #[error("FFmpeg has no HEVC decoder")]
    NoDecoder,
    #[error("a frame of {got_w}x{got_h} for an encoder of {want_w}x{want_h}")]
    FrameSize { got_w: u32, got_h: u32, want_w: u32, want_h: u32 },
    #[error("FFmpeg: {0}")]
    Ffmpeg(#[from] ffmpeg::Error),
}

/// What an encoder is opened for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncoderSettings {
    pub width: u32,
    pub height: u32,
    pub fps: u32,
    /// Bits per second, held constant.
    pub bitrate: u32,
}

/// Each encoder's own low-latency options, by the names FFmpeg 5.1 gives them. Any that
/// an encoder does not know are left over after opening and logged (never dropped
/// silently).
pub fn encoder_options(name: &str) -> Vec<(&'static str, String)> {
    let pairs: &[(&'static str, &str)] = match name {
        "hevc_nvenc" => &[
            ("preset", "p1"),
            ("tune", "ull"),
            ("zerolatency", "1"),
            ("delay", "0"),
            ("rc", "cbr"),
            ("forced-idr", "1"),
            ("surfaces", "1"),
        ],
        "hevc_qsv" => &[("async_depth", "1"), ("low_power", "1"), ("forced_idr", "1")],
        "hevc_amf" => &[
            ("usage", "ultralowlatency"),
            ("quality", "speed"),
            ("rc", "cbr"),
            ("header_insertion_mode", "idr"),
            ("gops_per_idr", "1"),
            ("filler_data", "0"),
        ],
        "hevc_vaapi" => &[("low_power", "1"), ("async_depth", "1"), ("rc_mode", "CBR")],
        "libx265" => &[
            ("preset", "ultrafast"),
            ("tune", "zerolatency"),
            ("forced-idr", "1"),
            // ultrafast's smallest coding unit is 16x16, which smears text (a keyframe of a
            // page of text: 17 dB at 16, 30 dB at 8 on the same budget, measured here);
            // vbv-init=1 starts with the buffer full, so the first keyframe is sharp too.
            ("x265-params", "keyint=-1:repeat-headers=1:info=0:log-level=error:min-cu-size=8:vbv-init=1"),
        ],
        _ => &[],
    };
    pairs.iter().map(|(k, v)| (*k, (*v).to_owned())).collect()
}

/// The rate-control (VBV) buffer, in seconds of the bitrate: the bitrate holds over any
/// window this long, and a single frame may take up to this much.
///
/// Game streamers use one frame's worth at tens of Mbit/s. At a share's 0.4-5 Mbit/s a
/// keyframe of a page of text held to one frame is unreadable (17-20 dB measured here at
/// 480p, 680 kbit/s). With two seconds it takes what it needs (a dense page at 480p: about
/// 55 kB, 0.65 s of that bitrate, 40 dB) and the mostly unchanged frames after it stay
/// small, so the average still holds. The price: on a link no faster than the share, such
/// a keyframe takes that long to arrive.
pub const VBV_SECONDS: u32 = 2;

/// The VBV buffer in bits.
fn vbv_bits(settings: &EncoderSettings) -> u32 {
    settings.bitrate.saturating_mul(VBV_SECONDS)
}

/// One encoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedFrame {
    pub data: Vec<u8>,
    pub keyframe: bool,
}

pub struct HevcEncoder {
    name: String,
    settings: EncoderSettings,
    encoder: encoder::video::Encoder,
    next_pts: i64,
    packet: Packet,
}

impl HevcEncoder {
    /// Opens encoder `name`; options it did not take are logged.
    pub fn open(name: &str, settings: EncoderSettings) -> Result<Self, VideoError> {
        ffmpeg::init()?;
        let codec = encoder::find_by_name(name).ok_or_else(|| VideoError::NoSuchEncoder(name.to_owned()))?;
        let mut video = codec::Context::new_with_codec(codec).encoder().video()?;
        video.set_width(settings.width);
        video.set_height(settings.height);
        video.set_format(Pixel::YUV420P);
        let fps = i32::try_from(settings.fps.max(1)).unwrap_or(30);
        video.set_time_base(Rational::new(1, fps));
        video.set_frame_rate(Some(Rational::new(fps, 1)));
        video.set_max_b_frames(0);
        video.set_gop(ENDLESS_GOP);
        video.set_flags(codec::Flags::LOW_DELAY | codec::Flags::CLOSED_GOP);
        video.set_threading(threading::Config { kind: threading::Type::Slice, ..Default::default() });
        video.set_bit_rate(settings.bitrate as usize);
        video.set_max_bit_rate(settings.bitrate as usize);
        // SAFETY: the context is allocated and not yet opened; these are plain fields
        // that ffmpeg-next has no setter for.
        unsafe {
            let ctx = video.as_mut_ptr();
            (*ctx).rc_min_rate = i64::from(settings.bitrate);
            let vbv = i32::try_from(vbv_bits(&settings)).unwrap_or(i32::MAX);
            (*ctx).rc_buffer_size = vbv;
            // Start with the buffer full: the first keyframe may use all of it.
            (*ctx).rc_initial_buffer_occupancy = vbv;
        }
        let mut options = Dictionary::new();
        for (key, value) in encoder_options(name) {
            options.set(key, &value);
        }
        // Opened by hand rather than with `open_as_with`, which drops the options the
        // encoder left over: those are what it did not understand.
        // SAFETY: `options.disown()` hands the dictionary to FFmpeg, which may replace it;
        // `Dictionary::own` takes back whatever it returned.
        let (result, left) = unsafe {
            let mut raw = options.disown();
            let result = ffmpeg::ffi::avcodec_open2(video.as_mut_ptr(), codec.as_ptr(), &mut raw);
            (result, Dictionary::own(raw))
        };
        if result < 0 {
            let reason = ffmpeg::Error::from(result).to_string();
            return Err(VideoError::Open { name: name.to_owned(), reason });
        }
        for (key, value) in left.iter() {
            tracing::warn!("{name} did not take the option {key}={value}");
        }
        let encoder = encoder::video::Encoder(video);
        Ok(HevcEncoder { name: name.to_owned(), settings, encoder, next_pts: 0, packet: Packet::empty() })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn settings(&self) -> EncoderSettings {
        self.settings
    }

    /// Encodes one YUV 4:2:0 frame of the encoder's size, as a keyframe if `keyframe`;
    /// what the encoder gives back is appended to `out` (with these settings, one frame
    /// for each frame in).
    pub fn encode(
        &mut self,
        yuv: &mut frame::Video,
        keyframe: bool,
        out: &mut Vec<EncodedFrame>,
    ) -> Result<(), VideoError> {
        let (w, h) = (self.settings.width, self.settings.height);
        if yuv.width() != w || yuv.height() != h || yuv.format() != Pixel::YUV420P {
            return Err(VideoError::FrameSize { got_w: yuv.width(), got_h: yuv.height(), want_w: w, want_h: h });
        }
        yuv.set_pts(Some(self.next_pts));
        self.next_pts += 1;
        yuv.set_kind(if keyframe { picture::Type::I } else { picture::Type::None });
        self.encoder.send_frame(yuv)?;
        loop {
            match self.encoder.receive_packet(&mut self.packet) {
                Ok(()) => out.push(EncodedFrame {
                    data: self.packet.data().unwrap_or_default().to_vec(),
                    keyframe: self.packet.is_key(),
                }),
                Err(ffmpeg::Error::Other { errno: ffmpeg::error::EAGAIN } | ffmpeg::Error::Eof) => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// The first of `candidates` that `attempt` makes work, with why each before it failed.
/// Kept apart from FFmpeg so that the order and the fallback are tested on their own.
pub fn first_that_works<T>(
    candidates: &[&str],
    mut attempt: impl FnMut(&str) -> Result<T, VideoError>,
) -> Result<(T, Vec<(String, String)>), VideoError> {
    let mut failures = Vec::new();
    for name in candidates {
        match attempt(name) {
            Ok(found) => return Ok((found, failures)),
            Err(e) => failures.push(((*name).to_owned(), e.to_string())),
        }
    }
    let why = failures.iter().map(|(n, e)| format!("{n}: {e}")).collect::<Vec<_>>().join("; ");
    Err(VideoError::NoneWorks(why))
}

/// Opens encoder `name` and proves it: one grey frame encoded with a keyframe asked for
/// must come back as a keyframe. The proven encoder is kept (its next keyframe is the
/// first real frame's, asked for by the caller).
pub fn proven_encoder(name: &str, settings: EncoderSettings) -> Result<HevcEncoder, VideoError> {
    let mut encoder = HevcEncoder::open(name, settings)?;
    let mut grey = frame::Video::new(Pixel::YUV420P, settings.width, settings.height);
    for plane in 0..3 {
        grey.data_mut(plane).fill(128);
    }
    let mut out = Vec::new();
    encoder.encode(&mut grey, true, &mut out)?;
    if out.first().is_some_and(|f| f.keyframe && !f.data.is_empty()) {
        Ok(encoder)
    } else {
        Err(VideoError::NoKeyframe(name.to_owned()))
    }
}

/// The encoder to share with: `forced` if given (failing clearly if it does not work),
/// else the first of [`ENCODER_ORDER`] that works. The failures are logged.
pub fn choose_encoder(forced: Option<&str>, settings: EncoderSettings) -> Result<HevcEncoder, VideoError> {
    if let Some(name) = forced {
        return proven_encoder(name, settings);
    }
    let (encoder, failures) = first_that_works(&ENCODER_ORDER, |name| proven_encoder(name, settings))?;
    for (name, why) in failures {
        tracing::info!("screen share: {name} is not available: {why}");
    }
    Ok(encoder)
}

/// The most pixels a decoded picture may have: 3840×2160, room for a 1080-line share of
/// a 32:9 screen. A sharer's parameter sets name any size up to what HEVC allows (a few
/// bytes can declare 16 384 × 8 704), and each such picture would cost every viewer
/// hundreds of MB to decode, convert and show: FFmpeg refuses larger ones.
pub const MAX_DECODED_PIXELS: u32 = 3840 * 2160;

/// The HEVC decoder, for the least delay: low-delay flag, slice threads only (frame
/// threads would hold frames back).
pub struct HevcDecoder {
    decoder: decoder::Video,
    frame: frame::Video,
}

impl HevcDecoder {
    pub fn new() -> Result<Self, VideoError> {
        ffmpeg::init()?;
        let codec = decoder::find(codec::Id::HEVC).ok_or(VideoError::NoDecoder)?;
        let mut context = codec::Context::new_with_codec(codec);
        context.set_flags(codec::Flags::LOW_DELAY);
        context.set_threading(threading::Config { kind: threading::Type::Slice, ..Default::default() });
        // SAFETY: the context is allocated and not yet opened; a plain field.
        unsafe { (*context.as_mut_ptr()).max_pixels = i64::from(MAX_DECODED_PIXELS) };
        let decoder = context.decoder().open_as(codec)?.video()?;
        Ok(HevcDecoder { decoder, frame: frame::Video::empty() })
    }

    /// Decodes one whole encoded frame; `None` when the decoder wants more first. A
    /// frame the decoder flags as damaged is an error: it is never shown.
    pub fn decode(&mut self, data: &[u8]) -> Result<Option<&frame::Video>, VideoError> {
        self.decoder.send_packet(&Packet::copy(data))?;
        match self.decoder.receive_frame(&mut self.frame) {
            Ok(()) if self.frame.is_corrupt() || self.frame.has_decode_errors() => {
                Err(ffmpeg::Error::InvalidData.into())
            }
            Ok(())
                if u64::from(self.frame.width()) * u64::from(self.frame.height()) > u64::from(MAX_DECODED_PIXELS) =>
            {
                Err(ffmpeg::Error::InvalidData.into())
            }
            Ok(()) => Ok(Some(&self.frame)),
            Err(ffmpeg::Error::Other { errno: ffmpeg::error::EAGAIN }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> EncoderSettings {
        EncoderSettings { width: 320, height: 192, fps: 30, bitrate: 500_000 }
    }

    #[test]
    fn the_probe_takes_the_first_that_works_in_order_and_says_why_the_others_did_not() {
        let mut tried = Vec::new();
        let (found, failures) = first_that_works(&ENCODER_ORDER, |name| {
            tried.push(name.to_owned());
            if name == "hevc_vaapi" { Ok(name.to_owned()) } else { Err(VideoError::NoKeyframe(name.to_owned())) }
        })
        .unwrap();
        assert_eq!(found, "hevc_vaapi");
        assert_eq!(tried, ["hevc_nvenc", "hevc_qsv", "hevc_amf", "hevc_vaapi"]);
        assert_eq!(failures.len(), 3);
        assert!(failures[0].1.contains("hevc_nvenc"));
        let none = first_that_works::<()>(&ENCODER_ORDER, |n| Err(VideoError::NoSuchEncoder(n.into()))).unwrap_err();
        assert!(none.to_string().contains("libx265"), "{none}");
    }

    #[test]
    fn every_encoder_has_low_latency_options() {
        for name in ENCODER_ORDER {
            assert!(!encoder_options(name).is_empty(), "{name}");
        }
        let x265 = encoder_options("libx265");
        assert!(
            x265.iter().any(|(k, v)| *k == "x265-params" && v.contains("keyint=-1") && v.contains("repeat-headers=1"))
        );
        assert!(x265.iter().any(|(k, v)| *k == "x265-params" && v.contains("min-cu-size=8")), "sharp text");
        assert_eq!(vbv_bits(&settings()), 2 * 500_000);
    }

    /// On this machine (no GPU) the hardware encoders fail with a reason and libx265
    /// is the one chosen; a forced encoder that cannot open fails clearly.
    #[test]
    fn the_real_probe_falls_back_to_libx265_and_a_forced_encoder_fails_clearly() {
        let chosen = choose_encoder(None, settings()).unwrap();
        assert_eq!(chosen.name(), "libx265");
        let Err(forced) = choose_encoder(Some("hevc_amf_nonexistent"), settings()) else { panic!("opened") };
        assert!(matches!(forced, VideoError::NoSuchEncoder(_)), "{forced}");
    }

    /// Encoded frames decode to the same picture, close enough, and a keyframe comes
    /// when asked for and only then.
    #[test]
    fn frames_round_trip_and_keyframes_come_on_request() {
        let mut encoder = choose_encoder(Some("libx265"), settings()).unwrap();
        let mut decoder = HevcDecoder::new().unwrap();
        let mut out = Vec::new();
        let mut decoded = 0;
        for i in 0..10u32 {
            let mut frame = frame::Video::new(Pixel::YUV420P, 320, 192);
            let stride = frame.stride(0);
            for (y, row) in frame.data_mut(0).chunks_mut(stride).enumerate() {
                for (x, px) in row.iter_mut().enumerate() {
                    *px = ((x + y + i as usize * 4) % 200) as u8 + 20;
                }
            }
            frame.data_mut(1).fill(128);
            frame.data_mut(2).fill(128);
            out.clear();
            encoder.encode(&mut frame, i == 0 || i == 6, &mut out).unwrap();
            assert_eq!(out.len(), 1, "one frame out for one in");
            assert_eq!(out[0].keyframe, i == 0 || i == 6, "frame {i}");
            if let Some(picture) = decoder.decode(&out[0].data).unwrap() {
                assert_eq!((picture.width(), picture.height()), (320, 192));
                decoded += 1;
            }
        }
        assert!(decoded >= 9, "decoded {decoded}");
    }

    /// A sharer that sends a picture larger than any share gets an error, not a
    /// picture (nor the memory it would take).
    #[test]
    fn a_picture_larger_than_any_share_is_refused() {
        let (width, height) = (4096, 2304);
        let huge = EncoderSettings { width, height, fps: 5, bitrate: 500_000 };
        let mut encoder = HevcEncoder::open("libx265", huge).unwrap();
        let mut frame = frame::Video::new(Pixel::YUV420P, width, height);
        for plane in 0..3 {
            frame.data_mut(plane).fill(100);
        }
        let mut out = Vec::new();
        encoder.encode(&mut frame, true, &mut out).unwrap();
        let mut decoder = HevcDecoder::new().unwrap();
        assert!(decoder.decode(&out[0].data).is_err(), "{}x{} decoded", width, height);
        // The same decoder still takes a stream of a sane size afterwards.
        let mut encoder = choose_encoder(Some("libx265"), settings()).unwrap();
        let mut small = frame::Video::new(Pixel::YUV420P, 320, 192);
        small.data_mut(0).fill(90);
        out.clear();
        encoder.encode(&mut small, true, &mut out).unwrap();
        assert!(decoder.decode(&out[0].data).unwrap().is_some());
    }
}
