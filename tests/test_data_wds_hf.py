"""``--data wds:PATTERN`` (WebDataset shards) and ``--data hf:PATH`` (Hugging Face datasets on disk).

Every fixture is built here: tiny solid PNG/JPEG images with Pillow, tar shards with
``webdataset.TarWriter``, datasets with ``datasets.Dataset.save_to_disk`` / ``to_parquet`` and
pyarrow. Each test has its own FLOPMATCH_CACHE. The two-rank test forks two gloo processes.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import shutil
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset
from PIL import Image

import flopmatch.data.pool as pool_mod
from flopmatch.cli.args import data_source
from flopmatch.config import DataConfig
from flopmatch.data import hf as hf_mod
from flopmatch.data.datasets import make_dataset
from flopmatch.data.hf import hf_pool
from flopmatch.data.images import load_image
from flopmatch.data.pool import Pool
from flopmatch.data.wds import wds_pool
from flopmatch.errors import UserError
from tiny import color

SIZE = 8  # training side of every pool here


pytestmark = pytest.mark.usefixtures("own_cache")  # tests/conftest.py: a fresh cache per test


# ----------------------------------------------------------------------------------------- helpers


def encoded(i: int, fmt: str = "PNG", mode: str = "RGB", size=(12, 10)) -> bytes:
    """A solid image of colour ``i`` encoded as ``fmt``."""
    buf = io.BytesIO()
    Image.new("RGB", size, color(i)).convert(mode).save(buf, fmt)
    return buf.getvalue()


# shard -> samples: (key, {extension: bytes}); captions "picture N" name the colour index N.
SHARDS = [
    [("a0", {"png": encoded(0), "txt": b"picture 0", "json": b"{}"}),
     ("a1", {"jpg": encoded(1, "JPEG"), "txt": b"picture 1"}),
     ("a2", {"png": encoded(2)})],  # no caption
    [("b0", {"jpg": encoded(3, "JPEG"), "txt": b"picture 3"}),
     ("b1", {"jpg": b"not an image at all", "txt": b"picture 4"}),  # corrupt
     ("b2", {"txt": b"picture 5"})],  # no image
    [("c0", {"png": encoded(6, mode="L"), "txt": b"picture 6"}),  # grey: converted and counted
     ("c1", {"webp": encoded(7, "WEBP", size=(9, 14)), "txt": b"  picture\n7 "})],
]
USABLE = ["000.tar/a0", "000.tar/a1", "001.tar/b0", "002.tar/c0", "002.tar/c1"]
SKIPPED = {"empty caption": 1, "missing image": 1, "unreadable": 1}


def write_shards(root: Path, shards=SHARDS) -> list[Path]:
    """The samples of ``shards`` written as ``root/000.tar``, ``001.tar``, ... with webdataset.TarWriter."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for s, samples in enumerate(shards):
        path = root / f"{s:03d}.tar"
        with webdataset.TarWriter(str(path)) as sink:
            for key, files in samples:
                sink.write({"__key__": key, **files})
        paths.append(path)
    return paths


def wds_cfg(pattern, num_eval: int = 0) -> DataConfig:
    return DataConfig(name=f"wds:{pattern}", image_size=SIZE, num_eval=num_eval)


def load_wds(pattern, workers: int = 0) -> Pool:
    return wds_pool(wds_cfg(pattern), str(pattern), progress=False, workers=workers)


def same_pool(a: Pool, b: Pool) -> None:
    """Two pools hold the same items, in the same order, with the same counts."""
    assert a.names == b.names and a.captions == b.captions and a.splits == b.splits
    assert torch.equal(a.images, b.images)
    assert a.info == b.info and a.key == b.key


class CountingLoad:
    """Stands in for ``flopmatch.data.pool.load_image``: counts decodes; with ``fail`` every decode is an error."""

    def __init__(self, fail: bool = False):
        self.calls, self.fail = 0, fail

    def __call__(self, data, size, tally=None):
        self.calls += 1
        if self.fail:
            raise AssertionError("decoding must not happen here")
        return load_image(data, size, tally)


# ----------------------------------------------------------------------------------------- wds


