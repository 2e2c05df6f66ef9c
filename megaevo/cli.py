"""The `megaevo` command: one entry point, one subcommand per job, and the only argument parser.

Each command imports its own modules when it runs (the imports marked ``lazy``), so that `megaevo --help`,
`megaevo plan` and the data commands never load torch or the optional packages of other commands."""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from megaevo.errors import TrainingStopped, UserError, report_user_error
from megaevo.log import get_logger, setup_logging

logger = get_logger(__name__)


def _tokenizer_train(args) -> int:
    from megaevo.data.tokenizers import train_sentencepiece  # lazy: loaded by the command that uses it

    model = train_sentencepiece(
        inputs=args.input,
        vocab_size=args.vocab_size,
        output_prefix=args.output,
        json_key=args.json_key,
        max_sentences=args.max_sentences,
        seed=args.seed,
    )
    print(f"wrote {model}")
    return 0


def _preprocess(args) -> int:
    if args.sft:
        if args.json_key is not None:
            raise UserError("--json-key does not apply with --sft (nor --key): conversations are read by "
                            "--format, or from the columns --columns names")
        if args.append_eod:
            raise UserError("--append-eod does not apply with --sft: the --template decides where EOS goes")
        from megaevo.data.sft import preprocess_sft  # lazy: loaded by the command that uses it

        summary = preprocess_sft(
            inputs=args.input,
            output_prefix=args.output_prefix,
            tokenizer=args.tokenizer,
            template=args.template or "evolm",
            workers=args.workers,
            on_error=args.on_error,
            progress=not args.quiet,
            fmt=args.format or "auto",
            columns=args.columns,
            shard=args.shard,
        )
    else:
        for flag, value in (("--template", args.template), ("--format", args.format), ("--columns", args.columns)):
            if value is not None:
                raise UserError(f"{flag} applies only with --sft (conversations with a chat template)")
        from megaevo.data.preprocess import preprocess  # lazy: loaded by the command that uses it

        summary = preprocess(
            inputs=args.input,
            output_prefix=args.output_prefix,
            tokenizer=args.tokenizer,
            json_key=args.json_key if args.json_key is not None else "text",
            workers=args.workers,
            append_eod=args.append_eod,
            on_error=args.on_error,
            progress=not args.quiet,
            shard=args.shard,
        )
    print(json.dumps(summary.as_dict()) if args.json else summary.describe())
    return 0


