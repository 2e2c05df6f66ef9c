"""Typed settings from YAML: nested dataclasses read from a mapping, a file and dotted overrides.

Generic over the root dataclass (megaevo.config's `Config` is one):

    cfg = configio.load(Config, "run.yaml", ["parallel.tp=2"])
    configio.save(cfg, "out/config.yaml")          # load() reads it back to an equal object

A field whose type is a dataclass is a section (a nested mapping); every other field is a value,
coerced to its annotated type (int, float, bool, str, Literal, Optional/Union, list, tuple, dict).
Overrides `key.sub=value` apply after the file, in order, their values read as YAML; below a
free-form mapping field (`data.valid.web=...`) an override sets one entry. Field metadata:
`yaml` gives the key a field has in YAML (`async` for `async_save`); `fills` is a function
`(value, dotted_key) -> mapping` whose result fills sibling fields whenever the field is set, before
the explicit fields beside it (a model `preset`). Unknown keys and wrongly typed values raise
ConfigError naming the dotted key, with the nearest known key or value as a suggestion.

Path settings: `paths` maps dotted keys to resolvers `(value, base folder) -> value` that join the
relative paths in a value to the folder (:func:`absolute_path` for a plain path). Given them, load()
resolves the file's relative paths against the file's folder and those of the overrides against the
working directory, once, so the object holds absolute paths wherever it is used from;
:func:`with_absolute_paths` does the same to a mapping or an object made elsewhere.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import os
import tempfile
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, TypeVar, Union

import yaml

from megaevo.errors import UserError

T = TypeVar("T")
Resolver = Callable[[Any, str], Any]  # (value as written, base folder) -> value with its relative paths joined


class ConfigError(UserError):
    """A setting that is unknown, of the wrong type, or impossible together with the others."""


def did_you_mean(word, options) -> str:
    """` (did you mean 'x'?)` for the option nearest to `word`, or an empty string."""
    match = difflib.get_close_matches(str(word), list(options), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def errors_message(errors: list[str], heading: str = "invalid configuration") -> str:
    """One problem as it is; several as a list under `heading`."""
    if len(errors) == 1:
        return errors[0]
    return f"{heading}:\n" + "\n".join(f"  - {e}" for e in errors)


# ---------------------------------------------------------------- schema: names and types


def _fields(cls) -> dict[str, dataclasses.Field]:
    """A dataclass's fields by their YAML name."""
    return {f.metadata.get("yaml", f.name): f for f in dataclasses.fields(cls)}


@functools.cache
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _section_type(cls, f: dataclasses.Field):
    tp = _hints(cls)[f.name]
    return tp if dataclasses.is_dataclass(tp) else None


@functools.cache
def _known_keys(cls, prefix: str = "") -> tuple[str, ...]:
    keys = []
    for name, f in _fields(cls).items():
        key = f"{prefix}{name}"
        keys.append(key)
        sub = _section_type(cls, f)
        if sub is not None:
            keys += _known_keys(sub, key + ".")
    return tuple(keys)


def _nearest_key(root, key: str) -> str | None:
    """The known dotted key nearest to an unknown one: a sibling with the same words in another
    order (`lr_min` -> `min_lr`), a similar sibling, the same name in another section
    (`train.lr` -> `optim.lr`), or a similar name anywhere."""
    known = _known_keys(root)
    section, _, leaf = key.rpartition(".")
    prefix = section + "." if section else ""
    siblings = [k[len(prefix):] for k in known if k.startswith(prefix) and "." not in k[len(prefix):]]
    words = sorted(leaf.lower().split("_"))
    for sibling in siblings:
        if sorted(sibling.split("_")) == words:
            return prefix + sibling
    match = difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.6)
    if match:
        return prefix + match[0]
    elsewhere: dict[str, str] = {}
    for k in known:  # a name in several sections suggests its first (e.g. optim.lr before rl.critic.lr)
        if "." in k:
            elsewhere.setdefault(k.rpartition(".")[2], k)
    match = difflib.get_close_matches(leaf, list(elsewhere), n=1, cutoff=0.8)
    return elsewhere[match[0]] if match else None


def _unknown_key(root, key: str) -> ConfigError:
    near = _nearest_key(root, key)
    return ConfigError(f"unknown key {key!r}" + (f" (did you mean {near!r}?)" if near else ""))


