"""The study's tokenizer phase: the matched learned tokenizers, trained once (and, with ``tokenizer_match``,
matched in reconstruction quality: ``tokenizer_match.py``), then every tokenizer's ceiling.

Runs in the study process for the local launchers, and as one SLURM job (``kind`` "prepare") on a compute
node for ``--launcher slurm``, so that the tokenizers train where the runs will (not on a login node).
"""

from __future__ import annotations

from pathlib import Path

from flopmatch.data.datasets import make_dataset
from flopmatch.errors import UserError
from flopmatch.evaluation.ceilings import CEILINGS_FILE, CEILINGS_VERSION
from flopmatch.files import read_json
from flopmatch.study.ceilings import check_floor, ensure_ceilings
from flopmatch.study.plan import autoencoder_config, base_config, token_types, tokenizer_dirs
from flopmatch.study.presets import StudyConfig
from flopmatch.study.tokenizer_match import match_finished, match_tokenizers, matching, train_tokenizer
from flopmatch.tokenizers.registry import load_tokenizer

PREPARE_JOB = "prepare-tokenizers"  # the phase's job name when a launcher runs it as a job


def ensure_tokenizers(study: Path, scfg: StudyConfig, progress: bool = True) -> None:
    """Train the matched KL and LFQ tokenizers once (a complete, loadable directory is reused); with
    ``tokenizer_match`` > 0, match their quality too (:func:`flopmatch.study.tokenizer_match.match_tokenizers`)."""
    if scfg.tokenizer != "learned":
        return
    probe = base_config(scfg, scfg.objectives[0], scfg.depths[0], scfg.budgets[0], 0, study)
    dataset = make_dataset(probe.data, "train")
    data_info = {"dataset": probe.data.name, "fingerprint": dataset.fingerprint()}
    if matching(scfg):
        match_tokenizers(study, scfg, dataset.images_uint8(), data_info, progress)
        return
    needed = token_types(scfg)
    for tokens, directory in tokenizer_dirs(study).items():
        if tokens not in needed:
            continue
        if (directory / "tokenizer.json").exists():
            try:
                load_tokenizer(directory)
                continue
            except UserError:
                pass  # damaged: retrain
        train_tokenizer(autoencoder_config(scfg, tokens), directory, dataset.images_uint8(), data_info, progress)


def prepare(study: Path, scfg: StudyConfig, progress: bool = True) -> None:
    """The whole phase: :func:`ensure_tokenizers`, then :func:`~flopmatch.study.ceilings.ensure_ceilings`
    (which refuses a tokenizer below the classifier floor)."""
    ensure_tokenizers(study, scfg, progress)
    ensure_ceilings(study, scfg, progress)


def prepared(study: Path, scfg: StudyConfig) -> bool:
    """Whether the phase looks done, from files alone (cheap; for a launcher deciding whether to submit it):
    every learned tokenizer the study needs has its tokenizer.json, a study that matches its tokenizers has a finished
    match.json, and the ceilings file has an entry for every token type measured at the study's sample count and
    features by this version of the stage. :func:`prepare` checks exactly."""
    needed = token_types(scfg)
    if scfg.tokenizer == "learned" and not all((d / "tokenizer.json").exists() for t, d in tokenizer_dirs(study).items()
                                               if t in needed):
        return False
    if matching(scfg) and not match_finished(study, scfg):
        return False
    try:
        doc = read_json(study / CEILINGS_FILE)
        if doc.get("version") != CEILINGS_VERSION:  # measured as an older version did: ensure_ceilings re-measures
            return False
        entries = doc["tokenizers"]
        return all(entries[t]["key"]["num_images"] == scfg.eval_samples
                   and entries[t]["key"]["features"] == sorted(scfg.features) for t in needed)
    except (UserError, KeyError, TypeError, FileNotFoundError):
        return False


def check_prepared(study: Path, scfg: StudyConfig) -> None:
    """After the phase ran elsewhere: raise its classifier-floor refusal here, in the study process, if it applies."""
    if (study / CEILINGS_FILE).exists():
        check_floor(read_json(study / CEILINGS_FILE), scfg, study)


def prepare_job(study: Path) -> dict:
    """The job that runs this phase for the study in ``study`` (settings read from its study.json)."""
    return {"name": PREPARE_JOB, "kind": "prepare", "study": str(study)}
