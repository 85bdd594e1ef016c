//! Sound devices through cpal. Callbacks only move samples between the device and a
//! pre-allocated lock-free ring (rtrb) and bump atomics: no allocation, lock or log.
//! The engine's threads resample to and from 48 kHz mono.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use cpal::traits::{DeviceTrait, HostTrait, StreamTrait};

/// Ring capacity: half a second at the highest common device rate.
const RING_SAMPLES: usize = 96_000 / 2;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("no {0} device")]
    NoDevice(&'static str),
    #[error("{device}: {reason}")]
    Open { device: String, reason: String },
}

/// The devices there are, by name.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct DeviceList {
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    pub default_input: Option<String>,
    pub default_output: Option<String>,
}

pub fn list() -> DeviceList {
    let host = cpal::default_host();
    let names = |devices: Vec<cpal::Device>| devices.iter().map(ToString::to_string).collect();
    DeviceList {
        inputs: names(host.input_devices().map(Iterator::collect).unwrap_or_default()),
        outputs: names(host.output_devices().map(Iterator::collect).unwrap_or_default()),
        default_input: host.default_input_device().map(|d| d.to_string()),
        default_output: host.default_output_device().map(|d| d.to_string()),
    }
}

/// What a device's callbacks report: samples that did not fit or were missing, and
/// whether the device failed (vanished).
#[derive(Debug, Default)]
pub struct DeviceHealth {
    pub xruns: AtomicU64,
    pub failed: AtomicBool,
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
    devices: impl Iterator<Item = cpal::Device>,
    default: Option<cpal::Device>,
) -> (Option<cpal::Device>, bool) {
    match wanted {
        Some(name) => match devices.into_iter().find(|d| d.to_string() == name) {
            Some(device) => (Some(device), false),
            None => (default, true),
        },
        None => (default, false),
    }
}

/// The config to open with: 48 kHz mono if the device can, else its default.
fn config(device: &cpal::Device, input: bool) -> Result<cpal::StreamConfig, DeviceError> {
    let open = |e: cpal::Error| open_error(device, e);
    let default = if input { device.default_input_config() } else { device.default_output_config() }.map_err(open)?;
    let mut config = default.config();
    let channels = config.channels;
    let has_48k = if input {
        device.supported_input_configs().is_ok_and(|mut r| r.any(|r| offers_48k(&r, channels)))
    } else {
        device.supported_output_configs().is_ok_and(|mut r| r.any(|r| offers_48k(&r, channels)))
    };
    if has_48k {
        config.sample_rate = 48_000;
    }
    Ok(config)
}

fn offers_48k(range: &cpal::SupportedStreamConfigRange, channels: u16) -> bool {
    range.min_sample_rate() <= 48_000 && range.max_sample_rate() >= 48_000 && range.channels() == channels
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
pub fn open_input(wanted: Option<&str>) -> Result<OpenDevice<rtrb::Consumer<f32>>, DeviceError> {
    let host = cpal::default_host();
    let devices =
        host.input_devices().map_err(|e| DeviceError::Open { device: "input".into(), reason: e.to_string() })?;
    let (device, fell_back) = pick(wanted, devices, host.default_input_device());
    let device = device.ok_or(DeviceError::NoDevice("input"))?;
    let config = config(&device, true)?;
    let channels = usize::from(config.channels.max(1));
    let (mut producer, consumer) = rtrb::RingBuffer::new(RING_SAMPLES);
    let health = Arc::new(DeviceHealth::default());
    let (xruns, failed) = (health.clone(), health.clone());
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
            move |_| failed.failed.store(true, Ordering::Relaxed),
            None,
        )
        .map_err(|e| open_error(&device, e))?;
    started(&device, stream, consumer, config.sample_rate, fell_back, health)
}

/// Opens the speaker called `wanted` (or the default one): the ring's samples go to
/// every channel at the device's rate; an empty ring plays silence.
pub fn open_output(wanted: Option<&str>) -> Result<OpenDevice<rtrb::Producer<f32>>, DeviceError> {
    let host = cpal::default_host();
    let devices =
        host.output_devices().map_err(|e| DeviceError::Open { device: "output".into(), reason: e.to_string() })?;
    let (device, fell_back) = pick(wanted, devices, host.default_output_device());
    let device = device.ok_or(DeviceError::NoDevice("output"))?;
    let config = config(&device, false)?;
    let channels = usize::from(config.channels.max(1));
    let (producer, mut consumer) = rtrb::RingBuffer::<f32>::new(RING_SAMPLES);
    let health = Arc::new(DeviceHealth::default());
    let (xruns, failed) = (health.clone(), health.clone());
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
            move |_| failed.failed.store(true, Ordering::Relaxed),
            None,
        )
        .map_err(|e| open_error(&device, e))?;
    started(&device, stream, producer, config.sample_rate, fell_back, health)
}
