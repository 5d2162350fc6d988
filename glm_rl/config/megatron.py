"""The `megatron` section: the `--backend megatron` flags (slime's / Megatron's names), its parallel layout
(DP = world / (TP x PP x CP)) and the checks that need this section alone."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from glm_rl.config.fields import opt

if TYPE_CHECKING:
    from glm_rl.parallel import ParallelLayout


@dataclass(frozen=True)
class MegatronConfig:
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
    moe_token_dispatcher_type: Literal["alltoall", "allgather", "flex"] = opt(
        "alltoall", "megatron: MoE token dispatcher"
    )
    moe_enable_deepep: bool = opt(
        False, "megatron: DeepEP all-to-all (needs --moe-token-dispatcher-type flex and the deep_ep package)"
    )
    enable_mtp_training: bool = opt(False, "megatron: train the MTP layer on rollout tokens (detached backbone)")
    mtp_loss_scaling_factor: float = opt(0.2, "megatron: MTP loss weight")

    @property
    def sequence_parallel_on(self) -> bool:
        """--sequence-parallel as resolved: its value, or on exactly when TP > 1 (Megatron's MoE needs it)."""
        return self.tensor_model_parallel_size > 1 if self.sequence_parallel is None else self.sequence_parallel

    @property
    def sizes(self) -> dict[str, int]:
        """The parallel sizes by flag name."""
        return {
            "--tensor-model-parallel-size": self.tensor_model_parallel_size,
            "--pipeline-model-parallel-size": self.pipeline_model_parallel_size,
            "--context-parallel-size": self.context_parallel_size,
            "--expert-model-parallel-size": self.expert_model_parallel_size,
            "--expert-tensor-parallel-size": self.expert_tensor_parallel_size,
        }

    def dp_size(self, world_size: int) -> int:
        """Data-parallel ranks (the sample shards) of `world_size` trainer ranks: world / (TP x PP x CP)."""
        model = self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.context_parallel_size
        return max(world_size // max(model, 1), 1)

    def layout(self, world_size: int) -> ParallelLayout:
        """The `ParallelLayout` these flags ask for on `world_size` ranks; raises `LayoutError` when the world
        size has no whole DP."""
        from glm_rl.parallel import ParallelLayout

        return ParallelLayout.for_world_size(
            world_size,
            tp=self.tensor_model_parallel_size,
            pp=self.pipeline_model_parallel_size,
            cp=self.context_parallel_size,
            ep=self.expert_model_parallel_size,
            etp=self.expert_tensor_parallel_size,
            sequence_parallel=self.sequence_parallel_on,
            decoder_first_pipeline_num_layers=self.decoder_first_pipeline_num_layers,
            decoder_last_pipeline_num_layers=self.decoder_last_pipeline_num_layers,
        )

    def flags_set(self) -> list[str]:
        """The Megatron-only flags given a non-default value (refused with --backend torch)."""
        used = [f"{flag} {v}" for flag, v in self.sizes.items() if v != 1]
        return used + [
            flag
            for flag, on in (
                ("--sequence-parallel", self.sequence_parallel),
                ("--enable-mtp-training", self.enable_mtp_training),
                ("--moe-enable-deepep", self.moe_enable_deepep),
                ("--recompute-granularity", self.recompute_granularity),
            )
            if on
        ]

    def dispatcher_errors(self) -> list[str]:
        """--moe-enable-deepep needs the flex dispatcher and the deep_ep package, and flex needs DeepEP."""
        if not self.moe_enable_deepep:
            return (
                ["--moe-token-dispatcher-type flex needs --moe-enable-deepep"]
                if self.moe_token_dispatcher_type == "flex"
                else []
            )
        errors = []
        if self.moe_token_dispatcher_type != "flex":
            errors.append(
                f"--moe-enable-deepep needs --moe-token-dispatcher-type flex (got {self.moe_token_dispatcher_type})"
            )
        import importlib.util

        if importlib.util.find_spec("deep_ep") is None:
            errors.append(
                "--moe-enable-deepep needs the deep_ep package (DeepEP, CUDA + NVSHMEM), which is not importable here"
            )
        return errors

    def recompute_errors(self) -> list[str]:
        errors = []
        if self.recompute_method and self.recompute_granularity != "full":
            errors.append(f"--recompute-method {self.recompute_method} needs --recompute-granularity full")
        if self.recompute_granularity == "full" and (
            self.recompute_method is None or self.recompute_num_layers is None
        ):
            errors.append("--recompute-granularity full needs --recompute-method and --recompute-num-layers")
        return errors
