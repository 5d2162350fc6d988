"""The recipe training loop: pretrain (with MTP), full SFT, LoRA / DoRA on the Megatron GLM-4.5 model.

One process per rank (`torchrun --nproc-per-node N` sets RANK / WORLD_SIZE / MASTER_*; without them a single
process with a world of one). Order, and why:
1. everything that can be wrong with the input is checked first: config (`validate`), checkpoint, tokenizer,
   data (tokenised and packed here, on every rank: small and deterministic) — no process group yet;
2. process group (gloo on CPU, NCCL on GPU) and Megatron's parallel state; DP = world / (TP × PP × CP);
3. model: random init for pretraining (the preset's shapes), HF weights through the bridge for finetuning;
   MTP layers when `mtp` is on; adapters when `peft` is set (base frozen);
4. steps: each DP rank runs its rows of the global batch in micro-batches. The loss is the token mean over the
   whole global batch (each micro-batch's token-sum divided by the global token count), so the trainer's
   gradient sums (`megatron.optim.reduce_grads_and_clip`: TP for SP-tagged, DP, expert-DP, then clipping) give the
   global mean's gradient. MTP: megatron adds `mtp_loss_scaling_factor` × the MTP token mean through
   `MTPLossAutoScaler`; its backward scale is set to the micro-batch's token share so both losses are weighted
   alike. `loss` is the main LM loss; `mtp_loss` the MTP layer's, reported separately;
5. linear warmup to `train.lr`, cosine decay to `train.min_lr` over the remaining iterations;
6. one JSON line per step in `<save>/metrics.jsonl` and a progress line on rank 0; at the end HF weights
   (`hf/`, adapters merged in) and, with PEFT, this rank's adapter tensors (`adapter/rank{R}.pt`).
Pipeline and context parallelism are planned (`planning.py`) but not run by this loop: refused up front.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

from glm_rl.recipes.config import RecipeConfig, RecipeError, validate
from glm_rl.recipes.data import PackedRows, batch_indices, load_rows
from glm_rl.trainer.backends.megatron.optim import reduce_grads_and_clip


def lr_at(step: int, cfg: RecipeConfig) -> float:
    """Linear warmup over `lr_warmup_iters`, then cosine from `lr` to `min_lr` at the last iteration."""
    t = cfg.train
    if step < t.lr_warmup_iters:
        return t.lr * (step + 1) / t.lr_warmup_iters
    span = max(1, t.train_iters - t.lr_warmup_iters - 1)
    progress = min(1.0, (step - t.lr_warmup_iters) / span)
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * progress))


def prepare(cfg: RecipeConfig):
    """(spec, tokenizer, rows, checkpoint dir): all input checks, before any distributed work."""
    from transformers import AutoTokenizer

    from glm_rl.models.checkpoint import check_matches_preset
    from glm_rl.models.presets import get_preset
    from glm_rl.parallel import LayoutError, check_layout

    validate(cfg)
    p = cfg.parallel
    if p.pipeline_model_parallel_size > 1 or p.context_parallel_size > 1:
        raise RecipeError("this runner trains with TP / EP / DP only; parallel.pipeline_model_parallel_size and "
                          "parallel.context_parallel_size must be 1 here (the layout is still checked by "
                          "`recipe_plan`)")
    world = int(os.environ.get("WORLD_SIZE", 1))
    try:  # the layout rules everything else uses (heads / experts / widths vs TP and EP, SP, world size)
        layout = p.layout(world)
        check_layout(get_preset(cfg.model.preset), layout, world_size=world)
    except LayoutError as e:
        raise RecipeError(f"recipe {cfg.name} on {world} ranks: {e}") from None
    dp = layout.dp
    if cfg.train.global_batch_size % (cfg.train.micro_batch_size * dp):
        raise RecipeError(f"train.global_batch_size {cfg.train.global_batch_size} is not a multiple of "
                          f"train.micro_batch_size {cfg.train.micro_batch_size} x data-parallel size {dp} (every "
                          f"rank must run the same number of micro-batches: the expert all-to-alls are collective)")
    ckpt = cfg.pretrained_checkpoint if cfg.is_finetune else cfg.model.hf_checkpoint
    if ckpt is None or not (Path(ckpt) / "config.json").is_file():
        raise RecipeError(f"{'pretrained_checkpoint' if cfg.is_finetune else 'model.hf_checkpoint'} {ckpt}: "
                          f"an HF checkpoint dir is needed (pretraining reads only its tokenizer)")
    spec = check_matches_preset(ckpt, cfg.model.preset) if cfg.is_finetune else get_preset(cfg.model.preset)
    if cfg.data.path is None:
        raise RecipeError("data.path is not set")
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    rows = load_rows(cfg.data.kind, cfg.data.path, tokenizer, cfg.data.seq_length, cfg.data.text_key)
    return spec, tokenizer, rows, Path(ckpt)


def init_distributed() -> None:
    """torchrun's env:// rendezvous, or a world of one on a free local port."""
    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend)
        return
    from glm_rl.rollout.router import free_port

    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)


