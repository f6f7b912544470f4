#!/usr/bin/env bash
# Builds the two library kits bench/speed.py needs on the GPU machine, which has no package registry (see the device
# notes: files reach it only inside the repository tree, 64 MiB a call). Run here, where pip reaches the registry:
#   bash bench/make_kits.sh            -> .bench/site.tar.xz  .bench/uns.tar.xz   (.bench/ is git-ignored locally)
# On the GPU machine:  tar -xJf .bench/site.tar.xz -C /tmp && tar -xJf .bench/uns.tar.xz -C /tmp
#   site: /tmp/site -- what tuneforge and the TRL contenders run on (PYTHONPATH=/tmp/site:src)
#   uns:  /tmp/uns  -- Unsloth on its own pins (bench/speed.py --unsloth-path /tmp/uns); it runs on the machine's
#         transformers (5.17.0 when last read), the newest Unsloth allows.
# Only what the machine's image lacks (or holds at another version) goes in; bitsandbytes keeps only its CUDA 13
# library (the image's torch is a CUDA 13 build) to stay under the carry limit.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=(python3 -m pip install -q --no-deps --no-compile --only-binary=:all: --python-version 3.12 --implementation cp
     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
COMMON=(bitsandbytes==0.50.2 dill==0.4.1 "multiprocess==0.70.19" pydantic==2.14.4 pydantic_core==2.50.5
        annotated_types==0.8.0 typing_inspection==0.4.5 typing_extensions==4.16.0)
SITE=(transformers==5.24.0 trl==1.16.0 peft==0.21.2 datasets==5.2.0 liger-kernel==0.8.5 accelerate==1.16.0
      huggingface_hub==2.5.0 httpx2==2.17.0 httpcore2==2.17.0 tokenizers==0.23.3 safetensors==0.8.0
      fsspec==2026.9.0 jsonschema==4.26.0 jsonschema_specifications==2025.9.1 referencing==0.37.0
      rpds_py==2026.9.1 gguf==0.19.0 truststore==0.10.5 idna==3.21 anyio==4.16.0)
UNS=(unsloth==2026.10.9 unsloth_zoo==2026.10.9 trl==1.15.0 datasets==4.8.5 peft==0.21.2 tyro==1.0.17
     docstring_parser==0.18.0 typeguard==4.6.1 shtab==1.13.0 torchao==0.18.0 cut_cross_entropy==25.1.1
     hf_transfer==0.1.9 msgspec==0.23.0 json5==0.17.3 nest_asyncio==1.6.0 structlog==26.1.0 fsspec==2026.2.0)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p .bench
for kit in site uns; do
  if [ "$kit" = site ]; then pkgs=("${SITE[@]}" "${COMMON[@]}"); else pkgs=("${UNS[@]}" "${COMMON[@]}"); fi
  "${PIP[@]}" --target "$work/$kit" "${pkgs[@]}"
  find "$work/$kit/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name '*cuda130.so' ! -name '*cpu.so' -delete
  rm -rf "$work/$kit/studio" "$work/$kit/bin"   # Unsloth's web studio and console scripts: not used by the bench
  find "$work/$kit" -name __pycache__ -prune -exec rm -rf {} +
  tar -C "$work" -cJf ".bench/$kit.tar.xz" "$kit"
  echo "$kit: $(du -h ".bench/$kit.tar.xz" | cut -f1)"
done
