"""Causal flash attention over packed variable-length sequences, with grouped-query attention and Mistral's
sliding window. `attention_reference` is the same in plain PyTorch (the CPU path, and the tests' reference).

Layout (flash-attn's varlen API): a pack's sequences are concatenated along the token axis, q (T, H, D), k and v
(T, H_kv, D); sequence i owns tokens [cu_seqlens[i], cu_seqlens[i+1]) and attention never crosses between sequences.
Query head h reads K/V head h // (H // H_kv) (GQA); K/V are never repeated in memory.

Math, for one sequence and one query head, with S = scale * Q K^T (causal: S_ij = -inf for j > i):
    P = softmax(S) row-wise,   O = P V,   lse_i = log sum_j exp(S_ij).

Forward (online softmax). Keys come in blocks; each query row keeps a running max m, a running
denominator l and an unnormalised output acc. For a new block with scores s_j:
    m' = max(m, max_j s_j)
    l' = l * exp(m - m') + sum_j exp(s_j - m')
    acc' = acc * exp(m - m') + sum_j exp(s_j - m') v_j
After the last block O = acc / l and lse = m + log(l): the N x N matrix P never exists in memory. The
kernels work in base 2 (exp2 is one instruction): scores are pre-multiplied by log2(e).

Backward, with dO the output gradient and delta_i = sum_d dO_id O_id (= sum_j P_ij dP_ij):
    P = exp(S - lse)          (recomputed from the saved lse, no second softmax pass)
    dV = P^T dO,   dP = dO V^T,   dS = P * (dP - delta),   dQ = scale * dS K,   dK = scale * dS^T Q.
Three kernels: delta; dK/dV, a program per key block over every query (of every GQA head) that sees it:
each element written once, no atomics; and so dQ (a sum over keys) per query block, recomputing P and dP.
Short packs (max_seqlen <= FUSED_DELTA_MAX_SEQLEN: launch-bound, README's GPU results) skip the
delta kernel: dQ computes delta for its own query block, dK/dV for every query block it visits (O re-read by each).

Sliding window W (causal only; transformers' convention): query i sees the W keys i - W < j <= i. A query
tile [m, m + BM) visits key blocks from the one holding key m - W + 1 (its first row's oldest) to its diagonal,
a key block [n, n + BN) query blocks from its diagonal to query n + BN + W - 2 (the last to see key n + BN - 1);
blocks at the window's edge are masked, those inside it not (_key_ranges, _attn_bwd_dkdv). A tile reads ~W + BM
keys (W + BN queries), whatever the length.
"""

import math
from collections import namedtuple
from typing import Optional

import torch
import torch.nn.functional as F

from crlft_kernels import HAS_TRITON, tl, triton, use_triton

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)  # tl.dot needs power-of-two tiles of at least 16
DELTA_BLOCK = 64  # tokens per program of the delta kernel
# Up to this longest sequence the dK/dV and dQ kernels compute delta themselves (see the docstring). Not timed yet.
FUSED_DELTA_MAX_SEQLEN = 1024


# ---- Plain PyTorch reference (CPU training path) -------------------------------------------------------
def _check(ok, message):
    if not ok:
        raise ValueError(f"crlft_kernels/attention.py: {message}")


def _check_inputs(q, k, v, cu_seqlens, causal, window, max_seqlen=None):
    """With max_seqlen, also the checks that read cu_seqlens on the host (not on CUDA: no sync there)."""
    same_tokens_and_head_dim = k.shape[0] == q.shape[0] and k.shape[-1] == q.shape[-1]
    _check(
        q.dim() == 3 and k.dim() == 3 and k.shape == v.shape and same_tokens_and_head_dim,
        f"q must be (tokens, heads, head_dim) and k, v (tokens, n_kv_heads, head_dim) matching it; got q "
        f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}",
    )
    _check(
        q.shape[1] % k.shape[1] == 0,
        f"n_heads ({q.shape[1]}) must be a multiple of n_kv_heads ({k.shape[1]})",
    )
    _check(
        cu_seqlens.dtype == torch.int32 and cu_seqlens.dim() == 1 and cu_seqlens.numel() >= 2,
        f"cu_seqlens must be int32 of shape (n_seqs + 1,); got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}",
    )
    _check(
        q.dtype == k.dtype == v.dtype and q.device == k.device == v.device == cu_seqlens.device,
        f"q, k, v must share dtype and device, cu_seqlens the device; got q {q.dtype} on {q.device}, k "
        f"{k.dtype} on {k.device}, v {v.dtype} on {v.device}, cu_seqlens on {cu_seqlens.device}",
    )
    _check(
        window is None or (type(window) is int and window >= 1 and causal),
        f"window={window!r} (causal={causal}): a sliding window is an int >= 1, for causal attention only",
    )
    if max_seqlen is not None:
        lengths = cu_seqlens.diff()
        _check(
            cu_seqlens[0] == 0 and cu_seqlens[-1] == q.shape[0] and (lengths >= 0).all(),
            f"cu_seqlens must rise from 0 to the token count {q.shape[0]}; got {cu_seqlens.tolist()[:8]}...",
        )
        _check(
            lengths.max() <= max_seqlen,
            f"max_seqlen={max_seqlen} < the longest sequence ({int(lengths.max())})",
        )


