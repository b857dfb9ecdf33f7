"""Drop-in masked layers: ``MaskedLinear`` and ``MaskedConv2d``.

Each is a subclass of its torch layer with the same ``weight`` / ``bias`` parameters and
one extra bool buffer ``weight_mask`` (1 byte per weight), or, after :meth:`pack_mask_`,
a bit-packed uint8 buffer ``weight_mask_bits`` (1 bit per weight; ``weight_mask`` then
reads as the bool mask, unpacked when it is used). Invariants:

* the forward computes with ``weight * mask`` of the weight as written, however it was
  written (``.data`` writes included; see :mod:`sparse_adv_fast.ops._cache`);
* the stored weight is exactly zero where the mask is False after every ``torch.optim``
  step (a global step post-hook, registered when the first masked layer is built), so
  momentum, weight decay or Adam state never revive pruned weights, and after any forward
  on the dense paths (which use the stored weight itself as the masked weight);
* the weight gradient is exactly zero where the mask is False (masked in the kernel);
* ``state_dict`` / ``deepcopy`` / pickle / ``.to()`` carry the mask like any buffer; a
  dense state_dict without mask keys loads strictly and keeps the current mask. A packed
  layer's state_dict holds the bool ``weight_mask`` too, so packed and unpacked models
  load each other's checkpoints.
"""

from __future__ import annotations

import copy
import weakref
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from .. import functional as SF
from ..ops import _cache
from ..ops._checks import check_mask
from . import _bitmask

# id(weight) -> layer, for the optimizer post-step hook (verified by identity on use).
_LAYERS: dict[int, weakref.ref] = {}
_HOOK: Any = None


def _remask_after_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    if not _LAYERS:
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            ref = _LAYERS.get(id(p))
            layer = ref() if ref is not None else None
            if layer is not None and layer._owns(p):
                layer.remask_()


def _untrack(key: int, ref: weakref.ref) -> None:
    # A dead layer's callback must not drop a newer layer tracking a weight with its id.
    if _LAYERS.get(key) is ref:
        del _LAYERS[key]


def _track(layer: _MaskedMixin) -> None:
    global _HOOK
    if _HOOK is None:
        _HOOK = register_optimizer_step_post_hook(_remask_after_step)
    key = id(layer.weight)
    ref = _LAYERS.get(key)
    if ref is None or ref() is not layer:
        _LAYERS[key] = weakref.ref(layer, lambda r, k=key: _untrack(k, r))


