"""The few patches megatron-core 0.19.2 needs to run on CPU with gloo (CI, this dev box); nothing else.

megatron-core assumes CUDA in a handful of places that are not about the math. Each patch below replaces
exactly one of them, was seen to be needed on megatron-core 0.19.2 (`../shared/FACTS.md`, or by
tests/test_megatron_model.py for 6-7, 9-10), and leaves the
numerics alone. They are process-wide (they patch module attributes), so they are applied only by an explicit
`apply_cpu_shims()` call — importing this module changes nothing — and only where CUDA is absent: on a GPU
host `apply_cpu_shims()` is a no-op.

1. `torch.cuda.current_device()` → "cpu" (used as a `device=` argument when allocating buffers).
2. The CUDA RNG tracker → `CpuRNGStatesTracker`, same named states and fork semantics on the CPU generator
   (`model_parallel_cuda_manual_seed` then works unchanged).
3. Dummy `torch.cuda.Stream/Event/current_stream/stream/synchronize` for code paths that overlap work on side
   streams (on CPU everything is already ordered).
4. `transformer.utils.get_default_causal_mask` hard-codes device="cuda": the CPU twin.
5. (moved out: `apply_norm_sequence_parallel_patch`, below, is not about CPU and applies on GPU too.)
6. Expert-parallel all-to-all hands its split sizes to `all_to_all_single` as tensors, which gloo refuses:
   pass them as lists.
7. Uneven gather / reduce-scatter along the first dim (TP×EP token exchange inside the expert-TP group):
   gloo's `all_gather` and `reduce_scatter` need equal sizes: pad-gather-trim, and all-reduce-then-slice.
8. `jit_fuser` is `torch.compile` (17 s cold on this box for tiny fused ops): disable dynamo (0.009 s).
9. `rope_utils.get_pos_emb_on_this_cp_rank` (CP > 1) builds its chunk index with `pin_memory=True` and
   `.cuda()`: the same index_select on the CPU.
10. `Tensor.cuda()` returns the tensor itself: megatron moves buffers explicitly, e.g. the last pipeline
   stage's embedding copy (MTP / tied head) before its all-reduce with the first stage.
11. `pipeline_parallel/schedules.py` allocates its token counter with the literal device="cuda": that module
   gets a `torch` whose `zeros` maps "cuda" to the CPU (everything else is torch's own).
12. Activation recompute (`tensor_parallel.checkpoint`) saves and restores the CUDA RNG state next to the CPU
   one: on CPU there is only the CPU generator (saved and restored by the same code), so the CUDA part is a
   no-op.

Not a CPU shim, kept here so all megatron patches live in one file: `apply_norm_sequence_parallel_patch` —
megatron's torch-norm wrapper `WrappedTorchNorm` (the local spec's norm when Apex/TE are absent, so on our GPU
box too) asserts `not config.sequence_parallel`, but TP>1 with MoE needs SP. The norm math does not depend on
SP; we build it with SP off and tag its parameters `sequence_parallel=True`, which is what
finalize_model_grads reads to all-reduce their grads over TP (as megatron does for TE norms under SP).
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

_APPLIED = False
_NORM_PATCHED = False


class CpuRNGStatesTracker:
    """CPU stand-in for megatron's `CudaRNGStatesTracker`: named generator states, forked on the CPU RNG."""

    def __init__(self, *args, **kwargs):
        self.reset()

    def reset(self):
        self._is_initialized = False
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def is_initialized(self) -> bool:
        return self._is_initialized

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self._is_initialized = True
        self.states_ = states

    def add(self, name: str, seed: int):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


class _DummyStream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args):
        pass

    def wait_event(self, *args):
        pass

    def record_event(self, *args):
        return _DummyEvent()

    def synchronize(self):
        pass


class _DummyEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args):
        pass

    def wait(self, *args):
        pass

    def synchronize(self):
        pass


def _cpu_causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def apply_norm_sequence_parallel_patch() -> None:
    """Let `WrappedTorchNorm` be built under sequence parallelism (module docstring); idempotent, any device."""
    global _NORM_PATCHED
    if _NORM_PATCHED:
        return
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    original = WrappedTorchNorm.__new__

    def __new__(cls, config, hidden_size, eps=1e-5, *args, **kwargs):
        if not config.sequence_parallel:
            return original(cls, config, hidden_size, eps, *args, **kwargs)
        norm = original(cls, dataclasses.replace(config, sequence_parallel=False), hidden_size, eps, *args, **kwargs)
        for p in norm.parameters():
            p.sequence_parallel = True  # grads all-reduced over TP, as megatron does for TE norms under SP
        return norm

    WrappedTorchNorm.__new__ = staticmethod(__new__)
    _NORM_PATCHED = True


