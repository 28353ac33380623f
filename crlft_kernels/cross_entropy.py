"""Fused linear + weighted cross-entropy that never holds the (N, V) logits.

C-RLFT trains on sum_t w_t * CE(logits_t, y_t) (the caller divides by the global batch's weight). At 80k tokens per
GPU and a 32k vocabulary the fp32 logits alone are ~10 GB, and autograd would keep them (and a softmax) until backward.

For one token with final hidden state h (D,), logits z = W h (W (V, D): lm_head), target y, weight w:
    CE = logsumexp(z) - z[y]
    dz = d(w * CE) / dz = w * (softmax(z) - onehot(y))        softmax(z) = exp(z - logsumexp(z))
    d/dh = dz @ W        d/dW = dz.T @ h   (summed over tokens)

The loss is a scalar and dz depends only on z: the gradients are finished in the forward, a chunk of logits at a
time, and backward only scales them by grad_output (waiting for it would mean keeping or recomputing the logits).
Per chunk of C tokens:
    logits = h_chunk @ W.T         (C, V) in the input dtype, fp32 accumulation inside the matmul
    row step (Triton kernel, or PyTorch): each row's log-sum-exp in one pass (online max and sum, fp32), then
        a second pass overwriting the logits with dz = w * (softmax - onehot)
    grad_hidden[rows] = dz @ W     (C, D)
    grad_weight += dz.T @ h        (V, D), in place in the input dtype: addmm_ sums in fp32 and rounds once
                                   per chunk into the bf16 accumulator, as Liger-Kernel does.
An fp32 accumulator would cost V * D * 4 bytes (0.5 GB at V = 32k, D = 4096) plus a (V, D) temporary per chunk,
most of the memory saved; with ~8 chunks the extra rounding is a few bf16 ulps, below the noise of bf16 gradients.
Tokens with weight 0 (prompts, padding) skip every matmul: their targets may be -100, their CE reads 0.

Aligned logits (the Triton path): with V = 32,001 every logits row starts at an odd element, and cuBLAS fell back to
old unaligned kernels (the H200 profile in docs/gpu.md: a sixth of the step). So W is padded
with zero rows to V_padded, a multiple of 64: the logits are (C, V_padded), their extra columns are exactly 0 and
the row step leaves them out of the log-sum-exp and writes 0 as their gradient, so they change neither CE nor
grad_hidden; grad_weight's extra rows are dropped. The copy costs V_padded * D once a call (none when V already is
a multiple of 64); the model, its checkpoints and exports keep the true V. The PyTorch row step needs no padding.
"""

import math
from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F

from crlft_kernels import HAS_TRITON, tl, triton, use_triton

MIN_CHUNK_ROWS = 512
# the Triton path pads W to a multiple of this many rows: aligned (C, V) logits rows
VOCAB_ALIGN = 64


# ---- The row step: log-sum-exp and the in-place logits gradient -------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _ce_rows_kernel(
        logits_ptr, targets_ptr, weights_ptr, ce_ptr, V, n_cols, stride_row, BLOCK_V: tl.constexpr
    ):
        """One program per row of logits (C, n_cols), input dtype, overwritten with w * (softmax - onehot); columns
        V..n_cols are the padded vocabulary (zero rows of W): absent from the log-sum-exp, their gradient written 0.
        targets (C,) int64, all in [0, V); weights (C,) fp32; ce (C,) fp32 out: the unweighted CE per row."""
        row = tl.program_id(0).to(tl.int64)  # int64: row * stride_row can pass 2**31 for big chunks
        row_ptr = logits_ptr + row * stride_row
        offsets = tl.arange(0, BLOCK_V)
        # pass 1: online max and sum of exp, in fp32 whatever the input dtype
        m, s = float("-inf"), 0.0
        for start in range(0, V, BLOCK_V):
            cols = start + offsets
            x = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        lse = m + tl.log(s)
        target, weight = tl.load(targets_ptr + row), tl.load(weights_ptr + row)
        target_logit = tl.load(row_ptr + target).to(tl.float32)
        tl.store(ce_ptr + row, lse - target_logit)
        for start in range(0, n_cols, BLOCK_V):  # pass 2: overwrite the logits with their gradient
            cols = start + offsets
            x = tl.load(row_ptr + cols, mask=cols < V, other=0.0).to(tl.float32)
            p = tl.exp(x - lse)
            p = tl.where(cols == target, p - 1.0, p)
            p = tl.where(cols < V, p * weight, 0.0)
            tl.store(row_ptr + cols, p.to(logits_ptr.dtype.element_ty), mask=cols < n_cols)


