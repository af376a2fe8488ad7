"""The decoder forward of Llama-family models (Llama, Qwen2, Mistral without a sliding window),
written over the weights of a Hugging Face model, for the rollout engine.

Why not call the HF model: at batch 16 with a 665-token context, one HF decode step took 168 ms
here, 48% of it in `torch.cat` (DynamicCache appends by copying the whole cache every step) and
40% in SDPA over the padded cache; the matrix products were 10% (docs/performance.md). This
forward does the same arithmetic with the attention left to the caller (`attend`), which owns the
KV layout (`kvcache.py`: preallocated buffers, shared prompt prefixes), and with the weights laid
out for decoding:
- q/k/v and gate/up are fused into one matrix each (fewer, larger products);
- on CPU with oneDNN, bf16 weights are prepacked into oneDNN's blocked layout, which ran the
  211 linear layers of a SmolLM2 decode step 30% faster than `F.linear` (8.7 vs 12.4 ms at batch
  16, measured here);
- rotary tables are computed once by the model's own rotary module (so its RoPE scaling
  variant is honoured) and indexed by position.

The numerics follow transformers' Llama code (RMSNorm in fp32, activations in the compute dtype,
logits in the compute dtype then fp32), so a teacher-forced HF forward of the same weights gives
the same log-probs up to float rounding (tests/rollout/test_engine_correctness.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from spa_rl.kernels import decoder_ops_for

# Architectures whose HF forward is exactly: embed -> [RMSNorm, GQA attention with RoPE,
# residual, RMSNorm, SwiGLU MLP, residual] x L -> RMSNorm -> head.
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
# RoPE variants whose cos/sin depend on the position only (not on the sequence length).
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")

Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def unsupported_reason(model) -> str | None:
    """Why `LlamaDecoder` cannot run `model` (None when it can)."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return "not a transformers model"
    if cfg.model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {cfg.model_type!r} is not one of {SUPPORTED_MODEL_TYPES}"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act!r} (only silu)"
    if getattr(cfg, "mlp_bias", False):
        return "MLP biases"
    if getattr(cfg, "use_sliding_window", False) or (
            cfg.model_type == "mistral" and getattr(cfg, "sliding_window", None)):
        return "sliding-window attention"
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in STATIC_ROPE_TYPES:
        return f"RoPE type {rope_type!r}"
    try:
        backbone = model.get_decoder()
        layer = backbone.layers[0]
        layer.self_attn.q_proj, layer.mlp.gate_proj, backbone.rotary_emb, model.get_output_embeddings()
    except (AttributeError, IndexError):
        return "unexpected module layout"
    return None


