"""One-line summaries of eval.json entries for the terminal."""

from __future__ import annotations


def _fmt(v, spec=".3g"):
    return "-" if v is None else format(v, spec)


def summary_lines(doc: dict, only: list[str] | None = None) -> list[str]:
    """One line per eval entry: KID (the study's quality metric) and FID per extractor, prompt following, FLOPs and
    latency."""
    lines = []
    for key, e in doc.get("entries", {}).items():
        if only is not None and key not in only:
            continue
        m = e["metrics"]
        parts = [key]
        for name in ("effnet", "inception"):
            if name in m:
                if m[name].get("kid") is not None:  # None with --ref-stats (no reference features to compare)
                    parts.append(f"KID[{name}] {_fmt(m[name]['kid'], '.4f')}")
                parts.append(f"FID[{name}] {_fmt(m[name]['fid'], '.2f')}")
        if "prompt_following" in m:
            parts.append(f"prompt match {_fmt(m['prompt_following']['full_match'], '.3f')}")
        inf = e.get("inference")
        if inf:
            parts.append(f"{inf['sample_flops_per_image']:.3g} FLOPs/img")
        if inf and inf.get("latency_s") is not None:
            txt = f"{inf['latency_s'] * 1e3:.0f} ms, {inf.get('throughput_images_per_s', float('nan')):.1f} img/s"
            if inf.get("latency_rounds"):  # v0.2 entries have neither rounds nor spread
                txt += (f" (batch {inf.get('throughput_batch')}, spread {100 * inf.get('latency_spread', 0.0):.0f}% over "
                        f"{len(inf['latency_rounds'])} rounds)")
            parts.append(txt)
        lines.append(" | ".join(parts))
    return lines
