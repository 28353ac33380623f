"""Hugging Face checkpoints as plain values for model.py: config.json <-> ModelArgs keyword arguments (the families
and the options each picks), and the safetensors tensors under our parameter names, read and written (sharded,
atomically)."""

import json
import os
import shutil
import tempfile

import safetensors
import safetensors.torch
import torch

_LAYER_NAMES = {  # our name -> HF name, per layer
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
}
_QKV_BIASES = {
    "attention.wq.bias": "self_attn.q_proj.bias",
    "attention.wk.bias": "self_attn.k_proj.bias",
    # qkv_bias (Qwen2)
    "attention.wv.bias": "self_attn.v_proj.bias",
}
_QK_NORMS = {
    "attention.q_norm.weight": "self_attn.q_norm.weight",
    "attention.k_norm.weight": "self_attn.k_norm.weight",
}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# The families we load and save: model_type -> (transformers' class, the options of model.py that class always has;
# the others are False). Whatever else config.json says, the class decides these, so ModelArgs checks them.
FAMILIES = {
    "llama": ("LlamaForCausalLM", {}),
    "mistral": ("MistralForCausalLM", {}),
    "qwen2": ("Qwen2ForCausalLM", {"qkv_bias": True}),
    "qwen3": ("Qwen3ForCausalLM", {"qk_norm": True}),
    "gemma": ("GemmaForCausalLM", {"norm_plus_one": True, "scale_embeddings": True}),
}


def family_options(model_type: str) -> dict:
    """The ModelArgs options a family's transformers class computes, e.g. {"qkv_bias": True, "qk_norm": False, ...}."""
    return (
        dict.fromkeys(("qkv_bias", "qk_norm", "norm_plus_one", "scale_embeddings"), False)
        | FAMILIES[model_type][1]
    )


def hf_names(args) -> dict:
    """Our parameter name -> HF tensor name, for the tensors an HF checkpoint stores (a tied lm_head isn't)."""
    per_layer = {f"{ours}.weight": f"{theirs}.weight" for ours, theirs in _LAYER_NAMES.items()}
    per_layer |= (_QKV_BIASES if args.qkv_bias else {}) | (_QK_NORMS if args.qk_norm else {})
    names = {
        "tok_embeddings.weight": "model.embed_tokens.weight",
        **{
            f"layers.{i}.{ours}": f"model.layers.{i}.{theirs}"
            for i in range(args.n_layers)
            for ours, theirs in per_layer.items()
        },
        "norm.weight": "model.norm.weight",
    }
    return names if args.tie_embeddings else names | {"output.weight": "lm_head.weight"}


def _read_config(path: str) -> dict:
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file}: not found (expected a Hugging Face checkpoint directory)")
    with open(file) as f:
        return json.load(f)


# config.json's defaults where a family's config class differs from LlamaConfig (for a file that omits the field)
_CONFIG_DEFAULTS = {
    "llama": {"max_position_embeddings": 2048},
    "mistral": {"max_position_embeddings": 131072},
    "qwen2": {"max_position_embeddings": 32768, "bos_token_id": None, "eos_token_id": None},
    "qwen3": {
        "max_position_embeddings": 32768,
        "bos_token_id": None,
        "eos_token_id": None,
        "head_dim": 128,
    },
    "gemma": {
        "max_position_embeddings": 8192,
        "bos_token_id": 2,
        "eos_token_id": 1,
        "head_dim": 256,
        "tie_word_embeddings": True,
        "hidden_act": "gelu_pytorch_tanh",
    },
}