def kernel_config(vocab_size: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) the launcher uses for a vocabulary size; the compile test reads it too."""
    block_v = min(4096, 1 << (vocab_size - 1).bit_length())  # next power of two, at most 4096
    return block_v, 8 if block_v >= 2048 else 4


def _ce_rows_triton(logits, targets, weights, vocab_size=None):
    """The row step: returns CE (C,) fp32, logits (C, n_cols) overwritten by their gradient. Columns from
    vocab_size on (default: none) are padding: left out of the softmax, their gradient 0."""
    C, n_cols = logits.shape
    V = n_cols if vocab_size is None else vocab_size
    assert V <= n_cols
    ce = torch.empty(C, dtype=torch.float32, device=logits.device)
    block_v, num_warps = kernel_config(V)
    _ce_rows_kernel[(C,)](
        logits,
        targets,
        weights,
        ce,
        V,
        n_cols,
        logits.stride(0),
        BLOCK_V=block_v,
        num_warps=num_warps,
    )
    return ce


def _ce_rows_torch(logits, targets, weights):
    """The row step in PyTorch (the CPU path), in place: the only (C, V) temporary is an fp32 copy of 16-bit logits."""
    x = logits.float()  # the logits themselves when fp32
    rows = torch.arange(len(targets), device=x.device)
    target_logit = x[rows, targets]  # (C,)
    row_max = x.amax(dim=1)  # (C,)
    x.sub_(row_max[:, None]).exp_()  # exp(z - max), in [0, 1]
    sum_exp = x.sum(dim=1)  # (C,)
    ce = row_max + sum_exp.log() - target_logit  # logsumexp(z) - z[y]
    x.mul_((weights / sum_exp)[:, None])  # w * softmax
    x[rows, targets] -= weights  # w * (softmax - onehot)
    if x.data_ptr() != logits.data_ptr():
        logits.copy_(x)
    return ce


# ---- The chunked autograd function -------------------------------------------------------------------------
def default_chunk_size(n_tokens: int, vocab_size: int, dim: int) -> int:
    """Rows per chunk so that a chunk's logits (C, V) is about half the size of hidden (N, D): the peak is then the
    gradients themselves (grad_weight V*D, grad_hidden N*D) plus a little (Liger-Kernel sizes a chunk like all of
    hidden; the peaks: docs/benchmarks.md). At least MIN_CHUNK_ROWS, a multiple of 64: every chunk re-reads W in
    three matmuls, so small chunks are slow."""
    n_chunks = max(1, math.ceil(2 * vocab_size / dim))
    rows = max(math.ceil(n_tokens / n_chunks), MIN_CHUNK_ROWS)
    return 64 * math.ceil(rows / 64)


def _check(ok, message):
    if not ok:
        raise ValueError(f"crlft_kernels/cross_entropy.py: {message}")


def _check_inputs(hidden, weight, targets, loss_weights, chunk_size):
    _check(
        hidden.dim() == 2 and weight.dim() == 2,
        f"hidden must be (N, D) and weight (V, D), got {tuple(hidden.shape)} and {tuple(weight.shape)}",
    )
    _check(
        hidden.shape[1] == weight.shape[1],
        f"hidden dim {hidden.shape[1]} != weight dim {weight.shape[1]}",
    )
    _check(
        hidden.dtype == weight.dtype, f"hidden dtype {hidden.dtype} != weight dtype {weight.dtype}"
    )
    N = hidden.shape[0]
    _check(
        targets.shape == (N,) and loss_weights.shape == (N,),
        f"targets and loss_weights must be ({N},), got {tuple(targets.shape)} and {tuple(loss_weights.shape)}",
    )
    _check(targets.dtype == torch.int64, f"targets must be int64, got {targets.dtype}")
    _check(
        loss_weights.is_floating_point(), f"loss_weights must be float, got {loss_weights.dtype}"
    )
    _check(
        len({hidden.device, weight.device, targets.device, loss_weights.device}) == 1,
        "hidden, weight, targets, loss_weights must be on one device",
    )
    _check(chunk_size is None or chunk_size >= 1, f"chunk_size must be >= 1, got {chunk_size}")


def _forward_and_grads(
    hidden, weight, targets, loss_weights, chunk_size, need_grad_hidden, need_grad_weight
):
    """loss_sum, per_token_ce and (where asked, else None) grad_hidden, grad_weight for grad_output == 1."""
    (N, D), V = hidden.shape, weight.shape[0]
    rows_kept = torch.nonzero(loss_weights != 0).squeeze(1)  # (M,) only these enter the matmuls
    targets_kept, weights_kept = targets[rows_kept], loss_weights[rows_kept].float()
    out_of_range = (targets_kept < 0) | (targets_kept >= V)
    if bool(out_of_range.any()):
        bad = rows_kept[out_of_range][0].item()
        raise ValueError(
            f"crlft_kernels/cross_entropy.py: targets[{bad}] = {targets[bad].item()} is outside "
            f"[0, {V}) but loss_weights[{bad}] = {loss_weights[bad].item()} is nonzero"
        )
    C = chunk_size or default_chunk_size(N, V, D)
    # zero rows up to a multiple of VOCAB_ALIGN (see the docstring); no grad flows to them
    if use_triton(hidden):
        row_step = partial(_ce_rows_triton, vocab_size=V)
        if V % VOCAB_ALIGN:
            weight = F.pad(weight.detach(), (0, 0, 0, -V % VOCAB_ALIGN))
    else:
        row_step = _ce_rows_torch
    per_token_ce = torch.zeros(N, dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.zeros_like(hidden) if need_grad_hidden else None
    # (V_padded, D), see the docstring
    grad_weight = torch.zeros_like(weight) if need_grad_weight else None
    for start in range(0, len(rows_kept), C):
        rows = rows_kept[start : start + C]  # (C,)
        h = hidden[rows]  # (C, D)
        logits = h @ weight.t()  # (C, V_padded), input dtype
        per_token_ce[rows] = row_step(
            logits, targets_kept[start : start + C], weights_kept[start : start + C]
        )
        # the logits now hold their gradient dz (0 in padding)
        if need_grad_hidden:
            grad_hidden[rows] = logits @ weight  # (C, D)
        if need_grad_weight:
            grad_weight.addmm_(logits.t(), h)  # (V_padded, D)
        # before the next chunk's are allocated
        del logits, h
    if need_grad_weight:
        # the true vocabulary's rows (a contiguous view)
        grad_weight = grad_weight[:V]
    return (per_token_ce * loss_weights.float()).sum(), per_token_ce, grad_hidden, grad_weight


# ---- The custom op and its autograd -------------------------------------------------------------------------
# A torch.library op: torch.compile sees one opaque node with a fake (shapes-only) twin, so the loss stays in the
# compiled graph (its nonzero and data-dependent checks would otherwise break the graph). Gradients not asked for are
# empty tensors: an op's outputs cannot be None.
@torch.library.custom_op("crlft::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    loss_weights: torch.Tensor,
    chunk_size: Optional[int],
    need_grad_hidden: bool,
    need_grad_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    loss_sum, per_token_ce, grad_hidden, grad_weight = _forward_and_grads(
        hidden, weight, targets, loss_weights, chunk_size, need_grad_hidden, need_grad_weight
    )
    return (
        loss_sum,
        per_token_ce,
        hidden.new_empty(0) if grad_hidden is None else grad_hidden,
        weight.new_empty(0) if grad_weight is None else grad_weight,
    )


@_linear_cross_entropy_op.register_fake
def _(hidden, weight, targets, loss_weights, chunk_size, need_grad_hidden, need_grad_weight):
    return (
        hidden.new_empty((), dtype=torch.float32),
        hidden.new_empty(hidden.shape[0], dtype=torch.float32),
        torch.empty_like(hidden) if need_grad_hidden else hidden.new_empty(0),
        torch.empty_like(weight) if need_grad_weight else weight.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    ctx.need_grads = inputs[5:7]
    ctx.save_for_backward(output[2], output[3])
    ctx.mark_non_differentiable(*output[1:])
    # no zero tensors for the grads of the outputs that are gradients themselves
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, grad_per_token, grad_of_grad_hidden, grad_of_grad_weight):
    # The stored gradients are for grad_output == 1; scale them (out of place: backward may run twice).
    grads = [
        g * grad_loss.to(g.dtype) if need else None
        for g, need in zip(ctx.saved_tensors, ctx.need_grads)
    ]
    return (*grads, None, None, None, None, None)


_linear_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


def fused_linear_cross_entropy(
    hidden, lm_head_weight, targets, loss_weights, return_per_token=False, chunk_size=None
):
    """sum_t loss_weights[t] * CE(hidden[t] @ lm_head_weight.T, targets[t]) as an fp32 scalar.
    hidden (N, D) and lm_head_weight (V, D) in one dtype (fp32/fp16/bf16; under autocast both are cast to
    the autocast dtype first), targets (N,) int64 (may be -100 where the weight is 0), loss_weights (N,)
    float. Differentiable w.r.t. hidden and lm_head_weight (not loss_weights). With return_per_token=True
    also returns per_token_ce (N,) fp32, detached, unweighted, 0 where loss_weights is 0.
    chunk_size: tokens per chunk (default: default_chunk_size(N, V, D))."""
    # do what autocast does to `hidden @ weight.T`
    if torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, lm_head_weight = hidden.to(dtype), lm_head_weight.to(dtype)
    _check_inputs(hidden, lm_head_weight, targets, loss_weights, chunk_size)
    grad_on = torch.is_grad_enabled()  # evaluation (no_grad): no gradient work at all
    out = _linear_cross_entropy_op(
        hidden,
        lm_head_weight,
        targets,
        loss_weights,
        chunk_size,
        grad_on and hidden.requires_grad,
        grad_on and lm_head_weight.requires_grad,
    )
    return (out[0], out[1]) if return_per_token else out[0]


def linear_cross_entropy_reference(
    hidden, lm_head_weight, targets, loss_weights, return_per_token=False
):
    """Plain PyTorch, all (N, V) logits at once: what the tests and benchmark compare against. Logits are
    upcast to fp32 (kept in float64 for float64 inputs, so tests can check in float64)."""
    logits = hidden @ lm_head_weight.t()  # (N, V)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    ce = F.cross_entropy(logits, targets, reduction="none")  # (N,)
    loss_sum = (ce * loss_weights.float()).sum()
    return (loss_sum, ce.detach()) if return_per_token else loss_sum
