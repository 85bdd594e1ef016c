//! Starting real servers and headless clients, and reading their JSON events.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod screencast;

/// How long any single expected event may take.
pub const TIMEOUT: Duration = Duration::from_secs(15);

/// The real binary with a clean environment.
pub fn voipc() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_voipc"));
    command.env_clear().env("PATH", std::env::var_os("PATH").unwrap_or_default()).env("RUST_LOG", "warn");
    command
}

/// Lines of a child's stdout, read on a thread.
fn line_reader(stdout: impl std::io::Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

pub struct TestServer {
    child: Child,
    /// The server's log so far, when started with [`TestServer::start_logging`]: read on
    /// a thread as it comes, so that a full pipe never stalls the server.
    log: Option<std::thread::JoinHandle<String>>,
    pub addr: String,
    pub fingerprint: String,
    pub invite: String,
}

impl TestServer {
    /// `voipc serve` in `dir` on a free loopback port, with `config` as server.toml if given.
    pub fn start(dir: &Path, config: Option<&str>) -> TestServer {
        Self::start_with(dir, config, &["--listen", "127.0.0.1:0"])
    }

    /// `voipc serve --json` in `dir` with `args`, which must say where to listen.
    pub fn start_with(dir: &Path, config: Option<&str>, args: &[&str]) -> TestServer {
        Self::spawn(dir, config, args, None)
    }

    /// As [`TestServer::start`], logging at `RUST_LOG=filter`; [`TestServer::stop_and_read_log`]
    /// returns the log.
    pub fn start_logging(dir: &Path, config: Option<&str>, filter: &str) -> TestServer {
        Self::spawn(dir, config, &["--listen", "127.0.0.1:0"], Some(filter))
    }

    fn spawn(dir: &Path, config: Option<&str>, args: &[&str], log: Option<&str>) -> TestServer {
        let mut command = voipc();
        if let Some(filter) = log {
            command.env("RUST_LOG", filter);
        }
        command.current_dir(dir).args(["serve", "--json"]).args(args);
        if let Some(config) = config {
            std::fs::write(dir.join("server.toml"), config).unwrap();
            command.args(["--config", "server.toml"]);
        }
        let stderr = if log.is_some() { Stdio::piped() } else { Stdio::null() };
        let mut child = command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(stderr).spawn().unwrap();
        let log = child.stderr.take().map(|mut stderr| {
            std::thread::spawn(move || {
                let mut log = String::new();
                let _ = std::io::Read::read_to_string(&mut stderr, &mut log);
                log
            })
        });
        let lines = line_reader(child.stdout.take().unwrap());
        let line = lines.recv_timeout(TIMEOUT).expect("server prints its listening event");
        let event: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(event["event"], "listening", "{line}");
        TestServer {
            child,
            log,
            addr: event["addr"].as_str().unwrap().to_owned(),
            fingerprint: event["fingerprint"].as_str().unwrap().to_owned(),
            invite: event["invite"].as_str().unwrap().to_owned(),
        }
    }

    /// The server's resident memory now, KiB (VmRSS).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("Linux reports VmRSS");
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// Stops the server and returns what it logged (see [`TestServer::start_logging`]).
    pub fn stop_and_read_log(mut self) -> String {
        let log = self.log.take();
        assert!(self.stop().success());
        log.map(|reader| reader.join().expect("the log reader does not panic")).unwrap_or_default()
    }

    /// Stops the server as an operator would (SIGTERM) and waits for it.
    pub fn stop(mut self) -> ExitStatus {
        // SAFETY: kill only sends a signal to our own child process.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "server did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running `voipc bench impair` in front of a server: loss, delay and slow links.
pub struct Impairer {
    child: Child,
    /// Where clients connect instead of the server.
    pub addr: String,
}

impl Impairer {
    /// Forwards to `server` (host:port) with `args` (`--loss`, `--down-kbps`, ...).
    pub fn start(server: &str, args: &[&str]) -> Impairer {
        let mut child = voipc()
            .args(["bench", "impair", "--listen", "127.0.0.1:0", "--to", server])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let lines = line_reader(child.stdout.take().unwrap());
        let line = lines.recv_timeout(TIMEOUT).expect("the impairer prints its address");
        let event: Value = serde_json::from_str(&line).unwrap();
        Impairer { child, addr: event["addr"].as_str().unwrap().to_owned() }
    }
}

impl Drop for Impairer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running `voipc join --json`.
pub struct TestClient {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    /// Events read but not yet matched by an expectation.
    pub seen: Vec<Value>,
    _data_dir: Option<tempfile::TempDir>,
}

impl TestClient {
    /// Joins `target` (an invite link or address) as `name` with extra flags and a fresh
    /// data directory.
    pub fn join(target: &str, name: &str, extra: &[&str]) -> TestClient {
        let data = tempfile::tempdir().unwrap();
        let mut client = Self::join_with_data(target, name, extra, data.path());
        client._data_dir = Some(data);
        client
    }

    pub fn join_with_data(target: &str, name: &str, extra: &[&str], data_dir: &Path) -> TestClient {
        Self::spawn(target, name, extra, data_dir, &[])
    }

    /// As [`TestClient::join_with_data`], with `env` set as [`TestClient::join_with_env`] does.
    pub fn join_with_data_and_env(
        target: &str,
        name: &str,
        extra: &[&str],
        data_dir: &Path,
        env: &[(&str, &str)],
    ) -> TestClient {
        Self::spawn(target, name, extra, data_dir, env)
    }

    /// As [`TestClient::join`], with `env` set for the client (its environment is
    /// otherwise cleared), e.g. the `DISPLAY` to share.
    pub fn join_with_env(target: &str, name: &str, extra: &[&str], env: &[(&str, &str)]) -> TestClient {
        let data = tempfile::tempdir().unwrap();
        let mut client = Self::spawn(target, name, extra, data.path(), env);
        client._data_dir = Some(data);
        client
    }

    fn spawn(target: &str, name: &str, extra: &[&str], data_dir: &Path, env: &[(&str, &str)]) -> TestClient {
        let mut child = voipc()
            .envs(env.iter().copied())
            .env("VOIPC_VAULT_PASSWORD", "test vault password")
            .args(["join", target, "--name", name, "--json", "--data-dir"])
            .arg(data_dir)
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        let lines = line_reader(child.stdout.take().unwrap());
        TestClient { child, stdin, lines, seen: Vec::new(), _data_dir: None }
    }

    pub fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin is open");
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }

    /// Closes stdin: the end of input.
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Waits for the first event (already seen or new) that `matches`, and takes it.
    pub fn expect(&mut self, what: &str, matches: impl Fn(&Value) -> bool) -> Value {
        if let Some(at) = self.seen.iter().position(&matches) {
            return self.seen.remove(at);
        }
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let event: Value = serde_json::from_str(&line).unwrap_or_else(|_| panic!("not JSON: {line}"));
                    if matches(&event) {
                        return event;
                    }
                    self.seen.push(event);
                }
                Err(RecvTimeoutError::Timeout) => panic!("no {what} within {TIMEOUT:?}; saw {:#?}", self.seen),
                Err(RecvTimeoutError::Disconnected) => panic!("client ended before {what}; saw {:#?}", self.seen),
            }
        }
    }

    /// Waits for an event named `name`.
    pub fn expect_event(&mut self, name: &str) -> Value {
        self.expect(name, |e| e["event"] == name)
    }

    /// Waits for an error event with `code`.
    pub fn expect_error(&mut self, code: &str) -> Value {
        self.expect(&format!("error {code}"), |e| e["event"] == "error" && e["code"] == code)
    }

    /// Waits until this client is in `channel`.
    pub fn expect_joined(&mut self, channel: &str) -> Value {
        self.expect(&format!("joined {channel}"), |e| e["event"] == "joined" && e["name"] == channel)
    }

    /// Reads whatever arrives within `wait` into `seen`.
    pub fn collect_for(&mut self, wait: Duration) {
        let deadline = Instant::now() + wait;
        while let Ok(line) = self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            self.seen.push(serde_json::from_str(&line).unwrap_or_else(|_| panic!("not JSON: {line}")));
        }
    }

    /// The events seen so far that are named `name`.
    pub fn seen_events(&self, name: &str) -> Vec<&Value> {
        self.seen.iter().filter(|e| e["event"] == name).collect()
    }

    /// Waits for the process to end on its own; the rest of its output goes to `seen`.
    pub fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                self.collect_for(Duration::from_millis(200));
                return status;
            }
            assert!(Instant::now() < deadline, "client did not exit; saw {:#?}", self.seen);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Types `/quit` and waits for the exit.
    pub fn quit(&mut self) -> ExitStatus {
        self.send("/quit");
        self.wait()
    }
}

