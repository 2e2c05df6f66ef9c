"""The demo's corpora: the Python standard library (general) and reasoning-gym problems with worked
solutions (math, and the SFT conversations)."""
from __future__ import annotations


import ast
import hashlib
import math
import operator
import os
import random
import re
import sysconfig
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterator

from megaevo.log import get_logger

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


def _reasoning_gym_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("reasoning-gym")
    except PackageNotFoundError:
        _import_reasoning_gym()  # raises the install hint when it is missing
        return "unknown"


