"""Hugging Face export of a megaevo model with its SentencePiece tokenizer: tokenizer.json that encodes
as megaevo does, loaded by transformers without sentencepiece or protobuf, and generate() stopping at eos."""
import json
import logging
import subprocess
import sys
import textwrap

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from megaevo.checkpoint import CheckpointMeta, SavedLayout  # noqa: E402
from megaevo.config import Config, DataConfig, config_to_dict  # noqa: E402
from megaevo.convert import TensorSource, export_hf, import_hf, target_blocks, write_checkpoint  # noqa: E402
from megaevo.convert.hf_tokenizer import write_spm_tokenizer_files  # noqa: E402
from megaevo.data.tokenizers import CHAT_TOKENS, HFTokenizer, SentencePieceTokenizer  # noqa: E402
from megaevo.model.args import ModelArgs  # noqa: E402

SAMPLE = [
    "", " ", "Hello world.", "The quick brown fox jumps over the lazy dog.",
    "  leading and trailing spaces  ", "multiple   spaces\t\ttabs\n\nnewlines \n \n",
    "def f(x):\n    return x * 12345\n\n\tif a  ==  b:\n\t\tpass\n",
    "3.14159, 2024-06-01 and 1,000,000", "Grüße, naïve café — déjà vu", "東京は日本の首都です。", "emoji 😀👍🏽 ✓",
    "<|system|>Be brief.<|end|>\n<|user|>hi<|end|>\n<|assistant|>", "x<|user|>y <|end|>z",
    "<s>literal markers</s> <pad> <unk> stay text",
]


def write_native_checkpoint(root, tokenizer, vocab_size: int):
    """A megaevo checkpoint (not from an import) whose greedy next token is always id 2 (</s>)."""
    args = ModelArgs(num_layers=1, hidden_size=32, ffn_hidden_size=64, num_heads=2, num_kv_heads=1,
                     vocab_size=vocab_size, max_seq_len=64)
    cfg = Config(model=args, data=DataConfig(tokenizer=str(tokenizer)))
    gen = torch.Generator().manual_seed(0)

    def value(name, shape):
        # The layers add nothing to the residual stream (zero output projections), the embeddings are
        # all ones, so the final norm's output is its weight (ones) and only the eos row of the head scores.
        if name.endswith(("attention.dense.weight", "mlp.down.weight")):
            return torch.zeros(shape)
        if name == "embedding.weight" or name.endswith("norm.weight"):
            return torch.ones(shape)
        if name == "output.weight":
            out = torch.zeros(shape)
            out[2] = 1.0
            return out
        return 0.02 * torch.randn(shape, generator=gen)

    sources = [TensorSource("model", name, shape, torch.float32, lambda name=name, shape=shape: value(name, shape))
               for name, shape in target_blocks(args)[1].items()]
    meta = CheckpointMeta(iteration=3, layout=SavedLayout(tp=1, pp=1, dp=1), config=config_to_dict(cfg))
    return write_checkpoint(root, sources, args, metadata=meta, progress=False)


# Run by a fresh interpreter in which sentencepiece and google.protobuf cannot be imported.
CHILD = textwrap.dedent("""
    import json, sys
    for name in ("sentencepiece", "google.protobuf"):
        sys.modules[name] = None  # import raises ImportError, find_spec says absent
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, cases = sys.argv[1], json.load(open(sys.argv[2], encoding="utf-8"))
    tok = AutoTokenizer.from_pretrained(out)
    result = {"class": type(tok).__name__, "encoded": [], "decoded": [],
              "specials": [tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id],
              "markers": tok.convert_tokens_to_ids(cases["markers"]),
              "skipped": tok.decode([1] + cases["ids"][2] + [2], skip_special_tokens=True)}
    for text, ids in zip(cases["texts"], cases["ids"]):
        result["encoded"].append(tok.encode(text))
        result["decoded"].append(tok.decode(ids))
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    gc = model.generation_config
    result["generation"] = [gc.bos_token_id, gc.eos_token_id, gc.pad_token_id]
    prompt = tok("Hello world.", return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**prompt, max_new_tokens=20, do_sample=False)
    result["new_tokens"] = generated[0, prompt["input_ids"].shape[1]:].tolist()
    result["blocked"] = [sys.modules.get(n) is None for n in ("sentencepiece", "google.protobuf")]
    print(json.dumps(result))
""")


