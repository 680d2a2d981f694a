"""Data preparation with learned tokenizers: the encoded-dataset cache and generators trained on them."""

from __future__ import annotations

import pytest
import torch

from flopmatch.data.datasets import make_dataset
from flopmatch.errors import UserError
from flopmatch.files import cache_dir
from flopmatch.prepare import encode_dataset
from flopmatch.tokenizers.autoencoder import AutoencoderConfig
from flopmatch.tokenizers.train_ae import train_autoencoder


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
