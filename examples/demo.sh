#!/usr/bin/env bash
# Builds mlx-dist and asks the built-in demo model (SmolLM2-135M-Instruct) a
# chat question.
source "$(dirname "$0")/../.ci/env.sh"
"${UV[@]}" run --locked mlx-dist generate --prompt "${1:-What is the capital of France?}" --max-tokens 64
