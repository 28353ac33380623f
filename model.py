"""A LLaMA / Mistral decoder, written to be read, and its Hugging Face checkpoint format.

Pre-norm blocks of RMSNorm -> grouped-query attention with rotary embeddings -> RMSNorm -> SwiGLU, as in
LLaMA-2 and Mistral-7B, with the Hugging Face tensor layout (RoPE rotates the two halves of each head,
`rotate_half`), so HF checkpoints load without permuting anything.

Three ways through `Transformer.forward`:
- training: a packed row of conversations (cu_seqlens, position_ids restarting at 0) or a plain (B, T)
  batch, attention by `kernels.attention.flash_attention`; with targets the loss comes from the fused
  linear cross-entropy, so the (tokens x vocab) logits never exist at once;
- logits: the same without targets, (B, T, V) in fp32;
- generation: `setup_kv_cache` once, then `forward(tokens, start_pos=p)` for the prompt and each new token.

The model knows nothing of FSDP or activation checkpointing: train.py wraps `model.layers[i]`. RoPE cos/sin
are computed in forward from position_ids, so there are no buffers and meta-device init stays simple.
The vocabulary is not padded to a multiple of anything (`grow_vocab` adds exactly the rows asked for).
"""
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels.attention import flash_attention
from kernels.cross_entropy import fused_linear_cross_entropy


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None          # None: = n_heads (plain multi-head attention)
    vocab_size: int = 32000
    hidden_dim: Optional[int] = None          # SwiGLU width; None: LLaMA's rule below
    multiple_of: int = 256                    # LLaMA's rule: 8/3 * dim, times ffn_dim_multiplier,
    ffn_dim_multiplier: Optional[float] = None  # rounded up to a multiple of multiple_of
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096                   # longest sequence (conversation, KV cache) the model takes
    tie_embeddings: bool = False              # lm_head shares the embedding matrix
    head_dim: Optional[int] = None            # None: dim // n_heads
    init_std: float = 0.02                    # std of the normal init of every matrix (HF's initializer_range)
    sliding_window: Optional[int] = None      # Mistral: each token sees itself and the window - 1 before it
    # Carried only into save_pretrained's config.json:
    model_type: str = "llama"                 # "llama" or "mistral"
    bos_token_id: Optional[int] = 1
    eos_token_id: Optional[int] = 2

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads
        if self.hidden_dim is None:
            hidden = int(2 * 4 * self.dim / 3)
            if self.ffn_dim_multiplier is not None:
                hidden = int(self.ffn_dim_multiplier * hidden)
            self.hidden_dim = self.multiple_of * math.ceil(hidden / self.multiple_of)
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(f"ModelArgs: n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.model_type not in ("llama", "mistral"):
            raise ValueError(f"ModelArgs: model_type={self.model_type!r}, expected 'llama' or 'mistral'")
        if self.sliding_window is not None and (type(self.sliding_window) is not int or self.sliding_window < 1
                                                or self.model_type != "mistral"):
            raise ValueError(f"ModelArgs: sliding_window={self.sliding_window!r}: a Mistral model's window is an "
                             "int >= 1 (None: none)")


PRESETS = {
    # The toy task of train.py's default run (2-digit addition; vocab_size is set from the toy tokenizer).
    # init_std 0.05, not 0.02: at 0.02 the C-RLFT run sat on the toy task's loss plateau for 500+ steps.
    "toy": ModelArgs(dim=128, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=121, max_seq_len=256, init_std=0.05),
    # CPU: the "19M LLaMA" (dim 256, 4 layers, 32k vocab); train.py sets vocab_size to its tokenizer's.
    "tiny": ModelArgs(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=32000, max_seq_len=1024),
    # GPU throughput tests: TinyLlama-1.1B's shape.
    "1b": ModelArgs(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, vocab_size=32000, hidden_dim=5632,
                    max_seq_len=4096),
    "llama2-7b": ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, max_seq_len=4096),  # hidden 11008
    "llama2-13b": ModelArgs(dim=5120, n_layers=40, n_heads=40, vocab_size=32000, max_seq_len=4096),  # 13824
    # Mistral-7B-v0.1 as released (vocab before <|end_of_turn|> is added).
    "mistral-7b": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=32000, hidden_dim=14336,
                            max_seq_len=32768, model_type="mistral", sliding_window=4096),
}


