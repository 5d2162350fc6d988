"""The recipe training loop: pretrain (with MTP), full SFT, LoRA / DoRA on the Megatron GLM-4.5 model.

One process per rank (`torchrun --nproc-per-node N` sets RANK / WORLD_SIZE / MASTER_*; without them a single
process with a world of one). Order, and why:
1. everything that can be wrong with the input is checked first: config (`validate`), layout, checkpoint,
   tokenizer, data (tokenised and packed here, on every rank: small and deterministic) — no process group yet;
2. process group (gloo on CPU, NCCL on GPU) and Megatron's parallel state; DP = world / (TP × PP × CP);
3. model: this pipeline stage's layers; HF weights through the bridge when `pretrained_checkpoint` is set
   (finetuning, or continued pretraining), else random init from the preset's shapes (which depends on the
   layout: each pipeline stage draws its layers from the same seed); MTP layers (last stage) when `mtp` is on;
   adapters when `peft` is set (base frozen);
4. steps: each DP rank runs its rows of the global batch in micro-batches through megatron's own schedule
   (`get_forward_backward_func`: 1F1B over the pipeline stages, a plain loop without PP). Rows are padded at
   the end (loss mask 0, which causal attention never sees) to a length the CP split and SP accept; with CP
   every rank of a CP group takes its load-balanced share of each row (`cp_attention.split_for_cp`). The loss
   is the token mean over the whole global batch: each rank's token-sum divided by the global token count, so
   the gradient sums (`megatron.optim.reduce_grads_and_clip`: TP for SP-tagged, DP × CP, expert-DP, the
   duplicated MTP embedding over first/last stage, then clipping) give the global mean's gradient. MTP:
   megatron adds `mtp_loss_scaling_factor` × the MTP token mean through `MTPLossAutoScaler`, whose backward
   scale we set per micro-batch (`_mtp_scale`) so both losses are weighted alike on every layout. `loss` is the
   main LM loss; `mtp_loss` the MTP layer's, reported separately; both are computed on the last stage and
   summed there over DP × CP, then handed to global rank 0 over the pipeline group;
5. linear warmup to `train.lr`, cosine decay to `train.min_lr` over the remaining iterations;
6. one JSON line per step in `<save>/metrics.jsonl` and a progress line on rank 0; at the end HF weights
   (`hf/`, adapters merged in, gathered over TP / EP / PP) and, with PEFT, this rank's adapter tensors
   (`adapter/rank{R}.pt`).
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

    from glm_rl.models.glm45.checkpoint import check_matches_preset
    from glm_rl.models.glm45.presets import get_preset
    from glm_rl.parallel import LayoutError, check_layout

    validate(cfg)
    p = cfg.parallel
    world = int(os.environ.get("WORLD_SIZE", 1))
    try:  # the layout rules everything else uses (heads / experts / widths vs TP and EP, SP, world size)
        layout = p.layout(world)
        check_layout(get_preset(cfg.model.preset), layout, world_size=world)
    except LayoutError as e:
        raise RecipeError(f"recipe {cfg.name} on {world} ranks: {e}") from None
    dp = layout.dp
    if cfg.train.global_batch_size % (cfg.train.micro_batch_size * dp):
        raise RecipeError(
            f"train.global_batch_size {cfg.train.global_batch_size} is not a multiple of "
            f"train.micro_batch_size {cfg.train.micro_batch_size} x data-parallel size {dp} (every "
            f"rank must run the same number of micro-batches: the expert all-to-alls are collective)"
        )
    ckpt = cfg.pretrained_checkpoint or cfg.model.hf_checkpoint
    if ckpt is None or not (Path(ckpt) / "config.json").is_file():
        raise RecipeError(
            f"{'pretrained_checkpoint' if cfg.is_finetune else 'model.hf_checkpoint'} {ckpt}: "
            f"an HF checkpoint dir is needed (pretraining from scratch reads only its tokenizer)"
        )
    if cfg.pretrained_checkpoint:  # weights to start from: their shapes must be the preset's
        spec = check_matches_preset(ckpt, cfg.model.preset)
    else:
        spec = get_preset(cfg.model.preset)
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
    from glm_rl.ray.addresses import LOOPBACK, free_port

    dist.init_process_group(backend, init_method=f"tcp://{LOOPBACK}:{free_port(LOOPBACK)}", rank=0, world_size=1)


def build_model(cfg: RecipeConfig, spec, ckpt: Path, device: str):
    """This rank's stage of the Megatron model: HF weights when `pretrained_checkpoint` is set (finetune, or
    continued pretraining), else random init; adapters with PEFT."""
    from megatron.core import parallel_state as ps

    from glm_rl.trainer.backends.megatron.model import build_gpt_model, setup_model_parallel

    p = cfg.parallel
    setup_model_parallel(
        tp=p.tensor_model_parallel_size,
        ep=p.expert_model_parallel_size,
        pp=p.pipeline_model_parallel_size,
        cp=p.context_parallel_size,
        etp=p.expert_tensor_parallel_size,
        seed=cfg.train.seed,
    )
    model = build_gpt_model(
        spec,
        tp=p.tensor_model_parallel_size,
        ep=ps.get_expert_model_parallel_world_size(),
        params_dtype=getattr(torch, cfg.model.dtype),
        mtp=cfg.mtp.enabled,
        first_stage_layers=p.decoder_first_pipeline_num_layers,
        last_stage_layers=p.decoder_last_pipeline_num_layers,
        **_transformer_overrides(cfg),
    )
    if cfg.pretrained_checkpoint:
        _load_hf_weights(model, cfg, spec, ckpt)
    if cfg.peft:
        from glm_rl.recipes.peft import apply_peft

        apply_peft(
            model,
            cfg.lora.rank,
            cfg.lora.alpha,
            dora=cfg.peft == "dora",
            targets=tuple(cfg.lora.target_modules.split(",")),
            seed=cfg.train.seed,
        )
    return model.to(device).train()


def _transformer_overrides(cfg: RecipeConfig) -> dict:
    """The recipe's settings of Megatron's TransformerConfig (sequence parallel, MTP, recomputation)."""
    # calculate_per_token_loss: our loss function already divides by the global token count, so the schedule
    # must neither divide by the micro-batch's tokens nor by the number of micro-batches (see _Trainer)
    over = dict(sequence_parallel=cfg.parallel.sequence_parallel_on, calculate_per_token_loss=True)
    if cfg.mtp.enabled:
        over |= dict(mtp_num_layers=cfg.mtp.mtp_num_layers, mtp_loss_scaling_factor=cfg.mtp.mtp_loss_scaling_factor)
    if cfg.recompute.granularity:
        over |= dict(
            recompute_granularity=cfg.recompute.granularity,
            recompute_method=cfg.recompute.method if cfg.recompute.granularity == "full" else None,
            recompute_num_layers=cfg.recompute.num_layers if cfg.recompute.granularity == "full" else None,
        )
    return over


def _load_hf_weights(model, cfg: RecipeConfig, spec, ckpt: Path) -> None:
    """The HF checkpoint's weights (and its MTP layer's, with MTP on) into this rank's stage, via the bridge."""
    from glm_rl.models.glm45.checkpoint import load_hf_model
    from glm_rl.trainer.backends.megatron.bridge import import_hf_weights

    hf, _ = load_hf_model(ckpt, dtype=getattr(torch, cfg.model.dtype))
    state = hf.state_dict()
    if cfg.mtp.enabled:  # HF's model ignores the MTP layer's tensors: load them as the engine does
        from glm_rl.models.glm45.checkpoint import load_mtp
        from glm_rl.models.glm45.hf_names import mtp_named_tensors

        state |= mtp_named_tensors(load_mtp(hf), spec.num_hidden_layers)
    import_hf_weights(model, spec, state)
    del hf, state


