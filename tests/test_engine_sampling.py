"""The engine's batched sampler (sampling.sample_tokens): inverse-CDF at counter-based uniforms must draw exactly
from softmax(filtered logits / T), and a row's draw must depend only on its own (seed, step)."""

from __future__ import annotations

import torch

from glm_rl.engine.batch import SamplingParams
from glm_rl.engine.sampling import bits_to_uniform, cdf, counter_bits, counter_bits_many, counter_uniform, sample_tokens

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
    return sample_tokens(rows, sp, _uniforms([(i * 7919 + 3, i % 5) for i in range(n)]))[0]


def _uniforms(pairs) -> torch.Tensor:
    return torch.tensor([counter_uniform(a, b) for a, b in pairs], dtype=torch.float64)


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
    u = _uniforms(zip(seeds, steps))
    together = sample_tokens(logits, sp, u)[0]
    alone = torch.cat([sample_tokens(logits[i : i + 1], sp, u[i : i + 1])[0] for i in range(9)])
    assert torch.equal(together, alone)
    later = sample_tokens(logits, sp, _uniforms((a, b + 1) for a, b in zip(seeds, steps)))[0]
    assert not torch.equal(together, later)  # the next step draws afresh


def test_counter_uniform_is_uniform_open_and_uncorrelated_over_steps_and_seeds():
    n = 100000
    for pairs in ([(5, t) for t in range(n)], [((1 << 62) + s, 0) for s in range(n)]):
        u = torch.tensor([counter_uniform(a, b) for a, b in pairs], dtype=torch.float64)
        assert 0.0 < float(u.min()) and float(u.max()) < 1.0
        assert abs(float(u.mean()) - 0.5) < 0.002 and abs(float(u.std()) - (1 / 12) ** 0.5) < 0.002
        # neighbouring steps / seeds: correlation within 4 standard errors of 0
        assert abs(float(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1])) < 4 / n**0.5


def test_device_uniforms_equal_the_host_ones_bit_for_bit():
    """The sampler inside a CUDA graph turns int64 `counter_bits` into uniforms on the device: they must be the
    host's `counter_uniform` exactly, or the graphed and eager paths would sample differently."""
    pairs = [(s * 0x9E3779B97F4A7C15 % (1 << 63), t) for s in range(200) for t in (0, 1, 7, 1000)]
    pairs += [(0, 0), ((1 << 63) - 1, 1 << 20)]
    bits = torch.tensor([counter_bits(a, b) for a, b in pairs])
    assert int(bits.max()) >= 1 << 52  # the top bit range, where `bits + 0.5` has to round, is covered
    assert torch.equal(bits_to_uniform(bits), _uniforms(pairs))


def test_vectorised_counter_bits_equal_the_scalar_ones():
    seeds = [0, 1, (1 << 63) - 1, 0x9E3779B97F4A7C15 >> 1] + [s * 7919 for s in range(50)]
    steps = [0, 1 << 40, 3, 999] + list(range(50))
    assert counter_bits_many(seeds, steps).tolist() == [counter_bits(a, b) for a, b in zip(seeds, steps)]


def test_blocked_cdf_equals_the_flat_scan_and_skips_zero_probability_tokens():
    """Vocab-long rows are scanned in blocks (`cdf`); the sums equal a flat float64 scan to rounding, and a token
    of probability 0 — here every block's first and last token, and a padded tail — is never drawn."""
    torch.manual_seed(0)
    V = 5 * 1024 + 300
    logits = torch.randn(3, V) * 3
    logits[:, ::1024] = float("-inf")
    logits[:, 1023::1024] = float("-inf")
    probs = torch.softmax(logits, -1)
    flat = probs.double().cumsum(-1)
    assert (cdf(probs) - flat).abs().max().item() < 1e-12
    n = 4000
    rows = logits[:1].expand(n, -1)
    tokens = sample_tokens(rows, SamplingParams(temperature=1.0), _uniforms((i, 0) for i in range(n)))[0]
    assert bool((probs[0, tokens] > 0).all())
    reference = torch.searchsorted(
        flat[:1].expand(n, -1), (_uniforms((i, 0) for i in range(n))[:, None] * flat[:1, -1:])
    ).squeeze(-1)
    assert (tokens != reference).sum().item() <= 1  # a uniform within rounding of a boundary may differ
