"""EmbeddedEngine: a torch rollout engine over the HF GLM-4.5 model, behind SGLang's native HTTP API.

Why: the RL loop talks to rollout engines only through SGLang's HTTP API (directly or via the real
sglang-router). SGLang cannot run on CPU machines, so this engine implements the subset we use on the same
HF `Glm4MoeForCausalLM` code path the torch trainer backend runs — fp32 CPU logprobs then agree exactly.

Pieces (batched generation math in `generation.py`, HTTP routes in `http_server.py`):
- `EngineConfig`: the engine's typed, frozen configuration.
- `EmbeddedEngine`: a request queue and a scheduler thread that runs BATCHES (every request waiting when a
  batch starts, up to `max_batch_size`), pause/continue, weight updates, checksums, and the HTTP server
  thread. Usable in-process (`start()` → url, `shutdown()`), as a Ray actor (`engine_actor_class()`), or as a
  process (`python -m glm_rl.engine.engine --hf-checkpoint DIR --port P`).

Routed experts (R3): `meta_info["routed_experts"]` is a list with one entry per position that went through the
model — prompt_len + completion_len - 1 positions (the last generated token is never fed back) — and each entry
is a list over MoE layers (layer index >= first_k_dense_replace, in order) of the top-k expert ids the router
chose there, sorted ascending: shape [L - 1][n_moe_layers][top_k], ints. Captured by forward hooks on
`model.model.layers[i].mlp.gate`, mapping batch rows and excluding left-pad positions.

Pause semantics: `pause(mode="abort")` (SGLang's default mode) stops taking batches, aborts the running batch at
its next decode step (its requests return what they generated so far with finish_reason "abort") and answers
every queued request with an empty "abort"; `pause(mode="in_place")` stops taking batches and lets the running
batch finish. Both return once no batch is running; requests that arrive while paused wait for `resume()`.

Decoding: over a preallocated KV cache, CUDA-graphed on GPU (`static_decode.py`; `static_kv_cache=False` selects
HF's DynamicCache path, `disable_cuda_graph` keeps the static cache without graphs).

MTP speculative decoding (`EngineConfig.enable_mtp`, `speculative.py`): batches run through
`run_batch_speculative`; answers keep their meaning (target-model logprobs, routed experts of kept positions)
and add SGLang's `spec_verify_ct` / `spec_accept_length` counters; /server_info reports the running
`avg_spec_accept_length`.

Memory occupation (`release_memory_occupation` / `resume_memory_occupation`): on CPU nothing is freed; the state
is only recorded (`server_info()["memory_released"]`) so colocated drivers can run unchanged.

FP8: an FP8 checkpoint is dequantized on load (`models/glm45/checkpoint.py`); a weight update may carry block-FP8
weights (float8_e4m3fn, each followed by its `<name>_scale_inv`, as `--rollout-fp8` sends them), which
`load_weights` dequantizes into the engine's dtype (`models/fp8.py`). Over gloo, float8 travels as raw bytes.
"""

from __future__ import annotations

import argparse
import base64
import logging
import pickle
import signal
import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch

