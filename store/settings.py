"""Service configuration from `RIGL_*` environment variables, with embedded defaults.

With nothing set, everything lives under one data directory: an SQLite database, the artifacts,
and a filesystem message queue (kombu's own transport), so `rigl serve` needs no servers. Any setting
can come from a file instead (`RIGL_<NAME>_FILE`, store/secret_settings.py): how compose hands over
the passwords.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from store.secret_settings import SecretFiles, refuse_placeholder, url_password, with_password


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RIGL_", extra="ignore")

    data_dir: Path = Field(Path("~/.rigl"), description="Root of the embedded defaults.")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default sqlite in data_dir.")
    database_password: str | None = Field(None, repr=False, description="Password of database_url's user, put "
                                          "into the URL (compose: RIGL_DATABASE_PASSWORD_FILE, a secret file).")
    broker_url: str | None = Field(None, description="Celery broker; default kombu's filesystem transport.")
    broker_password: str | None = Field(None, repr=False, description="Password of the broker, put into "
                                        "broker_url (compose: RIGL_BROKER_PASSWORD_FILE, a secret file).")
    artifact_dir: Path | None = Field(None, description="Checkpoints, exports, reports, uploads.")
    artifact_url: str | None = Field(None, description="s3://bucket/prefix: artifacts live in an S3-compatible "
                                     "bucket (credentials: the standard AWS_* variables) and artifact_dir is "
                                     "this node's local cache of them; None: artifact_dir is the store.")
    s3_endpoint_url: str | None = Field(None, description="S3 endpoint (MinIO, R2, GCS interop); None: AWS, or "
                                        "AWS_ENDPOINT_URL.")
    s3_region: str | None = Field(None, description="S3 region; None: AWS_REGION / AWS_DEFAULT_REGION.")
    s3_addressing_style: Literal["auto", "path", "virtual"] = Field("auto", description="path for MinIO behind "
                                                                    "a plain host name.")
    s3_presigned_downloads: bool = Field(False, description="Checkpoint downloads answer 307 to a presigned "
                                         "bucket URL instead of streaming through the API.")
    s3_presign_seconds: int = Field(900, ge=1, le=7 * 24 * 3600, description="Lifetime of a presigned URL.")
    s3_max_attempts: int = Field(5, ge=1, le=20, description="Tries per S3 request (boto3's standard retries, "
                                 "with backoff) before an operation fails.")
    datasets_dir: Path | None = Field(None, description="Read-only directory for mnist/cifar/imagefolder data.")
    db_pool_size: int = Field(10, ge=1, description="PostgreSQL connections this process keeps open (every API "
                              "process and worker has its own pool: README \"Sizing\").")
    db_max_overflow: int = Field(20, ge=0, description="PostgreSQL connections this process may open beyond "
                                 "db_pool_size.")
    db_auto_upgrade: bool = Field(True, description="Upgrade the database schema on start; off: refuse to start "
                                  "while it is behind (`rigl db upgrade` does it).")
    queue: str = Field("rigl-train", description="Celery queue the training tasks go to.")
    auth: bool | None = Field(None, description="Require API keys; default on except in the embedded mode.")
    max_active_jobs_per_owner: int = Field(20, ge=1, description="Queued + running jobs one owner may have.")
    max_sweep_children: int = Field(64, ge=1, le=1024, description="Most jobs one sweep's grid may make "
                                    "(children past the active-job cap wait in the sweep, they don't fail).")
    max_sweep_children_per_owner: int = Field(256, ge=1, description="Unfinished sweep children one owner may "
                                              "have at once: held ones plus queued or running sweep jobs (a new "
                                              "sweep past it gets 429).")
    max_body_bytes: int = Field(1024 * 1024, description="JSON request body cap (bytes received).")
    max_upload_bytes: int = Field(512 * 1024 * 1024, description="Dataset upload cap.")
    max_upload_inflated_bytes: int = Field(2 * 1024**3, ge=1, description="Most bytes an upload's arrays may "
                                           "declare once inflated (checked from its headers before reading).")
    max_upload_compression_ratio: float = Field(100.0, ge=1, description="An .npz member over 1 MiB that inflates "
                                                "more than this many-fold is refused as a decompression bomb.")
    max_weights_bytes: int = Field(1024**3, ge=1, description="Weights upload cap (a safetensors state_dict; "
                                   "its header is checked against the bytes received before any value is read).")
    max_program_bytes: int = Field(1024**3, ge=1, description="Program upload cap (a torch.export .pt2; its members "
                                   "are also held to the inflated-size and ratio limits of uploads).")
    max_weights_header_bytes: int = Field(4 * 1024**2, ge=1024, description="Largest JSON header a weights "
                                          "upload may have (a state_dict of 10,000 tensors needs about 1 MiB); "
                                          "refused from the file's first 8 bytes.")
    max_weights_tensors: int = Field(10_000, ge=1, description="Most tensors a weights upload may hold (the "
                                     "largest built-in or Hugging Face model has a few thousand).")
    quota_weights_bytes: int | None = Field(20 * 1024**3, ge=0, description="Per owner: most bytes of uploaded "
                                            "weights kept at once (None: no quota).")
    quota_weights_count: int | None = Field(100, ge=0, description="Per owner: most uploaded weights files "
                                            "kept at once (None: no quota).")
    quota_datasets_bytes: int | None = Field(20 * 1024**3, ge=0, description="Per owner: most bytes of "
                                             "uploaded datasets kept at once (None: no quota).")
    quota_datasets_count: int | None = Field(100, ge=0, description="Per owner: most uploaded datasets kept at "
                                             "once (None: no quota).")
    quota_artifacts_bytes: int | None = Field(200 * 1024**3, ge=0, description="Per owner: a new job or sweep "
                                              "is refused while the owner's jobs' checkpoints and exports take "
                                              "this many bytes or more (None: no quota).")
    quota_artifacts_count: int | None = Field(10_000, ge=0, description="Per owner: most jobs kept at once, "
                                              "each with its artifacts, sweeps' children included (None: no "
                                              "quota); deleting a job frees its place.")
    max_imagefolder_images: int = Field(200_000, ge=1, description="imagefolder with loader memory: most "
                                        "images a job's folder may hold (counted at submit time); a streamed "
                                        "folder has no image cap.")
    max_imagefolder_bytes: int = Field(8 * 1024**3, ge=1, description="imagefolder with loader memory: most bytes "
                                       "its decoded images may take (images × 3 × image_size²).")
    max_params: int = Field(100_000_000, description="Largest model a job may train.")
    max_model_modules: int = Field(2_000, ge=10, description="Most modules a job's model may have (the largest "
                                   "timm model has ~1,800, a 126-layer Llama ~1,650); a model.hf config's layer "
                                   "counts (≥ 10 modules a layer) and an architecture's layers are checked before "
                                   "anything is built, the built model's count after.")
    max_model_build_seconds: float = Field(60, gt=0, description="Most seconds checking one model (build on the "
                                           "meta device, one forward, the plan) may take in its child process.")
    max_model_build_bytes: int = Field(2 * 1024**3, ge=256 * 1024**2, description="Most memory (address space) "
                                       "checking one model may add in its child process.")
    max_epochs: int = Field(10_000)
    max_total_steps: int = Field(10_000_000, ge=1, le=2**31 - 1,
                                 description="Most optimizer steps one job may take (epochs × steps per epoch).")
    max_training_flops: float = Field(1e19, gt=0, description="Most estimated training FLOPs one job may cost "
                                      "(plan's training FLOPs per example × examples seen).")
    max_synthetic_values: int = Field(200_000_000, ge=1, le=200_000_000, description="synthetic datasets: most "
                                      "samples × values per sample (at most rigl_core's own ceiling).")
    retention_days: float | None = Field(None, gt=0, description="Finished jobs older than this are deleted "
                                         "with their artifacts by the API's cleanup pass; None: kept.")
    cleanup_interval_seconds: float = Field(60, gt=0, description="How often the API's cleanup pass runs "
                                            "(pending deletions, resume checkpoints of finished jobs, retention).")
    webhook_allow_private: bool = Field(False, description="Webhooks may send to private (10/8, 172.16/12, "
                                        "192.168/16, fc00::/7) and loopback addresses; link-local, multicast and "
                                        "reserved ones still need webhook_allowed_networks.")
    webhook_allowed_networks: str = Field("", description="Comma-separated CIDRs webhooks may send to whatever "
                                          "their kind (e.g. 10.1.2.0/24 for an internal receiver).")
    webhook_timeout_seconds: float = Field(5, gt=0, le=30, description="Connect and read timeout of one "
                                           "webhook delivery attempt.")
    webhook_max_attempts: int = Field(5, ge=1, le=20, description="Tries per webhook delivery before it is "
                                      "marked failed.")
    webhook_retry_base_seconds: float = Field(10, ge=0, description="Wait before a delivery's second try; "
                                              "each next wait is 4 times longer (10 s, 40 s, 160 s, 640 s).")
    webhook_interval_seconds: float = Field(2, gt=0, description="How often the API's webhook sender looks "
                                            "for deliveries that are due.")
    max_webhooks_per_owner: int = Field(10, ge=1, le=100, description="Webhook endpoints one owner may have.")
    orphan_upload_seconds: float = Field(600, ge=0, description="`.upload-*` temp files older than this are "
                                         "removed at API startup (an upload in progress is younger).")
    checkpoint_every_steps: int = Field(200, ge=1)
    checkpoint_min_seconds: float = Field(30.0, ge=0, description="…and at least this long since the last one.")
    event_every_steps: int = Field(20, ge=1)
    max_metrics_events: int = Field(2000, ge=10, description="Most `metrics` events one job writes: long jobs "
                                    "emit every max(event_every_steps, total_steps / this) steps.")
    max_metric_points: int = Field(2000, ge=10, description="Most points per series GET …/metrics returns "
                                   "(thinned evenly, first and last kept); ?max_points lowers it.")
    max_streams_per_owner: int = Field(50, ge=1, description="Open event streams one owner may hold per API "
                                       "process; past it a new stream gets 429.")
    stream_keepalive_seconds: float = Field(15, gt=0, description="An idle event stream sends a comment line "
                                            "this often (proxies close silent connections).")
    stream_idle_seconds: float = Field(600, gt=0, description="An event stream that delivered no event for this "
                                       "long closes (the client reconnects with Last-Event-ID).")
    stream_poll_seconds: float = Field(0.5, gt=0, description="How often the API reads new events of a "
                                       "streamed job: one query per job per interval, however many streams.")
    cancel_poll_seconds: float = Field(1.0, gt=0)
    worker_devices: int | None = Field(None, ge=1, le=64, description="Devices this worker owns (a job with "
                                       "training.devices: N runs only on a worker owning ≥ N; 'all' uses all of them). "
                                       "Default: the visible CUDA GPUs, or 1 on a host without one.")
    ray_address: str | None = Field(None, description="Ray cluster that runs jobs on several nodes "
                                    "(training.nodes > 1; worker/ray_gang.py): `ray://head:10001` (Ray Client), or "
                                    "`head:6379` where the worker runs on a Ray node; None: such jobs are refused.")
    ray_placement_timeout_seconds: float = Field(60, gt=0, description="How long a worker waits for the Ray "
                                                 "cluster to place a job's whole gang (nodes × devices ranks) "
                                                 "before giving the job back to the queue, untouched.")
    ray_retry_seconds: float = Field(30, gt=0, description="A job whose gang could not be placed is offered "
                                     "to the workers again after this long.")
    lease_seconds: float = Field(120, gt=0, description="A running job whose heartbeat is older is requeued.")
    reaper_interval_seconds: float = Field(15, gt=0, description="How often the reaper looks for lost jobs.")
    reaper: bool = Field(True, description="Run the reaper in this API replica or worker; one process of the "
                         "database acts at a time (a PostgreSQL advisory lock, or a file lock beside SQLite).")
    job_time_limit_seconds: int = Field(3 * 24 * 3600)
    max_attempts: int = Field(3, ge=1, description="Failed runs (lost workers) before a job fails; clean "
                              "preemptions (SIGTERM, warm shutdown: checkpoint and requeue) don't count.")
    spec_defer_seconds: float = Field(30, ge=0, description="A worker handed a job whose spec a newer release "
                                      "wrote (store/spec_version.py) re-sends its message after this long.")
    time_limit_grace_seconds: int = Field(300, ge=1, description="A run checkpoints and ends `time_limit` this "
                                          "long before job_time_limit_seconds; Celery's soft limit is at half of it.")
    db_retry_seconds: float = Field(600, ge=0, description="How long a worker retries a database write that "
                                    "fails for a transient reason (outage, restart) before giving up.")
    allowed_hosts: str | None = Field(None, description="Comma-separated Host names the API answers ('*': any); "
                                      "IP literals always. Default in `rigl serve` with keys off: loopback names + "
                                      "--host; with keys on: any.")
    allowed_origins: str = Field("", description="Comma-separated extra origins (https://host[:port]) that may "
                                 "send POST/PUT/PATCH/DELETE from a browser, besides the API's own.")
    metrics: bool = Field(True, description="Serve Prometheus metrics at the API's /metrics (api/metrics.py).")
    metrics_token: str | None = Field(None, repr=False,
                                      description="If set, /metrics wants `Authorization: Bearer <this>`.")
    metrics_label_key: str | None = Field(None, repr=False, description="Key of the HMAC that labels owners "
                                          "on /metrics (store/server_key.py); None: a random one made once in "
                                          "data_dir/secrets/metrics_label_key.")
    metrics_cache_seconds: float = Field(5.0, ge=0, description="How long /metrics reuses its database counts "
                                         "(jobs by status, queue, per owner): a scrape storm costs one query set.")
    worker_metrics_port: int | None = Field(None, ge=1, le=65535, description="A worker serves its Prometheus "
                                            "metrics on this port (worker/metrics.py); None: no port.")
    worker_metrics_host: str = Field("127.0.0.1", description="Address the worker's metrics port listens on: "
                                     "loopback by default; compose sets 0.0.0.0 (its internal network only, "
                                     "never published) so Prometheus reaches it. It wants metrics_token when set.")
    worker_metrics_dir: Path | None = Field(None, description="prometheus_client multiprocess folder of the "
                                            "worker; `rigl serve` sets it and its API exports those series too.")
    log_format: str = Field("text", pattern="^(text|json)$", description="Log lines: `text` (readable) or "
                            "`json` (one object a line, with request_id / job_id).")
    mlflow_tracking_uri: str | None = Field(None, validation_alias=AliasChoices("RIGL_MLFLOW_TRACKING_URI",
                                            "MLFLOW_TRACKING_URI", "mlflow_tracking_uri"),
                                            description="Every job is an MLflow run on this tracking server "
                                            "(RIGL_MLFLOW_TRACKING_URI, or MLflow's own MLFLOW_TRACKING_URI); a "
                                            "JobSpec's tracking.mlflow can name another, or turn it off. Needs "
                                            "the 'mlflow' extra on the workers and the API.")
    mlflow_experiment: str = Field("rigl", min_length=1, max_length=500, description="The MLflow experiment of "
                                   "jobs whose tracking.mlflow names none.")
    mlflow_flush_seconds: float = Field(5.0, ge=0, description="A worker sends a job's buffered metrics to "
                                        "MLflow in one log_batch at most this often (and at the end).")
    fault_kill_at_step: int | None = Field(None, description="Tests only: the worker SIGKILLs itself at this step.")

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource):
        """`RIGL_<NAME>_FILE` beside `RIGL_<NAME>` (setting both is an error, so their order is moot)."""
        return init_settings, SecretFiles(settings_cls), env_settings, dotenv_settings, file_secret_settings

    @model_validator(mode="after")
    def _passwords(self) -> "Settings":
        """The password settings go into their URLs; a `change-me…` placeholder is refused wherever it is."""
        for name in ("database", "broker"):
            password, url = getattr(self, f"{name}_password"), getattr(self, f"{name}_url")
            refuse_placeholder(f"RIGL_{name.upper()}_PASSWORD", password)
            if password is not None:
                if url is None:
                    raise ValueError(f"RIGL_{name.upper()}_PASSWORD needs RIGL_{name.upper()}_URL")
                try:
                    url = with_password(url, password)
                except ValueError as error:
                    raise ValueError(f"RIGL_{name.upper()}_PASSWORD: RIGL_{name.upper()}_URL {error}") from None
                setattr(self, f"{name}_url", url)
            if url is not None:
                refuse_placeholder(f"RIGL_{name.upper()}_URL", url_password(url))
        refuse_placeholder("RIGL_METRICS_TOKEN", self.metrics_token)
        refuse_placeholder("RIGL_METRICS_LABEL_KEY", self.metrics_label_key)
        return self

    @field_validator("ray_address")
    @classmethod
    def _ray_address(cls, value: str | None) -> str | None:
        """An empty variable (compose passes `${X:-}`) means unset."""
        return value.strip() or None if value is not None else None

    @field_validator("artifact_url", "s3_endpoint_url", "s3_region")
    @classmethod
    def _s3_url(cls, value: str | None, info) -> str | None:
        """An empty variable (compose passes `${X:-}`) means unset."""
        if value and info.field_name == "artifact_url":
            from store.object_store import parse_artifact_url

            parse_artifact_url(value)
        return value or None

    def resolved(self) -> "Settings":
        """Fill the defaults that depend on data_dir and create the directories."""
        data = self.data_dir.expanduser().resolve()
        artifacts = (self.artifact_dir or data / "artifacts").expanduser().resolve()
        updates = {"data_dir": data, "artifact_dir": artifacts}
        if self.database_url is None:
            updates["database_url"] = f"sqlite:///{data / 'rigl.db'}"
        if self.broker_url is None:
            updates["broker_url"] = "filesystem://"
        if self.datasets_dir is None:
            updates["datasets_dir"] = data / "datasets"
        if self.auth is None:  # embedded single-user mode: SQLite + filesystem broker on one machine
            embedded = (updates.get("database_url", self.database_url).startswith("sqlite")
                        and updates.get("broker_url", self.broker_url).startswith("filesystem://"))
            updates["auth"] = not embedded
        settings = self.model_copy(update=updates)
        for path in (data, artifacts):
            path.mkdir(parents=True, exist_ok=True)
        if settings.broker_url.startswith("filesystem://"):
            settings.broker_folder.mkdir(parents=True, exist_ok=True)
        return settings

    @property
    def broker_folder(self) -> Path:
        return self.data_dir / "broker"

    @property
    def visibility_timeout(self) -> int:
        """Longer than any job may run, so Redis never redelivers a job that is still training."""
        return 2 * self.job_time_limit_seconds


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings().resolved()


def database_settings() -> Settings:
    """The settings as the environment gives them, unresolved (no directories made): what opening a database
    needs when the caller has no Settings at hand. A bad value is a ValueError naming its variable."""
    try:
        return Settings()
    except ValidationError as error:
        problems = "; ".join(f"RIGL_{'.'.join(map(str, e['loc'])).upper()}: {e['msg']}" if e["loc"] else e["msg"]
                             for e in error.errors())
        raise ValueError(problems) from None
