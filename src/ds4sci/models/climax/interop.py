"""Interoperability with ClimaX's releases and with grids the patch does not divide.

- :func:`load_lightning_checkpoint`: the released ``5.625deg.ckpt`` / ``1.40625deg.ckpt``
  (a Lightning checkpoint whose ``state_dict`` keys carry a ``net.`` prefix) into a
  :class:`ClimaX`; a position embedding of another grid is interpolated as ClimaX's
  fine-tuning does (:func:`interpolate_pos_embed`), and a model whose ``default_vars`` are a
  subset of the checkpoint's takes those variables' rows.
- :func:`fit_grid` / :func:`restore_grid` (defined in ``ds4sci.data.climate``, which applies them
  to datasets): the crop/pad rule.

Crop/pad rule (``ClimaXConfig.img_size`` must be multiples of ``patch_size``):

* ``"crop"`` (default) keeps the first ``floor(H/p)*p`` rows and ``floor(W/p)*p`` columns. On
  ERA5 0.25 deg (721 x 1440, lat 90 .. -90) any p in {2, 4, 8, 16} drops only the last row, the
  South Pole, whose cos-lat weight is 0: the model sees and is scored on 720 x 1440 with those
  720 latitudes (lat weights are renormalised over them, a 721/720 change of scale).
* ``"pad"`` appends rows by repeating the last row (edge padding: no data is invented beyond the
  pole) and columns by wrapping around the globe (longitude is periodic). Predictions are cropped
  back with :func:`restore_grid` and scored on the original grid; the padded rows' latitudes are
  extrapolated with the grid spacing and clipped to +-90 deg (used only by the model's input).

Positions stay consistent: patch ``(i, j)`` covers rows ``i*p .. i*p+p-1`` of the fitted grid,
which are rows of the original grid in the same place for both rules.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ...data.climate import GRID_MODES, fit_grid, fitted_size, restore_grid  # noqa: F401 - the rule lives with the data
from .config import CLIMAX_VARS
from .model import ClimaX


def interpolate_pos_embed(pos_embed_1LD: torch.Tensor, new_grid: tuple[int, int],
                          old_grid: tuple[int, int] | None = None) -> torch.Tensor:
    """A position embedding of ``old_grid`` patches resized to ``new_grid`` by bicubic
    interpolation (align_corners=False), as ClimaX's ``interpolate_pos_embed``. ClimaX infers the
    old grid assuming W = 2H; so does this unless ``old_grid`` is given. As in ClimaX, nothing
    changes when the number of rows already matches."""
    n, dim = pos_embed_1LD.shape[-2:]
    if old_grid is None:
        gh = int((n // 2) ** 0.5)
        old_grid = (gh, 2 * gh)
    if old_grid[0] * old_grid[1] != n:
        raise ValueError(f"interpolate_pos_embed: {n} positions are not a {old_grid[0]}x{old_grid[1]} grid; "
                         f"pass old_grid=(rows, cols)")
    if old_grid[0] == new_grid[0]:
        return pos_embed_1LD
    grid = pos_embed_1LD.reshape(-1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
    out = F.interpolate(grid.float(), size=tuple(new_grid), mode="bicubic", align_corners=False)
    return out.permute(0, 2, 3, 1).flatten(1, 2).to(pos_embed_1LD.dtype)


def climax_state_dict(state: dict, model: ClimaX, checkpoint_vars: Sequence[str] = CLIMAX_VARS,
                      old_grid: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """A ClimaX state dict (``net.``-prefixed or not) made to fit ``model``: prefix stripped,
    position embedding interpolated to the model's grid, variable-indexed weights
    (patch embeddings, variable embedding, the head's last layer) reduced to the model's
    ``default_vars`` when those differ from ``checkpoint_vars``."""
    if any(k.startswith("net.") for k in state):
        state = {k[4:]: v for k, v in state.items() if k.startswith("net.")}
    state = dict(state)
    c = model.config
    if "pos_embed" in state and state["pos_embed"].shape[-2] != c.num_patches:
        state["pos_embed"] = interpolate_pos_embed(state["pos_embed"], c.grid, old_grid)
    if list(checkpoint_vars) != list(c.default_vars):
        missing = [v for v in c.default_vars if v not in checkpoint_vars]
        if missing:
            raise ValueError(f"climax_state_dict: the model's default_vars {missing} are not in the "
                             f"checkpoint's variables (checkpoint_vars has {len(checkpoint_vars)})")
        idx = torch.tensor([list(checkpoint_vars).index(v) for v in c.default_vars])
        state["var_embed"] = state["var_embed"][:, idx]
        if "token_embeds.proj_weights" in state:
            state["token_embeds.proj_weights"] = state["token_embeds.proj_weights"][idx]
            state["token_embeds.proj_biases"] = state["token_embeds.proj_biases"][idx]
        else:
            embeds = {k: state.pop(k) for k in [k for k in state if k.startswith("token_embeds.")]}
            for new, old in enumerate(idx.tolist()):
                for leaf in ("weight", "bias"):
                    state[f"token_embeds.{new}.proj.{leaf}"] = embeds[f"token_embeds.{old}.proj.{leaf}"]
        last = f"head.{2 * c.decoder_depth}"
        nv_old, p = len(checkpoint_vars), c.patch_size
        for leaf in ("weight", "bias"):  # the head's outputs are laid out (p_row, p_col, V)
            t = state[f"{last}.{leaf}"]
            t = t.reshape(p * p, nv_old, *t.shape[1:])[:, idx]
            state[f"{last}.{leaf}"] = t.reshape(p * p * len(idx), *t.shape[2:])
    return state


def load_lightning_checkpoint(model: ClimaX, path: str | os.PathLike, *, checkpoint_vars: Sequence[str] = CLIMAX_VARS,
                              old_grid: tuple[int, int] | None = None, strict: bool = True,
                              trusted: bool = False) -> list[str]:
    """Load a released ClimaX Lightning checkpoint into ``model``; returns the names left at
    their initial values (``strict=False`` skips weights whose shapes differ, as ClimaX's
    fine-tuning does for a head of other variables). ``trusted=True`` lets ``torch.load``
    unpickle arbitrary objects (Lightning stores hyper-parameters), only for files you trust."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_lightning_checkpoint: path={str(path)!r} is not a file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=not trusted)
    except Exception as e:
        raise ValueError(f"load_lightning_checkpoint: {path} could not be read with weights_only=True ({e}); "
                         f"if you trust the file, pass trusted=True") from e
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"load_lightning_checkpoint: {path} holds no state_dict (got {type(ckpt).__name__})")
    state = climax_state_dict(state, model, checkpoint_vars, old_grid)
    own = model.state_dict()
    skipped = []
    if not strict:
        skipped = [k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
        for k in skipped:
            del state[k]
    result = model.load_state_dict(state, strict=strict)
    return sorted(skipped + list(result.missing_keys))
