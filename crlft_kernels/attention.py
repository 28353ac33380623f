"""Causal flash attention over packed variable-length sequences, with grouped-query attention and Mistral's
sliding window. `attention_reference` is the same in plain PyTorch (the CPU path, and the tests' reference). The
Triton kernels, derived below, and their launch configs are in attention_fwd_kernels.py and attention_bwd_kernels.py.

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
Short packs (max_seqlen <= FUSED_DELTA_MAX_SEQLEN: launch-bound: docs/gpu.md) skip the
delta kernel: dQ computes delta for its own query block, dK/dV for every query block it visits (O re-read by each).

Sliding window W (causal only; transformers' convention): query i sees the W keys i - W < j <= i. A query
tile [m, m + BM) visits key blocks from the one holding key m - W + 1 (its first row's oldest) to its diagonal,
a key block [n, n + BN) query blocks from its diagonal to query n + BN + W - 2 (the last to see key n + BN - 1);
blocks at the window's edge are masked, those inside it not (_key_ranges in attention_fwd_kernels.py,
_attn_bwd_dkdv in attention_bwd_kernels.py). A tile reads ~W + BM keys (W + BN queries), whatever the length.
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F

from crlft_kernels import triton, use_triton
from crlft_kernels.attention_bwd_kernels import DELTA_BLOCK, launch_specs

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)  # tl.dot needs power-of-two tiles of at least 16
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


# ---- Launchers and autograd ----------------------------------------------------------------------------
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
    # then the other kernels compute delta: no delta kernel
    fused_delta = max_seqlen <= FUSED_DELTA_MAX_SEQLEN
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
    # the rest in the op or the reference: no graph break
    _check_inputs(q, k, v, cu_seqlens, causal, window)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[2])
    # Other head dims (e.g. 96) take the reference. The interpreter computes bf16 dots on raw bits (TRITON_ON_CPU.md).
    dtypes = (
        (torch.float16, torch.bfloat16, torch.float32)
        if q.is_cuda
        else (torch.float16, torch.float32)
    )
    if not (use_triton(q) and q.shape[2] in SUPPORTED_HEAD_DIMS and q.dtype in dtypes):
        return attention_reference(q, k, v, cu_seqlens, max_seqlen, causal, scale, window)
    # None: the plain causal kernels
    window = window if window is not None and window < max_seqlen else None
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
