"""The forward Triton kernel of crlft_kernels/attention.py (whose docstring has the derivation and the layout), the
tile helpers the backward kernels share (attention_bwd_kernels.py), and the launch configuration of every kernel."""

from collections import namedtuple

import torch

from crlft_kernels import HAS_TRITON, tl, triton

# ---- Launch configuration: one per (device, head_dim, dtype), no autotuning (it breaks under the interpreter; the
# AOT test compiles what launch_specs returns). fwd and dQ programs own block_m queries and step over block_n keys,
# dK/dV programs the reverse; the outer block is a multiple of the inner (the unmasked stages cover whole diagonals).
Tiles = namedtuple("Tiles", "block_m block_n warps stages")
KernelConfig = namedtuple("KernelConfig", "fwd dkdv dq")  # a Tiles for each kernel


def kernel_config(head_dim, dtype, device_type):
    """The one launch config, window or not. head_dim 128, bf16: the fastest of `bench_attention.py --sweep` on an
    H200 (figures: docs/gpu/sweep.txt): forward 128x64 tiles, 8 warps, 3 stages; dK/dV 64 queries over
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
    # head_dim 16/32: tiny models
    return KernelConfig(Tiles(64, 64, 4, 3), Tiles(32, 64, 4, 3), Tiles(64, 32, 4, 3))


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
