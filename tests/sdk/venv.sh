#!/usr/bin/env bash
# Creates (or reuses) the pinned Python venv for one SDK test, or for all of
# them with --all, under ${REIMAGE_CI_CACHE:-/var/cache/reimage-ci}, keyed by
# a hash of the requirements file and the Python version, and prints its path.
#
#   bash tests/sdk/venv.sh batch15        # -> /var/cache/reimage-ci/venv-batch15-<hash>
#   bash tests/sdk/venv.sh --all
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cache="${REIMAGE_CI_CACHE:-/var/cache/reimage-ci}"
python="${REIMAGE_PYTHON:-python3}"

# The venv's path for NAME, whether or not it exists yet.
venv_path() {
    local name="$1" req="$here/requirements-$1.txt" key
    [ -f "$req" ] || { echo "venv.sh: no $req" >&2; return 1; }
    key="$( { cat "$req"; "$python" --version 2>&1; } | sha256sum | cut -c1-16)"
    echo "$cache/venv-$name-$key"
}

make_venv() {
    local name="$1" dir
    dir="$(venv_path "$name")"
    if [ -x "$dir/bin/python" ] && [ -f "$dir/.complete" ]; then
        echo "$dir"
        return
    fi
    mkdir -p "$cache"
    # A venv's scripts name its own path, so it is built where it stays;
    # .complete marks one whose install finished.
    rm -rf "$dir"
    echo "venv.sh: creating $dir" >&2
    "$python" -m venv "$dir"
    "$dir/bin/python" -m pip install --quiet --disable-pip-version-check \
        -r "$here/requirements-$name.txt" >&2
    touch "$dir/.complete"
    echo "$dir"
}

case "${1:-}" in
    --all)
        for req in "$here"/requirements-*.txt; do
            name="$(basename "$req" .txt)"
            make_venv "${name#requirements-}"
        done
        ;;
    --path)
        venv_path "${2:?--path NAME}"
        ;;
    "" | -*)
        echo "usage: venv.sh NAME|--all|--path NAME" >&2
        exit 2
        ;;
    *)
        make_venv "$1"
        ;;
esac
