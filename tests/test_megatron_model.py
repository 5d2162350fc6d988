"""Megatron model + bridge: the tiny GLM-4.5 as a megatron-core GPTModel on CPU/gloo, imported from the HF
checkpoint through the bridge, must give HF's logits (fp32, ≤ 1e-4) for TP1, TP2+SP, EP2, PP2 (uneven),
CP2, CP2×TP2, TP2×EP2 and expert-TP1 under TP2 (4-process cases marked slow); its MTP logits must equal
those the embedded engine drafts with, and every rank must export the whole HF model back bitwise. CP2
gradients of a scalar loss must equal CP1's.

Each case runs in fresh spawned processes (gloo), so the process-wide CPU shims never touch the pytest
process. Sequences are real chat-formatted problems of the shipped arithmetic task, right-padded to a common
length divisible by the TP/CP split; causal attention makes the padding invisible to real positions, which
are the only ones compared. The pipeline forward sends the hidden state by explicit gloo send / recv.
"""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch

pytest.importorskip("megatron.core")

MAX_DIFF = 1e-4


def _task_batch(tokenizer, multiple: int, n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, T), valid (B, T)) for `n` eval problems with their correct answers, T a multiple of `multiple`."""
    from glm_rl.evaluate import chat_prompt_ids
    from glm_rl.models.glm45.presets import ASSETS
    from glm_rl.rollout.data import load_prompts

    rows = load_prompts(ASSETS / "arith" / "eval.jsonl")[:n]
    seqs = [
        chat_prompt_ids(tokenizer, r.prompt) + tokenizer.encode(f"{r.prompt}={r.label}", add_special_tokens=False)
        for r in rows
    ]
    length = -(-max(map(len, seqs)) // multiple) * multiple
    ids = torch.full((n, length), tokenizer.pad_token_id, dtype=torch.long)
    valid = torch.zeros(n, length, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], valid[i, : len(s)] = torch.tensor(s), True
    return ids, valid


class _Case(NamedTuple):
    tp: int = 1
    ep: int = 1
    pp: int = 1
    cp: int = 1
    etp: int | None = None
    first_stage_layers: int | None = None
    mtp: bool = False
    controls: bool = False
    grads: bool = False  # scalar-loss gradients, for the CP2-vs-CP1 check
    device: str = "cpu"  # "cuda": one GPU per rank, NCCL (tests/test_gpu.py, on a multi-GPU box)
    bf16: bool = False  # the Megatron model in bf16 (HF's reference stays fp32)

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.cp * self.ep  # data parallel = EP: every DP rank feeds the same batch

    @property
    def name(self) -> str:
        return "_".join(f"{k}{v}" for k, v in self._asdict().items() if v not in (None, False, "cpu"))


def _gather_vocab(local: torch.Tensor) -> torch.Tensor:
    """(B, T, V / TP) → (B, T, V padded), vocab shards gathered over TP."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1:
        return local
    shards = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(shards, local.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(shards, dim=-1)


def _forward(model, ids: torch.Tensor, hidden_size: int):
    """This rank's part of the sequence (CP) through the pipeline by explicit send / recv of the hidden state
    (gloo has point-to-point); returns (local logits (B, T/CP, V/TP), MTP logits or None) on the last stage,
    (None, None) elsewhere."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from glm_rl.trainer.backends.megatron.cp_attention import split_for_cp

    cp, cp_rank = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
    ids = split_for_cp(ids, cp_rank, cp)
    pos = split_for_cp(torch.arange(ids.shape[1] * cp, device=ids.device).expand(ids.shape[0], -1), cp_rank, cp)
    captured = {}
    if getattr(model, "mtp_process", False):
        model.mtp.register_forward_hook(lambda m, a, out: captured.__setitem__("mtp", out))
    if not ps.is_pipeline_first_stage():
        sp = model.config.sequence_parallel
        hidden = torch.empty(
            ids.shape[1] // (ps.get_tensor_model_parallel_world_size() if sp else 1),
            ids.shape[0],
            hidden_size,
            device=ids.device,
        )
        dist.recv(
            hidden, group=ps.get_pipeline_model_parallel_group(), group_src=ps.get_pipeline_model_parallel_rank() - 1
        )
        model.set_input_tensor(hidden)
    out = model(ids, pos, attention_mask=None)
    if not ps.is_pipeline_last_stage():
        dist.send(
            out.contiguous(),
            group=ps.get_pipeline_model_parallel_group(),
            group_dst=ps.get_pipeline_model_parallel_rank() + 1,
        )
        return None, None
    mtp = None
    if "mtp" in captured:
        mtp_hidden = captured["mtp"].chunk(2, dim=0)[1]  # [main; MTP layer 0] along the sequence dim
        mtp = model.output_layer(mtp_hidden)[0].transpose(0, 1)
    return out, mtp


def _hf_reference(hf, ids: torch.Tensor, mtp: bool):
    """HF logits, and (mtp) the MTP logits the embedded engine drafts with: `speculative._mtp_forward` on the
    main model's final-normed hidden states, token t+1 at position t+1 (predicts token t+2)."""
    from transformers import DynamicCache

    from glm_rl.engine.decode.speculative import mtp_forward as _mtp_forward
    from glm_rl.models.glm45.checkpoint import load_mtp
    from glm_rl.models.glm45.hf_names import mtp_named_tensors

    with torch.no_grad():
        out = hf.model(ids)
        logits = hf.lm_head(out.last_hidden_state)  # (B, T, V)
        if not mtp:
            return logits, None, {}
        model = load_mtp(hf)
        nxt = torch.cat([ids[:, 1:], ids[:, -1:]], dim=1)
        pos = torch.arange(1, ids.shape[1] + 1).expand_as(ids)
        mtp_logits, _ = _mtp_forward(
            model, out.last_hidden_state, nxt, pos, torch.ones_like(ids), DynamicCache(config=model.config)
        )
        mtp_state = mtp_named_tensors(model, hf.config.num_hidden_layers)
        return logits, mtp_logits, {k: v.clone() for k, v in mtp_state.items()}


def _loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL over `mask` (B, T)."""
    logp = logits.float().log_softmax(-1).gather(-1, labels[..., None])[..., 0]
    return -(logp * mask).sum()


def _grads(model, ids: torch.Tensor, valid: torch.Tensor, hidden_size: int) -> dict[str, torch.Tensor]:
    """Parameter gradients of the summed next-token NLL, all-reduced over CP as Megatron's DDP would (TP1)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from glm_rl.trainer.backends.megatron.cp_attention import split_for_cp

    cp, cp_rank = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
    labels = torch.cat([ids[:, 1:], ids[:, :1]], dim=1)
    mask = torch.cat([valid[:, 1:], torch.zeros_like(valid[:, :1])], dim=1).float()
    model.zero_grad()
    logits, _ = _forward(model, ids, hidden_size)
    _loss(logits, split_for_cp(labels, cp_rank, cp), split_for_cp(mask, cp_rank, cp)).backward()
    out = {}
    for name, p in model.named_parameters():
        g = p.grad.clone()
        if cp > 1:
            dist.all_reduce(g, group=ps.get_context_parallel_group())
        out[name] = g
    return out


def _controls(model, spec, ids, valid, ref, hf_state, hidden_size) -> dict:
    from glm_rl.trainer.backends.megatron.bridge import import_hf_weights

    result = {}
    biases = [b for n, b in model.named_buffers() if n.endswith("router.expert_bias")]
    saved = [b.clone() for b in biases]
    for b in biases:
        b.zero_()
    with torch.no_grad():
        logits = _forward(model, ids, hidden_size)[0][..., : spec.vocab_size]
    result["no_bias_diff"] = (logits - ref)[valid].abs().max().item()
    for b, s in zip(biases, saved):
        b.copy_(s)
    for broken in (
        {k: v for k, v in hf_state.items() if k != "model.norm.weight"},
        {**hf_state, "model.layers.4.eh_proj.weight": hf_state["model.norm.weight"]},
    ):
        try:
            import_hf_weights(model, spec, broken)
            result.setdefault("mismatch_errors", []).append(None)
        except KeyError as err:
            result.setdefault("mismatch_errors", []).append(str(err))
    return result


def _worker(rank: int, store: str, out_dir: str, case: _Case) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from glm_rl.models.glm45.checkpoint import load_hf_model
    from glm_rl.models.glm45.presets import glm45_tiny
    from glm_rl.trainer.backends.megatron.bridge import export_hf_weights, import_hf_weights
    from glm_rl.trainer.backends.megatron.cp_attention import gather_from_cp
    from glm_rl.trainer.backends.megatron.model import build_gpt_model, setup_model_parallel

    torch.set_num_threads(1)
    if case.device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl" if case.device == "cuda" else "gloo", init_method=f"file://{store}", rank=rank, world_size=case.world
    )
    try:
        setup_model_parallel(tp=case.tp, ep=case.ep, pp=case.pp, cp=case.cp, etp=case.etp)
        spec = glm45_tiny()
        hf, tokenizer = load_hf_model(spec.hf_checkpoint, preset=spec.name)
        hf_state = hf.state_dict()
        ids, valid = _task_batch(tokenizer, multiple=case.tp * 2 * max(case.cp, 2))
        ref, mtp_ref, mtp_state = _hf_reference(hf, ids, case.mtp)
        hf_state = {**hf_state, **mtp_state}
        model = build_gpt_model(
            spec, tp=case.tp, ep=case.ep, mtp=case.mtp, first_stage_layers=case.first_stage_layers
        ).eval()
        import_hf_weights(model, spec, hf_state)
        model.to(case.device, torch.bfloat16 if case.bf16 else None)
        result = {
            "stage_layers": len(model.decoder.layers),
            "vocab_rows": model.vocab_size,
            "etp": ps.get_expert_tensor_parallel_world_size(),
        }
        with torch.no_grad():
            logits, mtp_logits = _forward(model, ids.to(case.device), spec.hidden_size)
        if logits is not None:
            cp_group = ps.get_context_parallel_group()
            full = gather_from_cp(_gather_vocab(logits), cp_group).cpu().float()  # (B, T, V padded)
            padded = full[..., spec.vocab_size :]
            result["padded_max"] = padded.max().item() if padded.numel() else None
            result["real_min"] = full[..., : spec.vocab_size].min().item()
            result["max_diff"] = (full[..., : spec.vocab_size] - ref)[valid].abs().max().item()
            result["ref_scale"] = ref[valid].abs().max().item()
            result["tokens"] = int(valid.sum())
            if mtp_logits is not None:
                mtp_full = gather_from_cp(_gather_vocab(mtp_logits), cp_group)[..., : spec.vocab_size]
                has_next = torch.cat([valid[:, 1:], torch.zeros_like(valid[:, :1])], dim=1)  # token t+1 is real
                result["mtp_max_diff"] = (mtp_full - mtp_ref)[has_next].abs().max().item()
                result["mtp_tokens"] = int(has_next.sum())
        if case.controls:
            result.update(_controls(model, spec, ids, valid, ref, hf_state, spec.hidden_size))
        if case.grads:
            result["grads"] = _grads(model, ids, valid, spec.hidden_size)
        exported = {n: t.cpu() for n, t in export_hf_weights(model, spec)}
        result["export_missing"] = sorted(set(hf_state) - set(exported))
        result["export_extra"] = sorted(set(exported) - set(hf_state))
        result["export_unequal"] = sorted(
            k
            for k in set(hf_state) & set(exported)  # bf16: the cast HF weights
            if not torch.equal(exported[k], hf_state[k].to(exported[k].dtype))
        )
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _run(tmp_path, case: _Case) -> list[dict]:
    """Every rank's result, in rank order. A file store: no port to race other jobs on this box for."""
    import torch.multiprocessing as mp

    out = tmp_path / case.name
    out.mkdir()
    mp.spawn(_worker, args=(str(tmp_path / f"store_{case.name}"), str(out), case), nprocs=case.world, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(case.world)]


