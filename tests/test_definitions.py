"""FlowDefinition / StepDefinition: validation, topology, inheritance, shape and JSON (DESIGN 1)."""

from __future__ import annotations

import json
import math
import re
import sqlite3
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import pgflow_py as pf

SLUG_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")

FD = pf.FlowDefinition
SD = pf.StepDefinition


def h(input: Any, ctx: pf.Context) -> Any:
    return input


def module_level_handler(input: Any, ctx: pf.Context) -> Any:
    return input


def one_step(slug: str = "f", **kw: Any) -> pf.FlowDefinition:
    return FD(slug=slug, steps=(SD("a"),), **kw)


def is_valid_slug(s: object) -> bool:
    return (
        isinstance(s, str)
        and len(s) <= 128
        and SLUG_RE.fullmatch(s) is not None
        and s != "run"
    )


valid_slugs = st.from_regex(SLUG_RE, fullmatch=True).filter(is_valid_slug)

# --- slugs ---------------------------------------------------------------------------------------

# None is not in this list: for the decorators it means "use the function's name".
BAD_SLUGS: list[tuple[object, str]] = [
    ("", "invalid"),
    ("1abc", "invalid"),
    ("has space", "invalid"),
    ("has-dash", "invalid"),
    ("dotted.name", "invalid"),
    ("émoji", "invalid"),
    ("tab\there", "invalid"),
    ("a" * 129, "129 characters"),
    ("run", "reserved"),
    (42, "must be a string"),
    (b"bytes", "must be a string"),
    (("a",), "must be a string"),
]

TRAILING_NEWLINE = ["abc\n", "send_email\n", "x\n"]


@pytest.mark.parametrize(("slug", "message"), [*BAD_SLUGS, (None, "must be a string")])
def test_bad_flow_slug_is_refused_by_pf_flow(slug: object, message: str) -> None:
    with pytest.raises(pf.DefinitionError, match=re.escape(message)):
        pf.flow(slug)  # type: ignore[arg-type]


@pytest.mark.parametrize(("slug", "message"), BAD_SLUGS)
def test_bad_flow_slug_is_refused_by_pf_job(slug: object, message: str) -> None:
    with pytest.raises(pf.DefinitionError, match=re.escape(message)):
        pf.job(queue=slug)(h)  # type: ignore[arg-type]


@pytest.mark.parametrize(("slug", "message"), [*BAD_SLUGS, (None, "must be a string")])
def test_bad_flow_slug_is_refused_by_flow_definition(slug: object, message: str) -> None:
    with pytest.raises(pf.DefinitionError, match=re.escape(message)):
        FD(slug=slug, steps=(SD("a"),))  # type: ignore[arg-type]


@pytest.mark.parametrize(("slug", "message"), BAD_SLUGS)
def test_bad_step_slug_is_refused_by_step_decorator(slug: object, message: str) -> None:
    f = pf.flow("f")
    with pytest.raises(pf.DefinitionError, match=re.escape(message)) as info:
        f.step(slug)(h)  # type: ignore[arg-type]
    assert "step slug" in str(info.value)


@pytest.mark.parametrize(("slug", "message"), BAD_SLUGS)
def test_bad_step_slug_is_refused_by_map_decorator(slug: object, message: str) -> None:
    f = pf.flow("f")
    with pytest.raises(pf.DefinitionError, match=re.escape(message)):
        f.map(slug)(h)  # type: ignore[arg-type]


@pytest.mark.parametrize(("slug", "message"), [*BAD_SLUGS, (None, "must be a string")])
def test_bad_step_slug_is_refused_by_flow_definition(slug: object, message: str) -> None:
    with pytest.raises(pf.DefinitionError, match=re.escape(message)):
        FD(slug="f", steps=(SD(slug),))  # type: ignore[arg-type]


@pytest.mark.parametrize(("slug", "message"), [s for s in BAD_SLUGS if isinstance(s[0], str)])
def test_bad_perform_name_is_refused(slug: str, message: str) -> None:
    with pytest.raises(pf.DefinitionError, match=re.escape(message)):
        pf.perform(slug)


@pytest.mark.parametrize("slug", TRAILING_NEWLINE)
def test_slug_with_trailing_newline_is_refused(slug: str) -> None:
    # ^...$ with re.match lets "abc\n" through: "$" also matches before a final newline.
    with pytest.raises(pf.DefinitionError):
        pf.flow(slug)
    with pytest.raises(pf.DefinitionError):
        pf.flow("f").step(slug)(h)
    with pytest.raises(pf.DefinitionError):
        FD(slug="f", steps=(SD(slug),))


