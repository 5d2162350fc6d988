"""The `lora` section: LoRA / DoRA adapters on a frozen base (torch backend; glm_rl/trainer/lora.py)."""

from __future__ import annotations

from dataclasses import dataclass

from glm_rl.config.fields import opt


@dataclass(frozen=True)
class LoraConfig:
    lora_rank: int = opt(0, "LoRA rank: train low-rank adapters on a frozen base (0 = full fine-tuning)")
    lora_alpha: float = opt(16.0, "LoRA alpha: the adapter is scaled by alpha / rank")
    lora_dropout: float = opt(0.0, "dropout on the adapters' input (linear targets)")
    target_modules: str = opt(
        "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        "comma list of modules that get adapters: q_proj k_proj v_proj o_proj (attention), "
        "gate_proj up_proj down_proj (dense MLP, shared expert), experts (routed experts, "
        "one adapter per expert)",
    )
    use_dora: bool = opt(False, "DoRA: learn a magnitude per output row on top of the LoRA direction")

    @property
    def enabled(self) -> bool:
        return self.lora_rank > 0

    @property
    def lora_targets(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.target_modules.split(",") if t.strip())

    def errors(self, backend: str) -> list[str]:
        """The LoRA flags' problems, each naming its flag (`backend`: --backend, which must be torch)."""
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
        if self.lora_rank > 0 and backend != "torch":
            errors.append(f"--lora-rank with --backend {backend} is not supported yet (use --backend torch)")
        return errors
