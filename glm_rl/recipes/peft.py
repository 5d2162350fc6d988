"""LoRA / DoRA on Megatron's tensor-parallel linears (local spec), with the math of `glm_rl.trainer.lora`.

A wrapper keeps the frozen Megatron linear as `.base` and returns what it returns, `(output, bias)`. The adapter
is sharded like the weight it adapts, so every rank adds exactly its slice of s·B·A·x:
- ColumnParallelLinear (linear_qkv, linear_fc1; weight rows split over TP): B (out/TP, r) split like the rows,
  A (r, in) replicated. h = A·x is all-gathered over the sequence first under sequence parallelism (the base
  gathers x the same way). Each rank then sees only its tokens' share of A's gradient, so A is tagged
  `sequence_parallel` (the trainer all-reduces such grads over TP, as for norms); the DoRA norm of this rank's
  rows adds a share too. DoRA's norm is per output row: local, no comm. TP > 1 without SP is refused:
  Megatron requires SP for MoE with TP, so that path would be dead code here.
- RowParallelLinear (linear_proj, linear_fc2; weight columns split): A (r, in/TP) split like the columns, B
  (out, r) replicated. B·A·x is a partial sum over the input shards, added to W·x before the base's
  reduce-scatter. DoRA: ||V||² per row is a sum over all TP shards
  (all-reduce, and all-reduce in backward, because each rank's loss depends on every shard), and the gain is
  applied to each rank's partial output before the reduction; B and the magnitude then get partial gradients
  over TP (tagged `sequence_parallel`).
- Routed experts (`local_experts.N.linear_fc1/fc2`, SequentialMLP): only expert-TP 1 is supported (whole
  experts per rank, the recipes' layout): plain LoRA / DoRA with no communication; the adapter parameters'
  names contain `.experts.`, so the trainer reduces them over the expert-data-parallel group like the experts.
  Expert-TP > 1 is refused by name. Shared experts and dense MLPs are ordinary column / row linears.
Frozen: embeddings, LM head, norms, router, the MTP layer's eh_proj (its transformer layer's linears are adapted
like any other). `merge_adapters` folds the adapters into the base weights and unwraps, so the bridge's
`export_hf_weights` sees the plain model.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from glm_rl.trainer.lora import adapted_weight, init_adapter, lora_delta

TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


def _tp(base) -> int:
    import torch.distributed as dist

    g = base.tp_group
    return 1 if g is None or not dist.is_initialized() else dist.get_world_size(g)


class _AllReduceSum(torch.autograd.Function):
    """Sum over `group` forward and backward: the exact gradient when every rank's loss depends on the sum."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        import torch.distributed as dist

        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        import torch.distributed as dist

        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    return _AllReduceSum.apply(x, group)


