"""`RunConfig`: the sections of one `glm-rl train` run, the run-wide flags, and the checks across sections.

`validate` runs once, at parse time, and names every offending flag and value together before any process
starts; checks that need one section only live on that section (`MegatronConfig.recompute_errors`,
`LoraConfig.errors`, ...).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from glm_rl.config.agentic import AgenticConfig
from glm_rl.config.algo import AlgoConfig, RoutingReplay
from glm_rl.config.asynchrony import AsyncConfig
from glm_rl.config.debug import DebugConfig
from glm_rl.config.eval import EvalConfig
from glm_rl.config.fields import opt
from glm_rl.config.log import LogConfig
from glm_rl.config.lora import LoraConfig
from glm_rl.config.megatron import MegatronConfig
from glm_rl.config.model import ModelConfig
from glm_rl.config.rollout import RolloutConfig
from glm_rl.config.sync import SyncConfig
from glm_rl.config.train import TrainConfig


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    megatron: MegatronConfig = field(default_factory=MegatronConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    agentic: AgenticConfig = field(default_factory=AgenticConfig)
    asynchrony: AsyncConfig = field(default_factory=AsyncConfig)
    num_rollout: int = opt(60, "RL steps (rollout + train + sync)")
    output_dir: str = opt("outputs/tiny-demo", "everything a run writes goes here")
    save: str | None = opt(None, "checkpoint directory (default: <output-dir>/checkpoints)")
    load: str | None = opt(None, "resume from this checkpoint directory (default: --ref-load)")
    ref_load: str | None = opt(None, "checkpoint directory of the reference model (default: the HF checkpoint)")
    save_interval: int | None = opt(None, "save every N steps (and at the end); None = only at the end")
    colocate: bool = opt(False, "trainer ranks and engines share placement bundles")
    offload_train: bool | None = opt(
        None, "colocated: trainer ranks free their GPU memory during rollout (default: on with --colocate on GPUs)"
    )
    offload_rollout: bool | None = opt(
        None, "colocated: engines free their GPU memory during training (default: on with --colocate on GPUs)"
    )
    ray_address: str | None = opt(None, "join this Ray cluster instead of starting a local one")
    placement_strategy: Literal["PACK", "SPREAD"] = opt(
        "PACK",
        "Ray placement of the trainer / engine bundles (in rank order): PACK fills a node before the next; "
        "SPREAD puts consecutive bundles on different nodes",
    )
    seed: int = opt(1234, "seed for data order, sampling and init")
    report: bool = opt(True, "write <output-dir>/report.png at the end")

    @property
    def samples_per_rollout(self) -> int:
        return self.rollout.rollout_batch_size * self.rollout.n_samples_per_prompt

    @property
    def dp_size(self) -> int:
        """Data-parallel ranks (the sample shards): the world for torch, world / (TP x PP x CP) for megatron."""
        world = self.train.num_trainer_ranks
        return world if self.train.backend == "torch" else self.megatron.dp_size(world)

    @property
    def save_dir(self) -> Path:
        return Path(self.save) if self.save else Path(self.output_dir) / "checkpoints"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    def validate(self) -> RunConfig:
        """Raise ValueError naming the offending flags; returns self for chaining."""
        errors = (
            self._check_sizes()
            + self._check_algo()
            + self._check_rollout()
            + self._check_backend()
            + self.lora.errors(self.train.backend)
            + self._check_inputs()
            + self._check_paths()
        )
        if errors:
            raise ValueError("invalid configuration:\n  " + "\n  ".join(errors))
        return self

    def _check_paths(self) -> list[str]:
        """--output-dir and --save are (or can be made) writable directories; --load names a complete, undamaged
        checkpoint (or none: the run starts fresh). Each problem is one line naming the file (checkpoint.py)."""
        from glm_rl.checkpoint import CheckpointError, find_checkpoint, writable_dir_problem

        dirs = [(self.output_dir, "--output-dir")] + ([(self.save, "--save")] if self.save else [])
        errors = [p for p in (writable_dir_problem(d, flag) for d, flag in dirs) if p]
        load = self.load or self.ref_load
        if load:
            try:
                find_checkpoint(Path(load), self.train.num_trainer_ranks)
            except CheckpointError as e:
                errors.append(str(e))
        return errors

    def _check_sizes(self) -> list[str]:
        """Counts, and the batch arithmetic: samples per rollout / global batch / DP ranks."""
        r, t, errors = self.rollout, self.train, []
        for name, value in (
            ("--rollout-batch-size", r.rollout_batch_size),
            ("--num-rollout", self.num_rollout),
            ("--n-samples-per-prompt", r.n_samples_per_prompt),
            ("--num-engines", r.num_engines),
            ("--num-trainer-ranks", t.num_trainer_ranks),
            ("--rollout-max-response-len", r.rollout_max_response_len),
            ("--speculative-num-steps", r.speculative_num_steps),
            ("--max-running-requests", 1 if r.max_running_requests is None else r.max_running_requests),
        ):
            if value < 1:
                errors.append(f"{name} must be >= 1 (got {value})")
        samples = self.samples_per_rollout
        gbs = t.global_batch_size or samples
        if samples % gbs:
            errors.append(
                f"--global-batch-size {gbs} must divide rollout-batch-size x n-samples-per-prompt = {samples}"
            )
        if gbs % self.dp_size:
            errors.append(
                f"--global-batch-size {gbs} must be divisible by the data-parallel size {self.dp_size} "
                f"(--num-trainer-ranks {t.num_trainer_ranks}"
                + (" / (TP x PP x CP))" if t.backend == "megatron" else ")")
            )
        return errors

    def _check_algo(self) -> list[str]:
        a, errors = self.algo, []
        if a.advantage_estimator in ("grpo", "gspo") and self.rollout.n_samples_per_prompt < 2:
            errors.append(f"--advantage-estimator {a.advantage_estimator} needs --n-samples-per-prompt >= 2")
        if a.use_routing_replay and a.use_rollout_routing_replay:
            errors.append("--use-routing-replay (R2) and --use-rollout-routing-replay (R3) are exclusive")
        if a.eps_clip_c is not None and a.eps_clip_c <= 1:
            errors.append(f"--eps-clip-c must be > 1 (got {a.eps_clip_c})")
        if a.tis_clip_low > a.tis_clip:
            errors.append(f"--tis-clip-low {a.tis_clip_low} exceeds --tis-clip {a.tis_clip}")
        return errors

    def _check_rollout(self) -> list[str]:
        """Placement of the weight sync, sample length vs the token budget, SGLang's pass-through flags."""
        r, errors = self.rollout, []
        if (self.offload_train or self.offload_rollout) and not self.colocate:
            errors.append("--offload-train / --offload-rollout need --colocate (they free memory for the other side)")
        if self.sync.update_weight_transfer_mode == "tensor" and not self.colocate:
            errors.append("--update-weight-transfer-mode tensor needs --colocate (engines share the trainer's host)")
        if self.train.max_tokens_per_gpu < r.rollout_max_prompt_len + r.rollout_max_response_len:
            errors.append(
                f"--max-tokens-per-gpu {self.train.max_tokens_per_gpu} is below one sample's maximum "
                f"length ({r.rollout_max_prompt_len} + {r.rollout_max_response_len})"
            )
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
                errors.append(
                    "--rollout-fp8 with --rollout-engine sglang is not supported yet: start SGLang from a "
                    "checkpoint converted by tools/convert_hf_to_fp8.py instead"
                )
        return errors

    def _check_backend(self) -> list[str]:
        """Megatron flags: only with --backend megatron, and only the parts the RL loop runs (see
        trainer/backends/megatron/backend.py). The layout itself is checked against the model in _check_inputs."""
        m, errors = self.megatron, []
        if self.train.backend == "torch":
            used = m.flags_set()
            if used:
                errors.append(f"{', '.join(used)} need --backend megatron (the torch backend is data parallel only)")
            return errors
        errors += [f"{flag} must be >= 1 (got {value})" for flag, value in m.sizes.items() if value < 1]
        if m.enable_mtp_training and not self.rollout.enable_mtp:
            errors.append(
                "--enable-mtp-training needs --enable-mtp: the engines must hold the MTP layer to receive "
                "its trained weights (and use them to draft)"
            )
        errors += m.dispatcher_errors() + m.recompute_errors()
        if m.use_precision_aware_optimizer and self.model.dtype != "bfloat16":
            errors.append(
                "--use-precision-aware-optimizer needs --dtype bfloat16 (it keeps fp32 master weights for a bf16 model)"
            )
        if self.sync.update_weight_transfer_mode == "tensor":
            errors.append(
                "--update-weight-transfer-mode tensor shares the torch backend's HF model buffer; "
                "with --backend megatron use broadcast or p2p"
            )
        return errors

    def _check_layout(self, spec) -> list[str]:
        """--backend megatron: the parallel layout against the model, every problem named (parallel.py)."""
        from glm_rl.parallel import LayoutError, validate_layout

        world = self.train.num_trainer_ranks
        try:
            layout = self.megatron.layout(world)
        except LayoutError as e:
            return [f"--num-trainer-ranks: {p}" for p in e.problems]
        return [f"parallel layout: {p}" for p in validate_layout(spec, layout, world_size=world)]

    def _check_model(self) -> list[str]:
        """The checkpoint's config against --model-preset, the layout, MTP training with CP, routing replay."""
        from glm_rl.models.glm45.checkpoint import CheckpointError, check_matches_preset, read_spec

        m, errors = self.model, []
        try:
            ckpt = m.hf_checkpoint
            spec = check_matches_preset(ckpt, m.model_preset) if m.model_preset else read_spec(ckpt)
            if self.train.backend == "megatron":
                errors += self._check_layout(spec)
                cp = self.megatron.context_parallel_size
                if self.megatron.enable_mtp_training and cp > 1 and spec.num_nextn_predict_layers > 1:
                    errors.append(
                        f"--enable-mtp-training with --context-parallel-size {cp}: {m.hf_checkpoint} has "
                        f"{spec.num_nextn_predict_layers} MTP layers; with CP the MTP loss is weighted "
                        "exactly for one (one backward scale per micro-batch serves every layer)"
                    )
            if self.algo.routing_replay is not RoutingReplay.OFF and spec.num_moe_layers == 0:
                errors.append(
                    f"routing replay (R2/R3) needs MoE layers, but {m.hf_checkpoint} has none "
                    f"(first_k_dense_replace={spec.first_k_dense_replace} = num_hidden_layers)"
                )
        except (CheckpointError, ValueError) as e:
            errors.append(str(e))
        return errors

    def _check_inputs(self) -> list[str]:
        """Read the checkpoint's config and the prompt file now, so bad input fails before Ray starts."""
        from glm_rl.rollout.data import DataError, load_prompts

        errors = self._check_model()
        try:
            load_prompts(self.rollout.prompt_data, **self.rollout.data_args())
        except DataError as e:
            errors.append(str(e))
        return errors + self._check_task()

    def _check_task(self) -> list[str]:
        """Rewards, dynamic sampling, hooks, eval sets, logging and rollout dumps (each section's own checks)."""
        return (
            self.rollout.errors()
            + self.eval.errors(self.rollout)
            + self.log.errors()
            + self.debug.errors(self.num_rollout, self.eval.enabled)
            + self._check_async()
            + self._check_agent()
        )

    def _check_agent(self) -> list[str]:
        """--custom-agent-function-path runs through the OpenAI-session hook; another generate hook cannot."""
        hook, agent = self.rollout.custom_generate_function_path, self.agentic.custom_agent_function_path
        if agent and hook not in (None, "glm_rl.rollout.agentic.openai_agent.generate"):
            return [
                f"--custom-agent-function-path {agent} runs through glm_rl.rollout.agentic.openai_agent.generate; "
                f"--custom-generate-function-path {hook} would replace it"
            ]
        return []

    def _check_async(self) -> list[str]:
        """The async loops need engines of their own, and a rollout the framework batches."""
        a = self.asynchrony
        errors = a.errors()
        if a.mode == "sync":
            return errors
        flag = f"--{a.mode}"
        if self.colocate:
            errors.append(f"{flag} needs engines on their own devices; --colocate time-shares them with the trainer")
        if self.debug.load_debug_rollout_data:
            errors.append(f"{flag} overlaps rollout with training; --load-debug-rollout-data has no rollout")
        if a.fully_async and self.rollout.rollout_function_path:
            errors.append("--fully-async batches the rollout itself; --rollout-function-path owns batching")
        return errors
