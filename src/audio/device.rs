//! Sound devices through cpal. Callbacks only move samples between the device and a
//! pre-allocated lock-free ring (rtrb) and bump atomics: no allocation, lock or log.
//! The engine's threads resample to and from 48 kHz mono.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cpal::traits::{DeviceTrait, HostTrait, StreamTrait};

/// Ring capacity: half a second at the highest common device rate.
pub const RING_SAMPLES: usize = 96_000 / 2;
/// Frames the device moves per callback (10 ms at 48 kHz): asked for explicitly, since a
/// sound server left to choose may buffer seconds (PulseAudio's default is 2 s).
const PERIOD_FRAMES: u32 = 480;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("no {0} device")]
    NoDevice(&'static str),
    #[error("{device}: {reason}")]
    Open { device: String, reason: String },
}

/// A device as the user sees it, and the sound system's own identifier for it (a
/// PulseAudio sink or source name; either picks it).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct DeviceName {
    pub name: String,
    pub id: String,
}

/// The devices there are.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct DeviceList {
    pub inputs: Vec<DeviceName>,
    pub outputs: Vec<DeviceName>,
    /// The identifiers of the default devices (names can repeat).
    pub default_input: Option<String>,
    pub default_output: Option<String>,
}

/// The sound system: PulseAudio's (or PipeWire's pulse server) when one is running, ALSA
/// otherwise (cpal's choice). Each engine thread keeps one: with PulseAudio it is a
/// connection.
pub fn host() -> cpal::Host {
    cpal::default_host()
}

fn device_name(device: &cpal::Device) -> DeviceName {
    let name = device.to_string();
    let id = device.id().map(|id| id.id().to_owned()).unwrap_or_else(|_| name.clone());
    DeviceName { name, id }
}

pub fn list(host: &cpal::Host) -> DeviceList {
    let names = |devices: Vec<cpal::Device>| devices.iter().map(device_name).collect();
    DeviceList {
        inputs: names(host.input_devices().map(Iterator::collect).unwrap_or_default()),
        outputs: names(host.output_devices().map(Iterator::collect).unwrap_or_default()),
        default_input: host.default_input_device().map(|d| device_name(&d).id),
        default_output: host.default_output_device().map(|d| device_name(&d).id),
    }
}

impl DeviceList {
    /// Whether an input (or output) device called `wanted` (its name or its identifier)
    /// is listed.
    pub fn has(&self, input: bool, wanted: &str) -> bool {
        let devices = if input { &self.inputs } else { &self.outputs };
        devices.iter().any(|d| d.name == wanted || d.id == wanted)
    }
}

/// The devices there are, listed again every `every` on a thread of its own: listing
/// takes from milliseconds to over a second (PulseAudio, a busy machine, a debug build),
/// which must never stall a thread that moves sound. Stops when dropped.
pub struct DeviceWatch {
    latest: Arc<Mutex<Option<DeviceList>>>,
    stop: Arc<AtomicBool>,
}

impl DeviceWatch {
    pub fn start(every: Duration) -> std::io::Result<DeviceWatch> {
        let latest = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let (shared, stopped) = (latest.clone(), stop.clone());
        // Not joined: a listing in progress would hold up whoever drops the watch.
        std::thread::Builder::new().name("voipc-devices".into()).spawn(move || {
            let host = host();
            while !stopped.load(Ordering::Relaxed) {
                let list = list(&host);
                if let Ok(mut latest) = shared.lock() {
                    *latest = Some(list);
                }
                std::thread::park_timeout(every);
            }
        })?;
        Ok(DeviceWatch { latest, stop })
    }

    /// Whether the latest listing has a device called `wanted`; `None` before the first.
    pub fn has(&self, input: bool, wanted: &str) -> Option<bool> {
        self.latest.lock().ok()?.as_ref().map(|list| list.has(input, wanted))
    }
}

impl Drop for DeviceWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn is_called(device: &cpal::Device, wanted: &str) -> bool {
    let name = device_name(device);
    name.name == wanted || name.id == wanted
}

/// What a device's callbacks report: samples that did not fit the ring (a microphone)
/// or were missing from it (a speaker), glitches the sound system reported, and the
/// error that stopped the stream.
#[derive(Debug, Default)]
pub struct DeviceHealth {
    pub xruns: AtomicU64,
    broken: Mutex<Option<String>>,
}

impl DeviceHealth {
    /// Why the stream stopped, once it did.
    pub fn broken(&self) -> Option<String> {
        self.broken.lock().ok().and_then(|b| b.clone())
    }

    /// A stream error: glitches are counted, anything else stops the stream.
    fn error(&self, error: &cpal::Error) {
        match error.kind() {
            cpal::ErrorKind::Xrun => {
                self.xruns.fetch_add(1, Ordering::Relaxed);
            }
            // The stream goes on: a refused real-time priority, a default device followed.
            cpal::ErrorKind::RealtimeDenied | cpal::ErrorKind::DeviceChanged => {}
            _ => {
                if let Ok(mut broken) = self.broken.lock() {
                    broken.get_or_insert_with(|| error.to_string());
                }
            }
        }
    }
}

