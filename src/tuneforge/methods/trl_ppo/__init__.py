"""TRL's PPOTrainer and PPOConfig, vendored unchanged but for their imports.

TRL removed PPO in 1.1x (huggingface/trl PR #7020: "Remove PPOTrainer"); the installed TRL (1.16) no longer has
`trl.experimental.ppo`. These two files are TRL's own `trl/experimental/ppo/ppo_trainer.py` and `ppo_config.py` as of
commit f2cd57710ae345ea6428ae95363267fcf38a3dc8 (TRL 1.10.0.dev0), Apache-2.0 (LICENSE here), with only their
relative imports made absolute (`...trainer.utils` -> `trl.trainer.utils`, ...); every helper they import still
exists in the installed TRL. tuneforge does not re-implement PPO: methods/ppo.py drives this trainer. Replace this
package by `trl.experimental.ppo` if TRL brings PPO back.
"""

from tuneforge.methods.trl_ppo.ppo_config import PPOConfig
from tuneforge.methods.trl_ppo.ppo_trainer import PPOTrainer

__all__ = ["PPOConfig", "PPOTrainer"]
