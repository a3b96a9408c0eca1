"""Benches: collect each case's figures and print one table at the end of the run.

Every row ends up with the test's outcome in "status" (passed / failed / skipped), in the
printed table and in the JSON: a skipped case (a naive side that does not fit, a missing
dependency, a skip marker) is a row that says SKIPPED and why, never a silent gap.
"""
from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

import pytest

ROWS: list[dict] = []


@pytest.fixture
def record(request):
    def add(row: dict) -> None:
        ROWS.append({**row, "nodeid": request.node.nodeid})
    return add


def _suite(nodeid: str) -> str:
    """bench/test_bench_kernels.py::... -> 'kernels' (the JSON file a row lands in)."""
    return Path(nodeid.split("::")[0]).stem.removeprefix("test_bench_")


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    text = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return text.removeprefix("Skipped: ")


def pytest_runtest_logreport(report):
    if report.when != "call" and not report.skipped:
        return
    rows = [r for r in ROWS if r["nodeid"] == report.nodeid]
    if report.skipped:
        reason = _skip_reason(report)
        if not rows:
            ROWS.append({"suite": _suite(report.nodeid), "case": report.nodeid, "nodeid": report.nodeid})
            rows = ROWS[-1:]
        for r in rows:
            r.setdefault("reason", reason)
            r.setdefault("line", f"{r['case']} SKIPPED: {reason}")
    for r in rows:
        r["status"] = report.outcome


def pytest_terminal_summary(terminalreporter):
    if not ROWS:
        return
    tr = terminalreporter
    tr.section("longrl bench summary")
    for row in ROWS:
        prefix = "" if row.get("status") in ("passed", "skipped") else f"[{row.get('status', 'unfinished').upper()}] "
        tr.write_line(prefix + row["line"])
    out_dir = Path(os.environ.get("LONGRL_BENCH_OUT", Path(__file__).parent / "results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.date.today().isoformat()
    by_suite: dict[str, list] = {}
    for r in ROWS:
        by_suite.setdefault(r.get("suite", "bench"), []).append({k: v for k, v in r.items() if k != "line"})
    for suite, rows in by_suite.items():  # one file per suite, so running one suite keeps the others'
        path = out_dir / f"cpu-{suite}-{stamp}.json"
        # a run of some cases replaces those cases' rows of the same day and keeps the rest
        kept = json.loads(path.read_text()) if path.exists() else []
        fresh = {r.get("case") for r in rows}
        path.write_text(json.dumps([r for r in kept if r.get("case") not in fresh] + rows, indent=2))
        tr.write_line(f"(full figures: {path})")
