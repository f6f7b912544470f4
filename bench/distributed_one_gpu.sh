#!/usr/bin/env bash
# The distributed path on ONE CUDA GPU: the quickstart recipe (its data and settings) on a small random-init Llama
# with a byte tokenizer (written here: the GPU machine has no hub and the embedded model is too big to carry),
# launched through accelerate as one process with FSDP2 (world size 1), for full fine-tuning and for LoRA; checks
# that it trains (loss falls, status completed) and saves an ordinary checkpoint that loads with from_pretrained /
# PEFT without FSDP. Needs a CUDA machine.
#
#   bash bench/distributed_one_gpu.sh            # writes bench/results/distributed-one-gpu.txt
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT_DIR:-runs/bench-distributed}
LOG=${LOG:-bench/results/distributed-one-gpu.txt}
mkdir -p "$(dirname "$LOG")" "$OUT"
: > "$LOG"
MODEL="$OUT/random-small-llama"
"$PY" - "$MODEL" <<'PYEOF'
import sys
sys.path.insert(0, "bench")
import torch
from transformers import AutoModelForCausalLM, LlamaConfig
from plan_vs_measured import byte_tokenizer
torch.manual_seed(0)
config = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=320, max_position_embeddings=1024, tie_word_embeddings=True)
AutoModelForCausalLM.from_config(config).save_pretrained(sys.argv[1])
byte_tokenizer().save_pretrained(sys.argv[1])
PYEOF
echo "model: random-init Llama (4 layers, hidden 256) + byte tokenizer; $(nvidia-smi --query-gpu=name --format=csv,noheader)" | tee -a "$LOG"
for adapter in full lora; do
  run="$OUT/fsdp-$adapter"
  echo "== $adapter: tuneforge train recipes/quickstart.yaml --gpus 1 (fsdp, world size 1)" | tee -a "$LOG"
  "$PY" -m tuneforge train recipes/quickstart.yaml --gpus 1 --overwrite --output "$run" \
    --set model.name="$MODEL" --set distributed.strategy=fsdp --set adapter.type=$adapter --set train.report_to=[] \
    --set eval.max_examples=8 --set eval.few_shot=0 --set eval.forgetting=false 2>&1 | tail -20 | tee -a "$LOG"
  "$PY" - "$run" "$adapter" "$MODEL" <<'PYEOF' 2>&1 | tee -a "$LOG"
import json, sys
from pathlib import Path
run, adapter = Path(sys.argv[1]), sys.argv[2]
status = json.loads((run / "status.json").read_text())
assert status["state"] == "completed", status
rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
losses = [r["loss"] for r in rows if "loss" in r]
assert losses[-1] < losses[0], losses
import torch
from transformers import AutoModelForCausalLM
weights = run / ("model" if adapter == "full" else "adapter")
files = sorted(p.name for p in weights.iterdir())
assert any(f.endswith(".safetensors") for f in files), files
if adapter == "full":
    model = AutoModelForCausalLM.from_pretrained(weights)  # an ordinary checkpoint: no FSDP / DTensor left
else:
    from peft import PeftModel
    base = AutoModelForCausalLM.from_pretrained(sys.argv[3])
    model = PeftModel.from_pretrained(base, weights)
assert all(type(p.data) is torch.Tensor for p in model.parameters())
recipe = (run / "recipe.yaml").read_text()
assert "strategy: fsdp" in recipe
print(f"OK {adapter}: loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} logs; {weights.name}/: {files}")
PYEOF
done
echo "all good; results in $LOG"
