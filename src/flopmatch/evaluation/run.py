"""``flopmatch eval``: sample a run under each sampling setting and measure quality, prompt following
and inference cost; write ``<run>/eval.json`` with a manifest that makes every number reproducible.

Prompts are the captions of the first ``num_samples`` (M) images of the evaluation split (cycled if
more are asked for). The evaluation split's R images are the reference; their features are extracted
once and cached. Each metric says which of them it used:

- FID (and ``fid_boot``) compares equal counts: the M generated images against the first min(M, R)
  reference images, which are exactly the real images whose captions prompted the generated ones (the
  real set is prompt-matched). FID's small-sample bias depends on both counts (Chong & Forsyth 2020),
  so FIDs compare only at equal, stated counts: every entry records ``fid_num_real`` and
  ``fid_num_fake``. When M > R the whole split is used and the counts differ (recorded as they are);
- KID (unbiased at any counts) uses all R reference rows (``num_real``);
- precision/recall use the first min(M, R) rows of each, the caption-matched pairs
  (:func:`flopmatch.evaluation.quality.precision_recall_matched`).

FID below :data:`~flopmatch.evaluation.quality.FID_SMALL_N` images is flagged (``fid_small_n``, and one
warning line per call): it is biased upward by a model-dependent amount, KID is not.
``export_ref`` writes the mean and covariance of the *whole* split's reference features for other tools:
a fixed reference set of R images, the ADM / clean-fid convention, whose FID (what those tools compute
against the file) is another number than flopmatch's equal-count FID. ``ref_stats`` takes FID against such
a file instead of the run's own reference (KID and precision/recall are then None: they need features),
under the entry key suffixed ``,ref=<file sha256[:12]>``; the file holds no rows to subset, so its FID is
against the imported set as it is (``fid_num_real`` = its image count: the importer chose the counts).

Images for a setting are generated in batches whose random streams depend only on (seed, batch index),
so sharding batches across ranks gives the same images as one process. Generated images are saved
under ``<run>/samples/<setting>/``.

Timing figures (latency, throughput) are measurements and vary with load, so all settings of one call
are timed together at the end, interleaved (:mod:`flopmatch.evaluation.timing`); every other number is
a deterministic function of the run directory, the settings and the manifest. A study turns timing
off here and times every paradigm together in its own quiet phase instead.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import json
import platform
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from flopmatch import __version__, dist
from flopmatch.config import SampleConfig
from flopmatch.data.datasets import make_dataset, more_eval_images
from flopmatch.device import resolve_device
from flopmatch.errors import UserError
from flopmatch.evaluation.export import ReferenceStats, export_images, export_reference_stats, read_reference_stats
from flopmatch.evaluation.features import extract_features, make_feature_extractor, reference_features
from flopmatch.evaluation.inference import inference_cost
from flopmatch.evaluation.prompt_scoring import prompt_scorer
from flopmatch.evaluation.quality import (
    FID_SMALL_N,
    feature_stats,
    fid_against_stats,
    fid_from_features,
    fid_jackknife,
    fid_jackknife_stats,
    kid_bootstrap,
    kid_from_features,
    precision_recall_matched,
)
from flopmatch.evaluation.timing import TimingItem, machine, time_items
from flopmatch.files import atomic_write_json, file_sha256, load_tensors, save_tensors, tensor_sha256
from flopmatch.rundir import (
    CHECKPOINT,
    EVAL,
    canonical_weights,
    parse_weights,
    posthoc_solution,
    read_eval_doc,
    read_state,
    run_label,
    sample_dir,
)
from flopmatch.sample import generate, grid_image, load_sampler, save_png

EVAL_VERSION = 1


@dataclass
class EvalConfig:
    """How a run is evaluated (everything here goes into the manifest)."""

    num_samples: int = 1000
    seed: int = 0
    batch_size: int = 100
    weights: str = "ema"  # ema | model | ema@SIGMA_REL (a post-hoc EMA, rebuilt from the run's snapshots)
    features: list[str] = field(default_factory=lambda: ["effnet"])  # effnet (fast proxy) and/or inception
    kid_subset: int = 500
    kid_subsets: int = 50
    pr_k: int = 3
    fid_boot: int = 200  # evaluation-noise replicates: KID bootstrap, FID jackknife (at most M); 0 = off
    prompt_following: bool = True
    inference: bool = True  # analytic sampling and decode FLOPs per image
    timing: bool = True  # latency and throughput, all settings of the call timed together at the end
    timing_rounds: int = 5  # interleaved rounds (figures are medians over rounds)
    timing_budget_s: float = 10.0  # wall-time cap of the best-batch search per setting
    save_images: bool = True
    export: str = ""  # a directory: also write each setting's images as PNGs + samples.npz (evaluation.export)
    export_ref: str = ""  # an .npz file: also write the reference features' mean and covariance (evaluation.export)
    ref_stats: str = ""  # an .npz file from export_ref: FID against it instead of the run's own reference
    # print FID's count warnings (n below FID_SMALL_N; generated and real counts differ): a study says them once, in its
    # report (runs table: "250 vs 1000 real"), not once per evaluation
    warn_small_n: bool = True


def setting_key(sample: SampleConfig, steps: int) -> str:
    """A readable, unique key for a sampling setting (with steps resolved), e.g. 'steps=12,cfg=3,temp=1,topk=0'.

    The key is an on-disk format (eval.json entries, samples/ folders, the study's skip check), so it
    keeps the v0.1 spelling ``cfg=`` for the guidance scale, and names settings added since (masked's
    choice temperature, diffusion's solver and shift) only when they differ from their defaults:
    existing evaluations keep their keys and stay recognised.
    """
    key = f"steps={steps},cfg={sample.guidance:g},temp={sample.temperature:g},topk={sample.top_k}"
    if sample.choice_temperature != SampleConfig.choice_temperature:
        key += f",choice={sample.choice_temperature:g}"
    if sample.solver != SampleConfig.solver:
        key += f",solver={sample.solver}"
    if sample.shift != SampleConfig.shift:
        key += f",shift={sample.shift:g}"
    return key


def entry_key(sample: SampleConfig, steps: int, ecfg: "EvalConfig") -> str:
    """The eval.json key of one evaluated setting: sampler settings plus weights, sample count and seed."""
    return setting_key(sample, steps) + f",weights={ecfg.weights},n={ecfg.num_samples},seed={ecfg.seed}"


def package_versions() -> dict:
    """Versions of the packages every number in an entry depends on (for the manifest).

    Read from package metadata rather than by importing: torchmetrics alone takes seconds to import.
    """
    versions = {name: importlib.metadata.version(name) for name in ("numpy", "scipy", "torchmetrics")}
    return {"flopmatch": __version__, "torch": torch.__version__, "numpy": versions["numpy"],
            "scipy": versions["scipy"], "torchmetrics": versions["torchmetrics"], "python": platform.python_version()}


def eval_prompts(dataset, n: int) -> list[str]:
    """The first n captions of the evaluation split, cycled when n exceeds its size.

    Prompt i is the caption of eval image i (``captions()`` and ``images_uint8()`` share index order), so the
    first min(n, R) reference images are the generated images' prompt-matched real set: FID
    (:func:`fid_reference_rows`), precision/recall and the tokenizer ceilings rely on it."""
    caps = dataset.captions()
    if not caps:
        raise UserError(f"the evaluation split is empty; {more_eval_images(dataset, 1)}")
    return [caps[i % len(caps)] for i in range(n)]


def generate_sharded(sampler, prompts: list[str], sample: SampleConfig, seed: int, batch_size: int, out_dir: Path,
                     progress: bool) -> torch.Tensor:
    """Generate images for ``prompts``; with several ranks each takes every world-th batch.

    Shards meet through files in ``out_dir`` (rank r writes shard-r); the main rank assembles them.
    Because batch b always uses the generator seeded (seed, b), the result does not depend on the
    number of ranks.
    """
    rank, world = dist.rank(), dist.world_size()
    batches = [(b, prompts[s : s + batch_size]) for b, s in enumerate(range(0, len(prompts), batch_size))]
    mine = {}
    for b, chunk in batches[rank::world]:
        # generate() seeds batch j of its call with (seed, j); we call it per batch with seed offset so
        # that batch b gets the same stream in every sharding.
        mine[b] = generate(sampler, chunk, sample, seed=seed * 1_000_003 + b, batch_size=batch_size)
    if world == 1:
        return torch.cat([mine[b] for b, _ in batches])
    shard = out_dir / f"shard-{rank}.safetensors"
    try:
        save_tensors(shard, {f"b{b}": v for b, v in mine.items()})
        dist.barrier()
        images = None
        if dist.is_main():
            parts = {}
            for r in range(world):
                parts |= {int(k[1:]): v for k, v in load_tensors(out_dir / f"shard-{r}.safetensors").items()}
            images = torch.cat([parts[b] for b, _ in batches])
            for r in range(world):
                (out_dir / f"shard-{r}.safetensors").unlink(missing_ok=True)
        dist.barrier()
        return images
    except BaseException:  # Ctrl-C or a failed rank: no shard and no empty sample folder left behind
        shard.unlink(missing_ok=True)
        for folder in (out_dir, out_dir.parent):  # every rank tries: the last one out removes them
            try:
                folder.rmdir()  # only if empty (another rank's shard may still be there, or other settings' images)
            except OSError:
                break
        raise


def quality_metrics(extractor, real: torch.Tensor | ReferenceStats, images: torch.Tensor, ecfg: EvalConfig) -> dict:
    """Quality metrics of generated uint8 images (M, 3, H, W) against the reference: its cached features
    (N, F) (:func:`metrics_from_features`) or imported statistics (:func:`metrics_from_stats`)."""
    fake = extract_features(extractor, images, progress=False)
    param = next(extractor.parameters(), None) if isinstance(extractor, torch.nn.Module) else None
    device = param.device if param is not None else None
    if isinstance(real, ReferenceStats):
        return metrics_from_stats(real, fake, ecfg, device)
    return metrics_from_features(real, fake, ecfg, device)


def bootstrap_device(device: torch.device | None) -> torch.device:
    """Where the FID/KID bootstraps run: the evaluation's GPU if it has one, else (or for None) the CPU.

    Why: on a GPU machine the bootstrap's eigensolves, not sampling, dominated an evaluation (measured on an H200
    with 16 CPU cores, 1000 images, F=1280: 44.6 ms per FID replicate on the CPU, 10.1 ms on the GPU, the same FID to
    2e-9 relative; 200 replicates were 7.6 of the 50 s `flopmatch eval`, sampling 2.3 s)."""
    return device if device is not None and device.type == "cuda" else torch.device("cpu")


BOOT_METHOD = "generated images resampled with replacement, reference fixed"  # kid_boot
JACKKNIFE_METHOD = ("delete-1 jackknife over the generated images, reference fixed: pseudo-replicates whose sample "
                    "variance is the jackknife variance and whose mean is the point FID")  # fid_boot (quality.fid_jackknife)


def _boot(reps: list[float], how: str = BOOT_METHOD) -> dict:
    return {"method": how, "n": len(reps), "std": float(torch.tensor(reps).std()) if len(reps) >= 2 else None,
            "replicates": reps}


def fid_reference_rows(num_real: int, num_fake: int) -> int:
    """How many reference rows FID uses: the first min(R, M) of the R in split order (equal counts when M <= R).

    Why the first rows: eval_prompts gives generated image i the caption of reference image i (cycling past
    R), so the first min(R, M) reference images are the prompt-matched real set of the M generated images."""
    return min(num_real, num_fake)


def metrics_from_features(real: torch.Tensor, fake: torch.Tensor, ecfg: EvalConfig, device: torch.device | None = None) -> dict:
    """FID, KID (mean, std over subsets), precision and recall of fake features (M, F) against real (R, F).

    ``real`` holds the whole evaluation split in split order (row i: the image whose caption prompted
    generated row i). FID and ``fid_boot`` use its first min(R, M) rows (:func:`fid_reference_rows`:
    ``fid_num_real`` / ``fid_num_fake`` record the counts), KID all R (``num_real``), precision/recall the
    first min(R, M) of each (``pr_num_*``). ``fid_small_n``: min(R, M) < FID_SMALL_N (FID biased upward).
    When ``ecfg.fid_boot`` > 0, ``fid_boot``: min(fid_boot, M) jackknife pseudo-replicates of FID, and ``kid_boot``:
    fid_boot bootstrap replicates of KID (both seeded with ``ecfg.seed``), each {"method", "n", "std", "replicates"},
    computed on
    :func:`bootstrap_device` of ``device`` (the evaluation's)."""
    subset = min(ecfg.kid_subset, len(fake), len(real))
    kid_mean, kid_std = kid_from_features(real, fake, subset_size=subset, subsets=ecfg.kid_subsets,
                                          generator=torch.Generator().manual_seed(ecfg.seed))
    pr = precision_recall_matched(real, fake, k=ecfg.pr_k)
    fid_real = real[: fid_reference_rows(len(real), len(fake))]  # (min(R, M), F): a slice of the cached features
    out = {"fid": fid_from_features(fid_real, fake), "fid_num_real": len(fid_real), "fid_num_fake": len(fake),
           "kid": kid_mean, "kid_std": kid_std,
           "precision": pr["precision"], "recall": pr["recall"], "num_real": len(real), "num_fake": len(fake),
           "pr_num_real": pr["pr_num_real"], "pr_num_fake": pr["pr_num_fake"],
           "fid_small_n": min(len(real), len(fake)) < FID_SMALL_N}
    if len(fid_real) != len(fake):
        out["fid_note"] = (f"{len(fake)} generated images against all {len(real)} real images of the evaluation split: "
                           f"unequal counts; FID compares only with FIDs at these counts (--num-samples {len(real)} gives equal ones)")
    if ecfg.fid_boot > 0:
        bdev = bootstrap_device(device)
        fid_real_b, fake_b, real_b = fid_real.to(bdev), fake.to(bdev), real.to(bdev)
        out["fid_boot"] = _boot(fid_jackknife(fid_real_b, fake_b, ecfg.fid_boot, generator=torch.Generator().manual_seed(ecfg.seed)),
                                JACKKNIFE_METHOD)
        reps = kid_bootstrap(real_b, fake_b, ecfg.fid_boot, generator=torch.Generator().manual_seed(ecfg.seed))
        out["kid_boot"] = _boot(reps, BOOT_METHOD + "; each replicate the unbiased MMD^2 of all real rows against the "
                                      "resample, pairs of copies of one row left out (not the subset average of `kid`)")
    return out


NO_FEATURES = ("kid, kid_std, kid_boot, precision and recall are None: the imported reference (--ref-stats) holds only "
               "the mean and covariance of its features, and KID and precision/recall need the features themselves")


IMPORTED_COUNTS = ("FID against the imported reference statistics as they are: fid_num_real is the number of images "
                   "they were computed from, chosen by whoever exported them, so the counts need not be equal")


def metrics_from_stats(ref: ReferenceStats, fake: torch.Tensor, ecfg: EvalConfig, device: torch.device | None = None) -> dict:
    """FID (and ``fid_boot``) of fake features (M, F) against imported reference statistics; the metrics that
    need reference features are None, and ``not_computed`` says why. The statistics have no rows to subset,
    so ``fid_num_real`` is the imported set's size and ``fid_note`` says the counts are the importer's choice."""
    out = {"fid": fid_against_stats(ref.mu, ref.sigma, fake), "fid_num_real": ref.num_images,
           "fid_num_fake": len(fake), "fid_note": IMPORTED_COUNTS, "kid": None, "kid_std": None,
           "precision": None, "recall": None, "num_real": ref.num_images, "num_fake": len(fake),
           "pr_num_real": None, "pr_num_fake": None, "fid_small_n": min(ref.num_images, len(fake)) < FID_SMALL_N,
           "reference": "imported", "not_computed": NO_FEATURES}
    if ecfg.fid_boot > 0:
        bdev = bootstrap_device(device)
        out["fid_boot"] = _boot(fid_jackknife_stats(ref.mu.to(bdev), ref.sigma.to(bdev), fake.to(bdev), ecfg.fid_boot,
                                                    generator=torch.Generator().manual_seed(ecfg.seed)), JACKKNIFE_METHOD)
        out["kid_boot"] = None
    return out


def small_n_warning(num_real: int, num_fake: int, imported: bool = False) -> str | None:
    """The one warning line of an evaluation whose FID rests on fewer than FID_SMALL_N images, else None."""
    n = min(num_real, num_fake)
    if n >= FID_SMALL_N:
        return None
    kid = ("check rankings with KID, which is unbiased (it needs the reference features: evaluate without --ref-stats)"
           if imported else "check rankings with KID, which is unbiased")
    return (f"warning: FID from n = {n} images (< {FID_SMALL_N}; {num_real} real, {num_fake} generated) is biased upward "
            f"by an amount that depends on the model (Binkowski et al. 2018; Chong & Forsyth 2020): compare FIDs only at "
            f"equal n and {kid}")


def evaluate(run: str | Path, settings: list[SampleConfig], ecfg: EvalConfig | None = None, progress: bool = True) -> dict:
    """Evaluate ``run`` under each sampling setting; merge the entries into ``<run>/eval.json``."""
    ecfg = ecfg or EvalConfig()
    if ecfg.num_samples < max(ecfg.pr_k + 1, 2):
        raise UserError(f"--num-samples must be at least {max(ecfg.pr_k + 1, 2)}, got {ecfg.num_samples}")
    if ecfg.fid_boot < 0:
        raise UserError(f"--fid-boot must be >= 0, got {ecfg.fid_boot}")
    if (ecfg.export_ref or ecfg.ref_stats) and not ecfg.features:
        raise UserError("--export-ref and --ref-stats need at least one feature extractor (--features)")
    if ecfg.export_ref and ecfg.ref_stats:
        raise UserError("--export-ref writes the run's own reference statistics, --ref-stats replaces them; give one of them")
    if ecfg.export_ref and (Path(ecfg.export_ref).suffix != ".npz" or Path(ecfg.export_ref).is_dir()):
        raise UserError(f"--export-ref expects a file name ending in .npz, got {ecfg.export_ref}")
    run = Path(run)
    ecfg = replace(ecfg, weights=canonical_weights(ecfg.weights))  # "ema@0.10" and "ema@0.1" are one entry
    dist.init(resolve_device("auto"))
    sampler = load_sampler(run, weights=ecfg.weights)
    state = read_state(run)
    path = run / EVAL
    doc = read_eval_doc(path, EVAL_VERSION)  # checked before minutes of sampling
    if not state.get("done") and dist.is_main():
        print(f"warning: {run} is not finished ({state['step']}/{state['total_steps']} steps); evaluating its latest checkpoint")
    cfg = sampler.cfg
    ref = make_dataset(cfg.data, "eval", progress=progress)
    if len(ref) < max(ecfg.pr_k + 1, 2):
        raise UserError(f"the evaluation split of {cfg.data.name} has {len(ref)} images; FID and precision/recall "
                        f"need at least {max(ecfg.pr_k + 1, 2)}: {more_eval_images(ref, max(ecfg.pr_k + 1, 2))}")
    prompts = eval_prompts(ref, ecfg.num_samples)
    ref_images = ref.images_uint8()
    # On the sampler's device: on a GPU, feature extraction and (through quality_metrics) the FID/KID bootstraps run there
    extractors = {name: make_feature_extractor(name, sampler.device) for name in ecfg.features}
    described = {name: ex.describe() for name, ex in extractors.items()}
    reference = {"dataset": cfg.data.name, "split": "eval", "fingerprint": ref.fingerprint(), "size": len(ref),
                 "images_sha256": tensor_sha256(ref_images)}
    imported = None  # the reference's manifest record when it is imported (--ref-stats)
    if ecfg.ref_stats:
        real, imported = read_reference_stats(ecfg.ref_stats, described)
    else:
        real = {name: reference_features(ex, cfg.data.name, ref_images, key=f"{ref.fingerprint()}-{len(ref)}",
                                         progress=progress) for name, ex in extractors.items()} if dist.is_main() else {}
    if ecfg.export_ref and dist.is_main():
        # The whole split, not the first M rows: the file is a fixed reference set for other tools (the ADM /
        # clean-fid convention), so FIDs against it are another number than the equal-count FIDs of eval.json.
        export_reference_stats(ecfg.export_ref, {name: feature_stats(f) for name, f in real.items()}, described,
                               dataset=reference, num_images=len(ref))
        print(f"wrote reference statistics ({', '.join(real)}, n = {len(ref)}) to {ecfg.export_ref}")
    num_real = imported["size"] if imported else fid_reference_rows(len(ref), ecfg.num_samples)  # FID's real count
    if ecfg.warn_small_n and extractors and dist.is_main() and (line := small_n_warning(num_real, ecfg.num_samples, imported is not None)):
        print(line)  # once per call, not per setting
    if ecfg.warn_small_n and extractors and not imported and ecfg.num_samples > len(ref) and dist.is_main():
        print(f"warning: {ecfg.num_samples} generated images against the {len(ref)} of the evaluation split: FID's "
              f"counts differ (recorded as fid_num_real/fid_num_fake); --num-samples {len(ref)} gives equal counts, and "
              f"for new runs: {more_eval_images(ref, ecfg.num_samples)}")
    scorer = None
    if ecfg.prompt_following:
        # Real sources' pools are built collectively (every rank meets the same barriers); the scorer, which
        # only the main rank trains and runs, then finds them cached.
        make_dataset(cfg.data, "train", progress=progress)
        if dist.is_main():
            with dist.main_only():
                scorer = prompt_scorer(cfg.data, progress=progress)

    ckpt_sha = file_sha256(run / CHECKPOINT)
    posthoc = None
    if (sigma := parse_weights(ecfg.weights)) is not None:  # how well the snapshots form this average (EDM2)
        files, profiles, solution = posthoc_solution(run, sigma, state["step"])
        posthoc = {"sigma_rel": sigma, "profiles": profiles, "snapshots": len(files),
                   "profile_residual": solution.residual, "method": "Karras et al. 2024 (EDM2) post-hoc EMA: least "
                   "squares over the exact discrete power-function profiles, coefficients summing to 1"}
    timed = []  # (entry key, setting) to time together once every setting is sampled and scored
    for sample in settings:
        steps = sampler.objective.resolve_steps(sample, sampler.spec)
        key = entry_key(sample, steps, ecfg)
        images_dir = sample_dir(run, key)  # the same images whichever reference they are scored against
        if imported:  # a separate entry: the run's own-reference entry of this setting is kept
            key += f",ref={imported['sha256'][:12]}"
        if progress and dist.is_main():
            print(f"[eval] {run_label(run)}: {key}")
        images = generate_sharded(sampler, prompts, sample, ecfg.seed, ecfg.batch_size, images_dir, progress)
        if not dist.is_main():
            continue
        entry = {"settings": {**asdict(sample), "steps": steps}, "metrics": {}}
        for name, ex in extractors.items():
            entry["metrics"][name] = quality_metrics(ex, real[name], images, ecfg)
        if scorer is not None:
            entry["metrics"]["prompt_following"] = scorer.score(images, prompts)
        if ecfg.inference:
            entry["inference"] = inference_cost(sampler, sample)
            if key not in dict(timed):  # e.g. --sweep steps=0,25 on diffusion: one setting, timed once
                timed.append((key, sample))
        if ecfg.export:
            export_images(images, prompts, Path(ecfg.export) / key)
        if ecfg.save_images:
            save_tensors(images_dir / "images.safetensors", {"images": images})
            atomic_write_json(images_dir / "prompts.json", prompts)
            save_png(grid_image(images[:64], nrow=8, scale=2), images_dir / "grid.png")
        entry["manifest"] = {
            "eval_version": EVAL_VERSION, "num_samples": ecfg.num_samples, "seed": ecfg.seed,
            "batch_size": ecfg.batch_size, "seeding": "batch b uses torch.Generator seeded seed*1000003+b",
            "weights": ecfg.weights, "checkpoint_step": state["step"], "checkpoint_sha256": ckpt_sha,
            **({"posthoc_ema": posthoc} if posthoc else {}),
            "sampler": {**asdict(sample), "steps": steps, "objective": cfg.objective.name},
            # generated image i has the caption of reference image i: FID's real set (the first min(M, R) reference
            # images) is prompt-matched (fid_reference_rows)
            "prompts": {"source": "eval split captions, first num_samples (cycled)",
                        "sha256": hashlib.sha256(json.dumps(prompts).encode()).hexdigest()},
            "reference": imported or reference,
            "feature_extractors": described,
            "prompt_evaluator": scorer.describe() if scorer is not None else None,
            "tokenizer": {"fingerprint": sampler.tokenizer.fingerprint(), "spec": sampler.tokenizer.spec.to_dict()},
            "packages": package_versions(), "eval_config": asdict(ecfg),
            "generated_images_sha256": tensor_sha256(images),
        }
        doc["entries"][key] = entry
        doc = merge_entries(path, {key: entry})  # after every setting: an interrupted sweep keeps what it finished
    if ecfg.timing and timed and dist.is_main():
        if dist.world_size() > 1 and sampler.device.type == "cpu":  # a GPU rank times its own GPU: representative
            print(f"warning: the timing ran in process 0 of {dist.world_size()} alone, with its "
                  f"{torch.get_num_threads()} of {dist.available_cores()} cores' threads (torchrun splits a CPU's cores): the "
                  f"throughput is this process's, not the machine's; a one-process `flopmatch eval {run}` times the machine")
        add_timings(doc, sampler, timed, ecfg, progress)
        doc = merge_entries(path, {key: doc["entries"][key] for key, _ in timed})
    return doc


def merge_entries(path: Path, entries: dict) -> dict:
    """Write ``entries`` into the eval.json at ``path`` and return the document now on disk. The file is re-read
    and rewritten under an exclusive lock (``.eval.lock`` beside it), so two evaluations of one run at once (other
    settings each) both keep their entries: each rewrote the document it read at its start before, and the last
    one dropped the other's."""
    with open(path.with_name(".eval.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # held for the read-modify-write only (milliseconds); freed with the file
        doc = read_eval_doc(path, EVAL_VERSION)
        doc["entries"].update(entries)
        atomic_write_json(path, doc)
    return doc


OTHER_KV = "|other-kv-cache"  # timing-item suffix: next-token's setting with the KV cache flipped


def timing_items(sampler, settings: list[tuple[str, SampleConfig]]) -> list[TimingItem]:
    """Items to time for (key, setting) pairs of one sampler; next-token also with its KV cache flipped."""
    items = []
    for key, sample in settings:
        items.append(TimingItem(key, sampler, sample))
        if sampler.cfg.objective.name == "autoregressive":
            items.append(TimingItem(key + OTHER_KV, sampler, replace(sample, kv_cache=not sample.kv_cache)))
    return items


def timing_fields(timed: dict, key: str, kv_cache: bool) -> dict:
    """An eval entry's ``inference`` fields from :func:`time_items` results: the setting's figures and
    (next-token) the flipped-KV-cache figures under ``without_kv_cache`` / ``with_kv_cache``."""
    out = dict(timed[key])
    if key + OTHER_KV in timed:
        out["without_kv_cache" if kv_cache else "with_kv_cache"] = dict(timed[key + OTHER_KV])
    return out


def add_timings(doc: dict, sampler, timed: list[tuple[str, SampleConfig]], ecfg: EvalConfig, progress: bool) -> None:
    """Time every (key, setting) of this call together (interleaved rounds) and merge into ``doc``'s entries."""
    results = time_items(timing_items(sampler, timed), rounds=ecfg.timing_rounds, search_budget_s=ecfg.timing_budget_s,
                         progress=progress)
    info = {**machine(), "device": str(sampler.device), "bf16": sampler.bf16, "rounds": ecfg.timing_rounds,
            "timed_together": [k for k, _ in timed]}
    for key, sample in timed:
        inf = doc["entries"][key]["inference"]
        for name, fields in timing_fields(results, key, sample.kv_cache).items():
            inf[name] = {**inf.get(name, {}), **fields} if isinstance(fields, dict) else fields
        inf.update(device=info["device"], threads=info["threads"], bf16=sampler.bf16, timing=info)
