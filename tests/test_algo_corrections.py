"""Reference-value tests for glm_rl.algo.corrections (TIS / MIS) and glm_rl.algo.mismatch."""

from __future__ import annotations

import math

import pytest
import torch

from glm_rl.algo import PolicyLossConfig, mis_weights, mismatch_metrics, policy_loss, tis_weights


def _pair(ratios, rollout=-2.0):
    """(old_logp, rollout_logp) with exp(old_logp - rollout_logp) == ratios."""
    r = torch.tensor(ratios, dtype=torch.float64)
    rollout_logp = torch.full_like(r, rollout)
    return (rollout_logp + torch.log(r)).float(), rollout_logp.float()


# ---------------------------------------------------------------- TIS


def test_tis_clamp_values_and_clipfrac():
    # ratios [0.5, 1, 3, 1.5] + a padded 100 -> clamp to [0, 2]: [0.5, 1, 2, 1.5] ; mean 5/4 ; 1 of 4 clipped
    old, rollout = _pair([[0.5, 1.0, 3.0, 1.5, 100.0]])
    mask = torch.tensor([[1.0, 1, 1, 1, 0]])
    w, m = tis_weights(old, rollout, mask, clip=2.0)
    torch.testing.assert_close(w[:, :4], torch.tensor([[0.5, 1.0, 2.0, 1.5]]))
    assert m["correction/tis_weight_mean"] == pytest.approx(1.25, abs=1e-6)
    assert m["correction/tis_clipfrac"] == pytest.approx(0.25)


def test_tis_clip_low():
    # clip_low 0.8: [0.8, 1, 2, 1.5] ; mean 5.3/4 = 1.325 ; 2 of 4 outside [0.8, 2]
    old, rollout = _pair([[0.5, 1.0, 3.0, 1.5]])
    w, m = tis_weights(old, rollout, torch.ones(1, 4), clip=2.0, clip_low=0.8)
    torch.testing.assert_close(w, torch.tensor([[0.8, 1.0, 2.0, 1.5]]))
    assert m["correction/tis_weight_mean"] == pytest.approx(1.325, abs=1e-6)
    assert m["correction/tis_clipfrac"] == pytest.approx(0.5)


def test_tis_weights_are_detached():
    old, rollout = _pair([[0.5, 1.5]])
    w, _ = tis_weights(old.requires_grad_(True), rollout, torch.ones(1, 2))
    assert not w.requires_grad


def test_tis_bad_clip():
    old, rollout = _pair([[1.0]])
    with pytest.raises(ValueError, match=r"clip_low=2\.0, clip=1\.0"):
        tis_weights(old, rollout, torch.ones(1, 1), clip=1.0, clip_low=2.0)


# ---------------------------------------------------------------- MIS


def _mis_batch():
    # seq0: [1.0, 3.0 (outside [0.5, 2] -> removed), 1.5, pad 1e-6 (masked out: must NOT veto)]
    # seq1: [1.0, 1e-5 (< veto 1e-4 -> whole sequence vetoed), 1.2, 0.8]
    # seq2: [0.6, 1.0, 2.0 (inside, bounds inclusive), 0.4 (< 0.5 -> removed)]
    old, rollout = _pair([[1.0, 3.0, 1.5, 1e-6], [1.0, 1e-5, 1.2, 0.8], [0.6, 1.0, 2.0, 0.4]])
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1]])
    return old, rollout, mask


def test_mis_reference_values():
    old, rollout, mask = _mis_batch()
    w, new_mask, m = mis_weights(old, rollout, mask)
    torch.testing.assert_close(new_mask, torch.tensor([[1.0, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 0]]))
    # kept weights 1.0, 1.5, 0.6, 1.0, 2.0: sum 6.1 over 5 -> mean 1.22 ; normalised = w / 1.22
    raw = torch.tensor([[1.0, 0, 1.5, 0], [0, 0, 0, 0], [0.6, 1.0, 2.0, 0]])
    torch.testing.assert_close(w, raw / 1.22)
    assert (w * new_mask).sum().item() / new_mask.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert m["correction/mis_weight_mean"] == pytest.approx(1.22, abs=1e-6)
    assert m["correction/mis_masked_frac"] == pytest.approx(6 / 11)  # 11 masked tokens, 5 kept
    assert m["correction/mis_veto_frac"] == pytest.approx(1 / 3)


