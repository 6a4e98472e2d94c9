"""Weight import: detectron2 Mask R-CNN / BMask R-CNN checkpoints and ImageNet backbones (MSRA
Caffe2 blobs, torchvision, HRNet) into our parameter tree, the 'frozen' collection and an Orbax
checkpoint.

    bmask-jax import-weights --config configs/bmask_rcnn.py:r50_fpn_1x \\
        --source model_final.pth --output runs/imported [--kind auto|detectron2|msra|torchvision|hrnet]

then `python -m bmask_jax.main --config ... --workdir runs/imported --mode evaluate` (or train,
which starts from the imported step-0 checkpoint), with the config changes the import prints.

Nothing here executes code from a checkpoint: pickles go through an unpickler that knows only
numpy's array reconstruction (and, for PyTorch files, torch's tensor rebuild, which we
reimplement over numpy), and refuses every other global. PyTorch is not needed.

Layouts (SPEC section 10) and what becomes of them here:
    conv            (out, in, kh, kw)  -> kernel (kh, kw, in, out)
    transposed conv (in, out, kh, kw)  -> kernel (kh, kw, in, out)
    linear          (out, in)          -> kernel (in, out); box_head.fc1's input is flattened
                                          (C, H, W) by detectron2 and (H, W, C) by us
    FrozenBN        weight, bias, running_mean, running_var
                                       -> frozen scale = weight / sqrt(var + 1e-5),
                                          shift = bias - mean * scale
    MSRA BN blobs   _s, _b             -> already scale and shift
"""
# The pieces: errors.py (the two exceptions), safe_pickle.py (the restricted unpickler and the
# PyTorch readers), layers.py (our model's layers), layouts.py (the detectron2 / torchvision /
# MSRA name tables), tensors.py (one layer's arrays, torch layouts -> ours), convert.py (whole
# checkpoints: checks, hints, the report, the config the weights imply), importer.py (into a
# train state and an Orbax checkpoint) and __main__.py (the command). The train state itself is
# bmask_jax.engine.state's.
from bmask_jax.weights.convert import ImportReport, convert, detect_kind, implied_config_changes
from bmask_jax.weights.errors import UnsafeCheckpointError, WeightImportError
from bmask_jax.weights.importer import apply_config_changes, config_flags_for, import_weights, load_into_state
from bmask_jax.weights.layouts import KINDS
from bmask_jax.weights.safe_pickle import read_checkpoint, read_raw
from bmask_jax.weights.tensors import conv_kernel, deconv_kernel, dense_kernel, frozen_bn

__all__ = ["KINDS", "ImportReport", "UnsafeCheckpointError", "WeightImportError", "apply_config_changes",
           "config_flags_for", "conv_kernel", "convert", "deconv_kernel", "dense_kernel", "detect_kind",
           "frozen_bn", "implied_config_changes", "import_weights", "load_into_state", "read_checkpoint",
           "read_raw"]
