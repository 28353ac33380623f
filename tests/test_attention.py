"""crlft_kernels/attention.py and its kernels (attention_fwd_kernels.py, attention_bwd_kernels.py): the Triton
kernels (run in the CPU interpreter) against the PyTorch reference and, with a sliding window, against a naive
per-sequence softmax(QK^T)V over the allowed keys; the reference against the naive one; an ahead-of-time compile
of the real GPU launch configs for sm_80 and sm_90a.

Error measure: max |x - x_ref| / max |x_ref| per tensor, x_ref computed in float64 from the same
(rounded) inputs. Tolerances: float32 1e-5 (seen ~5e-7); float16 1e-2 (seen ~1e-3: P, dS and the output
are rounded to float16 before or after the matmuls, ~5e-4 relative each).
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from crlft_kernels import attention
from crlft_kernels.attention import attention_reference, flash_attention
from crlft_kernels.attention_bwd_kernels import launch_specs
from crlft_kernels.cross_entropy import fused_linear_cross_entropy

# numpy warns (0/0, log2(0)) on the padding rows of a window's last tile, which see no key and are never
# stored, and on the NaN inputs of the skipping test.
pytestmark = [pytest.mark.triton, pytest.mark.filterwarnings("ignore::RuntimeWarning")]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = {torch.float32: 1e-5, torch.float16: 1e-2}


def make_pack(lengths, n_heads, n_kv_heads, head_dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_tokens = sum(lengths)
    q = torch.randn(n_tokens, n_heads, head_dim, generator=g).to(dtype)
    k = torch.randn(n_tokens, n_kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(n_tokens, n_kv_heads, head_dim, generator=g).to(dtype)
    do = torch.randn(n_tokens, n_heads, head_dim, generator=g).to(dtype)
    cu_seqlens = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    return q, k, v, do, cu_seqlens


def random_lengths(seed, n_short=6, long=100):
    """Short sequences (several of length 1, others up to 40: rarely a block multiple) plus one long one."""
    g = torch.Generator().manual_seed(seed)
    short = torch.randint(1, 41, (n_short,), generator=g).tolist()
    short[::3] = [1] * len(short[::3])
    lengths = short + [long]
    perm = torch.randperm(len(lengths), generator=g).tolist()
    return [lengths[i] for i in perm]


def run(fn, q, k, v, do, cu_seqlens, causal=True, dtype=None, **kwargs):
    """Output and (dq, dk, dv) of fn, optionally computed on inputs upcast to `dtype`."""
    q, k, v = [x.detach().to(dtype or x.dtype).requires_grad_() for x in (q, k, v)]
    max_seqlen = int(cu_seqlens.diff().max())
    out = fn(q, k, v, cu_seqlens, max_seqlen, causal=causal, **kwargs)
    grads = torch.autograd.grad(out, (q, k, v), do.to(out.dtype))
    return (out, *grads)


def naive_attention(q, k, v, cu_seqlens, causal=True, window=None):
    """softmax(scale * Q K^T) V per sequence and head, written out directly; with a window, query i
    attends to keys i - window < j <= i only. Returns out (T, H, D) and lse (H, T)."""
    n_heads, head_dim = q.shape[1], q.shape[2]
    group = n_heads // k.shape[1]
    outs, lses = [], []
    for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        qs = q[start:end].transpose(0, 1)  # (H, L, D)
        ks = k[start:end].repeat_interleave(group, dim=1).transpose(0, 1)
        vs = v[start:end].repeat_interleave(group, dim=1).transpose(0, 1)
        scores = qs @ ks.transpose(1, 2) / math.sqrt(head_dim)  # (H, L, L)
        i, j = torch.arange(end - start)[:, None], torch.arange(end - start)[None, :]
        if causal:
            scores = scores.masked_fill(j > i, float("-inf"))
        if window is not None:
            scores = scores.masked_fill(j <= i - window, float("-inf"))
        lses.append(scores.logsumexp(-1))
        outs.append((scores.softmax(-1) @ vs).transpose(0, 1))
    return torch.cat(outs), torch.cat(lses, dim=1)


def rel_err(x, ref, floor=0.0):
    """max |x - ref| / max |ref|; `floor` bounds the denominator below (window 1: dq = dk = 0 exactly)."""
    assert torch.isfinite(x).all()
    return (
        (x.double() - ref.double()).abs().max() / max(ref.double().abs().max().item(), floor)
    ).item()


# ----------------------------------------------------------------------------------------------------
# The reference, checked independently


@pytest.mark.parametrize(
    "causal,window", [(True, None), (False, None), (True, 1), (True, 7), (True, 33)]
)
@pytest.mark.parametrize("group", [1, 2, 4])
def test_reference_matches_naive_per_sequence_attention(group, causal, window):
    q, k, v, do, cu = make_pack(
        random_lengths(seed=group, long=60), 4, 4 // group, 16, torch.float64, seed=group
    )
    got = run(attention_reference, q, k, v, do, cu, causal, window=window)
    want = run(
        lambda *a, causal, window: naive_attention(*a[:4], causal, window)[0],
        q,
        k,
        v,
        do,
        cu,
        causal,
        window=window,
    )
    for name, x, ref in zip(("out", "dq", "dk", "dv"), got, want):
        assert rel_err(x, ref, floor=1.0) < 1e-12, name


# ----------------------------------------------------------------------------------------------------
# The kernels against the reference (interpreter)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("group,head_dim", [(1, 32), (2, 64), (4, 32)])
def test_kernel_matches_reference(dtype, group, head_dim):
    lengths = random_lengths(seed=10 * group + head_dim)
    q, k, v, do, cu = make_pack(lengths, 4, 4 // group, head_dim, dtype, seed=group)
    got = run(flash_attention, q, k, v, do, cu)
    want = run(attention_reference, q, k, v, do, cu, dtype=torch.float64)
    for name, x, ref in zip(("out", "dq", "dk", "dv"), got, want):
        assert x.dtype == dtype
        assert rel_err(x, ref) < TOL[dtype], (name, lengths)


@pytest.mark.parametrize("window", [None, 33])
def test_delta_kernel_and_fused_delta_agree(monkeypatch, window):
    """Short packs compute delta inside the dK/dV and dQ kernels, long ones in a kernel of its own: both paths
    against the float64 reference (the other tests take the fused one: their sequences are short)."""
    lengths = random_lengths(seed=4, long=150)
    q, k, v, do, cu = make_pack(lengths, 4, 2, 32, torch.float32, seed=4)
    want = run(attention_reference, q, k, v, do, cu, dtype=torch.float64, window=window)
    launched = []
    # attention.py's launchers look launch_specs up in their own module: patched there.
    monkeypatch.setattr(
        attention, "launch_specs", lambda *args: launched.append(args[5:]) or launch_specs(*args)
    )
    for max_fused, fused in ((1000, True), (149, False)):
        monkeypatch.setattr(attention, "FUSED_DELTA_MAX_SEQLEN", max_fused)
        got = run(flash_attention, q, k, v, do, cu, window=window)
        assert launched.pop() == (fused,)
        for name, x, ref in zip(("out", "dq", "dk", "dv"), got, want):
            assert rel_err(x, ref, floor=1.0) < TOL[torch.float32], (name, fused)


def test_kernel_non_causal_and_lse():
    lengths = [1, 70, 33, 1]
    q, k, v, do, cu = make_pack(lengths, 4, 2, 32, torch.float32, seed=3)
    got = run(flash_attention, q, k, v, do, cu, causal=False)
    want = run(attention_reference, q, k, v, do, cu, causal=False, dtype=torch.float64)
    for name, x, ref in zip(("out", "dq", "dk", "dv"), got, want):
        assert rel_err(x, ref) < TOL[torch.float32], name
    # The saved log-sum-exp, which the backward relies on, in every mode.
    for causal, window in ((True, None), (False, None), (True, 16)):
        _, lse = attention._forward(q, k, v, cu, max(lengths), causal, 1 / math.sqrt(32), window)
        _, lse_ref = naive_attention(q.double(), k.double(), v.double(), cu, causal, window)
        assert (lse.double() - lse_ref).abs().max() < 1e-5


# One long sequence: 2 query tiles, the second partial. With the window (400 tokens): window-edge,
# unmasked and diagonal key blocks in the query tiles, unmasked and masked query blocks after the
# diagonal, the window's edge on a block boundary in both.
@pytest.mark.parametrize("length,window", [(230, None), (400, 191)])
def test_gpu_launch_config_in_interpreter(monkeypatch, length, window):
    """The CUDA block sizes (128-row tiles), so the real tiling is checked for numbers too, not only
    compiled."""
    monkeypatch.setattr(
        attention,
        "launch_specs",
        lambda head_dim, dtype, device_type, *rest: launch_specs(head_dim, dtype, "cuda", *rest),
    )
    q, k, v, do, cu = make_pack([length], 4, 2, 64, torch.float16, seed=1)
    got = run(flash_attention, q, k, v, do, cu, window=window)
    want = run(attention_reference, q, k, v, do, cu, dtype=torch.float64, window=window)
    for name, x, ref in zip(("out", "dq", "dk", "dv"), got, want):
        assert rel_err(x, ref) < TOL[torch.float16], name


def test_sequences_do_not_leak_into_each_other():
    """Changing one sequence of the pack leaves every other token's output and gradients bit-identical."""
    lengths = [23, 40, 1, 31]
    q, k, v, do, cu = make_pack(lengths, 4, 2, 32, torch.float32, seed=5)
    before = run(flash_attention, q, k, v, do, cu)
    s, e = cu[1].item(), cu[2].item()  # sequence 1 gets new q, k, v and output gradient
    for x in (q, k, v, do):
        x[s:e] = torch.randn_like(x[s:e]) * 3
    after = run(flash_attention, q, k, v, do, cu)
    others = torch.ones(q.shape[0], dtype=torch.bool)
    others[s:e] = False
    for name, x, y in zip(("out", "dq", "dk", "dv"), before, after):
        assert torch.equal(x[others], y[others]), name
        assert not torch.equal(x[~others], y[~others]), name  # the changed sequence did change


