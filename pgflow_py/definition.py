"""Flow and step definitions: pure data, validation, shape and JSON (cattrs)."""

from __future__ import annotations

import contextvars
import json
import re
import reprlib
from collections.abc import Iterable, Mapping
from typing import Any, Literal, TypedDict

import attrs
import cattrs

from . import _json
from .conditions import SKIP_MODES, SkipMode
from .errors import DefinitionError

__all__ = (
    "FLOW_DEFAULTS",
    "STEP_DEFAULTS",
    "FlowDefinition",
    "FlowOptions",
    "StepDefinition",
    "StepOptions",
    "StepType",
    "validate_slug",
)

StepType = Literal["single", "map"]
Isolation = Literal["thread", "process"]
"""How a sync handler runs: in a worker thread, or in a child process that can be killed."""
FlowKind = Literal["job", "flow"]
Backoff = Literal["exponential", "fixed"]


class FlowOptions(TypedDict, total=False):
    """The options of a flow or job that its definition keeps (``pf.flow``, ``@pf.job``; the
    hooks ``on_failure``/``on_dead`` stay with the code)."""

    max_attempts: int
    base_delay: float
    timeout: float
    backoff: Backoff
    max_delay: float
    jitter: bool
    cron: str | None
    cron_input: Any
    concurrency: int | None
    isolation: Isolation


FLOW_DEFAULTS: FlowOptions = {
    # PgFlow.Job's defaults. Declared once: FlowDefinition's fields take them, ``Flow`` merges
    # them with what it is given, and a test checks the keywords of pf.flow and pf.job.
    "max_attempts": 1,
    "base_delay": 1.0,
    "timeout": 30.0,
    "backoff": "exponential",
    "max_delay": 3600.0,
    "jitter": False,
    "cron": None,
    "cron_input": None,
    "concurrency": None,
    "isolation": "thread",
}


class StepOptions(TypedDict, total=False):
    """The options of a step (``.step()``, ``.map()``; the condition options on ``@pf.job``
    too). ``None`` for ``max_attempts``, ``base_delay``, ``timeout`` or ``isolation`` means
    the flow's value."""

    max_attempts: int | None
    base_delay: float | None
    timeout: float | None
    start_delay: float
    isolation: Isolation | None
    if_: dict[str, Any] | None
    if_not: dict[str, Any] | None
    when_unmet: SkipMode
    when_exhausted: SkipMode


STEP_DEFAULTS: StepOptions = {
    # Declared once, as FLOW_DEFAULTS: StepDefinition's fields take them, and a test checks
    # the keywords of .step(), .map() and pf.job (its condition options).
    "max_attempts": None,
    "base_delay": None,
    "timeout": None,
    "start_delay": 0.0,
    "isolation": None,
    "if_": None,
    "if_not": None,
    "when_unmet": "skip",
    "when_exhausted": "fail",
}

_SLUG_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_RESERVED_SLUGS = frozenset({"run"})
MAX_SLUG_LENGTH = 128


def validate_slug(slug: object, what: str = "slug") -> str:
    """Return ``slug`` if it is a valid flow or step slug, else raise :class:`DefinitionError`."""
    if not isinstance(slug, str):
        raise DefinitionError(f"{what} must be a string, got {type(slug).__name__}: {slug!r}")
    if len(slug) > MAX_SLUG_LENGTH:
        raise DefinitionError(
            f"{what} {slug[:20]!r}... is {len(slug)} characters long; the limit is {MAX_SLUG_LENGTH}"
        )
    if not _SLUG_RE.fullmatch(slug):
        raise DefinitionError(
            f"{what} {slug!r} is invalid: use letters, digits and underscores, "
            "not starting with a digit (pattern ^[a-zA-Z_][a-zA-Z0-9_]*$)"
        )
    if slug in _RESERVED_SLUGS:
        raise DefinitionError(f"{what} {slug!r} is reserved; choose another name")
    return slug


YEAR = 365 * 24 * 3600


