"""Batch-norm folding for gradient attacks: an eval-mode conv -> BatchNorm2d pair is one
convolution with per-channel scaled weights and a shifted bias.

In eval mode a BatchNorm2d is the affine map ``x * s + t`` per channel (``s = gamma /
sqrt(var + eps)``, ``t = beta - mean * s``), so ``bn(conv(x, w, b))`` is exactly
``conv(x, w * s, b * s + t)``: a sparse conv keeps its mask (scaling keeps zeros zero) and
the batch norm's forward and backward passes disappear from every attack step. On a CPU
ResNet-18 they are about a fifth of a PGD step.

What is folded is decided on the traced graph (:mod:`torch.fx`): a conv whose only user
is an eval-mode BatchNorm2d with running statistics, neither carrying hooks, with zero
padding. A ReLU (module, function or method, no hooks) that alone reads a conv's output,
batch norm folded or not, is folded too: where the sparse kernels run that conv they
clamp its output as they store it and gate the output gradient as they read it, saving
the ReLU's two passes over the activation. Every folded conv, plain ones included (with
a mask that keeps every weight), runs through the masked op. A residual sum that alone
reads a conv's output is added into that output, and a ReLU that alone reads the sum
runs in place. In a model with something to fold, each ``nn.MaxPool2d`` whose windows
tile its input (VGG's 2x2 pools) runs on the window kernels of
:mod:`~sparse_adv_fast.ops.max_pool2d`, and any other runs its CPU forward in
channels_last (same values and gradients, see :class:`_MaxPool`). Only a model holding a
conv and such a batch norm, or a masked conv, is traced (once per module tree: tracing
runs its forward on proxies), and one that does not trace runs as it is. The folded
model differs from the model only by float rounding (the scaling is applied to the
weight instead of the output); attacks use it for their search, and every caller
measures robustness on the model itself.
"""

from __future__ import annotations

import contextlib
import operator
import weakref
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .. import functional as SF
from ..nn.masked import _MaskedMixin
from ..ops import _cache
from ..ops.max_pool2d import WindowMaxPool, tiling_kernel


