"""Shared fixtures, and the test environment set before any test module is imported."""
from __future__ import annotations

import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    # Triton's CPU interpreter, switched on before any Triton kernel is defined (kernels are
    # defined at import), so that the Triton kernels run and are compared on CPU tensors.
    # Processes started by the tests inherit it.
    os.environ["TRITON_INTERPRET"] = "1"

@pytest.fixture(autouse=True)
def _fresh_logging():
    """Each test starts with megaevo's logging unconfigured (a test may call setup_logging)."""
    from megaevo.log import reset_logging

    yield
    reset_logging()


_SYLLABLES = "ka lo mi ne ru sa te vo an el is or un ba de fi go hu ja".split()


def make_texts(n: int, seed: int = 0) -> list[str]:
    """n small seeded documents: pseudo-English sentences, some with code, digits and non-ASCII text."""
    rng = random.Random(seed)
    words = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(300)]
    texts = []
    for i in range(n):
        sentences = [" ".join(rng.choices(words, k=rng.randint(3, 12))).capitalize() + "." for _ in range(rng.randint(1, 4))]
        text = " ".join(sentences)
        if i % 5 == 0:
            text += f"\n\ndef f{i}(x):\n    return x * {rng.randint(0, 99999)}\n"
        if i % 7 == 0:
            text += " Grüße, naïve café — 東京 ✓"
        texts.append(text)
    return texts


@pytest.fixture(scope="session")
def corpus_texts() -> list[str]:
    return make_texts(400)


@pytest.fixture(scope="session")
def spm_model(tmp_path_factory, corpus_texts):
    """Path of a small SentencePiece model (vocab 600) trained once per session on corpus_texts."""
    import json

    from megaevo.data.tokenizers import train_sentencepiece

    d = tmp_path_factory.mktemp("spm")
    src = d / "corpus.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus_texts), encoding="utf-8")
    return train_sentencepiece([str(src)], vocab_size=600, output_prefix=str(d / "tok"))


@pytest.fixture(scope="session")
def spm_tokenizer(spm_model):
    from megaevo.data.tokenizers import SentencePieceTokenizer

    return SentencePieceTokenizer(spm_model)


@pytest.fixture(scope="module")
def setup(spm_model, tmp_path_factory):
    """An RL setup (tokenizer and prompts file) for tests/helpers.py's rl_config."""
    from helpers import make_rl_setup

    return make_rl_setup(spm_model, tmp_path_factory.mktemp("rl"))


@pytest.fixture(scope="module")
def base_checkpoint(setup, tmp_path_factory):
    """A one-step GRPO run's checkpoint: the starting point of PPO runs."""
    from helpers import rl_config, rl_fit

    out = tmp_path_factory.mktemp("base")
    rl_fit(rl_config(setup, out, **{"train.iters": 1}))
    return out / "checkpoints" / "iter_0000001"
