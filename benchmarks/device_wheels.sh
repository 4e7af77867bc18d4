#!/usr/bin/env bash
# Run HERE (not on the device): fetch the wheels that the GPU machine's python3
# (3.12, x86-64) lacks into .whl/ (git-ignored), for device calls that carry
# `.whl` and start with
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
#       --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
# The engine needs msgspec and pyzmq (the core client); SERVE=1 adds what
# `ember serve` and `ember bench serve` need (FastAPI, uvicorn, pydantic...).
set -euo pipefail
cd "$(dirname "$0")/.."
# The versions CI installs today (pip list after `make test`, 2026-12-01).
pkgs=(msgspec==0.23.0 pyzmq==27.3.0)
if [ "${SERVE:-0}" = 1 ]; then
  pkgs+=(fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 h11==0.16.0 pydantic==2.13.4 pydantic-core==2.46.4
         annotated-types==0.7.0 annotated-doc==0.0.7 typing-inspection==0.4.2 typing-extensions==4.16.0
         anyio==4.16.0 sniffio==1.3.1 prometheus-client==0.26.0 click==8.5.1 httpx==0.28.1 httpcore==1.0.9
         idna==3.20 certifi==2026.5.20 opentelemetry-api==1.45.2)
fi
plat=()
for n in 28 27 17; do plat+=(--platform "manylinux_2_${n}_x86_64"); done
plat+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${plat[@]}" -d .whl "${pkgs[@]}"
ls -la .whl
