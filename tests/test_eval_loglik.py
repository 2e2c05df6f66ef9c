"""Log-likelihood evaluation: multiple choice, language-modelling loss and the lm-evaluation-harness adapter."""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from megaevo.data.indexed import IndexedDatasetWriter
from megaevo.errors import UserError
from megaevo.eval import lm_loss, multiple_choice
from megaevo.model.args import ModelArgs
from megaevo.model.llama import build_stage

ROOT = Path(__file__).resolve().parent.parent
TASK_DIR = ROOT / "tests" / "data" / "lmeval_task"
MC_FILE = TASK_DIR / "mc_tiny.jsonl"


class PieceTokenizer:
    """Words with their leading space as tokens, so a context's trailing space changes the split."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.eos_id = 0
        self.pieces = {"</s>": 0}

    def encode(self, text: str) -> list[int]:
        ids = []
        for piece in re.findall(r" ?[^ ]+| +", text):
            if piece not in self.pieces:
                self.pieces[piece] = len(self.pieces)
                assert len(self.pieces) <= self.vocab_size
            ids.append(self.pieces[piece])
        return ids

    def decode(self, ids) -> str:
        inverse = {i: p for p, i in self.pieces.items()}
        return "".join(inverse[int(i)] for i in ids)


class TinyModel:
    """The model interface of ``megaevo.load`` over one pipeline stage built in memory."""

    def __init__(self, max_seq_len: int = 24, vocab_size: int = 300):
        self.args = ModelArgs(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_heads=2, num_kv_heads=1,
                              vocab_size=vocab_size, max_seq_len=max_seq_len, vocab_pad_multiple=8)
        torch.manual_seed(0)
        self.stage = build_stage(self.args, seed=3).eval()
        with torch.no_grad():  # a sharper output distribution than the init's, so choices differ clearly
            self.stage.output.weight.mul_(40)
        self.tokenizer = PieceTokenizer(vocab_size)
        self.device = torch.device("cpu")

    def forward(self, tokens):
        with torch.no_grad():
            return self.stage(tokens)[..., :self.args.vocab_size].float()

    def logprobs(self, tokens, labels):
        with torch.no_grad():
            return -self.stage(tokens, labels).float()


@pytest.fixture(scope="module")
def model():
    return TinyModel()


def hand_loglik(model, context: str, choice: str) -> float:
    """One unbatched, unpadded sequence per choice, read from full log-softmaxed logits."""
    tok = model.tokenizer
    cont = " " + choice
    stripped = context.rstrip()
    cont, context = context[len(stripped):] + cont, stripped
    ctx_enc = tok.encode(context)
    cont_enc = tok.encode(context + cont)[len(ctx_enc):]
    full = (ctx_enc + cont_enc)[-(model.args.max_seq_len + 1):]
    logp = torch.log_softmax(model.forward(torch.tensor([full[:-1]]))[0].double(), -1)
    n = len(cont_enc)
    return sum(float(logp[len(full) - 1 - n + k, full[len(full) - n + k]]) for k in range(n))


def test_multiple_choice_equals_hand_computation(model):
    task = multiple_choice.load_task(MC_FILE)
    assert task.name == "mc_tiny" and len(task.questions) == 8
    assert len(model.tokenizer.encode(task.questions[5].context)) > model.args.max_seq_len  # left-truncated
    out = task.run(model, batch_size=3, progress=False)
    acc = acc_norm = 0
    for q, sample in zip(task.questions, out["samples"]):
        expected = [hand_loglik(model, q.context, c) for c in q.choices]
        np.testing.assert_allclose(sample["loglikelihoods"], expected, rtol=1e-4, atol=1e-4)
        pred = int(np.argmax(expected))
        pred_norm = int(np.argmax(np.array(expected) / [len(c) for c in q.choices]))
        assert (sample["id"], sample["pred"], sample["pred_norm"], sample["gold"]) == (q.id, pred, pred_norm, q.gold)
        acc += pred == q.gold
        acc_norm += pred_norm == q.gold
    assert out["metrics"] == {"n": 8, "acc": acc / 8, "acc_norm": acc_norm / 8}
    assert out["metrics"]["acc"] != out["metrics"]["acc_norm"]  # this model and file tell the two apart
    # Batch size and order do not change a score.
    again = task.run(model, batch_size=1, progress=False)
    for a, b in zip(out["samples"], again["samples"]):
        np.testing.assert_allclose(a["loglikelihoods"], b["loglikelihoods"], rtol=1e-5, atol=1e-5)
    assert multiple_choice.load_task(MC_FILE, limit=3).run(model, progress=False)["metrics"]["n"] == 3


def test_encode_pair_follows_lm_eval():
    tok = PieceTokenizer(100)
    # The context's trailing space moves to the continuation, split from the whole string's tokens.
    assert multiple_choice.encode_pair(tok, "It is ", " cold") == (tok.encode("It is"), tok.encode("  cold"))
    assert tok.decode(multiple_choice.encode_pair(tok, "It is ", " cold")[1]) == "  cold"
    assert multiple_choice.encode_pair(tok, "", " cold") == ([tok.eos_id], tok.encode(" cold"))


@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    ('["a", "b"]', "expected a JSON object"),
    ('{"context": "x", "choices": ["a", "b"]}', "missing gold"),
    ('{"context": "x", "choices": "ab", "gold": 0}', "choices must be a list"),
    ('{"context": "x", "choices": ["a", "b"], "gold": 2}', "gold must be an index"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"context": "c", "choices": ["a", "b"], "gold": 1}\n\n' + line + "\n")
    with pytest.raises(UserError) as err:
        multiple_choice.load_task(path)
    text = str(err.value)
    assert text.startswith(f"{path}:3: ") and message in text and "\n" not in text


def _write_docs(prefix, docs):
    with IndexedDatasetWriter(prefix, dtype=np.uint16) as w:
        for d in docs:
            w.add_document(d)


def _direct_nll(model, doc, seq_len) -> tuple[float, int]:
    """Summed next-token NLL of one document, unbatched, in windows of seq_len inputs overlapping by one."""
    nll, count = 0.0, 0
    for start in range(0, len(doc) - 1, seq_len):
        w = torch.tensor(doc[start:start + seq_len + 1].astype(np.int64))
        logp = torch.log_softmax(model.forward(w[None, :-1])[0].double(), -1)
        nll -= float(logp.gather(-1, w[1:, None]).sum())
        count += len(w) - 1
    return nll, count


def test_loss_task_equals_direct_computation(tmp_path, model):
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, model.args.vocab_size, size=n) for n in (7, 30, 1, 12, 19)]
    _write_docs(tmp_path / "val", docs)
    seq_len = 10
    task = lm_loss.load_task(tmp_path / "val", limit=4, seq_len=seq_len)
    out = task.run(model, batch_size=2, progress=False)
    per_doc = [_direct_nll(model, d, seq_len) for d in docs[:4]]
    nll, count = sum(n for n, _ in per_doc), sum(c for _, c in per_doc)
    assert out["metrics"]["tokens"] == count == sum(len(d) - 1 for d in docs[:4])
    assert out["metrics"]["n"] == sum(math.ceil((len(d) - 1) / seq_len) for d in docs[:4])
    assert out["metrics"]["loss"] == pytest.approx(nll / count, rel=1e-5)
    assert out["metrics"]["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    # Without seq_len the model's max_seq_len is the window.
    full = lm_loss.load_task(tmp_path / "val").run(model, progress=False)["metrics"]
    assert full["tokens"] == sum(len(d) - 1 for d in docs)
    with pytest.raises(UserError, match="exceeds the model's max_seq_len"):
        lm_loss.load_task(tmp_path / "val", seq_len=99).run(model, progress=False)


def test_loss_windows_stay_within_a_document(tmp_path, model):
    """Two documents score as each alone: no window reads one document's tokens as context for the next."""
    rng = np.random.default_rng(1)
    a, b = rng.integers(1, model.args.vocab_size, size=13), rng.integers(1, model.args.vocab_size, size=9)
    _write_docs(tmp_path / "ab", [a, b])
    _write_docs(tmp_path / "a", [a])
    _write_docs(tmp_path / "b", [b])
    seq_len = 5
    task = lm_loss.load_task(tmp_path / "ab", seq_len=seq_len)
    both = task.run(model, batch_size=3, progress=False)
    alone = [lm_loss.load_task(tmp_path / n, seq_len=seq_len).run(model, progress=False)["metrics"] for n in "ab"]
    assert both["metrics"]["tokens"] == len(a) - 1 + len(b) - 1 == sum(m["tokens"] for m in alone)
    nll = sum(m["loss"] * m["tokens"] for m in alone)
    assert both["metrics"]["loss"] == pytest.approx(nll / both["metrics"]["tokens"], rel=1e-6)
    assert {s["document"] for s in both["samples"]} == {0, 1}
    for doc, window in task.windows(seq_len):
        source = task.documents[doc]
        assert any(np.array_equal(source[s:s + len(window)], window) for s in range(len(source)))


