"""A LLaMA / Mistral decoder, written to be read: pre-norm blocks of RMSNorm -> grouped-query attention with rotary
embeddings -> RMSNorm -> SwiGLU, in the Hugging Face layout (RoPE rotates the two halves of each head), so
hf_format.py's checkpoints load without permuting anything. `Transformer.forward` takes whole sequences (the loss
with targets, else logits); `Transformer.decode` generates with the KV cache; both share the blocks (`_hidden`).
It knows nothing of FSDP (train.py wraps `model.layers[i]`); RoPE is computed in forward: no buffers, a simple meta
init. Llama 3, Qwen2/2.5, Qwen3 and Gemma are the same model with a few options of ModelArgs (model_args.py, its second group),
each named for what it does; hf_format.model_config picks them from a checkpoint's family."""

import math
from dataclasses import replace
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import hf_format
from crlft_kernels.attention import flash_attention
from crlft_kernels.cross_entropy import fused_linear_cross_entropy
from model_args import ACTIVATIONS, ModelArgs


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, plus_one: bool = False):
        super().__init__()
        self.eps, self.plus_one = eps, plus_one
        self.weight = nn.Parameter(torch.zeros(dim) if plus_one else torch.ones(dim))

    def forward(self, x):  # normalised in fp32, as Hugging Face does (bf16 results then agree)
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        # Gemma: x * (1 + w) multiplied in fp32, then cast (transformers' GemmaRMSNorm)
        if self.plus_one:
            return (normed * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * normed.to(x.dtype)  # LLaMA: cast back before the weight (LlamaRMSNorm)


def rope_frequencies(args: ModelArgs, device):
    """The head_dim/2 rotation frequencies theta^(-2i/D) in fp32; with rope_scaling_factor, Llama 3.1's rescaling:
    frequencies whose wavelength 2*pi/f is shorter than original/high are kept, longer than original/low divided
    by the factor, and in between blended, f' = (1 - s) f / factor + s f, s = (original/wavelength - low) / (high - low)
    (s clamped to [0, 1] gives the other two cases). CRLFT_FACTS.md; transformers' _compute_llama3_parameters."""
    D = args.head_dim
    freqs = 1.0 / (
        args.rope_theta ** (torch.arange(0, D, 2, device=device, dtype=torch.int64).float() / D)
    )
    if args.rope_scaling_factor is None:
        return freqs
    low, high = args.rope_low_freq_factor, args.rope_high_freq_factor
    wavelength = 2 * math.pi / freqs
    s = ((args.rope_original_max_seq_len / wavelength - low) / (high - low)).clamp(0, 1)
    return (1 - s) * freqs / args.rope_scaling_factor + s * freqs


def rope_cos_sin(position_ids, freqs, dtype):
    """position_ids (B, T), freqs (D/2,) -> cos, sin (B, T, D), computed in fp32 and cast to the activations' dtype."""
    angles = position_ids.float()[..., None] * freqs  # (B, T, D/2)
    # HF layout: halves, not pairs
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x, cos, sin):
    """x (B, T, H, D); cos, sin (B, T, D). Rotates the pairs (x[i], x[i + D/2])."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.unsqueeze(2) + torch.cat((-x2, x1), dim=-1) * sin.unsqueeze(2)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.window = args.sliding_window
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=args.qkv_bias)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        if args.qk_norm:  # one weight of head_dim, shared by the heads
            self.q_norm = RMSNorm(args.head_dim, args.norm_eps, args.norm_plus_one)
            self.k_norm = RMSNorm(args.head_dim, args.norm_eps, args.norm_plus_one)
        else:
            self.q_norm = self.k_norm = nn.Identity()
        # for generation, (B, max_seq_len, H_kv, D): not in the state dict
        self.cache_k = self.cache_v = None

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen: int, start_pos: Optional[int] = None):
        B, T, _ = x.shape
        # (B, T, H, D)
        q = apply_rope(self.q_norm(self.wq(x).view(B, T, self.n_heads, self.head_dim)), cos, sin)
        # (B, T, H_kv, D)
        k = apply_rope(self.k_norm(self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)), cos, sin)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        # every row is one or more whole sequences: varlen attention over all B*T tokens
        if start_pos is None:
            out = flash_attention(
                q.flatten(0, 1),
                k.flatten(0, 1),
                v.flatten(0, 1),
                cu_seqlens,
                max_seqlen,
                # (B*T, H, D)
                window=self.window,
            )
        else:
            # (B, T, H, D)
            out = self._attend_with_cache(q, k, v, start_pos)
        return self.wo(out.reshape(B, T, self.n_heads * self.head_dim))

    def _attend_with_cache(self, q, k, v, start_pos: int):
        B, T = q.shape[:2]
        end = start_pos + T
        assert B <= self.cache_k.shape[0] and end <= self.cache_k.shape[1], (
            "larger than the KV cache: setup_kv_cache"
        )
        self.cache_k[:B, start_pos:end], self.cache_v[:B, start_pos:end] = k, v
        # older keys: out of every window
        first = 0 if self.window is None else max(start_pos - self.window + 1, 0)
        # (B, H_kv, keys, D)
        keys, values = (c[:B, first:end].transpose(1, 2) for c in (self.cache_k, self.cache_v))
        mask = None
        # a prompt chunk: query i sits at position start_pos + i and sees keys up to start_pos + i
        if T > 1:
            key_pos = torch.arange(first, end, device=q.device)
            # the last T positions
            query_pos = key_pos[start_pos - first :, None]
            # (T, end - first)
            mask = (key_pos <= query_pos) & (key_pos > query_pos - (self.window or end))
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            keys,
            values,
            attn_mask=mask,
            # (B, H, T, D)
            enable_gqa=self.n_kv_heads != self.n_heads,
        )
        return out.transpose(1, 2)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, activation: str):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up
        self.activation = ACTIVATIONS[activation]

    def forward(self, x):
        return self.w2(self.activation(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps, args.norm_plus_one)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps, args.norm_plus_one)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim, args.ffn_activation)

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen: int, start_pos: Optional[int] = None):
        h = x + self.attention(self.attention_norm(x), cos, sin, cu_seqlens, max_seqlen, start_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps, args.norm_plus_one)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # (D, V) copy of output.weight for decoding, and of what
        self.output_t, self._output_t_of = None, None

    def forward(
        self,
        tokens,
        position_ids=None,
        cu_seqlens=None,
        max_seqlen=None,
        targets=None,
        loss_weights=None,
    ):
        """Whole sequences: training, validation, scoring. tokens (B, T) -> logits (B, T, V) in fp32, or with
        targets (B, T) the pair (loss_sum, per_token_ce (B*T,)), loss_sum = sum(loss_weights * CE): the caller
        normalises. Packed rows: cu_seqlens int32 (n+1,) over the B*T tokens, position_ids (B, T) restarting at 0
        per sequence, max_seqlen the longest sequence (an int: no device sync). Without cu_seqlens: B sequences of T."""
        B, T = tokens.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=tokens.device).expand(B, T)
        if cu_seqlens is None:  # a plain batch: B sequences of length T
            cu_seqlens, max_seqlen = (
                torch.arange(0, (B + 1) * T, T, dtype=torch.int32, device=tokens.device),
                T,
            )
        elif max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        if max_seqlen > self.args.max_seq_len:
            raise ValueError(
                f"a sequence of {max_seqlen} tokens exceeds max_seq_len={self.args.max_seq_len}"
            )
        h = self._hidden(tokens, position_ids, cu_seqlens, max_seqlen)  # (B, T, D)
        if targets is None:
            return self.output(h).float()
        if loss_weights is None:  # plain language modelling: every token with a target counts once
            loss_weights = (targets != -100).float()
        # Fused: no (tokens x vocab) logits at once. Inside forward: FSDP2 unshards the root's output.weight only here.
        return fused_linear_cross_entropy(
            h.reshape(B * T, -1),
            self.output.weight,
            targets.reshape(-1),
            loss_weights.reshape(-1),
            return_per_token=True,
        )

    def decode(self, tokens, start_pos: int, last_only: bool = False):
        """Generation with the KV cache (setup_kv_cache first): tokens (B, T) at positions start_pos.., the
        positions before them already cached -> logits (B, T, V) in fp32; last_only=True: the last position's only,
        (B, 1, V) (a prompt needs no others)."""
        if self.layers[0].attention.cache_k is None:
            raise RuntimeError("decode needs the KV cache: call setup_kv_cache first")
        B, T = tokens.shape
        position_ids = torch.arange(start_pos, start_pos + T, device=tokens.device).expand(B, T)
        h = self._hidden(tokens, position_ids, start_pos=start_pos)  # (B, T, D)
        # (B, 1 or T, D)
        h = h[:, -1:] if last_only else h
        return (h @ self.output_t).float()  # output_t: the (D, V) copy setup_kv_cache made

    def _hidden(self, tokens, position_ids, cu_seqlens=None, max_seqlen=None, start_pos=None):
        """What training and decoding share: the embeddings, the blocks and the final norm -> (B, T, D)."""
        h = self.tok_embeddings(tokens)  # (B, T, D)
        # Gemma: sqrt(dim), rounded to h's dtype first as transformers does (bf16:
        if self.args.scale_embeddings:
            # 55.5 for 3072). A CPU scalar: no copy to the GPU
            h = h * torch.tensor(self.args.dim**0.5).to(h.dtype)
        cos, sin = rope_cos_sin(position_ids, rope_frequencies(self.args, h.device), h.dtype)
        for layer in self.layers:
            h = layer(h, cos, sin, cu_seqlens, max_seqlen, start_pos)
        return self.norm(h)

    def setup_kv_cache(self, batch_size: int, max_seq_len: int, device=None, dtype=None):
        """Preallocate each layer's K/V cache, (batch_size, max_seq_len, n_kv_heads, head_dim)."""
        assert max_seq_len <= self.args.max_seq_len, (
            f"a KV cache of {max_seq_len} > max_seq_len positions"
        )
        weight = self.output.weight
        shape = (batch_size, max_seq_len, self.args.n_kv_heads, self.args.head_dim)
        for layer in self.layers:
            layer.attention.cache_k = torch.zeros(
                shape, device=device or weight.device, dtype=dtype or weight.dtype
            )
            layer.attention.cache_v = torch.zeros_like(layer.attention.cache_k)
        # Each decoding step reads all the (V, D) output matrix: `h @ output_t`, a (D, V) copy, is faster on CPU than
        # F.linear for small D (benchmarks/bench_sample.py; equal up to fp32 rounding). Kept across generations;
        # remade when the weight changed (moved, replaced, or in place: _version).
        of = (weight.data_ptr(), weight._version, weight.dtype)
        if self._output_t_of != of:
            self.output_t, self._output_t_of = weight.detach().t().contiguous(), of

    def clear_kv_cache(self):
        for layer in self.layers:
            layer.attention.cache_k = layer.attention.cache_v = None

    @torch.no_grad()
    def init_weights(self):
        """(Re)initialise: N(0, init_std) matrices, zero biases, norms that scale by 1 (w = 1, or 0 for 1 + w).
        Works after a meta-device build and `to_empty`."""
        if self.args.tie_embeddings and self.output.weight is not self.tok_embeddings.weight:
            # to_empty gives each module its own new Parameter
            self.output.weight = self.tok_embeddings.weight
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=self.args.init_std)
                # qkv_bias: zero, as transformers initialises them
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.constant_(module.weight, 0.0 if module.plus_one else 1.0)

    @torch.no_grad()
    def grow_vocab(self, new_size: int):
        """Add rows to the embedding (and an untied lm_head), each new row the mean of the existing rows, as
        OpenChat initialised <|end_of_turn|>. Build the optimizer after this."""
        old_size = self.args.vocab_size
        if new_size < old_size:
            raise ValueError(
                f"grow_vocab: new_size={new_size} is smaller than vocab_size={old_size}"
            )

        def grown(weight):
            new = torch.empty(new_size, weight.shape[1], device=weight.device, dtype=weight.dtype)
            new[:old_size], new[old_size:] = weight, weight.float().mean(0).to(weight.dtype)
            return nn.Parameter(new, requires_grad=weight.requires_grad)

        self.tok_embeddings.weight = grown(self.tok_embeddings.weight)
        self.output.weight = (
            self.tok_embeddings.weight if self.args.tie_embeddings else grown(self.output.weight)
        )
        self.tok_embeddings.num_embeddings = self.output.out_features = new_size
        self.args = replace(self.args, vocab_size=new_size)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count (a tied matrix once); exclude_embeddings drops the input embedding table."""
        return (
            sum(p.numel() for p in self.parameters())
            - exclude_embeddings * self.tok_embeddings.weight.numel()
        )

    def size_text(self) -> str:
        """The parameter count said everywhere (train.py's summary, sample.py): all of them (a tied matrix once), then
        without the input embedding table (its rows are looked up, not multiplied)."""
        total, body = self.num_params(), self.num_params(exclude_embeddings=True)
        return (
            f"{total / 1e6:.1f}M parameters ({body / 1e6:.1f}M without the input embedding table)"
        )

    @classmethod
    def from_pretrained(cls, path: str, device=None, dtype=None, max_seq_len: Optional[int] = None):
        """A Hugging Face directory's model (a family of hf_format.FAMILIES). dtype, max_seq_len None: the config's."""
        args = ModelArgs.from_pretrained(path, max_seq_len)
        with torch.device("meta"):
            model = cls(args)
        shapes = {name: t.shape for name, t in model.state_dict().items()}
        model.load_state_dict(
            hf_format.load_state_dict(path, args, shapes, device, dtype), assign=True
        )
        if args.tie_embeddings:  # assign=True made two Parameters of one tensor: tie them again
            model.output.weight = model.tok_embeddings.weight
        return model

    def save_pretrained(self, path: str, dtype=None, max_shard_bytes: int = 5 * 10**9):
        """config.json + safetensors (sharded above max_shard_bytes) for transformers and vLLM. dtype None: ours."""
        hf_format.save_state_dict(self.state_dict(), self.args, path, dtype, max_shard_bytes)