@pytest.mark.slow  # a fresh interpreter imports transformers and torch
def test_export_with_sentencepiece_tokenizer_loads_without_sentencepiece(spm_model, tmp_path):
    spm = SentencePieceTokenizer(spm_model)
    ckpt = write_native_checkpoint(tmp_path / "ckpt", spm_model, spm.vocab_size)
    out = tmp_path / "hf"
    info = export_hf(ckpt, out, progress=False)
    assert info["files_copied"] == ["tokenizer.model"]
    assert sorted(info["files_written"]) == ["generation_config.json", "special_tokens_map.json", "tokenizer.json",
                                             "tokenizer_config.json"]
    assert (out / "tokenizer.model").read_bytes() == spm_model.read_bytes()
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 3)
    generation = json.loads((out / "generation_config.json").read_text())
    assert {k: generation[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")} == {
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["tokenizer_class"] == "PreTrainedTokenizerFast" and tok_config["model_max_length"] == 64
    assert not tok_config["add_bos_token"] and not tok_config["add_eos_token"]
    assert json.loads((out / "special_tokens_map.json").read_text()) == {
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}

    ids = [spm.encode(t) for t in SAMPLE]
    assert any(len(i) > 40 for i in ids) and any(spm.token_to_id("<0x3C>") in i for i in ids)  # byte fallback used
    # megaevo itself reads the exported tokenizer.json the same way (an export imported back).
    exported = HFTokenizer(out)
    assert [exported.encode(t) for t in SAMPLE] == ids
    assert (exported.bos_id, exported.eos_id, exported.pad_id) == (1, 2, 3)

    cases = tmp_path / "cases.json"
    cases.write_text(json.dumps({"texts": SAMPLE, "ids": ids, "markers": list(CHAT_TOKENS)}), encoding="utf-8")
    proc = subprocess.run([sys.executable, "-c", CHILD, str(out), str(cases)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["blocked"] == [True, True]
    assert result["encoded"] == ids
    assert result["decoded"] == [spm.decode(i) for i in ids] == SAMPLE
    assert result["skipped"] == SAMPLE[2]
    assert result["specials"] == [0, 1, 2, 3]
    assert result["markers"] == [spm.token_to_id(m) for m in CHAT_TOKENS] == [4, 5, 6, 7]
    assert result["generation"] == [1, 2, 3]
    assert result["new_tokens"] == [2]  # eos first, and generation stops there


def test_without_tokenizers_package_the_other_files_are_written(spm_model, tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with caplog.at_level(logging.WARNING, logger="megaevo"):
        written = write_spm_tokenizer_files(tmp_path, spm_model, 128)
    assert written == ["tokenizer_config.json", "special_tokens_map.json"]
    assert not (tmp_path / "tokenizer.json").exists()
    assert "pip install tokenizers" in caplog.text
    tok_config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert tok_config["tokenizer_class"] == "LlamaTokenizer" and tok_config["eos_token"] == "</s>"


def _train(tmp_path, name, **options):
    import sentencepiece

    from conftest import make_texts

    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(make_texts(200)), model_prefix=str(tmp_path / name),
                                             vocab_size=400, num_threads=1, minloglevel=2, **options)
    return tmp_path / f"{name}.model"


def test_other_sentencepiece_settings(tmp_path, caplog):
    from tokenizers import Tokenizer

    # SentencePiece's defaults: NFKC character map, dummy prefix, extra whitespace removed.
    model = _train(tmp_path, "nfkc", model_type="bpe", byte_fallback=True)
    (tmp_path / "a").mkdir()
    assert "tokenizer.json" in write_spm_tokenizer_files(tmp_path / "a", model)
    spm, tok = SentencePieceTokenizer(model), Tokenizer.from_file(str(tmp_path / "a" / "tokenizer.json"))
    texts = SAMPLE + ["  ｆｕｌｌ　ｗｉｄｔｈ  ﬁ  "]
    assert [tok.encode(t).ids for t in texts] == [spm.encode(t) for t in texts]
    assert [tok.decode(spm.encode(t)) for t in texts] == [spm.decode(spm.encode(t)) for t in texts]
    # A unigram model is refused rather than converted into something that tokenizes otherwise.
    (tmp_path / "b").mkdir()
    with caplog.at_level(logging.WARNING, logger="megaevo"):
        assert write_spm_tokenizer_files(tmp_path / "b", _train(tmp_path, "uni", model_type="unigram")) == [
            "tokenizer_config.json", "special_tokens_map.json"]
    assert "a unigram model" in caplog.text and not (tmp_path / "b" / "tokenizer.json").exists()


def test_imported_tokenizer_json_is_kept_and_its_ids_fill_the_config(tmp_path):
    from test_convert_hf import make_hf_model

    src, _ = make_hf_model(tmp_path, "llama-untied", shard=None)
    config = json.loads((src / "config.json").read_text())
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        config.pop(key, None)
    (src / "config.json").write_text(json.dumps(config))
    (src / "generation_config.json").unlink(missing_ok=True)
    ckpt = import_hf(src, tmp_path / "ckpt", progress=False)
    info = export_hf(ckpt, tmp_path / "out", progress=False)
    assert info["files_written"] == ["generation_config.json"]
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / "out" / name).read_bytes() == (src / name).read_bytes()
    exported = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (exported["bos_token_id"], exported["eos_token_id"]) == (1, 2) and "pad_token_id" not in exported
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2 and "pad_token_id" not in generation
