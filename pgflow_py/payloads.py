"""Typed payloads: a handler's annotations say what its input and output are.

A handler's first parameter annotated with an attrs class, a dataclass, a ``TypedDict`` or any
other type cattrs can structure receives the stored JSON structured into that type; a return
annotation of such a type has the output unstructured back to JSON. Annotations are read once,
when the step is decorated (:func:`payloads_of`). Handlers unannotated or annotated ``Any``,
``object``, ``dict`` or ``list`` of those get the JSON value itself, at no cost.

One cattrs converter does the work: :data:`converter` (``pf.converter``), cattrs' JSON preset
(datetimes as ISO 8601 strings, enums by value) made strict about JSON scalars (a ``str`` field
refuses ``123`` instead of turning it into ``"123"``). Register hooks on it for other types.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Final

import attrs
import cattrs
from cattrs.errors import StructureHandlerNotFoundError
from cattrs.preconf.json import make_converter
from cattrs.v import format_exception as _cattrs_format_exception

from .errors import DefinitionError, InputError

__all__ = ("Payloads", "converter", "describe_structure_error", "payloads_of")


_JSON_NAMES: Final = {
    type(None): "null", bool: "bool", int: "int", float: "float", str: "str", list: "array",
    dict: "object",
}


def _json_type(value: object) -> str:
    return _JSON_NAMES.get(type(value), type(value).__name__)


class _Mismatch(TypeError):
    """A JSON scalar of the wrong type, reported as ``expected X, got Y``."""


def _strict(expected: type, accepted: tuple[type, ...]) -> Callable[[Any, type], Any]:
    def structure(value: Any, cl: type) -> Any:
        if cl is not expected:  # a subclass (str and int enums): built from the value, as cattrs does
            return cl(value)
        if type(value) in accepted:
            return expected(value) if type(value) is not expected else value
        raise _Mismatch(f"expected {expected.__name__}, got {_json_type(value)} {value!r}")

    return structure


def _make_converter() -> cattrs.Converter:
    made = make_converter()
    # cattrs calls str(), int(), float(), bool() on scalars: 123 would become "123" and "false"
    # True. A payload that does not say what the handler declared is refused instead.
    made.register_structure_hook(str, _strict(str, (str,)))
    made.register_structure_hook(int, _strict(int, (int,)))
    made.register_structure_hook(float, _strict(float, (float, int)))
    made.register_structure_hook(bool, _strict(bool, (bool,)))
    return made


converter: Final[cattrs.Converter] = _make_converter()
"""The converter of every typed handler's input and output, and of attrs classes and dataclasses
handed to ``store.start``. Register hooks on it for types cattrs does not know (``Decimal``...)
or to change how a type is written: ``pf.converter.register_structure_hook(Decimal, ...)``."""


@attrs.frozen
class Payloads:
    """How one handler's values cross the JSON boundary: ``None`` types pass values through."""

    where: str
    input_type: Any = None
    output_type: Any = None

    def structure(self, value: Any) -> Any:
        """The JSON ``value`` as the handler's input type; :class:`InputError` if it does not fit
        (one line naming each bad field; cattrs' detail is the error's ``__cause__``)."""
        tp = self.input_type
        if tp is None:
            return value
        if type(value) is not dict and _is_record(tp):
            raise InputError(
                f"{self.where}: the input does not fit {_type_name(tp)}: expected an object, "
                f"got {_json_type(value)}"
            )
        try:
            return converter.structure(value, tp)
        except Exception as exc:
            raise InputError(
                f"{self.where}: the input does not fit {_type_name(tp)}: "
                f"{describe_structure_error(exc, tp)}"
            ) from exc

    def unstructure(self, output: Any) -> Any:
        """The handler's output as JSON-ready data (by its runtime type, so a handler that
        returns a plain dict where it promised a class still has it stored)."""
        if self.output_type is None:
            return output
        return converter.unstructure(output)

    def output(self, value: Any) -> Any:
        """A stored (JSON) output as the handler's output type: what ``perform`` returns, so its
        result is what the handler returned after the runtime's round trip."""
        tp = self.output_type
        if tp is None:
            return value
        try:
            return converter.structure(value, tp)
        except Exception as exc:
            raise TypeError(
                f"{self.where}: the output, once stored, does not fit the return annotation "
                f"{_type_name(tp)}: {describe_structure_error(exc, tp)}"
            ) from exc


