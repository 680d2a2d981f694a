"""The training loop, written once for all paradigms: budget -> steps, AdamW, warmup + cosine,
EMA, bf16 autocast, atomic checkpoints and exact resume.

Setup, loop, save, in that order (DiT). The number of steps is ``ceil(budget / FLOPs per step)``
with FLOPs per step = analytic training FLOPs per example x global batch, so training stops at the
first step where the cumulative FLOPs reach the budget (at most one step over).

Resume is exact: the checkpoint holds model, EMA, optimizer, step, FLOPs so far and the RNG state
of the generator that draws batches' randomness (timesteps, noise, masks, caption dropout). The
data order is a pure function of (seed, epoch), so the data position is the step itself.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from flopmatch import dist
from flopmatch.checkpoint import atomic_write_text, load_tensors, save_tensors
from flopmatch.config import RunConfig, load_config, save_config, to_dict
from flopmatch.data.prepare import prepare
from flopmatch.device import autocast, resolve_device, use_bf16
from flopmatch.errors import UserError
from flopmatch.nets import Network
from flopmatch.objectives import make_objective
from flopmatch.plan import net_spec_for

CHECKPOINT = "checkpoint/checkpoint.safetensors"


@dataclass
class Plan:
    """What a budget buys: steps and FLOPs, from the analytic count (no model built)."""

    flops_per_example: int
    flops_per_step: int
    steps: int
    params: int

    @property
    def total_flops(self) -> int:
        return self.steps * self.flops_per_step


def plan_steps(budget: float, flops_per_example: int, batch_size: int, params: int = 0) -> Plan:
    """Steps = ceil(budget / FLOPs per step); a budget below one step is a UserError."""
    per_step = flops_per_example * batch_size
    if budget < per_step:
        raise UserError(
            f"budget {budget:.3g} FLOPs is smaller than one training step ({per_step:.3g} FLOPs at batch "
            f"{batch_size}); raise --budget or lower train.batch_size"
        )
    return Plan(flops_per_example, per_step, math.ceil(budget / per_step - 1e-9), params)


def lr_at(step: int, total: int, cfg) -> float:
    """Linear warmup then cosine decay to ``lr * min_lr_ratio`` at the last step (step counts from 0)."""
    warmup = max(1, round(cfg.warmup_frac * total))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - 1 - warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The data order of one epoch: a permutation that depends only on (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def batch_indices(n: int, seed: int, step: int, batch: int) -> torch.Tensor:
    """Dataset indices of global batch ``step`` (B,), walking epochs of fresh permutations."""
    start = step * batch
    out = []
    while len(out) < batch:
        epoch, offset = divmod(start + len(out), n)
        order = epoch_order(n, seed, epoch)
        out.extend(order[offset : offset + batch - len(out)].tolist())
    return torch.tensor(out, dtype=torch.long)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, net: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * net, parameter by parameter."""
    for e, p in zip(ema.parameters(), net.parameters()):
        e.lerp_(p.detach(), 1 - decay)


def ema_decay_at(step: int, decay: float) -> float:
    """EMA warmup: short runs would otherwise average mostly the random init."""
    return min(decay, (1 + step) / (10 + step))


# ----------------------------------------------------------------------------- checkpoints


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list]:
    """Flatten AdamW state to safetensors-able tensors plus JSON param groups (no pickle)."""
    sd = opt.state_dict()
    tensors = {f"optim.{i}.{k}": v if torch.is_tensor(v) else torch.tensor(v) for i, st in sd["state"].items() for k, v in st.items()}
    return tensors, sd["param_groups"]


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list) -> None:
    """Inverse of :func:`optimizer_tensors`."""
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, i, name = key.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(run: Path, net, ema, opt, gen: torch.Generator, state: dict) -> None:
    """One atomic file with model, EMA, optimizer and RNG tensors; scalar state in its metadata."""
    tensors = {f"model.{k}": v for k, v in net.state_dict().items()}
    tensors |= {f"ema.{k}": v for k, v in ema.state_dict().items()}
    opt_t, groups = optimizer_tensors(opt)
    tensors |= opt_t
    tensors["rng.generator"] = gen.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {"state": json.dumps(state), "param_groups": json.dumps(groups)}
    save_tensors(run / CHECKPOINT, tensors, metadata=meta)
    atomic_write_text(run / "checkpoint" / "state.json", json.dumps(state, indent=2) + "\n")  # human-readable copy


