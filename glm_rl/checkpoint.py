"""Durable checkpoints: how a run writes `--save` and what `--load` accepts, checked before anything starts.

A checkpoint directory:

    latest                  the name of the newest complete step directory (one line)
    step_000010/            one complete checkpoint
        rank0/ … rankN/     each trainer rank's files (model.safetensors + trainer.pt; LoRA: adapter/ + trainer.pt)
        state.json          step, weight version, data position
        manifest.json       every file above with its size (written last)
    .step_000012.partial/   a save in progress, or one cut short: never read, removed by the next save

Choices, and why:
- A step is written under `.step_N.partial`, every file fsynced, then renamed: a reader never sees half a
  checkpoint, whatever kills the save (signal, full disk, a dead rank).
- `latest` is replaced atomically (`latest.tmp`, fsync, `os.replace`, fsync of the directory): a kill at any
  moment leaves the old pointer or the new one, never an empty one.
- `find_checkpoint` (run by `--load` at parse time, before Ray, and again at resume) checks the step `latest`
  names: it exists, every file has its manifest's size, safetensors headers and torch zip directories read
  back. A damaged file is an error naming it. Without a usable `latest` the newest complete step is taken,
  and without any checkpoint the run starts fresh; both are said in the log.
- Every file goes through Python's file layer (`write_file`), so a failed write names the path and the OS's
  reason ("No space left on device"); torch's own writer reports it as "unexpected pos …".
- Model weights are safetensors written tensor by tensor, each copied on its own to host memory: views into
  one flat buffer holding several dtypes (the colocated `tensor` sync) save like any other tensor, and
  loading runs no code. Torch files (optimizer state) load with `weights_only=True`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import struct
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

LATEST, STATE, MANIFEST = "latest", "state.json", "manifest.json"
MODEL_WEIGHTS = "model.safetensors"
_STEP = re.compile(r"step_(\d+)$")
log = logging.getLogger(__name__)
_ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read: one line naming the file and the reason."""


def step_name(step: int) -> str:
    return f"step_{step:06d}"


# -- files ---------------------------------------------------------------------------------------------------
class _Recording:
    """A binary file that remembers the OSError its writes raised (torch's writer replaces it by its own)."""

    def __init__(self, f) -> None:
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        try:
            self.f.flush()
        except OSError as e:
            self.error = e
            raise


def write_file(path: Path, write: Callable[[Any], None]) -> None:
    """Write `path` through `write(file)`, then flush and fsync it. Any OS failure (also one torch or another
    writer swallowed) becomes a CheckpointError naming the path and the OS's reason."""
    try:
        with open(path, "wb") as f:
            rec = _Recording(f)
            try:
                write(rec)
            except Exception:
                if rec.error is not None:
                    raise rec.error from None
                raise
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise CheckpointError(f"{path}: {e.strerror or e}") from None


def make_dirs(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"{e.filename or path}: {e.strerror or e}") from None


def save_torch(obj: Any, path: Path) -> None:
    write_file(path, lambda f: torch.save(obj, f))


