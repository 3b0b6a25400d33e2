"""The server's settings, read once from ``KILN_SERVING_*`` variables (and SageMaker's own)."""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# SageMaker extracts the model archive (the artifact's files) here before it starts the container.
SAGEMAKER_MODEL_DIR = Path("/opt/ml/model")


class ServingSettings(BaseSettings):
    """Where the model is, where to listen, how many threads, what a request may be."""

    model_config = SettingsConfigDict(env_prefix="KILN_SERVING_", extra="ignore", populate_by_name=True)

    # An artifact directory (the unpacked .tar.gz, as SageMaker provides it) or the .tar.gz itself.
    model: Path = SAGEMAKER_MODEL_DIR
    host: str = "0.0.0.0"
    # SageMaker's multi-container endpoints name the port in SAGEMAKER_BIND_TO_PORT.
    port: int = Field(default=8080, ge=0, le=65535,
                      validation_alias=AliasChoices("KILN_SERVING_PORT", "SAGEMAKER_BIND_TO_PORT"))
    # Threads of the model's kernels; 0 = the container's CPU quota (cgroup cpu.max) or affinity.
    threads: int = Field(default=0, ge=0, le=1024)
    # Largest request body in bytes; 0 = derived from the model's inputs (kiln_serving.codec.body_limit).
    max_request_bytes: int = Field(default=0, ge=0)
    # Image requests: pixel (0..255) * image_scale + image_bias[channel], as Core ML's ImageType does.
    image_scale: float = 1.0
    image_bias: tuple[float, ...] = ()
    log_level: str = "info"

    @field_validator("image_bias")
    @classmethod
    def _bias_per_channel(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if len(value) not in (0, 1, 3):
            raise ValueError("KILN_SERVING_IMAGE_BIAS takes one value, or one per channel (three for RGB)")
        return value
