"""Chat templates (golden ids and loss masks), SFT conversations, `megaevo preprocess --sft` and SFTDataset."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from megaevo import cli
from megaevo.data.indexed import DatasetFormatError
from megaevo.data.preprocess import PreprocessError, preprocess
from megaevo.data.sft import SFTDataset, conversation_of, preprocess_sft
from megaevo.data.templates import (ConversationError, HFChatTemplate, TemplateError, check_messages, get_template,
                                    render)
from megaevo.data.tokenizers import CHAT_TOKENS, load_tokenizer
from megaevo.errors import UserError

SYSTEM = "Be brief."
CONVERSATION = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4, since 2+2 = 4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6 — naïve café."},
]
PROBLEMS = ["What is 12 * 7?", "Solve  x^2 = 4.\nGive both roots.", "東京 ✓ Grüße"]

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def ids_of(tok, *segments) -> list[int]:
    """Each segment encoded on its own (an int is a token id), concatenated: the layout LLaMA-Factory uses."""
    out: list[int] = []
    for s in segments:
        out += [s] if isinstance(s, int) else tok.encode(s)
    return out


def mask_of(tok, *segments) -> list[int]:
    """0/1 per token of ids_of(tok, *segments[i][0]) with segments given as (segment, loss)."""
    return [loss for s, loss in segments for _ in ids_of(tok, s)]


# -- tokenizers ----------------------------------------------------------------------------------

def write_hf_tokenizer(folder: Path, corpus, chat_template: str | None = CHATML, eos: str | None = "<|im_end|>") -> Path:
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": eos}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, corpus_texts) -> Path:
    return write_hf_tokenizer(tmp_path_factory.mktemp("hf"), corpus_texts[:200])


@pytest.fixture(scope="module")
def hf_tok(hf_dir):
    return load_tokenizer(hf_dir)


# -- conversation checks -------------------------------------------------------------------------

@pytest.mark.parametrize("messages,reason", [
    ([{"role": "user", "content": "hi"}], "no assistant turn"),
    ([{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}], "messages[1]: unknown role 'bot'"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": 3}], "messages[1]: content is int"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}],
     "messages[1]: expected an assistant turn, got user"),
    ([{"role": "assistant", "content": "a"}], "messages[0]: expected a user turn"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}],
     "messages[1]: a system message may only come first"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
     "ends with a user turn that has no assistant reply"),
    ([{"role": "user"}], "messages[0] has no 'content'"),
    ([], "no messages"),
    ([{"role": "system", "content": "s"}], "a system message and no turns"),
])
def test_malformed_conversations_say_which_message_and_why(messages, reason):
    with pytest.raises(ConversationError, match=reason.replace("[", r"\[").replace("]", r"\]")):
        check_messages(messages)


def test_input_forms_give_the_same_conversation():
    pair = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert conversation_of({"messages": pair, "id": 3}) == pair
    assert conversation_of({"prompt": "q", "response": "a"}) == pair
    assert conversation_of({"prompt": "q", "response": "a", "system": "s"}) == [{"role": "system", "content": "s"}, *pair]
    assert conversation_of({"prompt": "q", "response": "a", "system": None}) == pair
    assert conversation_of({"problem": "q", "gt_solution": "a", "gt_answer": "4"}) == pair
    with pytest.raises(ConversationError, match="key 'response' missing"):
        conversation_of({"prompt": "q"})
    with pytest.raises(ConversationError, match="'gt_solution' is list, not a string"):
        conversation_of({"problem": "q", "gt_solution": ["a"]})
    with pytest.raises(ConversationError, match=r"no conversation: expected 'messages'.*\(keys: 'text'\)"):
        conversation_of({"text": "q"})


# -- golden layouts ------------------------------------------------------------------------------

def test_evolm_golden_ids_and_mask(spm_tokenizer):
    tok = spm_tokenizer
    eos = tok.eos_id
    ids, mask = get_template("evolm", tok).encode(tok, CONVERSATION)
    segments = [
        ("Be brief.\n", 0), ("Human: What is 2+2?\nAssistant:", 0), ("4, since 2+2 = 4.", 1), (eos, 1),
        ("\n", 0), ("Human: And 3+3?\nAssistant:", 0), ("6 — naïve café.", 1), (eos, 1),
    ]
    assert ids == ids_of(tok, *(s for s, _ in segments))
    assert mask == mask_of(tok, *segments)
    assert tok.decode(ids) == ("Be brief.\nHuman: What is 2+2?\nAssistant:4, since 2+2 = 4.\nHuman: And 3+3?\n"
                               "Assistant:6 — naïve café.")
    assert [i for i, m in zip(ids, mask) if m] == ids_of(tok, "4, since 2+2 = 4.", eos, "6 — naïve café.", eos)
    # No system message: nothing before "Human:", and no BOS anywhere.
    ids, mask = get_template("evolm", tok).encode(tok, CONVERSATION[1:3])
    assert ids == ids_of(tok, "Human: What is 2+2?\nAssistant:", "4, since 2+2 = 4.", eos) and tok.bos_id not in ids
    # The prompt of the second turn is exactly the training ids before its answer.
    t = get_template("evolm", tok)
    prompt = t.prompt_ids(tok, CONVERSATION[:4])
    full, full_mask = t.encode(tok, CONVERSATION)
    assert full[: len(prompt)] == prompt and full[len(prompt):] == ids_of(tok, "6 — naïve café.", eos)
    assert t.render_prompt(CONVERSATION[:4]) == (
        "Be brief.\nHuman: What is 2+2?\nAssistant:4, since 2+2 = 4.</s>\nHuman: And 3+3?\nAssistant:")


@pytest.mark.parametrize("problem", PROBLEMS)
def test_evolm_prompt_ids_equal_the_evaluation_prompt(spm_tokenizer, problem):
    from megaevo.eval.templates import render as eval_render

    tok = spm_tokenizer
    t = get_template("evolm", tok)
    prompt = t.prompt_ids(tok, [{"role": "user", "content": problem}])
    assert eval_render(problem, "evolm") == f"Human: {problem}\nAssistant:" == t.render_prompt(
        [{"role": "user", "content": problem}])
    assert prompt == tok.encode(f"Human: {problem}\nAssistant:")
    ids, mask = t.encode(tok, [{"role": "user", "content": problem}, {"role": "assistant", "content": "42"}])
    assert ids == prompt + tok.encode("42") + [tok.eos_id] and mask == [0] * len(prompt) + [1] * (len(ids) - len(prompt))


def test_chat_golden_ids_and_mask(spm_tokenizer):
    tok = spm_tokenizer
    system, user, assistant, end = (tok.token_to_id(t) for t in CHAT_TOKENS)
    assert len({system, user, assistant, end}) == 4 and None not in (system, user, assistant, end)
    t = get_template("chat", tok)
    ids, mask = t.encode(tok, CONVERSATION)
    segments = [
        (system, 0), (SYSTEM, 0), (end, 0),
        (user, 0), ("What is 2+2?", 0), (end, 0), (assistant, 0), ("4, since 2+2 = 4.", 1), (end, 1),
        (user, 0), ("And 3+3?", 0), (end, 0), (assistant, 0), ("6 — naïve café.", 1), (end, 1),
    ]
    assert ids == ids_of(tok, *(s for s, _ in segments)) and mask == mask_of(tok, *segments)
    assert tok.decode(ids) == ("<|system|>Be brief.<|end|><|user|>What is 2+2?<|end|><|assistant|>4, since 2+2 = 4."
                               "<|end|><|user|>And 3+3?<|end|><|assistant|>6 — naïve café.<|end|>")
    assert tok.eos_id not in ids and tok.bos_id not in ids  # <|end|> closes turns; no EOS, no BOS
    for problem in PROBLEMS:
        one = [{"role": "user", "content": problem}]
        assert t.render_prompt(one) == render(problem, "chat") == f"<|user|>{problem}<|end|><|assistant|>"
        assert t.prompt_ids(tok, one) == [user, *tok.encode(problem), end, assistant] == tok.encode(render(problem, "chat"))
    assert "<|end|>" in t.stop_strings


def test_raw_golden_ids_and_mask(spm_tokenizer):
    tok = spm_tokenizer
    t = get_template("raw", tok)
    ids, mask = t.encode(tok, CONVERSATION)
    segments = [(SYSTEM, 0), ("What is 2+2?", 0), ("4, since 2+2 = 4.", 1), (tok.eos_id, 1),
                ("And 3+3?", 0), ("6 — naïve café.", 1), (tok.eos_id, 1)]
    assert ids == ids_of(tok, *(s for s, _ in segments)) and mask == mask_of(tok, *segments)
    assert t.render_prompt([{"role": "user", "content": PROBLEMS[1]}]) == render(PROBLEMS[1], "raw") == PROBLEMS[1]


def test_hf_golden_ids_and_mask(hf_tok):
    tok = hf_tok
    t = get_template("hf", tok)
    assert isinstance(t, HFChatTemplate) and t.eos_text == "<|im_end|>" and t.bos_text == "<s>"
    ids, mask = t.encode(tok, CONVERSATION)
    segments = [
        ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n", 0),
        ("4, since 2+2 = 4.<|im_end|>\n", 1),
        ("<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n", 0),
        ("6 — naïve café.<|im_end|>\n", 1),
    ]
    assert ids == ids_of(tok, *(s for s, _ in segments)) and mask == mask_of(tok, *segments)
    assert tok.decode(ids) == "".join(s for s, _ in segments)
    im_end = tok.token_to_id("<|im_end|>")
    assert sum(i == im_end for i, m in zip(ids, mask) if m) == 2  # the closing token of each answer is a loss token
    prompt = t.prompt_ids(tok, CONVERSATION[:4])
    assert ids[: len(prompt)] == prompt and all(mask[len(prompt):]) and ids[len(prompt):] == ids_of(tok, segments[3][0])
    assert t.render_prompt(CONVERSATION[:2]) == segments[0][0]


def test_hf_text_equals_transformers_apply_chat_template(hf_dir, hf_tok):
    transformers = pytest.importorskip("transformers")
    reference = transformers.PreTrainedTokenizerFast.from_pretrained(str(hf_dir))
    t = get_template("hf", hf_tok)
    ids, _ = t.encode(hf_tok, CONVERSATION)
    assert hf_tok.decode(ids) == reference.apply_chat_template(CONVERSATION, tokenize=False)
    assert t.render_prompt(CONVERSATION[:4]) == reference.apply_chat_template(CONVERSATION[:4], tokenize=False,
                                                                              add_generation_prompt=True)


def test_hf_template_problems_are_clear(tmp_path, corpus_texts, spm_model, spm_tokenizer):
    bare = load_tokenizer(write_hf_tokenizer(tmp_path / "bare", corpus_texts[:50], chat_template=None))
    with pytest.raises(TemplateError, match="template 'hf' needs the tokenizer's Jinja chat_template.*has none"):
        get_template("hf", bare)
    with pytest.raises(TemplateError, match="template 'hf' needs the tokenizer's Jinja chat_template"):
        get_template("hf", spm_tokenizer)
    with pytest.raises(TemplateError, match="give the tokenizer"):
        get_template("hf")
    # A template that renders earlier turns differently once later ones follow cannot be split into spans.
    last_only = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}{% if loop.last %}{{ '<|im_end|>' }}"
                 "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    shifty = load_tokenizer(write_hf_tokenizer(tmp_path / "shifty", corpus_texts[:50], chat_template=last_only))
    with pytest.raises(ConversationError, match="does not render this conversation incrementally"):
        get_template("hf", shifty).encode(shifty, CONVERSATION)
    strict = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
              + CHATML)
    strict_tok = load_tokenizer(write_hf_tokenizer(tmp_path / "strict", corpus_texts[:50], chat_template=strict))
    with pytest.raises(ConversationError, match="refused the conversation: System role not supported"):
        get_template("hf", strict_tok).encode(strict_tok, CONVERSATION)
    broken = load_tokenizer(write_hf_tokenizer(tmp_path / "broken", corpus_texts[:50], chat_template="{% for %}"))
    with pytest.raises(TemplateError, match="not valid Jinja"):
        get_template("hf", broken)


def test_unknown_template_and_missing_special_tokens(tmp_path, corpus_texts, hf_tok):
    with pytest.raises(TemplateError, match="unknown template 'alpaca': use one of evolm, chat, hf, raw"):
        get_template("alpaca")
    with pytest.raises(UserError, match="unknown template 'alpaca'"):
        render("x", "alpaca")
    with pytest.raises(TemplateError, match=r"template 'chat' needs <\|system\|>, <\|user\|>, <\|assistant\|>, "
                                            r"<\|end\|> as single tokens.*which HFTokenizer\("):
        get_template("chat", hf_tok)
    no_eos = load_tokenizer(write_hf_tokenizer(tmp_path / "noeos", corpus_texts[:50], eos=None))
    assert no_eos.eos_id is None
    for name in ("evolm", "raw"):
        with pytest.raises(TemplateError, match=f"template '{name}' needs an end-of-sequence \\(eos\\) token"):
            get_template(name, no_eos)
        with pytest.raises(TemplateError, match=f"template '{name}' needs an end-of-sequence"):
            get_template(name).encode(no_eos, CONVERSATION)
    # A one-turn prompt has no EOS in it, so it needs none.
    one_turn = [{"role": "user", "content": "hi"}]
    assert get_template("evolm").prompt_ids(no_eos, one_turn) == no_eos.encode("Human: hi\nAssistant:")


def test_evaluation_templates_are_unchanged():
    from megaevo.eval import templates

    assert templates.TEMPLATES == {"evolm": "Human: {problem}\nAssistant:", "chat": "<|user|>{problem}<|end|><|assistant|>",
                                   "raw": "{problem}"}
    assert templates.STOP_STRINGS == {"evolm": ("Human", "Human:", "Assistant", "Assistant:"),
                                      "chat": ("<|user|>", "<|end|>", "<|assistant|>"), "raw": ()}
    for name, fmt in templates.TEMPLATES.items():
        assert templates.render("2 + {x}?", name) == fmt.replace("{problem}", "2 + {x}?")
        assert get_template(name).stop_strings == templates.STOP_STRINGS[name]


# -- preprocess --sft and SFTDataset -------------------------------------------------------------

LINES = [
    {"messages": CONVERSATION},
    {"prompt": "Name a prime.", "response": "7", "system": "Answer in one word."},
    {"problem": "What is 1+1?", "gt_solution": "1+1 = 2, so the answer is $\\boxed{2}$.", "gt_answer": "2"},
    {"messages": CONVERSATION[1:3], "source": "x"},
]


def write_lines(path: Path, objects, extra=()) -> Path:
    lines = [json.dumps(o, ensure_ascii=False) for o in objects]
    for at, line in extra:
        lines.insert(at, line)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_preprocess_round_trip_and_workers_give_identical_files(tmp_path, monkeypatch, spm_model, spm_tokenizer):
    monkeypatch.setattr("megaevo.data.preprocess.CHUNK_LINES", 3)  # several chunks in flight across the workers
    objects = LINES * 5
    src = write_lines(tmp_path / "in.jsonl", objects, extra=[(2, ""), (7, "  ")])
    template = get_template("evolm", spm_tokenizer)
    expected = [template.encode(spm_tokenizer, conversation_of(o)) for o in objects]
    out = {}
    for workers in (1, 2):
        summary = preprocess_sft([src], tmp_path / f"w{workers}" / "sft", str(spm_model), "evolm", workers=workers,
                                 progress=False)
        assert (summary.conversations, summary.skipped, summary.template) == (len(objects), 0, "evolm")
        assert summary.tokens == sum(len(i) for i, _ in expected)
        assert summary.loss_tokens == sum(sum(m) for _, m in expected)
        assert summary.max_tokens == max(len(i) for i, _ in expected)
        assert files(tmp_path / f"w{workers}") == ["sft.bin", "sft.idx", "sft.loss_mask.bin", "sft.sft.json"]
        out[workers] = [(tmp_path / f"w{workers}" / f"sft{ext}").read_bytes()
                        for ext in (".bin", ".idx", ".loss_mask.bin")]
    assert out[1] == out[2]
    ds = SFTDataset(tmp_path / "w2" / "sft")
    assert (len(ds), ds.name, ds.template) == (len(objects), "sft", "evolm")
    assert ds.lengths.dtype == np.int64 and ds.lengths.tolist() == [len(i) for i, _ in expected]
    for k, (ids, mask) in enumerate(expected):
        tokens, loss = ds[k]
        assert tokens.dtype == np.int64 and loss.dtype == np.uint8 and tokens.shape == loss.shape
        assert tokens.tolist() == ids and loss.tolist() == mask
    assert ds[-1][0].tolist() == expected[-1][0]
    ds.validate()
    meta = json.loads((tmp_path / "w2" / "sft.sft.json").read_text())
    assert {k: meta[k] for k in ("format", "template", "conversations", "tokens", "loss_tokens", "loss_mask")} == {
        "format": "megaevo-sft", "template": "evolm", "conversations": len(objects), "tokens": summary.tokens,
        "loss_tokens": summary.loss_tokens, "loss_mask": "sft.loss_mask.bin"}
    with pytest.raises(IndexError):
        ds[len(objects)]


def test_hf_template_through_the_worker_pool(tmp_path, hf_dir, hf_tok):
    src = write_lines(tmp_path / "in.jsonl", LINES * 3)
    preprocess_sft([src], tmp_path / "out", str(hf_dir), "hf", workers=2, progress=False)
    ds = SFTDataset(tmp_path / "out")
    t = get_template("hf", hf_tok)
    assert ds.template == "hf"
    for k, o in enumerate(LINES * 3):
        ids, mask = t.encode(hf_tok, conversation_of(o))
        assert ds[k][0].tolist() == ids and ds[k][1].tolist() == mask


@pytest.mark.parametrize("line,reason", [
    (json.dumps({"messages": [{"role": "user", "content": "hi"}]}), "no assistant turn"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]}),
     "messages[1]: unknown role 'robot'"),
    (json.dumps({"prompt": "hi"}), "key 'response' missing"),
    ("{broken", "invalid JSON"),
])
@pytest.mark.parametrize("workers", [1, 2])
def test_a_bad_line_fails_naming_file_and_line_and_writes_nothing(tmp_path, spm_model, line, reason, workers):
    src = write_lines(tmp_path / "in.jsonl", LINES * 2, extra=[(5, line)])
    with pytest.raises(PreprocessError) as e:
        preprocess_sft([src], tmp_path / "out" / "sft", str(spm_model), "chat", workers=workers, progress=False)
    assert str(e.value).startswith(f"{src}:6: {reason}") and "--on-error skip" in str(e.value)
    assert "\n" not in str(e.value)
    assert files(tmp_path) == ["in.jsonl"]


def test_skip_mode_counts_bad_lines(tmp_path, spm_model):
    src = write_lines(tmp_path / "in.jsonl", LINES, extra=[(1, json.dumps({"text": "x"})), (3, "[1, 2]")])
    summary = preprocess_sft([src], tmp_path / "out", str(spm_model), "raw", on_error="skip", progress=False)
    assert (summary.conversations, summary.skipped) == (len(LINES), 2)
    assert summary.skipped_locations[0].startswith(f"{src}:2: no conversation") and "skipped" in summary.describe()
    assert len(SFTDataset(tmp_path / "out")) == len(LINES)


def test_template_problems_fail_before_any_work(tmp_path, spm_model, hf_dir):
    src = write_lines(tmp_path / "in.jsonl", LINES)
    with pytest.raises(TemplateError, match="unknown template 'vicuna'"):
        preprocess_sft([src], tmp_path / "out", str(spm_model), "vicuna", progress=False)
    with pytest.raises(TemplateError, match=r"template 'chat' needs <\|system\|>"):
        preprocess_sft([src], tmp_path / "out", str(hf_dir), "chat", progress=False)
    with pytest.raises(PreprocessError, match="no conversations"):
        preprocess_sft([write_lines(tmp_path / "blank.jsonl", [], extra=[(0, "")])], tmp_path / "out", str(spm_model),
                       progress=False)
    assert files(tmp_path) == ["blank.jsonl", "in.jsonl"]


def test_mask_file_missing_or_of_the_wrong_size(tmp_path, spm_model):
    src = write_lines(tmp_path / "in.jsonl", LINES)
    preprocess_sft([src], tmp_path / "sft", str(spm_model), progress=False)
    mask = tmp_path / "sft.loss_mask.bin"
    data = mask.read_bytes()
    mask.write_bytes(data[:-1])
    wrong = rf"{mask}: {len(data) - 1:,} bytes, but .*sft.bin holds {len(data):,} tokens"
    with pytest.raises(DatasetFormatError, match=wrong):
        SFTDataset(tmp_path / "sft")
    mask.unlink()
    with pytest.raises(DatasetFormatError, match="loss-mask file not found"):
        SFTDataset(tmp_path / "sft")
    # A pre-training dataset is not an SFT dataset.
    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({"text": "hello world"}) + "\n")
    preprocess([text], tmp_path / "pt", str(spm_model), progress=False)
    with pytest.raises(DatasetFormatError, match=r"pt.loss_mask.bin: loss-mask file not found"):
        SFTDataset(tmp_path / "pt")


def test_cli_preprocess_sft(tmp_path, spm_model, capsys):
    src = write_lines(tmp_path / "in.jsonl", LINES)
    prefix = tmp_path / "cli"
    assert cli.main(["preprocess", "--sft", "--template", "chat", "--input", str(src), "--tokenizer", str(spm_model),
                     "--output-prefix", str(prefix), "--workers", "2", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "conversations  4" in out and "loss tokens" in out and "template chat" in out
    ds = SFTDataset(prefix)
    assert ds.template == "chat" and len(ds) == 4
    assert cli.main(["preprocess", "--sft", "--input", str(src), "--tokenizer", str(spm_model),
                     "--output-prefix", str(prefix), "--quiet", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["template"] == "evolm" and summary["conversations"] == 4 and summary["loss_tokens"] > 0
    # Flags that do not go together, and a bad line: one line each, exit code 2.
    for argv, message in [
        (["--template", "chat"], "--template applies only with --sft"),
        (["--sft", "--json-key", "body"], "--json-key does not apply with --sft"),
        (["--sft", "--append-eod"], "--append-eod does not apply with --sft"),
    ]:
        assert cli.main(["preprocess", "--input", str(src), "--tokenizer", str(spm_model), "--output-prefix",
                         str(tmp_path / "x"), "--quiet", *argv]) == 2
        assert message in capsys.readouterr().err
    no_answer = json.dumps({"messages": [{"role": "user", "content": "q"}]})
    bad = write_lines(tmp_path / "bad.jsonl", LINES, extra=[(2, no_answer)])
    assert cli.main(["preprocess", "--sft", "--input", str(bad), "--tokenizer", str(spm_model), "--output-prefix",
                     str(tmp_path / "x"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{bad}:3: no assistant turn" in err
    with pytest.raises(SystemExit):
        cli.main(["preprocess", "--sft", "--template", "vicuna", "--input", str(src), "--tokenizer", str(spm_model),
                  "--output-prefix", str(tmp_path / "x")])
    assert "invalid choice: 'vicuna'" in capsys.readouterr().err
    assert not any(p.name.startswith("x.") for p in tmp_path.iterdir())


def test_evaluation_renders_hf_prompts_with_the_tokenizers_chat_template(hf_tok, tmp_path):
    """`megaevo eval --template hf`: the prompt is the tokenizer's chat template around the problem,
    exactly as SFT laid out the user turn, and the template's stop strings end completions."""
    pytest.importorskip("math_verify")
    from megaevo.eval.generative import run_generative
    from megaevo.eval.tasks import EvalError, load_generative

    class Completion:
        def __init__(self, text):
            self.text, self.token_ids, self.finish_reason = text, [1], "stop"

    class Model:
        tokenizer = hf_tok
        calls = []

        def generate(self, prompts, params):
            self.calls.append((list(prompts), params))
            return [[Completion("\\boxed{4}")] for _ in prompts]

    path = tmp_path / "Toy.jsonl"
    path.write_text(json.dumps({"id": "p0", "problem": "What is 2 + 2?", "gt_solution": None, "gt_answer": "4"}) + "\n")
    task = load_generative(path)
    model = Model()
    run_generative(task, model, progress=False, template="hf", workers=0)
    (prompts, params), = model.calls
    chat = get_template("hf", hf_tok)
    user = [{"role": "user", "content": "What is 2 + 2?"}]
    assert prompts == [chat.render_prompt(user)]
    assert hf_tok.encode(prompts[0]) == chat.prompt_ids(hf_tok, user)
    assert params.stop == chat.stop_strings
    with pytest.raises(EvalError, match="--template hf .* needs the model's tokenizer"):
        run_generative(task, type("Bare", (), {"generate": Model.generate, "calls": []})(), progress=False,
                       template="hf", workers=0)


