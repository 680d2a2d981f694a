"""``flopmatch bench``: parsing only (the measurements are in flopmatch.bench)."""

from __future__ import annotations

import json
import sys

from flopmatch.cli.args import count, described, number_list
from flopmatch.cli.study import _objectives
from flopmatch.config import RANGES
from flopmatch.errors import UserError

MAX_DEPTH = int(RANGES[("ModelConfig", "depth")].hi)  # model.depth's bound: the one knob also sets the width


def cmd_bench(args) -> int:
    """Measure this machine's matmul peak, training and sampling throughput, text encoding and memory; print them."""
    from flopmatch.bench import BenchOptions, format_bench, run_bench
    from flopmatch.dist import available_cores

    opts = BenchOptions(device=args.device, threads=args.threads, rounds=args.rounds, batch=args.batch, quick=args.quick,
                        compile=args.compile, progress=True)
    if args.depths:
        if max(args.depths) > MAX_DEPTH:
            raise UserError(f"--depths: {max(args.depths)} is above model.depth's maximum {MAX_DEPTH} (width 64 x depth)")
        opts.depths = args.depths
    if args.objectives:
        opts.objectives = args.objectives
    cores = available_cores()
    if args.threads and args.threads > cores:  # allowed (a deliberate oversubscription test), but never by accident
        print(f"warning: --threads {args.threads} is more than the {cores} cores this process may use: threads beyond "
              f"them wait for one another, and the CPU figures will be below this machine's", file=sys.stderr)
    result = run_bench(opts)
    print(json.dumps(result, indent=1) if args.json else format_bench(result))
    return 0


def register(sub) -> None:
    """Add ``bench`` to the top-level subparsers."""
    p = sub.add_parser("bench", help="measure this machine: matmul peak, training and sampling throughput, MFU, memory",
                       **described(
        """Measure this machine in one run and print the figures (--json: one JSON object); writes nothing. The fp32
        and bf16 matmul peak; examples/s of the real training step per paradigm and depth (synthetic inputs of the
        cpu preset's shapes), its FLOP/s and MFU, beside a stock nn.TransformerEncoderLayer stack of the same size;
        sampling images/s at batch 16 and the KV cache's speed-up; MiniLM captions/s; peak memory. Each figure is
        the best of --rounds interleaved rounds: on a shared machine read the ratios, not the absolute figures.""",
        """
        flopmatch bench
        flopmatch bench --device cuda --depths 2,6 --batch 256 --json
        flopmatch bench --quick                 # seconds: checks every part runs; its figures measure nothing
        """))
    p.add_argument("--device", default="auto", help="auto (default: CUDA if available, else CPU), cpu, cuda or cuda:N")
    p.add_argument("--threads", type=count(1), help="torch intra-op threads (default: torch's)")
    p.add_argument("--rounds", type=count(1), default=3, help="interleaved timing rounds; each figure is the best round (default 3)")
    p.add_argument("--depths", type=number_list(int, 1), help="comma-separated depths (default 1,2)")
    p.add_argument("--objectives", type=_objectives, help="comma-separated subset of diffusion,masked,autoregressive (default: all)")
    p.add_argument("--batch", type=count(1), help="training batch (default: the cpu study preset's, 32; 4 with --quick)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and the hash text encoder (seconds; checks that every "
                   "part runs, for tests: its rates, matmul peak and MFU are not measurements of this machine)")
    p.add_argument("--compile", action="store_true", help="also time the training step with torch.compile'd networks "
                   "and autoregressive (next-token) sampling with its cached decode step compiled (a failure is reported, not fatal)")
    p.add_argument("--json", action="store_true", help="print one JSON object (machine, settings and every figure)")
    p.set_defaults(func=cmd_bench)
