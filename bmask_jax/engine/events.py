"""TensorBoard event files (tensorboardX's writer), opened without loading PyTorch."""
from __future__ import annotations

import sys


def summary_writer(logdir: str):
    """A tensorboardX SummaryWriter for logdir. tensorboardX imports torch when it is installed
    (to accept torch tensors, which we never pass): 1.8 s on every training or evaluation
    start on 2 CPU cores. Unless torch is already loaded, its import is refused while
    tensorboardX loads; a later `import torch` works as usual."""
    if "tensorboardX" not in sys.modules and "torch" not in sys.modules:
        sys.modules["torch"] = None          # makes `import torch` raise ImportError
        try:
            import tensorboardX  # noqa: F401
        finally:
            del sys.modules["torch"]
    from tensorboardX import SummaryWriter
    return SummaryWriter(logdir)