# ----------------------------------------------------------------------------- layers

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # In fp32, cast back before the weight, exactly as Hugging Face does (bf16 results then agree).
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(position_ids, head_dim: int, theta: float, dtype):
    """position_ids (B, T) -> cos, sin (B, T, head_dim), computed in fp32 and cast to the activations' dtype."""
    exponents = torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta ** exponents)                           # (head_dim/2,)
    angles = position_ids.float()[..., None] * inv_freq             # (B, T, head_dim/2)
    angles = torch.cat((angles, angles), dim=-1)                    # HF layout: halves, not interleaved pairs
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x, cos, sin):
    """x (B, T, H, D); cos, sin (B, T, D). Rotates the pairs (x[i], x[i + D/2])."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.window = args.sliding_window
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        # KV cache for generation, (B, max_seq_len, H_kv, D) each; plain attributes, not in the state dict.
        self.cache_k = self.cache_v = None

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen: int, start_pos: Optional[int] = None):
        B, T, _ = x.shape
        q = apply_rope(self.wq(x).view(B, T, self.n_heads, self.head_dim), cos, sin)     # (B, T, H, D)
        k = apply_rope(self.wk(x).view(B, T, self.n_kv_heads, self.head_dim), cos, sin)  # (B, T, H_kv, D)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        if start_pos is None:
            # Every row is one or more whole sequences: varlen attention over the flattened tokens.
            out = flash_attention(q.reshape(B * T, self.n_heads, self.head_dim),
                                  k.reshape(B * T, self.n_kv_heads, self.head_dim),
                                  v.reshape(B * T, self.n_kv_heads, self.head_dim),
                                  cu_seqlens, max_seqlen, window=self.window)           # (B*T, H, D)
        else:
            out = self._attend_with_cache(q, k, v, start_pos)                            # (B, T, H, D)
        return self.wo(out.reshape(B, T, self.n_heads * self.head_dim))

    def _attend_with_cache(self, q, k, v, start_pos: int):
        B, T = q.shape[:2]
        end = start_pos + T
        if end > self.cache_k.shape[1] or B > self.cache_k.shape[0]:
            raise ValueError(f"KV cache holds {tuple(self.cache_k.shape[:2])} (batch, positions); "
                             f"got batch {B} and positions up to {end}")
        self.cache_k[:B, start_pos:end] = k
        self.cache_v[:B, start_pos:end] = v
        first = 0 if self.window is None else max(start_pos - self.window + 1, 0)  # older keys: out of every window
        keys = self.cache_k[:B, first:end].transpose(1, 2)      # (B, H_kv, end - first, D)
        values = self.cache_v[:B, first:end].transpose(1, 2)
        mask = None
        if T > 1:  # a prompt chunk: query i sits at position start_pos + i and sees keys up to start_pos + i
            key_pos = torch.arange(first, end, device=q.device)
            query_pos = torch.arange(start_pos, end, device=q.device)[:, None]
            mask = key_pos <= query_pos                                                 # (T, end - first)
            if self.window is not None:
                mask &= key_pos > query_pos - self.window
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask,
                                             enable_gqa=self.n_kv_heads != self.n_heads)   # (B, H, T, D)
        return out.transpose(1, 2)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen: int, start_pos: Optional[int] = None):
        h = x + self.attention(self.attention_norm(x), cos, sin, cu_seqlens, max_seqlen, start_pos)
        return h + self.feed_forward(self.ffn_norm(h))


# ----------------------------------------------------------------------------- the model

class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.output_t, self._output_t_of = None, None  # (D, V) copy of output.weight for decoding, and of what

    def forward(self, tokens, position_ids=None, cu_seqlens=None, max_seqlen=None, targets=None,
                loss_weights=None, start_pos=None, last_only=False):
        """tokens (B, T). Returns logits (B, T, V) in fp32, or with targets (B, T) the pair
        (loss_sum, per_token_ce (B*T,)) with loss_sum = sum(loss_weights * CE): the caller normalises.

        Packed rows: cu_seqlens int32 (n+1,) over the B*T flattened tokens, position_ids (B, T) restarting
        at 0 per sequence, max_seqlen the longest sequence (an int, so no device sync here).
        Generation (after setup_kv_cache): start_pos = number of positions already in the cache;
        last_only=True returns the logits of the last position only, (B, 1, V) (a prompt needs no others).
        """
        B, T = tokens.shape
        device = tokens.device
        if start_pos is not None:
            if self.layers[0].attention.cache_k is None:
                raise RuntimeError("forward(start_pos=...) needs the KV cache: call setup_kv_cache first")
            if targets is not None:
                raise ValueError("targets are for training; the KV-cache path returns logits only")
            if position_ids is None:
                position_ids = torch.arange(start_pos, start_pos + T, device=device).expand(B, T)
        else:
            if position_ids is None:
                position_ids = torch.arange(T, device=device).expand(B, T)
            if cu_seqlens is None:  # a plain batch: B sequences of length T
                cu_seqlens = torch.arange(0, (B + 1) * T, T, dtype=torch.int32, device=device)
                max_seqlen = T
            elif max_seqlen is None:
                max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
            if max_seqlen > self.args.max_seq_len:
                raise ValueError(f"a sequence of {max_seqlen} tokens exceeds max_seq_len={self.args.max_seq_len}")

        h = self.tok_embeddings(tokens)                                             # (B, T, D)
        cos, sin = rope_cos_sin(position_ids, self.args.head_dim, self.args.rope_theta, h.dtype)
        for layer in self.layers:
            h = layer(h, cos, sin, cu_seqlens, max_seqlen, start_pos)
        h = self.norm(h)

        if targets is None:
            if last_only:
                h = h[:, -1:]                                                       # (B, 1, D)
            if start_pos is not None:  # generating: the (D, V) copy made by setup_kv_cache
                return (h @ self.output_t).float()                                  # (B, T, V)
            return self.output(h).float()                                           # (B, T, V)
        if loss_weights is None:  # plain language modelling: every token with a target counts once
            loss_weights = (targets != -100).float()
        # Inside forward on purpose: FSDP2 unshards the root's parameters (output.weight) only here.
        return fused_linear_cross_entropy(h.reshape(B * T, -1), self.output.weight, targets.reshape(-1),
                                          loss_weights.reshape(-1), return_per_token=True)

    # --------------------------------------------------------------- generation

    def setup_kv_cache(self, batch_size: int, max_seq_len: int, device=None, dtype=None):
        """Preallocate each layer's K/V cache, (batch_size, max_seq_len, n_kv_heads, head_dim)."""
        if max_seq_len > self.args.max_seq_len:
            raise ValueError(f"KV cache of {max_seq_len} positions exceeds the model's max_seq_len={self.args.max_seq_len}")
        weight = self.output.weight
        shape = (batch_size, max_seq_len, self.args.n_kv_heads, self.args.head_dim)
        for layer in self.layers:
            layer.attention.cache_k = torch.zeros(shape, device=device or weight.device, dtype=dtype or weight.dtype)
            layer.attention.cache_v = torch.zeros_like(layer.attention.cache_k)
        # Each decoding step reads the whole (V, D) output matrix for a row of logits. As a (D, V) copy,
        # `h @ output_t` ran 1.8x (D = 768) to 3.5x (D = 256) faster on this CPU than F.linear's GEMV over
        # (V, D) rows (32k vocabulary, one thread). Same numbers up to fp32 rounding. The copy costs memory
        # and a copy's time, so it is kept across generations and made again only when the weight changed
        # (moved, replaced, or updated in place: the version counter).
        of = (weight.data_ptr(), weight._version, weight.dtype)
        if self._output_t_of != of:
            self.output_t, self._output_t_of = weight.detach().t().contiguous(), of

    def clear_kv_cache(self):
        for layer in self.layers:
            layer.attention.cache_k = layer.attention.cache_v = None

    # --------------------------------------------------------------- parameters

    @torch.no_grad()
    def init_weights(self):
        """(Re)initialise every parameter: N(0, init_std) for matrices, ones for norms. Works after building on
        the meta device and `to_empty`."""
        if self.args.tie_embeddings and self.output.weight is not self.tok_embeddings.weight:
            self.output.weight = self.tok_embeddings.weight  # to_empty gives each module its own new Parameter
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=self.args.init_std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    @torch.no_grad()
    def grow_vocab(self, new_size: int):
        """Add rows to the embedding (and an untied lm_head), each new row the mean of the existing rows, as
        OpenChat initialised <|end_of_turn|>. Build the optimizer after this."""
        old_size = self.args.vocab_size
        if new_size < old_size:
            raise ValueError(f"grow_vocab: new_size={new_size} is smaller than vocab_size={old_size}")

        def grown(weight):
            new = torch.empty(new_size, weight.shape[1], device=weight.device, dtype=weight.dtype)
            new[:old_size] = weight
            new[old_size:] = weight.float().mean(0).to(weight.dtype)
            return nn.Parameter(new, requires_grad=weight.requires_grad)

        self.tok_embeddings.weight = grown(self.tok_embeddings.weight)
        self.tok_embeddings.num_embeddings = new_size
        self.output.weight = self.tok_embeddings.weight if self.args.tie_embeddings else grown(self.output.weight)
        self.output.out_features = new_size
        self.args = replace(self.args, vocab_size=new_size)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count (a tied matrix once); exclude_embeddings drops the input embedding table."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.tok_embeddings.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward) for MFU: 6 * N, N the parameters that do matmuls
        (everything but the embedding lookup; the lm_head counts even when tied), plus causal attention's
        QK^T and AV, 12 * n_layers * (n_heads * head_dim) * (keys a query sees on average): seq_len / 2, or
        W - W^2 / (2 seq_len) past a sliding window W. For packed rows seq_len is the (mean) conversation
        length, not the row length."""
        n = self.num_params(exclude_embeddings=True)
        if self.args.tie_embeddings:
            n += self.output.weight.numel()
        w = self.args.sliding_window
        keys = seq_len / 2 if w is None or seq_len <= w else w - w * w / (2 * seq_len)
        return 6 * n + 12 * self.args.n_layers * self.args.n_heads * self.args.head_dim * keys

    # --------------------------------------------------------------- Hugging Face checkpoints

    @classmethod
    def from_pretrained(cls, path: str, device=None, dtype=None, max_seq_len: Optional[int] = None):
        """Load a Hugging Face LLaMA or Mistral directory (config.json + safetensors). dtype None: the
        config's dtype. max_seq_len None: the config's max_position_embeddings."""
        config = read_hf_config(path)
        args = args_from_hf_config(config, max_seq_len, source=os.path.join(path, "config.json"))
        if dtype is None:
            dtype = _config_dtype(config)
        state_dict = load_hf_state_dict(path, device=device, dtype=dtype, args=args)
        with torch.device("meta"):
            model = cls(args)
        model.load_state_dict(state_dict, assign=True)
        if args.tie_embeddings:  # assign=True made two Parameters of one tensor: tie them again
            model.output.weight = model.tok_embeddings.weight
        return model

    def save_pretrained(self, path: str, dtype=None, max_shard_bytes: int = 5 * 10**9):
        """Write config.json + model.safetensors (sharded with an index above max_shard_bytes) in the format
        transformers and vLLM load. dtype None: the parameters' dtype."""
        save_hf_state_dict(self.state_dict(), self.args, path, dtype=dtype, max_shard_bytes=max_shard_bytes)