def test_slug_length_limit_is_128() -> None:
    assert pf.flow("a" * 128).slug == "a" * 128
    assert FD(slug="f", steps=(SD("b" * 128),)).steps[0].slug == "b" * 128
    with pytest.raises(pf.DefinitionError, match="128"):
        pf.flow("a" * 129)
    with pytest.raises(pf.DefinitionError, match="128"):
        FD(slug="f", steps=(SD("b" * 129),))


@pytest.mark.parametrize("slug", ["a", "_", "_private", "A1", "send_email", "Run", "runs", "RUN"])
def test_edge_valid_slugs_are_accepted(slug: str) -> None:
    f = pf.flow(slug)
    step = f.step(slug)(h)
    assert f.slug == slug
    assert step.slug == slug
    assert f.definition.slug == slug
    assert f.definition.step_slugs == (slug,)


def test_lambda_needs_an_explicit_step_slug() -> None:
    f = pf.flow("f")
    with pytest.raises(pf.DefinitionError, match="<lambda>"):
        f.step()(lambda i, c: i)
    assert f.step("named")(lambda i, c: i).slug == "named"


@given(slug=valid_slugs)
def test_valid_slugs_are_accepted_for_flows_and_steps(slug: str) -> None:
    f = pf.flow(slug)
    f.step(slug)(h)
    assert f.definition.slug == slug
    assert f.definition.steps[0].slug == slug
    assert FD(slug=slug, steps=(SD(slug),)).slug == slug
    assert pf.job(queue=slug)(h).slug == slug


@given(
    slug=st.one_of(
        st.text(max_size=140),
        valid_slugs.map(lambda s: s + "\n"),
        st.text(alphabet="ab_1", min_size=129, max_size=200),
        st.just("run"),
        st.integers(),
    ).filter(lambda s: not is_valid_slug(s))
)
@example("abc\n")
def test_invalid_slugs_are_refused_for_flows_and_steps(slug: object) -> None:
    with pytest.raises(pf.DefinitionError):
        pf.flow(slug)  # type: ignore[arg-type]
    with pytest.raises(pf.DefinitionError):
        pf.flow("f").step(slug)(h)  # type: ignore[arg-type]
    with pytest.raises(pf.DefinitionError):
        FD(slug=slug, steps=(SD("a"),))  # type: ignore[arg-type]
    with pytest.raises(pf.DefinitionError):
        FD(slug="f", steps=(SD(slug),))  # type: ignore[arg-type]


# --- structure: duplicates, unknown dependencies, cycles, maps -----------------------------------


def test_duplicate_step_is_refused_by_decorators() -> None:
    f = pf.flow("f")
    f.step("a")(h)
    with pytest.raises(pf.DefinitionError, match=r"'a' is defined twice"):
        f.step("a")(h)
    with pytest.raises(pf.DefinitionError, match=r"'a' is defined twice"):
        f.map("a")(h)
    # The refused step left the flow as it was.
    assert f.definition.step_slugs == ("a",)


def test_duplicate_step_is_refused_by_flow_definition() -> None:
    with pytest.raises(pf.DefinitionError, match=r"'a' is defined twice"):
        FD(slug="f", steps=(SD("a"), SD("b", depends_on=("a",)), SD("a")))


def test_unknown_dependency_is_refused_by_decorators() -> None:
    f = pf.flow("f")
    f.step("a")(h)
    with pytest.raises(pf.DefinitionError, match=r"unknown step.*'nope'"):
        f.step("b", depends_on=["a", "nope"])(h)
    with pytest.raises(pf.DefinitionError, match=r"unknown step.*'nope'"):
        f.map("m", array="nope")(h)
    assert f.definition.step_slugs == ("a",)


def test_dependency_must_be_defined_before_the_step() -> None:
    f = pf.flow("f")
    with pytest.raises(pf.DefinitionError, match="unknown"):
        f.step("b", depends_on=["a"])(h)
    f.step("a")(h)
    f.step("b", depends_on=["a"])(h)
    assert f.definition.step_slugs == ("a", "b")


def test_unknown_dependency_is_refused_by_flow_definition() -> None:
    with pytest.raises(pf.DefinitionError, match=r"'b' depends on unknown step 'zzz'"):
        FD(slug="f", steps=(SD("a"), SD("b", depends_on=("zzz",))))


def test_cycle_is_refused() -> None:
    with pytest.raises(pf.DefinitionError, match="cycle"):
        FD(slug="f", steps=(SD("a", depends_on=("b",)), SD("b", depends_on=("a",))))


def test_longer_cycle_behind_a_root_is_refused() -> None:
    steps = (
        SD("root"),
        SD("x", depends_on=("root", "z")),
        SD("y", depends_on=("x",)),
        SD("z", depends_on=("y",)),
    )
    with pytest.raises(pf.DefinitionError, match="cycle") as info:
        FD(slug="f", steps=steps)
    for slug in ("x", "y", "z"):
        assert slug in str(info.value)