def attention_reference(
    q, k, v, cu_seqlens, max_seqlen, causal=True, softmax_scale=None, window=None
):
    """flash_attention in plain differentiable PyTorch: the pack is gathered into a padded (n_seqs, L) batch
    for one F.scaled_dot_product_attention call. Padding sits after each sequence's real tokens, so a causal
    mask hides it from every real query, else a key mask does. A window is an explicit mask."""
    _check_inputs(q, k, v, cu_seqlens, causal, window, max_seqlen)
    lengths = cu_seqlens.diff().long()
    n_seqs, max_seqlen = lengths.numel(), int(lengths.max())  # pad only as far as the pack needs
    # valid[i, p]: slot p of sequence i holds a real token. Row-major order of the True slots is token
    # order, so a boolean index gathers/scatters the whole pack in one op.
    pos = torch.arange(max_seqlen, device=q.device)
    valid = pos[None, :] < lengths[:, None]  # (n_seqs, L)

    def pad(x):  # (T, h, D) -> (n_seqs, h, L, D), zeros in the padding
        return x.new_zeros(n_seqs, max_seqlen, *x.shape[1:]).index_put((valid,), x).transpose(1, 2)

    mask = None if causal else valid[:, None, None, :]  # (n_seqs, 1, 1, L)
    if window is not None and window < max_seqlen:
        back = pos[:, None] - pos[None, :]  # (L, L): how far key j lies behind query i
        mask, causal = (back >= 0) & (back < window), False
    # enable_gqa: no K/V copies where the backend supports it (on CPU ~25% faster than repeat_interleave).
    out = F.scaled_dot_product_attention(
        pad(q),
        pad(k),
        pad(v),
        attn_mask=mask,
        is_causal=causal,
        scale=softmax_scale,
        enable_gqa=k.shape[1] != q.shape[1],
    )
    return out.transpose(1, 2)[valid]  # (n_seqs, H, L, D) -> (T, H, D)


# ---- Launch configuration: one per (device, head_dim, dtype), no autotuning (it breaks under the interpreter; the
# AOT test compiles what launch_specs returns). fwd and dQ programs own block_m queries and step over block_n keys,
# dK/dV programs the reverse; the outer block is a multiple of the inner (the unmasked stages cover whole diagonals).
Tiles = namedtuple("Tiles", "block_m block_n warps stages")
KernelConfig = namedtuple("KernelConfig", "fwd dkdv dq")  # a Tiles for each kernel


def kernel_config(head_dim, dtype, device_type):
    """The one launch config, window or not. head_dim 128, bf16: the fastest of `bench_attention.py --sweep` on an
    H200 (figures in the README's GPU results): forward 128x64 tiles, 8 warps, 3 stages; dK/dV 64 queries over
    128-key blocks (fewer re-reads of Q, dO than 32 x 64). The others from ptxas's sm_90a report: wgmma in every
    matmul kernel, no spills, shared memory under the limits."""
    if device_type != "cuda":
        # Interpreter: the tests' short sequences span several tiles, diagonals split into sub-blocks.
        return KernelConfig(Tiles(64, 32, 4, 1), Tiles(32, 64, 4, 1), Tiles(64, 32, 4, 1))
    if dtype == torch.float32:  # for checking only: 4-byte tiles, so half the tile area
        return KernelConfig(Tiles(64, 32, 4, 2), Tiles(32, 64, 8, 2), Tiles(64, 32, 4, 2))
    if head_dim in (64, 128):
        dkdv = Tiles(64, 128, 8, 2) if head_dim == 128 else Tiles(32, 128, 8, 3)
        return KernelConfig(Tiles(128, 64, 8, 3), dkdv, Tiles(128, 64, 8, 3))
    return KernelConfig(
        Tiles(64, 64, 4, 3), Tiles(32, 64, 4, 3), Tiles(64, 32, 4, 3)
    )  # head_dim 16/32: tiny models