def _patch_cp_rope_chunks():
    from megatron.core.models.common.embeddings import rope_utils, rotary_pos_embedding

    def get_pos_emb_on_this_cp_rank(pos_emb, seq_dim, cp_group):
        if cp_group is None:
            raise ValueError("cp_group must be provided to get positional embedding per CP rank")
        cp, rank = cp_group.size(), cp_group.rank()
        chunks = pos_emb.view(*pos_emb.shape[:seq_dim], 2 * cp, -1, *pos_emb.shape[seq_dim + 1 :])
        chunks = chunks.index_select(seq_dim, torch.tensor([rank, 2 * cp - rank - 1]))
        return chunks.view(*chunks.shape[:seq_dim], -1, *chunks.shape[seq_dim + 2 :])

    rope_utils.get_pos_emb_on_this_cp_rank = get_pos_emb_on_this_cp_rank
    rotary_pos_embedding.get_pos_emb_on_this_cp_rank = get_pos_emb_on_this_cp_rank


def _patch_all_to_all_splits():
    from megatron.core.tensor_parallel.mappings import _AllToAll

    original = _AllToAll.forward

    def as_list(sizes):
        return sizes.tolist() if isinstance(sizes, torch.Tensor) else sizes

    def forward(ctx, group, input, output_split_sizes, input_split_sizes, *args, **kwargs):
        return original(ctx, group, input, as_list(output_split_sizes), as_list(input_split_sizes), *args, **kwargs)

    _AllToAll.forward = staticmethod(forward)


def _patch_uneven_first_dim_collectives():
    import torch.distributed as dist
    from megatron.core.tensor_parallel import mappings

    gather, reduce_scatter = mappings._gather_along_first_dim, mappings._reduce_scatter_along_first_dim

    def gather_uneven(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return gather(input_, group, output_split_sizes, use_global_buffer)
        padded = input_.new_zeros(max(output_split_sizes), *input_.shape[1:])
        padded[: input_.shape[0]] = input_
        outs = [torch.empty_like(padded) for _ in output_split_sizes]
        dist.all_gather(outs, padded, group=group)
        return torch.cat([o[:n] for o, n in zip(outs, output_split_sizes)])

    def reduce_scatter_uneven(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1:
            return reduce_scatter(input_, group, input_split_sizes, use_global_buffer)
        total = input_.clone()
        dist.all_reduce(total, group=group)
        start = sum(input_split_sizes[: group.rank()])
        return total[start : start + input_split_sizes[group.rank()]].contiguous()

    mappings._gather_along_first_dim = gather_uneven
    mappings._reduce_scatter_along_first_dim = reduce_scatter_uneven


class _ScheduleTorch:
    """torch as `pipeline_parallel/schedules.py` sees it on CPU: `zeros(device="cuda")` lands on the CPU."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def zeros(*args, device=None, **kwargs):
        return torch.zeros(*args, device="cpu" if device == "cuda" else device, **kwargs)


def _patch_schedule_counter():
    from megatron.core.pipeline_parallel import schedules

    schedules.torch = _ScheduleTorch()


def apply_cpu_shims() -> bool:
    """Patch megatron-core for CPU/gloo; idempotent. Returns whether the shims are active (False with CUDA)."""
    global _APPLIED
    if torch.cuda.is_available():
        return False
    if _APPLIED:
        return True
    import torch._dynamo as dynamo

    dynamo.config.disable = True  # 8

    torch.cuda.current_device = lambda: "cpu"  # 1
    torch.cuda.Stream = _DummyStream  # 3
    torch.cuda.Event = _DummyEvent
    torch.cuda.current_stream = lambda *a, **k: _DummyStream()
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    torch.cuda.synchronize = lambda *a, **k: None

    from megatron.core.tensor_parallel import random as mrandom

    mrandom._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()  # 2
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    mrandom.CudaRNGStatesTracker = CpuRNGStatesTracker  # a later force_reset builds the CPU one too
    mrandom._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()  # 12
    mrandom._set_cuda_rng_state = lambda *args, **kwargs: None

    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils as tutils

    tutils.get_default_causal_mask = _cpu_causal_mask  # 4
    fused_softmax.get_default_causal_mask = _cpu_causal_mask

    _patch_all_to_all_splits()  # 6
    _patch_uneven_first_dim_collectives()  # 7
    _patch_cp_rope_chunks()  # 9
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # 10
    _patch_schedule_counter()  # 11
    _APPLIED = True
    return True