# ----------------------------------------------------------------------------- HF format (plain functions,
# so train.py can load into / save from an FSDP-sharded model too)

# our name -> HF name, per layer
_HF_LAYER_NAMES = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj", "feed_forward.w3": "mlp.up_proj",
    "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def hf_names(args: ModelArgs) -> dict:
    """Our parameter name -> HF tensor name, for the tensors an HF checkpoint stores (a tied lm_head isn't)."""
    names = {"tok_embeddings.weight": "model.embed_tokens.weight"}
    for i in range(args.n_layers):
        for ours, theirs in _HF_LAYER_NAMES.items():
            names[f"layers.{i}.{ours}.weight"] = f"model.layers.{i}.{theirs}.weight"
    names["norm.weight"] = "model.norm.weight"
    if not args.tie_embeddings:
        names["output.weight"] = "lm_head.weight"
    return names


def read_hf_config(path: str) -> dict:
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file}: not found (expected a Hugging Face LLaMA/Mistral checkpoint directory)")
    with open(file) as f:
        return json.load(f)


def _config_dtype(config: dict):
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return _DTYPES.get(name, torch.float32)


def args_from_hf_config(config: dict, max_seq_len: Optional[int] = None, source: str = "config.json") -> ModelArgs:
    """ModelArgs from an HF LlamaConfig/MistralConfig dict, in transformers 4.x style (rope_theta) or 5.x style
    (rope_parameters). What this model cannot compute exactly is an error naming the field."""
    def unsupported(field, why):
        raise ValueError(f"{source}: {field}={config.get(field)!r} is not supported: {why}")

    if config.get("model_type") not in ("llama", "mistral"):
        unsupported("model_type", "only 'llama' and 'mistral' models")
    if config.get("hidden_act", "silu") != "silu":
        unsupported("hidden_act", "the feed-forward is SwiGLU (silu)")
    for field in ("attention_bias", "mlp_bias"):
        if config.get(field):
            unsupported(field, "the projections have no bias")
    if config.get("quantization_config") is not None:
        unsupported("quantization_config", "load an unquantized checkpoint")
    rope_theta = config.get("rope_theta", 10000.0)
    for field in ("rope_scaling", "rope_parameters"):  # 4.x puts scaling in rope_scaling, 5.x in rope_parameters
        rope = config.get(field)
        if rope is not None:
            if rope.get("rope_type", rope.get("type", "default")) != "default":
                unsupported(field, "only the default RoPE (no scaling)")
            rope_theta = rope.get("rope_theta", rope_theta)
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        if field not in config:
            raise ValueError(f"{source}: missing {field!r}")

    max_positions = config.get("max_position_embeddings", 2048 if config["model_type"] == "llama" else 131072)
    seq_len = max_seq_len or max_positions
    window = config.get("sliding_window")
    if window is not None and (type(window) is not int or window < 1 or config["model_type"] != "mistral"):
        unsupported("sliding_window", "a Mistral model's window is an int >= 1 (or null)")
    n_heads = config["num_attention_heads"]
    return ModelArgs(
        dim=config["hidden_size"], n_layers=config["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads") or n_heads, vocab_size=config["vocab_size"],
        hidden_dim=config["intermediate_size"], norm_eps=config.get("rms_norm_eps", 1e-6), rope_theta=rope_theta,
        max_seq_len=seq_len, tie_embeddings=config.get("tie_word_embeddings", False),
        head_dim=config.get("head_dim") or config["hidden_size"] // n_heads, model_type=config["model_type"],
        sliding_window=window, bos_token_id=config.get("bos_token_id", 1), eos_token_id=config.get("eos_token_id", 2),
        init_std=config.get("initializer_range", 0.02))


