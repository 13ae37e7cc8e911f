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
    # The learned predictor shipped in the package, not a path outside the repository.
    assert cfg.predictor.backend == "minilm-ridge" and cfg.predictor.head_path is None
    assert cfg.predictor.deployment.num_gpus == 0
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
        # only the minilm-ridge head ships the calibration histograms clear-cost-emp prices
        {"allocator": {"policy": "clear-cost-emp", "budget": {"mode": "per_query", "refund_unused": True}},
         "predictor": {"backend": "heuristic"}},
        {"allocator": {"policy": "clear-cost-emp", "budget": {"mode": "per_query", "refund_unused": True}},
         "predictor": {"head_path": "/nonexistent/head.json"}},
    ],
)
def test_bad_configs_fail_at_deploy_time(bad):
    with pytest.raises(ValidationError):
        AppConfig.model_validate(bad)


RATE = {"mode": "rate", "tokens_per_s": 1000.0, "burst_tokens": 10000.0}


@pytest.mark.parametrize(
    "args, policy",
    [
        ({}, "clear"),  # per-query caps without refunds: the paper's cap semantics
        ({"allocator": {"budget": RATE}}, "clear-cost-emp"),  # the shipped head carries length histograms
        ({"allocator": {"budget": {"mode": "per_query", "refund_unused": True}}}, "clear-cost-emp"),
        ({"allocator": {"budget": RATE, "decisions": "ingress"}}, "clear-cost-emp"),  # quotes price histograms too
        ({"allocator": {"budget": RATE}, "predictor": {"backend": "heuristic"}}, "clear-cost"),  # no histograms
        ({"allocator": {"budget": RATE, "decisions": "ingress"}, "predictor": {"backend": "heuristic"}}, "clear-cost"),
        ({"allocator": {"budget": RATE, "policy": "clear-cost"}}, "clear-cost"),  # named: kept
    ],
)
def test_policy_auto_picks_the_market_the_budget_and_predictor_can_run(args, policy):
    assert AppConfig.model_validate(args).allocator.policy == policy


@pytest.mark.parametrize("policy", ["oracle", "uniform-generated", "clear-paper", "clear-optimal", "proportional",
                                    "heuristic:fill=0"])
@pytest.mark.parametrize("decisions", ["central", "ingress"])
def test_a_bench_only_policy_is_refused_when_the_app_is_built_in_one_line(policy, decisions):
    """A deployment serves uniform, clear, clear-cost or clear-cost-emp; anything else fails at build time with
    one line naming the field (it used to deploy and answer every request 400)."""
    from deployments.app import build_app
    from deployments.config import ConfigError

    with pytest.raises(ConfigError) as err:
        build_app({"allocator": {"policy": policy, "decisions": decisions}})
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("args.allocator.policy: ") and "offline bench policy" in msg


#: What each shipped config serves: every one says `policy: auto`, and this is what auto resolves to there
#: (the story docs/serving.md tells).
SHIPPED = {
    "serve_config.yaml": "clear-cost-emp",  # per_query budget of generated tokens, the shipped head's histograms
    "serve_config.vllm-cpu.yaml": "clear",  # per_query budget of caps
    "serve_config.gpu.yaml": "clear-cost",  # a refunding rate budget, a checkpoint predictor (no histograms)
}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_every_shipped_config_serves_the_default_story(name):
    raw = yaml.safe_load((REPO / name).read_text())
    args = raw["applications"][0]["args"]
    assert args["allocator"]["policy"] == "auto"
    assert AppConfig.model_validate(args).allocator.policy == SHIPPED[name]


def test_the_kuberay_manifest_serves_what_the_gpu_config_serves():
    docs = list(yaml.safe_load_all((REPO / "k8s" / "rayservice.yaml").read_text()))
    service = next(d for d in docs if d and d.get("kind") == "RayService")
    serve_cfg = yaml.safe_load(service["spec"]["serveConfigV2"])
    args = serve_cfg["applications"][0]["args"]
    assert args["allocator"]["policy"] == "auto"
    assert AppConfig.model_validate(args).allocator.policy == SHIPPED["serve_config.gpu.yaml"]


