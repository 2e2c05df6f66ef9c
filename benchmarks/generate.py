"""Greedy generation throughput: megaevo's KV-cache generation vs Hugging Face ``generate``, and evaluation throughput.

    python benchmarks/generate.py [--presets tiny,100m] [--batch 16] [--new-tokens 256] [--repeats 2] [--json]

Builds a random Llama of each shape with transformers, saves it (with a byte-level BPE tokenizer
trained on the evaluation problems) to a temporary directory, loads the same weights with
``megaevo.load``, and times greedy generation of ``--new-tokens`` tokens (no EOS) for ``--batch``
random prompts of ``--prompt-len`` tokens with each, in the same dtype. The two are timed
alternately ``--repeats`` times each and the fastest run of each is reported (the machine may be
shared; every run is listed in ``megaevo_runs_s`` / ``hf_runs_s``). Every megaevo run includes
its one-time preparation of inference-only weights (MKL-packed copies on the CPU in float32), also
timed on its own as ``megaevo_prepare_s``. One row per preset: generated tokens/s of both,
``speedup_vs_hf``, and whether the tokens agree.

Each row also carries megaevo's evaluation throughput on the same model: the first ``--eval-limit``
problems of ``--eval-set`` (an EvoLM jsonl) through ``megaevo.eval`` (the ``evolm`` template, greedy,
repetition penalty 1.1, stop strings, prompt + completion capped at ``--eval-max-length`` tokens,
batches of ``--batch``), generation and grading: ``eval_problems_per_s`` and
``eval_generated_tokens_per_s`` (``--eval-limit 0`` skips it). The random model's completions are
noise, so only the speed means anything.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {
    "tiny": dict(num_layers=4, hidden_size=128, ffn_hidden_size=352, num_heads=4, num_kv_heads=2, vocab_size=4096),
    "100m": dict(num_layers=12, hidden_size=768, ffn_hidden_size=2048, num_heads=12, num_kv_heads=4,
                 vocab_size=32000),
}
# The EvoLM sets: $MEGAEVO_EVAL_DIR, else ../shared/evolm-evals beside the repository.
DEFAULT_EVAL_SET = str(Path(os.environ.get("MEGAEVO_EVAL_DIR") or Path(__file__).resolve().parents[2] / "shared"
                            / "evolm-evals") / "GSM8KPlatinum.jsonl")


def hf_llama(shape: dict, max_len: int, dtype: torch.dtype):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"], intermediate_size=shape["ffn_hidden_size"],
        num_hidden_layers=shape["num_layers"], num_attention_heads=shape["num_heads"],
        num_key_value_heads=shape["num_kv_heads"], max_position_embeddings=max_len, initializer_range=0.1,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


def write_tokenizer(out: str, texts: list[str], vocab_size: int) -> None:
    """A byte-level BPE (ids 0-2: <unk>, <s>, </s>) trained on ``texts``, filled up to ``vocab_size`` ids
    with placeholder tokens (an id the tokenizer cannot decode is never generated)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_tokens([f"<extra_{i}>" for i in range(vocab_size - tok.get_vocab_size())])
    tok.save(os.path.join(out, "tokenizer.json"))
    Path(out, "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))


def eval_texts(eval_set: str | None) -> list[str]:
    if not eval_set or not os.path.isfile(eval_set):
        return ["a few words to train a tokenizer on when no evaluation set is at hand"]
    with open(eval_set, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r.get("problem", "") + "\n" + (r.get("gt_solution") or "") for r in rows]


def timed(fn, device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def run(preset: str, batch: int, prompt_len: int, new_tokens: int, device: str, dtype: torch.dtype, repeats: int,
        eval_set: str | None, eval_limit: int, eval_max_length: int) -> dict:
    import megaevo
    from megaevo.inference import SamplingParams
    from megaevo.model.decode import decode_linears, forget_decode_linears

    shape = SHAPES[preset]
    hf = hf_llama(shape, max(prompt_len + new_tokens, eval_max_length), dtype)
    prompts = torch.randint(3, shape["vocab_size"], (batch, prompt_len), generator=torch.Generator().manual_seed(1))
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        write_tokenizer(tmp, eval_texts(eval_set), shape["vocab_size"])
        model = megaevo.load(tmp, device=device, dtype=dtype)
    hf = hf.to(device)
    params = SamplingParams(max_new_tokens=new_tokens, stop_token_ids=())

    def forget_prepared():  # every timed megaevo run prepares its inference weights again
        forget_decode_linears(model.chunk)

    def ours():
        forget_prepared()
        return model.generate(prompts.tolist(), params)

    def theirs():
        with torch.no_grad():
            return hf.generate(prompts.to(device), attention_mask=torch.ones_like(prompts, device=device),
                               max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)

    model.generate(prompts[:2, :8].tolist(), SamplingParams(max_new_tokens=4, stop_token_ids=()))  # warm-up
    with torch.no_grad():
        hf.generate(prompts[:2, :8].to(device), max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
    forget_prepared()
    prepare_s, _ = timed(lambda: decode_linears(model.chunk, batch, new_tokens - 1), device)
    runs = {"megaevo": [], "hf": []}
    outs = {}
    for _ in range(repeats):
        for name, fn in (("megaevo", ours), ("hf", theirs)):
            seconds, outs[name] = timed(fn, device)
            runs[name].append(seconds)
    ours_tokens = [c[0].token_ids for c in outs["megaevo"]]
    hf_tokens = outs["hf"][:, prompt_len:].tolist()
    generated = sum(len(t) for t in ours_tokens)
    row = {"preset": preset, "params_m": round(sum(p.numel() for p in hf.parameters()) / 1e6, 1),
           "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens, "device": device,
           "dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
           "megaevo_tokens_per_s": round(generated / min(runs["megaevo"]), 1),
           "hf_tokens_per_s": round(batch * new_tokens / min(runs["hf"]), 1)}
    row["speedup_vs_hf"] = round(row["megaevo_tokens_per_s"] / row["hf_tokens_per_s"], 2)
    row["same_tokens_frac"] = round(sum(a == b for a, b in zip(ours_tokens, hf_tokens)) / batch, 3)
    row["megaevo_prepare_s"] = round(prepare_s, 3)
    row["megaevo_runs_s"] = [round(t, 2) for t in runs["megaevo"]]
    row["hf_runs_s"] = [round(t, 2) for t in runs["hf"]]
    del hf, outs
    if eval_limit > 0 and eval_set and os.path.isfile(eval_set):
        row.update(run_eval(model, eval_set, eval_limit, batch, eval_max_length, device))
    return row


def run_eval(model, eval_set: str, limit: int, batch: int, max_length: int, device: str) -> dict:
    from megaevo.eval.generative import run_generative
    from megaevo.eval.tasks import load_generative

    from megaevo.model.decode import forget_decode_linears

    task = load_generative(eval_set, limit=limit)
    forget_decode_linears(model.chunk)
    seconds, result = timed(lambda: run_generative(task, model, batch_size=batch, progress=False,
                                                   max_length=max_length, workers=1), device)
    tokens = result["metrics"]["generated_tokens"]
    return {"eval_set": Path(eval_set).stem, "eval_problems": len(task.problems), "eval_max_length": max_length,
            "eval_generated_tokens": tokens, "eval_s": round(seconds, 2),
            "eval_problems_per_s": round(len(task.problems) / seconds, 2),
            "eval_generated_tokens_per_s": round(tokens / seconds, 1)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="tiny,100m", help="comma-separated: " + ", ".join(SHAPES))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2, help="timed runs of each, alternating; the fastest is reported")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    p.add_argument("--eval-set", default=DEFAULT_EVAL_SET, help="an EvoLM-format jsonl for the evaluation throughput")
    p.add_argument("--eval-limit", type=int, default=32, help="problems of --eval-set (0: no evaluation)")
    p.add_argument("--eval-max-length", type=int, default=320, help="prompt + completion tokens per problem")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    a = p.parse_args(argv)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32")]
    for preset in a.presets.split(","):
        row = run(preset, a.batch, a.prompt_len, a.new_tokens, a.device, dtype, max(1, a.repeats), a.eval_set,
                  a.eval_limit, a.eval_max_length)
        print(json.dumps(row) if a.json else "  ".join(f"{k}={v}" for k, v in row.items()), flush=True)


if __name__ == "__main__":
    main()