def test_loss_task_needs_a_document_of_two_tokens(tmp_path):
    _write_docs(tmp_path / "short", [np.array([5]), np.array([7])])
    with pytest.raises(UserError, match=r"short\.idx: needs a document of at least two tokens"):
        lm_loss.load_task(tmp_path / "short")


def test_rolling_windows_predict_every_token_once():
    lm_eval_adapter = pytest.importorskip("megaevo.eval.lm_eval_adapter")
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    for n in (0, 1, 4, 5, 9, 10, 23):
        tokens = list(range(100, 100 + n))
        ours = lm_eval_adapter.rolling_windows(tokens, 0, 4)
        theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, 0, 4, 1)]
        assert ours == theirs
        assert [t for _, cont in ours for t in cont] == tokens


def test_adapter_loglikelihood_and_rolling(model):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from megaevo.eval.lm_eval_adapter import MegaevoLM

    lm = MegaevoLM(model=model, batch_size=2)

    def req(kind, args):
        return Instance(request_type=kind, doc={}, arguments=args, idx=0)

    ll = lm.loglikelihood([req("loglikelihood", ("The cat sat on the", " mat"))], disable_tqdm=True)
    assert ll[0][0] == pytest.approx(hand_loglik(model, "The cat sat on the", "mat"), abs=1e-4)
    # is_greedy: whether every continuation token is the argmax.
    ctx = model.tokenizer.encode("The cat sat")
    first = int(model.forward(torch.tensor([ctx]))[0, -1].argmax())
    second = int(model.forward(torch.tensor([ctx + [first]]))[0, -1].argmax())
    other = (second + 1) % model.args.vocab_size
    scored = multiple_choice.score_requests(model, [(ctx, [first, second]), (ctx, [first, other])], greedy=True)
    assert [g for _, g in scored] == [True, False]
    text = " ".join(f"w{i}" for i in range(60))
    rolling = lm.loglikelihood_rolling([req("loglikelihood_rolling", (text,))], disable_tqdm=True)[0]
    ids = [model.tokenizer.eos_id] + model.tokenizer.encode(text)
    direct = 0.0
    L = model.args.max_seq_len
    done = 1
    while done < len(ids):  # windows as lm-eval cuts them, each read in full from the logits
        end = min(done + L, len(ids))
        start = max(end - L - 1, 0)
        logp = torch.log_softmax(model.forward(torch.tensor([ids[start:end - 1]]))[0].double(), -1)
        direct += sum(float(logp[j - 1 - start, ids[j]]) for j in range(done, end))
        done = end
    assert rolling == pytest.approx(direct, abs=1e-3)