def read_checkpoint_meta(path: Path) -> dict:
    """The metadata (JSON strings) of a checkpoint file, without loading tensors."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as e:  # safetensors raises several types for damaged files
        raise UserError(f"corrupt checkpoint {path} ({e}); delete the run directory's checkpoint/ to restart") from None


def read_state(run: str | Path) -> dict | None:
    """Scalar training state (step, flops, done, ...) of a run, or None before the first checkpoint."""
    path = Path(run) / CHECKPOINT
    if not path.exists():
        return None
    return json.loads(read_checkpoint_meta(path)["state"])


def load_weights(run: str | Path, which: str = "ema", device="cpu") -> tuple[RunConfig, Network]:
    """Config and network of a run with its EMA (default) or raw weights, in eval mode."""
    run = Path(run)
    if not run.is_dir():
        raise UserError(f"run directory {run} does not exist")
    if not (run / "config.json").exists():
        raise UserError(f"{run} is not a run directory (no config.json); train one with `flopmatch train --out {run}`")
    cfg = load_config(run / "config.json")
    if not (run / CHECKPOINT).exists():
        raise UserError(f"{run} has no checkpoint yet; (re)run `flopmatch train` on it first")
    from flopmatch.nets import NetSpec

    spec = NetSpec(**json.loads(read_checkpoint_meta(run / CHECKPOINT)["state"])["net_spec"])
    net = Network(spec)
    tensors = load_tensors(run / CHECKPOINT)
    prefix = f"{which}."
    sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    try:
        net.load_state_dict(sd)
    except RuntimeError as e:
        raise UserError(f"checkpoint in {run} does not match its config ({str(e).splitlines()[0]})") from None
    return cfg, net.to(device).eval()


# ----------------------------------------------------------------------------- the loop


class InterruptFlag:
    """Within ``with``, SIGINT (Ctrl-C) sets a flag instead of raising; a second Ctrl-C raises at once.

    Only installed on the main thread (signal handlers cannot be set elsewhere). ``any()`` is
    all-reduced across ranks so every process stops at the same step.
    """

    def __init__(self, device: torch.device):
        self.flag = False
        self._old = None
        self.device = device

    def _handler(self, signum, frame):
        if self.flag:
            raise KeyboardInterrupt
        self.flag = True

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        import signal

        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False

    def any(self) -> bool:
        if not dist.world_size() > 1:
            return self.flag
        return bool(dist.all_reduce_mean(torch.tensor(float(self.flag), device=self.device)).item() > 0)


def _append_metrics(path: Path, rows: list[dict]) -> None:
    with open(path, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop logged rows after the checkpoint's step, so a resumed log equals an uninterrupted one."""
    if path.exists():
        keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        atomic_write_text(path, "".join(ln + "\n" for ln in keep))


def check_same_config(run: Path, cfg: RunConfig) -> None:
    """A run directory belongs to one config; refuse to resume it with a different one."""
    old = json.loads((run / "config.json").read_text())
    new = to_dict(cfg)
    if old != new:
        diffs = [f"{s}.{k}" for s in new if isinstance(new[s], dict) for k in new[s] if old.get(s, {}).get(k) != new[s][k]]
        diffs += [s for s in new if not isinstance(new[s], dict) and old.get(s) != new[s]]
        raise UserError(
            f"{run} holds a run with a different config ({', '.join(diffs[:4])} differ); use a new --out directory"
        )