def _check_parity_and_export(results: list[dict], *, mtp: bool = False, rel_bound: float | None = None) -> dict:
    """Logits (and MTP logits) within MAX_DIFF of HF on the last stage (`rel_bound`: within that share of the
    logits' scale instead, for bf16); every rank exports the whole HF model bitwise. Returns the first last-stage
    result."""
    last = [r for r in results if "max_diff" in r]
    assert last, "no rank computed logits"
    for r in last:
        assert r["tokens"] > 60
        bound = MAX_DIFF if rel_bound is None else rel_bound * r["ref_scale"]
        assert r["max_diff"] <= bound, f"logits differ from HF by {r['max_diff']:.3g} (bound {bound:.3g})"
        if r["padded_max"] is not None:
            assert r["padded_max"] < r["real_min"], "a padded vocab id could win"
        if mtp:
            assert r["mtp_tokens"] > 60
            assert r["mtp_max_diff"] <= MAX_DIFF, f"MTP logits differ from HF's MTP by {r['mtp_max_diff']:.3g}"
    print({k: v for k, v in last[0].items() if k.endswith(("diff", "max", "min", "rows"))})  # shown with -s
    for r in results:
        assert not r["export_missing"] and not r["export_extra"], (r["export_missing"], r["export_extra"])
        assert not r["export_unequal"], f"exported tensors not bitwise equal: {r['export_unequal']}"
    return last[0]