@attrs.frozen
class OptionRange:
    """The values a numeric option accepts: ``low`` to ``high`` (``low`` itself unless ``above``)."""

    low: int
    high: int
    integer: bool = False
    above: bool = False
    hint: str = ""

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a finite number of seconds"
        return f"{kind} {'>' if self.above else '>='} {self.low} and <= {self.high}{self.hint}"

    def admits(self, value: object) -> bool:
        if isinstance(value, bool) or not isinstance(value, int if self.integer else (int, float)):
            return False
        try:
            number = float(value)
        except OverflowError:
            return False
        # NaN fails every comparison, infinity the upper bound.
        low_ok = number > self.low if self.above else number >= self.low
        return low_ok and number <= self.high


OPTION_RANGES: dict[str, OptionRange] = {
    # Bounded so that every accepted value can be served: deadlines and due times stay
    # representable datetimes, and counts fit a 32-bit database column.
    "max_attempts": OptionRange(1, 1_000_000, integer=True, hint=" (1 = no retry)"),
    "concurrency": OptionRange(1, 1_000_000, integer=True, hint=" (or None for no limit)"),
    "timeout": OptionRange(0, YEAR, above=True, hint=" (one year)"),
    "base_delay": OptionRange(0, 10 * YEAR, hint=" (ten years)"),
    "max_delay": OptionRange(0, 10 * YEAR, hint=" (ten years)"),
    "start_delay": OptionRange(0, 10 * YEAR, hint=" (ten years)"),
}
"""Every numeric option of flows and steps, declared once."""

CONDITION_OPTIONS: tuple[str, ...] = ("if_", "if_not", "when_unmet", "when_exhausted")
"""The step options of conditional execution (pgflow 0.14), also taken by ``@pf.job``."""


def _pattern_text(pattern: object) -> str:
    return "" if pattern is None else json.dumps(pattern, sort_keys=True)


def check_conditions(
    where: str, *, if_: object, if_not: object, when_unmet: object, when_exhausted: object
) -> None:
    """Check a step's condition options; raise :class:`DefinitionError` naming the fix."""
    for name, pattern in (("if_", if_), ("if_not", if_not)):
        if pattern is None:
            continue
        if not isinstance(pattern, dict):
            raise DefinitionError(
                f"{where}: {name} must be a JSON object pattern such as {{\"plan\": \"premium\"}} "
                f"(matched against the step's input with PostgreSQL's @>), "
                f"got {type(pattern).__name__}: {reprlib.repr(pattern)}"
            )
        try:
            text = _json.dumps(pattern)
        except (TypeError, ValueError) as exc:
            raise DefinitionError(
                f"{where}: {name} must be JSON (dicts with string keys, lists, str, numbers, "
                f"bools, None): {exc}"
            ) from None
        if _json.loads(text) != pattern:
            raise DefinitionError(
                f"{where}: {name} does not survive a JSON round trip ({reprlib.repr(pattern)} "
                "reads back differently); use string keys, lists rather than tuples, and "
                "plain JSON values"
            )
    for name, mode in (("when_unmet", when_unmet), ("when_exhausted", when_exhausted)):
        if mode not in SKIP_MODES:
            raise DefinitionError(
                f"{where}: {name} must be one of {', '.join(map(repr, SKIP_MODES))}, "
                f"got {mode!r}"
            )


_INHERITED = frozenset({"max_attempts", "base_delay", "timeout"})
"""Step options whose ``None`` means "the flow's value"."""


_reading_stored: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "_reading_stored", default=False
)


def check_options(where: str, *, allow_none: bool = False, **options: object) -> None:
    """Check numeric options against :data:`OPTION_RANGES`; raise :class:`DefinitionError`.

    With ``allow_none`` (step options) ``None`` means "inherit" for the options a step inherits;
    ``concurrency=None`` always means no limit.
    """
    if _reading_stored.get():
        return  # written by an earlier version, whose bounds may have been wider
    for name, value in options.items():
        if value is None and (name == "concurrency" or (allow_none and name in _INHERITED)):
            continue
        rule = OPTION_RANGES[name]
        if not rule.admits(value):
            raise DefinitionError(f"{where}: {name} must be {rule.describe()}, got {reprlib.repr(value)}")


