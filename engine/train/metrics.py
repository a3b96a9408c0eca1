"""One JSON row per step in RUN_DIR/metrics.jsonl, appended and flushed as it happens."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path


class MetricsLog:
    """fresh: start a new file. resume_after_step: drop this stage's rows, and the held-out
    evaluations', logged after the checkpoint the run resumes from (they are logged again).
    Neither: append (a later stage)."""

    def __init__(self, run_dir: str | os.PathLike, stage: str, *, fresh: bool = False,
                 resume_after_step: int | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = _tensorboard(Path(run_dir) / "tb")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fresh and self.path.exists():
            self.path.unlink()
        elif resume_after_step is not None and self.path.is_file():
            keep = [row for row in metrics_rows(run_dir)
                    if not (row.get("stage") in (stage, "eval") and (row.get("step") or 0) > resume_after_step)]
            self.path.write_text("".join(json.dumps(row) + "\n" for row in keep))

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
        return metrics_rows(self.path.parent)


def metrics_rows(run_dir: str | os.PathLike) -> list[dict]:
    """RUN_DIR/metrics.jsonl's rows ([] before the first). A torn last row (a run killed while
    writing it) is left out; any other row that is not JSON is named by line."""
    from ..data.jsonl import jsonl_lines

    path = Path(run_dir).expanduser() / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = [(n, line) for n, line in enumerate(jsonl_lines(path.read_text(encoding="utf-8")), 1) if line.strip()]
    rows = []
    for k, (n, line) in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except ValueError:
            if k == len(lines) - 1:
                continue
            raise ValueError(f"{path}:{n}: not a JSON row") from None
    return rows


def efficiency(model, seconds: float, peak_tflops: float, *, train_tokens: int = 0, forward_tokens: int = 0,
               devices: int = 1) -> dict:
    """MFU over the work `seconds` covers: 6 FLOPs per parameter per token that ran forward
    and backward, 2 per token that ran forward only (old and reference log-probs); attention
    left out, so long sequences read low. `devices`: how many shared that work (the tokens are
    global, the time one rank's). Set when train.peak_tflops is; on a GPU also the step's
    peak memory, and utilisation and power from NVML."""
    out = {}
    flops_per_param = 6 * train_tokens + 2 * forward_tokens
    if peak_tflops and seconds > 0 and flops_per_param:
        params = sum(p.numel() for p in model.parameters())  # global counts, sharded or not
        out["mfu"] = params * flops_per_param / seconds / (peak_tflops * 1e12 * devices)
    out.update(gpu_stats())
    return out


def reset_peak_memory() -> None:
    """Start a step's peak-memory window (torch keeps a lifetime peak otherwise)."""
    import torch
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def nvml_uuid(torch_uuid) -> str:
    """torch's device UUID (as CUDA_VISIBLE_DEVICES maps it) in NVML's spelling. NVML numbers
    the machine's GPUs ignoring CUDA_VISIBLE_DEVICES, so a handle by torch's index can be
    another GPU; by UUID it is this process's."""
    text = str(torch_uuid)
    return text if text.startswith(("GPU-", "MIG-")) else f"GPU-{text}"


def gpu_stats() -> dict:
    """This process's GPU: the step's peak allocated memory (torch), and NVML's memory in use,
    utilisation and power when nvidia-ml-py is installed; {} without a GPU."""
    import torch
    if not torch.cuda.is_available():
        return {}
    out = {"gpu/max_allocated_gb": torch.cuda.max_memory_allocated() / 2 ** 30}
    try:
        import pynvml
        pynvml.nvmlInit()
        uuid = torch.cuda.get_device_properties(torch.cuda.current_device()).uuid
        handle = pynvml.nvmlDeviceGetHandleByUUID(nvml_uuid(uuid))
        mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
        util = pynvml.nvmlDeviceGetUtilizationRates(handle)
        out.update({"gpu/memory_gb": mem.used / 2 ** 30, "gpu/util": util.gpu,
                    "gpu/power_w": pynvml.nvmlDeviceGetPowerUsage(handle) / 1000})
    except Exception:  # no nvidia-ml-py, or NVML unavailable: torch's figure stands alone
        pass
    return out


def _tensorboard(log_dir: Path):
    """A SummaryWriter when the tensorboard package is installed, else None."""
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter
    except Exception:
        return None
    return SummaryWriter(str(log_dir))
