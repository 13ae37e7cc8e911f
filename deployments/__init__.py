"""Ray Serve graph of the CLEAR service (the only package that imports Ray Serve).

``deployments.app:build_app(args)`` validates its args (:mod:`deployments.config`)
and binds the graph::

    Ingress (FastAPI, OpenAI API) -> Predictor (batched) -> Allocator (one replica,
    wraps clear_core.ledger) -> Engine (replay on CPU, or vLLM via Ray Serve LLM)

Deployment classes are plain classes; the builder applies ``serve.deployment``.
"""
