"""TrainerGroup: one Ray actor per trainer rank, driven in lock step.

The driver shards samples over data-parallel ranks only: with the megatron backend the TP / PP / CP peers of a
DP rank (and, for weight export, every rank) take part in the same collectives, so each receives its DP rank's
shard, and only one rank per DP rank reports results (the backend's `dp_coords`: for megatron the last pipeline
stage's TP-rank-0, CP-rank-0 rank, which holds the logprobs and the loss), so nothing is counted twice.
"""

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


def make_backend(cfg: RunConfig, device: str):
    """The backend --backend names (megatron is imported only when chosen)."""
    kw = dict(temperature=cfg.rollout.rollout_temperature, device=device)
    match cfg.train.backend:
        case "torch":
            return TorchBackend(cfg.model, cfg.train, cfg.algo, **kw)
        case "megatron":
            from glm_rl.trainer.backends.megatron.backend import MegatronBackend

            return MegatronBackend(cfg.model, cfg.train, cfg.algo, seed=cfg.seed, **kw)
        case other:
            raise ValueError(f"--backend {other!r} unknown; valid: torch, megatron")


class TrainerActor:
    """One rank: joins the trainer process group and owns a backend."""

    def __init__(self, cfg: RunConfig, rank: int, world_size: int, master: str) -> None:
        torch.set_num_threads(1)
        torch.manual_seed(cfg.seed)
        self.rank = rank
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", init_method=master,
                                rank=rank, world_size=world_size)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.backend = make_backend(cfg, device)
        self.sync = None
        self.rollout_fp8 = cfg.sync.rollout_fp8  # setup_sync's callers pass only the transport's endpoints

    def dp_coords(self) -> tuple[int, bool]:
        """(data-parallel rank, whether this rank reports for it)."""
        return self.backend.dp_coords()

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

    def export_weights(self) -> None:
        """Take part in a collective weight export without sending (megatron: TP/EP gathers need every rank)."""
        self.backend.named_tensors()

    def shutdown(self) -> None:
        if self.sync is not None:
            self.sync.close()
        dist.destroy_process_group()


class TrainerGroup:
    def __init__(self, cfg: RunConfig, placement: Placement, share: float) -> None:
        n = cfg.train.num_trainer_ranks
        master = f"tcp://127.0.0.1:{free_port()}"
        options = {}
        if cfg.train.backend == "megatron" and not torch.cuda.is_available():
            # megatron's jit_fuser is torch.compile, chosen when megatron is imported (17 s cold per process on
            # CPU for tiny fused ops): the actor process must start with dynamo off (FACTS.md, cpu_shims.py).
            options["runtime_env"] = {"env_vars": {"TORCHDYNAMO_DISABLE": "1"}}
        remote = ray.remote(TrainerActor)
        self.actors = [remote.options(**placement.actor_options(placement.trainer_bundles[r], share), **options)
                       .remote(cfg, r, n, master) for r in range(n)]
        coords = ray.get([a.dp_coords.remote() for a in self.actors])
        self.dp_rank = [dp for dp, _ in coords]              # the shard each actor trains on
        self.reporters = [i for i, (_, lead) in enumerate(coords) if lead]  # one per DP rank
        self.dp_size = len(self.reporters)
        self.collective_export = cfg.train.backend == "megatron"

    @property
    def rank0(self):
        return self.actors[0]

    def setup_sync(self, mode: str, engine_urls: list[str], api_key: str | None, bucket_bytes: int) -> None:
        """Weight-sync sources: every rank for p2p (each sends its share of the plan), else rank 0 alone."""
        self._sync_ranks = list(range(len(self.actors))) if mode == "p2p" else [0]
        ray.get([self.actors[r].setup_sync.remote(mode, engine_urls, api_key, bucket_bytes)
                 for r in self._sync_ranks])

    def push_weights(self, version: int, verify: bool) -> dict:
        """Push on every source rank at once; rank 0's result (it commits and verifies). With a collective
        export (megatron), the other ranks run the export alongside without sending."""
        pushes = [self.actors[r].push_weights.remote(version, verify) for r in self._sync_ranks]
        helpers = [a.export_weights.remote() for r, a in enumerate(self.actors)
                   if self.collective_export and r not in self._sync_ranks]
        ray.get(helpers)
        return ray.get(pushes)[0]

    def _per_dp(self, method: str, shards: list[list[Sample]], *args) -> list[dict]:
        """Call `method` on every actor with its DP rank's shard; the reporting ranks' results, by DP rank."""
        if len(shards) != self.dp_size:
            raise ValueError(f"{len(shards)} sample shards for {self.dp_size} data-parallel ranks")
        results = ray.get([getattr(a, method).remote(shards[dp], *args) for a, dp in zip(self.actors, self.dp_rank)])
        return [results[i] for i in self.reporters]

    def logprobs(self, shards: list[list[Sample]]) -> list[dict]:
        return self._per_dp("logprobs", shards)

    def train_step(self, shards: list[list[Sample]], global_tokens: int) -> list[dict]:
        return self._per_dp("train_step", shards, global_tokens)

    def save(self, path: Path) -> None:
        ray.get([a.save.remote(str(path)) for a in self.actors])

    def load(self, path: Path) -> None:
        ray.get([a.load.remote(str(path)) for a in self.actors])

    def shutdown(self) -> None:
        ray.get([a.shutdown.remote() for a in self.actors])
