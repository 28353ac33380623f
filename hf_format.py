"""Hugging Face checkpoints as plain values for model.py: config.json <-> ModelArgs keyword arguments, and the
safetensors tensors under our parameter names, read and written (sharded, atomically)."""
import json
import os
import shutil
import tempfile

import safetensors
import safetensors.torch
import torch


_LAYER_NAMES = {  # our name -> HF name, per layer
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj", "feed_forward.w3": "mlp.up_proj"}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def hf_names(args) -> dict:
    """Our parameter name -> HF tensor name, for the tensors an HF checkpoint stores (a tied lm_head isn't)."""
    names = {"tok_embeddings.weight": "model.embed_tokens.weight",
             **{f"layers.{i}.{ours}.weight": f"model.layers.{i}.{theirs}.weight"
                for i in range(args.n_layers) for ours, theirs in _LAYER_NAMES.items()},
             "norm.weight": "model.norm.weight"}
    return names if args.tie_embeddings else names | {"output.weight": "lm_head.weight"}


def _read_config(path: str) -> dict:
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file}: not found (expected a Hugging Face LLaMA/Mistral checkpoint directory)")
    with open(file) as f:
        return json.load(f)


def model_config(path: str, max_seq_len=None) -> dict:
    """ModelArgs keyword arguments from a directory's config.json, transformers 4.x style (rope_theta) or 5.x
    (rope_parameters): what the model cannot compute exactly is an error naming the field (the caller: the file)."""
    config = _read_config(path)

    def check(field, ok, why):
        if not ok:
            raise ValueError(f"{field}={config.get(field)!r} is not supported: {why}")
    check("hidden_act", config.get("hidden_act", "silu") == "silu", "the feed-forward is SwiGLU (silu)")
    check("attention_bias", not config.get("attention_bias"), "the projections have no bias")
    check("mlp_bias", not config.get("mlp_bias"), "the projections have no bias")
    check("quantization_config", config.get("quantization_config") is None, "load an unquantized checkpoint")
    rope_theta = config.get("rope_theta", 10000.0)
    for field in ("rope_scaling", "rope_parameters"):  # 4.x puts scaling in rope_scaling, 5.x in rope_parameters
        rope = config.get(field) or {}
        check(field, rope.get("rope_type", rope.get("type", "default")) == "default", "only default RoPE (no scaling)")
        rope_theta = rope.get("rope_theta", rope_theta)
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        if field not in config:
            raise ValueError(f"missing {field!r}")
    n_heads, model_type = config["num_attention_heads"], config.get("model_type")
    max_positions = config.get("max_position_embeddings", 2048 if model_type == "llama" else 131072)
    return dict(
        dim=config["hidden_size"], n_layers=config["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads") or n_heads, vocab_size=config["vocab_size"],
        hidden_dim=config["intermediate_size"], norm_eps=config.get("rms_norm_eps", 1e-6), rope_theta=rope_theta,
        max_seq_len=max_seq_len or max_positions, tie_embeddings=config.get("tie_word_embeddings", False),
        head_dim=config.get("head_dim") or config["hidden_size"] // n_heads, model_type=model_type,
        sliding_window=config.get("sliding_window"), bos_token_id=config.get("bos_token_id", 1),
        eos_token_id=config.get("eos_token_id", 2), init_std=config.get("initializer_range", 0.02))


def hf_config(args, dtype) -> dict:
    """A config.json that transformers 4.x and 5.x (and so vLLM) read as LlamaConfig / MistralConfig."""
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "architectures": ["MistralForCausalLM" if args.model_type == "mistral" else "LlamaForCausalLM"],
        "model_type": args.model_type, "vocab_size": args.vocab_size, "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim, "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim, "hidden_act": "silu",
        "max_position_embeddings": args.max_seq_len, "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta, "rope_scaling": None,                             # 4.x
        "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta},      # 5.x
        "tie_word_embeddings": args.tie_embeddings, "attention_dropout": 0.0, "initializer_range": args.init_std,
        "bos_token_id": args.bos_token_id, "eos_token_id": args.eos_token_id, "use_cache": True,
        "torch_dtype": dtype_name, "dtype": dtype_name,                                  # 4.x, 5.x
        **({"sliding_window": args.sliding_window} if args.model_type == "mistral" else  # MistralConfig: a window,
           {"attention_bias": False, "mlp_bias": False}),                               # LlamaConfig: biases
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
        raise FileNotFoundError(f"{path}: neither model.safetensors nor its .index.json (safetensors only)")
    state_dict = {}
    for file in files:
        file_path = os.path.join(path, file)
        with safetensors.safe_open(file_path, framework="pt", device=device) as f:
            for name in f.keys():
                if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and args.tie_embeddings):
                    continue  # a buffer old checkpoints store (we recompute it); a copy of the tied matrix
                if name not in ours_by_hf:
                    raise ValueError(f"{file_path}: unexpected tensor {name!r}")
                ours, tensor = ours_by_hf[name], f.get_tensor(name)
                if tensor.shape != shapes[ours]:
                    raise ValueError(f"{file_path}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                                     f"config.json implies {tuple(shapes[ours])}")
                state_dict[ours] = tensor.to(dtype)
    if missing := [theirs for theirs, ours in ours_by_hf.items() if ours not in state_dict]:
        raise ValueError(f"{path}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} in {files}")
    if args.tie_embeddings:
        state_dict["output.weight"] = state_dict["tok_embeddings.weight"]
    return state_dict


def save_state_dict(state_dict: dict, args, path: str, dtype=None, max_shard_bytes: int = 5 * 10**9):
    """Write `state_dict` (our names, full tensors) as an HF checkpoint directory, via a temporary directory beside
    `path` moved in only when complete: a failure leaves a previous save intact. Other files in `path` are kept."""
    tensors = [(theirs, state_dict[ours]) for ours, theirs in hf_names(args).items()]  # a tied matrix once
    dtype = dtype or tensors[0][1].dtype
    shards, shard_bytes = [[]], 0
    for name, tensor in tensors:
        nbytes = tensor.numel() * dtype.itemsize
        if shards[-1] and shard_bytes + nbytes > max_shard_bytes:
            shards, shard_bytes = shards + [[]], 0
        shards[-1].append((name, tensor))
        shard_bytes += nbytes
    n = len(shards)
    files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=os.path.dirname(path))
    try:
        for file, shard in zip(files, shards):
            safetensors.torch.save_file({name: t.detach().to("cpu", dtype).contiguous() for name, t in shard},
                                        os.path.join(tmp, file), metadata={"format": "pt"})
        if n > 1:
            weight_map = {name: file for file, shard in zip(files, shards) for name, _ in shard}
            write_json(os.path.join(tmp, "model.safetensors.index.json"), {"metadata": {
                "total_size": sum(t.numel() * dtype.itemsize for _, t in tensors)}, "weight_map": weight_map})
        write_json(os.path.join(tmp, "config.json"), hf_config(args, dtype))
        os.makedirs(path, exist_ok=True)
        written = sorted(os.listdir(tmp), key=lambda name: name == "config.json")  # config last
        for name in written:
            os.replace(os.path.join(tmp, name), os.path.join(path, name))
        for name in os.listdir(path):  # weights of an earlier save with another sharding
            if name.startswith("model") and name.endswith((".safetensors", ".index.json")) and name not in written:
                os.remove(os.path.join(path, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.write("\n")
