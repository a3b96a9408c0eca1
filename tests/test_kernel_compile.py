"""Every Triton kernel compiles for an H100 / H200 (cuda:90), here, without a GPU: the launch
helpers' launches are captured and each variant goes through Triton's whole pipeline, ptxas
included (kernels/compile_check.py). The interpreter the other kernel tests use never compiles,
so a kernel that only fails in the compiler would otherwise first fail on the card."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(args, tmp_path, timeout=600, env=None):
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, **(env or {})}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # compiled for real, not read from an earlier run's cache
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-W", "ignore", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_every_kernel_variant_compiles_for_cuda_90(tmp_path):
    proc = _run(["-m", "kernels.compile_check"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    n = int(lines[-1].split(": ")[1].split()[0])
    assert n >= 30 and lines[-1].endswith(f"{n} of {n} kernel variants compiled"), lines[-1]
    ok = [line.split() for line in lines[:-1] if line.startswith("ok")]
    # "ok  <s> s  <KB> KB shared  <kernel>(<constexprs>) [<dtype>] <options>"
    labels = [re.match(r"ok +\S+ s +\S+ KB shared  (\S+\(.*?\)) \[(\w+)\]", line).groups()
              for line in lines[:-1] if line.startswith("ok")]
    assert len(labels) == len(ok) == n, "every variant reported once, whichever process compiled it"
    compiled = {label.split("(")[0] for label, _ in labels}
    assert all(words[4:6] == ["KB", "shared"] and 0 <= float(words[3]) <= 227 for words in ok)
    assert compiled == {"_decode_partial_kernel", "_merge_kernel", "_row_stats_kernel", "_row_grad_kernel",
                        "_keys_kernel", "_pass_kernel", "_totals_kernel", "_draw_kernel", "_rms_norm_kernel",
                        "_rope_store_kernel", "_silu_mul_kernel"}
    # an fp32 and a bf16 launch with the same constexprs are two variants, both compiled
    for kernel in ("_keys_kernel(CHUNK=8192, BLOCK=1024)", "_row_stats_kernel(BLOCK_V=4096)",
                   "_rms_norm_kernel(BLOCK_H=2048, RESIDUAL=True)"):
        assert {dtype for label, dtype in labels if label == kernel} == {"fp32", "bf16"}, kernel
    assert any("HAS_MEMBERS=True" in line and "IEEE_DOT=False" in line for line in lines)  # bf16 shared-prefix
    # the sampler's searches in every form the launches take: top-k's, top-p's after it and alone, S_P2 = 32
    passes = {label for label, _ in labels if label.startswith("_pass_kernel")}
    for form in ("FIRST=True, SECOND=False, BY_MASS=False, AFTER_K=False", "FIRST=True, SECOND=False, BY_MASS=True, "
                 "AFTER_K=True", "FIRST=True, SECOND=False, BY_MASS=True, AFTER_K=False",
                 "FIRST=False, SECOND=True, BY_MASS=True", "FIRST=False, SECOND=False, BY_MASS=False"):
        assert any(form in label for label in passes), form
    assert any("S_P2=32" in label for label in passes)


def test_a_kernel_the_compiler_rejects_is_reported(tmp_path):
    """A loop-carried value that changes type: the interpreter runs it, the compiler does not."""
    (tmp_path / "bad_kernel.py").write_text(textwrap.dedent('''
        import triton
        import triton.language as tl

        @triton.jit
        def bad(x_ptr, n, BLOCK: tl.constexpr):
            acc = tl.zeros((), dtype=tl.int32)
            for i in range(0, n, BLOCK):
                acc += tl.sum(tl.load(x_ptr + i + tl.arange(0, BLOCK)), axis=0)  # fp32 into an int32 carry
            tl.store(x_ptr, acc)
    '''))
    script = textwrap.dedent('''
        import sys
        sys.path.insert(0, ".")
        from bad_kernel import bad
        from kernels.compile_check import compile_all
        failures = compile_all([(bad, {"x_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"}, {"BLOCK": 16}, {})], 90,
                               quiet=True)
        print("FAILURES", len(failures))
    ''')
    proc = _run(["-c", script], tmp_path)
    assert "FAILURES 1" in proc.stdout and "FAIL  bad(BLOCK=16)" in proc.stdout, proc.stdout + proc.stderr


def test_a_kernel_over_the_shared_memory_limit_is_reported(tmp_path):
    """Compiled, but it would not launch: the decode kernel (tens of KB of shared memory) checked
    against a 1 KB limit fails, and says how much it needs."""
    script = textwrap.dedent('''
        from kernels.compile_check import capture_launches, compile_all
        variants = [v for v in capture_launches() if v[0].fn.__name__ == "_decode_partial_kernel"][:1]
        failures = compile_all(variants, 90, quiet=True, shared_limit=1024)
        print("FAILURES", len(failures), failures)
    ''')
    proc = _run(["-c", script], tmp_path)
    assert "FAILURES 1" in proc.stdout and "bytes of shared memory a block; cuda:90 allows 1024" in proc.stdout, \
        proc.stdout + proc.stderr


def test_a_compiling_process_that_dies_is_reported(tmp_path):
    """The variants shared among processes: for an architecture LLVM cannot target each process
    aborts (no summary line of its own); each is reported with its exit status, the summary counts
    their variants as not compiled, and the exit status is 1."""
    proc = _run(["-m", "kernels.compile_check", "--arch", "12", "--jobs", "2", "--quiet"], tmp_path)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert sum(line.startswith("FAIL  process ") for line in lines) == 2, lines
    n = int(lines[-1].split(": ")[1].split()[2])
    assert n >= 30 and lines[-1].endswith(f"cuda:12: 0 of {n} kernel variants compiled (2 of 2 processes died)")


def test_the_decode_loop_keeps_the_next_tile_loading(tmp_path):
    """The paged decode kernel compiled as the GPU suite launches it (bf16, the default launch, the
    GPU's divisibility specialisations): while a K/V tile is computed the next one's copies are in
    flight, in the shared-prefix, suffix and plain variants, and no K/V tile is loaded
    synchronously. A block-table lookup in the same iteration as the K/V loads cost that overlap
    (each tile waited for with nothing in flight). The stand-in residency the interpreter's split
    choice assumes is what the compiled shared-prefix variant gets. Without pipelining (one stage)
    the report names the synchronous loads and says so in its exit status."""
    import json

    from kernels.triton_paged import STAND_IN_RESIDENT

    script = textwrap.dedent('''
        import json
        from kernels import compile_check as cc, triton_paged as tp
        rc = cc.main(["--pipeline"])  # its report, then its JSON line
        tp.LAUNCH["num_stages"] = 1
        print("EXIT", rc, cc._pipeline_report(90))
    ''')
    proc = _run(["-c", script], tmp_path, timeout=300)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and lines[-1] == "EXIT 0 1", proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["variant"]: r for r in json.loads(lines[3])}
    assert set(rows) == {"shared prefix", "suffix", "plain"}
    for r in rows.values():
        assert r["in_flight"] >= 1 and r["sync_kv_loads"] == 0 and r["kv_ring"] >= 2, r
        assert r["local_bytes"] == 0 and 0 < r["shared"] <= 227 * 1024, r  # nothing spilled; it launches
    assert rows["shared prefix"]["programs_per_sm"] == STAND_IN_RESIDENT, rows["shared prefix"]
    # one stage: every variant's K and V loaded synchronously, nothing in flight
    assert all(r["sync_kv_loads"] == 2 and r["in_flight"] is None for r in json.loads(lines[-2])), lines[-2]
