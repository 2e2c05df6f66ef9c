"""Time and peak memory of checkpoint conversion on a generated model (CPU, local disk).

    python benchmarks/convert.py [--preset evolm-1b] [--dtype bf16] [--with-optimizer] [--ops reshard_tp2_pp2 export_hf]

Writes a random checkpoint of the preset's shape to a temporary directory (weights only, or with
--with-optimizer also the fp32 master weights and both Adam moments), then runs each operation as
`megaevo convert ...` in a fresh process and reports its wall time and peak resident memory
(ru_maxrss of that process alone), beside the size of the model and the RSS of a process that only
imports megaevo. Prints one JSON object per line.

Operations are entries of OPERATIONS: a name, the operations it needs first, and the command.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# No torch here: a process started by this one counts this one's memory at the fork in its own peak,
# so the measuring process stays small and the checkpoint is generated in a child process too.
DTYPES = {"bf16": 2, "fp32": 4}  # bytes per weight
BASELINE = "import megaevo.cli, megaevo.convert, megaevo.checkpoint"


def generate_checkpoint(root: Path, preset: str, dtype_name: str, with_optimizer: bool) -> tuple[Path, int]:
    """A random checkpoint of `preset` under root (written tensor by tensor); its path and parameter count."""
    import torch

    from megaevo.config import Config, ModelConfig, config_to_dict
    from megaevo.convert import TensorSource, target_blocks, write_checkpoint
    from megaevo.model.args import ModelArgs

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    cfg = Config(model=ModelConfig.from_preset(preset))
    args = ModelArgs.from_config(cfg.model)
    shapes = target_blocks(args)[1]
    gen = torch.Generator().manual_seed(0)

    def random(shape, out_dtype, positive=False):
        def load():
            t = torch.randn(shape, generator=gen) * 0.02
            return (t.abs() if positive else t).to(out_dtype)
        return load

    sources = [TensorSource("model", n, s, dtype, random(s, dtype)) for n, s in shapes.items()]
    if with_optimizer:
        for kind in ("master", "exp_avg", "exp_avg_sq"):
            sources += [TensorSource(kind, n, s, torch.float32, random(s, torch.float32, kind == "exp_avg_sq"))
                        for n, s in shapes.items()]
    metadata = {"consumed_samples": 1000 * 512, "tokens": 1000 * 512 * 2048, "optimizer_step": 1000,
                "skipped_steps": 0, "layout": {"tp": 1, "pp": 1, "dp": 1, "distributed_optimizer": False,
                                               "dtype": str(dtype)},
                "config": config_to_dict(cfg)}
    path = write_checkpoint(root, sources, args, iteration=1000, metadata=metadata, progress=False)
    return path, sum(math.prod(s) for s in shapes.values())


def run_measured(argv: list[str]) -> dict:
    """Run argv in a new process; its wall time and its own peak RSS."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{err[-2000:]}")
    return {"seconds": round(seconds, 3), "peak_rss_gb": round(usage.ru_maxrss / 2**20, 3)}  # ru_maxrss is KiB


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "megaevo.cli", "convert", *args, "--quiet"]


# name -> (operations whose output it reads, command from the work directory and the checkpoint path)
OPERATIONS = {
    "reshard_tp2_pp2": ((), lambda d, ck: _cli("--load", str(ck), "--save", str(d / "tp2_pp2"), "--tp", "2",
                                               "--pp", "2")),
    "reshard_back_tp1_pp1": (("reshard_tp2_pp2",), lambda d, ck: _cli("--load", str(d / "tp2_pp2"), "--save",
                                                                     str(d / "tp1_pp1"))),
    "export_hf": ((), lambda d, ck: _cli("--load", str(ck), "--to-hf", str(d / "hf"))),
    "import_hf": (("export_hf",), lambda d, ck: _cli("--from-hf", str(d / "hf"), "--save", str(d / "imported"))),
    "import_hf_tp2_pp2": (("export_hf",), lambda d, ck: _cli("--from-hf", str(d / "hf"), "--save",
                                                             str(d / "imported_tp2_pp2"), "--tp", "2", "--pp", "2")),
}


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="evolm-1b")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--with-optimizer", action="store_true", help="also fp32 master weights and Adam moments")
    p.add_argument("--ops", nargs="+", choices=list(OPERATIONS), default=list(OPERATIONS))
    p.add_argument("--dir", help="work directory (default: a temporary one, removed at the end)")
    p.add_argument("--generate-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.generate_only:  # the child process that writes the random checkpoint
        ckpt, params = generate_checkpoint(Path(args.dir) / "checkpoint", args.preset, args.dtype, args.with_optimizer)
        (Path(args.dir) / "generated.json").write_text(json.dumps({"path": str(ckpt), "parameters": params}))
        return
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="megaevo-convert-bench-"))
    try:
        generated = run_measured([sys.executable, __file__, "--generate-only", "--dir", str(work), "--preset",
                                  args.preset, "--dtype", args.dtype] + (["--with-optimizer"] if args.with_optimizer
                                                                         else []))
        info = json.loads((work / "generated.json").read_text())
        ckpt, params = Path(info["path"]), info["parameters"]
        common = {"preset": args.preset, "dtype": args.dtype, "with_optimizer": args.with_optimizer,
                  "parameters": params, "model_gb": round(params * DTYPES[args.dtype] / 1e9, 3),
                  "checkpoint_gb": round(dir_bytes(ckpt) / 1e9, 3)}
        print(json.dumps({"op": "generate", **common, **generated}), flush=True)
        baseline = run_measured([sys.executable, "-c", BASELINE])
        print(json.dumps({"op": "baseline_import", **common, **baseline}), flush=True)
        done: set[str] = set()
        for op in args.ops:
            needs, command = OPERATIONS[op]
            for dep in needs:
                if dep not in done:
                    run_measured(OPERATIONS[dep][1](work, ckpt))
                    done.add(dep)
            result = run_measured(command(work, ckpt))
            done.add(op)
            gb = common["checkpoint_gb" if op.startswith("reshard") else "model_gb"]  # what the operation moves
            print(json.dumps({"op": op, **common, **result, "gb_per_s": round(gb / result["seconds"], 3),
                              "rss_above_baseline_gb": round(result["peak_rss_gb"] - baseline["peak_rss_gb"], 3)}),
                  flush=True)
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
