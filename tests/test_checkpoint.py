"""The checkpoint format: its metadata record, names, atomic commit, dead-peer timeout and local reads."""
import dataclasses
import json
import os
import shutil
import time

import pytest
import torch

import megaevo.checkpoint as ckpt
import megaevo.checkpoint.save as save_module
from megaevo.checkpoint import (LATEST, STATE_KINDS, Checkpointer, CheckpointError, CheckpointMeta, FileRecord,
                                LoadedCheckpoint, SavedLayout, SavePlan, StoredFragment, TensorEntry, build_save_plan,
                                commit_checkpoint, iteration_dir, load_local_weights, model_file, read_local,
                                read_local_state, resolve_checkpoint, rng_file, summarize_checkpoint, temp_dir)
from megaevo.convert import TensorSource, target_blocks, write_checkpoint
from megaevo.model import ModelArgs
from megaevo.model.llama import build_chunks
from megaevo.parallel.state import ParallelState

ARGS = ModelArgs(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_heads=4, num_kv_heads=2, vocab_size=300)


def logical_tensors(kinds=("model", *STATE_KINDS)) -> dict[tuple[str, str], torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    shapes = target_blocks(ARGS)[1]
    return {(kind, n): torch.randn(s, generator=gen) for kind in kinds for n, s in shapes.items()}


def tp_rank_view(tp: int, rank: int):
    """Parameter metas and local shapes of TP rank `rank` of `tp` (built on the meta device)."""
    chunks = build_chunks(ARGS, ParallelState(tp_size=tp, tp_rank=rank), device="meta")
    items = [item for chunk in chunks for item in chunk.named_parameters_with_meta()]
    return {n: m for n, _, m in items}, {n: tuple(p.shape) for n, p, _ in items}


def full_meta() -> CheckpointMeta:
    return CheckpointMeta(
        iteration=12, world_size=4, consumed_samples=96, tokens=96 * 32, optimizer_step=11, skipped_steps=1,
        scheduler={"iteration": 12, "schedule": "cosine"},
        layout=SavedLayout(tp=2, pp=2, dp=1, virtual_pp=1, distributed_optimizer=True, dtype="torch.bfloat16"),
        config={"model": {"num_layers": 2}}, hf={"architecture": "LlamaForCausalLM", "files": ["tokenizer.json"]},
        resharded_from={"path": "/elsewhere", "layout": {"tp": 1, "pp": 1}}, extra={"sft": {"epoch": 2}},
        files={model_file(0, 0): FileRecord(4096, "sha256", "ab" * 32), model_file(1, 0): FileRecord(4096, "crc32",
                                                                                                      "0badf00d")},
        tensors={"model": {"w": TensorEntry((8, 6), "float32", [StoredFragment(model_file(0, 0), "model/w/0", (0, 0),
                                                                               (4, 6)),
                                                                StoredFragment(model_file(1, 0), "model/w/0", (4, 0),
                                                                               (4, 6))])}})


@pytest.fixture(scope="module")
def tp1_checkpoint(tmp_path_factory):
    """A tp=1 checkpoint of ARGS with weights and a master copy, written by the converter."""
    tensors = logical_tensors(("model", "master"))
    sources = [TensorSource(kind, n, tuple(t.shape), t.dtype, (lambda t=t: t)) for (kind, n), t in tensors.items()]
    meta = CheckpointMeta(iteration=7, consumed_samples=56, tokens=56 * 32, optimizer_step=7,
                          layout=SavedLayout(tp=1, pp=1, dp=1), config={"model": {"num_layers": 2}},
                          extra={"stage": "pretrain"})
    path = write_checkpoint(tmp_path_factory.mktemp("tp1"), sources, ARGS, metadata=meta, progress=False)
    return path, tensors


# -- names and metadata ------------------------------------------------------------------------------


def test_names():
    assert iteration_dir("runs/x", 42) == iteration_dir("runs/x", 42).parent / "iter_0000042"
    assert temp_dir("r", 42).name == ".tmp_iter_0000042" and LATEST == "latest"
    assert model_file(1, 3) == "model_tp1_pp3.safetensors" and rng_file(5) == "rng_rank5.safetensors"


def test_metadata_round_trips_through_json():
    meta = full_meta()
    raw = json.loads(json.dumps(meta.to_json()))
    assert raw["layout"]["tp"] == 2 and raw["tensors"]["model"]["w"]["fragments"][1]["offset"] == [4, 0]
    assert raw["files"][model_file(1, 0)] == {"bytes": 4096, "crc32": "0badf00d"}
    assert CheckpointMeta.from_json(raw, "metadata.json") == meta
    # Keys of a newer writer survive a rewrite; optional fields left None stay out of the file.
    raw["future_field"] = {"x": 1}
    again = CheckpointMeta.from_json(raw, "metadata.json")
    assert again.to_json()["future_field"] == {"x": 1}
    minimal = CheckpointMeta.from_json({"format_version": 1, "iteration": 0, "tensors": {}}, "m.json")
    assert minimal.layout is None and minimal.world_size is None and minimal.extra == {}
    assert "hf" not in minimal.to_json() and "layout" not in minimal.to_json()
    assert meta.saved_with(4, 2, 2) and not meta.saved_with(4, 2, 2, virtual_pp=2) and not minimal.saved_with(1, 1, 1)


@pytest.mark.parametrize("change, field", [
    (lambda m: m.update(iteration="12"), "iteration"),
    (lambda m: m.update(consumed_samples=-1), "consumed_samples"),
    (lambda m: m["layout"].update(tp=0), "layout.tp"),
    (lambda m: m["layout"].update(distributed_optimizer="yes"), "layout.distributed_optimizer"),
    (lambda m: m.update(extra=[1]), "extra"),
    (lambda m: m.update(config="model"), "config"),
    (lambda m: m["tensors"]["model"]["w"].update(dtype="float99"), "tensors.model['w'].dtype"),
    (lambda m: m["tensors"]["model"]["w"].update(shape=[8, "6"]), "tensors.model['w'].shape"),
    (lambda m: m["tensors"]["model"]["w"]["fragments"][1].update(offset=[4]),
     "tensors.model['w'].fragments[1].offset"),
    (lambda m: m["tensors"]["model"]["w"]["fragments"][1].update(offset=[5, 0]),
     "tensors.model['w'].fragments[1]: block [5, 0]+[4, 6] lies outside"),
    (lambda m: m["tensors"]["model"]["w"]["fragments"][0].update(file="../x.safetensors"),
     "tensors.model['w'].fragments[0].file names a file outside"),
    (lambda m: m.update(format_version=99), "format_version 99"),
    (lambda m: m["files"][model_file(0, 0)].update(bytes="4096"), f"files['{model_file(0, 0)}'].bytes"),
    (lambda m: m["files"][model_file(0, 0)].update(md4="00"), f"files['{model_file(0, 0)}'] must be an object"),
    (lambda m: m["files"].update({"../x": {"bytes": 1}}), "files['../x'] names a file outside"),
    (lambda m: m["files"].update({"x": {"bytes": 1, "md4": "00"}}), "files['x'] must be a checksum this megaevo knows"),
])
def test_a_malformed_field_is_named_with_the_file(tmp_path, change, field):
    raw = full_meta().to_json()
    change(raw)
    (tmp_path / "metadata.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError) as e:
        LoadedCheckpoint(tmp_path)
    assert str(tmp_path / "metadata.json") in str(e.value) and field in str(e.value)


# -- writing -----------------------------------------------------------------------------------------


def test_converter_writes_the_record(tp1_checkpoint):
    path, tensors = tp1_checkpoint
    ck = LoadedCheckpoint(path)
    assert path == iteration_dir(path.parent, 7) and (path.parent / LATEST).read_text().strip() == path.name
    rec = ck.record
    assert (rec.iteration, rec.world_size, rec.consumed_samples, rec.extra) == (7, 1, 56, {"stage": "pretrain"})
    assert ck.meta["layout"]["tp"] == 1 and ck.meta["tensors"].keys() == {"model", "master"}
    assert all(torch.equal(ck.tensor(kind, n), t) for (kind, n), t in tensors.items())
    info = summarize_checkpoint(path.parent)
    assert info["iteration"] == 7 and info["layout"]["tp"] == 1 and info["optimizer_state"] == ["master"]


def test_interrupted_commit_keeps_the_previous_checkpoint(tp1_checkpoint, tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    root.mkdir()
    previous = root / "iter_0000007"
    shutil.copytree(tp1_checkpoint[0], previous)
    (root / LATEST).write_text("iter_0000007\n")

    # Killed while rank files are written: the temporary directory is left, nothing else changes.
    def dying_write(path, tensors, checksum=None):
        raise KeyboardInterrupt("killed")
    monkeypatch.setattr(save_module, "write_safetensors", dying_write)
    plan = SavePlan(8, {"model": {}}, {}, rank=0, world_size=1, writer=True, file_tag="tp0_pp0",
                    metadata=CheckpointMeta(iteration=8))
    with pytest.raises(KeyboardInterrupt):
        Checkpointer(root).save(plan)
    monkeypatch.undo()
    assert (root / LATEST).read_text().strip() == "iter_0000007" and not iteration_dir(root, 8).exists()

    # Interrupted at the rename itself: the same.
    tmp = temp_dir(root, 8)
    real = os.replace

    def failing_replace(src, dst):
        if str(src) == str(tmp):
            raise OSError("interrupted")
        real(src, dst)
    monkeypatch.setattr(save_module.os, "replace", failing_replace)
    with pytest.raises(OSError, match="interrupted"):
        commit_checkpoint(root, tmp, CheckpointMeta(iteration=8))
    monkeypatch.undo()
    assert (root / LATEST).read_text().strip() == "iter_0000007" and not iteration_dir(root, 8).exists()
    assert LoadedCheckpoint(previous).iteration == 7
    # The next attempt completes and moves `latest`; keep_last prunes the older one.
    final = commit_checkpoint(root, tmp, CheckpointMeta(iteration=8), keep_last=1)
    assert (root / LATEST).read_text().strip() == final.name == "iter_0000008" and not previous.exists()
    assert not tmp.exists() and LoadedCheckpoint(final).record.iteration == 8


def test_save_fails_when_a_peer_rank_never_delivers(tmp_path, monkeypatch):
    plan = SavePlan(3, {"model": {}}, {}, rank=0, world_size=2, writer=True, file_tag="tp0_pp0",
                    metadata=CheckpointMeta(iteration=3))
    start = time.monotonic()
    with pytest.raises(CheckpointError, match=r"rank\(s\) 1 did not finish") as e:
        Checkpointer(tmp_path, rank=0, world_size=2, timeout_s=0.3).save(plan)
    assert time.monotonic() - start < 10
    assert str(temp_dir(tmp_path, 3)) in str(e.value) and "part_rank1.json" in str(e.value)
    assert not (tmp_path / LATEST).exists()
    monkeypatch.setenv(ckpt.TIMEOUT_ENV, "12.5")
    assert Checkpointer(tmp_path).timeout_s == 12.5 and Checkpointer(tmp_path, timeout_s=3).timeout_s == 3
    monkeypatch.setenv(ckpt.TIMEOUT_ENV, "soon")
    with pytest.raises(CheckpointError, match=ckpt.TIMEOUT_ENV):
        Checkpointer(tmp_path)


# -- reading a rank's shards -------------------------------------------------------------------------


def test_read_local_cuts_a_tp_shard_from_a_checkpoint_saved_at_another_tp(tp1_checkpoint):
    path, tensors = tp1_checkpoint
    ck = LoadedCheckpoint(path)
    for rank in range(2):
        metas, shapes = tp_rank_view(2, rank)
        for name, meta in metas.items():
            expected = meta.layout.shard(tensors["model", name], rank, 2)  # padding rows zero
            local = read_local(ck, "model", name, meta, shapes[name])
            assert local.shape == shapes[name] and torch.equal(local, expected), (rank, name)
        params = {n: torch.full(s, float("nan")) for n, s in shapes.items()}
        load_local_weights(ck, params, metas)
        assert all(torch.equal(params[n], metas[n].layout.shard(tensors["model", n], rank, 2)) for n in params)
        state = read_local_state(ck, params, metas, kinds=("master",))
        name = "layers.0.attention.qkv.weight"
        assert torch.equal(state[name]["master"], metas[name].layout.shard(tensors["master", name], rank, 2))
        assert not state[name]["exp_avg"].any() and state[name].keys() == set(STATE_KINDS)
    with pytest.raises(CheckpointError, match="optimizer state is incomplete"):
        read_local_state(ck, params, metas)
    metas, shapes = tp_rank_view(1, 0)
    with pytest.raises(CheckpointError, match="shape"):
        read_local(ck, "model", "norm.weight", dataclasses.replace(metas["norm.weight"], logical_shape=(3,)), (3,))


def test_two_tp_ranks_save_and_one_rank_loads(tmp_path):
    """build_save_plan + Checkpointer at tp=2 (two ranks in one process), read back whole."""
    tensors = logical_tensors()
    meta = CheckpointMeta(iteration=4, consumed_samples=32, layout=SavedLayout(tp=2, pp=1, dp=1))
    checkpointers = [Checkpointer(tmp_path, rank=r, world_size=2, async_save=r == 0, timeout_s=60) for r in (0, 1)]
    for rank in (0, 1):  # rank 0 first: it makes the temporary directory, then waits for rank 1 in the background
        metas, _ = tp_rank_view(2, rank)
        params = {n: m.layout.shard(tensors["model", n], rank, 2) for n, m in metas.items()}
        optim = {n: {k: m.layout.shard(tensors[k, n], rank, 2) for k in STATE_KINDS} for n, m in metas.items()}
        plan = build_save_plan(meta, params, metas, optim, ParallelState(tp_size=2, tp_rank=rank), rank, 2)
        assert plan.file_tag == f"tp{rank}_pp0" and plan.writer
        checkpointers[rank].save(plan)
    checkpointers[0].wait()
    ck = LoadedCheckpoint(iteration_dir(tmp_path, 4))
    assert sorted(p.name for p in ck.path.iterdir()) == sorted(
        ["metadata.json", "metadata.json.sha256", model_file(0, 0), model_file(1, 0), rng_file(0), rng_file(1)])
    assert ck.record.files.keys() == {model_file(0, 0), model_file(1, 0), rng_file(0), rng_file(1)}
    assert (ck.record.world_size, ck.record.consumed_samples, ck.record.layout.tp) == (2, 32, 2)
    for (kind, name), t in tensors.items():
        assert torch.equal(ck.tensor(kind, name), t), (kind, name)
    assert len(ck.record.tensors["model"]["norm.weight"].fragments) == 1  # replicated: TP rank 0 only
    assert ck.rng(1) is not None and ck.rng(2) is None


def test_load_accepts_a_checkpoint_its_folder_or_the_run(tmp_path):
    ck = tmp_path / "run" / "checkpoints" / "iter_0000005"
    ck.mkdir(parents=True)
    (ck / "metadata.json").write_text("{}")
    (ck.parent / "latest").write_text("iter_0000005\n")
    here = Checkpointer(tmp_path / "other" / "checkpoints", rank=0, world_size=1)
    for given in (ck, ck.parent, tmp_path / "run"):
        assert here.resolve(str(given)) == ck
        assert resolve_checkpoint(given) == ck  # inspect, verify, reshard, export, megaevo.load: the same rule
    assert here.resolve("auto") is None
    assert Checkpointer(ck.parent).resolve("auto") == ck


def test_resolving_what_is_not_a_complete_checkpoint(tmp_path):
    """A run loads what `latest` names even when it is gone (loading it then names an intact one); the
    tools that take one checkpoint say what is wrong at once."""
    root = tmp_path / "run" / "checkpoints"
    root.mkdir(parents=True)
    (root / LATEST).write_text("iter_0000007\n")  # names a checkpoint that is not there
    assert Checkpointer(root).resolve("auto") == root / "iter_0000007"
    assert Checkpointer(tmp_path).resolve(str(tmp_path / "run")) == root / "iter_0000007"
    with pytest.raises(CheckpointError, match=f"^{root / LATEST} points at {root / 'iter_0000007'}, which is not "
                                              f"a complete checkpoint$"):
        resolve_checkpoint(tmp_path / "run")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert Checkpointer(root).resolve(str(empty)) == empty  # loading it says what it lacks
    with pytest.raises(CheckpointError, match=f"^{empty}: not a megaevo checkpoint \\(no metadata.json, no `latest` "
                                              f"pointer\\)$"):
        resolve_checkpoint(empty)
    (root / LATEST).write_text("../elsewhere\n")
    for resolve in (Checkpointer(root).resolve, resolve_checkpoint):
        with pytest.raises(CheckpointError, match="expected a checkpoint name like iter_0000100, found '../elsewhere'"):
            resolve(root)
