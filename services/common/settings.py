"""One typed settings object per process, read from ``KILN_*`` variables and an optional file.

Precedence: keyword arguments, then environment variables, then the TOML file
named by ``KILN_CONFIG_FILE`` (read by :func:`load_settings` at the entry
point), then the defaults below. Nothing reads ``os.environ`` at import time.
"""

from __future__ import annotations

import os
import re
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, IPvAnyNetwork, SecretStr, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

DEFAULT_REGISTRY = Path(__file__).with_name("registry.toml")


class Settings(BaseSettings):
    """Every setting an operator may change, with its default."""

    model_config = SettingsConfigDict(env_prefix="KILN_", extra="ignore", toml_file=None)

    # --- state ---
    data_dir: Path = Field(
        Path(".kiln"), description="Folder for the SQLite database, media and model cache."
    )
    database_url: str | None = Field(
        None, description="sqlite:///path or postgresql://...; SQLite in data_dir when unset."
    )
    media_root: Path | None = Field(None, description="Media store folder; data_dir/media when unset.")
    model_cache_dir: Path | None = Field(
        None, description="Where tiny random-weight models are built; data_dir/models when unset."
    )
    registry_path: Path = Field(DEFAULT_REGISTRY, description="The model registry (TOML).")

    # --- addresses ---
    addresses: dict[str, str] = Field(
        default_factory=dict,
        description="host:port each gRPC service is dialled at, by catalog name (services.catalog); "
        "KILN_<NAME>_ADDRESS sets one (KILN_IMAGE_GEN_ADDRESS=...). Unset: 127.0.0.1 and the "
        "service's default port.",
    )
    pythons: dict[str, Path] = Field(
        default_factory=dict,
        description="The Python of each environment other than this one (a service declares its "
        "environment in the catalog); KILN_<ENVIRONMENT>_PYTHON sets one (KILN_TTS_PYTHON=...). "
        "Unset: .venv-<environment>/bin/python of the checkout, if present.",
    )
    grpc_bind_host: str | None = Field(
        None,
        description="Interface a gRPC service binds (0.0.0.0 in a container); the host of its "
        "dial address (KILN_*_ADDRESS) when unset. The port is always the dial address's.",
    )
    mesh_secret: SecretStr | None = Field(
        None,
        description="Secret (32+ bytes) the mesh's call tokens are made from; the same on every "
        "machine of a mesh. Unset: data_dir/mesh-secret, made on first use.",
    )
    http_host: str = Field("127.0.0.1", description="Interface the HTTP edge binds.")
    http_port: int = Field(8000, description="Port of the HTTP edge.")
    public_base_url: str | None = Field(
        None, description="Base of media URLs in responses; taken from the request's Host when unset."
    )

    # --- limits ---
    max_body_bytes: int = Field(25 * 1024 * 1024, description="Largest accepted request body (413 above).")
    max_prompt_chars: int = Field(4000, description="Longest accepted prompt or negative prompt.")
    max_speech_chars: int = Field(4096, description="Longest text to speak (OpenAI's limit).")
    max_input_audio_bytes: int = Field(
        50 * 1024 * 1024, description="Largest accepted source song (music cover and repaint)."
    )
    max_reference_audio_seconds: float = Field(
        60.0, description="Longest voice-cloning reference recording (Qwen3-TTS wants 3-20 s)."
    )
    max_reference_audio_bytes: int = Field(
        20 * 1024 * 1024, description="Largest voice-cloning reference file (after base64 decoding)."
    )
    max_input_image_pixels: int = Field(
        4096 * 4096, description="Most pixels of an input image (checked from its header, before decoding)."
    )
    max_input_image_bytes: int = Field(20 * 1024 * 1024, description="Largest accepted input image file.")
    max_chat_images: int = Field(
        8, ge=0, description="Most images (image_url parts) in one chat request, counted before any fetch."
    )
    chat_image_fetch_seconds: float = Field(
        10.0, gt=0, description="One deadline for all the image URL fetches of one chat request together."
    )
    fetch_allow_networks: list[IPvAnyNetwork] = Field(
        default_factory=list,
        description="Non-public networks image URLs may still be fetched from (tests; never list a "
        "network clients must not reach). Empty: public addresses only.",
    )
    max_video_bytes: int = Field(
        500 * 1024 * 1024, description="Largest accepted video upload (streamed, never held in memory)."
    )
    # --- untrusted media decoding (services/common/decoding.py; docs/security.md) ---
    decode_workers: int = Field(
        2,
        ge=1,
        description="Decode worker processes of each service that reads uploads: also the most "
        "uploads it decodes at once. A decoder crash kills one of them, never the service.",
    )
    decode_memory_bytes: int = Field(
        3 * 1024 * 1024 * 1024,
        ge=0,
        description="Address-space limit of one decode worker (0: none); past it a decode is a 400.",
    )
    # --- request limits and slow clients (edge/forms.py, edge/middlewares.py; docs/security.md) ---
    max_form_parts: int = Field(
        32, gt=0, description="Most parts (files and text fields) of one form, for the whole request (413)."
    )
    max_form_field_bytes: int = Field(
        64 * 1024, gt=0, description="Longest text field of a form (400 above); files have their own limits."
    )
    max_unauthenticated_body_bytes: int = Field(
        64 * 1024,
        ge=0,
        description="A larger body, or one of unknown length, is read only once billing has accepted "
        "the credential: an unauthenticated upload gets its 401 before it is read.",
    )
    http_header_timeout_seconds: float = Field(
        30.0,
        gt=0,
        description="Time a connection gets to send a request's complete headers, from its start or the "
        "end of its previous request (so also how long an idle keep-alive connection stays open).",
    )
    http_body_timeout_seconds: float = Field(
        30.0,
        gt=0,
        description="Time a request body gets, plus one second per http_body_min_rate bytes that "
        "arrived; a body slower than that is a 408 and the connection is closed.",
    )
    http_body_min_rate: int = Field(
        4096,
        gt=0,
        description="Bytes per second a request body must keep up (see http_body_timeout_seconds).",
    )
    grpc_max_message_bytes: int = Field(64 * 1024 * 1024, description="Largest gRPC message either way.")
    service_timeout_seconds: float = Field(
        600.0, description="Deadline of one capability call from the edge."
    )

    # --- asynchronous tasks (edge/tasks.py, services/billing/tasks.py) ---
    task_workers: int = Field(
        2, ge=0, le=64, description="Tasks one edge runs at once (0: this edge runs none, only queues them)."
    )
    task_hold_seconds: int = Field(
        24 * 3600,
        ge=60,
        le=24 * 3600,
        description="How long a task's credit hold lasts: a task not finished by then fails, unpaid.",
    )
    task_lease_seconds: int = Field(
        30,
        ge=3,
        le=600,
        description="A running task's lease: renewed every third of it; a run not renewed for this "
        "long is taken over by another worker (once).",
    )
    task_retry_seconds: float = Field(
        600.0,
        ge=0,
        description="How long a task's run keeps retrying (with backoff) while its route answers 503 "
        "or 429 (a model still loading, maintenance, a rate limit) before the task fails.",
    )
    sync_wait_seconds: float | None = Field(
        None,
        gt=0,
        description="A paid request still running after this many seconds is answered 202 with a "
        "task (it goes on, and GET /v1/tasks/{id} has its answer); off when unset. Not for "
        "streamed answers, nor OpenAI's routes unless sync_wait_openai_routes.",
    )
    sync_wait_openai_routes: bool = Field(
        False,
        description="Also promote requests on OpenAI's routes (chat, images, speech), whose SDKs "
        "do not follow a 202.",
    )
    task_poll_seconds: float = Field(
        1.0,
        gt=0,
        description="How often an idle task worker asks billing for work (new tasks of "
        "the same edge wake it at once).",
    )

    # --- billing ---
    reservation_ttl_seconds: int = Field(
        720,
        description="Default time to live of a credit hold (the edge asks for the service timeout "
        "plus two minutes, so a hold outlives the longest call).",
    )
    billing_timeout_seconds: float = Field(
        10.0, description="Deadline of one billing call from the edge (a commit is retried past it)."
    )
    expiry_sweep_seconds: float = Field(5.0, description="How often billing releases expired holds.")
    # --- rate limits (services/billing/rate_limits.py; `kiln admin limits` overrides per account) ---
    rate_limit_rpm: int = Field(
        0, ge=0, description="Requests per minute an account may make per capability; 0: no limit."
    )
    rate_limit_rpm_premium: int = Field(
        0, ge=0, description="rate_limit_rpm of premium accounts (their own tier); 0: no limit."
    )
    rate_limit_capability_rpm: dict[str, int] = Field(
        default_factory=dict,
        description="Per-capability requests per minute, overriding rate_limit_rpm (JSON: "
        '{"chat": 30, "image_generation": 10}; capabilities as in edge/ratelimit.py; 0: no limit).',
    )
    rate_limit_capability_rpm_premium: dict[str, int] = Field(
        default_factory=dict, description="rate_limit_capability_rpm of premium accounts."
    )
    rate_limit_max_concurrent: int = Field(
        0, ge=0, description="Synchronous paid requests an account may have in flight; 0: no limit."
    )
    rate_limit_max_concurrent_premium: int = Field(
        0, ge=0, description="rate_limit_max_concurrent of premium accounts; 0: no limit."
    )
    rate_limit_storage: str = Field(
        "memory://",
        description="Where the request counters live: memory:// (one billing process) or "
        "redis://host:port[/db] (shared by every billing replica, so N edges share one budget).",
    )
    rate_limit_key_prefix: str = Field(
        "kiln", description="Prefix of the counters' keys (deployments sharing one Redis use their own)."
    )
    rate_limit_envoy: bool = Field(
        False,
        description="Envoy's global rate-limit filter in front (kiln envoy-config) already asked "
        "the limiter: the edge does not ask again.",
    )
    # --- sign-in and sessions (services/billing/sessions.py, edge/handlers/session.py) ---
    session_lifetime_seconds: int = Field(
        24 * 3600, gt=0, description="How long a session lives after sign-in (absolute, not sliding)."
    )
    session_cookie_secure: bool = Field(
        False,
        description="Always mark the session cookie Secure (TLS ends in front of the edge, e.g. at "
        "Envoy). It is Secure anyway when the edge itself serves the request over https.",
    )
    sign_in_failures_per_name: int = Field(
        5,
        ge=0,
        description="Sign-in attempts per user name within the window before a 429 (a right password "
        "clears them); 0: no limit.",
    )
    sign_in_failures_per_address: int = Field(
        50,
        ge=0,
        description="Failed sign-ins per client address within the window before a 429; 0: no limit.",
    )
    sign_in_failure_window_seconds: int = Field(
        900, gt=0, description="The moving window failed sign-ins are counted in (seconds)."
    )
    sign_in_client_address_header: str = Field(
        "",
        description="A header a trusted proxy in front sets to the client's address (e.g. "
        "X-Forwarded-For: its last entry is used), for the per-address sign-in limit. Empty: the "
        "connection's peer address. Set it only behind a proxy that overwrites or appends it.",
    )
    jwt_hs256_secret: SecretStr | None = Field(None, description="Shared secret for HS256 JWTs.")
    jwt_public_keys: list[Path] = Field(
        default_factory=list, description="PEM public keys for RS256/ES256 JWTs."
    )
    jwt_audience: str | None = Field(
        None,
        description="The `aud` every JWT must carry. Required when JWTs are enabled (billing does not "
        "start without it) unless jwt_require_audience is false.",
    )
    jwt_issuer: str | None = Field(
        None,
        description="The `iss` every JWT must carry. Required when JWTs are enabled (billing does not "
        "start without it) unless jwt_require_issuer is false.",
    )
    jwt_require_audience: bool = Field(
        True,
        description="Refuse to start with JWTs enabled but no jwt_audience. False accepts tokens for "
        "any audience (`aud` is then not checked).",
    )
    jwt_require_issuer: bool = Field(
        True,
        description="Refuse to start with JWTs enabled but no jwt_issuer. False accepts tokens of any "
        "issuer (`iss` is then not checked).",
    )
    jwt_leeway_seconds: int = Field(0, description="Clock skew allowed on exp/nbf.")
    jwt_max_lifetime_seconds: int = Field(
        24 * 3600, gt=0, description="Longest lifetime of a JWT accepted (exp minus iat, or minus now)."
    )

    # --- demo account created by `kiln up` ---
    demo_api_key: str | None = Field(None, description="Fixed demo API key; a new one is made when unset.")
    demo_credits: Decimal = Field(Decimal(1000), description="Credits the demo account is topped up to.")
    demo_premium: bool = Field(False, description="Whether the demo account is premium (pays 0).")

    # --- engines ---
    torch_threads: int | None = Field(None, description="torch intra-op threads; torch's default when unset.")
    engine_backend: Literal["auto", "onnxruntime", "torch"] = Field(
        "auto",
        description="Backend of exportable networks: onnxruntime (TensorRT, CUDA, then CPU providers, "
        "whichever the host has) when installed, else torch; or forced.",
    )
    batch_max_size: int = Field(
        0,
        ge=0,
        description="Most requests one dynamic batch runs together. 0 = auto: 8 on a GPU execution "
        "provider, 1 (no batching) on a CPU, where batching measured slower because one request "
        "already keeps every core busy.",
    )
    batch_window_ms: float = Field(5.0, description="How long a dynamic batch waits for more requests.")
    engine_queue_max: int = Field(
        64,
        ge=0,
        description="Most requests waiting for one model (its engine's queue); more are refused with "
        "a 429 rate_limit_error (a task's run retries later, so the task stays pending).",
    )
    engine_queue_max_per_account: int = Field(
        32,
        ge=0,
        description="Most requests of one account waiting for one model, so one account cannot fill "
        "the queue for everyone (0: only engine_queue_max).",
    )
    engine_fair_admission: bool = Field(
        True,
        description="Admit waiting requests fairly across accounts (start-time fair queuing, premium "
        "accounts in their own lane); false: first come, first served (the bounds still apply).",
    )
    engine_premium_weight: int = Field(
        1,
        ge=1,
        description="Premium admissions per standard admission while both wait (1: every other one), "
        "so premium goes first but never starves standard accounts.",
    )

    # --- media retention and disk (edge/retention.py) ---
    media_ttl_seconds: int = Field(
        7 * 24 * 3600,
        gt=0,
        description="How long generated files are kept (the contract: links expire after 7 days); "
        "library videos are kept while their account exists.",
    )
    media_sweep_seconds: float = Field(
        300.0, gt=0, description="How often the edge deletes expired, unpaid and stale temporary files."
    )
    min_free_disk_bytes: int = Field(
        1024**3,
        ge=0,
        description="Free space the disk of the media root (and of a SQLite database) must keep: "
        "below it, paid requests are refused with 503 (0 turns the guard off).",
    )

    # --- media storage backend (edge/media_store.py, edge/media_s3.py; docs/operations.md) ---
    media_backend: Literal["local", "s3"] = Field(
        "local",
        description="Where generated files live: 'local' (the media root) or 's3' (an S3-compatible "
        "bucket, KILN_S3_*).",
    )
    s3_endpoint: str | None = Field(
        None,
        description="S3 endpoint URL (http://127.0.0.1:8333 for SeaweedFS or MinIO; path-style "
        "addressing); AWS's regional endpoint when unset.",
    )
    s3_bucket: str | None = Field(None, description="Bucket of the media files (required with 's3').")
    s3_prefix: str = Field("media", description="Key prefix (a folder) of the media files in the bucket.")
    s3_region: str = Field("us-east-1", description="Region the requests are signed for (SigV4).")
    s3_access_key_id: str | None = Field(
        None, description="S3 access key id; the client's usual environment/instance credentials when unset."
    )
    s3_secret_access_key: SecretStr | None = Field(None, description="S3 secret access key.")
    s3_presign_seconds: int = Field(
        3600,
        gt=0,
        le=7 * 24 * 3600,
        description="Lifetime of the presigned URLs /v1/media/{id} redirects to (SigV4 allows 7 days).",
    )
    media_s3_redirect: bool = Field(
        False,
        description="With 's3': answer /v1/media/{id} with a 307 to a presigned URL instead of "
        "streaming the file through the edge.",
    )

    # --- task webhooks (services/billing/webhooks.py, edge/webhooks.py; docs/api.md) ---
    webhook_retry_schedule: Annotated[tuple[float, ...], NoDecode] = Field(
        (0.0, 5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0),
        description="Seconds before each delivery attempt of a webhook, the first counted from the "
        "task's end (so its length is the most attempts); after the last, the message is dead. "
        "KILN_WEBHOOK_RETRY_SCHEDULE is a comma list. Each wait gets +-20% jitter; a Retry-After "
        "longer than the wait is honoured, up to the longest step.",
    )
    webhook_allowed_hosts: Annotated[tuple[str, ...], NoDecode] = Field(
        (),
        description="Hosts (host or host:port, comma list) webhooks may reach although they are not "
        "public, over http or https (tests' loopback receivers; never list a host clients must not "
        "reach). Empty: https to public addresses only.",
    )
    webhook_poll_seconds: float = Field(
        1.0, gt=0, description="How often the edge asks billing for webhook messages that are due."
    )
    webhook_timeout_seconds: float = Field(
        10.0, gt=0, description="Deadline of one webhook POST (connect, send, answer)."
    )
    webhook_concurrency: int = Field(8, ge=1, description="Webhook POSTs one edge sends at the same time.")

    # --- operations ---
    grace_seconds: float = Field(5.0, description="Graceful shutdown period for in-flight calls.")
    otel_exporter: Literal["none", "console", "otlp"] = Field("none", description="Where spans go.")
    metrics_public: bool = Field(
        False,
        description="Whether the edge answers GET /metrics (Prometheus text, no credential); a 404 like "
        "an unknown route when false. The edge counts its metrics either way.",
    )
    metrics_port_offset: int = Field(
        0,
        ge=0,
        le=10000,
        description="Each gRPC service also serves GET /metrics (Prometheus text) over HTTP on its gRPC "
        "port plus this offset, on the same interface (e.g. 1000: image_gen's 50052 -> 51052); 0: off.",
    )
    log_level: str = Field("INFO", description="Python logging level.")

    @field_validator("webhook_retry_schedule", "webhook_allowed_hosts", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        """A comma list from the environment (``0,5,300``) as a tuple."""
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("webhook_retry_schedule")
    @classmethod
    def _schedule(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not value or any(step < 0 for step in value):
            raise ValueError("the webhook retry schedule is one or more waits of 0 seconds or more")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [
            init_settings,
            env_settings,
            _PerServiceVariables(settings_cls),
        ]
        toml_file = settings_cls.model_config.get("toml_file")
        if toml_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)

    # --- per-service ---
    def address(self, name: str) -> str:
        """The dial address of the catalog's service ``name``."""
        if name in self.addresses:
            return self.addresses[name]
        from services.catalog import capability

        return capability(name).default_address

    def with_addresses(self, **addresses: str) -> Settings:
        """A copy with these services' dial addresses changed."""
        return self.model_copy(update={"addresses": {**self.addresses, **addresses}})

    # --- derived paths ---
    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'kiln.db').resolve()}"

    @property
    def resolved_media_root(self) -> Path:
        return self.media_root or self.data_dir / "media"

    def bind_address(self, dial_address: str) -> str:
        """Where a service whose callers dial ``dial_address`` listens (see ``grpc_bind_host``)."""
        if self.grpc_bind_host is None:
            return dial_address
        host = self.grpc_bind_host
        port = dial_address.rpartition(":")[2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @property
    def resolved_model_cache_dir(self) -> Path:
        return self.model_cache_dir or self.data_dir / "models"


class _PerServiceVariables(PydanticBaseSettingsSource):
    """``KILN_<NAME>_ADDRESS`` and ``KILN_<ENVIRONMENT>_PYTHON`` variables, into ``addresses``
    and ``pythons`` (the names come from the catalog, not from this module)."""

    _PATTERN = re.compile(r"KILN_([A-Z0-9_]+?)_(ADDRESS|PYTHON)")

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        found: dict[str, dict[str, str]] = {"addresses": {}, "pythons": {}}
        for variable, value in os.environ.items():
            match = self._PATTERN.fullmatch(variable)
            if match:
                found["addresses" if match[2] == "ADDRESS" else "pythons"][match[1].lower()] = value
        return {key: values for key, values in found.items() if values}


def load_settings(**overrides: object) -> Settings:
    """Builds the process's settings; call once, at the entry point."""
    config_file = os.environ.get("KILN_CONFIG_FILE")

    class _FileSettings(Settings):
        model_config = SettingsConfigDict(toml_file=config_file)

    cls = _FileSettings if config_file else Settings
    return cls(**overrides)  # type: ignore[arg-type]
