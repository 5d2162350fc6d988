"""`EngineWeights`: every way new weights reach the embedded engine's model, and the version they carry.

Why one object: named tensors (`update_weights_from_tensor`), one flat buffer (load_format "flattened_bucket"),
broadcasts over a weights-update group (`update_weights_from_distributed`) and Mooncake P2P writes
(`p2p_receiver.py`) all end in the same load — validated first, copied in under the engine's model lock so a
batch never decodes with half an update, and the version bumped once — and `/weights_checksum` reads the same
tensors. The engine holds one `EngineWeights` and its HTTP routes call it.

An update that arrives while a batch decodes is staged (copied aside) and swapped in by the scheduler before the
next batch (`apply_staged`), so the sender never waits for the batch (fully-async RL pushes while engines
generate); `version` and `/weights_checksum` already answer for the staged weights, which are what the next batch
uses. Every write to the model and every checksum holds `_stage_lock`, so a checksum never reads half a swap.

Names: the model's `state_dict()` names (detached views sharing the parameters' storage), plus the MTP layer's
under `model.layers.{num_hidden_layers}.*` when speculative decoding is on (`add_mtp`). The main model's weights
live in one buffer (`weights/flat.py`), so a colocated trainer's flattened update is one copy.

FP8: a weight update may carry block-FP8 weights (float8_e4m3fn, each followed by its `<name>_scale_inv`, as
`--rollout-fp8` sends them), which `load` dequantizes into the engine's dtype (`models/fp8.py`). Over gloo,
float8 travels as raw bytes.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from glm_rl.engine.p2p_receiver import P2PReceiver
from glm_rl.memory import HostOffload
from glm_rl.models.fp8 import Fp8Error, dequantize_named, gloo_view
from glm_rl.models.glm45.hf_names import mtp_named_tensors
from glm_rl.weights.flat import FlatEntry, flatten_module_, views
from glm_rl.weights.group import BACKENDS, WeightGroup, create_weight_group
from glm_rl.weights.wire import WeightError, parse_dtype, tensor_checksum


class EngineWeights:
    """The model's named tensors, their version, and every update path into them (see the module docstring)."""

    def __init__(
        self, model: torch.nn.Module, *, lock: threading.Lock, host: str, group_timeout_s: float = 30.0
    ) -> None:
        self.lock = lock  # the engine's model lock: held by every batch and every load
        self._version = 0  # of the weights in the model
        self._stage_lock = threading.Lock()
        self._staged: dict[str, torch.Tensor] = {}  # name -> tensor waiting for the next batch (later wins)
        self._staged_version: int | None = None
        self.flat = flatten_module_(model)
        self.state = model.state_dict()  # detached views sharing the parameters' storage
        self.device = next(model.parameters()).device  # where weight-group tensors land (NCCL: this GPU)
        self.host, self.group_timeout_s = host, group_timeout_s
        self._groups: dict[str, WeightGroup] = {}
        self._joining: set[str] = set()  # group names whose join is in progress
        self._join_lock = threading.Lock()
        self._p2p: P2PReceiver | None = None
        self._released: HostOffload | None = None  # the weight buffer while its memory is released

    def release_memory(self) -> None:
        """Free the main model's weight buffer without a copy (colocated training phase): `resume_memory` gives it
        its size back with undefined contents, which the next weight update overwrites whole."""
        if self._released is None:
            self._released = HostOffload([self.flat[0]], keep_contents=False)
            self._released.release()

    def resume_memory(self) -> None:
        if self._released is not None:
            self._released.restore()
            self._released = None

    def add_mtp(self, mtp: torch.nn.Module, num_hidden_layers: int) -> None:
        """Expose the MTP layer's tensors under the checkpoint's names (`model.layers.{num_hidden_layers}.*`)."""
        self.state.update(mtp_named_tensors(mtp, num_hidden_layers))

    @property
    def version(self) -> int:
        """The version the next batch decodes with (staged weights count)."""
        return self._staged_version if self._staged_version is not None else self._version

    def _next_version(self, weight_version: int | None) -> int:
        return int(weight_version) if weight_version is not None else self.version + 1

    def apply_staged(self) -> None:
        """Swap staged weights in (the scheduler calls this holding the model lock, before each batch)."""
        with self._stage_lock:
            if self._staged_version is None:
                return
            for name, tensor in self._staged.items():
                self.state[name].copy_(tensor)
            self._version, self._staged_version = self._staged_version, None
            self._staged = {}

    def _write(self, write, stage, weight_version: int | None) -> tuple[int, bool]:
        """Run `write()` into the model now if no batch holds it, else `stage()` aside; (version, staged?)."""
        if self.lock.acquire(blocking=False):
            try:
                self.apply_staged()  # an earlier staged update first, so the order is kept
                with self._stage_lock:
                    write()
                    self._version = self._next_version(weight_version)
                return self._version, False
            finally:
                self.lock.release()
        with self._stage_lock:
            stage()
            self._staged_version = self._next_version(weight_version)
            return self._staged_version, True

    # -- loading -----------------------------------------------------------------------------------------------
    def load(self, named: list[tuple[str, torch.Tensor]], weight_version: int | None) -> dict[str, Any]:
        """Copy tensors into the model (all validated first); the version becomes `weight_version` when given,
        else the current one + 1 (a bucketed update that gives the version on its last bucket ends right).
        float8 weights with their scales are dequantized into the engine's dtype first."""
        try:
            named = dequantize_named(named, lambda n: self.state[n].dtype if n in self.state else torch.float32)
        except Fp8Error as e:
            raise WeightError(str(e)) from None
        for name, tensor in named:
            if name not in self.state:
                raise WeightError(f"unknown weight name {name!r}")
            if tuple(tensor.shape) != tuple(self.state[name].shape):
                raise WeightError(
                    f"weight {name!r}: shape {tuple(tensor.shape)} does not match the engine's "
                    f"{tuple(self.state[name].shape)}"
                )

        def write() -> None:
            for name, tensor in named:
                self.state[name].copy_(tensor)

        def stage() -> None:  # copies: the sender's buffers (a P2P region, shared memory) may change after this;
            # on the host, so an update received on the GPU (NCCL) does not hold a second model there meanwhile
            self._staged.update({name: tensor.to("cpu", copy=True) for name, tensor in named})

        version, staged = self._write(write, stage, weight_version)
        what = "staged (swapped in before the next batch)" if staged else "loaded"
        return {"success": True, "message": f"{what} {len(named)} tensors", "weight_version": version}

    def load_flattened(self, flat: torch.Tensor, entries: list[FlatEntry], weight_version: int | None):
        """A whole model in one buffer: when its layout is the engine's own, one copy; else view by view."""
        own, own_entries = self.flat
        if entries == own_entries and flat.numel() == own.numel():

            def stage() -> None:  # one copy of the buffer, staged as views of it
                self._staged.update(views(flat.clone(), own_entries))

            version, staged = self._write(lambda: own.copy_(flat), stage, weight_version)
            what = "staged (swapped in before the next batch)" if staged else "loaded"
            return {"success": True, "message": f"{what} {len(entries)} tensors (one copy)", "weight_version": version}
        return self.load(views(flat, entries), weight_version)

    def checksums(self, names: list[str] | None, algo: str = "sha256") -> dict[str, Any]:
        """The digest (`algo`: sha256 or d128, `wire.tensor_checksum`) of each named tensor (all of them for
        None), with the version they belong to."""
        if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            raise WeightError(f"names: expected a list of weight names, got {names!r}")
        names = list(self.state) if names is None else names
        unknown = [n for n in names if n not in self.state]
        if unknown:
            raise WeightError(f"unknown weight name(s) {unknown}")
        with self._stage_lock:  # staged tensors are what the next batch uses
            return {
                "weight_version": self.version,
                "checksums": {n: tensor_checksum(self._staged.get(n, self.state[n]), algo) for n in names},
            }

    # -- weights-update groups (update_weights_from_distributed) -----------------------------------------------
    def group_names(self) -> list[str]:
        return sorted(self._groups)

    def init_group(
        self,
        *,
        master_address: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        group_name: str,
        backend: str = "gloo",
    ) -> dict[str, Any]:
        """Join a weights-update group. A join that does not complete within `group_timeout_s` (every rank,
        the trainer's source too) fails with WeightError and frees the server thread that waited."""
        if backend not in BACKENDS:
            raise WeightError(f"backend {backend!r} is not supported; valid: {', '.join(BACKENDS)}")
        if backend == "nccl" and self.device.type != "cuda":
            raise WeightError("backend 'nccl' needs the engine on a GPU (this one runs on the CPU: use 'gloo')")
        with self._join_lock:  # claim the name: a second join of it (done or in progress) is refused at once
            if group_name in self._groups or group_name in self._joining:
                raise WeightError(f"group_name {group_name!r} already exists")
            self._joining.add(group_name)
        try:
            self._groups[group_name] = create_weight_group(
                master_address,
                master_port,
                rank=rank_offset,
                world_size=world_size,
                group_name=group_name,
                backend=backend,
                device=self.device if backend == "nccl" else None,
                timeout_s=self.group_timeout_s,
            )
        except (RuntimeError, ValueError) as e:  # torch's DistStoreError / DistNetworkError are RuntimeErrors
            reason = (str(e).splitlines() or [""])[0]
            raise WeightError(
                f"group_name {group_name!r}: join failed or timed out after "
                f"{self.group_timeout_s:g} s ({type(e).__name__}: {reason})"
            ) from None
        finally:
            self._joining.discard(group_name)
        return {"success": True, "message": f"joined {group_name!r} as rank {rank_offset} of {world_size}"}

    def update_from_distributed(
        self,
        *,
        names: list[str],
        dtypes: list[str],
        shapes: list[list[int]],
        group_name: str,
        weight_version: int | None,
    ) -> dict[str, Any]:
        """Receive each tensor by broadcast from rank 0 (in order), then load them all."""
        group = self._groups.get(group_name)
        if group is None:
            raise WeightError(f"group_name {group_name!r}: no such weights update group")
        if not len(names) == len(dtypes) == len(shapes):
            raise WeightError(f"names, dtypes, shapes differ in length ({len(names)}, {len(dtypes)}, {len(shapes)})")
        for i, shape in enumerate(shapes):
            if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
                raise WeightError(f"shapes[{i}]: expected a list of non-negative ints, got {shape!r}")
        try:
            parsed = [parse_dtype(d) for d in dtypes]
        except ValueError as e:
            raise WeightError(f"dtypes: {e}") from e
        # fp8 travels as its bytes (gloo_view) over either backend
        tensors = [
            group.broadcast(gloo_view(torch.empty(tuple(s), dtype=d, device=group.device))).view(d)
            for s, d in zip(shapes, parsed)
        ]
        return self.load(list(zip(names, tensors)), weight_version)

    def destroy_group(self, group_name: str) -> dict[str, Any]:
        group = self._groups.pop(group_name, None)
        if group is None:
            raise WeightError(f"group_name {group_name!r}: no such weights update group")
        group.close()
        return {"success": True, "message": f"destroyed {group_name!r}"}

    # -- P2P ---------------------------------------------------------------------------------------------------
    @property
    def p2p(self) -> P2PReceiver:
        """The Mooncake receive side of `--update-weight-transfer-mode p2p` (see `p2p_receiver.py`), made on the
        first /p2p/prepare."""
        if self._p2p is None:
            self._p2p = P2PReceiver(self.state, self.load, host=self.host)
        return self._p2p

    def close(self) -> None:
        """Leave every weights-update group and free the P2P buffer."""
        self._groups.clear()
        if self._p2p is not None:
            self._p2p.close()
