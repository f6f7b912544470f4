#!/usr/bin/env bash
# The new speed levers, each against itself off, on one GPU in one call (bench/speed.py's sweep rows, 20 measured
# steps each, the same job as the fair bench): speed.fewer_syncs on 1B full fine-tuning (with Unsloth's sweep beside
# it), speed.fused_lora on QLoRA's 4-bit layers (1B QLoRA), speed.keep_lora_dropout_mask on 1B LoRA without
# checkpointing (speed and peak memory). Usage on the device: bash bench/levers_gpu.sh OUT_DIR
# (libraries from the kits: PYTHONPATH=/tmp/site, --unsloth-path /tmp/uns; bench/make_kits.sh).
set -uo pipefail
out="${1:?OUT_DIR}"
run() {  # name, then bench/speed.py arguments
  local name="$1"; shift
  PYTHONPATH=/tmp/site:src python3 bench/speed.py --sweep-only --sweep-steps 20 --sweep-warmup 3 --timeout 150 \
    --out "$out/$name.json" "$@" 2>&1 | cut -c1-700 | tee "$out/$name.log" | cut -c1-400
}
run syncs-1b-full --cases llama-1b-full --contenders tuneforge,unsloth --unsloth-path /tmp/uns \
  --tuneforge-candidates layout_speed,syncs_on
run fused-1b-qlora --cases llama-1b-qlora --contenders tuneforge --tuneforge-candidates layout_speed,fused_qlora
run mask-1b-lora --cases llama-1b-lora --contenders tuneforge \
  --tuneforge-candidates no_checkpointing,no_checkpointing_keep_mask
