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

from glm_rl.models.glm45.presets import TINY_CHECKPOINT

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
    backend: Literal["torch", "megatron"] = opt(
        "torch", "trainer backend: torch (HF model, data parallel; reference) or megatron (megatron-core GPTModel: "
                 "TP/SP/EP/DP)")
    num_trainer_ranks: int = opt(2, "trainer world size (megatron: TP x PP x CP x DP)")
    global_batch_size: int | None = opt(None, "samples per optimizer step (default: one step per rollout)")
    max_tokens_per_gpu: int = opt(2048, "micro-batch token budget per rank")
    lr: float = opt(3e-4, "AdamW learning rate")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    adam_beta1: float = opt(0.9, "AdamW beta1")
    adam_beta2: float = opt(0.98, "AdamW beta2")
    clip_grad: float = opt(1.0, "gradient-norm clip")
    # -- megatron backend (slime's / Megatron's flag names) --
    tensor_model_parallel_size: int = opt(1, "megatron: tensor parallel size (TP)")
    pipeline_model_parallel_size: int = opt(1, "megatron: pipeline parallel size (PP)")
    context_parallel_size: int = opt(1, "megatron: context parallel size (CP)")
    expert_model_parallel_size: int = opt(1, "megatron: expert parallel size (EP)")
    expert_tensor_parallel_size: int = opt(1, "megatron: expert tensor parallel size (ETP)")
    sequence_parallel: bool | None = opt(None, "megatron: sequence parallelism (default: on when TP > 1)")
    decoder_first_pipeline_num_layers: int | None = opt(None, "megatron: decoder layers on the first PP stage")
    decoder_last_pipeline_num_layers: int | None = opt(None, "megatron: decoder layers on the last PP stage")
    recompute_granularity: Literal["full", "selective"] | None = opt(None, "megatron: activation recompute")
    recompute_method: Literal["uniform", "block"] | None = opt(None, "megatron: with --recompute-granularity full")
    recompute_num_layers: int | None = opt(None, "megatron: layers per recompute chunk (uniform) / recomputed (block)")
    optimizer_cpu_offload: bool = opt(False, "megatron: keep the optimizer state (and its step) on the CPU")
    use_precision_aware_optimizer: bool = opt(False, "megatron: precision-aware optimizer (GPU, bf16 training)")
    moe_token_dispatcher_type: Literal["alltoall", "allgather", "flex"] = opt("alltoall", "megatron: MoE token "
                                                                              "dispatcher")
    moe_enable_deepep: bool = opt(False, "megatron: DeepEP all-to-all (needs --moe-token-dispatcher-type flex and "
                                         "the deep_ep package)")
    enable_mtp_training: bool = opt(False, "megatron: train the MTP layer on rollout tokens (detached backbone)")
    mtp_loss_scaling_factor: float = opt(0.2, "megatron: MTP loss weight")

    @property
    def sequence_parallel_on(self) -> bool:
        """--sequence-parallel as resolved: its value, or on exactly when TP > 1 (Megatron's MoE needs it)."""
        return self.tensor_model_parallel_size > 1 if self.sequence_parallel is None else self.sequence_parallel

    def layout(self):
        """The `ParallelLayout` these flags ask for (DP = world / (TP x PP x CP)); raises `LayoutError` when
        the world size has no whole DP."""
        from glm_rl.parallel import ParallelLayout

        return ParallelLayout.for_world_size(
            self.num_trainer_ranks, tp=self.tensor_model_parallel_size, pp=self.pipeline_model_parallel_size,
            cp=self.context_parallel_size, ep=self.expert_model_parallel_size,
            etp=self.expert_tensor_parallel_size, sequence_parallel=self.sequence_parallel_on,
            decoder_first_pipeline_num_layers=self.decoder_first_pipeline_num_layers,
            decoder_last_pipeline_num_layers=self.decoder_last_pipeline_num_layers)

    @property
    def dp_size(self) -> int:
        """Data-parallel ranks (the sample shards): the world for torch, world / (TP x PP x CP) for megatron."""
        if self.backend == "torch":
            return self.num_trainer_ranks
        model = self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.context_parallel_size
        return max(self.num_trainer_ranks // max(model, 1), 1)


    # -- LoRA / DoRA adapters (torch backend; glm_rl/trainer/lora.py) --
    lora_rank: int = opt(0, "LoRA rank: train low-rank adapters on a frozen base (0 = full fine-tuning)")
    lora_alpha: float = opt(16.0, "LoRA alpha: the adapter is scaled by alpha / rank")
    lora_dropout: float = opt(0.0, "dropout on the adapters' input (linear targets)")
    target_modules: str = opt("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                              "comma list of modules that get adapters: q_proj k_proj v_proj o_proj (attention), "
                              "gate_proj up_proj down_proj (dense MLP, shared expert), experts (routed experts, "
                              "one adapter per expert)")
    use_dora: bool = opt(False, "DoRA: learn a magnitude per output row on top of the LoRA direction")

    @property
    def lora_targets(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.target_modules.split(",") if t.strip())

    def lora_errors(self) -> list[str]:
        """The LoRA flags' problems, each naming its flag (called from `RunConfig.validate`)."""
        from glm_rl.trainer.lora import check_targets

        errors = []
        try:
            check_targets(self.lora_targets)
        except ValueError as e:
            errors.append(str(e))
        if self.lora_rank < 0:
            errors.append(f"--lora-rank must be >= 0 (got {self.lora_rank})")
        if self.lora_alpha <= 0:
            errors.append(f"--lora-alpha must be > 0 (got {self.lora_alpha})")
        if not 0 <= self.lora_dropout < 1:
            errors.append(f"--lora-dropout must be in [0, 1) (got {self.lora_dropout})")
        if self.use_dora and self.lora_rank == 0:
            errors.append("--use-dora needs --lora-rank > 0")
        if self.lora_rank > 0 and self.backend != "torch":
            errors.append(f"--lora-rank with --backend {self.backend} is not supported yet (use --backend torch)")
        return errors

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
        if gbs % t.dp_size:
            errors.append(f"--global-batch-size {gbs} must be divisible by the data-parallel size {t.dp_size} "
                          f"(--num-trainer-ranks {t.num_trainer_ranks}"
                          + (" / (TP x PP x CP))" if t.backend == "megatron" else ")"))
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
            from glm_rl.rollout.sglang_engine import contract

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
        errors += self._check_backend()
        errors += t.lora_errors()
        errors += self._check_inputs()
        if errors:
            raise ValueError("invalid configuration:\n  " + "\n  ".join(errors))
        return self

    def _check_backend(self) -> list[str]:
        """Megatron flags: only with --backend megatron, and only the parts the RL loop runs (see
        trainer/backends/megatron/backend.py). The layout itself is checked against the model in _check_inputs."""
        t, errors = self.train, []
        sizes = {"--tensor-model-parallel-size": t.tensor_model_parallel_size,
                 "--pipeline-model-parallel-size": t.pipeline_model_parallel_size,
                 "--context-parallel-size": t.context_parallel_size,
                 "--expert-model-parallel-size": t.expert_model_parallel_size,
                 "--expert-tensor-parallel-size": t.expert_tensor_parallel_size}
        if t.backend == "torch":
            used = [f"{flag} {v}" for flag, v in sizes.items() if v != 1]
            used += [flag for flag, on in (("--sequence-parallel", t.sequence_parallel),
                                           ("--enable-mtp-training", t.enable_mtp_training),
                                           ("--moe-enable-deepep", t.moe_enable_deepep),
                                           ("--recompute-granularity", t.recompute_granularity)) if on]
            if used:
                errors.append(f"{', '.join(used)} need --backend megatron (the torch backend is data parallel only)")
            return errors
        for flag, value in sizes.items():
            if value < 1:
                errors.append(f"{flag} must be >= 1 (got {value})")
        if t.enable_mtp_training and not self.rollout.enable_mtp:
            errors.append("--enable-mtp-training needs --enable-mtp: the engines must hold the MTP layer to receive "
                          "its trained weights (and use them to draft)")
        if t.moe_enable_deepep:
            if t.moe_token_dispatcher_type != "flex":
                errors.append(f"--moe-enable-deepep needs --moe-token-dispatcher-type flex "
                              f"(got {t.moe_token_dispatcher_type})")
            import importlib.util

            if importlib.util.find_spec("deep_ep") is None:
                errors.append("--moe-enable-deepep needs the deep_ep package (DeepEP, CUDA + NVSHMEM), which is "
                              "not importable here")
        elif t.moe_token_dispatcher_type == "flex":
            errors.append("--moe-token-dispatcher-type flex needs --moe-enable-deepep")
        if t.recompute_method and t.recompute_granularity != "full":
            errors.append(f"--recompute-method {t.recompute_method} needs --recompute-granularity full")
        if t.recompute_granularity == "full" and (t.recompute_method is None or t.recompute_num_layers is None):
            errors.append("--recompute-granularity full needs --recompute-method and --recompute-num-layers")
        if t.use_precision_aware_optimizer and self.model.dtype != "bfloat16":
            errors.append("--use-precision-aware-optimizer needs --dtype bfloat16 (it keeps fp32 master weights "
                          "for a bf16 model)")
        if self.sync.update_weight_transfer_mode == "tensor":
            errors.append("--update-weight-transfer-mode tensor shares the torch backend's HF model buffer; "
                          "with --backend megatron use broadcast or p2p")
        return errors

    def _check_layout(self, spec) -> list[str]:
        """--backend megatron: the parallel layout against the model, every problem named (parallel.py)."""
        from glm_rl.parallel import LayoutError, validate_layout

        try:
            layout = self.train.layout()
        except LayoutError as e:
            return [f"--num-trainer-ranks: {p}" for p in e.problems]
        return [f"parallel layout: {p}" for p in validate_layout(spec, layout, world_size=self.train.num_trainer_ranks)]

    def _check_inputs(self) -> list[str]:
        """Read the checkpoint's config and the prompt file now, so bad input fails before Ray starts."""
        from glm_rl.models.glm45.checkpoint import CheckpointError, check_matches_preset, read_spec
        from glm_rl.rollout.data import DataError, load_prompts
        from glm_rl.rollout.rewards import REWARDS

        errors = []
        try:
            m = self.model
            spec = check_matches_preset(m.hf_checkpoint, m.model_preset) if m.model_preset else read_spec(m.hf_checkpoint)
            if self.train.backend == "megatron":
                errors += self._check_layout(spec)
                cp = self.train.context_parallel_size
                if self.train.enable_mtp_training and cp > 1 and spec.num_nextn_predict_layers > 1:
                    errors.append(f"--enable-mtp-training with --context-parallel-size {cp}: {m.hf_checkpoint} has "
                                  f"{spec.num_nextn_predict_layers} MTP layers; with CP the MTP loss is weighted "
                                  "exactly for one (one backward scale per micro-batch serves every layer)")
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
    if base is bool:  # `bool | None`: --flag / --no-flag, None when neither is given (an "auto" default)
        parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=f.default,
                            help=help_text)
        return
    if get_origin(base) is Literal:
        parser.add_argument(flag, dest=dest, choices=get_args(base), default=f.default, help=help_text)
        return
    parser.add_argument(flag, dest=dest, type=base, default=f.default, metavar=base.__name__.upper(),
                        help=help_text)  # the formatter appends "(default: …)"


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
