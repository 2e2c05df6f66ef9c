"""Offline resharding: exact copies of every tensor, files cut for the target layout, clear refusals."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from megaevo import cli
from megaevo.checkpoint import CheckpointError, LoadedCheckpoint
from megaevo.config import config_from_dict
from megaevo.convert import ConvertError, reshard
from megaevo.model import ModelArgs
from megaevo.model.llama import build_chunks
from megaevo.parallel.state import ParallelState
from helpers import ppo_overrides, rl_config, rl_fit
from helpers import config, fit, make_data


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A 4-layer run with tied embeddings and an odd vocabulary, saved with optimizer state after 2 steps."""
    root = tmp_path_factory.mktemp("reshard")
    data = make_data(root / "data")
    cfg = config(data, root / "run", **{"model.num_layers": 4, "model.tie_embeddings": True, "train.iters": 2,
                                        "optim.warmup": 1, "train.eval_interval": 0, "checkpoint.interval": 0})
    fit(cfg)
    return root / "run" / "checkpoints" / "iter_0000002"


def all_tensors(path) -> dict:
    ck = LoadedCheckpoint(path)
    return {(kind, n): ck.tensor(kind, n) for kind in ck.meta["tensors"] for n in ck.names(kind)}


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, t in a.items():
        assert t.dtype == b[key].dtype and torch.equal(t, b[key]), key


def test_reshard_copies_every_tensor_exactly_into_per_rank_files(saved, tmp_path):
    original = all_tensors(saved)
    assert {k for k, _ in original} == {"model", "master", "exp_avg", "exp_avg_sq"}
    out = reshard(saved, tmp_path / "tp2pp2v2", tp=2, pp=2, virtual_pp=2, progress=False)
    assert (tmp_path / "tp2pp2v2" / "latest").read_text().strip() == out.name == "iter_0000002"
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(
        f"model_tp{t}_pp{p}.safetensors" for p in range(2) for t in range(2))
    assert_identical(all_tensors(out), original)
    meta, source = LoadedCheckpoint(out).meta, LoadedCheckpoint(saved).meta
    for key in ("consumed_samples", "tokens", "optimizer_step", "scheduler"):
        assert meta[key] == source[key]
    assert (meta["layout"]["tp"], meta["layout"]["pp"], meta["layout"]["virtual_pp"]) == (2, 2, 2)
    assert (meta["config"]["parallel"]["tp"], meta["config"]["parallel"]["pp"]) == (2, 2)

    # Each target rank finds its shards in its own file: the blocks its chunks hold are read from
    # nowhere else (the last stage's tied copy of the embedding excepted, stored once, with the first's).
    ck = LoadedCheckpoint(out)
    opened = []
    real = ck._file
    ck._file = lambda name: opened.append(name) or real(name)
    args = ModelArgs.from_config(config_from_dict(source["config"]).model)
    for p in range(2):
        for t in range(2):
            chunks = build_chunks(args, ParallelState(tp_size=2, tp_rank=t, pp_size=2, pp_rank=p), virtual_pp=2)
            for chunk in chunks:
                for name, param, meta_ in chunk.named_parameters_with_meta():
                    if name == "embedding.weight" and chunk.has_head:
                        continue
                    opened.clear()
                    for frag in meta_.fragments(param.shape):
                        for kind in ("model", "master"):
                            ck.region(kind, name, frag.logical_offset, frag.shape)
                    own = f"model_tp{t}_pp{p}.safetensors"
                    assert set(opened) <= {own, "model_tp0_pp" + str(p) + ".safetensors"}, (name, t, p, opened)
                    if not meta_.tp_replicated:
                        assert set(opened) == {own}, (name, t, p, opened)

    # Back to one process, weights only: the same weights.
    back = reshard(tmp_path / "tp2pp2v2", tmp_path / "back", optimizer=False, progress=False)
    assert sorted(LoadedCheckpoint(back).meta["tensors"]) == ["model"]
    assert_identical(all_tensors(back), {k: v for k, v in original.items() if k[0] == "model"})


