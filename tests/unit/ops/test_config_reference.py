"""docs/configuration.md is what scripts/gen_config_reference.py renders from deployments/config.py,
and the rendering shows every field, its type, default, constraints and description."""

from __future__ import annotations

import typing
from typing import Annotated, Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field

from deployments.config import AppConfig

REGENERATE = "python scripts/gen_config_reference.py"


@pytest.fixture(scope="module")
def gen(ops):
    return ops.load_module(ops.REPO / "scripts" / "gen_config_reference.py", "clear_gen_config_reference_under_test")


@pytest.fixture(scope="module")
def config_md(ops) -> str:
    path = ops.REPO / "docs" / "configuration.md"
    if not path.is_file():
        pytest.fail(f"docs/configuration.md is missing: run {REGENERATE}", pytrace=False)
    return path.read_text()


def test_config_md_is_up_to_date(gen, config_md):
    if gen.render() != config_md:
        pytest.fail(f"docs/configuration.md is stale (deployments/config.py changed): run {REGENERATE}", pytrace=False)


def _models_and_fields(model, seen=None):
    """Every (model, field name, FieldInfo) reachable from ``model``, found here without the generator."""
    seen = set() if seen is None else seen
    if model in seen:
        return
    seen.add(model)
    for name, finfo in model.model_fields.items():
        yield model, name, finfo
        stack = [finfo.annotation]
        while stack:
            tp = stack.pop()
            if isinstance(tp, type) and issubclass(tp, BaseModel):
                yield from _models_and_fields(tp, seen)
            else:
                stack.extend(a for a in typing.get_args(tp) if not isinstance(a, (str, int, float, bool)))


def _section(md: str, model_name: str) -> str:
    start = md.index(f"\n### {model_name}\n")
    end = min((i for i in (md.find("\n### ", start + 1), md.find("\n## ", start + 1)) if i >= 0), default=-1)
    return md[start:] if end < 0 else md[start:end]


def test_every_field_of_every_model_has_a_row_with_its_description(config_md):
    rows = list(_models_and_fields(AppConfig))
    assert len({m for m, _, _ in rows}) >= 10  # the budget and engine variants included
    for model, name, finfo in rows:
        section = _section(config_md, model.__name__)
        (row,) = [line for line in section.splitlines() if line.startswith(f"| `{name}` |")]
        assert " ".join(finfo.description.split()).replace("|", "\\|") in row, f"{model.__name__}.{name}"


def test_tagged_unions_name_the_tag_and_each_variant(config_md):
    allocator = _section(config_md, "AllocatorConfig")
    (budget,) = [line for line in allocator.splitlines() if line.startswith("| `budget` |")]
    assert "by `mode`" in budget and '`"per_query"`' in budget and '`"rate"`' in budget
    assert "(mode: rate)" in _section(config_md, "RateBudgetConfig")
    assert "(kind: vllm)" in _section(config_md, "VLLMEngineConfig")
    (source,) = [line for line in _section(config_md, "VLLMEngineConfig").splitlines() if "`model_source`" in line]
    assert "**required**" in source


def test_defaults_and_constraints_come_from_the_model(config_md):
    (row,) = [line for line in _section(config_md, "AppConfig").splitlines() if line.startswith("| `context_limit_tokens` |")]
    assert f"`{AppConfig().context_limit_tokens}`" in row and "≥ 16" in row


class _Leaf(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weight: float = Field(1.0, gt=0, description="A weight.")


class _A(BaseModel):
    kind: Literal["a"] = Field("a", description="Variant a.")
    size: int = Field(..., ge=3, description="Required size.")


class _B(BaseModel):
    kind: Literal["b"] = Field("b", description="Variant b.")


class _Root(BaseModel):
    """A made-up config."""

    leaves: list[_Leaf] = Field(default_factory=list, description="Per-tenant leaves.")
    pick: Annotated[_A | _B, Field(discriminator="kind")] = Field(default_factory=_B, description="A or B.")
    named: dict[str, float] = Field(default_factory=dict, description="Weights by name.")


def test_the_generator_follows_a_model_it_has_never_seen(gen):
    """A field added to the config (a list of models, a mapping, a tagged union) reaches the doc."""
    md = gen.render(_Root)
    assert "At `args.leaves`." in _section(md, "_Leaf")
    assert "list of [_Leaf](#_leaf)" in md and "> 0" in _section(md, "_Leaf")
    assert "mapping of string to number" in md
    assert "by `kind`" in md and "(kind: a)" in _section(md, "_A")
    (size,) = [line for line in _section(md, "_A").splitlines() if line.startswith("| `size` |")]
    assert "**required**" in size and "≥ 3" in size and "Required size." in size
    assert "A made-up config." in _section(md, "_Root")


def test_rendering_is_deterministic_and_machine_independent(gen, ops):
    first, second = gen.render(), gen.render()
    assert first == second
    assert str(ops.REPO) not in first


def test_check_mode_fails_on_a_stale_copy_and_names_the_command(gen, tmp_path, capsys):
    (tmp_path / "docs").mkdir()
    target = tmp_path / "docs" / "configuration.md"
    target.write_text(gen.render().replace("Largest cap", "Biggest cap"))
    assert gen.main(["--check", "--root", str(tmp_path)]) == 1
    assert REGENERATE in capsys.readouterr().err
    assert gen.main(["--root", str(tmp_path)]) == 0
    assert gen.main(["--check", "--root", str(tmp_path)]) == 0


#: The most settings an operator sees outside the `advanced` sections.
MAX_OPERATOR_FIELDS = 40


def _operator_fields(model, under_advanced=False, seen=None):
    """Leaf fields reachable from ``model`` without passing through a field named ``advanced`` (found here
    without the generator), one per model and field."""
    seen = set() if seen is None else seen
    if model in seen:
        return
    seen.add(model)
    for name, finfo in model.model_fields.items():
        nested, stack = [], [finfo.annotation]
        while stack:
            tp = stack.pop()
            if isinstance(tp, type) and issubclass(tp, BaseModel):
                nested.append(tp)
            else:
                stack.extend(a for a in typing.get_args(tp) if not isinstance(a, (str, int, float, bool)))
        if not nested:
            yield f"{model.__name__}.{name}"
        elif name != "advanced":
            for m in nested:
                yield from _operator_fields(m, seen=seen)


def test_an_operator_sees_at_most_40_settings_and_the_page_says_how_many(gen, config_md):
    fields = list(_operator_fields(AppConfig))
    assert len(fields) <= MAX_OPERATOR_FIELDS, fields
    assert sorted(fields) == sorted(gen.operator_fields(gen.collect(AppConfig)))
    assert f"What an operator sets: {len(fields)} settings" in config_md
    operator = config_md[: config_md.index("## Advanced settings")]
    for test_only in ("fail_probability", "ignore_eos", "pace_budget", "durable_state", "settle_ack_wait_s"):
        assert f"`{test_only}`" not in operator, test_only