def hf_config(args: ModelArgs, dtype) -> dict:
    """A config.json that transformers 4.x and 5.x (and so vLLM) read as LlamaConfig / MistralConfig."""
    dtype_name = str(dtype).removeprefix("torch.")
    config = {
        "architectures": ["MistralForCausalLM" if args.model_type == "mistral" else "LlamaForCausalLM"],
        "model_type": args.model_type,
        "vocab_size": args.vocab_size, "hidden_size": args.dim, "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim, "hidden_act": "silu",
        "max_position_embeddings": args.max_seq_len, "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta, "rope_scaling": None,                             # 4.x
        "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta},      # 5.x
        "tie_word_embeddings": args.tie_embeddings, "attention_dropout": 0.0, "initializer_range": args.init_std,
        "bos_token_id": args.bos_token_id, "eos_token_id": args.eos_token_id, "use_cache": True,
        "torch_dtype": dtype_name, "dtype": dtype_name,                                  # 4.x, 5.x
    }
    if args.model_type == "mistral":
        config["sliding_window"] = args.sliding_window
    else:
        config["attention_bias"] = config["mlp_bias"] = False
    return config


def _weight_files(path: str) -> list:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return sorted(set(json.load(f)["weight_map"].values()))
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return ["model.safetensors"]
    raise FileNotFoundError(f"{path}: neither model.safetensors nor model.safetensors.index.json "
                            "(only safetensors checkpoints are read)")


