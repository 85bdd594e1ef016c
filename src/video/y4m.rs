//! YUV4MPEG2 files of 4:2:0 frames: what `--share-screen FILE.y4m` reads and
//! `--record-screen FILE.y4m` writes, and the luma PSNR the tests and the bench compare
//! frames with. A file is read within bounds: a header line of at most
//! [`MAX_HEADER`] bytes and a picture of at most [`MAX_SIDE`] pixels each way.

use std::io::{BufRead, Read, Write};

/// The longest header line read.
pub const MAX_HEADER: usize = 1024;
/// The largest width or height read.
pub const MAX_SIDE: u32 = 8192;

#[derive(Debug, thiserror::Error)]
pub enum Y4mError {
    #[error("not a YUV4MPEG2 file")]
    NotY4m,
    #[error("the Y4M header is longer than {MAX_HEADER} bytes")]
    HeaderTooLong,
    #[error("the Y4M header has no usable {0}")]
    Field(&'static str),
    #[error("only 4:2:0 Y4M is read, not C{0}")]
    Colorspace(String),
    #[error("a frame header is not FRAME")]
    FrameHeader,
    #[error("the file ends inside a frame")]
    Truncated,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// One 4:2:0 picture in three contiguous planes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct YuvFrame {
    pub width: u32,
    pub height: u32,
    /// Y (width × height), then U and V (each half size, rounded up).
    pub data: Vec<u8>,
}

impl YuvFrame {
    pub fn len_for(width: u32, height: u32) -> usize {
        let (cw, ch) = (width.div_ceil(2) as usize, height.div_ceil(2) as usize);
        width as usize * height as usize + 2 * cw * ch
    }

    pub fn luma(&self) -> &[u8] {
        &self.data[..self.width as usize * self.height as usize]
    }
}

/// Reads frames from a Y4M stream.
pub struct Y4mReader<R> {
    input: R,
    pub width: u32,
    pub height: u32,
    /// Frames per second, as the header says (rounded; at least 1).
    pub fps: u32,
}

fn read_line_bounded(input: &mut impl BufRead) -> Result<Vec<u8>, Y4mError> {
    let mut line = Vec::new();
    input.take(MAX_HEADER as u64 + 1).read_until(b'\n', &mut line)?;
    if line.len() > MAX_HEADER {
        return Err(Y4mError::HeaderTooLong);
    }
    if line.pop() != Some(b'\n') {
        return Err(Y4mError::Truncated);
    }
    Ok(line)
}

impl<R: BufRead> Y4mReader<R> {
    pub fn new(mut input: R) -> Result<Self, Y4mError> {
        let line = read_line_bounded(&mut input).map_err(|e| match e {
            Y4mError::Truncated => Y4mError::NotY4m,
            e => e,
        })?;
        let line = String::from_utf8(line).map_err(|_| Y4mError::NotY4m)?;
        let mut fields = line.split(' ');
        if fields.next() != Some("YUV4MPEG2") {
            return Err(Y4mError::NotY4m);
        }
        let (mut width, mut height, mut fps) = (None, None, 30);
        for field in fields {
            // The tag is the first character, which need not be ASCII in a file from disk.
            let mut chars = field.chars();
            let (tag, value) = (chars.next(), chars.as_str());
            match tag {
                Some('W') => width = value.parse().ok().filter(|w| (1..=MAX_SIDE).contains(w)),
                Some('H') => height = value.parse().ok().filter(|h| (1..=MAX_SIDE).contains(h)),
                Some('F') => {
                    let (n, d) = value.split_once(':').ok_or(Y4mError::Field("frame rate"))?;
                    let (n, d): (u32, u32) = (n.parse().unwrap_or(0), d.parse().unwrap_or(0));
                    if n == 0 || d == 0 {
                        return Err(Y4mError::Field("frame rate"));
                    }
                    fps = (n as f64 / d as f64).round().max(1.0) as u32;
                }
                Some('C') if !value.starts_with("420") => return Err(Y4mError::Colorspace(value.to_owned())),
                _ => {}
            }
        }
        let width = width.ok_or(Y4mError::Field("width"))?;
        let height = height.ok_or(Y4mError::Field("height"))?;
        Ok(Y4mReader { input, width, height, fps })
    }