# ---- Triton kernels ------------------------------------------------------------------------------------
# All tensors are contiguous: q/o/dq/do (T, H, D), k/v/dk/dv (T, H_kv, D), lse/delta (H, T) fp32. Grids are
# (blocks along the sequence, n_seqs, heads); programs past the end of their sequence return at once. WINDOW
# (constexpr) is the sliding window, 0 for none: the window code is compiled out, plain causal attention as
# tuned. MASK=False (constexpr) for blocks every row/column of the tile sees in full: no masks there.

if HAS_TRITON:

    @triton.jit
    def _tile(CU_SEQLENS, BLOCK: tl.constexpr):
        """Block start in the sequence (the grid runs backwards: the longest tiles first), its first token, length."""
        start = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK
        seq_start = tl.load(CU_SEQLENS + tl.program_id(1)).to(tl.int64)
        return start, seq_start, tl.load(CU_SEQLENS + tl.program_id(1) + 1) - seq_start.to(tl.int32)

    @triton.jit
    def _key_ranges(
        start_m,
        seq_len,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr,
        WINDOW: tl.constexpr,
    ):
        """Key blocks of a query tile before its masked diagonal (or partial last) block: masked [lo, mid) at
        the window's edge (none without a window), then unmasked [mid, mid_end)."""
        lo, mid = 0, 0
        if WINDOW > 0:
            lo = tl.maximum(start_m - WINDOW + 1, 0) // BLOCK_N * BLOCK_N
            mid = tl.minimum(
                tl.cdiv(tl.maximum(start_m + BLOCK_M - WINDOW, 0), BLOCK_N) * BLOCK_N, start_m
            )
        return lo, mid, start_m if CAUSAL else (seq_len // BLOCK_N) * BLOCK_N

    @triton.jit
    def _mask(x, fill, in_seq, rows, cols, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
        """x where query `rows` sees key `cols` (broadcast against each other), else fill."""
        keep = in_seq
        if CAUSAL:
            keep = keep & (rows >= cols)
        if WINDOW > 0:
            keep = keep & (rows - cols < WINDOW)
        return tl.where(keep, x, fill)

    @triton.jit
    def _fwd_inner(
        acc,
        m_i,
        l_i,
        q,
        K,
        V,
        kv_stride,
        rows,
        lo,
        hi,
        seq_len,
        qk_scale,
        HEAD_DIM: tl.constexpr,
        BLOCK_N: tl.constexpr,
        MASK: tl.constexpr,
        CAUSAL: tl.constexpr,
        WINDOW: tl.constexpr,
    ):
        """The online softmax over key blocks [lo, hi); K, V point at this sequence's first token, K/V head."""
        offs_n, offs_d = tl.arange(0, BLOCK_N), tl.arange(0, HEAD_DIM)
        for start_n in tl.range(lo, hi, BLOCK_N):
            cols = start_n + offs_n
            kT_ptrs = K + cols[None, :] * kv_stride + offs_d[:, None]  # (D, BLOCK_N)
            v_ptrs = V + cols[:, None] * kv_stride + offs_d[None, :]  # (BLOCK_N, D)
            kT = (
                tl.load(kT_ptrs, mask=cols[None, :] < seq_len, other=0.0)
                if MASK
                else tl.load(kT_ptrs)
            )
            v = (
                tl.load(v_ptrs, mask=cols[:, None] < seq_len, other=0.0)
                if MASK
                else tl.load(v_ptrs)
            )
            s = tl.dot(q, kT) * qk_scale  # (BLOCK_M, BLOCK_N) scores, base-2 units
            if MASK:
                s = _mask(
                    s,
                    float("-inf"),
                    cols[None, :] < seq_len,
                    rows[:, None],
                    cols[None, :],
                    CAUSAL,
                    WINDOW,
                )
            # m_new is finite in every row, so exp2 never meets -inf - -inf (NaN): without a window each
            # row sees a key (key 0, or itself) in the first block it visits; with one, m starts finite.
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.math.exp2(m_i - m_new)  # rescales what was summed under the old max
            p = tl.math.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
            m_i = m_new
        return acc, m_i, l_i

    @triton.jit
    def _attn_fwd(
        Q,
        K,
        V,
        O,
        LSE,
        CU_SEQLENS,
        n_tokens,
        n_heads,
        group,
        softmax_scale,
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr,
        WINDOW: tl.constexpr,
    ):
        start_m, seq_start, seq_len = _tile(CU_SEQLENS, BLOCK_M)
        if start_m >= seq_len:
            return
        head = tl.program_id(2)
        kv_head = head // group
        q_stride, kv_stride = n_heads * HEAD_DIM, (n_heads // group) * HEAD_DIM
        rows, offs_d = start_m + tl.arange(0, BLOCK_M), tl.arange(0, HEAD_DIM)
        q_ptrs = Q + (seq_start + rows[:, None]) * q_stride + head * HEAD_DIM + offs_d[None, :]
        q = tl.load(q_ptrs, mask=rows[:, None] < seq_len, other=0.0)  # (BLOCK_M, D)
        K, V = (
            K + (seq_start * kv_stride + kv_head * HEAD_DIM),
            V + (seq_start * kv_stride + kv_head * HEAD_DIM),
        )
        # A window's edge may hide every key of a row's first blocks: then m starts finite (_fwd_inner).
        m_i = tl.full([BLOCK_M], float("-inf") if WINDOW == 0 else -1.0e30, tl.float32)
        l_i, acc = tl.zeros([BLOCK_M], tl.float32), tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        qk_scale = softmax_scale * 1.4426950408889634  # fold log2(e) in: exp2 below
        lo, mid, mid_end = _key_ranges(start_m, seq_len, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
        if WINDOW > 0:
            acc, m_i, l_i = _fwd_inner(
                acc,
                m_i,
                l_i,
                q,
                K,
                V,
                kv_stride,
                rows,
                lo,
                mid,
                seq_len,
                qk_scale,
                HEAD_DIM,
                BLOCK_N,
                True,
                CAUSAL,
                WINDOW,
            )
        acc, m_i, l_i = _fwd_inner(
            acc,
            m_i,
            l_i,
            q,
            K,
            V,
            kv_stride,
            rows,
            mid,
            mid_end,
            seq_len,
            qk_scale,
            HEAD_DIM,
            BLOCK_N,
            False,
            CAUSAL,
            WINDOW,
        )
        end = tl.minimum(start_m + BLOCK_M, seq_len) if CAUSAL else seq_len
        acc, m_i, l_i = _fwd_inner(
            acc,
            m_i,
            l_i,
            q,
            K,
            V,
            kv_stride,
            rows,
            mid_end,
            end,
            seq_len,
            qk_scale,
            HEAD_DIM,
            BLOCK_N,
            True,
            CAUSAL,
            WINDOW,
        )
        o = acc / l_i[:, None]
        o_ptrs = O + (seq_start + rows[:, None]) * q_stride + head * HEAD_DIM + offs_d[None, :]
        tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=rows[:, None] < seq_len)
        lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453  # back to natural log
        tl.store(LSE + head * n_tokens + seq_start + rows, lse, mask=rows < seq_len)

    @triton.jit
    def _attn_bwd_delta(
        O, DO, DELTA, n_tokens, n_heads, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr
    ):
        tokens = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        head = tl.program_id(1)
        offs = (
            tokens.to(tl.int64)[:, None] * (n_heads * HEAD_DIM)
            + head * HEAD_DIM
            + tl.arange(0, HEAD_DIM)[None, :]
        )
        in_range = tokens[:, None] < n_tokens
        o = tl.load(O + offs, mask=in_range, other=0.0).to(tl.float32)
        do = tl.load(DO + offs, mask=in_range, other=0.0).to(tl.float32)
        tl.store(DELTA + head * n_tokens + tokens, tl.sum(o * do, 1), mask=tokens < n_tokens)

    @triton.jit
    def _dkdv_inner(
        dk,
        dv,
        k,
        v,
        Q,
        DO,
        O,
        LSE,
        DELTA,
        q_stride,
        cols,
        lo,
        hi,
        seq_len,
        qk_scale,
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr,
        MASK: tl.constexpr,
        CAUSAL: tl.constexpr,
        WINDOW: tl.constexpr,
        FUSED_DELTA: tl.constexpr,
    ):
        """dV += P^T dO and dK += dS^T Q over query blocks [lo, hi), transposed (keys along rows) so the key block
        stays put. Q, DO, O point at this sequence's first token and one query head, LSE, DELTA likewise."""
        offs_m, offs_d = tl.arange(0, BLOCK_M), tl.arange(0, HEAD_DIM)
        for start_m in tl.range(lo, hi, BLOCK_M):
            rows = start_m + offs_m
            qT_ptrs = Q + rows[None, :] * q_stride + offs_d[:, None]  # (D, BLOCK_M)
            do_ptrs = DO + rows[:, None] * q_stride + offs_d[None, :]  # (BLOCK_M, D)
            qT = (
                tl.load(qT_ptrs, mask=rows[None, :] < seq_len, other=0.0)
                if MASK
                else tl.load(qT_ptrs)
            )
            do = (
                tl.load(do_ptrs, mask=rows[:, None] < seq_len, other=0.0)
                if MASK
                else tl.load(do_ptrs)
            )
            lse = (
                tl.load(LSE + rows, mask=rows < seq_len, other=0.0) if MASK else tl.load(LSE + rows)
            )
            if FUSED_DELTA:  # from this block's O and dO, as the delta kernel does
                o_ptrs = O + rows[:, None] * q_stride + offs_d[None, :]
                o = (
                    tl.load(o_ptrs, mask=rows[:, None] < seq_len, other=0.0)
                    if MASK
                    else tl.load(o_ptrs)
                )
                delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
            else:
                delta = (
                    tl.load(DELTA + rows, mask=rows < seq_len, other=0.0)
                    if MASK
                    else tl.load(DELTA + rows)
                )
            # P^T = exp(S^T - lse), recomputed: (BLOCK_N, BLOCK_M)
            pT = tl.math.exp2(tl.dot(k, qT) * qk_scale - lse[None, :] * 1.4426950408889634)
            if MASK:
                pT = _mask(
                    pT, 0.0, rows[None, :] < seq_len, rows[None, :], cols[:, None], CAUSAL, WINDOW
                )
            dv = tl.dot(pT.to(do.dtype), do, dv)
            dpT = tl.dot(v, tl.trans(do))  # (dO V^T)^T
            dsT = pT * (dpT - delta[None, :])
            dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk)
        return dk, dv

    @triton.jit
    def _attn_bwd_dkdv(
        Q,
        K,
        V,
        DO,
        O,
        DK,
        DV,
        LSE,
        DELTA,
        CU_SEQLENS,
        n_tokens,
        n_heads,
        group,
        softmax_scale,
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr,
        WINDOW: tl.constexpr,
        FUSED_DELTA: tl.constexpr,
    ):
        start_n, seq_start, seq_len = _tile(CU_SEQLENS, BLOCK_N)
        if start_n >= seq_len:
            return
        kv_head = tl.program_id(2)
        q_stride, kv_stride = n_heads * HEAD_DIM, (n_heads // group) * HEAD_DIM
        cols, offs_d = start_n + tl.arange(0, BLOCK_N), tl.arange(0, HEAD_DIM)
        kv_offs = (seq_start + cols[:, None]) * kv_stride + kv_head * HEAD_DIM + offs_d[None, :]
        k = tl.load(K + kv_offs, mask=cols[:, None] < seq_len, other=0.0)  # (BLOCK_N, D)
        v = tl.load(V + kv_offs, mask=cols[:, None] < seq_len, other=0.0)
        dk, dv = (
            tl.zeros([BLOCK_N, HEAD_DIM], tl.float32),
            tl.zeros([BLOCK_N, HEAD_DIM], tl.float32),
        )
        qk_scale = softmax_scale * 1.4426950408889634
        for g in tl.range(0, group):
            head = kv_head * group + g
            Qh, DOh = (
                Q + seq_start * q_stride + head * HEAD_DIM,
                DO + seq_start * q_stride + head * HEAD_DIM,
            )
            Oh = O + seq_start * q_stride + head * HEAD_DIM
            LSEh, DELTAh = LSE + head * n_tokens + seq_start, DELTA + head * n_tokens + seq_start
            lo = 0
            if CAUSAL:  # queries [start_n, start_n + BLOCK_N): the diagonal block, masked
                lo = tl.minimum(start_n + BLOCK_N, seq_len)
                dk, dv = _dkdv_inner(
                    dk,
                    dv,
                    k,
                    v,
                    Qh,
                    DOh,
                    Oh,
                    LSEh,
                    DELTAh,
                    q_stride,
                    cols,
                    start_n,
                    lo,
                    seq_len,
                    qk_scale,
                    HEAD_DIM,
                    BLOCK_M,
                    True,
                    CAUSAL,
                    WINDOW,
                    FUSED_DELTA,
                )
            # Whole query blocks that see all these keys unmasked, then the rest masked: the sequence's
            # partial last block, or the queries from start_n + WINDOW on (they see only some keys).
            end = seq_len
            full_end = lo + ((seq_len - lo) // BLOCK_M) * BLOCK_M
            if WINDOW > 0:
                end = tl.minimum(start_n + BLOCK_N + WINDOW - 1, seq_len)
                full_end = (
                    lo
                    + (tl.maximum(tl.minimum(start_n + WINDOW, seq_len) - lo, 0) // BLOCK_M)
                    * BLOCK_M
                )
            dk, dv = _dkdv_inner(
                dk,
                dv,
                k,
                v,
                Qh,
                DOh,
                Oh,
                LSEh,
                DELTAh,
                q_stride,
                cols,
                lo,
                full_end,
                seq_len,
                qk_scale,
                HEAD_DIM,
                BLOCK_M,
                False,
                CAUSAL,
                WINDOW,
                FUSED_DELTA,
            )
            dk, dv = _dkdv_inner(
                dk,
                dv,
                k,
                v,
                Qh,
                DOh,
                Oh,
                LSEh,
                DELTAh,
                q_stride,
                cols,
                full_end,
                end,
                seq_len,
                qk_scale,
                HEAD_DIM,
                BLOCK_M,
                True,
                CAUSAL,
                WINDOW,
                FUSED_DELTA,
            )
        dk *= softmax_scale  # dS was taken w.r.t. the scaled scores
        tl.store(DK + kv_offs, dk.to(DK.dtype.element_ty), mask=cols[:, None] < seq_len)
        tl.store(DV + kv_offs, dv.to(DV.dtype.element_ty), mask=cols[:, None] < seq_len)

    @triton.jit
    def _dq_inner(
        dq,
        q,
        do,
        lse,
        delta,
        K,
        V,
        kv_stride,
        rows,
        lo,
        hi,
        seq_len,
        qk_scale,
        HEAD_DIM: tl.constexpr,
        BLOCK_N: tl.constexpr,
        MASK: tl.constexpr,
        CAUSAL: tl.constexpr,
        WINDOW: tl.constexpr,
    ):
        """dQ += dS K over key blocks [lo, hi), P and dP recomputed for this query tile."""
        offs_n, offs_d = tl.arange(0, BLOCK_N), tl.arange(0, HEAD_DIM)
        for start_n in tl.range(lo, hi, BLOCK_N):
            cols = start_n + offs_n
            kT_ptrs = K + cols[None, :] * kv_stride + offs_d[:, None]  # (D, BLOCK_N)
            vT_ptrs = V + cols[None, :] * kv_stride + offs_d[:, None]
            kT = (
                tl.load(kT_ptrs, mask=cols[None, :] < seq_len, other=0.0)
                if MASK
                else tl.load(kT_ptrs)
            )
            vT = (
                tl.load(vT_ptrs, mask=cols[None, :] < seq_len, other=0.0)
                if MASK
                else tl.load(vT_ptrs)
            )
            p = tl.math.exp2(tl.dot(q, kT) * qk_scale - lse[:, None])  # lse already in base 2 here
            if MASK:
                p = _mask(
                    p, 0.0, cols[None, :] < seq_len, rows[:, None], cols[None, :], CAUSAL, WINDOW
                )
            dp = tl.dot(do, vT)
            ds = p * (dp - delta[:, None])
            dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq)
        return dq

    @triton.jit
    def _attn_bwd_dq(
        Q,
        K,
        V,
        DO,
        O,
        DQ,
        LSE,
        DELTA,
        CU_SEQLENS,
        n_tokens,
        n_heads,
        group,
        softmax_scale,
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr,
        WINDOW: tl.constexpr,
        FUSED_DELTA: tl.constexpr,
    ):
        start_m, seq_start, seq_len = _tile(CU_SEQLENS, BLOCK_M)
        if start_m >= seq_len:
            return
        head = tl.program_id(2)
        kv_head = head // group
        q_stride, kv_stride = n_heads * HEAD_DIM, (n_heads // group) * HEAD_DIM
        rows, offs_d = start_m + tl.arange(0, BLOCK_M), tl.arange(0, HEAD_DIM)
        q_offs = (seq_start + rows[:, None]) * q_stride + head * HEAD_DIM + offs_d[None, :]
        q = tl.load(Q + q_offs, mask=rows[:, None] < seq_len, other=0.0)
        do = tl.load(DO + q_offs, mask=rows[:, None] < seq_len, other=0.0)
        lse = (
            tl.load(LSE + head * n_tokens + seq_start + rows, mask=rows < seq_len, other=0.0)
            * 1.4426950408889634
        )
        if FUSED_DELTA:
            o = tl.load(O + q_offs, mask=rows[:, None] < seq_len, other=0.0)
            delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        else:
            delta = tl.load(
                DELTA + head * n_tokens + seq_start + rows, mask=rows < seq_len, other=0.0
            )
        K, V = (
            K + (seq_start * kv_stride + kv_head * HEAD_DIM),
            V + (seq_start * kv_stride + kv_head * HEAD_DIM),
        )
        dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        qk_scale = softmax_scale * 1.4426950408889634
        lo, mid, mid_end = _key_ranges(
            start_m, seq_len, BLOCK_M, BLOCK_N, CAUSAL, WINDOW
        )  # as the forward
        if WINDOW > 0:
            dq = _dq_inner(
                dq,
                q,
                do,
                lse,
                delta,
                K,
                V,
                kv_stride,
                rows,
                lo,
                mid,
                seq_len,
                qk_scale,
                HEAD_DIM,
                BLOCK_N,
                True,
                CAUSAL,
                WINDOW,
            )
        dq = _dq_inner(
            dq,
            q,
            do,
            lse,
            delta,
            K,
            V,
            kv_stride,
            rows,
            mid,
            mid_end,
            seq_len,
            qk_scale,
            HEAD_DIM,
            BLOCK_N,
            False,
            CAUSAL,
            WINDOW,
        )
        end = tl.minimum(start_m + BLOCK_M, seq_len) if CAUSAL else seq_len
        dq = _dq_inner(
            dq,
            q,
            do,
            lse,
            delta,
            K,
            V,
            kv_stride,
            rows,
            mid_end,
            end,
            seq_len,
            qk_scale,
            HEAD_DIM,
            BLOCK_N,
            True,
            CAUSAL,
            WINDOW,
        )
        dq *= softmax_scale
        tl.store(DQ + q_offs, dq.to(DQ.dtype.element_ty), mask=rows[:, None] < seq_len)


# ---- Launchers and autograd ----------------------------------------------------------------------------
def launch_specs(head_dim, dtype, device_type, causal=True, window=None, fused_delta=False):
    """(kernel, constexprs, launch options) of each kernel, as the launchers use them (and the AOT test)."""
    cfg = kernel_config(head_dim, dtype, device_type)
    assert cfg.fwd.block_m % cfg.fwd.block_n == 0 and cfg.dq.block_m % cfg.dq.block_n == 0
    assert cfg.dkdv.block_n % cfg.dkdv.block_m == 0

    def spec(kernel, tiles, **backward):
        return (
            kernel,
            dict(
                HEAD_DIM=head_dim,
                BLOCK_M=tiles.block_m,
                BLOCK_N=tiles.block_n,
                CAUSAL=causal,
                WINDOW=window or 0,
                **backward,
            ),
            dict(num_warps=tiles.warps, num_stages=tiles.stages),
        )

    return {
        "fwd": spec(_attn_fwd, cfg.fwd),
        "dkdv": spec(_attn_bwd_dkdv, cfg.dkdv, FUSED_DELTA=fused_delta),
        "dq": spec(_attn_bwd_dq, cfg.dq, FUSED_DELTA=fused_delta),
        "delta": (
            _attn_bwd_delta,
            dict(HEAD_DIM=head_dim, BLOCK=DELTA_BLOCK),
            dict(num_warps=4, num_stages=1),
        ),
    }


def _forward(q, k, v, cu_seqlens, max_seqlen, causal, scale, window):
    n_tokens, n_heads, head_dim = q.shape
    kernel, meta, opts = launch_specs(head_dim, q.dtype, q.device.type, causal, window)["fwd"]
    o, lse = (
        torch.empty_like(q),
        torch.empty(n_heads, n_tokens, device=q.device, dtype=torch.float32),
    )
    grid = (triton.cdiv(max_seqlen, meta["BLOCK_M"]), cu_seqlens.numel() - 1, n_heads)
    kernel[grid](
        q, k, v, o, lse, cu_seqlens, n_tokens, n_heads, n_heads // k.shape[1], scale, **meta, **opts
    )
    return o, lse  # lse (H, T) fp32, natural log


# torch.library ops, so torch.compile keeps attention inside its graph (an opaque node with a shapes-only fake).
# max_seqlen is an int input: at its first new value dynamo makes it symbolic, one recompile rather than one per value.
@torch.library.custom_op("crlft::flash_attention_fwd", mutates_args=())
def _flash_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    causal: bool,
    scale: float,
    window: Optional[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    if not q.is_cuda:  # the checks that read cu_seqlens on the host (on CUDA they would sync)
        _check_inputs(q, k, v, cu_seqlens, causal, window, max_seqlen)
    if q.shape[0] == 0:
        return torch.empty_like(q), q.new_empty(q.shape[1], 0, dtype=torch.float32)
    return _forward(q, k, v, cu_seqlens, max_seqlen, causal, scale, window)


@_flash_attention_fwd.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, causal, scale, window):
    return torch.empty_like(q), q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32)


@torch.library.custom_op("crlft::flash_attention_bwd", mutates_args=())
def _flash_attention_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    causal: bool,
    scale: float,
    window: Optional[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    do, (n_tokens, n_heads, head_dim), n_kv_heads = do.contiguous(), q.shape, k.shape[1]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if n_tokens == 0:
        return dq, dk, dv
    fused_delta = (
        max_seqlen <= FUSED_DELTA_MAX_SEQLEN
    )  # then the other kernels compute delta: no delta kernel
    specs = launch_specs(head_dim, q.dtype, q.device.type, causal, window, fused_delta)
    delta = lse if fused_delta else torch.empty_like(lse)  # fused: never read
    if not fused_delta:
        kernel, meta, opts = specs["delta"]
        kernel[(triton.cdiv(n_tokens, DELTA_BLOCK), n_heads)](
            o, do, delta, n_tokens, n_heads, **meta, **opts
        )
    sizes = (lse, delta, cu_seqlens, n_tokens, n_heads, n_heads // n_kv_heads, scale)
    kernel, meta, opts = specs["dkdv"]
    grid = (triton.cdiv(max_seqlen, meta["BLOCK_N"]), cu_seqlens.numel() - 1, n_kv_heads)
    kernel[grid](q, k, v, do, o, dk, dv, *sizes, **meta, **opts)
    kernel, meta, opts = specs["dq"]
    kernel[(triton.cdiv(max_seqlen, meta["BLOCK_M"]), cu_seqlens.numel() - 1, n_heads)](
        q, k, v, do, o, dq, *sizes, **meta, **opts
    )
    return dq, dk, dv


@_flash_attention_bwd.register_fake
def _(do, q, k, v, o, lse, cu_seqlens, max_seqlen, causal, scale, window):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:3], *output, inputs[3])  # q, k, v, o, lse, cu_seqlens
    ctx.launch = inputs[4:]  # max_seqlen, causal, scale, window
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, do, _grad_lse):
    dq, dk, dv = _flash_attention_bwd(do, *ctx.saved_tensors, *ctx.launch)
    return dq, dk, dv, None, None, None, None, None


_flash_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def flash_attention(q, k, v, cu_seqlens, max_seqlen, causal=True, softmax_scale=None, window=None):
    """Attention over packed sequences. q (T, H, D), k/v (T, H_kv, D), cu_seqlens int32 (n_seqs + 1,),
    max_seqlen >= the longest sequence (it sizes the grid; not checked on CUDA: no host sync). window
    (causal only): query i sees keys i - window < j <= i; None or >= max_seqlen: plain causal attention.
    Returns (T, H, D), differentiable w.r.t. q, k, v. Triton kernel where `use_triton(q)`, else the reference."""
    _check_inputs(
        q, k, v, cu_seqlens, causal, window
    )  # the rest in the op or the reference: no graph break
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[2])
    # Other head dims (e.g. 96) take the reference. The interpreter computes bf16 dots on raw bits (TRITON_ON_CPU.md).
    dtypes = (
        (torch.float16, torch.bfloat16, torch.float32)
        if q.is_cuda
        else (torch.float16, torch.float32)
    )
    if not (use_triton(q) and q.shape[2] in SUPPORTED_HEAD_DIMS and q.dtype in dtypes):
        return attention_reference(q, k, v, cu_seqlens, max_seqlen, causal, scale, window)
    window = (
        window if window is not None and window < max_seqlen else None
    )  # None: the plain causal kernels
    # Contiguous (T, H, D) lets the kernels derive every stride from H and D.
    return _flash_attention_fwd(
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        cu_seqlens,
        max_seqlen,
        bool(causal),
        float(scale),
        window,
    )[0]
