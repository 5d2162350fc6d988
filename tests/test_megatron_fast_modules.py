"""fast_modules.py: grouped-GEMM experts and SDPA attention must compute what megatron's local modules compute.

The tiny checkpoint is imported twice into megatron-core (real GPTModel, CPU, one gloo process spawned so the
CPU shims stay out of pytest): the local spec and the fast spec. Same parameters by construction (the bridge
fills both); logits and every parameter gradient of a scalar loss must agree in fp32 (summation order differs,
so not bitwise). Run under EP2 (two gloo processes): the grouped path then sees only its rank's local experts
and the tokens the all-to-all brought, the harder case; EP1 runs the same code with all experts local.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("megatron.core")


def _worker(rank: int, world: int, store: str, out: str, ep: int) -> None:
    os.environ["TORCHDYNAMO_DISABLE"] = "1"  # megatron's torch.compile'd helpers cost ~17 s cold on CPU
    import torch.distributed as dist

    from glm_rl.models.glm45.checkpoint import load_hf_model
    from glm_rl.models.glm45.presets import glm45_tiny
    from glm_rl.trainer.backends.megatron.bridge import import_hf_weights
    from glm_rl.trainer.backends.megatron.fast_modules import GroupedExperts, SDPAAttention
    from glm_rl.trainer.backends.megatron.model import build_gpt_model, setup_model_parallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    setup_model_parallel(ep=ep)
    spec = glm45_tiny()
    hf, _ = load_hf_model(spec.hf_checkpoint, preset=spec.name)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, spec.vocab_size, (3, 24), generator=gen)
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    weights = torch.randn(3, 24, spec.vocab_size, generator=gen)
    results = {}
    for fast in (False, True):
        model = build_gpt_model(spec, ep=ep, fast=fast)
        import_hf_weights(model, spec, hf.state_dict())
        kinds = {type(m) for m in model.modules()}
        assert (GroupedExperts in kinds and SDPAAttention in kinds) == fast, kinds
        logits = model(ids, pos, attention_mask=None)[..., : spec.vocab_size]  # drop TP vocab padding
        (logits * weights).sum().backward()
        results[fast] = (logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    (ref, ref_grads), (got, got_grads) = results[False], results[True]
    grad_diff = max(
        (got_grads[n] - g).abs().max().item() / max(g.abs().max().item(), 1e-12) for n, g in ref_grads.items()
    )
    if rank == 0:
        with open(out, "w") as f:
            json.dump(
                {
                    "logit_diff": (got - ref).abs().max().item(),
                    "logit_scale": ref.abs().max().item(),
                    "grad_rel_diff": grad_diff,
                    "n_grads": len(ref_grads),
                },
                f,
            )
    dist.destroy_process_group()


def test_fast_modules_match_local_spec(tmp_path, ep=2):
    out = tmp_path / "result.json"
    mp.spawn(_worker, args=(ep, str(tmp_path / "store"), str(out), ep), nprocs=ep, join=True)
    r = json.loads(out.read_text())
    assert r["n_grads"] > 40
    assert r["logit_diff"] <= 1e-5 * max(1.0, r["logit_scale"]), r
    assert r["grad_rel_diff"] <= 1e-4, r
