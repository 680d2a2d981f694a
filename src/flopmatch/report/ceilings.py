"""Tokenizer ceilings in the report: what each paradigm's tokenizer allows, beside what its generators reach.

Read from ``<study>/tokenizer_ceilings.json`` (written before training by ``flopmatch.study.ceilings``;
the numbers are :func:`flopmatch.evaluation.ceilings.tokenizer_ceiling`'s). A generator's samples are
its tokenizer's decoded outputs, so its FID and prompt score can be read only against these: rFID at
the generators' own sample count and reference, and the prompt score of the reconstructions. A study
without the file (made before the stage existed) reports "not measured" and no extra columns.

FID's counts: since ceilings version 2 the real-image floor and rFID compare n eval images disjoint from
the generators' reference (the first n) with it, and are None when the split holds fewer than 2n images
(``fid_note`` says why; the table shows "–" and the note, the banner repeats it). A version-1 document's
floor compared n reference images with a reference containing them (too low): the banner says so.

A study that matched its learned tokenizers' quality (``flopmatch study --tokenizer-match DB``) also has
``tokenizers/match.json`` (written by ``flopmatch.study.tokenizer_match``): :func:`read_ceilings` attaches it as
"match", the table gets each tokenizer's trained steps and the banner says how the matching ended.
"""

from __future__ import annotations

import math
from pathlib import Path

from flopmatch.errors import UserError
from flopmatch.evaluation.ceilings import CEILINGS_FILE, CEILINGS_VERSION
from flopmatch.files import read_json
from flopmatch.report.data import PROMPT_ATTRIBUTES
from flopmatch.report.render import fmt

# The two token types' ceilings "differ" (a caveat on the page) when their rFIDs differ by more than this
# factor and by more than 2 seed sd of FID (when seeds measured it), or their prompt full match on
# reconstructions by more than this many points and 2 binomial standard errors of the difference.
FID_GAP = 1.10
MATCH_GAP = 0.05
MATCH_FILE = Path("tokenizers") / "match.json"  # flopmatch.study.tokenizer_match.MATCH_FILE (the study layer writes it)


def _read(path: Path) -> dict | None:
    """A JSON object, or None if the file is missing, damaged or not an object."""
    if not path.exists():
        return None
    try:
        doc = read_json(path)
    except (OSError, ValueError, UserError):
        return None
    return doc if isinstance(doc, dict) else None


def read_ceilings(root: Path) -> dict | None:
    """The study's ceilings document, or None if it has none (or it cannot be read; the report says "not
    measured"). A finished tokenizer matching record (tokenizers/match.json) comes with it, under "match"."""
    doc = _read(Path(root) / CEILINGS_FILE)
    if doc is None or not isinstance(doc.get("tokenizers"), dict):
        return None
    match = _read(Path(root) / MATCH_FILE)
    if match and match.get("finished") is True:
        doc["match"] = match
    return doc


def by_paradigm(doc: dict | None) -> dict[str, dict]:
    """Paradigm -> the metrics of its tokenizer's ceiling (empty without a document)."""
    if not doc:
        return {}
    return {p: e["metrics"] for e in doc["tokenizers"].values() for p in e.get("paradigms", [])}


def rfid(metrics: dict, features: str = "effnet") -> float | None:
    """rFID of the reconstructions with ``features`` (None if not measured with it)."""
    return ((metrics.get("fid") or {}).get(features) or {}).get("recon")


def rkid(metrics: dict, features: str = "effnet") -> float | None:
    """rKID of the reconstructions with ``features`` (None if not measured: ceilings before version 3, or R < 2n)."""
    return ((metrics.get("kid") or {}).get(features) or {}).get("recon")


def full_match(metrics: dict, which: str = "recon") -> float | None:
    """Prompt full match (fraction) of the reconstructions ("recon") or of the real images ("real")."""
    return ((metrics.get("prompt_following") or {}).get(which) or {}).get("full_match")


