"""Tokenizer matching: train the study's KL and LFQ autoencoders to comparable reconstruction quality, or state the gap.

The two learned tokenizers share architecture and steps, not quality (cpu preset, 600 steps: KL ~31.0 dB, LFQ
~28.4 dB PSNR). With ``StudyConfig.tokenizer_match`` > 0 (a tolerance in dB) the tokenizer phase runs
:func:`match_tokenizers`:

1. train both at the configured steps, exactly as without matching, into ``tokenizers/kl`` and ``tokenizers/lfq``;
2. measure each one's validation PSNR (:func:`val_psnr` on :func:`validation_set`: the first 500 images of the
   study's eval split, encoded and decoded in eval mode, the squared error pooled over all pixels in [-1, 1]);
3. while the weaker one is more than the tolerance below the stronger one, retrain it *from scratch* with twice
   the steps of its last candidate, into ``tokenizers/candidates/<kind>-s<steps>``, as long as the steps stay within
   ``tokenizer_match_max`` x the configured steps;
4. put the weaker kind's candidate closest to the stronger one at ``tokenizers/<kind>`` (renames; the one it
   replaces moves to ``candidates/``, so nothing trained is deleted). The stronger one is never retrained or moved;
5. write ``tokenizers/match.json`` (atomic): the settings, every candidate's steps, PSNR and directory, the chosen
   steps, the final gap and whether it is within the tolerance.

The runs read ``tokenizers/<kind>`` as always, so nothing downstream changes; the ceiling stage
(``flopmatch.study.ceilings``) keys its measurements by the tokenizer's fingerprint and so re-measures a replaced
one. Resumable: a candidate is recognised by its stored config wherever it lies (so a study killed between the
two renames of step 4 recovers), a finished match.json with the study's settings is reused, and nothing already
trained is trained again. Changing the settings of an existing study is refused earlier, by ``grow.reconcile``.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

import torch

from flopmatch.data.datasets import make_dataset
from flopmatch.errors import UserError
from flopmatch.evaluation.tokenizer import reconstruct
from flopmatch.files import atomic_write_json, read_json
from flopmatch.study.plan import autoencoder_config, base_config, token_types, tokenizer_dirs
from flopmatch.study.presets import StudyConfig
from flopmatch.tokenizers.autoencoder import AutoencoderConfig
from flopmatch.tokenizers.base import LEARNED_KIND
from flopmatch.tokenizers.learned import LearnedAutoencoder
from flopmatch.tokenizers.registry import load_learned
from flopmatch.tokenizers.train_ae import psnr_from_mse, train_autoencoder

MATCH_FILE = Path("tokenizers") / "match.json"  # relative to the study; flopmatch.report.ceilings reads it
CANDIDATES = Path("tokenizers") / "candidates"
VAL_IMAGES = 500  # validation images: the PSNR's standard error is far below the tolerances worth asking for
MATCH_VERSION = 1
METRIC = ("PSNR (dB) of the squared error pooled over every pixel of the images, in [-1, 1]: 10 log10(4 / MSE); "
          "encode + decode in eval mode, fp32, on the CPU")


def matching(scfg: StudyConfig) -> bool:
    """Whether the study matches its tokenizers: a tolerance > 0, learned tokenizers, and paradigms of both token
    types (with one type, or weight-free tokenizers, there is nothing to match: a no-op, not an error)."""
    return scfg.tokenizer == "learned" and scfg.tokenizer_match > 0 and token_types(scfg) == set(LEARNED_KIND)


def candidate_dir(study: Path, kind: str, steps: int) -> Path:
    """Where a candidate of ``kind`` trained for ``steps`` lies while it is not the study's tokenizer."""
    return study / CANDIDATES / f"{kind}-s{steps}"


def schedule(scfg: StudyConfig, steps: int) -> list[int]:
    """Every schedule a tokenizer configured for ``steps`` may get: steps, 2x, 4x, ... up to ``tokenizer_match_max`` x."""
    out = [steps]
    while out[-1] * 2 <= scfg.tokenizer_match_max * steps:
        out.append(out[-1] * 2)
    return out


