"""SentencePiece training, the tokenizer interface, Hugging Face tokenizer.json loading."""
from __future__ import annotations

import gzip
import json
import pickle
import random
import sys

import pytest
from hypothesis import given, settings, strategies as st

from megaevo.data.tokenizers import (
    CHAT_TOKENS,
    HFTokenizer,
    SentencePieceTokenizer,
    TokenizerError,
    load_tokenizer,
    split_text,
    train_sentencepiece,
)

ROUND_TRIP = [
    "Hello, world!",
    "  leading and trailing spaces  ",
    "emoji 😀🎉 and CJK 東京 and Grüße, ünïcödé",
    "def f(x):\n    if x:\n\t\treturn [1, 2]\n\n    return None\n",
    "numbers 3.14159 and 2024-01-31 and 1,000,000",
    "line\r\nwindows\x00nul\u200bzero-width",
    "",
    "<|user|>hi<|end|><|assistant|>hello<|end|>",
]


def test_special_token_ids_and_pieces(spm_tokenizer):
    tok = spm_tokenizer
    assert tok.vocab_size == 600
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.eod_id) == (1, 2, 3, 2)
    assert [tok.token_to_id(t) for t in ("<unk>", "<s>", "</s>", "<pad>")] == [0, 1, 2, 3]
    assert [tok.token_to_id(t) for t in CHAT_TOKENS] == [4, 5, 6, 7]
    assert tok.token_to_id("<0x41>") is not None  # byte-fallback pieces are in the vocabulary
    assert tok.token_to_id("no-such-piece") is None
    for i, t in enumerate(CHAT_TOKENS, start=4):
        assert tok.encode(t) == [i]
        assert tok.encode(f"x{t}y")[1:-1] == [i]


def test_encode_adds_no_bos_or_eos(spm_tokenizer):
    ids = spm_tokenizer.encode("hello")
    assert ids and 1 not in ids and 2 not in ids
    assert spm_tokenizer.encode("") == []


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(spm_tokenizer, text):
    assert spm_tokenizer.decode(spm_tokenizer.encode(text)) == text


def test_concatenated_encodings_decode_to_concatenated_text(spm_tokenizer):
    a, b = "first part", " second part"
    assert spm_tokenizer.decode(spm_tokenizer.encode(a) + spm_tokenizer.encode(b)) == a + b


def test_digits_are_split_and_unseen_bytes_fall_back(spm_tokenizer):
    tok = spm_tokenizer
    assert [tok.decode([i]) for i in tok.encode("90210")] == list("90210")
    ids = tok.encode("🦜")  # never seen in training: four UTF-8 byte pieces
    assert len(ids) == 4 and tok.token_to_id("<0xF0>") == ids[0]


def test_pickle_keeps_the_model(spm_tokenizer):
    copy = pickle.loads(pickle.dumps(spm_tokenizer))
    assert copy.path == spm_tokenizer.path
    text = ROUND_TRIP[2]
    assert copy.encode(text) == spm_tokenizer.encode(text)


def test_training_from_text_and_gzip_is_atomic_and_deterministic(tmp_path, corpus_texts):
    lines = [line for t in corpus_texts for line in t.split("\n") if line]
    (tmp_path / "a.txt").write_text("\n".join(lines[:1000]) + "\n", encoding="utf-8")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"body": t}) + "\n" for t in corpus_texts[:100])
    inputs = [str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl.gz")]
    models = []
    for name in ("one", "two"):
        model = train_sentencepiece(inputs, 400, str(tmp_path / "out" / name), json_key="body", max_sentences=500, seed=7)
        assert model == tmp_path / "out" / f"{name}.model"
        models.append(model.with_suffix(".vocab").read_bytes())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["one.model", "one.vocab", "two.model", "two.vocab"]
    assert models[0] == models[1]  # same pieces and scores
    assert SentencePieceTokenizer(tmp_path / "out" / "one.model").vocab_size == 400


def test_training_reads_zst_and_parquet_as_it_reads_jsonl(tmp_path, corpus_texts):
    """Tokenizer training reads its inputs through the same readers as preprocessing: the same texts kept as
    jsonl, jsonl.zst or parquet train the same tokenizer."""
    zstandard = pytest.importorskip("zstandard")
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    texts = corpus_texts[:150]
    body = "".join(json.dumps({"body": t}) + "\n" for t in texts).encode()
    (tmp_path / "c.jsonl").write_bytes(body)
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(body))
    pq.write_table(pa.table({"body": texts, "other": list(range(len(texts)))}), tmp_path / "c.parquet",
                   row_group_size=40)
    vocabs = []
    for name in ("c.jsonl", "c.jsonl.zst", "c.parquet"):
        model = train_sentencepiece([str(tmp_path / name)], 400, str(tmp_path / "out" / name), json_key="body",
                                    max_sentences=500, seed=7)
        vocabs.append(model.with_suffix(".vocab").read_bytes())
    assert vocabs[0] == vocabs[1] == vocabs[2]