class _FoldedConv(nn.Module):
    """``conv`` followed by the batch norm folded into it (if any) and by a ReLU (if
    ``relu``: the sparse kernels fuse it); weights set per attack.

    A plain ``nn.Conv2d`` runs as a masked conv whose mask keeps every weight (the torch
    reference at that density), so its ReLU folds the same way."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d | None) -> None:
        super().__init__()
        self.conv, self.bn = [conv], [bn]  # lists: not registered as submodules
        self.relu = False
        self.weight: Tensor | None = None
        self.bias: Tensor | None = None
        self._kept: Tensor | None = None  # the all-kept mask of a plain conv

    def refresh(self) -> list[Tensor]:
        """Fold the current weights and statistics; returns the new tensors."""
        conv, bn = self.conv[0], self.bn[0]
        if bn is None:  # the conv's own parameters, frozen by the attack itself
            self.weight, self.bias = conv.weight, conv.bias
            return []
        with torch.no_grad():
            scale = bn.weight if bn.affine else torch.ones_like(bn.running_var)
            scale = scale / torch.sqrt(bn.running_var + bn.eps)
            shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
            bias = conv.bias if conv.bias is not None else torch.zeros_like(scale)
            self.weight = (conv.weight * scale.reshape(-1, 1, 1, 1).to(conv.weight)).detach()
            self.bias = ((bias - bn.running_mean) * scale + shift).to(conv.weight).detach()
        return [self.weight, self.bias]

    def release(self) -> None:
        self.weight = self.bias = None

    def forward(self, x: Tensor) -> Tensor:
        conv = self.conv[0]
        args = (conv.stride, conv.padding, conv.dilation, conv.groups)
        if isinstance(conv, _MaskedMixin):
            # Unfolded, the layer's own weight: its bookkeeping (masked in place) as it does.
            mask = conv.weight_mask if self.bn[0] is not None else conv._masked_inputs()[1]
        else:
            mask = self._kept
            if mask is None or mask.shape != self.weight.shape or mask.device != self.weight.device:
                mask = self._kept = torch.ones(self.weight.shape, dtype=torch.bool,
                                               device=self.weight.device)
        return SF.masked_conv2d(x, self.weight, mask, self.bias, *args, relu=self.relu)


class _MaxPool(nn.Module):
    """``nn.MaxPool2d`` (no indices returned) with the module's values and gradients: on
    the window kernels where its windows tile the input (on a 32x16x32x32 batch, forward
    and backward 0.12 ms against 0.8 ms on the channels_last path), else its CPU forward on a
    channels_last copy, whose kernel is vectorised across channels (about 4x faster than
    the NCHW one on a 32x32x32x32 batch), and its backward by the NCHW kernel from the same
    indices (both kernels pick the same element of each window, ties and NaN included)."""

    def __init__(self, pool: nn.MaxPool2d) -> None:
        super().__init__()
        self.pool = [pool]  # a list: not registered as a submodule

    def forward(self, x: Tensor) -> Tensor:
        p = self.pool[0]
        k = tiling_kernel(x, p.kernel_size, p.stride, p.padding, p.dilation, p.ceil_mode)
        if k is not None:
            return WindowMaxPool.apply(x, k)
        if x.device.type != "cpu" or x.dim() != 4 or not x.is_contiguous():
            return p(x)
        return _ChannelsLastMaxPool.apply(x, p.kernel_size, p.stride, p.padding, p.dilation,
                                          p.ceil_mode)


class _ChannelsLastMaxPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, kernel, stride, padding, dilation, ceil_mode):
        y, idx = F.max_pool2d(x.contiguous(memory_format=torch.channels_last), kernel, stride,
                              padding, dilation, ceil_mode, return_indices=True)
        idx = idx.contiguous()
        ctx.save_for_backward(x, idx)
        ctx.args = (kernel, stride, padding, dilation, ceil_mode)
        return y.contiguous()

    @staticmethod
    def backward(ctx, gy):
        x, idx = ctx.saved_tensors
        gx = torch.ops.aten.max_pool2d_with_indices_backward(gy.contiguous(), x, *ctx.args, idx)
        return gx, None, None, None, None, None


def _fast_pool(m: nn.Module) -> bool:
    return (type(m) is nn.MaxPool2d and not m.return_indices
            and not (m._forward_hooks or m._forward_pre_hooks))


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _MaskedMixin) or super().is_leaf_module(m, qualname)


def _foldable_bn(m: nn.Module) -> bool:
    return (isinstance(m, nn.BatchNorm2d) and not m.training and m.track_running_stats
            and m.running_mean is not None and m.running_var is not None
            and not (m._forward_hooks or m._forward_pre_hooks))


def _foldable_conv(m: nn.Module) -> bool:
    return (isinstance(m, nn.Conv2d) and m.padding_mode == "zeros"
            and not isinstance(m.padding, str)
            and not (m._forward_hooks or m._forward_pre_hooks))


def _masked_conv(m: nn.Module) -> bool:
    return isinstance(m, _MaskedMixin) and _foldable_conv(m)


_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_, F.relu_)


def _relu_input(node: fx.Node, mods: dict[str, nn.Module]) -> fx.Node | None:
    """The input of ``node`` when it is a plain ReLU (module, function or method), else None."""
    if node.op == "call_module":
        m = mods.get(node.target)
        ok = type(m) is nn.ReLU and not (m._forward_hooks or m._forward_pre_hooks)
    elif node.op == "call_function":
        ok = node.target in _RELU_FUNCTIONS and set(node.kwargs) <= {"inplace"}
    else:
        ok = node.op == "call_method" and node.target in ("relu", "relu_") and not node.kwargs
    if not ok or len(node.args) != 1 or not isinstance(node.args[0], fx.Node):
        return None
    return node.args[0]


class _Plan:
    """The folded module of one model and the module identities it was built from."""

    def __init__(self, model: nn.Module) -> None:
        self.signature = _signature(model)
        self.module: fx.GraphModule | None = None
        self.folds: list[_FoldedConv] = []
        if model._forward_hooks or model._forward_pre_hooks:  # the graph would skip them
            return
        mods = list(model.modules())
        if not ((any(map(_foldable_bn, mods)) and any(map(_foldable_conv, mods)))
                or any(map(_masked_conv, mods))):
            return  # nothing to fold: the forward is not traced (it may have side effects)
        try:
            graph = _Tracer().trace(model)
        except Exception:  # noqa: BLE001 - any untraceable model simply runs unfolded
            return
        gm = fx.GraphModule(model, graph)
        mods = dict(gm.named_modules())
        for node in list(gm.graph.nodes):
            if node.op != "call_module" or not _foldable_bn(mods.get(node.target)):
                continue
            src = node.args[0] if len(node.args) == 1 and not node.kwargs else None
            if not (isinstance(src, fx.Node) and src.op == "call_module"
                    and _foldable_conv(mods.get(src.target)) and len(src.users) == 1):
                continue
            new = self._insert(gm, src, _FoldedConv(mods[src.target], mods[node.target]))
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            gm.graph.erase_node(src)
        self._fuse_relus(gm)
        self._residuals_in_place(gm)
        if self.folds:  # a traced model with a fold: its max-pools take the faster kernel
            pools = [n for n in gm.graph.nodes
                     if n.op == "call_module" and _fast_pool(mods.get(n.target))]
            for i, node in enumerate(pools):
                gm.add_submodule(f"_saf_pool_{i}", _MaxPool(mods[node.target]))
                node.target = f"_saf_pool_{i}"
            gm.recompile()
            self.module = gm

    def _insert(self, gm: fx.GraphModule, src: fx.Node, fold: _FoldedConv) -> fx.Node:
        """A call of ``fold`` on ``src``'s inputs, placed right after ``src``."""
        name = f"_saf_folded_{len(self.folds)}"
        gm.add_submodule(name, fold)
        self.folds.append(fold)
        with gm.graph.inserting_after(src):
            return gm.graph.call_module(name, src.args, src.kwargs)

    def _fuse_relus(self, gm: fx.GraphModule) -> None:
        """Fold each ReLU whose input is a conv (folded or not) used by it alone."""
        mods = dict(gm.named_modules())
        for node in list(gm.graph.nodes):
            src = _relu_input(node, mods)
            if src is None or src.op != "call_module" or len(src.users) != 1:
                continue
            m = mods.get(src.target)
            if isinstance(m, _FoldedConv):
                fold = m
            elif _foldable_conv(m):
                fold = _FoldedConv(m, None)
                new = self._insert(gm, src, fold)
                src.replace_all_uses_with(new)
                gm.graph.erase_node(src)
                src = new
            else:
                continue
            fold.relu = True
            node.replace_all_uses_with(src)
            gm.graph.erase_node(node)

    def _residuals_in_place(self, gm: fx.GraphModule) -> None:
        """A residual sum ``conv(x) + shortcut`` (the conv's output read by the sum alone,
        no ReLU fused into it) is added into the conv's output, and a ReLU that alone
        reads the sum runs in place: two fewer activation-sized allocations and passes a
        block. Neither backward reads those tensors."""
        mods = dict(gm.named_modules())
        summed: set[fx.Node] = set()
        for node in list(gm.graph.nodes):
            if (node.op != "call_function" or node.target not in (operator.add, torch.add)
                    or node.kwargs or len(node.args) != 2):
                continue
            for a, b in (node.args, node.args[::-1]):
                m = mods.get(a.target) if isinstance(a, fx.Node) and a.op == "call_module" \
                    else None
                if isinstance(m, _FoldedConv) and not m.relu and len(a.users) == 1:
                    node.target, node.args = _add_into, (a, b)
                    summed.add(node)
                    break
        for node in list(gm.graph.nodes):
            src = _relu_input(node, mods)
            if src in summed and len(src.users) == 1:
                with gm.graph.inserting_after(node):
                    new = gm.graph.call_function(torch.relu_, (src,))
                node.replace_all_uses_with(new)
                gm.graph.erase_node(node)


