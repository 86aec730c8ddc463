"""The device constants a traced TorchScript module carries, pointed at the device it is served on.

`torch.jit.trace` records `mask.to(device=x.device)`, `torch.arange(n, device=x.device)` and the like with the
tracing device as a constant (transformers' attention-mask code, our audio positions and fusion masks do this), so a
model exported on a CPU machine goes on moving its masks to the CPU when served on CUDA and fails there ("Expected
all tensors to be on the same device"). `torch.jit.load(map_location=...)` moves parameters and tensor constants,
not these. `retarget_devices` rewrites every Device constant of every graph of the module, right after loading and
before its first run (OpenAI's CLIP moves its traced models between devices the same way). Only TorchScriptRuntime
imports this, so only when TorchScript is served.
"""
from __future__ import annotations

from typing import Any


def device_constants(module: Any) -> list[Any]:
    """The `prim::Constant` nodes of Device type in the forward graphs of `module` and all its submodules."""
    nodes = []
    for sub in module.modules():
        try:
            graph = sub.graph
        except (AttributeError, RuntimeError):  # a submodule without a forward method
            continue
        nodes += [n for n in graph.findAllNodes("prim::Constant", True)
                  if n.output().type().kind() == "DeviceObjType"]
    return nodes


def retarget_devices(module: Any, device: str) -> int:
    """Point every Device constant of `module` at `device` (e.g. "cuda:0"); returns how many pointed elsewhere.
    A model that means to leave the device inside its forward would be changed too: ours never does."""
    changed = 0
    for node in device_constants(module):
        if node.s("value") != device:
            node.s_("value", device)
            changed += 1
    return changed
