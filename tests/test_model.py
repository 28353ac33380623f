"""model.py against transformers' LlamaForCausalLM / MistralForCausalLM (the independent reference), in float32
on the PyTorch reference kernels: checkpoint loading and saving both ways, packed rows, the fused loss path,
the KV cache, Mistral's sliding window, grow_vocab, meta-device init."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

import model as M
import model_args
from hf_format import hf_names

TOL = 1e-4

# Tiny random configs: MHA and GQA, tied and untied, odd vocab sizes, one explicit head_dim != dim / n_heads.
HF_CONFIGS = {
    "llama-mha-untied": dict(
        cls="llama",
        vocab_size=317,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        rms_norm_eps=1e-5,
        rope_theta=500.0,
    ),
    "llama-gqa-tied-headdim": dict(
        cls="llama",
        vocab_size=301,
        hidden_size=64,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        tie_word_embeddings=True,
        rope_theta=10000.0,
    ),
    "mistral-gqa": dict(
        cls="mistral",
        vocab_size=259,
        hidden_size=48,
        intermediate_size=112,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        sliding_window=4096,
        rope_theta=1e6,
    ),
}


def randomize_(module, seed=0):
    """Weights well away from init (norm weights too), so any mix-up of tensors shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if p.ndim == 1 else 0.1 * noise)
    return module


def make_hf(name):
    kwargs = dict(HF_CONFIGS[name])
    cls = kwargs.pop("cls")
    config_cls, model_cls = (
        (LlamaConfig, LlamaForCausalLM) if cls == "llama" else (MistralConfig, MistralForCausalLM)
    )
    torch.manual_seed(0)
    return randomize_(model_cls(config_cls(**kwargs))).eval()


def hf_logits(hf, tokens):
    with torch.no_grad():
        return hf(tokens).logits.float()


def tiny_args(**overrides):
    kwargs = dict(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=317, hidden_dim=96, max_seq_len=128
    )
    kwargs.update(overrides)
    return model_args.ModelArgs(**kwargs)


def tiny_model(**overrides):
    torch.manual_seed(0)
    return randomize_(M.Transformer(tiny_args(**overrides)))


# ----------------------------------------------------------------------------- HF checkpoints


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_from_pretrained_matches_transformers(name, tmp_path):
    hf = make_hf(name)
    sharded = name == "mistral-gqa"  # once through model.safetensors.index.json
    hf.save_pretrained(tmp_path, max_shard_size="40KB" if sharded else "5GB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json") == sharded
    ours = M.Transformer.from_pretrained(str(tmp_path))
    assert ours.args.tie_embeddings == hf.config.tie_word_embeddings
    assert (ours.output.weight is ours.tok_embeddings.weight) == hf.config.tie_word_embeddings
    assert ours.num_params() == hf.num_parameters()
    tokens = torch.randint(0, hf.config.vocab_size, (2, 13))
    with torch.no_grad():
        logits = ours(tokens)
    assert logits.dtype == torch.float32 and logits.shape == (2, 13, hf.config.vocab_size)
    torch.testing.assert_close(logits, hf_logits(hf, tokens), atol=TOL, rtol=0)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(tie_embeddings=True, n_kv_heads=4, head_dim=24),
        dict(model_type="mistral", sliding_window=128, vocab_size=203),
    ],
)
def test_save_pretrained_loads_in_transformers(overrides, tmp_path):
    ours = tiny_model(**overrides)
    # Sharded for the mistral case: our writer's index must satisfy transformers.
    ours.save_pretrained(
        str(tmp_path), max_shard_bytes=30_000 if "sliding_window" in overrides else 5 * 10**9
    )
    cls = MistralForCausalLM if ours.args.model_type == "mistral" else LlamaForCausalLM
    hf = cls.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    assert hf.config.tie_word_embeddings == ours.args.tie_embeddings
    assert hf.num_parameters() == ours.num_params()
    tokens = torch.randint(0, ours.args.vocab_size, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf_logits(hf, tokens), atol=TOL, rtol=0)
    with open(tmp_path / "config.json") as f:
        config = json.load(f)
    assert config["architectures"] == [type(hf).__name__] and config["torch_dtype"] == "float32"
    # ... and comes back to us unchanged
    again = M.Transformer.from_pretrained(str(tmp_path))
    assert again.args == ours.args


