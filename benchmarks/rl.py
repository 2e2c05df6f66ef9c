"""Seconds per RL step, split into generation, log-probability recompute, reward and training.

    python benchmarks/rl.py [--preset tiny] [--algorithm grpo|ppo] [--prompts-per-step 16] [--n 4]
                            [--max-new-tokens 128] [--steps 4] [--tokenizer PATH] [--load CKPT] [--json]

Runs the RL stage (`stage: rl`) through megaevo's Trainer in one process on reasoning-gym GCD prompts
with the verifiable reward (reasoning-gym's scorer), from a checkpoint (`--load`, e.g. the demo's SFT
run with its tokenizer) or a randomly initialised model (then responses run to --max-new-tokens, the
worst case for generation). Without --tokenizer a small SentencePiece model is trained on the prompts
first. Prints one JSON object per algorithm: the median over the steps after the first of each
phase's seconds, the generation share of the step and the rollout / training tokens/s (from the
step's own metrics, see the README's RL section). On a GPU: --preset evolm-1b --load an EvoLM-1B SFT
checkpoint and its tokenizer gives EvoLM-1B rollout tokens/s.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from megaevo.config import config_from_dict
from megaevo.stages import build_stage
from megaevo.training.trainer import Trainer

PHASES = ("time_generate", "time_logprob", "time_reward", "time_train", "time_step")


def prompt_tokenizer(folder: Path, vocab_size: int) -> str:
    """A SentencePiece model trained on reasoning-gym GCD questions (enough to tokenize the prompts)."""
    import reasoning_gym

    from megaevo.data.tokenizers import train_sentencepiece

    ds = reasoning_gym.create_dataset("gcd", size=2000, seed=1)
    text = folder / "prompts.jsonl"
    text.write_text("".join(json.dumps({"text": e["question"] + " " + str(e["answer"])}) + "\n" for e in ds))
    return str(train_sentencepiece([str(text)], vocab_size, str(folder / "rl-bench")))


def run(args, algorithm: str, tokenizer: str, out_dir: Path) -> dict:
    model = {"preset": args.preset}
    if args.vocab_size:
        model["vocab_size"] = args.vocab_size
    cfg = config_from_dict({
        "stage": "rl",
        "model": model,
        "data": {"tokenizer": tokenizer, "seq_len": args.seq_len},
        "rl": {"algorithm": algorithm, "prompts": [f"rg:gcd:{args.prompts_per_step * (args.steps + 1)}:7"],
               "prompts_per_step": args.prompts_per_step, "n": args.n, "max_prompt_len": args.seq_len // 2,
               "max_new_tokens": args.max_new_tokens},
        "train": {"micro_batch_size": args.micro_batch, "iters": args.steps, "log_interval": 1, "eval_interval": 0,
                  "dtype": args.dtype},
        "optim": {"lr": 1e-5, "min_lr": 1e-5, "warmup": 0, "schedule": "constant"},
        "checkpoint": {"save": False, "load": args.load, "finetune": bool(args.load)},
        "out_dir": str(out_dir / algorithm),
    })
    trainer = Trainer(cfg, build_stage)
    records = [r for r in trainer.fit() if "time_step" in r]
    records = records[1:] or records  # the first step warms up
    med = {k: round(statistics.median(r[k] for r in records), 4) for k in PHASES}
    return {"algorithm": algorithm, "preset": args.preset, "device": str(trainer.device),
            "dtype": str(trainer.dtype).replace("torch.", ""), "prompts_per_step": args.prompts_per_step, "n": args.n,
            "max_new_tokens": args.max_new_tokens, "steps_measured": len(records), **med,
            "generation_share": round(med["time_generate"] / med["time_step"], 3),
            "rollout_tokens_per_s": round(statistics.median(r["rollout_tokens_per_s"] for r in records), 1),
            "train_tokens_per_s": round(statistics.median(r["train_tokens_per_s"] for r in records), 1),
            "response_length_mean": round(statistics.mean(r["response_length_mean"] for r in records), 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--vocab-size", type=int, default=None, help="model vocabulary (default: the preset's)")
    p.add_argument("--algorithm", default="grpo,ppo", help="comma-separated: grpo, ppo")
    p.add_argument("--prompts-per-step", type=int, default=16)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--tokenizer", default=None, help="the model's tokenizer (default: one trained on the prompts)")
    p.add_argument("--load", default=None, help="start from this checkpoint (weights only)")
    p.add_argument("--json", action="store_true", help="JSON lines only (the default output is JSON too)")
    args = p.parse_args()
    if torch.cuda.is_available() is False and args.preset == "tiny":
        torch.set_num_threads(min(torch.get_num_threads(), 2))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # GCD questions give about 430 pieces at most: the tokenizer stays below, the model's vocabulary may be larger
        tokenizer = args.tokenizer or prompt_tokenizer(tmp, min(args.vocab_size or 400, 400))
        for algorithm in args.algorithm.split(","):
            print(json.dumps(run(args, algorithm.strip(), tokenizer, tmp)), flush=True)


if __name__ == "__main__":
    main()
