"""The model's shape and options (`ModelArgs`), checked where they come in: from a Hugging Face config.json
(hf_format.model_config picks a family's options) or from a preset of the models trained from scratch (`PRESETS`).
model.py builds the decoder from them."""

import math
import os
from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch.nn.functional as F

import hf_format

# The feed-forward's gate, by transformers' names: SwiGLU's silu, Gemma's GeGLU with the tanh GELU (GELUTanh)
ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh")}


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # None: = n_heads (plain multi-head attention)
    vocab_size: int = 32000
    hidden_dim: Optional[int] = None  # feed-forward width; None: LLaMA's rule below
    # LLaMA's rule: 8/3 * dim rounded up to a multiple of this
    multiple_of: int = 256
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # longest sequence (conversation, KV cache) the model takes
    max_seq_len: int = 4096
    tie_embeddings: bool = False  # lm_head shares the embedding matrix
    head_dim: Optional[int] = None  # None: dim // n_heads
    # std of the normal init of every matrix (HF's initializer_range)
    init_std: float = 0.02
    # Mistral: each token sees itself and the window - 1 before it
    sliding_window: Optional[int] = None
    # the transformers class save_pretrained writes: hf_format.FAMILIES
    model_type: str = "llama"
    # bos and eos: carried only into save_pretrained's config.json
    bos_token_id: Optional[int] = 1
    eos_token_id: Optional[int] = 2
    # Options beyond LLaMA 2 / Mistral, each with a family that has it (which family has which: hf_format.FAMILIES)
    # Qwen2: the q, k and v projections have a bias (o has none)
    qkv_bias: bool = False
    # Qwen3: RMSNorm over head_dim on each head of q and k, before RoPE
    qk_norm: bool = False
    # Gemma: each RMSNorm scales by (1 + w), w initialised to 0
    norm_plus_one: bool = False
    scale_embeddings: bool = False  # Gemma: input embeddings multiplied by sqrt(dim)
    # the gate's: "silu" (SwiGLU) or "gelu_pytorch_tanh" (GeGLU, Gemma)
    ffn_activation: str = "silu"
    # Llama 3.1+: long wavelengths' frequencies / factor (None: plain)
    rope_scaling_factor: Optional[float] = None
    # ... wavelengths above original / low_freq_factor: divided by factor
    rope_low_freq_factor: float = 1.0
    # ... below original / high_freq_factor: kept; in between: blended
    rope_high_freq_factor: float = 4.0
    rope_original_max_seq_len: int = 8192  # ... "original": the context of pre-training

    def __post_init__(self):
        self.n_kv_heads = self.n_heads if self.n_kv_heads is None else self.n_kv_heads
        self.head_dim = self.dim // self.n_heads if self.head_dim is None else self.head_dim
        if self.hidden_dim is None:
            self.hidden_dim = self.multiple_of * math.ceil(
                int(2 * 4 * self.dim / 3) / self.multiple_of
            )
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}"
            )
        if self.model_type not in hf_format.FAMILIES:
            raise ValueError(
                f"model_type={self.model_type!r}, expected one of {', '.join(hf_format.FAMILIES)}"
            )
        # Saved, a family's transformers class computes its own options, whatever config.json says: they must agree
        for option, value in hf_format.family_options(self.model_type).items():
            if getattr(self, option) != value:
                raise ValueError(
                    f"{option}={getattr(self, option)!r}: model_type={self.model_type!r} has {value!r}"
                )
        if self.ffn_activation not in ACTIVATIONS:
            raise ValueError(
                f"ffn_activation={self.ffn_activation!r}, expected one of {', '.join(ACTIVATIONS)}"
            )
        factors = (self.rope_scaling_factor, self.rope_low_freq_factor, self.rope_high_freq_factor)
        if factors[0] is not None and not (factors[0] > 0 and 0 < factors[1] < factors[2]):
            raise ValueError(
                f"RoPE scaling, low and high frequency factors {factors}: expected > 0 and low < high"
            )
        window = self.sliding_window
        if window is not None and (
            type(window) is not int or window < 1 or self.model_type != "mistral"
        ):
            raise ValueError(
                f"sliding_window={window!r}: a Mistral model's window is an int >= 1 (or none)"
            )

    @classmethod
    def from_pretrained(cls, path: str, max_seq_len: Optional[int] = None) -> "ModelArgs":
        """A Hugging Face checkpoint directory's shape (config.json; max_seq_len None: its own), no weights."""
        try:
            return cls(**hf_format.model_config(path, max_seq_len))
        except ValueError as e:  # an unsupported or bad value: name the file
            raise ValueError(f"{os.path.join(path, 'config.json')}: {e}") from None


# models trained from scratch (released ones come from their directories); vocab_size: the tokenizer's
PRESETS = {
    # the toy task of train.py's default run. init_std 0.05: at 0.02 C-RLFT sat 500+ steps on a plateau
    "toy": ModelArgs(
        dim=128, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=121, max_seq_len=256, init_std=0.05
    ),
    # CPU: the "19M LLaMA" (dim 256, 4 layers, 32k vocab).
    "tiny": ModelArgs(
        dim=256, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=32000, max_seq_len=1024
    ),
    # GPU throughput tests: TinyLlama-1.1B's shape
    "1b": ModelArgs(
        dim=2048,
        n_layers=22,
        n_heads=32,
        n_kv_heads=4,
        vocab_size=32000,
        hidden_dim=5632,
        max_seq_len=4096,
    ),
    # GPU recipe checks: Llama-3-8B's shape (its 128,256-id vocabulary with its tokenizer: --tokenizer=DIR)
    "8b": ModelArgs(
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        vocab_size=128256,
        hidden_dim=14336,
        rope_theta=500000.0,
        max_seq_len=8192,
    ),
}
