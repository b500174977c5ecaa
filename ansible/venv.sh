#!/usr/bin/env bash
# Creates (once) the Python venv the Ansible collection's tests run in and
# prints its path. The venv is cached under $REIMAGE_CI_CACHE (default
# /var/cache/reimage-ci), keyed by a hash of requirements.txt and the Python
# version, so reruns are instant and a change of either builds a new one.
# Self-contained on purpose: it does not share code with the SDK venvs.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# Debian's python3 (what .ci/run installs), not whatever PATH finds first.
python="${REIMAGE_PYTHON:-/usr/bin/python3}"
requirements="$here/requirements.txt"
version="$("$python" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')"
key="$( { cat "$requirements"; echo "python $version"; } | sha256sum | cut -c1-16)"
cache="${REIMAGE_CI_CACHE:-/var/cache/reimage-ci}"
venv="$cache/venv-ansible-$key"
if [ ! -x "$venv/bin/ansible-playbook" ] || [ ! -f "$venv/.complete" ]; then
    # A venv records its own path, so it is built where it lives; one cut
    # short (no .complete) is built again from scratch.
    mkdir -p "$cache"
    rm -rf "$venv"
    echo "ansible/venv.sh: creating $venv" >&2
    "$python" -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements" >&2
    touch "$venv/.complete"
fi
echo "$venv"