def test_autoscaling_options():
    opts = DeploymentOptions(min_replicas=1, max_replicas=3).serve_options("E")
    assert opts["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 8.0}
    assert "num_replicas" not in opts
    assert DeploymentOptions(min_replicas=2).serve_options("E")["num_replicas"] == 2  # a fixed count
    assert DeploymentOptions(min_replicas=3, max_replicas=3).serve_options("E")["num_replicas"] == 3
    for bad in ({"min_replicas": 0}, {"min_replicas": 3, "max_replicas": 2}):
        with pytest.raises(ValidationError):
            DeploymentOptions(**bad)


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
    # text parts joined with a newline, as vLLM joins them for a string-content chat template
    assert req.prompt == "What is \n1+1?" and req.max_tokens == 50 and req.stream and req.include_usage
    assert req.sampling == {"temperature": 0.2}


def test_completion_parsing():
    assert parse_completion({"model": "m", "prompt": ["one"]}, 100).prompt == "one"
    with pytest.raises(BadRequestError):
        parse_completion({"model": "m", "prompt": ["a", "b"]}, 100)


def test_the_budget_config_is_validated_by_the_core_budget():
    from clear_core.budget import PerQueryBudget, TokenBucketBudget
    from deployments.config import AllocatorConfig

    assert AllocatorConfig().budget.to_budget() == PerQueryBudget()  # one source of the defaults
    rate = AllocatorConfig(budget={"mode": "rate", "tokens_per_s": 100}).budget.to_budget()
    assert rate == TokenBucketBudget(tokens_per_s=100.0, burst_tokens=0.0) and rate.refund_unused
    with pytest.raises(ValidationError, match="tokens_per_s > 0 or burst_tokens > 0"):
        AllocatorConfig(budget={"mode": "rate"})
    with pytest.raises(ValidationError, match="tokens_per_query"):
        AllocatorConfig(budget={"mode": "per_query", "tokens_per_query": -1})
    with pytest.raises(ValidationError, match="tokens_per_s"):  # a field of the other mode
        AllocatorConfig(budget={"mode": "per_query", "tokens_per_s": 5})
    with pytest.raises(ValidationError, match="policy"):
        AllocatorConfig(policy="clear:beta=0.01")  # refused at deploy time, not at the first request


def test_the_allocator_options_come_from_config_and_stay_one_replica():
    from deployments.config import AllocatorConfig

    opts = AllocatorConfig(advanced={"deployment": {"num_cpus": 0.5, "max_ongoing_requests": 77}}
                           ).advanced.deployment.serve_options()
    assert opts == {"name": "Allocator", "num_replicas": 1, "max_ongoing_requests": 77, "max_surge_percent": 0,
                    "ray_actor_options": {"num_cpus": 0.5}}
    with pytest.raises(ValidationError):
        AllocatorConfig(advanced={"deployment": {"num_replicas": 2}})


def test_vllm_autoscaling_is_set_in_one_place():
    from deployments.config import VLLMEngineConfig

    with pytest.raises(ValidationError, match="deployment_config"):
        VLLMEngineConfig(model_source="m", llm_config={"deployment_config": {"autoscaling_config": {"max_replicas": 9}}})
    ok = VLLMEngineConfig(model_source="m", max_replicas=3, llm_config={"engine_kwargs": {"max_model_len": 512}})
    assert ok.max_replicas == 3


def test_the_autoscaling_config_reaches_the_vllm_deployment():
    from deployments.config import VLLMEngineConfig
    from deployments.engines.vllm import build_vllm_deployment

    app = build_vllm_deployment(VLLMEngineConfig(model_source="m", min_replicas=1, max_replicas=3,
                                                 target_ongoing_requests=7), "clear-tiny")
    auto = app._bound_deployment._deployment_config.autoscaling_config
    assert app._bound_deployment.name == "LLMServer:clear-tiny"
    assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests) == (1, 3, 7)