def model_config(path: str, max_seq_len=None) -> dict:
    """ModelArgs keyword arguments from a directory's config.json, transformers 4.x style (rope_theta, rope_scaling)
    or 5.x (rope_parameters); its family (model_type) picks the options of model.py. What the model cannot compute
    exactly is an error naming the field (the caller: the file)."""
    config = _read_config(path)

    def check(field, ok, why):
        if not ok:
            raise ValueError(f"{field}={config.get(field)!r} is not supported: {why}")

    model_type = config.get("model_type")
    check("model_type", model_type in FAMILIES, f"the families are {', '.join(FAMILIES)}")
    for field in (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "vocab_size",
    ):
        if field not in config:
            raise ValueError(f"missing {field!r}")
    defaults = _CONFIG_DEFAULTS[model_type]

    def value(field, default=None):
        return config.get(field, defaults.get(field, default))

    # GemmaConfig reads the released configs' "gelu" as the tanh GELU; 4.x's GemmaMLP read hidden_activation
    activation = value("hidden_act", "silu")
    if model_type == "gemma":
        activation = "gelu_pytorch_tanh" if activation == "gelu" else activation
        check(
            "hidden_activation",
            value("hidden_activation") in (None, activation),
            "it differs from hidden_act",
        )
    check(
        "hidden_act",
        activation in ("silu", "gelu_pytorch_tanh"),
        "the gate is silu or the tanh GELU",
    )
    if model_type != "qwen2":  # Qwen2's class has biases on q, k, v whatever the file says
        check(
            "attention_bias",
            not config.get("attention_bias"),
            "the attention projections have no bias",
        )
    check("mlp_bias", not config.get("mlp_bias"), "the projections have no bias")
    check(
        "quantization_config",
        config.get("quantization_config") is None,
        "load an unquantized checkpoint",
    )
    for field in ("attn_logit_softcapping", "final_logit_softcapping"):  # Gemma 2's
        check(field, config.get(field) is None, "no soft-capping")
    check(
        "use_bidirectional_attention",
        not config.get("use_bidirectional_attention"),
        "the attention is causal",
    )
    if model_type in ("qwen2", "qwen3") and config.get("use_sliding_window"):
        # Qwen2Config: the layers from max_window_layers on (or those layer_types names) attend in sliding_window
        later_layers = config["num_hidden_layers"] > config.get("max_window_layers", 28)
        windowed = (
            "sliding_attention" in config["layer_types"]
            if config.get("layer_types")
            else later_layers
        )
        check(
            "use_sliding_window",
            not windowed or value("sliding_window", 4096) is None,
            "no window in Qwen",
        )
    # RoPE: 4.x reads rope_theta and rope_scaling, 5.x rope_parameters, or rope_scaling where it is set
    for field in ("rope_scaling", "rope_parameters"):
        rope = config.get(field) or {}
        kind = rope.get("rope_type", rope.get("type", "default"))
        check(
            field,
            kind in ("default", "llama3"),
            "RoPE is plain or Llama 3.1's scaling (rope_type 'llama3')",
        )
        check(field, rope.get("partial_rotary_factor", 1.0) == 1.0, "RoPE rotates whole heads")
    field = "rope_scaling" if config.get("rope_scaling") else "rope_parameters"
    rope = config.get(field) or {}
    max_positions = value("max_position_embeddings")
    scaling = {}
    if rope.get("rope_type", rope.get("type")) == "llama3":
        for key in ("factor", "low_freq_factor", "high_freq_factor"):
            if key not in rope:
                raise ValueError(f"{field}: rope_type 'llama3' without {key!r}")
        scaling = dict(
            rope_scaling_factor=rope["factor"],
            rope_low_freq_factor=rope["low_freq_factor"],
            rope_high_freq_factor=rope["high_freq_factor"],
            rope_original_max_seq_len=rope.get("original_max_position_embeddings", max_positions),
        )
    n_heads = config["num_attention_heads"]
    return dict(
        dim=config["hidden_size"],
        n_layers=config["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads") or n_heads,
        vocab_size=config["vocab_size"],
        hidden_dim=config["intermediate_size"],
        norm_eps=config.get("rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta", config.get("rope_theta", 10000.0)),
        **scaling,
        max_seq_len=max_seq_len or max_positions,
        tie_embeddings=value("tie_word_embeddings", False),
        head_dim=value("head_dim") or config["hidden_size"] // n_heads,
        model_type=model_type,
        sliding_window=config.get("sliding_window") if model_type in ("llama", "mistral") else None,
        bos_token_id=value("bos_token_id", 1),
        eos_token_id=value("eos_token_id", 2),
        init_std=config.get("initializer_range", 0.02),
        ffn_activation=activation,
        **family_options(model_type),
    )


def hf_config(args, dtype) -> dict:
    """A config.json that transformers 4.x and 5.x (and so vLLM) read as the model_type's class with our options."""
    dtype_name = str(dtype).removeprefix("torch.")
    scaling = (
        None
        if args.rope_scaling_factor is None
        else {
            "rope_type": "llama3",
            "factor": args.rope_scaling_factor,
            "low_freq_factor": args.rope_low_freq_factor,
            "high_freq_factor": args.rope_high_freq_factor,
            "original_max_position_embeddings": args.rope_original_max_seq_len,
        }
    )
    # what each config class reads beyond LlamaConfig's fields (Qwen's window: never in use)
    family_fields = {
        "llama": {"attention_bias": False, "mlp_bias": False},
        "mistral": {"sliding_window": args.sliding_window},
        "qwen2": {"use_sliding_window": False, "sliding_window": None},
        "qwen3": {"use_sliding_window": False, "sliding_window": None, "attention_bias": False},
        # 4.x's GemmaMLP reads this
        "gemma": {"attention_bias": False, "hidden_activation": args.ffn_activation},
    }[args.model_type]
    return {
        "architectures": [FAMILIES[args.model_type][0]],
        "model_type": args.model_type,
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "hidden_act": args.ffn_activation,
        "max_position_embeddings": args.max_seq_len,
        "rms_norm_eps": args.norm_eps,
        # 4.x
        "rope_theta": args.rope_theta,
        "rope_scaling": scaling,
        # 5.x
        "rope_parameters": {**(scaling or {"rope_type": "default"}), "rope_theta": args.rope_theta},
        "tie_word_embeddings": args.tie_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": args.init_std,
        "bos_token_id": args.bos_token_id,
        "eos_token_id": args.eos_token_id,
        "use_cache": True,
        # 4.x, 5.x
        "torch_dtype": dtype_name,
        "dtype": dtype_name,
        **family_fields,
    }