def runs_cell(metrics: dict | None) -> str:
    """The runs table's ceiling cell: 'rFID / full match' of the run's tokenizer."""
    if not metrics:
        return "–"
    return f"{fmt(rfid(metrics), '.4g')} / {fmt(full_match(metrics), '.3f')}"


def fit_cell(metrics: dict | None, metric: str) -> str:
    """The fits table's ceiling cell for a fitted metric ("fid", "fid_inception": the reconstructions' rFID; "kid":
    their rKID, "–" in ceilings measured before version 3; "prompt": their error); "–" for the loss."""
    if not metrics or metric == "loss":
        return "–"
    if metric == "prompt":
        m = full_match(metrics)
        return "–" if m is None else fmt(1 - m, ".3g")
    if metric == "kid":
        return fmt(rkid(metrics), ".3g")
    return fmt(rfid(metrics, "inception" if metric == "fid_inception" else "effnet"), ".4g")


def counts_cell(metrics: dict) -> str:
    """The ceilings table's FID-counts cell: 'reference n / compared n', with the note when FID was not measured;
    a version-1 entry (no counts recorded) says its overlapping convention."""
    if "fid_num_reference" not in metrics:  # version 1: n of the reference images against the whole split
        whole = metrics.get("num_reference")
        return f"{whole if whole else 'whole split'} / {fmt(metrics.get('num_images'))} (overlapping: measured before v2)"
    cell = f"{fmt(metrics.get('fid_num_reference'))} / {fmt(metrics.get('fid_num_compared'))}"
    return cell + (f" ({metrics['fid_note']})" if metrics.get("fid_note") else "")


def fid_notes(doc: dict | None) -> list[str]:
    """Banner lines on the ceilings' FID: not measured (the split lacks 2n images), or measured by version 1; and on
    their KID: a document from before version 3 has none."""
    tok = (doc or {}).get("tokenizers") or {}
    if not tok:
        return []
    if (doc or {}).get("version", 1) < CEILINGS_VERSION and any("fid_num_reference" not in (e.get("metrics") or {})
                                                                   for e in tok.values()):
        return ["Tokenizer ceilings were measured by an earlier flopmatch: their real-image FID floor compared "
                "reference images with a reference set containing them, so it reads too low. Re-run `flopmatch study` "
                "on this directory to re-measure them."]
    notes = sorted({(e.get("metrics") or {}).get("fid_note") for e in tok.values()} - {None})
    out = [f"Tokenizer ceilings: no rFID or real-image FID floor ({note})." for note in notes]
    if (doc or {}).get("version", 1) < 3 and any("kid" not in (e.get("metrics") or {}) for e in tok.values()):
        out.append("Tokenizer ceilings were measured before rKID was (ceilings version 3): the KID ceilings show \"–\". "
                   "Re-run `flopmatch study` on this directory to measure them.")
    return out


def _worst_attribute(metrics: dict) -> str:
    """The attribute the scorer gets most wrong on reconstructions, with its accuracy on real images."""
    pf = metrics.get("prompt_following") or {}
    recon, real = pf.get("recon") or {}, pf.get("real") or {}
    scored = [(recon[a], a) for a in PROMPT_ATTRIBUTES if isinstance(recon.get(a), float | int)]
    if not scored:
        return "–"
    acc, name = min(scored)
    return f"{name} {acc:.3f} (real {fmt(real.get(name), '.3f')})"


def _image_count(m: dict):
    """The table's "images (n)": n, and the distinct images behind it where the evaluation split is smaller (the
    generators' prompts cycle through it, and so do the reconstructions: "32 (12 distinct)")."""
    n, r = m.get("num_images"), m.get("num_eval")
    return f"{n} ({r} distinct)" if isinstance(n, int) and isinstance(r, int) and r < n else n


