"""Compile every Triton kernel of kernels/ for a GPU, on a machine without one.

    python -m kernels.compile_check [--arch 90] [--quiet] [--jobs N]
    python -m kernels.compile_check --pipeline        (the paged decode kernel's K/V loop, as compiled)

The interpreter (TRITON_INTERPRET=1, what the CPU tests use) runs a kernel's Python, not its
compiler: a loop-carried value whose type changes, a construct a backend rejects, an
accumulator too large for registers only show when the kernel is compiled. Here each launch
helper (paged decode plain and shared-prefix in fp32 and bf16, with and without splits; the
fused-loss row kernels; the sampler; RMSNorm, RoPE and silu * up, in fp32 and bf16) is called on small CPU tensors with the
launches intercepted, and every distinct (kernel, argument types, constexprs) it would launch
is compiled through Triton's whole pipeline (TTIR → PTX → cubin, ptxas included) for
`cuda:<arch>` (90: H100 / H200) — without the launch-time argument specialisations (16-byte
divisibility, values equal to 1) the GPU's JIT adds, so the code is the general variant's.
A variant that needs more shared memory a block than the arch allows (SHARED_LIMIT) fails too:
it would compile and then refuse to launch. Needs a process without TRITON_INTERPRET (run it as
a module); prints one line per compiled variant (its shared memory) and exits 1 if any fails.
The variants are shared among --jobs processes (default: one per core it may use, at most 4),
each compiling every jobs-th one.

--pipeline compiles the paged decode kernel's three variants (shared prefix, suffix, plain) at the
GPU suite's shapes with the specialisations a GPU launch adds, and reads the loop the compiler
made (decode_pipeline): whether the next tile's K/V copies are in flight while a tile is computed,
the K/V ring, shared memory, registers and spills (cuobjdump), programs a SM. Exit 1 where a
tile's K/V are waited for with nothing else in flight.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "int32": "i32", "int64": "i64", "bool": "i1"}


def _arg_type(value) -> str:
    import torch
    if isinstance(value, torch.Tensor):
        return "*" + _DTYPES[str(value.dtype).removeprefix("torch.")]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"compile_check: no Triton type for {type(value).__name__}")


def capture_launches() -> list[tuple]:
    """Run the launch helpers with JITFunction.run intercepted -> [(kernel, signature, constexprs,
    options)], one per distinct variant."""
    import torch
    from triton.runtime.jit import JITFunction

    seen: dict[tuple, tuple] = {}
    real_run = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
        bound = dict(zip(self.arg_names, args))
        bound.update(kwargs)
        constexprs = {self.arg_names[i]: bound[self.arg_names[i]] for i in self.constexprs}
        signature = {name: "constexpr" if name in constexprs else _arg_type(bound[name]) for name in self.arg_names}
        key = (self.fn.__name__, tuple(sorted(signature.items())), tuple(sorted(constexprs.items())),
               tuple(sorted(options.items())))
        seen.setdefault(key, (self, signature, constexprs, options))

    JITFunction.run = record
    try:
        _call_helpers(torch)
    finally:
        JITFunction.run = real_run
    return list(seen.values())


def _call_helpers(torch) -> None:
    from kernels.triton_paged import paged_decode_triton, shared_prefix_decode_triton
    from kernels.triton_rows import TritonRows
    from kernels.triton_norm import add_rms_norm_triton, rms_norm_triton
    from kernels.triton_pointwise import rope_store_triton, silu_mul_triton
    from kernels.triton_sample import sample_rows_triton

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        # GQA 6 at head_dim 128 (Qwen2-1.5B's 12 / 2 heads) in bf16, as on a GPU; GQA 3 at 64 in both dtypes
        for hq, hkv, d in ((12, 2, 128), (9, 3, 64)) if dtype == torch.bfloat16 else ((9, 3, 64),):
            k = torch.randn(64, 16, hkv, d, generator=g).to(dtype)
            q = torch.randn(4, hq, d, generator=g).to(dtype)
            bt = torch.arange(64, dtype=torch.int32).view(4, 16)
            bt[1, :6] = bt[0, :6]  # sequences 0 and 1 share a 90-token prompt
            lens = torch.tensor([100, 250, 7, 256], dtype=torch.int32)
            # 64 splits: the merge's widest partial tiles (BLOCK_P 64 plain, 128 prefix + suffix), as a
            # graph step at long context may pick them
            for splits in (1, 3, 64):
                paged_decode_triton(q, k, k, bt, lens, d ** -0.5, num_splits=splits)
                shared_prefix_decode_triton(q, k, k, bt, lens, torch.tensor([90, 90, 0, 0]), torch.tensor([1, 1, 2, 3]),
                                            d ** -0.5, num_splits=splits)
        z = torch.randn(8, 5000, generator=g).to(dtype)  # > 4096: every row-kernel tile width applies
        targets = torch.randint(0, 5000, (8,), generator=g)
        lse, logp, ent = TritonRows.stats(z, targets, 1.0)
        TritonRows.grad(z, targets, lse, ent, torch.ones(8), torch.ones(8), 1.0)
        TritonRows.grad(z, targets, lse, None, torch.ones(8), None, 1.0)
        for h in (1536, 5120):  # Qwen2-1.5B's and a 32B's hidden size: 4 and 8 warps; with the residual add
            x = torch.randn(3, h, generator=g).to(dtype)
            rms_norm_triton(x, torch.ones(h, dtype=dtype), 1e-6)
            add_rms_norm_triton(x, x, torch.ones(h, dtype=dtype), 1e-6)
        # RoPE with and without the cache write: Qwen2-1.5B's 12 / 2 heads of 128, a 32B's 40 / 8; fp32 cos too
        for hq, hkv, d in ((12, 2, 128), (40, 8, 128)):
            q, kv = torch.randn(4, hq, d, generator=g).to(dtype), torch.randn(4, hkv, d, generator=g).to(dtype)
            cos = torch.randn(4, d, generator=g).to(dtype)
            cache = torch.zeros(16, hkv, d, dtype=dtype)
            rope_store_triton(q, kv, kv, cos, cos, cache, cache, torch.arange(4))
            if hq == 12:
                rope_store_triton(q, kv, kv, cos, cos)
                rope_store_triton(q, kv, kv, cos.float(), cos.float())
        silu_mul_triton(z, z)
        b = 4  # the sampler with both searches, top-p's alone, none (greedy); 20 chunks: a 152K vocabulary's 19
        for uses, chunk in (((True, True), 8192), ((True, True), 256), ((False, True), 8192), ((False, False), 8192)):
            sample_rows_triton(z[:b], torch.ones(b), torch.full((b,), 50), torch.full((b,), 0.9),
                               torch.arange(b), torch.zeros(b, dtype=torch.long), uses=uses, chunk=chunk)


def for_the_gpu(variants) -> list[tuple]:
    """The variants a GPU launches where the CPU capture differs: the row kernels with every
    (BLOCK_V, num_warps) candidate the on-card tuning may pick, the paged kernel without the
    interpreter's bf16 upcast. Duplicates dropped."""
    from kernels.triton_rows import LAUNCH_CANDIDATES

    out: dict[tuple, tuple] = {}
    for fn, signature, constexprs, options in variants:
        choices = [(constexprs, options)]
        if "BLOCK_V" in constexprs:
            choices = [({**constexprs, "BLOCK_V": b}, {**options, "num_warps": w}) for b, w in LAUNCH_CANDIDATES]
        if constexprs.get("UPCAST_BF16"):
            choices = [({**constexprs, "UPCAST_BF16": False}, options)]
        for c, o in choices:
            # the signature in the key: an fp32 and a bf16 launch with the same constexprs are two variants
            key = (fn.fn.__name__, tuple(sorted(signature.items())), tuple(sorted(c.items())), tuple(sorted(o.items())))
            out.setdefault(key, (fn, signature, c, o))
    return list(out.values())