def test_reshard_refusals(saved, tmp_path):
    with pytest.raises(ConvertError, match=r"--tp 4 does not divide the model's 2 KV heads"):
        reshard(saved, tmp_path / "a", tp=4)
    with pytest.raises(ConvertError, match=r"--pp 3 does not divide the model's 4 layers"):
        reshard(saved, tmp_path / "b", pp=3)
    with pytest.raises(ConvertError, match=r"--pp-layers \[1, 3\] must list 4 positive layer counts"):
        reshard(saved, tmp_path / "c", pp=2, virtual_pp=2, pp_layers=[1, 3])
    reshard(saved, tmp_path / "d", progress=False)
    with pytest.raises(ConvertError, match="already holds a checkpoint"):
        reshard(saved, tmp_path / "d", progress=False)
    broken = tmp_path / "broken"
    broken.mkdir()
    meta = json.loads((saved / "metadata.json").read_text())
    meta["tensors"]["exp_avg"]["layers.1.mlp.down.weight"]["fragments"] = []
    (broken / "metadata.json").write_text(json.dumps(meta))
    for f in saved.glob("*.safetensors"):
        (broken / f.name).symlink_to(f)
    with pytest.raises(CheckpointError, match=r"'layers.1.mlp.down.weight' \(exp_avg\) has missing fragments"):
        reshard(broken, tmp_path / "e", tp=2, progress=False)
    assert not (tmp_path / "e" / "latest").exists() and not list((tmp_path / "e").glob("iter_*"))


def test_convert_command_reshards(saved, tmp_path, capsys):
    assert cli.main(["convert", "--load", str(saved.parent), "--save", str(tmp_path / "out"), "--tp", "2",
                     "--pp", "2", "--quiet", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["tp"], info["pp"], info["optimizer"]) == (2, 2, True)
    assert_identical(all_tensors(info["checkpoint"]), all_tensors(saved))


def test_reshard_carries_a_ppo_critic_and_the_run_resumes_from_it(setup, base_checkpoint, tmp_path):
    rl_fit(rl_config(setup, tmp_path / "run", **ppo_overrides(base_checkpoint, **{"train.iters": 1})))
    ck = tmp_path / "run" / "checkpoints" / "iter_0000001"
    original = all_tensors(ck)
    assert {k for k, _ in original} >= {"critic", "critic_master", "critic_exp_avg", "critic_exp_avg_sq"}
    tp2 = reshard(ck, tmp_path / "tp2", tp=2, progress=False)
    assert_identical(all_tensors(tp2), original)
    # the critic is cut as the model is: a TP-split weight has a block in each rank's file, the value head one
    entries = LoadedCheckpoint(tp2).meta["tensors"]["critic"]
    assert {f["file"] for f in entries["critic.layers.0.attention.qkv.weight"]["fragments"]} == {
        "model_tp0_pp0.safetensors", "model_tp1_pp0.safetensors"}
    assert [f["file"] for f in entries["critic.value_head.weight"]["fragments"]] == ["model_tp0_pp0.safetensors"]
    weights = reshard(tp2, tmp_path / "weights", optimizer=False, progress=False)
    assert sorted(LoadedCheckpoint(weights).meta["tensors"]) == ["critic", "model"]

    # back in one process, PPO resumes from the resharded checkpoint (critic, its optimizer, the stage's
    # state) exactly as from the original
    back = reshard(tp2, tmp_path / "back", progress=False)
    resume = {"train.iters": 2, "checkpoint.finetune": False}
    rl_fit(rl_config(setup, tmp_path / "a", **ppo_overrides(ck, **resume)))
    rl_fit(rl_config(setup, tmp_path / "b", **ppo_overrides(back, **resume)))
    assert_identical(all_tensors(tmp_path / "b" / "checkpoints" / "iter_0000002"),
                     all_tensors(tmp_path / "a" / "checkpoints" / "iter_0000002"))


def test_reshard_refuses_tensors_it_does_not_know(saved, tmp_path):
    odd = tmp_path / "odd"
    odd.mkdir()
    meta = json.loads((saved / "metadata.json").read_text())
    meta["tensors"]["ema"] = meta["tensors"]["master"]
    (odd / "metadata.json").write_text(json.dumps(meta))
    for f in saved.glob("*.safetensors"):
        (odd / f.name).symlink_to(f)
    with pytest.raises(ConvertError, match=r"kind\(s\) ema, which resharding does not know"):
        reshard(odd, tmp_path / "out", progress=False)


def test_reshard_takes_the_runs_tokenizer_into_the_checkpoint(saved, spm_model, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(saved.parent.parent, run)
    (run / "tokenizer").mkdir(exist_ok=True)
    shutil.copyfile(spm_model, run / "tokenizer" / "tokenizer.model")  # as a run keeps it
    out = reshard(run, tmp_path / "out", tp=2, progress=False)
    assert (out / "tokenizer.model").read_bytes() == Path(spm_model).read_bytes()
    assert "tokenizer.model" in LoadedCheckpoint(out).record.files  # checksummed with the weights
