"""The summary table of a chaos run, and the details behind every non-zero "must be 0"."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from tests.chaos.audit import Report, percentile

DETAIL_LIMIT = 40


def _lateness(values: list[float]) -> str:
    if not values:
        return "n=0"
    return (f"p50 {percentile(values, 0.5):7.3f}s  p99 {percentile(values, 0.99):7.3f}s  "
            f"max {max(values):7.3f}s  (n={len(values)})")


def render(report: Report, out: Path | None = None) -> str:
    s = report.settings
    windows = report.windows
    kinds = Counter(w.kind for w in windows)
    lines = [
        "",
        f"chaos run  seed {s.get('seed')}  faults {s.get('seconds')}s  replicas "
        f"{s.get('replicas')} (+1 joining)  lease {s.get('lease_ttl')}s  etcd members 3",
        "faults     " + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())),
        f"workload   {report.counts.get('versions', 0)} job versions, "
        f"{report.counts.get('deliveries', 0)} deliveries, "
        f"{report.counts.get('recorded steps', 0)} recorded steps "
        f"({report.counts.get('retries delivered', 0)} retries), "
        f"{report.counts.get('API calls', 0)} API calls "
        f"({report.counts.get('API calls that raised EtcdCronError', 0)} raised EtcdCronError)",
        "",
        f"{'metric':<38} {'value':>7}  must be 0",
        "-" * 58,
    ]
    for metric in Report.MUST_BE_ZERO:
        value = report.counts.get(metric, 0)
        lines.append(f"{metric:<38} {value:>7}  {'ok' if value == 0 else 'FAILED'}")
    for metric in ("duplicates (in fault windows)", "raced a delete/replace ack", "in flight at the end",
                   "fault injection errors"):
        lines.append(f"{metric:<38} {report.counts.get(metric, 0):>7}")
    lines += [
        f"{'lateness outside fault windows':<38} {_lateness(report.lateness_out)}",
        f"{'lateness inside fault windows':<38} {_lateness(report.lateness_in)}",
        "-" * 58,
        f"result: {'PASSED' if report.ok else 'FAILED'}"
        + (f"   (run directory {out})" if out else ""),
    ]
    failing = [f for f in report.findings if f.metric not in ("fault injection error",)]
    if failing:
        lines += ["", "findings:"]
        for f in failing[:DETAIL_LIMIT]:
            at = f"{f.at:.3f} " if f.at is not None else ""
            near = ""
            if f.at is not None and windows:
                close = [w for w in windows if w.began - 10 <= f.at <= w.ended + 10]
                if close:
                    near = "  [faults near: " + "; ".join(
                        f"{w.kind} {w.target} {w.began:.1f}-{w.ended:.1f}" for w in close) + "]"
            lines.append(f"  {f.metric}: {at}{f.name} {f.version}: {f.text}{near}")
        if len(failing) > DETAIL_LIMIT:
            lines.append(f"  ... and {len(failing) - DETAIL_LIMIT} more")
    infos = [f for f in report.findings if f.metric == "fault injection error"]
    for f in infos:
        lines.append(f"  fault injection error: {f.text}")
    if report.duplicates:
        limit = DETAIL_LIMIT if not report.ok else 10
        lines += ["", "duplicates (each with the fault windows it falls in):"]
        for d, ws in report.duplicates[:limit]:
            lines.append(f"  {d.at:.3f} {d.name} {d.version} on {d.replica} ({d.result}): "
                         + "; ".join(f"{w.kind} {w.target} {w.began:.1f}-{w.ended:.1f}"
                                     for w in ws))
        if len(report.duplicates) > limit:
            lines.append(f"  ... and {len(report.duplicates) - limit} more")
    return "\n".join(lines) + "\n"
