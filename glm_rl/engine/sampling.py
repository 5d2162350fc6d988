"""How the engine draws tokens: counter-based uniforms and inverse-CDF sampling, batched over rows.

Why this way: per-request sampling (temperature, 0 = greedy; top-k, <= 0: off; top-p) draws at a uniform keyed by
(request seed, decode step) alone, so a request's tokens do not depend on which other requests share its batch,
and the draw is a handful of kernels with no host synchronisation — a CUDA graph can hold the whole sampler
(`decode/static.py`'s `decode_sampled`). The logprob returned for a token is log_softmax(logits / T) at it,
before top-k / top-p filtering (T = 1 for greedy).
- `counter_bits` / `counter_bits_many` (host), `counter_uniform` (host) = `bits_to_uniform` (device), bit for bit.
- `filter_logits` (top-k then top-p), `sample_tokens` (rows sharing sampling params), `cdf` (blocked float64
  scan), `sampling_probs` (the distribution `sample_tokens` draws from: speculative decoding's p and q).
- `sample_rows`: one `sample_tokens` per group of rows sharing sampling params (one group in RL).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from glm_rl.engine.batch import Row, SamplingParams


def filter_logits(scaled: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k then top-p (nucleus) filtering along the last dim of [..., V] logits: dropped ids get -inf."""
    if 0 < top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = (torch.cumsum(probs, dim=-1) - probs) > top_p  # keep the smallest prefix reaching top_p
        scaled = scaled.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return scaled


def sampling_probs(logits: torch.Tensor, sp: SamplingParams) -> torch.Tensor:
    """softmax(filter(logits / T)) for each row of [n, V] logits (T > 0): what `sample_tokens` draws from."""
    return torch.softmax(filter_logits(logits.float() / sp.temperature, sp.top_k, sp.top_p), dim=-1)


_M64 = (1 << 64) - 1


def _mix64(z: int) -> int:
    """splitmix64's finaliser."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def counter_bits(seed: int, step: int) -> int:
    """53 random bits from (request seed, decode step) — counter-based: a request's draw depends on nothing but its
    own seed and step (not on its batch, nor on how many draws came before). Computed on the host: a batch's bits
    cross to the device in the same copy as its tokens, instead of a chain of tiny integer kernels."""
    return _mix64((_mix64((seed * 0xD1B54A32D192ED03 + step) & _M64) + 0x9E3779B97F4A7C15) & _M64) >> 11


def counter_bits_many(seeds: list[int], steps: list[int]) -> np.ndarray:
    """`counter_bits` of each (seed, step) pair as an int64 array, in a dozen numpy operations instead of a Python
    loop per row (uint64 arithmetic wraps modulo 2^64, as the masks above do)."""

    def mix(z):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))

    x = np.array(seeds, dtype=np.uint64) * np.uint64(0xD1B54A32D192ED03) + np.array(steps, dtype=np.uint64)
    return (mix(mix(x) + np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(11)).astype(np.int64)


def counter_uniform(seed: int, step: int) -> float:
    """The uniform in (0, 1) of (seed, step): `bits_to_uniform` of `counter_bits`, on the host."""
    return (counter_bits(seed, step) + 0.5) / float(1 << 53)


def bits_to_uniform(bits: torch.Tensor) -> torch.Tensor:
    """`counter_uniform` on the device, from int64 `counter_bits`: the same float64 value, bit for bit (the bits fit
    a float64 exactly, and both sides round `bits + 0.5` the same IEEE way; 2^-53 scales exactly)."""
    return (bits.to(torch.float64) + 0.5) * 2.0**-53


def sample_tokens(logits: torch.Tensor, sp: SamplingParams, uniforms: torch.Tensor):
    """(tokens [n], logprobs [n]) for n rows sharing sampling params, each row drawn at its uniform (float64 [n]):
    the logprob is log_softmax(logits / T) at the token (T = 1 for greedy), in fp32. Sampling inverts each row's
    CDF of softmax(filtered logits / T) (accumulated in float64, so the smallest probabilities keep their mass)
    at the row's uniform: a handful of kernels with no host synchronisation (so a CUDA graph can hold them,
    decode/static.py), and a request's tokens do not depend on which other requests share its batch."""
    scaled = logits.float()
    if sp.temperature > 0.0 and sp.temperature != 1.0:
        scaled = scaled / sp.temperature
    logp = torch.log_softmax(scaled, dim=-1)
    if sp.temperature <= 0.0:
        tokens = torch.argmax(scaled, dim=-1)
    else:
        filtered = filter_logits(scaled, sp.top_k, sp.top_p)
        probs = logp.exp() if filtered is scaled else torch.softmax(filtered, dim=-1)
        running = cdf(probs)
        target = uniforms.to(running.device, torch.float64, non_blocking=True)[:, None] * running[:, -1:]
        # the first index whose CDF reaches u: never a zero-probability token (its CDF equals its predecessor's)
        tokens = torch.searchsorted(running, target).squeeze(-1).clamp_max_(logits.shape[-1] - 1)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


_CDF_BLOCK = 1024


def cdf(probs: torch.Tensor) -> torch.Tensor:
    """float64 running sum along the last dim. A vocab-long row is scanned as blocks of 1024 plus one scan of the
    block totals: GPU scans parallelise over rows, and 64 rows of 151k entries scanned flat took 0.29 ms on an
    H100 (17 % of a graphed batch-64 decode step). Block b's offset is the inclusive scan of the totals up to
    b - 1, so a zero-probability entry starting a block repeats its predecessor's sum (never drawn, as in a flat
    scan)."""
    p = probs.to(torch.float64)
    V = p.shape[-1]
    if V <= 4 * _CDF_BLOCK:
        return p.cumsum_(-1)
    blocks = F.pad(p, (0, -V % _CDF_BLOCK)).unflatten(-1, (-1, _CDF_BLOCK)).cumsum_(-1)
    before = F.pad(blocks[..., :-1, -1].cumsum(-1), (1, 0))  # sum of all earlier blocks
    return (blocks + before[..., None]).flatten(-2)[..., :V]


def sampling_groups(rows: list[Row], active: list[int]) -> dict[tuple, list[int]]:
    """Batch indices (into `active`) grouped by sampling params (one group in RL: every request alike)."""
    groups: dict[tuple, list[int]] = {}
    for b, i in enumerate(active):
        sp = rows[i].req.sampling
        groups.setdefault((sp.temperature, sp.top_k, sp.top_p), []).append(b)
    return groups


def sample_rows(rows: list[Row], active: list[int], logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, logprobs) on the device for every active row: one `sample_tokens` per sampling group, each row at
    the uniform of (its seed, its tokens so far)."""
    groups = sampling_groups(rows, active)
    uniforms = bits_to_uniform(
        torch.from_numpy(
            counter_bits_many([rows[i].req.seed for i in active], [len(rows[i].output_ids) for i in active])
        )
    )
    if len(groups) == 1:  # the RL case: no gather of logits rows
        return sample_tokens(logits, rows[active[0]].req.sampling, uniforms)
    tokens = torch.empty(len(active), dtype=torch.long, device=logits.device)
    logps = torch.empty(len(active), dtype=torch.float32, device=logits.device)
    for bs in groups.values():
        index = torch.tensor(bs, device=logits.device)
        tokens[index], logps[index] = sample_tokens(logits[index], rows[active[bs[0]]].req.sampling, uniforms[bs])
    return tokens, logps