def train_tokenizer(cfg: AutoencoderConfig, directory: Path, images_uint8: torch.Tensor, data_info: dict,
                    progress: bool) -> None:
    """Train one learned tokenizer of the study into ``directory`` (its tokenizer.json is written last)."""
    print(f"[study] training the {cfg.kind} tokenizer ({cfg.steps} steps) -> {directory}")
    train_autoencoder(cfg, images_uint8, out_dir=directory, data_info=data_info, progress=progress)


def validation_set(scfg: StudyConfig, study: Path) -> tuple[torch.Tensor, dict]:
    """The fixed PSNR validation images, uint8 (N, 3, S, S): the first :data:`VAL_IMAGES` of the eval split of the
    study's data (fewer if the split is smaller; never seen in training), and their description for match.json."""
    data = base_config(scfg, scfg.objectives[0], scfg.depths[0], scfg.budgets[0], 0, study).data
    ds = make_dataset(data, "eval")
    n = min(VAL_IMAGES, len(ds))
    return ds.images_uint8()[:n], {"dataset": data.name, "split": "eval", "images": f"the first {n}",
                                   "num_images": n, "fingerprint": ds.fingerprint(), "metric": METRIC}


@torch.no_grad()
def val_psnr(tok: LearnedAutoencoder, images_uint8: torch.Tensor) -> float:
    """PSNR in dB of ``tok``'s reconstructions of uint8 images (N, 3, S, S): :func:`psnr_from_mse` of the squared error
    pooled over all pixels (images in [-1, 1], reconstructions clamped by decode). Measured in eval mode on the CPU,
    in fp32, so the number depends neither on the device the tokenizer trained on nor on autocast."""
    tok = tok.to("cpu").eval()
    recon, _, _ = reconstruct(tok, images_uint8)  # (N, 3, S, S) in [-1, 1]
    x = images_uint8.double() / 127.5 - 1.0
    return psnr_from_mse(float((recon.double() - x).pow(2).mean()))


def _load(directory: Path) -> LearnedAutoencoder | None:
    """The finished tokenizer in ``directory``, or None (missing, or a training that was killed before its end)."""
    if not (directory / "tokenizer.json").exists():
        return None
    try:
        return load_learned(directory)
    except UserError:
        return None


def _find(study: Path, tokens: str, cfg: AutoencoderConfig) -> tuple[Path, LearnedAutoencoder] | None:
    """The finished tokenizer of exactly ``cfg``, at ``tokenizers/<kind>`` or among the candidates, if there is one."""
    for directory in (tokenizer_dirs(study)[tokens], candidate_dir(study, cfg.kind, cfg.steps)):
        tok = _load(directory)
        if tok is not None and tok.config.to_dict() == cfg.to_dict():
            return directory, tok
    return None


def _candidate(study: Path, tokens: str, cfg: AutoencoderConfig, images_uint8: torch.Tensor, data_info: dict,
               progress: bool) -> tuple[Path, LearnedAutoencoder]:
    """The candidate of ``cfg``: found, or trained (into ``tokenizers/<kind>`` while that holds none, as a study
    without matching would, else into its candidate directory)."""
    found = _find(study, tokens, cfg)
    if found:
        return found
    target = tokenizer_dirs(study)[tokens]
    directory = target if _load(target) is None else candidate_dir(study, cfg.kind, cfg.steps)
    # A longer candidate starts from scratch: warmup-cosine is fixed by its length, so twice the steps is a new
    # schedule (a different learning rate at every step), not a continuation of the shorter training.
    train_tokenizer(cfg, directory, images_uint8, data_info, progress)
    return directory, load_learned(directory)


