"""LLM engines behind one small interface (:class:`deployments.engines.base.Engine`).

- :mod:`.replay`: CPU trace replay (embedded default, tests, load tests).
- :mod:`.vllm`: vLLM replicas through Ray Serve LLM (GPU; imported lazily).
"""