class MegatronLoRA(nn.Module):
    """A Megatron Column/RowParallelLinear plus a rank-r LoRA (or DoRA, with `dora`) adapter."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dora: bool, generator: torch.Generator) -> None:
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        super().__init__()
        self.base, self.scale = base.requires_grad_(False), alpha / rank
        self.column = isinstance(base, ColumnParallelLinear)
        if not self.column and not isinstance(base, RowParallelLinear):
            raise TypeError(f"LoRA target is a {type(base).__name__}, not a Column/RowParallelLinear")
        self.tp = _tp(base)
        if base.is_expert and self.tp > 1:
            raise ValueError("LoRA on routed experts needs expert_tensor_parallel_size 1 (whole experts per rank)")
        self.sp = bool(base.sequence_parallel) and not base.explicit_expert_comm and self.tp > 1
        if self.tp > 1 and not self.sp:  # megatron requires SP for MoE with TP; the other path is not built
            raise ValueError("LoRA with tensor parallel size > 1 needs sequence parallel (parallel.sequence_parallel)")
        w = base.weight  # column: (out/TP, in); row: (out, in/TP)
        out_local, in_local = w.shape
        self.lora_A = nn.Parameter(torch.empty(rank, in_local, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.empty(out_local, rank, dtype=w.dtype, device=w.device))
        full_in = in_local * (1 if self.column else self.tp)
        # A initialised as one (r, in) matrix from the shared generator, each rank keeping its slice: the same
        # full adapter for any TP size (so TP2 equals TP1 from step 0)
        a_full = torch.empty(rank, full_in, dtype=w.dtype)
        init_adapter(a_full, torch.empty(1, rank), generator)
        rank_id = 0 if self.tp == 1 else torch.distributed.get_rank(base.tp_group)
        with torch.no_grad():
            self.lora_A.copy_(a_full if self.column else a_full[:, rank_id * in_local : (rank_id + 1) * in_local])
            self.lora_B.zero_()
        self.lora_magnitude = nn.Parameter(self._row_norm(w.detach()).detach()) if dora else None
        self._tag()

    def _tag(self) -> None:
        """Attributes the trainer's gradient sync and grad norm read (see the module docstring)."""
        split, replicated = (self.lora_B, self.lora_A) if self.column else (self.lora_A, self.lora_B)
        split.tensor_model_parallel, split.partition_dim = self.tp > 1, 0 if self.column else 1
        # column A: each rank's grad covers its tokens (SP); row B: applied before the TP reduction, so each
        # rank's grad covers its input shard's partial sum. Both are summed over TP by the trainer.
        replicated.sequence_parallel = self.tp > 1
        if self.lora_magnitude is not None:
            if self.column:
                self.lora_magnitude.tensor_model_parallel, self.lora_magnitude.partition_dim = self.tp > 1, 0
            else:
                self.lora_magnitude.sequence_parallel = self.tp > 1

    @property
    def weight(self) -> torch.Tensor:  # for code that reads `linear.weight` (dtype, device)
        return self.base.weight

    def _row_norm(self, v: torch.Tensor) -> torch.Tensor:
        """||V|| per output row over the FULL input dim (row-parallel: summed over TP shards)."""
        sq = (v.float() ** 2).sum(-1)
        if not self.column and self.tp > 1:
            sq = _all_reduce_sum(sq, self.base.tp_group)
        return sq.sqrt().to(v.dtype)

    def _gain(self) -> torch.Tensor:
        v = self.base.weight + lora_delta(self.lora_A, self.lora_B, self.scale)
        return self.lora_magnitude / self._row_norm(v)

    def forward(self, x: torch.Tensor, *args, **kwargs):
        from megatron.core import tensor_parallel as tpr

        g = self.base.tp_group
        if self.column:
            h = F.linear(x, self.lora_A)  # (S[/TP], B, r)
            if self.sp:
                h = tpr.gather_from_sequence_parallel_region(h, group=g)
            lora = F.linear(h, self.lora_B) * self.scale  # (S, B, out/TP)
            out, bias = self.base(x, *args, **kwargs)
            if self.lora_magnitude is None:
                return out + lora, bias
            in_bias = self.base.bias is not None and not self.base.skip_bias_add
            wx = out - self.base.bias if in_bias else out
            gain = self._gain()
            return gain * (wx + lora) + (self.base.bias if in_bias else 0), bias
        return self._row_forward(x)

    def _row_forward(self, x: torch.Tensor):
        """Row-parallel: the partial sums W·x + s·B·A·x (times the DoRA gain) reduced like the base's output."""
        from megatron.core import tensor_parallel as tpr

        base, g = self.base, self.base.tp_group
        partial = F.linear(x, base.weight) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale
        if self.lora_magnitude is not None:
            partial = partial * self._gain()
        if base.explicit_expert_comm or self.tp == 1:
            out = partial
        else:
            out = tpr.reduce_scatter_to_sequence_parallel_region(partial, group=g)
        if base.skip_bias_add:
            return out, base.bias
        return (out + base.bias if base.bias is not None else out), None

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        if self.lora_magnitude is None:
            return adapted_weight(self.base.weight, self.lora_A, self.lora_B, self.scale)
        return (self.base.weight + lora_delta(self.lora_A, self.lora_B, self.scale)) * self._gain().unsqueeze(-1)


def global_name(model: nn.Module, name: str) -> str:
    """`name` with this rank's local decoder-layer and expert indices made global (the PP stage's layer offset,
    the EP rank's expert offset): the same weight has the same global name under every parallel layout."""
    parts = name.split(".")
    out = list(parts)
    for i in range(1, len(parts) - 1):
        if parts[i - 1] == "decoder" and parts[i] == "layers" and parts[i + 1].isdigit():
            out[i + 1] = str(model.get_submodule(".".join(parts[: i + 2])).layer_number - 1)  # layer_number: global
        if parts[i] == "local_experts" and parts[i + 1].isdigit() and i >= 2:
            moe = model.get_submodule(".".join(parts[: i - 1]))  # the MoE layer above `experts`
            out[i + 1] = str(moe.local_expert_indices[int(parts[i + 1])])
    return ".".join(out)


def apply_peft(
    model: nn.Module, rank: int, alpha: float, dora: bool = False, targets=TARGETS, seed: int = 0
) -> list[str]:
    """Freeze `model` and wrap every Megatron linear whose leaf name is in `targets`; returns their names.
    Each adapter's A comes from a generator seeded by (seed, the weight's global name): every rank, and every
    TP / PP / EP layout, starts from the same adapters."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise ValueError(f"lora.target_modules {','.join(targets)}: unknown {unknown}; valid: {','.join(TARGETS)}")
    model.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        leaf = name.rsplit(".", 1)[-1]
        if leaf in targets and isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            parent = model.get_submodule(name.rsplit(".", 1)[0])
            key = hashlib.sha256(f"{seed}:{global_name(model, name)}".encode()).digest()
            gen = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") & ((1 << 63) - 1))
            setattr(parent, leaf, MegatronLoRA(module, rank, alpha, dora, gen))
            wrapped.append(name)
    if not wrapped:
        raise ValueError(f"lora.target_modules {','.join(targets)} matched no Megatron linear")
    return wrapped


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """This rank's adapter tensors (lora_A / lora_B / lora_magnitude) by module path: an adapter checkpoint."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" in n}


@torch.no_grad()
def merge_adapters(model: nn.Module) -> int:
    """Fold every adapter into its base weight and put the base module back; returns how many were merged."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, MegatronLoRA)]
    for name, m in found:
        m.base.weight.copy_(m.merged_weight())
        parent = model.get_submodule(name.rsplit(".", 1)[0])
        setattr(parent, name.rsplit(".", 1)[-1], m.base)
    return len(found)