def test_save_is_atomic_and_replaces_old_weights(tmp_path, monkeypatch):
    ours = tiny_model()
    path = tmp_path / "ckpt"
    ours.save_pretrained(str(path), max_shard_bytes=20_000)  # sharded
    (path / "tokenizer.model").write_bytes(b"not ours")
    # one file: old shards and index must go
    ours.save_pretrained(str(path), dtype=torch.bfloat16)
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors", "tokenizer.model"]
    assert M.Transformer.from_pretrained(str(path)).output.weight.dtype == torch.bfloat16

    import safetensors.torch

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        ours.save_pretrained(str(path))
    # no temporary directory left behind
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    # old save intact
    assert M.Transformer.from_pretrained(str(path)).output.weight.dtype == torch.bfloat16


def test_transformers_4_style_config(tmp_path):
    """rope_theta at top level, torch_dtype, no head_dim, no num_key_value_heads (= heads), no rope_parameters."""
    hf = make_hf("llama-mha-untied")
    hf.save_pretrained(tmp_path)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "vocab_size": 317,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500.0,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "pretraining_tp": 1,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float16",
        "transformers_version": "4.31.0",
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    ours = M.Transformer.from_pretrained(str(tmp_path), dtype=torch.float32)
    assert (
        ours.args.n_kv_heads == 4
        and ours.args.rope_theta == 500.0
        and ours.args.max_seq_len == 4096
    )
    tokens = torch.randint(0, 317, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf_logits(hf, tokens), atol=TOL, rtol=0)
    # config's dtype
    assert M.Transformer.from_pretrained(str(tmp_path)).output.weight.dtype == torch.float16


@pytest.mark.parametrize(
    "field, value",
    [
        ("rope_scaling", {"rope_type": "linear", "factor": 2.0}),
        ("rope_parameters", {"rope_type": "yarn", "rope_theta": 5e5, "factor": 8.0}),
        # no low/high_freq_factor
        ("rope_parameters", {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}),
        ("sliding_window", 16),
        ("attention_bias", True),
        ("mlp_bias", True),
        ("hidden_act", "gelu"),
        ("model_type", "gemma2"),
    ],
)
def test_unsupported_config_is_a_clear_error(field, value, tmp_path):
    make_hf("llama-mha-untied").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config[field] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=field) as error:
        M.Transformer.from_pretrained(str(tmp_path))
    assert "config.json" in str(error.value)


@pytest.mark.parametrize("max_positions", [32768, 8192])  # Mistral-7B-v0.1's, openchat_3.5's
def test_released_mistral_config_loads_at_full_context(max_positions, tmp_path):
    """A released-shaped config (sliding_window 4096 < max_position_embeddings), tiny dims: loads with no
    argument at the config's full context and keeps the window, in and out."""
    config = MistralConfig(
        vocab_size=259,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        sliding_window=4096,
        rope_theta=10000.0,
    )
    torch.manual_seed(0)
    hf = randomize_(MistralForCausalLM(config)).eval()
    hf.save_pretrained(tmp_path)
    ours = M.Transformer.from_pretrained(str(tmp_path))
    assert ours.args.max_seq_len == max_positions and ours.args.sliding_window == 4096
    tokens = torch.randint(0, 259, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf_logits(hf, tokens), atol=TOL, rtol=0)
    ours.save_pretrained(str(tmp_path / "again"))
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    assert again["sliding_window"] == 4096 and again["max_position_embeddings"] == max_positions


