"""`megaevo demo`: build small two-domain corpora, a tokenizer and indexed datasets without a download.

The general domain is the Python standard library of the running interpreter (module reference
pages made from docstrings, and the source itself). The math domain is generated offline with
reasoning-gym: questions followed by a worked solution where one can be derived, and the answer.

    DIR/corpus/{general,math}.jsonl      {"text": ...} per line
    DIR/tokenizer/demo.model             SentencePiece model trained on both corpora
    DIR/data/{general,math}.{bin,idx}    tokenized datasets (one document per corpus line, EOD appended)
    DIR/demo.json                        what was made: paths, documents, tokens, vocabulary
    DIR/config.yaml                      the exact training config (`megaevo train --config DIR/config.yaml`)
    DIR/run/                             the tiny model trained on the CPU: metrics.jsonl, checkpoints/

Every data step leaves a `.done` record beside its output naming the inputs it was built from; a
rerun reuses an output only when that record matches and the output is complete. The training run
records its config and the data it read (DIR/run/demo-run.json): a rerun with the same ones resumes
an unfinished run from its last checkpoint (checkpoint.load=auto) and leaves a finished one alone,
and a rerun with other ones trains from scratch.
"""
from __future__ import annotations

import ast
import hashlib
import json
import math
import operator
import os
import random
import re
import shutil
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from megaevo.log import configured, get_logger, setup_logging

logger = get_logger(__name__)

GENERAL_DOCS = 4000
GENERAL_BYTES = 6_000_000
MATH_DOCS = 4000
VOCAB_SIZE = 4096
TOKENIZER_MAX_SENTENCES = 400_000
TRAIN_ITERS = 300  # 600k tokens: about 2-3 minutes of training on two CPU cores
# The SFT chapter: GCD problems with worked Euclid steps and a boxed answer, in prompt/response form.
SFT_TASKS = {"gcd": 1}
SFT_CONVERSATIONS = 3000

# -- general domain: the Python standard library ---------------------------------------------------

_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def stdlib_files(root: str | os.PathLike | None = None) -> list[Path]:
    """Python files of the standard library, test suites and installed packages left out.

    The order is fixed for a given interpreter but spread over the whole library (sorted by a hash
    of the relative path), so a size cap still samples every part of it.
    """
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS]
        files.extend(Path(folder, n) for n in names if n.endswith(".py"))
    if not files:
        raise FileNotFoundError(f"no Python source files under {root} (is the standard library zipped?)")
    return sorted(files, key=lambda p: hashlib.sha1(p.relative_to(root).as_posix().encode()).hexdigest())