def load_torch(path: Path, map_location: str | torch.device = "cpu") -> Any:
    """`torch.load(weights_only=True)`: tensors and plain containers only, no code runs."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - every reason becomes one line naming the file
        raise CheckpointError(f"{path}: unreadable torch file ({_first_line(e)})") from None


def save_safetensors(named: Iterable[tuple[str, torch.Tensor]], path: Path, metadata: dict | None = None) -> None:
    """Write safetensors tensor by tensor (each copied on its own to host memory, so tensors that view one
    shared buffer, in any dtypes, save like separate ones); read back by `safetensors.torch.load_file`."""
    named = [(n, t.detach()) for n, t in named]
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, t in named:
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it

    def write(f) -> None:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, t in named:
            f.write(t.to("cpu", copy=True).contiguous().reshape(-1).view(torch.uint8).numpy().data)

    write_file(path, write)


def load_safetensors(path: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=device)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: unreadable safetensors file ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- checking -------------------------------------------------------------------------------------------------
def check_file(path: Path, size: int | None = None) -> None:
    """The file exists, has `size` bytes (when known) and its header reads back (safetensors, torch zip,
    JSON); else a CheckpointError naming it."""
    try:
        actual = path.stat().st_size
    except OSError as e:
        raise CheckpointError(f"{path}: {e.strerror or e}") from None
    if size is not None and actual != size:
        raise CheckpointError(f"{path}: {actual} bytes, {size} when saved (truncated or overwritten)")
    if path.suffix == ".safetensors":
        _check_safetensors(path, actual)
    elif path.suffix == ".pt":
        try:
            zipfile.ZipFile(path).close()
        except (zipfile.BadZipFile, OSError) as e:
            raise CheckpointError(f"{path}: not a complete torch file ({e})") from None
    elif path.suffix == ".json":
        try:
            json.loads(path.read_text())
        except (ValueError, OSError) as e:
            raise CheckpointError(f"{path}: unreadable JSON ({e})") from None


def _check_safetensors(path: Path, size: int) -> None:
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < n <= size - 8:
            raise CheckpointError(
                f"{path}: safetensors header of {n} bytes does not fit the {size}-byte file (truncated?)"
            )
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise CheckpointError(f"{path}: unreadable safetensors header ({e})") from None
    end = max([v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"], default=0)
    if 8 + n + end != size:
        raise CheckpointError(f"{path}: {size} bytes, its header describes {8 + n + end} (truncated?)")


def verify(step_dir: Path, num_ranks: int | None = None) -> dict:
    """Check a step directory (every file of its manifest, or of an older checkpoint every file found) and
    return its state.json; `num_ranks`: the trainer ranks that will load it need their `rank{r}/`."""
    manifest = step_dir / MANIFEST
    if manifest.is_file():
        check_file(manifest)
        for rel, size in json.loads(manifest.read_text())["files"].items():
            check_file(step_dir / rel, size)
    else:  # written before manifests: state.json was its last file
        if not (step_dir / STATE).is_file():
            raise CheckpointError(f"{step_dir / STATE}: missing (the save did not complete)")
        for f in sorted(p for p in step_dir.rglob("*") if p.is_file()):
            check_file(f)
    for r in range(num_ranks or 0):
        if not (step_dir / f"rank{r}").is_dir():
            raise CheckpointError(f"{step_dir / f'rank{r}'}: missing (saved by fewer trainer ranks?)")
    return json.loads((step_dir / STATE).read_text())


def find_checkpoint(root: Path, num_ranks: int | None = None) -> tuple[Path | None, str]:
    """The step directory `--load root` resumes from, checked (`verify`), and a line saying what was chosen;
    (None, why) when there is no checkpoint (the run starts fresh). CheckpointError names the file when the
    step `latest` names is missing or damaged."""
    root = Path(root)
    if not root.exists():
        return None, f"--load {root}: no such directory, no checkpoint: the run starts fresh"
    if not root.is_dir():
        raise CheckpointError(f"--load {root}: not a directory")
    pointer = root / LATEST
    name = _read_pointer(pointer)
    if name is not None:
        step_dir = root / name
        if not step_dir.is_dir():
            raise CheckpointError(f"{pointer}: names {name!r}, which does not exist in {root}")
        verify(step_dir, num_ranks)
        return step_dir, f"resuming from {step_dir}"
    for step_dir in sorted(_step_dirs(root), key=lambda p: -_step_of(p)):  # newest first
        try:
            verify(step_dir, num_ranks)
        except CheckpointError as e:  # an older complete one may follow
            log.warning("not resuming from %s: %s", step_dir, e)
            continue
        why = "missing" if not pointer.exists() else "unreadable"
        return step_dir, f"{pointer} {why}: resuming from the newest complete checkpoint {step_dir}"
    return None, f"--load {root}: no checkpoint in it: the run starts fresh"


def _read_pointer(pointer: Path) -> str | None:
    try:
        name = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return name if _STEP.fullmatch(name) else None


def _step_dirs(root: Path) -> list[Path]:
    return [p for p in root.iterdir() if _STEP.fullmatch(p.name) and p.is_dir()]


def _step_of(path: Path) -> int:
    return int(_STEP.fullmatch(path.name).group(1))


class CheckpointDir:
    """`--save DIR`: writes steps durably (module docstring) and says which is the latest."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def latest(self) -> Path | None:
        name = _read_pointer(self.root / LATEST)
        return self.root / name if name else None

    def save(self, step: int, write_ranks: Callable[[Path], None], state: dict) -> Path:
        """`write_ranks(tmp)` writes the trainer ranks' files into a partial directory; then state.json and the
        manifest, fsync, rename to `step_N`, and `latest` replaced. On any failure (a signal too) the partial
        directory is removed and `latest` still names the previous checkpoint."""
        final = self.root / step_name(step)
        tmp = self.root / f".{final.name}.partial"
        make_dirs(self.root)
        shutil.rmtree(tmp, ignore_errors=True)  # a save of this step cut short earlier
        try:
            make_dirs(tmp)
            write_ranks(tmp)
            write_file(tmp / STATE, lambda f: f.write(json.dumps(state).encode()))
            files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
            write_file(tmp / MANIFEST, lambda f: f.write(json.dumps({"files": files}, indent=1).encode()))
            for d in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
                _fsync_dir(d)
            self._replace_dir(tmp, final)
            self._point_latest(final.name)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def _replace_dir(self, tmp: Path, final: Path) -> None:
        try:
            if final.exists():  # the same step saved again (a resumed run that had nothing left to do)
                old = final.with_name(f".{final.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.rename(final, old)
                os.rename(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, final)
            _fsync_dir(self.root)
        except OSError as e:
            raise CheckpointError(f"{final}: {e.strerror or e}") from None

    def _point_latest(self, name: str) -> None:
        tmp = self.root / (LATEST + ".tmp")
        write_file(tmp, lambda f: f.write(name.encode() + b"\n"))
        try:
            os.replace(tmp, self.root / LATEST)
            _fsync_dir(self.root)
        except OSError as e:
            raise CheckpointError(f"{self.root / LATEST}: {e.strerror or e}") from None


# -- paths checked before a run starts ----------------------------------------------------------------------------
def writable_dir_problem(path: str | Path, flag: str) -> str | None:
    """Why `path` is not (and cannot be made) a writable directory, in one line naming it; None when fine."""
    p = Path(path).absolute()
    target = p
    while not target.exists():  # the nearest existing ancestor must let us create the rest
        target = target.parent
    if not target.is_dir():
        what = "is a regular file" if target.is_file() else "is not a directory"
        return f"{flag} {path}: {target} {what}, not a directory"
    if not os.access(target, os.W_OK | os.X_OK):
        return f"{flag} {path}: {target} is not writable (Permission denied)"
    if os.statvfs(target).f_flag & os.ST_RDONLY:
        return f"{flag} {path}: {target} is on a read-only file system"
    return None


def resume_hint(root: str | Path) -> str:
    """What a stopped run tells the user: the checkpoint to resume from, with the flag."""
    latest = CheckpointDir(root).latest()
    if latest is not None and latest.is_dir():
        return f"The last checkpoint is {latest}: resume with --load {root}"
    return f"No checkpoint was saved in {root}: the run must start again"
