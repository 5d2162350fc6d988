"""Multi-turn loss masks through the trainer: observation tokens (loss_mask 0) inside a response give the same
loss, gradient, TIS weights and mismatch metrics as the same tokens moved to the prompt side; MIS never vetoes
a sequence over an observation's 0.0 rollout logprob; per-sample logprobs still cover every response token."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from glm_rl.config import AlgoConfig, ModelConfig, TrainConfig
from glm_rl.rollout.samples import Sample
from glm_rl.trainer.backends.torch_backend import TorchBackend
from glm_rl.trainer.batching import collate, response_loss_mask
from glm_rl.trainer.steps import corrections

PROMPT = [1, 2, 4, 23, 9, 17, 10, 5, 23]  # [gMASK]<sop><|user|>\n2+3<|assistant|>\n
TURN1 = [12, 0]  # "5" <|endoftext|>
OBS = [6, 23, 13, 23, 5, 23]  # an observation turn: <|observation|>\n6\n<|assistant|>\n
TURN2 = [12, 20, 12, 0]


def rng_logprobs(n, seed):
    return (-np.random.default_rng(seed).uniform(0.1, 3.0, n)).astype(np.float32)


def pair():
    """(multi-turn sample with OBS masked inside the response, the same tokens with PROMPT+TURN1+OBS as prompt).
    Only TURN2 is trained in both (TURN1 is masked too, to make the two comparable)."""
    lp2, old2 = rng_logprobs(len(TURN2), 0), rng_logprobs(len(TURN2), 1)
    hidden = len(TURN1) + len(OBS)
    a = Sample(
        index=0,
        group=0,
        prompt_ids=PROMPT,
        response_ids=TURN1 + OBS + TURN2,
        rollout_logprobs=[0.0] * hidden + lp2.tolist(),
        loss_mask=[0] * hidden + [1] * len(TURN2),
        advantage=0.7,
    )
    a.old_logprobs = np.concatenate([np.full(hidden, -40.0, dtype=np.float32), old2])  # ignored where masked
    b = Sample(
        index=0,
        group=0,
        prompt_ids=PROMPT + TURN1 + OBS,
        response_ids=TURN2,
        rollout_logprobs=lp2.tolist(),
        advantage=0.7,
    )
    b.old_logprobs = old2
    return a, b


@pytest.fixture(scope="module")
def backend():
    torch.manual_seed(0)
    return TorchBackend(ModelConfig(), TrainConfig(), AlgoConfig(), temperature=1.0)


def loss_and_grads(backend, s: Sample):
    backend.model.zero_grad(set_to_none=True)
    backend.replay.off()
    mb = collate([s], backend.pad_id)
    logp, _ = backend._forward(backend.model, mb)
    loss, sums = backend.micro_batch_loss(logp, None, mb, global_tokens=float(len(TURN2)))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in backend.model.named_parameters() if p.grad is not None}
    return loss.item(), sums, grads


def test_masked_observations_equal_prompt_side_context(backend):
    a, b = pair()
    metrics = [corrections([s], AlgoConfig(use_tis=True)) for s in (a, b)]
    assert metrics[0] == pytest.approx(metrics[1], abs=1e-7)  # TIS + mismatch: TURN2 only
    assert a.token_weights[-len(TURN2) :] == pytest.approx(b.token_weights)
    assert a.token_mask.tolist() == [0.0] * (len(a.response_ids) - len(TURN2)) + [1.0] * len(TURN2)
    (la, sa, ga), (lb, sb, gb) = loss_and_grads(backend, a), loss_and_grads(backend, b)
    assert sa["n_tokens"] == sb["n_tokens"] == len(TURN2)
    assert la == pytest.approx(lb, rel=1e-6, abs=1e-7)
    assert ga.keys() == gb.keys() and ga
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-5, atol=1e-7, msg=name)


def test_mask_between_turns_trains_both_turns_only(backend):
    """Loss over TURN1 + TURN2 (observation between them) equals the hand GSPO loss over those positions; the
    observation's old logprobs are far off (-20) and would move the sequence ratio if they counted."""
    mask = [1] * len(TURN1) + [0] * len(OBS) + [1] * len(TURN2)
    m = torch.tensor(mask, dtype=torch.float32)
    s = Sample(
        index=0,
        group=0,
        prompt_ids=PROMPT,
        response_ids=TURN1 + OBS + TURN2,
        rollout_logprobs=[0.0] * len(mask),
        loss_mask=mask,
        advantage=-0.4,
    )
    p = len(PROMPT) - 1
    with torch.no_grad():
        logp, _ = backend._forward(backend.model, collate([s], backend.pad_id))
    resp_logp = logp[0, p : p + len(mask)]
    old = resp_logp + 0.05 * torch.from_numpy(rng_logprobs(len(mask), 2)) - 20.0 * (1 - m)
    s.old_logprobs = old.numpy()
    s.rollout_logprobs = (old * m).tolist()
    corrections([s], AlgoConfig(use_tis=False))
    mb = collate([s], backend.pad_id)
    with torch.no_grad():
        loss, _ = backend.micro_batch_loss(logp, None, mb, global_tokens=float(sum(mask)))
    # GSPO (the default estimator): one sequence ratio, the mean log-ratio over generated tokens only
    ratio = torch.exp(((resp_logp - old) * m).sum() / m.sum())
    assert 0.8 < ratio.item() < 1.2  # inside the clip: value counts
    assert loss.item() == pytest.approx(0.4 * ratio.item(), rel=1e-6)  # -A * ratio, A = -0.4
    assert len(mb.per_sample(logp)[0]) == len(s.response_ids)  # every response token


def test_mis_ignores_observation_zero_logprobs():
    lp = rng_logprobs(len(TURN1) + len(OBS) + len(TURN2), 3)
    mask = [1] * len(TURN1) + [0] * len(OBS) + [1] * len(TURN2)
    s = Sample(
        index=0,
        group=0,
        prompt_ids=PROMPT,
        response_ids=TURN1 + OBS + TURN2,
        rollout_logprobs=[v * m for v, m in zip(lp.tolist(), mask)],
        loss_mask=mask,
    )
    s.old_logprobs = lp - 20.0 * (1 - np.asarray(mask, dtype=np.float32))  # observations: ratio e^-20 < veto
    metrics = corrections([s], AlgoConfig(use_tis=False, enable_mis=True))
    assert metrics["correction/mis_veto_frac"] == 0.0 and metrics["mismatch/logprob_abs_diff_max"] == 0.0
    assert s.token_mask.tolist() == [float(m) for m in mask]


def test_loss_mask_length_is_checked():
    s = Sample(index=3, group=0, prompt_ids=PROMPT, response_ids=TURN2, rollout_logprobs=[0.0] * 4, loss_mask=[1])
    with pytest.raises(ValueError, match="sample 3: loss_mask has 1 entries, response_ids 4"):
        response_loss_mask(s)