# -- formats: alpaca, sharegpt, column maps; shards ----------------------------------------------

def _sft_files(prefix: Path) -> list[bytes]:
    return [Path(str(prefix) + s).read_bytes() for s in (".bin", ".idx", ".loss_mask.bin")]


def _write_lines(path: Path, objects) -> Path:
    path.write_text("".join(json.dumps(o, ensure_ascii=False) + "\n" for o in objects), encoding="utf-8")
    return path


# (messages, alpaca, sharegpt, column-map row) of the same conversations
FORMAT_CASES = [
    ([{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Add these.\n2 and 3"},
      {"role": "assistant", "content": "5"}],
     {"instruction": "Add these.", "input": "2 and 3", "output": "5", "system": SYSTEM},
     {"system": SYSTEM, "conversations": [{"from": "human", "value": "Add these.\n2 and 3"},
                                          {"from": "gpt", "value": "5"}]},
     {"query": "Add these.\n2 and 3", "answer": "5", "sys": SYSTEM}),
    ([{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
      {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "6 — naïve café."}],
     {"instruction": "And 3+3?", "input": "", "output": "6 — naïve café.", "history": [["What is 2+2?", "4"]]},
     {"conversations": [{"from": "user", "value": "What is 2+2?"}, {"from": "assistant", "value": "4"},
                        {"from": "human", "value": "And 3+3?"}, {"from": "gpt", "value": "6 — naïve café."}]},
     None),
    ([{"role": "user", "content": PROBLEMS[2]}, {"role": "assistant", "content": PROBLEMS[1]}],
     {"instruction": PROBLEMS[2], "output": PROBLEMS[1]},
     {"conversations": [{"from": "human", "value": PROBLEMS[2]}, {"from": "gpt", "value": PROBLEMS[1]}]},
     {"query": PROBLEMS[2], "answer": PROBLEMS[1], "sys": None}),
]


@pytest.mark.parametrize("template", ["evolm", "chat"])
def test_alpaca_sharegpt_and_column_maps_match_messages(tmp_path, spm_model, template):
    tok = str(spm_model)
    run = lambda name, rows, **kw: preprocess_sft([_write_lines(tmp_path / f"{name}.jsonl", rows)], tmp_path / name,
                                                  tok, template, progress=False, **kw)
    run("messages", [{"messages": m} for m, *_ in FORMAT_CASES], fmt="messages")
    want = _sft_files(tmp_path / "messages")
    run("alpaca", [a for _, a, _, _ in FORMAT_CASES], fmt="alpaca")
    run("alpaca_auto", [a for _, a, _, _ in FORMAT_CASES])
    run("sharegpt", [s for _, _, s, _ in FORMAT_CASES], fmt="sharegpt")
    for name in ("alpaca", "alpaca_auto", "sharegpt"):
        assert _sft_files(tmp_path / name) == want, name
    # a column map covers single-turn rows (cases 0 and 2), here from a parquet file
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    single = [FORMAT_CASES[0], FORMAT_CASES[2]]
    run("messages1", [{"messages": m} for m, *_ in single])
    pq.write_table(pa.Table.from_pylist([c for *_, c in single]), tmp_path / "metamath.parquet", row_group_size=1)
    preprocess_sft([tmp_path / "metamath.parquet"], tmp_path / "cols", tok, template, progress=False,
                   columns="prompt=query,response=answer,system=sys")
    assert _sft_files(tmp_path / "cols") == _sft_files(tmp_path / "messages1")


def test_format_errors_name_the_problem(tmp_path, spm_model):
    with pytest.raises(ConversationError, match="ambiguous line: it could be messages or prompt/response"):
        conversation_of({"messages": [], "prompt": "a", "response": "b"})
    with pytest.raises(ConversationError, match="could be prompt/response or alpaca"):
        conversation_of({"instruction": "a", "output": "b", "response": "c"})
    assert conversation_of({"instruction": "a", "output": "b", "response": "c"}, "alpaca")[-1]["content"] == "b"
    with pytest.raises(ConversationError, match="role 'observation' \\(a tool turn\\) is not supported"):
        conversation_of({"conversations": [{"from": "observation", "value": "x"}]}, "sharegpt")
    with pytest.raises(ConversationError, match="key 'conversations' missing"):
        conversation_of({"messages": []}, "sharegpt")
    tool = [{"role": "user", "content": "hi"}, {"role": "tool", "content": "{}"}, {"role": "assistant", "content": "ok"}]
    src = _write_lines(tmp_path / "tool.jsonl", [{"messages": tool}])
    with pytest.raises(PreprocessError, match=r"tool\.jsonl:1: messages\[1\]: role 'tool' \(a tool result\) is not "
                                              r"supported"):
        preprocess_sft([src], tmp_path / "out", str(spm_model), progress=False)
    for columns, match in (("prompt=q", "needs response=COLUMN"), ("prompt=q,answer=a,response=r", "unknown role"),
                           ("prompt", "not ROLE=COLUMN")):
        with pytest.raises(PreprocessError, match=match):
            preprocess_sft([src], tmp_path / "out", str(spm_model), columns=columns, progress=False)
    with pytest.raises(PreprocessError, match="exclusive"):
        preprocess_sft([src], tmp_path / "out", str(spm_model), fmt="alpaca", columns="prompt=q,response=r",
                       progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tool.jsonl"]


def test_cli_sft_formats_shards_and_merge(monkeypatch, tmp_path, spm_model, capsys):
    monkeypatch.setattr("megaevo.data.readers.PIECE_BYTES", 300)  # the file is cut into byte ranges
    rows = [a for _, a, _, _ in FORMAT_CASES] * 4
    src = _write_lines(tmp_path / "alpaca.jsonl", rows)
    base = ["preprocess", "--sft", "--template", "chat", "--tokenizer", str(spm_model), "--input", str(src),
            "--format", "alpaca", "--quiet"]
    assert cli.main(base + ["--output-prefix", str(tmp_path / "whole")]) == 0
    for i in range(3):
        assert cli.main(base + ["--output-prefix", str(tmp_path / f"s{i}"), "--shard", f"{i}/3"]) == 0
    capsys.readouterr()
    assert cli.main(["merge", "--input", *(str(tmp_path / f"s{i}") for i in range(3)),
                     "--output-prefix", str(tmp_path / "merged")]) == 0
    assert "12 conversations" in capsys.readouterr().out
    assert all(len(SFTDataset(tmp_path / f"s{i}")) for i in range(3))
    assert _sft_files(tmp_path / "merged") == _sft_files(tmp_path / "whole")
    whole, merged = (json.loads((tmp_path / f"{n}.sft.json").read_text()) for n in ("whole", "merged"))
    assert (merged.pop("loss_mask"), whole.pop("loss_mask")) == ("merged.loss_mask.bin", "whole.loss_mask.bin")
    assert merged == whole
    preprocess([_write_lines(tmp_path / "text.jsonl", [{"text": "a b c"}])], tmp_path / "plain", str(spm_model),
               progress=False)
    assert cli.main(["merge", "--input", str(tmp_path / "whole"), str(tmp_path / "plain"),
                     "--output-prefix", str(tmp_path / "m2")]) == 2
    assert "cannot merge SFT datasets (with a loss mask) with text datasets" in capsys.readouterr().err
    assert cli.main(["preprocess", "--tokenizer", str(spm_model), "--input", str(src), "--output-prefix",
                     str(tmp_path / "t"), "--format", "alpaca"]) == 2
    assert "--format applies only with --sft" in capsys.readouterr().err
