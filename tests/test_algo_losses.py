"""Reference-value tests for glm_rl.algo.losses and glm_rl.algo.kl (numbers worked out by hand)."""

from __future__ import annotations

import math

import pytest
import torch

from glm_rl.algo import PolicyLossConfig, entropy_from_logits, kl_estimate, policy_loss

LN2 = math.log(2.0)


def _logps(ratios, old=-1.0):
    """(logp leaf with grad, old_logp) so that exp(logp - old_logp) == ratios."""
    r = torch.tensor(ratios, dtype=torch.float32)
    old_logp = torch.full_like(r, old)
    logp = (old_logp + torch.log(r)).requires_grad_(True)
    return logp, old_logp


# ---------------------------------------------------------------- KL and entropy


def test_kl_estimators_reference_values():
    # log_ratio = log(0.5) - log(0.25) = ln 2
    logp, ref = torch.log(torch.tensor([[0.5]])), torch.log(torch.tensor([[0.25]]))
    torch.testing.assert_close(kl_estimate(logp, ref, "k1"), torch.tensor([[LN2]]))  # 0.693147
    torch.testing.assert_close(kl_estimate(logp, ref, "k2"), torch.tensor([[0.5 * LN2**2]]))  # 0.240227
    # k3 = exp(-ln2) - 1 + ln2 = 0.5 - 1 + 0.693147 = 0.193147
    torch.testing.assert_close(kl_estimate(logp, ref, "k3"), torch.tensor([[0.5 - 1 + LN2]]))
    torch.testing.assert_close(kl_estimate(logp, ref, "low_var_kl"), torch.tensor([[0.5 - 1 + LN2]]))
    # log_ratio = -ln 2: k3 = 2 - 1 - ln2 = 0.306853 (not symmetric in the log ratio)
    torch.testing.assert_close(kl_estimate(ref, logp, "k3"), torch.tensor([[2 - 1 - LN2]]))
    torch.testing.assert_close(kl_estimate(ref, logp, "k1"), torch.tensor([[-LN2]]))


def test_low_var_kl_clamped_to_10():
    # log_ratio -20: k3 = e^20 - 21 ~ 4.85e8 -> 10 ; log_ratio +20: k3 = e^-20 - 1 + 20 ~ 19 -> 10
    logp = torch.tensor([[-20.0, 20.0, 1.0]])
    ref = torch.zeros(1, 3)
    k3 = kl_estimate(logp, ref, "k3")
    assert k3[0, 0] > 1e8 and abs(k3[0, 1].item() - 19.0) < 1e-4
    low = kl_estimate(logp, ref, "low_var_kl")
    torch.testing.assert_close(low, torch.tensor([[10.0, 10.0, math.exp(-1) - 1 + 1]]))
    assert (low >= -10).all() and (low <= 10).all()


def test_kl_unknown_kind():
    with pytest.raises(ValueError, match=r"'k4'.*k1, k2, k3, low_var_kl"):
        kl_estimate(torch.zeros(1, 1), torch.zeros(1, 1), "k4")


def test_entropy_from_logits_reference_values():
    logits = torch.tensor(
        [[[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3.0), -math.inf, -math.inf], [5.0, -math.inf, -math.inf, -math.inf]]]
    )  # (1, 3, 4)
    # uniform over 4 -> ln 4 ; p = [0.25, 0.75] -> 0.25 ln4 + 0.75 ln(4/3) = 0.562335 ; one-hot -> 0
    expected = torch.tensor([[math.log(4), 0.25 * math.log(4) + 0.75 * math.log(4 / 3), 0.0]])
    torch.testing.assert_close(entropy_from_logits(logits), expected)


# ---------------------------------------------------------------- PPO clip


