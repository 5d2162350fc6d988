"""The static-KV-cache decoder (decode/static.py) against HF's DynamicCache path of the same engine code, on the
shipped tiny checkpoint (fp32, CPU: the decoder runs without CUDA graphs here; tests/test_gpu.py covers graphs)."""

from __future__ import annotations

import pytest
import torch

from glm_rl.engine.batch import GenerationRequest, SamplingParams
from glm_rl.engine.decode import run_batch
from glm_rl.engine.decode.graphs import batch_bucket, span_bucket
from glm_rl.engine.decode.static import StaticDecoder
from glm_rl.models.glm45.checkpoint import load_hf_model
from glm_rl.models.glm45.presets import TINY_CHECKPOINT


@pytest.fixture(scope="module")
def model():
    return load_hf_model(TINY_CHECKPOINT, dtype=torch.float32)[0]


def _requests(n: int, seed: int, max_new: int = 24) -> list[GenerationRequest]:
    """Prompts of 1-13 tokens; greedy, plain sampling, top-k and top-p rows; lengths that end at different
    steps (so the cache is compacted several times); eos stops on."""
    g = torch.Generator().manual_seed(seed)
    kinds = [
        SamplingParams(temperature=0.0, max_new_tokens=max_new),
        SamplingParams(temperature=1.0, max_new_tokens=max_new - 7),
        SamplingParams(temperature=0.8, top_k=5, max_new_tokens=max_new - 3),
        SamplingParams(temperature=1.2, top_p=0.7, max_new_tokens=max_new - 11),
    ]
    out = []
    for i in range(n):
        ids = tuple(torch.randint(0, 32, (int(torch.randint(1, 14, (1,), generator=g)),), generator=g).tolist())
        out.append(
            GenerationRequest(
                f"r{i}",
                ids,
                kinds[i % len(kinds)],
                seed=seed * 100 + i,
                return_logprob=True,
                return_routed_experts=True,
            )
        )
    return out


def _run(model, requests, decoder=None, should_abort=lambda: False):
    gates = [layer.mlp.gate for i, layer in enumerate(model.model.layers) if i >= model.config.first_k_dense_replace]
    eos = model.generation_config.eos_token_id
    return run_batch(
        model,
        requests,
        eos_ids=[eos] if isinstance(eos, int) else eos,
        pad_id=0,
        gates=gates,
        should_abort=should_abort,
        decoder=decoder,
    )


def _assert_same(dynamic, static):
    for a, b in zip(dynamic, static, strict=True):
        assert b.output_ids == a.output_ids, a.req.rid
        assert b.finish == a.finish, a.req.rid
        assert max((abs(x - y) for x, y in zip(a.logprobs, b.logprobs)), default=0.0) <= 1e-5, a.req.rid
        assert torch.equal(torch.cat(b.routed).sort(-1).values, torch.cat(a.routed).sort(-1).values), a.req.rid


def test_static_cache_decodes_like_the_dynamic_cache(model):
    requests = _requests(11, seed=3)
    dynamic = _run(model, requests)
    assert len({len(r.output_ids) for r in dynamic}) > 3  # rows finish at different steps: compaction ran
    _assert_same(dynamic, _run(model, requests, StaticDecoder(model, max_batch=16)))


def test_one_sampling_group_samples_inside_the_decode_step(model):
    """When every row shares sampling params (the RL case) the decoder samples inside its step (`decode_sampled`,
    one CUDA graph on GPU) and queues each step before the host has seen the previous one's tokens; the draws
    equal the eager sampler's over the dynamic cache, token for token, though rows finish at different steps
    (their queued extra token is discarded)."""
    sp = SamplingParams(temperature=0.9, top_p=0.9, max_new_tokens=20)
    requests = [GenerationRequest(r.rid, r.input_ids, sp, r.seed, True, True) for r in _requests(6, seed=8)]
    decoder = StaticDecoder(model, max_batch=8)
    calls = {"decode": 0, "decode_sampled": 0}
    for name in calls:

        def counted(*a, _f=getattr(decoder, name), _n=name, **k):  # noqa: B008 - bind this iteration's method
            calls[_n] += 1
            return _f(*a, **k)

        setattr(decoder, name, counted)
    dynamic = _run(model, requests)
    _assert_same(dynamic, _run(model, requests, decoder))
    assert len({len(r.output_ids) for r in dynamic}) > 2
    # one step per token after the prefill's, plus the queued step that found every row finished
    assert calls["decode"] == 0 and calls["decode_sampled"] == max(len(r.output_ids) for r in dynamic)


