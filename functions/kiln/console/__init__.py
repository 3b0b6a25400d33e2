"""Kiln's web console (``kiln serve`` at /console, ``kiln console --api URL`` for a deployed Kiln)."""
