"""The engine's batched sampler (generation._sample_group): inverse-CDF at counter-based uniforms must draw exactly
from softmax(filtered logits / T), and a row's draw must depend only on its own (seed, step)."""

from __future__ import annotations

import torch

from glm_rl.rollout.engines.generation import SamplingParams, _sample_group, counter_uniform

# chi-square critical values at significance 1e-3 (tables): degrees of freedom -> value
CHI2_CRIT = {2: 13.816, 5: 20.515}


def _chi2(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    n, counts = tokens.numel(), torch.bincount(tokens, minlength=probs.numel()).double()
    keep = probs > 0
    assert counts[~keep].sum() == 0, "a token with zero probability was drawn"
    expected = n * probs[keep].double()
    return float(((counts[keep] - expected) ** 2 / expected).sum())


def _draw(logits: torch.Tensor, sp: SamplingParams, n: int = 12000) -> torch.Tensor:
    rows = logits.expand(n, -1)
    return _sample_group(rows, sp, [counter_uniform(i * 7919 + 3, i % 5) for i in range(n)])[0]


LOGITS = torch.tensor([1.5, 0.2, -0.7, 0.9, 0.0, -2.0])


def test_zero_probability_tokens_are_never_drawn():
    logits = torch.tensor([0.0, float("-inf"), 0.0, float("-inf"), 3.0, float("-inf")])
    tokens = _draw(logits, SamplingParams(temperature=1.0), n=4000)
    assert set(tokens.tolist()) == {0, 2, 4}


def test_samples_follow_softmax_at_temperature():
    sp = SamplingParams(temperature=0.7)
    assert _chi2(_draw(LOGITS, sp), torch.softmax(LOGITS / 0.7, -1)) < CHI2_CRIT[5]
    # control: the same draws judged against the T = 1 distribution fail
    assert _chi2(_draw(LOGITS, sp), torch.softmax(LOGITS, -1)) > 10 * CHI2_CRIT[5]


def test_top_k_and_top_p_renormalise_over_the_kept_tokens():
    top3 = torch.softmax(LOGITS.masked_fill(LOGITS < 0.2, float("-inf")), -1)  # ids 0, 3, 1
    assert _chi2(_draw(LOGITS, SamplingParams(temperature=1.0, top_k=3)), top3) < CHI2_CRIT[2]
    p = torch.softmax(LOGITS, -1)  # sorted: 0 (.46), 3 (.25), 1 (.13), ... : top_p 0.8 keeps 0, 3, 1
    assert _chi2(_draw(LOGITS, SamplingParams(temperature=1.0, top_p=0.8)), top3) < CHI2_CRIT[2]
    assert p[0] + p[3] < 0.8 <= p[0] + p[3] + p[1]  # the fixture really needs three tokens


def test_a_rows_draw_depends_only_on_its_seed_and_step():
    torch.manual_seed(0)
    logits = torch.randn(9, 50)
    sp = SamplingParams(temperature=1.0)
    seeds, steps = torch.randint(0, 1 << 62, (9,)).tolist(), torch.randint(0, 100, (9,)).tolist()
    u = [counter_uniform(a, b) for a, b in zip(seeds, steps)]
    together = _sample_group(logits, sp, u)[0]
    alone = torch.cat([_sample_group(logits[i:i + 1], sp, u[i:i + 1])[0] for i in range(9)])
    assert torch.equal(together, alone)
    later = _sample_group(logits, sp, [counter_uniform(a, b + 1) for a, b in zip(seeds, steps)])[0]
    assert not torch.equal(together, later)  # the next step draws afresh


def test_counter_uniform_is_uniform_open_and_uncorrelated_over_steps_and_seeds():
    n = 100000
    for pairs in ([(5, t) for t in range(n)], [((1 << 62) + s, 0) for s in range(n)]):
        u = torch.tensor([counter_uniform(a, b) for a, b in pairs], dtype=torch.float64)
        assert 0.0 < float(u.min()) and float(u.max()) < 1.0
        assert abs(float(u.mean()) - 0.5) < 0.002 and abs(float(u.std()) - (1 / 12) ** 0.5) < 0.002
        # neighbouring steps / seeds: correlation within 4 standard errors of 0
        assert abs(float(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1])) < 4 / n ** 0.5
