"""Data preparation with learned tokenizers: the encoded-dataset cache and generators trained on them."""

from __future__ import annotations

import hashlib
import json
import textwrap
from pathlib import Path

import pytest
import torch

from flopmatch.data.datasets import make_dataset
from flopmatch.errors import UserError
from flopmatch.files import cache_dir
from flopmatch.objectives import make_objective
from flopmatch.prepare import encode_dataset, prepare
from flopmatch.tokenizers.autoencoder import AutoencoderConfig
from flopmatch.tokenizers.train_ae import train_autoencoder
from tiny import tiny_run_config

TESTS = Path(__file__).resolve().parent


def tiny_ae(kind: str, out, seed: int = 0, steps: int = 3):
    """Train a few-thousand-parameter KL or LFQ tokenizer on 32 shapes images and save it to ``out``."""
    from flopmatch.data.shapes import ShapesConfig, ShapesDataset

    cfg = AutoencoderConfig(kind=kind, channels=[8, 16], patch=2, num_res_blocks=1, latent_channels=4, bits=6,
                            steps=steps, batch_size=4, warmup_steps=1, precision="fp32", device="cpu", log_every=1,
                            num_train=32, stats_images=32, seed=seed).validate()
    images = ShapesDataset(ShapesConfig(num_train=32, num_eval=0), "train", disk_cache=False).images_uint8()
    tok, _ = train_autoencoder(cfg, images, out_dir=out, progress=False)
    return tok


