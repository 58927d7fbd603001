#!/usr/bin/env bash
# Builds mlx-dist, starts a local cluster of two workers, splits the built-in
# demo model (SmolLM2-135M-Instruct) over them and asks it a chat question.
source "$(dirname "$0")/../.ci/env.sh"
bin=.venv/bin/mlx-dist
tmp=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$tmp"' EXIT
workers=()
for i in 1 2; do
    "$bin" worker --port 0 --name "worker-$i" >"$tmp/$i.out" 2>"$tmp/$i.log" &
    pids+=($!)
    for _ in $(seq 300); do
        grep -q '^listening on' "$tmp/$i.out" && break
        kill -0 "${pids[-1]}" 2>/dev/null || { cat "$tmp/$i.log" >&2; exit 1; }
        sleep 0.2
    done
    workers+=("$(awk '/^listening on/ {print $3; exit}' "$tmp/$i.out")")
done
echo "local cluster: ${workers[*]}" >&2
"$bin" generate --workers "$(IFS=,; echo "${workers[*]}")" --strategy uniform \
    --prompt "${1:-What is the capital of France?}" --max-tokens 64
