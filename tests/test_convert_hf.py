"""Hugging Face import and export: random tiny models built by transformers itself, no download."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors import safe_open  # noqa: E402

from megaevo import cli  # noqa: E402
from megaevo.checkpoint import CheckpointError, LoadedCheckpoint  # noqa: E402
from megaevo.config import ConfigError, config_from_dict, validate  # noqa: E402
from megaevo.convert import ConvertError, export_hf, import_hf  # noqa: E402
from megaevo.convert.hf_config import spec_from_hf_config  # noqa: E402
from megaevo.kernels import rotary_tables  # noqa: E402
from megaevo.model.args import ModelArgs  # noqa: E402
from megaevo.model.llama import LlamaStage  # noqa: E402

VOCAB = 300  # not a multiple of 128: megaevo pads the rows internally
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}
VARIANTS = {
    "llama3-tied": ("LlamaConfig", dict(tie_word_embeddings=True, rope_theta=500000.0, rope_scaling=dict(LLAMA3))),
    "llama-untied": ("LlamaConfig", dict(tie_word_embeddings=False)),
    "mistral": ("MistralConfig", dict(sliding_window=None, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", dict(use_sliding_window=False, tie_word_embeddings=False, rope_theta=1e6)),
}


def make_hf_model(root: Path, variant: str, shard: str | None = "60KB"):
    """A random tiny HF model saved to root/variant (several shards + index unless shard is None)."""
    cls, extra = VARIANTS[variant]
    torch.manual_seed(sum(map(ord, variant)))
    config = getattr(transformers, cls)(**SHAPE, **extra)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn_like(p))
    out = root / variant
    model.save_pretrained(out, **({"max_shard_size": shard} if shard else {}))
    write_tokenizer(out, 50)
    return out, model


def write_tokenizer(out: Path, size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                           "bos_token": "<s>", "eos_token": "</s>"}))
    (out / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))


def hf_state(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor stored in an HF directory's safetensors files."""
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


def megaevo_model(ckpt: Path) -> LlamaStage:
    ck = LoadedCheckpoint(ckpt)
    args = ModelArgs.from_config(config_from_dict(ck.meta["config"]).model)
    model = LlamaStage(args).eval()
    with torch.no_grad():
        for name, p, meta in model.named_parameters_with_meta():
            p.copy_(meta.layout.shard(ck.tensor("model", name, meta.logical_shape), 0, 1))
    return model


def logits(model, tokens) -> torch.Tensor:
    with torch.no_grad():
        if isinstance(model, LlamaStage):
            return model(tokens)[..., :VOCAB]
        return model(tokens).logits


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {v: make_hf_model(root, v, shard=None if v == "mistral" else "60KB") for v in VARIANTS}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_import_matches_transformers_and_export_is_bit_exact(hf_models, variant, tmp_path):
    src, hf_model = hf_models[variant]
    assert (src / "model.safetensors.index.json").is_file() == (variant != "mistral")
    ckpt = import_hf(src, tmp_path / "ckpt", progress=False)
    assert ckpt == tmp_path / "ckpt" / "iter_0000000"
    meta = LoadedCheckpoint(ckpt).meta
    assert meta["iteration"] == 0 and meta["consumed_samples"] == 0 and "master" not in meta["tensors"]
    model_cfg = meta["config"]["model"]
    assert model_cfg["vocab_size"] == VOCAB and model_cfg["qkv_bias"] == (variant == "qwen2")
    assert model_cfg["tie_embeddings"] == (variant == "llama3-tied")
    assert model_cfg["rope_scaling"] == (LLAMA3 if variant == "llama3-tied" else None)
    assert meta["tensors"]["model"]["embedding.weight"]["shape"] == [VOCAB, 64]  # unpadded
    assert ("output.weight" in meta["tensors"]["model"]) == (variant != "llama3-tied")

    tokens = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(0))
    expected = logits(hf_model, tokens)
    assert (logits(megaevo_model(ckpt), tokens) - expected).abs().max().item() <= 1e-4

    out = tmp_path / "hf-out"
    info = export_hf(tmp_path / "ckpt", out, max_shard_size="40KB", progress=False)
    assert info["shards"] > 1 and (out / "model.safetensors.index.json").is_file()
    assert info["architecture"] == json.loads((src / "config.json").read_text())["architectures"][0]
    original, exported = hf_state(src), hf_state(out)
    assert original.keys() == exported.keys()
    for key, t in original.items():
        assert exported[key].dtype == t.dtype and torch.equal(exported[key], t), key
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.config.tie_word_embeddings == (variant == "llama3-tied")
    assert torch.equal(logits(reloaded, tokens), expected)