@attrs.frozen
class StepDefinition:
    """One step of a flow. Options left ``None`` inherit the flow's value."""

    slug: str
    step_type: StepType = "single"
    depends_on: tuple[str, ...] = ()
    max_attempts: int | None = STEP_DEFAULTS["max_attempts"]
    base_delay: float | None = STEP_DEFAULTS["base_delay"]
    timeout: float | None = STEP_DEFAULTS["timeout"]
    start_delay: float = STEP_DEFAULTS["start_delay"]
    isolation: Isolation | None = STEP_DEFAULTS["isolation"]
    handler: str | None = None
    """Import path ``module:qualname`` of the handler, used by runners started with ``flows=None``."""
    if_: dict[str, Any] | None = STEP_DEFAULTS["if_"]
    """Run only if the step's input (the flow input of a root step, ``{dep: output}`` of a
    dependent one) contains this JSON pattern, as PostgreSQL's ``@>``."""
    if_not: dict[str, Any] | None = STEP_DEFAULTS["if_not"]
    """Run only if the step's input does not contain this pattern."""
    when_unmet: SkipMode = STEP_DEFAULTS["when_unmet"]
    """What an unmet condition does: ``fail`` the run, ``skip`` the step, or ``skip-cascade``."""
    when_exhausted: SkipMode = STEP_DEFAULTS["when_exhausted"]
    """What a step whose last attempt failed does: ``fail`` the run, ``skip``, ``skip-cascade``."""

    @property
    def conditional(self) -> bool:
        return self.if_ is not None or self.if_not is not None

    def shape(self) -> tuple[str, str, tuple[str, ...], tuple[str, str, str, str]]:
        return (
            self.slug, self.step_type, tuple(sorted(self.depends_on)),
            (_pattern_text(self.if_), _pattern_text(self.if_not), self.when_unmet,
             self.when_exhausted),
        )


@attrs.frozen
class FlowDefinition:
    """A flow: its slug, flow-level options and its steps in topological order.

    A job is a flow of ``kind="job"`` with exactly one step; its run output is that step's output.
    """

    slug: str
    steps: tuple[StepDefinition, ...]
    kind: FlowKind = "flow"
    max_attempts: int = FLOW_DEFAULTS["max_attempts"]
    base_delay: float = FLOW_DEFAULTS["base_delay"]
    timeout: float = FLOW_DEFAULTS["timeout"]
    backoff: Backoff = FLOW_DEFAULTS["backoff"]
    max_delay: float = FLOW_DEFAULTS["max_delay"]
    jitter: bool = FLOW_DEFAULTS["jitter"]
    cron: str | None = FLOW_DEFAULTS["cron"]
    """A 5-field cron expression (UTC): runners serving the flow start one run per tick."""
    cron_input: Any = FLOW_DEFAULTS["cron_input"]
    concurrency: int | None = FLOW_DEFAULTS["concurrency"]
    """At most this many tasks of the flow run at once, across all runners."""
    isolation: Isolation = FLOW_DEFAULTS["isolation"]

    def __attrs_post_init__(self) -> None:
        validate_definition(self)

    # --- derived views -------------------------------------------------------------------------

    def step(self, slug: str) -> StepDefinition:
        for step in self.steps:
            if step.slug == slug:
                return step
        raise KeyError(slug)

    @property
    def step_slugs(self) -> tuple[str, ...]:
        return tuple(s.slug for s in self.steps)

    @property
    def root_steps(self) -> tuple[StepDefinition, ...]:
        return tuple(s for s in self.steps if not s.depends_on)

    @property
    def leaf_steps(self) -> tuple[StepDefinition, ...]:
        used = {d for s in self.steps for d in s.depends_on}
        return tuple(s for s in self.steps if s.slug not in used)

    def dependents(self, slug: str) -> tuple[StepDefinition, ...]:
        return tuple(s for s in self.steps if slug in s.depends_on)

    def effective(self, slug: str) -> EffectiveOptions:
        step = self.step(slug)
        return EffectiveOptions(
            max_attempts=step.max_attempts if step.max_attempts is not None else self.max_attempts,
            base_delay=step.base_delay if step.base_delay is not None else self.base_delay,
            timeout=step.timeout if step.timeout is not None else self.timeout,
            start_delay=step.start_delay,
            backoff=self.backoff,
            max_delay=self.max_delay,
            jitter=self.jitter,
            isolation=step.isolation if step.isolation is not None else self.isolation,
        )

    def shape(self) -> tuple[str, tuple[tuple[str, str, tuple[str, ...], tuple[str, ...]], ...]]:
        """What must not change while runs are unfinished: kind, steps, types, dependencies,
        conditions and skip modes."""
        return (self.kind, tuple(sorted(s.shape() for s in self.steps)))

    def shape_differences(self, other: FlowDefinition) -> list[str]:
        """Human-readable differences in shape between ``self`` (new) and ``other`` (stored)."""
        diffs: list[str] = []
        if self.kind != other.kind:
            diffs.append(f"it was a {other.kind} and is now a {self.kind}")
        old = {s.slug: s for s in other.steps}
        new = {s.slug: s for s in self.steps}
        for slug in sorted(old.keys() - new.keys()):
            diffs.append(f"step {slug!r} was removed")
        for slug in sorted(new.keys() - old.keys()):
            diffs.append(f"step {slug!r} was added")
        for slug in sorted(old.keys() & new.keys()):
            o, n = old[slug], new[slug]
            if o.step_type != n.step_type:
                diffs.append(f"step {slug!r} changed type from {o.step_type} to {n.step_type}")
            if sorted(o.depends_on) != sorted(n.depends_on):
                diffs.append(
                    f"step {slug!r} now depends on {sorted(n.depends_on)} "
                    f"instead of {sorted(o.depends_on)}"
                )
            for option in CONDITION_OPTIONS:
                before, after = getattr(o, option), getattr(n, option)
                if before != after:
                    diffs.append(f"step {slug!r} changed {option} from {before!r} to {after!r}")
        return diffs

    # --- JSON ----------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return _converter.unstructure(self)  # type: ignore[no-any-return]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FlowDefinition:
        try:
            return _converter.structure(data, cls)
        except DefinitionError:
            raise
        except Exception as exc:
            raise DefinitionError(f"invalid flow definition data: {exc!r}") from exc

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> FlowDefinition:
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_stored_json(cls, text: str) -> FlowDefinition:
        """A definition as the store keeps it: every rule is checked but the options' ranges,
        so a definition stored before they were narrowed can still be read, replaced by
        ``register`` and served by the code's (checked) options."""
        token = _reading_stored.set(True)
        try:
            return cls.from_json(text)
        finally:
            _reading_stored.reset(token)


