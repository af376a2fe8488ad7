"""The rollout engine against `model.generate` on one device, on a random-init model with
SmolLM2-135M's shape (its outputs mean nothing; its speed is the default model's). For a GPU
machine, where the embedded model's GGUF cannot travel:

    python benchmarks/gpu_engine.py --device cuda        # batch 16, 665-token prompts, 128 new tokens

Prints tokens/s of each and the last line `ratio engine/baseline: N.NNx`.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=665)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    args = ap.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from spa_rl.models.tiny import build_byte_tokenizer
    from spa_rl.rollout.backend import HFBackend, SamplingParams
    from spa_rl.runtime import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype("auto", device)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True,
                         max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    tokenizer = build_byte_tokenizer()  # ids only matter for stop strings; none are used here
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(300, 49000, (args.prompt_tokens,), generator=g).tolist() for _ in range(args.batch)]
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=1.0, stop_strings=())

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        n = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return n / (time.perf_counter() - t0)

    backend = HFBackend(model, tokenizer, max_batch_size=args.batch, seed=0)
    backend.generate(prompts[:2], SamplingParams(max_new_tokens=8, stop_strings=()))  # warm-up / compile
    engine = timed(lambda: sum(len(x.token_ids) for x in backend.generate(prompts, params)))
    ids = torch.tensor(prompts, device=device)
    with torch.inference_mode():
        model.generate(ids[:2], max_new_tokens=8, do_sample=True)
        base = timed(lambda: int(model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                                                min_new_tokens=args.max_new_tokens, do_sample=True,
                                                pad_token_id=0).shape[1] - ids.shape[1]) * args.batch)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), {dtype}, "
          f"batch {args.batch}, prompts {args.prompt_tokens} tokens, {args.max_new_tokens} new")
    print(f"engine {engine:.1f} tokens/s; model.generate ({dtype}) {base:.1f} tokens/s")
    print(f"ratio engine/baseline: {engine / base:.2f}x")


if __name__ == "__main__":
    main()
