"""Training the learned autoencoders (config and presets: ``autoencoder.py``): the loop and its losses.

Losses. Reconstruction defaults to L2 (``recon_loss``: "l1" | "l2" | "l1+l2"). We first defaulted to
L1, as VQGAN/MAGVIT/Stable Diffusion autoencoders do, and measured (KL, defaults, 2000 steps, 2000
eval images): L1 31.4 dB PSNR and 85% shape accuracy of the attribute classifier on reconstructions,
L2 37.3 dB and 99.5%. (Presumably L2 weighs the few large errors at object edges more, and the edges
of 8-pixel objects are what tells a cross from a diamond.) No perceptual term: no perceptual network's
weights ship offline (LPIPS/VGG cannot be fetched). An optional PatchGAN hinge loss (``adv_weight`` >
0, from step ``adv_start``) is on in the GPU preset; off by default, because it adds a discriminator
pass per step to a 5-minute CPU budget and GAN training is fragile over so few steps. The bottleneck
adds its own loss: KL (``kl_weight``) or LFQ commitment + entropy (see kl.py, lfq.py).

Outputs. The tokenizer (tokenizer.json + tensors.safetensors) is written atomically once, at the
end. ``train_log.jsonl`` (one JSON object per logged step) is rewritten atomically at every log step
so progress is visible.

Resuming. With an output directory, training saves its whole state (``training-state.safetensors``:
weights, discriminator, both AdamW states, the batch order and cursor, every random generator, the
log so far; :class:`flopmatch.trainstate.TrainingState`) every 10 minutes and when stopped with
Ctrl-C (or SIGINT from a SLURM job on time-out or preemption: a GPU preset's 50k-step tokenizer
outlives a job's time limit); the next call with the same config, images, device type and precision
continues from it, bit for bit the training an uninterrupted call does, and any other call is refused
naming what differs. The file is removed once the tokenizer is written.

Precision. ``precision="auto"`` uses bf16 autocast (fp32 master weights, losses and the LFQ entropy in
fp32) where flopmatch.device finds bf16 fast. Measured on the 2-core CPU (1 thread, batch 32, CPU time
per step): 83 ms in bf16 vs 130 ms in fp32 for the default KL model, 86 vs 140 ms for LFQ.

Architecture choice, measured the same way: a full-resolution 32-64-128 conv stack trained 2.5-3x
slower per step than the default space-to-depth stem (``patch=2``) followed by 64-128 channels; the
32x32 maps with 32 channels make oneDNN's convolutions and the GroupNorm/SiLU passes memory-bound.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from flopmatch.data.datasets import make_dataset
from flopmatch.data.shapes import ShapesDataset
from flopmatch.device import autocast, resolve_device, use_bf16
from flopmatch.errors import UserError
from flopmatch.files import atomic_write_text, tensor_sha256
from flopmatch.schedule import warmup_cosine
from flopmatch.tokenizers.autoencoder import AutoencoderConfig
from flopmatch.tokenizers.learned import LearnedAutoencoder
from flopmatch.tokenizers.registry import make_autoencoder
from flopmatch.trainstate import STATE_FILE, TrainingState


class PatchDiscriminator(nn.Module):
    """Small PatchGAN: (B, 3, S, S) -> realness logits (B, 1, S/4, S/4). Used only if adv_weight > 0."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, 2, 1), nn.GroupNorm(8, 2 * width), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * width, 1, 3, 1, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def recon_loss(recon: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-pixel mean reconstruction loss in fp32 ("l1", "l2" or their sum)."""
    diff = recon.float() - target.float()
    if kind == "l1":
        return diff.abs().mean()
    if kind == "l2":
        return diff.pow(2).mean()
    return diff.abs().mean() + diff.pow(2).mean()


def psnr_from_mse(mse: float) -> float:
    """PSNR in dB for images in [-1, 1] (data range 2): 10 log10(4 / mse)."""
    return 10.0 * math.log10(4.0 / max(mse, 1e-12))


def load_images(config: AutoencoderConfig, split: str, num_eval: int = 2000) -> tuple[torch.Tensor, dict]:
    """(uint8 images (N, 3, S, S), data info dict for tokenizer.json) for ``split`` of ``config.data``.

    The train split has ``config.num_train`` images, the eval split ``num_eval`` (scenes are a pure
    function of their index, so the first 2000 eval images are the same for any num_eval).
    """
    ds = make_dataset(config.data_config(num_eval), split)
    info = {"name": config.data, "seed": config.data_seed, "image_size": config.image_size,
            "num_train": config.num_train,
            # shapes: the scene config's digest (both splits); real sources: this split's digest
            "fingerprint": ds.cfg.fingerprint() if isinstance(ds, ShapesDataset) else ds.fingerprint()}
    return ds.images_uint8(), info


