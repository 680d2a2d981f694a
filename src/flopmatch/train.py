"""The training loop, written once for all paradigms: budget -> steps, AdamW, a learning-rate schedule
(warmup + cosine by default, or warmup-stable-decay), EMA, bf16 autocast, atomic checkpoints and exact resume.

Setup, loop, save, in that order (DiT). The number of steps is ``ceil(budget / FLOPs per step)``
with FLOPs per step = analytic training FLOPs per example x global batch, so training stops at the
first step where the cumulative FLOPs reach the budget (at most one step over).

Training randomness is a pure function of (``train.seed``, step, example): every step, every rank
draws the whole global batch's randomness (caption dropout; timesteps and noise, or masks) from
generators seeded by (seed, step) and keeps its slice (:func:`step_generators`). So an example gets
the same randomness whatever the number of processes, and the data order is a pure function of
(seed, epoch): a run's trajectory is a function of its config alone, up to float rounding (and the
device kind, whose generators differ). Resume is exact at any world size: the checkpoint holds
model, EMA, optimizer, step and FLOPs so far, no RNG state; the data position is the step itself.
Runs started before this scheme (whose randomness depended on the number of processes) are refused
on resume rather than silently continued with different randomness (:data:`TRAIN_RANDOMNESS`).

Distributed (torchrun): DDP by default, FSDP2 with ``train.parallel=fsdp2`` (:mod:`flopmatch.dist`; its parameters
all-gathered in bf16 with ``train.fsdp_param_dtype=bf16``, :func:`check_fsdp_params`);
the global batch, the FLOP accounting and the budget do not depend on the number of processes.

Runs that grow: under ``train.schedule=wsd`` a run also saves its full state where the cooldown starts
(``checkpoint-stable/``). Nothing before that step depends on the budget, so ``train`` with a config
that differs only in ``train.budget`` continues the run from there (:mod:`flopmatch.growth`) to
exactly the weights a run trained for the new budget from the start would have, keeping the old
budget's result under ``budgets/<budget>/``. Cosine runs refuse; ``constant`` runs continue from their end.

References: Kaplan et al. 2020 and Hoffmann et al. 2022 (FLOP accounting, see flopmatch.flops);
Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization" (AdamW); Ho & Salimans 2022,
"Classifier-Free Diffusion Guidance" (caption dropout); Peebles & Xie 2023 (DiT: loop layout, EMA);
Karpathy, nanoGPT (decay groups, gradient clipping).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import math
import shutil
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from flopmatch import dist
from flopmatch import ema as phema
from flopmatch.config import RunConfig, TrainConfig
from flopmatch.device import autocast, memory_bytes, peak_matmul_flops, resolve_device, run_bf16
from flopmatch.errors import UserError
from flopmatch.files import atomic_write_json, remove_stale_temps
from flopmatch.flops import num_params
from flopmatch.growth import continue_run, plan_continuation
from flopmatch.interrupt import InterruptFlag
from flopmatch.lock import LOCK_NAME, DirectoryLock, in_use, is_locked
from flopmatch.nets import Network
from flopmatch.objectives import make_objective
from flopmatch.plan import net_spec_for, plan_steps, training_memory_bytes
from flopmatch.prepare import prepare
from flopmatch.rundir import (
    CONFIG,
    DATA,
    EMA_SNAPSHOTS,
    METRICS,
    STABLE_CHECKPOINT,
    append_metrics,
    check_same_config,
    check_same_data,
    config_diffs,
    read_state,
    remove_snapshots_after,
    restore_checkpoint,
    save_checkpoint,
    save_snapshot,
    tokenizer_dir,
    truncate_metrics,
    write_config,
)
from flopmatch.schedule import ema_decay_at, lr_at, stable_steps
from flopmatch.tracking import Trackers, check_trackers

# The scheme that draws training randomness, recorded in every checkpoint's state as ``train_randomness``.
# 1 (absent from the state; flopmatch up to 0.2.0): one generator per rank seeded seed * 1000 + rank, its
# state in the checkpoint. 2: per (seed, step), the global batch drawn on every rank (step_generators). A run is
# resumed only by the scheme that started it: another would change its numbers from the resumed step on.
TRAIN_RANDOMNESS = 2
QUIET_PROGRESS_S = 60.0  # without a progress bar (a study worker), at most one progress line per this many seconds


def step_seed(seed: int, step: int, stream: str) -> int:
    """A 63-bit seed for one stream of step ``step``'s training randomness: a pure function of its arguments.

    Hashed rather than, say, ``seed * 1_000_003 + step``: distinct (seed, step, stream) never share a seed
    (no (seed, step) pair aliases another, for any step count), and no stream reuses the data order's seeds
    (:func:`epoch_order`). One sha256 per step and stream, ~1 us on the host.
    """
    digest = hashlib.sha256(f"flopmatch/train/{stream}/{seed}/{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # torch.Generator.manual_seed takes up to 64 bits


def step_generators(seed: int, step: int, device: torch.device) -> tuple[torch.Generator, torch.Generator]:
    """Generators of step ``step``'s training randomness: (CPU one for caption dropout, ``device`` one for the
    objective's :meth:`~flopmatch.objectives.base.Objective.draw`), each seeded by (seed, step, its stream).

    Every rank draws the whole global batch from them and keeps its slice: example j of step s gets the same
    randomness with any number of processes. Drawing B_global rows instead of B_global / world costs little
    (noise of a few MB at most, one kernel per tensor; nothing next to a forward pass) and needs no
    communication. Separate streams: on a CPU run both generators are CPU ones, and one seed would make the
    noise repeat the dropout's uniforms. Dropout on the CPU: its indices pick caption rows on the host, so a
    device draw would cost a device-to-host sync every step.
    """
    cpu = torch.Generator().manual_seed(step_seed(seed, step, "captions"))
    dev = torch.Generator(device=device).manual_seed(step_seed(seed, step, "objective"))  # host-side seeding, no sync
    return cpu, dev


@functools.lru_cache(maxsize=2)  # a batch no larger than the data straddles at most 2 epochs: randperm(n) once per epoch
def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The data order of one epoch: a permutation that depends only on (seed, epoch). Shared: do not modify it."""
    # A private CPU generator (not the global RNG): the order cannot drift with other random draws.
    # The prime 1_000_003 keeps (seed, epoch) pairs apart for any epoch below it.
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)  # (n,)