def ceilings_table(doc: dict) -> tuple[list, list]:
    """One row per tokenizer: kind, token type, paradigms, n, rFID, real FID and rKID per extractor, the image counts
    (reference / compared, with the note when not measured), PSNR, SSIM, prompt full match on reconstructions and
    real images, the weakest attribute."""
    features = sorted({f for e in doc["tokenizers"].values() for f in (e["metrics"].get("fid") or {})})
    header = ["tokenizer", "tokens", "paradigms", "images (n)",
              *[h for f in features for h in (f"rFID ({f}) at n", f"real images' FID ({f}) at n", f"rKID ({f})")],
              "FID and KID images: reference / compared", "PSNR (dB)", "SSIM", "prompt full match: reconstructions", "real images", "weakest attribute on reconstructions"]
    rows = []
    for tokens, e in doc["tokenizers"].items():
        m = e["metrics"]
        fids = [cell for f in features for cell in (fmt(rfid(m, f), ".4g"), fmt(((m.get("fid") or {}).get(f) or {}).get("real"), ".4g"),
                                                     fmt(rkid(m, f), ".3g"))]
        rows.append([e.get("kind", "?"), tokens, ", ".join(e.get("paradigms", [])), _image_count(m), *fids,
                     counts_cell(m), fmt(m.get("psnr"), ".2f"), fmt(m.get("ssim"), ".3f"), fmt(full_match(m), ".3f"),
                     fmt(full_match(m, "real"), ".3f"), _worst_attribute(m)])
    if doc.get("match"):  # matched tokenizers: how long each one trained (and what else was tried)
        header, rows = add_column(header, rows, "paradigms", "trained steps",
                                  [_steps_cell(doc["match"], e.get("kind")) for e in doc["tokenizers"].values()])
    return header, rows


def _candidates(match: dict, kind: str) -> list[dict]:
    """match.json's candidates of ``kind`` in training order (empty if it has none)."""
    rows = (match.get("candidates") or {}).get(kind) or []
    return [r for r in rows if isinstance(r, dict) and isinstance(r.get("steps"), int)]


def _steps_cell(match: dict, kind: str | None) -> str:
    """The trained-steps cell: the chosen candidate's steps, and every schedule tried when there were several."""
    chosen = (match.get("chosen_steps") or {}).get(kind)
    if chosen is None:
        return "–"
    tried = [r["steps"] for r in _candidates(match, kind)]
    return f"{chosen}" + (f" (tried {', '.join(map(str, tried))})" if len(tried) > 1 else "")


def match_line(match: dict | None) -> list[str]:
    """One sentence on the study's tokenizer matching (tokenizers/match.json): which tokenizer trained how long to
    what validation PSNR, and whether it came within the tolerance; nothing without a finished record."""
    try:
        tol, strong, weak = float(match["tolerance_db"]), match["stronger"], match["weaker"]
        target = _candidates(match, strong)[0]
        tried = _candidates(match, weak)
        chosen = next(r for r in tried if r["steps"] == match["chosen_steps"][weak])
        gap, within = float(match["gap_db"]), bool(match["within_tolerance"])
    except (TypeError, KeyError, IndexError, ValueError, StopIteration):
        return []
    s_name, w_name = strong.upper(), weak.upper()
    n = (match.get("validation") or {}).get("num_images")
    on = f"validation PSNR{f' on {n} eval images' if n else ''}"
    against = f"{s_name}'s {target['val_psnr']:.1f} dB at {target['steps']} steps"
    path = (" -> ".join(str(r["steps"]) for r in tried) + " steps ("
            + " -> ".join(f"{r['val_psnr']:.1f}" for r in tried) + " dB)")
    if within and len(tried) == 1:
        text = (f"Tokenizers matched on {on} within {tol:g} dB without retraining: {w_name} {chosen['val_psnr']:.1f} dB "
                f"against {against}.")
    elif within:
        text = f"Tokenizers matched on {on} within {tol:g} dB: {w_name} trained {path} against {against}."
    elif chosen is tried[-1] and gap > 0:  # still short when the schedules ran out
        text = (f"Tokenizers not matched on {on} within {tol:g} dB: {w_name} reached {chosen['val_psnr']:.1f} dB at the "
                f"longest allowed schedule ({chosen['steps']} steps; {path}), {gap:.1f} dB below {against}.")
    else:
        text = (f"Tokenizers not matched on {on} within {tol:g} dB: {w_name} trained {path}; the closest, {chosen['steps']} "
                f"steps ({chosen['val_psnr']:.1f} dB), is {abs(gap):.1f} dB {'below' if gap > 0 else 'above'} {against}.")
    return [text + " The other ceilings (see Tokenizer ceilings) show whether matched PSNR meant matched rFID and "
                   "prompt following."]


