"""Tokenizer ceilings in the report: what each paradigm's tokenizer allows, beside what its generators reach.

Read from ``<study>/tokenizer_ceilings.json`` (written before training by ``flopmatch.study.ceilings``;
the numbers are :func:`flopmatch.evaluation.ceilings.tokenizer_ceiling`'s). A generator's samples are
its tokenizer's decoded outputs, so its FID and prompt score can be read only against these: rFID at
the generators' own sample count and reference, and the prompt score of the reconstructions. A study
without the file (made before the stage existed) reports "not measured" and no extra columns.
"""

from __future__ import annotations

import math
from pathlib import Path

from flopmatch.errors import UserError
from flopmatch.evaluation.ceilings import CEILINGS_FILE
from flopmatch.files import read_json
from flopmatch.report.data import PROMPT_ATTRIBUTES
from flopmatch.report.render import fmt

# The two token types' ceilings "differ" (a caveat on the page) when their rFIDs differ by more than this
# factor and by more than 2 seed sd of FID (when seeds measured it), or their prompt full match on
# reconstructions by more than this many points and 2 binomial standard errors of the difference.
FID_GAP = 1.10
MATCH_GAP = 0.05


def read_ceilings(root: Path) -> dict | None:
    """The study's ceilings document, or None if it has none (or it cannot be read)."""
    path = Path(root) / CEILINGS_FILE
    if not path.exists():
        return None
    try:
        doc = read_json(path)
    except (OSError, ValueError, UserError):  # damaged: the report says "not measured"
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("tokenizers"), dict) else None


def by_paradigm(doc: dict | None) -> dict[str, dict]:
    """Paradigm -> the metrics of its tokenizer's ceiling (empty without a document)."""
    if not doc:
        return {}
    return {p: e["metrics"] for e in doc["tokenizers"].values() for p in e.get("paradigms", [])}


def rfid(metrics: dict, features: str = "effnet") -> float | None:
    """rFID of the reconstructions with ``features`` (None if not measured with it)."""
    return ((metrics.get("fid") or {}).get(features) or {}).get("recon")


def full_match(metrics: dict, which: str = "recon") -> float | None:
    """Prompt full match (fraction) of the reconstructions ("recon") or of the real images ("real")."""
    return ((metrics.get("prompt_following") or {}).get(which) or {}).get("full_match")


def runs_cell(metrics: dict | None) -> str:
    """The runs table's ceiling cell: 'rFID / full match' of the run's tokenizer."""
    if not metrics:
        return "–"
    return f"{fmt(rfid(metrics), '.4g')} / {fmt(full_match(metrics), '.3f')}"


def fit_cell(metrics: dict | None, metric: str) -> str:
    """The fits table's ceiling cell for a fitted metric ("fid", "fid_inception", "prompt" as an error)."""
    if not metrics or metric == "loss":
        return "–"
    if metric == "prompt":
        m = full_match(metrics)
        return "–" if m is None else fmt(1 - m, ".3g")
    return fmt(rfid(metrics, "inception" if metric == "fid_inception" else "effnet"), ".4g")


def _worst_attribute(metrics: dict) -> str:
    """The attribute the scorer gets most wrong on reconstructions, with its accuracy on real images."""
    pf = metrics.get("prompt_following") or {}
    recon, real = pf.get("recon") or {}, pf.get("real") or {}
    scored = [(recon[a], a) for a in PROMPT_ATTRIBUTES if isinstance(recon.get(a), float | int)]
    if not scored:
        return "–"
    acc, name = min(scored)
    return f"{name} {acc:.3f} (real {fmt(real.get(name), '.3f')})"


def ceilings_table(doc: dict) -> tuple[list, list]:
    """One row per tokenizer: kind, token type, paradigms, n, rFID and real FID per extractor, PSNR, SSIM,
    prompt full match on reconstructions and real images, the weakest attribute."""
    features = sorted({f for e in doc["tokenizers"].values() for f in (e["metrics"].get("fid") or {})})
    header = ["tokenizer", "tokens", "paradigms", "images (n)",
              *[h for f in features for h in (f"rFID ({f}) at n", f"real images' FID ({f}) at n")],
              "PSNR (dB)", "SSIM", "prompt full match: reconstructions", "real images", "weakest attribute on reconstructions"]
    rows = []
    for tokens, e in doc["tokenizers"].items():
        m = e["metrics"]
        fids = [fmt(((m.get("fid") or {}).get(f) or {}).get(w), ".4g") for f in features for w in ("recon", "real")]
        rows.append([e.get("kind", "?"), tokens, ", ".join(e.get("paradigms", [])), m.get("num_images"), *fids,
                     fmt(m.get("psnr"), ".2f"), fmt(m.get("ssim"), ".3f"), fmt(full_match(m), ".3f"),
                     fmt(full_match(m, "real"), ".3f"), _worst_attribute(m)])
    return header, rows


def ceiling_banner(doc: dict | None, fid_log_sd: float | None = None) -> list[str]:
    """A caveat when the continuous (diffusion) and discrete (token paradigms) tokenizers' ceilings differ.

    ``fid_log_sd``: the seed sd of log FID the verdicts use, when seeds measured it (raises the FID threshold).
    """
    tok = (doc or {}).get("tokenizers") or {}
    if "continuous" not in tok or "discrete" not in tok:
        return []
    a, b = tok["continuous"]["metrics"], tok["discrete"]["metrics"]
    diffs = []  # (text, continuous better)
    fa, fb = rfid(a), rfid(b)
    if fa and fb and abs(math.log(fa / fb)) > max(math.log(FID_GAP), 2 * (fid_log_sd or 0.0)):
        diffs.append((f"rFID {fa:.4g} vs {fb:.4g} at n = {a.get('num_images')}", fa < fb))
    ma, mb = full_match(a), full_match(b)
    if ma is not None and mb is not None:
        se = math.sqrt(ma * (1 - ma) / max(a.get("num_images") or 1, 1) + mb * (1 - mb) / max(b.get("num_images") or 1, 1))
        if abs(ma - mb) > max(MATCH_GAP, 2 * se):
            diffs.append((f"prompt full match of reconstructions {ma:.3f} vs {mb:.3f}", ma > mb))
    if not diffs:
        return []
    token_p = ", ".join(tok["discrete"].get("paradigms", [])) or "token"
    better = {c for _, c in diffs}
    if better == {True}:
        head = f"The diffusion tokenizer's ceiling is better than the token paradigms' ({token_p})"
    elif better == {False}:
        head = f"The token paradigms' tokenizer ceiling ({token_p}) is better than the diffusion tokenizer's"
    else:
        head = f"The diffusion and token paradigms' ({token_p}) tokenizer ceilings differ, in opposite directions"
    return [f"{head}: {'; '.join(t for t, _ in diffs)}. Part of any quality or prompt-following gap between them may "
            "be the tokenizer's (see Tokenizer ceilings)."]


def add_column(header: list, rows: list, after: str, name: str, cells: list) -> tuple[list, list]:
    """``header`` and ``rows`` with the column ``name`` (one cell per row) inserted after the column ``after``."""
    i = header.index(after) + 1
    return header[:i] + [name] + header[i:], [r[:i] + [c] + r[i:] for r, c in zip(rows, cells, strict=True)]
