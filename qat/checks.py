"""The validation vocabulary: every rule a setting or argument must follow is written here once, and
every violation reads the same way:

    <name>=<value> is not allowed: expected <what is allowed>

A rule is a small object called with the setting's full name and value; it returns the value
(normalised where the rule says so) or raises `ConfigError`. Specs are frozen dataclasses deriving
from `Checked`; each field names its rule with `setting(rule)`, `Checked.__post_init__` applies them
and then the spec's own cross-field `check()`, and `from_config` builds a spec from a config section,
refusing unknown and missing keys with the same kind of one-line error.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import os
from typing import Any, ClassVar, Mapping, Optional, Sequence, Type, TypeVar

from qat.errors import ConfigError

BITS_MIN, BITS_MAX = 2, 16

T = TypeVar("T")


def rejected(name: str, value: Any, expected: str) -> ConfigError:
    """The one-line error for a value that breaks a rule."""
    return ConfigError(f"{name}={value!r} is not allowed: expected {expected}")


class Rule:
    """A rule for one value. Subclasses define `ok` and `expected` (and may normalise)."""

    expected: str = ""

    def ok(self, value: Any) -> bool:
        raise NotImplementedError

    def normalise(self, value: Any) -> Any:
        return value

    def __call__(self, name: str, value: Any) -> Any:
        if not self.ok(value):
            raise rejected(name, value, self.expected)
        return self.normalise(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


class Flag(Rule):
    expected = "true or false"

    def ok(self, value):
        return isinstance(value, bool)


class OneOf(Rule):
    def __init__(self, choices: Sequence[str]):
        self.choices = tuple(choices)
        self.expected = f"one of {', '.join(self.choices)}"

    def ok(self, value):
        return isinstance(value, str) and value in self.choices


class Integer(Rule):
    """An integer in [low, high] (either end open-ended where None)."""

    def __init__(self, low: Optional[int] = None, high: Optional[int] = None, expected: str = ""):
        self.low, self.high = low, high
        if expected:
            self.expected = expected
        elif low is not None and high is not None:
            self.expected = f"an integer {low}..{high}"
        elif low == 1:
            self.expected = "a positive integer"
        elif low is not None:
            self.expected = f"an integer >= {low}"
        else:
            self.expected = "an integer"

    def ok(self, value):
        return _is_int(value) and (self.low is None or value >= self.low) and (self.high is None or value <= self.high)


class Number(Rule):
    """A finite number (int or float, never a bool or a string) in a range; `low_open` / `high_open`
    exclude the ends."""

    def __init__(self, low: Optional[float] = None, high: Optional[float] = None, low_open: bool = False,
                 high_open: bool = False, expected: str = ""):
        self.low, self.high, self.low_open, self.high_open = low, high, low_open, high_open
        if expected:
            self.expected = expected
        elif low is not None and high is not None:
            self.expected = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        elif low is not None:
            self.expected = f"a number {'>' if low_open else '>='} {low:g}"
        else:
            self.expected = "a finite number"

    def ok(self, value):
        if not _is_number(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)


class Bits(Integer):
    """A bit-width: an integer 2..16, the range every quantizer of the project supports."""

    def __init__(self):
        super().__init__(BITS_MIN, BITS_MAX)


class Text(Rule):
    expected = "a string"

    def ok(self, value):
        return isinstance(value, str)


class ExistingFile(Rule):
    """The path of an existing file whose name ends with one of `suffixes`."""

    def __init__(self, suffixes: Sequence[str], what: str):
        self.suffixes = tuple(suffixes)
        self.expected = f"the path of an existing {what} file ({' or '.join(self.suffixes)})"

    def ok(self, value):
        return (isinstance(value, str) and value.lower().endswith(self.suffixes)
                and os.path.isfile(os.path.expanduser(value)))


class Scalar(Rule):
    expected = "a string, number or boolean"

    def ok(self, value):
        return isinstance(value, (str, bool, numbers.Real))


class Nullable(Rule):
    """null, or a value that follows `rule`."""

    def __init__(self, rule: Rule, expected: str = ""):
        self.rule = rule
        self.expected = expected or f"null or {rule.expected}"

    def ok(self, value):
        return value is None or self.rule.ok(value)

    def normalise(self, value):
        return None if value is None else self.rule.normalise(value)


class ListOf(Rule):
    """A list (kept as a tuple) of values that each follow `rule`, of `length` items if given."""

    def __init__(self, rule: Rule, length: Optional[int] = None, expected: str = ""):
        self.rule, self.length = rule, length
        self.expected = expected or (f"a list of {length} items, each {rule.expected}" if length
                                     else f"a list, each item {rule.expected}")

    def ok(self, value):
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
            return False
        return (self.length is None or len(value) == self.length) and all(self.rule.ok(v) for v in value)

    def normalise(self, value):
        return tuple(self.rule.normalise(v) for v in value)


class MappingOf(Rule):
    """A mapping (kept as a dict sorted by key) of text keys to values that each follow `rule`."""

    def __init__(self, rule: Rule, expected: str = ""):
        self.rule = rule
        self.expected = expected or f"a mapping of names to values, each {rule.expected}"

    def ok(self, value):
        return isinstance(value, Mapping) and all(isinstance(k, str) and k and self.rule.ok(v)
                                                  for k, v in value.items())

    def normalise(self, value):
        return {k: self.rule.normalise(value[k]) for k in sorted(value)}


def setting(rule: Rule, **field_kwargs) -> Any:
    """A dataclass field checked by `rule` (pass `default=` where the field has one)."""
    return dataclasses.field(metadata={"rule": rule}, **field_kwargs)


class Checked:
    """Base of the project's specs: frozen dataclasses whose fields carry rules (`setting`).

    `section` prefixes the names in messages (`trainer.epochs=0 is not allowed: ...`)."""

    section: ClassVar[str] = ""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            rule = f.metadata.get("rule")
            if rule is not None:
                object.__setattr__(self, f.name, rule(self.key(f.name), getattr(self, f.name)))
        self.check()

    def check(self) -> None:
        """Rules across fields; raise `ConfigError` (subclasses override)."""

    @classmethod
    def key(cls, name: str) -> str:
        return f"{cls.section}.{name}" if cls.section else name

    @classmethod
    def from_config(cls: Type[T], values: Optional[Mapping[str, Any]], owner: str = "") -> T:
        """The spec of a config section. Keys the spec does not have and keys it needs but the section
        lacks are one-line errors; `owner` names what the keys belong to in the first message
        (default: the section)."""
        values = dict(values or {})
        fields = [f for f in dataclasses.fields(cls) if f.init]
        names = [f.name for f in fields]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ConfigError(f"{cls.key(unknown[0])} is not {owner or f'a setting of {cls.section}'}: "
                              f"expected one of {', '.join(sorted(names))}")
        missing = [f.name for f in fields if f.name not in values
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ConfigError(f"{cls.key(missing[0])} is missing: expected it in the config "
                              f"(settings needed: {', '.join(missing)})")
        return cls(**values)
