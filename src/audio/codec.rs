//! Opus for voice: 20 ms mono frames at 48 kHz, in-band FEC with a loss hint, at a
//! constant bitrate: every packet of a talk spurt has the same size, so that whoever sees
//! packet lengths (the relay included) cannot tell sounds apart by them (RFC 6562). No
//! DTX either: inside a spurt, silence is sent at the same size as speech.
//!
//! A screen share's desktop audio is Opus too: 20 ms stereo frames, music-grade, at a
//! constant bitrate for the same reason.

use super::{FRAME_20MS, SAMPLE_RATE, STEREO_20MS};

/// Desktop audio's bitrate: stereo music at 96 kbit/s is about transparent.
pub const DESKTOP_BITRATE: i32 = 96_000;

/// The largest Opus packet we produce (Opus's own limit for one frame is 1275 bytes).
pub const MAX_PACKET: usize = 1275;

#[derive(Debug, thiserror::Error)]
#[error("opus: {0}")]
pub struct CodecError(#[from] opus::Error);

/// How the voice encoder runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncoderSettings {
    pub bitrate: i32,
    /// 0 (fastest) to 10 (best).
    pub complexity: i32,
    /// The loss the encoder plans its in-band FEC for, in percent. FEC needs it above 0.
    pub loss_hint_percent: i32,
}

impl Default for EncoderSettings {
    fn default() -> Self {
        EncoderSettings { bitrate: 48_000, complexity: 10, loss_hint_percent: 10 }
    }
}

pub struct VoiceEncoder {
    encoder: opus::Encoder,
    packet: Box<[u8; MAX_PACKET]>,
}

impl VoiceEncoder {
    pub fn new(settings: EncoderSettings) -> Result<VoiceEncoder, CodecError> {
        let mut encoder = opus::Encoder::new(SAMPLE_RATE, opus::Channels::Mono, opus::Application::Voip)?;
        encoder.set_bitrate(opus::Bitrate::Bits(settings.bitrate))?;
        encoder.set_complexity(settings.complexity)?;
        encoder.set_inband_fec(true)?;
        encoder.set_packet_loss_perc(settings.loss_hint_percent.max(1))?;
        encoder.set_vbr(false)?;
        encoder.set_dtx(false)?;
        encoder.set_signal(opus::Signal::Voice)?;
        Ok(VoiceEncoder { encoder, packet: Box::new([0; MAX_PACKET]) })
    }

    /// Encodes 20 ms into a packet of the constant size the bitrate gives.
    pub fn encode(&mut self, pcm: &[f32; FRAME_20MS]) -> Result<&[u8], CodecError> {
        let len = self.encoder.encode_float(pcm, &mut self.packet[..])?;
        Ok(&self.packet[..len])
    }

    /// Tells the encoder how much loss to plan FEC for (from the receivers' reports).
    pub fn set_loss_hint(&mut self, percent: i32) -> Result<(), CodecError> {
        Ok(self.encoder.set_packet_loss_perc(percent.clamp(1, 100))?)
    }
}

pub struct VoiceDecoder {
    decoder: opus::Decoder,
}

impl VoiceDecoder {
    pub fn new() -> Result<VoiceDecoder, CodecError> {
        Ok(VoiceDecoder { decoder: opus::Decoder::new(SAMPLE_RATE, opus::Channels::Mono)? })
    }

    /// Decodes one packet into 20 ms.
    pub fn decode(&mut self, packet: &[u8], out: &mut [f32; FRAME_20MS]) -> Result<(), CodecError> {
        self.decode_into(packet, out, false)
    }

    /// Rebuilds the frame before `next_packet` from the FEC data that `next_packet` carries.
    pub fn recover(&mut self, next_packet: &[u8], out: &mut [f32; FRAME_20MS]) -> Result<(), CodecError> {
        self.decode_into(next_packet, out, true)
    }

    /// Packet loss concealment: 20 ms that continue what came before, fading out.
    pub fn conceal(&mut self, out: &mut [f32; FRAME_20MS]) -> Result<(), CodecError> {
        self.decode_into(&[], out, false)
    }

    fn decode_into(&mut self, packet: &[u8], out: &mut [f32; FRAME_20MS], fec: bool) -> Result<(), CodecError> {
        let samples = self.decoder.decode_float(packet, out, fec)?;
        // A shorter packet (2.5-10 ms, never sent by us) leaves the rest silent.
        out[samples.min(FRAME_20MS)..].fill(0.0);
        Ok(())
    }
}

/// Opus for a screen share's desktop audio: 20 ms of interleaved stereo a packet.
pub struct StereoEncoder {
    encoder: opus::Encoder,
    packet: Box<[u8; MAX_PACKET]>,
}

impl StereoEncoder {
    pub fn new() -> Result<StereoEncoder, CodecError> {
        let mut encoder = opus::Encoder::new(SAMPLE_RATE, opus::Channels::Stereo, opus::Application::Audio)?;
        encoder.set_bitrate(opus::Bitrate::Bits(DESKTOP_BITRATE))?;
        encoder.set_vbr(false)?;
        encoder.set_inband_fec(true)?;
        encoder.set_packet_loss_perc(5)?;
        Ok(StereoEncoder { encoder, packet: Box::new([0; MAX_PACKET]) })
    }

