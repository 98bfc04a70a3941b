"""Fault-injection bench: every failure the pipeline must survive, injected into real parts.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv/bin/python -m bench.faults --json bench/results/faults.json
    .venv/bin/python -m bench.faults --list        # or --only NAME ... [--json OUT.json]
Prints `P/N scenarios passed, data_lost D`; the exit status is 1 if any scenario failed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.faults import SCENARIOS, run_all
from bench.faults.core import write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these scenarios")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    args = parser.parse_args(argv)
    if args.list:
        for item in SCENARIOS.values():
            print(f"{item.name:42s} {item.category:17s} {item.summary}")
        return 0
    unknown = sorted(set(args.only or []) - set(SCENARIOS))
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; see --list")
    report = run_all(args.only)
    if args.json:
        write_report(report, args.json)
    for name, count in report["categories"].items():
        print(f"  {name:17s} {count['passed']}/{count['scenarios']}")
    print(f"{report['passed']}/{report['scenarios']} scenarios passed, data_lost {report['data_lost']}, "
          f"{report['seconds']} s")
    return 0 if report["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
