//! Desktop audio on Linux, through the PulseAudio protocol (PulseAudio itself, or
//! PipeWire's pipewire-pulse): one record stream per application playing on the default
//! output, each tied to that application's stream (a monitor stream, `direct_on_input`),
//! so that our own playback is never in the mix, as it would be in the output's monitor.
//! Which streams are there is looked at every [`REFRESH_EVERY`], and one more stream
//! holds the output to low latency ([`hold_latency`]).

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io::BufReader;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pulseaudio::protocol;

use super::{DesktopAudioError, DesktopMix, MAX_APPLICATIONS, Wanted, mix_in_real_time};
use crate::audio::{FRAME_20MS, SAMPLE_RATE, STEREO_20MS};

/// How often the applications playing are looked at: a sound that starts is heard from
/// at most this late.
const REFRESH_EVERY: Duration = Duration::from_millis(250);

/// Whether a sound-server stream is one of this process's own (our playback).
pub fn is_own(props: &protocol::Props, pid: u32) -> bool {
    let value = props.get(protocol::Prop::ApplicationProcessId).unwrap_or_default();
    let value = value.strip_suffix(&[0]).unwrap_or(value);
    std::str::from_utf8(value).ok().and_then(|v| v.trim().parse::<u32>().ok()) == Some(pid)
}

fn server_error(e: impl std::fmt::Display) -> DesktopAudioError {
    DesktopAudioError::Server(e.to_string())
}

/// A blocking connection for the one request the client library does not make: the
/// list of the streams playing (sink inputs).
struct Lister {
    socket: BufReader<UnixStream>,
    version: u16,
    sequence: u32,
}

impl Lister {
    fn connect() -> Result<Lister, DesktopAudioError> {
        let path = pulseaudio::socket_path_from_env().ok_or(DesktopAudioError::NoServer)?;
        let cookie = pulseaudio::cookie_path_from_env().and_then(|p| std::fs::read(p).ok()).unwrap_or_default();
        let socket = UnixStream::connect(&path).map_err(|e| server_error(format!("{}: {e}", path.display())))?;
        socket.set_read_timeout(Some(Duration::from_secs(5))).map_err(server_error)?;
        let mut lister = Lister { socket: BufReader::new(socket), version: protocol::MAX_VERSION, sequence: 0 };
        let auth =
            protocol::AuthParams { version: protocol::MAX_VERSION, supports_shm: false, supports_memfd: false, cookie };
        let reply: protocol::AuthReply = lister.request(protocol::Command::Auth(auth))?;
        lister.version = reply.version.min(protocol::MAX_VERSION);
        let mut props = protocol::Props::new();
        props.set(protocol::Prop::ApplicationName, c"VoIPC desktop audio");
        let pid = CString::new(std::process::id().to_string()).expect("digits");
        props.set(protocol::Prop::ApplicationProcessId, pid.as_c_str());
        let _: protocol::SetClientNameReply = lister.request(protocol::Command::SetClientName(props))?;
        Ok(lister)
    }

    fn request<R: protocol::CommandReply>(&mut self, command: protocol::Command) -> Result<R, DesktopAudioError> {
        self.sequence += 1;
        protocol::write_command_message(self.socket.get_mut(), self.sequence, &command, self.version)
            .map_err(server_error)?;
        let (sequence, reply) = protocol::read_reply_message(&mut self.socket, self.version).map_err(server_error)?;
        if sequence != self.sequence {
            return Err(server_error("a reply out of turn"));
        }
        Ok(reply)
    }

    fn sink_inputs(&mut self) -> Result<protocol::SinkInputInfoList, DesktopAudioError> {
        self.request(protocol::Command::GetSinkInputInfoList)
    }
}

