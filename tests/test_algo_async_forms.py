"""Reference tests for the two named correction semantics (issue 19, asynchronous RL):
--gspo-token-weights (how GSPO applies TIS / MIS token weights) and --mis-normalization (what MIS divides by).

Expected gradients are worked out by hand, or by an independent slime-style loss written here (the sequence
ratio s_i = exp(mean_t (logp_t - old_logp_t)) differentiated directly, times per-token weights).
"""

from __future__ import annotations

import math
from typing import get_args, get_type_hints

import numpy as np
import pytest
import torch

from glm_rl.algo import (
    GSPO_TOKEN_WEIGHTS,
    MIS_NORMALIZATIONS,
    PolicyLossConfig,
    gspo_token_weights,
    mis_weights,
    policy_loss,
)
from glm_rl.config import AlgoConfig
from glm_rl.rollout.samples import Sample
from glm_rl.trainer.steps import corrections

GSPO = PolicyLossConfig(level="sequence")  # eps 0.2: no clipping for s in [0.8, 1.2]


def _gspo_grad(lr, old, adv, mask, weights, form, cfg=GSPO):
    """(loss, d loss / d logp) of glm_rl's GSPO loss with the weights in `form`."""
    logp = (old + lr).requires_grad_(True)
    w = gspo_token_weights(weights, mask, form)
    loss, _ = policy_loss(logp, old, adv, mask, cfg, token_weights=w)
    loss.backward()
    return loss.item(), logp.grad


def _slime_gspo_grad(lr, old, adv, mask, weights, eps_low, eps_high):
    """Independent reference: per sequence, s_i is differentiated itself; the clipped per-token loss
    max(-A s, -A clamp(s)) times w_t is averaged over all masked tokens of the batch (slime, miles)."""
    logp = (old + lr).requires_grad_(True)
    total, count = 0.0, float(mask.sum())
    for i in range(logp.shape[0]):
        m = mask[i].bool()
        s = torch.exp((logp[i][m] - old[i][m]).mean())  # differentiable sequence ratio
        pg = torch.maximum(-adv[i] * s, -adv[i] * s.clamp(1 - eps_low, 1 + eps_high))
        total = total + (weights[i][m] * pg).sum()
    loss = total / count
    loss.backward()
    return loss.item(), logp.grad


# ---------------------------------------------------------------- --gspo-token-weights


def _two_sequences():
    # seq0: 3 tokens, log ratios [0.1, -0.05, 0.1] -> s0 = exp(0.05) = 1.0512711, A0 = +1, w [2.0, 0.5, 1.1]
    # seq1: 2 tokens, log ratios [-0.1, 0.04] (+ pad) -> s1 = exp(-0.03) = 0.9704455, A1 = -0.5, w [0.8, 1.4]
    lr = torch.tensor([[0.1, -0.05, 0.1], [-0.1, 0.04, 5.0]], dtype=torch.float64)
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.7, -3.0]], dtype=torch.float64)
    adv = torch.tensor([1.0, -0.5], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]], dtype=torch.float64)
    w = torch.tensor([[2.0, 0.5, 1.1], [0.8, 1.4, 9.0]], dtype=torch.float64)  # 9.0 sits on padding
    return lr, old, adv, mask, w