@attrs.frozen
class EffectiveOptions:
    """A step's options after inheriting from its flow."""

    max_attempts: int
    base_delay: float
    timeout: float
    start_delay: float
    backoff: Backoff
    max_delay: float
    jitter: bool
    isolation: Isolation = "thread"


# Without detailed validation the DefinitionError of __attrs_post_init__ surfaces unwrapped.
_converter = cattrs.Converter(forbid_extra_keys=True, detailed_validation=False)


def topological_order(steps: Iterable[StepDefinition], flow_slug: str) -> tuple[StepDefinition, ...]:
    """Order steps so each comes after its dependencies, keeping declaration order otherwise.

    Raises :class:`DefinitionError` for duplicates, unknown dependencies and cycles.
    """
    steps = list(steps)
    by_slug: dict[str, StepDefinition] = {}
    for step in steps:
        if step.slug in by_slug:
            raise DefinitionError(f"flow {flow_slug!r}: step {step.slug!r} is defined twice")
        by_slug[step.slug] = step
    for step in steps:
        for dep in step.depends_on:
            if dep not in by_slug:
                raise DefinitionError(
                    f"flow {flow_slug!r}: step {step.slug!r} depends on unknown step {dep!r}; "
                    f"known steps: {sorted(by_slug)}"
                )
    ordered: list[StepDefinition] = []
    placed: set[str] = set()
    remaining = list(steps)
    while remaining:
        # Stable: always take the earliest-declared step whose dependencies are placed.
        ready = next((s for s in remaining if all(d in placed for d in s.depends_on)), None)
        if ready is None:
            raise DefinitionError(
                f"flow {flow_slug!r}: dependency cycle among steps "
                f"{sorted(s.slug for s in remaining)}"
            )
        ordered.append(ready)
        placed.add(ready.slug)
        remaining.remove(ready)
    return tuple(ordered)


