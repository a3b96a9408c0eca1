"""W local ranks over gloo, each a spawned process, with a deadline on the whole run and a
timeout on every collective; a rank's failure comes back with its traceback, and no
process outlives the call. The multi-process tests and the sequence-parallel bench use it
(runs launch with torchrun instead)."""
from __future__ import annotations

import datetime
import os
import pickle
import socket
import traceback

import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world, port, queue, args, backend="gloo"):
    import torch
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        result = fn(rank, world, *args)
        # pickled here: the queue's feeder thread would print a pickling error and send nothing,
        # and the caller would wait out its whole deadline for this rank
        queue.put((rank, "ok", pickle.dumps(result)))
    except BaseException:  # noqa: BLE001 - every failure goes back to the test with its traceback
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world: int, *args, timeout: float = 120.0, backend: str = "gloo") -> list:
    """Run fn(rank, world, *args) on `world` gloo ranks; -> each rank's return value, in rank
    order. Raises with every failing rank's traceback, or TimeoutError past `timeout` seconds
    (all ranks killed either way)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, queue, args, backend), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    results, errors, clean = {}, [], False
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
    try:
        while len(results) + len(errors) < world:
            left = (deadline - datetime.datetime.now()).total_seconds()
            if left <= 0:
                raise TimeoutError(f"{world} ranks: no result from ranks "
                                   f"{sorted(set(range(world)) - set(results) - {e[0] for e in errors})} "
                                   f"within {timeout:.0f} s")
            try:
                rank, status, payload = queue.get(timeout=min(left, 1.0))
            except Exception:  # queue.Empty: check for ranks that died without a word
                heard = set(results) | {e[0] for e in errors}
                dead = [r for r, p in enumerate(procs) if p.exitcode is not None and r not in heard]
                if dead and queue.empty():  # gone without a word (killed, or exited with nothing sent)
                    said = "".join(f"\n--- rank {r} ---\n{tb}" for r, tb in sorted(errors))
                    raise RuntimeError(f"ranks {dead} died (exit codes {[procs[r].exitcode for r in dead]}){said}")
                continue
            if status == "ok":
                results[rank] = pickle.loads(payload)
            else:
                errors.append((rank, payload))
        if errors:
            raise AssertionError("\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors)))
        clean = True
        return [results[r] for r in range(world)]
    finally:
        for p in procs:  # after a success the ranks are finishing; after a failure nobody waits for them
            if clean:
                p.join(timeout=10)
            if p.is_alive():
                p.kill()
            p.join()