@pytest.mark.parametrize("window", [0, -1, 4.5, "16", True])
def test_bad_sliding_window_is_a_clear_error(window, tmp_path):
    make_hf("mistral-gqa").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["sliding_window"] = window
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.json: sliding_window="):
        M.Transformer.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="sliding_window="):
        tiny_args(model_type="mistral", sliding_window=window)
    # Mistral's: a LlamaConfig has no window
    with pytest.raises(ValueError, match="sliding_window=16"):
        tiny_args(sliding_window=16)


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    make_hf("llama-mha-untied").save_pretrained(tmp_path)
    file = str(tmp_path / "model.safetensors")
    tensors = load_file(file)
    save_file({k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"}, file)
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.weight"):
        M.Transformer.from_pretrained(str(tmp_path))
    save_file({**tensors, "model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}, file)
    with pytest.raises(ValueError, match=r"model\.safetensors.*q_proj\.bias"):
        M.Transformer.from_pretrained(str(tmp_path))


# ----------------------------------------------------------------------------- forward paths


def packed_batch(lengths, vocab_size, seed=0):
    g = torch.Generator().manual_seed(seed)
    sequences = [torch.randint(0, vocab_size, (n,), generator=g) for n in lengths]
    tokens = torch.cat(sequences)[None]  # (1, T)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    cu_seqlens = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return sequences, tokens, position_ids, cu_seqlens


@pytest.mark.parametrize("lengths", [[5, 9], [7, 1, 12]])
def test_packed_rows_equal_separate_sequences(lengths):
    ours = tiny_model()
    sequences, tokens, position_ids, cu_seqlens = packed_batch(lengths, 317)
    with torch.no_grad():
        packed = ours(
            tokens, position_ids=position_ids, cu_seqlens=cu_seqlens, max_seqlen=max(lengths)
        )[0]
        separate = torch.cat([ours(seq[None])[0] for seq in sequences])
    torch.testing.assert_close(packed, separate, atol=TOL, rtol=0)


@pytest.mark.parametrize("tie", [False, True])
def test_loss_path_equals_cross_entropy_of_logits(tie):
    """Packed row with zero-weight tokens (target -100) and fractional weights: loss and gradients."""
    lengths = [6, 10, 4]
    sequences, tokens, position_ids, cu_seqlens = packed_batch(lengths, 317, seed=1)
    g = torch.Generator().manual_seed(2)
    targets = torch.randint(0, 317, tokens.shape, generator=g)
    loss_weights = torch.rand(tokens.shape, generator=g)
    loss_weights[:, :3] = 0.0
    targets[:, :3] = -100
    batch = dict(position_ids=position_ids, cu_seqlens=cu_seqlens, max_seqlen=max(lengths))

    ours = tiny_model(tie_embeddings=tie)
    loss, per_token_ce = ours(tokens, targets=targets, loss_weights=loss_weights, **batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in ours.named_parameters()}

    ours.zero_grad()
    logits = ours(tokens, **batch)
    ce = F.cross_entropy(logits.view(-1, 317), targets.view(-1), reduction="none")
    expected = (ce * loss_weights.view(-1)).sum()
    expected.backward()
    torch.testing.assert_close(loss, expected, atol=1e-4, rtol=1e-5)
    kept = targets.view(-1) != -100
    torch.testing.assert_close(per_token_ce.view(-1)[kept], ce.detach()[kept], atol=1e-4, rtol=1e-5)
    for n, p in ours.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("n_kv_heads,window", [(4, None), (2, None), (2, 4)])
def test_kv_cache_decode_equals_full_forward(n_kv_heads, window):
    """With a window of 4 the prompt chunk and the decoding steps run past it."""
    ours = tiny_model(
        n_kv_heads=n_kv_heads,
        **(dict(model_type="mistral", sliding_window=window) if window else {}),
    )
    tokens = torch.randint(0, 317, (2, 15))
    with torch.no_grad():
        full = ours(tokens)
        ours.setup_kv_cache(batch_size=2, max_seq_len=32)
        steps = [ours.decode(tokens[:, :6], start_pos=0)]  # the prompt in one pass
        # a later chunk (offset causal mask)
        steps.append(ours.decode(tokens[:, 6:9], start_pos=6))
        for p in range(9, 15):  # then one token at a time
            steps.append(ours.decode(tokens[:, p : p + 1], start_pos=p))
        ours.clear_kv_cache()
        ours.setup_kv_cache(batch_size=2, max_seq_len=32)
        # (B, 1, V): a prompt pass needs no more
        last = ours.decode(tokens[:, :6], start_pos=0, last_only=True)
        ours.clear_kv_cache()
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=TOL, rtol=0)
    torch.testing.assert_close(last, full[:, 5:6], atol=TOL, rtol=0)
    # Decoding keeps a transposed copy of the output matrix between generations: an in-place update of
    # the weight (an optimizer step, load_state_dict) must be seen by the next one.
    with torch.no_grad():
        ours.output.weight.mul_(-1.5)
        ours.setup_kv_cache(batch_size=2, max_seq_len=32)
        after = ours.decode(tokens[:, :6], start_pos=0, last_only=True)
        ours.clear_kv_cache()
        torch.testing.assert_close(after, ours(tokens[:, :6])[:, 5:6], atol=TOL, rtol=0)
    with pytest.raises(RuntimeError, match="setup_kv_cache"):
        ours.decode(tokens[:, :1], start_pos=0)


# ----------------------------------------------------------------------------- sliding window (Mistral)
# transformers masks key j for query i unless i - W < j <= i (masking_utils.sliding_window_overlay and
# causal_mask_function, for eager and sdpa alike); packed rows (position_ids restarting, no attention_mask,
# no cache) get per-conversation masks on the positions (find_packed_sequence_indices).

WINDOW_CONFIG = dict(
    vocab_size=263,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    sliding_window=16,
    rope_theta=10000.0,
)


def windowed_pair(path, attn_implementation="eager"):
    """transformers' MistralForCausalLM with a window of 16 (head_dim 16, which the Triton kernel takes too)
    and our model loaded from its checkpoint."""
    torch.manual_seed(0)
    hf = randomize_(
        MistralForCausalLM(MistralConfig(**WINDOW_CONFIG, attn_implementation=attn_implementation))
    )
    assert hf.config._attn_implementation == attn_implementation
    hf.save_pretrained(path)
    ours = M.Transformer.from_pretrained(str(path))
    assert ours.args.sliding_window == 16 and ours.args.max_seq_len == 128
    return hf.eval(), ours


@pytest.mark.parametrize(
    "attn_implementation,packed,kernel",
    [
        ("eager", False, False),
        ("eager", True, False),
        ("sdpa", False, False),
        ("sdpa", True, False),
        # numpy warns (0/0) on the padding rows of a window's last tile: no key to see, never stored
        pytest.param(
            "sdpa",
            True,
            True,
            marks=[pytest.mark.triton, pytest.mark.filterwarnings("ignore::RuntimeWarning")],
            id="sdpa-True-triton-kernel",
        ),
    ],
)
def test_sliding_window_matches_transformers(attn_implementation, packed, kernel, tmp_path):
    """Sequences of 50-100 tokens, several windows long: logits and every parameter's gradient of a summed
    cross-entropy, unpacked ((2, 70) batch) and packed (conversations of 60, 9, 85 and 30 tokens in one row);
    once through the Triton kernel (CPU interpreter) instead of the PyTorch reference."""
    from crlft_kernels import use_triton

    assert use_triton(torch.zeros(1)) == kernel
    hf, ours = windowed_pair(tmp_path, attn_implementation)
    g = torch.Generator().manual_seed(1)
    if packed:
        lengths = [60, 9, 85, 30]
        _, tokens, position_ids, cu_seqlens = packed_batch(lengths, 263, seed=3)
        hf_batch = dict(position_ids=position_ids)
        batch = dict(hf_batch, cu_seqlens=cu_seqlens, max_seqlen=max(lengths))
    else:
        tokens = torch.randint(0, 263, (2, 70), generator=g)
        batch, hf_batch = {}, {}
    targets = torch.randint(0, 263, tokens.shape, generator=g)

    logits = hf(tokens, use_cache=False, **hf_batch).logits
    F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").backward()
    loss, _ = ours(tokens, targets=targets, **batch)
    loss.backward()
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens, **batch), logits, atol=TOL, rtol=0)
    ours_params, hf_params = dict(ours.named_parameters()), dict(hf.named_parameters())
    for name, hf_name in hf_names(ours.args).items():
        mine, theirs = ours_params[name].grad, hf_params[hf_name].grad
        assert (mine - theirs).abs().max() <= 1e-4 * theirs.abs().max(), name
    # the window matters here: attending over whole sequences gives other logits
    for layer in ours.layers:
        layer.attention.window = None
    with torch.no_grad():
        assert (ours(tokens, **batch) - logits).abs().max() > 0.1


@pytest.mark.parametrize("prompt_len", [5, 40])  # shorter and longer than the window of 16
def test_greedy_decoding_past_the_window_matches_transformers(prompt_len, tmp_path):
    """80 new tokens with the KV cache (the prompt in two chunks), against transformers' greedy generate."""
    hf, ours = windowed_pair(tmp_path)
    hf.generation_config.eos_token_id = None  # never stop early
    prompt = torch.randint(
        0, 263, (1, prompt_len), generator=torch.Generator().manual_seed(prompt_len)
    )
    n_new, split = 80, prompt_len // 2

    def greedy():
        ours.setup_kv_cache(1, prompt_len + n_new)
        ours.decode(prompt[:, :split], start_pos=0)
        logits = ours.decode(prompt[:, split:], start_pos=split, last_only=True)
        tokens = []
        for pos in range(prompt_len, prompt_len + n_new):
            tokens.append(int(logits[0, -1].argmax()))
            logits = ours.decode(torch.tensor([tokens[-1:]]), start_pos=pos)
        return tokens

    with torch.no_grad():
        # An explicit mask: generate would otherwise take a prompt token equal to pad_token_id for padding.
        want = hf.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=n_new,
            do_sample=False,
            pad_token_id=0,
        )[0, prompt_len:].tolist()
        assert greedy() == want
        # and the window matters: attending over everything decodes otherwise
        for layer in ours.layers:
            layer.attention.window = None
        assert greedy() != want


