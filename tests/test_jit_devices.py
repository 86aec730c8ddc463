"""app.jit_devices on CPU: a module traced on the CPU carries "cpu" as Device constants in its graphs (submodules
included); `retarget_devices` rewrites every one of them, the rewritten graph is the one that runs, and pointing them
back answers exactly as before. tests/test_gpu.py serves such a model on CUDA (`retargeted` > 0 there)."""
from __future__ import annotations

import pytest

from app.jit_devices import device_constants, retarget_devices

torch = pytest.importorskip("torch")


class Inner(torch.nn.Module):
    def forward(self, x, mask):
        steps = torch.arange(x.shape[1], device=x.device)  # traced: device=cpu
        return x * mask.to(device=x.device, dtype=torch.float32)[..., None] + 0 * steps.float().mean()


class Outer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Inner()
        self.lin = torch.nn.Linear(4, 2)

    def forward(self, x, mask):
        return self.lin(self.inner(x, mask)).sum(1) + torch.ones(1, device=x.device)


@pytest.fixture()
def traced(tmp_path):
    x, mask = torch.randn(2, 3, 4), torch.tensor([[1, 1, 0], [1, 0, 0]])
    path = tmp_path / "model.pt"
    torch.jit.trace(Outer(), (x, mask)).save(str(path))
    return torch.jit.load(str(path)), (x, mask), path


def test_every_traced_device_constant_is_rewritten_in_every_submodule(traced):
    module, inputs, path = traced
    nodes = device_constants(module)
    assert len(nodes) >= 2 and {n.s("value") for n in nodes} == {"cpu"}
    assert retarget_devices(module, "cuda:0") == len(nodes)
    assert {n.s("value") for n in device_constants(module)} == {"cuda:0"}
    assert 'torch.device("cuda:0")' in module.inner.code and 'torch.device("cpu")' not in module.inner.code
    assert retarget_devices(module, "cuda:0") == 0  # already there
    assert retarget_devices(module, "cpu") == len(nodes)
    assert torch.equal(module(*inputs), torch.jit.load(str(path))(*inputs))


def test_the_rewritten_graph_is_the_one_that_runs(traced):
    module, inputs, _ = traced
    retarget_devices(module, "meta")  # a device a CPU machine has: the CPU inputs now meet meta tensors
    with pytest.raises(Exception):
        module(*inputs)


def test_the_torchscript_runtime_retargets_only_on_cuda(traced):
    from app.runtime import TorchScriptRuntime

    rt = TorchScriptRuntime(traced[2], "cpu", ["x", "mask"])
    assert rt.retargeted == 0 and {n.s("value") for n in device_constants(rt.module)} == {"cpu"}
