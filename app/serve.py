"""`stpm serve`: start the scoring service under uvicorn.

Settings come from STPM_* environment variables and a `.env` file (see app.settings); flags given
here override them. They are passed on through the environment, so every uvicorn worker process
builds the same settings.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import TYPE_CHECKING

from app.commands import Command, load_settings

if TYPE_CHECKING:
    from app.settings import Settings

FLAG_ENV = {
    "host": "STPM_HOST",
    "port": "STPM_PORT",
    "models_dir": "STPM_MODELS_DIR",
    "workers": "STPM_WORKERS",
    "providers": "STPM_PROVIDERS",
    "intra_op_threads": "STPM_INTRA_OP_THREADS",
    "default_model": "STPM_DEFAULT_MODEL",
    "log_level": "STPM_LOG_LEVEL",
    "max_files": "STPM_MAX_FILES",
    "max_request_bytes": "STPM_MAX_REQUEST_BYTES",
    "batch_max_images": "STPM_BATCH_MAX_IMAGES",
    "batch_wait_ms": "STPM_BATCH_WAIT_MS",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("service (flags override STPM_* environment variables and .env)")
    g.add_argument("--host", help="bind address (default 127.0.0.1; 0.0.0.0 in a container)")
    g.add_argument("--port", type=int, help="TCP port (default 8000)")
    g.add_argument("--models-dir", help="model store folder (default ./models)")
    g.add_argument("--workers", type=int, help="uvicorn worker processes (default 1)")
    g.add_argument("--providers", help="ONNX Runtime providers, comma-separated: auto, cuda, tensorrt, cpu")
    g.add_argument("--intra-op-threads", type=int, help="ONNX Runtime intra-op threads")
    g.add_argument("--default-model", help="model used when a request names none: NAME or NAME/VERSION")
    g.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug", "trace"])
    g.add_argument("--max-files", type=int, help="files per /score request")
    g.add_argument("--max-request-bytes", type=int, help="request body limit in bytes")
    g.add_argument("--batch-max-images", type=int, help="images per inference batch")
    g.add_argument("--batch-wait-ms", type=float, help="how long a request waits for others to batch with")
    g.add_argument("--env-file", help="read settings from this file instead of ./.env")


def _export_env_file(settings: Settings) -> None:
    """Workers rebuild settings from the environment: export what the .env file said."""
    from pydantic import SecretStr

    for name, value in settings.model_dump().items():
        if value is not None and f"STPM_{name.upper()}" not in os.environ:
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            elif name == "providers":
                value = ",".join(value)
            os.environ[f"STPM_{name.upper()}"] = str(value)


def main(args: argparse.Namespace) -> int:
    for attr, env in FLAG_ENV.items():
        value = getattr(args, attr, None)
        if value is not None:
            os.environ[env] = str(value)
    env_file = getattr(args, "env_file", None)
    settings = load_settings("serve", env_file)
    if settings is None:
        return 2
    if env_file:
        _export_env_file(settings)

    import uvicorn

    logging.basicConfig(level=settings.log_level.upper() if settings.log_level != "trace" else "DEBUG",
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not settings.models_dir.is_dir():
        logging.getLogger("app").warning(
            "model store %s does not exist yet; /score answers 409 until a model is trained", settings.models_dir
        )
    from app.protocol import protocol_class

    uvicorn.run(
        "app.main:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_level=settings.log_level,
        access_log=settings.log_level in ("debug", "trace"),
        http=protocol_class(),  # JSON error bodies for requests the HTTP parser refuses; head size and time
        h11_max_incomplete_event_size=settings.max_header_bytes,
        timeout_keep_alive=max(1, round(settings.keep_alive_timeout_s)),
        limit_concurrency=settings.max_concurrency,
        timeout_graceful_shutdown=int(settings.shutdown_timeout_s) or None,
    )
    return 0


COMMAND = Command("serve", "start the HTTP service (uvicorn)", __doc__, add_arguments, main)
register = COMMAND.register  # the `stpm.commands` entry point (pyproject.toml)

if __name__ == "__main__":  # python -m app.serve
    sys.exit(COMMAND.run("python -m app.serve"))