def test_wds_items_captions_and_skips_by_cause(tmp_path):
    """Usable samples in shard order with cleaned captions; no caption, no image, corrupt image counted by cause."""
    write_shards(tmp_path / "s")
    pool = load_wds(tmp_path / "s" / "{000..002}.tar")
    assert pool.names == USABLE
    assert pool.captions == ["picture 0", "picture 1", "picture 3", "picture 6", "picture 7"]
    assert pool.images.shape == (5, 3, SIZE, SIZE) and pool.images.dtype == torch.uint8
    assert pool.info["skipped"] == SKIPPED and pool.info["converted"] == {"grey": 1}
    assert pool.info["usable"] == 5 and pool.info["skipped_examples"]["missing image"] == ["001.tar/b2"]
    assert pool.images[0, :, 4, 4].tolist() == list(color(0))  # the PNG, lossless
    assert set(pool.splits) == {""}  # no given split: the hash split


def test_wds_patterns_brace_glob_folder_and_missing_shards(tmp_path):
    """Brace, glob and folder forms name the same shards; a shard the pattern names but that is absent is counted."""
    write_shards(tmp_path / "s")
    braced = load_wds(tmp_path / "s" / "{000..002}.tar")
    assert load_wds(tmp_path / "s" / "*.tar").names == braced.names
    assert load_wds(tmp_path / "s").names == braced.names
    listed = load_wds(tmp_path / "s" / "{000,001,002}.tar")
    assert listed.names == braced.names and listed.key == braced.key  # the same shards: the same cache
    gap = load_wds(tmp_path / "s" / "{000..003}.tar")
    assert gap.names == braced.names and gap.info["skipped"] == {**SKIPPED, "missing shard": 1}


@pytest.mark.parametrize("pattern, message", [
    ("nothing/{000..009}.tar", "matches no file"),
    ("nothing/*.tar", "matches no file"),
    ("s/{000..002.tar", "Unbalanced braces"),
])
def test_wds_bad_pattern_is_one_line_user_error(tmp_path, pattern, message):
    """A pattern matching no file, or with unbalanced braces, is a one-line UserError naming the pattern."""
    write_shards(tmp_path / "s")
    with pytest.raises(UserError, match=message) as e:
        load_wds(tmp_path / pattern)
    assert "\n" not in str(e.value) and str(tmp_path / pattern) in str(e.value)