def _inspect(args) -> int:
    from megaevo.convert import is_hf_dir  # lazy: loaded by the command that uses it
    from megaevo.data import indexed  # lazy: loaded by the command that uses it

    if args.verify and (is_hf_dir(args.path) or not Path(args.path).is_dir()):
        raise UserError(f"--verify: {args.path}: not a megaevo checkpoint (--verify reads and checks "
                        f"checkpoints only)")
    if is_hf_dir(args.path):
        return _inspect_hf(args)
    if Path(args.path).is_dir():
        # lazy: loaded by the command that uses it
        from megaevo.checkpoint import summarize_checkpoint, verify_checkpoint

        if args.verify:  # a problem is a CheckpointError: main prints it as one line and exits non-zero
            result = verify_checkpoint(args.path, progress=not args.json)
            if args.json:
                print(json.dumps({"ok": True, **result}))
            else:
                sums = (f"match their {result['checksum']} checksums" if result["checksum"]
                        else "have no checksums recorded (an older checkpoint): not compared")
                print(f"OK  {result['path']}: {len(result['files'])} files ({result['bytes']:,} bytes) {sums}; "
                      f"{result['tensors']} tensors readable and finite ({result['seconds']:.1f} s)")
            return 0
        info = summarize_checkpoint(args.path)
        if args.json:
            print(json.dumps(info))
            return 0
        layout = info["layout"] or {}
        print(f"checkpoint  {info['path']}")
        print(f"iteration   {info['iteration']:,}   consumed samples {info['consumed_samples']:,}   "
              f"tokens {info['tokens']:,}")
        vpp = f" virtual_pp={layout['virtual_pp']}" if (layout.get("virtual_pp") or 1) > 1 else ""
        print(f"saved with  tp={layout.get('tp')} pp={layout.get('pp')}{vpp} dp={layout.get('dp')} "
              f"distributed_optimizer={layout.get('distributed_optimizer')} dtype={layout.get('dtype')}")
        print(f"optimizer   {', '.join(info['optimizer_state']) or 'none'}")
        print(f"parameters  {info['parameters']:,} in {len(info['tensors'])} tensors")
        print(f"files       {len(info['files'])}, {sum(info['files'].values()):,} bytes, sizes as recorded; "
              + (f"{info['checksum']} checksums recorded (--verify reads and checks them)" if info["checksum"]
                 else "no checksums recorded"))
        width = max(map(len, info["tensors"]), default=0)
        for name, t in info["tensors"].items():
            print(f"  {name:<{width}}  {str(t['shape']):<16} {t['dtype']:<9} {t['fragments']} fragment(s)")
        return 0
    if not indexed.exists(args.path):
        idx, bin_ = indexed.paths(args.path)
        if idx.exists() or bin_.exists():
            indexed.IndexedDataset(args.path)  # raises the precise error (missing partner, ...)
        raise UserError(f"{args.path}: not a dataset prefix or checkpoint ({idx.name} and {bin_.name} not found)")
    info = indexed.summarize(args.path)
    if args.json:
        print(json.dumps(info))
    else:
        width = max(map(len, info))
        for k, v in info.items():
            print(f"{k:<{width}}  {v:,}" if isinstance(v, int) else f"{k:<{width}}  {v}")
    return 0


def _inspect_hf(args) -> int:
    from megaevo.convert import summarize_hf  # lazy: loaded by the command that uses it

    info = summarize_hf(args.path)
    if args.json:
        print(json.dumps(info))
        return 0
    cfg = info["config"]
    print(f"model       {info['path']}  (Hugging Face, {info['files']} safetensors file(s))")
    print(f"arch        {info['architecture']} ({info['model_type']}), dtype {info['dtype']}")
    print("shape       " + "  ".join(f"{k}={v}" for k, v in cfg.items()))
    print(f"parameters  {info['parameters']:,} in {len(info['tensors'])} tensors   "
          + "  ".join(f"{d}: {n:,}" for d, n in info["dtypes"].items()))
    print(f"tokenizer   {', '.join(info['tokenizer_files']) or 'none'}")
    print(f"megaevo     {'convertible' if info['convertible'] else 'not convertible: ' + info['problem']}")
    width = max(map(len, info["tensors"]), default=0)
    for name, t in info["tensors"].items():
        print(f"  {name:<{width}}  {str(t['shape']):<16} {t['dtype']:<5} {t['file']}")
    return 0