def test_ppo_clip_per_token_values_asymmetric():
    # eps 0.2 / 0.28 -> clamp range [0.8, 1.28]
    # A=+1: r=0.5 -> max(-0.5, -0.8) = -0.5 ; r=1 -> -1 ; r=1.5 -> max(-1.5, -1.28) = -1.28 (clipped)
    # A=-1: r=0.5 -> max(0.5, 0.8) = 0.8 (clipped) ; r=1 -> 1 ; r=1.5 -> max(1.5, 1.28) = 1.5
    cfg = PolicyLossConfig(eps_clip=0.2, eps_clip_high=0.28)
    ratios = [0.5, 1.0, 1.5, 0.5, 1.0, 1.5]
    adv = torch.tensor([1.0, 1, 1, -1, -1, -1])
    expected = [-0.5, -1.0, -1.28, 0.8, 1.0, 1.5]
    for i, want in enumerate(expected):  # one token in the mask at a time -> the loss is that token's value
        logp, old = _logps([ratios])
        mask = torch.zeros(1, 6)
        mask[0, i] = 1
        loss, _ = policy_loss(logp, old, adv[None], mask, cfg)
        assert loss.item() == pytest.approx(want, abs=1e-6), (i, loss.item(), want)

    logp, old = _logps([ratios])
    loss, m = policy_loss(logp, old, adv[None], torch.ones(1, 6), cfg)
    assert loss.item() == pytest.approx(0.52 / 6, abs=1e-6)  # (-2.78 + 3.3) / 6
    assert m["train/pg_loss"] == pytest.approx(0.52 / 6, abs=1e-6)
    assert m["train/pg_clipfrac"] == pytest.approx(2 / 6)
    loss.backward()
    # unclipped tokens: d/dlogp (-A r)/6 = -A r / 6 ; clipped tokens: 0
    want_grad = torch.tensor([[-0.5, -1.0, 0.0, 0.0, 1.0, 1.5]]) / 6
    torch.testing.assert_close(logp.grad, want_grad)


def test_symmetric_clip_when_high_is_none():
    # eps 0.2 both sides: A=+1, r=1.25 is clipped to 1.2 -> -1.2 (with 0.28 it would be -1.25)
    logp, old = _logps([[1.25]])
    loss, m = policy_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 1), PolicyLossConfig(eps_clip=0.2))
    assert loss.item() == pytest.approx(-1.2, abs=1e-6)
    assert m["train/pg_clipfrac"] == 1.0
    loss, _ = policy_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 1), PolicyLossConfig(eps_clip_high=0.28))
    assert loss.item() == pytest.approx(-1.25, abs=1e-6)


def test_dual_clip():
    # c = 3: A=-1, r=4 -> max(4, 1.28) = 4 -> min(4, 3) = 3 (dual clipped, grad 0)
    #        A=-1, r=1.5 -> 1.5 < 3 unchanged ; A=+1, r=4 -> -1.28, dual clip does not apply to A>0
    cfg = PolicyLossConfig(eps_clip=0.2, eps_clip_high=0.28, eps_clip_c=3.0)
    logp, old = _logps([[4.0, 1.5, 4.0]])
    adv = torch.tensor([[-1.0, -1.0, 1.0]])
    loss, m = policy_loss(logp, old, adv, torch.ones(1, 3), cfg)
    assert loss.item() == pytest.approx((3.0 + 1.5 - 1.28) / 3, abs=1e-6)
    assert m["train/dual_clipfrac"] == pytest.approx(1 / 3)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 1.5 / 3, 0.0]]))
    _, m_off = policy_loss(logp, old, adv, torch.ones(1, 3), PolicyLossConfig(eps_clip_high=0.28))
    assert "train/dual_clipfrac" not in m_off


# ---------------------------------------------------------------- GSPO


def test_gspo_value_is_exp_mean_log_ratio_and_gradient_matches_paper():
    # one sequence, token log-ratios [0.1, -0.2, 0.4] + a padded token -> s = exp(mean) = exp(0.1)
    lr = torch.tensor([[0.1, -0.2, 0.4, 7.0]])
    mask = torch.tensor([[1.0, 1, 1, 0]])
    old = torch.tensor([[-1.0, -2.0, -0.5, -3.0]])
    logp = (old + lr).requires_grad_(True)
    cfg = PolicyLossConfig(level="sequence")
    loss, m = policy_loss(logp, old, torch.tensor([1.0]), mask, cfg)
    s = math.exp(0.1)  # 1.105171, inside [0.8, 1.2]: no clipping
    assert loss.item() == pytest.approx(-s, abs=1e-6)
    assert m["train/pg_clipfrac"] == 0.0
    assert m["train/ppo_kl"] == pytest.approx(-0.1, abs=1e-6)  # token-level mean of old - logp
    loss.backward()
    # GSPO: grad J = A * s * (1/|y|) sum_t grad logp_t -> d loss / d logp_t = -A * s / |y| on response tokens
    torch.testing.assert_close(logp.grad, torch.tensor([[-s / 3, -s / 3, -s / 3, 0.0]]))

    # and the same as autograd through the sequence objective written directly
    logp2 = (old + lr).requires_grad_(True)
    seq = -torch.exp(((logp2 - old) * mask).sum() / mask.sum())
    seq.backward()
    torch.testing.assert_close(logp.grad, logp2.grad)


