"""The families beyond LLaMA 2 / Mistral as options of model.py, against transformers' own classes (the independent
reference), in float32 on the PyTorch reference kernels: Llama 3.2 (llama3 RoPE scaling, tied embeddings, a padded
vocabulary), Qwen2 (q/k/v biases), Qwen3 (q/k RMSNorm, head_dim != dim / heads) and Gemma (GeGLU, sqrt(dim) input
scale, (1 + w) norms). Each tiny checkpoint is written by transformers' class: logits, every gradient, packed rows,
our save loaded back by AutoModelForCausalLM, greedy decoding with our KV cache; then the refusals."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from test_model import TOL, packed_batch, randomize_
from transformers import (
    AutoModelForCausalLM,
    GemmaConfig,
    GemmaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import model as M
import model_args
from hf_format import hf_names

# a vocabulary padded to a multiple of 64, as released checkpoints pad theirs past the tokenizer
V = 320
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
FAMILIES = {  # name: (config class, model class, config, the options our reader must pick)
    # head_dim 32 at theta 5e5: wavelengths 6.3, 14, 33, 74, ...: one kept (< 32/4), one blended, the rest divided
    "llama3.2": (
        LlamaConfig,
        LlamaForCausalLM,
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            tie_word_embeddings=True,
            max_position_embeddings=128,
            rope_parameters=LLAMA3_ROPE,
            bos_token_id=128000,
            eos_token_id=[128001, 128009],
        ),
        dict(rope_scaling_factor=32.0, rope_original_max_seq_len=32, tie_embeddings=True),
    ),
    # as released: a window configured but not in use (use_sliding_window false)
    "qwen2": (
        Qwen2Config,
        Qwen2ForCausalLM,
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            rope_parameters={"rope_theta": 1e6},
            use_sliding_window=False,
            sliding_window=32,
            max_window_layers=1,
        ),
        dict(qkv_bias=True, tie_embeddings=True, sliding_window=None),
    ),
    "qwen3": (
        Qwen3Config,
        Qwen3ForCausalLM,
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=24,
            rope_parameters={"rope_theta": 1e6},
            sliding_window=None,
        ),
        dict(qk_norm=True, head_dim=24, tie_embeddings=False),
    ),
    # hidden 48: sqrt(48) = 6.93 is not a bf16 number (6.9375 is), so the cast of the normaliser shows
    "gemma": (
        GemmaConfig,
        GemmaForCausalLM,
        dict(
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=32,
            hidden_act="gelu_pytorch_tanh",
        ),
        dict(
            norm_plus_one=True,
            scale_embeddings=True,
            ffn_activation="gelu_pytorch_tanh",
            head_dim=32,
            tie_embeddings=True,
        ),
    ),
}


def make_hf(name, dtype=torch.float32):
    config_cls, model_cls, kwargs, _ = FAMILIES[name]
    torch.manual_seed(0)
    hf = model_cls(config_cls(vocab_size=V, **kwargs))
    return randomize_(hf).to(dtype).eval()  # norms and biases too: 1 + 0.1 * noise


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each family's checkpoint, written once by transformers' save_pretrained: name -> (hf model, directory)."""
    pairs = {}
    for name in FAMILIES:
        path = tmp_path_factory.mktemp(name)
        hf = make_hf(name)
        hf.save_pretrained(path)
        pairs[name] = hf, path
    return pairs