def test_sequence_mean_weights_reference_values():
    _, _, _, mask, w = _two_sequences()
    # seq0 mean (2 + 0.5 + 1.1) / 3 = 1.2 ; seq1 mean (0.8 + 1.4) / 2 = 1.1 ; padding 0
    want = torch.tensor([[1.2, 1.2, 1.2], [1.1, 1.1, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(gspo_token_weights(w, mask, "sequence-mean"), want)
    torch.testing.assert_close(gspo_token_weights(w, mask, "per-token"), w)
    # an MIS-rejected token (mask 0) counts in neither the mean nor the result: (2 + 1) / 2 = 1.5
    out = gspo_token_weights(torch.tensor([[2.0, 0.0, 1.0]]), torch.tensor([[1.0, 0, 1]]), "sequence-mean")
    torch.testing.assert_close(out, torch.tensor([[1.5, 0.0, 1.5]]))


def test_gspo_forms_same_loss_different_gradient_reference_values():
    lr, old, adv, mask, w = _two_sequences()
    s0, s1 = math.exp(0.05), math.exp(-0.03)
    n = 5  # response tokens of the batch
    # loss = (1/N) sum_i sum_t w_t (-A_i s_i) = (-3.6 s0 + 0.5 * 2.2 s1) / 5 = -0.5434172 in both forms
    want_loss = (-3.6 * s0 + 1.1 * s1) / n
    # per-token: d loss / d logp_t = -A_i s_i w_t / N
    #   seq0 -0.2102542 * [2, 0.5, 1.1] = [-0.4205084, -0.1051271, -0.2312796] ; seq1 [0.0776356, 0.1358624]
    want_per_token = torch.tensor(
        [[-s0 * 2.0 / n, -s0 * 0.5 / n, -s0 * 1.1 / n], [0.5 * s1 * 0.8 / n, 0.5 * s1 * 1.4 / n, 0.0]],
        dtype=torch.float64,
    )
    # sequence-mean: d loss / d logp_t = -A_i s_i mean(w_i) / N: seq0 -0.2523051 each, seq1 0.1067490 each
    want_seq_mean = torch.tensor(
        [[-s0 * 1.2 / n] * 3, [0.5 * s1 * 1.1 / n, 0.5 * s1 * 1.1 / n, 0.0]], dtype=torch.float64
    )
    loss_pt, grad_pt = _gspo_grad(lr, old, adv, mask, w, "per-token")
    loss_sm, grad_sm = _gspo_grad(lr, old, adv, mask, w, "sequence-mean")
    assert loss_pt == pytest.approx(want_loss, abs=1e-12) and loss_sm == pytest.approx(want_loss, abs=1e-12)
    torch.testing.assert_close(grad_pt, want_per_token)
    torch.testing.assert_close(grad_sm, want_seq_mean)
    assert (grad_pt - grad_sm).abs().max().item() > 0.1  # weights vary within a sequence: the forms differ
    assert grad_pt[0, 0].item() == pytest.approx(-0.4205084, abs=1e-7)
    assert grad_sm[0, 0].item() == pytest.approx(-0.2523051, abs=1e-7)


def test_sequence_mean_is_slime_gradient_with_clipping():
    # a third sequence with s = exp(0.4) = 1.49 > 1.28 and A > 0 is clipped whole: zero gradient in both
    lr = torch.tensor([[0.1, -0.05, 0.1], [-0.1, 0.04, 0.0], [0.5, 0.3, 0.0]], dtype=torch.float64)
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.7, -3.0], [-0.2, -0.9, -1.0]], dtype=torch.float64)
    adv = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0], [1, 1, 0]], dtype=torch.float64)
    w = torch.tensor([[2.0, 0.5, 1.1], [0.8, 1.4, 0.0], [0.6, 1.7, 0.0]], dtype=torch.float64)
    cfg = PolicyLossConfig(level="sequence", eps_clip_high=0.28)
    loss, grad = _gspo_grad(lr, old, adv, mask, w, "sequence-mean", cfg)
    ref_loss, ref_grad = _slime_gspo_grad(lr, old, adv, mask, w, eps_low=0.2, eps_high=0.28)
    assert loss == pytest.approx(ref_loss, abs=1e-12)
    torch.testing.assert_close(grad, ref_grad)
    assert torch.equal(grad[2], torch.zeros(3, dtype=torch.float64))
    # the per-token form has the same loss but not slime's gradient
    loss_pt, grad_pt = _gspo_grad(lr, old, adv, mask, w, "per-token", cfg)
    assert loss_pt == pytest.approx(ref_loss, abs=1e-12)
    assert not torch.allclose(grad_pt, ref_grad)


