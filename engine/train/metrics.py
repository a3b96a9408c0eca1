"""One JSON row per step in RUN_DIR/metrics.jsonl, appended and flushed as it happens."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path


class MetricsLog:
    """fresh: start a new file. resume_after_step: drop this stage's rows logged after the
    checkpoint the run resumes from (they are logged again). Neither: append (a later stage)."""

    def __init__(self, run_dir: str | os.PathLike, stage: str, *, fresh: bool = False,
                 resume_after_step: int | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = _tensorboard(Path(run_dir) / "tb")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fresh and self.path.exists():
            self.path.unlink()
        elif resume_after_step is not None and self.path.is_file():
            keep = []
            for line in self.path.read_text().splitlines():
                if not line.strip():
                    continue
                row = json.loads(line)
                if not (row.get("stage") == stage and row.get("step", 0) > resume_after_step):
                    keep.append(line)
            self.path.write_text("".join(line + "\n" for line in keep))

    def write(self, row: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(clean) + "\n")
        if self.tb is not None:
            prefix = row.get("stage", "run")
            for key, value in clean.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                    self.tb.add_scalar(f"{prefix}/{key}", value, row.get("step", 0))
            self.tb.flush()

    def rows(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def efficiency(model, tokens: int, seconds: float, peak_tflops: float) -> dict:
    """MFU of an update (6 FLOPs per parameter per token for forward + backward; attention
    left out, so long sequences read low) when train.peak_tflops is set, and on a GPU its
    memory, utilisation and power from NVML."""
    out = {}
    if peak_tflops and seconds > 0 and tokens:
        params = sum(p.numel() for p in model.parameters())
        out["mfu"] = 6 * params * tokens / seconds / (peak_tflops * 1e12)
    out.update(gpu_stats())
    return out


def gpu_stats() -> dict:
    """NVML readings of GPU 0; an empty dict where there is no GPU or no NVML (quietly)."""
    try:
        import torch
        if not torch.cuda.is_available():
            return {}
        import pynvml
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
        util = pynvml.nvmlDeviceGetUtilizationRates(handle)
        return {"gpu/memory_gb": mem.used / 2 ** 30, "gpu/util": util.gpu,
                "gpu/power_w": pynvml.nvmlDeviceGetPowerUsage(handle) / 1000,
                "gpu/max_allocated_gb": torch.cuda.max_memory_allocated() / 2 ** 30}
    except Exception:
        return {}


def _tensorboard(log_dir: Path):
    """A SummaryWriter when the tensorboard package is installed, else None."""
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter
    except Exception:
        return None
    return SummaryWriter(str(log_dir))
