# Sourced by .ci/run and examples/*.sh: makes sure uv is there and the
# project environment (Rust extension included) is built and current.
set -euo pipefail
cd "$(git -C "$(dirname "${BASH_SOURCE[0]}")" rev-parse --show-toplevel)"

# A venv of uv's own, used where pip may not install for the user.
uv_venv="${MLX_DIST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mlx-dist}/uv"

# Sets UV to a working uv: on PATH, a Python module, where `pip install
# --user` puts its command (a folder often not on PATH), or in $uv_venv.
find_uv() {
    if command -v uv >/dev/null 2>&1; then
        UV=(uv)
    elif python3 -m uv --version >/dev/null 2>&1; then
        UV=(python3 -m uv)
    else
        local base bin
        # Its exit status says whether the user site is enabled: the path is what counts.
        base=$(python3 -m site --user-base 2>/dev/null || true)
        for bin in ${base:+"$base/bin/uv"} "$uv_venv/bin/uv"; do
            if "$bin" --version >/dev/null 2>&1; then
                UV=("$bin")
                return
            fi
        done
        return 1
    fi
}

# pip for this user first; where that is refused (inside a venv, a system
# Python marked externally managed, no pip at all), a venv of uv's own, which
# `python3 -m venv` gives a pip of its own.
install_uv() {
    echo "installing uv ..." >&2
    local log
    log=$(mktemp)
    if { python3 -m pip install --quiet --user uv && find_uv; } >"$log" 2>&1 ||
        { python3 -m venv --clear "$uv_venv" &&
            "$uv_venv/bin/python" -m pip install --quiet uv && find_uv; } >>"$log" 2>&1; then
        rm -f "$log"
        return
    fi
    cat "$log" >&2
    rm -f "$log"
    echo "could not install uv: install it (https://docs.astral.sh/uv/getting-started/installation/)," \
        "or pip and venv for python3 (e.g. apt install python3-pip python3-venv)" >&2
    return 1
}

find_uv || install_uv
export UV_PYTHON_DOWNLOADS=never
# `sync --quiet` says nothing for minutes while it compiles the extension:
# announce that when uv's plan includes building mlx-dist.
if ! plan=$("${UV[@]}" sync --locked --dry-run 2>&1); then
    echo "checking the environment (a first build of the extension takes several minutes) ..." >&2
elif [[ $'\n'$plan == *$'\n + mlx-dist '* ]]; then
    echo "building the mlx-dist extension (Rust: 3 to 5 minutes the first time on 2 cores) ..." >&2
fi
"${UV[@]}" sync --locked --quiet
export PYO3_PYTHON="$PWD/.venv/bin/python"
