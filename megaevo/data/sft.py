"""SFT conversations: jsonl, parquet or arrow rows in, a token dataset with a loss mask out
(``megaevo preprocess --sft``).

Input: one conversation per line (or row; any container :mod:`megaevo.data.readers` reads), in one of
these formats (other keys are ignored):

- ``messages`` (OpenAI style): ``{"messages": [{"role": "system" | "user" | "assistant", "content":
  "..."}, ...]}``: an optional system message first, then user and assistant turns alternating from a
  user turn, ending with an assistant turn (several turns allowed). A ``tool`` turn is refused by name:
  none of the chat templates lays out tool results;
- ``alpaca``: ``{"instruction", "input", "output", "system", "history"}``: the user turn is the
  instruction, then a newline and the input when it is not empty (as LLaMA-Factory joins them);
  ``system`` (optional) comes first; ``history`` (optional) is a list of ``[user, assistant]`` pairs
  before the last turn, as LLaMA-Factory reads it;
- ``sharegpt``: ``{"conversations": [{"from": ..., "value": ...}, ...], "system": "..."}``, ``from``
  being ``human``/``user``, ``gpt``/``assistant``, ``system``; ``observation``/``tool`` and
  ``function_call`` (LLaMA-Factory's tool turns) are refused by name;
- a column map (``columns={"prompt": COL, "response": COL, "system": COL}``, ``--columns
  prompt=query,response=response`` on the command line; ``system`` optional): one turn from any
  columns, as MetaMathQA (``query``/``response``) or OpenMathInstruct-2 (``problem``/
  ``generated_solution``) keep them;
- with ``fmt="auto"`` (the default) the format of each line is recognised by its keys: ``messages``;
  ``prompt`` and ``response`` (``system`` optional); ``problem`` and ``gt_solution`` (EvoLM's
  evaluation format); ``instruction`` and ``output`` (alpaca); ``conversations`` (sharegpt). A line
  that fits more than one is an error naming them (pick one with ``--format`` or ``--columns``).

Each conversation is laid out by a chat template (:mod:`megaevo.data.templates`) into token ids and a
loss mask (1 on the assistant answers and what closes each of their turns). A line that is not a
conversation (invalid JSON, missing keys, a non-string content, an unknown role, no assistant turn,
turns out of order) fails the job naming ``file:line`` (parquet: ``file:row group G, row R``) and the
reason, or is skipped and counted with ``on_error="skip"`` (``--on-error skip``). Nothing is truncated
here: the training stage cuts conversations to its sequence length.

Output, for ``PREFIX``:

- ``PREFIX.bin`` / ``PREFIX.idx``: a Megatron-LM indexed dataset (:mod:`megaevo.data.indexed`), one
  document of one sequence per conversation, in input order;
- ``PREFIX.loss_mask.bin``: the loss mask, raw ``uint8`` (0 or 1), one byte per token in the order
  and number of the tokens of ``PREFIX.bin``; no header, so ``np.memmap(path, np.uint8)`` reads it and
  the mask of conversation i starts at the sum of the lengths of the conversations before it;
- ``PREFIX.sft.json``: a small description: ``{"format": "megaevo-sft", "version": 1, "template",
  "tokenizer", "conversations", "tokens", "loss_tokens", "dtype", "loss_mask", "inputs", "skipped"}``.

All four files are written under temporary names and renamed into place only when every input has
been read without error (the mask and description first, the index last), so a failed or
interrupted job leaves nothing under the final names. The output is the same for any number of
workers. :class:`SFTDataset` reads it back through memory maps.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
import uuid
from pathlib import Path

import numpy as np

from megaevo.data import DataError
from megaevo.data.indexed import (DatasetFormatError, IndexedDataset, IndexedDatasetWriter, merge_datasets, paths,
                                  token_dtype)
from megaevo.data.preprocess import (PreprocessError, encode_inputs, missing_dirs, parse_shard, plan_inputs,
                                     remove_new_dirs)
from megaevo.data.templates import ChatTemplate, ConversationError, get_template
from megaevo.data.tokenizers import Tokenizer, load_tokenizer
from megaevo.log import get_logger

logger = get_logger(__name__)

FORMAT = "megaevo-sft"
VERSION = 1
MASK_SUFFIX = ".loss_mask.bin"
SIDECAR_SUFFIX = ".sft.json"


def sft_paths(prefix: str | os.PathLike) -> dict[str, Path]:
    """The files of an SFT dataset: ``idx``, ``bin``, ``mask`` and ``meta`` (the ``.sft.json`` description)."""
    idx, bin_ = paths(prefix)
    base = str(idx)[: -len(".idx")]
    return {"idx": idx, "bin": bin_, "mask": Path(base + MASK_SUFFIX), "meta": Path(base + SIDECAR_SUFFIX)}


# -- reading conversations -----------------------------------------------------------------------

def _string(obj: dict, key: str) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise ConversationError(f"{key!r} is {type(value).__name__}, not a string")
    return value


FORMATS = ("auto", "messages", "alpaca", "sharegpt")
COLUMN_ROLES = ("prompt", "response", "system")
# ShareGPT's "from" values, as LLaMA-Factory reads them, and the role each becomes.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
SHAREGPT_TOOL_ROLES = ("observation", "tool", "function_call", "function")


def parse_columns(spec) -> dict[str, str] | None:
    """``"prompt=query,response=response,system=sys"`` (or a dict) as {role: column}; prompt and response
    required."""
    if spec is None:
        return None
    if isinstance(spec, str):
        pairs = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            key, sep, column = part.partition("=")
            if not sep or not column.strip():
                raise PreprocessError(f"--columns {spec!r}: {part!r} is not ROLE=COLUMN "
                                      f"(e.g. prompt=query,response=response)")
            pairs[key.strip()] = column.strip()
        spec = pairs
    unknown = [k for k in spec if k not in COLUMN_ROLES]
    if unknown:
        raise PreprocessError(f"--columns: unknown role(s) {', '.join(map(repr, unknown))} "
                              f"(use {', '.join(COLUMN_ROLES)})")
    missing = [k for k in ("prompt", "response") if k not in spec]
    if missing:
        raise PreprocessError(f"--columns needs {' and '.join(f'{k}=COLUMN' for k in missing)}")
    return dict(spec)


def _from_messages(obj: dict) -> list[dict]:
    messages = obj["messages"]
    if not isinstance(messages, list):
        raise ConversationError(f"'messages' is {type(messages).__name__}, not a list of {{role, content}} objects")
    return messages


def _from_pair(obj: dict, ask: str, answer: str, system: str | None) -> list[dict]:
    for key in (ask, answer):
        if key not in obj:
            raise ConversationError(f"key {key!r} missing (a line with {ask!r} and {answer!r} needs both)")
    messages = [{"role": "user", "content": _string(obj, ask)}, {"role": "assistant", "content": _string(obj, answer)}]
    if system is not None and obj.get(system) is not None:
        messages.insert(0, {"role": "system", "content": _string(obj, system)})
    return messages


def _from_alpaca(obj: dict) -> list[dict]:
    for key in ("instruction", "output"):
        if key not in obj:
            raise ConversationError(f"key {key!r} missing (an alpaca line has 'instruction' and 'output', "
                                    f"'input', 'system' and 'history' optional)")
    prompt = _string(obj, "instruction")
    if obj.get("input") is not None and _string(obj, "input"):
        prompt = f"{prompt}\n{obj['input']}" if prompt else obj["input"]
    messages = []
    if obj.get("system") is not None:
        messages.append({"role": "system", "content": _string(obj, "system")})
    history = obj.get("history") or []
    if not isinstance(history, list):
        raise ConversationError(f"'history' is {type(history).__name__}, not a list of [user, assistant] pairs")
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise ConversationError(f"history[{i}] is not a [user, assistant] pair of strings")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return messages + [{"role": "user", "content": prompt}, {"role": "assistant", "content": _string(obj, "output")}]


def _from_sharegpt(obj: dict) -> list[dict]:
    turns = obj["conversations"]
    if not isinstance(turns, list):
        raise ConversationError(f"'conversations' is {type(turns).__name__}, not a list of {{from, value}} objects")
    messages = []
    if obj.get("system") is not None:
        messages.append({"role": "system", "content": _string(obj, "system")})
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise ConversationError(f"conversations[{i}] is not an object with 'from' and 'value'")
        who = turn["from"]
        if who in SHAREGPT_TOOL_ROLES:
            raise ConversationError(f"conversations[{i}]: role {who!r} (a tool turn) is not supported: none of the "
                                    f"chat templates lays out tool calls or results")
        if who not in SHAREGPT_ROLES:
            raise ConversationError(f"conversations[{i}]: unknown 'from' {who!r} (use one of "
                                    f"{', '.join(SHAREGPT_ROLES)})")
        if not isinstance(turn["value"], str):
            raise ConversationError(f"conversations[{i}]: value is {type(turn['value']).__name__}, not a string")
        messages.append({"role": SHAREGPT_ROLES[who], "content": turn["value"]})
    return messages


# Auto-detection: the formats a line's keys may be, in this order.
_AUTO = (
    ("messages", lambda o: "messages" in o, _from_messages),
    ("prompt/response", lambda o: "prompt" in o or "response" in o,
     lambda o: _from_pair(o, "prompt", "response", "system")),
    ("problem/gt_solution", lambda o: "problem" in o or "gt_solution" in o,
     lambda o: _from_pair(o, "problem", "gt_solution", None)),
    ("alpaca", lambda o: "instruction" in o and "output" in o, _from_alpaca),
    ("sharegpt", lambda o: "conversations" in o, _from_sharegpt),
)
_BY_NAME = {"messages": _from_messages, "alpaca": _from_alpaca,
            "sharegpt": lambda o: _from_sharegpt(o) if "conversations" in o else _missing(o, "conversations")}


def _missing(obj: dict, key: str):
    keys = ", ".join(repr(k) for k in list(obj)[:6])
    raise ConversationError(f"key {key!r} missing (keys: {keys or 'none'})")


def conversation_of(obj, fmt: str = "auto", columns: dict[str, str] | None = None) -> list[dict]:
    """The messages of one input object in format ``fmt`` (or the column map ``columns``); see the module
    docstring for the formats."""
    if not isinstance(obj, dict):
        raise ConversationError(f"expected a JSON object, got {type(obj).__name__}")
    if columns is not None:
        return _from_pair(obj, columns["prompt"], columns["response"], columns.get("system"))
    if fmt != "auto":
        if fmt == "messages" and "messages" not in obj:
            _missing(obj, "messages")
        return _BY_NAME[fmt](obj)
    fits = [(name, build) for name, test, build in _AUTO if test(obj)]
    if len(fits) > 1:
        raise ConversationError(f"ambiguous line: it could be {' or '.join(n for n, _ in fits)}; choose with --format "
                                f"(messages, alpaca, sharegpt) or --columns prompt=...,response=...")
    if fits:
        return fits[0][1](obj)
    keys = ", ".join(repr(k) for k in list(obj)[:6])
    raise ConversationError(f"no conversation: expected 'messages', 'prompt' and 'response', 'problem' and "
                            f"'gt_solution', 'instruction' and 'output' (alpaca) or 'conversations' (sharegpt); "
                            f"or give --columns (keys: {keys or 'none'})")


def _object_of(raw: bytes):
    try:
        return json.loads(raw)
    except UnicodeDecodeError:
        raise ConversationError("not valid UTF-8") from None
    except json.JSONDecodeError as e:
        raise ConversationError(f"invalid JSON: {e.msg} (column {e.colno})") from None


@dataclasses.dataclass
class _EncodedConversations:
    tokens: np.ndarray  # all conversations of a chunk back to back
    mask: np.ndarray  # uint8, one per token
    lengths: list[int]  # tokens per conversation
    errors: list[tuple[int, str]]  # (line offset in the chunk, reason)


def _tool_turn(messages) -> None:
    for i, m in enumerate(messages if isinstance(messages, list) else []):
        if isinstance(m, dict) and m.get("role") == "tool":
            raise ConversationError(f"messages[{i}]: role 'tool' (a tool result) is not supported: none of the chat "
                                    f"templates lays out tool calls or results")


def encode_conversations(tokenizer: Tokenizer, lines: list, template: ChatTemplate, dtype, fmt: str = "auto",
                         columns: dict[str, str] | None = None) -> _EncodedConversations:
    """Encode the conversations of a chunk of jsonl lines (bytes) or rows (dicts); blank lines are ignored."""
    tokens: list[int] = []
    mask: list[int] = []
    lengths: list[int] = []
    errors: list[tuple[int, str]] = []
    for i, raw in enumerate(lines):
        if isinstance(raw, bytes) and not raw.strip():
            continue
        try:
            messages = conversation_of(_object_of(raw) if isinstance(raw, bytes) else raw, fmt, columns)
            _tool_turn(messages)
            ids, loss = template.encode(tokenizer, messages)
            if not ids:
                raise ConversationError(f"the conversation encodes to no tokens under template {template.name!r}")
        except ConversationError as e:
            errors.append((i, str(e)))
            continue
        tokens.extend(ids)
        mask.extend(loss)
        lengths.append(len(ids))
    array = np.array(tokens, dtype=np.int64)
    if array.size and (array.min() < 0 or array.max() >= tokenizer.vocab_size):
        raise PreprocessError(f"{tokenizer.name} produced token id {int(array.max())} outside its vocabulary "
                              f"({tokenizer.vocab_size})")
    return _EncodedConversations(array.astype(dtype), np.array(mask, dtype=np.uint8), lengths, errors)


# -- the job -------------------------------------------------------------------------------------

@dataclasses.dataclass
class SFTSummary:
    inputs: list[str]
    output_prefix: str
    tokenizer: str
    template: str
    conversations: int
    tokens: int
    loss_tokens: int
    max_tokens: int  # the longest conversation
    skipped: int
    skipped_locations: list[str]
    seconds: float
    conversations_per_s: float
    tokens_per_s: float
    dtype: str
    workers: int
    format: str = "auto"
    shard: str | None = None  # "I/N" for a sharded job

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        share = self.loss_tokens / self.tokens if self.tokens else 0.0
        mean = self.tokens / self.conversations if self.conversations else 0.0
        lines = [
            f"wrote {self.output_prefix}.bin/.idx ({self.dtype}), {self.output_prefix}{MASK_SUFFIX} and "
            f"{self.output_prefix}{SIDECAR_SUFFIX} from {len(self.inputs)} input(s), template {self.template}",
            f"  conversations  {self.conversations:,}",
            f"  tokens         {self.tokens:,} (mean {mean:,.1f}, longest {self.max_tokens:,} per conversation)",
            f"  loss tokens    {self.loss_tokens:,} ({share:.1%} of the tokens)",
            f"  time           {self.seconds:.2f} s with {self.workers} worker(s): "
            f"{self.conversations_per_s:,.0f} conversations/s, {self.tokens_per_s:,.0f} tokens/s",
        ]
        if self.skipped:
            lines.append(f"  skipped        {self.skipped:,} lines, first: {self.skipped_locations[0]}")
        return "\n".join(lines)


def _temporary(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def preprocess_sft(
    inputs,
    output_prefix: str | os.PathLike,
    tokenizer: str | os.PathLike | Tokenizer,
    template: str | ChatTemplate = "evolm",
    workers: int = 1,
    on_error: str = "fail",
    progress: bool = True,
    fmt: str = "auto",
    columns: dict[str, str] | str | None = None,
    shard: tuple[int, int] | str | None = None,
) -> SFTSummary:
    """Encode the conversations of the inputs, in order, in format ``fmt`` (or the column map ``columns``)
    with ``template`` into an SFT dataset at ``output_prefix`` (see the module docstring for the files);
    with ``shard=(i, n)`` only the i-th of n runs of the inputs (an empty shard is an empty dataset). A
    malformed line raises PreprocessError naming file and line (``on_error="fail"``, nothing is
    written) or is skipped and counted (``on_error="skip"``)."""
    if on_error not in ("fail", "skip"):
        raise PreprocessError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
    if workers < 1:
        raise PreprocessError(f"workers (--workers) must be at least 1, got {workers}")
    if fmt not in FORMATS:
        raise PreprocessError(f"format (--format) must be one of {', '.join(FORMATS)}, got {fmt!r}")
    columns = parse_columns(columns)
    if columns is not None and fmt != "auto":
        raise PreprocessError("--columns and --format are exclusive: a column map is a format of its own")
    shard = parse_shard(shard)
    input_paths, pieces = plan_inputs(inputs, None, shard)
    tok = load_tokenizer(tokenizer)
    chat = get_template(template, tok)  # an unknown template or missing special tokens fail before any work
    dtype = token_dtype(tok.vocab_size)
    new_dirs = missing_dirs(Path(output_prefix).parent)

    start = time.perf_counter()
    conversations = loss_tokens = longest = 0
    writer = IndexedDatasetWriter(output_prefix, dtype)
    final = sft_paths(output_prefix)
    tmp_mask, tmp_meta = _temporary(final["mask"]), _temporary(final["meta"])
    mask_file = open(tmp_mask, "wb")
    renamed: list[Path] = []

    def consume(enc, bar) -> None:
        nonlocal conversations, loss_tokens, longest
        pos = 0
        for n in enc.lengths:
            writer.add_document(enc.tokens[pos : pos + n])
            pos += n
            longest = max(longest, n)
        mask_file.write(enc.mask.tobytes())
        loss_tokens += int(enc.mask.sum(dtype=np.int64))
        conversations += len(enc.lengths)
        bar.update(len(enc.lengths))
        elapsed = max(time.perf_counter() - start, 1e-9)
        bar.set_postfix_str(f"{writer.num_tokens / elapsed:,.0f} tokens/s", refresh=False)

    try:
        report = encode_inputs(pieces, tokenizer, tok, (chat, dtype, fmt, columns), workers=workers,
                               on_error=on_error, progress=progress, consume=consume, encode=encode_conversations)
        skipped, locations = report.skipped, report.locations
        if not conversations and (shard is None or pieces):
            what = "every line was blank or skipped" if skipped else "every line is blank"
            raise PreprocessError(f"no conversations in {', '.join(map(str, input_paths))} ({what}); nothing written")
        mask_file.close()
        meta = {"format": FORMAT, "version": VERSION, "template": chat.name, "tokenizer": tok.name,
                "conversations": conversations, "tokens": writer.num_tokens, "loss_tokens": loss_tokens,
                "dtype": str(dtype), "loss_mask": final["mask"].name, "inputs": [str(p) for p in input_paths],
                "skipped": skipped}
        tmp_meta.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        for src in (tmp_mask, tmp_meta):  # the index, renamed last by the writer, completes the dataset
            dst = final["mask"] if src is tmp_mask else final["meta"]
            os.replace(src, dst)
            renamed.append(dst)
        writer.finalize()
    except BaseException:
        writer.abort()
        mask_file.close()
        for p in (tmp_mask, tmp_meta, *renamed):
            p.unlink(missing_ok=True)
        remove_new_dirs(new_dirs)
        raise

    seconds = time.perf_counter() - start
    rate = 1.0 / max(seconds, 1e-9)
    return SFTSummary(
        inputs=[str(p) for p in input_paths],
        output_prefix=str(writer.idx_path)[: -len(".idx")],
        tokenizer=tok.name,
        template=chat.name,
        conversations=conversations,
        tokens=writer.num_tokens,
        loss_tokens=loss_tokens,
        max_tokens=longest,
        skipped=skipped,
        skipped_locations=locations,
        seconds=round(seconds, 4),
        conversations_per_s=round(conversations * rate, 1),
        tokens_per_s=round(writer.num_tokens * rate, 1),
        dtype=str(dtype),
        workers=workers,
        format="columns" if columns else fmt,
        shard=f"{shard[0]}/{shard[1]}" if shard else None,
    )


# -- reading it back -----------------------------------------------------------------------------

class SFTDataset:
    """An SFT dataset written by :func:`preprocess_sft`, over memory maps.

    ``ds[i]`` is conversation i as (token ids as int64, loss mask as uint8), of equal length;
    ``lengths`` holds the tokens of every conversation (int64); ``template`` is the template named in
    ``PREFIX.sft.json`` (None without that file).
    """

    def __init__(self, prefix: str | os.PathLike):
        files = sft_paths(prefix)
        self.prefix = str(files["idx"])[: -len(".idx")]
        self.name = Path(self.prefix).name
        self.mask_path = files["mask"]
        self._tokens = IndexedDataset(prefix)
        ds = self._tokens
        if ds.num_documents != len(ds):
            raise DatasetFormatError(f"{ds.idx_path}: {ds.num_documents} documents in {len(ds)} sequences, but an SFT "
                                     f"dataset has one sequence per conversation (write it with `megaevo preprocess "
                                     f"--sft`)")
        if not self.mask_path.is_file():
            raise DatasetFormatError(f"{self.mask_path}: loss-mask file not found; {self.prefix}.bin/.idx is not "
                                     f"an SFT dataset (write one with `megaevo preprocess --sft`)")
        tokens = ds.num_tokens
        size = self.mask_path.stat().st_size
        if size != tokens:
            raise DatasetFormatError(f"{self.mask_path}: {size:,} bytes, but {ds.bin_path} holds {tokens:,} tokens "
                                     f"(one mask byte per token): the files are not from the same run; rerun "
                                     f"`megaevo preprocess --sft`")
        self._mask = np.memmap(self.mask_path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
        self.lengths = ds.sequence_lengths.astype(np.int64)
        self._offsets = np.zeros(len(self.lengths), dtype=np.int64)  # where each conversation's mask starts
        np.cumsum(self.lengths[:-1], out=self._offsets[1:])
        self.meta = self._read_meta(files["meta"], len(ds), tokens)
        self.template: str | None = self.meta.get("template") if self.meta else None

    @staticmethod
    def _read_meta(path: Path, conversations: int, tokens: int) -> dict | None:
        if not path.is_file():
            return None
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise DatasetFormatError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(meta, dict):
            raise DatasetFormatError(f"{path}: expected a JSON object, got {type(meta).__name__}")
        for key, have in (("conversations", conversations), ("tokens", tokens)):
            if key in meta and meta[key] != have:
                raise DatasetFormatError(f"{path}: says {meta[key]} {key} but the dataset has {have}: the files are "
                                         f"not from the same run; rerun `megaevo preprocess --sft`")
        return meta

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"{self.prefix}: conversation {i} out of range ({len(self)} conversations)")
        tokens = self._tokens.get(i).astype(np.int64)
        start = int(self._offsets[i])
        mask = np.array(self._mask[start : start + len(tokens)], dtype=np.uint8)
        return tokens, mask

    def validate(self) -> None:
        """Check every mask byte is 0 or 1 (O(tokens)); the constructor checks only the sizes."""
        self._tokens.validate()
        bad = np.flatnonzero(self._mask > 1)
        if len(bad):
            raise DataError(f"{self.mask_path}: mask byte {int(bad[0])} is {int(self._mask[bad[0]])}, not 0 or 1")

    def __repr__(self) -> str:
        return f"SFTDataset({self.prefix!r}, conversations={len(self)}, template={self.template!r})"


# -- merging shards ------------------------------------------------------------------------------

def is_sft_dataset(prefix: str | os.PathLike) -> bool:
    return sft_paths(prefix)["mask"].is_file()


def merge_sft(prefixes: list[str | os.PathLike], output_prefix: str | os.PathLike) -> SFTDataset:
    """Concatenate SFT datasets of one template and tokenizer (e.g. the shards of ``preprocess --sft
    --shard I/N``, in shard order) into one: tokens, loss masks and description, written under temporary
    names and renamed into place only when complete (the index last)."""
    if not prefixes:
        raise PreprocessError("merge needs at least one input prefix")
    parts = [SFTDataset(p) for p in prefixes]
    metas = [p.meta or {} for p in parts]
    for key in ("template", "tokenizer"):
        values = {m.get(key) for m in metas}
        if len(values) > 1:
            raise PreprocessError(f"cannot merge SFT datasets of different {key}s: "
                                  + ", ".join(f"{p.prefix} ({m.get(key)})" for p, m in zip(parts, metas)))
    final = sft_paths(output_prefix)
    final["idx"].parent.mkdir(parents=True, exist_ok=True)
    tmp_mask, tmp_meta = _temporary(final["mask"]), _temporary(final["meta"])
    renamed: list[Path] = []
    try:
        with open(tmp_mask, "wb") as out:
            for p in parts:
                with open(p.mask_path, "rb") as f:
                    while block := f.read(16 << 20):
                        out.write(block)
        tokens = sum(p.num_tokens for p in parts)
        meta = {"format": FORMAT, "version": VERSION, "template": metas[0].get("template"),
                "tokenizer": metas[0].get("tokenizer"), "conversations": sum(len(p) for p in parts),
                "tokens": tokens, "loss_tokens": sum(int(m.get("loss_tokens", 0)) for m in metas),
                "dtype": str(parts[0]._tokens.dtype), "loss_mask": final["mask"].name,
                "inputs": metas[0].get("inputs", []), "skipped": sum(int(m.get("skipped", 0)) for m in metas)}
        tmp_meta.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        for src, dst in ((tmp_mask, final["mask"]), (tmp_meta, final["meta"])):
            os.replace(src, dst)
            renamed.append(dst)
        merge_datasets([p.prefix for p in parts], output_prefix)
    except BaseException:
        for p in (tmp_mask, tmp_meta, *renamed):
            p.unlink(missing_ok=True)
        raise
    return SFTDataset(output_prefix)