def test_rope_scaling_tables_match_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=128,
                                      rope_theta=500000.0, rope_scaling=dict(LLAMA3))
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    cos, sin = rotary_tables(16, 128, 500000.0, scaling=LLAMA3)
    angles = torch.arange(128, dtype=torch.float32)[:, None] * inv_freq[None, :]
    assert torch.allclose(cos, angles.cos(), atol=1e-5) and torch.allclose(sin, angles.sin(), atol=1e-5)
    plain, _ = rotary_tables(16, 128, 500000.0)
    assert not torch.allclose(plain, cos)
    args = ModelArgs(rope_scaling=dict(LLAMA3))
    assert hash(args) == hash(ModelArgs(rope_scaling=dict(reversed(list(LLAMA3.items())))))


def test_rope_scaling_config_is_validated():
    ok = config_from_dict({"model": {"rope_scaling": dict(LLAMA3)}})
    validate(ok, 1)
    for bad, message in (({"rope_type": "yarn", "factor": 4.0}, "rope_type='yarn' is not supported"),
                         ({**LLAMA3, "factor": -1}, "factor must be positive"),
                         ({**LLAMA3, "high_freq_factor": 0.5}, "must be larger than low_freq_factor"),
                         ({"rope_type": "llama3"}, "needs factor")):
        with pytest.raises(ConfigError, match=message):
            validate(config_from_dict({"model": {"rope_scaling": bad}}), 1)


@pytest.mark.parametrize("variant", ["llama3-tied", "qwen2"])
def test_tp_pp_import_writes_per_rank_files_with_the_same_tensors(hf_models, variant, tmp_path):
    src, _ = hf_models[variant]
    single = LoadedCheckpoint(import_hf(src, tmp_path / "one", progress=False))
    sharded = LoadedCheckpoint(import_hf(src, tmp_path / "four", tp=2, pp=2, progress=False))
    files = {f"model_tp{t}_pp{p}.safetensors" for t in range(2) for p in range(2)}
    assert files <= {p.name for p in sharded.path.iterdir()}
    assert sharded.meta["layout"]["tp"] == 2 and sharded.meta["layout"]["pp"] == 2
    assert sharded.meta["config"]["parallel"]["tp"] == 2
    assert single.names() == sharded.names()
    for name in single.names():
        assert torch.equal(single.tensor("model", name), sharded.tensor("model", name)), name
    frags = sharded.meta["tensors"]["model"]
    # Layer 0 lives on stage 0, layer 1 on stage 1; each column-parallel weight is split over both TP ranks.
    assert {f["file"] for f in frags["layers.0.attention.qkv.weight"]["fragments"]} == {
        "model_tp0_pp0.safetensors", "model_tp1_pp0.safetensors"}
    assert {f["file"] for f in frags["layers.1.mlp.down.weight"]["fragments"]} == {
        "model_tp0_pp1.safetensors", "model_tp1_pp1.safetensors"}
    assert [f["file"] for f in frags["norm.weight"]["fragments"]] == ["model_tp0_pp1.safetensors"]
    assert len(frags["embedding.weight"]["fragments"]) == 2  # a tied head is not stored twice


def test_bf16_import_and_export(hf_models, tmp_path):
    src, _ = hf_models["llama-untied"]
    ckpt = import_hf(src, tmp_path / "ckpt", dtype="bf16", progress=False)
    assert LoadedCheckpoint(ckpt).tensor("model", "norm.weight").dtype == torch.bfloat16
    export_hf(ckpt, tmp_path / "out", progress=False)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    exported = hf_state(tmp_path / "out")
    for key, t in hf_state(src).items():
        assert torch.equal(exported[key], t.to(torch.bfloat16)), key


def _config(**changes) -> dict:
    base = transformers.LlamaConfig(**SHAPE).to_dict()
    base.update({"architectures": ["LlamaForCausalLM"], **changes})
    return base