def test_self_dependency_is_a_cycle() -> None:
    with pytest.raises(pf.DefinitionError, match="cycle"):
        FD(slug="f", steps=(SD("a", depends_on=("a",)),))


def test_steps_out_of_topological_order_are_refused() -> None:
    with pytest.raises(pf.DefinitionError, match="topological order"):
        FD(slug="f", steps=(SD("b", depends_on=("a",)), SD("a")))


def test_depending_twice_on_the_same_step_is_refused() -> None:
    with pytest.raises(pf.DefinitionError, match="twice"):
        FD(slug="f", steps=(SD("a"), SD("b", depends_on=("a", "a"))))


def test_map_step_with_more_than_one_dependency_is_refused() -> None:
    with pytest.raises(pf.DefinitionError, match=r"map step.*at most one") as info:
        FD(
            slug="f",
            steps=(SD("a"), SD("b"), SD("m", step_type="map", depends_on=("a", "b"))),
        )
    assert "'m'" in str(info.value)


def test_map_step_with_zero_or_one_dependency_is_accepted() -> None:
    d = FD(
        slug="f",
        steps=(SD("root", step_type="map"), SD("m", step_type="map", depends_on=("root",))),
    )
    assert [s.step_type for s in d.steps] == ["map", "map"]


def test_unknown_step_type_is_refused() -> None:
    with pytest.raises(pf.DefinitionError, match="step_type"):
        FD(slug="f", steps=(SD("a", step_type="loop"),))  # type: ignore[arg-type]


def test_flow_without_steps_is_refused() -> None:
    with pytest.raises(pf.DefinitionError, match="no steps"):
        FD(slug="f", steps=())
    with pytest.raises(pf.DefinitionError, match="no steps"):
        pf.flow("empty").definition  # noqa: B018


def test_job_definition_must_have_exactly_one_step() -> None:
    with pytest.raises(pf.DefinitionError, match="exactly one step"):
        FD(slug="j", kind="job", steps=(SD("a"), SD("b")))


def test_step_of_another_flow_is_refused_as_dependency() -> None:
    other = pf.flow("other")
    foreign = other.step("a")(h)
    f = pf.flow("f")
    f.step("a")(h)
    with pytest.raises(pf.DefinitionError, match="another flow"):
        f.step("b", depends_on=[foreign])(h)


# --- options -------------------------------------------------------------------------------------

BAD_FLOW_OPTIONS: list[tuple[str, object, str]] = [
    ("max_attempts", 0, "max_attempts must be an integer >= 1"),
    ("max_attempts", -3, "max_attempts must be an integer >= 1"),
    ("max_attempts", 1.5, "max_attempts must be an integer"),
    ("max_attempts", 2.0, "max_attempts must be an integer"),
    ("max_attempts", True, "max_attempts must be an integer"),
    ("max_attempts", False, "max_attempts must be an integer"),
    ("max_attempts", "3", "max_attempts must be an integer"),
    ("max_attempts", None, "max_attempts must be an integer"),
    ("base_delay", -1, "base_delay must be a finite number of seconds >= 0"),
    ("base_delay", -0.001, "base_delay must be a finite number of seconds >= 0"),
    ("base_delay", math.nan, "base_delay"),
    ("base_delay", math.inf, "base_delay"),
    ("base_delay", "5", "base_delay"),
    ("base_delay", True, "base_delay"),
    ("max_delay", -1, "max_delay must be a finite number of seconds >= 0"),
    ("max_delay", math.nan, "max_delay"),
    ("max_delay", "10", "max_delay"),
    ("timeout", 0, "timeout must be a finite number of seconds > 0"),
    ("timeout", 0.0, "timeout must be a finite number of seconds > 0"),
    ("timeout", -5, "timeout must be a finite number of seconds > 0"),
    ("timeout", None, "timeout"),
    ("timeout", math.inf, "timeout"),
    ("timeout", "30", "timeout"),
    ("backoff", "linear", "backoff must be 'exponential' or 'fixed'"),
    ("backoff", None, "backoff"),
    ("backoff", "Exponential", "backoff"),
    ("jitter", 1, "jitter must be True or False"),
    ("jitter", "yes", "jitter must be True or False"),
    ("jitter", None, "jitter"),
]


@pytest.mark.parametrize(("name", "value", "message"), BAD_FLOW_OPTIONS)
def test_bad_flow_option_is_refused_by_pf_flow(name: str, value: object, message: str) -> None:
    with pytest.raises(pf.DefinitionError, match=re.escape(message)):
        pf.flow("f", **{name: value})


