"""Our model's layers, found by grouping the leaves of its 'params' and 'frozen' trees."""
from __future__ import annotations

import dataclasses
from typing import Any

from bmask_jax.weights.errors import WeightImportError


@dataclasses.dataclass(frozen=True)
class Layer:
    """One layer of our model: its module path (e.g. ('backbone', 'res2_0', 'conv1')), its
    kind (conv | deconv | dense | frozen_bn | bn_stats | group_norm | layer_norm | tensor) and its leaves
    {leaf name: (collection, full path in that collection, shape)}."""
    path: tuple[str, ...]
    kind: str
    leaves: dict[str, tuple[str, tuple[str, ...], tuple[int, ...]]]

    @property
    def name(self) -> str:
        return "/".join(self.path)

    def shape(self, leaf: str) -> tuple[int, ...]:
        return self.leaves[leaf][2]


def flatten(tree, prefix=()) -> dict[tuple[str, ...], Any]:
    """A nested dict (or FrozenDict) as {path tuple: leaf}."""
    if hasattr(tree, "items"):                       # dicts and FrozenDicts
        out = {}
        for k, v in tree.items():
            out.update(flatten(v, prefix + (str(k),)))
        return out
    return {prefix: tree}


def unflatten(flat: dict[tuple[str, ...], Any]) -> dict:
    """{path tuple: leaf} back into nested dicts."""
    out: dict = {}
    for path, value in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = value
    return out


def model_layers(params, frozen) -> list[Layer]:
    """Group the leaves of our 'params' and 'frozen' trees into layers.

    Conv: <path>/Conv_0/{kernel (kh, kw, in, out), bias?}; GroupNorm: <path>/GroupNorm_0/
    {scale, bias}; Deconv2x: <path>/{kernel (2, 2, in, out), bias}; Dense: <path>/{kernel
    (in, out), bias}; FrozenBN: frozen <path>/{scale, shift}; LayerNorm, and a BatchNorm's affine:
    <path>/{scale, bias}; a BatchNorm's running statistics: frozen <path>/{mean, var} (bn_stats);
    tensor: a module's own parameters that are none of these, copied as they are (ViT's
    pos_embed, an attention's rel_pos_h and rel_pos_w).
    """
    groups: dict[tuple[tuple[str, ...], str], dict] = {}
    for collection, tree in (("params", params), ("frozen", frozen)):
        for path, leaf in flatten(tree).items():
            wrapper = path[-2] if len(path) >= 2 and path[-2] in ("Conv_0", "GroupNorm_0") else None
            module = path[:-2] if wrapper else path[:-1]
            groups.setdefault((module, collection), {"wrapper": wrapper, "leaves": {}})
            groups[(module, collection)]["leaves"][path[-1]] = (collection, path, tuple(leaf.shape))
    layers = []
    for (module, collection), g in groups.items():
        leaves = g["leaves"]
        if collection == "frozen" and set(leaves) == {"scale", "shift"}:
            kind = "frozen_bn"
        elif collection == "frozen" and set(leaves) == {"mean", "var"}:
            kind = "bn_stats"                   # a BatchNorm's running statistics (its affine: layer_norm)
        elif g["wrapper"] == "Conv_0":
            kind = "conv"
        elif g["wrapper"] == "GroupNorm_0":
            kind = "group_norm"
        elif "kernel" in leaves and len(leaves["kernel"][2]) == 4:
            kind = "deconv"
        elif "kernel" in leaves and len(leaves["kernel"][2]) == 2:
            kind = "dense"
        elif set(leaves) == {"scale", "bias"}:
            kind = "layer_norm"
        elif "kernel" not in leaves and collection == "params":
            kind = "tensor"
        else:
            raise WeightImportError(f"model layer {'/'.join(module)} ({sorted(leaves)}) is of a kind the "
                                    "importer does not know")
        layers.append(Layer(module, kind, leaves))
    return layers