def build_model(cfg: RecipeConfig, spec, ckpt: Path, device: str):
    """The Megatron model on this rank: HF weights (finetune) or random init (pretrain); adapters with PEFT."""
    from megatron.core import parallel_state as ps

    from glm_rl.trainer.backends.megatron.model import build_gpt_model, setup_model_parallel

    p = cfg.parallel
    setup_model_parallel(tp=p.tensor_model_parallel_size, ep=p.expert_model_parallel_size,
                         etp=p.expert_tensor_parallel_size, seed=cfg.train.seed)
    over = dict(sequence_parallel=p.sequence_parallel_on)
    if cfg.mtp.enabled:
        over |= dict(mtp_num_layers=cfg.mtp.mtp_num_layers, mtp_loss_scaling_factor=cfg.mtp.mtp_loss_scaling_factor)
    if cfg.recompute.granularity:
        over |= dict(recompute_granularity=cfg.recompute.granularity,
                     recompute_method=cfg.recompute.method if cfg.recompute.granularity == "full" else None,
                     recompute_num_layers=cfg.recompute.num_layers if cfg.recompute.granularity == "full" else None)
    model = build_gpt_model(spec, tp=p.tensor_model_parallel_size, ep=ps.get_expert_model_parallel_world_size(),
                            params_dtype=getattr(torch, cfg.model.dtype), mtp=cfg.mtp.enabled, **over)
    if cfg.is_finetune:
        from glm_rl.models.checkpoint import load_hf_model
        from glm_rl.trainer.backends.megatron.bridge import import_hf_weights

        hf, _ = load_hf_model(ckpt, dtype=getattr(torch, cfg.model.dtype))
        import_hf_weights(model, spec, hf.state_dict())
        del hf
    if cfg.peft:
        from glm_rl.recipes.peft import apply_peft

        apply_peft(model, cfg.lora.rank, cfg.lora.alpha, dora=cfg.peft == "dora",
                   targets=tuple(cfg.lora.target_modules.split(",")), seed=cfg.train.seed)
    return model.to(device).train()


