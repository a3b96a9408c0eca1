"""The one-call GPU suite on a machine like the GPU machine minus the GPU: no pytest, no
triton (hidden by a sitecustomize), no CUDA. It must import, report every case skipped with
"needs CUDA", write its JSON and exit with status 2, without a traceback."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HIDE = '''
import sys
class _Hide:
    """A machine without these packages: importing them fails as if never installed."""
    names = ("pytest", "triton", "flash_attn")
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, _Hide())
'''


def test_suite_without_cuda_pytest_or_triton_skips_every_case(tmp_path):
    fake = tmp_path / "site"
    fake.mkdir()
    (fake / "sitecustomize.py").write_text(HIDE)
    env = {**os.environ, "PYTHONPATH": f"{fake}{os.pathsep}{ROOT}", "CUDA_VISIBLE_DEVICES": ""}
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_suite", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    report = json.loads((out / "gpu_suite.json").read_text())
    assert report["pytest"] is None and report["triton"] is None and report["card"] is None
    cases = ["tests", "bf16_matmul_tflops", "grpo_loss", "rollout", "rl_step", "update", "ring"]
    for name in cases:
        assert report[name] == {"skipped": "needs CUDA"}
        assert f"{name}: skipped (needs CUDA)" in proc.stdout
    assert "pytest missing" in proc.stdout and "triton missing" in proc.stdout


def test_rl_step_case_budget_follows_free_memory():
    from bench.train_step_case import budget_from_free_memory

    gib = 1 << 30
    per_token = 28 * 1536 * 2 + 40 * 1536 * 2  # the 1.5B shape: 209 KiB per token
    assert budget_from_free_memory(40 * gib, 28, 1536) == 32768  # capped
    assert budget_from_free_memory(4 * gib, 28, 1536) == (2 * gib // per_token) // 1024 * 1024 == 10240
    assert budget_from_free_memory(gib // 8, 28, 1536, floor=17408) == 17408  # never below one sequence
