# Sourced by .ci/run and examples/*.sh: makes sure uv is there and the
# project environment (Rust extension included) is built and current.
set -euo pipefail
cd "$(git -C "$(dirname "${BASH_SOURCE[0]}")" rev-parse --show-toplevel)"
if command -v uv >/dev/null 2>&1; then
    UV=(uv)
elif python3 -m uv --version >/dev/null 2>&1; then
    UV=(python3 -m uv)
else
    echo "installing uv ..." >&2
    python3 -m pip install --quiet --user uv 2>/dev/null || python3 -m pip install --quiet uv
    UV=(python3 -m uv)
fi
export UV_PYTHON_DOWNLOADS=never
"${UV[@]}" sync --locked --quiet
export PYO3_PYTHON="$PWD/.venv/bin/python"
