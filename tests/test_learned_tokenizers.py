"""Learned autoencoders: KL (continuous latents) and LFQ (discrete codes), their training, eval and CLI."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from flopmatch.errors import UserError
from flopmatch.tokenizers.autoencoder import AutoencoderConfig, apply_overrides, preset
from flopmatch.tokenizers.kl import KLAutoencoder
from flopmatch.tokenizers.lfq import LFQAutoencoder, LFQuantizer
from flopmatch.tokenizers.registry import load_learned, make_autoencoder
from flopmatch.tokenizers.train_ae import train_autoencoder


def tiny_config(kind: str, **kw) -> AutoencoderConfig:
    """A tokenizer of a few thousand parameters: widths 8-16, 8x8 grid at 32x32, fp32, CPU."""
    base = dict(kind=kind, channels=[8, 16], patch=2, num_res_blocks=1, latent_channels=4, bits=6,
                steps=3, batch_size=4, warmup_steps=1, precision="fp32", device="cpu", log_every=1,
                num_train=32, stats_images=32)
    base.update(kw)
    return AutoencoderConfig(**base).validate()


@pytest.fixture(scope="module")
def shapes_uint8() -> torch.Tensor:
    """(32, 3, 32, 32) uint8 procedural shapes images (the project's default data)."""
    from flopmatch.data.shapes import ShapesConfig, ShapesDataset

    return ShapesDataset(ShapesConfig(num_train=32, num_eval=0), "train", disk_cache=False).images_uint8()


def _images(shapes_uint8: torch.Tensor, n: int = 4) -> torch.Tensor:
    return shapes_uint8[:n].float() / 127.5 - 1.0


@pytest.mark.parametrize("kind", ["kl", "lfq"])
def test_encode_decode_shapes_and_dtypes(kind, shapes_uint8):
    """encode gives (B, C, 8, 8) float latents or (B, 64) long tokens in range; decode gives (B, 3, 32, 32) in [-1, 1]."""
    torch.manual_seed(0)
    tok = make_autoencoder(tiny_config(kind)).eval()
    assert isinstance(tok, KLAutoencoder if kind == "kl" else LFQAutoencoder)
    x = _images(shapes_uint8, 3)
    z = tok.encode(x)
    if kind == "kl":
        assert tok.spec.tokens == "continuous" and tok.spec.grid == 8 and tok.spec.channels == 4
        assert z.shape == (3, 4, 8, 8) and z.dtype == torch.float32
    else:
        assert tok.spec.tokens == "discrete" and tok.spec.vocab_size == 64 and tok.spec.seq_len == 64
        assert z.shape == (3, 64) and z.dtype == torch.long
        assert int(z.min()) >= 0 and int(z.max()) < tok.spec.vocab_size
    y = tok.decode(z)
    assert y.shape == (3, 3, 32, 32) and y.dtype == torch.float32
    assert float(y.min()) >= -1.0 and float(y.max()) <= 1.0


def test_lfq_tokens_raster_order_and_round_trip():
    """Token at grid cell (i, j) is position i*g + j, its value is sum_k [q_k > 0] 2^k, and tokens -> codes inverts it."""
    q = LFQuantizer(bits=6)
    codes = torch.arange(64)  # one distinct code per cell of an 8x8 grid
    bits = ((codes.unsqueeze(1) // 2 ** torch.arange(6)) % 2).float() * 2 - 1  # (64, 6)
    z = bits.t().reshape(1, 6, 8, 8) * 0.3  # (1, bits, g, g); cell (i, j) holds code i*8 + j
    tokens = q.codes_to_tokens(q.quantize(z))
    assert torch.equal(tokens, codes.unsqueeze(0))
    assert torch.equal(q.tokens_to_codes(tokens, 8), q.quantize(z))


def test_lfq_straight_through_gradient_flows():
    """The quantiser's output equals sign(z) but d(output)/dz is the identity, and the encoder gets gradients."""
    q = LFQuantizer(bits=4)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    q_st, _, _ = q(z)
    assert torch.equal(q_st.detach(), torch.where(z > 0, 1.0, -1.0))
    w = torch.randn_like(q_st)
    (q_st * w).sum().backward()
    assert torch.allclose(z.grad, w)

    torch.manual_seed(0)
    tok = make_autoencoder(tiny_config("lfq", commitment_weight=0.0, entropy_weight=0.0)).train()
    recon, loss, _ = tok.training_forward(torch.rand(2, 3, 32, 32) * 2 - 1)
    (recon.square().mean() + loss).backward()
    assert tok.encoder.conv_in.weight.grad.abs().sum() > 0  # reached through the reconstruction path only


def test_lfq_factorised_entropy_equals_softmax_over_codebook():
    """Per-position entropy from per-bit sigmoids equals the entropy of softmax(2<z, c>/T) over all 2^bits codes."""
    q = LFQuantizer(bits=4, entropy_temperature=0.5)
    z = torch.randn(3, 4, 2, 2)
    per_sample, codebook = q.entropy_terms(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
    p = torch.softmax(2 * flat @ q.codebook.t() / 0.5, dim=-1)  # (N, 16)
    explicit = -(p * p.log()).sum(-1).mean()
    avg = p.mean(0)
    assert torch.allclose(per_sample, explicit, atol=1e-5)
    assert torch.allclose(codebook, -(avg * avg.log()).sum(), atol=1e-5)


def test_kl_latents_normalised_and_decode_inverts_normalisation(shapes_uint8):
    """After fit_latent_stats, latents of the fit images have per-channel mean 0 and std 1; decode undoes the scaling."""
    torch.manual_seed(0)
    tok = make_autoencoder(tiny_config("kl")).eval()
    tok.fit_latent_stats(shapes_uint8, batch_size=7)
    z = tok.encode(_images(shapes_uint8, len(shapes_uint8)))
    per_channel = z.transpose(0, 1).flatten(1)  # (C, N*g*g)
    assert per_channel.mean(1).abs().max() < 1e-4
    assert (per_channel.std(1, unbiased=False) - 1).abs().max() < 1e-3
    x = _images(shapes_uint8, 2)
    mean, _ = tok.posterior(x)
    assert torch.allclose(tok.decode(tok.encode(x)), tok.decoder(mean).clamp(-1, 1), atol=1e-5)


@pytest.mark.parametrize("kind,patch,channels", [("kl", 2, [8, 16]), ("lfq", 2, [8, 16]), ("kl", 1, [4, 8, 8])])
def test_analytic_flops_match_counter(kind, patch, channels):
    """encode_flops/decode_flops equal torch's FlopCounterMode count for one image (within 2%)."""
    tok = make_autoencoder(tiny_config(kind, patch=patch, channels=channels)).eval()
    x = torch.zeros(1, 3, 32, 32)
    with FlopCounterMode(display=False) as enc:
        z = tok.encode(x)
    with FlopCounterMode(display=False) as dec:
        tok.decode(z)
    assert abs(enc.get_total_flops() - tok.encode_flops()) <= 0.02 * enc.get_total_flops()
    assert abs(dec.get_total_flops() - tok.decode_flops()) <= 0.02 * dec.get_total_flops()


@pytest.mark.parametrize("kind", ["kl", "lfq"])
def test_save_load_round_trip_and_registry(kind, tmp_path, shapes_uint8):
    """A saved tokenizer loads (directly and via load_tokenizer) with the same fingerprint and encodings, RNG untouched."""
    from flopmatch.tokenizers.registry import load_tokenizer

    torch.manual_seed(0)
    tok = make_autoencoder(tiny_config(kind)).eval()
    if kind == "kl":
        tok.fit_latent_stats(shapes_uint8)
    tok.save(tmp_path / kind)
    x = _images(shapes_uint8)
    rng = torch.get_rng_state()
    for loaded in (load_learned(tmp_path / kind), load_tokenizer(tmp_path / kind)):
        assert torch.equal(torch.get_rng_state(), rng)  # loading does not consume the caller's RNG
        assert type(loaded) is type(tok) and loaded.spec == tok.spec
        assert loaded.fingerprint() == tok.fingerprint()
        assert torch.equal(loaded.encode(x), tok.encode(x))
    with torch.no_grad():
        tok.decoder.conv_out.bias.add_(1e-3)
    assert load_learned(tmp_path / kind).fingerprint() != tok.fingerprint()  # weights change -> fingerprint changes


def test_bad_tokenizer_directories_raise_user_error(tmp_path):
    """Missing, corrupt, wrong-kind, wrong-version and config/tensor-mismatched directories raise one-line UserErrors."""
    from flopmatch.tokenizers.registry import load_kl, load_tokenizer

    good = tmp_path / "good"
    make_autoencoder(tiny_config("lfq")).save(good)
    meta = json.loads((good / "tokenizer.json").read_text())
    tensors = (good / "tensors.safetensors").read_bytes()

    def variant(name, meta_obj=None, text=None, tensor_bytes=tensors):
        d = tmp_path / name
        d.mkdir()
        (d / "tokenizer.json").write_text(text if text is not None else json.dumps(meta_obj or meta))
        if tensor_bytes is not None:
            (d / "tensors.safetensors").write_bytes(tensor_bytes)
        return d

    cases = [
        (tmp_path / "absent", "does not exist"),
        (variant("badjson", text='{"kind": "lfq",'), "corrupt JSON"),
        (variant("notensors", tensor_bytes=None), "missing file"),
        (variant("trunc", tensor_bytes=tensors[:50]), "corrupt tensor file"),
        (variant("version", {**meta, "version": 99}), "version"),
        (variant("unknownkey", {**meta, "config": {**meta["config"], "widht": 3}}), "unknown config key"),
        (variant("kindmix", {**meta, "config": {**meta["config"], "kind": "kl"}}), "kind"),
        (variant("shape", {**meta, "config": {**meta["config"], "channels": [8, 24]}}), "shape|does not match"),
        (variant("bits", {**meta, "config": {**meta["config"], "bits": 7},
                          "spec": {**meta["spec"], "vocab_size": 128}}), "shape"),
    ]
    for path, pattern in cases:
        for loader in (load_learned, load_tokenizer):
            with pytest.raises(UserError, match=pattern) as err:
                loader(path)
            assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="expected a 'kl' tokenizer"):
        load_kl(good)


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_presets_match_kl_and_lfq(name):
    """In each preset KL and LFQ share the 8x8 grid and every encoder/decoder tensor shape except the bottleneck convs."""
    kl, lfq = (make_autoencoder(preset(name, kind)) for kind in ("kl", "lfq"))
    assert kl.spec.grid == lfq.spec.grid == 8 and kl.spec.seq_len == lfq.spec.seq_len == 64
    bottleneck = {"encoder.conv_out.weight", "encoder.conv_out.bias", "decoder.conv_in.weight"}
    shapes = [{k: v.shape for k, v in m.state_dict().items() if k.split(".")[0] in ("encoder", "decoder")} for m in (kl, lfq)]
    assert shapes[0].keys() == shapes[1].keys()
    assert {k for k in shapes[0] if shapes[0][k] != shapes[1][k]} == bottleneck


def test_config_overrides_are_typed_and_checked():
    """--set values are parsed to the field's type; unknown keys, sections and impossible values are UserErrors."""
    cfg = apply_overrides(preset("cpu", "lfq"), ["bits=9", "channels=16,32", "lr=1e-3", "recon_loss=l2"])
    assert cfg.bits == 9 and cfg.channels == [16, 32] and cfg.lr == 1e-3 and cfg.recon_loss == "l2"
    for bad in (["bitz=9"], ["bits=nine"], ["train.lr=1"], ["recon_loss=lpips"], ["channels=8,8,8,8,8,8"], ["patch=0"]):
        with pytest.raises(UserError):
            apply_overrides(preset("cpu", "lfq"), bad)
    with pytest.raises(UserError):
        preset("tpu", "kl")


def test_training_is_deterministic_under_seed(shapes_uint8):
    """Two trainings with the same config and seed give the same weights; another seed does not."""
    prints = [train_autoencoder(tiny_config("kl", seed=s), shapes_uint8, progress=False)[0].fingerprint()
              for s in (0, 0, 1)]
    assert prints[0] == prints[1] != prints[2]


def test_adversarial_term_switches_on_at_adv_start(shapes_uint8, tmp_path):
    """With adv_weight > 0 the generator and discriminator losses are logged (finite) from adv_start on, not before."""
    train_autoencoder(tiny_config("lfq", adv_weight=0.1, adv_start=1), shapes_uint8, tmp_path, progress=False)
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert "d_loss" not in log[0] and "g_adv" not in log[0]
    assert all(math.isfinite(r["d_loss"]) and math.isfinite(r["g_adv"]) for r in log[1:]) and len(log) == 3


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["kl", "lfq"])
def test_tiny_tokenizer_overfits_a_handful_of_images(kind, shapes_uint8):
    """On 4 images, 150 steps take reconstruction MSE (images in [-1, 1]) from > 0.1 to below 0.025 (PSNR > 22 dB)."""
    images = shapes_uint8[:4]
    cfg = tiny_config(kind, channels=[16, 32], steps=150, batch_size=4, lr=3e-3, warmup_steps=10,
                      recon_loss="l2", bits=8, log_every=1000)
    x = images.float() / 127.5 - 1.0
    torch.manual_seed(0)
    with torch.no_grad():
        before = float((make_autoencoder(cfg).eval().decoder(torch.zeros(4, cfg.z_channels, 8, 8)) - x).square().mean())
    tok, _ = train_autoencoder(cfg, images, progress=False)
    after = float((tok.decode(tok.encode(x)) - x).square().mean())
    assert before > 0.1 and after < 0.025, (before, after)


def test_eval_metrics_endpoints(shapes_uint8):
    """Identical images give PSNR 100 (cap), SSIM 1, MSE 0; uniform tokens give perplexity = vocab, one token gives 1."""
    from flopmatch.evaluation.tokenizer import code_metrics, image_metrics

    x = _images(shapes_uint8, 8)
    same = image_metrics(x, x)
    assert same["psnr"] == pytest.approx(100.0) and same["ssim"] == pytest.approx(1.0, abs=1e-3) and same["mse"] == 0
    noisy = image_metrics(x, x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0)))
    assert noisy["psnr"] < 40 and noisy["ssim"] < same["ssim"]
    uniform = code_metrics(torch.arange(16).repeat(4, 1), vocab_size=16, bits=4)
    assert uniform["perplexity"] == pytest.approx(16) and uniform["codebook_usage"] == 1.0
    assert uniform["bit_balance"] == [0.5] * 4
    single = code_metrics(torch.full((4, 16), 5), vocab_size=16, bits=4)
    assert single["perplexity"] == pytest.approx(1) and single["codebook_usage"] == 1 / 16


