"""The tile choices Kiln's default CPU schedule makes by heuristic, and the variants tuning measures."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TileKnobs:
    """Overrides of the anchor tile's heuristic choices: what tuning measures (see kiln_compiler.tuning)."""

    max_vectors: int | None = None  # output-channel vectors per tile (None: 2 or 1, or 3 or 1 for an odd multiple of 3)
    max_pixels: int = 14  # output pixels per tile
    channels_outer: bool | None = None  # loop order of the tile grid (None: by bytes moved)
    fused_pixels: bool | None = None  # tile the fused H*W axis with a tail tile (None: when it beats rh | H, rw | W)


def tile_variants() -> list[TileKnobs]:
    """The default tile and the alternatives tuning measures next to it."""
    out = [DEFAULT_KNOBS]
    for max_vectors in (1, 2, 3):  # variants that give the same schedule are measured once
        for max_pixels in (14, 8, 4):
            for channels_outer in (True, False):
                out.append(TileKnobs(max_vectors, max_pixels, channels_outer))
    # the row tile where the heuristic takes a fused-pixel tile (ADR 0025), and a fused 2-vector tile
    # where it keeps rows: two more builds at most per kernel, each measured within the deadline
    out.append(TileKnobs(fused_pixels=False))
    out.append(TileKnobs(max_vectors=2, max_pixels=6, fused_pixels=True))
    return out


DEFAULT_KNOBS = TileKnobs()  # the heuristic's own choices