def test_an_attached_fleet_deploys_no_vllm_and_keeps_its_own_settings():
    from deployments.app import build_app
    from deployments.config import VLLMEngineConfig

    with pytest.raises(ValidationError, match="attach_to_app"):
        VLLMEngineConfig(model_source="m", llm_config={"engine_kwargs": {}}, advanced={"attach_to_app": "fleet"})
    app = build_app({"model_name": "clear-tiny", "engine": {"kind": "vllm", "model_source": "m",
                                                            "advanced": {"attach_to_app": "fleet"}}})
    bound = [a._bound_deployment.name for a in app._bound_deployment.init_args if hasattr(a, "_bound_deployment")]
    assert not any(name.startswith("LLMServer") for name in bound) and None in app._bound_deployment.init_args


def test_the_two_abandonments_are_two_error_types():
    from clear_core.online_market import Decision, DecisionReason
    from deployments.errors import BudgetPoolEmptyError, abandonment_error, outcome_of

    def decision(reason):
        return Decision(reason=reason, cap_tokens=0, market_cap_tokens=0, shadow_price=0.2, threshold_tokens=900.0,
                        budget_per_query_tokens=128.0, retry_after_s=3.0)

    insolvent = abandonment_error(decision(DecisionReason.INSOLVENT))
    empty = abandonment_error(decision(DecisionReason.POOL_EMPTY))
    assert (insolvent.error_type, empty.error_type) == ("budget_abandoned", "budget_pool_empty")
    assert isinstance(empty, BudgetPoolEmptyError) and not isinstance(insolvent, BudgetPoolEmptyError)
    assert {insolvent.http_status, empty.http_status} == {429}
    assert outcome_of(insolvent) == outcome_of(empty) == "abandoned"
    assert "insolvent" in str(insolvent) and "pool_empty" in str(empty)
    # A market priced on the raw prediction (clear-cost-emp) still reports what the predictor says the request
    # needs, the calibrated median an admitted request's clear object shows.
    told = abandonment_error(decision(DecisionReason.INSOLVENT), predicted_threshold_tokens=640.0)
    assert told.threshold_tokens == 640.0 and "predicted threshold 640 tokens" in str(told)


def test_the_vllm_cpu_yaml_is_the_tested_cpu_engine():
    """serve_config.vllm-cpu.yaml runs the engine settings the real-vLLM tests run (no drift)."""
    from deployments.app import build_app
    from deployments.engines.vllm import CPU_LLM_CONFIG

    raw = yaml.safe_load((REPO / "serve_config.vllm-cpu.yaml").read_text())
    args = raw["applications"][0]["args"]
    cfg = AppConfig.model_validate(args)
    assert cfg.engine.kind == "vllm" and cfg.engine.replayed_workload() is None  # free generation
    assert cfg.engine.llm_config == CPU_LLM_CONFIG
    assert (cfg.engine.min_replicas, cfg.engine.max_replicas) == (1, 2)
    assert raw["http_options"]["host"] == "127.0.0.1"
    assert build_app(args) is not None


def test_a_calibration_file_lets_another_predictor_serve_the_histogram_market(tmp_path):
    """predictor.calibration_path gives any backend the length histograms: with them policy auto is
    clear-cost-emp; a calibration without histograms leaves clear-cost, and naming clear-cost-emp is refused."""
    import json

    from clear_predictor.head import load_head

    cal = load_head(None).calibration
    with_h, without = tmp_path / "cal.json", tmp_path / "plain.json"
    with_h.write_text(json.dumps(cal.as_dict()))
    without.write_text(json.dumps({**cal.as_dict(), "histograms": []}))
    refund = {"mode": "per_query", "refund_unused": True}
    pick = {"allocator": {"budget": refund}, "predictor": {"backend": "heuristic", "calibration_path": str(with_h)}}
    assert AppConfig.model_validate(pick).allocator.policy == "clear-cost-emp"
    plain = {"allocator": {"budget": refund}, "predictor": {"backend": "heuristic", "calibration_path": str(without)}}
    assert AppConfig.model_validate(plain).allocator.policy == "clear-cost"
    with pytest.raises(ValidationError, match="length histograms"):
        AppConfig.model_validate({**plain, "allocator": {"budget": refund, "policy": "clear-cost-emp"}})
