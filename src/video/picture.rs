//! Pictures between capture, FFmpeg, files and the screen: captured BGRA scaled to the
//! share's size as YUV 4:2:0 (swscale), decoded frames as RGBA for showing, and FFmpeg
//! frames to and from contiguous [`YuvFrame`]s.

use ffmpeg::format::Pixel;
use ffmpeg::frame;
use ffmpeg::software::scaling;
use ffmpeg_next as ffmpeg;

use super::codec::VideoError;
use super::y4m::YuvFrame;

/// A captured picture: 32-bit BGRA rows, `stride` bytes apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bgra {
    pub width: u32,
    pub height: u32,
    pub stride: usize,
    pub data: Vec<u8>,
}

/// A picture to show: 32-bit RGBA rows, packed.
#[derive(Clone, PartialEq, Eq)]
pub struct Rgba {
    pub width: u32,
    pub height: u32,
    pub data: Vec<u8>,
}

impl std::fmt::Debug for Rgba {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Rgba({}x{})", self.width, self.height)
    }
}

/// Copies `rows` rows of `width` bytes between buffers with their own strides.
fn copy_plane(src: &[u8], src_stride: usize, dst: &mut [u8], dst_stride: usize, width: usize, rows: usize) {
    for row in 0..rows {
        dst[row * dst_stride..row * dst_stride + width]
            .copy_from_slice(&src[row * src_stride..row * src_stride + width]);
    }
}

/// The plane sizes of a 4:2:0 picture: (width, height) of Y, then of U and V.
fn planes(width: u32, height: u32) -> [(usize, usize); 3] {
    let (cw, ch) = (width.div_ceil(2) as usize, height.div_ceil(2) as usize);
    [(width as usize, height as usize), (cw, ch), (cw, ch)]
}

/// An FFmpeg frame holding `yuv`.
pub fn to_ffmpeg(yuv: &YuvFrame) -> frame::Video {
    let mut out = frame::Video::new(Pixel::YUV420P, yuv.width, yuv.height);
    let mut at = 0;
    for (plane, (w, h)) in planes(yuv.width, yuv.height).into_iter().enumerate() {
        let stride = out.stride(plane);
        copy_plane(&yuv.data[at..], w, out.data_mut(plane), stride, w, h);
        at += w * h;
    }
    out
}

/// The picture of a YUV 4:2:0 FFmpeg frame, planes made contiguous.
pub fn from_ffmpeg(frame: &frame::Video) -> YuvFrame {
    let (width, height) = (frame.width(), frame.height());
    let mut data = vec![0; YuvFrame::len_for(width, height)];
    let mut at = 0;
    for (plane, (w, h)) in planes(width, height).into_iter().enumerate() {
        copy_plane(frame.data(plane), frame.stride(plane), &mut data[at..], w, w, h);
        at += w * h;
    }
    YuvFrame { width, height, data }
}

/// Converts pictures of any size and pixel format to one size and format (YUV 4:2:0
/// unless made with [`Scaler::rgba`]), making its swscale context again only when what
/// comes in changes.
pub struct Scaler {
    to: (u32, u32),
    context: Option<(Pixel, u32, u32, scaling::Context)>,
    out: frame::Video,
}

impl Scaler {
    pub fn new(width: u32, height: u32) -> Self {
        Self::to_format(Pixel::YUV420P, width, height)
    }

    /// One that makes RGBA, for showing.
    pub fn rgba(width: u32, height: u32) -> Self {
        Self::to_format(Pixel::RGBA, width, height)
    }

    fn to_format(format: Pixel, width: u32, height: u32) -> Self {
        Scaler { to: (width, height), context: None, out: frame::Video::new(format, width, height) }
    }

    pub fn size(&self) -> (u32, u32) {
        self.to
    }

    /// `input` scaled and converted.
    pub fn scale(&mut self, input: &frame::Video) -> Result<&mut frame::Video, VideoError> {
        let key = (input.format(), input.width(), input.height());
        if self.context.as_ref().is_none_or(|(f, w, h, _)| (*f, *w, *h) != key) {
            // Bilinear: sharp enough for text at these ratios, and cheap.
            let context = scaling::Context::get(
                key.0,
                key.1,
                key.2,
                self.out.format(),
                self.to.0,
                self.to.1,
                scaling::Flags::FAST_BILINEAR,
            )?;
            self.context = Some((key.0, key.1, key.2, context));
        }
        let (.., context) = self.context.as_mut().expect("made above");
        context.run(input, &mut self.out)?;
        Ok(&mut self.out)
    }

