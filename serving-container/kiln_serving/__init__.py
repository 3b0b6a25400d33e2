"""Kiln's inference server: SageMaker's inference-container contract over a Kiln artifact.

``GET /ping`` and ``POST /invocations`` on port 8080 (see docs/adr/0013-serving-container.md);
``python -m kiln_serving`` in the serving images, ``kiln serve-model ARTIFACT`` locally.
"""
