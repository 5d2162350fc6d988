"""One typed config for `glm-rl train`, parsed and validated once.

Each section is a frozen dataclass handed only to the component that owns it. Every field carries its help
text; the command-line flag is the field name with dashes (slime's names where users know them:
`--rollout-batch-size`, `--n-samples-per-prompt`, `--eps-clip-high`, `--use-tis`, ...). Booleans are
`--flag` / `--no-flag`. Validation happens in `RunConfig.validate`, naming the offending values, before any
process starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from glm_rl.models.presets import TINY_CHECKPOINT

TINY_DATA = TINY_CHECKPOINT.parent / "arith"


def opt(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class ModelConfig:
    hf_checkpoint: str = opt(str(TINY_CHECKPOINT), "HF checkpoint the policy starts from (and engines load)")
    model_preset: str | None = opt(None, "check the checkpoint's config against this preset first")
    dtype: Literal["float32", "bfloat16"] = opt("float32", "trainer and engine dtype")


@dataclass(frozen=True)
class RolloutConfig:
    prompt_data: str = opt(str(TINY_DATA / "train.jsonl"), "JSONL prompt file with `prompt` and `label`")
    rm_type: str = opt("arithmetic", "rule-based reward")
    rollout_batch_size: int = opt(16, "prompts per rollout step")
    n_samples_per_prompt: int = opt(8, "responses sampled per prompt (the GRPO group)")
    rollout_max_response_len: int = opt(16, "max new tokens per response")
    rollout_max_prompt_len: int = opt(64, "prompts longer than this (in tokens) are skipped and counted")
    rollout_temperature: float = opt(1.0, "sampling temperature")
    rollout_top_p: float = opt(1.0, "nucleus sampling")
    rollout_top_k: int = opt(-1, "top-k sampling (-1 = off)")
    rollout_shuffle: bool = opt(True, "shuffle prompts each epoch")
    num_engines: int = opt(2, "rollout engines behind the router")
    engine_api_key: str | None = opt(None, "API key engines require (Bearer token)")
    enable_mtp: bool = opt(False, "MTP speculative decoding: draft with the checkpoint's MTP layer, verify in one "
                                  "forward (distribution-exact); SGLang: EAGLE flags, topk 1")
    speculative_num_steps: int = opt(1, "with --enable-mtp: MTP draft tokens per verify forward "
                                        "(SGLang's --speculative-num-steps; num-draft-tokens = steps + 1)")
    rollout_engine: Literal["embedded", "sglang"] = opt(
        "embedded", "embedded: our torch engine (CPU, tests); sglang: SGLang 0.5.23 servers (GPU)")
    rollout_num_gpus_per_engine: int = opt(1, "GPUs per SGLang engine (its --tp-size)")
    sglang_args: tuple[tuple[str, str | None], ...] = field(
        default=(), metadata={"help": "--sglang-<flag> [value]: passed to SGLang's launch_server as --<flag>",
                              "cli": False})


@dataclass(frozen=True)
class AlgoConfig:
    advantage_estimator: Literal["grpo", "gspo", "dr_grpo"] = opt("gspo", "advantage / ratio estimator")
    eps_clip: float = opt(0.2, "PPO clip range (low side)")
    eps_clip_high: float | None = opt(None, "PPO clip range, high side (default: --eps-clip)")
    eps_clip_c: float | None = opt(None, "dual-clip constant c > 1 (off by default)")
    kl_loss_coef: float = opt(0.0, "KL(policy || reference) loss coefficient")
    kl_loss_type: Literal["k1", "k2", "k3", "low_var_kl"] = opt("low_var_kl", "KL estimator")
    entropy_coef: float = opt(0.0, "entropy bonus coefficient")
    use_tis: bool = opt(True, "truncated importance sampling on the train/rollout mismatch")
    tis_clip: float = opt(2.0, "TIS upper clamp")
    tis_clip_low: float = opt(0.0, "TIS lower clamp")
    enable_mis: bool = opt(False, "masked importance sampling (token rejection + sequence veto)")
    mis_truncate: float = opt(2.0, "MIS weight truncation")
    mis_mask_low: float = opt(0.5, "MIS: tokens with ratio below this leave the loss")
    mis_mask_high: float = opt(2.0, "MIS: tokens with ratio above this leave the loss")
    mis_veto_threshold: float = opt(1e-4, "MIS: a sequence with any token ratio below this is dropped")
    use_rollout_logprobs: bool = opt(False, "use the engine's logprobs as old logprobs (skips the recompute)")
    use_routing_replay: bool = opt(False, "R2: record the trainer's routing in the old-logprob pass, replay it")
    use_rollout_routing_replay: bool = opt(True, "R3: replay the experts the engine chose")
    normalize_advantage_std: bool = opt(True, "GRPO/GSPO: divide by the group std")


@dataclass(frozen=True)
class TrainConfig:
    backend: Literal["torch"] = opt("torch", "trainer backend")
    num_trainer_ranks: int = opt(2, "data-parallel trainer ranks")
    global_batch_size: int | None = opt(None, "samples per optimizer step (default: one step per rollout)")
    max_tokens_per_gpu: int = opt(2048, "micro-batch token budget per rank")
    lr: float = opt(3e-4, "AdamW learning rate")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    adam_beta1: float = opt(0.9, "AdamW beta1")
    adam_beta2: float = opt(0.98, "AdamW beta2")
    clip_grad: float = opt(1.0, "gradient-norm clip")


@dataclass(frozen=True)
class SyncConfig:
    update_weight_transfer_mode: Literal["tensor", "broadcast", "p2p"] = opt(
        "broadcast", "tensor (colocated: shared memory / CUDA IPC), broadcast (torch.distributed group) or p2p "
                     "(Mooncake one-sided writes from every trainer rank, following a transfer plan)")
    update_weight_buffer_size: int = opt(1 << 20, "bytes per weight-sync bucket")
    check_weight_update_equal: bool = opt(True, "verify every tensor bitwise after each sync")
    rollout_fp8: bool = opt(False, "send the linear weights block-quantized to FP8 (e4m3, 128x128 blocks + scales) "
                                   "in each weight sync; engines dequantize on load (BF16 training, FP8 rollout)")


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    num_rollout: int = opt(60, "RL steps (rollout + train + sync)")
    output_dir: str = opt("outputs/tiny-demo", "everything a run writes goes here")
    save: str | None = opt(None, "checkpoint directory (default: <output-dir>/checkpoints)")
    load: str | None = opt(None, "resume from this checkpoint directory (default: --ref-load)")
    ref_load: str | None = opt(None, "checkpoint directory of the reference model (default: the HF checkpoint)")
    save_interval: int | None = opt(None, "save every N steps (and at the end); None = only at the end")
    colocate: bool = opt(False, "trainer ranks and engines share placement bundles")
    ray_address: str | None = opt(None, "join this Ray cluster instead of starting a local one")
    seed: int = opt(1234, "seed for data order, sampling and init")
    use_tensorboard: bool = opt(False, "also write TensorBoard scalars")
    report: bool = opt(True, "write <output-dir>/report.png at the end")

    def validate(self) -> "RunConfig":
        """Raise ValueError naming the offending flags; returns self for chaining."""
        r, a, t = self.rollout, self.algo, self.train
        errors = []
        for name, value in (("--rollout-batch-size", r.rollout_batch_size), ("--num-rollout", self.num_rollout),
                            ("--n-samples-per-prompt", r.n_samples_per_prompt), ("--num-engines", r.num_engines),
                            ("--num-trainer-ranks", t.num_trainer_ranks),
                            ("--rollout-max-response-len", r.rollout_max_response_len),
                            ("--speculative-num-steps", r.speculative_num_steps)):
            if value < 1:
                errors.append(f"{name} must be >= 1 (got {value})")
        samples = r.rollout_batch_size * r.n_samples_per_prompt
        gbs = t.global_batch_size or samples
        if samples % gbs:
            errors.append(f"--global-batch-size {gbs} must divide rollout-batch-size x n-samples-per-prompt = {samples}")
        if gbs % t.num_trainer_ranks:
            errors.append(f"--global-batch-size {gbs} must be divisible by --num-trainer-ranks {t.num_trainer_ranks}")
        if a.advantage_estimator in ("grpo", "gspo") and r.n_samples_per_prompt < 2:
            errors.append(f"--advantage-estimator {a.advantage_estimator} needs --n-samples-per-prompt >= 2")
        if a.use_routing_replay and a.use_rollout_routing_replay:
            errors.append("--use-routing-replay (R2) and --use-rollout-routing-replay (R3) are exclusive")
        if a.eps_clip_c is not None and a.eps_clip_c <= 1:
            errors.append(f"--eps-clip-c must be > 1 (got {a.eps_clip_c})")
        if a.tis_clip_low > a.tis_clip:
            errors.append(f"--tis-clip-low {a.tis_clip_low} exceeds --tis-clip {a.tis_clip}")
        if self.sync.update_weight_transfer_mode == "tensor" and not self.colocate:
            errors.append("--update-weight-transfer-mode tensor needs --colocate (engines share the trainer's host)")
        if t.max_tokens_per_gpu < r.rollout_max_prompt_len + r.rollout_max_response_len:
            errors.append(f"--max-tokens-per-gpu {t.max_tokens_per_gpu} is below one sample's maximum length "
                          f"({r.rollout_max_prompt_len} + {r.rollout_max_response_len})")
        if r.sglang_args:
            from glm_rl.rollout.engines.sglang_engine import contract

            unknown = [f"--sglang-{n}" for n, _ in r.sglang_args if f"--{n}" not in contract()["server_flags"]]
            if unknown:
                errors.append(f"{unknown}: SGLang {contract()['sglang_version']} has no such server flag")
            if r.rollout_engine != "sglang":
                errors.append("--sglang-* flags need --rollout-engine sglang")
        if r.rollout_engine == "sglang":
            import torch

            if not torch.cuda.is_available():
                errors.append("--rollout-engine sglang needs CUDA GPUs (use the embedded engine on CPU)")
            if self.sync.rollout_fp8:
                errors.append("--rollout-fp8 with --rollout-engine sglang is not supported yet: start SGLang from a "
                              "checkpoint converted by tools/convert_hf_to_fp8.py instead")
        errors += self._check_inputs()
        if errors:
            raise ValueError("invalid configuration:\n  " + "\n  ".join(errors))
        return self

    def _check_inputs(self) -> list[str]:
        """Read the checkpoint's config and the prompt file now, so bad input fails before Ray starts."""
        from glm_rl.models.checkpoint import CheckpointError, check_matches_preset, read_spec
        from glm_rl.rollout.data import DataError, load_prompts
        from glm_rl.rollout.rewards import REWARDS

        errors = []
        try:
            m = self.model
            spec = check_matches_preset(m.hf_checkpoint, m.model_preset) if m.model_preset else read_spec(m.hf_checkpoint)
            replay = self.algo.use_rollout_routing_replay or self.algo.use_routing_replay
            if replay and spec.num_moe_layers == 0:
                errors.append(f"routing replay (R2/R3) needs MoE layers, but {m.hf_checkpoint} has none "
                              f"(first_k_dense_replace={spec.first_k_dense_replace} = num_hidden_layers)")
        except (CheckpointError, ValueError) as e:
            errors.append(str(e))
        try:
            load_prompts(self.rollout.prompt_data)
        except DataError as e:
            errors.append(str(e))
        if self.rollout.rm_type not in REWARDS:
            errors.append(f"--rm-type {self.rollout.rm_type!r} unknown; valid: {', '.join(sorted(REWARDS))}")
        return errors

    @property
    def samples_per_rollout(self) -> int:
        return self.rollout.rollout_batch_size * self.rollout.n_samples_per_prompt

    @property
    def save_dir(self) -> Path:
        return Path(self.save) if self.save else Path(self.output_dir) / "checkpoints"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


