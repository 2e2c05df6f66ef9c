"""Checkpoint integrity: checksums recorded while writing, damage refused with the file named,
non-finite values refused with the tensor named, `inspect --verify`, and kill -9 at any point of a save."""
import dataclasses
import hashlib
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import megaevo.checkpoint as ckpt
import megaevo.checkpoint.save as save_module
from megaevo import cli
from megaevo.checkpoint import (CHECKSUM, METADATA, METADATA_CHECKSUM, Checkpointer, CheckpointError, LoadedCheckpoint,
                                check_file, file_checksum, last_verified_checkpoint, model_file, rng_file,
                                verify_checkpoint)
from megaevo.checkpoint.safetensors_io import StreamingWriter
from megaevo.config import save_config
from megaevo.convert import TensorSource, write_checkpoint
from megaevo.model.args import ModelArgs
from helpers import config, fit, make_data

ITERS = 3
SETTINGS = {"train.iters": ITERS, "checkpoint.interval": 1, "train.eval_interval": 0}
MODEL = model_file(0, 0)
QKV = "layers.0.attention.qkv.weight"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """A 1 x 1 x 1 run of ITERS steps with a checkpoint after each: its checkpoints folder and losses."""
    out = tmp_path_factory.mktemp("run")
    losses, _ = fit(config(data, out, **SETTINGS))
    return out / "checkpoints", losses


def copy_of(run, tmp_path, iteration: int = 1) -> Path:
    dst = tmp_path / "copy" / f"iter_{iteration:07d}"
    shutil.copytree(run[0] / dst.name, dst)
    return dst


