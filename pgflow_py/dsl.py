"""The decorators: ``@job``, ``@perform``, ``flow()``, ``.step()``, ``.map()``.

They build :class:`FlowDefinition` objects and keep the handler callables beside them. Nothing
here touches the store or the runtime: defining a flow performs no I/O.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Generator, Iterable, Mapping, Sequence
from typing import Any, Generic, Literal, Protocol, cast, overload

import attrs
from typing_extensions import TypeVar

from . import _json
from .conditions import CONDITION_NOT_MET, SkipMode, condition_met
from .context import Context
from .definition import (
    CONDITION_OPTIONS,
    FLOW_DEFAULTS,
    STEP_DEFAULTS,
    EffectiveOptions,
    FlowDefinition,
    Isolation,
    StepDefinition,
    StepType,
    check_conditions,
    check_options,
    validate_flow_options,
    validate_slug,
)
from .errors import DefinitionError, InputError, PgflowError
from .payloads import Payloads, payloads_of

__all__ = ("Flow", "Hook", "Job", "MapStep", "Step", "distinct_flows", "flow", "job", "perform")

Handler = Callable[..., Any]
Hook = Callable[[Context, BaseException], Any]
F = TypeVar("F", bound=Callable[..., Any])

# Static types of payloads (pgflow_py.payloads does the run-time side): a job or step is generic
# in its handler's input and output; unannotated handlers make them Any, as does a bare `Flow`.
InputT = TypeVar("InputT", default=Any)
OutputT = TypeVar("OutputT", default=Any)
_I = TypeVar("_I")
_O = TypeVar("_O")


class _StepDecorator(Protocol):
    """What ``flow.step(...)`` returns: keeps the handler's input and output types (an async
    handler's output is what its coroutine returns)."""

    @overload
    def __call__(self, fn: Callable[[_I, Context], Awaitable[_O]], /) -> Step[_I, _O]: ...
    @overload
    def __call__(self, fn: Callable[[_I, Context], _O], /) -> Step[_I, _O]: ...


class _MapDecorator(Protocol):
    """What ``flow.map(...)`` returns: the handler takes one element."""

    @overload
    def __call__(self, fn: Callable[[_I, Context], Awaitable[_O]], /) -> MapStep[_I, _O]: ...
    @overload
    def __call__(self, fn: Callable[[_I, Context], _O], /) -> MapStep[_I, _O]: ...


class _JobDecorator(Protocol):
    """What ``job(...)`` returns."""

    @overload
    def __call__(self, fn: Callable[[_I, Context], Awaitable[_O]], /) -> Job[_I, _O]: ...
    @overload
    def __call__(self, fn: Callable[[_I, Context], _O], /) -> Job[_I, _O]: ...


_PERFORM_ATTR = "__pgflow_step_slug__"



def import_path(fn: Callable[..., Any]) -> str | None:
    """``module:qualname`` of a callable, recorded so a runner can import it later."""
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    if not module or not qualname:
        return None
    return f"{module}:{qualname}"


def _check_hook(name: str, hook: object, where: str) -> None:
    if hook is not None and not callable(hook):
        raise DefinitionError(f"{where}: {name} must be a callable (ctx, error), got {hook!r}")


def _check_isolatable(fn: Handler, where: str) -> None:
    """A handler run in a child process must be sync and importable by its recorded path."""
    if inspect.iscoroutinefunction(fn):
        raise DefinitionError(
            f"{where}: isolation='process' runs sync handlers only; this one is async "
            "(async handlers are already cancelled at their deadline)"
        )
    path = import_path(fn) or ""
    if "<locals>" in path or path.startswith("__main__:") or not path:
        raise DefinitionError(
            f"{where}: isolation='process' imports the handler in a child process, so it must "
            f"be a module-level function of an importable module, not {path or fn!r}"
        )


def _check_handler(fn: object, where: str) -> None:
    if not callable(fn):
        raise DefinitionError(f"{where}: the handler must be a function, got {fn!r}")