def validate_flow_options(slug: object, options: Mapping[str, Any]) -> None:
    """Check a flow's slug and flow-level options (usable before any step exists); options
    not given have their defaults (:data:`FLOW_DEFAULTS`)."""
    validate_slug(slug, "flow slug")
    where = f"flow {slug!r}"
    unknown = sorted(set(options) - set(FLOW_DEFAULTS))
    if unknown:
        raise TypeError(f"{where}: unknown option(s) {unknown}; the options are {list(FLOW_DEFAULTS)}")
    o: dict[str, Any] = {**FLOW_DEFAULTS, **options}
    backoff, jitter, isolation = o["backoff"], o["jitter"], o["isolation"]
    cron, cron_input = o["cron"], o["cron_input"]
    check_options(
        where, max_attempts=o["max_attempts"], base_delay=o["base_delay"], timeout=o["timeout"],
        max_delay=o["max_delay"], concurrency=o["concurrency"],
    )
    if backoff not in ("exponential", "fixed"):
        raise DefinitionError(f"{where}: backoff must be 'exponential' or 'fixed', got {backoff!r}")
    if not isinstance(jitter, bool):
        raise DefinitionError(f"{where}: jitter must be True or False, got {jitter!r}")
    check_isolation(isolation, where, allow_none=False)
    if cron is not None:
        validate_cron(cron, where)
        try:
            _json.dumps(cron_input)
        except (TypeError, ValueError) as exc:
            raise DefinitionError(f"{where}: cron_input must be JSON-serializable: {exc}") from None
    elif cron_input is not None:
        raise DefinitionError(f"{where}: cron_input is set but cron is not; add cron='...'")


def check_isolation(isolation: object, where: str, *, allow_none: bool) -> None:
    if isolation is None and allow_none:
        return
    if isolation not in ("thread", "process"):
        raise DefinitionError(f"{where}: isolation must be 'thread' or 'process', got {isolation!r}")


def validate_cron(expression: object, where: str) -> str:
    """Check a 5-field cron expression with croniter."""
    from croniter import croniter

    if not isinstance(expression, str) or len(expression.split()) != 5 or not croniter.is_valid(
        expression
    ):
        raise DefinitionError(
            f"{where}: cron must be a 5-field cron expression such as '*/5 * * * *' "
            f"(minute hour day month weekday, UTC), got {expression!r}"
        )
    return expression


def validate_definition(defn: FlowDefinition) -> None:
    """Check every rule of a flow definition; raise :class:`DefinitionError` on the first broken."""
    validate_flow_options(defn.slug, {name: getattr(defn, name) for name in FLOW_DEFAULTS})
    where = f"flow {defn.slug!r}"
    if not defn.steps:
        raise DefinitionError(f"{where} has no steps; add one with @flow.step()")
    if defn.kind == "job" and len(defn.steps) != 1:
        raise DefinitionError(f"job {defn.slug!r} must have exactly one step, has {len(defn.steps)}")
    for step in defn.steps:
        validate_slug(step.slug, f"{where}: step slug")
        swhere = f"{where}, step {step.slug!r}"
        if step.step_type not in ("single", "map"):
            raise DefinitionError(f"{swhere}: step_type must be 'single' or 'map'")
        check_options(
            swhere,
            max_attempts=step.max_attempts,
            base_delay=step.base_delay,
            timeout=step.timeout,
            start_delay=step.start_delay,
            allow_none=True,
        )
        check_isolation(step.isolation, swhere, allow_none=True)
        check_conditions(
            swhere, if_=step.if_, if_not=step.if_not, when_unmet=step.when_unmet,
            when_exhausted=step.when_exhausted,
        )
        if len(set(step.depends_on)) != len(step.depends_on):
            raise DefinitionError(f"{swhere}: depends_on lists a step twice: {list(step.depends_on)}")
        if step.slug in step.depends_on:
            raise DefinitionError(f"{where}: dependency cycle: step {step.slug!r} depends on itself")
        if step.step_type == "map" and len(step.depends_on) > 1:
            raise DefinitionError(
                f"{swhere}: a map step takes its array from at most one step, "
                f"but depends on {list(step.depends_on)}"
            )
    topological_order(defn.steps, defn.slug)
    seen: set[str] = set()
    for step in defn.steps:
        late = [d for d in step.depends_on if d not in seen]
        if late:
            raise DefinitionError(
                f"{where}: steps must be listed in topological order, but step {step.slug!r} "
                f"comes before its dependencies {late}"
            )
        seen.add(step.slug)
