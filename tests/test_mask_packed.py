"""Bit-packed masks (``pack_mask_``): 1 bit per weight, and everything a bool mask does.

Oracles: a hand-packed byte, the same layer with its bool mask (forward, gradients,
optimizer steps, state_dict, attacks), and the torch formula ``conv2d(x, w * mask)``."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparse_adv_fast as saf
from sparse_adv_fast.nn import _bitmask
from sparse_adv_fast.ops import _cache


def test_pack_layout_is_lsb_first_and_one_bit_per_element():
    m = torch.tensor([True, False, True, True, False, False, False, False, True])
    assert _bitmask.pack(m).tolist() == [0b00001101, 0b00000001]  # 13, 1
    for shape in [(3, 5, 3, 3), (7,), (8,), (0, 4), (16, 9)]:
        mask = torch.rand(shape) < 0.4
        bits = _bitmask.pack(mask)
        assert bits.dtype == torch.uint8 and bits.numel() == (mask.numel() + 7) // 8
        assert torch.equal(_bitmask.unpack(bits, mask.shape), mask)
    with pytest.raises(ValueError, match="expected 2 uint8 bytes"):
        _bitmask.unpack(torch.zeros(3, dtype=torch.uint8), (9,))


def _pair(kind: str, sparsity: float = 0.7) -> tuple[nn.Module, nn.Module]:
    """(bool-mask layer, packed twin with the same weights and mask)."""
    torch.manual_seed(0)
    dense = nn.Conv2d(3, 8, 3, padding=1) if kind == "conv" else nn.Linear(20, 9)
    ref = saf.prune.magnitude(saf.sparsify(dense), sparsity)
    packed = copy.deepcopy(ref).pack_mask_()
    return ref, packed


def _data(kind: str) -> torch.Tensor:
    return torch.rand(4, 3, 7, 7) if kind == "conv" else torch.rand(5, 20)


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_packed_layer_holds_bits_only_and_reads_as_the_bool_mask(kind):
    ref, packed = _pair(kind)
    assert packed.mask_packed and not ref.mask_packed
    names = dict(packed.named_buffers())
    assert set(names) == {"weight_mask_bits"}
    assert names["weight_mask_bits"].numel() == (ref.weight.numel() + 7) // 8
    assert torch.equal(packed.weight_mask, ref.weight_mask)
    assert packed.density == pytest.approx(ref.density)
    assert "packed mask" in repr(packed)
    assert torch.equal(packed.unpack_mask_().weight_mask, ref.weight_mask)
    assert not packed.mask_packed and set(dict(packed.named_buffers())) == {"weight_mask"}


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_packed_layer_trains_like_the_bool_one(kind):
    ref, packed = _pair(kind)
    mask = ref.weight_mask.clone()
    x = _data(kind)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
            for m in (ref, packed)]
    for _ in range(3):
        for m, opt in zip((ref, packed), opts, strict=True):
            opt.zero_grad()
            m(x).square().sum().backward()
            assert torch.equal(m.weight.grad[~mask], torch.zeros_like(m.weight.grad[~mask]))
            opt.step()
    # Two bool-mask twins differ by rounding here too (oneDNN), so: float tolerance.
    torch.testing.assert_close(packed.weight, ref.weight)
    assert not bool(packed.weight[~mask].any())  # momentum never revives a pruned weight
    formula = (F.conv2d(x, packed.weight * mask, packed.bias, padding=1) if kind == "conv"
               else F.linear(x, packed.weight * mask, packed.bias))
    torch.testing.assert_close(packed(x), formula)


def test_set_mask_and_assignment_repack():
    ref, packed = _pair("conv")
    new = torch.rand(ref.weight.shape) < 0.2
    packed.set_mask(new)
    assert torch.equal(packed.weight_mask, new)
    assert not bool(packed.weight[~new].any())
    packed.weight_mask = ~new  # a plain assignment goes through set_mask too
    assert torch.equal(packed.weight_mask, ~new) and packed.mask_packed
    with pytest.raises((TypeError, ValueError)):
        packed.set_mask(torch.ones(3, dtype=torch.bool))


def test_state_dict_is_the_bool_one_and_loads_both_ways():
    ref, packed = _pair("conv")
    sd_ref, sd_packed = ref.state_dict(), packed.state_dict()
    assert list(sd_packed) == list(sd_ref)
    for k in sd_ref:
        assert torch.equal(sd_packed[k], sd_ref[k]), k
    fresh_packed = saf.sparsify(nn.Conv2d(3, 8, 3, padding=1)).pack_mask_()
    fresh_packed.load_state_dict(sd_ref)  # strict
    assert torch.equal(fresh_packed.weight_mask, ref.weight_mask) and fresh_packed.mask_packed
    fresh = saf.sparsify(nn.Conv2d(3, 8, 3, padding=1))
    fresh.load_state_dict(sd_packed)
    assert torch.equal(fresh.weight_mask, ref.weight_mask)
    bad = dict(sd_ref, weight_mask=torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="size mismatch for weight_mask"):
        fresh_packed.load_state_dict(bad)


def test_copies_pickles_conversions_and_to_dense_keep_the_packed_mask():
    ref, packed = _pair("conv")
    for clone in (copy.deepcopy(packed), pickle.loads(pickle.dumps(packed))):
        assert clone.mask_packed and torch.equal(clone.weight_mask, ref.weight_mask)
    buf = io.BytesIO()
    torch.save(packed, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert loaded.mask_packed and torch.equal(loaded.weight_mask, ref.weight_mask)
    as64 = copy.deepcopy(packed).double()
    assert as64.weight_mask_bits.dtype == torch.uint8
    plain = copy.deepcopy(packed).to_dense()
    assert type(plain) is nn.Conv2d and not any(True for _ in plain.buffers())
    torch.testing.assert_close(plain.weight, ref.weight)


def test_model_helpers_pack_every_layer_and_read_masks():
    torch.manual_seed(0)
    model = saf.prune.magnitude(saf.sparsify(saf.models.small_cnn()), 0.8, scope="layer")
    masks = saf.masks(model)
    saf.nn.pack_masks(model)
    layers = saf.nn.masked_layers(model)
    assert layers and all(m.mask_packed for m in layers.values())
    for name, mask in saf.masks(model).items():
        assert torch.equal(mask, masks[name])
    assert saf.sparsity(model) == pytest.approx(0.8, abs=0.01)
    saf.nn.pack_masks(model, packed=False)
    assert not any(m.mask_packed for m in layers.values())
    with pytest.raises(ValueError, match="no masked layer; call sparsify"):
        saf.nn.pack_masks(nn.Sequential(nn.Linear(3, 2)))


def test_attack_on_a_packed_model_matches_and_unpacks_once(monkeypatch):
    """PGD on the packed model finds the bool model's points; inside the attack the mask
    is unpacked once per layer, and the copy is gone when the attack ends."""
    torch.manual_seed(0)
    ref = saf.prune.magnitude(saf.sparsify(saf.models.small_cnn()), 0.8, scope="layer")
    ref = ref.double().eval()
    packed = saf.nn.pack_masks(copy.deepcopy(ref))
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    torch.manual_seed(1)
    want = saf.attacks.pgd(ref, x, y, eps=0.1, alpha=0.02, steps=5)
    calls = [0]
    real = _bitmask.unpack

    def counted(bits, shape):
        calls[0] += 1
        return real(bits, shape)

    monkeypatch.setattr(_bitmask, "unpack", counted)
    torch.manual_seed(1)
    got = saf.attacks.pgd(packed, x, y, eps=0.1, alpha=0.02, steps=5)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    n_layers = len(saf.nn.masked_layers(packed))
    assert calls[0] == n_layers, calls  # once per layer, not per step and direction
    assert not _cache._scoped  # the attack's unpacked copies are gone with it
