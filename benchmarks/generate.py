"""Greedy generation throughput: megaevo's KV-cache generation vs Hugging Face ``generate``.

    python benchmarks/generate.py [--presets tiny,100m] [--batch 16] [--new-tokens 256] [--json]

Builds a random Llama of each shape with transformers, saves it to a temporary directory, loads
the same weights with ``megaevo.load``, and times greedy generation of ``--new-tokens`` tokens
(no EOS) for ``--batch`` random prompts of ``--prompt-len`` tokens with each. One row per preset:
generated tokens/s of both, ``speedup_vs_hf``, and whether the tokens agree.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

SHAPES = {
    "tiny": dict(num_layers=4, hidden_size=128, ffn_hidden_size=352, num_heads=4, num_kv_heads=2, vocab_size=4096),
    "100m": dict(num_layers=12, hidden_size=768, ffn_hidden_size=2048, num_heads=12, num_kv_heads=4,
                 vocab_size=32000),
}


def hf_llama(shape: dict, max_len: int, dtype: torch.dtype):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"], intermediate_size=shape["ffn_hidden_size"],
        num_hidden_layers=shape["num_layers"], num_attention_heads=shape["num_heads"],
        num_key_value_heads=shape["num_kv_heads"], max_position_embeddings=max_len, initializer_range=0.1,
        tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


def run(preset: str, batch: int, prompt_len: int, new_tokens: int, device: str, dtype: torch.dtype) -> dict:
    import megaevo
    from megaevo.inference import SamplingParams

    shape = SHAPES[preset]
    hf = hf_llama(shape, prompt_len + new_tokens, dtype)
    prompts = torch.randint(3, shape["vocab_size"], (batch, prompt_len), generator=torch.Generator().manual_seed(1))
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        model = megaevo.load(tmp, device=device, dtype=dtype)
    hf = hf.to(device)
    params = SamplingParams(max_new_tokens=new_tokens, stop_token_ids=())

    def ours():
        return model.generate(prompts.tolist(), params)

    def theirs():
        with torch.no_grad():
            return hf.generate(prompts.to(device), attention_mask=torch.ones_like(prompts, device=device),
                               max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)

    model.generate(prompts[:2, :8].tolist(), SamplingParams(max_new_tokens=4, stop_token_ids=()))  # warm-up
    theirs_warm = hf.generate(prompts[:2, :8].to(device), max_new_tokens=4, do_sample=False, eos_token_id=None,
                              pad_token_id=0)
    del theirs_warm
    times = {}
    for name, fn in (("megaevo", ours), ("hf", theirs)):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times[name] = (time.perf_counter() - start, out)
    ours_tokens = [c[0].token_ids for c in times["megaevo"][1]]
    hf_tokens = times["hf"][1][:, prompt_len:].tolist()
    generated = sum(len(t) for t in ours_tokens)
    row = {"preset": preset, "params_m": round(sum(p.numel() for p in hf.parameters()) / 1e6, 1),
           "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens, "device": device,
           "dtype": str(dtype).removeprefix("torch."),
           "megaevo_tokens_per_s": round(generated / times["megaevo"][0], 1),
           "hf_tokens_per_s": round(batch * new_tokens / times["hf"][0], 1)}
    row["speedup_vs_hf"] = round(row["megaevo_tokens_per_s"] / row["hf_tokens_per_s"], 2)
    row["same_tokens_frac"] = round(sum(a == b for a, b in zip(ours_tokens, hf_tokens)) / batch, 3)
    return row


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="tiny,100m", help="comma-separated: " + ", ".join(SHAPES))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    a = p.parse_args(argv)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32")]
    for preset in a.presets.split(","):
        row = run(preset, a.batch, a.prompt_len, a.new_tokens, a.device, dtype)
        print(json.dumps(row) if a.json else "  ".join(f"{k}={v}" for k, v in row.items()), flush=True)


if __name__ == "__main__":
    main()