def batch_indices(n: int, seed: int, step: int, batch: int) -> torch.Tensor:
    """Dataset indices of global batch ``step`` (B,), walking epochs of fresh permutations."""
    start = step * batch  # position in the endless stream of concatenated epochs
    out = []
    while len(out) < batch:
        epoch, offset = divmod(start + len(out), n)  # a batch may straddle two epochs
        order = epoch_order(n, seed, epoch)
        out.extend(order[offset : offset + batch - len(out)].tolist())
    return torch.tensor(out, dtype=torch.long)  # (batch,)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, net: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * net, parameter by parameter.

    Why: an exponential moving average of the weights is a cheap ensemble over the last ~1/(1 - decay)
    steps and samples markedly better than the raw weights (DiT evaluates EMA weights; so do ADM
    and most image generators). Only parameters are averaged: the sole buffer (positions) is fixed.
    """
    # e += (1 - decay) * (p - e) for every parameter in one foreach call: one multi-tensor kernel on a GPU (one Python
    # dispatch per parameter otherwise; on DTensor shards under FSDP2, each a DTensor dispatch)
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in net.parameters()], 1 - decay)


def make_optimizer(net: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over ``net``'s parameters, weight decay on weight matrices only (see the comment inside)."""
    # AdamW (decoupled weight decay, Loshchilov & Hutter 2019) with decay only on weight matrices.
    # Biases and LayerNorm gains (1-D) get none, as in nanoGPT: they are few parameters setting offsets
    # and scales, and pulling a gain toward 0 shrinks its output rather than regularising. The input
    # stems get none either: decaying an embedding table pulls rarely drawn codes (and [MASK]/[BOS])
    # toward 0 between their sparse updates (minGPT excludes embeddings); the continuous linear stem is
    # treated like the discrete one.
    decay, no_decay = [], []
    for name, p in net.named_parameters():
        (decay if p.dim() >= 2 and "stem" not in name else no_decay).append(p)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        # fused: one kernel over all parameters on CUDA, and on CPU (torch >= 2.4) a vectorised loop instead of a Python
        # loop of per-tensor ops: the CPU step at depth 1 ran ~7 % faster in `flopmatch bench` (diffusion 16.8 -> 15.6 ms).
        # A run resumed from a checkpoint written before keeps its saved param_groups' setting (load_state_dict), so
        # it continues on the implementation it started with.
        lr=cfg.lr, betas=(0.9, cfg.beta2), fused=device.type in ("cuda", "cpu") or None,
    )


