# VoIPC tasks. `just run` starts a server; `just test` runs the whole suite.

set shell := ["bash", "-euo", "pipefail", "-c"]
# Pass recipe arguments through as they are ("$@"), so invite links keep their & and ?.
set positional-arguments

# Debian packages the build and the tests need: gcc and make build aws-lc, protoc builds
# libsignal, cmake builds libopus, ALSA's headers build cpal; FFmpeg's headers and libclang
# build ffmpeg-next (screen share: HEVC through libx265 and the hardware encoders Debian's
# FFmpeg has); Xvfb is the screen the screen-share tests share; PulseAudio (with paplay,
# parec, and ALSA's plugin to reach it) is the sound card of the desktop-audio test;
# PipeWire's headers build the Wayland capture, and the Wayland test's desktop is D-Bus,
# PipeWire with WirePlumber, the portal frontend and a GStreamer picture on PipeWire;
# iproute2 for `just netem`; WebRTC's audio processing module is the echo canceller;
# xdotool, ImageMagick and Mesa draw, drive and photograph the app for `just screenshots`;
# dunst is the notification server of `just notification-check`.
packages := "build-essential pkg-config protobuf-compiler cmake libasound2-dev libwebrtc-audio-processing-dev iproute2 libavcodec-dev libavformat-dev libavutil-dev libswscale-dev libclang-dev xvfb pulseaudio pulseaudio-utils libasound2-plugins libpipewire-0.3-dev libspa-0.2-dev dbus-daemon pipewire wireplumber xdg-desktop-portal gstreamer1.0-pipewire gstreamer1.0-plugins-base gstreamer1.0-tools xdotool imagemagick libgl1-mesa-dri libegl1 dunst"

# List the recipes.
default:
    @just --list

# Install the system packages the build and tests need (quick when they are there).
setup:
    #!/usr/bin/env bash
    set -euo pipefail
    if ! command -v dpkg-query >/dev/null; then
        echo "setup: not a Debian-like system; install the equivalents of: {{packages}}" >&2
        exit 0
    fi
    missing=""
    for p in {{packages}}; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
    done
    if [ -n "$missing" ]; then
        sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
        echo "setup: installing$missing"
        $sudo apt-get update -qq
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing
    fi

# Build the optimised binary.
build: setup
    cargo build --release

# Build and run voipc: with no arguments the desktop app (`just run serve` hosts a server).
run *args: build
    ./target/release/voipc "$@"

# Host a server (arguments go to `voipc serve`, e.g. --config server.toml).
serve *args: build
    ./target/release/voipc serve "$@"

# Connect a headless client (arguments go to `voipc join`).
join *args: build
    ./target/release/voipc join "$@"

# Last, one at a time, the attacks and the real-time sound and screen tests that need the
# machine to themselves.
# The whole test suite: unit tests, then the real binary end to end.
test: setup
    cargo test --all-targets
    cargo test --test main -- --ignored --test-threads=1 --nocapture a_voice_flood a_handshake_flood fifty_handshakes a_shared_screen an_xvfb_screen a_wayland_screen a_lossy_link_never desktop_audio voice_goes_through_real_devices the_microphone_test_plays_back

# The package holds the binary, the desktop entry that opens voipc:// links, its icon,
# and the relay's systemd unit, installed disabled.
# Build the Debian package (target/debian/voipc_VERSION_ARCH.deb).
deb: setup
    command -v cargo-deb >/dev/null || cargo install cargo-deb --locked
    cargo deb --strip

# The clean system is a debootstrap chroot (its base kept in target/deb-test/base, each
# run installs into a fresh copy); it checks the help, the relay with an in-memory
# certificate, the desktop entry and the unit left disabled. Needs root and Debian's mirror.
# Install the package on a clean Debian 12 and run it there.
deb-test: deb
    #!/usr/bin/env bash
    set -euo pipefail
    [ "$(id -u)" -eq 0 ] || { echo "deb-test: needs root (it makes a chroot)" >&2; exit 1; }
    command -v debootstrap >/dev/null || env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap
    base=target/deb-test/base root=target/deb-test/root
    if [ ! -e "$base/.complete" ]; then
        rm -rf "$base"
        debootstrap --variant=minbase bookworm "$base" http://deb.debian.org/debian
        touch "$base/.complete"
    fi
    rm -rf "$root" && cp -a "$base" "$root"
    cp "$(ls -t target/debian/voipc_*.deb | head -1)" "$root/tmp/voipc.deb"
    cp /etc/resolv.conf "$root/etc/resolv.conf"
    mount -t proc proc "$root/proc"
    trap 'umount "$root/proc"' EXIT
    in_root() { chroot "$root" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root DEBIAN_FRONTEND=noninteractive "$@"; }
    in_root apt-get update -qq
    in_root apt-get install -y -qq --no-install-recommends /tmp/voipc.deb desktop-file-utils >/dev/null
    in_root dpkg-query -W -f='installed: voipc ${Version}, ${Installed-Size} KiB, depends on ${Depends}\n' voipc
    in_root voipc --help | head -3
    in_root desktop-file-validate /usr/share/applications/voipc.desktop
    grep -q '^MimeType=x-scheme-handler/voipc;' "$root/usr/share/applications/voipc.desktop"
    test -f "$root/usr/share/icons/hicolor/scalable/apps/voipc.svg"
    test -f "$root/usr/lib/systemd/system/voipc.service"
    ! find "$root/etc/systemd" -name voipc.service | grep -q . || { echo "deb-test: the unit is enabled" >&2; exit 1; }
    # The relay, from the package, with a certificate in memory only: it listens and
    # says its invite link; nothing is written.
    out=$(in_root timeout -s INT 5 voipc serve --ephemeral-cert --listen 127.0.0.1:0 2>&1 || true)
    echo "$out"
    grep -q '^invite link: voipc://' <<<"$out"
    in_root voipc mic-test --help >/dev/null
    echo "deb-test: installed on a clean Debian 12 and ran"

