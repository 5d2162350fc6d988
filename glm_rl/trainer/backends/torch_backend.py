"""Torch trainer backend: HF `Glm4MoeForCausalLM`, data parallel over torch.distributed (gloo / NCCL).

It shares the HF model code path with the embedded engine, so in fp32 on CPU the trainer's logprobs equal the
engine's (the end-to-end test checks <= 1e-5). Gradients are summed over ranks with one flat all-reduce; each
rank's loss is pre-scaled by 1 / (response tokens in the global batch), see `trainer/batching.py`.

With `--lora-rank` > 0 the base model is frozen and wrapped with LoRA / DoRA adapters (`trainer/lora.py`): the
optimizer holds only adapter tensors, checkpoints hold only adapters (+ optimizer), and weight sync sends the
merged weights under the plain HF names, so engines and transports are the same as for full fine-tuning.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from glm_rl.algo import PolicyLossConfig
from glm_rl.checkpoint import MODEL_WEIGHTS, load_safetensors, load_torch, make_dirs, save_safetensors, save_torch
from glm_rl.config import AlgoConfig, LoraConfig, ModelConfig, TrainConfig
from glm_rl.models.glm45.checkpoint import load_hf_model
from glm_rl.rollout.samples import Sample
from glm_rl.trainer import lora
from glm_rl.trainer.backends.base import Phase, PolicyBackend
from glm_rl.trainer.batching import MicroBatch, collate, pack_micro_batches
from glm_rl.trainer.logprobs import vocab_parallel_logprobs
from glm_rl.trainer.routing_replay import RoutingReplay


def loss_config(algo: AlgoConfig) -> PolicyLossConfig:
    return PolicyLossConfig(
        eps_clip=algo.eps_clip,
        eps_clip_high=algo.eps_clip_high,
        eps_clip_c=algo.eps_clip_c,
        level="sequence" if algo.advantage_estimator == "gspo" else "token",
        kl_coef=algo.kl_loss_coef,
        kl_type=algo.kl_loss_type,
        entropy_coef=algo.entropy_coef,
    )


class TorchBackend(PolicyBackend):
    """A `TrainerBackend` over the HF model; `lora_cfg` (default: none) wraps it with adapters."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        train_cfg: TrainConfig,
        algo: AlgoConfig,
        *,
        lora_cfg: LoraConfig | None = None,
        temperature: float,
        device: str = "cpu",
    ) -> None:
        lora_cfg = lora_cfg or LoraConfig()
        dtype = getattr(torch, model_cfg.dtype)
        self.model, tokenizer = load_hf_model(model_cfg.hf_checkpoint, dtype=dtype, preset=model_cfg.model_preset)
        self.model.to(device).train()
        self.lora = lora_cfg.enabled
        self.flat = None  # (buffer, layout) once `flatten_weights` ran (colocated tensor sync)
        if self.lora:  # same seed on every rank (the actor seeds torch first), so every replica starts equal
            lora.apply_lora(
                self.model,
                lora_cfg.lora_rank,
                lora_cfg.lora_alpha,
                lora_cfg.lora_targets,
                dora=lora_cfg.use_dora,
                dropout=lora_cfg.lora_dropout,
                seed=torch.initial_seed(),
            )
        self.pad_id = tokenizer.pad_token_id
        self.cfg, self.algo, self.device = train_cfg, algo, device
        self.temperature = temperature if temperature > 0 else 1.0
        self.loss_cfg = loss_config(algo)
        self.replay = RoutingReplay(self.model)
        hf = self.model.config
        n_moe = hf.num_hidden_layers - getattr(hf, "first_k_dense_replace", 0)
        self.warm_up_shape = (hf.vocab_size, n_moe, hf.n_routed_experts, hf.num_experts_per_tok)
        self.ref_model = None
        if algo.kl_loss_coef > 0:
            self.ref_model, _ = load_hf_model(model_cfg.hf_checkpoint, dtype=dtype)
            self.ref_model.to(device).requires_grad_(False)
        trainable = [p for p in self.model.parameters() if p.requires_grad]  # LoRA: the adapters only
        self.opt = torch.optim.AdamW(
            trainable,
            lr=train_cfg.lr,
            weight_decay=train_cfg.weight_decay,
            betas=(train_cfg.adam_beta1, train_cfg.adam_beta2),
        )

    # -- forward ---------------------------------------------------------------------------------------------
    def _forward(self, model, mb: MicroBatch, with_entropy: bool = False):
        """(logp (B, T), entropy (B, T) | None) at the rollout temperature, read from the logits in row chunks
        (`trainer/logprobs.py`, fused on CUDA): no fp32 copy of the (B, T, V) logits, which at a 151,552-token
        vocab is ~10 GB per 16k-token micro-batch."""
        logits = model(input_ids=mb.input_ids.to(self.device), use_cache=False).logits  # (B, T, V), model dtype
        logp, entropy = vocab_parallel_logprobs(logits, mb.targets.to(self.device), temperature=self.temperature)
        return logp, (entropy if with_entropy else None)

    def _zero_grads(self) -> None:
        self.opt.zero_grad(set_to_none=False)

    def _reduce_grads_and_clip(self) -> float:
        params = [p for p in self.model.parameters() if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        if dist.is_initialized() and dist.get_world_size() > 1:
            flat = _flatten_dense_tensors(grads)
            dist.all_reduce(flat)
            for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
                g.copy_(synced)
        for p, g in zip(params, grads):
            p.grad = g
        return float(torch.nn.utils.clip_grad_norm_(params, self.cfg.clip_grad))

    def _micro_batches(self, samples: list[Sample], phase: Phase) -> list[MicroBatch]:
        routing = self._routing_source(phase)
        return [
            collate(group, self.pad_id, routing) for group in pack_micro_batches(samples, self.cfg.max_tokens_per_gpu)
        ]

    # -- weights / checkpoints -----------------------------------------------------------------------------------
    def flatten_weights(self):
        """One buffer (shared memory on CPU) holding every weight the engine loads, for the colocated fast path.

        Full fine-tuning: the model's own tensors become views into it. LoRA: the buffer is a separate copy of
        the MERGED weights (HF names), refreshed by every `named_tensors()` call, i.e. before every push."""
        from glm_rl.weights.flat import flatten_module_, plan_layout

        if self.flat is None:
            if self.lora:
                entries, total = plan_layout(list(lora.merged_state_dict(self.model).items()))
                flat = torch.zeros(total, dtype=torch.uint8, device=self.device)
            else:
                flat, entries = flatten_module_(self.model)
            self.flat = (flat if flat.is_cuda else flat.share_memory_(), entries)
        return self.flat

    def named_tensors(self):
        """(HF module name, tensor) for every weight and buffer the engine loads; LoRA: adapters merged in."""
        if not self.lora:
            return list(self.model.state_dict().items())
        merged = lora.merged_state_dict(self.model)
        if self.flat is None:
            return list(merged.items())
        from glm_rl.weights.flat import views

        out = views(*self.flat)
        for name, view in out:
            view.copy_(merged[name])
        return out

    def save(self, path: Path) -> None:
        """Full: the model in model.safetensors (tensor by tensor: flattened weights of several dtypes save
        too) + the optimizer in trainer.pt. LoRA: the adapter alone (`adapter/`, safetensors) + optimizer."""
        make_dirs(path)
        if self.lora:
            lora.save_adapter(self.model, path / "adapter")
        else:
            save_safetensors(self.model.state_dict().items(), path / MODEL_WEIGHTS)
        save_torch({"optimizer": self.opt.state_dict()}, path / "trainer.pt")

    def load(self, path: Path) -> None:
        """Both formats: model.safetensors, or (checkpoints written before it) the model inside trainer.pt."""
        state = load_torch(path / "trainer.pt", self.device)
        if self.lora:
            lora.load_adapter(self.model, path / "adapter")
        elif (path / MODEL_WEIGHTS).is_file():
            self.model.load_state_dict(load_safetensors(path / MODEL_WEIGHTS, self.device))  # copies in place
        elif "model" in state:
            self.model.load_state_dict(state["model"])
        else:
            raise ValueError(f"{path}: holds a LoRA adapter, not full weights; resume it with its --lora-rank flags")
        self.opt.load_state_dict(state["optimizer"])