def train_autoencoder(config: AutoencoderConfig, images_uint8: torch.Tensor, out_dir: str | Path | None = None,
                      data_info: dict | None = None, progress: bool = True) -> tuple[LearnedAutoencoder, dict]:
    """Train a KL or LFQ autoencoder on uint8 images (N, 3, S, S); returns (model in eval mode, summary).

    With ``out_dir``, writes out_dir/train_log.jsonl during training and the tokenizer at the end.
    summary: {"steps", "train_seconds" (wall), "cpu_seconds" (process CPU time, all threads),
    "final_train_psnr" (dB, mean over the last 10% of training batches), ...}.
    """
    config.validate()
    if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4 or images_uint8.shape[1] != 3 \
            or images_uint8.shape[-1] != config.image_size:
        raise UserError(f"training images must be uint8 (N, 3, {config.image_size}, {config.image_size}), "
                        f"got {images_uint8.dtype} {tuple(images_uint8.shape)}")
    device = resolve_device(config.device)
    bf16 = use_bf16(config.precision, device)
    torch.manual_seed(config.seed)  # weight init
    # channels_last (NHWC) during training on a CPU: the layout oneDNN's fast convolutions take; a training step of the
    # cpu preset on a 2-core AVX2 host in fp32: median 1.05x (KL) and 1.07x (LFQ) over 16 interleaved rounds in one
    # process (each 0.91-1.36x: a noisy shared host). Not on CUDA, where it is unmeasured (GroupNorm there may copy
    # NHWC inputs back to NCHW). Back to the default layout at the end: safetensors stores contiguous tensors.
    layout = torch.channels_last if device.type == "cpu" else torch.contiguous_format
    model = make_autoencoder(config).to(device, memory_format=layout).train()
    model.data_info = dict(data_info or {})
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, config.beta2),
                            weight_decay=config.weight_decay)
    disc = d_opt = None
    if config.adv_weight > 0:
        disc = PatchDiscriminator().to(device, memory_format=layout)
        d_opt = torch.optim.AdamW(disc.parameters(), lr=config.lr, betas=(0.5, 0.9), weight_decay=0.0)
    data_gen = torch.Generator().manual_seed(config.seed)  # batch order (CPU: indexes a CPU tensor)
    noise_gen = torch.Generator(device=device).manual_seed(config.seed + 1)  # KL posterior samples

    n = images_uint8.shape[0]
    order, cursor = torch.randperm(n, generator=data_gen), 0
    log_lines: list[str] = []
    psnrs: list[float] = []
    before_s = before_cpu_s = 0.0  # wall and CPU seconds of the sessions before this one (a resumed training)
    state_file = Path(out_dir) / STATE_FILE if out_dir is not None else None
    # what a saved state must match to be continued: the config, the images, and where and how it trained (another
    # device's generator state does not load; another precision would not be the same training)
    identity = {"config": config.to_dict(), "images_sha256": tensor_sha256(images_uint8) if state_file else "",
                "device": device.type, "bf16": bf16}
    modules = {"model": model, **({"disc": disc} if disc is not None else {})}
    optimizers = {"opt": opt, **({"d_opt": d_opt} if d_opt is not None else {})}
    # Ctrl-C (or a SLURM job's SIGINT) stops at the end of a step, after the state is saved
    with TrainingState(state_file, identity, modules=modules, optimizers=optimizers,
                       generators={"data": data_gen, "noise": noise_gen}, what_differs=_what_differs) as ts:
        if ts.resumed:
            order, cursor = ts.tensors["order"], ts.meta["cursor"]
            log_lines, psnrs = ts.meta["log_lines"], ts.meta["psnrs"]
            before_s, before_cpu_s = ts.meta["train_seconds"], ts.meta["cpu_seconds"]
            print(f"{out_dir}: resuming the {config.kind} tokenizer's training at step {ts.step}/{config.steps}",
                  file=sys.stderr)
        start, cpu_start = time.perf_counter(), time.process_time()
        pending: list[torch.Tensor] = []  # this session's per-step reconstruction MSEs not yet in psnrs (device scalars)

        def flush() -> list[float]:
            """psnrs with every pending step's PSNR appended (one host read for all of them)."""
            if pending:
                psnrs.extend(psnr_from_mse(m) for m in torch.stack(pending).tolist())
                pending.clear()
            return psnrs

        bar = tqdm(range(ts.step, config.steps), desc=f"tokenizer {config.kind}", disable=not progress,
                   dynamic_ncols=True, initial=ts.step, total=config.steps)
        for step in bar:
            if cursor + config.batch_size > n:  # new epoch: fresh permutation
                order, cursor = torch.randperm(n, generator=data_gen), 0
            idx = order[cursor:cursor + min(config.batch_size, n)]
            cursor += config.batch_size
            x = images_uint8[idx].to(device).float() / 127.5 - 1.0  # (B, 3, S, S) in [-1, 1]
            x = x.contiguous(memory_format=layout)
            lr = warmup_cosine(step, config.steps, config.lr, config.warmup_steps, config.min_lr_ratio)
            for g in opt.param_groups:
                g["lr"] = lr

            with autocast(device, bf16):
                recon, reg_loss, logs = model.training_forward(x, noise_gen)
            rec = recon_loss(recon, x, config.recon_loss)
            loss = rec + reg_loss
            adv_on = disc is not None and step >= config.adv_start
            if adv_on:
                with autocast(device, bf16):
                    g_adv = -disc(recon).float().mean()
                loss = loss + config.adv_weight * g_adv
                logs["g_adv"] = g_adv.detach()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            opt.step()
            if adv_on:
                with autocast(device, bf16):
                    real, fake = disc(x).float(), disc(recon.detach()).float()
                d_loss = torch.relu(1 - real).mean() + torch.relu(1 + fake).mean()  # hinge
                d_opt.zero_grad(set_to_none=True)
                d_loss.backward()
                d_opt.step()
                logs["d_loss"] = d_loss.detach()

            # Per-step figures stay on the device until a log step or a save reads them (flush): reading one here
            # would make the host wait for the GPU every step.
            with torch.no_grad():
                pending.append((recon.detach().float().clamp(-1, 1) - x).pow(2).mean())
            if step % config.log_every == 0 or step == config.steps - 1:
                flush()
                logs = {k: float(v) for k, v in logs.items()}
                elapsed = before_s + time.perf_counter() - start  # over every session of a resumed training
                record = {"step": step, "loss": float(loss.detach()), "recon": float(rec.detach()),
                          "psnr": psnrs[-1], "lr": lr, "grad_norm": float(grad_norm), **logs,
                          "elapsed_s": round(elapsed, 3), "images_per_s": round((step + 1) * config.batch_size / elapsed, 2)}
                log_lines.append(json.dumps(record))
                bar.set_postfix(psnr=f"{psnrs[-1]:.2f}", loss=f"{record['loss']:.4f}", refresh=False)
                if out_dir is not None:
                    atomic_write_text(Path(out_dir) / "train_log.jsonl", "\n".join(log_lines) + "\n")
            ts.end_of_step(step, config.steps, tensors=lambda: {"order": order}, meta=lambda: {
                "cursor": cursor, "log_lines": log_lines, "psnrs": flush(),
                "train_seconds": before_s + time.perf_counter() - start,
                "cpu_seconds": before_cpu_s + time.process_time() - cpu_start})
        flush()
    train_seconds = before_s + time.perf_counter() - start
    cpu_seconds = before_cpu_s + time.process_time() - cpu_start

    model.to(memory_format=torch.contiguous_format).eval()  # the layout inference and the saved tensors use
    if config.kind == "kl":
        model.fit_latent_stats(images_uint8[: config.stats_images])
    tail = psnrs[-max(1, len(psnrs) // 10):]
    summary = {"steps": config.steps, "train_seconds": round(train_seconds, 2), "cpu_seconds": round(cpu_seconds, 2),
               "threads": torch.get_num_threads(),
               "final_train_psnr": round(sum(tail) / len(tail), 3), "bf16": bf16, "device": str(device)}
    model.train_info = summary
    if out_dir is not None:
        model.to("cpu").save(out_dir)
        ts.finish()  # the tokenizer is written: nothing to resume
    return model, summary


# ----------------------------------------------------------------------------- resumable state


def _what_differs(saved: dict, now: dict) -> str:
    """A refused state's difference in words, for TrainingState's message."""
    if saved.get("config") != now["config"]:
        keys = sorted(k for k in now["config"] if (saved.get("config") or {}).get(k) != now["config"][k])
        return f"other settings ({', '.join(keys[:4])} differ)"
    if saved.get("images_sha256") != now["images_sha256"]:
        return "other images (the data changed since)"
    return (f"another device or precision ({saved.get('device')}, bf16 {saved.get('bf16')}; now {now['device']}, bf16 "
            f"{now['bf16']})")