def _type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        names = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple:
        return f"a list of {len(args)} numbers" if Ellipsis not in args else "a list"
    if origin is list or tp is list:
        return f"a list of {_type_name(args[0]).removeprefix('a ').removeprefix('an ')}s" if args else "a list"
    if origin is dict or tp is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def coerce(value, tp, key: str):
    """`value` as type `tp`, or ConfigError naming `key` and the expected type."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    def fail(extra: str = ""):
        return ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}{extra}")

    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # Optional[X]: keep X's error about an item (`key[1]: ...`)
            try:
                return coerce(value, options[0], key)
            except ConfigError as e:
                if str(e).startswith(f"{key}: "):
                    raise fail() from None
                raise
        for arg in options:
            try:
                return coerce(value, arg, key)
            except ConfigError:
                pass
        raise fail()
    if origin is Literal:
        if isinstance(value, str) and value in args:
            return value
        raise fail(did_you_mean(value, args) if isinstance(value, str) else "")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise fail()
    if tp in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise fail()
        try:  # YAML reads 3e-4 (no dot) as a string
            number = float(value) if isinstance(value, str) else value
        except ValueError:
            raise fail() from None
        if tp is float:
            return float(number)
        if isinstance(number, float) and not number.is_integer():
            raise fail()
        return int(number)
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise fail()
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise fail()
        if origin is tuple and args and Ellipsis not in args:
            if len(value) != len(args):
                raise fail(f" ({len(value)} items)")
            return tuple(coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise fail()
        ktype, vtype = args if args else (Any, Any)
        return {coerce(k, ktype, key): coerce(v, vtype, f"{key}.{k}") for k, v in value.items()}
    raise fail()


# ---------------------------------------------------------------- raw trees: merging and overrides


def _merge_section(root, base: dict, layer, cls, prefix: str) -> dict:
    """`base` (a raw section) updated by `layer`: sub-sections merge, fields are replaced, unknown
    keys raise. A field with a `fills` function fills its siblings before the layer's explicit ones."""
    if not isinstance(layer, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of settings, got {layer!r}")
    out = dict(base)
    fields = _fields(cls)
    for name, f in fields.items():
        fills = f.metadata.get("fills")
        if fills is not None and layer.get(name) is not None:
            out.update(fills(layer[name], f"{prefix}.{name}" if prefix else name))
    for name, value in layer.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in fields:
            raise _unknown_key(root, key)
        sub = _section_type(cls, fields[name])
        if sub is not None and isinstance(value, dict):
            out[name] = _merge_section(root, out.get(name) or {}, value, sub, key)
        else:
            out[name] = copy.deepcopy(value)
    return out


def _get(tree: dict, parts: list[str]):
    for p in parts:
        if not isinstance(tree, dict):
            return None
        tree = tree.get(p)
    return tree


def _apply_override(root, tree: dict, text: str, paths: Mapping[str, Resolver] | None = None) -> dict:
    """`tree` with one `a.b.c=value` override applied (value read as YAML), its paths resolved
    against the working directory when `paths` are given."""
    dotted, sep, raw = text.partition("=")
    dotted = dotted.strip()
    if not sep or not dotted:
        raise ConfigError("expected key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot read the value as YAML ({e})") from None
    parts = dotted.split(".")
    # Nest the value under its path; below a field (e.g. data.valid.web) it sets one entry.
    cls, depth = root, 0
    while depth < len(parts) - 1 and cls is not None:
        f = _fields(cls).get(parts[depth])
        if f is None:
            raise _unknown_key(root, ".".join(parts[: depth + 1]))
        cls = _section_type(cls, f)
        depth += 1
    if cls is None:  # inside a free-form field: set the entry in a copy of its current value
        field_key = parts[:depth]
        current = _get(tree, field_key)
        current = copy.deepcopy(current) if isinstance(current, dict) else {}
        node = current
        for p in parts[depth:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{dotted}: {p!r} is not a mapping")
        node[parts[-1]] = value
        parts, value = field_key, current
    for p in reversed(parts):
        value = {p: value}
    if paths:
        value = with_absolute_paths(value, paths)
    return _merge_section(root, tree, value, root, "")


def _build(cls, raw: dict, prefix: str):
    hints = _hints(cls)
    kwargs = {}
    for name, f in _fields(cls).items():
        if name not in raw:
            continue
        key = f"{prefix}.{name}" if prefix else name
        sub = _section_type(cls, f)
        if sub is not None:
            if not isinstance(raw[name], dict):
                raise ConfigError(f"{key}: expected a mapping of settings, got {raw[name]!r}")
            kwargs[f.name] = _build(sub, raw[name], key)
        else:
            kwargs[f.name] = coerce(raw[name], hints[f.name], key)
    return cls(**kwargs)


# ---------------------------------------------------------------- paths


def absolute_path(value, base: str):
    """A relative path (a non-empty string) joined to `base` and normalised, `~` expanded; an absolute
    one as it is; anything else (null, a number) unchanged."""
    if not isinstance(value, str) or not value:
        return value
    path = os.path.expanduser(value)
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(base, path))


def with_absolute_paths(obj: T, paths: Mapping[str, Resolver], base: str | os.PathLike | None = None) -> T:
    """`obj` (a raw mapping as read from YAML, or a root dataclass) with the value at each dotted key
    of `paths` that it holds (and is not null) resolved against `base` (default: the working
    directory). `obj` itself is left as it is."""
    base = os.path.abspath(base if base is not None else os.getcwd())
    for dotted, resolve in paths.items():
        obj = _map_at(obj, dotted.split("."), lambda value, resolve=resolve: resolve(value, base))
    return obj


def _map_at(obj, parts: list[str], fn):
    """`obj` with `fn` applied to its value at the key path `parts`, copied along the way; `obj`
    itself where the path is absent or the value null."""
    if isinstance(obj, dict):
        if parts[0] not in obj:
            return obj
        value = obj[parts[0]]
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type) and parts[0] in _fields(type(obj)):
        value = getattr(obj, _fields(type(obj))[parts[0]].name)
    else:
        return obj
    if value is None:
        return obj
    new = fn(value) if len(parts) == 1 else _map_at(value, parts[1:], fn)
    if new is value:
        return obj
    if isinstance(obj, dict):
        return {**obj, parts[0]: new}
    return dataclasses.replace(obj, **{_fields(type(obj))[parts[0]].name: new})


