"""CUDA graphs of the static decoder's steps: captured on first use per shape bucket, replayed with one launch.

Why buckets: a graph replays fixed shapes, so live rows run in the smallest captured batch bucket >= n (extra
rows decode garbage, unread) and attention reads the first `span` cache slots, `span` a power of two; a handful
of graphs then covers every batch (what SGLang does with `--cuda-graph-max-bs`). A step that synchronises with
the host cannot be captured: the first such step turns graphs off for good (eager from then on).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

MIN_SPAN = 64  # smallest attended-length bucket


def batch_bucket(n: int, max_batch: int) -> int:
    """Captured batch sizes: 1, 2, 4, 8, then multiples of 8 (SGLang's default ladder), capped at max_batch."""
    size = n if n <= 2 else 1 << (n - 1).bit_length() if n <= 8 else -(-n // 8) * 8
    return min(size, max_batch)


def span_bucket(length: int) -> int:
    """Attended cache length for `length` live slots: the next power of two, at least MIN_SPAN."""
    return max(MIN_SPAN, 1 << (max(length, 1) - 1).bit_length())


class StepGraphs:
    """The captured graphs of one decoder, keyed (kind, bucket rows, S tokens each, span slots, *extra key)."""

    def __init__(self, device: torch.device, max_batch: int, enabled: bool) -> None:
        self.device, self.max_batch = device, max_batch
        self.enabled = enabled  # False: every step runs eagerly
        self.captured: dict[tuple, tuple[torch.cuda.CUDAGraph, dict]] = {}
        self._pool = None
        self._seen: set[tuple] = set()  # step variants (kind, *extra key) captured before: checked and warmed up
        # one side stream for every capture's warm-up: cuBLAS keeps a workspace per (handle, stream) for the
        # process's life, and a new pool stream per capture (torch.cuda.Stream() cycles through 32) left ~32 MiB
        # more reserved after each of a colocated engine's re-captures (engine memory grew ~0.2 GiB a step)
        self._warm_stream: torch.cuda.Stream | None = None

    def clear(self) -> None:
        """Drop every graph (their buffers point into a cache that is being replaced)."""
        self.captured.clear()

    def release_pool(self) -> None:
        """Drop the graphs' shared memory pool too (colocated engines free it for the trainer)."""
        self.captured.clear()
        self._pool = None

    def run(
        self, key: tuple, eager: Callable, step: Callable, inputs: dict[str, torch.Tensor], span: int, warm_pos: int
    ):
        """Run `step` for the live rows as the graph of (key[0], bucket, S, span, *key[1:]), copying the inputs
        into its buffers (unused rows get position 1, a valid slot); eagerly (`eager`) when no graph can hold it.
        `warm_pos`: the position the capture's warm-up runs write at (a slot no live row has written yet)."""
        n, S = inputs["ids"].shape
        kind, *extra = key
        captured = self._graph((kind, batch_bucket(n, self.max_batch), S, span, *extra), eager, step, inputs, warm_pos)
        if captured is None:
            return eager(**inputs, span=span)
        graph, io = captured
        for name, value in inputs.items():
            io[name][:n].copy_(value)
        io["pos"][n:].fill_(1)  # unused rows attend slot 0 / 1 of their own row
        graph.replay()
        return tuple(out[:n] if out is not None else None for out in io["out"])

    def _host_sync(self, step, io: dict, span: int) -> str | None:
        """Run one eager step with torch's sync debug mode set to "error": the error text if it synchronised."""
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step(**io, span=span)
        except RuntimeError as e:
            return str(e).splitlines()[0]
        finally:
            torch.cuda.set_sync_debug_mode(previous)
        return None

    def _graph(self, key: tuple, eager, step, inputs: dict[str, torch.Tensor], warm_pos: int):
        """The captured step for key, captured on first use from `step` (`eager` checks it first); None (and
        graphs off for good) when the step synchronises with the host, which no capture survives."""
        if key in self.captured:
            return self.captured[key]
        kind, bucket, _, span = key[:4]
        variant = (kind, *key[4:])  # every bucket of one step function
        # warm-up runs for real, at `warm_pos`, so no live key is overwritten
        io = {
            name: torch.zeros((bucket, *value.shape[1:]), dtype=value.dtype, device=self.device)
            for name, value in inputs.items()
        }
        io["pos"].fill_(warm_pos)
        if self._warm_stream is None:
            self._warm_stream = torch.cuda.Stream()
        stream = self._warm_stream
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            if variant not in self._seen and (reason := self._host_sync(eager, io, span)):
                log.warning("%s step synchronises with the host (%s): CUDA graphs off", kind, reason)
                self.enabled = False
                torch.cuda.current_stream().wait_stream(stream)
                return None
            # the first capture of a variant warms up twice (lazy init, autotuning); later ones (other buckets, and
            # every re-capture after a colocated engine released its graphs) once
            for _ in range(1 if variant in self._seen else 2):
                step(**io, span=span)
        torch.cuda.current_stream().wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread-local capture: the engine's HTTP thread may touch CUDA (weight updates wait on the model lock,
        # checksums do not) while the scheduler thread captures
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            io["out"] = step(**io, span=span)
        self.captured[key] = graph, io
        self._seen.add(variant)
        return graph, io
