"""The README's "use the layers as a backend" example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

import sparse_adv_fast as saf

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_backend_example_runs_and_keeps_pruned_weights_zero():
    text = README.read_text()
    section = text.split("## Use the layers as a backend", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    torch.manual_seed(0)
    x = torch.rand(64, 1, 8, 8)
    y = torch.randint(0, 10, (64,))
    batches = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 64, 32)]
    my_model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 10))
    scope = {"my_model": my_model, "loader": batches, "test_loader": batches[:1]}
    exec(compile(code, str(README), "exec"), scope)  # noqa: S102 - our own README
    model = scope["model"]
    total = sum(m.weight.numel() for m in saf.nn.masked_layers(model).values())
    assert saf.sparsity(model) == round(0.9 * total) / total  # torch.prune's count rounding
    for layer in saf.nn.masked_layers(model).values():
        assert torch.all(layer.weight[~layer.weight_mask] == 0)