def _add_into(a: Tensor, b: Tensor) -> Tensor:
    """``a + b``, stored into ``a`` (a conv output read by this sum alone) where the sum
    has ``a``'s shape and dtype."""
    if (isinstance(b, Tensor) and torch.broadcast_shapes(a.shape, b.shape) == a.shape
            and torch.result_type(a, b) == a.dtype):
        return a.add_(b)
    return a + b


def _signature(model: nn.Module) -> tuple:
    """What the plan depends on: the module tree, each module's mode and hooks."""
    return tuple((name, id(m), m.training, bool(m._forward_hooks or m._forward_pre_hooks))
                 for name, m in model.named_modules())


_PLANS: weakref.WeakKeyDictionary[nn.Module, _Plan] = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def folded(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` with its eval-mode conv -> batch norm pairs folded, for the scope (the
    model itself when there is nothing to fold). Call inside ``attack_mode``: the folded
    weights are built from the weights as they are at entry and frozen for the op cache."""
    plan = _PLANS.get(model)
    if plan is None or plan.signature != _signature(model):
        plan = _PLANS[model] = _Plan(model)
    if plan.module is None:
        yield model
        return
    tensors = [t for f in plan.folds for t in f.refresh()]
    try:
        with _cache.frozen(tensors):
            yield plan.module
    finally:
        for f in plan.folds:
            f.release()