def ceiling_banner(doc: dict | None, fid_log_sd: float | None = None) -> list[str]:
    """A caveat when the continuous (diffusion) and discrete (token paradigms) tokenizers' ceilings differ, after
    the lines on the ceilings' FID (:func:`fid_notes`) and on tokenizer matching (:func:`match_line`).

    ``fid_log_sd``: the seed sd of log FID the verdicts use, when seeds measured it (raises the FID threshold).
    """
    tok = (doc or {}).get("tokenizers") or {}
    notes = fid_notes(doc)
    if "continuous" not in tok or "discrete" not in tok:
        return notes
    matched = match_line((doc or {}).get("match"))
    a, b = tok["continuous"]["metrics"], tok["discrete"]["metrics"]
    diffs = []  # (text, continuous better)
    fa, fb = rfid(a), rfid(b)
    if fa and fb and abs(math.log(fa / fb)) > max(math.log(FID_GAP), 2 * (fid_log_sd or 0.0)):  # None: not measured
        diffs.append((f"rFID {fa:.4g} vs {fb:.4g} at n = {a.get('num_images')}", fa < fb))
    ma, mb = full_match(a), full_match(b)
    if ma is not None and mb is not None:
        se = math.sqrt(ma * (1 - ma) / max(a.get("num_images") or 1, 1) + mb * (1 - mb) / max(b.get("num_images") or 1, 1))
        if abs(ma - mb) > max(MATCH_GAP, 2 * se):
            diffs.append((f"prompt full match of reconstructions {ma:.3f} vs {mb:.3f}", ma > mb))
    if not diffs:
        return notes + matched
    token_p = ", ".join(tok["discrete"].get("paradigms", [])) or "token"
    better = {c for _, c in diffs}
    if better == {True}:
        head = f"The diffusion tokenizer's ceiling is better than the token paradigms' ({token_p})"
    elif better == {False}:
        head = f"The token paradigms' tokenizer ceiling ({token_p}) is better than the diffusion tokenizer's"
    else:
        head = f"The diffusion and token paradigms' ({token_p}) tokenizer ceilings differ, in opposite directions"
    hint = ""
    if not matched and {tok["continuous"].get("kind"), tok["discrete"].get("kind")} == {"kl", "lfq"}:
        hint = (" The study did not match the learned tokenizers' quality: `flopmatch study --tokenizer-match DB` "
                "retrains the weaker one longer until their validation PSNRs are within DB dB.")
    return notes + matched + [f"{head}: {'; '.join(t for t, _ in diffs)}. Part of any quality or prompt-following gap between "
                      f"them may be the tokenizer's (see Tokenizer ceilings).{hint}"]


def add_column(header: list, rows: list, after: str, name: str, cells: list) -> tuple[list, list]:
    """``header`` and ``rows`` with the column ``name`` (one cell per row) inserted after the column ``after``."""
    i = header.index(after) + 1
    return header[:i] + [name] + header[i:], [r[:i] + [c] + r[i:] for r, c in zip(rows, cells, strict=True)]
