"""Triton kernels of kernels.paged_attention (see there for the functions they compute and the launch plan)."""
from __future__ import annotations

import os
import warnings

import torch
import triton
import triton.language as tl

from .paged_attention import SharedPrefixPlan, members_cap

LOG2E = 1.4426950408889634
MIN_ROWS = 16  # rows per program: the MMA tile's M (Triton 3.6 and 3.9 also compile tl.dot on fewer rows, padded)
MIN_TILES_PER_SPLIT = 4  # a split must read enough KV to pay for its partial's write and merge
MAX_SPLITS = 64
# the decode launches' settings: waves (programs × splits ≤ waves × the programs the GPU holds at
# once, see pick_num_splits), the partial kernel's warps and pipeline stages, its K/V tile (block_n;
# 0: 64 rows at head_dim <= 128, else 32). `python3 -m bench.gpu_decode_tune` times the alternatives
# on a card; $LONGRL_DECODE_LAUNCH overrides them ("waves=2,num_warps=8"). The defaults are Triton's
# own warps and stages and one wave: none has been tuned on a GPU yet.
LAUNCH = {"waves": 1, "num_warps": 4, "num_stages": 3, "block_n": 0}


def launch_overrides(text: str) -> dict[str, int]:
    """$LONGRL_DECODE_LAUNCH's "key=value,..." -> the LAUNCH entries it sets. Refused, naming the
    setting: an unknown or repeated key, a value that is not a decimal integer, waves or
    num_stages below 1, num_warps not a power of two up to 32, block_n neither 0 nor a power of
    two >= 16."""
    out: dict[str, int] = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        key, _, raw = (part.strip() for part in item.partition("="))
        if key not in LAUNCH:
            raise ValueError(f"LONGRL_DECODE_LAUNCH: unknown setting {key!r} (known: {', '.join(LAUNCH)})")
        if key in out:
            raise ValueError(f"LONGRL_DECODE_LAUNCH: {key} given twice")
        if not raw.isascii() or not raw.isdigit():
            raise ValueError(f"LONGRL_DECODE_LAUNCH: {key} needs a non-negative integer, got {raw!r}")
        value = int(raw)
        power_of_two = value > 0 and value & (value - 1) == 0
        ok = {"waves": value >= 1, "num_stages": value >= 1, "num_warps": power_of_two and value <= 32,
              "block_n": value == 0 or (power_of_two and value >= 16)}[key]
        if not ok:
            want = {"waves": "at least 1", "num_stages": "at least 1", "num_warps": "a power of two up to 32",
                    "block_n": "0 or a power of two >= 16"}[key]
            raise ValueError(f"LONGRL_DECODE_LAUNCH: {key} must be {want}, got {value}")
        out[key] = value
    return out


LAUNCH.update(launch_overrides(os.environ.get("LONGRL_DECODE_LAUNCH", "")))


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:  # fp32 inputs stay fp32 (the GPU's default would round them to TF32)
        c = tl.dot(a, b, input_precision="ieee")
    else:
        c = tl.dot(a, b)
    return c


# one compiled variant whatever the values that change from step to step or launch to launch: the split
# count, the first slot, the block table's and the members' widths (Triton would specialise an integer
# on being 1 or a multiple of 16), and the alignment of the small int32 inputs (the plan's are slices
# of one packed tensor). So the variant _resident compiles is the one launched, and an eager rollout
# whose tables grow does not compile new ones.
@triton.jit(do_not_specialize=["slot0", "num_splits", "stride_btb", "stride_mw"],
            do_not_specialize_on_alignment=["bt_ptr", "start_ptr", "end_ptr", "members_ptr"])