# ----------------------------------------------------------------------------------------------------
# Sliding window (interpreter)


def naive_window(q, k, v, cu_seqlens, max_seqlen, causal, window):
    return naive_attention(q, k, v, cu_seqlens, causal, window)[0]


# The interpreter's tiles are 64 queries x 32 keys (dK/dV: 64 keys x 32 queries): windows 1..33 end
# inside the diagonal block or the one before it; 64 and 95 also give unmasked blocks in between, 95
# with the window's edge on a block boundary (one more key or query unmasked would be wrong).
@pytest.mark.parametrize(
    "window,group,dtype",
    [
        (1, 1, torch.float32),
        (2, 2, torch.float32),
        (7, 4, torch.float32),
        (16, 1, torch.float16),
        (33, 2, torch.float32),
        (64, 4, torch.float16),
        (95, 2, torch.float32),
    ],
)
def test_window_kernel_matches_naive(window, group, dtype):
    """Packs of sequences shorter and longer than the window (up to 2 * window + 70 tokens), against
    float64 softmax over the allowed keys; window 1: every query sees itself only (dq = dk = 0)."""
    lengths = random_lengths(seed=window, long=2 * window + 70)
    q, k, v, do, cu = make_pack(lengths, 4, 4 // group, 32, dtype, seed=window)
    got = run(flash_attention, q, k, v, do, cu, window=window)
    want = run(naive_window, q, k, v, do, cu, dtype=torch.float64, window=window)
    for name, x, ref in zip(("out", "dq", "dk", "dv"), got, want):
        assert x.dtype == dtype
        assert rel_err(x, ref, floor=1.0) < TOL[dtype], (name, lengths)


def test_window_kernels_skip_blocks_outside_the_window():
    """Cost grows with the window, not the sequence: K/V of tokens 0..63 and Q/dO of tokens 256..319 are
    NaN, and a program that read any of them, even masked (0 * NaN = NaN), would spoil its whole tile.
    With a window of 16, the tiles of tokens 128..191 (forward, dQ and dK/dV) must not reach them."""
    length, window, middle = 320, 16, slice(128, 192)
    q, k, v, do, cu = make_pack([length], 4, 2, 32, torch.float32, seed=7)
    want = run(naive_window, q, k, v, do, cu, dtype=torch.float64, window=window)
    k[:64], v[:64], q[256:], do[256:] = float("nan"), float("nan"), float("nan"), float("nan")
    got = run(flash_attention, q, k, v, do, cu, window=window)
    for name, x, ref in zip(("out", "dq", "dk", "dv"), got, want):
        assert rel_err(x[middle], ref[middle], floor=1.0) < TOL[torch.float32], name
    out, dq, dk, dv = run(flash_attention, q, k, v, do, cu)  # without a window they do read them
    assert out[middle].isnan().all() and dq[middle].isnan().all() and dk[middle].isnan().all()


def test_window_covering_every_sequence_runs_the_plain_causal_kernels(monkeypatch):
    windows = []
    monkeypatch.setattr(
        attention, "launch_specs", lambda *args: windows.append(args[4]) or launch_specs(*args)
    )
    q, k, v, do, cu = make_pack([23, 40, 1], 4, 2, 32, torch.float32, seed=2)
    for window in (40, 1000, 39):
        run(flash_attention, q, k, v, do, cu, window=window)
    assert windows == [None, None, None, None, 39, 39]  # forward and backward each


# ----------------------------------------------------------------------------------------------------
# Dispatch and errors


def test_fallbacks_still_compute_attention():
    # head_dim 48 (no power of two) and bfloat16 in the interpreter (unsupported there) take the reference.
    for head_dim, dtype in ((48, torch.float32), (32, torch.bfloat16)):
        q, k, v, do, cu = make_pack([5, 1, 12], 4, 2, head_dim, dtype)
        out = flash_attention(q, k, v, cu, 12)
        ref, _ = naive_attention(q.double(), k.double(), v.double(), cu)
        assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 2e-2)


