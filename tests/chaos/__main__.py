"""``python -m tests.chaos [--seconds 120] [--seed N] ...``: one chaos run; exit 0 only if it
passes. ``python -m tests.chaos --audit DIR`` audits a kept run directory again."""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
from pathlib import Path

from tests.chaos.report import render
from tests.chaos.run import ChaosRun, Settings, audit_directory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__)
    parser.add_argument("--seconds", type=float, default=120.0, help="fault phase length")
    parser.add_argument("--seed", type=int, default=None, help="default: a random one")
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--lease-ttl", type=int, default=4)
    parser.add_argument("--mean-gap", type=float, default=4.0,
                        help="mean seconds between fault starts")
    parser.add_argument("--max-replica-faults", type=int, default=2,
                        help="replicas faulted at once, at most")
    parser.add_argument("--out", type=Path, default=None, help="run directory")
    parser.add_argument("--keep", action="store_true", help="keep the run directory on success")
    parser.add_argument("--audit", type=Path, default=None, metavar="DIR",
                        help="audit a kept run directory again and exit")
    args = parser.parse_args(argv)
    if args.audit is not None:
        report = audit_directory(args.audit)
        print(render(report, args.audit))
        return 0 if report.ok else 1
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(10**6)
    out = args.out or Path(tempfile.mkdtemp(prefix=f"etcdcron-chaos-{seed}-"))
    print(f"[chaos] seed {seed} (replay: make chaos CHAOS_SEED={seed} "
          f"CHAOS_SECONDS={args.seconds:g})", flush=True)
    settings = Settings(seconds=args.seconds, seed=seed, replicas=args.replicas,
                        lease_ttl=args.lease_ttl, mean_gap=args.mean_gap,
                        max_replica_faults=args.max_replica_faults)
    report = ChaosRun(settings, out).execute()
    if report.ok and not args.keep and args.out is None:
        shutil.rmtree(out, ignore_errors=True)
        print(f"[chaos] passed; {out} removed (--keep keeps it)")
    elif not report.ok:
        print(f"[chaos] FAILED; everything is kept in {out}; replay with seed {seed}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