def _convert(args) -> int:
    from megaevo import convert  # lazy: loaded by the command that uses it

    if args.from_hf and args.load:
        raise UserError("give either --from-hf DIR or --load CKPT, not both")
    if args.from_hf:
        if not args.save or args.to_hf:
            raise UserError("--from-hf DIR needs --save OUT (a megaevo checkpoint directory to create)")
        path = convert.import_hf(args.from_hf, args.save, tp=args.tp, pp=args.pp, pp_layers=args.pp_layers,
                                 virtual_pp=args.virtual_pp, dtype=args.dtype, progress=not args.quiet)
        info = {"checkpoint": str(path), "config": str(Path(args.save) / "config.yaml"), "tp": args.tp, "pp": args.pp}
        if args.json:
            print(json.dumps(info))
        else:
            print(f"wrote {path} (iteration 0, tp={args.tp} pp={args.pp}, no optimizer state)")
            print(f"continue training from it: megaevo train --config {info['config']} data.train=... out_dir=...")
        return 0
    if args.load:
        if args.to_hf:
            if args.tp != 1 or args.pp != 1 or args.virtual_pp != 1 or args.pp_layers:
                raise UserError("--tp/--pp/--virtual-pp/--pp-layers describe a megaevo layout; they do not apply to "
                                "--to-hf")
            from megaevo.checkpoint.safetensors_io import parse_size  # lazy: loaded by the command that uses it

            try:
                parse_size(args.max_shard_size)
            except ValueError as e:
                raise UserError(f"--max-shard-size: {e}") from None
            info = convert.export_hf(args.load, args.to_hf, architecture=args.arch, dtype=args.dtype,
                                     max_shard_size=args.max_shard_size, tokenizer=args.tokenizer,
                                     progress=not args.quiet)
            if args.json:
                print(json.dumps(info))
            else:
                written = ", ".join(info.get("files_written", []))
                print(f"wrote {info['path']} from {info['checkpoint']}: {info['architecture']}, "
                      f"{info['parameters']:,} parameters in {info['shards']} shard(s); copied "
                      f"{', '.join(info['files_copied']) or 'no tokenizer files'}"
                      + (f"; wrote {written}" if written else ""))
            return 0
        if args.save:
            path = convert.reshard(args.load, args.save, tp=args.tp, pp=args.pp, virtual_pp=args.virtual_pp,
                                   pp_layers=args.pp_layers, optimizer=not args.no_optimizer, progress=not args.quiet)
            info = {"checkpoint": str(path), "tp": args.tp, "pp": args.pp, "virtual_pp": args.virtual_pp,
                    "optimizer": not args.no_optimizer}
            if args.json:
                print(json.dumps(info))
            else:
                print(f"wrote {path} for tp={args.tp} pp={args.pp}"
                      + (f" virtual_pp={args.virtual_pp}" if args.virtual_pp > 1 else "")
                      + ("" if args.no_optimizer else ", optimizer state included"))
                print(f"continue training from it: checkpoint.load={args.save} parallel.tp={args.tp} "
                      f"parallel.pp={args.pp}")
            return 0
    raise UserError("nothing to do: use --from-hf DIR --save OUT, --load CKPT --to-hf OUT, or --load CKPT --save OUT")


def _merge(args) -> int:
    from megaevo.data.indexed import merge_datasets  # lazy: loaded by the command that uses it
    from megaevo.data.sft import is_sft_dataset, merge_sft  # lazy: loaded by the command that uses it

    sft = [is_sft_dataset(p) for p in args.input]
    if any(sft) and not all(sft):
        listing = ", ".join(f"{p} ({'SFT' if s else 'text'})" for p, s in zip(args.input, sft))
        raise UserError(f"cannot merge SFT datasets (with a loss mask) with text datasets: {listing}")
    if all(sft):
        merged = merge_sft(args.input, args.output_prefix)
        print(f"wrote {merged.prefix}.bin/.idx, .loss_mask.bin and .sft.json: {len(merged):,} conversations, "
              f"{merged.num_tokens:,} tokens")
        return 0
    merged = merge_datasets(args.input, args.output_prefix)
    print(f"wrote {merged.prefix}.bin/.idx: {merged.num_documents:,} documents, {len(merged):,} sequences, "
          f"{merged.num_tokens:,} tokens ({merged.dtype})")
    return 0


def _plan(args) -> int:
    from megaevo.plan.cli import run  # lazy: loaded by the command that uses it

    return run(args)