@pytest.mark.parametrize(("name", "value", "message"), BAD_FLOW_OPTIONS)
def test_bad_job_option_is_refused_by_pf_job(name: str, value: object, message: str) -> None:
    with pytest.raises(pf.DefinitionError, match=re.escape(message)):
        pf.job(queue="j", **{name: value})(h)


@pytest.mark.parametrize(("name", "value", "message"), BAD_FLOW_OPTIONS)
def test_bad_flow_option_is_refused_by_flow_definition(
    name: str, value: object, message: str
) -> None:
    with pytest.raises(pf.DefinitionError, match=re.escape(message)):
        one_step(**{name: value})


@pytest.mark.parametrize("name", ["base_delay", "max_delay"])
def test_flow_delay_none_is_refused(name: str) -> None:
    # A flow has no parent to inherit from: None is not a number of seconds.
    with pytest.raises(pf.DefinitionError, match=name):
        pf.flow("f", **{name: None})
    with pytest.raises(pf.DefinitionError, match=name):
        pf.job(queue="j", **{name: None})(h)
    with pytest.raises(pf.DefinitionError, match=name):
        one_step(**{name: None})


def test_unrepresentably_large_delay_is_a_definition_error() -> None:
    with pytest.raises(pf.DefinitionError, match="base_delay"):
        pf.flow("f", base_delay=10**400)


BAD_STEP_OPTIONS: list[tuple[str, object, str]] = [
    ("max_attempts", 0, "max_attempts must be an integer >= 1"),
    ("max_attempts", -1, "max_attempts must be an integer >= 1"),
    ("max_attempts", 2.5, "max_attempts must be an integer"),
    ("max_attempts", True, "max_attempts must be an integer"),
    ("base_delay", -1, "base_delay must be a finite number of seconds >= 0"),
    ("base_delay", math.nan, "base_delay"),
    ("base_delay", "1", "base_delay"),
    ("start_delay", -1, "start_delay must be a finite number of seconds >= 0"),
    ("start_delay", -0.5, "start_delay must be a finite number of seconds >= 0"),
    ("start_delay", math.inf, "start_delay"),
    ("timeout", 0, "timeout must be a finite number of seconds > 0"),
    ("timeout", -1, "timeout must be a finite number of seconds > 0"),
    ("timeout", math.nan, "timeout"),
]


@pytest.mark.parametrize(("name", "value", "message"), BAD_STEP_OPTIONS)
def test_bad_step_option_is_refused_by_step_and_map(
    name: str, value: object, message: str
) -> None:
    f = pf.flow("f")
    with pytest.raises(pf.DefinitionError, match=re.escape(message)) as info:
        f.step("s", **{name: value})(h)
    assert "'s'" in str(info.value)
    with pytest.raises(pf.DefinitionError, match=re.escape(message)):
        f.map("m", **{name: value})(h)
    with pytest.raises(pf.DefinitionError):
        f.definition  # noqa: B018  (nothing was added)


@pytest.mark.parametrize(("name", "value", "message"), BAD_STEP_OPTIONS)
def test_bad_step_option_is_refused_by_flow_definition(
    name: str, value: object, message: str
) -> None:
    with pytest.raises(pf.DefinitionError, match=re.escape(message)):
        FD(slug="f", steps=(SD("s", **{name: value}),))


def test_step_start_delay_none_is_refused() -> None:
    # start_delay is not inherited (it is a plain float defaulting to 0).
    with pytest.raises(pf.DefinitionError, match="start_delay"):
        pf.flow("f").step("s", start_delay=None)(h)  # type: ignore[arg-type]
    with pytest.raises(pf.DefinitionError, match="start_delay"):
        FD(slug="f", steps=(SD("s", start_delay=None),))  # type: ignore[arg-type]


def test_zero_delays_and_one_attempt_are_accepted() -> None:
    f = pf.flow("f", max_attempts=1, base_delay=0, max_delay=0, timeout=0.001)
    f.step("s", max_attempts=1, base_delay=0, start_delay=0, timeout=0.001)(h)
    d = f.definition
    assert (d.max_attempts, d.base_delay, d.max_delay, d.timeout) == (1, 0, 0, 0.001)
    s = d.steps[0]
    assert (s.max_attempts, s.base_delay, s.start_delay, s.timeout) == (1, 0, 0, 0.001)


def test_default_options_are_those_of_pgflow_job() -> None:
    f = pf.flow("f")
    f.step("s")(h)
    d = f.definition
    assert d.max_attempts == 1
    assert d.base_delay == 1
    assert d.timeout == 30
    assert d.backoff == "exponential"
    assert d.max_delay == 3600
    assert d.jitter is False
    s = d.steps[0]
    assert (s.max_attempts, s.base_delay, s.timeout, s.start_delay) == (None, None, None, 0)
    j = pf.job(queue="j")(h).definition
    assert (j.max_attempts, j.base_delay, j.timeout) == (1, 1, 30)


