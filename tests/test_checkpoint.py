"""Durable checkpoints (glm_rl/checkpoint.py): safetensors for flattened weights of several dtypes, partial
directories renamed when complete, `latest` replaced atomically, damaged files named, a full disk reported as
such with `latest` left on the previous checkpoint, and --save / --output-dir / --load checked before start."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from glm_rl.checkpoint import (
    LATEST,
    CheckpointDir,
    CheckpointError,
    find_checkpoint,
    load_safetensors,
    load_torch,
    save_safetensors,
    save_torch,
    verify,
    writable_dir_problem,
)
from glm_rl.config import parse_args
from glm_rl.weights.flat import flatten_module_


def _mixed_module() -> torch.nn.Module:
    """bf16 linear + fp32 norm, flattened into one uint8 buffer (what the colocated tensor sync does)."""
    m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16))
    m[0].to(torch.bfloat16)
    flatten_module_(m)
    return m


def _write_ranks(n: int, scale: float = 1.0):
    def write(tmp: Path) -> None:
        for r in range(n):
            (tmp / f"rank{r}").mkdir()
            save_safetensors([("w", torch.full((64,), scale))], tmp / f"rank{r}" / "model.safetensors")
            save_torch({"optimizer": {"step": torch.tensor(r)}}, tmp / f"rank{r}" / "trainer.pt")

    return write


def test_flattened_weights_of_several_dtypes_save_and_load_bitwise(tmp_path):
    m = _mixed_module()
    with pytest.raises(RuntimeError, match="view the same data as different types"):
        torch.save(m.state_dict(), tmp_path / "old.pt")  # the bug: torch.save refuses this layout
    save_safetensors(m.state_dict().items(), tmp_path / "model.safetensors")
    loaded = load_safetensors(tmp_path / "model.safetensors")
    for name, t in m.state_dict().items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t), name
    fresh = _mixed_module()
    fresh.load_state_dict(loaded)  # copies into the flat views: the buffer layout is kept
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), m.state_dict().values()))


def test_save_renames_when_complete_and_replaces_latest(tmp_path):
    ckpt = CheckpointDir(tmp_path / "ck")
    first = ckpt.save(2, _write_ranks(2), {"step": 2, "weight_version": 2, "data": {"epoch": 0, "offset": 8}})
    assert first.name == "step_000002" and ckpt.latest() == first
    assert (tmp_path / "ck" / LATEST).read_text() == "step_000002\n"
    manifest = json.loads((first / "manifest.json").read_text())["files"]
    assert set(manifest) == {
        "state.json",
        "rank0/model.safetensors",
        "rank0/trainer.pt",
        "rank1/model.safetensors",
        "rank1/trainer.pt",
    }
    assert verify(first, num_ranks=2)["step"] == 2
    ckpt.save(4, _write_ranks(2), {"step": 4})
    assert ckpt.latest().name == "step_000004"
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [LATEST, "step_000002", "step_000004"]


def test_a_save_cut_short_leaves_no_step_and_latest_on_the_previous(tmp_path):
    ckpt = CheckpointDir(tmp_path / "ck")
    ckpt.save(2, _write_ranks(1), {"step": 2})

    def dies_halfway(tmp: Path) -> None:
        _write_ranks(1)(tmp)
        raise KeyboardInterrupt  # SIGINT in the middle of the save

    with pytest.raises(KeyboardInterrupt):
        ckpt.save(4, dies_halfway, {"step": 4})
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [LATEST, "step_000002"]  # no partial left
    assert find_checkpoint(tmp_path / "ck")[0].name == "step_000002"


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (we are root in CI); else skipped (the mocked ENOSPC test below still runs)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode
        != 0
    ):
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_full_disk_names_the_file_and_the_os_reason(small_disk):
    ckpt = CheckpointDir(small_disk / "ck")
    ckpt.save(1, _write_ranks(1), {"step": 1})

    def big(tmp: Path) -> None:
        (tmp / "rank0").mkdir()
        save_torch({"optimizer": torch.zeros(1 << 19)}, tmp / "rank0" / "trainer.pt")  # 2 MiB on a 1 MiB disk

    with pytest.raises(CheckpointError) as e:
        ckpt.save(2, big, {"step": 2})
    assert "No space left on device" in str(e.value) and "rank0/trainer.pt" in str(e.value)
    assert "unexpected pos" not in str(e.value)
    assert ckpt.latest().name == "step_000001" and find_checkpoint(small_disk / "ck")[0].name == "step_000001"
    assert not list(small_disk.glob("ck/.step_*"))  # the partial directory is gone


def test_enospc_at_the_file_layer_is_reported_for_safetensors(tmp_path, monkeypatch):
    import glm_rl.checkpoint as ck

    class Full:
        def __init__(self, f):
            self.f, self.error = f, None

        def write(self, data):
            self.error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            raise self.error

        flush = write

    monkeypatch.setattr(ck, "_Recording", Full)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: No space left on device"):
        save_safetensors([("w", torch.ones(4))], tmp_path / "model.safetensors")


@pytest.mark.parametrize("victim", ["rank0/model.safetensors", "rank0/trainer.pt", "state.json"])
def test_a_truncated_file_is_named(tmp_path, victim):
    ckpt = CheckpointDir(tmp_path)
    step = ckpt.save(3, _write_ranks(1), {"step": 3})
    path = step / victim
    os.truncate(path, path.stat().st_size - 5)
    with pytest.raises(CheckpointError, match=f"{path}: .*(truncated|overwritten)"):
        find_checkpoint(tmp_path)


def test_without_a_manifest_headers_are_still_checked(tmp_path):
    """A checkpoint written before manifests: a truncated torch file fails its zip directory check."""
    step = tmp_path / "step_000001"
    (step / "rank0").mkdir(parents=True)
    torch.save({"model": {"w": torch.ones(100)}, "optimizer": {}}, step / "rank0" / "trainer.pt")
    (step / "state.json").write_text('{"step": 1}')
    (tmp_path / LATEST).write_text("step_000001")
    assert find_checkpoint(tmp_path)[0] == step  # old format: accepted
    os.truncate(step / "rank0" / "trainer.pt", 200)
    with pytest.raises(CheckpointError, match="trainer.pt: not a complete torch file"):
        find_checkpoint(tmp_path)


def test_which_checkpoint_load_picks(tmp_path):
    assert find_checkpoint(tmp_path / "nope")[0] is None  # no directory: fresh, said
    assert "starts fresh" in find_checkpoint(tmp_path)[1]
    ckpt = CheckpointDir(tmp_path)
    ckpt.save(2, _write_ranks(1), {"step": 2})
    ckpt.save(4, _write_ranks(1), {"step": 4})
    (tmp_path / ".step_000006.partial").mkdir()  # a save cut short: never picked
    assert find_checkpoint(tmp_path)[0].name == "step_000004"
    (tmp_path / LATEST).write_text("")  # an empty pointer (older, non-atomic writers): newest complete, said
    path, message = find_checkpoint(tmp_path)
    assert path.name == "step_000004" and "unreadable" in message and "newest complete" in message
    (tmp_path / LATEST).unlink()
    os.truncate(tmp_path / "step_000004" / "rank0" / "trainer.pt", 10)
    path, message = find_checkpoint(tmp_path)  # without a pointer, a damaged newest one is passed over
    assert path.name == "step_000002" and "missing" in message
    (tmp_path / LATEST).write_text("step_000009\n")
    with pytest.raises(CheckpointError, match="latest: names 'step_000009', which does not exist"):
        find_checkpoint(tmp_path)
    (tmp_path / LATEST).write_text("step_000002")
    with pytest.raises(CheckpointError, match="rank1: missing"):  # resumed by more trainer ranks than saved it
        find_checkpoint(tmp_path, num_ranks=2)


def test_torch_files_load_weights_only(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="evil.pt: unreadable torch file"):
        load_torch(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()


def test_paths_are_checked_at_parse_time(tmp_path):
    regular = tmp_path / "file"
    regular.write_text("x")
    assert writable_dir_problem(tmp_path / "new" / "dir", "--save") is None  # can be made
    for argv, needle in (
        (["--save", str(regular)], f"--save {regular}: {regular} is a regular file"),
        (["--output-dir", str(regular / "sub")], f"--output-dir {regular / 'sub'}: {regular} is a regular file"),
    ):
        with pytest.raises(ValueError, match=needle):
            parse_args(argv)
    ckpt = CheckpointDir(tmp_path / "ck")
    step = ckpt.save(1, _write_ranks(1), {"step": 1})  # one rank; the default run has two
    with pytest.raises(ValueError, match="rank1: missing"):
        parse_args(["--load", str(tmp_path / "ck")])
    os.truncate(step / "rank0" / "trainer.pt", 10)
    with pytest.raises(ValueError, match=f"{step / 'rank0' / 'trainer.pt'}: 10 bytes"):
        parse_args(["--load", str(tmp_path / "ck"), "--num-trainer-ranks", "1", "--global-batch-size", "16"])


def test_cli_refuses_a_bad_load_in_seconds_before_ray(tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / LATEST).write_text("step_000005")
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "glm_rl.cli", "train", "--load", str(ck), "--output-dir", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and time.time() - t0 < 15  # issue 24: < 10 s; 4-9 s measured on a loaded 2-core box
    out = " ".join(proc.stdout.split())
    assert f"{ck / LATEST}: names 'step_000005', which does not exist" in out
    assert "Started a local Ray" not in proc.stderr and not (tmp_path / "out").exists()


def _backend(dtype: str):
    from glm_rl.config import AlgoConfig, ModelConfig, TrainConfig
    from glm_rl.trainer.backends.torch_backend import TorchBackend

    torch.manual_seed(0)
    return TorchBackend(
        ModelConfig(dtype=dtype), TrainConfig(lr=1e-2), AlgoConfig(use_rollout_routing_replay=False), temperature=1.0
    )


def test_torch_backend_saves_flattened_bf16_weights_and_loads_both_formats(tmp_path):
    a = _backend("bfloat16")
    a.flatten_weights()  # as the colocated tensor sync does: bf16 weights and fp32 buffers in one buffer
    with torch.no_grad():
        for p in a.model.parameters():
            p.add_(0.01)
    a.save(tmp_path / "new")
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["model.safetensors", "trainer.pt"]
    b = _backend("bfloat16")
    b.flatten_weights()
    b.load(tmp_path / "new")
    for (n, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert x.dtype == y.dtype and torch.equal(x, y), n
    old = tmp_path / "old"  # written before safetensors: the model inside trainer.pt (not flattened)
    old.mkdir()
    c = _backend("float32")
    torch.save({"model": c.model.state_dict(), "optimizer": c.opt.state_dict()}, old / "trainer.pt")
    d = _backend("float32")
    with torch.no_grad():
        next(d.model.parameters()).zero_()
    d.load(old)
    assert all(torch.equal(x, y) for x, y in zip(c.model.state_dict().values(), d.model.state_dict().values()))
