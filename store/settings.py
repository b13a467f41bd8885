"""Service configuration from `RIGL_*` environment variables, with embedded defaults.

With nothing set, everything lives under one data directory: an SQLite database, the artifacts,
and a filesystem message queue (kombu's own transport), so `rigl serve` needs no servers.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RIGL_", extra="ignore")

    data_dir: Path = Field(Path("~/.rigl"), description="Root of the embedded defaults.")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default sqlite in data_dir.")
    broker_url: str | None = Field(None, description="Celery broker; default kombu's filesystem transport.")
    artifact_dir: Path | None = Field(None, description="Checkpoints, exports, reports, uploads.")
    datasets_dir: Path | None = Field(None, description="Read-only directory for mnist/cifar/imagefolder data.")
    queue: str = Field("rigl-train", description="Celery queue the training tasks go to.")
    auth: bool | None = Field(None, description="Require API keys; default on except in the embedded mode.")
    max_active_jobs_per_owner: int = Field(20, ge=1, description="Queued + running jobs one owner may have.")
    max_body_bytes: int = Field(1024 * 1024, description="JSON request body cap (bytes received).")
    max_upload_bytes: int = Field(512 * 1024 * 1024, description="Dataset upload cap.")
    max_params: int = Field(100_000_000, description="Largest model a job may train.")
    max_epochs: int = Field(10_000)
    checkpoint_every_steps: int = Field(200, ge=1)
    checkpoint_min_seconds: float = Field(30.0, ge=0, description="…and at least this long since the last one.")
    event_every_steps: int = Field(20, ge=1)
    cancel_poll_seconds: float = Field(1.0, gt=0)
    lease_seconds: float = Field(120, gt=0, description="A running job whose heartbeat is older is requeued.")
    reaper_interval_seconds: float = Field(15, gt=0, description="How often the API looks for lost jobs.")
    job_time_limit_seconds: int = Field(3 * 24 * 3600)
    max_attempts: int = Field(3, ge=1)
    fault_kill_at_step: int | None = Field(None, description="Tests only: the worker SIGKILLs itself at this step.")

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