# ----------------------------------------------------------------------------- parameters


@pytest.mark.parametrize("tie", [False, True])
def test_grow_vocab_mean_init(tie):
    ours = tiny_model(tie_embeddings=tie)
    old_embedding = ours.tok_embeddings.weight.detach().clone()
    old_output = ours.output.weight.detach().clone()
    ours.grow_vocab(320)
    assert ours.args.vocab_size == 320 and ours.tok_embeddings.weight.shape == (320, 64)
    assert ours.output.weight.shape == (320, 64)
    assert (ours.output.weight is ours.tok_embeddings.weight) == tie
    torch.testing.assert_close(ours.tok_embeddings.weight[:317], old_embedding, atol=0, rtol=0)
    torch.testing.assert_close(ours.output.weight[:317], old_output, atol=0, rtol=0)
    for row in range(317, 320):
        torch.testing.assert_close(ours.tok_embeddings.weight[row], old_embedding.mean(0))
        torch.testing.assert_close(ours.output.weight[row], old_output.mean(0))
    logits = ours(torch.tensor([[1, 319, 5]]))
    assert logits.shape == (1, 3, 320)
    with pytest.raises(ValueError, match="smaller"):
        ours.grow_vocab(300)


@pytest.mark.parametrize("tie", [False, True])
def test_meta_device_build_then_init_weights(tie):
    with torch.device("meta"):
        ours = M.Transformer(tiny_args(tie_embeddings=tie, vocab_size=4001))
    ours.to_empty(device="cpu")
    ours.init_weights()
    assert (ours.output.weight is ours.tok_embeddings.weight) == tie
    for name, p in ours.named_parameters():
        assert p.device.type == "cpu" and torch.isfinite(p).all(), name
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            assert abs(p.mean().item()) < 0.005 and abs(p.std().item() - 0.02) < 0.002, name
    assert torch.isfinite(ours(torch.randint(0, 4001, (1, 8)))).all()