class Step(Generic[InputT, OutputT]):
    """A decorated step function. Calling it calls the plain function (it never enqueues).

    Generic in its handler's input (the flow input, or ``{dep: output}``) and output.
    """

    def __init__(self, flow: Flow, slug: str, fn: Handler) -> None:
        self.flow = flow
        self.slug = slug
        self.fn = fn
        self.__doc__ = getattr(fn, "__doc__", None)
        self.__wrapped__ = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<pgflow step {self.flow.slug}.{self.slug}>"


class MapStep(Step[InputT, OutputT]):
    """A decorated map step: its handler takes one element (``InputT``) and the step's input and
    output are lists of them."""


class Flow(Generic[InputT]):
    """A multi-step flow: create with :func:`flow`, add steps with :meth:`step` and :meth:`map`.

    Generic in its input for :class:`Job` (a flow's own input is not typed: ``Flow[Any]``).
    """

    def __init__(
        self,
        slug: str,
        *,
        on_failure: Hook | None = None,
        on_dead: Hook | None = None,
        _kind: Literal["job", "flow"] = "flow",
        **options: Any,
    ) -> None:
        """``options``: those of :data:`~pgflow_py.definition.FlowOptions` (see :func:`flow`);
        the others keep their defaults."""
        validate_flow_options(slug, options)
        _check_hook("on_failure", on_failure, f"flow {slug!r}")
        _check_hook("on_dead", on_dead, f"flow {slug!r}")
        self.slug = slug
        self.on_failure = on_failure
        self.on_dead = on_dead
        self._kind = _kind
        self._options: dict[str, Any] = {**FLOW_DEFAULTS, **options}
        for seconds in ("base_delay", "timeout", "max_delay"):
            self._options[seconds] = float(self._options[seconds])
        self._steps: list[StepDefinition] = []
        self._handlers: dict[str, Handler] = {}
        self._payloads: dict[str, Payloads] = {}
        self._definition: FlowDefinition | None = None

    # --- building ------------------------------------------------------------------------------

    def _add_step(
        self,
        fn: Handler,
        slug: str | None,
        step_type: StepType,
        depends_on: Sequence[str | Step],
        options: Mapping[str, Any],
    ) -> Step:
        """Add a step with ``options`` (names of :data:`~pgflow_py.definition.StepOptions`;
        those not given keep their defaults)."""
        _check_handler(fn, f"flow {self.slug!r}")
        slug = slug if slug is not None else getattr(fn, "__name__", None)
        step_slug = validate_slug(slug, f"flow {self.slug!r}: step slug")
        where = f"flow {self.slug!r}, step {step_slug!r}"
        if isinstance(depends_on, (str, Step)):
            depends_on = [depends_on]
        deps: list[str] = []
        for dep in depends_on:
            if isinstance(dep, Step):
                if dep.flow is not self:
                    raise DefinitionError(
                        f"{where}: depends on step {dep.slug!r} of another flow {dep.flow.slug!r}"
                    )
                deps.append(dep.slug)
            elif isinstance(dep, str):
                deps.append(dep)
            else:
                raise DefinitionError(
                    f"{where}: depends_on takes step slugs or decorated steps, got {dep!r}"
                )
        o: dict[str, Any] = {**STEP_DEFAULTS, **options}
        check_options(
            where, max_attempts=o["max_attempts"], base_delay=o["base_delay"],
            timeout=o["timeout"], start_delay=o["start_delay"], allow_none=True,
        )
        check_conditions(where, **{name: o[name] for name in CONDITION_OPTIONS})
        for seconds in ("base_delay", "timeout", "start_delay"):
            if o[seconds] is not None:
                o[seconds] = float(o[seconds])
        for pattern in ("if_", "if_not"):
            # A copy, so that changing the caller's dict later cannot change the definition.
            o[pattern] = _json.loads(_json.dumps(o[pattern]))
        known = {s.slug for s in self._steps}
        if step_slug in known:
            raise DefinitionError(f"flow {self.slug!r}: step {step_slug!r} is defined twice")
        unknown = [d for d in deps if d not in known]
        if unknown:
            raise DefinitionError(
                f"{where}: depends on unknown step(s) {unknown}; a step can only depend on steps "
                f"defined before it (known: {sorted(known)})"
            )
        step = StepDefinition(
            slug=step_slug, step_type=step_type, depends_on=tuple(deps), handler=import_path(fn),
            **o,
        )
        # Validate the whole flow with the new step before keeping it.
        definition = FlowDefinition(
            slug=self.slug, steps=(*self._steps, step), kind=self._kind, **self._options
        )
        if definition.effective(step_slug).isolation == "process":
            _check_isolatable(fn, where)
        payloads = payloads_of(fn, self._where(step_slug))
        if payloads is not None:
            self._payloads[step_slug] = payloads
        self._steps.append(step)
        self._handlers[step_slug] = fn
        self._definition = definition
        return (MapStep if step_type == "map" else Step)(self, step_slug, fn)

    def step(
        self,
        slug: str | None = None,
        *,
        depends_on: Sequence[str | Step] = (),
        max_attempts: int | None = None,
        base_delay: float | None = None,
        timeout: float | None = None,
        start_delay: float = 0,
        isolation: Isolation | None = None,
        if_: dict[str, Any] | None = None,
        if_not: dict[str, Any] | None = None,
        when_unmet: SkipMode = "skip",
        when_exhausted: SkipMode = "fail",
    ) -> _StepDecorator:
        """Decorate a step handler ``(input_or_deps, ctx) -> output``.

        ``if_`` / ``if_not``: JSON object patterns the step's input (the flow input of a root
        step, ``{dep: output}`` of a dependent one) must / must not contain (PostgreSQL's
        ``@>``); ``when_unmet`` (default ``"skip"``) and ``when_exhausted`` (after the last
        attempt failed; default ``"fail"``) are ``"fail"``, ``"skip"`` or ``"skip-cascade"``.
        """
        given = locals()
        options = {name: given[name] for name in STEP_DEFAULTS}
        if callable(slug):
            raise DefinitionError(
                f"flow {self.slug!r}: use @flow.step() with parentheses"
            )

        def decorate(fn: Handler) -> Step:
            return self._add_step(fn, slug, "single", depends_on, options)

        return cast(_StepDecorator, decorate)

    def map(
        self,
        slug: str | None = None,
        *,
        array: str | Step | None = None,
        max_attempts: int | None = None,
        base_delay: float | None = None,
        timeout: float | None = None,
        start_delay: float = 0,
        isolation: Isolation | None = None,
        if_: dict[str, Any] | None = None,
        if_not: dict[str, Any] | None = None,
        when_unmet: SkipMode = "skip",
        when_exhausted: SkipMode = "fail",
    ) -> _MapDecorator:
        """Decorate a map step: one task per element of ``array``'s output (or of the flow input).

        The condition options are those of :meth:`step`; a map's condition is checked against
        ``{array: output}`` (or the flow input of a root map), and a map whose ``array`` step
        was skipped runs over ``[]``.
        """
        given = locals()
        options = {name: given[name] for name in STEP_DEFAULTS}
        if callable(slug):
            raise DefinitionError(f"flow {self.slug!r}: use @flow.map() with parentheses")
        deps: list[str | Step] = [] if array is None else [array]

        def decorate(fn: Handler) -> Step:
            return self._add_step(fn, slug, "map", deps, options)

        return cast(_MapDecorator, decorate)

    # --- reading -------------------------------------------------------------------------------

    @property
    def definition(self) -> FlowDefinition:
        """The :class:`FlowDefinition` built so far."""
        if self._definition is None:
            raise DefinitionError(f"flow {self.slug!r} has no steps yet; add one with @flow.step()")
        return self._definition

    def handler(self, step_slug: str) -> Handler:
        try:
            return self._handlers[step_slug]
        except KeyError:
            raise DefinitionError(
                f"flow {self.slug!r} has no step {step_slug!r}; steps: {sorted(self._handlers)}"
            ) from None

    def payloads(self, step_slug: str) -> Payloads | None:
        """How a step's input is structured and its output unstructured (``None``: untyped)."""
        return self._payloads.get(step_slug)

    def __repr__(self) -> str:
        return f"<pgflow {self._kind} {self.slug!r} steps={[s.slug for s in self._steps]}>"

    # --- in-process execution (unit tests) -----------------------------------------------------

    def _step_context(
        self, step_slug: str, flow_input: Any, ctx: Context | None, task_index: int | None
    ) -> Context:
        opts: EffectiveOptions = self.definition.effective(step_slug)
        if ctx is None:
            return Context(
                flow_slug=self.slug, step_slug=step_slug, task_index=task_index,
                max_attempts=opts.max_attempts, flow_input=flow_input,
            )
        return attrs.evolve(
            ctx, flow_slug=self.slug, step_slug=step_slug, task_index=task_index,
            max_attempts=opts.max_attempts, flow_input=flow_input,
        )

    # The DAG walk is written once, as generators that yield (handler, value, ctx) calls; the
    # sync and async entry points only differ in how they make each call. Values travel as the
    # JSON the runtime stores, each task decoding its own copy, so a handler sees what it would
    # see in a runner and may mutate its input without changing what another step sees.

    def _step_calls(
        self,
        step_slug: str,
        value_json: str | None,
        input_json: str,
        ctx: Context | None,
        skip_failures: bool = False,
    ) -> Generator[_Call, Any, str | None]:
        """Run one step on ``value_json`` (``None``: the flow input); return its output JSON.

        With ``skip_failures`` (``when_exhausted`` skips) a failed handler ends the step with
        ``None`` instead of raising; a map stops at its first failed task, as the runner
        cancels the others.
        """
        fn = self.handler(step_slug)
        step = self.definition.step(step_slug)
        where = self._where(step_slug)
        loads = _json.loads
        payloads = self._payloads.get(step_slug)
        if step.step_type == "single":
            flow_input = loads(input_json)
            value = flow_input if value_json is None else loads(value_json)
            return (yield from _attempt(
                fn, value, self._step_context(step_slug, flow_input, ctx, None), where,
                skip_failures, payloads,
            ))
        array = loads(input_json if value_json is None else value_json)
        if not isinstance(array, list):
            source = step.depends_on[0] if step.depends_on else "the flow input"
            raise PgflowError(
                f"map step {step_slug!r} expected an array from {source}, "
                f"got {type(array).__name__}"
            )
        outputs = []
        for i, item in enumerate(array):
            task_ctx = self._step_context(step_slug, loads(input_json), ctx, i)
            task_payloads = None if payloads is None else attrs.evolve(
                payloads, where=f"{where}, task {i}"
            )
            output = yield from _attempt(
                fn, item, task_ctx, f"{where}, task {i}", skip_failures, task_payloads
            )
            if output is None:
                return None
            outputs.append(output)
        return f"[{','.join(outputs)}]"

    def _run_calls(self, input: Any, ctx: Context | None) -> Generator[_Call, Any, Any]:
        definition = self.definition
        input_json = _input_json(input, f"{self._kind} {self.slug!r}")
        for root in definition.root_steps:
            if root.step_type == "map" and not isinstance(input, (list, tuple)):
                raise InputError(
                    f"flow {self.slug!r} starts with map step {root.slug!r}, so its input must "
                    f"be an array (list), got {type(input).__name__}"
                )
        if ctx is None:
            # One run id for the whole run, as in the runtime.
            ctx = Context(flow_slug=self.slug, step_slug=definition.steps[0].slug)
        outputs: dict[str, str] = {}  # of the steps that completed
        cascading: set[str] = set()  # skipped steps whose dependents are skipped too
        for step in definition.steps:
            if any(d in cascading for d in step.depends_on):
                cascading.add(step.slug)  # skip_reason "dependency_skipped"
                continue
            # A skipped dependency is left out of the deps; a map over it runs over [].
            deps = ",".join(
                f"{_json.dumps(d)}:{outputs[d]}" for d in step.depends_on if d in outputs
            )
            if not step.depends_on:
                value_json = None
            elif step.step_type == "map":
                value_json = outputs.get(step.depends_on[0], "[]")
            else:
                value_json = f"{{{deps}}}"
            if step.conditional and not condition_met(
                step.if_, step.if_not, input_json if not step.depends_on else f"{{{deps}}}"
            ):
                if step.when_unmet == "fail":
                    raise PgflowError(f"{self._where(step.slug)}: {CONDITION_NOT_MET}")
                if step.when_unmet == "skip-cascade":
                    cascading.add(step.slug)
                continue
            output = yield from self._step_calls(
                step.slug, value_json, input_json, ctx, step.when_exhausted != "fail"
            )
            if output is not None:
                outputs[step.slug] = output
            elif step.when_exhausted == "skip-cascade":
                cascading.add(step.slug)
        return _run_output(definition, outputs)

    async def aperform(
        self, input: Any = None, ctx: Context | None = None
    ) -> dict[str, Any] | None:
        """Run the whole flow in this event loop, step by step, and return the run output:
        ``{leaf: output}`` over the leaf steps that completed, ``None`` if all were skipped.

        Each step runs once (no retries); a handler's exception propagates unchanged unless its
        step's ``when_exhausted`` skips it; conditions apply as in the runner. Inputs and
        outputs go through the runtime's JSON round trip: an input it cannot store raises
        :class:`InputError`, an output it cannot store ``TypeError``/``ValueError``.
        """
        return await _drive_async(self._run_calls(input, ctx))  # type: ignore[no-any-return]

    def perform(self, input: Any = None, ctx: Context | None = None) -> dict[str, Any] | None:
        """Run the whole flow in this thread, step by step, and return the run output
        (see :meth:`aperform`).

        Sync handlers are called directly; an async handler is run to completion (outside a
        running event loop; inside one, use :meth:`aperform`). Values go through JSON as in
        :meth:`aperform`.
        """
        return _drive_sync(self._run_calls(input, ctx), "perform")  # type: ignore[no-any-return]

    def _where(self, step_slug: str) -> str:
        if self._kind == "job":
            return f"job {self.slug!r}"
        return f"flow {self.slug!r}, step {step_slug!r}"

    def _one_step(
        self, step_slug: str, input: Any, ctx: Context | None
    ) -> Generator[_Call, Any, Any]:
        where = self._where(step_slug)
        input_json = _input_json(input, where)
        if ctx is None or ctx.flow_input is None:
            output_json = yield from self._step_calls(step_slug, None, input_json, ctx)
        else:
            flow_input_json = _input_json(ctx.flow_input, f"{where}: ctx.flow_input")
            output_json = yield from self._step_calls(step_slug, input_json, flow_input_json, ctx)
        assert output_json is not None  # failures raise: no skip_failures here
        return self._output(step_slug, output_json)

    def _output(self, step_slug: str, output_json: str) -> Any:
        """A step's stored output as ``perform`` returns it: in its handler's return type."""
        payloads = self._payloads.get(step_slug)
        output = _json.loads(output_json)
        if payloads is None:
            return output
        if self.definition.step(step_slug).step_type == "map":  # one output per task
            return [payloads.output(item) for item in output]
        return payloads.output(output)

    @overload
    async def aperform_step(
        self, step_slug: MapStep[_I, _O], input: Sequence[_I], ctx: Context | None = None
    ) -> list[_O]: ...
    @overload
    async def aperform_step(
        self, step_slug: Step[_I, _O], input: _I, ctx: Context | None = None
    ) -> _O: ...
    @overload
    async def aperform_step(
        self, step_slug: str, input: Any = None, ctx: Context | None = None
    ) -> Any: ...
    async def aperform_step(
        self, step_slug: str | Step[Any, Any], input: Any = None, ctx: Context | None = None
    ) -> Any:
        """Run one step: ``input`` is the flow input (root), ``{dep: output}``, or a map's array.

        The step is its slug or its decorated object (then mypy checks ``input`` against its
        handler). A typed handler's output comes back in its return type (a map's as a list).
        """
        return await _drive_async(self._one_step(self._step_slug(step_slug), input, ctx))

    @overload
    def perform_step(
        self, step_slug: MapStep[_I, _O], input: Sequence[_I], ctx: Context | None = None
    ) -> list[_O]: ...
    @overload
    def perform_step(self, step_slug: Step[_I, _O], input: _I, ctx: Context | None = None) -> _O: ...
    @overload
    def perform_step(self, step_slug: str, input: Any = None, ctx: Context | None = None) -> Any: ...
    def perform_step(
        self, step_slug: str | Step[Any, Any], input: Any = None, ctx: Context | None = None
    ) -> Any:
        """Run one step in this thread (see :meth:`aperform_step`)."""
        return _drive_sync(self._one_step(self._step_slug(step_slug), input, ctx), "perform_step")

    def _step_slug(self, step: str | Step[Any, Any]) -> str:
        if not isinstance(step, Step):
            return step
        if step.flow is not self:
            raise DefinitionError(
                f"flow {self.slug!r}: step {step.slug!r} belongs to flow {step.flow.slug!r}"
            )
        return step.slug