def test_image_metrics_in_chunks_equal_one_pass(shapes_uint8, monkeypatch):
    """The chunked metrics (bounded memory for large --num) equal one pass over every image, chunks of unequal size too."""
    from flopmatch.evaluation import tokenizer as tok_eval

    x = _images(shapes_uint8, 10)
    y = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    whole = tok_eval.image_metrics(x, y)
    monkeypatch.setattr(tok_eval, "METRIC_CHUNK", 3)  # chunks of 3, 3, 3, 1
    chunked = tok_eval.image_metrics(x, y)
    assert chunked == pytest.approx(whole, rel=1e-6)


@pytest.mark.slow
def test_ssim_equals_torchmetrics(shapes_uint8):
    """Our SSIM equals torchmetrics' structural_similarity_index_measure per image (slow: torchmetrics' import)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    from flopmatch.evaluation.tokenizer import ssim

    a = (_images(shapes_uint8, 6) + 1) / 2
    b = (a + 0.05 * torch.randn(a.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    ref = structural_similarity_index_measure(b, a, data_range=1.0, reduction="none")
    assert torch.allclose(ssim(b, a), ref, atol=1e-5)


def _parser() -> argparse.ArgumentParser:
    from flopmatch.cli.tokenizer import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_train_then_eval_writes_outputs(tmp_path):
    """`tokenizer train` writes tokenizer.json, tensors and train_log.jsonl; `tokenizer eval` writes eval.json."""
    out = tmp_path / "lfq"
    sets = ["channels=8,16", "bits=6", "num_train=16", "batch_size=4", "log_every=1", "precision=fp32"]

    def train_argv(directory, extra=()):
        return (["tokenizer", "train", "--kind", "lfq", "--out", str(directory), "--steps", "2", "--quiet"]
                + sum((["--set", s] for s in [*sets, *extra]), []))

    args = _parser().parse_args(train_argv(out))
    assert args.func(args) == 0
    meta = json.loads((out / "tokenizer.json").read_text())
    assert meta["kind"] == "lfq" and meta["version"] == 1 and meta["spec"]["vocab_size"] == 64
    assert meta["data"]["name"] == "shapes" and meta["data"]["fingerprint"]
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 1] and all("psnr" in r and "loss" in r for r in log)

    args = _parser().parse_args(["tokenizer", "eval", str(out), "--num", "8", "--rfid", "none", "--no-attributes", "--quiet"])
    assert args.func(args) == 0
    ev = json.loads((out / "eval.json").read_text())
    for key in ("psnr", "ssim", "mse", "codebook_usage", "perplexity", "encode_flops", "decode_flops"):
        assert isinstance(ev[key], (int, float)), key
    assert ev["rfid"] is None and ev["attribute_accuracy"] is None and 0 < ev["codebook_usage"] <= 1 and 1 <= ev["perplexity"] <= 64
    assert ev["manifest"]["tokenizer_fingerprint"] == load_learned(out).fingerprint()

    with pytest.raises(UserError, match="already holds a tokenizer"):
        args = _parser().parse_args(train_argv(out))
        args.func(args)
    with pytest.raises(UserError, match="unknown config key"):
        args = _parser().parse_args(train_argv(tmp_path / "x", ["nope=1"]))
        args.func(args)


def _stopped_at(monkeypatch, calls: int, how: str) -> None:
    """Make the training's ``calls``-th step stop it: ``sigint`` as Ctrl-C does (a real SIGINT, caught at the step's
    end), ``crash`` as a hard kill would (an exception in the middle of the step, nothing saved at it)."""
    import signal

    import flopmatch.tokenizers.train_ae as train_ae

    real, seen = train_ae.psnr_from_mse, []

    def psnr(mse):  # called once per step, after the optimizer steps
        seen.append(1)
        if len(seen) == calls:
            if how == "crash":
                raise RuntimeError("killed")
            signal.raise_signal(signal.SIGINT)
        return real(mse)

    monkeypatch.setattr(train_ae, "psnr_from_mse", psnr)


def _log(directory) -> list[dict]:
    rows = [json.loads(line) for line in (directory / "train_log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("elapsed_s", "images_per_s")} for r in rows]


@pytest.mark.parametrize("cfg", [dict(kind="kl"), dict(kind="lfq", adv_weight=0.1, adv_start=3)], ids=["kl", "lfq-adv"])
def test_stopped_training_resumes_to_the_uninterrupted_tokenizer(cfg, shapes_uint8, tmp_path, monkeypatch, capsys):
    """Ctrl-C at step 5, then a crash at step 10 with a state saved every step, each followed by the same call:
    the tokenizer, its train log and summary equal an uninterrupted training bit for bit (the batch order crosses an
    epoch, the KL's noise and the discriminator's state are restored), and no state file is left."""
    import flopmatch.tokenizers.train_ae as train_ae
    import flopmatch.trainstate as trainstate

    config = tiny_config(steps=14, **cfg)
    direct, summary = train_autoencoder(config, shapes_uint8, tmp_path / "direct", progress=False)
    out = tmp_path / "resumed"
    out.mkdir()
    _stopped_at(monkeypatch, 5, "sigint")
    with pytest.raises(KeyboardInterrupt):
        train_autoencoder(config, shapes_uint8, out, progress=False)
    assert (out / train_ae.STATE_FILE).exists() and not (out / "tokenizer.json").exists()
    assert "stopped after step 5/14 with its state saved" in capsys.readouterr().err
    monkeypatch.undo()
    monkeypatch.setattr(trainstate, "SAVE_EVERY_S", 0.0)  # a state at every step: a hard kill loses at most that step
    _stopped_at(monkeypatch, 5, "crash")  # the 5th step of this call: step 10
    with pytest.raises(RuntimeError, match="killed"):
        train_autoencoder(config, shapes_uint8, out, progress=False)
    monkeypatch.undo()
    resumed, summary2 = train_autoencoder(config, shapes_uint8, out, progress=False)
    assert "resuming the {} tokenizer's training at step 9/14".format(cfg["kind"]) in capsys.readouterr().err
    a, b = direct.state_dict(), resumed.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert _log(out) == _log(tmp_path / "direct") and len(_log(out)) == 14
    assert summary2["final_train_psnr"] == summary["final_train_psnr"]
    assert not (out / train_ae.STATE_FILE).exists() and load_learned(out).fingerprint() == direct.fingerprint()


def test_an_unfinished_training_of_other_settings_is_refused(shapes_uint8, tmp_path, monkeypatch):
    """Continuing needs the same settings and images: another config or other images is refused in one line naming
    what differs, and the unfinished state is kept."""
    import flopmatch.tokenizers.train_ae as train_ae

    _stopped_at(monkeypatch, 2, "sigint")
    with pytest.raises(KeyboardInterrupt):
        train_autoencoder(tiny_config("kl", steps=6), shapes_uint8, tmp_path, progress=False)
    monkeypatch.undo()
    state = (tmp_path / train_ae.STATE_FILE).read_bytes()
    with pytest.raises(UserError, match=r"unfinished training of other settings \(lr, steps differ\); give the same"):
        train_autoencoder(tiny_config("kl", steps=8, lr=1e-3), shapes_uint8, tmp_path, progress=False)
    with pytest.raises(UserError, match=r"unfinished training of other images"):
        train_autoencoder(tiny_config("kl", steps=6), shapes_uint8.flip(0), tmp_path, progress=False)
    assert (tmp_path / train_ae.STATE_FILE).read_bytes() == state


def test_cli_continues_a_killed_training_past_its_half_written_files(tmp_path, monkeypatch):
    """`tokenizer train` into the folder of a training stopped by Ctrl-C, where a kill -9 also left an atomic write's
    temporary file: the same command continues it (the temporary removed) and ends at the uninterrupted tokenizer."""
    sets = ["channels=8,16", "bits=6", "num_train=16", "batch_size=4", "log_every=1", "precision=fp32"]

    def run(directory):
        args = _parser().parse_args(["tokenizer", "train", "--kind", "lfq", "--out", str(directory), "--steps", "6",
                                     "--quiet"] + sum((["--set", s] for s in sets), []))
        return args.func(args)

    assert run(tmp_path / "direct") == 0
    _stopped_at(monkeypatch, 3, "sigint")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed")
    monkeypatch.undo()
    (tmp_path / "resumed" / ".train_log.jsonl.k2j3.tmp").write_text("{")  # a rewrite the kill cut short
    assert run(tmp_path / "resumed") == 0
    assert not list((tmp_path / "resumed").glob("*.tmp")) and not list((tmp_path / "resumed").glob(".*.tmp"))
    assert load_learned(tmp_path / "resumed").fingerprint() == load_learned(tmp_path / "direct").fingerprint()
