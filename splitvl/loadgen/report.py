"""From outcomes to figures: latency percentiles, throughput, goodput under SLOs, split by text-only
and image requests; printed as a table and kept as JSON."""

from __future__ import annotations

from collections import Counter

import numpy as np

from splitvl.loadgen.client import Outcome

PERCENTILES = (50, 90, 99)
# Goodput SLO names (vLLM's): time to first token, time per output token, end-to-end latency.
SLO_METRICS = ("ttft", "tpot", "e2el")


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """['ttft:500', 'tpot:50'] -> {'ttft': 0.5, 'tpot': 0.05} (given in ms, kept in seconds)."""
    slos = {}
    for item in items or []:
        name, sep, value = item.partition(":")
        if not sep or name not in SLO_METRICS:
            raise ValueError(f"goodput {item!r}: write NAME:MS with NAME one of {', '.join(SLO_METRICS)}")
        try:
            slos[name] = float(value) / 1000.0
        except ValueError:
            raise ValueError(f"goodput {item!r}: {value!r} is not a number of milliseconds") from None
    return slos


def _stats_ms(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    data = np.asarray(values) * 1000.0
    out = {"mean": float(data.mean())}
    out.update({f"p{p}": float(np.percentile(data, p)) for p in PERCENTILES})
    return out


def _meets(outcome: Outcome, slos: dict[str, float]) -> bool:
    # A request answered whole shows its first token with its last.
    ttft = outcome.ttft if outcome.streamed else outcome.latency
    values = {"ttft": ttft, "tpot": outcome.tpot or 0.0, "e2el": outcome.latency}
    return outcome.ok and all(values[name] is not None and values[name] <= limit for name, limit in slos.items())


def summarize(outcomes: list[Outcome], duration_s: float, slos: dict[str, float]) -> dict:
    """Figures for one group of outcomes over a run of `duration_s` seconds."""
    done = [o for o in outcomes if o.ok]
    failed = [o for o in outcomes if not o.ok]
    output_tokens = sum(o.output_tokens for o in done)
    prompt_tokens = sum(o.prompt_tokens for o in done)
    summary = {
        "requests": len(outcomes),
        "completed": len(done),
        "failed": len(failed),
        "errors": dict(Counter(o.error for o in failed).most_common(5)),
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "request_throughput": len(done) / duration_s,
        "output_throughput": output_tokens / duration_s,
        "total_token_throughput": (prompt_tokens + output_tokens) / duration_s,
        "ttft_ms": _stats_ms([o.ttft for o in done if o.streamed]),
        "tpot_ms": _stats_ms([o.tpot for o in done if o.tpot is not None]),
        "itl_ms": _stats_ms([gap for o in done for gap in o.itls]),
        "e2el_ms": _stats_ms([o.latency for o in done]),
    }
    if slos:
        good = sum(_meets(o, slos) for o in outcomes)
        summary["goodput"] = good / duration_s
        summary["goodput_share"] = good / len(outcomes) if outcomes else 0.0
    return summary


def report(outcomes: list[Outcome], duration_s: float, slos: dict[str, float]) -> dict:
    """All requests, and text-only and image requests apart where the run had both."""
    groups = {"all": summarize(outcomes, duration_s, slos)}
    text = [o for o in outcomes if not o.images]
    image = [o for o in outcomes if o.images]
    if text and image:
        groups["text"] = summarize(text, duration_s, slos)
        groups["image"] = summarize(image, duration_s, slos)
    return groups


def format_table(label: str, groups: dict, duration_s: float) -> str:
    """A plain table of one run (one concurrency or rate) for the terminal."""
    lines = [f"== {label} ({duration_s:.1f} s) " + "=" * max(0, 50 - len(label))]
    names = list(groups)
    width = 24
    lines.append(f"{'':{width}}" + "".join(f"{n:>14}" for n in names))

    def row(title: str, values: list[str]) -> None:
        lines.append(f"{title:{width}}" + "".join(f"{v:>14}" for v in values))

    row("requests ok / failed", [f"{g['completed']}/{g['failed']}" for g in groups.values()])
    row("requests/s", [f"{g['request_throughput']:.2f}" for g in groups.values()])
    row("output tok/s", [f"{g['output_throughput']:.1f}" for g in groups.values()])
    row("total tok/s", [f"{g['total_token_throughput']:.1f}" for g in groups.values()])
    if "goodput" in groups["all"]:
        row("goodput req/s", [f"{g['goodput']:.2f}" for g in groups.values()])
    for metric in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", *(f"p{p}" for p in PERCENTILES)):
            row(
                f"{metric.upper()} {stat} (ms)",
                [f"{g[metric + '_ms'][stat]:.1f}" if g[metric + "_ms"] else "-" for g in groups.values()],
            )
    for error, count in groups["all"]["errors"].items():
        lines.append(f"  {count} x {error}")
    return "\n".join(lines)
