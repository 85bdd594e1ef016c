#!/usr/bin/env python3
"""Checks the desktop app's notifications for direct messages on a real notification
server (`just notification-check`).

Everything is real and private to this run: an Xvfb screen, a D-Bus session bus, dunst (a
freedesktop notification server, printing each notification it shows), `voipc serve` on
loopback, the app in a fresh home driven by the keyboard (as `just screenshots` does), and
carol, a headless client, who sends alice direct messages. Twice: with the default settings
and with "Show the message in the notification". Each time:

  - alice's window loses the focus to another window: carol's first message is one
    notification, saying who wrote and (by default) not what, or (with the text) the text
    with its markup escaped;
  - three more at once are held, and the next one after the 5 s gap says how many came;
  - alice's window has the focus again: two messages 7 s apart give no notification.

It writes dunst's log and a screenshot of the first notification to OUT_DIR, and exits
non-zero when any of that does not hold.

Usage: notification_check.py VOIPC_BINARY OUT_DIR
"""

import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from screenshots import Run  # noqa: E402


def notifications(log_path):
    """(summary, body) of each notification dunst printed."""
    text = open(log_path).read()
    return re.findall(r"\tsummary: '(.*?)'\n\tbody: '(.*?)'\n\ticon:", text, re.DOTALL)


def send(carol, line, pause):
    Run.say(carol, line)
    time.sleep(pause)


def check(binary, out, show_text):
    name = "with-text" if show_text else "default"
    run = Run(binary, out)
    log_path = os.path.join(out, f"dunst-{name}.log")
    try:
        run.start_screen_and_sound()
        bus = os.path.join(run.dir, "bus")
        run.spawn(["dbus-daemon", "--session", "--nofork", f"--address=unix:path={bus}"])
        time.sleep(1)
        run.env["DBUS_SESSION_BUS_ADDRESS"] = f"unix:path={bus}"
        with open(log_path, "w") as log:
            run.spawn(["dunst", "-print"], stdout=log, stderr=subprocess.DEVNULL)
        time.sleep(1)
        invite = run.start_server()

        # The first start makes alice's identity and settings.
        app = run.app()
        time.sleep(4)
        run.fill_first_start("alice")
        run.keys("Tab", "Return")
        time.sleep(4)
        app.terminate()
        app.wait(timeout=10)
        if show_text:
            path = os.path.join(run.dir, "home", ".config", "voipc", "settings.toml")
            settings = open(path).read()
            if "notification_text = false" not in settings:
                sys.exit(f"notification-check: no notification_text in {path}")
            with open(path, "w") as f:
                f.write(settings.replace("notification_text = false", "notification_text = true"))

        # Opened on the invite: unlock, connect.
        carol = run.bot(invite, "carol")
        run.app(invite)
        run.unlock_and_connect()
        time.sleep(4)

        # Another window takes the focus (there is no window manager: xdotool gives it).
        run.spawn(["display", "-size", "300x200", "-title", "other", "xc:gray"])
        time.sleep(2)
        run.xdotool("search", "--sync", "--name", "^other$", "windowfocus", "--sync")
        time.sleep(1)
        send(carol, "/msg alice <b>bold</b> meet at nine", 1)
        run.shot(f"notification-{name}.png", settle=1)
        for i in range(3):
            send(carol, f"/msg alice flood {i}", 0.3)
        time.sleep(6)
        send(carol, "/msg alice after the gap", 2)

        run.focus()
        send(carol, "/msg alice while focused", 7)
        send(carol, "/msg alice while focused, again", 2)
    finally:
        run.close()

    seen = notifications(log_path)
    first_body = "&lt;b&gt;bold&lt;/b&gt; meet at nine" if show_text else "sent you a direct message"
    second_body = ("after the gap" if show_text else "sent you a direct message") + "\n(and 3 more messages)"
    expected = [("carol (VoIPC)", first_body), ("carol (VoIPC)", second_body)]
    print(f"notification-check ({name}): dunst showed {seen}")
    if seen != expected:
        sys.exit(f"notification-check ({name}): expected {expected}")


def main():
    binary, out = os.path.abspath(sys.argv[1]), sys.argv[2]
    os.makedirs(out, exist_ok=True)
    check(binary, out, show_text=False)
    check(binary, out, show_text=True)
    print("notification-check: passed")


if __name__ == "__main__":
    main()