# the most shared memory one block may use, bytes, by compute capability (CUDA C programming guide,
# "technical specifications per compute capability": 227 KB on 9.0 and 10.0, 163 KB on 8.0, 99 KB on
# 8.6 / 8.9). A kernel over it compiles, then fails at launch ("out of resource: shared memory").
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448}


def compile_all(variants, arch: int, quiet: bool = False, shared_limit: int | None = None) -> list[str]:
    """Compile each variant for cuda:<arch> -> the failures (empty: all compiled). A variant whose
    shared memory exceeds what one block of that arch may have (`shared_limit`, by default
    SHARED_LIMIT[arch]) is a failure too: it would not launch."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler import compile as triton_compile

    target = GPUTarget("cuda", arch, 32)
    limit = shared_limit if shared_limit is not None else SHARED_LIMIT.get(arch)
    if limit is None:
        print(f"compile_check: no shared-memory limit known for cuda:{arch}; that check is skipped", flush=True)
    failures = []
    for fn, signature, constexprs, options in variants:
        dtype = next((t[1:] for t in signature.values() if t.startswith("*")), "")  # the first tensor's element type
        label = (f"{fn.fn.__name__}({', '.join(f'{k}={v}' for k, v in constexprs.items())}) [{dtype}] "
                 f"{options or ''}").strip()
        t0 = time.perf_counter()
        try:
            kernel = triton_compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=target,
                                    options=options or None)
            assert "cubin" in kernel.asm, "no cubin"
            shared = int(getattr(kernel.metadata, "shared", 0) or 0)
            if limit is not None and shared > limit:
                raise RuntimeError(f"needs {shared} bytes of shared memory a block; cuda:{arch} allows {limit}")
            if not quiet:
                print(f"ok    {time.perf_counter() - t0:5.1f} s  {shared / 1024:6.1f} KB shared  {label}", flush=True)
        except Exception as err:  # noqa: BLE001 - every variant is tried and reported
            failures.append(f"{label}: {type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err) else ''}")
            print(f"FAIL  {label}: {type(err).__name__}: {err}", flush=True)
    return failures


# ---- what the compiler made of the decode kernel's loop (--pipeline) ----------------------------------------
def _gpu_attrs(fn, args: dict) -> dict:
    """The 16-byte divisibility a GPU launch specialises on (Triton's JIT marks a pointer or an
    integer that is a multiple of 16, unless the kernel says not to), as ASTSource attrs:
    {(index,): [["tt.divisibility", 16]]}."""
    import torch
    attrs = {}
    for i, name in enumerate(fn.arg_names):
        value = args.get(name)
        param = fn.params[i]
        if param.do_not_specialize or param.do_not_specialize_on_alignment:
            continue
        aligned = (value.data_ptr() % 16 == 0 if isinstance(value, torch.Tensor) else
                   isinstance(value, int) and not isinstance(value, bool) and value % 16 == 0)
        if aligned:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return attrs


def _loop_body(ttgir: str) -> list[str]:
    """The lines of the first scf.for that computes a dot (its region, braces balanced line by line:
    attributes such as {num = 0 : i32} open and close on their own line)."""
    lines = ttgir.splitlines()
    for start, line in enumerate(lines):
        if "scf.for" not in line:
            continue
        depth, body = 0, []
        for inner in lines[start:]:
            depth += inner.count("{") - inner.count("}")
            body.append(inner)
            if depth <= 0:
                break
        if any("_dot" in x or "tt.dot" in x for x in body):
            return body
    return []


def _resources(cubin: bytes) -> dict:
    """Registers and local (spilled) bytes a thread, from the cubin (cuobjdump of Triton's own CUDA
    tools); {} where the tool is missing or says nothing."""
    import re
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", text)
    return {"registers": int(found[1]), "stack_bytes": int(found[2]), "local_bytes": int(found[3])} if found else {}


DECODE_VARIANTS = ("shared prefix", "suffix", "plain")


def decode_pipeline(variant: str, arch: int = 90) -> dict:
    """Compile the paged decode partial kernel as the GPU suite's workload launches it (Qwen2-1.5B's
    12 / 2 heads of 128 in bf16, cache blocks of 16, a 16K-token table): `variant` one of
    DECODE_VARIANTS (a prompt's program serving its 8 samples; a sample's own suffix; one sequence
    a program), with kernels.triton_paged.LAUNCH's settings and the GPU's divisibility
    specialisations, and read the K/V loop the compiler made -> {kv_ring: K tiles its shared-memory
    ring holds, in_flight: copy groups still loading when the loop waits for a tile (0: each tile
    waited for with nothing else in flight), sync_kv_loads: K/V tile loads not made asynchronous,
    shared, registers, local_bytes, programs_per_sm on an H100 / H200}."""
    import re

    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler import compile as triton_compile

    from kernels import triton_paged as tp

    if variant not in DECODE_VARIANTS:
        raise ValueError(f"decode_pipeline: variant must be one of {DECODE_VARIANTS}, got {variant!r}")
    shared_prefix = variant == "shared prefix"
    hq, hkv, d, bs, members, width = 12, 2, 128, 16, 8, 1089
    b = members if shared_prefix else 64
    q = torch.zeros(b, hq, d, dtype=torch.bfloat16)
    cache = torch.zeros(4, bs, hkv, d, dtype=torch.bfloat16)
    bt = torch.zeros(b, width, dtype=torch.int32)
    ends = torch.zeros(b, dtype=torch.int32)
    member_rows = torch.zeros(1, members, dtype=torch.int32) if shared_prefix else None
    block_n = tp._block_n(d, None)
    o, lse = tp._scratch(b, hq, 17, d, "cpu")  # a 16K prompt's prefix splits and a suffix split, as launched
    args, kwargs = tp._partial_args(q, cache, cache, bt, ends if variant == "suffix" else None, ends, member_rows, o,
                                    lse, 0, 16, d ** -0.5, members if shared_prefix else 1, block_n)
    kwargs["UPCAST_BF16"] = False  # the interpreter's workaround, never on a GPU
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages")}
    fn = tp._decode_partial_kernel
    bound = dict(zip(fn.arg_names, args))
    signature = {name: "constexpr" if name in kwargs else _arg_type(bound[name]) for name in fn.arg_names}
    kernel = triton_compile(ASTSource(fn=fn, signature=signature, constexprs=kwargs, attrs=_gpu_attrs(fn, bound)),
                            target=GPUTarget("cuda", arch, 32), options=options)
    body = _loop_body(kernel.asm["ttgir"])
    tile = f"{block_n}x{triton.next_power_of_2(d)}x"
    ring = [int(m) for m in re.findall(rf"memdesc<(\d+)x{tile}bf16", kernel.asm["ttgir"])]
    waits = [int(m) for line in body if "async_wait" in line for m in re.findall(r"num = (\d+)", line)]
    out = {"variant": variant, **options, "block_n": block_n,
           "kv_ring": max(ring, default=0), "in_flight": waits[0] if waits else None,
           # a tt.load's operand type is its pointers': a [block_n, D] tile of bf16 pointers is a K or V tile
           "sync_kv_loads": sum(1 for line in body if " tt.load " in line and f"tensor<{tile}!tt.ptr<bf16>" in line),
           "shared": int(kernel.metadata.shared), **_resources(kernel.asm["cubin"])}
    if "registers" in out:
        out["programs_per_sm"] = tp.programs_per_sm(out["registers"], out["shared"], options["num_warps"])
    return out


def _pipeline_report(arch: int) -> int:
    """--pipeline: one line per decode variant, then their JSON."""
    import json
    rows = []
    for variant in DECODE_VARIANTS:
        r = decode_pipeline(variant, arch)
        rows.append(r)
        print(f"{r['variant']:>13}  warps {r['num_warps']}  stages {r['num_stages']}  block_n {r['block_n']}: "
              f"K/V ring of {r['kv_ring']}, {r['in_flight']} copy groups in flight at the wait, "
              f"{r['sync_kv_loads']} synchronous K/V loads; {r['shared']} B shared, "
              f"{r.get('registers', '?')} registers, {r.get('local_bytes', '?')} B local; "
              f"{r.get('programs_per_sm', '?')} programs a SM", flush=True)
    print(json.dumps(rows))
    return 0 if all(r["in_flight"] and not r["sync_kv_loads"] for r in rows) else 1


def _summary(version: str, arch: int, compiled: int, total: int) -> str:
    return f"triton {version}, cuda:{arch}: {compiled} of {total} kernel variants compiled"


def _in_processes(jobs: int, arch: int, quiet: bool) -> int:
    """Compile in `jobs` processes, process k taking variants k, k + jobs, ... (`--shard k/jobs`);
    their lines printed in process order once all have ended, then one summary over all (a process
    that died counts its variants as not compiled)."""
    import triton

    total = len(for_the_gpu(capture_launches()))
    cmd = [sys.executable, "-m", "kernels.compile_check", "--arch", str(arch), "--jobs", "1", *(["--quiet"] * quiet)]
    compiled, died = 0, 0
    with tempfile.TemporaryDirectory() as tmp:  # files, not pipes: no process waits for the parent to read it
        logs = [(open(os.path.join(tmp, f"{k}.out"), "w+"), open(os.path.join(tmp, f"{k}.err"), "w+"))
                for k in range(jobs)]
        procs = [subprocess.Popen([*cmd, "--shard", f"{k}/{jobs}"], stdout=out, stderr=err)
                 for k, (out, err) in enumerate(logs)]
        results = []
        for proc, (out, err) in zip(procs, logs):
            proc.wait()
            out.seek(0)
            err.seek(0)
            results.append((proc.returncode, out.read(), err.read()))
            out.close()
            err.close()
    for k, (returncode, out, err) in enumerate(results):
        lines = out.strip().splitlines()
        last = lines[-1] if lines else ""
        head = _summary(triton.__version__, arch, 0, 0).split(":")[0]
        if returncode not in (0, 1) or not last.startswith(head):
            print(f"FAIL  process {k} of {jobs} exited {returncode}: {(err.strip() or out.strip())[-2000:]}",
                  flush=True)
            died += 1
            continue
        if len(lines) > 1:
            print("\n".join(lines[:-1]), flush=True)
        compiled += int(last.rsplit(": ", 1)[1].split(" of ")[0])
    print(_summary(triton.__version__, arch, compiled, total) + (f" ({died} of {jobs} processes died)" if died else ""))
    return 1 if died or compiled != total else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (90: H100 / H200)")
    p.add_argument("--quiet", action="store_true", help="print failures and the summary only")
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    p.add_argument("--jobs", type=int, default=min(usable, 4),
                   help="compile in this many processes (default: one per core this process may use, at most 4)")
    p.add_argument("--pipeline", action="store_true",
                   help="instead: compile the paged decode kernel as the GPU suite launches it (kernels.triton_paged."
                        "LAUNCH, $LONGRL_DECODE_LAUNCH) and print what the compiler made of its K/V loop; exit 1 "
                        "where a tile's K/V are waited for with nothing else in flight")
    p.add_argument("--shard", help=argparse.SUPPRESS)  # "k/n": compile variants k, k + n, ... (what --jobs runs)
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile_check: unset TRITON_INTERPRET (the interpreter does not compile)", file=sys.stderr)
        return 2
    if a.pipeline:
        return _pipeline_report(a.arch)
    if a.jobs < 1:
        p.error(f"--jobs must be at least 1, got {a.jobs}")
    if a.jobs > 1 and not a.shard:
        return _in_processes(a.jobs, a.arch, a.quiet)
    import triton
    variants = for_the_gpu(capture_launches())
    if a.shard:
        k, n = (int(x) for x in a.shard.split("/"))
        variants = variants[k::n]
    failures = compile_all(variants, a.arch, a.quiet)
    print(_summary(triton.__version__, a.arch, len(variants) - len(failures), len(variants)))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