def load_hf_state_dict(path: str, device=None, dtype=None, args: Optional[ModelArgs] = None) -> dict:
    """Read an HF checkpoint's tensors, each straight onto `device` in `dtype`, keyed by our parameter names.
    When tied, "output.weight" is the same tensor as "tok_embeddings.weight" (so load_state_dict works).
    A missing, unexpected, duplicated or wrongly shaped tensor is an error naming it and its file."""
    from safetensors import safe_open

    if args is None:
        config = read_hf_config(path)
        args = args_from_hf_config(config, source=os.path.join(path, "config.json"))
    ours_by_hf = {theirs: ours for ours, theirs in hf_names(args).items()}
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in Transformer(args).state_dict().items()}
    device = str(torch.device(device if device is not None else "cpu"))

    state_dict, found_in = {}, {}
    for file in _weight_files(path):
        file_path = os.path.join(path, file)
        with safe_open(file_path, framework="pt", device=device) as f:
            for name in f.keys():
                if name.endswith("rotary_emb.inv_freq"):   # old checkpoints store this buffer; we recompute it
                    continue
                if name == "lm_head.weight" and args.tie_embeddings:  # a redundant copy of the tied matrix
                    continue
                if name not in ours_by_hf:
                    raise ValueError(f"{file_path}: unexpected tensor {name!r}")
                if name in found_in:
                    raise ValueError(f"{file_path}: tensor {name!r} also in {found_in[name]}")
                ours = ours_by_hf[name]
                tensor = f.get_tensor(name)
                if tensor.shape != shapes[ours]:
                    raise ValueError(f"{file_path}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                                     f"config.json implies {tuple(shapes[ours])}")
                state_dict[ours] = tensor.to(dtype) if dtype is not None else tensor
                found_in[name] = file_path
    missing = [name for name in ours_by_hf if name not in found_in]
    if missing:
        raise ValueError(f"{path}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                         f"in {_weight_files(path)}")
    if args.tie_embeddings:
        state_dict["output.weight"] = state_dict["tok_embeddings.weight"]
    return state_dict


def save_hf_state_dict(state_dict: dict, args: ModelArgs, path: str, dtype=None, max_shard_bytes: int = 5 * 10**9):
    """Write `state_dict` (our names, full tensors) as an HF checkpoint directory. Files are written to a temporary
    directory beside `path` and moved in only when all are complete, so a failure leaves a previous save intact;
    other files in `path` (a tokenizer, say) are kept."""
    from safetensors.torch import save_file

    tensors = [(theirs, state_dict[ours]) for ours, theirs in hf_names(args).items()]  # a tied matrix once
    dtype = dtype or tensors[0][1].dtype
    shards, shard_bytes = [[]], 0
    for name, tensor in tensors:
        nbytes = tensor.numel() * dtype.itemsize
        if shards[-1] and shard_bytes + nbytes > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append((name, tensor))
        shard_bytes += nbytes
    n = len(shards)
    files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]

    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=os.path.dirname(path))
    try:
        weight_map = {}
        for file, shard in zip(files, shards):
            save_file({name: t.detach().to("cpu", dtype).contiguous() for name, t in shard},
                      os.path.join(tmp, file), metadata={"format": "pt"})
            weight_map.update({name: file for name, _ in shard})
        if n > 1:
            index = {"metadata": {"total_size": sum(t.numel() * dtype.itemsize for _, t in tensors)},
                     "weight_map": weight_map}
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config(args, dtype), f, indent=2)

        os.makedirs(path, exist_ok=True)
        written = sorted(os.listdir(tmp), key=lambda name: name == "config.json")  # config last
        for name in written:
            os.replace(os.path.join(tmp, name), os.path.join(path, name))
        for name in os.listdir(path):  # weights of an earlier save with another sharding
            stale = name.startswith("model") and (name.endswith(".safetensors") or name.endswith(".index.json"))
            if stale and name not in written:
                os.remove(os.path.join(path, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