def reference_page(module: str, source: str) -> str | None:
    """A plain-text reference page for a module: its docstring and those of its classes and functions."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return None
    parts = [f"Module {module}"]
    if doc := ast.get_docstring(tree):
        parts.append(doc)

    def visit(body, owner: str) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{owner}{node.name}"
                if node.name.startswith("_") and node.name != "__init__":
                    continue
                if isinstance(node, ast.ClassDef):
                    head = f"class {name}"
                else:
                    head = f"{name}({ast.unparse(node.args)})"
                if doc := ast.get_docstring(node):
                    parts.append(f"{head}\n{doc}")
                if isinstance(node, ast.ClassDef):
                    visit(node.body, name + ".")

    visit(tree.body, "")
    page = "\n\n".join(parts)
    return page if len(parts) > 2 or len(page) > 400 else None


def split_text(text: str, max_chars: int) -> Iterator[str]:
    """Split text into chunks of about max_chars, preferring top-level boundaries.

    A chunk ends before an unindented line that follows a blank line; past twice max_chars it may end
    at any blank line, and past four times max_chars at any line.
    """
    chunk: list[str] = []
    size = 0
    previous_blank = False
    for line in text.splitlines(keepends=True):
        top_level = line[:1] not in ("", " ", "\t", "\n", "#")
        if (
            (previous_blank and size >= max_chars and top_level)
            or (previous_blank and size >= 2 * max_chars)
            or size >= 4 * max_chars
        ):
            yield "".join(chunk).strip("\n")
            chunk, size = [], 0
        chunk.append(line)
        size += len(line)
        previous_blank = not line.strip()
    if "".join(chunk).strip():
        yield "".join(chunk).strip("\n")


def general_corpus(
    limit_docs: int | None = GENERAL_DOCS,
    max_bytes: int | None = GENERAL_BYTES,
    chunk_chars: int = 4_000,
    root: str | os.PathLike | None = None,
) -> Iterator[str]:
    """Documents from the standard library: a reference page per module, then its source, in chunks.

    Stops before exceeding `limit_docs` documents or `max_bytes` UTF-8 bytes. Files that are not
    UTF-8 are skipped; files that do not parse still give their source.
    """
    root = Path(root or sysconfig.get_paths()["stdlib"])
    docs = size = 0
    for path in stdlib_files(root):
        for doc in _module_documents(root, path, chunk_chars):
            n = len(doc.encode("utf-8"))
            if (limit_docs is not None and docs >= limit_docs) or (max_bytes is not None and size + n > max_bytes):
                return
            docs, size = docs + 1, size + n
            yield doc


def _module_documents(root: Path, path: Path, chunk_chars: int) -> Iterator[str]:
    try:
        source = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return
    if len(source.strip()) < 200 or "\x00" in source:
        return
    module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
    page = reference_page(module, source)
    for text in ([page] if page else []) + [source]:
        yield from split_text(text, chunk_chars)


# -- math domain: reasoning-gym problems with worked solutions ------------------------------------

# dataset name -> share of the math corpus; gsm_symbolic comes with worked solutions of its own.
MATH_MIX = {
    "gsm_symbolic": 4,
    "simple_equations": 2,
    "chain_sum": 1,
    "basic_arithmetic": 1,
    "products": 1,
    "fraction_simplification": 1,
    "gcd": 1,
    "lcm": 1,
    "prime_factorization": 1,
    "simple_geometry": 1,
}


@dataclass(frozen=True)
class MathProblem:
    dataset: str
    question: str
    answer: str
    solution: str | None  # worked steps ending in the answer, when they could be derived

    @property
    def text(self) -> str:
        steps = f"Solution:\n{self.solution}\n" if self.solution else ""
        return f"Question: {self.question.strip()}\n{steps}Answer: {self.answer}"


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def evaluate(expr: str, env: dict[str, Fraction] | None = None) -> Fraction:
    """Exact value of an arithmetic expression (+ - * /, numbers, named variables from env)."""

    def ev(node) -> Fraction:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return Fraction(node.value)
        if isinstance(node, ast.Name) and env and node.id in env:
            return env[node.id]
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            value = ev(node.operand)
            return -value if isinstance(node.op, ast.USub) else value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        raise ValueError(f"unsupported expression: {ast.unparse(node)}")

    return ev(ast.parse(expr.strip(), mode="eval").body)


def _num(x: Fraction) -> str:
    return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"


def _euclid(a: int, b: int, lines: list[str]) -> int:
    while b:
        lines.append(f"{a} = {a // b} × {b} + {a % b}")
        a, b = b, a % b
    return a


def _solve_gcd(md) -> tuple[str, int]:
    lines: list[str] = []
    g = md["numbers"][0]
    for n in md["numbers"][1:]:
        g = _euclid(max(g, n), min(g, n), lines)
    lines.append(f"The last nonzero remainder is {g}, so the GCD is {g}.")
    return "\n".join(lines), g


def _solve_lcm(md) -> tuple[str, int]:
    lines: list[str] = []
    acc = md["numbers"][0]
    for n in md["numbers"][1:]:
        g = math.gcd(acc, n)
        lines.append(f"gcd({acc}, {n}) = {g}, so lcm({acc}, {n}) = {acc} × {n} / {g} = {acc * n // g}")
        acc = acc * n // g
    return "\n".join(lines), acc


def _solve_prime_factorization(md) -> tuple[str, str]:
    n, lines = md["number"], []
    for p in md["factors"][:-1]:
        lines.append(f"{n} ÷ {p} = {n // p}")
        n //= p
    lines.append(f"{n} is prime.")
    return "\n".join(lines), " × ".join(map(str, md["factors"]))


def _solve_fraction(md) -> tuple[str, tuple[int, int]]:
    a, b = md["numerator"], md["denominator"]
    g = math.gcd(a, b)
    return f"gcd({a}, {b}) = {g}\n{a} ÷ {g} = {a // g} and {b} ÷ {g} = {b // g}", (a // g, b // g)


def _solve_chain(md) -> tuple[str, Fraction]:
    terms = md["expression"].split()
    total, lines = Fraction(terms[0]), []
    for op, term in zip(terms[1::2], terms[2::2]):
        new = total + Fraction(term) if op == "+" else total - Fraction(term)
        lines.append(f"{_num(total)} {op} {term} = {_num(new)}")
        total = new
    return "\n".join(lines), total


def _solve_products(md) -> tuple[str, int] | None:
    a, b = map(int, md["expression"].split(" * "))
    digits = str(b)
    parts = [(int(d) * 10 ** (len(digits) - 1 - i)) for i, d in enumerate(digits) if d != "0"]
    if len(parts) < 2:
        return None
    lines = [f"{a} × {p} = {a * p}" for p in parts]
    lines.append(" + ".join(str(a * p) for p in parts) + f" = {a * b}")
    return "\n".join(lines), a * b


def _solve_linear(md) -> tuple[str, Fraction]:
    lhs, rhs = (side.strip() for side in md["equation"].split("="))
    x = md["variable"]
    left, right = ([evaluate(side, {x: Fraction(v)}) for v in (0, 1, 2)] for side in (lhs, rhs))
    c, a = left[0], left[1] - left[0]  # lhs == a*x + c
    if a == 0 or left[2] != 2 * a + c or len(set(right)) != 1:
        raise ValueError("not a linear equation in one unknown on the left")
    r = right[0]
    lines = [f"{lhs} = {rhs}"]
    if c:
        verb = f"Subtract {_num(c)} from" if c > 0 else f"Add {_num(-c)} to"
        lines.append(f"{verb} both sides: {_num(a)}*{x} = {_num(r - c)}")
    if a != 1:
        lines.append(f"Divide both sides by {_num(a)}: {x} = {_num((r - c) / a)}")
    return "\n".join(lines), (r - c) / a


def _solve_geometry(md) -> tuple[str, Fraction]:
    n, known = md["n_sides"], md["known_angles"]
    total = (n - 2) * 180
    rest = total - sum(known)
    known_text = " + ".join(f"{a:g}" for a in known)
    steps = (
        f"The interior angles of a convex polygon with {n} sides add up to ({n} - 2) × 180 = {total} degrees.\n"
        f"The known angles add up to {known_text} = {sum(known):g}.\n"
        f"The remaining angle is {total} - {sum(known):g} = {rest:g}."
    )
    return steps, Fraction(round(rest))


def _solve_gsm(md) -> tuple[str, str]:
    lines = [line for line in md["answer_cot"].strip().splitlines() if not line.startswith("####")]
    return "\n".join(lines).strip(), Fraction(str(md["answer_value"]))


_SOLVERS: dict[str, Callable] = {
    "gsm_symbolic": _solve_gsm,
    "simple_equations": _solve_linear,
    "chain_sum": _solve_chain,
    "products": _solve_products,
    "fraction_simplification": _solve_fraction,
    "gcd": _solve_gcd,
    "lcm": _solve_lcm,
    "prime_factorization": _solve_prime_factorization,
    "simple_geometry": _solve_geometry,
}


def _same(result, answer: str) -> bool:
    if isinstance(result, str):
        return result.strip() == answer.strip()
    if isinstance(result, tuple):  # a fraction, written plainly or in LaTeX
        return tuple(int(x) for x in re.findall(r"-?\d+", answer)) == result
    try:
        return Fraction(answer.strip()) == result
    except (ValueError, ZeroDivisionError):
        return False


def worked_solution(dataset: str, entry: dict) -> str | None:
    """Steps leading to the entry's answer, or None when none can be derived or they disagree with it."""
    solver = _SOLVERS.get(dataset)
    if solver is None:
        return None
    try:
        out = solver(entry["metadata"])
    except (KeyError, ValueError, TypeError, ZeroDivisionError, SyntaxError):
        return None
    if out is None:
        return None
    steps, result = out
    return steps if _same(result, str(entry["answer"])) else None


