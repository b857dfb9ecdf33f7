"""Generic configs (sparse_adv_fast.config) and TrainConfig: one check per setting, shared by
keywords, files, overrides and CLI flags."""

from __future__ import annotations

import argparse
import builtins
import dataclasses
import json

import pytest

from sparse_adv_fast import config as C
from sparse_adv_fast.pipeline.command_config import PruneCommand, TrainCommand
from sparse_adv_fast.train import TrainConfig


@dataclasses.dataclass(frozen=True)
class Toy(C.Config):
    n: int = C.integer(3, lo=1)
    rate: float = C.number(0.5, lo=0, hi=1, hi_open=True)
    name: str = C.choice("a", ("a", "b"))
    on: bool = C.flag(False)
    cap: int | None = C.integer(None, lo=0, optional=True)
    tags: tuple[str, ...] = C.checked(("x",), tuple)


def test_fields_are_checked_and_normalised_at_construction():
    t = Toy(rate=0)
    assert t.rate == 0.0 and isinstance(t.rate, float)
    for kw, msg in [(dict(n=0), "n must be an int >= 1, got 0"),
                    (dict(n=True), "n must be an int >= 1, got True"),
                    (dict(rate=1.0), r"rate must be in \[0, 1\), got 1.0"),
                    (dict(rate=float("nan")), "rate must be"),
                    (dict(name="c"), r"unknown name 'c'; choose one of \('a', 'b'\)"),
                    (dict(on="yes"), "on must be true or false"),
                    (dict(cap=-1), "cap must be an int >= 0 or null")]:
        with pytest.raises(ValueError, match=msg):
            Toy(**kw)
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.n = 5


def test_unknown_keys_get_a_suggestion_everywhere(tmp_path):
    with pytest.raises(ValueError, match=r"^f: unknown config key 'rat'; did you mean 'rate'\?"):
        Toy.from_dict({"rat": 0.1}, "f")
    with pytest.raises(ValueError, match="did you mean 'rate'"):
        Toy().replace(rat=0.1)
    with pytest.raises(ValueError, match="did you mean 'rate'"):
        C.parse_overrides(["rat=0.1"], Toy)
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"_comment": "a note", "nn": 2}))
    with pytest.raises(ValueError, match=rf"^{f}: unknown config key 'nn'; did you mean 'n'"):
        C.load(Toy, f)
    with pytest.raises(ValueError, match="did you mean 'epochs'"):
        TrainConfig.from_dict({"epoch": 3})


def test_overrides_are_typed_from_the_field_annotations():
    got = C.parse_overrides(["n=4", "rate=1/4", "name=b", "on=true", "cap=null",
                             "tags=p,q"], Toy)
    assert got == {"n": 4, "rate": 0.25, "name": "b", "on": True, "cap": None,
                   "tags": ("p", "q")}
    with pytest.raises(ValueError, match="n: expected an integer, got 'x'"):
        C.parse_overrides(["n=x"], Toy)
    with pytest.raises(ValueError, match="not of the form key=value"):
        C.parse_overrides(["n"], Toy)


def test_load_precedence_defaults_file_overrides(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"n": 7, "rate": 0.1}))
    t = C.load(Toy, f, ["rate=0.2"])
    assert (t.n, t.rate, t.name) == (7, 0.2, "a")
    f.write_text(json.dumps({"n": 0}))
    with pytest.raises(ValueError, match=rf"^{f}: n must be an int >= 1, got 0"):
        C.load(Toy, f)


def test_file_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(ValueError, match="not valid JSON"):
        C.read_file(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a mapping"):
        C.read_file(bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        C.read_file(tmp_path / "absent.json")


def test_yaml_files_and_a_clear_error_without_pyyaml(tmp_path, monkeypatch):
    y = tmp_path / "c.yaml"
    y.write_text("n: 5\nname: b\n# a comment\n")
    assert C.load(Toy, y) == Toy(n=5, name="b")
    real = builtins.__import__

    def no_yaml(name, *a, **k):
        if name == "yaml":
            raise ImportError("no yaml")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_yaml)
    with pytest.raises(ValueError, match=r"needs PyYAML \(pip install pyyaml\)"):
        C.read_file(y)


def test_arg_type_is_the_field_check():
    parse = C.arg_type(Toy, "rate")
    assert parse("0.25") == 0.25
    with pytest.raises(argparse.ArgumentTypeError, match=r"rate must be in \[0, 1\), got 1.5"):
        parse("1.5")
    with pytest.raises(argparse.ArgumentTypeError, match="rate: expected a number"):
        parse("fast")


def test_train_config_keyword_config_and_file_are_one_thing(tmp_path):
    f = tmp_path / "t.json"
    f.write_text(json.dumps({"method": "pgd", "lr": 0.02, "schedule": "cyclic"}))
    from_file = C.load(TrainConfig, f)
    assert from_file == TrainConfig(method="pgd", lr=0.02, schedule="cyclic")
    assert from_file == TrainConfig().replace(method="pgd", lr=0.02, schedule="cyclic")
    assert TrainConfig(method="fgsm_rs", eps=0.2).resolved_alpha == pytest.approx(0.25)
    assert TrainConfig(method="pgd", eps=0.2, alpha=0.01).resolved_alpha == 0.01
    with pytest.raises(ValueError, match="co ratio must be in"):
        TrainConfig(co_ratio=2.0)


def test_command_configs_share_the_train_config_checks():
    # A command field exposed from TrainConfig carries TrainConfig's rule ...
    for cls in (TrainCommand, PruneCommand):
        assert C.field_check(cls, "momentum") == C.field_check(TrainConfig, "momentum")
        with pytest.raises(ValueError, match="unknown schedule 'onecycle'"):
            cls(schedule="onecycle")
    # ... and the few a command restricts say so.
    with pytest.raises(ValueError, match="epochs: expected a positive integer, got 0"):
        TrainCommand(epochs=0)
    with pytest.raises(ValueError, match=r"eps must be in \[0, 1\]"):
        TrainCommand(eps=2.0)
    TrainConfig(eps=2.0, norm="l2")  # fit itself allows an L2 radius above 1
