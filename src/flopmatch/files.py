"""File I/O, owned in one place: atomic writes, safetensors, JSON, the one sha256 helper, the cache root.

Every whole file the project writes goes through here, so an interrupted process never leaves a
half-written output: we write to a temporary file in the same directory and ``os.replace`` it.
(Append-only logs, ``metrics.jsonl`` and worker logs, are appended in place; a resumed run trims
``metrics.jsonl`` back to its checkpoint.)
Tensors are stored as safetensors, never pickled (no ``torch.load`` of untrusted data).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from flopmatch.errors import UserError


def _read_umask() -> int:
    """The process umask (read once, at import: os.umask can only be read by setting it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _umask_mode() -> int:
    """Mode for new files under the umask (mkstemp would leave them owner-only, 0600)."""
    return 0o666 & ~_UMASK


_SHA256: dict[tuple[str, int, int], str] = {}  # (resolved path, size, mtime_ns) -> digest, per process


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 4 MiB chunks (identifies weights and checkpoints in manifests).

    Remembered per process while the file's size and modification time are unchanged: evaluator
    weights (up to ~90 MB, ~0.3 s to hash) are checked once per process, not once per use.
    """
    resolved = Path(path).resolve()
    st = resolved.stat()
    key = (str(resolved), st.st_size, st.st_mtime_ns)
    if key not in _SHA256:
        h = hashlib.sha256()
        with open(resolved, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _SHA256[key] = h.hexdigest()
    return _SHA256[key]


def tensor_sha256(t: torch.Tensor) -> str:
    """Hex sha256 of a tensor's raw bytes (C order, on CPU): identifies an image set in manifests and caches."""
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """Hex sha256 over a dict of tensors: each name, dtype, shape and raw bytes, in sorted name order.

    Stored in a checkpoint's metadata and checked on every load, so corrupted tensor data (which
    safetensors itself does not detect) is refused instead of silently sampled from.
    """
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def remove_stale_temps(directory: str | Path, names: tuple[str, ...] | None = None) -> list[Path]:
    """Delete temporary files left in ``directory`` by atomic writes that a killed process never finished.

    Only names this module creates (``.<name>.<random>.tmp``) are touched, and with ``names`` only the
    temporaries of those files (so another process's write in progress there is left alone).
    Returns what was removed.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    patterns = [f".{n}.*.tmp" for n in names] if names else [".*.tmp"]
    stale = [p for pattern in patterns for p in directory.glob(pattern) if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def cache_dir() -> Path:
    """The cache root: $FLOPMATCH_CACHE if set, else ~/.cache/flopmatch (created on demand).

    Holds what is computed once and keyed by content: fitted codebooks, encoded datasets, text
    states, reference features and trained evaluators.
    """
    root = Path(os.environ.get("FLOPMATCH_CACHE") or Path.home() / ".cache" / "flopmatch")
    root.mkdir(parents=True, exist_ok=True)
    return root


# Write failures that are the machine's state, not a bug: reported as one line; what was written before stays.
_DISK_ERRORS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                errno.EROFS: "read-only file system", errno.EACCES: "permission denied"}


def _raise_user_error_if_disk(e: BaseException, path: Path) -> None:
    """Turn a full disk, quota, read-only or permission error while writing ``path`` into a UserError."""
    if isinstance(e, OSError) and e.errno in _DISK_ERRORS:
        raise UserError(f"cannot write {path}: {_DISK_ERRORS[e.errno]}; free space or fix permissions, then re-run "
                        f"(finished work is kept and an interrupted run resumes)") from None


@contextlib.contextmanager
def _atomic(path: Path):
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on any failure it is removed.

    The temporary file is ``.<name>.<random>.tmp`` in the same directory (same file system, so the final
    ``os.replace`` is atomic); a full disk or a read-only directory becomes a one-line UserError.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        _raise_user_error_if_disk(e, path)
        raise
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        _raise_user_error_if_disk(e, path)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file + rename (atomic on POSIX), synced to disk first."""
    with _atomic(Path(path)) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: str | Path, text: str) -> None:
    """Atomically write a UTF-8 text file."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj) -> None:
    """Atomically write ``obj`` as indented JSON."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> dict:
    """Read a JSON file; a missing or corrupt file is a UserError naming the file."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"missing file {path}")
    if path.is_dir():
        raise UserError(f"{path} is a directory; give a JSON file")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"corrupt JSON in {path} ({e.msg if hasattr(e, 'msg') else e}); delete it or restore it") from None


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Atomically write a flat dict of tensors as safetensors (tensors made contiguous, on CPU)."""
    with _atomic(Path(path)) as tmp:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)


def load_tensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file; missing or corrupt files raise UserError naming the file."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"missing file {path}")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"corrupt tensor file {path} ({e}); delete it and re-run") from None



def read_tensor_metadata(path: str | Path, fix: str = "delete it and re-run") -> dict:
    """The metadata (str -> str) of a safetensors file, without loading its tensors; a damaged file is a UserError
    ending in ``fix``."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as e:  # safetensors raises several types for damaged files
        raise UserError(f"corrupt checkpoint {path} ({e}); {fix}") from None


def optimizer_tensors(sd: dict, prefix: str = "optim") -> tuple[dict[str, torch.Tensor], list]:
    """Flatten an optimizer state dict (``opt.state_dict()``'s format) to safetensors-able tensors named
    ``<prefix>.<param index>.<key>`` plus its param groups, for JSON (no pickle)."""
    tensors = {f"{prefix}.{i}.{k}": v if torch.is_tensor(v) else torch.tensor(v)
               for i, st in sd["state"].items() for k, v in st.items()}
    return tensors, sd["param_groups"]


def optimizer_state(tensors: dict[str, torch.Tensor], groups: list, prefix: str = "optim") -> dict:
    """Inverse of :func:`optimizer_tensors`: ``opt.state_dict()``'s format (other keys of ``tensors`` ignored)."""
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith(prefix + "."):
            i, name = key[len(prefix) + 1 :].split(".", 1)
            state.setdefault(int(i), {})[name] = v
    return {"state": state, "param_groups": groups}


def load_verified(net: torch.nn.Module, weights: str | Path, info_path: str | Path) -> dict | None:
    """Load a cached model into ``net`` and return its info JSON, if the weights' sha256 is the one the info
    records and they fit ``net``; None otherwise (missing, unreadable, mismatched): the caller trains again.
    The trained evaluators (classifiers) are cached this way, written by :func:`save_verified`.
    """
    weights, info_path = Path(weights), Path(info_path)
    if not (weights.exists() and info_path.exists()):
        return None
    try:
        info = read_json(info_path)
        if info.get("sha256") != file_sha256(weights):
            return None
        net.load_state_dict(load_tensors(weights), strict=True)
        return info
    except (UserError, OSError, AttributeError, RuntimeError):  # RuntimeError: weights of another architecture
        return None


def save_verified(net: torch.nn.Module, weights: str | Path, info_path: str | Path, info: dict,
                  metadata: dict[str, str] | None = None) -> dict:
    """Write ``net``'s weights, then ``info`` with their sha256 (the pair :func:`load_verified` trusts); returns info."""
    save_tensors(weights, net.state_dict(), metadata=metadata)
    info["sha256"] = file_sha256(weights)
    atomic_write_json(info_path, info)
    return info