def tokens_of(shape, seed):
    # From 1: Gemma's pad_token_id 0 is nn.Embedding's padding_idx in transformers, whose row gets no gradient.
    return torch.randint(1, V, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_logits_and_gradients_match_transformers(name, saved):
    """40 tokens: past Llama 3's original context of 32. A summed cross-entropy's gradient, every parameter."""
    hf, path = saved[name]
    ours = M.Transformer.from_pretrained(str(path))
    for option, value in FAMILIES[name][3].items():
        assert getattr(ours.args, option) == value, option
    assert ours.num_params() == hf.num_parameters()
    tokens, targets = tokens_of((2, 40), seed=1), tokens_of((2, 40), seed=2)
    hf.zero_grad()
    logits = hf(tokens, use_cache=False).logits
    F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").backward()
    loss, _ = ours(tokens, targets=targets)
    loss.backward()
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), logits, atol=TOL, rtol=0)
    ours_params, hf_params = dict(ours.named_parameters()), dict(hf.named_parameters())
    assert len(hf_names(ours.args)) == len(hf_params)
    for ours_name, hf_name in hf_names(ours.args).items():
        mine, theirs = ours_params[ours_name].grad, hf_params[hf_name].grad
        assert (mine - theirs).abs().max() <= 1e-4 * theirs.abs().max(), ours_name


@pytest.mark.parametrize("name", list(FAMILIES))
def test_packed_rows_match_transformers_per_sequence(name, saved):
    hf, path = saved[name]
    ours = M.Transformer.from_pretrained(str(path))
    lengths = [37, 6, 20]
    sequences, tokens, position_ids, cu_seqlens = packed_batch(lengths, V, seed=4)
    sequences = [s.clamp_min(1) for s in sequences]
    with torch.no_grad():
        packed = ours(
            tokens.clamp_min(1),
            position_ids=position_ids,
            cu_seqlens=cu_seqlens,
            max_seqlen=max(lengths),
        )
        separate = torch.cat([hf(s[None], use_cache=False).logits[0] for s in sequences])
    torch.testing.assert_close(packed[0], separate, atol=TOL, rtol=0)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_our_save_loads_in_transformers_as_the_same_class(name, saved, tmp_path):
    hf, path = saved[name]
    ours = M.Transformer.from_pretrained(str(path))
    ours.save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    assert (
        config["architectures"] == [type(hf).__name__]
        and config["model_type"] == hf.config.model_type
    )
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    assert type(again) is type(hf) and again.num_parameters() == hf.num_parameters()
    tokens = tokens_of((2, 40), seed=5)
    with torch.no_grad():
        torch.testing.assert_close(again(tokens).logits, hf(tokens).logits, atol=TOL, rtol=0)
    # every stored tensor as transformers wrote it (the padded vocabulary's rows too), and our shape comes back
    theirs, mine = (
        load_file(str(path / "model.safetensors")),
        load_file(str(tmp_path / "model.safetensors")),
    )
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert mine["model.embed_tokens.weight"].shape[0] == V
    assert M.Transformer.from_pretrained(str(tmp_path)).args == ours.args


@pytest.mark.parametrize("name", list(FAMILIES))
def test_greedy_decoding_with_our_kv_cache_matches_generate(name, saved):
    """A 28-token prompt in two chunks, then 10 tokens one at a time (Llama 3.2's past its original 32): the tokens
    of transformers' greedy generate, and each step's logits those of transformers' forward over the whole."""
    hf, path = saved[name]
    ours = M.Transformer.from_pretrained(str(path))
    prompt, n_new = tokens_of((1, 28), seed=6), 10
    with torch.no_grad():
        ours.setup_kv_cache(1, 28 + n_new)
        ours.decode(prompt[:, :11], start_pos=0)
        steps = [ours.decode(prompt[:, 11:], start_pos=11, last_only=True)]
        tokens = []
        for pos in range(28, 28 + n_new):
            tokens.append(int(steps[-1][0, -1].argmax()))
            steps.append(ours.decode(torch.tensor([tokens[-1:]]), start_pos=pos))
        ours.clear_kv_cache()
        want = hf.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=n_new,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        assert tokens == want[0, 28:].tolist()
        torch.testing.assert_close(
            torch.cat(steps, dim=1), hf(want).logits[:, 27:], atol=TOL, rtol=0
        )


# ----------------------------------------------------------------------------- the pieces, exactly


