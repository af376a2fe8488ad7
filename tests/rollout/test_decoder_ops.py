"""The fused layer operations of the rollout decoder (csrc/decoder_ops.cpp) compute what the
PyTorch operations of `LlamaDecoder` compute.

Exact where both round the same fp32 results at the same places (the residual add, the rotary
embedding, the split of the fused projection). The norm sums its squares in another fp32 order
and SiLU uses its own exp, so a bf16 result may move by one step there: at most one bf16 step
(2^-7 relative) on any element, and on few of them. Needs an AVX-512 CPU (skipped elsewhere:
the decoder then runs the PyTorch operations)."""

import pytest
import torch
import torch.nn.functional as F

from spa_rl import kernels
from spa_rl.rollout.llama import LlamaDecoder

pytestmark = pytest.mark.skipif(not kernels._cpu_has_avx512() or not kernels.kernel_enabled(),
                                reason="the fused decoder operations need an AVX-512 CPU")

EPS = 1e-5


@pytest.fixture(scope="module")
def ops():
    module = kernels.load_cpu_kernels()
    assert module is not None, "the extension did not build on an AVX-512 machine"
    return module


def bf16(*shape, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g)).to(torch.bfloat16)


def torch_norm(x, w):
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)
    return w * xf.to(x.dtype)


def assert_within_one_step(got, want, share=0.02):
    """Every element within one bf16 step of the reference, and at most `share` of them off."""
    diff = (got.float() - want.float()).abs()
    step = want.float().abs() * 2 ** -7 + 1e-30
    assert bool((diff <= step * 1.01).all()), float((diff / step).max())
    assert (diff > 0).float().mean().item() <= share


@pytest.mark.parametrize("rows", [1, 16, 37])
def test_rms_norm(ops, rows):
    x, w = bf16(rows, 576, scale=3.0, seed=rows), bf16(576, seed=99)
    assert_within_one_step(ops.rms_norm(x, w, EPS), torch_norm(x, w))


def test_add_rms_norm(ops):
    x, r, w = bf16(16, 576, seed=1), bf16(16, 576, scale=0.5, seed=2), bf16(576, seed=3)
    s, y = ops.add_rms_norm(x, r, w, EPS)
    assert torch.equal(s, x + r)
    assert_within_one_step(y, torch_norm(x + r, w))


@pytest.mark.parametrize("head_dim", [64, 128])
def test_rope_split(ops, head_dim):
    rows, H, KV = 16, 9, 3
    qkv = bf16(rows, (H + 2 * KV) * head_dim, scale=2.0, seed=head_dim)
    cos, sin = bf16(rows, head_dim, seed=5), bf16(rows, head_dim, seed=6)
    q, k, v = ops.rope_split(qkv, cos, sin, H, KV)
    qk = LlamaDecoder.rope(qkv[:, :(H + KV) * head_dim].view(rows, H + KV, head_dim), cos[:, None], sin[:, None])
    assert torch.equal(q, qk[:, :H]) and torch.equal(k, qk[:, H:])
    assert torch.equal(v, qkv[:, (H + KV) * head_dim:].view(rows, KV, head_dim))
    assert q.is_contiguous() and k.is_contiguous() and v.is_contiguous()


def test_silu_mul(ops):
    gate_up = bf16(16, 2 * 1536, scale=4.0, seed=7)
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])  # far tails and zeros
    gate, up = gate_up.chunk(2, dim=-1)
    assert_within_one_step(ops.silu_mul(gate_up), F.silu(gate) * up)


def test_bad_input_is_refused_with_a_message(ops):
    with pytest.raises(RuntimeError, match="multiple of 16"):
        ops.rms_norm(bf16(2, 20), bf16(20), EPS)
    with pytest.raises(RuntimeError, match="norm weight"):
        ops.rms_norm(bf16(2, 32), bf16(16), EPS)
    with pytest.raises(RuntimeError, match="shapes disagree"):
        ops.rope_split(bf16(2, 5 * 64), bf16(2, 64), bf16(2, 64), 9, 3)


def test_the_fused_forward_equals_the_pytorch_forward(ops):
    """A whole SmolLM2-shaped (tiny) decoder: hidden states of the fused forward against the
    PyTorch operations, through a plain attention over the same tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=192, intermediate_size=512, num_hidden_layers=3,
                      num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg).eval()
    decoder = LlamaDecoder(model, torch.bfloat16)
    assert decoder.ops is not None

    def attend(layer, q, k, v):  # causal attention over the one sequence, PyTorch's formula
        g = q.shape[1] // k.shape[1]
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k.repeat_interleave(g, 1).transpose(0, 1),
                                             v.repeat_interleave(g, 1).transpose(0, 1), is_causal=True)
        return out.transpose(0, 1)

    ids = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(40)
    with torch.inference_mode():
        fused = decoder.forward(ids, pos, attend)
        decoder.ops = None
        plain = decoder.forward(ids, pos, attend)
    # differences of one bf16 step in a norm or SiLU propagate through the layers: compare as
    # the engine's tests compare log-probs, by the relative size of the difference
    assert fused.shape == plain.shape
    rel = (fused.float() - plain.float()).norm() / plain.float().norm()
    assert rel.item() < 1e-2, rel.item()
