//! A sleep with the kernel's precision for the relay's coalescing window: tokio's timer
//! counts whole milliseconds and, on a busy worker, fires late, which made a 2 ms window
//! hold frames 2-4 ms. On Linux a timerfd wakes the task through the runtime's own poller
//! (no thread of its own, and no hop between threads); elsewhere, or when the kernel will
//! not make one, tokio's timer.

use std::time::Duration;

#[cfg(target_os = "linux")]
use tokio::io::unix::AsyncFd;
use tracing::{debug, warn};

pub(super) struct PreciseTimer {
    #[cfg(target_os = "linux")]
    timerfd: Option<AsyncFd<std::os::fd::OwnedFd>>,
}

impl PreciseTimer {
    /// Must be called within the tokio runtime.
    pub(super) fn new() -> PreciseTimer {
        #[cfg(target_os = "linux")]
        {
            let timerfd = linux::timerfd()
                .inspect_err(|e| warn!(error = %e, "no timerfd: the coalescing window is timed to the millisecond"))
                .ok();
            PreciseTimer { timerfd }
        }
        #[cfg(not(target_os = "linux"))]
        PreciseTimer {}
    }

    pub(super) async fn sleep(&self, duration: Duration) {
        #[cfg(target_os = "linux")]
        if let Some(timerfd) = &self.timerfd {
            match linux::sleep(timerfd, duration).await {
                Ok(()) => return,
                Err(e) => debug!(error = %e, "timerfd failed; tokio's timer this once"),
            }
        }
        tokio::time::sleep(duration).await;
    }
}

#[cfg(target_os = "linux")]
mod linux {
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::time::Duration;

    use tokio::io::Interest;
    use tokio::io::unix::AsyncFd;

    pub fn timerfd() -> io::Result<AsyncFd<OwnedFd>> {
        // SAFETY: timerfd_create takes no pointers; it returns a new descriptor or -1.
        let fd = unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_NONBLOCK | libc::TFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: the OwnedFd is open, and stays the same descriptor for as long as the
        // AsyncFd owns it.
        unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.map_err(|e| e.into_parts().1)
    }

    /// Arms the timer `duration` from now and waits for it to expire.
    pub(super) async fn sleep(timerfd: &AsyncFd<OwnedFd>, duration: Duration) -> io::Result<()> {
        let zero = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        let at = libc::timespec {
            tv_sec: libc::time_t::try_from(duration.as_secs()).unwrap_or(libc::time_t::MAX),
            // At least a nanosecond: an all-zero time disarms the timer. Under a second, so
            // the cast is exact for a 32-bit c_long too.
            tv_nsec: duration.subsec_nanos().max(1) as libc::c_long,
        };
        let spec = libc::itimerspec { it_interval: zero, it_value: at };
        // SAFETY: spec is a valid itimerspec; the old setting is not asked for.
        if unsafe { libc::timerfd_settime(timerfd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) } < 0 {
            return Err(io::Error::last_os_error());
        }
        loop {
            let mut ready = timerfd.readable().await?;
            let mut expirations = [0u8; 8];
            let read = ready.try_io(|fd| {
                // SAFETY: reads at most 8 bytes into an 8-byte buffer.
                let n = unsafe { libc::read(fd.as_raw_fd(), expirations.as_mut_ptr().cast(), expirations.len()) };
                if n < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
            });
            if let Ok(result) = read {
                return result;
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods, reason = "the test measures a real sleep")]
mod tests {
    use std::time::Instant;

    use super::*;

    #[tokio::test]
    async fn a_sleep_lasts_at_least_what_was_asked() {
        let timer = PreciseTimer::new();
        #[cfg(target_os = "linux")]
        assert!(timer.timerfd.is_some(), "this kernel makes timerfds");
        for micros in [1, 300, 1500] {
            let asked = Duration::from_micros(micros);
            let start = Instant::now();
            timer.sleep(asked).await;
            assert!(start.elapsed() >= asked, "{micros} µs asked");
        }
    }
}
