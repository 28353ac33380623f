"""The C-RLFT objective itself: one step of train.py at 2 ranks x 2 micro-batches gives the gradients of

    L = sum_t w_t * CE_t / sum_t w_t      over the whole global batch (all ranks, all micro-batches),

recomputed here in one process, in float64, by transformers' LlamaForCausalLM on each conversation unpacked
(no packing, no fused loss, no FSDP: nothing of train.py's path). The micro-batches' weight sums differ, so a
loop that normalised each micro-batch or each rank by its own sum(w), or forgot the world-size factor,
would give other gradients: the test checks that each of those is far outside its tolerance.
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import tokenized_data  # noqa: E402
from hf_format import hf_names, save_state_dict  # noqa: E402

TINY = [
    "--toy_train=240",
    "--batch_tokens=600",
    "--dim=32",
    "--n_layers=2",
    "--n_heads=4",
    "--n_kv_heads=2",
    "--epochs=2",
    "--grad_accum=2",
    "--toy_eval=0",
    "--val_fraction=0",
]
TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
TOL = 1e-4  # fp32 path vs float64, relative to each tensor's largest gradient (seen ~1e-6)


def env():
    e = dict(os.environ, OMP_NUM_THREADS="1")
    e.pop("TRITON_INTERPRET", None)
    return e


def run(cmd):
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (
        f"{' '.join(map(str, cmd))}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    )


def harness(tmp_path, step, out_dir, *extra):
    out_file = tmp_path / f"step{step}.pt"
    run(
        [
            *TORCHRUN,
            os.path.join(ROOT, "tests", "crlft_harness.py"),
            out_file,
            str(step),
            *TINY,
            f"--out_dir={out_dir}",
            *extra,
        ]
    )
    return torch.load(out_file, weights_only=False)


def hf_model(weights, args, directory):
    """transformers' Llama with these weights, in float64."""
    save_state_dict(weights, args, str(directory))
    return LlamaForCausalLM.from_pretrained(str(directory), dtype=torch.float64).train()


def bin_grads(hf, dataset, bin_):
    """float64 gradients of S = sum(w * CE) over one bin's conversations, each run on its own; and sum(w)."""
    hf.zero_grad()
    total, weight = 0.0, 0.0
    for i in bin_:
        tokens = torch.from_numpy(
            dataset.tokens[dataset.offsets[i] : dataset.offsets[i + 1]].astype("int64")
        )
        w = torch.from_numpy(
            dataset.weights[dataset.offsets[i] + 1 : dataset.offsets[i + 1]].astype("float64")
        )
        logits = hf(input_ids=tokens[None, :-1]).logits[0]
        total = total + (w * F.cross_entropy(logits, tokens[1:], reduction="none")).sum()
        weight += w.sum().item()
    total.backward()
    return {name: p.grad.clone() for name, p in hf.named_parameters()}, weight


def ours_by_hf_name(saved):
    names = hf_names(saved["args"])
    return {names[ours]: g.double() for ours, g in saved["grads"].items()}


def relative_error(a, b):
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max()).item() for k in b)


def check_step(saved, hf, dataset):
    """Our gradients == the whole-batch float64 gradients; the three wrong normalisations are not."""
    per_bin = [bin_grads(hf, dataset, b) for b in saved["bins"]]
    weights = [w for _, w in per_bin]
    # 2 ranks x 2 micro-batches, all different sums
    assert len(set(weights)) == len(weights) == 4, weights
    assert saved["weight_sum"] == pytest.approx(sum(weights), rel=1e-6)

    def combine(scales):  # sum over bins of scale_b * grad(S_b)
        return {k: sum(s * g[k] for s, (g, _) in zip(scales, per_bin)) for k in per_bin[0][0]}

    ours = ours_by_hf_name(saved)
    reference = combine([1 / sum(weights)] * 4)
    assert relative_error(ours, reference) < TOL
    # bins 0, 1 on rank 0; 2, 3 on rank 1
    ranks = [weights[0] + weights[1]] * 2 + [weights[2] + weights[3]] * 2
    wrong = {
        "each micro-batch by its own sum(w)": combine([1 / w for w in weights]),
        "each rank by its own sum(w)": combine([1 / w for w in ranks]),
        "no world-size factor": combine([1 / sum(weights) / 2] * 4),
    }
    for name, grads in wrong.items():
        assert relative_error(grads, reference) > 100 * TOL, name


def test_one_step_at_two_ranks_is_the_global_weighted_mean(tmp_path):
    saved = harness(tmp_path, 0, tmp_path / "run")
    dataset = tokenized_data.TokenizedDataset.load(saved["data_dir"])
    check_step(saved, hf_model(saved["weights"], saved["args"], tmp_path / "hf"), dataset)


def test_a_resumed_step_at_two_ranks_is_the_global_weighted_mean(tmp_path):
    """Train one step at 2 ranks (checkpoint and export at step 1), then resume: the second step starts from
    the exported weights (read back independently, from safetensors) and has the global gradient."""
    out = tmp_path / "run"
    run(
        [
            *TORCHRUN,
            os.path.join(ROOT, "train.py"),
            *TINY,
            f"--out_dir={out}",
            "--max_steps=1",
            "--ckpt_every=1",
        ]
    )
    exported = load_file(str(out / "export" / "model.safetensors"))
    saved = harness(tmp_path, 1, out, "--max_steps=1")  # the schedule of the run it resumes
    names = hf_names(saved["args"])
    for ours, weight in saved["weights"].items():
        assert torch.equal(weight, exported[names[ours]].to(weight.dtype)), ours
    hf = LlamaForCausalLM.from_pretrained(str(out / "export"), dtype=torch.float64).train()
    check_step(saved, hf, tokenized_data.TokenizedDataset.load(saved["data_dir"]))
