"""Hugging Face checkpoints as plain values (config dicts, tensors under our names) for model.py; a checkpoint's
tokenizer; `export_hf`: a directory transformers and vLLM serve as it is. Our own tokenizer.json, because transformers
5 cannot convert tokenizer.model without protobuf and its LlamaTokenizer's Metaspace would tokenize leading spaces
unlike sentencepiece and our training data. It mirrors sentencepiece's BPE: a Prepend normalizer (the dummy prefix,
per text between special tokens), spaces as "▁", merges ranked by the score of the piece they make. Known difference:
<|end_of_turn|> (or <s>, </s>) in content is text to us but the special id to Hugging Face tokenizers (vLLM)."""
import json
import os
import shutil
import tempfile

import safetensors
import safetensors.torch
import sentencepiece as spm
import torch

from chat_readers import EXPERT_CONDITION
from tokenizing import EOT_TEXT, Tokenizer

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
            _write_json(os.path.join(tmp, "model.safetensors.index.json"), {"metadata": {
                "total_size": sum(t.numel() * dtype.itemsize for _, t in tensors)}, "weight_map": weight_map})
        _write_json(os.path.join(tmp, "config.json"), hf_config(args, dtype))
        os.makedirs(path, exist_ok=True)
        written = sorted(os.listdir(tmp), key=lambda name: name == "config.json")  # config last
        for name in written:
            os.replace(os.path.join(tmp, name), os.path.join(path, name))
        for name in os.listdir(path):  # weights of an earlier save with another sharding
            if name.startswith("model") and name.endswith((".safetensors", ".index.json")) and name not in written:
                os.remove(os.path.join(path, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.write("\n")


def checkpoint_tokenizer(model_dir: str, vocab_size: int, path: str | None = None) -> Tokenizer:
    """A checkpoint's tokenizer: `path` (--tokenizer) or its own tokenizer.model. <|end_of_turn|> keeps the id the
    directory gives it (openchat_3.5: 32000), else the row after the pieces. vocab_size must fit: pieces + added ids."""
    path = path or os.path.join(model_dir, "tokenizer.model")
    added = {}  # text -> id
    for name in ("added_tokens.json", "tokenizer_config.json"):
        file = os.path.join(model_dir, name)
        if os.path.isfile(file):
            try:
                with open(file, encoding="utf-8") as f:
                    config = json.load(f)
                added.update({text: int(i) for text, i in config.items()} if name == "added_tokens.json" else
                             {t["content"]: int(i) for i, t in config.get("added_tokens_decoder", {}).items()})
            except (ValueError, TypeError, KeyError, AttributeError) as e:
                raise ValueError(f"{file}: unreadable added tokens ({type(e).__name__}: {str(e)[:80]})") from None
    tokenizer = Tokenizer(path, added.get(EOT_TEXT))
    n_pieces = tokenizer.sp.get_piece_size()
    if not n_pieces <= vocab_size <= max([n_pieces, *(i + 1 for i in added.values())]):
        raise ValueError(f"{path}: the tokenizer has {n_pieces} pieces but {model_dir}/config.json has "
                         f"vocab_size={vocab_size}: not this model's tokenizer (pass its own with --tokenizer)")
    return tokenizer


def chat_template(condition):
    """data.template in Jinja (system: no prefix); `condition` per request (vLLM: chat_template_kwargs), else ours."""
    default = condition.replace("\\", "\\\\").replace("'", "\\'")  # inside a Jinja string literal
    return ("{% set condition = condition if condition is defined and condition is not none else '" + default + "' %}"
            "{% set prefix = condition + ' ' if condition else '' %}{{ bos_token }}{% for message in messages %}"
            "{% if message['role'] == 'system' %}{{ message['content'] + '" + EOT_TEXT + "' }}"
            "{% else %}{{ prefix + message['role'] | title + ': ' + message['content'] + '" + EOT_TEXT + "' }}"
            "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ prefix + 'Assistant:' }}{% endif %}")


def _protobuf_fields(buf):
    """{field number: last value} of one protobuf message, varints as int, the rest as bytes (no protobuf needed)."""
    def varint(i):
        value, shift = 0, 0
        while buf[i] & 0x80:  # 7 bits a byte, low first; the last byte has the top bit clear
            value, shift, i = value | (buf[i] & 0x7F) << shift, shift + 7, i + 1
        return value | buf[i] << shift, i + 1
    out, i = {}, 0
    while i < len(buf):
        key, i = varint(i)
        wire_type = key & 7
        if wire_type == 0:
            out[key >> 3], i = varint(i)
            continue
        size, i = varint(i) if wire_type == 2 else ({1: 8, 5: 4}[wire_type], i)  # 8 or 4 bytes (no groups here)
        out[key >> 3], i = buf[i:i + size], i + size
    return out


def sentencepiece_settings(model_path):
    """The model type and normalizer settings of a sentencepiece model file (sentencepiece_model.proto numbers)."""
    with open(model_path, "rb") as f:
        model = _protobuf_fields(f.read())
    trainer, normalizer = _protobuf_fields(model.get(2, b"")), _protobuf_fields(model.get(3, b""))
    return {"model_type": {1: "unigram", 2: "bpe", 3: "word", 4: "char"}.get(trainer.get(3, 1), "unknown"),
            "byte_fallback": bool(trainer.get(35, 0)), "normalizer": normalizer.get(1, b"nmt_nfkc").decode(),
            "precompiled_charsmap": normalizer.get(2, b""), "add_dummy_prefix": bool(normalizer.get(3, 1)),
            "remove_extra_whitespaces": bool(normalizer.get(4, 1)), "escape_whitespaces": bool(normalizer.get(5, 1))}


def bpe_merges(sp):
    """Merges, best first, for tokenizers' BPE to split as sentencepiece's BPE does (it merges the adjacent pair that
    makes the highest-scoring piece): every split of a normal piece into two normal pieces, ranked by that score. On
    ties sentencepiece merges the leftmost pair, tokenizers by rank: Mistral's runs of spaces, see _space_run_merges."""
    normal = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())
              if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i))}
    score = {p: sp.get_score(i) for p, i in normal.items()}
    runs = sorted(len(p) for p in normal if set(p) == {"▁"})
    tied_runs = len(runs) > 2 and len({score["▁" * k] for k in runs if k > 1}) == 1
    # (-score of the merged piece, rank among equal scores, left, right)
    merges = [(-score[p], 0, p[:k], p[k:]) for p in normal if not (tied_runs and set(p) == {"▁"})
              for k in range(1, len(p)) if p[:k] in normal and p[k:] in normal]
    if tied_runs:
        merges += [(-score["▁" * (a + b)], rank, "▁" * a, "▁" * b)
                   for rank, (a, b) in enumerate(_space_run_merges(set(runs)))]
    merges.sort(key=lambda m: (m[0], m[1], normal[m[2]], normal[m[3]]))
    return [[left, right] for _, _, left, right in merges]