class _Trainer:
    """The step: micro-batches, loss scaling, the shared gradient sync + clip and optimizer (megatron/optim.py)."""

    def __init__(self, cfg: RecipeConfig, model, device: str) -> None:
        from megatron.core import parallel_state as ps

        from glm_rl.trainer.backends.megatron.optim import Optimizer

        t = cfg.train
        self.recipe, self.model, self.device = cfg, model, device
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.dp_group = ps.get_data_parallel_group()
        self.opt = Optimizer(model, lr=t.lr, weight_decay=t.weight_decay, betas=(t.adam_beta1, t.adam_beta2),
                             fp32_master=cfg.model.dtype == "bfloat16")

    def _global_tokens(self, rows: PackedRows, idx: list[int]) -> float:
        n = rows.loss_mask[idx].sum().reshape(1)
        dist.all_reduce(n, group=self.dp_group)
        return max(float(n), 1.0)

    def step(self, rows: PackedRows, step: int) -> dict:
        from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler

        from glm_rl.trainer.backends.megatron.model import take_mtp_metrics

        t = self.recipe.train
        lr = lr_at(step, self.recipe)
        for g in self.opt.opt.param_groups:
            g["lr"] = lr
        idx = batch_indices(len(rows), step, t.global_batch_size, self.dp_rank, self.dp_size, t.seed)
        total = self._global_tokens(rows, idx)
        for p in self.model.parameters():
            p.grad = None
        loss_sum = torch.zeros(1)
        for k in range(0, len(idx), t.micro_batch_size):
            mb = idx[k:k + t.micro_batch_size]
            ids, tgt, mask = (x[mb].to(self.device) for x in (rows.input_ids, rows.targets, rows.loss_mask))
            pos = torch.arange(ids.shape[1], device=self.device).expand_as(ids)
            n_mb = float(mask.sum())
            MTPLossAutoScaler.set_loss_scale(torch.tensor(n_mb / total))
            per_token = self.model(ids, pos, attention_mask=None, labels=tgt, loss_mask=mask).float()  # (B, S)
            summed = (per_token * mask).sum()
            (summed / total).backward()
            loss_sum += summed.detach()
        dist.all_reduce(loss_sum, group=self.dp_group)
        grad_norm = reduce_grads_and_clip(self.model, t.clip_grad, self.device)
        self.opt.step()
        out = {"step": step + 1, "loss": float(loss_sum) / total, "lr": lr, "grad_norm": grad_norm,
               "tokens": total}
        if mtp := take_mtp_metrics(-(-len(idx) // t.micro_batch_size)):
            loss = mtp["loss"]  # per layer, mean over this rank's micro-batches
            dist.all_reduce(loss, group=self.dp_group)
            out["mtp_loss"] = float(loss.mean()) / self.dp_size
        return out


def _save(cfg: RecipeConfig, model, spec, ckpt: Path, out: Path, final: bool = True) -> None:
    """Adapters per rank under out/adapter; HF weights (adapters merged in, which ends training: only at the
    end) under out/hf. Intermediate PEFT saves hold the adapters only. Collective."""
    from safetensors.torch import save_file

    from glm_rl.recipes.peft import adapter_state_dict, merge_adapters
    from glm_rl.trainer.backends.megatron.bridge import export_hf_weights

    if cfg.peft:
        (out / "adapter").mkdir(parents=True, exist_ok=True)
        torch.save(adapter_state_dict(model), out / "adapter" / f"rank{dist.get_rank()}.pt")
        if not final:
            return
        merge_adapters(model)
    tensors = {n: t.detach().contiguous().clone() for n, t in export_hf_weights(model, spec)}
    if dist.get_rank() == 0:
        (out / "hf").mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out / "hf" / "model.safetensors"))
        for f in ckpt.iterdir():
            if f.suffix in (".json", ".jinja") and "index" not in f.name:
                shutil.copy(f, out / "hf" / f.name)


def run_recipe(cfg: RecipeConfig, output_dir: str | Path | None = None, device: str | None = None,
               log=print) -> Path:
    """Train `cfg`; returns the run directory (metrics.jsonl, hf/, adapter/)."""
    spec, _, rows, ckpt = prepare(cfg)  # every input error before any process group
    out = Path(output_dir or cfg.checkpoint.save or f"runs/{cfg.name}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    own_group = not dist.is_initialized()
    init_distributed()
    try:
        return _train(cfg, spec, rows, ckpt, out, device, log)
    finally:
        from megatron.core import parallel_state as ps

        ps.destroy_model_parallel()
        if own_group:
            dist.destroy_process_group()


def _train(cfg: RecipeConfig, spec, rows: PackedRows, ckpt: Path, out: Path, device: str, log) -> Path:
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    model = build_model(cfg, spec, ckpt, device)
    trainer = _Trainer(cfg, model, device)
    rank0 = dist.get_rank() == 0
    if rank0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.jsonl").write_text("")
    start = time.time()
    for step in range(cfg.train.train_iters):
        m = trainer.step(rows, step)
        m["seconds"] = time.time() - start
        if rank0:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(m) + "\n")
            if step % cfg.train.log_interval == 0 or step + 1 == cfg.train.train_iters:
                mtp = f" mtp_loss {m['mtp_loss']:.4f}" if "mtp_loss" in m else ""
                log(f"[{cfg.name}] step {step + 1}/{cfg.train.train_iters} loss {m['loss']:.4f}{mtp} "
                    f"lr {m['lr']:.2e} grad_norm {m['grad_norm']:.3f} ({m['seconds']:.1f}s)")
        interval = cfg.checkpoint.save_interval
        if interval and (step + 1) % interval == 0 and step + 1 < cfg.train.train_iters:
            _save(cfg, model, spec, ckpt, out / f"iter_{step + 1}", final=False)
    _save(cfg, model, spec, ckpt, out)
    return out

