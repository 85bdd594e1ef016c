//! Desktop audio on Windows: WASAPI's process loopback (Windows 10 2004 and later) of
//! every process but our own process tree, so that our playback (the people in the
//! call) is never in it. One stream, 48 kHz float stereo (Windows converts), read every
//! 20 ms into the mix.
//!
//! NOT BUILT AND NOT TESTED: the development machine cannot compile for Windows. Written
//! against the sources of the `wasapi` crate 0.26; the README says so.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Instant;

use super::{DesktopAudioError, DesktopMix, Wanted, mix_in_real_time};
use crate::audio::{SAMPLE_RATE, STEREO_20MS};

/// The mix's id for the one loopback stream.
const LOOPBACK: u32 = 0;

fn server_error(e: impl std::fmt::Display) -> DesktopAudioError {
    DesktopAudioError::Server(e.to_string())
}

/// Records what every other process plays and calls `frame` every 20 ms while anything is
/// heard, until `wanted` says stop.
pub fn capture(
    wanted: &dyn Fn() -> Wanted,
    frame: &mut dyn FnMut(&[f32; STEREO_20MS], Instant),
) -> Result<(), DesktopAudioError> {
    // This thread is the capture's own: the multi-threaded apartment is right for it.
    if wasapi::initialize_mta().is_err() {
        return Err(server_error("COM did not initialise"));
    }
    let format = wasapi::WaveFormat::new(32, 32, &wasapi::SampleType::Float, SAMPLE_RATE as usize, 2, None);
    // `false`: exclude the process tree of the id given, ours.
    let mut client =
        wasapi::AudioClient::new_application_loopback_client(std::process::id(), false).map_err(server_error)?;
    let mode = wasapi::StreamMode::EventsShared { autoconvert: true, buffer_duration_hns: 0 };
    client.initialize_client(&format, &wasapi::Direction::Capture, &mode).map_err(server_error)?;
    // An event-driven stream does not start without its event; the clock below polls.
    let _event = client.set_get_eventhandle().map_err(server_error)?;
    let capture_client = client.get_audiocaptureclient().map_err(server_error)?;
    client.start_stream().map_err(server_error)?;
    let mix = Mutex::new(DesktopMix::default());
    let mut bytes = VecDeque::new();
    let mut floats = Vec::new();
    let result = mix_in_real_time(wanted, &mix, frame, &mut |_| {
        while capture_client.get_next_packet_size().map_err(server_error)?.unwrap_or(0) > 0 {
            bytes.clear();
            let info = capture_client.read_from_device_to_deque(&mut bytes).map_err(server_error)?;
            floats.clear();
            let whole = bytes.make_contiguous();
            if info.flags.silent {
                floats.resize(whole.len() / 4, 0.0);
            } else {
                floats.extend(whole.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])));
            }
            mix.lock().expect("no panics while held").push(LOOPBACK, &floats);
        }
        Ok(())
    });
    let _ = client.stop_stream();
    result
}