def _check_target(study: Path, tokens: str, base: AutoencoderConfig, scfg: StudyConfig) -> None:
    """Refuse a ``tokenizers/<kind>`` that holds a tokenizer no candidate of this study could be (it would be moved
    aside under a candidate's name)."""
    target = tokenizer_dirs(study)[tokens]
    tok = _load(target)
    if tok is None or tok.config.to_dict() in [replace(base, steps=s).to_dict() for s in schedule(scfg, base.steps)]:
        return
    got, want = tok.config.to_dict(), base.to_dict()
    key = next((k for k in want if k != "steps" and got.get(k) != want[k]), "steps")
    raise UserError(f"{target} holds a {base.kind} tokenizer trained with {key}={got.get(key)!r}, which this study's "
                    f"tokenizer matching would not train ({key}={want[key]!r}); move it away, or use another --out")


def _install(study: Path, tokens: str, directory: Path) -> None:
    """Make the candidate in ``directory`` the study's tokenizer at ``tokenizers/<kind>`` by renames (atomic each);
    the tokenizer it replaces moves to its candidate directory."""
    target = tokenizer_dirs(study)[tokens]
    if directory == target:
        return
    held = _load(target)
    if held is not None:
        aside = candidate_dir(study, held.kind, held.config.steps)
        if aside.exists():  # only a killed training can be there: a finished one of that config is the one at target
            if _load(aside) is not None:
                raise UserError(f"{target} and {aside} hold the same tokenizer twice; delete one, then re-run")
            shutil.rmtree(aside)
        aside.parent.mkdir(parents=True, exist_ok=True)
        os.rename(target, aside)
    elif target.exists():  # a killed training's leftovers (no tokenizer.json): nothing finished to keep
        shutil.rmtree(target)
    os.rename(directory, target)


def _settings(scfg: StudyConfig, base: dict[str, AutoencoderConfig], validation: dict) -> dict:
    """What a match.json is a result of: reused only when these are the study's."""
    return {"version": MATCH_VERSION, "tolerance_db": scfg.tokenizer_match, "max_multiple": scfg.tokenizer_match_max,
            "validation": validation, "configs": {cfg.kind: cfg.to_dict() for cfg in base.values()}}


def read_match(study: Path) -> dict | None:
    """The study's match.json, or None if it has none or it cannot be read."""
    try:
        doc = read_json(study / MATCH_FILE)
    except UserError:
        return None
    return doc if isinstance(doc, dict) else None


def match_finished(study: Path, scfg: StudyConfig) -> bool:
    """From files alone (cheap): match.json is finished, for the study's tolerance and maximum, and each chosen
    tokenizer is the one at ``tokenizers/<kind>`` (its stored fingerprint)."""
    doc = read_match(study)
    if not doc or doc.get("finished") is not True or doc.get("tolerance_db") != scfg.tokenizer_match \
            or doc.get("max_multiple") != scfg.tokenizer_match_max:
        return False
    try:
        for tokens, kind in LEARNED_KIND.items():
            chosen = next(r for r in doc["candidates"][kind] if r["steps"] == doc["chosen_steps"][kind])
            if read_json(tokenizer_dirs(study)[tokens] / "tokenizer.json").get("fingerprint") != chosen["fingerprint"]:
                return False
    except (UserError, KeyError, TypeError, StopIteration, AttributeError):
        return False
    return True


def _check_no_runs(study: Path) -> None:
    """Refuse to start matching in a study whose runs already exist: matching may replace a tokenizer those runs
    trained on (and would decode their checkpoints with), e.g. when a study made with paradigms of one token type
    grows by the other, which is what turns matching on."""
    runs = sorted(p.name for p in (study / "runs").glob("*") if (p / "config.json").exists())
    if runs:
        raise UserError(f"tokenizer matching would retrain a tokenizer that the {len(runs)} run(s) already in {study / 'runs'} "
                        f"(e.g. {runs[0]}) trained on; match in a new study directory (another --out), or pass "
                        "--tokenizer-match 0 here")