YEAR = 365 * 24 * 3600
finite_nonneg = st.one_of(
    st.integers(min_value=0, max_value=10 * YEAR),
    st.floats(min_value=0, max_value=10 * YEAR, allow_nan=False, allow_infinity=False),
)
positive = st.one_of(
    st.integers(min_value=1, max_value=YEAR),
    st.floats(min_value=0, max_value=YEAR, exclude_min=True, allow_nan=False,
              allow_infinity=False),
)
flow_options = st.fixed_dictionaries(
    {
        "max_attempts": st.integers(min_value=1, max_value=10**6),
        "base_delay": finite_nonneg,
        "timeout": positive,
        "backoff": st.sampled_from(["exponential", "fixed"]),
        "max_delay": finite_nonneg,
        "jitter": st.booleans(),
    }
)
step_options = st.fixed_dictionaries(
    {},
    optional={
        "max_attempts": st.integers(min_value=1, max_value=10**6),
        "base_delay": finite_nonneg,
        "timeout": positive,
        "start_delay": finite_nonneg,
    },
)


@given(fopts=flow_options, sopts=step_options, mopts=step_options)
def test_random_valid_options_are_stored_exactly(
    fopts: dict[str, Any], sopts: dict[str, Any], mopts: dict[str, Any]
) -> None:
    f = pf.flow("f", **fopts)
    f.step("s", **sopts)(h)
    f.map("m", array="s", **mopts)(h)
    d = f.definition
    for name, value in fopts.items():
        assert getattr(d, name) == value
        assert type(getattr(d, name)) is type(value) or isinstance(value, (int, float))
    for step, opts in ((d.step("s"), sopts), (d.step("m"), mopts)):
        for name in ("max_attempts", "base_delay", "timeout", "start_delay"):
            default = 0 if name == "start_delay" else None
            assert getattr(step, name) == opts.get(name, default)
    j = pf.job(queue="j", **fopts)(h).definition
    for name, value in fopts.items():
        assert getattr(j, name) == value


bad_attempts = st.one_of(
    st.integers(max_value=0), st.integers(min_value=10**6 + 1), st.booleans(), st.floats(),
    st.text(max_size=3), st.none()
)
bad_seconds = st.one_of(
    st.floats(max_value=-1e-9, allow_nan=False),
    st.floats(min_value=10 * YEAR, exclude_min=True),
    st.integers(max_value=-1),
    st.integers(min_value=10 * YEAR + 1),
    st.just(math.nan),
    st.just(math.inf),
    st.just(-math.inf),
    st.booleans(),
    st.text(max_size=3),
    # None for a flow delay is covered by test_flow_delay_none_is_refused (kept out of here so
    # this property stays deterministic).
)
bad_timeout = st.one_of(
    st.floats(max_value=0, allow_nan=False),
    st.floats(min_value=YEAR, exclude_min=True),
    st.integers(max_value=0),
    st.integers(min_value=YEAR + 1),
    st.just(math.nan),
    st.just(math.inf),
    st.booleans(),
    st.text(max_size=3),
    st.none(),
)
bad_flow_values = {
    "max_attempts": bad_attempts,
    "base_delay": bad_seconds,
    "max_delay": bad_seconds,
    "timeout": bad_timeout,
    "backoff": st.one_of(
        st.text(max_size=12).filter(lambda s: s not in ("exponential", "fixed")),
        st.none(),
        st.integers(),
    ),
    "jitter": st.one_of(st.integers(), st.none(), st.text(max_size=3), st.floats()),
}


@given(fopts=flow_options, data=st.data())
def test_random_invalid_flow_option_is_refused(fopts: dict[str, Any], data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(sorted(bad_flow_values)))
    value = data.draw(bad_flow_values[name])
    opts = {**fopts, name: value}
    with pytest.raises(pf.DefinitionError, match=name):
        pf.flow("f", **opts)
    with pytest.raises(pf.DefinitionError, match=name):
        pf.job(queue="j", **opts)(h)
    with pytest.raises(pf.DefinitionError, match=name):
        one_step(**opts)


bad_step_values = {
    "max_attempts": bad_attempts.filter(lambda v: v is not None),
    "base_delay": bad_seconds,
    "start_delay": bad_seconds,
    "timeout": bad_timeout.filter(lambda v: v is not None),
}