def test_encoded_cache_reused_when_valid_and_rebuilt_when_tokenizer_changes(tmp_path, tiny_config):
    """The encoded training set is cached by (tokenizer, data) fingerprints: reused as is, never stale."""
    cfg = tiny_config("masked", sets=["data.image_size=32"])
    data = make_dataset(cfg.data, "train")
    tok_a = tiny_ae("lfq", tmp_path / "a", seed=0)
    tok_b = tiny_ae("lfq", tmp_path / "b", seed=1)
    assert tok_a.fingerprint() != tok_b.fingerprint()
    x_a = encode_dataset(tok_a, data, progress=False)
    files = sorted((cache_dir() / "encoded").glob(f"{tok_a.fingerprint()}-*"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    assert torch.equal(encode_dataset(tok_a, data, progress=False), x_a)
    assert files[0].stat().st_mtime_ns == mtime  # reused, not rewritten
    x_b = encode_dataset(tok_b, data, progress=False)
    assert torch.equal(x_b, tok_b.encode(data.images_uint8().float() / 127.5 - 1))  # rebuilt for the new tokenizer
    files[0].write_bytes(b"garbage")  # a damaged cache entry is re-encoded, not trusted
    assert torch.equal(encode_dataset(tok_a, data, progress=False), x_a)


@pytest.mark.slow
@pytest.mark.parametrize("objective,kind", [("diffusion", "kl"), ("masked", "lfq"), ("autoregressive", "lfq")])
def test_run_on_learned_tokenizer_trains_and_samples(tmp_path, tiny_config, objective, kind):
    """A generator trained with --tokenizer DIR keeps its own copy of the tokenizer and samples through it."""
    from flopmatch.sample import generate, load_sampler
    from flopmatch.train import train

    tiny_ae(kind, tmp_path / "tok")
    cfg = tiny_config(objective, sets=["data.image_size=32", f"tokenizer.path={tmp_path / 'tok'}"])
    state = train(cfg, tmp_path / "run", progress=False)
    assert state["done"] and state["tokenizer"]["tokens"] == ("continuous" if kind == "kl" else "discrete")
    sampler = load_sampler(tmp_path / "run")
    assert sampler.tokenizer.fingerprint() == tiny_ae(kind, tmp_path / "tok2").fingerprint()  # same seed, same tokenizer
    images = generate(sampler, ["a red circle", "a small blue square on the left"], sampler.cfg.sample, seed=0)
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.uint8


def test_mismatched_tokenizer_kind_is_a_clear_error(tmp_path, tiny_config):
    """Training diffusion on a discrete (LFQ) tokenizer is a UserError naming the fix."""
    from flopmatch.train import train

    tiny_ae("lfq", tmp_path / "tok")
    cfg = tiny_config("diffusion", sets=["data.image_size=32"])
    cfg.tokenizer.path = str(tmp_path / "tok")
    with pytest.raises(UserError, match="continuous"):
        train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


# One rank of a 2-process launch: prepare() on a fresh cache, counting the expensive builds, then a digest of what it
# got. fit_weight_free and the encoded-set / caption-table writes are wrapped where prepare and TextCache call them.
PREPARE_WORKER = textwrap.dedent("""
    import hashlib, json, sys
    sys.path.insert(0, {tests!r})
    import torch
    torch.set_num_threads(1)
    from flopmatch import dist, prepare, text
    from flopmatch.errors import UserError
    from flopmatch.objectives import make_objective
    from tiny import tiny_run_config

    counts = {{"fits": 0, "saves": 0}}
    def counted(name, fn):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return wrapper
    prepare.fit_weight_free = counted("fits", prepare.fit_weight_free)
    prepare.save_tensors = counted("saves", prepare.save_tensors)
    text.save_tensors = counted("saves", text.save_tensors)
    dist.init(torch.device("cpu"))
    cfg = tiny_run_config("masked", 6)
    data = prepare.prepare(cfg, make_objective("masked"), progress=False)
    digest = hashlib.sha256()
    for t in (data.x, data.rows, data.text.states.float(), data.text.pooled, data.tokenizer.centroids):
        digest.update(t.contiguous().numpy().tobytes())
    print("RESULT", json.dumps({{"rank": dist.rank(), **counts, "digest": digest.hexdigest()}}), flush=True)
    # the main rank's fit fails (more codes than the 256 16px images have patches): every rank stops with its error
    try:
        prepare.prepare(tiny_run_config("masked", 6, sets=["tokenizer.codebook_size=8192"]), make_objective("masked"),
                        progress=False)
    except UserError as e:
        print("FAILED", json.dumps({{"rank": dist.rank(), "type": type(e).__name__, "text": str(e)}}), flush=True)
    dist.shutdown()
    dist.exit_process(0)
""")


def _digest(data) -> str:
    digest = hashlib.sha256()
    for t in (data.x, data.rows, data.text.states.float(), data.text.pooled, data.tokenizer.centroids):
        digest.update(t.contiguous().numpy().tobytes())
    return digest.hexdigest()


def test_under_torchrun_the_main_rank_builds_the_caches_and_the_others_load_them(own_cache, tmp_path):
    """On a fresh cache, 2 processes prepare a k-means run: only rank 0 fits the tokenizer and writes the encoded set
    and the caption tables, rank 1 loads them, and both get what one process gets on its own fresh cache. When rank
    0's fit fails, rank 1 stops with rank 0's error (an EchoedError, said once by the CLI), not one of its own."""
    from test_distributed import launch

    outputs = launch([], code=PREPARE_WORKER.format(tests=str(TESTS)), extra_env={"FLOPMATCH_CACHE": str(tmp_path / "c2")})
    got = {r["rank"]: r for r in (json.loads(line.split(" ", 1)[1]) for out in outputs for line in out.splitlines()
                                  if line.startswith("RESULT "))}
    assert got.keys() == {0, 1}
    assert (got[0]["fits"], got[0]["saves"]) == (1, 2) and (got[1]["fits"], got[1]["saves"]) == (0, 0), got
    one = prepare(tiny_run_config("masked", 6), make_objective("masked"), progress=False)
    assert got[0]["digest"] == got[1]["digest"] == _digest(one)
    failed = {r["rank"]: r for r in (json.loads(line.split(" ", 1)[1]) for out in outputs for line in out.splitlines()
                                     if line.startswith("FAILED "))}
    assert (failed[0]["type"], failed[1]["type"]) == ("UserError", "EchoedError"), failed
    assert failed[0]["text"] == failed[1]["text"] and "patches" in failed[0]["text"]
