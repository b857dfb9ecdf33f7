"""Inverse Weights Inheritance: give a large network the weights of a sparse or small one.

One reading of the paper's abstract (see DESIGN.md, "IWI"); both modes ship:

* ``mode="ticket"``: source and target share the architecture; the source is sparse (a
  lottery ticket found by adversarial pruning). The target gets the source's surviving
  weights (``weight * mask``), its pruned positions start at zero (``init="zero"``) or at
  small noise (``init="noise"``), every other parameter and buffer (biases, BatchNorm) is
  copied, and the target is left DENSE (all-ones masks if it has masked layers) so that
  adversarial training then trains it densely.
* ``mode="widen"``: the target is the source's family at a larger width. Every tensor of
  the target gets the source's values in its leading slice (``[0:s]`` in each dim: output
  channels 0:w and input channels 0:w); new entries are 0, except normalisation scales
  (BatchNorm / GroupNorm / LayerNorm ``weight``) and ``running_var``, which are 1, so that
  a new channel is an identity-affine channel with unit variance. With ``init="noise"``,
  new entries of every floating PARAMETER (buffers never) also get Gaussian noise of std
  ``noise_scale * std(source tensor)``.

With ``init="zero"`` the widened network computes exactly the source's function (new
channels see zero weights, carry zero activations and are read with zero weights; a
flattening Linear head keeps channel-major order, so its leading input features are the old
channels). Such all-zero new units form a saddle, though: they get exactly zero gradient
and stay zero under training. ``init="preserve"`` (widen only; like "zero" in ticket mode)
avoids it and still computes exactly the source's function: the weights INTO new units
(``[new out, old in]`` of every weight with >= 2 dims) get the noise, the weights reading
new inputs (``[:, new in]``) stay zero, so new units are alive but not yet read, and the
zero weights reading them get a gradient at once. Use "preserve" (or "noise") for widened
networks that will be trained.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .nn import Normalize, masked_layers

MODES = ("ticket", "widen")
INITS = ("zero", "noise", "preserve")
_NORMS = (_BatchNorm, nn.GroupNorm, nn.LayerNorm)


def _mask_keys(model: nn.Module) -> dict[str, str]:
    """state_dict key of each masked layer's mask -> key of its weight."""
    out = {}
    for n in masked_layers(model):
        p = f"{n}." if n else ""
        out[p + "weight_mask"] = p + "weight"
    return out


