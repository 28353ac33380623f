"""Fused linear + weighted cross-entropy that never holds the (N, V) logits.

C-RLFT trains on sum_t w_t * CE(logits_t, y_t), divided by the total weight of the global batch (the caller
divides). With a 32k vocabulary and 80k tokens per GPU the logits alone are 80k * 32k * 4 bytes ~ 10 GB in
fp32, and autograd would keep them (and a softmax of the same size) alive until backward.

The math. For one token with logits z (V,), target y and weight w:
    CE = logsumexp(z) - z[y]
    d(w * CE) / dz = w * (softmax(z) - onehot(y))        softmax(z) = exp(z - logsumexp(z))
and with z = h @ W.T (h (D,) the final hidden state, W (V, D) the lm_head):
    d/dh = dz @ W        d/dW = dz.T @ h   (summed over tokens)

Why the gradients are computed in the forward. The loss is a scalar and the gradient of the logits depends
only on the logits themselves, so once a chunk's logits exist we can finish everything with them at once:
take the loss, overwrite the logits with their gradient, push that through the two matmuls into
grad_hidden and grad_weight, and throw the chunk away. Backward then only scales the stored gradients by
grad_output (a scalar). Waiting for backward would mean keeping the logits (or recomputing them).
Peak extra memory is one chunk of logits plus the gradients themselves, not N * V.

grad_weight is accumulated in the input dtype, in place (addmm_: the matmul sums in fp32 and adds into the
bf16 accumulator with one rounding per chunk), as Liger-Kernel does. An fp32 accumulator would cost V * D * 4
bytes (0.5 GB at V = 32k, D = 4096) plus a (V, D) temporary per chunk, which is most of the memory this
function exists to save; with ~8 chunks the extra rounding is a few bf16 ulps, below the noise of bf16
gradients themselves (under FSDP's mixed precision every other gradient is bf16 too).

Per chunk of tokens:
    logits = h_chunk @ W.T                (C, V) in the input dtype, fp32 accumulation inside the matmul
    row step (Triton kernel, or the same math in PyTorch): one pass for the row's log-sum-exp with an
        online max/sum in fp32, a second pass writing w * (softmax - onehot) over the logits in place
    grad_hidden[rows] = dlogits @ W       (C, D)
    grad_weight      += dlogits.T @ h     (V, D), accumulated in place in the input dtype

Tokens with weight 0 (prompts, padding) are dropped before any matmul: only rows with a nonzero weight are
gathered, so their targets may be -100 and they cost nothing. Their per-token CE is reported as 0.
"""
import math

import torch
import torch.nn.functional as F

from kernels import HAS_TRITON, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

IGNORE_INDEX = -100


# ----------------------------------------------------------------------------------------------------------
# The row step: log-sum-exp and the in-place logits gradient
# ----------------------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _ce_rows_kernel(
        logits_ptr,      # (C, V) input dtype; overwritten with w * (softmax - onehot)
        targets_ptr,     # (C,) int64, all in [0, V)
        weights_ptr,     # (C,) fp32
        ce_ptr,          # (C,) fp32 out: unweighted CE per row
        V,
        stride_row,
        BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)  # int64: row * stride_row can pass 2**31 for big chunks
        row_ptr = logits_ptr + row * stride_row
        offsets = tl.arange(0, BLOCK_V)

        # Pass 1: online max and sum of exp, in fp32 whatever the input dtype.
        m = float("-inf")
        s = 0.0
        for start in range(0, V, BLOCK_V):
            cols = start + offsets
            x = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        lse = m + tl.log(s)

        target = tl.load(targets_ptr + row)
        weight = tl.load(weights_ptr + row)
        target_logit = tl.load(row_ptr + target).to(tl.float32)
        tl.store(ce_ptr + row, lse - target_logit)

        # Pass 2: overwrite the logits with their gradient w * (softmax - onehot).
        for start in range(0, V, BLOCK_V):
            cols = start + offsets
            mask = cols < V
            x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            p = tl.exp(x - lse)
            p = tl.where(cols == target, p - 1.0, p)
            tl.store(row_ptr + cols, (p * weight).to(logits_ptr.dtype.element_ty), mask=mask)