def test_gspo_two_sequences_token_mean_aggregation():
    # seq0: 3 tokens, log ratios [0.1, 0.2, 0.0] -> s0 = exp(0.1), A0 = +1
    # seq1: 2 tokens, log ratios [-0.1, 0.0]    -> s1 = exp(-0.05), A1 = -1 ; N = 5 response tokens
    lr = torch.tensor([[0.1, 0.2, 0.0], [-0.1, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    old = torch.full((2, 3), -1.0)
    logp = (old + lr).requires_grad_(True)
    loss, _ = policy_loss(logp, old, torch.tensor([1.0, -1.0]), mask, PolicyLossConfig(level="sequence"))
    s0, s1 = math.exp(0.1), math.exp(-0.05)
    assert loss.item() == pytest.approx((3 * -s0 + 2 * s1) / 5, abs=1e-6)
    loss.backward()
    want = torch.tensor([[-s0 / 5, -s0 / 5, -s0 / 5], [s1 / 5, s1 / 5, 0.0]])
    torch.testing.assert_close(logp.grad, want)


def test_gspo_clips_whole_sequence():
    # token log ratios [0.9, -0.3, 0.3]: mean 0.3 -> s = 1.3499 > 1.28, A=+1 -> every token -1.28, grad 0.
    # At the token level, only exp(0.9) and exp(0.3) exceed 1.28; exp(-0.3) = 0.741 < 0.8 is not clipped for A>0.
    old = torch.zeros(1, 3)
    logp = torch.tensor([[0.9, -0.3, 0.3]], requires_grad=True)
    cfg = PolicyLossConfig(eps_clip_high=0.28, level="sequence")
    loss, m = policy_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 3), cfg)
    assert loss.item() == pytest.approx(-1.28, abs=1e-6)
    assert m["train/pg_clipfrac"] == 1.0
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.zeros(1, 3))
    _, m_tok = policy_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 3), PolicyLossConfig(eps_clip_high=0.28))
    assert m_tok["train/pg_clipfrac"] == pytest.approx(2 / 3)


# ---------------------------------------------------------------- weights, KL and entropy terms


def test_token_weights_multiply_per_token_loss():
    # A=+1, r=1 everywhere -> pg = -1 per token; weights [2, 0.5, 1] -> mean = -(3.5)/3
    logp, old = _logps([[1.0, 1.0, 1.0]])
    w = torch.tensor([[2.0, 0.5, 1.0]])
    loss, _ = policy_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 3), PolicyLossConfig(), token_weights=w)
    assert loss.item() == pytest.approx(-3.5 / 3, abs=1e-6)
    loss.backward()
    torch.testing.assert_close(logp.grad, -w / 3)


def test_kl_and_entropy_terms():
    # pg: A=0 -> 0. KL k1 with logp - ref = 0.5 on both tokens -> 0.5 ; k3 -> e^-0.5 - 1 + 0.5 = 0.106531
    # entropy [1.0, 3.0] -> mean 2.0
    logp, old = _logps([[1.0, 1.0]])
    ref = logp.detach() - 0.5
    ent = torch.tensor([[1.0, 3.0]])
    cfg = PolicyLossConfig(kl_coef=0.1, kl_type="k1", entropy_coef=0.01)
    loss, m = policy_loss(logp, old, torch.zeros(1), torch.ones(1, 2), cfg, ref_logp=ref, entropy=ent)
    assert loss.item() == pytest.approx(0.1 * 0.5 - 0.01 * 2.0, abs=1e-6)
    assert m["train/kl_loss"] == pytest.approx(0.5, abs=1e-6)
    assert m["train/entropy"] == pytest.approx(2.0)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.full((1, 2), 0.1 / 2))  # d(k1)/dlogp = 1, mean over 2

    cfg3 = PolicyLossConfig(kl_coef=1.0)  # low_var_kl by default
    loss3, m3 = policy_loss(logp, old, torch.zeros(1), torch.ones(1, 2), cfg3, ref_logp=ref)
    assert m3["train/kl_loss"] == pytest.approx(math.exp(-0.5) - 0.5, abs=1e-6)
    assert loss3.item() == pytest.approx(math.exp(-0.5) - 0.5, abs=1e-6)


