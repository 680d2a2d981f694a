"""Diffusion's ODE solvers (flopmatch.objectives.ode): accuracy and order on a flow with a known
solution, SD3's time shift, FLOPs that follow the solver, Euler unchanged, and the settings' plumbing.

The toy flow is the exact rectified-flow velocity between per-dimension Gaussian data
N(m, s^2) and noise N(0, 1): on the path x_t = (1 - t) x0 + t eps, x_t ~ N((1 - t) m, var_t) with
var_t = (1 - t)^2 s^2 + t^2, and E[eps - x0 | x_t = x] = -m + (x - (1 - t) m) (t - (1 - t) s^2) / var_t.
Its ODE maps noise to data by quantiles: x(t) = (1 - t) m + sqrt(var_t) x(1), so x(0) = m + s x(1).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from flop_counting import count_flops
from flopmatch import cli
from flopmatch.cli.eval import parse_sweeps
from flopmatch.config import RunConfig, SampleConfig, apply_overrides, validate_sample
from flopmatch.errors import UserError
from flopmatch.evaluation.run import EvalConfig, entry_key
from flopmatch.objectives.guidance import Guided
from flopmatch.objectives.ode import integrate, num_velocity_calls, shift_time, time_grid
from flopmatch.plan import flops_summary
from tiny import Recorder, empty_text, fake_text, make_tiny

B = 3
M = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64)  # data means
S = torch.tensor([0.3, 0.1, 1.5, 2.0], dtype=torch.float64)  # data stds: small ones bend the paths near t = 0


def gaussian_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Exact rectified-flow velocity (N, 4) between N(M, S^2) data and N(0, 1) noise (module docstring)."""
    var = (1 - t) ** 2 * S**2 + t**2  # (4,)
    return -M + (x - (1 - t) * M) * (t - (1 - t) * S**2) / var


def solve_error(steps: int, solver: str, shift: float = 1.0) -> float:
    """Max |x(0) - exact| over 64 noise draws, solving the toy flow in float64 (no rounding in the way)."""
    x1 = torch.randn(64, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)  # (N, 4)
    out = integrate(gaussian_velocity, x1, time_grid(steps, shift, dtype=torch.float64), solver)
    return (out - (M + S * x1)).abs().max().item()


@pytest.mark.parametrize("heun_steps", [4, 8, 16])
def test_heun_beats_euler_at_equal_network_calls(heun_steps):
    """At the same number of velocity calls (heun-N vs euler-(2N-1)), Heun's error is under half of Euler's."""
    calls = num_velocity_calls(heun_steps, "heun")
    assert calls == 2 * heun_steps - 1 == num_velocity_calls(calls, "euler")
    assert solve_error(heun_steps, "heun") < 0.5 * solve_error(calls, "euler")


@pytest.mark.parametrize("shift,steps", [(1.0, 32), (3.0, 64), (0.5, 32)])
def test_solvers_converge_at_their_orders(shift, steps):
    """Halving the step size halves Euler's error (order 1) and quarters Heun's (order 2), shifted grid or not."""
    euler = solve_error(steps, "euler", shift) / solve_error(2 * steps, "euler", shift)
    heun = solve_error(steps, "heun", shift) / solve_error(2 * steps, "heun", shift)
    assert 1.8 < euler < 2.2, euler
    assert 3.5 < heun < 4.5, heun  # measured 4.02, 3.77, 4.16: the last Euler step does not spoil order 2


def test_one_heun_step_is_one_euler_step():
    """heun-1 is a single step ending at t = 0, so it is plain Euler (EDM skips the correction there)."""
    x1 = torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ts = time_grid(1, dtype=torch.float64)
    assert torch.equal(integrate(gaussian_velocity, x1, ts, "heun"), integrate(gaussian_velocity, x1, ts, "euler"))


