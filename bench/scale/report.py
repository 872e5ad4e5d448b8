"""Markdown tables for docs/scale.md from the JSON that bench.scale.submit and bench.scale.fleet wrote.

    .venv/bin/python -m bench.scale.report bench/scale/results
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

FLEETS = (
    ("fleet-32.json", "merged code, 32 ids per message"),
    ("fleet-128.json", "merged code, 128 ids per message"),
    ("fleet-proto-32.json", "proposed changes 1–2, 32 ids per message"),
    ("fleet-proto-128.json", "proposed changes 1–3 (128 ids per message)"),
)


def _row(*cells: object) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def _table(columns: list[str], rows: list[str]) -> str:
    """A Markdown table: the header of columns, its rule, then the rows (each from _row)."""
    return "\n".join([_row(*columns), "|" + "---|" * len(columns), *rows])


def submit_table(after: dict[str, Any], before: dict[str, Any] | None) -> str:
    rows = []
    old = {r["store"]: r["submit"] for r in (before or {}).get("runs", [])}
    for run in after["runs"]:
        s, p = run["submit"], run.get("phases", {})
        was = old.get(run["store"])
        before_text = f"{was['seconds']:.1f} s ({was['requests_per_s']:,}/s, {was['peak_rss_mib']:.0f} MiB)" if was else "—"
        phases = f"{p['validate_and_spool_s']:.1f} · {p['store_s']:.1f} · {p['enqueue_s']:.1f} s" if p else "—"
        rows.append(_row(run["store"], before_text, f"**{s['seconds']:.1f} s**", f"**{s['requests_per_s']:,}**",
                         f"**{s['peak_rss_mib']:.0f} MiB**", phases))
    return "\n".join(rows)


def tracking_table(after: dict[str, Any]) -> str:
    columns = ["store", "moment", "`producer status` (process)", "status query alone", "`producer jobs` (process)",
               "jobs query alone", "interpreter + imports"]
    rows = []
    for run in after["runs"]:
        for key, moment in (("tracking_after_submit", "after submit (all queued)"), ("tracking_half_done", "half the requests done")):
            t = run.get(key)
            if t:
                rows.append(_row(run["store"], moment, f"{t['status_cli_s']:.2f} s", f"{t['status_query_s']:.3f} s",
                                 f"{t['jobs_cli_s']:.2f} s", f"{t['jobs_query_s']:.3f} s", f"{t['interpreter_and_imports_s']:.2f} s"))
    return _table(columns, rows)


def fleet_table(report: dict[str, Any]) -> str:
    columns = ["N", "completed req/s (= result rows/s)", "messages/s", "commits/s", "rows written/s", "WAL B/req",
               "CPU ms/req: workers · Redis · PostgreSQL", "other processes ms/req", "PG sessions", "PG waits (avg sessions)"]
    rows = []
    for r in sorted(report["runs"], key=lambda r: r["workers"]):
        c = r["cpu_ms_per_request"]
        waits = ", ".join(f"{k} {v}" for k, v in list(r["pg_waits"].items())[:3])
        locks = r.get("pg_lock_waits_by_query") or {}
        if locks:
            waits += "; lock waits on: " + ", ".join(f"`{q.split('(')[0].strip()}…` {v}" for q, v in locks.items())
        rows.append(_row(
            r["workers"], f"**{r['completed_per_s']:,.0f}**", f"{r['messages_per_s']:,.0f}", f"{r['commits_per_s']:,.0f}",
            f"{r['rows_written_per_s']:,.0f}", r.get("wal_bytes_per_request", "—"),
            f"{c['workers']:.2f} · {c['redis']:.3f} · {c['postgres']:.2f}", f"{r['other_cpu_ms_per_request']:.2f}",
            r.get("pg_sessions_max", "—"), waits,
        ))
    return _table(columns, rows)


def main(directory: str) -> None:
    root = Path(directory)
    after = json.loads((root / "submit.json").read_text())
    before_path = root / "submit-before.json"
    before = json.loads(before_path.read_text()) if before_path.exists() else None
    print("## submit\n")
    print(submit_table(after, before))
    print("\n## tracking\n")
    print(tracking_table(after))
    for name, title in FLEETS:
        path = root / name
        if path.exists():
            print(f"\n## {title} ({name})\n")
            print(fleet_table(json.loads(path.read_text())))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench/scale/results")