def _import_reasoning_gym():
    try:
        import reasoning_gym
    except ImportError as e:
        raise ImportError(
            "the demo's math corpus is generated with reasoning-gym, which is not installed: "
            "pip install 'megaevo[demo]'"
        ) from e
    return reasoning_gym


def _shares(n: int, weights: dict[str, int]) -> dict[str, int]:
    """Split n into integer shares proportional to weights (largest remainder)."""
    total = sum(weights.values())
    exact = {k: n * w / total for k, w in weights.items()}
    counts = {k: int(v) for k, v in exact.items()}
    for k in sorted(exact, key=lambda k: counts[k] - exact[k])[: n - sum(counts.values())]:
        counts[k] += 1
    return counts


def math_problems(n: int, seed: int, mix: dict[str, int] = MATH_MIX) -> list[MathProblem]:
    """n distinct problems drawn from the reasoning-gym datasets in `mix`, in a seeded order."""
    rg = _import_reasoning_gym()
    problems: list[MathProblem] = []
    for name, count in _shares(n, mix).items():
        if not count:
            continue
        # A seed per dataset (reasoning-gym seeds item i with seed + i, so nearby seeds would overlap).
        ds_seed = random.Random(f"{seed}:{name}").randrange(2**31)
        ds = rg.create_dataset(name, size=20 * count, seed=ds_seed)
        seen: set[str] = set()
        for i in range(ds.size):
            if len(seen) == count:
                break
            entry = ds[i]
            if entry["question"] in seen:
                continue
            seen.add(entry["question"])
            problems.append(MathProblem(name, entry["question"], str(entry["answer"]), worked_solution(name, entry)))
    random.Random(seed).shuffle(problems)
    return problems


def math_corpus(n: int = MATH_DOCS, seed: int = 1234) -> Iterator[str]:
    """The math documents: "Question: ...", a worked "Solution:" when available, "Answer: ..."."""
    return (p.text for p in math_problems(n, seed))


