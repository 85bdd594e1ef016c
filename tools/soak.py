#!/usr/bin/env python3
"""`just soak [MINUTES]`: 50 real `voipc join` clients on one real `voipc serve` for MINUTES.

In the Lobby, 37 stay the whole time and each writes to the channel every 5 s, and 5 come
and go (each leaves and comes back every 20-40 s). In the Voice channel 5 talk (the speech
sample over and over, in runs of up to 10 minutes, each talker coming back for the next)
to 3 who listen. (Voice has a channel of its own because this machine runs all 50 clients
on the server's two cores: 45 debug-build clients decoding five talkers left nothing for
the rest.)
At the end: every message one stayer wrote while another was there reached that other
(0 lost), no client reported an error, and the server's resident memory after the
warm-up grew by less than 10 %. Prints the figures as one JSON line; exits 1 on a miss.

SOAK_SERVER_WRAP, if set, is a command put in front of the server's (for a heap profiler;
it must exec the server, so that the memory read is the server's own:
tools/heaptrack-exec.sh does).
"""

import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
import wave

VOIPC = os.path.abspath(sys.argv[1])
MINUTES = float(sys.argv[2]) if len(sys.argv) > 2 else 10.0
STAYERS, CHURNERS, TALKERS, LISTENERS = 37, 5, 5, 3
CHAT_EVERY = 5.0
KEYS_SETTLE = 20.0
SPEECH = os.path.abspath("assets/speech.wav")
# Each talker's run of speech: the whole soak, or 10 minutes at a time in a long one.
TALK_RUN = 600.0
TALK_SECS = min(MINUTES * 60 + 30, TALK_RUN)
# Errors a client may see without anything being wrong: none, so far.
EXPECTED_ERRORS = set()

work = tempfile.mkdtemp(prefix="voipc-soak-")
env = dict(os.environ, VOIPC_VAULT_PASSWORD="soak", RUST_LOG="warn")
lock = threading.Lock()
errors = []


def start_server():
    config = os.path.join(work, "server.toml")
    with open(config, "w") as f:
        # All 50 come from 127.0.0.1: room for them on one address, and only that.
        f.write("max_users = 100\n[limits]\nmax_connections_per_source = 100\n"
                "max_pending_per_source = 100\nhandshakes_per_source_per_minute = 6000\n"
                "[[channels]]\nname = \"Lobby\"\n[[channels]]\nname = \"Voice\"\n")
    wrap = os.environ.get("SOAK_SERVER_WRAP", "").split()
    command = wrap + [VOIPC, "serve", "--config", config, "--listen", "127.0.0.1:0",
                      "--ephemeral-cert", "--json"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE,
                              stderr=open(os.path.join(work, "server.log"), "w"), text=True,
                              env=dict(env, RUST_LOG="voipc=debug"))
    listening = json.loads(server.stdout.readline())
    return server, listening["invite"]


class Client:
    """One `voipc join --json`; its events are read on a thread."""

    def __init__(self, invite, name, extra=()):
        self.name = name
        self.joined_at = None
        self.received = set()  # (from, text): a set, so that counting an hour's soak is quick
        # Times a message of ours went before some member's keys came (not an error: those
        # members cannot read it; a measure of how slow key exchange got under the load).
        self.went_without_keys = 0
        self.process = subprocess.Popen(
            [VOIPC, "join", invite, "--name", name, "--json", "--data-dir", os.path.join(work, name), *extra],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
            # Its warnings, for a look after a miss (RUST_LOG=warn: a few lines at most).
            stderr=open(os.path.join(work, f"{name}.log"), "a"))
        threading.Thread(target=self.read, daemon=True).start()

    def read(self):
        # Every event stays in the work directory, for a look after a miss.
        log = open(os.path.join(work, f"{self.name}.events"), "a")
        for line in self.process.stdout:
            log.write(line)
            try:
                event = json.loads(line)
            except ValueError:
                continue
            kind = event.get("event")
            if kind == "joined" and self.joined_at is None:
                self.joined_at = time.monotonic()
            elif kind == "went_without_keys":
                self.went_without_keys += 1
            elif kind == "message":
                self.received.add((event.get("from"), event.get("text")))
            elif kind == "error" and event.get("code") not in EXPECTED_ERRORS:
                with lock:
                    errors.append({"client": self.name, **event})

    def say(self, text):
        try:
            self.process.stdin.write(text + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, ValueError):
            pass

    def stop(self):
        if self.process.poll() is None:
            self.say("/quit")
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()


def talk_file():
    """The speech sample repeated for one talker's run."""
    with wave.open(SPEECH) as source:
        params, frames = source.getparams(), source.readframes(source.getnframes())
    path = os.path.join(work, "talk.wav")
    with wave.open(path, "wb") as out:
        out.setparams(params)
        for _ in range(int(TALK_SECS / (params.nframes / params.framerate)) + 1):
            out.writeframes(frames)
    return path