def test_mis_without_normalisation_and_truncation():
    # widen the band so the ratio 3 is kept; truncate 2 caps it at 2
    old, rollout = _pair([[1.0, 3.0, 0.7]])
    w, new_mask, m = mis_weights(old, rollout, torch.ones(1, 3), mask_high=5.0, truncate=2.0, normalization="none")
    torch.testing.assert_close(w, torch.tensor([[1.0, 2.0, 0.7]]))
    torch.testing.assert_close(new_mask, torch.ones(1, 3))
    assert m["correction/mis_weight_mean"] == pytest.approx(3.7 / 3, abs=1e-6)
    assert m["correction/mis_masked_frac"] == 0.0 and m["correction/mis_veto_frac"] == 0.0


def test_mis_removed_token_leaves_loss_denominator():
    # with the MIS mask, seq0's ratio-3 token is out: A=+1, pi = pi_old -> pg = -w per kept token,
    # loss = -(sum of kept weights) / 5 kept tokens = -5 / 5 = -1 (normalised weights average 1)
    old, rollout, mask = _mis_batch()
    w, new_mask, _ = mis_weights(old, rollout, mask)
    logp = old.clone().requires_grad_(True)
    loss, _ = policy_loss(logp, old, torch.ones(3), new_mask, PolicyLossConfig(), token_weights=w)
    assert loss.item() == pytest.approx(-1.0, abs=1e-6)
    # under the old mask the denominator would be 11, not 5
    loss_old_mask, _ = policy_loss(logp, old, torch.ones(3), mask, PolicyLossConfig(), token_weights=w)
    assert loss_old_mask.item() == pytest.approx(-5 / 11, abs=1e-6)


def test_mis_everything_vetoed_is_finite_zero():
    old, rollout = _pair([[1e-6, 1.0], [1.0, 1e-7]])
    w, new_mask, m = mis_weights(old, rollout, torch.ones(2, 2))
    assert torch.equal(w, torch.zeros(2, 2)) and torch.equal(new_mask, torch.zeros(2, 2))
    assert m["correction/mis_veto_frac"] == 1.0 and m["correction/mis_masked_frac"] == 1.0
    assert m["correction/mis_weight_mean"] == 0.0


def test_mis_outputs_detached_and_mask_dtype_kept():
    old, rollout, mask = _mis_batch()
    w, new_mask, _ = mis_weights(old.requires_grad_(True), rollout, mask.bool())
    assert not w.requires_grad and new_mask.dtype == torch.bool


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"truncate": 0.0}, "truncate=0.0"),
        ({"mask_low": 2.0, "mask_high": 1.0}, r"mask_low=2\.0, mask_high=1\.0"),
        ({"mask_low": -0.1}, r"mask_low=-0\.1"),
        ({"veto_threshold": -1.0}, r"veto_threshold=-1\.0"),
    ],
)
def test_mis_bad_arguments(kwargs, pattern):
    old, rollout, mask = _mis_batch()
    with pytest.raises(ValueError, match=pattern):
        mis_weights(old, rollout, mask, **kwargs)


def test_shape_mismatch():
    with pytest.raises(ValueError, match="shape mismatch"):
        mis_weights(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 4))


# ---------------------------------------------------------------- mismatch metrics


def test_mismatch_metrics_reference_values():
    # trainer - rollout = [ln2, 0] on response tokens (+ a padded token 5 nats apart, ignored)
    # |diff| mean = ln2/2 = 0.346574, max = ln2 ; k3 = e^{ln2} - 1 - ln2 = 0.306853 and 0 -> mean 0.153426
    trainer = torch.log(torch.tensor([[0.5, 0.25, 0.5]]))
    rollout = torch.log(torch.tensor([[0.25, 0.25, 0.5]]))
    rollout[0, 2] -= 5.0
    mask = torch.tensor([[1.0, 1, 0]])
    m = mismatch_metrics(trainer, rollout, mask)
    ln2 = math.log(2)
    assert m["mismatch/logprob_abs_diff_mean"] == pytest.approx(ln2 / 2, abs=1e-6)
    assert m["mismatch/logprob_abs_diff_max"] == pytest.approx(ln2, abs=1e-6)
    assert m["mismatch/k3_kl"] == pytest.approx((1 - ln2) / 2, abs=1e-6)


def test_mismatch_metrics_empty_mask():
    m = mismatch_metrics(torch.zeros(1, 2), torch.ones(1, 2), torch.zeros(1, 2))
    assert m == {"mismatch/logprob_abs_diff_mean": 0.0, "mismatch/logprob_abs_diff_max": 0.0, "mismatch/k3_kl": 0.0}
