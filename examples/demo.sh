#!/usr/bin/env bash
# Builds mlx-dist, starts a local cluster of two workers, serves the built-in
# demo model (SmolLM2-135M-Instruct) split over them with the OpenAI API, and
# asks it a chat question through the official OpenAI client.
source "$(dirname "$0")/../.ci/env.sh"
bin=.venv/bin/mlx-dist
tmp=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$tmp"' EXIT

# Starts "$@" in the background and prints the address from its "listening on" line.
start() {
    local out="$tmp/$1.out" log="$tmp/$1.log"
    shift
    "$@" >"$out" 2>"$log" &
    pids+=($!)
    for _ in $(seq 600); do
        grep -q '^listening on' "$out" && { awk '/^listening on/ {print $3; exit}' "$out"; return; }
        kill -0 "${pids[-1]}" 2>/dev/null || { cat "$log" >&2; exit 1; }
        sleep 0.2
    done
    echo "timed out starting $*" >&2
    exit 1
}

w1=$(start w1 "$bin" worker --port 0 --name worker-1)
w2=$(start w2 "$bin" worker --port 0 --name worker-2)
echo "local cluster: $w1 $w2" >&2
url=$(start server "$bin" serve --port 0 --workers "$w1,$w2" --strategy uniform)
cat "$tmp/server.out" >&2   # the plan: which worker holds which layers
echo "serving on $url" >&2
.venv/bin/python examples/chat_client.py "$url" "${1:-What is the capital of France?}"