@pytest.fixture(scope="module")
def tp1(tmp_path_factory) -> list[dict]:
    """The world-size-1 run (with controls and gradients), shared by the TP1 test and the CP2-vs-CP1 check."""
    return _run(tmp_path_factory.mktemp("tp1"), _Case(controls=True, grads=True))


def test_tp1_logits_match_hf_and_export_is_bitwise(tp1):
    r = _check_parity_and_export(tp1)
    assert r["vocab_rows"] == 128 and r["padded_max"] is not None  # vocab 32 padded to 128 even at TP1
    assert r["no_bias_diff"] > 1e-2, f"zeroing the expert bias moved logits only {r['no_bias_diff']:.3g}"
    missing, unused = r["mismatch_errors"]
    assert missing and "HF tensors missing ['model.norm.weight']" in missing
    assert unused and "HF tensors unused ['model.layers.4.eh_proj.weight']" in unused


def test_tp2_sequence_parallel_padded_vocab_and_mtp_match_hf(tmp_path):
    """TP2 pads the vocab to 256 (rank 1's LM-head shard is all padding); MTP's eh_proj is column-parallel."""
    results = _run(tmp_path, _Case(tp=2, mtp=True))
    assert _check_parity_and_export(results, mtp=True)["vocab_rows"] == 256


