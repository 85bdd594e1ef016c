#!/usr/bin/env python3
"""Where `voipc serve`'s CPU goes under one load shape: runs `voipc bench relay --clients N
--speakers M --channels C`, records the server process with `perf record` (call graphs) for
a few seconds in the middle of its measurement, and prints the share of the server's samples
by where the time was spent (self time, so the shares add up to 100 %):

  kernel: send  every kernel function under sendmsg/sendmmsg (UDP, IP, and on loopback the
                receiver's softirq, which the sender pays for)
  kernel: recv  under recvmsg/recvmmsg
  kernel: other epoll, futex, scheduling, timers
  crypto        aws-lc (AES-GCM seal/open, header protection)
  quinn         quinn, quinn-proto, quinn-udp outside crypto and system calls
  runtime       tokio
  ours          voipc's own code (routing, legs, flushes)
  libc/alloc    memcpy, malloc and the rest of libc

Usage: tools/relay_profile.py VOIPC CLIENTS SPEAKERS CHANNELS [SECS] [--threads N]
"""

import collections
import os
import subprocess
import sys
import tempfile
import time


def classify(symbol: str, dso: str, stack: list[str]) -> str:
    """The category of a sample spent in `symbol`; the standard library's generic code
    (collections, Arc, Bytes) counts for the first caller that has a category."""
    if dso.startswith("[kernel"):
        joined = " ".join(stack)
        if "sendmsg" in joined or "sendmmsg" in joined:
            return "kernel: send"
        if "recvmsg" in joined or "recvmmsg" in joined:
            return "kernel: recv"
        return "kernel: other"
    if "aws_lc" in symbol or "aes" in symbol or "gcm" in symbol or "rustls" in symbol:
        return "crypto"
    if symbol.startswith("quinn"):
        return "quinn"
    if symbol.startswith("tokio") or symbol.startswith("mio"):
        return "runtime"
    if "voipc" in symbol:
        return "ours"
    if "libc" in dso or "malloc" in symbol or "memmove" in symbol or "memcpy" in symbol:
        return "libc/alloc"
    for caller in stack[1:]:
        found = classify(caller, "", [])
        if found != "other":
            return found
    return "other"


def main() -> None:
    args = sys.argv[1:]
    threads = "1"
    if "--threads" in args:
        i = args.index("--threads")
        threads = args[i + 1]
        del args[i : i + 2]
    voipc, clients, speakers, channels = args[:4]
    secs = int(args[4]) if len(args) > 4 else 12
    bench = subprocess.Popen(
        [voipc, "bench", "relay", "--clients", clients, "--speakers", speakers, "--channels", channels,
         "--secs", str(secs), "--server-threads", threads],
        stdout=subprocess.PIPE, text=True)
    # The server starts first; the clients connect, then the measurement runs `secs`.
    pid = None
    for _ in range(600):
        found = subprocess.run(["pgrep", "-f", "voipc serve"], capture_output=True, text=True).stdout.split()
        if found:
            pid = found[0]
            break
        time.sleep(0.1)
    if pid is None:
        sys.exit("the bench did not start a server")
    time.sleep(min(8, secs / 2))
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "perf.data")
        subprocess.run(["perf", "record", "-q", "-F", "999", "-g", "-p", pid, "-o", data, "--", "sleep",
                        str(max(2, secs // 3))], check=True)
        script = subprocess.run(["perf", "script", "-i", data, "-F", "ip,sym,dso"], capture_output=True,
                                text=True, check=True).stdout
    out, _ = bench.communicate()
    print(out, end="")
    shares = collections.Counter()
    unclassified = collections.Counter()
    total = 0
    # One sample per blank-line-separated block: the first line is where the time was
    # spent, the rest its callers.
    for block in script.split("\n\n"):
        frames = [line.split(None, 1)[1] for line in block.strip().splitlines() if len(line.split(None, 1)) == 2]
        if not frames:
            continue
        symbols = [f.rsplit(" (", 1)[0] for f in frames]
        dso = frames[0].rsplit(" (", 1)[1].rstrip(")") if " (" in frames[0] else ""
        category = classify(symbols[0], dso, symbols)
        shares[category] += 1
        if category == "other":
            unclassified[f"{symbols[0]} ({dso})"] += 1
        total += 1
    if total == 0:
        # An empty profile is a failure, not a table: it happened twice, unexplained, while
        # perf's messages went to /dev/null.
        sys.exit(f"relay_profile: perf recorded no samples of process {pid}")
    print(f"\nserver profile, {total} samples at 999 Hz (self time):")
    for name, count in shares.most_common():
        print(f"  {name:<14} {100 * count / total:5.1f} %")
    if unclassified:
        print("most of other:", "; ".join(f"{s} {100 * n / total:.1f} %" for s, n in unclassified.most_common(4)))


if __name__ == "__main__":
    main()
