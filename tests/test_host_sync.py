"""No host synchronisation inside the training step or a sampling loop, checked on a CPU.

On a GPU a host sync (``.item()``, ``bool(tensor)``, ``float(tensor)``, a data-dependent shape such as ``x[mask]``
or ``nonzero``) stalls the launch queue each step; scripts/gpu-check.sh catches one there with
``torch.cuda.set_sync_debug_mode("error")``. This file catches the same calls without a GPU: a TorchDispatchMode
sees every aten op the step runs (forward, backward through autograd, clipping, AdamW, the EMA update), and the
ops that would synchronise a CUDA device are the ones listed in ``SYNCING``. Blind spots: copies between host and
device (``.to``, ``.cpu()``, ``.tolist()``, ``.numpy()``, ``torch.tensor`` of tensor elements) are no ops on a CPU and
cannot be seen here; gpu-check's probe-sync and loop-sync checks cover them on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from flopmatch import PARADIGMS
from flopmatch.bench import net_spec, sizes, train_config
from flopmatch.config import SampleConfig
from flopmatch.probe import SamplingProbe, TrainingProbe

# aten ops that read a device value on the host: a scalar conversion (item, bool, int, float, comparisons in Python
# control flow all reach _local_scalar_dense), or an output whose size depends on the data.
SYNCING = {"_local_scalar_dense", "is_nonzero", "equal", "allclose", "nonzero", "masked_select", "masked_scatter",
           "_unique2", "unique_dim", "unique_consecutive", "repeat_interleave", "bincount", "histc"}


class SyncRecorder(TorchDispatchMode):
    """Records the syncing aten ops run under it (``seen``: op names), and boolean-mask indexing (``x[mask]``,
    ``x[mask] = v``: a nonzero inside the index kernel, which the dispatcher does not show by itself)."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNCING:
            self.seen.append(name)
        elif name in ("index", "index_put", "index_put_") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else []) or []):
            self.seen.append(f"{name} with a boolean mask")
        return func(*args, **(kwargs or {}))


def _syncs(fn) -> list[str]:
    fn()  # warm-up, as on a GPU: first-call work (lazy init) is not the steady state
    with SyncRecorder() as rec:
        fn()
    return rec.seen


def test_the_recorder_sees_what_would_sync_a_gpu():
    """The check can fail: each way of syncing is seen, through autograd too; multinomial and argmax are not syncs."""
    x = torch.randn(8, requires_grad=True)

    def syncing():
        y = (x * 2).sum()
        y.backward()
        mask = x.detach() > 0
        return y.item(), bool(mask.any()), x.detach()[mask], int(x.argmax()), mask.nonzero()

    seen = _syncs(syncing)
    assert seen.count("_local_scalar_dense") == 3 and "index with a boolean mask" in seen and "nonzero" in seen
    assert _syncs(lambda: (torch.multinomial(x.detach().abs(), 2), x.argmax(), x.detach().topk(3))) == []


@pytest.mark.parametrize("name", PARADIGMS)
def test_a_training_step_never_syncs(name):
    """train_step (loss, backward, clipping, fused AdamW, EMA) and the loop's batch randomness (objective.draw)."""
    sz = sizes(True)
    spec = net_spec(name, 1, sz)
    probe = TrainingProbe(name, spec, 8, train_config(), torch.device("cpu"), True, sz.text)
    g = torch.Generator().manual_seed(0)
    assert _syncs(probe.step) == []
    assert _syncs(lambda: probe.objective.draw(8, spec, torch.device("cpu"), g)) == []


SETTINGS = {"diffusion": [SampleConfig(), SampleConfig(solver="heun", shift=3.0, steps=4), SampleConfig(guidance=1.0)],
            "masked": [SampleConfig(), SampleConfig(top_k=5, temperature=0.8, steps=4), SampleConfig(guidance=1.0)],
            "autoregressive": [SampleConfig(), SampleConfig(kv_cache=False), SampleConfig(top_k=5, temperature=0.8),
                               SampleConfig(guidance=1.0)]}


@pytest.mark.parametrize("name", PARADIGMS)
def test_sampling_never_syncs(name):
    """Every sampler at its default setting and the variants a study sweeps (solver, shift, top-k, temperature, no
    guidance, next-token without its KV cache)."""
    sz = sizes(True)
    probe = SamplingProbe(name, net_spec(name, 1, sz), 4, torch.device("cpu"), True, sz.text)
    for sample in SETTINGS[name]:
        assert _syncs(lambda: probe.run(sample)) == [], sample
