"""export_checkpoint.py: a checkpoint that is not the run's last, exported in one process without torchrun.

References: torch.distributed.checkpoint's own converter (dcp_to_torch_save) reads the checkpoint independently of
our loader; train.py's final export is what an export of the run must look like; transformers loads the export.
Runs: a `toy` preset from scratch, and a fine-tuned checkpoint with tied embeddings (its tokenizer in its directory).
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

import data
import export_checkpoint
import tokenizing
import toy_task
from model import Transformer
from model_args import ModelArgs

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "--toy_train=240",
    "--toy_eval=0",
    "--batch_tokens=600",
    "--epochs=2",
    "--max_steps=4",
    "--ckpt_every=2",
]
SHAPE = ["--dim=32", "--n_layers=2", "--n_heads=4", "--n_kv_heads=2"]
EXPORT_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]


def train(out_dir, args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *TINY, f"--out_dir={out_dir}", *args]
    proc = subprocess.run(
        cmd,
        cwd=ROOT,
        env={**env, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module", params=["toy", "tied"])
def run(request, tmp_path_factory):
    """A run with checkpoints at steps 2 and 4 (the last) and train.py's export of step 4."""
    base = tmp_path_factory.mktemp(request.param)
    if request.param == "toy":
        train(base / "run", SHAPE)
    # a "released" checkpoint to fine-tune: tied embeddings, the toy tokenizer in its directory
    else:
        torch.manual_seed(0)
        model = Transformer(
            ModelArgs(
                dim=32,
                n_layers=2,
                n_heads=4,
                n_kv_heads=2,
                vocab_size=128,
                max_seq_len=256,
                multiple_of=32,
                tie_embeddings=True,
            )
        )
        model.init_weights()
        model.save_pretrained(str(base / "base"))
        shutil.copyfile(toy_task.TOKENIZER_PATH, base / "base" / "tokenizer.model")
        train(base / "run", [f"--model={base / 'base'}"])
    assert sorted(os.listdir(base / "run" / "ckpt")) == ["latest", "step_0000002", "step_0000004"]
    return base / "run"


def checkpoint_weights(step_dir, tmp_path):
    """The model's tensors of a checkpoint, read by torch.distributed.checkpoint's own converter."""
    dcp_to_torch_save(str(step_dir), str(tmp_path / "ckpt.pt"))
    return torch.load(tmp_path / "ckpt.pt", weights_only=True)["model"]


def test_an_earlier_checkpoint_exports_as_that_checkpoint(run, tmp_path):
    assert not dist.is_initialized()  # one plain process: no process group
    out = tmp_path / "step2"
    export_checkpoint.main([f"--run={run}", "--step=2", f"--out={out}"])
    ours = Transformer.from_pretrained(str(out), dtype=torch.float32)
    saved = checkpoint_weights(run / "ckpt" / "step_0000002", tmp_path)
    exported = ours.state_dict()
    for name, tensor in saved.items():
        torch.testing.assert_close(exported[name], tensor, rtol=0, atol=0, msg=name)
    assert set(exported) == set(saved)
    final = Transformer.from_pretrained(str(run / "export"), dtype=torch.float32).state_dict()
    # step 4's weights, not step 2's
    assert any(not torch.equal(final[name], exported[name]) for name in final)
    # the same export as the end of training: tokenizer, template, condition, stops
    for name in EXPORT_FILES:
        with open(out / name) as mine, open(run / "export" / name) as train_py:
            assert json.load(mine) == json.load(train_py), name
    with open(out / "tokenizer_config.json") as f:
        assert json.load(f)["crlft_condition"] == "Expert"  # the run's expert condition (the toy's)

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    tokenizer = data.load_tokenizer(str(out))
    prompt = data.encode_prompt(tokenizer, [{"role": "user", "content": "27+58="}], "Expert")
    with torch.no_grad():
        theirs = hf(torch.tensor([prompt])).logits[0]
        mine = ours(torch.tensor([prompt]))[0]
    torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)


def test_latest_by_default_and_condition_flag(run, tmp_path):
    # the latest, into the run's directory
    export_checkpoint.main([f"--run={run}", "--condition=Novice"])
    out = run / "export_step_0000004"
    final = Transformer.from_pretrained(str(run / "export")).state_dict()
    latest = Transformer.from_pretrained(str(out)).state_dict()
    assert all(torch.equal(final[name], latest[name]) for name in final)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    text = hf_tokenizer.apply_chat_template(
        [{"role": "user", "content": "1+2="}], tokenize=False, add_generation_prompt=True
    )
    assert "Novice User:" in text and "Novice Assistant:" in text and "Expert" not in text
    shutil.rmtree(out)


def test_errors_are_one_line_and_write_nothing(run, tmp_path, capsys):
    def refused(*argv):
        with pytest.raises(SystemExit) as e:
            export_checkpoint.main([f"--run={run}", f"--out={tmp_path / 'x'}", *argv])
        assert not (tmp_path / "x").exists()
        message = str(e.value.code)
        assert message.startswith("error: ") and "\n" not in message
        return message

    assert "--step=3: no checkpoint step_0000003" in refused(
        "--step=3"
    ) and "steps 2, 4" in refused("--step=3")
    assert "--run / --ckpt_dir" in refused(f"--ckpt_dir={tmp_path / 'nowhere'}")
    # not the run's tokenizer
    assert "--tokenizer" in refused(f"--tokenizer={tokenizing.default_tokenizer_path()}")
    broken = tmp_path / "ckpt"
    shutil.copytree(run / "ckpt", broken)
    shard = next(f for f in os.listdir(broken / "step_0000002") if f.endswith(".distcp"))
    with open(broken / "step_0000002" / shard, "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    assert "fails its SHA-256 check" in refused(f"--ckpt_dir={broken}", "--step=2")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit, match="--out=.*exists and is not an empty directory"):
        export_checkpoint.main([f"--run={run}", f"--out={tmp_path / 'full'}"])
    assert os.listdir(tmp_path / "full") == ["keep.txt"]
