"""Post-hoc EMA (EDM2; flopmatch.ema): the power-function profiles, their reconstruction from snapshots against
averages kept directly, and the run directory's ``ema@SIGMA_REL`` weights."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from flopmatch import ema as phema
from flopmatch.errors import UserError
from flopmatch.files import load_tensors
from flopmatch.rundir import CHECKPOINT, load_weights, parse_weights, posthoc_weights, snapshots
from flopmatch.train import train
from tiny import tiny_run_config


@pytest.mark.parametrize("sigma", [0.01, 0.05, 0.1, 0.2, 0.29])
def test_sigma_rel_and_gamma_are_inverse(sigma):
    gamma = phema.sigma_rel_to_gamma(sigma)
    assert gamma > -1 and phema.gamma_to_sigma_rel(gamma) == pytest.approx(sigma, rel=1e-9)


def test_profile_is_the_discrete_update_and_its_relative_length_is_sigma_rel():
    """The closed-form profile equals the weights the recursive update gives (an EMA of one-hot "weights"),
    sums to 1, and its spread relative to the run length approaches sigma_rel (EDM2 Eq. 3)."""
    t, gamma = 300, phema.sigma_rel_to_gamma(0.1)
    avg = np.zeros(t)
    for s in range(1, t + 1):  # theta_s = e_s: the average's coordinates are the weights of the steps
        beta = phema.power_beta(s, gamma)
        avg *= beta
        avg[s - 1] += 1 - beta
    w = phema.profile(t, gamma)
    np.testing.assert_allclose(w, avg, rtol=1e-10, atol=1e-15)
    assert w.sum() == pytest.approx(1.0) and phema.power_beta(1, gamma) == 0.0
    tau = np.arange(1, t + 1)
    mean = (w * tau).sum()
    assert np.sqrt((w * (tau - mean) ** 2).sum()) / t == pytest.approx(0.1, rel=0.02)


def test_solve_rebuilds_a_profile_it_holds_exactly_and_others_closely():
    steps, gammas = phema.snapshot_steps(400, 16), [phema.sigma_rel_to_gamma(s) for s in (0.05, 0.1)]
    own = phema.solve(steps, gammas, 400, gammas[1])
    assert own.residual < 1e-9 and own.coefficients[-1, 1] == pytest.approx(1.0)
    for sigma, bound in ((0.03, 0.06), (0.07, 0.01), (0.2, 0.04)):
        sol = phema.solve(steps, gammas, 400, phema.sigma_rel_to_gamma(sigma))
        assert sol.residual < bound and sol.coefficients.sum() == pytest.approx(1.0)
    early = phema.solve(steps, gammas, 200, gammas[0])  # an average at step 200 uses no later snapshot
    assert not early.coefficients[np.array(steps) > 200].any()
    assert phema.snapshot_steps(7, 16) == list(range(1, 8)) and phema.snapshot_steps(100, 4) == [25, 50, 75, 100]


def test_posthoc_reconstruction_matches_an_ema_kept_directly_on_a_toy_model():
    """A toy model trained by noisy SGD keeps the two profiles (0.05, 0.10) and snapshots them; the average
    rebuilt for sigma_rel 0.07 matches a power-function EMA of 0.07 kept during the same training, far more
    closely than the neighbouring averages differ from it (so the tolerance can fail)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    keep = (0.05, 0.10)
    direct_sigmas = (0.05, 0.07, 0.10)
    kept = [copy.deepcopy(net) for _ in keep]
    direct = [copy.deepcopy(net) for _ in direct_sigmas]
    g_keep = [phema.sigma_rel_to_gamma(s) for s in keep]
    g_direct = [phema.sigma_rel_to_gamma(s) for s in direct_sigmas]
    total, at = 600, set(phema.snapshot_steps(600, 16))
    snaps: list[tuple[int, list[dict]]] = []
    w_true = torch.randn(8, 1)
    for t in range(1, total + 1):
        x = torch.randn(32, 8)
        loss = ((net(x) - x @ w_true) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        phema.power_update(kept, net, t, g_keep)
        phema.power_update(direct, net, t, g_direct)
        if t in at:
            snaps.append((t, [{k: v.clone() for k, v in m.state_dict().items()} for m in kept]))
    sol = phema.solve([s for s, _ in snaps], g_keep, total, phema.sigma_rel_to_gamma(0.07))
    rebuilt = {k: sum(float(sol.coefficients[i, j]) * snaps[i][1][j][k].double()
                      for i in range(len(snaps)) for j in range(len(keep))) for k in snaps[0][1][0]}

    def dist(a: dict, b: dict) -> float:
        return float(sum(((a[k].double() - b[k].double()) ** 2).sum() for k in a) ** 0.5)

    target = direct[1].state_dict()
    err = dist(rebuilt, target)
    spread = min(dist(direct[0].state_dict(), target), dist(direct[2].state_dict(), target))
    assert spread > 0 and err < 0.05 * spread, (err, spread)
    # the kept 0.05 average is the directly kept one (the same update), and a profile held exactly comes back exactly
    assert dist(kept[0].state_dict(), direct[0].state_dict()) == 0.0


@pytest.fixture(scope="module")
def posthoc_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("phema") / "run"
    cfg = tiny_run_config("diffusion", 12, sets=["train.ema_snapshots=4"])
    train(cfg, run, progress=False)
    return run


def test_run_rebuilds_its_kept_profile_and_new_ones(posthoc_run):
    assert [s for s, _ in snapshots(posthoc_run)] == [3, 6, 9, 12]
    ckpt = load_tensors(posthoc_run / CHECKPOINT)
    _, net = load_weights(posthoc_run, "ema@0.1")
    for name, p in net.named_parameters():  # the kept 0.10 average, rebuilt exactly from the last snapshot
        torch.testing.assert_close(p.detach(), ckpt[f"phema1.{name}"], rtol=0, atol=1e-6)
    _, other = load_weights(posthoc_run, "ema@0.2")
    _, fixed = load_weights(posthoc_run, "ema")
    moved = [n for n, p in other.named_parameters() if not torch.equal(p, dict(net.named_parameters())[n])]
    assert moved  # another sigma_rel is another average
    for (n, b), (_, b2) in zip(other.named_buffers(), fixed.named_buffers()):  # buffers come from the EMA
        assert torch.equal(b, b2), n
    _, sol = posthoc_weights(posthoc_run, 0.2, 12)
    assert 0 <= sol.residual < 0.5 and sol.coefficients.sum() == pytest.approx(1.0)


@pytest.mark.parametrize("bad", ["ema@", "ema@0", "ema@0.5", "ema@x", "raw", "model@0.1"])
def test_bad_weights_names_are_user_errors(bad):
    with pytest.raises(UserError, match="ema@SIGMA_REL"):
        parse_weights(bad)


def test_run_without_snapshots_says_so(tmp_path):
    run = tmp_path / "run"
    train(tiny_run_config("masked", 3, sets=["train.ema_snapshots=0"]), run, progress=False)
    assert not snapshots(run)
    with pytest.raises(UserError, match="no post-hoc EMA snapshots"):
        load_weights(run, "ema@0.1")


@pytest.mark.parametrize("steps,decay", [(40, 0.999), (500, 0.999), (3000, 0.99)])
def test_fixed_ema_relative_length_is_that_of_its_update(steps, decay):
    """The relative length given for training's EMA is the spread of the weights its update really gives (one-hot
    simulation, the initial weights as step 0); while its warm-up rules it is close to sigma_rel 0.09."""
    from flopmatch.schedule import ema_decay_at

    avg = np.zeros(steps + 1)
    avg[0] = 1.0  # the EMA starts as the initial weights
    for s in range(steps):
        b = ema_decay_at(s, decay)
        avg *= b
        avg[s + 1] += 1 - b
    tau = np.arange(steps + 1)
    mean = (avg * tau).sum()
    direct = np.sqrt((avg * (tau - mean) ** 2).sum()) / steps
    assert phema.fixed_ema_sigma_rel(steps, decay) == pytest.approx(direct, rel=1e-9)
    if steps * (1 - decay) < 9:  # warm-up throughout
        assert 0.085 < direct < 0.105
