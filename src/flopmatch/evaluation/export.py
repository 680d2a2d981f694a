"""Generated images in the formats external evaluators read: a folder of PNGs and an ``.npz`` batch.

``flopmatch eval RUN --export DIR`` writes, per evaluated setting, ``DIR/<setting>/``:

- ``00000.png`` ... : every generated image, lossless 8-bit RGB (what clean-fid's ``compute_fid(folder, ...)``
  and torch-fidelity read from a directory);
- ``samples.npz``: one uint8 array ``arr_0`` of shape (N, H, W, 3), the batch format of the ADM evaluator
  (Dhariwal & Nichol 2021, ``evaluations/evaluator.py``) and of torch-fidelity's npz inputs;
- ``prompts.json``: the prompt of each image, in the same order.

Each setting's folder is written to a temporary sibling and renamed, so an interrupted export never
leaves a folder that looks complete.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from flopmatch.files import atomic_write_bytes


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
