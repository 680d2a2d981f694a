"""``flopmatch report STUDY``: parsing only (the work is in flopmatch.report.build)."""

from __future__ import annotations

import sys

from flopmatch.cli.args import count, described


def cmd_report(args) -> int:
    """Build the report and print where it went, the verdicts and the recommendations."""
    # Imported when the command runs, not at the top: the CLI modules load no torch, so that
    # `flopmatch --help` and argument errors answer at once.
    from flopmatch.report.build import build_report
    from flopmatch.report.verdicts import MATCHED_MARK, cell_text

    out = build_report(args.study, n_boot=args.n_boot, seed=args.seed, workers=args.workers)
    for problem in out["problems"]:  # as the report's Runs section lists them
        print(f"warning: {problem}", file=sys.stderr)
    for c in out["claims"]:
        print(f"claim {c['id']}: {c['status'].upper()} -- {c['paper']}")
    measured = [cell for cell in out["table"] if cell["label"] != "not measured"]
    for cell in measured:
        print(f"- {cell['need']} at {cell['budget']:.3g} FLOPs: {cell_text(cell)}")
    if not measured:
        print("- no need compared: a comparison needs two paradigms measured at one budget")
    if any(cell.get("matched") for cell in measured):
        print(f"  {MATCHED_MARK}: at the operating points (the report's Operating points section)")
    print(f"wrote {out['paths']['html']}, {out['paths']['md']} and {out['paths']['csv']}")
    return 0


def register(subparsers) -> None:
    """Add ``flopmatch report STUDY_DIR [--n-boot N] [--seed S] [--workers W]``."""
    p = subparsers.add_parser("report", help="rebuild the study report (HTML, Markdown, CSV) from the run directories",
                              **described(
        """Rebuild a study's report from its files alone: the run directories (runs/*), and where present
        inference_timing.json, tokenizer_ceilings.json, tokenizers/match.json and study.json. Writes
        STUDY/report.html, STUDY/report.md, STUDY/results.csv and STUDY/report_figures/, the same bytes as the
        study wrote (whatever --workers), and prints the claims' verdicts and the recommendation table.""",
        """
        flopmatch report study/
        flopmatch report study/ --workers 2 --n-boot 1000
        """))
    p.add_argument("study", help="study directory (the one holding runs/)")
    p.add_argument("--n-boot", type=count(1), help="bootstrap resamples of the fit bands (default: the study's, from "
                   "its study.json, so the report is the one the study wrote; 1000 without one)")
    p.add_argument("--seed", type=count(0), default=0, help="bootstrap seed (default 0)")
    p.add_argument("--workers", type=count(1), help="processes that fit the scaling trends (default: the cores available "
                   "when there are >= 200 bootstrap refits in all, else 1); the report is the same whatever the number")
    p.set_defaults(func=cmd_report)