def test_bad_input_names_the_problem():
    q, k, v, _, cu = make_pack([3, 4], 4, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="n_kv_heads"):
        flash_attention(q, k[:, :1].expand(-1, 3, -1), v[:, :1].expand(-1, 3, -1), cu, 4)
    with pytest.raises(ValueError, match="cu_seqlens must be int32"):
        flash_attention(q, k, v, cu.long(), 4)
    with pytest.raises(ValueError, match="max_seqlen=3"):
        flash_attention(q, k, v, cu, 3)
    with pytest.raises(ValueError, match="token count 7"):
        flash_attention(q, k, v, torch.tensor([0, 3, 6], dtype=torch.int32), 4)
    for bad in (
        dict(window=0),
        dict(window=-2),
        dict(window=4.0),
        dict(window=True),
        dict(window=3, causal=False),
    ):
        for fn in (flash_attention, attention_reference):
            with pytest.raises(ValueError, match="window="):
                fn(q, k, v, cu, 4, **bad)


# ----------------------------------------------------------------------------------------------------
# The torch.library ops: their registration, and torch.compile keeping attention and the loss in one graph


def test_custom_ops_pass_opcheck():
    """Schema, fake (shapes-only) twin against the real kernel, autograd registration, AOT tracing."""
    q, k, v, do, cu = make_pack([5, 30, 1], 4, 2, 16, torch.float32, seed=4)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    for window in (None, 16):
        torch.library.opcheck(attention._flash_attention_fwd, (q, k, v, cu, 30, True, 0.25, window))
    o, lse = attention._flash_attention_fwd(
        q.detach(), k.detach(), v.detach(), cu, 30, True, 0.25, None
    )
    torch.library.opcheck(
        attention._flash_attention_bwd,
        (do, q.detach(), k.detach(), v.detach(), o, lse, cu, 30, True, 0.25, None),
    )


