"""Model definition (blocks, roles, cut bits) and the split forward/backward helpers."""

from .architecture import (
    CLIENT,
    HEAD,
    SERVER,
    TAIL,
    Architecture,
    CutBits,
    NetworkSpec,
    architecture,
    block_keys,
    build_networks,
    canonical_state,
    load_canonical,
)

__all__ = [
    "CLIENT",
    "HEAD",
    "SERVER",
    "TAIL",
    "Architecture",
    "CutBits",
    "NetworkSpec",
    "architecture",
    "block_keys",
    "build_networks",
    "canonical_state",
    "load_canonical",
]