def udp_drops(port):
    """Datagrams the kernel dropped for want of room in UDP sockets on loopback (the
    `drops` column of /proc/net/udp): those of the server's socket, and of all others."""
    server = others = 0
    with open("/proc/net/udp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            local_port, drops = int(fields[1].split(":")[1], 16), int(fields[-1])
            if local_port == port:
                server += drops
            else:
                others += drops
    return server, others


def memory_kib(pid):
    """The server's resident memory in KiB: all of it, then its anonymous pages (heap and
    stacks: where a leak grows) and its file-backed ones (the executable's pages, faulted in
    as code first runs)."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                fields[key] = int(value.split()[0])
    return fields.get("VmRSS", 0), fields.get("RssAnon", 0), fields.get("RssFile", 0)


def main():
    server, invite = start_server()
    port = int(invite.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
    stayers = []
    for i in range(STAYERS):
        stayers.append(Client(invite, f"stay{i:02}"))
        time.sleep(0.2)
    deadline = time.monotonic() + 120
    while any(c.joined_at is None for c in stayers) and time.monotonic() < deadline:
        time.sleep(0.5)
    settled = time.monotonic()
    talk = ["--channel", "Voice", "--play", talk_file()]
    talkers = [Client(invite, f"talk{i}", talk) for i in range(TALKERS)]
    listeners = [Client(invite, f"listen{i}", ["--channel", "Voice"]) for i in range(LISTENERS)]
    next_talk = settled + TALK_RUN
    churners = [Client(invite, f"churn{i}-0") for i in range(CHURNERS)]
    generation = [0] * CHURNERS
    next_churn = [settled + random.uniform(20, 40) for _ in churners]
    rng = random.Random(1)
    end = settled + MINUTES * 60
    # The allocator takes minutes to reach the server's working set: under heaptrack (the
    # README's soak section) RSS rose for 7 minutes of a 15-minute run and then stayed flat.
    # So the warm-up is 10 minutes, or a quarter of a shorter run.
    warmup_end = settled + min(600.0, MINUTES * 60 / 4)
    sent = []  # (time, sender, text)
    rss = []  # (time, (all, anonymous, file-backed) KiB)
    # The stayers write once the keys of their own join storm have gone round: 37 clients
    # joining within seconds make 37 x 36 pairwise sessions and sender keys, and on a slow
    # machine a message written in the first seconds waits past its 5 s for some of them
    # and goes without (its sender is told: `went_without_keys`). The soak is about what
    # comes after; a join storm's first messages are not what it measures.
    next_chat = {c.name: settled + KEYS_SETTLE + rng.uniform(0, CHAT_EVERY) for c in stayers}
    count = 0
    last_sample = 0.0
    while time.monotonic() < end:
        now = time.monotonic()
        for c in stayers:
            if now >= next_chat[c.name]:
                count += 1
                text = f"soak {c.name} {count}"
                c.say(text)
                sent.append((now, c.name, text))
                next_chat[c.name] = now + CHAT_EVERY
        for i, c in enumerate(churners):
            if now >= next_churn[i]:
                c.stop()
                # Someone new each time: the last one's name may still be taken until the
                # server sees it gone.
                generation[i] += 1
                churners[i] = Client(invite, f"churn{i}-{generation[i]}")
                next_churn[i] = now + rng.uniform(20, 40)
        if now >= next_talk:
            for i, c in enumerate(talkers):
                c.stop()
                talkers[i] = Client(invite, c.name, talk)
            next_talk = now + TALK_RUN
        if now - last_sample >= 5:
            rss.append((now, memory_kib(server.pid)))
            last_sample = now
        time.sleep(0.05)
    # Let the last messages arrive (on this machine the 50 clients share the server's two
    # cores, and a message can wait seconds for a newcomer's keys), then count.
    time.sleep(30)
    lost = []
    expected = 0
    joined = {c.name: c.joined_at for c in stayers}
    for at, sender, text in sent:
        for c in stayers:
            # Only what was written once both were in (and a little after, for keys); a
            # stayer that never got in is an error of its own.
            if c.name == sender or None in (c.joined_at, joined[sender]):
                continue
            if at < max(c.joined_at, joined[sender]) + 5:
                continue
            expected += 1
            if (sender, text) not in c.received:
                lost.append({"to": c.name, "from": sender, "text": text, "secs_before_end": round(end - at, 1)})
    server_drops, client_drops = udp_drops(port)
    for c in stayers + churners + talkers + listeners:
        c.stop()
    server.terminate()
    server.wait(timeout=10)
    after_warmup = [k for t, (k, _, _) in rss if t >= warmup_end]
    base = after_warmup[0] if after_warmup else 0
    growth = (max(after_warmup) - base) / base if base else 0.0
    anonymous = [a for t, (_, a, _) in rss if t >= warmup_end]
    report = {
        "minutes": MINUTES,
        "clients": STAYERS + CHURNERS + TALKERS + LISTENERS,
        "messages_written": len(sent),
        "deliveries_expected": expected,
        "deliveries_lost": len(lost),
        "errors": len(errors),
        "server_rss_kib_after_warmup": base,
        "server_rss_kib_max": max(after_warmup) if after_warmup else 0,
        "server_rss_growth": round(growth, 4),
        "server_anon_kib_after_warmup": anonymous[0] if anonymous else 0,
        "server_anon_kib_max": max(anonymous) if anonymous else 0,
        "warmup_secs": round(warmup_end - settled),
        "went_without_keys": sum(c.went_without_keys for c in stayers),
        "server_udp_drops": server_drops,
        "client_udp_drops": client_drops,
    }
    print(json.dumps(report))
    # The server's memory over the run, for a look at how it grew.
    with open(os.path.join(work, "rss.json"), "w") as f:
        json.dump([(round(t - settled, 1), *k) for t, k in rss], f)
    with open(os.path.join(work, "misses.json"), "w") as f:
        json.dump({"lost": lost, "errors": errors}, f)
    for item in (lost[:10] + errors[:10]):
        print(json.dumps(item), file=sys.stderr)
    if lost or errors:
        print(f"soak: every miss is in {work}/misses.json", file=sys.stderr)
    missing = [c.name for c in stayers if c.joined_at is None]
    report["stayers_not_in"] = len(missing)
    ok = not lost and not errors and not missing and growth < 0.10 and expected > 0
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