def test_ep2_logits_match_hf_and_export_is_bitwise(tmp_path):
    _check_parity_and_export(_run(tmp_path, _Case(ep=2)))


def test_pp2_uneven_with_mtp_matches_hf_and_exports_every_stage(tmp_path):
    """PP2 with --decoder-first-pipeline-num-layers 1: stage 0 holds the dense layer only, stage 1 the three MoE
    layers, final norm, LM head and the MTP layer (with its own embedding copy)."""
    from glm_rl.models.glm45.presets import glm45_tiny
    from glm_rl.parallel import ParallelLayout, layer_split

    results = _run(tmp_path, _Case(pp=2, first_stage_layers=1, mtp=True))
    _check_parity_and_export(results, mtp=True)
    expected = layer_split(glm45_tiny(), ParallelLayout(pp=2, decoder_first_pipeline_num_layers=1))
    assert [r["stage_layers"] for r in results] == expected == [1, 3]


def test_cp2_logits_and_gradients_match(tmp_path, tp1):
    """CP2 (load-balanced chunks, K/V all-gathered) gives HF's logits, and the gradients of a scalar loss equal
    the CP1 run's (K/V gradients reduce-scattered back to their owners)."""
    cp2 = _run(tmp_path, _Case(cp=2, grads=True))
    _check_parity_and_export(cp2)
    (cp1,) = tp1
    g1, g2 = cp1["grads"], cp2[0]["grads"]
    assert g1.keys() == g2.keys() and len(g1) > 20
    scale = max(g.abs().max().item() for g in g1.values())
    worst = max(((g1[k] - g2[k]).abs().max().item(), k) for k in g1)
    print({"grad_scale": scale, "worst_grad_diff": worst})
    assert scale > 1e-3 and worst[0] <= 1e-5 * max(scale, 1.0), f"CP2 vs CP1 gradient differs by {worst}"
    attn = [k for k in g1 if "linear_qkv.weight" in k]
    assert attn and all(g2[k].abs().max() > 0 for k in attn)


@pytest.mark.slow  # 4 processes: 34-40 s on the 2-core CI box, over the ~30 s budget of a unit test
def test_tp2_ep2_logits_match_hf_and_export_is_bitwise(tmp_path):
    _check_parity_and_export(_run(tmp_path, _Case(tp=2, ep=2)))


@pytest.mark.slow  # 4 processes, as above
def test_cp2_tp2_sequence_parallel_matches_hf(tmp_path):
    """CP2 × TP2 with SP: each CP chunk pair is further split over TP inside the layers."""
    _check_parity_and_export(_run(tmp_path, _Case(tp=2, cp=2)))


@pytest.mark.slow  # 4 processes, as above
def test_expert_tp1_under_tp2_ep2_matches_hf(tmp_path):
    """--expert-tensor-parallel-size 1 with TP2 × EP2 (DP2): attention split over TP, experts whole per rank."""
    results = _run(tmp_path, _Case(tp=2, ep=2, etp=1))
    _check_parity_and_export(results)
    assert {r["etp"] for r in results} == {1}


def test_layout_errors_name_the_numbers():
    from glm_rl.models.glm45.presets import glm45_tiny
    from glm_rl.trainer.backends.megatron.model import MegatronLayoutError, check_spec

    with pytest.raises(MegatronLayoutError, match="num_attention_heads=4 .* tensor parallel size 3"):
        check_spec(glm45_tiny(), tp=3)


def test_cp_split_keeps_megatrons_load_balanced_chunks():
    from glm_rl.trainer.backends.megatron.cp_attention import global_positions, split_for_cp

    x = torch.arange(8).expand(2, -1)  # (B, T): CP2 → 4 chunks of 2; rank 0 holds chunks 0, 3, rank 1 chunks 1, 2
    assert split_for_cp(x, 0, 2)[0].tolist() == [0, 1, 6, 7] == global_positions(4, 0, 2).tolist()
    assert split_for_cp(x, 1, 2)[0].tolist() == [2, 3, 4, 5] == global_positions(4, 1, 2).tolist()
    with pytest.raises(ValueError, match="sequence length 6 is not a multiple of 2 × context parallel size 2"):
        split_for_cp(x[:, :6], 0, 2)


def test_shims_need_an_explicit_call():
    from glm_rl.trainer.backends.megatron import cpu_shims

    assert not cpu_shims._APPLIED
    assert torch.cuda.current_device.__module__ == "torch.cuda"
