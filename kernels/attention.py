"""Causal flash attention over packed variable-length sequences, with grouped-query attention.

Layout (as flash-attn's varlen API): the sequences of a pack are concatenated along the token axis.
    q (T, H, D), k and v (T, H_kv, D), cu_seqlens int32 (n_seqs + 1,): sequence i owns tokens
    [cu_seqlens[i], cu_seqlens[i+1]). Attention never crosses from one sequence into another.
    Query head h reads K/V head h // (H // H_kv) (GQA); K/V are never repeated in memory.

Math, for one sequence and one query head, with S = scale * Q K^T (causal: S_ij = -inf for j > i):
    P = softmax(S) row-wise,   O = P V,   lse_i = log sum_j exp(S_ij).

Forward (online softmax). Keys come in blocks; each query row keeps a running max m, a running
denominator l and an unnormalised output acc. For a new block with scores s_j:
    m' = max(m, max_j s_j)
    l' = l * exp(m - m') + sum_j exp(s_j - m')
    acc' = acc * exp(m - m') + sum_j exp(s_j - m') v_j
After the last block O = acc / l and lse = m + log(l): the N x N matrix P never exists in memory. The
kernels work in base 2 (exp2 is one instruction): scores are pre-multiplied by log2(e) and the saved lse
is converted back to natural log.

Backward, with dO the output gradient and delta_i = sum_d dO_id O_id (= sum_j P_ij dP_ij):
    P = exp(S - lse)          (recomputed from the saved lse, no second softmax pass)
    dV = P^T dO,   dP = dO V^T,   dS = P * (dP - delta),   dQ = scale * dS K,   dK = scale * dS^T Q.
Three kernels: delta; dK/dV per key block; dQ per query block (see _attn_bwd_dkdv for why).

`attention_reference` is the same function in plain PyTorch: the CPU path, and what the tests check
the kernels against.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels import HAS_TRITON, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * LOG2E)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)  # tl.dot needs power-of-two tiles of at least 16


# ----------------------------------------------------------------------------------------------------
# Plain PyTorch reference (CPU training path)

def _check_inputs(q, k, v, cu_seqlens):
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"kernels/attention.py: q, k, v must be (tokens, heads, head_dim); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(f"kernels/attention.py: k and v must be (tokens, n_kv_heads, head_dim) matching q "
                         f"{tuple(q.shape)}; got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"kernels/attention.py: n_heads ({q.shape[1]}) must be a multiple of n_kv_heads "
                         f"({k.shape[1]})")
    if not (q.dtype == k.dtype == v.dtype and q.device == k.device == v.device):
        raise ValueError("kernels/attention.py: q, k, v must share dtype and device")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"kernels/attention.py: cu_seqlens must be int32 of shape (n_seqs + 1,); got "
                         f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"kernels/attention.py: cu_seqlens is on {cu_seqlens.device}, q on {q.device}")


def _check_lengths(cu_seqlens, max_seqlen, n_tokens):
    """Value checks that need the host to read cu_seqlens (skipped on CUDA: no sync in the hot path)."""
    lengths = cu_seqlens.diff()
    if cu_seqlens[0] != 0 or cu_seqlens[-1] != n_tokens or (lengths < 0).any():
        raise ValueError(f"kernels/attention.py: cu_seqlens must rise from 0 to the token count {n_tokens}; "
                         f"got {cu_seqlens.tolist()[:8]}...{cu_seqlens[-1].item()}")
    if lengths.max() > max_seqlen:
        raise ValueError(f"kernels/attention.py: max_seqlen={max_seqlen} is below the longest sequence "
                         f"({lengths.max().item()})")


def attention_reference(q, k, v, cu_seqlens, max_seqlen, causal=True, softmax_scale=None):
    """Same contract as flash_attention, in plain differentiable PyTorch.

    The pack is gathered into a padded (n_seqs, max_seqlen) batch and run through one
    F.scaled_dot_product_attention call, then the real tokens are scattered back. Padding sits after
    each sequence's real tokens, so a causal mask already hides it from every real query; without
    causality an explicit key mask hides it.
    """
    _check_inputs(q, k, v, cu_seqlens)
    n_tokens, n_heads, head_dim = q.shape
    _check_lengths(cu_seqlens, max_seqlen, n_tokens)
    lengths = cu_seqlens.diff().long()
    n_seqs = lengths.numel()
    max_seqlen = int(lengths.max()) if n_seqs else 0  # pad only as far as the pack needs
    # valid[i, p]: slot p of sequence i holds a real token. Row-major order of the True slots is token
    # order, so a boolean index gathers/scatters the whole pack in one op.
    valid = torch.arange(max_seqlen, device=q.device)[None, :] < lengths[:, None]  # (n_seqs, L)

    def pad(x):  # (T, h, D) -> (n_seqs, h, L, D), zeros in the padding
        padded = x.new_zeros(n_seqs, max_seqlen, x.shape[1], head_dim).index_put((valid,), x)
        return padded.transpose(1, 2)

    key_mask = None if causal else valid[:, None, None, :]  # (n_seqs, 1, 1, L)
    # enable_gqa: each K/V head serves n_heads // n_kv_heads consecutive query heads, without copies
    # where the backend supports it (on CPU it beat repeat_interleave by ~25%).
    out = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=key_mask, is_causal=causal,
                                         scale=softmax_scale,
                                         enable_gqa=k.shape[1] != n_heads)  # (n_seqs, H, L, D)
    return out.transpose(1, 2)[valid]  # (T, H, D)


# ----------------------------------------------------------------------------------------------------
# Launch configuration: one config per (device, head_dim, dtype), no autotuning (it breaks under the
# interpreter, and one fixed config is easy to compile-test ahead of time; tests/test_attention.py
# compiles exactly what launch_specs returns for "cuda", for sm_80 and sm_90a).

@dataclass(frozen=True)
class KernelConfig:
    fwd_block_m: int   # query rows per forward program
    fwd_block_n: int   # keys per inner-loop step (fwd_block_m must be a multiple)
    fwd_warps: int
    fwd_stages: int
    dkdv_block_m: int  # queries per inner-loop step of the dK/dV kernel
    dkdv_block_n: int  # keys per dK/dV program (a multiple of dkdv_block_m)
    dkdv_warps: int
    dkdv_stages: int
    dq_block_m: int    # queries per dQ program (a multiple of dq_block_n)
    dq_block_n: int    # keys per inner-loop step of the dQ kernel
    dq_warps: int
    dq_stages: int


def kernel_config(head_dim, dtype, device_type):
    """The one launch config for this problem.

    head_dim 128, bf16: measured on an H200 (`python benchmarks/bench_attention.py --sweep`, 8k tokens,
    H=32, H_kv=8): forward 128x64 tiles, 8 warps, 3 stages was the fastest of eight; with the dK/dV
    kernel stepping 64 queries over 128-key blocks the whole backward took 4.6 ms against 8.5 ms with
    32 x 64 (bigger key blocks re-read Q and dO fewer times); the dQ kernel's configs were within 6%. The other configs were picked without a GPU, from ptxas's
    resource report for sm_90a: wgmma in every matmul kernel, no register spills, shared memory under the
    H100's 227 KiB and the A100's 163 KiB (tests/test_attention.py compiles every one for sm_80 and sm_90a)."""
    if device_type != "cuda":
        # Interpreter: tiles small enough that the tests' sequences (up to ~100 tokens) span several,
        # and the diagonal is split into sub-blocks (block_m != block_n) in every kernel.
        return KernelConfig(64, 32, 4, 1, 32, 64, 4, 1, 64, 32, 4, 1)
    if dtype == torch.float32:  # for checking only: 4-byte tiles, so half the tile area
        return KernelConfig(64, 32, 4, 2, 32, 64, 8, 2, 64, 32, 4, 2)
    if head_dim == 128:
        return KernelConfig(128, 64, 8, 3, 64, 128, 8, 2, 128, 64, 8, 3)
    if head_dim == 64:
        return KernelConfig(128, 64, 8, 3, 32, 128, 8, 3, 128, 64, 8, 3)
    return KernelConfig(64, 64, 4, 3, 32, 64, 4, 3, 64, 32, 4, 3)  # head_dim 16 / 32 (tiny test models)


# ----------------------------------------------------------------------------------------------------
# Triton kernels. All tensors are contiguous: q/o/dq/do (T, H, D), k/v/dk/dv (T, H_kv, D), lse/delta
# (H, T) fp32. Grids are (blocks along the sequence, n_seqs, heads); programs past the end of their
# sequence return at once.

if HAS_TRITON:

    @triton.jit
    def _fwd_inner(acc, m_i, l_i, q, K, V, kv_stride, rows, lo, hi, seq_len, qk_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr):
        """Online-softmax recurrence (module docstring) over key blocks [lo, hi). K, V point at this
        sequence's first token and this K/V head. MASK=False only for blocks that every query row of
        the tile may see in full, so the loads and scores go unmasked there."""
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        for start_n in tl.range(lo, hi, BLOCK_N):
            cols = start_n + offs_n
            kT_ptrs = K + cols[None, :] * kv_stride + offs_d[:, None]  # (D, BLOCK_N)
            v_ptrs = V + cols[:, None] * kv_stride + offs_d[None, :]   # (BLOCK_N, D)
            if MASK:
                kT = tl.load(kT_ptrs, mask=cols[None, :] < seq_len, other=0.0)
                v = tl.load(v_ptrs, mask=cols[:, None] < seq_len, other=0.0)
            else:
                kT = tl.load(kT_ptrs)
                v = tl.load(v_ptrs)
            s = tl.dot(q, kT) * qk_scale  # (BLOCK_M, BLOCK_N) scores, base-2 units
            if MASK:
                keep = cols[None, :] < seq_len
                if CAUSAL:
                    keep = keep & (rows[:, None] >= cols[None, :])
                # Every row keeps at least one finite score by the time it meets -inf (key 0 in the
                # first block, or itself on the diagonal), so m_new is finite and nothing turns NaN.
                s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.math.exp2(m_i - m_new)          # rescales what was summed under the old max
            p = tl.math.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
            m_i = m_new
        return acc, m_i, l_i

    @triton.jit
    def _attn_fwd(Q, K, V, O, LSE, CU_SEQLENS, n_tokens, n_heads, group, softmax_scale,
                  HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  CAUSAL: tl.constexpr):
        # The longest-running tiles (far along the sequence: they see the most keys) start first, so
        # the short ones fill in at the end instead of leaving a long tail.
        start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
        seq = tl.program_id(1)
        head = tl.program_id(2)
        seq_start = tl.load(CU_SEQLENS + seq).to(tl.int64)
        seq_len = tl.load(CU_SEQLENS + seq + 1) - seq_start.to(tl.int32)
        if start_m >= seq_len:
            return
        kv_head = head // group
        q_stride = n_heads * HEAD_DIM
        kv_stride = (n_heads // group) * HEAD_DIM
        rows = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        q_ptrs = Q + (seq_start + rows[:, None]) * q_stride + head * HEAD_DIM + offs_d[None, :]
        q = tl.load(q_ptrs, mask=rows[:, None] < seq_len, other=0.0)  # (BLOCK_M, D)
        K += seq_start * kv_stride + kv_head * HEAD_DIM
        V += seq_start * kv_stride + kv_head * HEAD_DIM

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        qk_scale = softmax_scale * 1.4426950408889634  # fold log2(e) in: exp2 below
        if CAUSAL:
            # Keys [0, start_m) lie below the diagonal for every row of this tile: no mask needed.
            # Keys [start_m, start_m + BLOCK_M) form the diagonal block: row i sees only keys <= i,
            # so it is the one place (with the sequence end) where a mask is applied.
            acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, K, V, kv_stride, rows, 0, start_m, seq_len,
                                       qk_scale, HEAD_DIM, BLOCK_N, False, CAUSAL)
            acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, K, V, kv_stride, rows, start_m,
                                       tl.minimum(start_m + BLOCK_M, seq_len), seq_len,
                                       qk_scale, HEAD_DIM, BLOCK_N, True, CAUSAL)
        else:
            # Full key blocks unmasked, then the partial last block masked at the sequence end.
            full = (seq_len // BLOCK_N) * BLOCK_N
            acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, K, V, kv_stride, rows, 0, full, seq_len,
                                       qk_scale, HEAD_DIM, BLOCK_N, False, CAUSAL)
            acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, K, V, kv_stride, rows, full, seq_len, seq_len,
                                       qk_scale, HEAD_DIM, BLOCK_N, True, CAUSAL)
        o = acc / l_i[:, None]
        o_ptrs = O + (seq_start + rows[:, None]) * q_stride + head * HEAD_DIM + offs_d[None, :]
        tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=rows[:, None] < seq_len)
        lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453  # back to natural log
        tl.store(LSE + head * n_tokens + seq_start + rows, lse, mask=rows < seq_len)

    @triton.jit
    def _attn_bwd_delta(O, DO, DELTA, n_tokens, n_heads, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
        """delta[h, t] = sum_d dO[t, h, d] * O[t, h, d]: the row term of dS = P * (dP - delta)."""
        tokens = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        head = tl.program_id(1)
        offs = tokens.to(tl.int64)[:, None] * (n_heads * HEAD_DIM) + head * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
        in_range = tokens[:, None] < n_tokens
        o = tl.load(O + offs, mask=in_range, other=0.0).to(tl.float32)
        do = tl.load(DO + offs, mask=in_range, other=0.0).to(tl.float32)
        tl.store(DELTA + head * n_tokens + tokens, tl.sum(o * do, 1), mask=tokens < n_tokens)

    @triton.jit
    def _dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, q_stride, cols, lo, hi, seq_len, qk_scale,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr):
        """Accumulate dV += P^T dO and dK += dS^T Q over query blocks [lo, hi), in transposed form
        (keys along rows) so the kernel's own key block stays put. Q, DO point at this sequence's first
        token and one query head; LSE, DELTA at that head's first token of the sequence."""
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        for start_m in tl.range(lo, hi, BLOCK_M):
            rows = start_m + offs_m
            qT_ptrs = Q + rows[None, :] * q_stride + offs_d[:, None]   # (D, BLOCK_M)
            do_ptrs = DO + rows[:, None] * q_stride + offs_d[None, :]  # (BLOCK_M, D)
            if MASK:
                qT = tl.load(qT_ptrs, mask=rows[None, :] < seq_len, other=0.0)
                do = tl.load(do_ptrs, mask=rows[:, None] < seq_len, other=0.0)
                lse = tl.load(LSE + rows, mask=rows < seq_len, other=0.0)
                delta = tl.load(DELTA + rows, mask=rows < seq_len, other=0.0)
            else:
                qT = tl.load(qT_ptrs)
                do = tl.load(do_ptrs)
                lse = tl.load(LSE + rows)
                delta = tl.load(DELTA + rows)
            # P^T = exp(S^T - lse), recomputed: (BLOCK_N, BLOCK_M)
            pT = tl.math.exp2(tl.dot(k, qT) * qk_scale - lse[None, :] * 1.4426950408889634)
            if MASK:
                keep = rows[None, :] < seq_len
                if CAUSAL:
                    keep = keep & (rows[None, :] >= cols[:, None])
                pT = tl.where(keep, pT, 0.0)
            dv = tl.dot(pT.to(do.dtype), do, dv)
            dpT = tl.dot(v, tl.trans(do))                # (dO V^T)^T
            dsT = pT * (dpT - delta[None, :])
            dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk)
        return dk, dv

    @triton.jit
    def _attn_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA, CU_SEQLENS, n_tokens, n_heads, group, softmax_scale,
                       HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       CAUSAL: tl.constexpr):
        """One program owns one block of BLOCK_N keys of one K/V head and computes its dK and dV in
        full: it loops over every query head of its GQA group and every query that sees these keys.
        Each dK/dV element is written once by one program, so no atomics are needed. The price is that
        dQ (which sums over keys) needs its own kernel, _attn_bwd_dq, which recomputes P and dP."""
        start_n = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_N
        seq = tl.program_id(1)
        kv_head = tl.program_id(2)
        seq_start = tl.load(CU_SEQLENS + seq).to(tl.int64)
        seq_len = tl.load(CU_SEQLENS + seq + 1) - seq_start.to(tl.int32)
        if start_n >= seq_len:
            return
        q_stride = n_heads * HEAD_DIM
        kv_stride = (n_heads // group) * HEAD_DIM
        cols = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        kv_offs = (seq_start + cols[:, None]) * kv_stride + kv_head * HEAD_DIM + offs_d[None, :]
        k = tl.load(K + kv_offs, mask=cols[:, None] < seq_len, other=0.0)  # (BLOCK_N, D)
        v = tl.load(V + kv_offs, mask=cols[:, None] < seq_len, other=0.0)
        dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        qk_scale = softmax_scale * 1.4426950408889634
        for g in tl.range(0, group):
            head = kv_head * group + g
            Qh = Q + seq_start * q_stride + head * HEAD_DIM
            DOh = DO + seq_start * q_stride + head * HEAD_DIM
            LSEh = LSE + head * n_tokens + seq_start
            DELTAh = DELTA + head * n_tokens + seq_start
            if CAUSAL:
                # Queries [start_n, start_n + BLOCK_N) are the diagonal block: masked. Later queries see
                # all of these keys.
                diag_end = tl.minimum(start_n + BLOCK_N, seq_len)
                dk, dv = _dkdv_inner(dk, dv, k, v, Qh, DOh, LSEh, DELTAh, q_stride, cols, start_n, diag_end,
                                     seq_len, qk_scale, HEAD_DIM, BLOCK_M, True, CAUSAL)
                lo = diag_end
            else:
                lo = 0
            # Whole query blocks unmasked, then the partial last one masked at the sequence end.
            full_end = lo + ((seq_len - lo) // BLOCK_M) * BLOCK_M
            dk, dv = _dkdv_inner(dk, dv, k, v, Qh, DOh, LSEh, DELTAh, q_stride, cols, lo, full_end,
                                 seq_len, qk_scale, HEAD_DIM, BLOCK_M, False, CAUSAL)
            dk, dv = _dkdv_inner(dk, dv, k, v, Qh, DOh, LSEh, DELTAh, q_stride, cols, full_end, seq_len,
                                 seq_len, qk_scale, HEAD_DIM, BLOCK_M, True, CAUSAL)
        dk *= softmax_scale  # dS was taken w.r.t. the scaled scores
        tl.store(DK + kv_offs, dk.to(DK.dtype.element_ty), mask=cols[:, None] < seq_len)
        tl.store(DV + kv_offs, dv.to(DV.dtype.element_ty), mask=cols[:, None] < seq_len)

    @triton.jit
    def _dq_inner(dq, q, do, lse, delta, K, V, kv_stride, rows, lo, hi, seq_len, qk_scale,
                  HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr):
        """Accumulate dQ += dS K over key blocks [lo, hi), recomputing P and dP for this query tile."""
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        for start_n in tl.range(lo, hi, BLOCK_N):
            cols = start_n + offs_n
            kT_ptrs = K + cols[None, :] * kv_stride + offs_d[:, None]  # (D, BLOCK_N)
            vT_ptrs = V + cols[None, :] * kv_stride + offs_d[:, None]
            if MASK:
                kT = tl.load(kT_ptrs, mask=cols[None, :] < seq_len, other=0.0)
                vT = tl.load(vT_ptrs, mask=cols[None, :] < seq_len, other=0.0)
            else:
                kT = tl.load(kT_ptrs)
                vT = tl.load(vT_ptrs)
            p = tl.math.exp2(tl.dot(q, kT) * qk_scale - lse[:, None])  # lse already in base 2 here
            if MASK:
                keep = cols[None, :] < seq_len
                if CAUSAL:
                    keep = keep & (rows[:, None] >= cols[None, :])
                p = tl.where(keep, p, 0.0)
            dp = tl.dot(do, vT)
            ds = p * (dp - delta[:, None])
            dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq)
        return dq

    @triton.jit
    def _attn_bwd_dq(Q, K, V, DO, DQ, LSE, DELTA, CU_SEQLENS, n_tokens, n_heads, group, softmax_scale,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     CAUSAL: tl.constexpr):
        """One program owns one block of BLOCK_M queries of one head and writes its dQ once."""
        start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
        seq = tl.program_id(1)
        head = tl.program_id(2)
        seq_start = tl.load(CU_SEQLENS + seq).to(tl.int64)
        seq_len = tl.load(CU_SEQLENS + seq + 1) - seq_start.to(tl.int32)
        if start_m >= seq_len:
            return
        kv_head = head // group
        q_stride = n_heads * HEAD_DIM
        kv_stride = (n_heads // group) * HEAD_DIM
        rows = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        q_offs = (seq_start + rows[:, None]) * q_stride + head * HEAD_DIM + offs_d[None, :]
        q = tl.load(Q + q_offs, mask=rows[:, None] < seq_len, other=0.0)
        do = tl.load(DO + q_offs, mask=rows[:, None] < seq_len, other=0.0)
        lse = tl.load(LSE + head * n_tokens + seq_start + rows, mask=rows < seq_len, other=0.0)
        lse = lse * 1.4426950408889634
        delta = tl.load(DELTA + head * n_tokens + seq_start + rows, mask=rows < seq_len, other=0.0)
        K += seq_start * kv_stride + kv_head * HEAD_DIM
        V += seq_start * kv_stride + kv_head * HEAD_DIM
        dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        qk_scale = softmax_scale * 1.4426950408889634
        if CAUSAL:  # same split as the forward: unmasked keys below the diagonal, masked diagonal block
            dq = _dq_inner(dq, q, do, lse, delta, K, V, kv_stride, rows, 0, start_m, seq_len, qk_scale,
                           HEAD_DIM, BLOCK_N, False, CAUSAL)
            dq = _dq_inner(dq, q, do, lse, delta, K, V, kv_stride, rows, start_m,
                           tl.minimum(start_m + BLOCK_M, seq_len), seq_len, qk_scale,
                           HEAD_DIM, BLOCK_N, True, CAUSAL)
        else:
            full = (seq_len // BLOCK_N) * BLOCK_N
            dq = _dq_inner(dq, q, do, lse, delta, K, V, kv_stride, rows, 0, full, seq_len, qk_scale,
                           HEAD_DIM, BLOCK_N, False, CAUSAL)
            dq = _dq_inner(dq, q, do, lse, delta, K, V, kv_stride, rows, full, seq_len, seq_len, qk_scale,
                           HEAD_DIM, BLOCK_N, True, CAUSAL)
        dq *= softmax_scale
        tl.store(DQ + q_offs, dq.to(DQ.dtype.element_ty), mask=rows[:, None] < seq_len)


# ----------------------------------------------------------------------------------------------------
# Launchers and autograd

DELTA_BLOCK = 64  # tokens per program of the delta kernel


def launch_specs(head_dim, dtype, device_type, causal=True):
    """(kernel, constexprs, launch options) for each of the four kernels, exactly as the launchers
    below use them; the ahead-of-time compile test compiles these same specs."""
    cfg = kernel_config(head_dim, dtype, device_type)
    # The unmasked stages cover whole diagonal-aligned ranges, so the outer tile must be a whole
    # number of inner steps.
    assert cfg.fwd_block_m % cfg.fwd_block_n == 0 and cfg.dq_block_m % cfg.dq_block_n == 0
    assert cfg.dkdv_block_n % cfg.dkdv_block_m == 0
    return {
        "fwd": (_attn_fwd, dict(HEAD_DIM=head_dim, BLOCK_M=cfg.fwd_block_m, BLOCK_N=cfg.fwd_block_n, CAUSAL=causal),
                dict(num_warps=cfg.fwd_warps, num_stages=cfg.fwd_stages)),
        "delta": (_attn_bwd_delta, dict(HEAD_DIM=head_dim, BLOCK=DELTA_BLOCK), dict(num_warps=4, num_stages=1)),
        "dkdv": (_attn_bwd_dkdv, dict(HEAD_DIM=head_dim, BLOCK_M=cfg.dkdv_block_m, BLOCK_N=cfg.dkdv_block_n,
                                      CAUSAL=causal), dict(num_warps=cfg.dkdv_warps, num_stages=cfg.dkdv_stages)),
        "dq": (_attn_bwd_dq, dict(HEAD_DIM=head_dim, BLOCK_M=cfg.dq_block_m, BLOCK_N=cfg.dq_block_n, CAUSAL=causal),
               dict(num_warps=cfg.dq_warps, num_stages=cfg.dq_stages)),
    }


def _forward(q, k, v, cu_seqlens, max_seqlen, causal, scale):
    """Returns o (T, H, D) and lse (H, T) fp32 (natural log)."""
    n_tokens, n_heads, head_dim = q.shape
    group = n_heads // k.shape[1]
    n_seqs = cu_seqlens.numel() - 1
    kernel, meta, opts = launch_specs(head_dim, q.dtype, q.device.type, causal)["fwd"]
    o = torch.empty_like(q)
    lse = torch.empty(n_heads, n_tokens, device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(max_seqlen, meta["BLOCK_M"]), n_seqs, n_heads)
    kernel[grid](q, k, v, o, lse, cu_seqlens, n_tokens, n_heads, group, scale, **meta, **opts)
    return o, lse


def _backward(do, q, k, v, o, lse, cu_seqlens, max_seqlen, causal, scale):
    n_tokens, n_heads, head_dim = q.shape
    n_kv_heads = k.shape[1]
    group = n_heads // n_kv_heads
    n_seqs = cu_seqlens.numel() - 1
    specs = launch_specs(head_dim, q.dtype, q.device.type, causal)
    delta = torch.empty_like(lse)
    kernel, meta, opts = specs["delta"]
    kernel[(triton.cdiv(n_tokens, DELTA_BLOCK), n_heads)](o, do, delta, n_tokens, n_heads, **meta, **opts)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    kernel, meta, opts = specs["dkdv"]
    grid = (triton.cdiv(max_seqlen, meta["BLOCK_N"]), n_seqs, n_kv_heads)
    kernel[grid](q, k, v, do, dk, dv, lse, delta, cu_seqlens, n_tokens, n_heads, group, scale, **meta, **opts)
    kernel, meta, opts = specs["dq"]
    grid = (triton.cdiv(max_seqlen, meta["BLOCK_M"]), n_seqs, n_heads)
    kernel[grid](q, k, v, do, dq, lse, delta, cu_seqlens, n_tokens, n_heads, group, scale, **meta, **opts)
    return dq, dk, dv


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, causal, scale):
        o, lse = _forward(q, k, v, cu_seqlens, max_seqlen, causal, scale)
        ctx.save_for_backward(q, k, v, o, lse, cu_seqlens)
        ctx.max_seqlen, ctx.causal, ctx.scale = max_seqlen, causal, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = _backward(do.contiguous(), q, k, v, o, lse, cu_seqlens, ctx.max_seqlen, ctx.causal,
                               ctx.scale)
        return dq, dk, dv, None, None, None, None


def _kernel_can_run(q):
    if not use_triton(q) or q.shape[2] not in SUPPORTED_HEAD_DIMS:
        return False  # e.g. head_dim 96: the reference handles it (correct, slower)
    if q.is_cuda:
        return q.dtype in (torch.float16, torch.bfloat16, torch.float32)
    # The CPU interpreter computes bf16 dots on raw bit patterns (shared/TRITON_ON_CPU.md).
    return q.dtype in (torch.float16, torch.float32)


@torch.compiler.disable  # under torch.compile (train.py --compile) the kernels run as they are, between graphs
def flash_attention(q, k, v, cu_seqlens, max_seqlen, causal=True, softmax_scale=None):
    """Attention over packed sequences. q (T, H, D), k/v (T, H_kv, D), cu_seqlens int32 (n_seqs + 1,),
    max_seqlen >= the longest sequence (it sizes the grid: on CUDA it is not checked, to avoid a host
    sync). Returns (T, H, D), differentiable w.r.t. q, k, v. Triton kernel where `use_triton(q)`,
    else attention_reference."""
    _check_inputs(q, k, v, cu_seqlens)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[2])
    if not _kernel_can_run(q):
        return attention_reference(q, k, v, cu_seqlens, max_seqlen, causal, scale)
    if not q.is_cuda:
        _check_lengths(cu_seqlens, max_seqlen, q.shape[0])
    if q.shape[0] == 0:
        return torch.empty_like(q)
    # Contiguous (T, H, D) lets the kernels derive every stride from H and D.
    return _FlashAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens,
                                 int(max_seqlen), bool(causal), float(scale))
