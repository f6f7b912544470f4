"""Portable artifacts: the folders a run writes (adapter/, model/, a merged checkpoint) load on another machine and in
the clients people use — transformers 5.x and the 4.x line still in wide use, PEFT, llama.cpp's converter, vLLM.

transformers 5 writes three things those clients trip on, fixed here in one place after every save:
- `adapter_config.json` names the base by the path it was loaded from; for the embedded model that is this machine's
  cache folder. It gets the portable name instead: the hub id for the embedded model, the name the recipe gave for a
  hub model, the absolute path for a local folder (which the user moves along with the run).
- `config.json` keeps the RoPE base only under `rope_parameters.rope_theta`; 4.x reads top-level `rope_theta` and
  silently falls back to 10,000 without it (wrong positions: different logits). Both are written; 5.x reads either.
- `tokenizer_config.json` names the class `TokenizersBackend`, which 4.x does not have; `PreTrainedTokenizerFast`
  loads the same tokenizer.json in both lines.
And `Trainer.save_model` leaves `training_args.bin`, a pickle, in the folder: tuneforge artifacts are safetensors and
JSON only (the resolved settings are in the run's recipe.yaml), so it is removed.
"""

from __future__ import annotations

import json
from pathlib import Path

PICKLED_EXTRAS = ("training_args.bin",)


def portable_base_name(name: str) -> str:
    """What an adapter should name as its base: the hub id of the embedded model, a hub id as given, or the absolute
    path of a local folder."""
    from tuneforge.models import EMBEDDED_HUB_ID, EMBEDDED_HUB_IDS

    if name.startswith("embedded:"):
        return EMBEDDED_HUB_IDS.get(name, EMBEDDED_HUB_ID)
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def _update_json(file: Path, change) -> None:
    if not file.is_file():
        return
    data = json.loads(file.read_text(encoding="utf-8"))
    if change(data):
        file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def make_portable(folder: str | Path, *, base_name: str | None = None) -> None:
    """Fix a saved model or adapter folder in place (see the module docstring). `base_name`: the recipe's model.name,
    for an adapter folder."""
    folder = Path(folder)
    for name in PICKLED_EXTRAS:
        (folder / name).unlink(missing_ok=True)

    def base(config: dict) -> bool:
        if base_name is None or "base_model_name_or_path" not in config:
            return False
        config["base_model_name_or_path"] = portable_base_name(base_name)
        return True

    def rope(config: dict) -> bool:
        changed = False
        for section in [config, *(v for v in config.values() if isinstance(v, dict) and "rope_parameters" in v)]:
            params = section.get("rope_parameters")
            if isinstance(params, dict) and "rope_theta" in params and section.get("rope_theta") != params["rope_theta"]:
                section["rope_theta"] = params["rope_theta"]
                if params.get("rope_type", "default") != "default" and not section.get("rope_scaling"):
                    section["rope_scaling"] = dict(params)
                changed = True
        return changed

    def tokenizer_class(config: dict) -> bool:
        if config.get("tokenizer_class") != "TokenizersBackend":
            return False
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        return True

    _update_json(folder / "adapter_config.json", base)
    _update_json(folder / "config.json", rope)
    _update_json(folder / "tokenizer_config.json", tokenizer_class)
