"""Generated images in the formats external evaluators read: a folder of PNGs and an ``.npz`` batch.

``flopmatch eval RUN --export DIR`` writes, per evaluated setting, ``DIR/<setting>/``:

- ``00000.png`` ... : every generated image, lossless 8-bit RGB (what clean-fid's ``compute_fid(folder, ...)``
  and torch-fidelity read from a directory);
- ``samples.npz``: one uint8 array ``arr_0`` of shape (N, H, W, 3), the batch format of the ADM evaluator
  (Dhariwal & Nichol 2021, ``evaluations/evaluator.py``) and of torch-fidelity's npz inputs;
- ``prompts.json``: the prompt of each image, in the same order.

Each setting's folder is written to a temporary sibling and renamed, so an interrupted export never
leaves a folder that looks complete.

Reference statistics, the other direction: clean-fid and the ADM evaluator keep a reference set as the
mean ``mu`` (F,) and covariance ``sigma`` (F, F) of its features in an ``.npz``.
``flopmatch eval RUN --export-ref FILE.npz`` writes (:func:`export_reference_stats`), per feature
extractor of the call, ``mu_<extractor>`` and ``sigma_<extractor>`` (float64; covariance divided by
N - 1, as ``np.cov``), plus ``mu`` and ``sigma`` when the file holds one extractor (what clean-fid and
ADM readers look up), and ``manifest``: a 0-d string array holding JSON (format, version, each
extractor's ``describe()``, the dataset's name, split, fingerprint, size and images' sha256). Written
to a temporary file and renamed. ``--ref-stats FILE.npz`` reads such a file back
(:func:`read_reference_stats`) with ``np.load(..., allow_pickle=False)``: plain arrays only, nothing is
unpickled. A file without that manifest is refused: a bare ``mu``/``sigma`` does not say which network and
resize made it, and FIDs across preprocessings are not comparable (Parmar et al. 2022).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from flopmatch import __version__
from flopmatch.errors import UserError
from flopmatch.files import atomic_write_bytes, file_sha256

REF_STATS_FORMAT = "flopmatch reference statistics"
REF_STATS_VERSION = 1
# describe() fields two extractors must share for their features (and so their statistics) to be the same
EXTRACTOR_IDENTITY = ("name", "num_features", "weights_sha256", "resize", "normalization")


def export_images(images_uint8: torch.Tensor, prompts: list[str], directory: str | Path) -> Path:
    """Write images (N, 3, H, W) uint8 as PNGs, ``samples.npz`` (arr_0: (N, H, W, 3) uint8) and ``prompts.json``."""
    directory = Path(directory)
    hwc = images_uint8.permute(0, 2, 3, 1).contiguous().cpu().numpy()  # (N, 3, H, W) -> (N, H, W, 3)
    tmp = directory.with_name(f".{directory.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir(parents=True)
    try:
        width = max(5, len(str(len(hwc) - 1)))
        for i, img in enumerate(hwc):
            Image.fromarray(img, "RGB").save(tmp / f"{i:0{width}d}.png")
        buf = io.BytesIO()
        np.savez(buf, arr_0=hwc)
        atomic_write_bytes(tmp / "samples.npz", buf.getvalue())
        atomic_write_bytes(tmp / "prompts.json", json.dumps(prompts, ensure_ascii=False, indent=0).encode())
        if directory.exists():  # a previous export of the same setting: replaced whole
            old = directory.with_name(f".{directory.name}.{uuid.uuid4().hex[:8]}.old")
            os.replace(directory, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def read_export(directory: str | Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(images from the PNGs, images from samples.npz, prompts), each image batch (N, 3, H, W) uint8."""
    directory = Path(directory)
    pngs = sorted(directory.glob("*.png"))
    from_png = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in pngs]) if pngs else np.zeros((0, 1, 1, 3), np.uint8)
    with np.load(directory / "samples.npz", allow_pickle=False) as z:  # never unpickle: plain arrays only
        from_npz = z["arr_0"]
    prompts = json.loads((directory / "prompts.json").read_text())
    return (torch.from_numpy(from_png).permute(0, 3, 1, 2), torch.from_numpy(from_npz).permute(0, 3, 1, 2), prompts)


@dataclass
class ReferenceStats:
    """One extractor's reference statistics: mean ``mu`` (F,) and covariance ``sigma`` (F, F), float64, of
    ``num_images`` images' features."""

    mu: torch.Tensor
    sigma: torch.Tensor
    num_images: int