@pytest.mark.parametrize("changes, message", [
    (dict(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=16), "sliding_window=16"),
    (dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", use_sliding_window=True), "use_sliding_window"),
    (dict(num_local_experts=8, num_experts_per_tok=2), "mixture-of-experts field num_local_experts"),
    (dict(architectures=["MixtralForCausalLM"], model_type="mixtral"), "architecture 'MixtralForCausalLM'"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}, rope_parameters=None), "rope type 'yarn'"),
    (dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}), "rope type 'dynamic'"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(head_dim=32), "head_dim=32"),
    (dict(attention_bias=True), "attention_bias=true"),
    (dict(mlp_bias=True), "mlp_bias=true"),
])
def test_unsupported_configs_are_refused_by_name(changes, message):
    with pytest.raises(ConvertError, match=message.replace("(", r"\(").replace("[", r"\[")):
        spec_from_hf_config(_config(**changes), "model/config.json")


def test_supported_config_variants():
    legacy = _config(rope_parameters=None, rope_theta=5e5, rope_scaling={"type": "llama3", **{
        k: v for k, v in LLAMA3.items() if k != "rope_type"}})
    spec = spec_from_hf_config(legacy)
    assert spec.model["rope_theta"] == 5e5 and spec.model["rope_scaling"] == LLAMA3
    # A sliding window at least as long as the context never binds.
    mistral = _config(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=128)
    assert spec_from_hf_config(mistral).architecture == "MistralForCausalLM"