def _decode_partial_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, start_ptr, end_ptr, members_ptr, o_ptr, lse_ptr,
                           stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_btb, stride_mw,
                           stride_ob, stride_oh, stride_op, stride_lb, stride_lh, slot0, num_splits, qk_scale,
                           GROUP: tl.constexpr, MEMBERS: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                           HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_D: tl.constexpr, HAS_MEMBERS: tl.constexpr, HAS_START: tl.constexpr,
                           STORE_LSE: tl.constexpr, IEEE_DOT: tl.constexpr, UPCAST_BF16: tl.constexpr):
    """Program (item w, KV head, split): the query rows of item w's members for this KV head's
    GQA group (row r = member r // GROUP, head r % GROUP) against tokens [lo, hi) of the item's
    range, read through the block table of its first member. Writes the normalised partial
    output to slot slot0 + split and its base-2 log-sum-exp (−inf when the split is empty).
    UPCAST_BF16: the interpreter's tl.dot multiplies bf16 bit patterns as integers, so there
    bf16 operands (already rounded to bf16, as on the GPU) go to the dot as fp32."""
    w = tl.program_id(0)
    kvh = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    rows = tl.arange(0, BLOCK_M)
    heads = kvh * GROUP + rows % GROUP
    if HAS_MEMBERS:
        member = rows // GROUP
        seqs = tl.load(members_ptr + w * stride_mw + member, mask=member < MEMBERS, other=-1).to(tl.int64)
        row_ok = seqs >= 0
        table_row = tl.maximum(tl.load(members_ptr + w * stride_mw).to(tl.int64), 0)  # −1: a padded item
    else:  # item w is sequence w
        seqs = tl.zeros([BLOCK_M], dtype=tl.int64) + w
        row_ok = rows < GROUP
        table_row = w.to(tl.int64)
    if HAS_START:
        start = tl.load(start_ptr + w)
    else:
        start = 0
    end = tl.load(end_ptr + w)
    # splits cut the range at tile boundaries so that only the last tile of a split is partial
    per_split = tl.cdiv(tl.cdiv(tl.maximum(end - start, 0), BLOCK_N), num_splits) * BLOCK_N
    lo = start + split * per_split
    hi = tl.minimum(end, lo + per_split)

    dims = tl.arange(0, BLOCK_D)
    dmask = dims < HEAD_DIM
    cols = tl.arange(0, BLOCK_N)
    q = tl.load(q_ptr + seqs[:, None] * stride_qb + heads[:, None] * stride_qh + dims[None, :],
                mask=row_ok[:, None] & dmask[None, :], other=0.0).to(k_ptr.dtype.element_ty)
    if UPCAST_BF16:
        q = q.to(tl.float32)
    bt_row = bt_ptr + table_row * stride_btb
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # per-token block lookup (a tile may span several cache blocks or part of one), one tile ahead:
    # the K/V addresses then come from a loop-carried value, not from a load in the same iteration,
    # and Triton's pipeliner keeps the next tile's K/V copies in flight while this one is computed.
    # Looked up in the same iteration, the indirection took a pipeline stage: at num_stages 3 and 4
    # each tile's K/V were waited for with nothing else in flight (Triton 3.6 and 3.9;
    # `python -m kernels.compile_check --pipeline` shows what the compiler makes of it)
    nxt = lo + cols
    block_next = tl.load(bt_row + nxt // BLOCK_SIZE, mask=nxt < hi, other=0)
    for t0 in range(lo, hi, BLOCK_N):
        tok = t0 + cols
        tok_ok = tok < hi
        block = block_next.to(tl.int64)
        nxt = tok + BLOCK_N
        block_next = tl.load(bt_row + nxt // BLOCK_SIZE, mask=nxt < hi, other=0)
        offs = block[:, None] * stride_kb + (tok % BLOCK_SIZE)[:, None] * stride_kt + kvh * stride_kh + dims[None, :]
        kv_mask = tok_ok[:, None] & dmask[None, :]
        k = tl.load(k_ptr + offs, mask=kv_mask, other=0.0)
        if UPCAST_BF16:
            k = k.to(tl.float32)
        s = _dot(q, tl.trans(k), IEEE_DOT) * qk_scale  # base-2 logits [M, N]
        s = tl.where(tok_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: the tile's first token is in range
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + offs, mask=kv_mask, other=0.0)
        p = p.to(v.dtype)
        if UPCAST_BF16:
            p = p.to(tl.float32)
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + _dot(p, v, IEEE_DOT)
        m_i = m_new
    nonempty = l_i > 0
    l_safe = tl.where(nonempty, l_i, 1.0)
    out = acc / l_safe[:, None]
    slot = slot0 + split
    tl.store(o_ptr + seqs[:, None] * stride_ob + heads[:, None] * stride_oh + slot * stride_op + dims[None, :],
             out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & dmask[None, :])
    if STORE_LSE:
        lse = tl.where(nonempty, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(lse_ptr + seqs * stride_lb + heads * stride_lh + slot, lse, mask=row_ok)


@triton.jit
def _merge_kernel(o_ptr, lse_ptr, out_ptr, start_ptr, stride_ob, stride_oh, stride_op, stride_lb, stride_lh,
                  stride_xb, stride_xh, num_parts, num_prefix, HEAD_DIM: tl.constexpr, BLOCK_P: tl.constexpr,
                  BLOCK_D: tl.constexpr, HAS_PREFIX: tl.constexpr):
    """Program (sequence, query head): out = Σ_p 2^(lse_p − m) o_p / Σ_p 2^(lse_p − m). With
    HAS_PREFIX, parts [0, num_prefix) are the shared-prefix partials, written only for a sequence
    with a shared prefix (its suffix start > 0): for any other they are never read, so they need
    no −inf fill beforehand."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    parts = tl.arange(0, BLOCK_P)
    dims = tl.arange(0, BLOCK_D)
    dmask = dims < HEAD_DIM
    ok = parts < num_parts
    if HAS_PREFIX:  # the first part to read: 0 with a shared prefix, else the first suffix part
        ok = ok & (parts >= tl.where(tl.load(start_ptr + b) > 0, 0, num_prefix))
    lse = tl.load(lse_ptr + b * stride_lb + h * stride_lh + parts, mask=ok, other=float("-inf"))
    live = lse > float("-inf")
    m = tl.max(lse, axis=0)
    m = tl.where(m > float("-inf"), m, 0.0)  # all empty (seq_len 0): weights 0, output 0, no NaN
    wgt = tl.where(live, tl.exp2(lse - m), 0.0)
    # only live slots' outputs are read (an empty split's output is never needed)
    o = tl.load(o_ptr + b * stride_ob + h * stride_oh + parts[:, None] * stride_op + dims[None, :],
                mask=live[:, None] & dmask[None, :], other=0.0)
    den = tl.sum(wgt, axis=0)
    out = tl.sum(wgt[:, None] * o, axis=0) / tl.where(den > 0, den, 1.0)
    tl.store(out_ptr + b * stride_xb + h * stride_xh + dims, out.to(out_ptr.dtype.element_ty), mask=dmask)


# ---- launch helpers ---------------------------------------------------------------------------------------
def _check(q, k_cache, v_cache):
    b, hq, d = q.shape
    _, _, hkv, d2 = k_cache.shape
    if d2 != d or hq % hkv or v_cache.shape != k_cache.shape:
        raise ValueError(f"paged attention: q {tuple(q.shape)} does not fit cache {tuple(k_cache.shape)}")
    if k_cache.stride(-1) != 1 or v_cache.stride() != k_cache.stride():
        raise ValueError("paged attention: k_cache and v_cache need the same strides and a contiguous head_dim")
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16) or k_cache.dtype != v_cache.dtype:
        raise ValueError(f"paged attention: unsupported dtypes q {q.dtype}, cache {k_cache.dtype}/{v_cache.dtype}")


def _block_n(d: int, block_n: int | None) -> int:
    block_n = block_n or LAUNCH["block_n"] or (64 if d <= 128 else 32)
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"paged attention: block_n must be a power of two >= 16, got {block_n}")
    return block_n


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # an H100's count: keeps the interpreter's choices those of the GPU it stands in for


def may_split(max_len: int, block_n: int) -> bool:
    """Whether pick_num_splits can choose more than one split for this length."""
    return -(-max(max_len, 1) // block_n) // MIN_TILES_PER_SPLIT > 1


def pick_num_splits(max_len: int, programs: int, block_n: int, device: torch.device,
                    resident: int = 0) -> int:
    """Splits per item: as many as keep programs × splits within LAUNCH["waves"] rounds of the
    programs the GPU holds at once (`resident` a SM × the SMs; 0: STAND_IN_RESIDENT), each split
    still reading ≥ MIN_TILES_PER_SPLIT tiles. A memory-bound launch wants every program resident
    from the start: a few programs past a round run alone, at a fraction of the bandwidth, after
    the others have ended. Short contexts get 1 split, so no merge pass."""
    tiles = -(-max(max_len, 1) // block_n)
    slots = LAUNCH["waves"] * (resident or STAND_IN_RESIDENT) * _num_sms(device)
    return max(1, min(slots // max(programs, 1), tiles // MIN_TILES_PER_SPLIT, MAX_SPLITS))


# ---- how many programs an SM holds ---------------------------------------------------------------------
# Without a compiled kernel to ask (the interpreter), the split choice assumes this many programs of
# the partial kernel a SM: what an H100 holds of the bf16 shared-prefix variant at the default launch
# (`python -m kernels.compile_check --pipeline` prints the figure for each variant).
STAND_IN_RESIDENT = 2
_RESIDENT: dict[tuple, dict] = {}  # the partial kernel's variant on a device -> its registers, shared memory, residency


def programs_per_sm(regs: int, shared: int, num_warps: int, sm_regs: int = 65536, sm_shared: int = 233472,
                    sm_threads: int = 2048, reserved_shared: int = 1024, max_programs: int = 32) -> int:
    """Programs (thread blocks) of one kernel that a streaming multiprocessor holds at once, bounded by
    its registers (allocated a warp at a time, in units of 256, to a block's warps four at a time),
    its shared memory (in units of 128 bytes; each block also takes `reserved_shared` bytes, 1 KB
    from compute capability 8.0 on), its threads and its block limit. Defaults: compute capability
    9.0 (H100 / H200: 64 K registers, 228 KB of shared memory and 2,048 threads a SM, at most 32
    blocks; CUDA C Programming Guide, "Compute Capabilities")."""
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    warps = -(-num_warps // 4) * 4  # registers go to a block's warps four at a time
    shared = -(-shared // 128) * 128  # shared memory in units of 128 bytes
    return max(1, min(sm_regs // (per_warp * warps), sm_shared // (shared + reserved_shared),
                      sm_threads // (32 * num_warps), max_programs))


def resident_programs() -> list[dict]:
    """What _resident measured so far: one entry per variant and device (for the benches' output)."""
    return [dict(v) for v in _RESIDENT.values()]


def _resident(q, k_cache, v_cache, bt, ends, members, members_per_program, has_start: bool, block_n: int) -> int:
    """Programs an SM holds of the partial kernel's multi-split variant for this launch: on a GPU,
    compiled (Triton's warmup: no launch, then cached by Triton for the launch itself) and asked for
    its registers and shared memory, once per variant; else STAND_IN_RESIDENT. Never compiles while a
    CUDA graph is being captured (the engine's graph steps run eagerly first, so the figure is known)."""
    if not q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1":
        return STAND_IN_RESIDENT
    key = (q.device, q.dtype, k_cache.dtype, tuple(k_cache.shape[1:]), q.shape[1], members_per_program,
           members is not None, has_start, block_n, LAUNCH["num_warps"], LAUNCH["num_stages"])
    if key in _RESIDENT:
        return _RESIDENT[key]["resident"]
    if torch.cuda.is_current_stream_capturing():
        return STAND_IN_RESIDENT
    hq, d = q.shape[1], q.shape[2]
    o, lse = _scratch(1, hq, 16, d, q.device)  # only their strides count: multiples of 16, as any launch's
    args, kwargs = _partial_args(q, k_cache, v_cache, bt, ends if has_start else None, ends, members, o, lse,
                                 0, 16, 1.0, members_per_program, block_n)
    entry = {"device": torch.cuda.get_device_name(q.device), "dtype": str(k_cache.dtype).removeprefix("torch."),
             "members": members_per_program if members is not None else 0, "start": has_start, "block_n": block_n,
             "num_warps": LAUNCH["num_warps"], "num_stages": LAUNCH["num_stages"]}
    try:
        with torch.cuda.device(q.device):  # compiled for, cached on and loaded on q's device
            kernel = _decode_partial_kernel.warmup(*args, grid=(1,), **kwargs)
            kernel._init_handles()  # loads the binary: n_regs is the driver's count
        props = torch.cuda.get_device_properties(q.device)
        shared = int(kernel.metadata.shared)
        entry.update(regs=int(kernel.n_regs), shared=shared, resident=programs_per_sm(
            int(kernel.n_regs), shared, int(kernel.metadata.num_warps), props.regs_per_multiprocessor,
            props.shared_memory_per_multiprocessor, props.max_threads_per_multi_processor))
    except Exception as err:  # noqa: BLE001 - the split choice falls back to the stand-in, and says so
        entry.update(resident=STAND_IN_RESIDENT, error=f"{type(err).__name__}: {err}"[:300])
        warnings.warn(f"paged decode: could not size the partial kernel's residency ({entry['error']}); "
                      f"splits assume {STAND_IN_RESIDENT} programs a SM", RuntimeWarning, stacklevel=3)
    _RESIDENT[key] = entry
    return entry["resident"]


def _partial_args(q, k_cache, v_cache, bt, starts, ends, members, o, lse, slot0, num_splits, scale,
                  members_per_program, block_n):
    """The arguments, constexprs and launch options of one _decode_partial_kernel launch."""
    b, hq, d = q.shape
    _, block_size, hkv, _ = k_cache.shape
    group = hq // hkv
    o_strides = (o.stride(0), o.stride(1), o.stride(2)) if o.dim() == 4 else (o.stride(0), o.stride(1), 0)
    lse_strides = (lse.stride(0), lse.stride(1)) if lse is not None else (0, 0)
    args = (q, k_cache, v_cache, bt, starts if starts is not None else ends, ends,
            members if members is not None else ends, o, lse if lse is not None else o,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), bt.stride(0),
            members.stride(0) if members is not None else 0, *o_strides, *lse_strides, slot0, num_splits,
            float(scale) * LOG2E)
    kwargs = dict(
        GROUP=group, MEMBERS=members_per_program, BLOCK_SIZE=block_size, HEAD_DIM=d,
        BLOCK_M=max(MIN_ROWS, triton.next_power_of_2(members_per_program * group)), BLOCK_N=block_n,
        BLOCK_D=max(16, triton.next_power_of_2(d)), HAS_MEMBERS=members is not None,
        HAS_START=starts is not None, STORE_LSE=lse is not None,
        IEEE_DOT=k_cache.dtype == torch.float32, UPCAST_BF16=k_cache.dtype == torch.bfloat16 and not q.is_cuda,
        num_warps=LAUNCH["num_warps"], num_stages=LAUNCH["num_stages"])
    return args, kwargs


def _launch_partial(q, k_cache, v_cache, bt, starts, ends, members, o, lse, slot0, grid_items, num_splits, scale,
                    members_per_program, block_n):
    args, kwargs = _partial_args(q, k_cache, v_cache, bt, starts, ends, members, o, lse, slot0, num_splits, scale,
                                 members_per_program, block_n)
    _decode_partial_kernel[(grid_items, k_cache.shape[2], num_splits)](*args, **kwargs)


def _merge(o, lse, out, suffix_starts=None, num_prefix: int = 0):
    """Merge o's partials into out; suffix_starts [B] and num_prefix: the shared-prefix launch's
    layout (its first num_prefix parts read only where suffix_starts > 0)."""
    b, hq, parts, d = o.shape
    prefix = suffix_starts is not None and num_prefix > 0
    _merge_kernel[(b, hq)](o, lse, out, suffix_starts if prefix else lse, o.stride(0), o.stride(1), o.stride(2),
                           lse.stride(0), lse.stride(1), out.stride(0), out.stride(1), parts, num_prefix, HEAD_DIM=d,
                           BLOCK_P=triton.next_power_of_2(parts), BLOCK_D=triton.next_power_of_2(d),
                           HAS_PREFIX=prefix)
    return out


# the tests set this (tests/conftest.py): partials' scratch filled so that a read of a slot nobody wrote shows
POISON_SCRATCH = False


def _scratch(b: int, hq: int, parts: int, d: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Partials' memory -> o [b, hq, parts, d], lse [b, hq, parts] fp32, not initialised: every slot
    the merge reads is written first. lse's rows are padded to a multiple of 16 parts (o's strides
    are multiples of d already), so that the partial kernel's strides are multiples of 16 whatever
    the split count: one compiled variant (Triton specialises on that divisibility), the one
    _resident sized. With POISON_SCRATCH they are filled with values that would show in the output
    were an unwritten slot read: 1e30 for outputs, a log-sum-exp far above any real one (finite: a
    test that compares a step's operators with the next step's compares these fills too)."""
    o = torch.empty(b, hq, parts, d, dtype=torch.float32, device=device)
    lse = torch.empty(b, hq, -(-parts // 16) * 16, dtype=torch.float32, device=device)
    if POISON_SCRATCH:
        o.fill_(1e30)
        lse.fill_(1e4)
    return o, lse[:, :, :parts]


def _inputs(q, k_cache, v_cache, block_tables, seq_lens, block_n):
    """Checked, contiguous launch inputs: q, int32 block tables and lengths, the tile width."""
    _check(q, k_cache, v_cache)
    bt = block_tables.to(torch.int32).contiguous()
    lens = seq_lens.to(device=q.device, dtype=torch.int32).contiguous()
    return q.contiguous(), bt, lens, _block_n(q.shape[2], block_n)


# ---- plain paged decode ------------------------------------------------------------------------------------
def paged_decode_triton(q, k_cache, v_cache, block_tables, seq_lens, scale, num_splits=None, block_n=None):
    q, bt, lens, block_n = _inputs(q, k_cache, v_cache, block_tables, seq_lens, block_n)
    b, hq, d = q.shape
    block_size, hkv = k_cache.shape[1], k_cache.shape[2]
    if num_splits is None:  # the table's width bounds every length: no device sync for the max
        span = bt.shape[1] * block_size
        num_splits = pick_num_splits(span, b * hkv, block_n, q.device, _resident(
            q, k_cache, v_cache, bt, lens, None, 1, False, block_n) if may_split(span, block_n) else 0)
    out = torch.empty_like(q)
    if num_splits == 1:  # one partial per row: it is the output
        _launch_partial(q, k_cache, v_cache, bt, None, lens, None, out, None, 0, b, 1, scale, 1, block_n)
        return out
    o, lse = _scratch(b, hq, num_splits, d, q.device)
    _launch_partial(q, k_cache, v_cache, bt, None, lens, None, o, lse, 0, b, num_splits, scale, 1, block_n)
    return _merge(o, lse, out)


# ---- shared-prefix decode ----------------------------------------------------------------------------------
def plan_shared_prefix(block_tables, seq_lens, prefix_lens, group_ids, block_size: int, gqa_group: int,
                       members_per_program: int | None = None) -> SharedPrefixPlan:
    """Group the sequences with prefix_lens > 0 by group_ids (any integer labels; members need
    not be adjacent in the batch) and cut each group into programs of at most
    members_per_program sequences (default: as many as fit MAX_ROWS query rows). Checks that a
    group's members agree on prefix_len and on the full blocks of the prefix. Syncs with the
    device a few times: build it once per step, not per layer."""
    device = block_tables.device
    prefix_lens = prefix_lens.to(device=device, dtype=torch.long)
    seq_lens = seq_lens.to(device=device, dtype=torch.long)
    group_ids = group_ids.to(device=device, dtype=torch.long)
    if bool((prefix_lens > seq_lens).any()) or bool((prefix_lens < 0).any()):
        raise ValueError("shared prefix: need 0 <= prefix_lens <= seq_lens")
    cap = members_per_program or members_cap(gqa_group)
    max_suffix = int((seq_lens - prefix_lens).max())
    idx = (prefix_lens > 0).nonzero().squeeze(1)
    if idx.numel() == 0:
        empty = torch.zeros(0, 1, dtype=torch.int32, device=device)
        return SharedPrefixPlan(empty, empty[:, 0], prefix_lens.to(torch.int32), 0, max_suffix)
    order = torch.sort(group_ids[idx], stable=True).indices  # stable: members keep their batch order
    idx = idx[order]
    _, group_of, counts = torch.unique_consecutive(group_ids[idx], return_inverse=True, return_counts=True)
    first = (counts.cumsum(0) - counts)[group_of]  # position in idx of each member's group leader
    rank = torch.arange(idx.numel(), device=device) - first
    plen = prefix_lens[idx]
    if bool((plen != plen[first]).any()):
        raise ValueError("shared prefix: members of a group have different prefix_lens")
    # the partial last block may be a member's copy-on-write copy (same rows), so compare full blocks only
    full = torch.arange(block_tables.shape[1], device=device)[None, :] < (plen // block_size)[:, None]
    if bool(((block_tables[idx] != block_tables[idx[first]]) & full).any()):
        raise ValueError("shared prefix: members of a group do not share the prefix's blocks")
    pieces = -(-counts // cap)
    piece = (pieces.cumsum(0) - pieces)[group_of] + rank // cap
    width = min(cap, int(counts.max()))
    members = torch.full((int(pieces.sum()), width), -1, dtype=torch.int32, device=device)
    members[piece, rank % cap] = idx.to(torch.int32)
    return SharedPrefixPlan(members, prefix_lens[members[:, 0].long()].to(torch.int32),
                            prefix_lens.to(torch.int32), int(plen.max()), max_suffix)


def shared_prefix_decode_triton(q, k_cache, v_cache, block_tables, seq_lens, prefix_lens, group_ids, scale,
                                num_splits=None, block_n=None, plan=None, members_per_program=None):
    q, bt, lens, block_n = _inputs(q, k_cache, v_cache, block_tables, seq_lens, block_n)
    b, hq, d = q.shape
    block_size, hkv = k_cache.shape[1], k_cache.shape[2]
    if plan is None:
        plan = plan_shared_prefix(bt, lens, prefix_lens, group_ids, block_size, hq // hkv, members_per_program)
    items = plan.members.shape[0]
    if num_splits:
        sp = ss = num_splits
    else:
        sp = pick_num_splits(plan.max_prefix, items * hkv, block_n, q.device, _resident(
            q, k_cache, v_cache, bt, plan.prefix_ends, plan.members, plan.members_per_program, False, block_n)
            if items and may_split(plan.max_prefix, block_n) else 0)
        ss = pick_num_splits(plan.max_suffix, b * hkv, block_n, q.device, _resident(
            q, k_cache, v_cache, bt, lens, None, 1, True, block_n) if may_split(plan.max_suffix, block_n) else 0)
    sp = sp if items else 0
    # slots [0, sp): the group's prefix partials; [sp, sp + ss): the sequence's own suffix
    # every sequence's suffix slots are written; its prefix slots only when it has a shared prefix, and
    # then by every one of the sp splits (an empty one writes −inf): the merge reads no other slot
    o, lse = _scratch(b, hq, sp + ss, d, q.device)
    if items:
        _launch_partial(q, k_cache, v_cache, bt, None, plan.prefix_ends, plan.members, o, lse, 0, items, sp, scale,
                        plan.members_per_program, block_n)
    _launch_partial(q, k_cache, v_cache, bt, plan.suffix_starts, lens, None, o, lse, sp, b, ss, scale, 1, block_n)
    return _merge(o, lse, torch.empty_like(q), plan.suffix_starts, sp)
