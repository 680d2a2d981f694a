"""Objectives: the method of each paradigm, as a plain object handed the network.

``base`` holds the protocol every paradigm implements; ``diffusion``, ``masked`` and ``autoregressive``
the three methods; ``guidance`` (classifier-free guidance, written once) and ``logits`` (token
sampling) what they share; ``ode`` diffusion's ODE solvers (Euler, Heun, SD3's time shift). This module is the registry: a new paradigm is one module and one entry
in :data:`OBJECTIVES`.
"""

from __future__ import annotations

from flopmatch.config import ObjectiveConfig
from flopmatch.errors import UserError
from flopmatch.objectives.autoregressive import Autoregressive
from flopmatch.objectives.base import Objective, spec_of
from flopmatch.objectives.diffusion import Diffusion
from flopmatch.objectives.masked import Masked

__all__ = ["OBJECTIVES", "Objective", "make_objective", "spec_of"]

OBJECTIVES: dict[str, type[Objective]] = {c.name: c for c in (Diffusion, Masked, Autoregressive)}


def make_objective(cfg: ObjectiveConfig | str) -> Objective:
    """The objective a config names (diffusion | masked | autoregressive); a bare name gets default hyper-parameters."""
    cfg = ObjectiveConfig(name=cfg) if isinstance(cfg, str) else cfg
    if cfg.name not in OBJECTIVES:
        raise UserError(f"unknown objective {cfg.name!r}; choose one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[cfg.name](cfg)