def test_llama3_frequencies_equal_transformers():
    """Llama 3.1-8B's own values (head_dim 128, original 8192, factor 8) and the tiny test config's: bit for bit."""
    for rope, head_dim in [
        ({**LLAMA3_ROPE, "factor": 8.0, "original_max_position_embeddings": 8192}, 128),
        (LLAMA3_ROPE, 32),
    ]:
        config = LlamaConfig(
            hidden_size=4 * head_dim, num_attention_heads=4, rope_parameters=dict(rope)
        )
        want, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
        args = model_args.ModelArgs(
            dim=4 * head_dim,
            n_heads=4,
            rope_theta=5e5,
            rope_scaling_factor=rope["factor"],
            rope_original_max_seq_len=rope["original_max_position_embeddings"],
        )
        assert torch.equal(M.rope_frequencies(args, "cpu"), want)
        assert not torch.equal(
            M.rope_frequencies(
                model_args.ModelArgs(dim=4 * head_dim, n_heads=4, rope_theta=5e5), "cpu"
            ),
            want,
        )


@pytest.mark.parametrize("style", ["4.x rope_scaling", "4.x legacy 'type'"])
def test_llama3_scaling_read_from_transformers_4_configs(style, saved, tmp_path):
    """Llama 3.1's config.json as published for 4.x: rope_theta at the top, rope_scaling, no rope_parameters."""
    _, path = saved["llama3.2"]
    config = json.loads((path / "config.json").read_text())
    rope = config.pop("rope_parameters")
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    if style == "4.x legacy 'type'":
        scaling["type"] = scaling.pop("rope_type")
    config.update(rope_theta=rope["rope_theta"], rope_scaling=scaling)
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    assert model_args.ModelArgs.from_pretrained(
        str(tmp_path)
    ) == model_args.ModelArgs.from_pretrained(str(path))


def test_gemma_bf16_embedding_scale_and_norm_are_transformers_bit_for_bit(saved):
    """In bf16, transformers rounds sqrt(48) to bf16 before the multiply and multiplies (1 + w) in fp32 before the
    cast: the block's input and a norm's output are equal bit for bit (and would not be the other way)."""
    _, path = saved["gemma"]
    hf = GemmaForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16).eval()
    ours = M.Transformer.from_pretrained(str(path), dtype=torch.bfloat16)
    seen = {}
    hf.model.layers[0].register_forward_pre_hook(
        lambda m, args, kwargs: seen.update(hf=args[0]), with_kwargs=True
    )
    ours.layers[0].register_forward_pre_hook(lambda m, args: seen.update(ours=args[0]))
    tokens = tokens_of((1, 9), seed=7)
    with torch.no_grad():
        hf(tokens)
        ours(tokens)
        assert seen["ours"].dtype == torch.bfloat16 and torch.equal(seen["ours"], seen["hf"])
        # scaled by the fp32 sqrt(48)
        assert not torch.equal(ours.tok_embeddings(tokens) * 48**0.5, seen["hf"])
        x = torch.randn(3, 48, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16)
        norm = ours.layers[0].attention_norm
        assert torch.equal(norm(x), hf.model.layers[0].input_layernorm(x))
        # LlamaRMSNorm's order
        cast_first = M.RMSNorm(48, norm.eps).to(torch.bfloat16)(x)
        assert not torch.equal(norm(x), (1 + norm.weight) * cast_first)