def data_span(path: Path, key: str) -> tuple[int, int]:
    """Where the bytes of tensor `key` lie in the safetensors file `path` (from its header)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        begin, end = json.loads(f.read(n))[key]["data_offsets"]
    return 8 + n + begin, 8 + n + end


def flip_byte(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x5A
    path.write_bytes(raw)


def resume(data, tmp_path, path, **settings):
    return fit(config(data, tmp_path / "resumed", **{**SETTINGS, "checkpoint.load": str(path), **settings}))


def strip_checksums(path: Path) -> None:
    """Make `path` a checkpoint as written before checksums were recorded."""
    meta = json.loads((path / METADATA).read_text())
    del meta["files"]
    (path / METADATA).write_text(json.dumps(meta))
    (path / METADATA_CHECKSUM).unlink()


# -- what is recorded --------------------------------------------------------------------------------


def test_checksums_are_those_of_the_files_as_written(data, run, tmp_path):
    path = run[0] / "iter_0000002"
    record = LoadedCheckpoint(path).record
    assert record.files.keys() == {MODEL, rng_file(0)}
    for name, f in record.files.items():
        raw = (path / name).read_bytes()
        assert (f.size, f.algorithm) == (len(raw), CHECKSUM)
        digest = ckpt.CHECKSUMS[CHECKSUM]()
        digest.update(raw)
        assert f.digest == digest.hexdigest()
    meta_raw = (path / METADATA).read_bytes()
    assert (path / METADATA_CHECKSUM).read_text() == f"{hashlib.sha256(meta_raw).hexdigest()}  {METADATA}\n"
    assert json.loads(meta_raw)["files"][MODEL] == {"bytes": record.files[MODEL].size,
                                                    CHECKSUM: record.files[MODEL].digest}
    result = verify_checkpoint(run[0])  # a checkpoints folder: its latest
    assert result["iteration"] == ITERS and result["checksum"] == CHECKSUM and result["tensors"] == 4 * 15

    # The offline writer records the same: a copy of the weights written by the converter.
    ck = LoadedCheckpoint(path)
    sources = [TensorSource("model", n, e.shape, e.torch_dtype, lambda n=n: ck.tensor("model", n))
               for n, e in ck.record.tensors["model"].items()]
    args = ModelArgs.from_config(config(data, tmp_path).model)
    out = write_checkpoint(tmp_path / "converted", sources, args, progress=False)
    files = LoadedCheckpoint(out).record.files
    assert files.keys() == {MODEL} and files[MODEL].digest == file_checksum(out / MODEL)
    assert verify_checkpoint(out)["checksum"] == CHECKSUM


def test_another_checksum_is_named_in_the_record(tmp_path):
    tensors = {"a": torch.arange(10, dtype=torch.float32), "b": torch.ones(3, 4, dtype=torch.bfloat16)}
    record = ckpt.write_safetensors(tmp_path / "x.safetensors", tensors, "sha256")
    raw = (tmp_path / "x.safetensors").read_bytes()
    assert record.algorithm == "sha256" and record.digest == hashlib.sha256(raw).hexdigest()
    assert record.to_json() == {"bytes": len(raw), "sha256": record.digest}
    root = tmp_path / "checkpoints"
    plan = ckpt.SavePlan(5, {"model": {}}, {}, rank=0, world_size=1, writer=True, file_tag="tp0_pp0",
                         metadata=ckpt.CheckpointMeta(iteration=5))
    Checkpointer(root, checksum="sha256").save(plan)
    assert verify_checkpoint(root)["checksum"] == "sha256"
    with pytest.raises(CheckpointError, match="unknown checksum 'md4'"):
        Checkpointer(tmp_path, checksum="md4")
    # Hashing as the bytes go out needs them in file order.
    with pytest.raises(ValueError, match="out of file order"):
        with StreamingWriter(tmp_path / "y.safetensors", [(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()],
                             checksum=hashlib.sha256()) as w:
            w.write("b", tensors["b"])


# -- damage is refused, naming the file --------------------------------------------------------------


def _in_tensor(kind: str):
    def damage(path: Path) -> str:
        begin, end = data_span(path / MODEL, f"{kind}/{QKV}/0")
        flip_byte(path / MODEL, (begin + end) // 2)
        return MODEL
    return damage


def _metadata_digit(path: Path) -> str:
    raw = (path / METADATA).read_text()
    at = raw.index('"consumed_samples": ') + len('"consumed_samples": ')
    (path / METADATA).write_text(raw[:at] + str((int(raw[at]) + 1) % 10) + raw[at + 1:])  # still valid JSON
    json.loads((path / METADATA).read_text())
    return METADATA


def _safetensors_header(path: Path) -> str:
    flip_byte(path / MODEL, 8 + (path / MODEL).read_bytes()[8:200].index(b"data_offsets") + 1)
    return MODEL


def _rng(path: Path) -> str:
    flip_byte(path / rng_file(0), (path / rng_file(0)).stat().st_size - 3)
    return rng_file(0)


def _truncated(path: Path) -> str:
    raw = (path / MODEL).read_bytes()
    (path / MODEL).write_bytes(raw[: len(raw) // 2])
    return MODEL


DAMAGE = {"model": _in_tensor("model"), "master": _in_tensor("master"), "exp_avg": _in_tensor("exp_avg"),
          "exp_avg_sq": _in_tensor("exp_avg_sq"), "metadata": _metadata_digit, "header": _safetensors_header,
          "rng": _rng, "truncated": _truncated}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damage_is_refused_on_load_and_found_by_inspect_verify(data, run, tmp_path, capsys, damage):
    path = copy_of(run, tmp_path)
    name = DAMAGE[damage](path)
    with pytest.raises(CheckpointError, match=name) as e:
        resume(data, tmp_path, path)
    assert "\n" not in str(e.value)
    capsys.readouterr()
    assert cli.main(["inspect", str(path), "--verify"]) != 0
    err = capsys.readouterr().err
    assert name in err and "Traceback" not in err
    with pytest.raises(CheckpointError, match=name):
        verify_checkpoint(path)


def test_damaged_files_of_an_old_checkpoint_are_named_too(data, run, tmp_path):
    """Without checksums a flipped data byte goes unseen, but an unreadable file is still one line naming it."""
    path = copy_of(run, tmp_path)
    strip_checksums(path)
    _truncated(path)
    with pytest.raises(CheckpointError, match=f"{MODEL}: unreadable safetensors file") as e:
        resume(data, tmp_path, path)
    assert "SafetensorError" not in str(e.value) and "\n" not in str(e.value)
    (path / MODEL).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + bytes(100))
    with pytest.raises(CheckpointError, match=MODEL):
        verify_checkpoint(path)


def test_4kb_of_0xff_in_the_adam_state_is_refused_with_or_without_checksums(data, run, tmp_path):
    """What once loaded silently and made every later step NaN: the checksum catches it, and where no
    checksum is recorded the non-finite values do."""
    for checksums in (True, False):
        path = copy_of(run, tmp_path / str(checksums))
        if not checksums:
            strip_checksums(path)
        begin, end = data_span(path / MODEL, "exp_avg_sq/embedding.weight/0")
        raw = bytearray((path / MODEL).read_bytes())
        raw[begin + 8192: begin + 8192 + 4096] = b"\xff" * 4096
        (path / MODEL).write_bytes(raw)
        problem = "checksum mismatch" if checksums else "exp_avg_sq tensor 'embedding.weight' .* holds 1,024 non-finite"
        with pytest.raises(CheckpointError, match=f"{MODEL}: {problem}"):
            resume(data, tmp_path, path)


def test_old_checkpoints_without_checksums_still_load(data, run, tmp_path, capsys):
    path = copy_of(run, tmp_path)
    strip_checksums(path)
    assert not LoadedCheckpoint(path).record.files
    losses, trainer = resume(data, tmp_path, path)
    assert trainer.run.iteration == ITERS and losses == run[1][1:]
    assert verify_checkpoint(path)["checksum"] is None
    assert cli.main(["inspect", str(path), "--verify"]) == 0
    assert "no checksums recorded" in capsys.readouterr().out


def test_the_last_verified_checkpoint_skips_damaged_ones(run, tmp_path, caplog):
    root = tmp_path / "checkpoints"
    shutil.copytree(run[0], root)
    assert last_verified_checkpoint(root) == root / "iter_0000003"
    _in_tensor("exp_avg_sq")(root / "iter_0000003")
    _metadata_digit(root / "iter_0000002")
    assert last_verified_checkpoint(root) == root / "iter_0000001"
    assert sum("does not verify" in r.getMessage() for r in caplog.records) == 2
    assert last_verified_checkpoint(tmp_path / "nothing") is None


def test_a_damaged_latest_names_the_newest_intact_checkpoint_to_resume_from(data, run, tmp_path, capsys):
    out = tmp_path / "run"
    root = out / "checkpoints"
    shutil.copytree(run[0], root)
    _truncated(root / "iter_0000003")  # `latest`
    _metadata_digit(root / "iter_0000002")
    path = save_config(config(data, out, **{**SETTINGS, "checkpoint.load": "auto"}), tmp_path / "run.yaml")
    assert cli.main(["train", "--config", str(path)]) == 2  # the run looks finished, but its result is cut short
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith(f"error: {root / 'iter_0000003' / MODEL}: truncated: "), errors
    longer = {**SETTINGS, "checkpoint.load": "auto", "train.iters": ITERS + 1}  # a run to continue
    path = save_config(config(data, out, **longer), tmp_path / "run.yaml")
    assert cli.main(["train", "--config", str(path)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    good = root / "iter_0000001"
    assert len(errors) == 1 and errors[0].startswith(f"error: {root / 'iter_0000003' / MODEL}: truncated: "), errors
    assert errors[0].endswith(f"; the newest intact checkpoint is {good} (iter_0000002 does not verify either): "
                              f"resume with checkpoint.load={good}"), errors
    losses, trainer = resume(data, tmp_path, good)  # what the message says to do
    assert trainer.run.iteration == ITERS and losses == run[1][1:]

    shutil.rmtree(root / "iter_0000003")  # `latest` names a checkpoint that is gone
    with pytest.raises(CheckpointError, match=f"iter_0000003: not a megaevo checkpoint .*; the newest intact "
                                              f"checkpoint is {good} "):
        fit(config(data, out, **longer))

    shutil.rmtree(good)
    with pytest.raises(CheckpointError, match=f"no metadata.json.*; no other checkpoint in {root} verifies "
                                              r"\(iter_0000002\)$"):
        fit(config(data, out, **longer))
    shutil.rmtree(root / "iter_0000002")
    with pytest.raises(CheckpointError, match=f"no metadata.json.*; there is no other checkpoint in {root}$"):
        fit(config(data, out, **longer))


def test_damaged_random_states_name_the_newest_intact_checkpoint_too(data, run, tmp_path):
    root = tmp_path / "checkpoints"
    shutil.copytree(run[0], root)
    _rng(root / "iter_0000003")
    good = root / "iter_0000002"
    with pytest.raises(CheckpointError, match=f"{rng_file(0)}: checksum mismatch .*; the newest intact checkpoint "
                                              f"is {good}: resume with checkpoint.load={good}$"):
        fit(config(data, tmp_path, **{**SETTINGS, "checkpoint.load": "auto", "train.iters": ITERS + 1}))


def test_an_intact_checkpoint_that_does_not_fit_names_no_other(data, run, tmp_path):
    with pytest.raises(CheckpointError, match="but the model needs") as e:
        resume(data, tmp_path, run[0] / "iter_0000002", **{"model.ffn_hidden_size": 96})
    assert "intact" not in str(e.value) and "checkpoint.load" not in str(e.value)


# -- non-finite values are refused, naming the tensor ------------------------------------------------


@pytest.mark.parametrize("kind", ["model", "master", "exp_avg", "exp_avg_sq"])
def test_a_non_finite_tensor_is_refused_even_with_a_correct_checksum(data, run, tmp_path, kind):
    """The case of a run that diverged and saved: the files are intact, their contents are not usable."""
    src = LoadedCheckpoint(run[0] / "iter_0000001")
    sources = []
    for k, named in src.record.tensors.items():
        for name, entry in named.items():
            t = src.tensor(k, name)
            if (k, name) == (kind, "layers.1.mlp.down.weight"):
                t.view(-1)[5] = float("nan" if kind != "exp_avg" else "inf")
            sources.append(TensorSource(k, name, entry.shape, entry.torch_dtype, lambda t=t: t))
    args = ModelArgs.from_config(config(data, tmp_path).model)
    meta = dataclasses.replace(src.record, tensors={}, files={})
    path = write_checkpoint(tmp_path / "crafted", sources, args, metadata=meta, progress=False)
    for name, f in LoadedCheckpoint(path).record.files.items():
        check_file(path / name, f)  # the checksums are right
    where = f"{kind} tensor 'layers.1.mlp.down.weight'"
    with pytest.raises(CheckpointError, match=f"{MODEL}: {where} .* holds 1 non-finite value"):
        resume(data, tmp_path, path)
    with pytest.raises(CheckpointError, match=where):
        verify_checkpoint(path)


# -- kill -9 at any point of a save ------------------------------------------------------------------


def instrument_saves(iteration: int, on_event, set_attr=setattr) -> None:
    """Call ``on_event(label)`` before each file operation of the save of `iteration`: every tensor
    written into a file, every small file written (_atomic_write), rename (os.replace) and removal
    (shutil.rmtree). `set_attr` patches (``monkeypatch.setattr`` to undo it after a test)."""
    armed = [False]
    real_save = ckpt.Checkpointer.save

    def save(self, plan):
        armed[0] = plan.iteration == iteration
        try:
            real_save(self, plan)
        finally:
            armed[0] = False

    def wrap(fn, label):
        def wrapped(*args, **kwargs):
            if armed[0]:
                on_event(label(*args))
            return fn(*args, **kwargs)
        return wrapped

    set_attr(ckpt.Checkpointer, "save", save)
    set_attr(StreamingWriter, "write", wrap(StreamingWriter.write, lambda w, key, t: f"write {w.path.name}:{key}"))
    # patched where the save looks them up
    set_attr(save_module, "_atomic_write",
             wrap(save_module._atomic_write, lambda path, _: f"atomic_write {Path(path).name}"))
    set_attr(save_module.os, "replace", wrap(save_module.os.replace, lambda src, dst: f"replace {Path(dst).name}"))
    set_attr(save_module.shutil, "rmtree",
             wrap(save_module.shutil.rmtree, lambda path, *a: f"rmtree {Path(path).name}"))


KILL_AT = """
import os, sys
from test_checkpoint_integrity import SETTINGS, instrument_saves
from helpers import config, fit
iteration, kill_at, count = int(sys.argv[4]), int(sys.argv[5]), [0]
def event(label):
    count[0] += 1
    if count[0] == kill_at:
        os._exit(9)
