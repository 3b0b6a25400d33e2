"""Kiln: a self-hosted, SageMaker-compatible model compilation service."""

__version__ = "0.1.0"