def test_cache_grows_between_batches_and_abort_keeps_partial_rows(model):
    decoder = StaticDecoder(model, max_batch=8)
    short = _requests(3, seed=5, max_new=12)
    _assert_same(_run(model, short), _run(model, short, decoder))
    first = decoder.capacity
    long = _requests(8, seed=6, max_new=80)
    _assert_same(_run(model, long), _run(model, long, decoder))
    assert decoder.capacity > first  # regrown for the longer batch, results still exact

    def abort_after(k):
        calls = iter(range(10**6))
        return lambda: next(calls) >= k

    dynamic, static = _run(model, long, should_abort=abort_after(5)), _run(model, long, decoder, abort_after(5))
    assert {r.finish["type"] for r in static} >= {"abort"}
    _assert_same(dynamic, static)


def test_bucket_ladders():
    assert [batch_bucket(n, 64) for n in (1, 2, 3, 5, 8, 9, 17, 63, 64)] == [1, 2, 4, 8, 8, 16, 24, 64, 64]
    assert batch_bucket(5, 6) == 6  # never more rows than the cache has
    assert [span_bucket(n) for n in (1, 64, 65, 300, 1024)] == [64, 64, 128, 512, 1024]


def test_verify_of_s_tokens_equals_s_decode_steps(model):
    """`verify` (speculative decoding's S-token forward) against S one-token `decode` steps on a second decoder:
    the same logits, final hidden states' logits and routed experts; a later verify from an earlier start
    rewrites the slots it covers (rejected drafts) and again matches."""
    prompts = [(3, 7, 1, 9, 4), (5,), (2, 8, 8)]
    tokens = [[11, 12, 13], [21, 22, 23], [25, 26, 27]]
    one, many = StaticDecoder(model, max_batch=4), StaticDecoder(model, max_batch=4)
    for d in (one, many):
        d.reserve(16)
        d.prefill(prompts, pad_id=0)
    starts = [len(p) for p in prompts]
    logits, hidden, routed = many.verify(tokens, starts)
    assert logits.shape[:2] == hidden.shape[:2] == routed.shape[:2] == (3, 3)
    assert torch.allclose(model.lm_head(hidden), logits)
    for s in range(3):
        step_logits, step_routed = one.decode([t[s] for t in tokens], [p + s for p in starts])
        assert (step_logits - logits[:, s]).abs().max().item() <= 1e-4, s  # fp32, other GEMM shapes
        assert torch.equal(step_routed[:, 0], routed[:, s]), s
    # "reject" the last two tokens of every row: a verify from start + 1 rewrites those slots
    again, _, _ = many.verify([[12, 30, 31]] * 3, [p + 1 for p in starts])
    for s, ids in enumerate(([12] * 3, [30] * 3, [31] * 3)):
        step_logits, _ = one.decode(ids, [p + 1 + s for p in starts])
        assert (step_logits - again[:, s]).abs().max().item() <= 1e-4, s


def test_mtp_forward_needs_a_decoder_built_with_the_mtp_layer(model):
    decoder = StaticDecoder(model, max_batch=2)
    decoder.reserve(8)
    with pytest.raises(ValueError, match="mtp="):
        decoder.mtp_forward(
            torch.zeros(1, 1, model.config.hidden_size),
            torch.zeros(1, 1, dtype=torch.long),
            torch.ones(1, 1, dtype=torch.long),
        )


def test_routed_log_gives_each_row_its_positions_in_order_sorted_and_on_the_host():
    """RoutedLog (the static paths' routed experts): parts of different rows, partial counts (prompt lengths,
    kept drafts, set later), rows that leave the batch; each row gets its valid positions in the order they were
    added, ids sorted per position, as one host tensor; a row with none gets []."""
    from glm_rl.engine.batch import RoutedLog, Row

    def part(n, S, base):  # [n, S, 1 MoE layer, top-2], ids descending so the log must sort them
        v = torch.arange(n * S, dtype=torch.long).view(n, S, 1, 1) * 10 + base
        return torch.cat([v + 1, v], dim=-1)

    rows = [Row(GenerationRequest(str(i), (1,), SamplingParams(), 0), frozenset(), torch.Generator()) for i in range(4)]
    log = RoutedLog()
    log.add([0, 1, 2], part(3, 3, 0), counts=[3, 1, 2])  # a prefill: row 0 has 3 prompt tokens, row 1 one, row 2 two
    p = log.add([0, 2], part(2, 2, 1000))  # a verify whose kept counts are known later
    log.add([2], part(1, 1, 5000))  # a step of row 2 alone
    log.set_counts(p, [2, 1])
    log.finish(rows)
    got = [r.routed[0].tolist() if r.routed else None for r in rows]
    assert got == [
        [[[0, 1]], [[10, 11]], [[20, 21]], [[1000, 1001]], [[1010, 1011]]],
        [[[30, 31]]],
        [[[60, 61]], [[70, 71]], [[1020, 1021]], [[5000, 5001]]],
        None,
    ]
    assert rows[0].routed[0].dtype == torch.int16 and not rows[0].routed[0].is_cuda