class _Trainer:
    """The step: micro-batches through megatron's forward/backward schedule, loss scaling, the shared gradient
    sync + clip and optimizer (megatron/optim.py), metrics brought to global rank 0."""

    def __init__(self, cfg: RecipeConfig, model, device: str) -> None:
        from megatron.core import parallel_state as ps
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from glm_rl.trainer.backends.megatron.optim import Optimizer

        t, p = cfg.train, cfg.parallel
        self.recipe, self.model, self.device = cfg, model, device
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.dp_group = ps.get_data_parallel_group()  # token counts: CP ranks hold parts of the SAME rows
        self.dp_cp_group = ps.get_data_parallel_group(with_context_parallel=True)  # sums of per-token figures
        self.cp, self.cp_rank, self.cp_group = (
            ps.get_context_parallel_world_size(),
            ps.get_context_parallel_rank(),
            ps.get_context_parallel_group(),
        )
        self.pp_group, self.last_stage = ps.get_pipeline_model_parallel_group(), ps.is_pipeline_last_stage()
        # rows padded to 2 equal chunks per CP rank, the CP share a multiple of TP under sequence parallelism
        tp_seq = p.tensor_model_parallel_size if p.sequence_parallel_on else 1
        self.multiple = math.lcm(2 * self.cp, self.cp * tp_seq) if self.cp > 1 else tp_seq
        self.mtp_layers = cfg.mtp.mtp_num_layers if cfg.mtp.enabled else 0
        self._mtp_scale = torch.zeros(1)
        # megatron's schedule sets MTPLossAutoScaler's backward scale after each forward from this hook (a
        # ModelParallelConfig callable, set after the build as megatron's own training loop sets its hooks). On
        # the last stage (where the MTP layer lives) 1F1B runs each micro-batch's backward right after its
        # forward, so the scale it reads is that micro-batch's.
        model.config.mtp_grad_scale_func = lambda: self._mtp_scale
        # batch_p2p_comm (megatron's default) stays on: batch_isend_irecv works on gloo (seen, PP2 on CPU)
        self.forward_backward = get_forward_backward_func()
        self.opt = Optimizer(
            model,
            lr=t.lr,
            weight_decay=t.weight_decay,
            betas=(t.adam_beta1, t.adam_beta2),
            fp32_master=cfg.model.dtype == "bfloat16",
        )

    def _global_tokens(self, rows: PackedRows, idx: list[int]) -> float:
        """Loss tokens of the global batch. Summed over DP only: the CP ranks of a group hold the same rows."""
        n = rows.loss_mask[idx].sum().reshape(1)
        dist.all_reduce(n, group=self.dp_group)
        return max(float(n), 1.0)

    def _micro_batch(self, rows: PackedRows, mb: list[int], total: float) -> dict:
        """This rank's share of rows `mb`: padded, split for CP; with MTP its backward scale and token counts."""
        from glm_rl.trainer.backends.megatron.cp_attention import split_for_cp

        ids, tgt, mask = (x[mb] for x in (rows.input_ids, rows.targets, rows.loss_mask))
        pad = -ids.shape[1] % self.multiple
        if pad:  # at the end, loss mask 0: causal attention never lets real tokens see it
            ids, tgt, mask = (torch.nn.functional.pad(x, (0, pad)) for x in (ids, tgt, mask))
        pos = torch.arange(ids.shape[1]).expand_as(ids)
        local = [split_for_cp(x, self.cp_rank, self.cp).to(self.device) for x in (ids, pos, tgt, mask)]
        out = dict(zip(("ids", "pos", "tgt", "mask"), local), seq_length=ids.shape[1])
        if self.mtp_layers:
            # Megatron's MTP layer k trains on the loss mask rolled left k times (the last k positions have no
            # target). Under calculate_per_token_loss each rank backpropagates scale · (own / n_r) · S_r: S_r its
            # MTP token-sum, n_r its rolled tokens, own its unrolled ones (all local to the CP rank). The counts
            # come from the full rows, rolled as megatron's CP roll does (across CP ranks, zero at the end).
            rolled, counts = mask, []
            for _ in range(self.mtp_layers):
                rolled = torch.nn.functional.pad(rolled[:, 1:], (0, 1))
                counts.append((float(split_for_cp(rolled, self.cp_rank, self.cp).sum()), float(rolled.sum())))
            n_r, n_all = counts[0]  # one scale serves all layers: validate() refuses >1 MTP layer with CP
            own = float(local[3].sum())
            # backward scale c with c · (own / n_r) · S_r summed over CP ranks = (tokens / total) · S / n_all:
            # the micro-batch's MTP mean weighted by its token share, exactly as without CP (without CP c is
            # 1 / total). A CP rank with own = 0 adds nothing whatever c is: exact unless such a rank still
            # has rolled-in MTP targets (only possible with sparse SFT masks).
            c = float(mask.sum()) * n_r / (total * own * n_all) if own and n_all else 0.0
            out |= dict(mtp_scale=torch.tensor(c, device=self.device), mtp_counts=counts)
        return out

    def _forward_step(self, data, model):
        """megatron's forward_step_func: runs on every stage; the loss function only on the last."""
        from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

        b = next(data)
        if self.mtp_layers:
            self._mtp_scale = b["mtp_scale"]
        out = model(b["ids"], b["pos"], attention_mask=None, labels=b["tgt"], loss_mask=b["mask"])

        def loss_func(per_token: torch.Tensor):  # (B, S/CP) on the last stage
            summed = (per_token.float() * b["mask"]).sum()
            report = {"loss_sum": summed.detach()}
            if self.mtp_layers:  # this micro-batch's local token sum per MTP layer (tracker holds the mean)
                means = MTPLossLoggingHelper.tracker["loss_values"].detach().clone()
                MTPLossLoggingHelper.clean_metrics_in_tracker()
                n_r = torch.tensor([n for n, _ in b["mtp_counts"]]).to(means)
                report["mtp"] = torch.stack([means * n_r, n_r], dim=1)  # (layer, [token sum, tokens])
            return summed / self._total, b["mask"].sum().int(), report

        return out, loss_func

    def step(self, rows: PackedRows, step: int) -> dict:
        t = self.recipe.train
        lr = lr_at(step, self.recipe)
        for g in self.opt.opt.param_groups:
            g["lr"] = lr
        idx = batch_indices(len(rows), step, t.global_batch_size, self.dp_rank, self.dp_size, t.seed)
        self._total = total = self._global_tokens(rows, idx)
        micro = [
            self._micro_batch(rows, idx[k : k + t.micro_batch_size], total)
            for k in range(0, len(idx), t.micro_batch_size)
        ]
        for p in self.model.parameters():
            p.grad = None
        reports = self.forward_backward(
            forward_step_func=self._forward_step,
            data_iterator=iter(micro),
            model=[self.model],
            num_microbatches=len(micro),
            seq_length=micro[0]["seq_length"],
            micro_batch_size=t.micro_batch_size,
        )
        figures = self._reduce_figures(reports)
        grad_norm = reduce_grads_and_clip(self.model, t.clip_grad, self.device)
        self.opt.step()
        out = {"step": step + 1, "loss": float(figures[0]) / total, "lr": lr, "grad_norm": grad_norm, "tokens": total}
        if self.mtp_layers:
            out["mtp_loss"] = float(figures[1:].mean())
        return out

    def _reduce_figures(self, reports: list[dict]) -> torch.Tensor:
        """[loss token-sum over the global batch, MTP loss per layer (mean over micro-batches and DP ranks of
        each micro-batch's token mean)], the same on every rank (the last stage computes them)."""
        figures = torch.zeros(1 + self.mtp_layers, device=self.device)
        if self.last_stage:
            figures[0] = sum(r["loss_sum"] for r in reports)
            if self.mtp_layers:
                mtp = torch.stack([r["mtp"] for r in reports]).to(self.device)  # (micro, layer, [sum, tokens])
                if self.cp > 1:  # each CP rank holds part of every row: sum its token sums before dividing
                    dist.all_reduce(mtp, group=self.cp_group)
                # the same on every CP rank now: the DP x CP sum below counts it CP times
                figures[1:] = (mtp[..., 0] / mtp[..., 1].clamp(min=1)).mean(0) / (self.dp_size * self.cp)
            dist.all_reduce(figures, group=self.dp_cp_group)
        if dist.get_world_size(self.pp_group) > 1:  # only the last stage holds non-zero figures
            dist.all_reduce(figures, group=self.pp_group)
        return figures


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


def run_recipe(cfg: RecipeConfig, output_dir: str | Path | None = None, device: str | None = None, log=print) -> Path:
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
                log(
                    f"[{cfg.name}] step {step + 1}/{cfg.train.train_iters} loss {m['loss']:.4f}{mtp} "
                    f"lr {m['lr']:.2e} grad_norm {m['grad_norm']:.3f} ({m['seconds']:.1f}s)"
                )
        interval = cfg.checkpoint.save_interval
        if interval and (step + 1) % interval == 0 and step + 1 < cfg.train.train_iters:
            _save(cfg, model, spec, ckpt, out / f"iter_{step + 1}", final=False)
    _save(cfg, model, spec, ckpt, out)
    return out
