"""Linear layers on CPU (F.linear): plain and gated (SwiGLU) forward against
plain float64 PyTorch."""

import torch
import torch.nn.functional as F

from ember.layers.linear import MergedColumnParallelLinear, RowParallelLinear, dense_linear


def test_gated_forward_is_silu_and_mul_then_linear():
    torch.manual_seed(0)
    gate_up_proj = MergedColumnParallelLinear(48, [80, 80], bias=False, dtype=torch.float32)
    down = RowParallelLinear(80, 48, bias=True, dtype=torch.float32)
    for p in (gate_up_proj.weight, down.weight, down.bias):
        p.data.normal_(0, 0.1)
    x = torch.randn(5, 48)
    gate_up = gate_up_proj(x)
    gate, up = gate_up.double().split(80, dim=-1)
    ref = (F.silu(gate) * up) @ down.weight.double().T + down.bias.double()
    torch.testing.assert_close(down.forward_gated(gate_up).double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dense_linear(x, gate_up_proj.weight).double(), x.double() @ gate_up_proj.weight.double().T,
                               rtol=1e-5, atol=1e-6)