def sft_corpus(n: int = SFT_CONVERSATIONS, seed: int = 1234, tasks: dict[str, int] = SFT_TASKS) -> Iterator[dict]:
    """Conversations for supervised fine-tuning (`megaevo preprocess --sft`): a reasoning-gym question
    as the prompt, its worked solution ending in ``The answer is \\boxed{...}.`` as the response.

    The problems are drawn with another seed than the math corpus's (``seed + 1``), and only those
    with a worked solution are kept, so fewer than ``n`` may come out."""
    for p in math_problems(n, seed + 1, tasks):
        if p.solution:
            yield {"prompt": p.question.strip(), "response": f"{p.solution}\nThe answer is \\boxed{{{p.answer}}}."}


# -- the demo pipeline ----------------------------------------------------------------------------


@dataclass
class DomainResult:
    name: str
    corpus: str
    corpus_documents: int
    corpus_bytes: int
    data_prefix: str
    documents: int
    sequences: int
    tokens: int
    dtype: str


@dataclass
class DemoResult:
    directory: str
    seed: int
    scale: float
    tokenizer: str
    vocab_size: int
    domains: list[DomainResult] = field(default_factory=list)
    seconds: float = 0.0
    training: TrainingResult | None = None  # None when the demo was asked not to train

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        lines = [
            f"megaevo demo in {self.directory} (seed {self.seed}, scale {self.scale:g}, {self.seconds:.1f} s)",
            f"  tokenizer  {self.tokenizer}  (vocabulary {self.vocab_size:,})",
        ]
        for d in self.domains:
            lines.append(f"  {d.name:<9}  corpus {d.corpus}  ({d.corpus_documents:,} documents, {d.corpus_bytes / 1e6:.1f} MB)")
            lines.append(
                f"  {'':<9}  data   {d.data_prefix}.bin/.idx  ({d.documents:,} documents, {d.tokens:,} tokens, {d.dtype})"
            )
        lines.append(f"  summary    {Path(self.directory) / 'demo.json'}")
        return "\n".join(lines)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _reporters(verbose: bool) -> tuple[Callable[[str], None], Callable[[str], None]]:
    """(log, show): progress and notices go to the `megaevo.demo` logger, results (the tables of
    what was made and of the losses) are printed; both are silent when not verbose."""
    if not verbose:
        def quiet(text: str) -> None:
            pass

        return quiet, quiet
    if not configured():
        setup_logging()
    return logger.info, print


def _cached(marker: Path, inputs: dict, build: Callable[[], dict], complete: Callable[[dict], bool], log) -> dict:
    """Run build() unless `marker` records the same inputs and complete(record) holds; return the record."""
    if marker.is_file():
        try:
            record = json.loads(marker.read_text())
            if record.get("inputs") == inputs and complete(record):
                log(f"  reusing {marker.with_suffix('')}")
                return record
        except (ValueError, KeyError, TypeError, OSError):
            pass
        marker.unlink()
    record = {"inputs": inputs, **build()}
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, marker)
    return record


def _write_jsonl(path: Path, docs: Iterable[str], total: int | None, verbose: bool, unit: str = "doc") -> dict:
    """Write `docs` as jsonl, with a progress bar towards `total` documents (unit "doc") or UTF-8
    bytes of text (unit "B"), the cap that the generator stops at. A corpus that ends short of it
    (the other cap came first, or the source ran out) closes the bar at its real end."""
    from tqdm import tqdm

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    by_bytes = unit == "B"
    with open(tmp, "w", encoding="utf-8") as f, tqdm(total=total, desc=path.stem, unit=unit, unit_scale=by_bytes,
                                                      disable=not verbose, leave=False) as bar:
        for doc in docs:  # a text, or a whole record
            line = json.dumps(doc if isinstance(doc, dict) else {"text": doc}, ensure_ascii=False)
            f.write(line + "\n")
            n += 1
            bar.update(len((doc if isinstance(doc, str) else line).encode("utf-8")) if by_bytes else 1)
        bar.total = bar.n
        bar.refresh()
    if n == 0:
        tmp.unlink()
        raise RuntimeError(f"{path}: the {path.stem} corpus came out empty")
    os.replace(tmp, path)
    return {"documents": n, "bytes": path.stat().st_size, "sha256": _sha256(path)}


def _file_matches(path: Path, record: dict) -> bool:
    return path.is_file() and path.stat().st_size == record["bytes"] and _sha256(path) == record["sha256"]