    /// The next frame, or `None` at the end of the file.
    pub fn next_frame(&mut self) -> Result<Option<YuvFrame>, Y4mError> {
        if self.input.fill_buf()?.is_empty() {
            return Ok(None);
        }
        let line = read_line_bounded(&mut self.input)?;
        if !line.starts_with(b"FRAME") {
            return Err(Y4mError::FrameHeader);
        }
        // Read as it comes rather than allocated from the header's size: a short file that
        // claims a huge picture costs only what it holds.
        let len = YuvFrame::len_for(self.width, self.height);
        let mut data = Vec::new();
        (&mut self.input).take(len as u64).read_to_end(&mut data)?;
        if data.len() < len {
            return Err(Y4mError::Truncated);
        }
        Ok(Some(YuvFrame { width: self.width, height: self.height, data }))
    }
}

/// Writes frames to a Y4M stream.
pub struct Y4mWriter<W> {
    output: W,
    width: u32,
    height: u32,
}

impl<W: Write> Y4mWriter<W> {
    pub fn new(mut output: W, width: u32, height: u32, fps: u32) -> Result<Self, Y4mError> {
        writeln!(output, "YUV4MPEG2 W{width} H{height} F{fps}:1 Ip A1:1 C420jpeg")?;
        Ok(Y4mWriter { output, width, height })
    }

    /// Writes a frame; one of another size is refused (a Y4M file has one size).
    pub fn write(&mut self, frame: &YuvFrame) -> Result<(), Y4mError> {
        if (frame.width, frame.height) != (self.width, self.height) {
            return Err(Y4mError::Field("size: the frame's differs from the file's"));
        }
        self.output.write_all(b"FRAME\n")?;
        self.output.write_all(&frame.data)?;
        Ok(())
    }

    pub fn flush(&mut self) -> Result<(), Y4mError> {
        Ok(self.output.flush()?)
    }
}

/// Peak signal-to-noise ratio of two 8-bit planes of one size, in dB (`inf` when equal).
pub fn psnr(a: &[u8], b: &[u8]) -> f64 {
    assert_eq!(a.len(), b.len(), "planes of one size");
    let squared: u64 = a.iter().zip(b).map(|(x, y)| u64::from(x.abs_diff(*y)).pow(2)).sum();
    if squared == 0 {
        return f64::INFINITY;
    }
    let mse = squared as f64 / a.len() as f64;
    10.0 * (255.0f64 * 255.0 / mse).log10()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(width: u32, height: u32, seed: u8) -> YuvFrame {
        let data = (0..YuvFrame::len_for(width, height)).map(|i| (i as u8).wrapping_mul(seed)).collect();
        YuvFrame { width, height, data }
    }

    #[test]
    fn frames_round_trip_through_a_file() {
        let mut file = Vec::new();
        let mut writer = Y4mWriter::new(&mut file, 33, 17, 30).unwrap();
        let frames = [frame(33, 17, 3), frame(33, 17, 7)];
        for f in &frames {
            writer.write(f).unwrap();
        }
        assert!(writer.write(&frame(32, 17, 1)).is_err());
        let mut reader = Y4mReader::new(&file[..]).unwrap();
        assert_eq!((reader.width, reader.height, reader.fps), (33, 17, 30));
        assert_eq!(reader.next_frame().unwrap().as_ref(), Some(&frames[0]));
        assert_eq!(reader.next_frame().unwrap().as_ref(), Some(&frames[1]));
        assert!(reader.next_frame().unwrap().is_none());
    }

    #[test]
    fn bad_files_are_typed_errors_and_bounded() {
        let err = |bytes: &[u8]| Y4mReader::new(bytes).err().unwrap().to_string();
        assert!(err(b"RIFF....\n").contains("not a YUV4MPEG2"));
        assert!(err(b"YUV4MPEG2 W10\n").contains("height"));
        assert!(err(b"YUV4MPEG2 W10 H99999\n").contains("height"));
        assert!(err(b"YUV4MPEG2 W10 H10 C444\n").contains("4:2:0"));
        assert!(err(b"YUV4MPEG2 W10 H10 F0:1\n").contains("frame rate"));
        let long = [b"YUV4MPEG2 ".to_vec(), vec![b'X'; 2000]].concat();
        assert!(err(&long).contains("longer"));
        let mut truncated = b"YUV4MPEG2 W4 H4 F25:1\nFRAME\n".to_vec();
        truncated.extend([0; 10]);
        let mut reader = Y4mReader::new(&truncated[..]).unwrap();
        assert!(matches!(reader.next_frame(), Err(Y4mError::Truncated)));
        let mut wrong = Y4mReader::new(&b"YUV4MPEG2 W4 H4\nFRAMX\n"[..]).unwrap();
        assert!(matches!(wrong.next_frame(), Err(Y4mError::FrameHeader)));
    }

    #[test]
    fn psnr_is_infinite_for_equal_planes_and_falls_with_noise() {
        let a: Vec<u8> = (0..1000).map(|i| (i % 200) as u8).collect();
        assert_eq!(psnr(&a, &a), f64::INFINITY);
        let b: Vec<u8> = a.iter().map(|x| x + 1).collect();
        let c: Vec<u8> = a.iter().map(|x| x + 4).collect();
        assert!(psnr(&a, &b) > psnr(&a, &c));
        assert!((psnr(&a, &c) - 10.0 * (65025.0f64 / 16.0).log10()).abs() < 1e-9);
    }
}
