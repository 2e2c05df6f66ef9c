"""A megaevo model for lm-evaluation-harness (``pip install 'megaevo[lm-eval]'``).

lm-eval finds models by name only once their module is imported, so run it through this module,
which registers the model ``megaevo`` and then hands its arguments to lm-eval's own command line::

    python -m megaevo.eval.lm_eval_adapter --model megaevo \\
        --model_args load=runs/pretrain/checkpoints/latest,dtype=bfloat16 \\
        --tasks hellaswag,arc_easy --batch_size 16 --output_path results/

or from Python, ``lm_eval.simple_evaluate(model=MegaevoLM(load=CKPT), tasks=[...])`` (also
``model="megaevo"`` after importing this module). Under ``torchrun`` with ``tp=N`` every rank runs
the same requests and rank 0 alone writes results (``--output_path``, ``--log_samples``) and prints
them. ``model_args``: ``load`` (a checkpoint or Hugging Face directory), ``tp``, ``dtype``,
``device`` (default: CUDA when there is one, else the CPU; a CUDA device asked for on a machine
without one falls back to the CPU with a warning, as lm-eval's own HF backend does),
``batch_size``, ``max_gen_toks``.

Scoring is megaevo's own (:func:`megaevo.eval.multiple_choice.score_requests`), so the numbers
match ``megaevo eval`` on the same questions: no BOS, an empty context conditioned on EOS, requests
longer than the model cut on the left, ``loglikelihood_rolling`` over windows of ``max_seq_len``
tokens whose first one is conditioned on EOS.
"""
from __future__ import annotations

import logging
import os
import sys
from contextlib import redirect_stdout

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from megaevo.errors import UserError
from megaevo.inference import SamplingParams
from megaevo.inference import load as load_model

from .multiple_choice import encode_pair, score_requests

DEFAULT_MAX_GEN_TOKS = 256
logger = logging.getLogger("megaevo")


@register_model("megaevo")
class MegaevoLM(LM):
    """lm-eval's view of a megaevo model: ``load=CKPT`` loads one, ``model=`` wraps one already loaded."""

    def __init__(self, load: str | None = None, model=None, tp: int | None = None, dtype: str | None = None,
                 device: str | None = None, batch_size: int | str = 8, max_batch_size: int | None = None,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, **unused):
        super().__init__()
        if (load is None) == (model is None):
            raise ValueError("MegaevoLM needs exactly one of load=CHECKPOINT or model=<a loaded megaevo model>")
        if model is None:
            model = load_model(load, tp=int(tp) if tp is not None else None, device=available_device(device),
                               dtype=dtype)
        self.model = model
        self._device = model.device
        self.tokenizer = model.tokenizer
        self.batch_size = _batch_size(batch_size)
        self.max_gen_toks = int(max_gen_toks)

    @property
    def max_length(self) -> int:
        return int(self.model.args.max_seq_len)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [encode_pair(self.tokenizer, ctx, cont) for ctx, cont in (r.args for r in requests)]
        results = score_requests(self.model, pairs, batch_size=self.batch_size, greedy=True,
                                 progress=not disable_tqdm, desc="loglikelihood")
        for r, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", r.args, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        pairs, owner = [], []
        for i, (text,) in enumerate(r.args for r in requests):
            for window in rolling_windows(list(self.tokenizer.encode(text)), self.eot_token_id, self.max_length):
                pairs.append(window)
                owner.append(i)
        scores = score_requests(self.model, pairs, batch_size=self.batch_size, progress=not disable_tqdm,
                                desc="loglikelihood_rolling")
        totals = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, scores):
            totals[i] += ll
        for r, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy unless the task asks for sampling; each text ends before the first of ``until``.
        Requests with the same generation settings go to ``model.generate`` in batches; a prompt is cut
        on the left to leave room for ``max_gen_toks`` new tokens."""
        eos_text = self.tokenizer.decode([self.eot_token_id])
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            kwargs = dict(r.args[1] or {})
            until = kwargs.get("until") or [eos_text]
            until = (until,) if isinstance(until, str) else tuple(until)
            max_new = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            do_sample = kwargs.get("do_sample")
            temperature = 0.0 if do_sample is False else float(kwargs.get("temperature", 1.0 if do_sample else 0.0))
            key = (until, max_new, temperature, float(kwargs.get("top_p", 1.0)))
            groups.setdefault(key, []).append(i)
        outputs: list[str] = [""] * len(requests)
        for (until, max_new, temperature, top_p), members in groups.items():
            params = SamplingParams(max_new_tokens=max_new, temperature=temperature, top_p=top_p, stop=until)
            room = max(self.max_length - max_new, 1)
            for b in range(0, len(members), self.batch_size):
                batch = members[b:b + self.batch_size]
                prompts = [list(self.tokenizer.encode(requests[i].args[0]))[-room:] for i in batch]
                for i, completions in zip(batch, self.model.generate(prompts, params)):
                    outputs[i] = cut_at_stop(completions[0].text, list(until))
        for r, text in zip(requests, outputs):
            self.cache_hook.add_partial("generate_until", r.args, text)
        return outputs


def available_device(device: str | None) -> str | None:
    """``device``, or the CPU (with a warning) when it names CUDA on a machine without CUDA; None
    lets :func:`megaevo.inference.load` choose."""
    import torch

    if device is None or not str(device).startswith("cuda") or torch.cuda.is_available():
        return device
    logger.warning("megaevo-lm-eval: device %s asked for but CUDA is not available: running on the CPU", device)
    return "cpu"


def rank0_argv(argv: list[str], rank: int) -> list[str]:
    """lm-eval's arguments for this rank: on every rank but 0 (tensor-parallel ranks run the same
    requests) without the options that write results, so that one rank writes them."""
    if rank == 0:
        return list(argv)
    drop_value = {"--output_path", "-o", "--wandb_args", "--wandb_config_args", "--hf_hub_log_args"}
    drop_flag = {"--log_samples", "-s"}
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in drop_value:
            skip = "=" not in arg
            continue
        if name in drop_flag:
            continue
        out.append(arg)
    return out


def rolling_windows(tokens: list[int], prefix_token: int, max_len: int) -> list[tuple[list[int], list[int]]]:
    """Disjoint ``(context, continuation)`` windows covering ``tokens``: every token is predicted once, the
    first from ``prefix_token``, later ones from as much preceding text as fits in ``max_len`` inputs."""
    if not tokens:
        return []
    first = min(max_len, len(tokens))
    windows = [([prefix_token], tokens[:first])]
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, max_len)
        end = done + n
        windows.append((tokens[max(end - max_len - 1, 0):end - n], tokens[end - n:end]))
        done = end
    return windows


def cut_at_stop(text: str, stops: list[str]) -> str:
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=len(text))
    return text[:cut]


def _batch_size(value) -> int:
    if isinstance(value, str):
        value = value.split(":")[0]
        return 8 if value == "auto" else int(value)
    return int(value)


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with the ``megaevo`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    rank = int(os.environ.get("RANK", "0"))
    sys.argv = [sys.argv[0], *rank0_argv(sys.argv[1:] if argv is None else argv, rank)]
    try:
        if rank != 0:  # the same results as rank 0's: printed once
            with open(os.devnull, "w") as quiet, redirect_stdout(quiet):
                cli_evaluate()
        else:
            cli_evaluate()
    except UserError as e:
        print(f"megaevo-lm-eval: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