def kernel_config(vocab_size: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) the launcher uses for a vocabulary size; the compile test reads it too."""
    block_v = min(4096, 1 << (vocab_size - 1).bit_length())  # next power of two, at most 4096
    num_warps = 8 if block_v >= 2048 else 4
    return block_v, num_warps


def _ce_rows_triton(logits, targets, weights):
    C, V = logits.shape
    ce = torch.empty(C, dtype=torch.float32, device=logits.device)
    block_v, num_warps = kernel_config(V)
    _ce_rows_kernel[(C,)](logits, targets, weights, ce, V, logits.stride(0),
                          BLOCK_V=block_v, num_warps=num_warps)
    return ce


def _ce_rows_torch(logits, targets, weights):
    """Same math as the kernel in PyTorch ops (the CPU path): returns CE (C,), logits overwritten by grad.

    In place on the chunk, so the only (C, V) temporary is the fp32 copy of half-precision logits."""
    x = logits.float()                                        # the logits themselves when fp32
    rows = torch.arange(len(targets), device=x.device)
    target_logit = x[rows, targets]                           # (C,)
    row_max = x.amax(dim=1)                                   # (C,)
    x.sub_(row_max[:, None]).exp_()                           # exp(z - max), in [0, 1]
    sum_exp = x.sum(dim=1)                                    # (C,)
    ce = row_max + sum_exp.log() - target_logit               # logsumexp(z) - z[y]
    x.mul_((weights / sum_exp)[:, None])                      # w * softmax
    x[rows, targets] -= weights                               # w * (softmax - onehot)
    if x.data_ptr() != logits.data_ptr():
        logits.copy_(x)
    return ce


def _ce_rows(logits, targets, weights):
    if use_triton(logits):
        return _ce_rows_triton(logits, targets, weights)
    return _ce_rows_torch(logits, targets, weights)


# ----------------------------------------------------------------------------------------------------------
# The chunked autograd function
# ----------------------------------------------------------------------------------------------------------
MIN_CHUNK_ROWS = 512


def default_chunk_size(n_tokens: int, vocab_size: int, dim: int) -> int:
    """Rows per chunk so that a chunk's logits (C, V) is about half the size of hidden (N, D): the peak is
    then the gradients themselves (grad_weight V*D, grad_hidden N*D) plus a little (Liger-Kernel sizes a
    chunk like all of hidden; on an H200 at N = 8k, D = 4096 that left the peak at 0.131 of the naive
    path's). At least MIN_CHUNK_ROWS: every chunk re-reads all of W
    in its three matmuls, and thin chunks make them memory-bound (64-row chunks ran ~2x slower than the
    naive path on CPU here). A multiple of 64 rows."""
    n_chunks = max(1, math.ceil(2 * vocab_size / dim))
    rows = max(math.ceil(n_tokens / n_chunks), MIN_CHUNK_ROWS)
    return 64 * math.ceil(rows / 64)


def _check_inputs(hidden, weight, targets, loss_weights, chunk_size):
    where = "kernels/cross_entropy.py"
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"{where}: hidden must be (N, D) and weight (V, D), got {tuple(hidden.shape)} "
                         f"and {tuple(weight.shape)}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"{where}: hidden dim {hidden.shape[1]} != weight dim {weight.shape[1]}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"{where}: hidden dtype {hidden.dtype} != weight dtype {weight.dtype}")
    N = hidden.shape[0]
    if targets.shape != (N,) or loss_weights.shape != (N,):
        raise ValueError(f"{where}: targets and loss_weights must be ({N},), got {tuple(targets.shape)} "
                         f"and {tuple(loss_weights.shape)}")
    if targets.dtype != torch.int64:
        raise ValueError(f"{where}: targets must be int64, got {targets.dtype}")
    if not loss_weights.is_floating_point():
        raise ValueError(f"{where}: loss_weights must be float, got {loss_weights.dtype}")
    if len({hidden.device, weight.device, targets.device, loss_weights.device}) != 1:
        raise ValueError(f"{where}: hidden, weight, targets, loss_weights must be on one device")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"{where}: chunk_size must be >= 1, got {chunk_size}")


def _forward_and_grads(hidden, weight, targets, loss_weights, chunk_size, need_grad_hidden, need_grad_weight):
    N, D = hidden.shape
    V = weight.shape[0]
    rows_kept = torch.nonzero(loss_weights != 0).squeeze(1)  # (M,) only these enter the matmuls
    targets_kept = targets[rows_kept]
    weights_kept = loss_weights[rows_kept].float()
    if len(targets_kept) and bool(((targets_kept < 0) | (targets_kept >= V)).any()):
        bad = rows_kept[(targets_kept < 0) | (targets_kept >= V)][0].item()
        raise ValueError(f"kernels/cross_entropy.py: targets[{bad}] = {targets[bad].item()} is outside "
                         f"[0, {V}) but loss_weights[{bad}] = {loss_weights[bad].item()} is nonzero")

    M = len(rows_kept)
    C = chunk_size or default_chunk_size(N, V, D)
    per_token_ce = torch.zeros(N, dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.zeros_like(hidden) if need_grad_hidden else None
    grad_weight = torch.zeros_like(weight) if need_grad_weight else None  # (V, D), see the docstring

    for start in range(0, M, C):
        rows = rows_kept[start:start + C]                     # (C,)
        h = hidden[rows]                                      # (C, D)
        logits = h @ weight.t()                               # (C, V), input dtype
        ce = _ce_rows(logits, targets_kept[start:start + C], weights_kept[start:start + C])
        per_token_ce[rows] = ce
        dlogits = logits                                      # overwritten in place: w * (softmax - onehot)
        if need_grad_hidden:
            grad_hidden[rows] = dlogits @ weight              # (C, D)
        if need_grad_weight:
            grad_weight.addmm_(dlogits.t(), h)                # (V, D)
        del logits, dlogits, h

    loss_sum = (per_token_ce * loss_weights.float()).sum()
    return loss_sum, per_token_ce, grad_hidden, grad_weight


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, loss_weights, chunk_size):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.no_grad():
            loss_sum, per_token_ce, grad_hidden, grad_weight = _forward_and_grads(
                hidden, weight, targets, loss_weights, chunk_size, need_h, need_w)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.mark_non_differentiable(per_token_ce)
        return loss_sum, per_token_ce

    @staticmethod
    def backward(ctx, grad_loss, grad_per_token):
        grad_hidden, grad_weight = ctx.saved_tensors
        # The stored gradients are for grad_output == 1; scale them (out of place: backward may run twice).
        if not bool(grad_loss == 1.0):
            grad_hidden = None if grad_hidden is None else grad_hidden * grad_loss.to(grad_hidden.dtype)
            grad_weight = None if grad_weight is None else grad_weight * grad_loss.to(grad_weight.dtype)
        return grad_hidden, grad_weight, None, None, None


def fused_linear_cross_entropy(hidden, lm_head_weight, targets, loss_weights, return_per_token=False,
                               chunk_size=None):
    """sum_t loss_weights[t] * CE(hidden[t] @ lm_head_weight.T, targets[t]) as an fp32 scalar.

    hidden (N, D) and lm_head_weight (V, D) in one dtype (fp32/fp16/bf16; under autocast both are cast to
    the autocast dtype first), targets (N,) int64 (may be -100 where the weight is 0), loss_weights (N,)
    float. Differentiable w.r.t. hidden and lm_head_weight (not loss_weights). With return_per_token=True
    also returns per_token_ce (N,) fp32, detached, unweighted, 0 where loss_weights is 0.
    chunk_size: tokens per chunk (default: default_chunk_size(N, V, D))."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):  # do what autocast does to `hidden @ weight.T`
        dtype = torch.get_autocast_dtype(device_type)
        hidden, lm_head_weight = hidden.to(dtype), lm_head_weight.to(dtype)
    _check_inputs(hidden, lm_head_weight, targets, loss_weights, chunk_size)
    if torch.is_grad_enabled() and (hidden.requires_grad or lm_head_weight.requires_grad):
        loss_sum, per_token_ce = _FusedLinearCrossEntropy.apply(hidden, lm_head_weight, targets, loss_weights,
                                                                chunk_size)
    else:  # evaluation: no gradient work at all
        loss_sum, per_token_ce, _, _ = _forward_and_grads(hidden, lm_head_weight, targets, loss_weights,
                                                          chunk_size, False, False)
    return (loss_sum, per_token_ce) if return_per_token else loss_sum


def linear_cross_entropy_reference(hidden, lm_head_weight, targets, loss_weights, return_per_token=False):
    """Plain PyTorch: materialises all (N, V) logits. What the tests and benchmark compare against.

    Logits are upcast to fp32 (kept in float64 for float64 inputs, so tests can check in float64)."""
    logits = hidden @ lm_head_weight.t()                                            # (N, V)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    ce = F.cross_entropy(logits, targets, reduction="none", ignore_index=IGNORE_INDEX)  # (N,)
    loss_sum = (ce * loss_weights.float()).sum()
    return (loss_sum, ce.detach()) if return_per_token else loss_sum