def test_presets_parameter_counts():
    """Released shapes (hidden_dim from LLaMA's rule where the config gives none) against their published sizes."""
    released = {
        "llama2-7b": (
            model_args.ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32000),
            6_738_415_616,
        ),
        "llama2-13b": (
            model_args.ModelArgs(dim=5120, n_layers=40, n_heads=40, vocab_size=32000),
            13_015_864_320,
        ),
        "mistral-7b": (
            model_args.ModelArgs(
                dim=4096,
                n_layers=32,
                n_heads=32,
                n_kv_heads=8,
                vocab_size=32000,
                hidden_dim=14336,
                model_type="mistral",
                sliding_window=4096,
            ),
            7_241_732_096,
        ),
        # the families of tests/test_families.py: tied embeddings, q/k/v biases, head_dim 256
        "llama3-8b": (
            model_args.ModelArgs(
                dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, hidden_dim=14336
            ),
            8_030_261_248,
        ),
        "llama3.2-1b": (
            model_args.ModelArgs(
                dim=2048,
                n_layers=16,
                n_heads=32,
                n_kv_heads=8,
                vocab_size=128256,
                hidden_dim=8192,
                tie_embeddings=True,
            ),
            1_235_814_400,
        ),
        "qwen2.5-0.5b": (
            model_args.ModelArgs(
                dim=896,
                n_layers=24,
                n_heads=14,
                n_kv_heads=2,
                vocab_size=151936,
                hidden_dim=4864,
                tie_embeddings=True,
                model_type="qwen2",
                qkv_bias=True,
            ),
            494_032_768,
        ),
        "gemma-2b": (
            model_args.ModelArgs(
                dim=2048,
                n_layers=18,
                n_heads=8,
                n_kv_heads=1,
                head_dim=256,
                vocab_size=256000,
                hidden_dim=16384,
                tie_embeddings=True,
                model_type="gemma",
                norm_plus_one=True,
                scale_embeddings=True,
            ),
            2_506_172_416,
        ),
    }
    for name, (args, count) in released.items():
        with torch.device("meta"):
            assert M.Transformer(args).num_params() == count, name
    assert (
        released["llama2-7b"][0].hidden_dim == 11008
        and released["llama2-13b"][0].hidden_dim == 13824
    )
    with torch.device("meta"):
        tiny = M.Transformer(model_args.PRESETS["tiny"])
        one_b = M.Transformer(model_args.PRESETS["1b"])
    assert 18e6 < tiny.num_params() < 21e6 and 1.0e9 < one_b.num_params() < 1.2e9


def test_import_without_gpu():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import model, model_args; model.Transformer(model_args.PRESETS['tiny'])",
        ],
        cwd=root,
        env=env,
        check=True,
        timeout=120,
    )