/// Records the applications playing on the default output (not us) and calls `frame`
/// every 20 ms while anything is heard, with the 20 ms and when their last sample reached
/// us, until `wanted` says stop.
#[allow(clippy::disallowed_methods, reason = "the capture is a shell: it reads the clock to pace real time")]
pub fn capture(
    wanted: &dyn Fn() -> Wanted,
    frame: &mut dyn FnMut(&[f32; STEREO_20MS], Instant),
) -> Result<(), DesktopAudioError> {
    let client = pulseaudio::Client::from_env(c"VoIPC desktop audio").map_err(|e| match e {
        pulseaudio::ClientError::ServerUnavailable => DesktopAudioError::NoServer,
        other => server_error(other),
    })?;
    let mut lister = Lister::connect()?;
    let mix = Arc::new(Mutex::new(DesktopMix::default()));
    let mut recording: BTreeMap<u32, pulseaudio::RecordStream> = BTreeMap::new();
    let mut held: Option<(u32, pulseaudio::RecordStream)> = None;
    let own = std::process::id();
    let mut next_refresh = Instant::now();
    mix_in_real_time(wanted, &mix, frame, &mut |now| {
        if now < next_refresh {
            return Ok(());
        }
        next_refresh = now + REFRESH_EVERY;
        let output = futures::executor::block_on(client.sink_info_by_name(protocol::DEFAULT_SINK.to_owned()))
            .map_err(server_error)?;
        let Some(monitor) = output.monitor_source_index else {
            return Err(server_error("the default output has no monitor"));
        };
        if held.as_ref().is_none_or(|(m, _)| *m != monitor) {
            if let Some((_, stream)) = held.take() {
                let _ = futures::executor::block_on(stream.delete());
            }
            held = Some((monitor, hold_latency(&client, monitor)?));
        }
        let playing: Vec<u32> = lister
            .sink_inputs()?
            .into_iter()
            .filter(|input| input.sink_index == output.index && !is_own(&input.props, own))
            .map(|input| input.index)
            .take(MAX_APPLICATIONS)
            .collect();
        for gone in recording.keys().copied().filter(|id| !playing.contains(id)).collect::<Vec<_>>() {
            if let Some(stream) = recording.remove(&gone) {
                // It may have gone with its application already.
                let _ = futures::executor::block_on(stream.delete());
            }
        }
        mix.lock().expect("no panics while held").retain(|id| playing.contains(&id));
        for input in playing {
            if recording.contains_key(&input) {
                continue;
            }
            // A stream can end between the list and this: tried again next time.
            match record(&client, monitor, input, &mix) {
                Ok(stream) => {
                    tracing::debug!("desktop audio: recording the application stream {input}");
                    recording.insert(input, stream);
                }
                Err(e) => tracing::debug!("desktop audio: the application stream {input}: {e}"),
            }
        }
        Ok(())
    })
}

/// A record stream of the one application `input` (or with `None`, of the whole output),
/// as float stereo at 48 kHz in 10 ms pieces.
fn record_params(monitor: u32, input: Option<u32>) -> protocol::RecordStreamParams {
    let spec =
        protocol::SampleSpec { format: protocol::SampleFormat::Float32Le, channels: 2, sample_rate: SAMPLE_RATE };
    let fragment = (FRAME_20MS / 2 * 2 * 4) as u32;
    protocol::RecordStreamParams {
        sample_spec: spec,
        channel_map: protocol::ChannelMap::stereo(),
        source_index: Some(monitor),
        buffer_attr: protocol::stream::BufferAttr { fragment_size: fragment, ..Default::default() },
        // The output's monitor is asked for 10 ms pieces, and so the output renders in
        // pieces that small (not seconds ahead, which a stream would miss).
        flags: protocol::stream::StreamFlags { adjust_latency: true, ..Default::default() },
        direct_on_input_index: input,
        ..Default::default()
    }
}

/// Holds the default output to low latency while desktop audio is shared: left alone, an
/// output that plays only streams with large buffers renders them up to 2 s ahead, all
/// at once, and an application's record stream opened after that misses what was
/// rendered. What this stream records is let go.
fn hold_latency(client: &pulseaudio::Client, monitor: u32) -> Result<pulseaudio::RecordStream, DesktopAudioError> {
    futures::executor::block_on(client.create_record_stream(record_params(monitor, None), |_: &[u8]| {}))
        .map_err(server_error)
}

/// A record stream of the one application `input` into `mix`.
fn record(
    client: &pulseaudio::Client,
    monitor: u32,
    input: u32,
    mix: &Arc<Mutex<DesktopMix>>,
) -> Result<pulseaudio::RecordStream, DesktopAudioError> {
    let params = record_params(monitor, Some(input));
    let mix = mix.clone();
    let mut floats = Vec::new();
    let sink = move |bytes: &[u8]| {
        floats.clear();
        floats.extend(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])));
        if let Ok(mut mix) = mix.lock() {
            mix.push(input, &floats);
        }
    };
    futures::executor::block_on(client.create_record_stream(params, sink)).map_err(server_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_own_streams_are_known_by_process_id() {
        let mut props = protocol::Props::new();
        assert!(!is_own(&props, 42));
        props.set(protocol::Prop::ApplicationProcessId, c"42");
        assert!(is_own(&props, 42));
        assert!(!is_own(&props, 4));
        props.set(protocol::Prop::ApplicationProcessId, c"not a number");
        assert!(!is_own(&props, 42));
    }
}