instrument_saves(iteration, event)
fit(config({"web": sys.argv[1], "math": sys.argv[2]}, sys.argv[3], **SETTINGS))
"""


def spread(items: list, n: int) -> list:
    """n items of `items`, evenly spaced, first and last included."""
    if n >= len(items):
        return list(items)
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)]


@pytest.mark.slow
def test_kill_at_any_point_of_a_save_resumes_from_the_last_complete_checkpoint(data, tmp_path, monkeypatch):
    target = 2
    events: list[str] = []
    instrument_saves(target, events.append, monkeypatch.setattr)
    reference, _ = fit(config(data, tmp_path / "reference", **SETTINGS))
    monkeypatch.undo()
    assert events[0].startswith("write") and events[-2:] == ["replace latest", "rmtree .replaced_iter_0000002"]
    others = [i for i, e in enumerate(events) if not e.startswith("write")]  # small files, renames, removal
    writes = [i for i, e in enumerate(events) if e.startswith("write")]
    points = sorted(others + spread(writes, 20 - len(others)))
    assert len(points) == 20
    latest_moved = events.index("replace latest")

    def killed(k: int) -> subprocess.Popen:  # stopped by kill -9 before the file operation events[k]
        return subprocess.Popen([sys.executable, "-c", KILL_AT, data["web"], data["math"], str(tmp_path / f"kill{k}"),
                                 str(target), str(k + 1)], cwd=Path(__file__).parent, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    for pair in (points[i:i + 2] for i in range(0, len(points), 2)):
        procs = [(k, killed(k)) for k in pair]
        for k, proc in procs:
            _, err = proc.communicate()
            assert proc.returncode == 9, (events[k], err[-3000:])
    for k in points:
        root = tmp_path / f"kill{k}" / "checkpoints"
        start = target if k > latest_moved else target - 1
        assert (root / "latest").read_text().strip() == f"iter_{start:07d}", events[k]
        losses, trainer = fit(config(data, tmp_path / f"kill{k}", **{**SETTINGS, "checkpoint.load": "auto"}))
        assert trainer.run.iteration == ITERS and losses == reference[start:], events[k]
        assert verify_checkpoint(root)["iteration"] == ITERS
        assert not any(p.name.startswith((".tmp_", ".replaced_")) for p in root.iterdir()), events[k]
