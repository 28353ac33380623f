"""The backward Triton kernels of crlft_kernels/attention.py (its docstring has the derivation): delta, dK/dV and dQ,
under the conventions written above the forward kernel in attention_fwd_kernels.py. Also launch_specs, each kernel
with its launch config: it lives here, the one kernel file that sees every kernel."""

from crlft_kernels import HAS_TRITON, tl, triton
from crlft_kernels.attention_fwd_kernels import kernel_config

DELTA_BLOCK = 64  # tokens per program of the delta kernel


if HAS_TRITON:
    from crlft_kernels.attention_fwd_kernels import _attn_fwd, _key_ranges, _mask, _tile

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
        # as the forward
        lo, mid, mid_end = _key_ranges(start_m, seq_len, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
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
