"""Service settings: environment variables with the prefix STPM_ (and a `.env` file), flags override.

Example: STPM_MODELS_DIR=/data/models STPM_API_KEY=secret STPM_PORT=9000 stpm serve
List settings accept JSON (`["cuda", "cpu"]`) or a comma-separated string (`cuda,cpu`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from stpm.imaging.decode import DEFAULT_MAX_PIXELS
from stpm.options.sections import MAX_TILE_PIXELS


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="STPM_", env_file=".env", env_file_encoding="utf-8", extra="ignore", frozen=True
    )

    # Where and how to listen (used by `stpm serve`).
    models_dir: Path = Field(Path("models"), description="The model store: models/<name>/<vN>/")
    host: str = Field("127.0.0.1", description="Bind address; 0.0.0.0 in a container")
    port: int = Field(8000, ge=0, le=65535)
    workers: int = Field(1, ge=1, description="uvicorn worker processes (each loads its own models)")
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = "info"

    # Inference.
    providers: Annotated[tuple[str, ...], NoDecode] = Field(
        ("auto",), description="ONNX Runtime providers in order of preference: auto, cuda, tensorrt, cpu"
    )
    intra_op_threads: int | None = Field(None, ge=0, description="ONNX Runtime intra-op threads (None: ORT's default)")
    inter_op_threads: int | None = Field(None, ge=0)
    backend: Literal["auto", "onnxruntime", "openvino"] = Field(
        "auto", description="Inference backend (stpm.backends); auto: the fastest on this machine, timed at load"
    )
    precision: Literal["auto", "fp32", "fp16", "bf16", "int8"] = Field(
        "auto", description="auto: the fastest precision the bundle records as holding parity and this machine "
        "runs natively; a precision the bundle lacks falls back to fp32 with a warning"
    )
    default_model: str | None = Field(
        None, description="Model used when a request names none: NAME or NAME/VERSION. "
        "Unset: the only model, or the most recently published one"
    )
    warmup: bool = Field(True, description="Run one inference when a model is loaded (needed for /readyz)")
    max_loaded_models: int = Field(4, ge=1, description="Scorers kept in memory (least recently used evicted)")
    reload_interval_s: float = Field(
        2.0, ge=0, description="How often the model store is polled for new/activated versions (0: only on requests)"
    )

    # Micro-batching of concurrent requests (per loaded model).
    batch_max_images: int | None = Field(
        None, ge=1, description="Images per batch at most (unset: the measured default of the model's backend)"
    )
    batch_wait_ms: float | None = Field(
        None, ge=0, description="How long the first queued request waits for company before its batch runs "
        "(unset: the measured default of the model's backend)"
    )
    inference_threads: int = Field(1, ge=1, description="Batches running at once per model")
    render_threads: int = Field(
        1, ge=1, description="Threads rendering heatmaps (off the inference thread: a batch renders while the next infers)"
    )

    # Request limits (bad input never yields a 5xx).
    max_files: int = Field(32, ge=1, description="Files per /score request")
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1, description="Bytes per uploaded file")
    max_request_bytes: int = Field(
        100 * 1024 * 1024, ge=1, description="Bytes per request body (Content-Length and streamed)"
    )
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description="Decoded pixels per image (decompression bombs)")
    body_timeout_s: float = Field(
        20.0, gt=0, description="A request whose body stops arriving for this long is answered 408 (stalled uploads)"
    )
    body_deadline_s: float = Field(
        300.0, gt=0, description="A request body still arriving this long after its head is answered 408 (a body "
        "dripped a byte at a time; max_request_bytes / body_deadline_s is the slowest upload rate served)"
    )
    max_header_bytes: int = Field(
        64 * 1024, ge=1024, description="Bytes of a request's head (request line and headers) at most: 431 beyond, "
        "checked as it arrives, before the HTTP parser holds more than one read (256 KiB) past it"
    )
    header_timeout_s: float = Field(
        10.0, gt=0, description="A request whose head has not fully arrived this long after its first byte (or a new "
        "connection that sends nothing) is answered 408 and closed (slowly dripped headers)"
    )
    keep_alive_timeout_s: float = Field(5.0, gt=0, description="An idle keep-alive connection is closed after this long")
    max_concurrency: int = Field(
        200, ge=1, description="Connections and requests at once per worker process; beyond, uvicorn answers 503"
    )
    shutdown_timeout_s: float = Field(
        30.0, ge=0, description="On SIGTERM, requests still running after this long are cancelled (0: wait for all)"
    )
    max_request_pixels: int = Field(
        3 * DEFAULT_MAX_PIXELS, ge=1, description="Memory budget of one /score request: decoded pixels of all its "
        "images plus the pixels of every heatmap it asks for (see app/budget.py)"
    )
    max_request_tile_pixels: int = Field(
        MAX_TILE_PIXELS, ge=1, description="Work budget of one /score request: its tiles x tile^2 pixels of model "
        "input at the model's scale (default: the largest image any model trained here may take, "
        "stpm.options.MAX_TILE_PIXELS; see app/budget.py)"
    )

    # Training jobs (POST /train; see app/jobs and docs/SERVICE.md "Training jobs").
    data_dir: Path | None = Field(
        None, description="Job store (jobs.sqlite3) and the uploads of training jobs (default: `data` beside models_dir)"
    )
    train_enabled: bool = Field(True, description="Serve /train and run a local training worker")
    train_concurrency: int = Field(1, ge=1, description="Training jobs running at once (one per device)")
    train_min_images: int = Field(10, ge=3, description="Good images a training upload needs at least")
    train_max_images: int = Field(5000, ge=1, description="Images per training upload at most")
    train_max_archive_bytes: int = Field(
        2 * 1024**3, ge=1, description="Uncompressed bytes of a zip/tar upload at most (zip bombs)"
    )
    train_upload_retention: Literal["keep", "delete"] = Field(
        "delete", description="Uploaded images of finished jobs: delete them when the job ends, or keep them"
    )
    train_max_queued: int = Field(20, ge=1, description="Jobs waiting to run at most; POST /train answers 429 beyond")
    train_device: str = Field("auto", description="Training device: auto, cpu, cuda, cuda:1")
    train_threads: int | None = Field(None, ge=1, description="torch CPU threads of a training process")
    train_weights_dir: Path | None = Field(None, description="Folder with ImageNet teacher weights (offline hosts)")
    train_cancel_grace_s: float = Field(
        30.0, ge=0, description="A cancelled running job that has not stopped after this long is killed"
    )
    train_max_epochs: int = Field(1000, ge=1, description="Largest `epochs` a job may ask for")

    # Scale-out (docs/SCALING.md): Celery workers on a Redis broker, a shared job database, shared storage.
    queue: Literal["local", "celery"] = Field(
        "local", description="Who runs training jobs: `local` (a worker thread of this server) or `celery` "
        "(`stpm worker` processes on any host, fed through broker_url)"
    )
    broker_url: SecretStr | None = Field(None, description="Celery broker for queue=celery: redis://HOST:6379/0")
    broker_visibility_timeout_s: float = Field(
        3600.0, gt=0, description="Redis redelivers a task left unacknowledged this long (its worker died); "
        "the job row decides whether it runs"
    )
    jobs_db: SecretStr | None = Field(
        None, description="Job store: unset = SQLite in data_dir; postgresql://USER:PASS@HOST:5432/DB when scaled"
    )
    jobs_db_pool_size: int = Field(4, ge=1, description="PostgreSQL connections per process at most")
    job_heartbeat_s: float = Field(5.0, gt=0, description="How often a Celery worker marks its running job alive")
    job_stale_after_s: float = Field(
        60.0, gt=0, description="A running job without a heartbeat this long belonged to a dead worker: it is failed"
    )
    replica_name: str | None = Field(None, description="This process in metrics and logs (default HOST:PORT)")

    # Security.
    api_key: SecretStr | None = Field(
        None, description="When set, every route except /healthz and /readyz needs X-API-Key or Authorization: Bearer"
    )
    public_docs: bool = Field(False, description="Serve /docs and /openapi.json without the API key")

    @field_validator("providers", mode="before")
    @classmethod
    def _split_providers(cls, v):
        if isinstance(v, str):
            s = v.strip()
            if s.startswith("["):
                import json

                return tuple(json.loads(s))
            return tuple(p.strip() for p in s.split(",") if p.strip())
        return v

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, v):
        return None if v in ("", None) else v

    @field_validator("default_model", "data_dir", "train_weights_dir", "train_threads", "broker_url", "jobs_db",
                     "replica_name", "batch_max_images", "batch_wait_ms", mode="before")
    @classmethod
    def _empty_model_is_none(cls, v):
        return None if v in ("", None) else v

    @model_validator(mode="after")
    def _scaled_needs_a_broker(self):
        if self.queue == "celery" and self.broker_url is None:
            raise ValueError("queue=celery needs broker_url (STPM_BROKER_URL=redis://HOST:6379/0)")
        db = self.jobs_db.get_secret_value() if self.jobs_db is not None else None
        if db is not None and not db.startswith(("postgresql://", "postgres://", "sqlite:///")):
            raise ValueError("jobs_db: use postgresql://USER:PASS@HOST:5432/DB or sqlite:///PATH")
        return self

    @property
    def jobs_store_target(self) -> str:
        """What app.jobs.store.JobStore opens: the jobs_db URL, or jobs.sqlite3 in the data directory."""
        if self.jobs_db is not None:
            return self.jobs_db.get_secret_value()
        return str(self.jobs_data_dir / "jobs.sqlite3")

    @property
    def replica(self) -> str:
        import socket

        return self.replica_name or f"{socket.gethostname()}:{self.port}"

    @property
    def jobs_data_dir(self) -> Path:
        """`data_dir`, or `data` beside the model store."""
        return (self.data_dir or Path(self.models_dir).resolve().parent / "data").resolve()