def test_bad_inputs_are_refused_on_import(hf_models, tmp_path):
    src, _ = hf_models["llama-untied"]
    with pytest.raises(ConvertError, match=r"--tp 4 does not divide the model's 2 KV heads"):
        import_hf(src, tmp_path / "a", tp=4, progress=False)
    with pytest.raises(ConvertError, match=r"--pp 3 does not divide the model's 2 layers"):
        import_hf(src, tmp_path / "a", pp=3, progress=False)
    assert not (tmp_path / "a").exists()
    big = tmp_path / "big-tokenizer"
    shutil.copytree(src, big)
    write_tokenizer(big, VOCAB + 20)
    with pytest.raises(ConvertError, match="tokenizer has 320 tokens but the model's vocab_size is 300"):
        import_hf(big, tmp_path / "b", progress=False)
    extra = tmp_path / "extra-tensor"
    shutil.copytree(src, extra)
    from safetensors.torch import save_file
    save_file({"model.layers.0.self_attn.o_proj.bias": torch.zeros(64)}, str(extra / "model-extra.safetensors"))
    index = json.loads((extra / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.self_attn.o_proj.bias"] = "model-extra.safetensors"
    (extra / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConvertError, match="no place for: model.layers.0.self_attn.o_proj.bias"):
        import_hf(extra, tmp_path / "c", progress=False)
    with pytest.raises(ConvertError, match=r"unknown dtype 'fp8' \(use one of .*bf16"):
        import_hf(src, tmp_path / "e", dtype="fp8", progress=False)
    ckpt = import_hf(src, tmp_path / "d", progress=False)
    with pytest.raises(ConvertError, match="already holds a checkpoint"):
        import_hf(src, tmp_path / "d", progress=False)
    assert ckpt.is_dir()


def test_export_refuses_missing_or_duplicated_fragments(hf_models, tmp_path):
    src, _ = hf_models["qwen2"]
    ckpt = import_hf(src, tmp_path / "ckpt", tp=2, progress=False)
    meta_path = ckpt / "metadata.json"
    meta = json.loads(meta_path.read_text())
    (ckpt / "metadata.json.sha256").unlink()  # metadata.json is edited on purpose below
    for problem in ("missing", "duplicated"):
        broken = json.loads(json.dumps(meta))
        frags = broken["tensors"]["model"]["layers.1.attention.qkv.weight"]["fragments"]
        if problem == "missing":
            frags.pop()
        else:
            frags.append(dict(frags[0]))
        meta_path.write_text(json.dumps(broken))
        with pytest.raises(CheckpointError, match=f"'layers.1.attention.qkv.weight' \\(model\\) has {problem} fragments"):
            export_hf(ckpt, tmp_path / problem, progress=False)
        assert not (tmp_path / problem).exists() and not list(tmp_path.glob(f".{problem}.tmp*"))
    meta_path.write_text(json.dumps(meta))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(ConvertError, match="not an empty directory"):
        export_hf(ckpt, tmp_path / "full", progress=False)


def test_bad_files_and_sizes_are_convert_errors_and_one_line(hf_models, tmp_path, capsys):
    from megaevo.checkpoint.safetensors_io import element_size, parse_size, read_header

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00")
    with pytest.raises(ConvertError, match="not a safetensors file"):
        read_header(bad)
    with pytest.raises(ConvertError, match="cannot read 'lots' as a size"):
        parse_size("lots")
    with pytest.raises(ConvertError, match="unknown safetensors dtype 'Q9'"):
        element_size("Q9")
    src, _ = hf_models["qwen2"]
    ckpt = import_hf(src, tmp_path / "ckpt", progress=False)
    with pytest.raises(ConvertError, match="cannot read 'lots' as a size"):
        export_hf(ckpt, tmp_path / "hf", max_shard_size="lots", progress=False)
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    shard = sorted(broken.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:4])
    capsys.readouterr()
    for argv in (["inspect", str(broken)], ["generate", "--load", str(broken), "--prompt", "w3"],
                 ["convert", "--from-hf", str(broken), "--save", str(tmp_path / "out")]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"error: megaevo {argv[0]}: {shard}: not a safetensors file (shorter than 8 bytes)"], err


def test_inspect_hf_directory(hf_models, capsys):
    src, model = hf_models["qwen2"]
    assert cli.main(["inspect", str(src), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "huggingface" and info["architecture"] == "Qwen2ForCausalLM"
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert info["dtypes"] == {"F32": info["parameters"]} and info["convertible"]
    assert info["tensors"]["model.layers.0.self_attn.q_proj.bias"]["shape"] == [64]
    assert "tokenizer.json" in info["tokenizer_files"]
    assert cli.main(["inspect", str(src)]) == 0
    text = capsys.readouterr().out
    assert "Qwen2ForCausalLM" in text and f"{info['parameters']:,}" in text


def test_cli_import_then_train_starts_from_the_imported_weights(hf_models, tmp_path, capsys):
    from megaevo.data.indexed import IndexedDatasetWriter

    src, _ = hf_models["llama3-tied"]
    out = tmp_path / "imported"
    assert cli.main(["convert", "--from-hf", str(src), "--save", str(out), "--quiet"]) == 0
    assert "iteration 0" in capsys.readouterr().out
    assert cli.main(["convert", "--from-hf", str(src), "--save", str(tmp_path / "x"), "--tp", "4"]) == 2
    assert "--tp 4 does not divide" in capsys.readouterr().err

    rng = np.random.default_rng(0)
    with IndexedDatasetWriter(tmp_path / "web", np.uint16) as w:
        for _ in range(40):
            w.add_document(rng.integers(0, VOCAB, int(rng.integers(10, 60))))
    run = tmp_path / "run"
    overrides = [f"data.train=[{tmp_path / 'web'}]", "data.seq_len=32", "data.split=100,0,0",
                 f"data.cache_dir={tmp_path / 'cache'}", "train.iters=1", "train.global_batch_size=2",
                 "train.micro_batch_size=2", "train.eval_interval=0", "train.log_interval=1", "train.dtype=fp32",
                 "optim.lr=0", "optim.min_lr=0", "optim.warmup=0", f"out_dir={run}"]
    assert cli.main(["train", "--config", str(out / "config.yaml"), *overrides]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 1 and records[0]["consumed_samples"] == 2
    assert abs(records[0]["loss"] - np.log(VOCAB)) < 1.0
    imported = LoadedCheckpoint(out / "iter_0000000")
    trained = LoadedCheckpoint(run / "checkpoints" / "iter_0000001")
    assert trained.names() == imported.names()
    for name in imported.names():  # a zero learning rate leaves the imported weights exactly in place
        assert torch.equal(trained.tensor("model", name), imported.tensor("model", name)), name
    # Rerunning the command (longer) resumes the run's own checkpoint, not the import.
    more = [o if o != "train.iters=1" else "train.iters=2" for o in overrides]
    assert cli.main(["train", "--config", str(out / "config.yaml"), *more]) == 0
    assert f"resuming from {run / 'checkpoints' / 'iter_0000001'}" in capsys.readouterr().out
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and records[1]["consumed_samples"] == 4

    # The trained checkpoint exports too, with the tokenizer its config points at.
    exported = tmp_path / "exported"
    assert cli.main(["convert", "--load", str(run), "--to-hf", str(exported), "--quiet", "--json"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "tokenizer.json" in info["files_copied"]
    config = transformers.AutoConfig.from_pretrained(exported)
    assert (getattr(config, "rope_parameters", None) or config.rope_scaling)["rope_type"] == "llama3"