@pytest.mark.parametrize("shift", [0.25, 0.5, 1.0, 3.0, 7.5])
def test_shift_maps_unit_interval_onto_itself_monotonically(shift):
    """The shifted grid starts at 1, ends at 0, strictly decreases; shift > 1 only moves times up (toward noise)."""
    u = torch.linspace(1.0, 0.0, 101, dtype=torch.float64)
    ts = time_grid(100, shift, dtype=torch.float64)
    assert ts[0] == 1.0 and ts[-1] == 0.0
    assert (ts[1:] < ts[:-1]).all()
    if shift > 1:
        assert (ts >= u).all() and (ts[1:-1] > u[1:-1]).all()
    elif shift < 1:
        assert (ts <= u).all()


def test_shift_one_is_the_identity_grid():
    """time_grid with shift 1 is exactly today's uniform grid, torch.linspace(1, 0, N + 1)."""
    for steps in (1, 3, 25, 50):
        assert torch.equal(time_grid(steps, 1.0), torch.linspace(1.0, 0.0, steps + 1))


def test_shift_matches_sd3():
    """shift_time is SD3's eq. 23, t_m = a t_n / (1 + (a - 1) t_n) with a = sqrt(m / n), and scales t / (1 - t) by a."""
    t = torch.tensor([0.1, 0.25, 0.5, 0.9], dtype=torch.float64)
    a = math.sqrt(1024**2 / 256**2)  # SD3's resolution ratio m/n for 1024^2 vs 256^2 pixels -> shift 4
    assert torch.allclose(shift_time(t, a), a * t / (1 + (a - 1) * t), rtol=0, atol=1e-15)
    assert shift_time(torch.tensor(0.5), 3.0).item() == pytest.approx(0.75)  # 1.5 / 2, worked by hand
    # the same map seen as SD3 derives it: the noise-to-signal ratio t / (1 - t) is multiplied by the shift
    ts = shift_time(t, a)
    assert torch.allclose(ts / (1 - ts), a * t / (1 - t), rtol=1e-12)


class TimeRecorder(Recorder):
    """A Recorder that also keeps each call's time input t (rows,)."""

    def __init__(self, net):
        super().__init__(net)
        self.times: list[torch.Tensor] = []

    def forward(self, x, text, text_pad, pooled, t=None, cache=None):
        self.times.append(t.detach().clone())
        return super().forward(x, text, text_pad, pooled, t=t, cache=cache)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
@pytest.mark.parametrize("solver,steps", [("euler", 4), ("heun", 4), ("heun", 1), ("heun", 3)])
def test_sample_flops_are_network_calls_times_flops_per_call(solver, steps, guidance, gen):
    """Analytic sampling FLOPs = counted FLOPs = (network calls: N euler, 2N - 1 heun) x FLOPs per call; guidance on every call."""
    t = make_tiny("diffusion", depth=1, perturb=0.2)
    cond, uncond = fake_text(B, gen), empty_text(B)
    sc = SampleConfig(steps=steps, guidance=guidance, solver=solver, shift=3.0)
    rec = TimeRecorder(t.net)
    t.objective.sample(rec, cond, uncond, sc, torch.Generator().manual_seed(0))
    calls = 2 * steps - 1 if solver == "heun" else steps
    assert len(rec.rows) == calls
    assert set(rec.rows) == {B if guidance == 1.0 else 2 * B}  # guided: every call is the doubled batch
    # every call is at a grid time; Heun's corrector evaluates at the step's end time
    grid = time_grid(steps, 3.0)
    expected = [grid[i] for i in range(steps)] if solver == "euler" else [
        g for i in range(steps) for g in ([grid[i], grid[i + 1]] if i < steps - 1 else [grid[i]])]
    assert [tt[0].item() for tt in rec.times] == [e.item() for e in expected]
    analytic = t.objective.sample_flops(t.spec, sc)
    counted = count_flops(lambda: t.objective.sample(t.net, cond, uncond, sc, gen)) / B
    one_call = t.objective.sample_flops(t.spec, SampleConfig(steps=1, guidance=guidance))
    assert counted == analytic == calls * one_call
    if solver == "heun":
        euler = t.objective.sample_flops(t.spec, SampleConfig(steps=steps, guidance=guidance))
        assert analytic * steps == euler * (2 * steps - 1)