def test_training_errors_name_the_problem(tmp_path, corpus_texts):
    good = tmp_path / "good.txt"
    good.write_text("\n".join(corpus_texts), encoding="utf-8")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        train_sentencepiece([str(good), str(tmp_path / "missing.txt")], 400, str(tmp_path / "t"))
    other_key = tmp_path / "other.jsonl"
    other_key.write_text('{"content": "hello"}\n\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"other\.jsonl.*'text'.*other\.jsonl:1"):
        train_sentencepiece([str(good), str(other_key)], 400, str(tmp_path / "t"))
    with pytest.raises(TokenizerError, match="vocabulary of 100 is too small.*use --vocab-size 265 or more"):
        train_sentencepiece([str(good)], 100, str(tmp_path / "t"))
    # More than the corpus can give: the remedy is in the command's own terms, not SentencePiece's.
    with pytest.raises(TokenizerError, match=r"--vocab-size 100000\).*more or larger --input files, or use "
                                             r"--vocab-size \d+ or less") as e:
        train_sentencepiece([str(good)], 100_000, str(tmp_path / "t"))
    assert "Please set" not in str(e.value)
    # Many distinct characters need a piece each: SentencePiece's --character_coverage is not offered.
    rng = random.Random(0)
    cjk = tmp_path / "cjk.txt"
    cjk.write_text("".join("".join(chr(0x4E00 + rng.randrange(3000)) for _ in range(40)) + "\n" for _ in range(3000)),
                   encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"distinct characters.*use --vocab-size \d+ or more") as e:
        train_sentencepiece([str(cjk)], 600, str(tmp_path / "t"))
    assert "character_coverage" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cjk.txt", "good.txt", "other.jsonl"]


@given(st.text(st.sampled_from("ab \n\té東😀"), max_size=200), st.integers(4, 24))
@settings(max_examples=200, deadline=None)
def test_split_text_keeps_text_and_limit(text, limit):
    pieces = split_text(text, limit)
    assert "".join(pieces) == text
    assert all(0 < len(p.encode("utf-8")) <= limit for p in pieces)


def test_split_text_prefers_newlines_then_spaces():
    assert split_text("aaaa\nbbbb\ncc", 10) == ["aaaa\nbbbb\n", "cc"]
    assert split_text("aaa bbb ccc", 8) == ["aaa bbb", " ccc"]


def test_load_tokenizer_picks_by_suffix_and_rejects_the_rest(tmp_path, spm_model):
    assert isinstance(load_tokenizer(spm_model), SentencePieceTokenizer)
    (tmp_path / "tokenizer.model").write_bytes(spm_model.read_bytes())
    assert isinstance(load_tokenizer(tmp_path), SentencePieceTokenizer)
    with pytest.raises(FileNotFoundError, match="nope.model"):
        load_tokenizer(tmp_path / "nope.model")
    (tmp_path / "notes.txt").write_text("just some text\n")
    with pytest.raises(ValueError, match="notes.txt: unknown tokenizer format"):
        load_tokenizer(tmp_path / "notes.txt")
    (tmp_path / "bad.model").write_text("not a model")
    with pytest.raises(ValueError, match="bad.model: not a SentencePiece model"):
        load_tokenizer(tmp_path / "bad.model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither tokenizer.json nor tokenizer.model"):
        load_tokenizer(tmp_path / "empty")


# -- Hugging Face tokenizer.json -----------------------------------------------------------------

def _train_hf(corpus, specials):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(corpus, trainer)
    return tok


def test_hf_tokenizer_with_config(tmp_path, corpus_texts):
    tok = _train_hf(corpus_texts, ["<unk>", "<s>", "</s>", "<|pad|>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    config = {"bos_token": {"content": "<s>", "special": True}, "eos_token": "</s>", "pad_token": None}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    hf = load_tokenizer(tmp_path)
    assert isinstance(hf, HFTokenizer)
    assert (hf.bos_id, hf.eos_id, hf.eod_id, hf.pad_id) == (1, 2, 2, None)  # pad explicitly null in the config
    assert hf.vocab_size == tok.get_vocab_size(with_added_tokens=True)
    for text in ROUND_TRIP:
        assert hf.decode(hf.encode(text)) == text
    assert hf.encode("<s>hi</s>")[0] == 1 and hf.encode("<s>hi</s>")[-1] == 2
    copy = pickle.loads(pickle.dumps(hf))
    assert copy.encode(ROUND_TRIP[3]) == hf.encode(ROUND_TRIP[3]) and copy.eos_id == 2


def test_hf_tokenizer_recognises_special_tokens_without_config(tmp_path, corpus_texts):
    tok = _train_hf(corpus_texts, ["<|begin_of_text|>", "<|end_of_text|>", "<pad>"])
    path = tmp_path / "my-tokenizer.json"
    tok.save(str(path))
    hf = load_tokenizer(path)
    assert (hf.bos_id, hf.eos_id, hf.pad_id) == (0, 1, 2)


def test_hf_config_naming_an_unknown_token_is_an_error(tmp_path, corpus_texts):
    _train_hf(corpus_texts, ["<s>"]).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|eot|>"}))
    with pytest.raises(ValueError, match=r"tokenizer_config.json: eos_token '<\|eot\|>' is not in the vocabulary"):
        HFTokenizer(tmp_path)


def test_hf_tokenizer_without_the_package_says_what_to_install(tmp_path, monkeypatch):
    (tmp_path / "tokenizer.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ImportError, match="pip install tokenizers"):
        load_tokenizer(tmp_path / "tokenizer.json")