def run_demo(
    directory: str | os.PathLike = "megaevo-demo",
    seed: int = 1234,
    *,
    scale: float = 1.0,
    vocab_size: int = VOCAB_SIZE,
    verbose: bool = True,
    train: bool = True,
    train_iters: int = TRAIN_ITERS,
    train_overrides: Sequence[str] = (),
) -> DemoResult:
    """Build the demo corpora, tokenizer and datasets under `directory`, then train the tiny model
    on them (unless `train` is false); print and return what was made.

    `scale` multiplies the corpus sizes (1.0: about 6 MB of general text and 4,000 math problems).
    `train_iters` sets the length of the training run (the intervals follow it, see
    `train_settings`), and `train_overrides` are dotted overrides applied on top
    (`["data.seq_len=64"]`), as `megaevo train` takes them.
    """
    from megaevo.data.tokenizers import load_tokenizer

    start = time.perf_counter()
    log, show = _reporters(verbose)
    root = Path(directory).resolve()
    steps = 4 if train else 3
    log(f"[1/{steps}] corpora in {root / 'corpus'}")
    corpora = _make_corpora(root / "corpus", seed, scale, log, verbose)
    _make_sft_corpus(root / "corpus" / "sft.jsonl", seed, scale, log, verbose)
    log(f"[2/{steps}] SentencePiece tokenizer (vocabulary {vocab_size:,})")
    model, model_sha = _make_tokenizer(root / "tokenizer" / "demo", corpora, vocab_size, seed, log)
    log(f"[3/{steps}] tokenized datasets in {root / 'data'}")
    domains = [_make_dataset(root / "data" / name, corpus, model, model_sha, log, verbose) for name, corpus in corpora.items()]
    result = DemoResult(
        directory=str(root),
        seed=seed,
        scale=scale,
        tokenizer=str(model),
        vocab_size=load_tokenizer(model).vocab_size,
        domains=domains,
        seconds=round(time.perf_counter() - start, 1),
    )
    facts = result.as_dict()
    del facts["seconds"], facts["training"]  # demo.json records the data made, identical on a rerun
    (root / "demo.json").write_text(json.dumps(facts, indent=2) + "\n")
    show(result.describe())
    if train:
        log(f"[4/{steps}] training the tiny model on the CPU")
        result.training = train_demo(root, result.vocab_size, seed, train_iters, train_overrides, verbose)
        result.seconds = round(time.perf_counter() - start, 1)
        log(f"megaevo demo done in {result.seconds:.0f} s")
    return result


def _make_corpora(folder: Path, seed: int, scale: float, log, verbose: bool) -> dict[str, dict]:
    """Write DIR/corpus/{general,math}.jsonl; return each one's record (path, documents, bytes, sha256)."""
    general_docs, general_bytes, math_docs = (max(1, round(x * scale)) for x in (GENERAL_DOCS, GENERAL_BYTES, MATH_DOCS))
    recipes = {
        "general": (
            {"source": "python-stdlib", "python": sys.version.split()[0], "docs": general_docs, "bytes": general_bytes},
            lambda: general_corpus(limit_docs=general_docs, max_bytes=general_bytes),
            general_bytes,  # the byte cap ends it (about 1,300 documents at scale 1), not the document cap
            "B",
        ),
        "math": (
            {"source": "reasoning-gym", "version": _reasoning_gym_version(), "docs": math_docs, "seed": seed},
            lambda: math_corpus(math_docs, seed),
            math_docs,
            "doc",
        ),
    }
    folder.mkdir(parents=True, exist_ok=True)
    corpora = {}
    for name, (inputs, documents, total, unit) in recipes.items():
        path = folder / f"{name}.jsonl"
        record = _cached(
            path.with_name(path.name + ".done"),
            inputs,
            lambda: _write_jsonl(path, documents(), total, verbose, unit),
            lambda rec: _file_matches(path, rec),
            log,
        )
        log(f"  {name}: {record['documents']:,} documents, {record['bytes'] / 1e6:.1f} MB")
        corpora[name] = {"path": str(path), **record}
    return corpora


def _make_sft_corpus(path: Path, seed: int, scale: float, log, verbose: bool) -> dict:
    """Write DIR/corpus/sft.jsonl, the conversations of the README's SFT chapter (not trained on by the demo)."""
    n = max(1, round(SFT_CONVERSATIONS * scale))
    inputs = {"source": "reasoning-gym", "version": _reasoning_gym_version(), "tasks": SFT_TASKS, "conversations": n,
              "seed": seed}
    record = _cached(path.with_name(path.name + ".done"), inputs,
                     lambda: _write_jsonl(path, sft_corpus(n, seed), n, verbose),
                     lambda rec: _file_matches(path, rec), log)
    log(f"  sft: {record['documents']:,} conversations for fine-tuning (prompt/response)")
    return record