def export_reference_stats(path: str | Path, stats: dict[str, tuple[torch.Tensor, torch.Tensor]], extractors: dict[str, dict],
                           dataset: dict, num_images: int) -> Path:
    """Write reference statistics as an ``.npz`` (layout in the module docstring), atomically.

    ``stats``: extractor name -> (mu (F,), sigma (F, F)); ``extractors``: name -> ``describe()``;
    ``dataset``: where the images came from (name, split, fingerprint, size, images_sha256).
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"--export-ref {path} is a directory; give a file name such as {path / 'reference.npz'}")
    arrays = {}
    for name, (mu, sigma) in stats.items():
        arrays[f"mu_{name}"] = mu.detach().double().cpu().numpy()
        arrays[f"sigma_{name}"] = sigma.detach().double().cpu().numpy()
    if len(stats) == 1:  # the key names clean-fid's and ADM's readers use
        (name,) = stats
        arrays["mu"], arrays["sigma"] = arrays[f"mu_{name}"], arrays[f"sigma_{name}"]
    manifest = {"format": REF_STATS_FORMAT, "version": REF_STATS_VERSION, "flopmatch_version": __version__,
                "num_images": num_images, "covariance": "unbiased (divided by num_images - 1), float64",
                "keys": {name: [f"mu_{name}", f"sigma_{name}"] for name in stats},
                "feature_extractors": {name: extractors[name] for name in stats}, "dataset": dataset}
    arrays["manifest"] = np.array(json.dumps(manifest))  # a 0-d unicode array: loads without pickle
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def read_reference_stats(path: str | Path, extractors: dict[str, dict]) -> tuple[dict[str, ReferenceStats], dict]:
    """Read statistics written by :func:`export_reference_stats` for each extractor in ``extractors`` (name ->
    ``describe()``); returns ({name: ReferenceStats}, what an eval manifest records about the file).

    Refused with a one-line UserError: a missing or unreadable file, one without a flopmatch manifest, one
    lacking an extractor asked for, statistics whose feature dimension is not the extractor's or that
    another network or preprocessing made (any of :data:`EXTRACTOR_IDENTITY` differs), non-finite values.
    """
    path = Path(path)
    hint = "write one with `flopmatch eval RUN --export-ref FILE.npz`"
    if not path.is_file():
        raise UserError(f"--ref-stats {path}: no such file; {hint}")
    if not zipfile.is_zipfile(path):  # np.load would try it as a pickle and pass on numpy's advice to allow pickles
        raise UserError(f"--ref-stats {path} is not an .npz file; {hint}")
    try:
        with np.load(path, allow_pickle=False) as z:  # never unpickle: plain arrays only
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"--ref-stats {path} is not a readable .npz of plain arrays ({_first_line(e)}); {hint}") from None
    manifest = None
    try:
        manifest = json.loads(str(arrays["manifest"].item()))
    except (KeyError, ValueError, TypeError):  # no manifest array, not one string, or not JSON
        pass
    if not (isinstance(manifest, dict) and manifest.get("format") == REF_STATS_FORMAT
            and isinstance(manifest.get("feature_extractors"), dict)):
        raise UserError(f"--ref-stats {path} has no flopmatch manifest, so nothing says which network and resize made "
                        f"its statistics; {hint}")
    if manifest.get("version") != REF_STATS_VERSION:
        raise UserError(f"--ref-stats {path} is format version {manifest.get('version')}; this flopmatch reads version "
                        f"{REF_STATS_VERSION}: export it again")
    theirs = manifest["feature_extractors"]
    out = {}
    for name, ours in extractors.items():
        if name not in theirs or f"mu_{name}" not in arrays or f"sigma_{name}" not in arrays:
            have = ",".join(theirs) or "no extractor"
            raise UserError(f"--ref-stats {path} holds statistics for {have}, not {name}; evaluate with --features {have} "
                            f"or export them again with --features {name}")
        mu, sigma = arrays[f"mu_{name}"], arrays[f"sigma_{name}"]
        f = ours["num_features"]
        if mu.shape != (f,) or sigma.shape != (f, f):
            raise UserError(f"--ref-stats {path}: its {name} statistics have {mu.shape[-1] if mu.ndim else 0} features "
                            f"(mu {mu.shape}, sigma {sigma.shape}), the {name} extractor gives {f}; export them again "
                            f"with this extractor")
        for field in EXTRACTOR_IDENTITY:
            if theirs[name].get(field) != ours.get(field):
                raise UserError(f"--ref-stats {path}: its {name} statistics were made with {field} {theirs[name].get(field)!r}, "
                                f"this extractor has {ours.get(field)!r}; FIDs across them are not comparable: export "
                                f"them again with this flopmatch")
        if mu.dtype.kind != "f" or sigma.dtype.kind != "f" or not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
            raise UserError(f"--ref-stats {path}: its {name} statistics are not finite floating-point numbers; {hint}")
        n = manifest.get("num_images")
        if not (isinstance(n, int) and n >= 2):
            raise UserError(f"--ref-stats {path}: its manifest gives num_images {n!r}, not a count >= 2; {hint}")
        out[name] = ReferenceStats(torch.from_numpy(mu).double(), torch.from_numpy(sigma).double(), n)
    info = {"imported": True, "file": str(path.resolve()), "sha256": file_sha256(path),
            "size": manifest["num_images"], "source": manifest.get("dataset"),
            "exported_by": f"flopmatch {manifest.get('flopmatch_version')}"}
    return out, info