class Job(Flow[InputT], Generic[InputT, OutputT]):
    """A flow with exactly one step, made by :func:`job`. Calling it calls the plain function.

    Generic in its handler's input and output: ``store.start``, ``start_many``, :meth:`perform`
    and :meth:`aperform` are checked against them.
    """

    def __init__(
        self,
        fn: Handler,
        *,
        queue: str,
        step_slug: str | None,
        conditions: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> None:
        super().__init__(queue, _kind="job", **options)
        self._add_step(fn, step_slug or queue, "single", (), conditions or {})
        self.fn = fn
        self.__doc__ = getattr(fn, "__doc__", None)
        self.__wrapped__ = fn

    @property
    def step_slug(self) -> str:
        return self.definition.steps[0].slug

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    # A job's run output is its one step's output (in the handler's return type), not the
    # {leaf: output} of a flow: hence the overrides' other return type.

    @overload  # type: ignore[override]
    def perform(self: Job[None, _O], input: None = None, ctx: Context | None = None) -> _O: ...
    @overload
    def perform(self, input: InputT, ctx: Context | None = None) -> OutputT: ...
    def perform(self, input: Any = None, ctx: Context | None = None) -> Any:
        """Run the handler in this thread and return its output (see :meth:`Flow.perform`)."""
        return _drive_sync(self._run_calls(input, ctx), "perform")

    @overload  # type: ignore[override]
    async def aperform(
        self: Job[None, _O], input: None = None, ctx: Context | None = None
    ) -> _O: ...
    @overload
    async def aperform(self, input: InputT, ctx: Context | None = None) -> OutputT: ...
    async def aperform(self, input: Any = None, ctx: Context | None = None) -> Any:
        """Run the handler in this event loop and return its output."""
        return await _drive_async(self._run_calls(input, ctx))

    def _run_calls(self, input: Any, ctx: Context | None) -> Generator[_Call, Any, Any]:
        # The flow's rules (conditions, skips), then the output in the handler's return type;
        # a skipped job's output is None.
        output = yield from super()._run_calls(input, ctx)
        payloads = self._payloads.get(self.step_slug)
        return output if payloads is None or output is None else payloads.output(output)


_Call = tuple[Handler, Any, Context]


def _attempt(
    fn: Handler, value: Any, ctx: Context, where: str, skip_failures: bool,
    payloads: Payloads | None,
) -> Generator[_Call, Any, str | None]:
    """One handler call (its input structured and output unstructured by ``payloads``): its
    output JSON, or ``None`` if it failed and ``skip_failures``. An input that does not fit
    the handler's type fails like the handler, as it is a failed attempt in the runner."""
    try:
        if payloads is not None:
            value = payloads.structure(value)
        output = yield fn, value, ctx
        if payloads is not None:
            output = payloads.unstructure(output)
        return _output_json(output, where)
    except Exception:
        if not skip_failures:
            raise
        return None


def _run_output(definition: FlowDefinition, outputs: dict[str, str]) -> Any:
    """A run's output from its completed steps' outputs (JSON): a job's one output, else
    ``{leaf: output}`` over the leaves that completed, ``None`` when none did."""
    if definition.kind == "job":
        only = outputs.get(definition.steps[0].slug)
        return None if only is None else _json.loads(only)
    leaves = {
        leaf.slug: _json.loads(outputs[leaf.slug])
        for leaf in definition.leaf_steps if leaf.slug in outputs
    }
    return leaves or None


def _input_json(value: Any, where: str) -> str:
    """``value`` as the store would record it, or the :class:`InputError` ``start`` raises."""
    try:
        return _json.dumps(value)
    except (TypeError, ValueError) as exc:
        raise InputError(
            f"{where}: the input must be JSON-serializable (dicts, lists, str, numbers, bools, "
            f"None, attrs classes, dataclasses): {exc}"
        ) from None


def _output_json(output: Any, where: str) -> str:
    """A handler's output as the runner records it; what the runner fails the run with if not."""
    try:
        return _json.dumps(output)
    except (TypeError, ValueError) as exc:
        error = TypeError if isinstance(exc, TypeError) else ValueError
        raise error(
            f"{where}: {_json.UNSTORABLE_OUTPUT}: {exc}"
        ) from None


# A handler's exception is thrown into the walk, which re-raises it unchanged unless its step
# skips when exhausted.


async def _drive_async(calls: Generator[_Call, Any, Any]) -> Any:
    try:
        fn, value, ctx = next(calls)
        while True:
            try:
                result = fn(value, ctx)
                if inspect.isawaitable(result):
                    result = await result
            except Exception as exc:
                fn, value, ctx = calls.throw(exc)
            else:
                fn, value, ctx = calls.send(result)
    except StopIteration as done:
        return done.value


def _drive_sync(calls: Generator[_Call, Any, Any], name: str) -> Any:
    try:
        fn, value, ctx = next(calls)
        while True:
            try:
                result = fn(value, ctx)
                if inspect.isawaitable(result):
                    result = _await_here(result, name)
            except _AsyncInLoop:
                raise
            except Exception as exc:
                fn, value, ctx = calls.throw(exc)
            else:
                fn, value, ctx = calls.send(result)
    except StopIteration as done:
        return done.value


class _AsyncInLoop(RuntimeError):
    """``perform`` met an async handler inside a running event loop: a usage error, never a
    handler failure."""


def _await_here(awaitable: Any, name: str) -> Any:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(_awaited(awaitable))
    if inspect.iscoroutine(awaitable):
        awaitable.close()
    raise _AsyncInLoop(
        f"{name}() met an async handler inside a running event loop; use 'await ...a{name}(...)'"
    )


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


@overload
def perform(name: F, /) -> F: ...
@overload
def perform(name: str | None = None) -> Callable[[F], F]: ...
def perform(name: str | F | None = None) -> Any:
    """Name the step of a job: ``@perform("send")``; ``@perform`` or ``@perform()`` use the queue."""
    if callable(name):
        setattr(name, _PERFORM_ATTR, None)
        return name
    if name is not None:
        validate_slug(name, "step slug")

    def mark(fn: F) -> F:
        if isinstance(fn, Flow):
            raise DefinitionError(
                "@perform must be placed below @job (applied first): @job(...) then @perform(...)"
            )
        setattr(fn, _PERFORM_ATTR, name)
        return fn

    return mark


@overload
def job(fn: Callable[[_I, Context], Awaitable[_O]], /) -> Job[_I, _O]: ...
@overload
def job(fn: Callable[[_I, Context], _O], /) -> Job[_I, _O]: ...
@overload
def job(
    fn: None = None,
    /,
    *,
    queue: str | None = None,
    max_attempts: int = 1,
    base_delay: float = 1,
    timeout: float = 30,
    backoff: Literal["exponential", "fixed"] = "exponential",
    max_delay: float = 3600,
    jitter: bool = False,
    on_failure: Hook | None = None,
    on_dead: Hook | None = None,
    cron: str | None = None,
    cron_input: Any = None,
    concurrency: int | None = None,
    isolation: Isolation = "thread",
    if_: dict[str, Any] | None = None,
    if_not: dict[str, Any] | None = None,
    when_unmet: SkipMode = "skip",
    when_exhausted: SkipMode = "fail",
) -> _JobDecorator: ...
def job(
    fn: Handler | None = None,
    /,
    *,
    queue: str | None = None,
    max_attempts: int = 1,
    base_delay: float = 1,
    timeout: float = 30,
    backoff: Literal["exponential", "fixed"] = "exponential",
    max_delay: float = 3600,
    jitter: bool = False,
    on_failure: Hook | None = None,
    on_dead: Hook | None = None,
    cron: str | None = None,
    cron_input: Any = None,
    concurrency: int | None = None,
    isolation: Isolation = "thread",
    if_: dict[str, Any] | None = None,
    if_not: dict[str, Any] | None = None,
    when_unmet: SkipMode = "skip",
    when_exhausted: SkipMode = "fail",
) -> Job | Callable[[Handler], Job]:
    """Make a function a job: a flow with one step whose slug is the queue.

    ``queue`` is the flow slug (default: the function's name). Options and their defaults are those
    of ``PgFlow.Job``: ``max_attempts=1``, ``base_delay=1`` s, ``timeout=30`` s. Also
    ``backoff``/``max_delay``/``jitter`` (retry delays), ``on_failure``/``on_dead`` (hooks),
    ``cron``/``cron_input`` (start a run per tick) and ``concurrency`` (cap on running tasks).
    ``if_``/``if_not``/``when_unmet``/``when_exhausted`` are the condition options of its one
    step (see :meth:`Flow.step`): checked against the job's input; a skipped job completes with
    output ``None``.
    """
    given = locals()
    options = {name: given[name] for name in FLOW_DEFAULTS}
    conditions = {name: given[name] for name in CONDITION_OPTIONS}

    def decorate(f: Handler) -> Job:
        if isinstance(f, Flow):
            raise DefinitionError(f"@job was applied to {f!r}, which is already a job or flow")
        _check_handler(f, f"job {queue!r}")
        slug = queue if queue is not None else getattr(f, "__name__", None)
        step_slug = getattr(f, _PERFORM_ATTR, None)
        return Job(
            f, queue=slug, step_slug=step_slug, conditions=conditions,  # type: ignore[arg-type]
            on_failure=on_failure, on_dead=on_dead, **options,
        )

    if fn is not None:
        return decorate(fn)
    return cast(_JobDecorator, decorate)


def flow(
    slug: str,
    *,
    max_attempts: int = 1,
    base_delay: float = 1,
    timeout: float = 30,
    backoff: Literal["exponential", "fixed"] = "exponential",
    max_delay: float = 3600,
    jitter: bool = False,
    on_failure: Hook | None = None,
    on_dead: Hook | None = None,
    cron: str | None = None,
    cron_input: Any = None,
    concurrency: int | None = None,
    isolation: Isolation = "thread",
) -> Flow:
    """Create a multi-step flow; add steps with ``@the_flow.step()`` and ``@the_flow.map()``.

    Options and defaults are those of :func:`job` (:data:`~pgflow_py.definition.FLOW_DEFAULTS`).
    """
    given = locals()
    return Flow(
        slug, on_failure=on_failure, on_dead=on_dead,
        **{name: given[name] for name in FLOW_DEFAULTS},
    )


def distinct_flows(flows: Iterable[Flow]) -> list[Flow]:
    """``flows`` without repeats of one object, in order; two different objects with one slug
    raise :class:`DefinitionError`, as a runner could serve only one of them."""
    found: dict[str, Flow] = {}
    for candidate in flows:
        kept = found.setdefault(candidate.slug, candidate)
        if kept is candidate:
            continue
        first, second = _origin(kept), _origin(candidate)
        hint = (
            f"; both come from {first}, so its module was imported twice under different names "
            "(e.g. as a script and as a module): import it one way"
            if first == second
            else "; give one of them another slug, or import the same object in both places"
        )
        raise DefinitionError(
            f"two different jobs or flows have the slug {candidate.slug!r}: {kept._kind} "
            f"{first} and {candidate._kind} {second}{hint}"
        )
    return list(found.values())


def _origin(flow: Flow) -> str:
    """Where a job or flow was defined: its (first) handler's import path."""
    handlers = list(flow._handlers.values())
    path = import_path(handlers[0]) if handlers else None
    if path is None:
        return repr(flow)
    return path if flow._kind == "job" or len(handlers) == 1 else f"with first step {path}"