# Relay throughput and latency against a plain-UDP baseline, vault unlock time, chat message rates, voice codec and SFrame costs, then the micro-benchmarks.
bench *args: build
    ./target/release/voipc bench relay "$@"
    ./target/release/voipc bench vault
    ./target/release/voipc bench chat
    ./target/release/voipc bench codec
    ./target/release/voipc bench voice
    ./target/release/voipc bench video
    cargo bench --bench hot_paths

# The shape: CLIENTS in one channel, SPEAKERS of them talking 50 packets a second, SECS
# measured. murmur-load (../shared/peers/murmur-load, which installs and starts murmur)
# runs first, then voipc bench relay on the same shape beside the plain-UDP baselines; it
# prints every line and the ratios. The relays run on CPU 0 and the load generators on
# CPU 1 (pin=no lets the scheduler place them: figures then include both fighting over the
# same cores).
# voipc serve against the peer, Mumble's server (murmur 1.3.4 from Debian), on one shape.
bench-peer clients="100" speakers="20" secs="10" pin="yes": build
    #!/usr/bin/env bash
    set -euo pipefail
    peer=../shared/peers/murmur-load
    out=$(mktemp /tmp/voipc-bench-peer.XXXXXX)
    trap 'rm -f "$out"' EXIT
    pin_generator=() server_cpus=()
    if [ "{{pin}}" = yes ] && [ "$(nproc)" -ge 2 ]; then
        pin_generator=(taskset -c 1) server_cpus=(--server-cpus 0)
        # murmurd starts under run.sh on the generator's CPU; move all its threads to CPU 0.
        (for _ in $(seq 1 600); do
            if pid=$(pidof murmurd); then taskset -apc 0 "$pid" >/dev/null; break; fi
            sleep 0.1
        done) &
    fi
    "${pin_generator[@]}" "$peer/run.sh" {{clients}} {{speakers}} {{secs}} > "$out"
    echo "murmur-load: $(tail -n 1 "$out")"
    "${pin_generator[@]}" ./target/release/voipc bench relay --clients {{clients}} --speakers {{speakers}} \
        --secs {{secs}} "${server_cpus[@]}" --compare-with "$out"

# A server and two clients on a loopback-only host (a network namespace) that loses and
# delays datagrams: tc netem where the kernel has it, else voipc's own UDP impairer between
# the clients and the server. Needs root.

