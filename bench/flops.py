"""Count model FLOPs (2×MAC) with torch's FlopCounterMode, for the ensemble's lower bound.

The bound is ensemble FLOPs ÷ the matmul FLOP/s measured in the same run (bench/machine.py): no
implementation of the same network on this CPU can be much faster than that.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode


def model_gflops(model: torch.nn.Module, input_size: int = 224, in_chans: int = 3,
                 batch: int = 1) -> float:
    """GFLOP of one forward pass over ``batch`` images (FlopCounterMode counts 2 per MAC)."""
    model = model.eval()
    x = torch.zeros(batch, in_chans, input_size, input_size)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / 1e9


def timm_gflops(name: str, input_size: int = 224, in_chans: int = 3) -> float:
    """GFLOP per image for a timm architecture with random weights (no downloads)."""
    import timm

    model = timm.create_model(name, pretrained=False, num_classes=1, in_chans=in_chans)
    return model_gflops(model, input_size, in_chans)


if __name__ == "__main__":
    for name in ("convnext_tiny", "convnext_atto"):
        print(f"{name}: {timm_gflops(name):.2f} GFLOP per 224² image")
