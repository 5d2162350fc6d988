"""The typed config of `glm-rl train`, parsed and validated once.

Each section is a frozen dataclass handed only to the component that owns it:

- `model`    (model.py)    checkpoint, preset, dtype: trainer and engines
- `rollout`  (rollout.py)  prompts, sampling, engines: the rollout manager and the engine launchers
- `algo`     (algo.py)     advantages, loss, corrections, routing replay (`RoutingReplay`): the driver's steps and
                           the trainer backends
- `train`    (train.py)    backend, world size, batching, optimizer: the trainer group and both backends
- `megatron` (megatron.py) Megatron's parallel layout and options: the Megatron backend
- `lora`     (lora.py)     LoRA / DoRA adapters: the torch backend
- `sync`     (sync.py)     weight transfer to the engines: the trainer group, whole
- `eval`     (eval.py)     eval sets and their sampling: the rollout manager's evaluation
- `log`      (log.py)      TensorBoard and W&B: the metrics writer
- `debug`    (debug.py)    rollout dumps (save) and train-only replays (load): the driver
- `agentic`  (agentic.py)  the built-in tool loop (tools, turns, context, sandbox limits): the generate hook
- `asynchrony` (asynchrony.py) synchronous, one-step-off or fully async loop; staleness, partial rollouts: the
                           driver's loop (overlap.py) and the rollout manager
- `RunConfig` (run.py)     the sections, run-wide flags (steps, output, checkpoints, seed, colocation) and the
                           checks across sections; `parser.py` turns argv into it.

Every field carries its help text; the command-line flag is the field name with dashes (slime's names where
users know them: `--rollout-batch-size`, `--n-samples-per-prompt`, `--eps-clip-high`, `--use-tis`,
`--tensor-model-parallel-size`, ...). Booleans are `--flag` / `--no-flag`. Validation happens in
`RunConfig.validate`, naming the offending values, before any process starts.
"""

from glm_rl.config.agentic import AgenticConfig
from glm_rl.config.algo import AlgoConfig, RoutingReplay, engines_return_routed_experts
from glm_rl.config.asynchrony import AsyncConfig
from glm_rl.config.debug import DebugConfig
from glm_rl.config.eval import EvalConfig
from glm_rl.config.fields import opt
from glm_rl.config.log import LogConfig
from glm_rl.config.lora import LoraConfig
from glm_rl.config.megatron import MegatronConfig
from glm_rl.config.model import ModelConfig
from glm_rl.config.parser import SECTIONS, build_parser, parse_args, split_sglang_args
from glm_rl.config.rollout import TINY_DATA, RolloutConfig
from glm_rl.config.run import RunConfig
from glm_rl.config.sync import SyncConfig
from glm_rl.config.train import TrainConfig

__all__ = [
    "AgenticConfig",
    "SECTIONS",
    "TINY_DATA",
    "AlgoConfig",
    "AsyncConfig",
    "DebugConfig",
    "EvalConfig",
    "LogConfig",
    "LoraConfig",
    "MegatronConfig",
    "ModelConfig",
    "RolloutConfig",
    "RoutingReplay",
    "RunConfig",
    "SyncConfig",
    "TrainConfig",
    "build_parser",
    "engines_return_routed_experts",
    "opt",
    "parse_args",
    "split_sglang_args",
]
