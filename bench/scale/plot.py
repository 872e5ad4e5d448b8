"""Draw the fleet curve from bench.scale.fleet results: completed requests/s against worker processes.

    .venv/bin/python -m bench.scale.plot docs/scale-fleet.png "label=bench/scale/results/fleet-32.json" ...

Needs matplotlib (the "bench" extra: pip install -e '.[bench]').
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

TARGET = 5_000


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise SystemExit(__doc__)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out, series = Path(argv[0]), argv[1:]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    cpu = ""
    for spec in series:
        label, _, path = spec.partition("=")
        report = json.loads(Path(path).read_text())
        cpu = report["cpu"]
        runs = sorted(report["runs"], key=lambda r: r["workers"])
        workers = [r["workers"] for r in runs]
        left.plot(workers, [r["completed_per_s"] for r in runs], marker="o", label=label)
        right.plot(workers, [sum(r["cpu_ms_per_request"][k] for k in ("workers", "redis", "postgres")) for r in runs], marker="o", label=label)
    left.axhline(TARGET, color="grey", linestyle="--", linewidth=1)
    left.text(1, TARGET * 1.02, "target 5,000/s", color="grey", fontsize=8)
    for axis in (left, right):
        axis.set_xscale("log", base=2)
        axis.set_xticks([1, 2, 4, 8, 16], labels=["1", "2", "4", "8", "16"])
        axis.set_xlabel("worker processes (stand-in engine)")
        axis.grid(alpha=0.3)
    left.set_ylabel("completed requests / s")
    left.set_ylim(bottom=0)
    left.set_title("queue + store throughput (PostgreSQL, Redis)")
    right.set_ylabel("CPU ms per request (workers + Redis + PostgreSQL)")
    right.set_ylim(bottom=0)
    right.set_title("what each request costs")
    left.legend(fontsize=8)
    fig.suptitle(f"bulkgen fleet ceiling on {cpu}", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(out)


if __name__ == "__main__":
    main(sys.argv[1:])
