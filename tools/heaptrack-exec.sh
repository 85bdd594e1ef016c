#!/bin/bash
# Runs a command under heaptrack with the command's own pid (heaptrack's script keeps itself
# as the parent, so a reader of /proc/PID would measure the script). For the soak:
#   SOAK_SERVER_WRAP=tools/heaptrack-exec.sh python3 tools/soak.py BIN MINUTES
# The profile goes to $HEAPTRACK_DIR (default /tmp/heaptrack) as server.PID.zst; read it
# with heaptrack_print (its fifo stays beside it). Needs Debian's heaptrack and zstd.
set -euo pipefail
dir=${HEAPTRACK_DIR:-/tmp/heaptrack}
mkdir -p "$dir"
pipe="$dir/fifo.$$"
mkfifo "$pipe"
/usr/lib/heaptrack/libexec/heaptrack_interpret < "$pipe" | zstd -q -c > "$dir/server.$$.zst" &
exec env LD_PRELOAD=/usr/lib/heaptrack/libheaptrack_preload.so DUMP_HEAPTRACK_OUTPUT="$pipe" "$@"
