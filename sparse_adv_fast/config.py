"""Generic validated configs: checked dataclass fields, JSON/YAML files, ``key=value`` overrides.

A config is a frozen dataclass deriving from :class:`Config` whose fields are declared with
:func:`integer`, :func:`number`, :func:`choice`, :func:`flag`, :func:`text` or
:func:`checked`. The check of a field lives in its declaration only; everything else reads
it from there:

* construction (``TrainConfig(lr=0)``) runs every field check, then the class's own
  cross-field ``_validate`` hook;
* :func:`read_file` / :meth:`Config.from_dict` reject an unknown key with a one-line error
  and a "did you mean" suggestion;
* :func:`parse_overrides` turns ``key=value`` text into typed values from the field's type
  (``int``, ``float``, ``bool``, ``str``, ``None``, tuples as comma lists, else JSON);
* :func:`arg_type` makes an ``argparse`` type of a field, so a CLI flag is parsed and
  checked exactly as the config key.

This module sits below everything else (it imports nothing of the package), so every layer
(``train``, ``pipeline``) can build its config on it.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

_CHECK = "saf_check"
_MISSING = dataclasses.MISSING


# ---- field checks ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Check:
    """The rule a field's value must follow; :meth:`__call__` returns the normalised value.

    ``kind``: ``"int"``, ``"float"``, ``"str"``, ``"bool"`` or ``"any"``. ``lo`` / ``hi``
    bound numbers (``lo_open`` / ``hi_open``: strict). ``choices`` lists the allowed
    strings. ``optional``: ``None`` is allowed too. ``msg`` replaces the default wording
    (e.g. ``"expected a positive integer"``). ``func(value) -> value`` is a check of its own
    (raising ``ValueError``), run after the others.
    """

    kind: str = "any"
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple[str, ...] | None = None
    optional: bool = False
    msg: str | None = None
    func: Callable[[Any], Any] | None = None

    def rule(self) -> str:
        """What the value must be, in words (``"> 0"``, ``"in [0, 1]"``, ``"an int >= 1"``)."""
        if self.lo is not None and self.hi is not None:
            rng = (f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}"
                   f"{')' if self.hi_open else ']'}")
        elif self.lo is not None:
            rng = f"{'>' if self.lo_open else '>='} {self.lo:g}"
        elif self.hi is not None:
            rng = f"{'<' if self.hi_open else '<='} {self.hi:g}"
        else:
            rng = ""
        if self.kind == "int":
            rng = f"an int {rng}".rstrip()
        elif self.kind == "float" and not rng:
            rng = "a finite number"
        elif self.kind == "bool":
            rng = "true or false"
        elif self.kind == "str":
            rng = "a string"
        return rng + (" or null" if self.optional else "")

    def _fail(self, name: str, v: Any) -> ValueError:
        if self.choices is not None:
            return ValueError(f"unknown {name} {v!r}; choose one of {self.choices}")
        if self.msg is not None:
            what = self.msg if name in self.msg else f"{name}: {self.msg}"
            return ValueError(f"{what}, got {v!r}")
        return ValueError(f"{name} must be {self.rule()}, got {v!r}")

    def __call__(self, name: str, v: Any) -> Any:
        """``v`` checked (and normalised: an int for a float field becomes a float)."""
        if v is None and self.optional:
            return None
        if self.choices is not None:
            if not isinstance(v, str) or v not in self.choices:
                raise self._fail(name, v)
        elif self.kind in ("int", "float"):
            if isinstance(v, bool) or not isinstance(v, int if self.kind == "int"
                                                     else (int, float)):
                raise self._fail(name, v)
            if not math.isfinite(v) or not self._in_range(v):
                raise self._fail(name, v)
            v = float(v) if self.kind == "float" else v
        elif self.kind == "bool" and not isinstance(v, bool):
            raise self._fail(name, v)
        elif self.kind == "str" and not isinstance(v, str):
            raise self._fail(name, v)
        return self.func(v) if self.func is not None else v

    def _in_range(self, v: float) -> bool:
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return not (self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi))


def _field(default: Any, check: Check, doc: str) -> Any:
    kw: dict[str, Any] = {"metadata": {_CHECK: check, "doc": doc}}
    if isinstance(default, (list, dict, set)):
        kw["default_factory"] = lambda: type(default)(default)
    else:
        kw["default"] = default
    return dataclasses.field(**kw)


def integer(default: Any, *, lo: int | None = None, hi: int | None = None,
            optional: bool = False, msg: str | None = None, doc: str = "") -> Any:
    """An int field, ``lo <= v <= hi``."""
    return _field(default, Check("int", lo, hi, optional=optional, msg=msg), doc)


def number(default: Any, *, lo: float | None = None, hi: float | None = None,
           lo_open: bool = False, hi_open: bool = False, optional: bool = False,
           msg: str | None = None, doc: str = "") -> Any:
    """A finite float field within the bounds (ints are accepted and become floats)."""
    return _field(default, Check("float", lo, hi, lo_open, hi_open, optional=optional,
                                 msg=msg), doc)


def choice(default: Any, choices: Iterable[str], *, optional: bool = False,
           doc: str = "") -> Any:
    """A string field, one of ``choices``."""
    return _field(default, Check("str", choices=tuple(choices), optional=optional), doc)


def flag(default: bool, *, optional: bool = False, doc: str = "") -> Any:
    """A bool field."""
    return _field(default, Check("bool", optional=optional), doc)


def text(default: Any, *, optional: bool = False, doc: str = "") -> Any:
    """A string field (``optional``: or ``None``)."""
    return _field(default, Check("str", optional=optional), doc)


def checked(default: Any, func: Callable[[Any], Any], *, kind: str = "any",
            optional: bool = False, doc: str = "") -> Any:
    """A field checked by ``func(value) -> value`` (raising ``ValueError``), after ``kind``."""
    return _field(default, Check(kind, optional=optional, func=func), doc)


def like(cls: Any, name: str, default: Any = _MISSING, doc: str = "") -> Any:
    """A field with the check (and, unless given, the default) of ``cls``'s field ``name``:
    a config that exposes another's setting shares its rule instead of restating it."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return _field(f.default if default is _MISSING else default,
                          f.metadata.get(_CHECK, Check()), doc or f.metadata.get("doc", ""))
    raise KeyError(name)