def train_step(model, net: torch.nn.Module, ema: torch.nn.Module, opt: torch.optim.Optimizer, objective, x: torch.Tensor,
               text, rng: torch.Generator | None, *, bf16: bool, grad_clip: float, ema_decay: float,
               draws: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step on a batch: loss, backward, gradient clipping, AdamW, EMA update.

    ``model`` (DDP-wrapped / compiled, or FSDP2-sharded) runs forward and backward, ``net`` is the module the
    optimizer, clipping and EMA see (under FSDP2 the same sharded module). x: latents (B, C, g, g) or tokens
    (B, L); text: a TextBatch on x's device; the loss's randomness is ``draws`` (this batch's rows of
    ``objective.draw``), or drawn from ``rng`` when None. Returns the loss and the pre-clip gradient norm as
    device tensors (no host sync). ``flopmatch bench`` times this same function.
    """
    # bf16 autocast: matmuls run in bf16, weights and optimizer state stay fp32; bf16 has fp32's
    # exponent range, so no loss scaling is needed (unlike fp16). Objectives compute the loss in fp32.
    with autocast(x.device, bf16):
        loss = objective.loss(model, x, text, rng, draws=draws)
    opt.zero_grad(set_to_none=True)
    # DDP all-reduces (FSDP2 reduce-scatters) gradients here, averaging over ranks: every rank clips by the same norm.
    loss.backward()
    # Clipping the global gradient norm caps the update on rare spiky batches, which can otherwise
    # destabilise a whole run (1.0 by default, as in nanoGPT); returns the pre-clip norm, which is logged.
    # Under FSDP2 the norm is computed over the shards (a DTensor; full_tensor is a local read of its replicated value).
    gnorm = dist.full_tensor(torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip))
    opt.step()
    ema_update(ema, net, ema_decay)
    return loss, gnorm


# ----------------------------------------------------------------------------- the loop


def train(cfg: RunConfig, out: str | Path, progress: bool = True, stop_after: int | None = None) -> dict:
    """Train (or resume, or report finished) the run in ``out``. Returns the final state dict.

    A run whose config differs from ``cfg`` in ``train.budget`` only is continued to the new budget
    where its schedule allows (wsd, constant; see :mod:`flopmatch.growth`), else refused.
    ``stop_after``: stop (with a checkpoint) after this many steps in this call, as if interrupted;
    used by tests of exact resume.
    """
    cfg.validate()
    check_trackers(cfg.train.trackers)  # a missing tracker package is reported before minutes of data preparation
    run = Path(out)
    device = resolve_device(cfg.train.device)
    dist.init(device)
    objective = make_objective(cfg.objective)

    growing = False
    if (run / CONFIG).exists():
        # Only the budget differs: continue the run to the new budget (checked below, carried out under the lock).
        growing = config_diffs(run, cfg) == ["train.budget"]
        if not growing:
            check_same_config(run, cfg)
            state = read_state(run)
            if state and state.get("done"):
                if dist.is_main():
                    # A kill while the final state.json copy was written leaves its temp file: only train writes
                    # checkpoint/, so removing what is there is safe without the lock.
                    remove_stale_temps(run / "checkpoint")
                    print(f"{run}: finished ({state['step']} steps, {state['flops']:.3g} FLOPs); nothing to do")
                return state
        check_randomness(run, read_state(run))  # before a continuation moves anything
    elif run.exists() and not run.is_dir():
        raise UserError(f"--out {run} is a file, not a directory; choose another --out")
    elif run.exists() and any(p.name != LOCK_NAME for p in run.iterdir()):
        if is_locked(run):  # a run another process is creating right now (its config is not written yet)
            raise in_use(run, "run")
        raise UserError(f"{run} exists and is not a flopmatch run directory; choose another --out")

    # Check the budget from the analytic plan before any expensive data preparation.
    # Compute matching: every paradigm gets the same FLOP budget, so the step count is derived from it,
    # steps = ceil(budget / (train FLOPs per example x global batch)), with FLOPs counted by the
    # scaling-law convention (~6N per token: 2 per multiply-accumulate, x3 for forward + backward;
    # Kaplan et al. 2020, Hoffmann et al. 2022). Fixing steps instead would give a bigger or
    # longer-sequence network more compute.
    # What the data are prepared from: the config, except that a run that has trained (a checkpoint) keeps training on
    # the codes of the tokenizer it started with, its own copy, not what tokenizer.path names now (a path relative to
    # another working directory, or another tokenizer put there). config.json keeps the path as given.
    data_cfg = cfg
    if (run / CONFIG).exists() and read_state(run) is not None and (tokenizer_dir(run) / "tokenizer.json").exists():
        data_cfg = dataclasses.replace(cfg, tokenizer=dataclasses.replace(cfg.tokenizer, path=str(tokenizer_dir(run))))
    spec = net_spec_for(data_cfg)
    plan = plan_steps(cfg.train.budget, objective.train_flops(spec), cfg.train.batch_size)
    world = dist.world_size()
    if cfg.train.batch_size % world:
        raise UserError(f"train.batch_size {cfg.train.batch_size} must be divisible by the {world} processes")
    check_fsdp_params(cfg.train, device, read_state(run))
    shards = world if world > 1 and cfg.train.parallel == "fsdp2" else 1  # FSDP2 splits weights, EMA, gradients, moments
    averages = len(cfg.train.ema_profiles) if cfg.train.ema_snapshots else 0  # the post-hoc EMA's (flopmatch.ema)
    need, have = training_memory_bytes(spec, cfg.train.batch_size // world, shards, averages), memory_bytes(device)
    if need > have:  # refuse before allocating: the allocation would fail or swap after minutes of set-up
        raise UserError(f"training this network needs at least {need / 2**30:.3g} GiB ({num_params(spec):,} parameters, "
                        f"batch {cfg.train.batch_size // world} per process) but {device} has {have / 2**30:.3g} GiB; "
                        f"lower --depth or train.batch_size, or shard it over several devices (torchrun with "
                        f"--set train.parallel=fsdp2)")
    if growing:  # a cosine run, or a state past the new budget's stable phase, is refused before data preparation
        plan_continuation(run, cfg, plan.steps)
    warm = stable_steps(plan.steps, cfg.train)  # wsd, constant: the steps the warmup has (cosine: None)
    if warm is not None and cfg.train.warmup_steps > warm and dist.is_main():
        print(f"flopmatch: warning: train.warmup_steps={cfg.train.warmup_steps} is more than the {warm} steps "
              f"{'before the cooldown' if cfg.train.schedule == 'wsd' else 'of this budget'}, so the LR never reaches "
              f"train.lr; lower train.warmup_steps", file=sys.stderr)
    created = not run.exists()
    # the missing parents of --out, innermost first (the lock makes them): removed on a failure while empty; never
    # removed whole, since a study's other workers create their runs beside this one in the same runs/ folder
    made = [q for q in run.parents if not q.exists()] if created else []
    # Every rank has read the run directory (config, state) above; only now may the main rank change it (lock,
    # stale temps, a continuation): a rank still reading would otherwise see a half-grown run and decide differently.
    dist.barrier()
    # One writer per run directory (a second `train` on it, or a requeued job whose predecessor is still
    # being torn down, gets a one-line error naming the holder). Only the main rank writes.
    with dist.entered_on_main(lambda: DirectoryLock(run, "run")):  # a refusal reaches every rank
        try:
            if dist.is_main():  # temp files of writes a killed training process never finished
                remove_stale_temps(run, names=(CONFIG, METRICS))
                remove_stale_temps(run / "checkpoint")
                remove_stale_temps((run / STABLE_CHECKPOINT).parent)
                remove_stale_temps(run / EMA_SNAPSHOTS)
            if growing:
                if dist.is_main():  # planned again: the run is ours only now
                    print(continue_run(run, cfg, plan_continuation(run, cfg, plan.steps)))
                dist.barrier()
            state = read_state(run) if (run / CONFIG).exists() else None  # again: the run is ours only now
            if state and state.get("done"):
                if dist.is_main():
                    print(f"{run}: finished ({state['step']} steps, {state['flops']:.3g} FLOPs); nothing to do")
                return state
            return _train_locked(cfg, data_cfg, run, state, objective, spec, plan, device, progress, stop_after)
        except BaseException:
            # Still holding the lock: if nothing of a run was written, leave nothing behind.
            if dist.is_main() and not (run / CONFIG).exists():
                if created:
                    shutil.rmtree(run, ignore_errors=True)
                    for folder in made:
                        try:
                            folder.rmdir()  # only if empty
                        except OSError:
                            break
                else:
                    (run / LOCK_NAME).unlink(missing_ok=True)
            raise


def check_randomness(run: Path, state: dict | None) -> None:
    """Refuse to continue a run whose checkpoint was written under another training-randomness scheme
    (:data:`TRAIN_RANDOMNESS`): its remaining steps would draw different randomness than its first ones did.
    A finished run is not affected (it is reported, evaluated and sampled as before); ``state`` None: nothing yet."""
    if state is None:
        return
    found = state.get("train_randomness", 1)
    if found != TRAIN_RANDOMNESS:
        raise UserError(f"{run} was started by an earlier flopmatch (training randomness v{found}, which depended on the number "
                        f"of processes; this version draws v{TRAIN_RANDOMNESS}), so continuing it would change its numbers; "
                        f"finish it with the flopmatch version that started it, or train it again with a new --out")


def check_fsdp_params(train_cfg: TrainConfig, device: torch.device, state: dict | None) -> None:
    """Refuse ``train.fsdp_param_dtype=bf16`` where this launch cannot apply it (the config alone is checked by
    :func:`flopmatch.config.check_fsdp_param_dtype`): outside a process group nothing is sharded, so the run would
    silently train (or a resumed run continue) in fp32 parameters; and where ``train.precision=auto`` resolves to
    fp32 here (:func:`flopmatch.device.run_bf16`), bf16 parameters would compute without autocast."""
    if train_cfg.fsdp_param_dtype == "fp32":
        return
    key = f"train.fsdp_param_dtype={train_cfg.fsdp_param_dtype}"
    if not run_bf16(train_cfg.precision, device, state):
        raise UserError(f"{key} computes under bf16 autocast, and train.precision={train_cfg.precision} is fp32 on this "
                        f"{device.type}; set train.precision=bf16, or train.fsdp_param_dtype=fp32")
    if not dist.in_group():
        raise UserError(f"{key} shards the network with FSDP2, which needs a torchrun launch; run under "
                        f"torchrun --nproc_per_node N (1 works too), or start a new --out with train.fsdp_param_dtype=fp32")


def _split(cfg: RunConfig, world: int) -> str:
    """How the global batch is split, for the line a run starts with: " (4 per process, DDP over 2 processes)"; ""
    in one process, or a note that train.parallel=fsdp2 shards nothing there."""
    if not dist.in_group():
        return " (train.parallel=fsdp2 shards under torchrun only: one process, the whole network)" \
            if cfg.train.parallel == "fsdp2" else ""
    how = {"ddp": "DDP", "fsdp2": "FSDP2"}[cfg.train.parallel]
    how += " with bf16 parameters" if cfg.train.fsdp_param_dtype == "bf16" else ""
    return f" ({cfg.train.batch_size // world} per process, {how} over {world} process{'es' if world > 1 else ''})"


def _train_locked(cfg: RunConfig, data_cfg: RunConfig, run: Path, state: dict | None, objective, spec, plan,
                  device: torch.device, progress: bool, stop_after: int | None) -> dict:
    """The training loop proper, run while this process holds the run directory's lock (see :func:`train`); the data
    are prepared from ``data_cfg`` (``cfg`` with a resumed run's own tokenizer copy)."""
    world = dist.world_size()
    data = prepare(data_cfg, objective, progress=progress and dist.is_main(), device=device)
    if objective.net_spec(cfg.model, data.tokenizer.spec, data.encoder.dim, data.encoder.max_len) != spec:
        raise UserError(f"tokenizer/text encoder do not match the planned network for {cfg.tokenizer.path or 'the config'}")

    if state is not None:
        check_same_data(run, data.dataset.info)
    if dist.is_main() and state is None:
        n = len(data.x)
        short = (f"; the source has only these after its evaluation split, not the {cfg.data.num_train} data.num_train asks "
                 f"for" if n < cfg.data.num_train else "")
        # how often each image is seen: many passes over a small set can rank paradigms by how they memorise
        print(f"{run}: {n} training images{short}; {plan.steps} steps of {cfg.train.batch_size}{_split(cfg, world)} = "
              f"{plan.steps * cfg.train.batch_size / max(n, 1):.3g} passes over them", flush=True)
        run.mkdir(parents=True, exist_ok=True)
        write_config(run, cfg)  # before step 0
        atomic_write_json(run / DATA, data.dataset.info)
        data.tokenizer.save(tokenizer_dir(run))
        truncate_metrics(run, 0)  # rows logged by an attempt killed before its first checkpoint
    dist.barrier()

    torch.manual_seed(cfg.train.seed)
    net = Network(spec)  # same init on every rank (seeded), built in host memory
    # Under FSDP2 the host copies (network, EMA, post-hoc averages) are sharded block by block: fully_shard moves each
    # block to the device and splits it there, so the device never holds a whole network: its shards, plus one block's
    # full tensors while that block is split (training_memory_bytes counts the shards). The price: each process holds
    # the network and its EMA in host memory until they are sharded. Otherwise the network moves to the device whole.
    if not (world > 1 and cfg.train.parallel == "fsdp2"):
        net = net.to(device)
    ema = copy.deepcopy(net).requires_grad_(False)  # starts equal to the initial weights
    # ``model`` (DDP / compiled) runs forward and backward; ``net`` is the module the optimizer, EMA, gradient
    # clipping and checkpoints use: the plain network, or under FSDP2 the network sharded in place (then
    # ``model`` is ``net``, and the EMA is sharded the same way so each rank averages its own shard).
    # Wrapped before the optimizer is built: FSDP2 replaces the parameters by their shards.
    # train.fsdp_param_dtype=bf16: the network's parameters are all-gathered and computed in bf16 (FSDP2 mixed
    # precision); the EMA and post-hoc averages below are sharded without it (never run; gathered in fp32 to save).
    param_dtype = torch.bfloat16 if cfg.train.fsdp_param_dtype == "bf16" else None
    model = dist.wrap(net, device, cfg.train.parallel, units=net.backbone.blocks, param_dtype=param_dtype)
    # Post-hoc EMA (EDM2; flopmatch.ema): power-function averages of the weights, snapshotted at evenly spaced
    # steps, from which an average of any relative length is rebuilt after training. Like the EMA, they start
    # equal to the initial weights (the first update, beta = 0, replaces them).
    posthoc = cfg.train.ema_snapshots > 0 and bool(cfg.train.ema_profiles)
    averages = []
    for _ in cfg.train.ema_profiles if posthoc else []:
        averages.append(copy.deepcopy(ema))
        if dist.is_sharded(net):  # sharded as soon as it exists: at most one more full copy at a time (FSDP2)
            dist.shard(averages[-1], device, units=averages[-1].backbone.blocks)
    gammas = [phema.sigma_rel_to_gamma(s) for s in cfg.train.ema_profiles] if posthoc else []
    snap_at = set(phema.snapshot_steps(plan.steps, cfg.train.ema_snapshots)) if posthoc else set()
    if dist.is_sharded(net):
        dist.shard(ema, device, units=ema.backbone.blocks)
    opt = make_optimizer(net, cfg.train, device)
    step, flops, elapsed = 0, 0, 0.0
    if state is not None:
        # full tensors, whatever world size and option wrote them
        restore_checkpoint(run, net, ema, opt, device, averages=averages)
        step, flops, elapsed = state["step"], state["flops"], state.get("elapsed_s", 0.0)
        if dist.is_main():
            truncate_metrics(run, step)
            print(f"{run}: resuming at step {step}/{plan.steps} ({flops:.3g} FLOPs spent)")

    if cfg.train.compile:
        model = torch.compile(model)
    # "auto" precision is decided once per run, by timing on the first start, and recorded in the
    # checkpoint state: a resumed run keeps the precision it started with even if the timing would flip.
    bf16 = run_bf16(cfg.train.precision, device, state)
    text, rows, x_all = data.text, data.rows, data.x  # x_all: latents (N, C, g, g) or tokens (N, L)
    empty = data.text.empty_row()  # row id of the empty caption "", the unconditional input
    local = cfg.train.batch_size // world  # per-rank batch
    # Budgets this run was trained for before (flopmatch.growth), carried from checkpoint to checkpoint.
    history = (state or {}).get("budget_history") or []
    # wsd: the step where the cooldown starts. The full state there lies on the path of every larger budget;
    # it is saved (before the regular checkpoint at the same step, so a checkpoint there implies it exists).
    stable_at = stable_steps(plan.steps, cfg.train) if cfg.train.schedule == "wsd" else None

    if dist.is_main():  # snapshots past the resumed step were taken by an attempt that did not checkpoint them
        remove_snapshots_after(run, step)

    def make_state(done: bool) -> dict:
        return {
            "step": step, "total_steps": plan.steps, "flops": flops, "budget": cfg.train.budget,
            "flops_per_step": plan.flops_per_step, "train_flops_per_example": plan.flops_per_example,
            "params": net.num_params(), "elapsed_s": round(elapsed, 3), "done": done, "bf16": bf16, "device_type": device.type,
            "world_size": world, "parallel": cfg.train.parallel if dist.in_group() else "none",
            "data_position": {"step": step, "epoch": step * cfg.train.batch_size // len(x_all)},
            "net_spec": spec.to_dict(), "tokenizer": data.tokenizer.spec.to_dict(),
            "text_encoder": data.encoder.name, "objective": cfg.objective.name,
            "schedule": cfg.train.schedule, "budget_history": history, "train_randomness": TRAIN_RANDOMNESS,
            **({"branched_from": state["branched_from"]} if state and "branched_from" in state else {}),  # growth.branch_run
        }

    # TensorBoard / W&B views of metrics.jsonl (main rank only). Opened before the progress bar and the clock:
    # starting W&B takes seconds and prints a few lines.
    trackers = Trackers(run, cfg, step)
    bar = tqdm(total=plan.steps, initial=step, desc=f"{cfg.objective.name} d{cfg.model.depth}", unit="step",
               disable=not (progress and dist.is_main()), dynamic_ncols=True)
    pending: list[dict] = []
    # MFU's denominator: this device's measured matmul FLOP/s in the run's precision, once per process and
    # before the clock starts (a few matmuls, ~0.1-0.5 s; private RNG, no host sync inside the loop).
    peak = peak_matmul_flops(device, bf16) * world
    t0 = time.perf_counter() - elapsed
    steps_this_call = 0
    t_call = said = time.perf_counter()  # without a progress bar: a line per QUIET_PROGRESS_S instead
    last_loss = float("nan")
    # Ctrl-C only raises a flag; the step in flight finishes and is checkpointed, so the saved
    # weights and step count agree and resuming is exact.
    interrupted = InterruptFlag()
    mine = slice(dist.rank() * local, (dist.rank() + 1) * local)  # this rank's rows of the global batch
    # A blocking host-to-GPU copy synchronises the stream (the host waits for the last step's kernels before it can
    # queue the next): each batch is gathered on the host into page-locked memory and copied without waiting. The
    # caching host allocator reuses those buffers once their copies are done.
    pin = device.type == "cuda"
    with interrupted, trackers, bar:  # bar: closed on any exit, so an error is said on a line of its own
        net.train()
        if step == stable_at == 0:  # a cooldown over every step: the stable state is the initial one
            save_checkpoint(run, net, ema, opt, make_state(False), name=STABLE_CHECKPOINT, averages=averages)  # collective under FSDP2
        while step < plan.steps:
            lr = lr_at(step, plan.steps, cfg.train)
            for group in opt.param_groups:
                group["lr"] = lr
            idx = batch_indices(len(x_all), cfg.train.seed, step, cfg.train.batch_size)[mine]  # (local,)
            # The global batch's randomness, drawn whole on every rank (see step_generators); this rank keeps its rows.
            g_captions, g_objective = step_generators(cfg.train.seed, step, device)
            # Caption dropout: a fraction of captions become the empty caption, so the same network also
            # learns the unconditional model that classifier-free guidance needs at sampling time (Ho &
            # Salimans 2022).
            drop = (torch.rand(cfg.train.batch_size, generator=g_captions) < cfg.data.caption_dropout)[mine]  # (local,) bool
            # tb: TextBatch of states (local, Lt, Dt), pad (local, Lt), pooled (local, Dt)
            tb = text.batch(torch.where(drop, torch.full_like(idx, empty), rows[idx]))
            x = x_all[idx]  # (local, C, g, g) latents or (local, L) tokens
            if pin:  # page-locked, so the copies below are queued behind the GPU's work instead of waiting for it
                tb, x = tb.pin_memory(), x.pin_memory()
            tb, x = tb.to(device, non_blocking=pin), x.to(device, non_blocking=pin)
            draws = {k: v[mine] for k, v in objective.draw(cfg.train.batch_size, spec, device, g_objective).items()}
            # EMA decay warms up (schedule.ema_decay_at): short runs would otherwise average mostly the init.
            loss, gnorm = train_step(model, net, ema, opt, objective, x, tb, None, bf16=bf16, grad_clip=cfg.train.grad_clip,
                                     ema_decay=ema_decay_at(step, cfg.train.ema_decay), draws=draws)
            step += 1
            if posthoc:
                phema.power_update(averages, net, step, gammas)
                if step in snap_at:  # collective under FSDP2; a resume before the next checkpoint takes it again
                    save_snapshot(run, averages, step, cfg.train.ema_profiles)
            steps_this_call += 1
            flops += plan.flops_per_step  # analytic, identical every step: the budget is spent in whole steps
            elapsed = time.perf_counter() - t0
            if step % cfg.train.log_every == 0 or step == plan.steps:
                loss_v = dist.all_reduce_mean(loss.detach().float()).item()  # collective: all ranks log at the same steps
                if not math.isfinite(loss_v):
                    raise UserError(f"loss became {loss_v} at step {step}; lower train.lr"
                                    + (" or use --set train.precision=fp32" if bf16 else ""))
                pending.append({"step": step, "loss": loss_v, "lr": lr, "flops": flops, "elapsed_s": round(elapsed, 3),
                                "grad_norm": float(gnorm), "flops_per_s": flops / max(elapsed, 1e-9),
                                "mfu": flops / max(elapsed, 1e-9) / peak})
                bar.set_postfix_str(f"loss {loss_v:.4f} | {flops:.3g}/{cfg.train.budget:.3g} FLOPs", refresh=False)
                last_loss = loss_v
            bar.update(1)
            stop = steps_this_call == stop_after or interrupted.any()  # any() is all-reduced: ranks stop together
            if step % cfg.train.checkpoint_every == 0 or step == plan.steps or stop or step == stable_at:
                if dist.is_main():
                    append_metrics(run, pending)
                # Every rank calls save_checkpoint (under FSDP2 it gathers the shards to rank 0); rank 0 writes.
                if step == stable_at:
                    save_checkpoint(run, net, ema, opt, make_state(False), name=STABLE_CHECKPOINT, averages=averages)
                save_checkpoint(run, net, ema, opt, make_state(step == plan.steps), averages=averages)
                if dist.is_main():
                    for row in pending:  # after the checkpoint: no tracker holds a step that a resume would redo
                        trackers.log(row)
                    trackers.flush()
                pending = []
                dist.barrier()  # other ranks wait until the checkpoint is written
                if not progress and dist.is_main() and time.perf_counter() - said >= QUIET_PROGRESS_S:
                    # a study's worker log (logs/<run>.log, under SLURM too) shows where its run is
                    said = time.perf_counter()
                    eta = (plan.steps - step) * (said - t_call) / max(steps_this_call, 1)
                    loss_txt = f", loss {last_loss:.4f}" if math.isfinite(last_loss) else ""  # none logged yet
                    print(f"[train] {run.name}: step {step}/{plan.steps}{loss_txt}, {flops:.3g}/"
                          f"{cfg.train.budget:.3g} FLOPs; ~{eta / 60:.1f} min left", flush=True)
            if stop:
                break
    if interrupted.any() and step < plan.steps:
        if dist.is_main():
            print(f"\ninterrupted at step {step}/{plan.steps}; checkpoint saved, re-run the same command to resume")
        raise KeyboardInterrupt
    final = make_state(step == plan.steps)
    if final["done"] and steps_this_call == 0 and not (state or {}).get("done"):
        # resumed at its last step (a continued or branched run whose new budget adds no step): the loop saved
        # nothing, so mark it finished on disk here (collective under FSDP2, like every save)
        save_checkpoint(run, net, ema, opt, final, averages=averages)
        dist.barrier()
    if dist.is_main() and final["done"]:
        print(f"{run}: done, {step} steps, {flops:.3g} FLOPs (budget {cfg.train.budget:.3g}), {elapsed:.0f}s")
    return final