def _onednn_packing_available(device: torch.device, dtype: torch.dtype) -> bool:
    return (device.type == "cpu" and dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class Linear:
    """One weight (and optional bias) in the layout its device runs fastest."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, pack: bool, batch_hint: int):
        self.out_features = weight.shape[0]
        self.numel = weight.numel()
        self.bias = bias
        self.packed = pack
        # The hint only picks oneDNN's blocking; any row count works with the packed weight.
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint) if pack else weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


@dataclass
class Layer:
    ln1: torch.Tensor
    qkv: Linear
    o: Linear
    ln2: torch.Tensor
    gate_up: Linear
    down: Linear


class LlamaDecoder:
    """Weights of one model snapshot, in `dtype` on the model's device, and its forward.

    The weights are copied at construction: later updates of the HF model are not seen (build a
    new decoder per rollout phase, as `HFBackend` does per call).
    """

    def __init__(self, model, dtype: torch.dtype | None = None, batch_hint: int = 16):
        reason = unsupported_reason(model)
        if reason:
            raise ValueError(f"LlamaDecoder cannot run this model: {reason}")
        cfg = model.config
        backbone = model.get_decoder()
        self.device = next(model.parameters()).device
        self.dtype = dtype or next(model.parameters()).dtype
        self.n_layers = cfg.num_hidden_layers
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        self.vocab_size = cfg.vocab_size
        self.packed = _onednn_packing_available(self.device, self.dtype)

        def w(t):
            return None if t is None else t.detach().to(self.dtype).contiguous()

        def lin(*mods):
            weight = torch.cat([m.weight.detach() for m in mods], 0)
            biases = [m.bias for m in mods]
            bias = None
            if any(b is not None for b in biases):
                bias = torch.cat([b.detach() if b is not None else m.weight.new_zeros(m.weight.shape[0])
                                  for m, b in zip(mods, biases)])
            return Linear(w(weight), w(bias), self.packed, batch_hint)

        with torch.no_grad():
            self.layers = []
            for layer in backbone.layers:
                att, mlp = layer.self_attn, layer.mlp
                self.layers.append(Layer(
                    ln1=w(layer.input_layernorm.weight), qkv=lin(att.q_proj, att.k_proj, att.v_proj),
                    o=lin(att.o_proj), ln2=w(layer.post_attention_layernorm.weight),
                    gate_up=lin(mlp.gate_proj, mlp.up_proj), down=lin(mlp.down_proj)))
            self.final_norm = w(backbone.norm.weight)
            self.embed = w(backbone.embed_tokens.weight)
            self.head = lin(model.get_output_embeddings())
        self._rotary = backbone.rotary_emb
        self._cos = self._sin = torch.empty(0, self.head_dim, dtype=self.dtype, device=self.device)
        self.scale = self.head_dim ** -0.5
        # the layer's small operations fused in C++ where they apply (kernels.py), else PyTorch's
        widths = (cfg.hidden_size, cfg.intermediate_size, (self.n_heads + 2 * self.n_kv_heads) * self.head_dim)
        self.ops = decoder_ops_for(self.dtype, self.device, widths, self.head_dim)

    # -- pieces ----------------------------------------------------------------------------
    def rope_tables(self, max_position: int) -> None:
        """cos/sin for positions [0, max_position), computed in fp32 by the model's own rotary
        module and cast to the compute dtype, as its forward does."""
        if max_position <= self._cos.shape[0]:
            return
        n = max(max_position, 2 * self._cos.shape[0], 1024)
        pos = torch.arange(n, device=self.device)[None]
        probe = torch.empty(1, dtype=torch.float32, device=self.device)
        with torch.no_grad():
            cos, sin = self._rotary(probe, pos)
        self._cos, self._sin = cos[0].to(self.dtype), sin[0].to(self.dtype)

    def norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * xf.to(x.dtype)

    @staticmethod
    def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: (N, heads, d); cos/sin: (N, 1, d). transformers' rotate-half convention."""
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    # -- forward ---------------------------------------------------------------------------
    def forward(self, ids: torch.Tensor, positions: torch.Tensor, attend: Attend) -> torch.Tensor:
        """Hidden states after the final norm for the packed tokens `ids` (N,) at absolute
        `positions` (N,). `attend(layer, q, k, v)` gets q (N, heads, d) and k, v
        (N, kv_heads, d) after RoPE, stores k/v where they belong and returns (N, heads, d)."""
        n = ids.shape[0]
        H, KV, d = self.n_heads, self.n_kv_heads, self.head_dim
        self.rope_tables(int(positions.max()) + 1)
        x = F.embedding(ids, self.embed)
        if self.ops is not None:
            return self._forward_fused(x, self._cos[positions], self._sin[positions], attend)
        cos, sin = self._cos[positions][:, None], self._sin[positions][:, None]
        for i, layer in enumerate(self.layers):
            qkv = layer.qkv(self.norm(x, layer.ln1))
            # q and k rotated together: one set of RoPE ops per layer instead of two
            qk = self.rope(qkv[:, :(H + KV) * d].view(n, H + KV, d), cos, sin)
            q, k = qk[:, :H], qk[:, H:]
            v = qkv[:, (H + KV) * d:].view(n, KV, d)
            x = x + layer.o(attend(i, q, k, v).reshape(n, H * d))
            gate, up = layer.gate_up(self.norm(x, layer.ln2)).chunk(2, dim=-1)
            x = x + layer.down(F.silu(gate) * up)
        return self.norm(x, self.final_norm)

    def _forward_fused(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: Attend) -> torch.Tensor:
        """`forward` with the fused operations: per layer one rotary-and-split call, one
        SiLU-and-product and two residual-add-and-norm calls (after attention with this layer's
        second norm; after the MLP with the next layer's first norm, or the final norm), where
        the PyTorch version runs about 25 operations."""
        ops, n = self.ops, x.shape[0]
        h = ops.rms_norm(x, self.layers[0].ln1, self.eps)
        for i, layer in enumerate(self.layers):
            q, k, v = ops.rope_split(layer.qkv(h), cos, sin, self.n_heads, self.n_kv_heads)
            x, h = ops.add_rms_norm(x, layer.o(attend(i, q, k, v).reshape(n, -1)), layer.ln2, self.eps)
            following = self.layers[i + 1].ln1 if i + 1 < len(self.layers) else self.final_norm
            x, h = ops.add_rms_norm(x, layer.down(ops.silu_mul(layer.gate_up(h))), following, self.eps)
        return h

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits (n, vocab) of final hidden states, computed in the compute dtype like
        the HF head."""
        return self.head(hidden).float()