@given(sopts=step_options, data=st.data())
def test_random_invalid_step_option_is_refused(sopts: dict[str, Any], data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(sorted(bad_step_values)))
    value = data.draw(bad_step_values[name])
    opts = {**sopts, name: value}
    f = pf.flow("f")
    with pytest.raises(pf.DefinitionError, match=name):
        f.step("s", **opts)(h)
    with pytest.raises(pf.DefinitionError, match=name):
        FD(slug="f", steps=(SD("s", **opts),))


# --- frozen, pure data ---------------------------------------------------------------------------


def test_definitions_are_frozen() -> None:
    f = pf.flow("f")
    f.step("a")(h)
    d = f.definition
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        d.slug = "g"  # type: ignore[misc]
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        d.max_attempts = 5  # type: ignore[misc]
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        d.steps[0].slug = "b"  # type: ignore[misc]
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        d.steps[0].depends_on = ("x",)  # type: ignore[misc]
    assert isinstance(d.steps, tuple)
    assert isinstance(d.steps[0].depends_on, tuple)


def test_definition_is_a_snapshot_not_changed_by_later_steps() -> None:
    f = pf.flow("f")
    f.step("a")(h)
    before = f.definition
    f.step("b", depends_on=["a"])(h)
    assert before.step_slugs == ("a",)
    assert f.definition.step_slugs == ("a", "b")


def test_definitions_are_hashable_and_compare_by_value() -> None:
    def build() -> pf.FlowDefinition:
        f = pf.flow("f", max_attempts=3)
        f.step("a")(module_level_handler)
        f.map("m", array="a")(module_level_handler)
        return f.definition

    assert build() == build()
    assert hash(build()) == hash(build())
    assert build() != attrs.evolve(build(), max_attempts=4)