def _space_run_merges(lengths):
    """Ranked (left, right) lengths for runs of "▁" whose pieces tie (Mistral's "▁" * k, k = 2..14 and 16, all -1e9:
    merged last, when a run stands alone). sentencepiece grows a run from the left: n spaces become 16s, then the rest
    in one piece (15: 14 + 1). tokenizers' BPE does the same with these ranks: first equal halves 1+1 .. 8+8 (pairing
    from the left: 16s, then the rest's binary digits, largest first), then the digits joined from the left (8+4, +2,
    +1). tests/test_hf.py checks every run length against sentencepiece."""
    merges, half = [], 1
    while 2 * half in lengths:
        merges.append((half, half))
        half *= 2
    digit = half // 2
    while digit >= 1:
        merges += [(left, digit) for left in range(2 * digit, half, 2 * digit)
                   if left in lengths and left + digit in lengths]
        digit //= 2
    return merges


def _special(text):
    return dict(content=text, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)


def tokenizer_json(model_path, eot_id):
    """A tokenizers-library tokenizer.json equivalent to the sentencepiece model plus <|end_of_turn|> = eot_id."""
    sp = spm.SentencePieceProcessor(model_file=model_path)  # its own short error for a file that is not a model
    settings = sentencepiece_settings(model_path)
    charsmap = len(settings.pop("precompiled_charsmap"))  # bytes (~240 KB for nmt_nfkc): only its size in messages
    settings["normalizer"] += f" with a {charsmap / 1e3:.0f} KB precompiled_charsmap" if charsmap else ""
    wanted = dict(model_type="bpe", normalizer="identity", remove_extra_whitespaces=False, escape_whitespaces=True)
    bad = [f"{k} {settings[k]} (need {v})" for k, v in wanted.items() if settings[k] != v]
    if bad:
        raise ValueError(f"{model_path}: tokenizer.json cannot reproduce this sentencepiece model: {'; '.join(bad)}")
    n_pieces = sp.get_piece_size()
    if eot_id != n_pieces:
        raise ValueError(f"{model_path}: {EOT_TEXT} id {eot_id} (need {n_pieces}, the id right after the pieces)")
    if min(sp.bos_id(), sp.eos_id()) < 0:
        raise ValueError(f"{model_path}: bos_id {sp.bos_id()}, eos_id {sp.eos_id()} (need both pieces)")
    pieces = [sp.id_to_piece(i) for i in range(n_pieces)]
    added = [(i, pieces[i]) for i in range(n_pieces) if sp.is_control(i) or sp.is_unknown(i)] + [(eot_id, EOT_TEXT)]
    prefix = [{"type": "Prepend", "prepend": "▁"}] if settings["add_dummy_prefix"] else []
    normalizers = prefix + [{"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]
    decoders = [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"},
                {"type": "Fuse"}, *([{"type": "Strip", "content": " ", "start": 1, "stop": 0}] if prefix else [])]
    bos_piece = pieces[sp.bos_id()]
    bos, text = {"SpecialToken": {"id": bos_piece, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, **_special(t)} for i, t in added],
        "normalizer": {"type": "Sequence", "normalizers": normalizers}, "pre_tokenizer": None,
        "post_processor": {  # tokenizer(text) starts with BOS, like sentencepiece-based LLaMA tokenizers
            "type": "TemplateProcessing", "single": [bos, text],
            "pair": [bos, text, bos, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos_piece: {"id": bos_piece, "ids": [sp.bos_id()], "tokens": [bos_piece]}}},
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": None, "unk_token": pieces[sp.unk_id()], "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": settings["byte_fallback"],
                  "ignore_merges": False, "vocab": {p: i for i, p in enumerate(pieces)}, "merges": bpe_merges(sp)},
    }


