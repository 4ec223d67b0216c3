"""Weight mapping between PyTorch Geometric's ``torch_geometric.nn.models.ViSNet`` and ours.

``load_pyg_state_dict(model, pyg.state_dict())`` loads a PyG checkpoint; ``pyg_kwargs(cfg)`` gives
the PyG constructor arguments for the same architecture. torch_geometric is not imported here.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from ds4sci.models.visnet.config import ViSNetConfig

# (PyG key pattern, our key template); first match wins.
_RULES: list[tuple[str, str]] = [
    (r"representation_model\.embedding\.(.*)", r"embedding.\1"),
    (r"representation_model\.distance_expansion\.means", "rbf_means"),
    (r"representation_model\.distance_expansion\.betas", "rbf_betas"),
    (r"representation_model\.neighbor_embedding\.embedding\.(.*)", r"neighbor_embedding.\1"),
    (r"representation_model\.neighbor_embedding\.distance_proj\.(.*)", r"neighbor_distance_proj.\1"),
    (r"representation_model\.neighbor_embedding\.combine\.(.*)", r"neighbor_combine.\1"),
    (r"representation_model\.edge_embedding\.edge_proj\.(.*)", r"edge_proj.\1"),
    (r"representation_model\.vis_mp_layers\.(\d+)\.(.*)", r"layers.\1.\2"),
    (r"representation_model\.(out_norm|vec_out_norm)\.(.*)", r"\1.\2"),
    (r"output_model\.output_network\.(\d+)\.update_net\.0\.(.*)", r"head.\1.update_in.\2"),
    (r"output_model\.output_network\.(\d+)\.update_net\.2\.(.*)", r"head.\1.update_out.\2"),
    (r"output_model\.output_network\.(\d+)\.(vec[12]_proj)\.(.*)", r"head.\1.\2.\3"),
    (r"prior_model\.atomref\.weight", "atomref.weight"),
    (r"(mean|std)", r"\1"),
]
_DROP = {"prior_model.initial_atomref"}


def pyg_key_to_ours(key: str) -> str:
    for pattern, template in _RULES:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, template, key)
    raise KeyError(f"PyG ViSNet key {key!r} has no mapping to ds4sci's ViSNet")


def convert_pyg_state_dict(sd: dict[str, Tensor], max_z: int) -> dict[str, Tensor]:
    out = {}
    for key, value in sd.items():
        if key in _DROP:
            continue
        ours = pyg_key_to_ours(key)
        if ours == "atomref.weight" and value.shape[0] != max_z:
            # PyG sizes the atomref table by len(atomref); ours always has max_z rows.
            padded = value.new_zeros(max_z, 1)
            padded[: value.shape[0]] = value
            value = padded
        out[ours] = value
    return out


def load_pyg_state_dict(model: torch.nn.Module, sd: dict[str, Tensor], strict: bool = True):
    """Load a PyG ``ViSNet`` state dict into ``model`` (a ds4sci ViSNet of the same config)."""
    return model.load_state_dict(convert_pyg_state_dict(sd, model.cfg.max_z), strict=strict)


def pyg_kwargs(cfg: ViSNetConfig) -> dict:
    """Constructor keyword arguments of ``torch_geometric.nn.models.ViSNet`` for ``cfg``."""
    atomref = None if cfg.atomref is None else torch.tensor(cfg.atomref)
    return dict(lmax=cfg.lmax, vecnorm_type=cfg.vecnorm_type, trainable_vecnorm=cfg.trainable_vecnorm,
                num_heads=cfg.num_heads, num_layers=cfg.num_layers,
                hidden_channels=cfg.hidden_channels, num_rbf=cfg.num_rbf,
                trainable_rbf=cfg.trainable_rbf, max_z=cfg.max_z, cutoff=cfg.cutoff,
                max_num_neighbors=cfg.max_num_neighbors, vertex=cfg.vertex, atomref=atomref,
                reduce_op=cfg.reduce_op, mean=0.0 if cfg.mean is None else cfg.mean,
                std=1.0 if cfg.std is None else cfg.std, derivative=cfg.derivative)


def config_from_pyg(pyg_model) -> ViSNetConfig:
    """ViSNetConfig matching an instantiated PyG ``ViSNet``."""
    rep = pyg_model.representation_model
    from_layer = rep.vis_mp_layers[0]
    return ViSNetConfig(
        lmax=rep.lmax, vecnorm_type=rep.vecnorm_type or "none", trainable_vecnorm=rep.trainable_vecnorm,
        num_heads=rep.num_heads, num_layers=rep.num_layers, hidden_channels=rep.hidden_channels,
        num_rbf=rep.num_rbf, trainable_rbf=rep.trainable_rbf, max_z=rep.max_z,
        cutoff=float(rep.cutoff), max_num_neighbors=rep.max_num_neighbors,
        vertex=type(from_layer).__name__.endswith("Vertex"),
        reduce_op=pyg_model.reduce_op, mean=float(pyg_model.mean), std=float(pyg_model.std),
        derivative=pyg_model.derivative)