def train(cfg: RunConfig, out: str | Path, progress: bool = True, stop_after: int | None = None) -> dict:
    """Train (or resume, or report finished) the run in ``out``. Returns the final state dict.

    ``stop_after``: stop (with a checkpoint) after this many steps in this call, as if interrupted;
    used by tests of exact resume.
    """
    cfg.validate()
    run = Path(out)
    device = resolve_device(cfg.train.device)
    dist.init(device)
    objective = make_objective(cfg.objective, cfg.method)

    state = None
    if (run / "config.json").exists():
        check_same_config(run, cfg)
        state = read_state(run)
        if state and state.get("done"):
            if dist.is_main():
                print(f"{run}: finished ({state['step']} steps, {state['flops']:.3g} FLOPs); nothing to do")
            return state
    elif run.exists() and any(run.iterdir()):
        raise UserError(f"{run} exists and is not a flopmatch run directory; choose another --out")

    # Check the budget from the analytic plan before any expensive data preparation.
    spec = net_spec_for(cfg)
    plan = plan_steps(cfg.train.budget, objective.train_flops(spec), cfg.train.batch_size)
    world = dist.world_size()
    if cfg.train.batch_size % world:
        raise UserError(f"train.batch_size {cfg.train.batch_size} must be divisible by the {world} processes")
    data = prepare(cfg, objective, progress=progress and dist.is_main())
    if objective.net_spec(cfg.model, data.tokenizer.spec, data.encoder.dim, data.encoder.max_len) != spec:
        raise UserError(f"tokenizer/text encoder do not match the planned network for {cfg.tokenizer.path or 'the config'}")

    if dist.is_main() and state is None:
        run.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run / "config.json")  # before step 0
        data.tokenizer.save(run / "tokenizer")
    dist.barrier()

    torch.manual_seed(cfg.train.seed)
    net = Network(spec).to(device)  # same init on every rank (seeded)
    ema = copy.deepcopy(net).requires_grad_(False)
    decay, no_decay = [], []
    for name, p in net.named_parameters():
        (decay if p.dim() >= 2 and "stem" not in name else no_decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.train.lr, betas=(0.9, cfg.train.beta2), fused=device.type == "cuda" or None,
    )
    gen = torch.Generator(device=device).manual_seed(cfg.train.seed * 1000 + dist.rank())
    step, flops, elapsed = 0, 0, 0.0
    if state is not None:
        tensors = load_tensors(run / CHECKPOINT, device=device)
        meta = read_checkpoint_meta(run / CHECKPOINT)
        net.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        load_optimizer(opt, tensors, json.loads(meta["param_groups"]))
        gen.set_state(tensors["rng.generator"].cpu())
        torch.set_rng_state(tensors["rng.torch"].cpu())
        step, flops, elapsed = state["step"], state["flops"], state["elapsed_s"]
        if dist.is_main():
            _truncate_metrics(run / "metrics.jsonl", step)
            print(f"{run}: resuming at step {step}/{plan.steps} ({flops:.3g} FLOPs spent)")

    model = dist.wrap(net, device)
    if cfg.train.compile:
        model = torch.compile(model)
    bf16 = use_bf16(cfg.train.precision, device)
    text, rows, x_all = data.text, data.rows, data.x
    empty = data.text.empty_row()
    local = cfg.train.batch_size // world

    def make_state(done: bool) -> dict:
        return {
            "step": step, "total_steps": plan.steps, "flops": flops, "budget": cfg.train.budget,
            "flops_per_step": plan.flops_per_step, "train_flops_per_example": plan.flops_per_example,
            "params": net.num_params(), "elapsed_s": round(elapsed, 3), "done": done, "bf16": bf16,
            "world_size": world, "data_position": {"step": step, "epoch": step * cfg.train.batch_size // len(x_all)},
            "net_spec": spec.to_dict(), "tokenizer": data.tokenizer.spec.to_dict(),
            "text_encoder": data.encoder.name, "objective": cfg.objective,
        }

    from tqdm import tqdm

    bar = tqdm(total=plan.steps, initial=step, desc=f"{cfg.objective} d{cfg.model.depth}", unit="step",
               disable=not (progress and dist.is_main()), dynamic_ncols=True)
    pending: list[dict] = []
    t0 = time.perf_counter() - elapsed
    steps_this_call = 0
    # Ctrl-C only raises a flag; the step in flight finishes and is checkpointed, so the saved
    # weights, step count and RNG state agree and resuming is exact.
    interrupted = InterruptFlag(device)
    with interrupted:
        net.train()
        while step < plan.steps:
            lr = lr_at(step, plan.steps, cfg.train)
            for group in opt.param_groups:
                group["lr"] = lr
            idx = batch_indices(len(x_all), cfg.train.seed, step, cfg.train.batch_size)
            idx = idx[dist.rank() * local : (dist.rank() + 1) * local]  # this rank's slice of the global batch
            drop = torch.rand(local, generator=gen, device=device).cpu() < cfg.data.caption_dropout
            tb = text.batch(torch.where(drop, torch.full_like(idx, empty), rows[idx])).to(device)
            x = x_all[idx].to(device, non_blocking=True)
            with autocast(device, bf16):
                loss = objective.loss(model, x, tb, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.train.grad_clip)
            opt.step()
            ema_update(ema, net, ema_decay_at(step, cfg.train.ema_decay))
            step += 1
            steps_this_call += 1
            flops += plan.flops_per_step
            elapsed = time.perf_counter() - t0
            if step % cfg.train.log_every == 0 or step == plan.steps:
                loss_v = dist.all_reduce_mean(loss.detach().float()).item()
                if not math.isfinite(loss_v):
                    raise UserError(f"loss became {loss_v} at step {step}; lower train.lr or use --set train.precision=fp32")
                pending.append({"step": step, "loss": loss_v, "lr": lr, "flops": flops, "elapsed_s": round(elapsed, 3),
                                "grad_norm": float(gnorm), "flops_per_s": flops / max(elapsed, 1e-9)})
                bar.set_postfix_str(f"loss {loss_v:.4f} | {flops:.3g}/{cfg.train.budget:.3g} FLOPs")
            bar.update(1)
            stop = steps_this_call == stop_after or interrupted.any()
            if step % cfg.train.checkpoint_every == 0 or step == plan.steps or stop:
                if dist.is_main():
                    _append_metrics(run / "metrics.jsonl", pending)
                    save_checkpoint(run, net, ema, opt, gen, make_state(step == plan.steps))
                pending = []
                dist.barrier()
            if stop:
                break
    if interrupted.any() and step < plan.steps:
        bar.close()
        if dist.is_main():
            print(f"\ninterrupted at step {step}/{plan.steps}; checkpoint saved, re-run the same command to resume")
        raise KeyboardInterrupt
    bar.close()
    final = make_state(step == plan.steps)
    if dist.is_main() and final["done"]:
        print(f"{run}: done, {step} steps, {flops:.3g} FLOPs (budget {cfg.train.budget:.3g}), {elapsed:.0f}s")
    return final