from glm_rl.weights.flat import FlatEntry, entries_from_json, flatten_module_, views
from glm_rl.models.fp8 import Fp8Error, dequantize_named, gloo_view
from glm_rl.rollout.engine_client import WeightGroup, create_weight_group, parse_dtype, tensor_checksum
from glm_rl.engine.generation import GenerationRequest, Row, run_batch
from glm_rl.engine.decode.speculative import SpecRow, accumulate_stats, run_batch_speculative
from glm_rl.models.glm45.hf_names import mtp_named_tensors

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class WeightError(ValueError):
    """A weight update or checksum request the engine refuses (unknown name, wrong shape, bad group)."""


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    hf_checkpoint: str
    host: str = "127.0.0.1"
    port: int = 0                      # 0: pick a free port
    api_key: str | None = None         # when set, requests (but /health*) need `Authorization: Bearer <key>`
    dtype: str = "float32"
    device: str = "cpu"                # "cuda" / "cuda:N": the model and its KV cache live there
    max_batch_size: int = 64           # rows per scheduler batch, and the largest batch /generate accepts
    max_total_len: int | None = None   # prompt + max_new_tokens limit; None: the model's max_position_embeddings
    seed: int = 0
    max_request_bytes: int = 64 << 20  # larger bodies get 413
    record_routed_experts: bool = True  # SGLang's --enable-return-routed-experts: off → such requests get 400
    # R3 behind sglang-router: the router drops `return_routed_experts` from the request body but passes the
    # answer through, so an engine started for R3 returns the routing unless a request says false.
    return_routed_experts_by_default: bool = False
    weight_group_timeout_s: float = 600.0
    # MTP speculative decoding (speculative.py): draft with the checkpoint's MTP layer, verify in one forward;
    # the MTP layer's weights join the engine's weight names as `model.layers.{num_hidden_layers}.*`.
    enable_mtp: bool = False
    speculative_num_steps: int = 1     # MTP drafts per verify forward (SGLang's --speculative-num-steps)
    # decode (and MTP speculation) over a preallocated KV cache (static_decode.py); off: HF's DynamicCache path
    static_kv_cache: bool = True
    disable_cuda_graph: bool = False   # SGLang's flag: with the static cache on CUDA, decode steps are graphs
    enable_torch_compile: bool = False  # SGLang's flag: compile the graphed decode step (slow first batches)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"EngineConfig.dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if not (self.device == "cpu" or self.device == "cuda" or self.device.startswith("cuda:")):
            raise ValueError(f"EngineConfig.device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.max_batch_size < 1:
            raise ValueError(f"EngineConfig.max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.speculative_num_steps < 1:
            raise ValueError(f"EngineConfig.speculative_num_steps must be >= 1, got {self.speculative_num_steps}")


def deserialize_flattened(payload: str) -> tuple[torch.Tensor, list[FlatEntry]]:
    """load_format "flattened_bucket": one shared buffer (uint8) and its layout, no copy."""
    try:
        obj = pickle.loads(base64.b64decode(payload))
        flat, entries = obj["flattened_tensor"], entries_from_json(obj["metadata"])
        if flat.dtype != torch.uint8 or flat.dim() != 1:
            raise ValueError(f"flattened_tensor must be 1-D uint8, got {flat.dtype} {tuple(flat.shape)}")
        return flat, entries
    except Exception as e:  # noqa: BLE001 - any decoding failure is the caller's bad input
        raise WeightError(f"serialized_named_tensors: bad flattened bucket ({type(e).__name__}: {e})") from e


def deserialize_named_tensors(payload: str) -> list[tuple[str, torch.Tensor]]:
    """Inverse of `client.serialize_named_tensors` (unpickles: only for trusted callers, like SGLang)."""
    try:
        items = pickle.loads(base64.b64decode(payload))
    except Exception as e:  # noqa: BLE001 - any decoding failure is the caller's bad input
        raise WeightError(f"serialized_named_tensors: cannot decode ({type(e).__name__}: {e})") from e
    if not isinstance(items, list) or not all(
            isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) and isinstance(x[1], torch.Tensor)
            for x in items):
        raise WeightError("serialized_named_tensors: expected a pickled list of (name, tensor) pairs")
    return items


class EmbeddedEngine:
    """The engine: model + request queue + batch scheduler thread + HTTP server thread."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._cond = threading.Condition()
        self._model_lock = threading.Lock()
        self._waiting: deque[tuple[GenerationRequest, Future]] = deque()
        self._running, self._running_tokens = 0, 0
        self._paused = self._abort_running = self._stopping = False
        self._memory_released = False
        self._auto_seed = 0
        self._groups: dict[str, WeightGroup] = {}
        self._p2p = None  # P2PReceiver, made on the first /p2p/prepare
        self.weight_version = 0
        self.stats = {"requests_total": 0, "batches_total": 0, "max_batch_rows": 0, "tokens_generated": 0}
        self._server = None
        self._thread: threading.Thread | None = None
        self.model = None

    # -- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> str:
        """Load the model, start the scheduler and the HTTP server; returns the base url."""
        from glm_rl.models.glm45.checkpoint import load_hf_model
        from glm_rl.engine.http_server import HttpServer

        self.model, self.tokenizer = load_hf_model(self.config.hf_checkpoint, DTYPES[self.config.dtype])
        self.model.to(self.config.device)
        cfg = self.model.config
        self.vocab_size = cfg.vocab_size
        self.max_total_len = self.config.max_total_len or cfg.max_position_embeddings
        self.gates = [layer.mlp.gate for i, layer in enumerate(self.model.model.layers)
                      if i >= cfg.first_k_dense_replace]
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        pad = self.model.generation_config.pad_token_id
        self.pad_id = pad if pad is not None else (self.tokenizer.pad_token_id or 0)
        # the main model's weights live in one buffer, so a colocated trainer's flattened update is one copy
        self._flat = flatten_module_(self.model)
        self._state = self.model.state_dict()  # detached views sharing the parameters' storage
        self.mtp = self.decoder = None
        if self.config.enable_mtp:
            from glm_rl.models.glm45.checkpoint import load_mtp

            self.mtp = load_mtp(self.model)
            self._state.update(mtp_named_tensors(self.mtp, cfg.num_hidden_layers))
        if self.config.static_kv_cache:  # with MTP it also holds the MTP layer's cache
            from glm_rl.engine.decode.static import StaticDecoder

            self.decoder = StaticDecoder(self.model, max_batch=self.config.max_batch_size,
                                         cuda_graph=not self.config.disable_cuda_graph,
                                         torch_compile=self.config.enable_torch_compile, mtp=self.mtp)
        self._thread = threading.Thread(target=self._scheduler_loop, name="engine-scheduler", daemon=True)
        self._thread.start()
        self._server = HttpServer(self, self.config)
        host, port = self._server.start()
        self.url = f"http://{host}:{port}"
        return self.url

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
        self._groups.clear()
        if self._p2p is not None:
            self._p2p.close()

    # -- generation --------------------------------------------------------------------------------------
    def next_auto_key(self) -> str:
        with self._cond:
            self._auto_seed += 1
            return f"auto-{self._auto_seed}"

    def submit(self, requests: list[GenerationRequest]) -> list[Future]:
        futures = [Future() for _ in requests]
        with self._cond:
            if self._stopping:
                raise RuntimeError("engine is shutting down")
            self._waiting.extend(zip(requests, futures))
            self._cond.notify_all()
        return futures

    def _take_batch(self) -> list[tuple[GenerationRequest, Future]] | None:
        with self._cond:
            self._cond.wait_for(lambda: self._stopping or (self._waiting and not self._paused))
            if self._stopping:
                return None
            n = min(len(self._waiting), self.config.max_batch_size)
            batch = [self._waiting.popleft() for _ in range(n)]
            self._running, self._abort_running = n, False
            self._running_tokens = sum(len(r.input_ids) + r.sampling.max_new_tokens for r, _ in batch)
            return batch

    def _scheduler_loop(self) -> None:
        while (batch := self._take_batch()) is not None:
            try:
                with self._model_lock:
                    version = self.weight_version
                    rows = self._run_batch([r for r, _ in batch])
                for (_, fut), row in zip(batch, rows):
                    fut.set_result(self._response(row, version))
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
        with self._cond:
            leftover, self._waiting = list(self._waiting), deque()
        for _, fut in leftover:
            fut.set_exception(RuntimeError("engine shut down"))

    def _run_batch(self, requests: list[GenerationRequest]) -> list[Row]:
        common = dict(eos_ids=self.eos_ids, pad_id=self.pad_id, gates=self.gates,
                      should_abort=lambda: self._abort_running)
        if self.mtp is None:
            return run_batch(self.model, requests, decoder=self.decoder, **common)
        return run_batch_speculative(self.model, self.mtp, requests, num_steps=self.config.speculative_num_steps,
                                     decoder=self.decoder, **common)

    def _response(self, row: Row, version: int) -> dict[str, Any]:
        req = row.req
        meta: dict[str, Any] = {"id": req.rid, "finish_reason": row.finish, "prompt_tokens": len(req.input_ids),
                                "completion_tokens": len(row.output_ids), "cached_tokens": 0,
                                "weight_version": version}
        if req.return_logprob:
            meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(row.logprobs, row.output_ids)]
        if req.return_routed_experts:
            meta["routed_experts"] = torch.cat(row.routed).sort(dim=-1).values.tolist() if row.routed else []
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

    def resume(self) -> dict[str, Any]:
        with self._cond:
            self._paused = False
            self._cond.notify_all()
        return {"success": True, "message": "generation continues"}

    def load(self) -> list[dict[str, int]]:
        with self._cond:
            waiting = len(self._waiting)
            tokens = self._running_tokens + sum(len(r.input_ids) for r, _ in self._waiting)
            return [{"dp_rank": 0, "num_reqs": self._running + waiting, "num_waiting_reqs": waiting,
                     "num_tokens": tokens}]

    def set_memory_released(self, released: bool) -> dict[str, Any]:
        self._memory_released = released
        state = "released" if released else "resumed"
        return {"success": True, "message": f"memory occupation {state} (recorded only: CPU engine)"}

    def server_info(self) -> dict[str, Any]:
        with self._cond:
            stats, paused = dict(self.stats), self._paused
        return {"model_path": str(self.config.hf_checkpoint), "tokenizer_path": str(self.config.hf_checkpoint),
                "engine": "glm_rl.embedded", "weight_version": self.weight_version, "dtype": self.config.dtype,
                "device": self.config.device,
                "tp_size": 1, "dp_size": 1, "max_batch_size": self.config.max_batch_size,
                "max_running_requests": self.config.max_batch_size, "max_total_len": self.max_total_len,
                "context_length": self.max_total_len, "vocab_size": self.vocab_size,
                "num_moe_layers": len(self.gates), "top_k": self.model.config.num_experts_per_tok,
                "paused": paused, "memory_released": self._memory_released,
                "weight_groups": sorted(self._groups), "stats": stats, "load": self.load(),
                "speculative_algorithm": "MTP" if self.mtp is not None else None,
                "speculative_num_steps": self.config.speculative_num_steps if self.mtp is not None else 0,
                "avg_spec_accept_length": stats.get("avg_spec_accept_length")}

    # -- weights -----------------------------------------------------------------------------------------
    def load_weights(self, named: list[tuple[str, torch.Tensor]], weight_version: int | None) -> dict[str, Any]:
        """Copy tensors into the model (all validated first); the version becomes `weight_version` when given,
        else the current one + 1 (a bucketed update that gives the version on its last bucket ends right).
        float8 weights with their scales are dequantized into the engine's dtype first."""
        try:
            named = dequantize_named(named, lambda n: self._state[n].dtype if n in self._state else torch.float32)
        except Fp8Error as e:
            raise WeightError(str(e)) from None
        for name, tensor in named:
            if name not in self._state:
                raise WeightError(f"unknown weight name {name!r}")
            if tuple(tensor.shape) != tuple(self._state[name].shape):
                raise WeightError(f"weight {name!r}: shape {tuple(tensor.shape)} does not match the engine's "
                                  f"{tuple(self._state[name].shape)}")
        with self._model_lock:
            for name, tensor in named:
                self._state[name].copy_(tensor)
            self.weight_version = int(weight_version) if weight_version is not None else self.weight_version + 1
        return {"success": True, "message": f"loaded {len(named)} tensors", "weight_version": self.weight_version}

    def load_flattened(self, flat: torch.Tensor, entries: list[FlatEntry], weight_version: int | None):
        """A whole model in one buffer: when its layout is the engine's own, one copy; else view by view."""
        own, own_entries = self._flat
        if entries == own_entries and flat.numel() == own.numel():
            with self._model_lock:
                own.copy_(flat)
                self.weight_version = int(weight_version) if weight_version is not None else self.weight_version + 1
            return {"success": True, "message": f"loaded {len(entries)} tensors (one copy)",
                    "weight_version": self.weight_version}
        return self.load_weights(views(flat, entries), weight_version)

    def checksums(self, names: list[str] | None) -> dict[str, Any]:
        if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            raise WeightError(f"names: expected a list of weight names, got {names!r}")
        names = list(self._state) if names is None else names
        unknown = [n for n in names if n not in self._state]
        if unknown:
            raise WeightError(f"unknown weight name(s) {unknown}")
        with self._model_lock:
            return {"weight_version": self.weight_version,
                    "checksums": {n: tensor_checksum(self._state[n]) for n in names}}

    def init_weight_group(self, *, master_address: str, master_port: int, rank_offset: int, world_size: int,
                          group_name: str, backend: str = "gloo") -> dict[str, Any]:
        if group_name in self._groups:
            raise WeightError(f"group_name {group_name!r} already exists")
        if backend != "gloo":
            raise WeightError(f"backend {backend!r} is not supported by the CPU engine (use 'gloo')")
        self._groups[group_name] = create_weight_group(
            master_address, master_port, rank=rank_offset, world_size=world_size, group_name=group_name,
            timeout_s=self.config.weight_group_timeout_s)
        return {"success": True, "message": f"joined {group_name!r} as rank {rank_offset} of {world_size}"}

    def update_from_distributed(self, *, names: list[str], dtypes: list[str], shapes: list[list[int]],
                                group_name: str, weight_version: int | None) -> dict[str, Any]:
        """Receive each tensor by broadcast from rank 0 (in order), then load them all."""
        group = self._groups.get(group_name)
        if group is None:
            raise WeightError(f"group_name {group_name!r}: no such weights update group")
        if not len(names) == len(dtypes) == len(shapes):
            raise WeightError(f"names, dtypes, shapes differ in length "
                              f"({len(names)}, {len(dtypes)}, {len(shapes)})")
        for i, shape in enumerate(shapes):
            if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
                raise WeightError(f"shapes[{i}]: expected a list of non-negative ints, got {shape!r}")
        try:
            parsed = [parse_dtype(d) for d in dtypes]
        except ValueError as e:
            raise WeightError(f"dtypes: {e}") from e
        tensors = [group.broadcast(gloo_view(torch.empty(tuple(s), dtype=d))).view(d) for s, d in zip(shapes, parsed)]
        return self.load_weights(list(zip(names, tensors)), weight_version)

    def destroy_weight_group(self, group_name: str) -> dict[str, Any]:
        if self._groups.pop(group_name, None) is None:
            raise WeightError(f"group_name {group_name!r}: no such weights update group")
        return {"success": True, "message": f"destroyed {group_name!r}"}

    @property
    def p2p(self):
        """The Mooncake receive side of `--update-weight-transfer-mode p2p` (see `p2p_receiver.py`)."""
        if self._p2p is None:
            from glm_rl.engine.p2p_receiver import P2PReceiver

            self._p2p = P2PReceiver(self, host=self.config.host)
        return self._p2p


def engine_actor_class(num_cpus: float = 1, **options: Any):
    """`ray.remote(...)(EmbeddedEngine)`: `a = cls.remote(config); url = ray.get(a.start.remote())`."""
    import ray

    return ray.remote(num_cpus=num_cpus, **options)(EmbeddedEngine)


def __getattr__(name: str) -> Any:
    """`EmbeddedEngineActor`: `engine_actor_class()`, built on first use so importing this module needs no Ray."""
    if name == "EmbeddedEngineActor":
        return engine_actor_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main(argv: list[str] | None = None) -> None:
    """Run one engine as a process; prints `READY <url>` and serves until SIGTERM / SIGINT."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hf-checkpoint", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--api-key", default=None)
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--enable-mtp", action="store_true", help="MTP speculative decoding")
    p.add_argument("--speculative-num-steps", type=int, default=1)
    p.add_argument("--no-static-kv-cache", dest="static_kv_cache", action="store_false",
                   help="decode with HF's DynamicCache instead of the preallocated cache")
    p.add_argument("--disable-cuda-graph", action="store_true", help="static cache without CUDA graphs")
    p.add_argument("--enable-torch-compile", action="store_true", help="compile the graphed decode step")
    a = p.parse_args(argv)
    engine = EmbeddedEngine(EngineConfig(hf_checkpoint=a.hf_checkpoint, host=a.host, port=a.port,
                                         api_key=a.api_key, dtype=a.dtype, device=a.device,
                                         max_batch_size=a.max_batch_size,
                                         seed=a.seed, enable_mtp=a.enable_mtp,
                                         static_kv_cache=a.static_kv_cache, disable_cuda_graph=a.disable_cuda_graph,
                                         enable_torch_compile=a.enable_torch_compile,
                                         speculative_num_steps=a.speculative_num_steps))
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    print(f"READY {engine.start()}", flush=True)
    done.wait()
    engine.shutdown()


if __name__ == "__main__":
    main()
