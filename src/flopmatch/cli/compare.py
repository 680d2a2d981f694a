"""``flopmatch compare BASE OTHER``: parsing only (the work is in flopmatch.report.compare)."""

from __future__ import annotations

from flopmatch.cli.args import described, output_dir


def cmd_compare(args) -> int:
    """Compare two studies, print what differs and which recommendation cells change, and where it went."""
    # Imported when the command runs: the CLI modules load no torch, so `flopmatch --help` answers at once.
    from flopmatch.report.compare import METRICS, compare_studies
    from flopmatch.report.verdicts import CONFIDENT

    out = compare_studies(args.base, args.other, args.out)
    for setting, a, b in out["differences"] or [["(no setting differs)", "", ""]]:
        print(f"differs: {setting}: {a} -> {b}" if a or b else setting)
    for name, problems in out["problems"].items():
        for line in problems:
            print(f"warning: {name}: {line}")
    for t in out["table"]:
        if t["status"] not in ("–", "same", "same (no pick in either)"):
            print(f"- {t['need']} at {t['budget']:.3g} FLOPs: {t['base']} -> {t['other']} ({t['status']})")
    unchanged = sum(t["status"].startswith("same") for t in out["table"])
    comparable = sum(t["status"] != "–" and not t["status"].startswith("not comparable") for t in out["table"])
    print(f"{unchanged} of {comparable} recommendation cells measured in both over the same paradigms are unchanged")
    for metric, rows in out["changes"].items():
        moved = [r for r in rows if r["direction"] and r["label"] == CONFIDENT]
        hints = sum(bool(r["direction"]) for r in rows) - len(moved)
        print(f"{METRICS[metric]}: {len(moved)} of {len(rows)} (paradigm, budget) cells move (confident, Holm-corrected)"
              + "".join(f"; {r['paradigm']} at {r['budget']:.3g} x{r['ratio']:.3g}" for r in moved)
              + (f"; {hints} more suggestive" if hints else ""))
    print(f"wrote {out['paths']['html']}, {out['paths']['md']} and {out['paths']['json']}")
    return 0


def register(subparsers) -> None:
    """Add ``flopmatch compare BASE OTHER [--out DIR]``."""
    p = subparsers.add_parser(
        "compare", help="compare two studies that differ in one setting (an ablation): does the answer change?",
        **described(
            """Compare study OTHER against study BASE, e.g. one made with --tokenizer weight-free or
            --set train.schedule=constant against the default. Prints and writes what differs between the two
            study.json files, every recommendation cell side by side (same / changed), and per paradigm and budget
            the ratio of KID and prompt-following error with a test that uses each study's own seed variance
            (Holm-corrected). Writes compare.html, compare.md and compare.json to --out.""",
            """
            flopmatch study --tokenizer weight-free --out study_wf/ && flopmatch compare study/ study_wf/
            flopmatch compare study/ study_const/ --out ablations/constant
            """))
    p.add_argument("base", help="the base study directory (the one holding runs/)")
    p.add_argument("other", help="the study that differs from it in one setting")
    p.add_argument("--out", default=None, type=output_dir,
                   help="directory for compare.html, compare.md, compare.json (default: OTHER/compare_vs_<BASE name>)")
    p.set_defaults(func=cmd_compare)
