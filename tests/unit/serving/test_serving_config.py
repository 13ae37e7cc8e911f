"""Config models, the builder and OpenAI request parsing (no Ray cluster)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from deployments.config import AppConfig, DeploymentOptions
from deployments.errors import BadRequestError
from deployments.openai_schema import parse_chat, parse_completion

REPO = Path(__file__).resolve().parents[3]


def test_every_config_field_has_a_description():
    from deployments import config

    models = [getattr(config, n) for n in dir(config) if isinstance(getattr(config, n), type)]
    models = [m for m in models if hasattr(m, "model_fields") and m.__module__ == config.__name__]
    assert len(models) >= 8
    for m in models:
        for name, f in m.model_fields.items():
            assert f.description, f"{m.__name__}.{name} has no description"


def test_embedded_yaml_validates_and_builds():
    from deployments.app import build_app

    raw = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    args = raw["applications"][0]["args"]
    cfg = AppConfig.model_validate(args)
    assert cfg.engine.kind == "replay" and cfg.engine.trace_path is None
    assert cfg.predictor.backend == "heuristic" and cfg.predictor.deployment.num_gpus == 0
    assert build_app(args) is not None


def test_gpu_yaml_validates():
    raw = yaml.safe_load((REPO / "serve_config.gpu.yaml").read_text())
    cfg = AppConfig.model_validate(raw["applications"][0]["args"])
    assert cfg.engine.kind == "vllm" and cfg.engine.max_replicas >= cfg.engine.min_replicas


@pytest.mark.parametrize(
    "bad",
    [
        {"typo_field": 1},
        {"allocator": {"budget": {"mode": "monthly"}}},
        {"allocator": {"budget": {"mode": "rate"}}},  # no rate, no burst
        {"predictor": {"backend": "lookup"}},  # no table
        {"engine": {"kind": "tpu"}},
        {"allocator": {"budget": {"tokens_per_query": -1}}},
    ],
)
def test_bad_configs_fail_at_deploy_time(bad):
    with pytest.raises(ValidationError):
        AppConfig.model_validate(bad)


def test_autoscaling_options():
    opts = DeploymentOptions(autoscaling_min_replicas=1, autoscaling_max_replicas=3).serve_options("E")
    assert opts["autoscaling_config"]["max_replicas"] == 3 and "num_replicas" not in opts


@pytest.mark.parametrize(
    "body, param",
    [
        ([], None),
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": "m"}, "messages"),
        ({"model": "m", "messages": [{"role": "system", "content": "x"}]}, "messages"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": "10"}, "max_tokens"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 10**9}, "max_tokens"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "clear_sample_index": -1}, "clear_sample_index"),
    ],
)
def test_chat_parsing_refuses_bad_requests(body, param):
    with pytest.raises(BadRequestError) as info:
        parse_chat(body, 32768)
    assert info.value.param == param


def test_chat_parsing_takes_the_last_user_message_and_text_parts():
    req = parse_chat(
        {
            "model": "m",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "1+1?"}]},
            ],
            "max_completion_tokens": 50,
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": 0.2,
        },
        32768,
    )
    assert req.prompt == "What is 1+1?" and req.max_tokens == 50 and req.stream and req.include_usage
    assert req.sampling == {"temperature": 0.2}


def test_completion_parsing():
    assert parse_completion({"model": "m", "prompt": ["one"]}, 100).prompt == "one"
    with pytest.raises(BadRequestError):
        parse_completion({"model": "m", "prompt": ["a", "b"]}, 100)