/// An open device: its stream (dropping it stops the device), its rate, its name.
pub struct OpenDevice<R> {
    _stream: cpal::Stream,
    pub ring: R,
    pub rate: u32,
    pub name: String,
    /// The asked-for device was not there and the default one opened instead.
    pub fell_back: bool,
    pub health: Arc<DeviceHealth>,
}

fn pick(
    wanted: Option<&str>,
    mut devices: impl Iterator<Item = cpal::Device>,
    default: Option<cpal::Device>,
) -> (Option<cpal::Device>, bool) {
    match wanted {
        Some(name) => match devices.find(|d| is_called(d, name)) {
            Some(device) => (Some(device), false),
            None => (default, true),
        },
        None => (default, false),
    }
}

/// The config to open with: the device's own rate and channels (the engine resamples;
/// a sound server would otherwise resample again), 10 ms periods where the device lets
/// the size be chosen.
fn config(device: &cpal::Device, input: bool) -> Result<cpal::StreamConfig, DeviceError> {
    let open = |e: cpal::Error| open_error(device, e);
    let default = if input { device.default_input_config() } else { device.default_output_config() }.map_err(open)?;
    let mut config = default.config();
    if let cpal::SupportedBufferSize::Range { min, max } = default.buffer_size() {
        let period = (PERIOD_FRAMES * config.sample_rate / 48_000).clamp(*min, *max);
        config.buffer_size = cpal::BufferSize::Fixed(period);
    }
    Ok(config)
}

fn open_error(device: &cpal::Device, error: impl std::fmt::Display) -> DeviceError {
    DeviceError::Open { device: device.to_string(), reason: error.to_string() }
}

/// Starts a built stream and hands back the device with its end of the ring.
fn started<R>(
    device: &cpal::Device,
    stream: cpal::Stream,
    ring: R,
    rate: u32,
    fell_back: bool,
    health: Arc<DeviceHealth>,
) -> Result<OpenDevice<R>, DeviceError> {
    stream.play().map_err(|e| open_error(device, e))?;
    Ok(OpenDevice { _stream: stream, ring, rate, name: device.to_string(), fell_back, health })
}

/// Opens the microphone called `wanted` (or the default one): its first channel flows
/// into the ring at the device's rate.
pub fn open_input(host: &cpal::Host, wanted: Option<&str>) -> Result<OpenDevice<rtrb::Consumer<f32>>, DeviceError> {
    let devices =
        host.input_devices().map_err(|e| DeviceError::Open { device: "input".into(), reason: e.to_string() })?;
    let (device, fell_back) = pick(wanted, devices, host.default_input_device());
    let device = device.ok_or(DeviceError::NoDevice("input"))?;
    let config = config(&device, true)?;
    let channels = usize::from(config.channels.max(1));
    let (mut producer, consumer) = rtrb::RingBuffer::new(RING_SAMPLES);
    let health = Arc::new(DeviceHealth::default());
    let (xruns, errors) = (health.clone(), health.clone());
    let stream = device
        .build_input_stream::<f32, _, _>(
            config,
            move |data: &[f32], _| {
                for frame in data.chunks_exact(channels) {
                    if producer.push(frame[0]).is_err() {
                        xruns.xruns.fetch_add(1, Ordering::Relaxed);
                    }
                }
            },
            move |e| errors.error(&e),
            None,
        )
        .map_err(|e| open_error(&device, e))?;
    started(&device, stream, consumer, config.sample_rate, fell_back, health)
}

/// Opens the speaker called `wanted` (or the default one): the ring's samples go to
/// every channel at the device's rate; an empty ring plays silence.
pub fn open_output(host: &cpal::Host, wanted: Option<&str>) -> Result<OpenDevice<rtrb::Producer<f32>>, DeviceError> {
    let devices =
        host.output_devices().map_err(|e| DeviceError::Open { device: "output".into(), reason: e.to_string() })?;
    let (device, fell_back) = pick(wanted, devices, host.default_output_device());
    let device = device.ok_or(DeviceError::NoDevice("output"))?;
    let config = config(&device, false)?;
    let channels = usize::from(config.channels.max(1));
    let (producer, mut consumer) = rtrb::RingBuffer::<f32>::new(RING_SAMPLES);
    let health = Arc::new(DeviceHealth::default());
    let (xruns, errors) = (health.clone(), health.clone());
    let stream = device
        .build_output_stream::<f32, _, _>(
            config,
            move |data: &mut [f32], _| {
                for frame in data.chunks_exact_mut(channels) {
                    let sample = consumer.pop().unwrap_or_else(|_| {
                        xruns.xruns.fetch_add(1, Ordering::Relaxed);
                        0.0
                    });
                    frame.fill(sample);
                }
            },
            move |e| errors.error(&e),
            None,
        )
        .map_err(|e| open_error(&device, e))?;
    started(&device, stream, producer, config.sample_rate, fell_back, health)
}