SECTIONS = {"model": ModelConfig, "rollout": RolloutConfig, "algo": AlgoConfig, "train": TrainConfig,
            "sync": SyncConfig}


def _add_field(parser: argparse.ArgumentParser, f: dataclasses.Field, hint: Any, dest: str) -> None:
    flag = "--" + f.name.replace("_", "-")
    help_text = f.metadata.get("help", "")
    if hint is bool:
        parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=f.default,
                            help=help_text)
        return
    args = get_args(hint)
    if get_origin(hint) is Literal:
        parser.add_argument(flag, dest=dest, choices=args, default=f.default, help=help_text)
        return
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    if get_origin(base) is Literal:
        parser.add_argument(flag, dest=dest, choices=get_args(base), default=f.default, help=help_text)
        return
    parser.add_argument(flag, dest=dest, type=base, default=f.default, metavar=base.__name__.upper(),
                        help=f"{help_text} (default: {f.default})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="glm-rl train", description="Run RL post-training.",
        epilog="--sglang-<flag> [value] passes --<flag> [value] to every SGLang server (--rollout-engine "
               "sglang), checked against the pinned SGLang's flags.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(section)
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.metadata.get("cli", True):
                _add_field(group, f, hints[f.name], f"{section}.{f.name}")
    hints = get_type_hints(RunConfig)
    for f in dataclasses.fields(RunConfig):
        if f.name not in SECTIONS:
            _add_field(parser, f, hints[f.name], f.name)
    return parser


def split_sglang_args(argv: list[str]) -> tuple[list[str], tuple[tuple[str, str | None], ...]]:
    """Take `--sglang-<flag> [value]` pairs out of argv (slime's pass-through to SGLang's server flags)."""
    rest, passed = [], []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token.startswith("--sglang-"):
            name, _, inline = token[len("--sglang-"):].partition("=")
            if inline:
                passed.append((name, inline))
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                passed.append((name, argv[i + 1]))
                i += 1
            else:
                passed.append((name, None))
        else:
            rest.append(token)
        i += 1
    return rest, tuple(passed)


def parse_args(argv: list[str]) -> RunConfig:
    """argv (without the command name) → a validated RunConfig."""
    argv, sglang_args = split_sglang_args(argv)
    ns = vars(build_parser().parse_args(argv))
    ns["rollout.sglang_args"] = sglang_args
    sections = {name: cls(**{k.split(".", 1)[1]: v for k, v in ns.items() if k.startswith(name + ".")})
                for name, cls in SECTIONS.items()}
    top = {k: v for k, v in ns.items() if "." not in k}
    return RunConfig(**sections, **top).validate()
