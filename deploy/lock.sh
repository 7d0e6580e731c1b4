#!/usr/bin/env bash
# Rewrite deploy/requirements.lock: the image's dependencies, pinned to the versions the
# test environment (.venv) runs, each with the hashes of its files on PyPI. The image
# installs them with `pip install --require-hashes`.
#   deploy/lock.sh            (needs network access to pypi.org)
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
.venv/bin/python -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet pip-tools
# The tested versions, as constraints: the lock resolves to them.
.venv/bin/pip freeze --exclude-editable | grep -v -e '^thoughtwire' -e ' @ ' > "$work/tested.txt"
# Hashes from PyPI only: no local wheel directory or other index may add its own files.
env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_INDEX_URL PIP_CONFIG_FILE=/dev/null \
    CUSTOM_COMPILE_COMMAND="deploy/lock.sh" \
    "$work/venv/bin/pip-compile" --quiet --generate-hashes --strip-extras --no-annotate \
    --index-url https://pypi.org/simple --no-emit-index-url --no-emit-find-links \
    --constraint "$work/tested.txt" --output-file deploy/requirements.lock pyproject.toml
# What builds the wheel in the image's first stage (pyproject.toml's build-system).
echo "setuptools>=77" > "$work/build.in"
env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_INDEX_URL PIP_CONFIG_FILE=/dev/null \
    CUSTOM_COMPILE_COMMAND="deploy/lock.sh" \
    "$work/venv/bin/pip-compile" --quiet --generate-hashes --no-annotate --allow-unsafe \
    --index-url https://pypi.org/simple --no-emit-index-url --no-emit-find-links \
    --output-file deploy/build.lock "$work/build.in"
