"""``flopmatch config``: every ``--set`` key with its type, default, allowed values and meaning.

    flopmatch config                      # the defaults of `flopmatch train`
    flopmatch config --preset cpu         # what each run of `flopmatch study --preset cpu` starts from
    flopmatch config --objective diffusion --json
"""

from __future__ import annotations

import json

from flopmatch import PARADIGMS
from flopmatch.cli.args import described
from flopmatch.config import RunConfig, apply_overrides, describe
from flopmatch.study.presets import STUDY_PRESETS


def cmd_config(args) -> int:
    """Print the config keys (a table, or JSON with --json)."""
    cfg = RunConfig(objective=args.objective)
    if args.preset:
        apply_overrides(cfg, STUDY_PRESETS[args.preset]().overrides)
    rows = describe(cfg)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(r["key"]) for r in rows)
    title = f"--set keys of a run (defaults{f' of study preset {args.preset!r}' if args.preset else ''}):"
    print(title)
    for r in rows:
        value = json.dumps(r["value"])
        allowed = f" [{r['allowed']}]" if r["allowed"] else ""
        print(f"  {r['key']:<{width}}  {r['type']:<5} = {value:<8}{allowed}  {r['help']}")
    print("Set any of them with --set KEY=VALUE (train, flops, study; data.* keys also data inspect); values are checked "
          "against the ranges shown.")
    return 0


def register(sub) -> None:
    """Add ``config`` to the top-level subparsers."""
    p = sub.add_parser("config", help="list every --set key with its type, default, allowed values and meaning", **described(
        """List every key that --set takes (train, flops, study), with its type, default, allowed values and
        meaning: the defaults of `flopmatch train`, or with --preset what each run of that study preset starts
        from. Writes nothing. (A learned tokenizer's keys, for `tokenizer train --set` and `study --tokenizer-set`:
        flopmatch tokenizer train --help.)""",
        """
        flopmatch config                          # the defaults of `flopmatch train`
        flopmatch config --preset cpu             # what each run of `flopmatch study --preset cpu` starts from
        flopmatch config --objective diffusion --json
        """))
    p.add_argument("--preset", choices=STUDY_PRESETS, help="show the defaults a study preset's runs start from (default: none, the plain run defaults)")
    p.add_argument("--objective", choices=PARADIGMS, default="masked", help="paradigm (default: masked)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_config)