def load_state_dict(path: str, args, shapes: dict, device=None, dtype=None) -> dict:
    """A checkpoint's tensors under our names, of `shapes` (ours -> shape), read onto `device` in `dtype` (None: the
    config's); tied, "output.weight" is the embedding. A missing, unexpected or mis-shaped tensor: an error."""
    if dtype is None:
        config = _read_config(path)
        dtype = _DTYPES.get(config.get("dtype") or config.get("torch_dtype"), torch.float32)
    ours_by_hf = {theirs: ours for ours, theirs in hf_names(args).items()}
    device = str(torch.device(device if device is not None else "cpu"))
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(
            f"{path}: neither model.safetensors nor its .index.json (safetensors only)"
        )
    state_dict = {}
    for file in files:
        file_path = os.path.join(path, file)
        with safetensors.safe_open(file_path, framework="pt", device=device) as f:
            for name in f.keys():
                if name.endswith("rotary_emb.inv_freq") or (
                    name == "lm_head.weight" and args.tie_embeddings
                ):
                    # a buffer old checkpoints store (we recompute it); a copy of the tied matrix
                    continue
                if name not in ours_by_hf:
                    raise ValueError(f"{file_path}: unexpected tensor {name!r}")
                ours, tensor = ours_by_hf[name], f.get_tensor(name)
                if tensor.shape != shapes[ours]:
                    raise ValueError(
                        f"{file_path}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                        f"config.json implies {tuple(shapes[ours])}"
                    )
                state_dict[ours] = tensor.to(dtype)
    if missing := [theirs for theirs, ours in ours_by_hf.items() if ours not in state_dict]:
        raise ValueError(
            f"{path}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} in {files}"
        )
    if args.tie_embeddings:
        state_dict["output.weight"] = state_dict["tok_embeddings.weight"]
    return state_dict


def save_state_dict(
    state_dict: dict, args, path: str, dtype=None, max_shard_bytes: int = 5 * 10**9
):
    """Write `state_dict` (our names, full tensors) as an HF checkpoint directory, via a temporary directory beside
    `path` moved in only when complete: a failure leaves a previous save intact. Other files in `path` are kept."""
    # a tied matrix once
    tensors = [(theirs, state_dict[ours]) for ours, theirs in hf_names(args).items()]
    dtype = dtype or tensors[0][1].dtype
    shards, shard_bytes = [[]], 0
    for name, tensor in tensors:
        nbytes = tensor.numel() * dtype.itemsize
        if shards[-1] and shard_bytes + nbytes > max_shard_bytes:
            shards, shard_bytes = shards + [[]], 0
        shards[-1].append((name, tensor))
        shard_bytes += nbytes
    n = len(shards)
    files = (
        ["model.safetensors"]
        if n == 1
        else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    )
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=os.path.dirname(path))
    try:
        for file, shard in zip(files, shards):
            safetensors.torch.save_file(
                {name: t.detach().to("cpu", dtype).contiguous() for name, t in shard},
                os.path.join(tmp, file),
                metadata={"format": "pt"},
            )
        if n > 1:
            weight_map = {name: file for file, shard in zip(files, shards) for name, _ in shard}
            write_json(
                os.path.join(tmp, "model.safetensors.index.json"),
                {
                    "metadata": {"total_size": sum(t.numel() * dtype.itemsize for _, t in tensors)},
                    "weight_map": weight_map,
                },
            )
        write_json(os.path.join(tmp, "config.json"), hf_config(args, dtype))
        os.makedirs(path, exist_ok=True)
        written = sorted(os.listdir(tmp), key=lambda name: name == "config.json")  # config last
        for name in written:
            os.replace(os.path.join(tmp, name), os.path.join(path, name))
        for name in os.listdir(path):  # weights of an earlier save with another sharding
            if (
                name.startswith("model")
                and name.endswith((".safetensors", ".index.json"))
                and name not in written
            ):
                os.remove(os.path.join(path, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.write("\n")