impl Drop for TestClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The sound server's default output.
pub const DEFAULT_SINK: &str = "desktop";

/// A private PulseAudio server (Debian's `pulseaudio`, installed by `just setup`) whose
/// one output, a null sink named "desktop", is the default: the sound card of a machine
/// that has none. Killed on drop.
pub struct SoundServer {
    child: Child,
    dir: tempfile::TempDir,
}

impl SoundServer {
    pub fn start() -> SoundServer {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("native");
        let child = Command::new("pulseaudio")
            .env_clear()
            .env("HOME", dir.path())
            .env("XDG_RUNTIME_DIR", dir.path())
            .args(["-n", "--daemonize=no", "--exit-idle-time=-1", "--use-pid-file=no", "-L"])
            .arg(format!("module-native-protocol-unix socket={} auth-anonymous=1", socket.display()))
            .args(["-L", &format!("module-null-sink sink_name={DEFAULT_SINK} rate=48000")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("pulseaudio runs (just setup installs it)");
        // ALSA programs (cpal, ours) reach it through ALSA's pulse plugin.
        std::fs::write(dir.path().join(".asoundrc"), "pcm.!default { type pulse }\nctl.!default { type pulse }\n")
            .unwrap();
        let deadline = Instant::now() + TIMEOUT;
        while !socket.exists() {
            assert!(Instant::now() < deadline, "pulseaudio did not come up");
            std::thread::sleep(Duration::from_millis(50));
        }
        SoundServer { child, dir }
    }

    /// What a client needs to use it: the server's socket, and a home whose `.asoundrc`
    /// makes it ALSA's default device.
    pub fn env(&self) -> [(&'static str, String); 2] {
        let socket = format!("unix:{}", self.dir.path().join("native").display());
        [("PULSE_SERVER", socket), ("HOME", self.dir.path().display().to_string())]
    }

    fn tool(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        command.env_clear().envs(self.env()).stdout(Stdio::null()).stderr(Stdio::null());
        command
    }

    /// Runs `pactl` with `args` against this server and returns what it printed.
    pub fn pactl(&self, args: &[&str]) -> String {
        let out = self.tool("pactl").args(args).stdout(Stdio::piped()).output().expect("pactl runs");
        assert!(out.status.success(), "pactl {args:?} failed");
        String::from_utf8(out.stdout).unwrap()
    }

    /// Loads a module (`pactl load-module`); its index, to unload it with.
    pub fn load(&self, module: &str, args: &[&str]) -> u32 {
        let index = self.pactl(&[&["load-module", module][..], args].concat());
        index.trim().parse().unwrap_or_else(|_| panic!("{module}: {index}"))
    }

    pub fn unload(&self, index: u32) {
        self.pactl(&["unload-module", &index.to_string()]);
    }

    /// Plays `wav` on the default output, as any other application would.
    pub fn play(&self, wav: &Path) -> Child {
        self.tool("paplay").arg(wav).spawn().expect("paplay runs (just setup installs pulseaudio-utils)")
    }

    /// Plays `wav` on the output called `sink`, in real time: a stream with paplay's
    /// own 2 s buffer is rendered seconds ahead in one burst, and a monitor of that output
    /// would hand a microphone seconds of sound at once.
    pub fn play_on(&self, sink: &str, wav: &Path) -> Child {
        self.tool("paplay")
            .args([&format!("--device={sink}")[..], "--latency-msec=20"])
            .arg(wav)
            .spawn()
            .expect("paplay runs")
    }

    /// Records everything the default output plays, 48 kHz mono float, into `raw` until
    /// killed ([`read_raw`] reads it).
    pub fn record_output(&self, raw: &Path) -> Child {
        self.record(&format!("{DEFAULT_SINK}.monitor"), raw)
    }

    /// Records the source called `source` as [`SoundServer::record_output`] does, and
    /// returns once the recording has begun (parec can take a second to connect): what
    /// is played from now on is in it.
    pub fn record(&self, source: &str, raw: &Path) -> Child {
        let child = self
            .tool("parec")
            .args([
                &format!("--device={source}")[..],
                "--latency-msec=10",
                "--raw",
                "--format=float32le",
                "--rate=48000",
                "--channels=1",
            ])
            .stdout(std::fs::File::create(raw).unwrap())
            .spawn()
            .expect("parec runs");
        let deadline = Instant::now() + TIMEOUT;
        while std::fs::metadata(raw).map_or(0, |m| m.len()) == 0 {
            assert!(Instant::now() < deadline, "parec recorded nothing from {source}");
            std::thread::sleep(Duration::from_millis(10));
        }
        child
    }
}

impl Drop for SoundServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Samples that [`SoundServer::record_output`] wrote.
pub fn read_raw(raw: &Path) -> Vec<f32> {
    let bytes = std::fs::read(raw).unwrap();
    bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}