def _train(args) -> int:
    """`megaevo train` and `python -m megaevo.train` (also under torchrun). A mistake in the config,
    the data or a checkpoint is one line on rank 0 and exit code 2 on every rank; a run stopped by
    non-finite steps exits with 3; a stop by signal after saving exits with 0 (however many signals came:
    the checkpoint is committed first). An interrupt before training starts, or with
    checkpoint.save_on_signal off, exits with 130 without saving."""
    import torch.distributed as dist  # lazy: torch only for the commands that train
    import yaml

    from megaevo.config import config_to_dict, load_config  # lazy: the train command's own modules
    from megaevo.parallel.distributed import init_distributed, report_once  # lazy: as above
    from megaevo.stages import build_stage  # lazy: as above
    from megaevo.training.trainer import Trainer  # lazy: as above

    rank = int(os.environ.get("RANK", "0") or 0)
    setup_logging(rank)
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not args.print_config:
            init_distributed()  # first, so that a mistake in the config is reported once for the job
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            if rank == 0:
                print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False), end="")
            return 0
        Trainer(cfg, build_stage).fit()
        return 0
    except UserError as e:
        report_once(str(e), rank)
        return 2
    except TrainingStopped as e:  # decided together by all ranks: rank 0 says it
        if rank == 0:
            logger.error(str(e))
        return 3
    except KeyboardInterrupt:
        report_once("interrupted, without saving (the checkpoints already committed are intact)", rank)
        return 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def unescape(text: str) -> str:
    """``\\n``, ``\\t``, ``\\r`` and ``\\\\`` typed on a command line (a shell passes them as two
    characters) as the characters they name; any other backslash stays."""
    return re.sub(r"\\([ntr\\])", lambda m: _ESCAPES[m.group(1)], text)


def _generate(args) -> int:
    import torch.distributed as dist

    from megaevo.inference import SamplingParams, load  # lazy: loaded by the command that uses it

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.tp is not None and args.tp > 1 and world == 1:
        raise UserError(f"--tp {args.tp} needs {args.tp} processes: run "
                        f"`torchrun --nproc_per_node {args.tp} -m megaevo.cli generate ...`")
    model = load(args.load, tp=args.tp, require_tokenizer=True)  # the prompts are text
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, repetition_penalty=args.repetition_penalty, n=args.n, seed=args.seed,
                            stop=tuple(unescape(s) for s in args.stop), add_bos=args.bos)
    results = model.generate(args.prompt, params)
    if dist.is_initialized() and dist.get_rank() != 0:
        return 0
    for i, (prompt, samples) in enumerate(zip(args.prompt, results)):
        for j, c in enumerate(samples):
            if args.json:
                print(json.dumps({"prompt": i, "sample": j, **c.to_json()}, ensure_ascii=False), flush=True)
            else:
                head = f"[{i}]" + (f"[{j}]" if len(samples) > 1 else "")
                print(f"{head} {prompt}{c.text}\n    ({len(c.token_ids)} tokens, {c.finish_reason})", flush=True)
    return 0


def _demo(args) -> int:
    from megaevo.demo import run_demo  # lazy: loaded by the command that uses it

    result = run_demo(args.dir, seed=args.seed, train=not args.data_only, life_cycle=not args.single_run,
                      all_chains=args.all_chains)
    cycle = result.life_cycle
    return 1 if cycle is not None and not cycle.ok else 0


# The sections of a run's config, one dataclass each in megaevo/config/ (the tests keep this in step).
CONFIG_SECTIONS = {
    "stage": "pretrain (also CPT), sft or rl (a top-level key, default pretrain)",
    "model": "the model's shape (megaevo/model/args.py); model.preset fills it",
    "parallel": "tp, pp, virtual_pp, sequence parallelism, the distributed optimizer",
    "data": "training blend, validation sets, seq_len, split, tokenizer",
    "train": "batch sizes, iters, seed, log/eval intervals, dtype",
    "optim": "AdamW and the learning-rate schedule",
    "checkpoint": "saving and loading: interval, keep_last, load, finetune",
    "kernels": "the fused-kernel backend (auto, triton, torch, apex) and autotuning",
    "sft": "supervised fine-tuning: packing, cutoff, truncate, loss_normalization",
    "rl": "reinforcement learning (PPO, GRPO): prompts, sampling, losses, KL, reward, critic",
    "out_dir": "where the run writes (a top-level key, default runs/megaevo)",
}

TRAIN_EPILOG = (
    "The config keys are the fields of the dataclasses in megaevo/config/ (their docstrings say\n"
    "what each does), one YAML section each:\n"
    + "".join(f"  {name:<11} {what}\n" for name, what in CONFIG_SECTIONS.items())
    + "Give them in the --config file and/or as dotted overrides after it (optim.lr=3e-4 parallel.tp=2);\n"
      "--print-config shows every key with the value the run would use."
)