def match_tokenizers(study: Path, scfg: StudyConfig, images_uint8: torch.Tensor, data_info: dict,
                     progress: bool = True) -> dict:
    """The matching procedure (module docstring) on training images uint8 (N, 3, S, S); returns match.json's document.

    Trains what is missing and reuses every finished candidate, so it is also the resume of a killed study.
    """
    study = Path(study)
    base = {tokens: autoencoder_config(scfg, tokens) for tokens in LEARNED_KIND}
    val_images, validation = validation_set(scfg, study)
    settings = _settings(scfg, base, validation)
    old = read_match(study)
    if old and all(old.get(k) == v for k, v in settings.items()) and match_finished(study, scfg):
        return old
    for tokens, cfg in base.items():
        _check_target(study, tokens, cfg, scfg)
    _check_no_runs(study)
    tol = scfg.tokenizer_match
    found: dict[str, list] = {tokens: [] for tokens in base}  # token type -> [(steps, PSNR, directory, fingerprint)]

    def write(finished: dict | None) -> dict:
        """match.json with the candidates so far (dirs relative to the study), finished or not."""
        doc = {**settings, "candidates": {base[t].kind: [{"steps": s, "val_psnr": round(p, 4), "dir": d.relative_to(study)
                                                          .as_posix(), "fingerprint": f} for s, p, d, f in rows]
                                          for t, rows in found.items()},
               **(finished or {}), "finished": finished is not None}
        atomic_write_json(study / MATCH_FILE, doc)
        return doc

    for tokens, cfg in base.items():
        directory, tok = _candidate(study, tokens, cfg, images_uint8, data_info, progress)
        found[tokens].append((cfg.steps, val_psnr(tok, val_images), directory, tok.fingerprint()))
        print(f"[study] {cfg.kind} tokenizer, {cfg.steps} steps: validation PSNR {found[tokens][-1][1]:.2f} dB "
              f"({validation['num_images']} eval images)")
    strong, weak = sorted(base, key=lambda t: found[t][0][1], reverse=True)
    target = found[strong][0][1]
    gap = target - found[weak][0][1]
    print(f"[study] tokenizer PSNR gap {gap:.2f} dB ({base[strong].kind} ahead; tolerance {tol:g} dB)")
    for steps in schedule(scfg, base[weak].steps)[1:]:
        if gap <= tol:  # within tolerance, or the last candidate overtook the stronger one: longer would not help
            break
        write(None)  # progress so far, for a reader of a long-running study
        cfg = replace(base[weak], steps=steps)
        print(f"[study] matching: retraining the {cfg.kind} tokenizer from scratch with {steps} steps "
              f"(the {base[strong].kind}'s validation PSNR is {target:.2f} dB)")
        directory, tok = _candidate(study, weak, cfg, images_uint8, data_info, progress)
        found[weak].append((steps, val_psnr(tok, val_images), directory, tok.fingerprint()))
        gap = target - found[weak][-1][1]
        print(f"[study] {cfg.kind} tokenizer, {steps} steps: validation PSNR {found[weak][-1][1]:.2f} dB, gap {gap:.2f} dB")
    # the candidate closest to the stronger one (normally the last); on a tie the shorter one
    chosen = min(found[weak], key=lambda row: abs(target - row[1]))
    for tokens, row in ((strong, found[strong][0]), (weak, chosen)):
        _install(study, tokens, row[2])
    for tokens, rows in found.items():  # where each candidate lies now
        pick = found[strong][0] if tokens == strong else chosen
        found[tokens] = [(s, p, tokenizer_dirs(study)[tokens] if s == pick[0] else candidate_dir(study, base[tokens].kind, s),
                          f) for s, p, _, f in rows]
    final = target - chosen[1]
    doc = write({"chosen_steps": {base[t].kind: (found[strong][0] if t == strong else chosen)[0] for t in base},
                 "stronger": base[strong].kind, "weaker": base[weak].kind, "gap_db": round(final, 4),
                 "within_tolerance": abs(final) <= tol})
    verdict = "matched" if abs(final) <= tol else "not matched"
    print(f"[study] tokenizers {verdict} within {tol:g} dB: {base[weak].kind} at {chosen[0]} steps {chosen[1]:.2f} dB against the "
          f"{base[strong].kind}'s {target:.2f} dB at {base[strong].steps} steps (gap {final:.2f} dB) -> "
          f"{tokenizer_dirs(study)[weak]}")
    return doc