def export_hf(model, tokenizer, out_dir, condition=EXPERT_CONDITION):
    """Write `model` (a model.Transformer: its save_pretrained and args) and `tokenizer` (a tokenizer.Tokenizer) as
    a Hugging Face model directory. `condition`: the template's default class (the expert's; "" for plain SFT)."""
    if model.args.vocab_size < tokenizer.vocab_size:  # more rows are fine (openchat_3.5: 32002 rows, 32001 ids)
        raise ValueError(f"model vocab_size {model.args.vocab_size} (need >= the tokenizer's {tokenizer.vocab_size})")
    tok_json = tokenizer_json(tokenizer.model_path, tokenizer.eot_id)  # checks the tokenizer before writing anything
    model.save_pretrained(out_dir)  # makes out_dir
    shutil.copyfile(tokenizer.model_path, os.path.join(out_dir, "tokenizer.model"))
    _write_json(os.path.join(out_dir, "tokenizer.json"), tok_json)
    sp = tokenizer.sp
    bos, eos, unk = sp.id_to_piece(sp.bos_id()), sp.id_to_piece(sp.eos_id()), sp.id_to_piece(sp.unk_id())
    special = {"bos_token": bos, "eos_token": EOT_TEXT, "unk_token": unk}
    _write_json(os.path.join(out_dir, "special_tokens_map.json"), special)
    _write_json(os.path.join(out_dir, "tokenizer_config.json"), {
        "tokenizer_class": "PreTrainedTokenizerFast",  # load tokenizer.json as it is (see the module docstring)
        **special, "pad_token": None, "add_bos_token": True, "add_eos_token": False,
        "clean_up_tokenization_spaces": False, "model_max_length": model.args.max_seq_len,
        "added_tokens_decoder": {str(i): _special(text) for i, text in [
            (sp.unk_id(), unk), (sp.bos_id(), bos), (sp.eos_id(), eos), (tokenizer.eot_id, EOT_TEXT)]},
        "chat_template": chat_template(condition),
        "crlft_condition": condition,  # read by sample.py as its default condition
    })
    _write_json(os.path.join(out_dir, "generation_config.json"), {  # OpenChat's serving defaults
        "bos_token_id": sp.bos_id(), "eos_token_id": [tokenizer.eot_id, sp.eos_id()],  # the turn's end, and </s>
        "do_sample": True, "temperature": 0.7, "top_p": 1.0})
    return out_dir
