"""Weight-free tokenizers (patch, k-means) and the tokenizer registry."""

from __future__ import annotations

import json

import pytest
import torch

from flopmatch.errors import UserError
from flopmatch.tokenizers.kmeans import KMeansTokenizer, lloyd
from flopmatch.tokenizers.patch import PatchTokenizer, uint8_to_float
from flopmatch.tokenizers.registry import LOADERS, fit_weight_free, load_tokenizer


@pytest.fixture(scope="module")
def shapes_uint8() -> torch.Tensor:
    """(240, 3, 32, 32) uint8 procedural shapes images (the project's default data)."""
    from flopmatch.data.shapes import ShapesConfig, ShapesDataset

    return ShapesDataset(ShapesConfig(num_train=240, num_eval=0), "train", disk_cache=False).images_uint8()


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a - b) / 2).square().mean()
    return float(10 * torch.log10(1 / mse))


def test_patch_decode_inverts_encode():
    """decode(encode(x)) == x for any images in [-1, 1] (fitted or not); spec is (continuous, 8, 48)."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 32, 32, generator=g) * 2 - 1
    tok = PatchTokenizer()
    assert tok.spec.tokens == "continuous" and tok.spec.grid == 8 and tok.spec.channels == 48
    assert tok.encode(x).shape == (4, 48, 8, 8)
    assert torch.allclose(tok.decode(tok.encode(x)), x, atol=1e-6)
    tok.fit(((x[:2] + 1) * 127.5).round().to(torch.uint8))
    assert torch.allclose(tok.decode(tok.encode(x)), x, atol=1e-5)
    assert tok.encode_flops() == 0 and tok.decode_flops() == 0


def test_patch_latents_have_unit_variance_on_fit_set(shapes_uint8):
    """After fit, every latent channel has mean ~0 and std ~1 over the fit images."""
    tok = PatchTokenizer().fit(shapes_uint8)
    z = tok.encode(uint8_to_float(shapes_uint8))
    per_channel = z.transpose(0, 1).reshape(48, -1)  # (C, B*g*g)
    assert per_channel.mean(1).abs().max() < 1e-4
    assert (per_channel.std(1, unbiased=False) - 1).abs().max() < 1e-3


def test_patch_position_layout():
    """Channel c*16 + i*4 + j of latent cell (gy, gx) is pixel (4gy+i, 4gx+j) of colour c."""
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    tok = PatchTokenizer()
    z = tok.encode(x) * 0.5  # undo the default std 0.5
    assert torch.equal(z[0, 2 * 16 + 1 * 4 + 3, 5, 6], x[0, 2, 4 * 5 + 1, 4 * 6 + 3])


def test_kmeans_codes_and_decode_contract(shapes_uint8):
    """Codes are long (B, 64) in [0, K), the nearest centroid; decode is (B, 3, 32, 32) in [-1, 1]."""
    tok = KMeansTokenizer(codebook_size=16).fit(shapes_uint8[:64], iters=5, generator=torch.Generator().manual_seed(0))
    assert tok.spec.tokens == "discrete" and tok.spec.grid == 8 and tok.spec.vocab_size == 16
    x = uint8_to_float(shapes_uint8[64:72])
    codes = tok.encode(x)
    assert codes.dtype == torch.long and codes.shape == (8, 64)
    assert 0 <= int(codes.min()) and int(codes.max()) < 16
    patches = torch.nn.functional.pixel_unshuffle(x, 4).flatten(2).transpose(1, 2)  # (B, 64, 48)
    brute = torch.cdist(patches.reshape(-1, 48), tok.centroids).argmin(1).view(8, 64)
    dist = torch.cdist(patches.reshape(-1, 48), tok.centroids)
    assert torch.allclose(dist.gather(1, codes.view(-1, 1)), dist.gather(1, brute.view(-1, 1)), atol=1e-4)
    img = tok.decode(codes)
    assert img.shape == (8, 3, 32, 32) and img.min() >= -1 and img.max() <= 1
    assert tok.encode_flops() == 2 * 64 * 16 * 48 and tok.decode_flops() == 0


def test_kmeans_error_falls_as_codebook_grows(shapes_uint8):
    """Held-out reconstruction PSNR with K=128 beats K=8 by a clear margin."""
    train, held = shapes_uint8[:200], uint8_to_float(shapes_uint8[200:])
    psnr = {}
    for k in (8, 128):
        tok = fit_weight_free("kmeans", train, codebook_size=k, seed=0)
        psnr[k] = _psnr(tok.decode(tok.encode(held)), held)
    assert psnr[128] > psnr[8] + 3.0, psnr


def test_kmeans_fit_is_deterministic_under_generator(shapes_uint8):
    """The same seed gives identical codebooks; a different seed gives a different one."""
    def fit(seed: int) -> KMeansTokenizer:
        return KMeansTokenizer(8).fit(shapes_uint8[:32], iters=3, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(fit(1).centroids, fit(1).centroids)
    assert not torch.equal(fit(1).centroids, fit(2).centroids)
    rnd = KMeansTokenizer(8).fit(shapes_uint8[:32], iters=3, init="random")
    assert rnd.fit_history[-1] <= rnd.fit_history[0]


def test_lloyd_reseeds_empty_clusters():
    """A centroid that no point is nearest to is moved onto a data point (every code stays usable)."""
    pts = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.1, 5.0]])
    init = torch.tensor([[0.0, 0.0], [5.0, 5.0], [100.0, 100.0]])
    cents, _ = lloyd(pts, init, iters=1)
    assert (torch.cdist(cents[2:], pts).min() == 0).item()


@pytest.mark.parametrize("kind", ["patch", "kmeans"])
def test_save_load_round_trip(kind, shapes_uint8, tmp_path):
    """A saved tokenizer loads back with the same spec, fingerprint and identical encodings."""
    tok = fit_weight_free(kind, shapes_uint8[:48], codebook_size=16, seed=0)
    tok.save(tmp_path / "tok")
    meta = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    assert meta["kind"] == kind and meta["version"] == 1 and meta["spec"] == tok.spec.to_dict()
    back = load_tokenizer(tmp_path / "tok")
    assert type(back) is type(tok) and back.spec == tok.spec and back.fingerprint() == tok.fingerprint()
    x = uint8_to_float(shapes_uint8[48:56])
    assert torch.equal(back.encode(x), tok.encode(x))
    other = fit_weight_free(kind, shapes_uint8[100:148], codebook_size=16, seed=0)
    assert other.fingerprint() != tok.fingerprint()


def test_load_tokenizer_errors_are_user_errors(tmp_path):
    """Missing dir, missing/corrupt JSON, truncated tensors, unknown kind and spec mismatch all raise UserError."""
    with pytest.raises(UserError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="missing"):
        load_tokenizer(tmp_path / "empty")

    good = tmp_path / "good"
    PatchTokenizer().save(good)
    load_tokenizer(good)
    meta = json.loads((good / "tokenizer.json").read_text())

    def variant(name: str, text: str | None = None, tensors: bytes | None = None):
        d = tmp_path / name
        d.mkdir()
        (d / "tokenizer.json").write_text(text if text is not None else json.dumps(meta))
        good_tensors = (good / "tensors.safetensors").read_bytes()
        (d / "tensors.safetensors").write_bytes(tensors if tensors is not None else good_tensors)
        return d

    with pytest.raises(UserError, match="corrupt JSON"):
        load_tokenizer(variant("badjson", text='{"kind": "patch", '))
    with pytest.raises(UserError, match="corrupt tensor file"):
        load_tokenizer(variant("trunc", tensors=(good / "tensors.safetensors").read_bytes()[:40]))
    with pytest.raises(UserError, match="unknown tokenizer kind"):
        load_tokenizer(variant("unknown", text=json.dumps({**meta, "kind": "vqgan"})))
    with pytest.raises(UserError, match="does not match"):
        load_tokenizer(variant("spec", text=json.dumps({**meta, "spec": {**meta["spec"], "channels": 12}})))


def test_loader_registry_dispatches_on_kind(tmp_path, monkeypatch):
    """A kind added to the registry is loaded by its loader."""
    d = tmp_path / "custom"
    PatchTokenizer().save(d)
    meta = json.loads((d / "tokenizer.json").read_text())
    (d / "tokenizer.json").write_text(json.dumps({**meta, "kind": "unit-test-kind"}))
    calls = []

    def loader(path):
        calls.append(path)
        return PatchTokenizer()

    monkeypatch.setitem(LOADERS, "unit-test-kind", loader)
    assert isinstance(load_tokenizer(d), PatchTokenizer) and calls == [d]


def test_fit_rejects_wrong_images():
    """Fitting on float or wrongly shaped images is a UserError, as is an unknown kind."""
    with pytest.raises(UserError):
        PatchTokenizer().fit(torch.zeros(2, 3, 32, 32))
    with pytest.raises(UserError):
        KMeansTokenizer(8).fit(torch.zeros(2, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(UserError):
        fit_weight_free("vq", torch.zeros(2, 3, 32, 32, dtype=torch.uint8))


def test_kmeans_refuses_more_codes_than_the_images_have_patches():
    """One 32 px image has 64 patches of 4 px: a 512-code codebook would keep codes no patch reaches (it used to fit
    silently on a one-image folder); one line names both fixes. As many patches as codes fits."""
    image = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(UserError, match=r"needs at least 512 patches to fit; 1 training image\(s\) give 64: add images or "
                                        r"lower tokenizer.codebook_size"):
        fit_weight_free("kmeans", image, codebook_size=512)
    assert fit_weight_free("kmeans", image, codebook_size=64).codebook_size == 64