def attention_then_loss(q, k, v, cu_seqlens, max_seqlen, lm_head, targets, loss_weights):
    """What model.py does around the kernels: attention, then the fused loss on its output, then a scale."""
    h = flash_attention(q, k, v, cu_seqlens, max_seqlen, window=16).flatten(1)
    loss_sum, per_token_ce = fused_linear_cross_entropy(
        h, lm_head, targets, loss_weights, return_per_token=True
    )
    return 0.5 * loss_sum, per_token_ce


def test_compile_keeps_attention_and_loss_in_one_graph():
    """fullgraph=True raises on any graph break; values and gradients equal eager's. The packs share their shapes
    and differ in max_seqlen, an int input: one recompile at most (the first change makes it symbolic), not one
    per value."""
    import torch._dynamo.testing

    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(attention_then_loss, backend=counter, fullgraph=True)
    g = torch.Generator().manual_seed(6)
    lm_head = torch.randn(101, 64, generator=g)
    for lengths in ([5, 30, 1], [20, 15, 1], [1, 10, 25]):
        q, k, v, _, cu = make_pack(lengths, 4, 2, 16, torch.float32, seed=len(lengths) + lengths[0])
        targets = torch.randint(0, 101, (sum(lengths),), generator=g)
        loss_weights = torch.rand(sum(lengths), generator=g)
        loss_weights[::3], targets[::3] = 0.0, -100
        results = []
        for fn in (compiled, attention_then_loss):
            inputs = [x.clone().requires_grad_() for x in (q, k, v, lm_head)]
            loss, per_token_ce = fn(*inputs[:3], cu, max(lengths), inputs[3], targets, loss_weights)
            results.append((loss, per_token_ce, *torch.autograd.grad(loss, inputs)))
        for name, x, y in zip(("loss", "per_token_ce", "dq", "dk", "dv", "d_lm_head"), *results):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6, msg=name)
    assert counter.frame_count <= 2, counter.frame_count