def test_defining_flows_performs_no_io(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PGFLOW_DATABASE", str(tmp_path / "env.db"))

    def no_db(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("defining a flow opened a database")

    monkeypatch.setattr(sqlite3, "connect", no_db)

    @pf.job(queue="send_email", max_attempts=3, base_delay=5, timeout=60)
    @pf.perform("send")
    def send_email(input: Any, ctx: pf.Context) -> Any:
        raise AssertionError("handler ran at definition time")

    f = pf.flow("analyze", max_attempts=2)
    a = f.step()(module_level_handler)
    f.map("pages", array=a)(module_level_handler)
    f.step("summary", depends_on=[a, "pages"])(module_level_handler)
    f.definition.to_json()
    send_email.definition.to_json()

    assert list(tmp_path.iterdir()) == []


def test_definition_records_handler_import_paths() -> None:
    f = pf.flow("f")
    f.step()(module_level_handler)

    def local_handler(input: Any, ctx: pf.Context) -> Any:
        return input

    f.step("local")(local_handler)
    d = f.definition
    assert d.step("module_level_handler").handler == f"{__name__}:module_level_handler"
    assert d.step("local").handler == (
        f"{__name__}:test_definition_records_handler_import_paths.<locals>.local_handler"
    )

    j = pf.job(queue="j")(module_level_handler)
    assert j.definition.steps[0].handler == f"{__name__}:module_level_handler"


# --- topology and derived views ------------------------------------------------------------------


def diamond() -> pf.Flow:
    f = pf.flow("diamond")
    a = f.step("a")(h)
    b = f.step("b", depends_on=[a])(h)
    c = f.map("c", array="a")(h)
    f.step("d", depends_on=[b, c])(h)
    f.step("e", depends_on=["a"])(h)
    return f


def test_steps_are_kept_in_declaration_order_which_is_topological() -> None:
    d = diamond().definition
    assert d.step_slugs == ("a", "b", "c", "d", "e")
    seen: set[str] = set()
    for step in d.steps:
        assert set(step.depends_on) <= seen
        seen.add(step.slug)


def test_step_definition_fields() -> None:
    d = diamond().definition
    assert d.kind == "flow"
    assert d.step("a").depends_on == ()
    assert d.step("b").depends_on == ("a",)
    assert d.step("c").step_type == "map"
    assert d.step("c").depends_on == ("a",)
    assert d.step("d").step_type == "single"
    assert d.step("d").depends_on == ("b", "c")
    with pytest.raises(KeyError):
        d.step("zzz")


def test_root_and_leaf_steps() -> None:
    d = diamond().definition
    assert [s.slug for s in d.root_steps] == ["a"]
    assert [s.slug for s in d.leaf_steps] == ["d", "e"]
    assert [s.slug for s in d.dependents("a")] == ["b", "c", "e"]
    assert d.dependents("d") == ()


def test_single_step_is_both_root_and_leaf() -> None:
    d = one_step()
    assert d.root_steps == d.leaf_steps == d.steps


def test_several_roots() -> None:
    f = pf.flow("f")
    f.step("x")(h)
    f.map("y")(h)
    f.step("z", depends_on=["x", "y"])(h)
    d = f.definition
    assert [s.slug for s in d.root_steps] == ["x", "y"]
    assert [s.slug for s in d.leaf_steps] == ["z"]


def test_effective_options_inherit_from_the_flow() -> None:
    f = pf.flow(
        "f", max_attempts=4, base_delay=2, timeout=10, backoff="fixed", max_delay=50, jitter=True
    )
    f.step("inherit")(h)
    f.step("own", max_attempts=9, base_delay=0, timeout=3, start_delay=7)(h)
    f.map("partial", array="own", timeout=1.5)(h)
    d = f.definition

    e = d.effective("inherit")
    assert (e.max_attempts, e.base_delay, e.timeout, e.start_delay) == (4, 2, 10, 0)
    assert (e.backoff, e.max_delay, e.jitter) == ("fixed", 50, True)

    e = d.effective("own")
    # base_delay=0 is a value, not "unset": it must not fall back to the flow's 2.
    assert (e.max_attempts, e.base_delay, e.timeout, e.start_delay) == (9, 0, 3, 7)
    assert (e.backoff, e.max_delay, e.jitter) == ("fixed", 50, True)

    e = d.effective("partial")
    assert (e.max_attempts, e.base_delay, e.timeout, e.start_delay) == (4, 2, 1.5, 0)

    with pytest.raises(KeyError):
        d.effective("nope")


@given(fopts=flow_options, sopts=step_options)
def test_effective_options_property(fopts: dict[str, Any], sopts: dict[str, Any]) -> None:
    f = pf.flow("f", **fopts)
    f.step("s", **sopts)(h)
    e = f.definition.effective("s")
    for name in ("max_attempts", "base_delay", "timeout"):
        assert getattr(e, name) == sopts.get(name, fopts[name])
    assert e.start_delay == sopts.get("start_delay", 0)
    for name in ("backoff", "max_delay", "jitter"):
        assert getattr(e, name) == fopts[name]


# --- shape ---------------------------------------------------------------------------------------


def test_same_shape_has_no_differences_even_if_options_change() -> None:
    a = FD(slug="f", steps=(SD("a"), SD("b", depends_on=("a",))), max_attempts=1)
    b = FD(
        slug="f",
        steps=(SD("a", timeout=5), SD("b", depends_on=("a",), max_attempts=7, handler="m:x")),
        max_attempts=3,
        base_delay=9,
    )
    assert a.shape_differences(b) == []
    assert b.shape_differences(a) == []
    assert a.shape() == b.shape()


def test_shape_differences_name_what_changed() -> None:
    old = FD(
        slug="f",
        steps=(
            SD("a"),
            SD("b", depends_on=("a",)),
            SD("c", depends_on=("a",)),
            SD("gone"),
        ),
    )
    new = FD(
        slug="f",
        steps=(
            SD("a"),
            SD("x"),
            SD("b", depends_on=("a", "x")),
            SD("c", step_type="map", depends_on=("a",)),
            SD("added"),
        ),
    )
    diffs = new.shape_differences(old)
    assert "step 'gone' was removed" in diffs
    assert "step 'added' was added" in diffs
    assert "step 'x' was added" in diffs
    assert "step 'c' changed type from single to map" in diffs
    assert "step 'b' now depends on ['a', 'x'] instead of ['a']" in diffs
    assert len(diffs) == 5
    assert new.shape() != old.shape()


def test_shape_difference_job_versus_flow() -> None:
    job = FD(slug="f", kind="job", steps=(SD("a"),))
    flow = FD(slug="f", kind="flow", steps=(SD("a"),))
    assert job.shape_differences(flow) == ["it was a flow and is now a job"]
    assert flow.shape_differences(job) == ["it was a job and is now a flow"]


def test_dependency_order_is_not_a_shape_change() -> None:
    a = FD(slug="f", steps=(SD("x"), SD("y"), SD("z", depends_on=("x", "y"))))
    b = FD(slug="f", steps=(SD("y"), SD("x"), SD("z", depends_on=("y", "x"))))
    assert a.shape_differences(b) == []
    assert a.shape() == b.shape()


# --- JSON ----------------------------------------------------------------------------------------


def test_job_json_round_trip() -> None:
    @pf.job(queue="send_email", max_attempts=3, base_delay=5, timeout=60, backoff="fixed",
            max_delay=120, jitter=True)
    @pf.perform("send")
    def send_email(input: Any, ctx: pf.Context) -> Any:
        return input

    d = send_email.definition
    text = d.to_json()
    assert isinstance(json.loads(text), dict)
    back = FD.from_json(text)
    assert back == d
    assert back.kind == "job"
    assert back.steps[0].slug == "send"
    assert back.steps[0].handler == d.steps[0].handler
    assert isinstance(back.steps, tuple)


def test_flow_with_map_steps_json_round_trip() -> None:
    f = pf.flow("analyze_website", max_attempts=3, base_delay=1.5, timeout=30)
    website = f.step()(module_level_handler)
    f.map("root_map", max_attempts=2)(h)
    pages = f.map("pages", array=website, timeout=2, start_delay=0.25)(h)
    f.step("summary", depends_on=[website, pages, "root_map"], base_delay=0)(h)
    d = f.definition
    back = FD.from_json(d.to_json())
    assert back == d
    assert back.step_slugs == d.step_slugs
    assert back.step("pages").step_type == "map"
    assert back.step("summary").depends_on == ("module_level_handler", "pages", "root_map")
    assert back.effective("pages") == d.effective("pages")
    # Serialization is deterministic.
    assert back.to_json() == d.to_json()
    assert FD.from_dict(d.to_dict()) == d


def test_from_json_validates_the_definition() -> None:
    d = one_step()
    data = json.loads(d.to_json())
    data["steps"][0]["slug"] = "run"
    with pytest.raises(pf.DefinitionError, match="reserved"):
        FD.from_json(json.dumps(data))
    data = json.loads(d.to_json())
    data["max_attempts"] = 0
    with pytest.raises(pf.DefinitionError, match="max_attempts"):
        FD.from_json(json.dumps(data))


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda d: d.update(unexpected=1), id="extra-key"),
        pytest.param(lambda d: d.pop("slug"), id="missing-slug"),
        pytest.param(lambda d: d["steps"][0].pop("slug"), id="missing-step-slug"),
    ],
)
def test_from_json_with_malformed_data_raises_definition_error(mutate: Any) -> None:
    data = json.loads(one_step().to_json())
    mutate(data)
    with pytest.raises(pf.DefinitionError):
        FD.from_json(json.dumps(data))