def test_gspo_forms_agree_when_weights_constant_within_each_sequence():
    lr, old, adv, mask, _ = _two_sequences()
    w = torch.tensor([[1.5, 1.5, 1.5], [0.7, 0.7, 3.0]], dtype=torch.float64)  # 3.0 on padding
    loss_pt, grad_pt = _gspo_grad(lr, old, adv, mask, w, "per-token")
    loss_sm, grad_sm = _gspo_grad(lr, old, adv, mask, w, "sequence-mean")
    _, ref_grad = _slime_gspo_grad(lr, old, adv, mask, w, eps_low=0.2, eps_high=0.2)
    assert loss_pt == pytest.approx(loss_sm, abs=1e-12)
    torch.testing.assert_close(grad_pt, grad_sm)
    torch.testing.assert_close(grad_pt, ref_grad)
    # seq0: -A s0 w / N = -exp(0.05) * 1.5 / 5 = -0.3153813
    assert grad_pt[0, 0].item() == pytest.approx(-math.exp(0.05) * 1.5 / 5, abs=1e-12)


def test_gspo_token_weights_unknown_form():
    with pytest.raises(ValueError, match="form='mean'"):
        gspo_token_weights(torch.ones(1, 2), torch.ones(1, 2), "mean")


# ---------------------------------------------------------------- --mis-normalization


def _pair(ratios, rollout=-2.0):
    """(old_logp, rollout_logp) float32 (the corrections' precision) with exp(old_logp - rollout_logp) == ratios."""
    r = torch.tensor(ratios, dtype=torch.float64)
    rollout_logp = torch.full_like(r, rollout)
    return (rollout_logp + torch.log(r)).float(), rollout_logp.float()


def _mis_batch():
    # band [0.5, 2], truncate 2, veto 0.3; last column is padding (any value, masked out)
    # seq0 [1.0, 3.0 (rejected; min(3, 2) = 2), 1.5]
    # seq1 [0.4 (rejected), 1.2, 0.5 (kept: bounds inclusive)]
    # seq2 [0.25 (< veto: whole sequence dropped), 1.0, 1.0]
    old, rollout = _pair([[1.0, 3.0, 1.5, 50.0], [0.4, 1.2, 0.5, 1e-9], [0.25, 1.0, 1.0, 7.0]])
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0]])
    return old, rollout, mask


RAW_KEPT = torch.tensor([[1.0, 0, 1.5, 0], [0, 1.2, 0.5, 0], [0, 0, 0, 0]])


@pytest.mark.parametrize(
    "normalization, divisor",
    [
        ("kept-tokens", 1.05),  # kept 1.0 + 1.5 + 1.2 + 0.5 = 4.2 over 4 kept tokens
        ("all-tokens", 8.85 / 9),  # min(rho, 2) over all 9: 1 + 2 + 1.5 + 0.4 + 1.2 + 0.5 + 0.25 + 1 + 1 = 8.85
        ("none", 1.0),
    ],
)
def test_mis_normalization_reference_values(normalization, divisor):
    old, rollout, mask = _mis_batch()
    w, keep, m = mis_weights(old, rollout, mask, veto_threshold=0.3, normalization=normalization)
    torch.testing.assert_close(keep, torch.tensor([[1.0, 0, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]]))
    torch.testing.assert_close(w, RAW_KEPT / divisor)
    assert m["correction/mis_weight_mean"] == pytest.approx(1.05, abs=1e-6)  # before normalisation, every mode
    assert m["correction/mis_masked_frac"] == pytest.approx(5 / 9, abs=1e-6)
    assert m["correction/mis_veto_frac"] == pytest.approx(1 / 3, abs=1e-6)


def test_mis_normalization_loss_values():
    # A = +1, pi = pi_old: loss = -(sum of kept weights) / 4 kept tokens
    # kept-tokens: -1 exactly ; all-tokens: -1.05 / 0.98333 = -1.0677966 (rejected tokens' weights pull the
    # divisor down, so kept tokens weigh more than 1 on average)
    old, rollout, mask = _mis_batch()
    losses = {}
    for normalization in ("kept-tokens", "all-tokens"):
        w, keep, _ = mis_weights(old, rollout, mask, veto_threshold=0.3, normalization=normalization)
        logp = old.clone().requires_grad_(True)
        losses[normalization], _ = policy_loss(logp, old, torch.ones(3), keep, PolicyLossConfig(), token_weights=w)
    assert losses["kept-tokens"].item() == pytest.approx(-1.0, abs=1e-6)
    assert losses["all-tokens"].item() == pytest.approx(-1.0677966, abs=1e-6)