def field_check(cls: Any, name: str) -> Check:
    """The :class:`Check` of field ``name`` of config class ``cls``."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.metadata.get(_CHECK, Check())
    raise KeyError(name)


# ---- the config base class ------------------------------------------------------------------
C = TypeVar("C", bound="Config")


class Config:
    """Base of the validated configs (subclasses are ``@dataclass(frozen=True)``)."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            check = f.metadata.get(_CHECK)
            if check is not None:
                object.__setattr__(self, f.name, check(f.name, getattr(self, f.name)))
        self._validate()

    def _validate(self) -> None:
        """Cross-field checks of a subclass (each field already passed its own)."""

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The config's field names, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls: type[C], d: Mapping[str, Any], where: str = "config") -> C:
        """A config from a mapping; an unknown key or a bad value is one ValueError that
        starts with ``where``."""
        if not isinstance(d, Mapping):
            raise ValueError(f"{where}: a config must be a mapping of keys to values, got "
                             f"{type(d).__name__}")
        check_keys(d, cls.keys(), where)
        try:
            return cls(**dict(d))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

    def replace(self: C, **changes: Any) -> C:
        """A copy with ``changes`` (unknown keys: one ValueError with a suggestion)."""
        check_keys(changes, self.keys(), type(self).__name__)
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready values (tuples become lists)."""
        return json.loads(json.dumps(
            {k: getattr(self, k) for k in self.keys()}, default=_jsonable))


def _jsonable(v: Any) -> Any:
    if isinstance(v, (tuple, set)):
        return list(v)
    return os.fspath(v) if isinstance(v, os.PathLike) else str(v)


# ---- unknown keys ---------------------------------------------------------------------------
def suggest(key: str, known: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest known key, or ``""``."""
    close = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def check_keys(keys: Iterable[str], known: Iterable[str], where: str = "config") -> None:
    """ValueError for the first key not in ``known``, with the closest match."""
    known = tuple(known)
    for k in keys:
        if k not in known:
            raise ValueError(f"{where}: unknown config key {k!r}{suggest(k, known)} (known "
                             f"keys: {', '.join(known)})")


# ---- files ----------------------------------------------------------------------------------
YAML_SUFFIXES = (".yaml", ".yml")


def read_file(path: str | os.PathLike[str], known: Iterable[str] | None = None) -> dict[str, Any]:
    """The mapping in a JSON or YAML file (YAML needs PyYAML), keys checked against
    ``known``; every problem is one ValueError naming the file. Keys starting with ``_``
    (``"_comment"``) are notes and are dropped."""
    p = Path(path)
    if p.is_dir():
        raise IsADirectoryError(f"config {p} is a directory; give a .json or .yaml file")
    try:
        body = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {p} does not exist") from None
    if p.suffix.lower() in YAML_SUFFIXES:
        d = _yaml(p, body)
    else:
        try:
            d = json.loads(body)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{p}: a config file must hold a mapping of keys to values, got "
                         f"{type(d).__name__}")
    d = {k: v for k, v in d.items() if not str(k).startswith("_")}  # "_comment": notes
    if known is not None:
        check_keys(d, known, str(p))
    return d