json_floats = st.floats(min_value=0, max_value=10 * YEAR, allow_nan=False, allow_infinity=False)
json_positive = st.floats(
    min_value=0, max_value=YEAR, exclude_min=True, allow_nan=False, allow_infinity=False
)


@st.composite
def flow_definitions(draw: st.DrawFn) -> pf.FlowDefinition:
    kind = draw(st.sampled_from(["job", "flow"]))
    n = 1 if kind == "job" else draw(st.integers(min_value=1, max_value=6))
    slugs = draw(st.lists(valid_slugs, min_size=n, max_size=n, unique=True))
    steps: list[pf.StepDefinition] = []
    for i, slug in enumerate(slugs):
        step_type = draw(st.sampled_from(["single", "map"]))
        earlier = slugs[:i]
        max_deps = 1 if step_type == "map" else len(earlier)
        deps = draw(
            st.lists(st.sampled_from(earlier), max_size=max_deps, unique=True)
            if earlier
            else st.just([])
        )
        steps.append(
            SD(
                slug=slug,
                step_type=step_type,
                depends_on=tuple(deps),
                max_attempts=draw(st.none() | st.integers(min_value=1, max_value=10**6)),
                base_delay=draw(st.none() | json_floats),
                timeout=draw(st.none() | json_positive),
                start_delay=draw(json_floats),
                handler=draw(st.none() | st.just("some.module:Some.handler")),
            )
        )
    return FD(
        slug=draw(valid_slugs),
        steps=tuple(steps),
        kind=kind,
        max_attempts=draw(st.integers(min_value=1, max_value=10**6)),
        base_delay=draw(json_floats),
        timeout=draw(json_positive),
        backoff=draw(st.sampled_from(["exponential", "fixed"])),
        max_delay=draw(json_floats),
        jitter=draw(st.booleans()),
    )


@given(d=flow_definitions())
def test_random_definitions_round_trip_through_json(d: pf.FlowDefinition) -> None:
    back = FD.from_json(d.to_json())
    assert back == d
    assert back.shape() == d.shape()
    assert back.shape_differences(d) == []
    for step in d.steps:
        assert back.effective(step.slug) == d.effective(step.slug)


@given(fopts=flow_options, sopts=step_options)
def test_dsl_definitions_round_trip_through_json(
    fopts: dict[str, Any], sopts: dict[str, Any]
) -> None:
    f = pf.flow("f", **fopts)
    a = f.step("a", **sopts)(module_level_handler)
    f.map("m", array=a, **sopts)(h)
    f.step("z", depends_on=["a", "m"])(h)
    assert FD.from_json(f.definition.to_json()) == f.definition
    j = pf.job(queue="j", **fopts)(h)
    assert FD.from_json(j.definition.to_json()) == j.definition