# ----------------------------------------------------------------------------------------------------
# Ahead-of-time compile of the real GPU launch configs (no GPU needed)

# Largest dynamic shared memory one block may use: A100 (sm_80) 163 KiB, H100 (sm_90) 227 KiB.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}

AOT_SCRIPT = r"""
import itertools, json, sys, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from crlft_kernels.attention_bwd_kernels import launch_specs

limits = {int(k): v for k, v in json.loads(sys.argv[1]).items()}
results = []
# Every config the launcher uses on sm_90 (the H100 target); on sm_80 only bf16, which compiles to the
# same tiles as fp16, to keep the test short. Each kernel with and without a window (Mistral's 4096);
# the delta kernel has no window.
# The backward kernels that compute delta themselves (short packs): bf16 on sm_90 only.
for cc, dtypes in ((90, ("bf16", "fp16")), (80, ("bf16",))):
    for dt, head_dim, window, fused in itertools.product(dtypes, (64, 128), (None, 4096), (False, True)):
        if fused and (cc, dt) != (90, "bf16"):
            continue
        specs = launch_specs(head_dim, getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[dt]), "cuda",
                             window=window, fused_delta=fused)
        for name, (kernel, constexprs, opts) in specs.items():
            if (name == "delta" and (cc == 80 or window)) or (fused and name not in ("dkdv", "dq")):
                continue
            signature = {}
            for arg in kernel.arg_names:  # naming convention: UPPER = pointer, lower = scalar
                if arg in constexprs:
                    signature[arg] = "constexpr"
                elif arg in ("LSE", "DELTA"):
                    signature[arg] = "*fp32"
                elif arg == "CU_SEQLENS":
                    signature[arg] = "*i32"
                elif arg.isupper():
                    signature[arg] = "*" + dt
                else:
                    signature[arg] = "fp32" if arg == "softmax_scale" else "i32"
            # torch allocations are 16-byte aligned and the launcher sees that: without this hint
            # the compiler skips the async copies and reports half the shared memory.
            attrs = {(kernel.arg_names.index(a),): [["tt.divisibility", 16]]
                     for a, t in signature.items() if t.startswith("*")}
            src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
            compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=opts)
            results.append(dict(cc=cc, dtype=dt, head_dim=head_dim, kernel=name, window=window, fused=fused,
                                shared=compiled.metadata.shared, wgmma="wgmma" in compiled.asm["ptx"],
                                cubin=len(compiled.asm["cubin"]) > 0))
print(json.dumps(results))
"""


def test_gpu_kernels_compile_ahead_of_time_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", AOT_SCRIPT, json.dumps(SMEM_LIMIT)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    # + windowed fwd, dK/dV, dQ; + fused delta
    assert len(results) == 2 * 2 * 4 + 2 * 3 + 3 * 2 * 3 + 2 * 2 * 2
    assert {(r["kernel"], r["window"]) for r in results if r["fused"]} == {
        (kernel, window) for kernel in ("dkdv", "dq") for window in (None, 4096)
    }
    assert {r["kernel"] for r in results if r["window"]} == {"fwd", "dkdv", "dq"}
    for r in results:
        assert r["cubin"], r
        assert r["shared"] <= SMEM_LIMIT[r["cc"]], f"shared memory over the sm_{r['cc']} limit: {r}"
        # Triton 3.9 emits Hopper's wgmma for every matmul kernel on sm_90a; without it they would run
        # on the older mma path at a fraction of the speed.
        if r["cc"] == 90 and r["kernel"] != "delta":
            assert r["wgmma"], f"no wgmma in the sm_90a PTX: {r}"