@pytest.mark.slow
def test_lm_eval_task_matches_own_scorer(model, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.chdir(ROOT)  # the task's data_files path is relative to the repository root
    import lm_eval
    from lm_eval.tasks import TaskManager

    from megaevo.eval.lm_eval_adapter import MegaevoLM

    results = lm_eval.simple_evaluate(model=MegaevoLM(model=model, batch_size=4), tasks=["megaevo_mc_tiny"],
                                      task_manager=TaskManager(include_path=str(TASK_DIR)), log_samples=False)
    theirs = results["results"]["megaevo_mc_tiny"]
    ours = multiple_choice.load_task(MC_FILE).run(model, progress=False)["metrics"]
    assert theirs["acc,none"] == pytest.approx(ours["acc"])
    assert theirs["acc_norm,none"] == pytest.approx(ours["acc_norm"])


def test_adapter_generate_until(model):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from megaevo.eval.lm_eval_adapter import MegaevoLM
    from megaevo.inference import Completion

    calls = []

    class Generating(TinyModel):
        def generate(self, prompts, params):
            calls.append((prompts, params))
            return [[Completion(prompt_token_ids=p, token_ids=[1, 2], text="The answer is 4.\nQuestion: next")]
                    for p in prompts]

    gen = Generating()
    gen.tokenizer = model.tokenizer
    lm = MegaevoLM(model=gen, batch_size=2)
    long = " ".join(f"x{i}" for i in range(40))
    reqs = [Instance(request_type="generate_until", doc={}, idx=0, arguments=(ctx, kwargs)) for ctx, kwargs in [
        ("Q: 2+2?", {"until": ["Question:"], "max_gen_toks": 8, "do_sample": False}),
        (long, {"until": ["Question:"], "max_gen_toks": 8, "do_sample": False}),
        ("Q: 3+1?", {"until": "\n", "max_gen_toks": 4, "temperature": 0.5}),
    ]]
    assert lm.generate_until(reqs, disable_tqdm=True) == ["The answer is 4.\n", "The answer is 4.\n",
                                                          "The answer is 4."]
    (p1, params1), (p2, params2) = calls
    assert params1.stop == ("Question:",) and params1.max_new_tokens == 8 and params1.temperature == 0.0
    assert p1[0] == model.tokenizer.encode("Q: 2+2?") and len(p1[1]) == model.args.max_seq_len - 8
    assert p1[1] == model.tokenizer.encode(long)[-(model.args.max_seq_len - 8):]
    assert params2.stop == ("\n",) and params2.max_new_tokens == 4 and params2.temperature == 0.5
