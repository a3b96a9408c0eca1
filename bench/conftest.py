"""Benches: collect each case's figures and print one table at the end of the run."""
from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

import pytest

ROWS: list[dict] = []


@pytest.fixture
def record():
    return ROWS.append


def pytest_terminal_summary(terminalreporter):
    if not ROWS:
        return
    tr = terminalreporter
    tr.section("longrl bench summary")
    for row in ROWS:
        tr.write_line(row["line"])
    out_dir = Path(os.environ.get("LONGRL_BENCH_OUT", Path(__file__).parent / "results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.date.today().isoformat()
    by_suite: dict[str, list] = {}
    for r in ROWS:
        by_suite.setdefault(r.get("suite", "bench"), []).append({k: v for k, v in r.items() if k != "line"})
    for suite, rows in by_suite.items():  # one file per suite, so running one suite keeps the others'
        path = out_dir / f"cpu-{suite}-{stamp}.json"
        path.write_text(json.dumps(rows, indent=2))
        tr.write_line(f"(full figures: {path})")