def _yaml(p: Path, body: str) -> Any:
    try:
        import yaml
    except ImportError:
        raise ValueError(f"{p}: reading YAML configs needs PyYAML (pip install pyyaml); or "
                         "write the config as .json") from None
    try:
        return yaml.safe_load(body)  # safe_load: a config file cannot build Python objects
    except yaml.YAMLError as e:
        raise ValueError(f"{p}: not valid YAML ({' '.join(str(e).split())})") from None


# ---- key=value overrides --------------------------------------------------------------------
_NOUNS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def _hints(cls: Any) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _atoms(tp: Any) -> tuple[Any, ...]:
    """The non-None members of a (possibly optional / union) annotation."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return tuple(a for a in typing.get_args(tp) if a is not type(None))
    return (tp,)


def _nullable(tp: Any) -> bool:
    return type(None) in typing.get_args(tp)


def coerce(tp: Any, text: str, name: str = "value") -> Any:
    """``text`` as a value of annotation ``tp`` (``int``, ``float``, ``bool``, ``str``,
    ``X | None``, ``tuple[X, ...]`` as a comma list; otherwise JSON). A ValueError says
    what was expected."""
    s = text.strip()
    if _nullable(tp) and s.lower() in ("null", "none"):
        return None
    for atom in _atoms(tp):
        origin = typing.get_origin(atom)
        if atom is bool:
            if s.lower() in _TRUE:
                return True
            if s.lower() in _FALSE:
                return False
        elif atom is int:
            try:
                return int(s)
            except ValueError:
                pass
        elif atom is float:
            try:
                return float(_fraction(s))
            except ValueError:
                pass
        elif atom is str:
            return text
        elif origin in (tuple, list):
            if s.startswith("["):
                return tuple(json.loads(s))
            inner = (typing.get_args(atom) or (str,))[0]
            return tuple(coerce(inner, part, name) for part in s.split(",") if part.strip())
        else:
            try:
                return json.loads(s)
            except json.JSONDecodeError:
                pass
    names = " or ".join(_NOUNS.get(a, getattr(a, "__name__", str(a))) for a in _atoms(tp))
    raise ValueError(f"{name}: expected {names}{' or null' if _nullable(tp) else ''}, "
                     f"got {text!r}")


def _fraction(s: str) -> float:
    # eps=8/255 reads as in the papers
    if "/" in s:
        num, _, den = s.partition("/")
        return float(num) / float(den)
    return float(s)


def parse_overrides(items: Iterable[str], cls: Any, where: str = "override") -> dict[str, Any]:
    """``["key=value", ...]`` -> ``{key: typed value}`` for config class ``cls`` (types from
    its field annotations; see :func:`coerce`). A malformed item or unknown key is one
    ValueError."""
    hints = _hints(cls)
    out: dict[str, Any] = {}
    for item in items:
        if not isinstance(item, str) or "=" not in item:
            raise ValueError(f"{where} {item!r} is not of the form key=value")
        key, _, value = item.partition("=")
        key = key.strip()
        check_keys([key], cls.keys(), where)
        out[key] = coerce(hints[key], value, key)
    return out


def load(cls: type[C], path: str | os.PathLike[str] | None = None,
         overrides: Iterable[str] | Mapping[str, Any] = ()) -> C:
    """``cls`` from its defaults < the file at ``path`` (JSON / YAML) < ``overrides``
    (``key=value`` strings or a mapping), validated once."""
    d: dict[str, Any] = {}
    where = "config"
    if path is not None:
        d.update(read_file(path, cls.keys()))
        where = str(path)
    ov = (dict(overrides) if isinstance(overrides, Mapping)
          else parse_overrides(overrides, cls))
    check_keys(ov, cls.keys(), "override")
    d.update(ov)
    return cls.from_dict(d, where)


# ---- argparse -------------------------------------------------------------------------------
def arg_type(cls: Any, name: str, check: Check | None = None) -> Callable[[str], Any]:
    """An ``argparse`` type for field ``name`` of ``cls``: the text coerced from the field's
    type, then the field's check (or ``check``); an error is ``ArgumentTypeError`` with the
    config's own message."""
    import argparse

    tp = _hints(cls)[name]
    rule = check if check is not None else field_check(cls, name)

    def parse(value: str) -> Any:
        try:
            return rule(name, coerce(tp, value, name))
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = name  # argparse names the type in its messages
    return parse


__all__ = [
    "Check", "Config", "arg_type", "check_keys", "checked", "choice", "coerce", "field_check",
    "flag", "integer", "like", "load", "number", "parse_overrides", "read_file", "suggest", "text",
]
