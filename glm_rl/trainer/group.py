"""TrainerGroup: one Ray actor per data-parallel rank, driven in lock step."""

from __future__ import annotations

from pathlib import Path

import ray
import torch
import torch.distributed as dist

from glm_rl.config import RunConfig
from glm_rl.ray.placement import Placement
from glm_rl.rollout.router import free_port
from glm_rl.rollout.samples import Sample
from glm_rl.trainer.backends.torch_backend import TorchBackend


class TrainerActor:
    """One rank: joins the trainer process group and owns a backend."""

    def __init__(self, cfg: RunConfig, rank: int, world_size: int, master: str) -> None:
        torch.set_num_threads(1)
        torch.manual_seed(cfg.seed)
        self.rank = rank
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", init_method=master,
                                rank=rank, world_size=world_size)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.backend = TorchBackend(cfg.model, cfg.train, cfg.algo, temperature=cfg.rollout.rollout_temperature,
                                    device=device)
        self.sync = None
        self.rollout_fp8 = cfg.sync.rollout_fp8  # setup_sync's callers pass only the transport's endpoints

    def logprobs(self, samples: list[Sample]) -> dict:
        return self.backend.logprobs(samples)

    def train_step(self, samples: list[Sample], global_tokens: int) -> dict:
        return self.backend.train_step(samples, global_tokens)

    def save(self, path: str) -> None:
        self.backend.save(Path(path) / f"rank{self.rank}")

    def load(self, path: str) -> None:
        self.backend.load(Path(path) / f"rank{self.rank}")

    def rng_state(self) -> bytes:
        return torch.get_rng_state().numpy().tobytes()

    # weight sync runs on rank 0, which holds a full replica (data parallel); p2p runs on every rank (a source each)
    def setup_sync(self, mode: str, engine_urls: list[str], api_key: str | None, bucket_bytes: int) -> None:
        from glm_rl.weights.transports import make_transport

        if self.sync is not None:  # rebuilt after an engine restart
            self.sync.close()
        self.sync = make_transport(mode, engine_urls, api_key, bucket_bytes, fp8=self.rollout_fp8)
        if mode == "tensor" and not self.rollout_fp8:  # colocated: share the whole model as one buffer
            self.sync.flat = self.backend.flatten_weights()
        self.sync.prepare()

    def push_weights(self, version: int, verify: bool) -> dict:
        return self.sync.push(self.backend.named_tensors(), version, verify)

    def shutdown(self) -> None:
        if self.sync is not None:
            self.sync.close()
        dist.destroy_process_group()


class TrainerGroup:
    def __init__(self, cfg: RunConfig, placement: Placement, share: float) -> None:
        n = cfg.train.num_trainer_ranks
        master = f"tcp://127.0.0.1:{free_port()}"
        remote = ray.remote(TrainerActor)
        self.actors = [remote.options(**placement.actor_options(placement.trainer_bundles[r], share))
                       .remote(cfg, r, n, master) for r in range(n)]
        ray.get([a.__ray_ready__.remote() for a in self.actors])

    @property
    def rank0(self):
        return self.actors[0]

    def setup_sync(self, mode: str, engine_urls: list[str], api_key: str | None, bucket_bytes: int) -> None:
        """Weight-sync sources: every rank for p2p (each sends its share of the plan), else rank 0 alone."""
        self._sync_actors = self.actors if mode == "p2p" else [self.rank0]
        ray.get([a.setup_sync.remote(mode, engine_urls, api_key, bucket_bytes) for a in self._sync_actors])

    def push_weights(self, version: int, verify: bool) -> dict:
        """Push on every source rank at once; rank 0's result (it commits and verifies)."""
        return ray.get([a.push_weights.remote(version, verify) for a in self._sync_actors])[0]

    def logprobs(self, shards: list[list[Sample]]) -> list[dict]:
        return ray.get([a.logprobs.remote(s) for a, s in zip(self.actors, shards)])

    def train_step(self, shards: list[list[Sample]], global_tokens: int) -> list[dict]:
        return ray.get([a.train_step.remote(s, global_tokens) for a, s in zip(self.actors, shards)])

    def save(self, path: Path) -> None:
        ray.get([a.save.remote(str(path)) for a in self.actors])

    def load(self, path: Path) -> None:
        ray.get([a.load.remote(str(path)) for a in self.actors])

    def shutdown(self) -> None:
        ray.get([a.shutdown.remote() for a in self.actors])