def test_kl_coef_requires_ref_logp():
    logp, old = _logps([[1.0]])
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(logp, old, torch.ones(1), torch.ones(1, 1), PolicyLossConfig(kl_coef=0.1))


def test_padding_garbage_reaches_neither_loss_nor_grad():
    logp = torch.tensor([[-1.0, float("nan"), float("inf")]], requires_grad=True)
    old = torch.tensor([[-1.0, float("-inf"), 3.0]])
    adv = torch.tensor([[1.0, float("nan"), 2.0]])
    mask = torch.tensor([[1.0, 0, 0]])
    for level in ("token", "sequence"):
        loss, m = policy_loss(logp, old, adv, mask, PolicyLossConfig(level=level), ref_logp=old)
        assert loss.item() == pytest.approx(-1.0, abs=1e-6)
        assert all(math.isfinite(v) for v in m.values())
        (g,) = torch.autograd.grad(loss, logp)
        torch.testing.assert_close(g, torch.tensor([[-1.0, 0.0, 0.0]]))


# ---------------------------------------------------------------- invariances


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_microbatch_split_is_token_count_weighted(level):
    torch.manual_seed(0)
    B, T = 6, 7
    old = -torch.rand(B, T) * 3
    logp = (old + 0.3 * torch.randn(B, T)).requires_grad_(True)
    ref = old + 0.2 * torch.randn(B, T)
    adv = torch.randn(B)
    mask = (torch.rand(B, T) > 0.35).float()
    mask[:, 0] = 1
    weights, ent = torch.rand(B, T) * 2, torch.rand(B, T)
    cfg = PolicyLossConfig(
        eps_clip=0.1, eps_clip_high=0.15, eps_clip_c=2.0, level=level, kl_coef=0.05, entropy_coef=0.01
    )

    def run(sl):
        return policy_loss(
            logp[sl], old[sl], adv[sl], mask[sl], cfg, ref_logp=ref[sl], token_weights=weights[sl], entropy=ent[sl]
        )[0]

    full = run(slice(None))
    (g_full,) = torch.autograd.grad(full, logp)
    n1, n2 = mask[:2].sum(), mask[2:].sum()
    assert n1 != n2  # the weighting matters for this check
    combined = (n1 * run(slice(0, 2)) + n2 * run(slice(2, None))) / (n1 + n2)
    (g_comb,) = torch.autograd.grad(combined, logp)
    torch.testing.assert_close(combined, full)
    torch.testing.assert_close(g_comb, g_full)
    # a plain mean of the two halves would differ
    assert abs(((run(slice(0, 2)) + run(slice(2, None))) / 2 - full).item()) > 1e-4


# ---------------------------------------------------------------- config validation


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"eps_clip": 0.0}, "eps_clip"),
        ({"eps_clip": 1.5}, "eps_clip"),
        ({"eps_clip_high": -0.1}, "eps_clip_high"),
        ({"eps_clip_c": 1.0}, "eps_clip_c"),
        ({"eps_clip_c": 0.5}, "eps_clip_c"),
        ({"level": "seq"}, "level"),
        ({"kl_coef": -0.1}, "kl_coef"),
        ({"kl_type": "k4"}, "kl_type"),
        ({"entropy_coef": -1.0}, "entropy_coef"),
    ],
)
def test_config_validation_names_field_and_value(kwargs, field):
    ((_, value),) = kwargs.items()
    with pytest.raises(ValueError, match=rf"{field}={value!r}".replace(".", r"\.")):
        PolicyLossConfig(**kwargs)


def test_config_defaults_and_frozen():
    cfg = PolicyLossConfig()
    assert cfg.clip_high == 0.2 and PolicyLossConfig(eps_clip_high=0.28).clip_high == 0.28
    with pytest.raises(AttributeError):
        cfg.eps_clip = 0.3  # type: ignore[misc]


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape mismatch"):
        policy_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2), torch.ones(2, 3), PolicyLossConfig())