def test_wds_damaged_shard_keeps_what_came_before(tmp_path):
    """A truncated shard: the samples before the damage are kept, the damage counted as an unreadable shard."""
    def noise(i: int) -> bytes:  # incompressible, so the cut falls inside an image, not between tar members
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
        return buf.getvalue()

    paths = write_shards(tmp_path / "s", [[(f"k{i}", {"png": noise(i), "txt": b"x"}) for i in range(4)]])
    data = paths[0].read_bytes()
    paths[0].write_bytes(data[: len(data) // 2])
    pool = load_wds(paths[0])
    assert 0 < len(pool) < 4 and pool.names == [f"000.tar/k{i}" for i in range(len(pool))]
    assert pool.info["skipped"] == {"unreadable shard": 1}


def test_wds_cache_hit_and_invalidation(tmp_path, monkeypatch):
    """A second load decodes nothing; touching or rewriting a shard decodes again."""
    paths = write_shards(tmp_path / "s")
    pattern = tmp_path / "s" / "{000..002}.tar"
    first = load_wds(pattern)
    monkeypatch.setattr(pool_mod, "load_image", CountingLoad(fail=True))
    same_pool(load_wds(pattern), first)

    st = paths[1].stat()
    os.utime(paths[1], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: same bytes, new mtime
    monkeypatch.setattr(pool_mod, "load_image", counter := CountingLoad())
    touched = load_wds(pattern)
    assert counter.calls == 6 and touched.names == first.names and touched.key != first.key

    write_shards(tmp_path / "s", [SHARDS[0], SHARDS[1][:1], SHARDS[2]])  # rewritten: fewer samples
    assert load_wds(pattern).info["skipped"] == {"empty caption": 1}


def test_wds_workers_give_the_same_pool(tmp_path, monkeypatch):
    """Decoding with 2 DataLoader workers (webdataset's worker split) gives the pool decoded in-process."""
    write_shards(tmp_path / "s")
    pattern = tmp_path / "s" / "{000..002}.tar"
    monkeypatch.setenv("FLOPMATCH_CACHE", str(tmp_path / "c0"))
    serial = load_wds(pattern, workers=0)
    monkeypatch.setenv("FLOPMATCH_CACHE", str(tmp_path / "c2"))
    same_pool(load_wds(pattern, workers=2), serial)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, cache: str, pattern: str, results) -> None:
    """One torchrun-like rank: gloo group, the pool twice (miss, then hit with decoding forbidden)."""
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_RANK=str(rank), FLOPMATCH_CACHE=cache)
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
        shares, save_part = [], pool_mod._save_part  # forked child: its patches touch only itself

        def counted_save(path, size, decoded):
            shares.append(len(decoded))
            save_part(path, size, decoded)

        pool_mod._save_part = counted_save
        built = load_wds(pattern, workers=2 if rank == 1 else 0)
        pool_mod.load_image = CountingLoad(fail=True)
        again = load_wds(pattern)
        torch.distributed.destroy_process_group()
        results.put((rank, (shares, [(p.names, p.captions, p.images.numpy(), p.info, p.key) for p in (built, again)])))
    except BaseException as e:  # report instead of hanging the parent
        results.put((rank, repr(e)))


def test_wds_two_ranks_build_the_one_process_pool(tmp_path):
    """2 gloo ranks (each decoding its shards, rank 1 with 2 workers) both end with the 1-process pool."""
    write_shards(tmp_path / "s")
    pattern = str(tmp_path / "s" / "{000..002}.tar")
    single = load_wds(pattern)
    ctx = multiprocessing.get_context("fork")  # fork: the children need not import torch again
    results = ctx.Queue()
    cache = tmp_path / "ranks"
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, 2, port, str(cache), pattern, results)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        got = dict(results.get(timeout=60) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():  # a rank left waiting at a barrier by a failed peer
                p.kill()
    assert not [r for r in got.values() if isinstance(r, str)], got
    assert got[0][0] == [5] and got[1][0] == [3]  # samples decoded: shards 0 and 2 on rank 0, shard 1 on rank 1
    for rank in range(2):
        for names, captions, images, info, key in got[rank][1]:
            assert names == single.names and captions == single.captions and key == single.key
            assert np.array_equal(images, single.images.numpy()) and info == single.info
    assert not [p for p in (cache / "data").iterdir() if p.name.startswith(".")]  # parts and temporaries removed


def test_wds_through_make_dataset_and_cli_path(tmp_path, monkeypatch):
    """``wds:`` is a registered source (train/eval splits from the hash split); data_source keeps braces."""
    write_shards(tmp_path / "s")
    monkeypatch.chdir(tmp_path)
    name = data_source("wds:s/{000..002}.tar")
    assert name == f"wds:{tmp_path}/s/{{000..002}}.tar"
    cfg = DataConfig(name=name, image_size=SIZE, num_eval=1)
    train, evals = make_dataset(cfg, "train", progress=False), make_dataset(cfg, "eval", progress=False)
    assert len(train) + len(evals) == 5 and not set(train.names) & set(evals.names)
    assert train[0]["image"].shape == (3, SIZE, SIZE)


# ----------------------------------------------------------------------------------------- hf


@pytest.fixture(scope="module")
def hf_sets(tmp_path_factory):
    """Datasets on disk: "disk" (Dataset.save_to_disk, an Image column), "dict" (DatasetDict, train/test),
    "parquet" (to_parquet of the same rows) and "raw" (pyarrow parquet: raw bytes in "jpg", text in "caption")."""
    root = tmp_path_factory.mktemp("hf")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HOME", str(root / "hf-home"))  # should datasets write anything, keep it here
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        import datasets  # the optional extra, imported where it is used (as flopmatch.data.hf does)
        import pyarrow as pa
        import pyarrow.parquet as pq

        features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string"),
                                      "extra": datasets.Value("int32")})
        rows = {"image": [Image.new("RGB", (10, 12), color(i)) for i in range(5)] + [{"bytes": b"junk", "path": None}],
                "text": ["picture 0", "picture 1", None, "picture 3", "picture 4", "picture 5"],
                "extra": list(range(6))}
        ds = datasets.Dataset.from_dict(rows, features=features)
        ds.save_to_disk(str(root / "disk"))
        datasets.DatasetDict({"train": ds.select(range(4)), "test": ds.select(range(4, 6))}).save_to_disk(str(root / "dict"))
        (root / "parquet").mkdir()
        ds.to_parquet(str(root / "parquet" / "part-0.parquet"))
        (root / "raw").mkdir()
        pq.write_table(pa.table({"jpg": [encoded(i, "JPEG") for i in range(3)],
                                 "caption": [f"picture {i}" for i in range(3)]}), root / "raw" / "data.parquet")
    return root


def hf_cfg(path, **kw) -> DataConfig:
    return DataConfig(name=f"hf:{path}", image_size=SIZE, num_eval=0, **kw)