class _MaskedMixin:
    """Mask state and the zero-weight invariant shared by the masked layers."""

    weight: nn.Parameter
    _dense_cls: type[nn.Module]
    # The weight this layer gave away with to_dense(): never written by this layer again.
    _released: Tensor | None = None

    def _init_mask(self) -> None:
        ones = torch.ones(self.weight.shape, dtype=torch.bool, device=self.weight.device)
        self.register_buffer("weight_mask", ones)
        self._released = None
        _track(self)

    # -- the mask, bool or packed -----------------------------------------------------
    @property
    def weight_mask(self) -> Tensor:
        """The bool mask (weight's shape). Packed layers unpack it on each read, except
        within an attack's frozen scope, where one unpacked copy serves the whole attack
        and is dropped when it ends."""
        m = self._buffers.get("weight_mask")
        if m is not None:
            return m
        bits = self._buffers.get("weight_mask_bits")
        if bits is None:  # not built yet (register_buffer checks the name is free)
            raise AttributeError("weight_mask")
        w = self.weight
        key = (bits.data_ptr(), bits._version, tuple(w.shape))
        return _cache.scoped(w, "unpacked_mask", key, lambda: _unpacked(bits, w.shape))

    @weight_mask.setter
    def weight_mask(self, mask: Tensor) -> None:  # only packed layers get here
        self.set_mask(mask)

    @property
    def mask_packed(self) -> bool:
        """Whether the mask is held bit-packed (see :meth:`pack_mask_`)."""
        return "weight_mask_bits" in self._buffers

    def pack_mask_(self):
        """Hold the mask bit-packed: 1 bit per weight instead of 1 byte. Returns the layer.

        The forward then unpacks it per call (a pass over ``numel / 8`` bytes; an attack
        unpacks it once), and the masked weight and sparse forms work as before. Where
        memory is tight (large models, half-precision weights, many models held at once).
        """
        if not self.mask_packed:
            mask = self._buffers.pop("weight_mask")
            self.register_buffer("weight_mask_bits", _bitmask.pack(mask), persistent=False)
        return self

    def unpack_mask_(self):
        """Hold the mask as a bool buffer again (the default). Returns the layer."""
        if self.mask_packed:
            mask = self.weight_mask
            del self._buffers["weight_mask_bits"]
            self._non_persistent_buffers_set.discard("weight_mask_bits")
            self.register_buffer("weight_mask", mask)
        return self

    # -- invariant ------------------------------------------------------------------
    def _owns(self, w: Tensor) -> bool:
        return self.weight is w and self._released is not w

    def _claim(self, mask: Tensor) -> bool:
        """Register the current weight and ``mask`` (this layer's, as read now) with the
        hook and the cache (cheap when already done; the weight or mask may have been
        replaced since). False when the weight was given away."""
        w = self.weight
        if self._released is w:
            return False
        _track(self)
        _cache.own(w, mask)
        return True

    def remask_(self) -> None:
        """Zero the stored weight where the mask is False."""
        mask = self.weight_mask
        if self._claim(mask):
            _cache.zero_pruned_(self.weight, mask)

    def _masked_inputs(self) -> tuple[Tensor, Tensor]:
        mask = self.weight_mask
        if not torch.compiler.is_compiling():
            self._claim(mask)
        return self.weight, mask

    # -- mask API -------------------------------------------------------------------
    def set_mask(self, mask: Tensor) -> None:
        """Replace the mask (bool, weight's shape) and zero the newly pruned weights."""
        check_mask(mask, self.weight, type(self).__name__)
        with torch.no_grad():
            if self.mask_packed:
                bits = self._buffers["weight_mask_bits"]
                bits.copy_(_bitmask.pack(mask.to(bits.device)))
            else:
                self.weight_mask.copy_(mask.to(self.weight_mask.device))
        self.remask_()

    @property
    def density(self) -> float:
        """Fraction of weights kept."""
        return float(self.weight_mask.float().mean())

    def extra_repr(self) -> str:  # type: ignore[override]
        packed = ", packed mask" if self.mask_packed else ""
        return f"{super().extra_repr()}, density={self.density:.4f}{packed}"  # type: ignore[misc]

    # -- state ----------------------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)  # type: ignore[misc]
        if self.mask_packed:  # the same key and bool tensor an unpacked layer saves
            destination[prefix + "weight_mask"] = self.weight_mask

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
        error_msgs,
    ) -> None:
        super()._load_from_state_dict(  # type: ignore[misc]
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
            error_msgs,
        )
        key = prefix + "weight_mask"
        if key in missing_keys:  # a dense checkpoint: keep the current mask
            missing_keys.remove(key)
        if self.mask_packed and key in unexpected_keys:
            unexpected_keys.remove(key)
            mask = state_dict[key]
            if not isinstance(mask, Tensor) or mask.shape != self.weight.shape:
                error_msgs.append(f"size mismatch for {key}: copying a mask of shape "
                                  f"{tuple(getattr(mask, 'shape', ()))}, the weight is "
                                  f"{tuple(self.weight.shape)}")
                return
            self.set_mask(mask.bool())
            return
        self.remask_()

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)  # type: ignore[misc]
        if not self._owns(self.weight):
            return
        _track(self)

    # -- conversions ----------------------------------------------------------------
    def to_dense(self) -> nn.Module:
        """The plain torch layer with the same (masked) parameters, mask dropped.

        The weight is handed over: from now on neither the optimizer hook nor this layer's
        own forwards write it (this layer, if still called, computes with a masked copy).
        """
        self.remask_()
        w = self.weight
        object.__setattr__(self, "_released", w)  # a plain reference, not a parameter
        _cache.disown(w)
        ref = _LAYERS.get(id(w))
        if ref is not None and ref() is self:
            del _LAYERS[id(w)]
        return _shell(self._dense_cls, self)

    @classmethod
    def from_dense(cls, module: nn.Module, mask: Tensor | None = None):
        """Wrap ``module``'s parameters (the same Parameter objects) in a masked layer.

        Optimizers built over the dense module keep working on the masked one.
        """
        if type(module) is not cls._dense_cls:
            raise TypeError(
                f"{cls.__name__}.from_dense expects a {cls._dense_cls.__name__}, "
                f"got {type(module).__name__}"
            )
        if mask is not None:
            check_mask(mask, module.weight, f"{cls.__name__}.from_dense")
        new = _shell(cls, module)
        new._init_mask()
        if mask is not None:
            new.set_mask(mask)
        return new


def _unpacked(bits: Tensor, shape: torch.Size) -> Tensor:
    mask = _bitmask.unpack(bits, shape)
    if not torch.compiler.is_compiling():
        setattr(mask, _cache.SOURCE_ATTR, bits)  # its mask-alone forms are the packed one's
    return mask


def _shell(cls: type, src: nn.Module) -> nn.Module:
    """An instance of ``cls`` sharing ``src``'s parameters, buffers, settings and hooks."""
    new = cls.__new__(cls)
    for k, v in src.__dict__.items():
        if k != "_released":
            new.__dict__[k] = copy.copy(v) if isinstance(v, (dict, set)) else v
    for name in ("weight_mask", "weight_mask_bits"):
        new._buffers.pop(name, None)
        new._non_persistent_buffers_set.discard(name)
    return new


class MaskedLinear(_MaskedMixin, nn.Linear):
    """``nn.Linear`` whose weight is multiplied by a bool ``weight_mask`` buffer."""

    _dense_cls = nn.Linear

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._init_mask()

    def forward(self, input: Tensor) -> Tensor:
        w, m = self._masked_inputs()
        return SF.masked_linear(input, w, m, self.bias)


class MaskedConv2d(_MaskedMixin, nn.Conv2d):
    """``nn.Conv2d`` whose weight is multiplied by a bool ``weight_mask`` buffer.

    Any ``padding`` / ``padding_mode`` of ``nn.Conv2d`` works: non-zero modes and string
    padding are applied with ``F.pad`` before the masked convolution, as torch does.
    """

    _dense_cls = nn.Conv2d

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_mask()

    def forward(self, input: Tensor) -> Tensor:
        w, m = self._masked_inputs()
        padding: Any = self.padding
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            input = nn.functional.pad(input, self._reversed_padding_repeated_twice, mode=mode)
            padding = 0
        return SF.masked_conv2d(
            input, w, m, self.bias, self.stride, padding, self.dilation, self.groups
        )