def _make_tokenizer(prefix: Path, corpora: dict[str, dict], vocab_size: int, seed: int, log) -> tuple[Path, str]:
    """Train PREFIX.model on every corpus; return its path and sha256."""
    from megaevo.data.tokenizers import train_sentencepiece

    def train() -> dict:
        model = train_sentencepiece(
            [c["path"] for c in corpora.values()],
            vocab_size,
            str(prefix),
            json_key="text",
            max_sentences=TOKENIZER_MAX_SENTENCES,
            seed=seed,
        )
        return {"model": Path(model).name, "sha256": _sha256(Path(model))}

    def trained(rec: dict) -> bool:
        model = prefix.parent / rec["model"]
        return model.is_file() and _sha256(model) == rec["sha256"]

    prefix.parent.mkdir(parents=True, exist_ok=True)
    inputs = {
        "corpora": {name: c["sha256"] for name, c in corpora.items()},
        "vocab_size": vocab_size,
        "seed": seed,
        "max_sentences": TOKENIZER_MAX_SENTENCES,
    }
    record = _cached(prefix.with_suffix(".done"), inputs, train, trained, log)
    return prefix.parent / record["model"], record["sha256"]


def _make_dataset(prefix: Path, corpus: dict, model: Path, model_sha: str, log, verbose: bool) -> DomainResult:
    """Tokenize one corpus into PREFIX.bin/.idx, one document per line with EOD appended."""
    from megaevo.data import indexed
    from megaevo.data.preprocess import preprocess

    def build() -> dict:
        summary = preprocess(
            [corpus["path"]],
            str(prefix),
            str(model),
            json_key="text",
            workers=1,
            append_eod=True,
            on_error="fail",
            progress=verbose,
        )
        log("  " + summary.describe().replace("\n", "\n  "))
        return {"documents": summary.documents, "tokens": summary.tokens}

    def complete(rec: dict) -> bool:
        try:
            ds = indexed.IndexedDataset(prefix)
        except indexed.DatasetFormatError:
            return False
        return (ds.num_documents, ds.num_tokens) == (rec["documents"], rec["tokens"])

    inputs = {"corpus": corpus["sha256"], "tokenizer": model_sha, "append_eod": True}
    _cached(prefix.with_suffix(".done"), inputs, build, complete, log)
    ds = indexed.IndexedDataset(prefix)
    return DomainResult(
        name=prefix.name,
        corpus=corpus["path"],
        corpus_documents=corpus["documents"],
        corpus_bytes=corpus["bytes"],
        data_prefix=str(prefix),
        documents=ds.num_documents,
        sequences=len(ds),
        tokens=ds.num_tokens,
        dtype=str(ds.dtype),
    )


def _reasoning_gym_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("reasoning-gym")
    except PackageNotFoundError:
        _import_reasoning_gym()  # raises the install hint when it is missing
        return "unknown"


# -- training the tiny model ------------------------------------------------------------------------

TRAIN_RECORD = "demo-run.json"  # in the run directory: the config and data a demo run was started with


