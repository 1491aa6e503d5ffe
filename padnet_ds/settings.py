"""The base of every config section, and how a failed validation becomes one message naming the key.

Each component owns its section (``PartitionConfig`` in partition/, ``MoEConfig`` in models/,
``TextDataConfig`` in data/, the run's own sections in engine/config.py) as a
:class:`Settings`: a pydantic model that rejects unknown keys, with types and ranges declared
on the fields. Whatever pydantic reports is turned into a :class:`ConfigError` whose message
names the dotted key and what is allowed::

    partition.ratio=1.5 must be in (0, 1]: the fraction of mask entries kept dynamic ...
    unknown config key train.stepz: the keys of train are steps, epochs, ...

Strictness: integers and booleans must be YAML integers and booleans (``1.5``, ``true`` and
``"2"`` are not integers; ``1`` is not ``true``); numbers also accept strings such as ``1e-3``,
which YAML 1.1 reads as text.
"""
from __future__ import annotations

import types
import typing
from typing import Annotated, Any, ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple, Type, TypeVar

import annotated_types
from pydantic import BaseModel, BeforeValidator, ConfigDict, Strict, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from .errors import InputError


def _not_a_bool(value: Any) -> Any:
    if isinstance(value, bool):  # pydantic would read true as 1.0
        raise PydanticCustomError("float_type", "Input should be a valid number")
    return value


Int = Annotated[int, Strict()]
Bool = Annotated[bool, Strict()]
Float = Annotated[float, BeforeValidator(_not_a_bool)]

S = TypeVar("S", bound="Settings")


class ConfigError(InputError):
    """A setting a run cannot use; the message names the dotted key, what is allowed, and the fix."""


class FieldError(ValueError):
    """Raised by a model-level validator about one of its fields: becomes ``<section>.<field>=<value> <why>``."""

    def __init__(self, field: str, value: Any, why: str) -> None:
        super().__init__(f"{field}={value!r} {why}")
        self.field, self.value, self.why = field, value, why


class Settings(BaseModel):
    """A config section: unknown keys are errors, and every error is a :class:`ConfigError`.

    ``section`` is the section's dotted key in a run config (``partition``, ``extra.vision``):
    pydantic validates a nested section through its ``__init__`` (it is custom), so errors name
    the full key whether a section is built on its own or inside a run config.
    """

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    section: ClassVar[str] = ""

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as err:
            raise config_error(err, type(self), self.section) from None

    @classmethod
    def parse(cls: Type[S], values: Any, where: Optional[str] = None) -> S:
        """Validate ``values`` (a mapping, or None for all defaults) as the section at ``where``."""
        where = cls.section if where is None else where
        if values is None:
            values = {}
        if not isinstance(values, Mapping):
            raise ConfigError(f"{where or 'config'}: expected a mapping of settings, got {values!r}")
        try:
            return cls.model_validate(dict(values))
        except ValidationError as err:
            raise config_error(err, cls, where) from None


def config_error(err: ValidationError, model: Type[BaseModel], prefix: str = "") -> ConfigError:
    """One :class:`ConfigError` for everything ``err`` lists, each line naming its dotted key."""
    lines = [describe(e, model, prefix) for e in err.errors(include_url=False)]
    if len(lines) == 1:
        return ConfigError(lines[0])
    return ConfigError(f"{len(lines)} config errors:\n  " + "\n  ".join(lines))


def dotted(prefix: str, loc: Sequence[Any]) -> str:
    key = prefix
    for part in loc:
        key = f"{key}[{part}]" if isinstance(part, int) else (f"{key}.{part}" if key else str(part))
    return key


TYPE_WORDS = {"int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
              "bool_type": "true or false", "bool_parsing": "true or false", "float_type": "a number",
              "float_parsing": "a number", "string_type": "a string", "model_type": "a mapping of settings",
              "model_attributes_type": "a mapping of settings", "dict_type": "a mapping",
              "list_type": "a list", "tuple_type": "a list"}
BOUNDS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