def payloads_of(fn: Callable[..., Any], where: str) -> Payloads | None:
    """Read ``fn``'s input and output annotations; ``None`` when both pass JSON through.

    Raises :class:`DefinitionError` when an annotation names something that cannot be found
    (a class defined inside a function, under ``from __future__ import annotations``).
    """
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins and C callables have none: untyped
        return None
    positional = [
        p for p in signature.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if positional:
        first = positional[0]
        input_type = _resolve(first.annotation, fn, where, f"the input's annotation ({first.name})")
    else:
        input_type = inspect.Parameter.empty
    output_type = _resolve(signature.return_annotation, fn, where, "the return annotation")
    kept_input = None if _passes_input(input_type) else input_type
    kept_output = None if _passes_output(output_type) else output_type
    if kept_input is None and kept_output is None:
        return None
    return Payloads(where, kept_input, kept_output)


def _resolve(annotation: Any, fn: Callable[..., Any], where: str, what: str) -> Any:
    if annotation is inspect.Parameter.empty or not isinstance(annotation, str):
        return annotation
    target = inspect.unwrap(fn)
    module = sys.modules.get(getattr(target, "__module__", None) or "")  # a callable object's
    globalns = getattr(target, "__globals__", None) or (vars(module) if module else {})
    holder = types.SimpleNamespace(__annotations__={"value": annotation})
    try:
        return typing.get_type_hints(holder, globalns)["value"]
    except Exception as exc:
        raise DefinitionError(
            f"{where}: {what} {annotation!r} cannot be resolved ({type(exc).__name__}: {exc}); "
            "define the type at module level (a class defined inside a function cannot be found "
            "from a string annotation, as 'from __future__ import annotations' makes them)"
        ) from None


_PASS_THROUGH: Final = (Any, object, dict, list, Mapping, inspect.Parameter.empty)
_JSON_SCALARS: Final = (str, int, float, bool, None, type(None))


def _passes_input(tp: Any) -> bool:
    """Whether JSON values need no structuring to be of type ``tp`` as far as the handler
    declared it: no annotation, ``Any``, ``object``, ``dict``/``list`` of those."""
    if any(tp is plain for plain in _PASS_THROUGH):
        return True
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (dict, Mapping) and len(args) == 2:
        return (args[0] is str or args[0] is Any) and _passes_input(args[1])
    if origin is list and len(args) == 1:
        return _passes_input(args[0])
    return False


def _passes_output(tp: Any) -> bool:
    """Whether an output of type ``tp`` is JSON already (then it is encoded as untyped ones)."""
    if _passes_input(tp) or any(tp is scalar for scalar in _JSON_SCALARS):
        return True
    origin = typing.get_origin(tp)
    if origin in (dict, Mapping, list):
        return all(_passes_output(arg) for arg in typing.get_args(tp))
    return False


def _is_record(tp: Any) -> bool:
    return isinstance(tp, type) and (
        attrs.has(tp) or dataclasses.is_dataclass(tp) or typing.is_typeddict(tp)
    )


def _type_name(tp: Any) -> str:
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__qualname__
    return repr(tp).replace("typing.", "")


def _format(exc: BaseException, tp: type | None) -> str:
    if isinstance(exc, _Mismatch):
        return str(exc)
    if isinstance(exc, StructureHandlerNotFoundError):
        name = _type_name(exc.type_)
        return (
            f"no cattrs hook structures {name}: register one with "
            f"pf.converter.register_structure_hook({name}, ...)"
        )
    if isinstance(exc, NameError):  # a string annotation naming what its module does not hold
        return f"an annotation cannot be resolved ({exc})"
    return _cattrs_format_exception(exc, tp)


def describe_structure_error(exc: BaseException, tp: Any) -> str:
    """cattrs' (possibly nested) structuring error as one line: ``field: what was wrong; ...``."""
    lines = cattrs.transform_error(exc, path="$", format_exception=_format)
    parts = []
    for line in lines:
        message, _, path = line.rpartition(" @ ")
        if not message:
            message, path = line, "$"
        field = path[2:] if path.startswith("$.") else path.removeprefix("$")
        parts.append(f"{field}: {message}" if field else message)
    return "; ".join(parts)