def test_euler_with_shift_one_is_unchanged(gen):
    """Euler at shift 1 gives bit-identical latents to the direct Euler loop the sampler ran before solvers existed."""
    t = make_tiny("diffusion", depth=1, perturb=0.2)
    cond, uncond = fake_text(B, gen), empty_text(B)
    steps, guidance = 5, 3.0
    new = t.objective.sample(t.net, cond, uncond, SampleConfig(steps=steps, guidance=guidance), torch.Generator().manual_seed(11))
    # the pre-solver sampler, verbatim
    g = torch.Generator().manual_seed(11)
    x = torch.randn((B, t.spec.channels, t.spec.grid, t.spec.grid), generator=g)
    ts = torch.linspace(1.0, 0.0, steps + 1)
    with torch.no_grad():
        for i in range(steps):
            v = Guided(t.net, cond, uncond, guidance)(x, t=ts[i].expand(B))
            x = x + (ts[i + 1] - ts[i]) * v.float()
    assert torch.equal(new, x)
    heun = t.objective.sample(t.net, cond, uncond, SampleConfig(steps=steps, guidance=guidance, solver="heun"),
                              torch.Generator().manual_seed(11))
    assert not torch.equal(heun, x) and torch.isfinite(heun).all()


def test_eval_keys_name_solver_and_shift_only_when_not_default():
    """Default solver/shift leave eval entry keys as before; other values are appended to the key."""
    ec = EvalConfig(num_samples=64)
    assert entry_key(SampleConfig(guidance=2.0), 25, ec) == "steps=25,cfg=2,temp=1,topk=0,weights=ema,n=64,seed=0"
    assert entry_key(SampleConfig(guidance=2.0, solver="heun", shift=3.0), 25, ec) == (
        "steps=25,cfg=2,temp=1,topk=0,solver=heun,shift=3,weights=ema,n=64,seed=0")
    assert entry_key(SampleConfig(shift=0.5), 8, ec).startswith("steps=8,cfg=3,temp=1,topk=0,shift=0.5,")


def test_settings_are_checked_and_sweepable():
    """solver must be euler|heun and shift > 0 (config and --sweep alike); --sweep solver=.. and shift=.. parse typed."""
    for bad in (SampleConfig(solver="rk4"), SampleConfig(shift=0.0), SampleConfig(shift=-1.0), SampleConfig(shift=math.inf)):
        with pytest.raises(UserError):
            validate_sample(bad)
    with pytest.raises(UserError):
        apply_overrides(RunConfig(), ["sample.solver=dpm"]).validate()
    assert parse_sweeps(["solver=euler,heun", "shift=1,3"]) == {"solver": ["euler", "heun"], "shift": [1.0, 3.0]}
    with pytest.raises(UserError):
        parse_sweeps(["shift=1,0"])


def test_cli_flops_follows_the_solver(capsys):
    """`flopmatch flops --steps N --solver heun` prints (2N - 1)/N times the Euler sampling FLOPs."""
    base = ["flops", "--objective", "diffusion", "--depth", "2", "--steps", "6", "--json", "--set", "text.kind=hash"]
    assert cli.main(base) == 0
    euler = json.loads(capsys.readouterr().out)
    assert cli.main([*base, "--solver", "heun", "--shift", "3"]) == 0
    heun = json.loads(capsys.readouterr().out)
    assert (heun["solver"], heun["shift"], euler["solver"], euler["shift"]) == ("heun", 3.0, "euler", 1.0)
    assert heun["sample_flops_per_image"] * 6 == euler["sample_flops_per_image"] * 11
    cfg = apply_overrides(RunConfig(objective="diffusion"), ["text.kind=hash", "model.depth=2", "sample.steps=6",
                                                             "sample.solver=heun", "sample.shift=3"])
    assert heun == flops_summary(cfg)
