"""vocab_parallel_logprobs: log p(target) and entropy from vocab shards, against full-vocab fp32 references.

Reference = torch's own log_softmax over the whole vocab (what the torch backend and glm_rl.algo compute), with
autograd for the gradients. TP2 runs in two real gloo processes, each holding half the vocab. Chunking is forced
(CHUNK_ROWS = 5 on 4 × 7 rows) so chunk edges are crossed.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.multiprocessing as mp

from glm_rl.trainer import logprobs as lp


def _reference(logits, targets, temperature, g, h):
    leaf = logits.double().clone().requires_grad_(True)
    logsm = torch.log_softmax(leaf / temperature, -1)
    logp = logsm.gather(-1, targets[..., None]).squeeze(-1)
    entropy = -(logsm.exp() * logsm).sum(-1)
    ((logp * g).sum() + (entropy * h).sum()).backward()
    return logp, entropy, leaf.grad


def _case(seed: int = 0, vocab: int = 40):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, 7, vocab, generator=gen) * 3
    targets = torch.randint(0, vocab, (4, 7), generator=gen)
    g, h = torch.randn(4, 7, generator=gen), torch.randn(4, 7, generator=gen)
    return logits, targets, g, h


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_single_shard_matches_log_softmax(monkeypatch, temperature):
    monkeypatch.setattr(lp, "CHUNK_ROWS", 5)
    logits, targets, g, h = _case()
    ref_logp, ref_ent, ref_grad = _reference(logits, targets, temperature, g, h)
    x = logits.clone().requires_grad_(True)
    logp, ent = lp.vocab_parallel_logprobs(x, targets, temperature=temperature)
    ((logp * g).sum() + (ent * h).sum()).backward()
    assert (logp.double() - ref_logp).abs().max() < 1e-5
    assert (ent.double() - ref_ent).abs().max() < 1e-5
    assert (x.grad.double() - ref_grad).abs().max() < 1e-5
    assert ref_grad.abs().max() > 0.01  # the comparison is not between zeros


def test_bf16_logits_give_bf16_grads_close_to_fp32():
    logits, targets, g, h = _case(1)
    ref_logp, _, ref_grad = _reference(logits.bfloat16().float(), targets, 1.0, g, torch.zeros_like(h))
    x = logits.bfloat16().requires_grad_(True)
    logp, _ = lp.vocab_parallel_logprobs(x, targets)
    (logp * g).sum().backward()
    assert x.grad.dtype == torch.bfloat16 and logp.dtype == torch.float32
    assert (logp.double() - ref_logp).abs().max() < 1e-5  # fp32 math inside: only the input was rounded
    assert (x.grad.double() - ref_grad).abs().max() < 2e-2 * ref_grad.abs().max()


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="disagree"):
        lp.vocab_parallel_logprobs(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))


def _tp_worker(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    lp.CHUNK_ROWS = 5
    logits, targets, g, h = _case(2)
    width = logits.shape[-1] // world
    shard = logits[..., rank * width : (rank + 1) * width].clone().requires_grad_(True)
    logp, ent = lp.vocab_parallel_logprobs(
        shard, targets, temperature=0.8, vocab_start=rank * width, group=dist.group.WORLD
    )
    ((logp * g).sum() + (ent * h).sum()).backward()
    ref_logp, ref_ent, ref_grad = _reference(logits, targets, 0.8, g, h)
    result = {
        "logp": (logp.double() - ref_logp).abs().max().item(),
        "entropy": (ent.double() - ref_ent).abs().max().item(),
        "grad": (shard.grad.double() - ref_grad[..., rank * width : (rank + 1) * width]).abs().max().item(),
    }
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


def test_tp2_shards_match_full_vocab(tmp_path):
    out = str(tmp_path / "r")
    mp.spawn(_tp_worker, args=(2, str(tmp_path / "store"), out), nprocs=2, join=True)
    for rank in range(2):
        r = json.loads(open(f"{out}.{rank}").read())
        assert max(r.values()) < 1e-5, (rank, r)