    /// `input` as a packed RGBA picture (a scaler made with [`Scaler::rgba`]).
    pub fn to_rgba(&mut self, input: &frame::Video) -> Result<Rgba, VideoError> {
        let out = self.scale(input)?;
        let (width, height) = (out.width(), out.height());
        let row = width as usize * 4;
        let mut data = vec![0; row * height as usize];
        copy_plane(out.data(0), out.stride(0), &mut data, row, row, height as usize);
        Ok(Rgba { width, height, data })
    }

    /// A captured BGRA picture, scaled.
    pub fn scale_bgra(&mut self, bgra: &Bgra) -> Result<&mut frame::Video, VideoError> {
        let mut input = frame::Video::new(Pixel::BGRA, bgra.width, bgra.height);
        let stride = input.stride(0);
        copy_plane(&bgra.data, bgra.stride, input.data_mut(0), stride, bgra.width as usize * 4, bgra.height as usize);
        self.scale(&input)
    }
}

/// The share's size for a picture of `width` × `height` at `height_wanted` lines: the
/// same shape, never larger than the source, both sides even (4:2:0 needs them so).
pub fn share_size(width: u32, height: u32, height_wanted: u32) -> (u32, u32) {
    let h = height_wanted.min(height).max(2);
    let w = (u64::from(width) * u64::from(h) / u64::from(height.max(1))) as u32;
    (w.max(2) & !1, h & !1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_survive_the_trip_through_ffmpeg_with_any_stride() {
        ffmpeg::init().unwrap();
        for (w, h) in [(33, 17), (64, 36), (2, 2)] {
            let data = (0..YuvFrame::len_for(w, h)).map(|i| (i * 7) as u8).collect();
            let yuv = YuvFrame { width: w, height: h, data };
            assert_eq!(from_ffmpeg(&to_ffmpeg(&yuv)), yuv);
        }
    }

    #[test]
    fn the_share_keeps_the_shape_and_never_upscales() {
        assert_eq!(share_size(1920, 1080, 720), (1280, 720));
        assert_eq!(share_size(1280, 720, 1080), (1280, 720));
        assert_eq!(share_size(1366, 768, 480), (852, 480));
        assert_eq!(share_size(1001, 601, 1080), (1000, 600));
    }

    #[test]
    fn bgra_scales_to_yuv_with_the_right_levels() {
        ffmpeg::init().unwrap();
        // White, then black, halves.
        let (w, h) = (64u32, 32u32);
        let mut data = vec![0u8; (w * h * 4) as usize];
        for (i, px) in data.chunks_mut(4).enumerate() {
            let white = (i as u32 % w) < w / 2;
            px.copy_from_slice(if white { &[255, 255, 255, 255] } else { &[0, 0, 0, 255] });
        }
        let mut scaler = Scaler::new(32, 16);
        let out =
            from_ffmpeg(scaler.scale_bgra(&Bgra { width: w, height: h, stride: (w * 4) as usize, data }).unwrap());
        let luma = out.luma();
        assert!(luma[0] > 230 && luma[31] < 25, "{} {}", luma[0], luma[31]);
    }

    #[test]
    fn decoded_pictures_show_as_packed_rgba() {
        ffmpeg::init().unwrap();
        // A mid-grey 4:2:0 picture with an odd width (padded rows in FFmpeg's frame).
        let (w, h) = (33u32, 8u32);
        let mut data = vec![128u8; YuvFrame::len_for(w, h)];
        data[..(w * h) as usize].fill(126);
        let rgba = Scaler::rgba(w, h).to_rgba(&to_ffmpeg(&YuvFrame { width: w, height: h, data })).unwrap();
        assert_eq!((rgba.width, rgba.height, rgba.data.len()), (w, h, (w * h * 4) as usize));
        for px in rgba.data.chunks(4) {
            assert!(px[..3].iter().all(|c| c.abs_diff(128) <= 4) && px[3] == 255, "{px:?}");
        }
    }
}
