"""The study's tokenizer-ceiling stage: each tokenizer the runs use, scored once as its generators will be.

After the tokenizers exist and before any run trains, every token type the study's paradigms consume
gets its tokenizer's ceiling (:func:`flopmatch.evaluation.ceilings.tokenizer_ceiling`: rFID and rKID at the
generators' sample count with their feature extractors and reference, PSNR, the prompt score of its
reconstructions against that of the real images). The numbers go to ``<study>/tokenizer_ceilings.json``
(atomic), keyed by the tokenizer's fingerprint and the evaluation settings, so a re-run or a grown
study reuses them and a changed tokenizer or setting recomputes them. The report reads the file.

The tokenizer is the one a run of that token type gets (``flopmatch.prepare.build_tokenizer`` on the
run config): the study's learned KL / LFQ autoencoder, or the weight-free patch / k-means tokenizer
fitted on the study's data (fitted here once and cached, so the runs find it).

Classifier floor: where prompts are scored by the shapes attribute classifier, a study whose tokenizer's
reconstructions fail the classifier too often (:data:`CLASSIFIER_FLOOR`) stops here, before training.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from flopmatch.data.datasets import make_dataset
from flopmatch.errors import UserError
from flopmatch.evaluation.ceilings import CEILINGS_FILE, CEILINGS_VERSION, tokenizer_ceiling
from flopmatch.files import atomic_write_json, read_json
from flopmatch.objectives import make_objective
from flopmatch.prepare import build_tokenizer
from flopmatch.study.plan import autoencoder_config, base_config, tokenizer_dirs
from flopmatch.study.presets import StudyConfig

# Full match of the attribute classifier on a tokenizer's reconstructions of real eval images (their own
# captions as prompts), below which the study refuses to score prompt following. Below one half, most
# images a perfect generator on that tokenizer could make already fail their prompt, so the prompt score
# would measure the tokenizer (and how the classifier reads its blur) more than the paradigm. Measured
# (shapes, 32 px): the cpu preset's tokenizers (600 steps, 250 images) give 0.79 (KL) and 0.68 (LFQ) against
# 1.00 on the real images, the LFQ's 6 binomial sd above the floor (its loss is mostly shape: 0.76); the
# cpu preset's autoencoders untrained give 0.00, a 2-code k-means 0.03 and a 16-code one 0.34; the tiny
# preset's weight-free tokenizers (32 images) give 1.00 (patch, exact) and 0.81 (512-code k-means). A floor
# of 0.8 would refuse the cpu preset; the report states the gap between the two token types instead.
CLASSIFIER_FLOOR = 0.5
FLOOR_SCORER = "attribute-classifier"  # the scorer the floor applies to; other scorers' ceilings are recorded only


def tokenizer_runs(scfg: StudyConfig, study: Path) -> dict[str, tuple]:
    """Token type -> (the RunConfig of the first paradigm that consumes it, [the paradigms that do])."""
    out: dict[str, tuple] = {}
    for objective in scfg.objectives:
        tokens = make_objective(objective).tokens
        if tokens not in out:
            out[tokens] = (base_config(scfg, objective, scfg.depths[0], scfg.budgets[0], 0, study), [])
        out[tokens][1].append(objective)
    return out


def _read(path: Path) -> dict:
    """The ceilings file, or an empty document if it is missing, unreadable or of another version."""
    empty = {"version": CEILINGS_VERSION, "tokenizers": {}}
    if not path.exists():
        return empty
    try:
        doc = read_json(path)
    except UserError:
        return empty  # damaged: recompute
    ok = isinstance(doc, dict) and doc.get("version") == CEILINGS_VERSION and isinstance(doc.get("tokenizers"), dict)
    return doc if ok else empty


def ensure_ceilings(study: Path, scfg: StudyConfig, progress: bool = True) -> dict:
    """Measure (or reuse) the ceiling of every tokenizer the study uses, write the file, apply the floor.

    Returns the document written to ``<study>/tokenizer_ceilings.json``: {"version", "floor", "tokenizers":
    {token type: {"key", "kind", "path", "paradigms", "metrics"}}}. Raises a one-line UserError (after
    writing the measurements) when a tokenizer's reconstructions fall below :data:`CLASSIFIER_FLOOR`.
    """
    path = study / CEILINGS_FILE
    doc = _read(path)
    before = json.dumps(doc, sort_keys=True)
    real_fids: dict = {}  # the real images' FID and KID at n: the same for every tokenizer, computed once
    for tokens, (cfg, paradigms) in tokenizer_runs(scfg, study).items():
        tok = build_tokenizer(cfg, make_objective(cfg.objective.name), make_dataset(cfg.data, "train"))
        # JSON round trip so a key read back from the file compares equal (tuples become lists)
        key = json.loads(json.dumps({"tokenizer_fingerprint": tok.fingerprint(), "data": asdict(cfg.data),
                                     "num_images": scfg.eval_samples, "features": sorted(scfg.features)}))
        entry = doc["tokenizers"].get(tokens)
        if not isinstance(entry, dict) or entry.get("key") != key:
            if progress:
                print(f"[study] measuring the {tok.name} tokenizer's ceiling on {scfg.eval_samples} eval images")
            metrics = tokenizer_ceiling(tok, cfg.data, scfg.eval_samples, list(scfg.features), progress, real_fids)
            entry = {"key": key, "kind": tok.name, "metrics": metrics}
        entry["path"] = cfg.tokenizer.path or None  # None: a weight-free tokenizer from the cache
        entry["paradigms"] = paradigms
        doc["tokenizers"][tokens] = entry
    doc["floor"] = {"scorer": FLOOR_SCORER, "metric": "prompt full match on reconstructions", "value": CLASSIFIER_FLOOR}
    if json.dumps(doc, sort_keys=True) != before:
        atomic_write_json(path, doc)
    check_floor(doc, scfg, study)
    return doc


def check_floor(doc: dict, scfg: StudyConfig, study: Path) -> None:
    """A one-line UserError naming the first tokenizer whose reconstructions the attribute classifier
    passes less often than :data:`CLASSIFIER_FLOOR`, with the fix; nothing for other scorers."""
    for tokens, entry in doc["tokenizers"].items():
        pf = entry["metrics"]["prompt_following"]
        got = pf["recon"].get("full_match")
        if pf["scorer"] != FLOOR_SCORER or got is None or got >= CLASSIFIER_FLOOR:
            continue
        if scfg.tokenizer == "learned":  # the study's own autoencoders (a --set tokenizer.path one goes below)
            steps = _trained_steps(study, scfg, tokens)
            fix = f"train it longer, in a new study directory: --tokenizer-set steps={2 * steps} (it trained {steps})"
        elif entry["kind"] == "kmeans":
            codes = tokenizer_runs(scfg, study)[tokens][0].tokenizer.codebook_size
            fix = f"give it more than {codes} codes (--set tokenizer.codebook_size=...) in a new study directory"
        else:
            fix = "use another tokenizer (--set tokenizer.path=...) in a new study directory"
        raise UserError(
            f"the {entry['kind']} tokenizer of {', '.join(entry['paradigms'])} is too lossy to score prompts with: the "
            f"attribute classifier passes {got:.1%} of its reconstructions of real eval images (real images "
            f"{pf['real'].get('full_match', 0):.1%}), below the floor of {CLASSIFIER_FLOOR:.0%}: {fix}")


def _trained_steps(study: Path, scfg: StudyConfig, tokens: str) -> int:
    """Steps the study's installed learned tokenizer of ``tokens`` trained (tokenizer matching may have retrained it
    longer than configured); the configured steps if its tokenizer.json cannot be read."""
    try:
        return int(read_json(tokenizer_dirs(study)[tokens] / "tokenizer.json")["config"]["steps"])
    except (UserError, OSError, KeyError, TypeError, ValueError):
        return autoencoder_config(scfg, tokens).steps
