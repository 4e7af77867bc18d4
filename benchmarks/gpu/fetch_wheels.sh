#!/usr/bin/env bash
# Run on a machine with a package index: download into .whl/ (git-ignored) the
# wheels of the engine's pure-Python dependencies that a GPU machine without
# one lacks (CPython 3.12, x86-64). benchmarks/gpu/_common.sh installs them
# there when .whl/ travels with the checkout.
# The engine needs msgspec and pyzmq (the core client) and xgrammar with its
# needs (structured outputs) and compressed-tensors (its checkpoints); SERVE=1 adds what
# `ember serve` and `ember bench serve` need (FastAPI, uvicorn, pydantic...).
# Usage: [SERVE=1] [GGUF=1] bash benchmarks/gpu/fetch_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
# The versions `make test` installs (pip list).
pkgs=(msgspec==0.23.0 pyzmq==27.3.0 xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2 pydantic==2.13.4
      pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 typing-extensions==4.16.0
      compressed-tensors==0.20.1 loguru==0.7.3)
if [ "${GGUF:-0}" = 1 ]; then  # reading GGUF files (its needs numpy, pyyaml, requests, tqdm are there)
  pkgs+=(gguf==0.19.0)
fi
if [ "${SERVE:-0}" = 1 ]; then
  pkgs+=(fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 h11==0.16.0 annotated-doc==0.0.7
         anyio==4.16.0 sniffio==1.3.1 prometheus-client==0.26.0 click==8.5.1 httpx==0.28.1 httpcore==1.0.9
         idna==3.20 certifi==2026.5.20 opentelemetry-api==1.45.2)
fi
plat=()
for n in 28 27 17; do plat+=(--platform "manylinux_2_${n}_x86_64"); done
plat+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${plat[@]}" -d .whl "${pkgs[@]}"
ls -la .whl