@torch.no_grad()
def _effective_state(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(state without mask entries, with weights multiplied by masks; masks by weight key)."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    masks = {}
    for mk, wk in _mask_keys(model).items():
        m = state.pop(mk)
        state[wk] = state[wk] * m
        masks[wk] = m
    return state, masks


def _owner(model: nn.Module, key: str) -> tuple[nn.Module, str]:
    mod_name, _, attr = key.rpartition(".")
    return (model.get_submodule(mod_name) if mod_name else model), attr


def _noise(ref: Tensor, shape: torch.Size, scale: float, gen: torch.Generator | None) -> Tensor:
    std = float(ref.float().std()) if ref.numel() > 1 else float(ref.float().abs().sum())
    dev = gen.device if gen is not None else ref.device
    z = torch.randn(shape, generator=gen, device=dev, dtype=torch.float32)
    return (z * (scale * std)).to(device=ref.device, dtype=ref.dtype)


def _check(source, target, mode, init, noise_scale, generator) -> None:
    for name, m in (("source", source), ("target", target)):
        if not isinstance(m, nn.Module):
            raise TypeError(f"inherit: {name} must be an nn.Module, got {type(m).__name__}")
    if mode not in MODES:
        raise ValueError(f"inherit: mode must be one of {MODES}, got {mode!r}")
    if init not in INITS:
        raise ValueError(f"inherit: init must be one of {INITS}, got {init!r}")
    if (isinstance(noise_scale, bool) or not isinstance(noise_scale, numbers.Real)
            or not noise_scale >= 0):
        raise ValueError(f"inherit: noise_scale must be a number >= 0, got {noise_scale!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"inherit: generator must be a torch.Generator, got {generator!r}")


def _io_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    # Conv2d / Linear in registration order (masked layers subclass them): the model zoo
    # registers the input layer first and the classifier last.
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _io_sizes(layer: nn.Module) -> tuple[int, int]:
    if isinstance(layer, nn.Conv2d):
        return layer.in_channels, layer.out_channels
    return layer.in_features, layer.out_features


def _rounded(t: Tensor) -> list[float]:
    return [round(v, 4) for v in t.flatten().tolist()]


def _check_same_task(source: nn.Module, target: nn.Module, mode: str) -> None:
    """Refuse a target built for other data: another input normalisation (the dataset's
    statistics), input size or number of classes.

    IWI widens hidden units only; copying a digits model into a CIFAR-10 one would pass
    the per-tensor shape rule (every target dim >= the source's) and yield nonsense, e.g.
    new input channels with std 0.
    """
    where = f"inherit({mode})"
    src_mods = dict(source.named_modules())
    for name, t in target.named_modules():
        s = src_mods.get(name)
        if isinstance(t, Normalize) and isinstance(s, Normalize):
            for attr in ("mean", "std"):
                a, b = getattr(s, attr).detach().cpu(), getattr(t, attr).detach().cpu()
                if a.shape != b.shape or not torch.equal(a, b):
                    key = f"{name}.{attr}" if name else attr
                    raise ValueError(
                        f"{where}: the target is for other data: input normalisation {key} "
                        f"is {_rounded(a)} in the source and {_rounded(b)} in the target; "
                        "build the target for the source's dataset"
                    )
    src_io, tgt_io = _io_layers(source), _io_layers(target)
    if not src_io or not tgt_io:
        return
    checks = (("input size", src_io[0], tgt_io[0], 0), ("number of classes", src_io[-1],
                                                          tgt_io[-1], 1))
    for what, (sn, sl), (tn, tl), i in checks:
        a, b = _io_sizes(sl)[i], _io_sizes(tl)[i]
        if a != b:
            raise ValueError(
                f"{where}: the target is for other data: {what} {a} in the source ({sn!r}) "
                f"and {b} in the target ({tn!r}); IWI only widens hidden units, so build "
                "the target for the source's dataset"
            )


def inherit(
    source: nn.Module, target: nn.Module, mode: str = "ticket", init: str = "zero",
    noise_scale: float = 0.01, generator: torch.Generator | None = None,
) -> nn.Module:
    """Initialise ``target`` from ``source`` by inverse weights inheritance; returns target.

    See the module docstring for the two modes and the fill rule. Parameters and buffers
    are matched by state_dict name (mask entries aside: either model may be sparsified or
    plain). A name present in only one model, a shape that differs (``ticket``), or a
    target dim smaller than the source's (``widen``) raises a ValueError naming the
    tensor, before the target is touched. So does a target built for other data (another
    input normalisation, input size or number of classes than the source's).
    """
    _check(source, target, mode, init, noise_scale, generator)
    src, src_masks = _effective_state(source)
    tgt_mask_keys = _mask_keys(target)
    tgt = {k: v for k, v in target.state_dict().items() if k not in tgt_mask_keys}
    missing, extra = sorted(set(tgt) - set(src)), sorted(set(src) - set(tgt))
    if missing or extra:
        raise ValueError(
            f"inherit: source and target differ: target-only tensors {missing[:5]}, "
            f"source-only tensors {extra[:5]}"
        )
    _check_same_task(source, target, mode)
    new: dict[str, Tensor] = {}
    for k, t in tgt.items():
        s = src[k]
        if mode == "ticket":
            if s.shape != t.shape:
                raise ValueError(
                    f"inherit(ticket): {k!r} has shape {tuple(s.shape)} in the source and "
                    f"{tuple(t.shape)} in the target; ticket mode needs one architecture"
                )
            v = s.clone()
            if init == "noise" and k in src_masks:
                pruned = ~src_masks[k]
                v[pruned] = _noise(s, s.shape, float(noise_scale), generator)[pruned]
            new[k] = v
            continue
        if s.dim() != t.dim() or any(a > b for a, b in zip(s.shape, t.shape, strict=True)):
            raise ValueError(
                f"inherit(widen): {k!r} has shape {tuple(s.shape)} in the source and "
                f"{tuple(t.shape)} in the target; every target dim must be >= the source's"
            )
        owner, attr = _owner(target, k)
        fill = 1.0 if (attr == "running_var" or (attr == "weight" and isinstance(owner, _NORMS))
                       ) else 0.0
        v = torch.full(t.shape, fill, dtype=t.dtype, device=t.device)
        is_param = isinstance(getattr(owner, attr, None), nn.Parameter)
        if init == "noise" and is_param and t.is_floating_point():
            v += _noise(s, t.shape, float(noise_scale), generator).to(t.device)
        elif init == "preserve" and is_param and t.dim() >= 2 and t.shape[0] > s.shape[0]:
            into_new = (slice(s.shape[0], None), slice(0, s.shape[1]))
            v[into_new] = _noise(s, t.shape, float(noise_scale), generator)[into_new]
        v[tuple(slice(0, n) for n in s.shape)] = s.to(device=t.device, dtype=t.dtype)
        new[k] = v
    with torch.no_grad():
        for k, v in new.items():
            owner, attr = _owner(target, k)
            getattr(owner, attr).copy_(v)
        for layer in masked_layers(target).values():
            layer.set_mask(torch.ones_like(layer.weight_mask))
    return target