def test_hf_save_to_disk_with_image_column(hf_sets):
    """A saved Dataset: rows in order, a missing caption and an undecodable image skipped and counted."""
    pool = hf_pool(hf_cfg(hf_sets / "disk"), str(hf_sets / "disk"), progress=False)
    assert pool.names == ["0", "1", "3", "4"] and pool.captions == ["picture 0", "picture 1", "picture 3", "picture 4"]
    assert pool.info["skipped"] == {"empty caption": 1, "unreadable": 1}
    assert pool.images[3, :, 4, 4].tolist() == list(color(4)) and set(pool.splits) == {""}


def test_hf_dataset_dict_gives_the_split(hf_sets):
    """A saved DatasetDict with train and test: those are the training and evaluation splits."""
    cfg = DataConfig(name=f"hf:{hf_sets / 'dict'}", image_size=SIZE, num_eval=10)
    train, evals = make_dataset(cfg, "train", progress=False), make_dataset(cfg, "eval", progress=False)
    assert sorted(train.names) == ["train/0", "train/1", "train/3"] and evals.names == ["test/0"]
    assert train.info["split_rule"] == "given by the source"


def test_hf_parquet_folder_glob_and_raw_bytes_columns(hf_sets):
    """Parquet (a folder or a glob) streams the same rows as save_to_disk; raw bytes under other column names."""
    disk = hf_pool(hf_cfg(hf_sets / "disk"), str(hf_sets / "disk"), progress=False)
    for path in (hf_sets / "parquet", hf_sets / "parquet" / "*.parquet"):
        pool = hf_pool(hf_cfg(path), str(path), progress=False)
        assert pool.names == disk.names and torch.equal(pool.images, disk.images)
    raw = hf_pool(hf_cfg(hf_sets / "raw", image_column="jpg", text_column="caption"), str(hf_sets / "raw"),
                  progress=False)
    assert raw.captions == ["picture 0", "picture 1", "picture 2"] and raw.info["skipped"] == {}


@pytest.mark.parametrize("columns", [{"image_column": "img"}, {"text_column": "caption"}])
def test_hf_missing_column_names_the_columns(hf_sets, columns):
    """A wrong column name is a one-line UserError naming the columns the dataset has."""
    with pytest.raises(UserError, match=r"no column '(img|caption)'.*\['image', 'text', 'extra'\]") as e:
        hf_pool(hf_cfg(hf_sets / "disk", **columns), str(hf_sets / "disk"), progress=False)
    assert "\n" not in str(e.value)


def test_hf_not_a_dataset_is_a_user_error(tmp_path):
    """A folder with neither save_to_disk files nor parquet is a UserError."""
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="neither a folder written by save_to_disk"):
        hf_pool(hf_cfg(tmp_path / "empty"), str(tmp_path / "empty"), progress=False)


def test_hf_cache_hit_does_not_open_the_dataset(hf_sets, monkeypatch, tmp_path):
    """A second load neither decodes nor needs `datasets`; changing the columns or a file decodes again."""
    copy = tmp_path / "disk"
    shutil.copytree(hf_sets / "disk", copy)
    first = hf_pool(hf_cfg(copy), str(copy), progress=False)
    monkeypatch.setattr(pool_mod, "load_image", CountingLoad(fail=True))
    monkeypatch.setitem(sys.modules, "datasets", None)  # importing it now would fail
    same_pool(hf_pool(hf_cfg(copy), str(copy), progress=False), first)
    with pytest.raises(UserError, match=r"pip install 'flopmatch\[hf\]' \(or pip install -r requirements-hf.lock\)"):
        hf_pool(hf_cfg(copy, text_column="extra"), str(copy), progress=False)  # a new key: must open it
    state = copy / "state.json"
    st = state.stat()
    os.utime(state, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(UserError, match="flopmatch\\[hf\\]"):
        hf_pool(hf_cfg(copy), str(copy), progress=False)


def test_hf_image_cells_of_every_kind(tmp_path):
    """PIL images, bytes/path dicts, raw bytes and relative paths all become what load_image reads."""
    (tmp_path / "a.png").write_bytes(encoded(1))
    pil = Image.new("CMYK", (5, 5), (0, 0, 0, 0))
    cells = [pil, {"bytes": encoded(1), "path": None}, {"bytes": None, "path": "a.png"}, encoded(1), "a.png",
             str(tmp_path / "a.png")]
    decoded = [load_image(hf_mod._encoded(c, tmp_path), SIZE) for c in cells]
    assert decoded[0][0, 0].tolist() == [255, 255, 255]  # CMYK (0,0,0,0) is white, kept as CMYK until load_image
    assert all(np.array_equal(d, decoded[1]) for d in decoded[1:])
    with pytest.raises(pool_mod.BadImage, match="missing image"):
        hf_mod._encoded({"bytes": None, "path": None}, tmp_path)