    pub fn encode(&mut self, pcm: &[f32; STEREO_20MS]) -> Result<&[u8], CodecError> {
        let len = self.encoder.encode_float(pcm, &mut self.packet[..])?;
        Ok(&self.packet[..len])
    }
}

/// Decodes desktop audio back to interleaved stereo (a voice decoder takes the same
/// packets and mixes them down to mono).
pub struct StereoDecoder {
    decoder: opus::Decoder,
}

impl StereoDecoder {
    pub fn new() -> Result<StereoDecoder, CodecError> {
        Ok(StereoDecoder { decoder: opus::Decoder::new(SAMPLE_RATE, opus::Channels::Stereo)? })
    }

    /// One packet into 20 ms, or with no packet 20 ms that continue what came before.
    pub fn decode(&mut self, packet: Option<&[u8]>, out: &mut [f32; STEREO_20MS]) -> Result<(), CodecError> {
        let frames = self.decoder.decode_float(packet.unwrap_or_default(), out, false)?;
        out[(2 * frames).min(STEREO_20MS)..].fill(0.0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A voiced, speech-like signal whose pitch and loudness change at frame `change`:
    /// concealment can only continue the old sound, FEC data carries the new one.
    fn voiced(frames: usize, change: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(frames * FRAME_20MS);
        let (mut f1, mut f2) = ([0.0f32; 2], [0.0f32; 2]);
        for n in 0..frames * FRAME_20MS {
            let (period, gain) = if n < change * FRAME_20MS { (400, 0.02) } else { (230, 0.05) };
            let pulse = if n % period == 0 { 1.0 } else { 0.0 };
            let y1 = pulse + 1.8 * 0.97 * f1[0] - 0.97 * 0.97 * f1[1];
            f1 = [y1, f1[0]];
            let y2 = y1 * 0.1 + 1.2 * 0.95 * f2[0] - 0.95 * 0.95 * f2[1];
            f2 = [y2, f2[0]];
            out.push((y2 * gain).clamp(-0.9, 0.9));
        }
        out
    }

    #[test]
    fn fec_rebuilds_a_lost_frame_closer_than_concealment() {
        let lost = 30;
        let source = voiced(50, lost);
        let mut encoder = VoiceEncoder::new(EncoderSettings { loss_hint_percent: 20, ..Default::default() }).unwrap();
        let packets: Vec<Vec<u8>> =
            source.chunks_exact(FRAME_20MS).map(|c| encoder.encode(c.try_into().unwrap()).unwrap().to_vec()).collect();
        assert!(packets.iter().all(|p| p.len() > 2 && p.len() <= 200), "48 kbps is about 120 bytes a frame");
        // What the receiver would have played had nothing been lost.
        let decode_until_lost = || {
            let mut decoder = VoiceDecoder::new().unwrap();
            let mut out = [0.0; FRAME_20MS];
            for packet in &packets[..lost] {
                decoder.decode(packet, &mut out).unwrap();
            }
            decoder
        };
        let mut reference = [0.0; FRAME_20MS];
        decode_until_lost().decode(&packets[lost], &mut reference).unwrap();
        let error = |out: &[f32; FRAME_20MS]| out.iter().zip(&reference).map(|(a, b)| (a - b).powi(2)).sum::<f32>();
        let mut fec = [0.0; FRAME_20MS];
        decode_until_lost().recover(&packets[lost + 1], &mut fec).unwrap();
        let mut plc = [0.0; FRAME_20MS];
        decode_until_lost().conceal(&mut plc).unwrap();
        let energy = reference.iter().map(|x| x * x).sum::<f32>();
        assert!(
            error(&fec) < error(&plc),
            "fec error {} vs concealment {} (energy {energy})",
            error(&fec),
            error(&plc)
        );
    }

    #[test]
    fn desktop_audio_keeps_left_and_right_apart_at_a_constant_size() {
        // A different sound on each side: the left voiced, the right silent, then swapped.
        let voice = voiced(50, 50);
        let mut encoder = StereoEncoder::new().unwrap();
        let mut decoder = StereoDecoder::new().unwrap();
        let (mut left, mut right) = (0.0f32, 0.0f32);
        let mut sizes = std::collections::BTreeSet::new();
        for (n, chunk) in voice.chunks_exact(FRAME_20MS).enumerate() {
            let mut pcm = [0.0; STEREO_20MS];
            for (i, s) in chunk.iter().enumerate() {
                pcm[2 * i + usize::from(n >= 25)] = *s;
            }
            let packet = encoder.encode(&pcm).unwrap().to_vec();
            sizes.insert(packet.len());
            let mut out = [0.0; STEREO_20MS];
            decoder.decode(Some(&packet), &mut out).unwrap();
            if (5..25).contains(&n) {
                left += out.iter().step_by(2).map(|x| x * x).sum::<f32>();
                right += out.iter().skip(1).step_by(2).map(|x| x * x).sum::<f32>();
            }
        }
        assert!(left > 100.0 * right, "left {left} right {right}");
        assert_eq!(sizes.len(), 1, "constant bitrate: {sizes:?}");
        let size = *sizes.first().unwrap();
        assert_eq!(size, (DESKTOP_BITRATE / 8 / 50) as usize);
        let mut out = [1.0; STEREO_20MS];
        decoder.decode(None, &mut out).unwrap();
        let energy: f32 = out.iter().map(|x| x * x).sum();
        assert!(energy > 0.0 && out.iter().all(|x| x.abs() < 1.0), "concealment continues the sound: {energy}");
    }
}