# Voice at 0, 5 and 15 % loss with up to 30 ms of jitter: how each recording matches the speech.
bad-network: build
    #!/usr/bin/env bash
    set -euo pipefail
    ns=voipc-bad-network
    out=target/bad-network
    mkdir -p "$out"
    ip netns del "$ns" 2>/dev/null || true
    ip netns add "$ns"
    pids=()
    trap 'kill "${pids[@]}" 2>/dev/null || true; ip netns del "$ns" 2>/dev/null || true' EXIT
    ip -n "$ns" link set lo up
    export VOIPC_VAULT_PASSWORD=bad-network
    voipc="$PWD/target/release/voipc"
    in_ns() { ip netns exec "$ns" "$@"; }
    first_json() { python3 -c "import json,sys; print(json.loads(open(sys.argv[1]).readline())[sys.argv[2]])" "$@"; }
    for loss in 0 5 15; do
        # Voice crosses two impaired hops (to the relay, then on to the listener): per-hop
        # loss p with 1-(1-p)^2 = loss, and up to 15 ms of delay per hop.
        hop=$(python3 -c "print(round(1 - (1 - $loss / 100) ** 0.5, 4))")
        dir="$out/$loss"; rm -rf "$dir"; mkdir -p "$dir"
        in_ns "$voipc" serve --listen 127.0.0.1:0 --ephemeral-cert --json > "$dir/server.json" 2> "$dir/server.log" &
        pids+=($!)
        sleep 1
        invite=$(first_json "$dir/server.json" invite)
        if in_ns tc qdisc replace dev lo root netem loss "$(python3 -c "print($hop * 100)")%" delay 7.5ms 7.5ms 2>/dev/null; then
            how="tc netem"
        else
            how="voipc bench impair (no netem in this kernel)"
            server=$(first_json "$dir/server.json" addr)
            in_ns "$voipc" bench impair --listen 127.0.0.1:0 --to "$server" --loss "$hop" --jitter-ms 15 --seed "$loss" \
                > "$dir/impair.json" 2>&1 &
            pids+=($!)
            sleep 0.5
            invite=${invite/$server/$(first_json "$dir/impair.json" addr)}
        fi
        in_ns "$voipc" join "$invite" --name bob --data-dir "$dir/bob" --record "$dir/bob.wav" --duration 14 --json \
            < /dev/null > "$dir/bob.json" 2> "$dir/bob.log" &
        listener=$!
        sleep 2
        in_ns "$voipc" join "$invite" --name alice --data-dir "$dir/alice" --play assets/speech.wav --duration 9 --json \
            < /dev/null > "$dir/alice.json" 2> "$dir/alice.log"
        wait "$listener"
        kill "${pids[@]}" 2>/dev/null || true
        pids=()
        echo "loss $loss % ($how): $("$voipc" bench compare assets/speech.wav "$dir/bob.wav")"
        grep voice_stats "$dir/bob.json"
    done

# The flags cargo-fuzz gives rustc for libFuzzer's coverage, all of them stable: no nightly.
fuzz_rustflags := "--cfg fuzzing -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table -Cllvm-args=-sanitizer-coverage-trace-compares"

# It grows the corpus in fuzz/corpus; a crash stops the run with its input in fuzz/artifacts.
# Coverage-guided fuzzing (libFuzzer): every target in fuzz/ for SECONDS each.
fuzz seconds="60": setup
    #!/usr/bin/env bash
    set -euo pipefail
    # An explicit --target keeps the coverage flags off build scripts and proc macros.
    host=$(rustc -vV | sed -n 's/^host: //p')
    RUSTFLAGS="{{fuzz_rustflags}}" cargo build --release --manifest-path fuzz/Cargo.toml --target "$host" --target-dir target/fuzz --bins
    for source in fuzz/fuzz_targets/*.rs; do
        name=$(basename "$source" .rs)
        mkdir -p "fuzz/corpus/$name" "fuzz/artifacts/$name"
        log="target/fuzz/$name.log"
        if ! "target/fuzz/$host/release/$name" -max_total_time="{{seconds}}" -print_final_stats=1 \
            -rss_limit_mb=2048 -malloc_limit_mb=256 -artifact_prefix="fuzz/artifacts/$name/" \
            "fuzz/corpus/$name" > "$log" 2>&1; then
            tail -n 30 "$log"
            echo "fuzz: $name crashed; its input is in fuzz/artifacts/$name/" >&2
            exit 1
        fi
        runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
        coverage=$(grep -o 'cov: [0-9]*' "$log" | tail -n 1 | cut -d' ' -f2)
        echo "fuzz: $name: $runs runs in {{seconds}} s, $coverage edges, $(ls "fuzz/corpus/$name" | wc -l) inputs in the corpus, 0 crashes"
    done

# 40 write to the channel every 5 s, 5 come and go, 5 talk; it fails unless no message
# between stayers was lost, no client saw an error and the server's memory grew < 10 %
# after the warm-up. The debug build (the one `just test` makes).
# 50 clients on one server for MINUTES.
soak minutes="10": setup
    cargo build
    python3 tools/soak.py target/debug/voipc {{minutes}}

# Formatting and clippy, warnings denied.
lint:
    cargo fmt --check
    cargo clippy --all-targets -- -D warnings

# They show the first start, the audio setup it opens, a channel where people talk and chat,
# and the settings: the app in a fresh home under Xvfb, against a local server with
# headless clients, a private PulseAudio as its sound card, driven by the keyboard.
# Take the README's screenshots of the app (assets/screenshots).
screenshots: build
    python3 tools/screenshots.py target/release/voipc assets/screenshots

# The app under Xvfb with a D-Bus session bus and dunst, which prints what it shows: a
# direct message while the window is not focused is one notification (who wrote, or the
# escaped text when the settings ask), a flood one per 5 s, and none while it is focused.
# Check the direct-message notifications on a real notification server.
notification-check: build
    python3 tools/notification_check.py target/release/voipc target/notification-check