def test_mis_all_tokens_nothing_masked_leaves_weights():
    old, rollout = _pair([[0.25, 1.0]])
    w, keep, _ = mis_weights(old, rollout, torch.zeros(1, 2), veto_threshold=0.3, normalization="all-tokens")
    assert torch.equal(w, torch.zeros(1, 2)) and not keep.any()


def test_mis_normalization_unknown():
    old, rollout, mask = _mis_batch()
    with pytest.raises(ValueError, match="'batch'"):
        mis_weights(old, rollout, mask, normalization="batch")


# ---------------------------------------------------------------- the flags, through the driver step


def test_flag_choices_match_algo_names():
    hints = get_type_hints(AlgoConfig)
    assert get_args(hints["mis_normalization"]) == MIS_NORMALIZATIONS
    assert get_args(hints["gspo_token_weights"]) == GSPO_TOKEN_WEIGHTS
    a = AlgoConfig()
    assert (a.mis_normalization, a.gspo_token_weights) == ("kept-tokens", "per-token")  # today's behaviour


def test_sequence_mean_needs_gspo():
    with pytest.raises(ValueError, match="--gspo-token-weights sequence-mean needs --advantage-estimator gspo"):
        AlgoConfig(advantage_estimator="grpo", gspo_token_weights="sequence-mean")


def _samples():
    # TIS clip 2: sample 0 ratios [0.5, 3 -> 2, 1.5], sample 1 ratios [1.0, 0.8]
    out = []
    for i, ratios in enumerate([[0.5, 3.0, 1.5], [1.0, 0.8]]):
        n = len(ratios)
        s = Sample(index=i, group=0, prompt_ids=[1, 2], response_ids=[5] * n, rollout_logprobs=[-1.0] * n)
        s.old_logprobs = (-1.0 + np.log(np.asarray(ratios))).astype(np.float32)
        out.append(s)
    return out


def test_corrections_step_applies_gspo_token_weights():
    per_token, seq_mean = _samples(), _samples()
    corrections(per_token, AlgoConfig())
    corrections(seq_mean, AlgoConfig(gspo_token_weights="sequence-mean"))
    np.testing.assert_allclose(per_token[0].token_weights, [0.5, 2.0, 1.5], rtol=1e-6)
    np.testing.assert_allclose(per_token[1].token_weights, [1.0, 0.8], rtol=1e-6)
    np.testing.assert_allclose(seq_mean[0].token_weights, [4 / 3] * 3, rtol=1e-6)
    np.testing.assert_allclose(seq_mean[1].token_weights, [0.9, 0.9], rtol=1e-6)


def test_corrections_step_applies_mis_normalization():
    # band [0.5, 2]: 3.0 is rejected; kept 0.5, 1.5, 1.0, 0.8 (mean 0.95); all tokens min(rho, 2): 5.8 / 5 = 1.16
    kept, all_tokens = _samples(), _samples()
    corrections(kept, AlgoConfig(use_tis=False, enable_mis=True))
    corrections(all_tokens, AlgoConfig(use_tis=False, enable_mis=True, mis_normalization="all-tokens"))
    np.testing.assert_allclose(kept[0].token_weights, np.array([0.5, 0.0, 1.5]) / 0.95, rtol=1e-6)
    np.testing.assert_allclose(all_tokens[0].token_weights, np.array([0.5, 0.0, 1.5]) / 1.16, rtol=1e-6)
    np.testing.assert_allclose(all_tokens[1].token_weights, np.array([1.0, 0.8]) / 1.16, rtol=1e-6)
    assert kept[0].token_mask.tolist() == [1.0, 0.0, 1.0]