def train_settings(
    directory: str | os.PathLike = "megaevo-demo",
    iters: int = TRAIN_ITERS,
    vocab_size: int = VOCAB_SIZE,
    seed: int = 1234,
) -> dict:
    """The config the demo trains with, as a YAML file holds it, with paths under `directory`.

    examples/tiny-cpu.yaml is `train_settings("megaevo-demo")`. Warmup and the log, eval and
    checkpoint intervals follow `iters`, so a short run still warms up, logs, evaluates and saves.
    """

    def path(*parts: str) -> str:
        return Path(directory, *parts).as_posix()

    return {
        "model": {"preset": "tiny", "vocab_size": vocab_size},
        "data": {
            "train": {
                "general": {"prefix": path("data", "general"), "weight": 0.8},
                "math": {"prefix": path("data", "math"), "weight": 0.2},
            },
            "tokenizer": path("tokenizer", "demo.model"),
            "seq_len": 256,
            "split": "95,5,0",
        },
        "train": {
            "micro_batch_size": 4,
            "global_batch_size": 8,
            "iters": iters,
            "seed": seed,
            "log_interval": max(1, iters // 20),
            "eval_interval": max(1, iters // 5),
            "eval_iters": 4,
            "dtype": "fp32",
        },
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup": iters // 10, "schedule": "cosine", "weight_decay": 0.1},
        "checkpoint": {"interval": max(1, iters // 4), "keep_last": 2, "load": "auto"},
        "out_dir": path("run"),
    }


def sft_settings(directory: str | os.PathLike = "megaevo-demo", vocab_size: int = VOCAB_SIZE, seed: int = 1234) -> dict:
    """The config that fine-tunes the demo's model on DIR/data/sft (written by `megaevo preprocess --sft`
    from DIR/corpus/sft.jsonl): two epochs of packed conversations, from the demo run's last checkpoint.

    examples/demo-sft.yaml is `sft_settings("megaevo-demo")`."""

    def path(*parts: str) -> str:
        return Path(directory, *parts).as_posix()

    return {
        "stage": "sft",
        "model": {"preset": "tiny", "vocab_size": vocab_size},
        "data": {"train": [path("data", "sft")], "tokenizer": path("tokenizer", "demo.model"), "seq_len": 256,
                 "split": "98,2,0"},
        "sft": {"packing": True, "loss_normalization": "global_tokens"},
        "train": {"micro_batch_size": 8, "global_batch_size": 16, "epochs": 2, "seed": seed, "log_interval": 10,
                  "eval_interval": 50, "eval_iters": 2, "dtype": "fp32"},
        "optim": {"lr": 1e-3, "min_lr": 1e-4, "warmup_fraction": 0.1, "schedule": "cosine", "weight_decay": 0.0},
        "checkpoint": {"load": path("run"), "finetune": True, "interval": 50, "keep_last": 1},
        "out_dir": path("sft-run"),
    }


def grpo_settings(directory: str | os.PathLike = "megaevo-demo", vocab_size: int = VOCAB_SIZE, seed: int = 1234) -> dict:
    """The config that continues the demo's SFT model (DIR/sft-run) with GRPO on reasoning-gym GCD
    problems (another seed than the SFT conversations'), rewarded by reasoning-gym's own scorer.

    examples/demo-grpo.yaml is `grpo_settings("megaevo-demo")`."""

    def path(*parts: str) -> str:
        return Path(directory, *parts).as_posix()

    return {
        "stage": "rl",
        "model": {"preset": "tiny", "vocab_size": vocab_size},
        "data": {"tokenizer": path("tokenizer", "demo.model"), "seq_len": 256},
        "rl": {"algorithm": "grpo", "prompts": ["rg:gcd:2000:7"], "template": "evolm", "prompts_per_step": 32,
               "n": 8, "max_prompt_len": 96, "max_new_tokens": 128, "temperature": 1.0, "top_p": 1.0,
               "epochs": 1, "mini_batches": 1, "loss_agg": "token-mean"},
        "train": {"micro_batch_size": 32, "iters": 20, "seed": seed, "log_interval": 1, "eval_interval": 0,
                  "dtype": "fp32"},
        "optim": {"lr": 3e-4, "min_lr": 3e-4, "warmup": 0, "schedule": "constant", "weight_decay": 0.0},
        "checkpoint": {"load": path("sft-run"), "finetune": True, "interval": 10, "keep_last": 1},
        "out_dir": path("grpo-run"),
    }


@dataclass
class TrainingResult:
    config: str  # DIR/config.yaml
    out_dir: str
    iterations: int  # where the run stands now
    status: str  # "trained", "resumed" or "already trained"
    evals: list[dict] = field(default_factory=list)  # validation records by step: {"step": n, "val/general": x, ...}
    seconds: float = 0.0

    def table(self) -> str:
        """Validation loss per domain at the first and the last evaluation."""
        if not self.evals:
            return "  no validation loss was recorded (train.eval_interval=0)"
        first, last = self.evals[0], self.evals[-1]
        shown = [first, last] if last is not first else [first]
        names = [k for k in last if k.startswith("val/")]
        head = f"  {'validation loss':<16}" + "".join(f"{'step ' + str(r['step']):>11}" for r in shown)
        lines = [head + (f"{'change':>10}" if len(shown) == 2 else "")]
        for name in names:
            row = f"  {name:<16}" + "".join(f"{r[name]:>11.3f}" if name in r else f"{'-':>11}" for r in shown)
            if len(shown) == 2 and name in first:
                row += f"{last[name] - first[name]:>+10.3f}"
            lines.append(row)
        return "\n".join(lines)


def train_demo(
    root: str | os.PathLike,
    vocab_size: int = VOCAB_SIZE,
    seed: int = 1234,
    iters: int = TRAIN_ITERS,
    overrides: Sequence[str] = (),
    verbose: bool = True,
) -> TrainingResult:
    """Train the tiny model on the demo data under `root` (made by run_demo); print what happened.

    Writes the exact config to ROOT/config.yaml first. The run in ROOT/run resumes from its last
    checkpoint when it was interrupted, is left alone when it is finished, and starts over when the
    config or the data changed since it began.
    """
    import contextlib

    import torch

    from megaevo.config import config_from_dict, config_to_dict, save_config, validate
    from megaevo.training.trainer import Trainer

    start = time.perf_counter()
    log, show = _reporters(verbose)
    root = Path(root).resolve()
    cfg = config_from_dict(train_settings(root, iters, vocab_size, seed), list(overrides), source="megaevo demo")
    validate(cfg, world_size=1)
    out = Path(cfg.out_dir)
    setup = {"config": config_to_dict(cfg), "data": _data_fingerprint(cfg.data.train)}
    at = _prepare_run(out, setup, log)
    config_path = save_config(cfg, root / "config.yaml")
    t = cfg.train
    log(f"  config  {config_path}\n"
        f"          rerun or vary it: megaevo train --config {config_path} out_dir={out}-2 optim.lr=1e-3")
    # A model this small gains little from more threads, and on a machine that is busy with other
    # work every extra thread slows the rest down (measured: 1 thread 3-4x faster than 2 on two shared
    # cores), so the demo trains on half of torch's threads.
    threads = torch.get_num_threads()
    use = max(1, threads // 2)
    log(f"  model   tiny preset, {cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}, "
        f"vocabulary {cfg.model.vocab_size:,}, {cfg.train.dtype} on the CPU ({use} of {threads} threads)")
    log(f"  data    {_describe_blend(cfg.data.train)}, {cfg.seq_len} tokens per sample, "
        f"{t.global_batch_size} samples per step")
    if at >= t.iters:
        status = "already trained"
        log(f"  {out} already holds the finished run (iteration {at} of {t.iters}): not training again.\n"
            f"  Delete {out} to train from scratch, or vary the run in a new directory, e.g.\n"
            f"    megaevo train --config {config_path} out_dir={out}-long train.iters={2 * t.iters}")
    else:
        status = "resumed" if at else "trained"
        what = f"resuming from iteration {at}" if at else "from scratch"
        log(f"  {t.iters} iterations {what}: a line every {t.log_interval}, validation every {t.eval_interval}, "
            f"a checkpoint every {cfg.checkpoint.interval} (Ctrl-C is safe: rerun to resume)")
        torch.set_num_threads(use)
        try:
            with contextlib.ExitStack() as quiet:
                if not verbose:  # the trainer's progress lines go to stdout (its logger's INFO lines)
                    quiet.enter_context(contextlib.redirect_stdout(quiet.enter_context(open(os.devnull, "w"))))
                Trainer(cfg).fit()
        except KeyboardInterrupt:
            log(f"\ninterrupted: rerun `megaevo demo --dir {root}` to resume from the last checkpoint in {out}")
            raise
        finally:
            torch.set_num_threads(threads)
    result = TrainingResult(str(config_path), str(out), _latest_iteration(out) or 0, status,
                            _evals(out / "metrics.jsonl"), round(time.perf_counter() - start, 1))
    show(result.table())
    show(f"  (cross-entropy in nats per token; a model that has learnt nothing scores about "
         f"ln {cfg.model.vocab_size} = {math.log(cfg.model.vocab_size):.2f})")
    show(f"  run     {out}  (metrics.jsonl, config.yaml, checkpoints/)")
    return result


def _describe_blend(spec) -> str:
    from megaevo.data.blended import parse_blend

    corpora = parse_blend(spec)
    total = sum(c.weight for c in corpora)
    return " + ".join(f"{100 * c.weight / total:.0f}% {c.name}" for c in corpora)


def _data_fingerprint(spec) -> dict:
    """sha256 of every training dataset's .idx and .bin: a rebuilt dataset makes an old run stale."""
    from megaevo.data import indexed
    from megaevo.data.blended import parse_blend

    out = {}
    for corpus in parse_blend(spec):
        idx, bin_ = indexed.paths(corpus.prefix)
        out[corpus.name] = [_sha256(idx) if idx.is_file() else None, _sha256(bin_) if bin_.is_file() else None]
    return out


def _latest_iteration(out: Path) -> int | None:
    from megaevo.training.checkpoint import Checkpointer, LoadedCheckpoint

    latest = Checkpointer(out / "checkpoints").resolve("auto")
    return LoadedCheckpoint(latest).iteration if latest is not None else None


def _prepare_run(out: Path, setup: dict, log) -> int:
    """Make `out` ready for the run described by `setup`; return the iteration it resumes from."""
    if out.is_dir() and any(out.iterdir()):
        record = out / TRAIN_RECORD
        try:
            previous = json.loads(record.read_text())
        except (OSError, ValueError):
            raise FileExistsError(f"{out} exists but holds no demo run ({record.name} is missing): "
                                  f"move it away or give another out_dir") from None
        at = _latest_iteration(out) if previous == setup else None
        if at:
            return at
        log(f"  {out}: " + ("no checkpoint yet" if previous == setup else "the config or the data changed")
            + ", starting over")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / TRAIN_RECORD).write_text(json.dumps(setup, indent=1) + "\n")
    return 0


def _evals(metrics: Path) -> list[dict]:
    """The validation records of a run, one per step (the latest when a resumed run repeated a step)."""
    by_step: dict[int, dict] = {}
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut short by an interruption
            vals = {k: v for k, v in record.items() if k.startswith("val/")}
            if vals and isinstance(record.get("step"), int):
                by_step[record["step"]] = {"step": record["step"], **vals}
    return [by_step[s] for s in sorted(by_step)]