# ---------------------------------------------------------------- public entry points


def from_dict(root: type[T], raw: dict | None, overrides: list[str] | tuple[str, ...] = (),
              source: str = "", paths: Mapping[str, Resolver] | None = None,
              base: str | os.PathLike | None = None) -> T:
    """A `root` from a raw mapping (as read from YAML, `source` naming it in errors) and dotted
    overrides applied in order. With `paths`, the relative paths of `raw` resolve against `base`
    (default: the working directory) and those of the overrides against the working directory."""
    try:
        tree = _merge_section(root, {}, raw or {}, root, "")
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}" if source else str(e)) from None
    if paths:
        tree = with_absolute_paths(tree, paths, base)
    for text in overrides:
        try:
            tree = _apply_override(root, tree, text, paths)
        except ConfigError as e:
            raise ConfigError(f"override {text!r}: {e}") from None
    return _build(root, tree, "")


def load(root: type[T], path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = (),
         paths: Mapping[str, Resolver] | None = None) -> T:
    """The `root` of a YAML file (None: all defaults) with dotted overrides applied in order. With
    `paths`, relative paths in the file resolve against the file's folder, those in the overrides
    against the working directory."""
    if path is None:
        return from_dict(root, {}, overrides, paths=paths)
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top, got {type(raw).__name__}")
    return from_dict(root, raw, overrides, source=str(path), paths=paths,
                     base=os.path.dirname(os.path.abspath(path)))


def to_dict(obj) -> Any:
    """Plain YAML-ready data: YAML key names, tuples as lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {name: to_dict(getattr(obj, f.name)) for name, f in _fields(type(obj)).items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def save(obj, path: str | os.PathLike) -> Path:
    """Write `obj` as YAML that load() reads back to an equal object (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(to_dict(obj), sort_keys=False, default_flow_style=False)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; a config is meant to be read and shared
    os.replace(tmp, path)
    return path
