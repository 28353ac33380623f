"""kernels/attention.py: the Triton kernels (run in the CPU interpreter) against the PyTorch reference,
the reference against a naive per-sequence softmax(QK^T)V, and an ahead-of-time compile of the real GPU
launch configs for sm_80 and sm_90a.

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

from kernels import attention
from kernels.attention import attention_reference, flash_attention

pytestmark = pytest.mark.triton

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


def run(fn, q, k, v, do, cu_seqlens, causal=True, dtype=None):
    """Output and (dq, dk, dv) of fn, optionally computed on inputs upcast to `dtype`."""
    q, k, v = [x.detach().to(dtype or x.dtype).requires_grad_() for x in (q, k, v)]
    max_seqlen = int(cu_seqlens.diff().max())
    out = fn(q, k, v, cu_seqlens, max_seqlen, causal=causal)
    grads = torch.autograd.grad(out, (q, k, v), do.to(out.dtype))
    return (out, *grads)


def naive_attention(q, k, v, cu_seqlens, causal=True):
    """softmax(scale * Q K^T) V per sequence and head, written out directly. Returns out (T, H, D) and
    lse (H, T)."""
    n_heads, head_dim = q.shape[1], q.shape[2]
    group = n_heads // k.shape[1]
    outs, lses = [], []
    for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        qs = q[start:end].transpose(0, 1)  # (H, L, D)
        ks = k[start:end].repeat_interleave(group, dim=1).transpose(0, 1)
        vs = v[start:end].repeat_interleave(group, dim=1).transpose(0, 1)
        scores = qs @ ks.transpose(1, 2) / math.sqrt(head_dim)  # (H, L, L)
        if causal:
            future = torch.ones(end - start, end - start, dtype=torch.bool).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        lses.append(scores.logsumexp(-1))
        outs.append((scores.softmax(-1) @ vs).transpose(0, 1))
    return torch.cat(outs), torch.cat(lses, dim=1)


def rel_err(x, ref):
    assert torch.isfinite(x).all()
    return ((x.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


# ----------------------------------------------------------------------------------------------------
# The reference, checked independently

@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("group", [1, 2, 4])
def test_reference_matches_naive_per_sequence_attention(group, causal):
    q, k, v, do, cu = make_pack(random_lengths(seed=group, long=60), 4, 4 // group, 16, torch.float64, seed=group)
    got = run(attention_reference, q, k, v, do, cu, causal)
    want = run(lambda *a, causal: naive_attention(*a[:4], causal)[0], q, k, v, do, cu, causal)
    for name, x, ref in zip(("out", "dq", "dk", "dv"), got, want):
        assert rel_err(x, ref) < 1e-12, name


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


def test_kernel_non_causal_and_lse():
    lengths = [1, 70, 33, 1]
    q, k, v, do, cu = make_pack(lengths, 4, 2, 32, torch.float32, seed=3)
    got = run(flash_attention, q, k, v, do, cu, causal=False)
    want = run(attention_reference, q, k, v, do, cu, causal=False, dtype=torch.float64)
    for name, x, ref in zip(("out", "dq", "dk", "dv"), got, want):
        assert rel_err(x, ref) < TOL[torch.float32], name
    # The saved log-sum-exp, which the backward relies on, in both modes.
    for causal in (True, False):
        _, lse = attention._forward(q, k, v, cu, max(lengths), causal, 1 / math.sqrt(32))
        _, lse_ref = naive_attention(q.double(), k.double(), v.double(), cu, causal)
        assert (lse.double() - lse_ref).abs().max() < 1e-5


def test_gpu_launch_config_in_interpreter(monkeypatch):
    """The CUDA block sizes (128-row tiles), so the real tiling is checked for numbers too, not only
    compiled."""
    cuda_config = attention.kernel_config
    monkeypatch.setattr(attention, "kernel_config", lambda head_dim, dtype, device_type: cuda_config(
        head_dim, dtype, "cuda"))
    lengths = [230]  # a pack of one long sequence: 2 query tiles, the second one partial
    q, k, v, do, cu = make_pack(lengths, 4, 2, 64, torch.float16, seed=1)
    got = run(flash_attention, q, k, v, do, cu)
    want = run(attention_reference, q, k, v, do, cu, dtype=torch.float64)
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


# ----------------------------------------------------------------------------------------------------
# Ahead-of-time compile of the real GPU launch configs (no GPU needed)

# Largest dynamic shared memory one block may use: A100 (sm_80) 163 KiB, H100 (sm_90) 227 KiB.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}

AOT_SCRIPT = r"""
import json, sys, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels.attention import launch_specs

limits = {int(k): v for k, v in json.loads(sys.argv[1]).items()}
results = []
# Every config the launcher uses on sm_90 (the H100 target); on sm_80 only bf16, which compiles to the
# same tiles as fp16, to keep the test short.
for cc, dtypes in ((90, ("bf16", "fp16")), (80, ("bf16",))):
    for dt in dtypes:
        for head_dim in (64, 128):
            specs = launch_specs(head_dim, getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[dt]), "cuda")
            for name, (kernel, constexprs, opts) in specs.items():
                if cc == 80 and name == "delta":
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
                results.append(dict(cc=cc, dtype=dt, head_dim=head_dim, kernel=name,
                                    shared=compiled.metadata.shared, wgmma="wgmma" in compiled.asm["ptx"],
                                    cubin=len(compiled.asm["cubin"]) > 0))
print(json.dumps(results))
"""


def test_gpu_kernels_compile_ahead_of_time_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", AOT_SCRIPT, json.dumps(SMEM_LIMIT)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == 2 * 2 * 4 + 2 * 3
    for r in results:
        assert r["cubin"], r
        assert r["shared"] <= SMEM_LIMIT[r["cc"]], f"shared memory over the sm_{r['cc']} limit: {r}"
        # Triton 3.9 emits Hopper's wgmma for every matmul kernel on sm_90a; without it they would run
        # on the older mma path at a fraction of the speed.
        if r["cc"] == 90 and r["kernel"] != "delta":
            assert r["wgmma"], f"no wgmma in the sm_90a PTX: {r}"
