"""Reference-value tests for glm_rl.algo.advantages (numbers worked out by hand in the comments)."""

from __future__ import annotations

import math

import pytest
import torch

from glm_rl.algo import broadcast_to_tokens, compute_advantages, dr_grpo_advantages, grpo_advantages, gspo_advantages

SQRT3_2 = math.sqrt(3) / 2  # 0.8660254


def test_grpo_reference_values_two_groups():
    # group 0 = [1,0,0,1]: mean 0.5, deviations +-0.5, unbiased var = 4*0.25/3 = 1/3, std = 1/sqrt(3)
    #   -> +-0.5*sqrt(3) = +-sqrt(3)/2 ; group 1 = [1,1,0,0] the same.
    rewards = torch.tensor([1.0, 0, 0, 1, 1, 1, 0, 0])
    expected = torch.tensor([1, -1, -1, 1, 1, 1, -1, -1]) * SQRT3_2
    adv = grpo_advantages(rewards, 4)
    torch.testing.assert_close(adv, expected.float(), atol=1e-5, rtol=0)


def test_grpo_reference_values_asymmetric_group():
    # [1,0,0,0]: mean 0.25, dev [0.75,-0.25,-0.25,-0.25], var = (0.5625 + 3*0.0625)/3 = 0.25, std 0.5
    #   -> [1.5, -0.5, -0.5, -0.5]
    adv = grpo_advantages(torch.tensor([1.0, 0, 0, 0]), 4, eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([1.5, -0.5, -0.5, -0.5]))


def test_grpo_eps_is_added_to_std():
    # std 0.5, eps 0.5 -> divide by 1.0: the centered rewards come back unchanged
    adv = grpo_advantages(torch.tensor([1.0, 0, 0, 0]), 4, eps=0.5)
    torch.testing.assert_close(adv, torch.tensor([0.75, -0.25, -0.25, -0.25]))


def test_grpo_without_std_and_dr_grpo_only_center():
    rewards = torch.tensor([1.0, 0, 0, 1, 1, 0, 0, 0])
    expected = torch.tensor([0.5, -0.5, -0.5, 0.5, 0.75, -0.25, -0.25, -0.25])
    torch.testing.assert_close(grpo_advantages(rewards, 4, normalize_std=False), expected)
    torch.testing.assert_close(dr_grpo_advantages(rewards, 4), expected)
    torch.testing.assert_close(compute_advantages("dr_grpo", rewards, 4), expected)


def test_constant_group_gives_zero_not_nan():
    adv = grpo_advantages(torch.tensor([1.0, 1, 1, 1, 0, 1, 0, 1]), 4)
    assert torch.isfinite(adv).all()
    torch.testing.assert_close(adv[:4], torch.zeros(4))
    torch.testing.assert_close(adv[4:], torch.tensor([-1, 1, -1, 1]) * SQRT3_2, atol=1e-5, rtol=0)


def test_gspo_equals_grpo_and_dispatch():
    rewards = torch.tensor([0.2, 0.9, 0.4, 0.0, 1.0, 0.3])
    ref = grpo_advantages(rewards, 3)
    torch.testing.assert_close(gspo_advantages(rewards, 3), ref)
    torch.testing.assert_close(compute_advantages("gspo", rewards, 3), ref)
    torch.testing.assert_close(compute_advantages("grpo", rewards, 3), ref)
    torch.testing.assert_close(
        compute_advantages("grpo", rewards, 3, normalize_std=False), dr_grpo_advantages(rewards, 3)
    )


@pytest.mark.parametrize("estimator", ["grpo", "gspo", "dr_grpo"])
def test_invariant_to_per_group_constant_shift(estimator):
    torch.manual_seed(0)
    rewards = torch.rand(12)
    shift = torch.tensor([3.0, -7.5, 0.25]).repeat_interleave(4)  # a different constant for each group
    torch.testing.assert_close(
        compute_advantages(estimator, rewards + shift, 4), compute_advantages(estimator, rewards, 4), atol=1e-5, rtol=0
    )


def test_groups_are_contiguous_not_strided():
    # contiguous groups of 2: [1,1] and [0,0] -> all zero. (Strided groups [1,0], [1,0] would not be.)
    torch.testing.assert_close(grpo_advantages(torch.tensor([1.0, 1, 0, 0]), 2), torch.zeros(4))
    # [1,0] | [0,1]: mean 0.5, unbiased std sqrt(0.5) -> +-0.5/sqrt(0.5) = +-sqrt(0.5)
    s = math.sqrt(0.5)
    adv = grpo_advantages(torch.tensor([1.0, 0, 0, 1]), 2, eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([s, -s, -s, s]))


def test_integer_rewards_are_accepted():
    adv = grpo_advantages(torch.tensor([1, 0, 0, 0]), 4, eps=0.0)
    assert adv.dtype == torch.float32
    torch.testing.assert_close(adv, torch.tensor([1.5, -0.5, -0.5, -0.5]))


def test_broadcast_to_tokens():
    adv = torch.tensor([2.0, -1.0])
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    out = broadcast_to_tokens(adv, mask)
    torch.testing.assert_close(out, torch.tensor([[2.0, 2.0, 0.0], [0.0, -1.0, -1.0]]))


def test_bad_group_size_names_both_numbers():
    with pytest.raises(ValueError, match=r"N=7.*group_size=4"):
        grpo_advantages(torch.zeros(7), 4)
    with pytest.raises(ValueError, match="group_size"):
        grpo_advantages(torch.zeros(4), 0)
    with pytest.raises(ValueError, match="at least 2"):
        grpo_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="1-D"):
        grpo_advantages(torch.zeros(2, 4), 4)


def test_unknown_estimator_lists_valid_names():
    with pytest.raises(ValueError, match=r"'ppo'.*grpo, gspo, dr_grpo"):
        compute_advantages("ppo", torch.zeros(4), 2)


def test_broadcast_shape_mismatch():
    with pytest.raises(ValueError, match="same B"):
        broadcast_to_tokens(torch.zeros(3), torch.ones(2, 4))
