"""EmbeddedEngine: a torch rollout engine over the HF GLM-4.5 model, behind SGLang's native HTTP API.

Why: the RL loop talks to rollout engines only through SGLang's HTTP API (directly or via the real
sglang-router). SGLang cannot run on CPU machines, so this engine implements the subset we use on the same
HF `Glm4MoeForCausalLM` code path the torch trainer backend runs — fp32 CPU logprobs then agree exactly.

This module is the scheduler: a request queue and a thread that runs BATCHES (every request waiting when a
batch starts, up to `max_batch_size`) through `decode.run_batch`, answers, pause / continue, and the HTTP server
thread (`http_server.py`). Weight updates and checksums belong to `EngineWeights` (`weights.py`), which the
engine holds as `engine.weights`. Usable in-process (`start()` → url, `shutdown()`), as a Ray actor
(`actor.engine_actor_class()`), or as a process (`python -m glm_rl.engine --hf-checkpoint DIR --port P`).

Routed experts (R3): `meta_info["routed_experts"]` holds one row per position that went through the model —
prompt_len + completion_len - 1 positions (the last generated token is never fed back) — and each row, per MoE
layer (layer index >= first_k_dense_replace, in order), the top-k expert ids the router chose there, sorted
ascending: shape [L - 1][n_moe_layers][top_k], as one base64 buffer (`routed_experts.py`: `decode` reads it).
Captured by forward hooks on `model.model.layers[i].mlp.gate` (`batch.RouterCapture`), mapping batch rows and
excluding left-pad positions.

Timing, in every answer's `meta_info`: SGLang's `e2e_latency` (seconds from the request reaching the engine to
its answer), and this engine's `decode_batch_s` / `decode_batch_rows` (the batch that decoded it): the rollout
manager turns them into the time a step's rollout spends outside the engines and the engines' in-loop tok/s.

Pause semantics: `pause(mode="abort")` (SGLang's default mode) stops taking batches, aborts the running batch at
its next decode step (its requests return what they generated so far with finish_reason "abort") and answers
every queued request with an empty "abort"; `pause(mode="in_place")` stops taking batches and lets the running
batch finish. Both return once no batch is running; requests that arrive while paused wait for `resume()`.
`abort_request(rid | abort_all)` (SGLang's /abort_request) aborts requests without pausing: matching queued ones
answer an empty "abort", matching running rows end at their next decode step (`batch.survivors`).

Decoding: over a preallocated KV cache, CUDA-graphed on GPU (`decode/static.py`; `static_kv_cache=False` selects
HF's DynamicCache path, `disable_cuda_graph` keeps the static cache without graphs).

MTP speculative decoding (`EngineConfig.enable_mtp`, `decode/speculative.py`): answers keep their meaning
(target-model logprobs, routed experts of kept positions) and add SGLang's `spec_verify_ct` /
`spec_accept_length` counters; /server_info reports the running `avg_spec_accept_length`.

Memory occupation (`release_memory_occupation` / `resume_memory_occupation`, tags "weights" / "kv_cache"): on a
GPU the KV cache, the captured graphs and the weights are freed (`set_memory_released`); on CPU nothing is freed
and the state is only recorded (`server_info()["memory_released"]`), so colocated drivers run unchanged.

FP8: an FP8 checkpoint is dequantized on load (`models/glm45/checkpoint.py`); FP8 weight updates are dequantized
by `EngineWeights.load`.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Any

import torch

from glm_rl.engine import routed_experts
from glm_rl.engine.batch import GenerationRequest, Row, SamplingParams, SpecRow, accumulate_stats
from glm_rl.engine.config import CPU_BATCH_ROWS, DTYPES, EngineConfig, batch_rows_for_memory
from glm_rl.engine.decode import run_batch
from glm_rl.engine.decode.static import StaticDecoder
from glm_rl.engine.http_server import HttpServer
from glm_rl.engine.weights import EngineWeights
from glm_rl.memory import reserved_gib
from glm_rl.models.glm45.checkpoint import load_hf_model, load_mtp
from glm_rl.weights.wire import FORMAT as WIRE_FORMAT

MEMORY_TAGS = ("weights", "kv_cache")  # SGLang's memory-saver tags


class EmbeddedEngine:
    """The engine: model + request queue + batch scheduler thread + HTTP server thread; `weights` owns updates."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._cond = threading.Condition()
        self._model_lock = threading.Lock()
        self._waiting: deque[tuple[GenerationRequest, Future]] = deque()
        self._running, self._running_tokens = 0, 0
        self._paused = self._abort_running = self._stopping = False
        self._abort_rids: frozenset[str] = frozenset()  # /abort_request of running rows (this batch)
        self._memory_released: set[str] = set()  # MEMORY_TAGS released now
        self._auto_seed = 0
        self.weights: EngineWeights | None = None  # made by start(), with the model
        self.stats = {"requests_total": 0, "batches_total": 0, "max_batch_rows": 0, "tokens_generated": 0}
        self._server = None
        self._thread: threading.Thread | None = None
        self.model = None

    @property
    def weight_version(self) -> int:
        """The version of the weights the next batch decodes with (0 before any update)."""
        return self.weights.version if self.weights is not None else 0

    # -- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> str:
        """Load the model, start the scheduler and the HTTP server; returns the base url."""
        self.model, self.tokenizer = load_hf_model(self.config.hf_checkpoint, DTYPES[self.config.dtype])
        self.model.to(self.config.device)
        cfg = self.model.config
        if self.config.max_batch_size is None:
            rows = CPU_BATCH_ROWS
            if self.config.device != "cpu":
                free, _ = torch.cuda.mem_get_info(torch.device(self.config.device))
                rows = batch_rows_for_memory(
                    free, cfg, self.model.dtype, self.config.kv_memory_fraction, mtp=self.config.enable_mtp
                )
            self.config = dataclasses.replace(self.config, max_batch_size=rows)
        self.vocab_size = cfg.vocab_size
        self.max_total_len = self.config.max_total_len or cfg.max_position_embeddings
        self.gates = [
            layer.mlp.gate for i, layer in enumerate(self.model.model.layers) if i >= cfg.first_k_dense_replace
        ]
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        pad = self.model.generation_config.pad_token_id
        self.pad_id = pad if pad is not None else (self.tokenizer.pad_token_id or 0)
        self.weights = EngineWeights(
            self.model, lock=self._model_lock, host=self.config.host, group_timeout_s=self.config.weight_group_timeout_s
        )
        self.mtp = self.decoder = None
        if self.config.enable_mtp:
            self.mtp = load_mtp(self.model)
            self.weights.add_mtp(self.mtp, cfg.num_hidden_layers)
        if self.config.static_kv_cache:  # with MTP it also holds the MTP layer's cache
            self.decoder = StaticDecoder(
                self.model,
                max_batch=self.config.max_batch_size,
                cuda_graph=not self.config.disable_cuda_graph,
                torch_compile=self.config.enable_torch_compile,
                mtp=self.mtp,
            )
        if self.config.device != "cpu":
            self._warm_up()
        self._thread = threading.Thread(target=self._scheduler_loop, name="engine-scheduler", daemon=True)
        self._thread.start()
        self._server = HttpServer(self, self.config)
        host, port = self._server.start()
        self.url = f"http://{host}:{port}"
        return self.url

    def _warm_up(self) -> None:
        """A small batch before serving: CUDA / cuBLAS initialisation, and the first capture of the sampled decode
        step (its host-sync check and double warm-up), happen at startup instead of in the first rollout."""
        sampling = SamplingParams(temperature=1.0, max_new_tokens=4, ignore_eos=True)
        ids = tuple(range(1, 9))
        rows, t0 = min(8, self.config.max_batch_size), time.time()
        self._run_batch([GenerationRequest(f"warm-up-{i}", ids, sampling, seed=i) for i in range(rows)])
        print(f"engine: warmed up (batch of {rows}, decode graphs captured) in {time.time() - t0:.1f} s", flush=True)

    def get_url(self) -> str:
        return self.url

    def shutdown(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
        with self._cond:
            self._stopping = self._abort_running = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.weights is not None:
            self.weights.close()

    # -- generation --------------------------------------------------------------------------------------
    def next_auto_key(self) -> str:
        with self._cond:
            self._auto_seed += 1
            return f"auto-{self._auto_seed}"

    def submit(self, requests: list[GenerationRequest]) -> list[Future]:
        futures = [Future() for _ in requests]
        for fut in futures:
            fut.arrived = time.monotonic()  # the answer's e2e_latency counts from here
        with self._cond:
            if self._stopping:
                raise RuntimeError("engine is shutting down")
            self._waiting.extend(zip(requests, futures))
            self._cond.notify_all()
        return futures

    def _take_batch(self) -> list[tuple[GenerationRequest, Future]] | None:
        with self._cond:
            while True:
                self._cond.wait_for(lambda: self._stopping or (self._waiting and not self._paused))
                if not self._stopping:
                    self._gather_burst()
                if self._stopping:
                    return None
                if self._waiting and not self._paused:  # a pause during the gather: wait for resume()
                    break
            n = min(len(self._waiting), self.config.max_batch_size)
            batch = [self._waiting.popleft() for _ in range(n)]
            self._running, self._abort_running, self._abort_rids = n, False, frozenset()
            self._running_tokens = sum(len(r.input_ids) + r.sampling.max_new_tokens for r, _ in batch)
            return batch

    def _gather_burst(self) -> None:
        """Hold the batch while requests keep arriving (each within `batch_gap_ms` of the last, at most
        `batch_window_ms` in all) or until it is full. Why: a rollout sends hundreds of requests at once, which
        reach the engine over some milliseconds; a batch started on the first would decode it alone and the
        rest in a second batch (the H100 run's batches of 1 and 511). Called holding `_cond`."""
        gap, deadline = self.config.batch_gap_ms / 1e3, time.monotonic() + self.config.batch_window_ms / 1e3
        seen = len(self._waiting)
        while not (self._stopping or self._paused) and seen < self.config.max_batch_size:
            wait = min(gap, deadline - time.monotonic())
            more = lambda: self._stopping or self._paused or len(self._waiting) > seen  # noqa: E731
            if wait <= 0 or not self._cond.wait_for(more, wait):
                return
            seen = len(self._waiting)

    def _scheduler_loop(self) -> None:
        while (batch := self._take_batch()) is not None:
            try:
                with self._model_lock:
                    self.weights.apply_staged()  # an update that came during the last batch
                    version = self.weight_version
                    t0 = time.monotonic()
                    rows = self._run_batch([r for r, _ in batch])
                    timing = {"decode_batch_s": time.monotonic() - t0, "decode_batch_rows": len(rows)}
                for (_, fut), row in zip(batch, rows):
                    answer = self._response(row, version)
                    answer["meta_info"] |= timing | {"e2e_latency": time.monotonic() - fut.arrived}
                    fut.set_result(answer)
                with self._cond:
                    self.stats["tokens_generated"] += sum(len(row.output_ids) for row in rows)
                    accumulate_stats(self.stats, rows)
            except Exception as e:  # noqa: BLE001 - answered as 500 to each request; the engine stays up
                logging.getLogger(__name__).exception("batch of %d requests failed", len(batch))
                for _, fut in batch:
                    fut.set_exception(e)
            finally:
                with self._cond:
                    # health probes (the router's /health_generate) are not traffic
                    self.stats["requests_total"] += sum(not req.rid.startswith("HEALTH_CHECK_") for req, _ in batch)
                    self.stats["batches_total"] += 1
                    self.stats["max_batch_rows"] = max(self.stats["max_batch_rows"], len(batch))
                    self._running = self._running_tokens = 0
                    self._cond.notify_all()
                rows = None  # its device tensors (routed experts) go now, not when the next batch starts
        with self._cond:
            leftover, self._waiting = list(self._waiting), deque()
        for _, fut in leftover:
            fut.set_exception(RuntimeError("engine shut down"))

    def _run_batch(self, requests: list[GenerationRequest]) -> list[Row]:
        if "weights" in self._memory_released and self.config.device != "cpu":
            raise RuntimeError("the engine's weights are released: resume_memory_occupation and update them first")
        return run_batch(
            self.model,
            requests,
            eos_ids=self.eos_ids,
            pad_id=self.pad_id,
            gates=self.gates,
            should_abort=lambda: self._abort_running or self._abort_rids,
            decoder=self.decoder,
            mtp=self.mtp,
            num_steps=self.config.speculative_num_steps,
        )

    def _response(self, row: Row, version: int) -> dict[str, Any]:
        req = row.req
        meta: dict[str, Any] = {
            "id": req.rid,
            "finish_reason": row.finish,
            "prompt_tokens": len(req.input_ids),
            "completion_tokens": len(row.output_ids),
            "cached_tokens": 0,
            "weight_version": version,
        }
        if req.return_logprob:
            meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(row.logprobs, row.output_ids)]
        if req.return_routed_experts:
            ids = torch.cat(row.routed).sort(dim=-1).values if row.routed else torch.zeros(0, 0, 0, dtype=torch.int16)
            if self.config.sglang_routed_experts_form:
                meta.update(routed_experts.encode_sglang(ids, routed_experts.RoutingLayout.of(self.model.config)))
            else:
                meta.update(routed_experts.encode(ids))
        if isinstance(row, SpecRow):
            meta.update(row.spec_meta())
        text = self.tokenizer.decode(row.output_ids, skip_special_tokens=req.sampling.skip_special_tokens)
        return {"text": text, "output_ids": list(row.output_ids), "meta_info": meta}

    def _aborted_response(self, req: GenerationRequest) -> dict[str, Any]:
        row = Row(req, frozenset(), torch.Generator(), finish={"type": "abort", "message": "aborted while queued"})
        return self._response(row, self.weight_version)

    # -- pause / load ------------------------------------------------------------------------------------
    def pause(self, mode: str = "abort") -> dict[str, Any]:
        """Stop taking batches; see the module docstring for the modes. Returns once no batch runs."""
        if mode not in ("abort", "in_place"):
            raise ValueError(f"mode must be 'abort' or 'in_place', got {mode!r}")
        aborted: list[tuple[GenerationRequest, Future]] = []
        with self._cond:
            self._paused = True
            if mode == "abort":
                self._abort_running = self._running > 0
                aborted, self._waiting = list(self._waiting), deque()
            self._cond.wait_for(lambda: self._running == 0)
        for req, fut in aborted:
            fut.set_result(self._aborted_response(req))
        return {"success": True, "message": f"paused ({mode})", "num_aborted_queued": len(aborted)}

    def abort_request(self, rid: str = "", abort_all: bool = False) -> dict[str, Any]:
        """SGLang's /abort_request: matching queued requests (`rid`, or every one with `abort_all`) are answered
        with an empty "abort"; matching running rows end at their next decode step with what they generated
        (finish_reason "abort"). Unknown rids are ignored, as in SGLang."""
        with self._cond:
            hit = [(r, f) for r, f in self._waiting if abort_all or r.rid == rid]
            self._waiting = deque((r, f) for r, f in self._waiting if not (abort_all or r.rid == rid))
            if abort_all:
                self._abort_running = self._running > 0
            elif rid:
                self._abort_rids = self._abort_rids | {rid}
        for req, fut in hit:
            fut.set_result(self._aborted_response(req))
        return {"success": True, "num_aborted_queued": len(hit)}

    def resume(self) -> dict[str, Any]:
        with self._cond:
            self._paused = False
            self._cond.notify_all()
        return {"success": True, "message": "generation continues"}

    def load(self) -> list[dict[str, int]]:
        with self._cond:
            waiting = len(self._waiting)
            tokens = self._running_tokens + sum(len(r.input_ids) for r, _ in self._waiting)
            return [
                {"dp_rank": 0, "num_reqs": self._running + waiting, "num_waiting_reqs": waiting, "num_tokens": tokens}
            ]

    def set_memory_released(self, released: bool, tags: list[str] | None = None) -> dict[str, Any]:
        """SGLang's release / resume_memory_occupation, by tag (`MEMORY_TAGS`; none: both). On a GPU, releasing
        "kv_cache" frees the KV cache and the captured graphs (captured again by the next batches); releasing
        "weights" frees them without a copy, so resumed weights are undefined until the next weight update (SGLang's
        memory saver without --enable-weights-cpu-backup). On CPU the state is only recorded."""
        unknown = sorted(set(tags or ()) - set(MEMORY_TAGS))
        if unknown:
            raise ValueError(f"tags: unknown {unknown}; valid: {list(MEMORY_TAGS)}")
        chosen = set(tags or MEMORY_TAGS)
        with self._model_lock:
            if self.config.device != "cpu":
                if released:
                    if self.decoder is not None:
                        self.decoder.release()  # the graphs captured the weights' addresses too
                    if "weights" in chosen:
                        self.weights.release_memory()
                    if hasattr(torch._C, "_cuda_clearCublasWorkspaces"):  # cuBLAS's cached workspaces too
                        torch._C._cuda_clearCublasWorkspaces()
                    torch.cuda.empty_cache()
                elif "weights" in chosen:
                    self.weights.resume_memory()
            self._memory_released = self._memory_released | chosen if released else self._memory_released - chosen
        state = "released" if released else "resumed"
        where = "" if self.config.device != "cpu" else " (recorded only: CPU engine)"
        return {"success": True, "message": f"memory occupation {state}: {sorted(chosen)}{where}"}

    def server_info(self) -> dict[str, Any]:
        with self._cond:
            stats, paused = dict(self.stats), self._paused
        return {
            "model_path": str(self.config.hf_checkpoint),
            "tokenizer_path": str(self.config.hf_checkpoint),
            "engine": "glm_rl.embedded",
            "weight_version": self.weight_version,
            "dtype": self.config.dtype,
            "device": self.config.device,
            "tp_size": 1,
            "dp_size": 1,
            "max_batch_size": self.config.max_batch_size,
            "max_running_requests": self.config.max_batch_size,
            "max_total_len": self.max_total_len,
            "context_length": self.max_total_len,
            "vocab_size": self.vocab_size,
            "num_moe_layers": len(self.gates),
            "top_k": self.model.config.num_experts_per_tok,
            "paused": paused,
            "memory_released": sorted(self._memory_released),
            "memory_reserved_gib": reserved_gib() if self.config.device != "cpu" else 0.0,
            "weight_groups": self.weights.group_names(),
            "stats": stats,
            "load": self.load(),
            # update_weights_from_tensor: our JSON format; by reference and SGLang's pickle only with the key
            "weight_wire": {
                "format": WIRE_FORMAT,
                "by_reference": bool(self.config.api_key),
                "pickle": bool(self.config.api_key),
            },
            "speculative_algorithm": "MTP" if self.mtp is not None else None,
            "speculative_num_steps": self.config.speculative_num_steps if self.mtp is not None else 0,
            "avg_spec_accept_length": stats.get("avg_spec_accept_length"),
        }
