#!/usr/bin/env python3
"""Takes the README's screenshots of the desktop app (`just screenshots`).

Everything is real and private to this run: an Xvfb screen, a PulseAudio server with a
virtual microphone that speaks assets/speech.wav and a null speaker, `voipc serve` on
loopback with three channels, two headless clients (bob talks, carol chats), and the app
itself in a fresh home, driven by the keyboard through xdotool the way a user would:

  first-start.png   the first start (name and vault password)
  audio-setup.png   the audio setup it opens next, the microphone speaking
  channel.png       a channel with people talking and chatting (bob's speaking ring)
  watching.png      frank's shared screen (a made-up desktop) watched in the channel view
  settings.png      the settings window

Usage: screenshots.py VOIPC_BINARY OUT_DIR
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEECH = os.path.join(ROOT, "assets", "speech.wav")
DISPLAY = ":73"
SIZE = "1000x680"
PASSWORD = "correct horse battery staple"

CONFIG = """
[[channels]]
name = "Lobby"
description = "Where everyone lands"

[[channels]]
name = "Games"
description = "Tuesday nights"

[[channels]]
name = "Staff"
password = "staff only"
user_limit = 10
"""


def wait_for(what, done, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            sys.exit(f"screenshots: waited for {what}")
        time.sleep(0.1)


class Run:
    def __init__(self, binary, out):
        self.binary, self.out = binary, out
        self.dir = tempfile.mkdtemp(prefix="voipc-shots-")
        self.children = []
        self.env = {"PATH": os.environ["PATH"], "DISPLAY": DISPLAY, "LANG": "C.UTF-8"}

    def spawn(self, args, env=None, **kw):
        child = subprocess.Popen(args, env={**self.env, **(env or {})}, **kw)
        self.children.append(child)
        return child

    def xdotool(self, *args):
        subprocess.run(["xdotool", *args], env=self.env, check=True)

    def focus(self):
        """Gives the app's window the keyboard (there is no window manager to do it)."""
        self.xdotool("search", "--sync", "--name", "^VoIPC$", "windowfocus", "--sync")
        time.sleep(0.3)

    def click(self, x, y):
        self.xdotool("mousemove", str(x), str(y), "click", "1")
        time.sleep(0.3)

    def keys(self, *keys):
        for key in keys:
            self.xdotool("key", "--clearmodifiers", key)
            time.sleep(0.25)

    def type(self, text):
        self.xdotool("type", "--delay", "60", text)
        time.sleep(0.3)

    def shot(self, name, settle=1.5):
        time.sleep(settle)
        path = os.path.join(self.out, name)
        subprocess.run(["import", "-window", "root", "-crop", f"{SIZE}+0+0", path], env=self.env, check=True)
        print(f"screenshots: {path}")

    def fill_first_start(self, name):
        """Types the first start's name and vault password (twice), not yet confirmed."""
        self.focus()
        self.keys("Tab")
        self.type(name)
        self.keys("Tab")
        self.type(PASSWORD)
        self.keys("Tab")
        self.type(PASSWORD)

    def unlock_and_connect(self):
        """In an app opened on an invite: unlocks the vault and connects."""
        time.sleep(4)
        self.focus()
        self.keys("Tab")
        self.type(PASSWORD)
        self.keys("Return")
        time.sleep(3)
        self.keys("Tab", "Return")

    def start_screen_and_sound(self):
        self.spawn(["Xvfb", DISPLAY, "-screen", "0", f"{SIZE}x24", "-nolisten", "tcp"])
        wait_for("Xvfb", lambda: os.path.exists(f"/tmp/.X11-unix/X{DISPLAY[1:]}"))
        pulse = os.path.join(self.dir, "pulse")
        os.makedirs(pulse)
        socket = os.path.join(pulse, "native")
        self.spawn(
            ["pulseaudio", "-n", "--daemonize=no", "--exit-idle-time=-1", "--use-pid-file=no",
             "-L", f"module-native-protocol-unix socket={socket} auth-anonymous=1",
             "-L", "module-null-sink sink_name=speakers rate=48000 sink_properties=device.description=Speakers",
             "-L", "module-null-sink sink_name=mic_feed rate=48000",
             "-L", "module-remap-source source_name=microphone master=mic_feed.monitor "
                   "source_properties=device.description=Microphone"],
            env={"HOME": pulse, "XDG_RUNTIME_DIR": pulse},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for("pulseaudio", lambda: os.path.exists(socket))
        self.env["PULSE_SERVER"] = f"unix:{socket}"

    def speak(self):
        """The virtual microphone says the speech sample, over and over."""
        return self.spawn(["sh", "-c", f"while true; do paplay --device=mic_feed '{SPEECH}'; done"])

    def start_server(self):
        config = os.path.join(self.dir, "server.toml")
        with open(config, "w") as f:
            f.write(CONFIG)
        server = self.spawn([self.binary, "serve", "--config", config, "--ephemeral-cert", "--listen",
                             "127.0.0.1:0", "--json"], stdout=subprocess.PIPE, text=True)
        line = json.loads(server.stdout.readline())
        return line["invite"]

    def bot(self, invite, name, *args):
        data = os.path.join(self.dir, name)
        return self.spawn([self.binary, "join", invite, "--name", name, "--json", "--data-dir", data, *args],
                          env={"VOIPC_VAULT_PASSWORD": "bot vault password"},
                          stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)

    def app(self, *args):
        home = os.path.join(self.dir, "home")
        os.makedirs(home, exist_ok=True)
        return self.spawn([self.binary, *args], env={"HOME": home, "XDG_RUNTIME_DIR": self.dir,
                                                     "LIBGL_ALWAYS_SOFTWARE": "1"})

    @staticmethod
    def say(bot, line):
        """A headless client's line on its standard input: chat, or a command."""
        bot.stdin.write(line + "\n")
        bot.stdin.flush()

    def close(self):
        for child in reversed(self.children):
            child.send_signal(signal.SIGTERM)
        for child in self.children:
            try:
                child.wait(timeout=5)
            except subprocess.TimeoutExpired:
                child.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def main():
    binary, out = os.path.abspath(sys.argv[1]), sys.argv[2]
    os.makedirs(out, exist_ok=True)
    run = Run(binary, out)
    try:
        run.start_screen_and_sound()
        run.speak()
        invite = run.start_server()

        # 1. First start: name and vault password; then the audio setup it opens.
        app = run.app()
        run.shot("first-start.png", settle=4)
        run.fill_first_start("alice")
        run.shot("first-start.png", settle=0.5)
        run.keys("Tab", "Return")
        run.shot("audio-setup.png", settle=5)
        app.terminate()
        app.wait(timeout=10)

        # 2. A later start, opened with an invite link (as the browser would): unlock,
        # connect, and meet bob, who talks, and carol, who chats.
        carol = run.bot(invite, "carol")
        bob = run.bot(invite, "bob", "--play", SPEECH)
        run.app(invite)
        run.unlock_and_connect()
        time.sleep(3)
        for line in ["evening all", "the new server sounds great", "anyone up for a game later?"]:
            run.say(carol, line)
            time.sleep(0.7)
        run.say(bob, "/quit")
        bob.wait(timeout=10)
        bob = run.bot(invite, "bob", "--play", SPEECH)
        run.shot("channel.png", settle=4)

        # 3. frank shares a made-up desktop; alice clicks "Watch" beside him.
        clip = os.path.join(run.dir, "desktop.y4m")
        subprocess.run([sys.executable, os.path.join(ROOT, "tools", "screen_clip.py"), clip, "1280", "720", "60"],
                       check=True, stdout=subprocess.DEVNULL)
        run.bot(invite, "frank", "--share-screen", clip, "--share-resolution", "720p", "--share-fps", "10")
        time.sleep(6)
        # Where "Watch" is beside frank, the fourth in the Lobby, in the 1000x680 window: a
        # change of the channel list's layout means new coordinates here.
        run.click(130, 132)
        run.shot("watching.png", settle=8)

        # 4. The settings, from the top bar's right end.
        run.click(848, 12)
        run.shot("settings.png")
    finally:
        run.close()


if __name__ == "__main__":
    main()