def describe(e: Dict[str, Any], model: Type[BaseModel], prefix: str) -> str:
    loc, kind, value = tuple(e["loc"]), e["type"], e.get("input")
    key = dotted(prefix, loc)
    info, parent = field_at(model, loc)
    if kind == "extra_forbidden":
        where = dotted(prefix, loc[:-1])
        names = ", ".join(parent.model_fields) if parent is not None else "?"
        return f"unknown config key {key}: the keys of {where or 'the run config'} are {names}"
    if kind == "missing":
        return f"{key} is required"
    if kind in TYPE_WORDS:
        return f"{key}: expected {TYPE_WORDS[kind]}, got {value!r}"
    hint = f": {info.description}" if info is not None and info.description else ""
    if kind in BOUNDS:
        return f"{key}={value!r} must be {allowed_range(info, e.get('ctx', {}))}{hint}"
    if kind == "literal_error":
        return f"{key}={value!r} is not one of {choices(info, e)}{hint}"
    if kind in ("too_short", "too_long"):
        return f"{key}: expected {allowed_length(info, e.get('ctx', {}))} values, got {value!r}{hint}"
    if kind == "value_error":
        cause = e.get("ctx", {}).get("error")
        if isinstance(cause, ConfigError):  # a nested section's own __init__ already named its keys
            return str(cause)
        if isinstance(cause, FieldError):
            return f"{dotted(prefix, loc + (cause.field,))}={cause.value!r} {cause.why}"
        if info is not None and section_model(info) is None:  # a field validator
            return f"{key}={value!r} {cause}"
        return f"{key}: {cause}" if key else str(cause)  # a section's own validator
    return f"{key}: {e['msg']}"


def field_at(model: Type[BaseModel], loc: Sequence[Any]) -> Tuple[Optional[FieldInfo], Optional[Type[BaseModel]]]:
    """(the field ``loc`` ends at, the model that holds it); None for list items and mapping keys.

    For an unknown key the field is None and the model is the one it is not a key of.
    """
    info: Optional[FieldInfo] = None
    parent: Optional[Type[BaseModel]] = None
    current: Optional[Type[BaseModel]] = model
    for part in loc:
        if isinstance(part, int) and info is not None:  # an item of a list / tuple field
            info, current = item_field(info, part), None
            continue
        if current is None or not isinstance(part, str):
            return None, None
        parent, info = current, current.model_fields.get(part)
        if info is None:
            return None, parent
        current = section_model(info)
    return info, parent


def item_field(info: FieldInfo, index: int) -> Optional[FieldInfo]:
    """The declared type of item ``index`` of a list or tuple field (its own constraints)."""
    for a in _unwrap(info.annotation):
        args = typing.get_args(a)
        if typing.get_origin(a) in (list, tuple) and args:
            item = args[0] if len(args) == 1 or args[-1] is Ellipsis else args[min(index, len(args) - 1)]
            return FieldInfo.from_annotation(item)
    return None


def section_model(info: FieldInfo) -> Optional[Type[BaseModel]]:
    """The model class a field holds (a nested section), or None for a plain value."""
    return next((a for a in _unwrap(info.annotation) if isinstance(a, type) and issubclass(a, BaseModel)), None)


def _unwrap(annotation: Any) -> List[Any]:
    """The alternatives of ``Optional[X]`` / ``Union[X, Y]`` (one entry otherwise)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(annotation) if a is not type(None)]
    return [annotation]


def allowed_range(info: Optional[FieldInfo], ctx: Dict[str, Any]) -> str:
    bounds: Dict[str, Any] = dict(ctx)
    is_int = False
    if info is not None:
        for m in info.metadata:
            for name in ("gt", "ge", "lt", "le"):
                if isinstance(m, getattr(annotated_types, name.capitalize())):
                    bounds[name] = getattr(m, name)
        is_int = int in _unwrap(info.annotation) or any(
            typing.get_origin(a) is Annotated and typing.get_args(a)[0] is int for a in _unwrap(info.annotation))
    low = ("(", bounds["gt"]) if "gt" in bounds else ("[", bounds["ge"]) if "ge" in bounds else None
    high = (")", bounds["lt"]) if "lt" in bounds else ("]", bounds["le"]) if "le" in bounds else None
    if low and high:
        return f"in {low[0]}{low[1]}, {high[1]}{high[0]}"
    op, bound = ({"(": ">", "[": ">="}[low[0]], low[1]) if low else ({")": "<", "]": "<="}[high[0]], high[1])
    return f"{'an integer ' if is_int else ''}{op} {bound}"


def allowed_length(info: Optional[FieldInfo], ctx: Dict[str, Any]) -> str:
    low, high = ctx.get("min_length"), ctx.get("max_length")
    for m in info.metadata if info is not None else ():
        low = m.min_length if isinstance(m, annotated_types.MinLen) else low
        high = m.max_length if isinstance(m, annotated_types.MaxLen) else high
    if low is not None and high is not None:
        return f"{low} to {high}"
    return f"at least {low}" if low is not None else f"at most {high}"


def choices(info: Optional[FieldInfo], e: Dict[str, Any]) -> str:
    if info is not None:
        for a in _unwrap(info.annotation):
            if typing.get_origin(a) is typing.Literal:
                return ", ".join(str(c) for c in typing.get_args(a))
    return str(e.get("ctx", {}).get("expected", "the allowed values"))