@pytest.mark.parametrize("name", ["qwen2", "qwen3", "gemma"])
def test_meta_device_build_then_init_weights(name, saved):
    """Biases start at 0; norms scale by 1: w = 1, or w = 0 where the norm computes x * (1 + w) (Gemma's)."""
    args = model_args.ModelArgs.from_pretrained(str(saved[name][1]))
    with torch.device("meta"):
        ours = M.Transformer(args)
    ours.to_empty(device="cpu")
    ours.init_weights()
    for param_name, p in ours.named_parameters():
        if param_name.endswith("norm.weight"):
            assert torch.equal(p, torch.full_like(p, 0.0 if args.norm_plus_one else 1.0)), (
                param_name
            )
        elif param_name.endswith("bias"):
            assert torch.equal(p, torch.zeros_like(p)), param_name
        else:
            assert abs(p.std().item() - 0.02) < 0.005, param_name
    hf = AutoModelForCausalLM.from_config(FAMILIES[name][0](vocab_size=V, **FAMILIES[name][2]))
    for hf_name, p in hf.named_parameters():  # transformers' own init agrees
        if hf_name.endswith(("norm.weight", "bias")):
            ours_name = {v: k for k, v in hf_names(args).items()}[hf_name]
            assert torch.equal(p, dict(ours.named_parameters())[ours_name]), hf_name


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "family, changes, field",
    [
        ("gemma", {"model_type": "gemma2"}, "model_type"),
        ("gemma", {"final_logit_softcapping": 30.0}, "final_logit_softcapping"),
        ("gemma", {"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
        # layer 1 (max_window_layers)
        ("qwen2", {"use_sliding_window": True, "sliding_window": 16}, "use_sliding_window"),
        (
            "qwen3",
            {"use_sliding_window": True, "sliding_window": 64, "max_window_layers": 0},
            "use_sliding_window",
        ),
        (
            "qwen3",
            {
                "use_sliding_window": True,
                "sliding_window": 64,
                "layer_types": ["full_attention", "sliding_attention"],
            },
            "use_sliding_window",
        ),
        (
            "llama3.2",
            {"rope_parameters": {"rope_type": "yarn", "rope_theta": 5e5, "factor": 4.0}},
            "rope_parameters",
        ),
        ("llama3.2", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_scaling"),
        ("qwen3", {"attention_bias": True}, "attention_bias"),
    ],
)
def test_unsupported_family_config_is_one_line_naming_the_field(
    family, changes, field, saved, tmp_path
):
    config = json.loads((saved[family][1] / "config.json").read_text())
    # as released Qwen configs: transformers derives it from max_window_layers
    config.pop("layer_types", None)
    (tmp_path / "config.json").write_text(json.dumps(config | changes))
    with pytest.raises(ValueError, match=f"config.json: {field}=") as error:
        model_args.ModelArgs.from_pretrained(str(tmp_path))
    assert "\n" not in str(error.value)


def test_qwen_window_not_in_use_loads(saved, tmp_path):
    """use_sliding_window true, but max_window_layers covers every layer: no layer has a window (Qwen2Config)."""
    config = json.loads((saved["qwen2"][1] / "config.json").read_text())
    config.pop("layer_types", None)
    changes = {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 2}
    (tmp_path / "config.json").write_text(json.dumps(config | changes))
    assert model_args.ModelArgs.from_pretrained(str(tmp_path)).sliding_window is None


def test_options_must_be_the_family_s():
    """Saved as model_type X, transformers' class of X computes X's options: ModelArgs refuses any other mix."""
    with pytest.raises(ValueError, match="qkv_bias=False: model_type='qwen2' has True"):
        model_args.ModelArgs(dim=64, n_heads=4, model_type="qwen2")
    with pytest.raises(ValueError, match="qk_norm=True: model_type='llama' has False"):
        model_args.ModelArgs(dim=64, n_heads=4, qk_norm=True)
    with pytest.raises(ValueError, match="model_type='gemma2', expected one of llama, mistral"):
        model_args.ModelArgs(dim=64, n_heads=4, model_type="gemma2")
    with pytest.raises(ValueError, match="ffn_activation='gelu'"):
        model_args.ModelArgs(dim=64, n_heads=4, ffn_activation="gelu")
    with pytest.raises(ValueError, match="RoPE scaling"):
        model_args.ModelArgs(
            dim=64,
            n_heads=4,
            rope_scaling_factor=8.0,
            rope_low_freq_factor=4.0,
            rope_high_freq_factor=1.0,
        )