def _eval(args) -> int:
    from megaevo.eval.runner import format_table, run_eval  # lazy: loaded by the command that uses it

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    results = run_eval(tasks, args.out, load=args.load, predictions=args.predictions, data_dir=args.data_dir,
                       limit=args.limit, batch_size=args.batch_size, samples=args.samples, template=args.template,
                       tp=args.tp, max_length=args.max_length, seed=args.seed, workers=args.workers,
                       progress=not args.quiet)
    if int(os.environ.get("RANK", "0") or 0) == 0:
        print(format_table(results))
        print(f"wrote {Path(args.out) / 'results.json'} and {Path(args.out) / 'samples'}/")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from megaevo import __version__
    from megaevo.data.tokenizers import MIN_VOCAB_SIZE  # lazy: loaded by the command that uses it

    p = argparse.ArgumentParser(prog="megaevo", description=__doc__)
    p.add_argument("--version", action="version", version=f"megaevo {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    tok = sub.add_parser("tokenizer", help="train a tokenizer").add_subparsers(dest="action", required=True)
    t = tok.add_parser("train", help="train a SentencePiece BPE model (byte fallback, chat special tokens)")
    t.add_argument("--input", nargs="+", required=True, help="text, jsonl (.gz, .zst), parquet or arrow files")
    t.add_argument("--vocab-size", type=int, required=True, metavar="N",
                   help=f"pieces in the vocabulary, the {MIN_VOCAB_SIZE - 1} control, chat and byte-fallback pieces "
                        f"included (at least {MIN_VOCAB_SIZE}; e.g. 32000): the model's model.vocab_size must be "
                        f"at least this")
    t.add_argument("--output", required=True, help="output prefix: writes PREFIX.model and PREFIX.vocab")
    t.add_argument("--json-key", default="text", help="field to read from jsonl inputs")
    t.add_argument("--max-sentences", type=int, default=2_000_000, help="sample at most this many lines")
    t.add_argument("--seed", type=int, default=1234, help="seed of the line sample (default: %(default)s)")
    t.set_defaults(func=_tokenizer_train)

    pp = sub.add_parser("preprocess", help="tokenize text (jsonl, .jsonl.gz, .jsonl.zst, parquet, Hugging Face "
                                           "dataset folders) into an indexed dataset (.bin/.idx); with --sft, "
                                           "conversations with a chat template and a loss mask")
    pp.add_argument("--input", nargs="+", required=True,
                    help="files (jsonl, .jsonl.gz, .jsonl.zst/.zst, .parquet, .arrow), directories (a save_to_disk "
                         "folder, or every such file under it, sorted by path) or glob patterns (matches sorted)")
    pp.add_argument("--json-key", "--key", dest="json_key", default=None,
                    help="jsonl key or parquet/arrow column that holds the document text (default: text; not "
                         "with --sft)")
    pp.add_argument("--tokenizer", required=True, help="SentencePiece .model or Hugging Face tokenizer.json")
    pp.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx (Megatron-LM's format); "
                                                           "with --sft also PREFIX.loss_mask.bin and PREFIX.sft.json")
    pp.add_argument("--sft", action="store_true",
                    help="SFT conversations: each line holds 'messages' (system/user/assistant), 'prompt' and "
                         "'response', or 'problem' and 'gt_solution' (or see --format, --columns); one sequence per "
                         "conversation plus its loss mask (assistant answers)")
    pp.add_argument("--format", choices=("auto", "messages", "alpaca", "sharegpt"), default=None,
                    help="conversation format with --sft: messages (OpenAI role/content), alpaca (instruction, "
                         "input, output, system, history), sharegpt (conversations of from/value); auto (default) "
                         "recognises each line by its keys and refuses a line that fits several")
    pp.add_argument("--columns", default=None, metavar="prompt=COL,response=COL[,system=COL]",
                    help="with --sft: one turn from these columns, e.g. prompt=query,response=response "
                         "(MetaMathQA) or prompt=problem,response=generated_solution (OpenMathInstruct-2)")
    pp.add_argument("--shard", default=None, metavar="I/N",
                    help="process only shard I (from 0) of N: a contiguous 1/N of the inputs, cut by file, parquet "
                         "row group or jsonl byte range; `megaevo merge` of the N outputs in order equals one job "
                         "over all inputs")
    pp.add_argument("--template", choices=("evolm", "chat", "hf", "raw"), default=None,
                    help="chat template with --sft: evolm (EvoLM's 'Human: ...\\nAssistant:'), chat (megaevo's "
                         "<|user|> tokens), hf (the tokenizer's chat_template), raw (default: evolm)")
    pp.add_argument("--workers", type=int, default=1, help="tokenizer processes (default: %(default)s)")
    pp.add_argument("--append-eod", action="store_true", help="append the end-of-document token to every document")
    pp.add_argument("--on-error", choices=["fail", "skip"], default="fail",
                    help="malformed lines or rows: fail at the first one, naming file and line (parquet: row "
                         "group and row), writing nothing; or skip and count them (default: %(default)s)")
    pp.add_argument("--quiet", action="store_true", help="no progress bar")
    pp.add_argument("--json", action="store_true", help="print the summary as JSON")
    pp.set_defaults(func=_preprocess)

    ins = sub.add_parser("inspect", help="summarise a dataset prefix, a checkpoint or a Hugging Face model directory")
    ins.add_argument("path")
    ins.add_argument("--json", action="store_true")
    ins.add_argument("--verify", action="store_true",
                     help="read a checkpoint's every file and check sizes, checksums, fragments and finite values; "
                          "exit non-zero naming the first problem")
    ins.set_defaults(func=_inspect)

    tr = sub.add_parser("train", help="train in this process (use torchrun -m megaevo.train for several)",
                        description="Train a model in this process; for several, the same arguments go to "
                                    "torchrun --nproc_per_node N -m megaevo.train.",
                        epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    tr.add_argument("--config", help="YAML config file (examples/*.yaml)")
    tr.add_argument("--print-config", action="store_true",
                    help="print the resolved config (every key, defaults included) as YAML and exit")
    tr.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.iters=100 parallel.tp=2")
    tr.set_defaults(func=_train)

    cv = sub.add_parser("convert", help="reshard a checkpoint; Hugging Face model directory <-> megaevo checkpoint",
                        description="--load CKPT --save OUT --tp N --pp M rewrites a checkpoint (weights and "
                                    "optimizer state, exactly) cut for another layout; --from-hf DIR --save OUT "
                                    "imports a Hugging Face Llama, Mistral or Qwen2 model as a checkpoint at iteration "
                                    "0; --load CKPT --to-hf OUT exports a checkpoint as a Hugging Face model directory.")
    cv.add_argument("--from-hf", metavar="DIR", help="Hugging Face model directory (config.json, safetensors, tokenizer)")
    cv.add_argument("--load", metavar="CKPT", help="megaevo checkpoint (iter_NNNNNNN, a checkpoints/ folder or a run)")
    cv.add_argument("--save", metavar="OUT", help="checkpoints directory to create (from --from-hf or --load)")
    cv.add_argument("--to-hf", metavar="OUT", help="Hugging Face model directory to create from --load")
    cv.add_argument("--tp", type=int, default=1, help="target tensor-parallel size of the written checkpoint")
    cv.add_argument("--pp", type=int, default=1, help="target pipeline-parallel size of the written checkpoint")
    cv.add_argument("--virtual-pp", type=int, default=1, help="target model chunks per pipeline stage (interleaved)")
    cv.add_argument("--pp-layers", type=int, nargs="+", metavar="N",
                    help="layers per (virtual) pipeline stage (uneven split)")
    cv.add_argument("--no-optimizer", action="store_true", help="reshard the weights only, without optimizer state")
    cv.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="cast the weights (default: keep their dtype)")
    cv.add_argument("--arch", choices=["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"],
                    help="architecture to export as (default: the imported one, else Llama, or Qwen2 with q/k/v biases)")
    cv.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard to write with --to-hf")
    cv.add_argument("--tokenizer", metavar="PATH", help="tokenizer file or directory to put beside the exported model")
    cv.add_argument("--quiet", action="store_true", help="no progress bar")
    cv.add_argument("--json", action="store_true", help="print the result as JSON")
    cv.set_defaults(func=_convert)

    mg = sub.add_parser("merge", help="concatenate indexed datasets of one dtype (or SFT datasets) into one, e.g. "
                                      "the shards of `preprocess --shard I/N`")
    mg.add_argument("--input", nargs="+", required=True, help="dataset prefixes, in order (shards: 0 to N-1)")
    mg.add_argument("--output-prefix", required=True,
                    help="writes PREFIX.bin and PREFIX.idx (SFT inputs: also PREFIX.loss_mask.bin, PREFIX.sft.json)")
    mg.set_defaults(func=_merge)

    d = sub.add_parser("demo", help="build the embedded demo data (no download) and run the tiny model's life "
                                    "cycle on it: pretrain, CPT with and without replay, SFT, RL, evaluated after each")
    d.add_argument("--dir", default="megaevo-demo",
                   help="directory for everything the demo makes: corpora, tokenizer, datasets, the suite spec "
                        "(DIR/suite.yaml and DIR/configs/: edit them and rerun), its runs and table (DIR/suite/) "
                        "and plots (DIR/plots/); a rerun reuses what is complete, skips finished runs and "
                        "resumes an interrupted one (default: %(default)s)")
    d.add_argument("--data-only", action="store_true", help="build the data only; train nothing")
    d.add_argument("--all-chains", action="store_true",
                   help="SFT and RL after every CPT run (the whole suite tree), not only after the last one "
                        "(with replay): twice the time of those stages")
    d.add_argument("--single-run", action="store_true",
                   help="train the single pre-training run (DIR/run, DIR/config.yaml) instead of the life cycle")
    d.add_argument("--seed", type=int, default=1234,
                   help="seed of the math problems, the tokenizer's sample and the training run; another seed "
                        "makes another demo (default: %(default)s)")
    d.set_defaults(func=_demo)

    g = sub.add_parser("generate", help="generate text from a checkpoint or a Hugging Face model directory "
                                        "(torchrun --nproc_per_node N for tensor parallelism)")
    g.add_argument("--load", required=True, help="a run, checkpoints folder, iter_ directory or Hugging Face directory")
    g.add_argument("--prompt", action="append", required=True, help="a text prompt (repeatable)")
    g.add_argument("--max-new-tokens", type=int, default=256, metavar="N", help="(default: %(default)s)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: %(default)s)")
    g.add_argument("--top-p", type=float, default=1.0, help="(default: %(default)s)")
    g.add_argument("--top-k", type=int, default=0, help="0 = off (default: %(default)s)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="(default: %(default)s)")
    g.add_argument("--n", type=int, default=1, help="samples per prompt (default: %(default)s)")
    g.add_argument("--seed", type=int, default=None, help="sampling seed")
    g.add_argument("--stop", action="append", default=[], metavar="STR",
                   help="stop string (repeatable; \\n, \\t, \\r and \\\\ are read as escapes)")
    g.add_argument("--bos", action="store_true", help="prepend the tokenizer's BOS token to each prompt")
    g.add_argument("--json", action="store_true", help="print one JSON object per sample")
    g.add_argument("--tp", type=int, default=None, metavar="N",
                   help="tensor-parallel size (default: the torchrun world size); N > 1 needs torchrun")
    g.set_defaults(func=_generate)

    pl = sub.add_parser("plan", help="rank the parallel layouts (TP x PP x DP, micro-batch, recompute, distributed "
                                     "optimizer) of a model on a cluster by per-GPU memory and step time")
    from megaevo.plan.cli import add_arguments  # lazy: loaded by the command that uses it

    add_arguments(pl)
    pl.set_defaults(func=_plan)

    # Listed here for `megaevo --help`; main() hands their arguments to their own parsers.
    sub.add_parser("suite", add_help=False, help="run an EvoLM-style grid of stage chains (pretrain, cpt, sft, rl) "
                   "with evaluation after each stage, locally or on slurm; results table (see megaevo suite --help)")
    sub.add_parser("report", add_help=False, help="plot a run's or a suite's training dynamics and results "
                   "(see megaevo report --help)")

    ev = sub.add_parser("eval", help="evaluate a model on generative, multiple-choice or loss tasks (or grade "
                                     "given completions) and write results.json")
    src = ev.add_mutually_exclusive_group(required=True)
    src.add_argument("--load", help="a run, checkpoints folder, iter_ directory or Hugging Face directory")
    src.add_argument("--predictions", metavar="FILE",
                     help="grade completions made elsewhere: jsonl with id and completion (or completions)")
    ev.add_argument("--tasks", required=True, metavar="TASK[,TASK...]",
                    help="EvoLM set names or jsonl files, rg:NAME[:COUNT[:SEED]], multiple-choice jsonl, "
                         "indexed dataset prefixes")
    ev.add_argument("--out", required=True, metavar="DIR", help="writes DIR/results.json and DIR/samples/")
    ev.add_argument("--data-dir", default=None, metavar="DIR", help="where task names are looked up "
                    "(default: $MEGAEVO_EVAL_DIR)")
    ev.add_argument("--limit", type=int, default=None, metavar="N", help="the first N problems of each task")
    ev.add_argument("--batch-size", type=int, default=8, metavar="B", help="prompts per batch (default: %(default)s)")
    ev.add_argument("--samples", type=int, default=0, metavar="K",
                    help="K samples at temperature 1 (maj@K, pass@K, pass@1) instead of greedy")
    ev.add_argument("--template", choices=("evolm", "chat", "hf", "raw"), default="evolm",
                    help="the prompt's chat template: evolm (EvoLM's 'Human: ...\\nAssistant:'), chat (megaevo's "
                         "role tokens), hf (the tokenizer's chat_template), raw (default: %(default)s)")
    ev.add_argument("--max-length", type=int, default=2048, metavar="N",
                    help="prompt + completion tokens, capped by the model's max_seq_len (default: %(default)s)")
    ev.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    ev.add_argument("--tp", type=int, default=None, metavar="N",
                    help="tensor-parallel size (default: the torchrun world size); N > 1 needs torchrun")
    ev.add_argument("--workers", type=int, default=None, metavar="N", help="grading processes (default: min(8, CPUs))")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")
    ev.set_defaults(func=_eval)
    return p


# Optional packages a command may need, and how to install each.
def main(argv: list[str] | None = None) -> int:
    """Run one command. Its result (a table, JSON, what was written) is printed to stdout; progress
    and notices are logged through `megaevo.log` (INFO on stdout, warnings and errors on stderr).

    A mistake in the user's input (a :class:`megaevo.errors.UserError`, a missing or unwritable path,
    a missing optional package) is one line on stderr and exit code 2; anything else is a bug and
    keeps its traceback (as does every error with MEGAEVO_DEBUG=1)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("suite", "report"):  # commands with parsers of their own
        if argv[0] == "suite":
            from megaevo.suite import main as suite_main  # lazy: loaded by the command that uses it

            return suite_main(argv[1:])
        from megaevo.suite.report_cli import main as report_main  # lazy: plots, findings and fits load on use

        return report_main(argv[1:])
    args = build_parser().parse_args(argv)
    setup_logging(rank=int(os.environ.get("RANK", "0") or 0))
    try:
        return args.func(args)
    except KeyboardInterrupt:
        logger.error("megaevo %s: interrupted", args.command)
        return 130
    except BrokenPipeError:  # output piped into head & co.
        return 0
    except (ValueError, OSError, ImportError) as e:
        return report_user_error(e, args.command)


if __name__ == "__main__":
    sys.exit(main())
