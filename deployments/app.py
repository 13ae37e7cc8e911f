"""The one builder of the Serve graph: ``import_path: deployments.app:build_app``.

Two import paths, because Ray Serve treats them differently:

* ``deployments.app:build_app`` is the *builder*: a config's ``args:`` go to it
  (``serve run serve_config.yaml``, ``serve deploy``, KubeRay's ``serveConfigV2``).
* ``deployments.app:app`` is the graph built from :class:`AppConfig`'s defaults.
  ``serve build`` only accepts an ``Application`` and passes no args, so it is
  the path to give it: ``serve build deployments.app:app -o serve_config.out.yaml``.

``build_app(args)`` validates ``args`` with :class:`deployments.config.AppConfig`
first (a bad config fails at deploy time with pydantic's message), then binds
plain classes with ``serve.deployment(cls, **options)``::

    Ingress --predict--> Predictor
            --reserve/settle/status--> Allocator   (always exactly one replica)
            --generate (stream)--> ReplayEngine | LLMServer (Ray Serve LLM, through the in-process VLLMEngine)
            --observe (batches of settled requests)--> Learner   (one replica, while the service learns)
    Predictor, Allocator, Ingress --model (poll)--> Learner
"""

from __future__ import annotations

import uuid

from ray import serve

from pydantic import ValidationError

from clear_core.servable import servable_policy
from deployments.allocator import Allocator
from deployments.config import AppConfig, ConfigError, ReplayEngineConfig, length_calibration
from deployments.engines.replay import ReplayEngine
from deployments.ingress import IngressApp
from deployments.learner import Learner
from deployments.predictor import Predictor
from deployments.state_store import state_key


#: Serve logs an access line for every call a replica serves. One request calls the predictor, the
#: allocator (reserve, then settle) and the engine: four more lines per request. Only the ingress keeps
#: its access line (one per HTTP request); a deployment's own ``logging_config`` in the YAML
#: (``deployments: [{name: Allocator, logging_config: ...}]``) still overrides this.
INNER_LOGGING = {"enable_access_log": False}


def build_engine(cfg: AppConfig):
    ecfg = cfg.engine
    if isinstance(ecfg, ReplayEngineConfig):
        opts = ecfg.deployment.serve_options("ReplayEngine") | {"logging_config": INNER_LOGGING}
        # A replica accepts no more than it decodes at once plus a short queue.
        opts["max_ongoing_requests"] = max(opts["max_ongoing_requests"], ecfg.advanced.max_concurrent_requests)
        return serve.deployment(ReplayEngine, **opts).bind(ecfg, cfg.model_name)
    from deployments.engines.vllm import build_vllm_deployment

    if ecfg.advanced.attach_to_app is not None:  # the ingress finds that application's LLMServer by name
        return None
    # The ingress gets the LLMServer's handle and runs the VLLMEngine adapter in process.
    return build_vllm_deployment(ecfg, cfg.model_name)


def build_app(args: dict | None = None):
    try:
        cfg = AppConfig.model_validate(args or {})
    except ValidationError as exc:  # one line per bad field, naming it: a config error, not a traceback to read
        raise ConfigError.from_validation(exc) from None
    deploy_id = uuid.uuid4().hex  # names the books and the learner's directory when the budget has no name
    learner = None  # the length learner (deployments.learner): one replica, while the service learns
    poll_s = cfg.learner.advanced.poll_s
    if cfg.learns:
        opts = cfg.learner.advanced.deployment.serve_options("Learner") | {"num_replicas": 1}
        opts.pop("autoscaling_config", None)
        learner = serve.deployment(Learner, **opts, logging_config=INNER_LOGGING).bind(cfg, cfg.learner_url(deploy_id))
    predictor = None  # predictor.placement ingress: the ingress runs the backend itself
    if cfg.predictor.placement == "deployment":
        predictor = serve.deployment(Predictor, **cfg.predictor.deployment.serve_options("Predictor"),
                                     logging_config=INNER_LOGGING).bind(cfg.predictor, learner, poll_s)
    # The allocator holds the global budget: exactly one replica, never autoscaled.
    allocator = serve.deployment(Allocator, **cfg.allocator.advanced.deployment.serve_options("Allocator"),
                                 logging_config=INNER_LOGGING).bind(
        cfg.allocator,
        cfg.max_completion_tokens,
        # The budget's name, else a deploy id: a restarted allocator replica (same bound args)
        # finds its books; a named budget survives redeploys too (deployments/state_store.py).
        state_key=state_key(cfg.allocator.budget_name, deploy_id) if cfg.allocator.advanced.durable_state else None,
        # clear-cost-emp prices the length histograms of the predictor's calibration.
        length_calibration=(length_calibration(cfg.predictor)
                            if servable_policy(cfg.allocator.policy).prices_length_histograms else None),
        learner=learner,
        poll_s=poll_s,
        exploration=cfg.exploration(),
    )
    engine = build_engine(cfg)
    return serve.deployment(IngressApp, **cfg.ingress.deployment.serve_options("Ingress")).bind(
        cfg, predictor, allocator, engine, learner=learner
    )


# Built at import (binding a graph costs tens of milliseconds and starts nothing):
# `serve build` reads an attribute and refuses anything but an Application.
app = build_app()
