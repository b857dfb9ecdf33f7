"""``auto`` dispatch by measurement, driven by an injected fake timer (nothing here is timed).

The fake timer stands in for the clock; candidates are fakes that compute the reference
result and record that they ran, so which implementation ``auto`` chose is observable, and
the op's output is checked against an independent formula every time.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import cpu_backends

import sparse_adv_fast as saf
from sparse_adv_fast import backends
from sparse_adv_fast.backends import _autotune
from sparse_adv_fast.ops import op_module

ml_mod = op_module("masked_linear")
P = op_module("pgd_step")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Each test measures into its own cache file, from an empty memory."""
    path = tmp_path / "dispatch.json"
    monkeypatch.setenv(_autotune.ENV_CACHE, str(path))
    monkeypatch.delenv(_autotune.ENV_AUTOTUNE, raising=False)
    backends.use("auto")
    backends.reset()
    yield path
    backends.reset()


class FakeSparse:
    """A masked_linear candidate: right answer (independent formula), records each call."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[str] = []
        self.fail = fail

    def _ran(self, name: str) -> None:
        if self.fail:
            raise RuntimeError("kernel cannot run this case")
        self.calls.append(name)

    def forward(self, x2d, w, mask, b):
        self._ran("forward")
        return F.linear(x2d, w * mask, b)

    def grad_input(self, gy2d, w, mask):
        self._ran("grad_input")
        return gy2d @ (w * mask)

    def grad_weight(self, gy2d, x2d, mask):
        self._ran("grad_weight")
        return (gy2d.t() @ x2d) * mask


class FakeTimer:
    """Seconds per candidate from ``table(key, name)``; remembers the keys it timed."""

    def __init__(self, table) -> None:
        self.table = table
        self.keys: list[_autotune.Key] = []

    def __call__(self, key, fns):
        self.keys.append(key)
        return {name: self.table(key, name) for name in fns}


def sparse_wins_when_sparse(key, name):
    """cpp-sparse twice as fast as torch at density <= 0.05, 1.5x slower at 0.5."""
    if name == "torch":
        return 2.0
    return 1.0 if key.density <= 0.05 else 3.0


def _with_fake(monkeypatch, fake) -> None:
    monkeypatch.setattr(backends, "_candidates", lambda op, device: {"cpp-sparse": fake})


def _linear_case(density: float, rows: int = 6):
    torch.manual_seed(0)
    w = torch.randn(40, 32)
    mask = torch.zeros(40 * 32, dtype=torch.bool)
    mask[torch.randperm(mask.numel())[: int(round(density * mask.numel()))]] = True
    return torch.randn(rows, 32), w, mask.reshape(40, 32)


def _check_linear(x, w, mask):
    y = saf.ops.masked_linear(x, w, mask)
    torch.testing.assert_close(y, x @ (w * mask).t())


def test_sparse_chosen_only_where_the_timer_says_it_is_faster(monkeypatch):
    fake, timer = FakeSparse(), FakeTimer(sparse_wins_when_sparse)
    _with_fake(monkeypatch, fake)
    with _autotune.use_timer(timer):
        for density, sparse_runs in ((0.05, True), (0.5, False)):
            x, w, mask = _linear_case(density)
            _check_linear(x, w, mask)  # first use: measured
            fake.calls.clear()
            _check_linear(x, w, mask)  # then the chosen implementation runs alone
            assert (fake.calls == ["forward"]) is sparse_runs, (density, fake.calls)
    assert [k.density for k in timer.keys] == [0.05, 0.5]
    assert all(k.op == "masked_linear" and k.direction == "forward" for k in timer.keys)


def test_each_direction_is_decided_separately(monkeypatch):
    fake = FakeSparse()
    _with_fake(monkeypatch, fake)

    def table(key, name):  # sparse wins the input gradient only
        return {"torch": 2.0, "cpp-sparse": 1.0 if key.direction == "grad_input" else 3.0}[name]

    x, w, mask = _linear_case(0.1)
    with _autotune.use_timer(FakeTimer(table)):
        x1 = x.clone().requires_grad_()
        saf.ops.masked_linear(x1, w.requires_grad_(), mask).sum().backward()  # measures
        fake.calls.clear()
        w.grad = None
        xg = x.clone().requires_grad_()
        saf.ops.masked_linear(xg, w, mask).sum().backward()
    assert fake.calls == ["grad_input"]
    torch.testing.assert_close(xg.grad, torch.ones(6, 40) @ (w.detach() * mask))
    torch.testing.assert_close(w.grad, (torch.ones(6, 40).t() @ x) * mask)


def test_never_slower_than_the_reference():
    assert _autotune.rule({"torch": 1.0, "cpp-sparse": 0.5}) == "cpp-sparse"
    # a win inside the timing margin is a tie, and ties go to the reference
    assert _autotune.rule({"torch": 1.0, "cpp-sparse": 1.0 - _autotune.MARGIN / 2}) == "torch"
    assert _autotune.rule({"torch": 1.0, "cuda": 1.5, "triton": 1.2}) == "torch"
    assert _autotune.rule({"torch": 1.0, "cuda": 0.5, "triton": 0.4}) == "triton"
    assert _autotune.rule({}) == "torch"


def test_near_dense_weights_need_the_wider_margin(monkeypatch):
    """Above DENSE_FROM a candidate must beat torch by DENSE_MARGIN, through the whole
    measure path: 1.5x is not enough at density 0.9 and is at 0.05; 2.5x wins at 0.9."""
    assert _autotune.DENSE_MARGIN > 1 - 1 / 1.5  # the 1.5x case below must be refused
    fake = FakeSparse()
    fake.max_density = None  # the fake is admissible at any density
    _with_fake(monkeypatch, fake)
    for density, speedup, rows, sparse_runs in ((0.9, 1.5, 6, False), (0.05, 1.5, 6, True),
                                                (0.9, 2.5, 40, True)):
        timer = FakeTimer(lambda key, name, s=speedup: 1.0 / s if name != "torch" else 1.0)
        x, w, mask = _linear_case(density, rows)  # rows: a key of its own
        with _autotune.use_timer(timer):
            _check_linear(x, w, mask)  # first use: measured
            fake.calls.clear()
            _check_linear(x, w, mask)
        assert len(timer.keys) == 1
        assert (fake.calls == ["forward"]) == sparse_runs, (density, speedup)
    key = timer.keys[0]
    assert _autotune.margin(key) == _autotune.DENSE_MARGIN
    assert _autotune.margin(key._replace(density=0.5)) == _autotune.MARGIN


def test_a_candidate_that_raises_is_skipped(monkeypatch, _private_cache):
    fake, timer = FakeSparse(fail=True), FakeTimer(lambda key, name: 1.0 if name != "torch" else 9.)
    _with_fake(monkeypatch, fake)
    x, w, mask = _linear_case(0.05)
    with _autotune.use_timer(timer):
        _check_linear(x, w, mask)
        _check_linear(x, w, mask)
    assert fake.calls == []
    (rec,) = json.loads(_private_cache.read_text())["choices"].values()
    assert rec["choice"] == "torch" and "cannot run this case" in rec["skipped"]["cpp-sparse"]
    assert set(rec["times_s"]) == {"torch"}, "a failed candidate is not timed"


def test_cache_round_trips_through_disk(monkeypatch, _private_cache):
    fake = FakeSparse()
    _with_fake(monkeypatch, fake)
    x, w, mask = _linear_case(0.05)
    with _autotune.use_timer(FakeTimer(sparse_wins_when_sparse)):
        _check_linear(x, w, mask)
    data = json.loads(_private_cache.read_text())
    (text,) = data["choices"]
    assert "masked_linear/forward" in text and "density<=0.05" in text
    assert data["choices"][text]["choice"] == "cpp-sparse"

    backends.reset()  # a new process: memory empty, the file remains

    def no_timing(key, fns):
        raise AssertionError("a cached choice must not be measured again")

    fake.calls.clear()
    with _autotune.use_timer(no_timing):
        _check_linear(x, w, mask)
    assert fake.calls == ["forward"]
    assert text in backends.choices()


def test_batch_is_bucketed_and_thread_count_is_part_of_the_key(monkeypatch):
    _with_fake(monkeypatch, FakeSparse())
    timer = FakeTimer(sparse_wins_when_sparse)
    threads = torch.get_num_threads()
    x, w, mask = _linear_case(0.05, rows=5)
    try:
        with _autotune.use_timer(timer):
            _check_linear(x, w, mask)
            _check_linear(x[:3].contiguous(), w, mask)  # 3 rows: bucket 4, measured
            _check_linear(torch.randn(7, 32), w, mask)  # 7 rows: bucket 8, as 5: cached
            torch.set_num_threads(1 if threads != 1 else 2)
            _check_linear(x, w, mask)
    finally:
        torch.set_num_threads(threads)
    assert [k.shape[0] for k in timer.keys] == [8, 4, 8]
    assert timer.keys[0].threads == threads and timer.keys[2].threads != threads


def test_an_attack_scope_is_measured_apart(monkeypatch):
    """Inside _cache.frozen (an attack) derived forms are reused, so costs differ."""
    from sparse_adv_fast.ops import _cache

    _with_fake(monkeypatch, FakeSparse())
    timer = FakeTimer(sparse_wins_when_sparse)
    x, w, mask = _linear_case(0.05)
    with _autotune.use_timer(timer):
        _check_linear(x, w, mask)
        with _cache.frozen([w]):
            _check_linear(x, w, mask)
            _check_linear(x, w, mask)
    assert [k.scope for k in timer.keys] == ["eager", "frozen"]


def test_corrupt_cache_is_ignored_with_a_warning(monkeypatch, _private_cache):
    _private_cache.write_text("{not json")
    _with_fake(monkeypatch, FakeSparse())
    x, w, mask = _linear_case(0.05)
    with _autotune.use_timer(FakeTimer(sparse_wins_when_sparse)), \
            pytest.warns(RuntimeWarning, match="unreadable dispatch cache"):
        _check_linear(x, w, mask)
    assert json.loads(_private_cache.read_text())["format"] == _autotune.FORMAT  # rewritten


def test_measurements_of_other_sources_are_not_reused(monkeypatch, _private_cache):
    """A cache file named by the environment variable outlives a change of the kernels:
    its records are dropped when its fingerprint is not this build's."""
    _autotune.write({"k": {"choice": "torch"}}, _private_cache)
    assert _autotune.read(_private_cache) == {"k": {"choice": "torch"}}
    monkeypatch.setattr(_autotune, "_fingerprint", "0" * 12)  # e.g. an edited kernel
    assert _autotune.read(_private_cache) == {}


def test_unwritable_cache_keeps_choices_in_memory(monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(_autotune.ENV_CACHE, str(blocker / "dispatch.json"))  # under a file
    fake = FakeSparse()
    _with_fake(monkeypatch, fake)
    x, w, mask = _linear_case(0.05)
    with _autotune.use_timer(FakeTimer(sparse_wins_when_sparse)), \
            pytest.warns(RuntimeWarning) as seen:
        _check_linear(x, w, mask)
    assert any("cannot write the dispatch cache" in str(r.message) for r in seen)
    fake.calls.clear()
    _check_linear(x, w, mask)
    assert fake.calls == ["forward"]


def test_autotune_off_uses_the_static_rule(monkeypatch):
    monkeypatch.setenv(_autotune.ENV_AUTOTUNE, "0")
    fake = FakeSparse()
    _with_fake(monkeypatch, fake)

    def no_timing(key, fns):
        raise AssertionError("measuring is off")

    x, w, mask = _linear_case(0.05)
    with _autotune.use_timer(no_timing):
        _check_linear(x, w, mask)
    assert fake.calls == []
    static = "cpp" if "cpp" in cpu_backends() else "torch"
    assert backends.resolve("masked_linear", torch.device("cpu"))[0] == static
    # On CUDA the static rule never prefers an unmeasured kernel over cuBLAS/cuDNN.
    for op in ("masked_linear", "masked_conv2d", "pgd_step"):
        assert backends._resolve(op, torch.device("cuda"), "auto") == ("torch", None)


def test_nothing_is_timed_for_fake_or_meta_tensors_or_empty_batches(monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fake_t = torch.empty(3, 4)
    assert not _autotune.can_measure((fake_t,))
    assert not _autotune.can_measure((torch.empty(3, device="meta"),))
    assert _autotune.can_measure((torch.empty(3),))
    _with_fake(monkeypatch, FakeSparse())
    timer = FakeTimer(sparse_wins_when_sparse)
    _, w, mask = _linear_case(0.05)
    with _autotune.use_timer(timer):
        _check_linear(torch.randn(0, 32), w, mask)
    assert timer.keys == []


def test_compiled_graph_runs_the_ops_and_measures_only_eagerly(monkeypatch):
    fake = FakeSparse()
    _with_fake(monkeypatch, fake)
    timer = FakeTimer(sparse_wins_when_sparse)
    x, w, mask = _linear_case(0.05)
    fn = torch.compile(lambda x: saf.ops.masked_linear(x, w, mask), backend="eager",
                       fullgraph=True)
    with _autotune.use_timer(timer):
        torch.testing.assert_close(fn(x), x @ (w * mask).t())
    # Tracing ran on fake tensors (no measurement); the call ran the op on real ones.
    assert all(isinstance(k, _autotune.Key) for k in timer.keys) and len(timer.keys) == 1


def test_in_place_pgd_step_is_applied_once_while_measured():
    torch.manual_seed(3)
    x = torch.rand(4, 3, 5, 5)
    x_adv = (x + 0.01 * torch.randn_like(x)).clamp(0, 1)
    g = torch.randn_like(x)
    want = torch.clamp(torch.minimum(torch.maximum(x_adv + 0.1 * g.sign(), x - 0.3), x + 0.3),
                       0, 1)
    calls = []

    def timer(key, fns):  # runs every candidate repeatedly, as the real timer does
        calls.append(key)
        for fn in fns.values():
            for _ in range(3):
                fn()
        return {n: (1.0 if n == "torch" else 0.5) for n in fns}

    with _autotune.use_timer(timer):
        buf = x_adv.clone()
        saf.ops.pgd_step_(buf, g, x, alpha=0.1, eps=0.3)
    assert calls and calls[0].op == "pgd_step" and calls[0].direction == "step"
    torch.testing.assert_close(buf, want, rtol=0, atol=0)


@pytest.mark.skipif("cpp" not in cpu_backends(), reason="needs a C++ compiler")
def test_real_cpp_sparse_candidate_when_measured_faster():
    """With the real kernels: auto runs cpp-sparse where the timer says so, and its output,
    input gradient and weight gradient match the torch formula."""
    x, w, mask = _linear_case(0.05)
    x.requires_grad_()
    w.requires_grad_()
    with _autotune.use_timer(FakeTimer(sparse_wins_when_sparse)):
        y = saf.ops.masked_linear(x, w, mask)
        gx, gw = torch.autograd.grad(y.square().sum(), (x, w))
    yr = F.linear(x, w * mask)
    rx, rw = torch.autograd.grad(yr.square().sum(), (x, w))
    torch.testing.assert_close(y, yr)
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gw, rw)
    picked = {r["direction"]: r["choice"] for r in backends.choices().values()}
    assert picked == dict.fromkeys(("forward", "grad_input", "grad_weight"), "cpp-sparse")


def test_info_explains_cached_choices(monkeypatch, _private_cache, capsys):
    from sparse_adv_fast import info

    _with_fake(monkeypatch, FakeSparse())
    x, w, mask = _linear_case(0.05)
    with _autotune.use_timer(FakeTimer(sparse_wins_when_sparse)):
        _check_linear(x, w, mask)
    backends.reset()  # info reads what is on disk
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        info.main()
    out = capsys.readouterr().out
    assert str(_private_cache) in out
    assert "masked_linear/forward [8x32x40] density<=0.05" in out
    assert "-> cpp-sparse" in out and "2.00x torch" in out


def test_sparse_kernels_are_not_timed_above_their_density_range(monkeypatch):
    fake = FakeSparse()
    fake.max_density = 0.5
    _with_fake(monkeypatch, fake)
    timer = FakeTimer(lambda key, name: 0.1 if name != "torch" else 1.0)
    with _autotune.use_timer(timer):
        _check_linear(*_linear_case(0.9))
    assert fake.calls == [] and timer.keys == []  # torch alone remains: nothing to time


def test_a_density_range_may_depend_on_the_mask_shape(monkeypatch):
    """A callable ``max_density`` gets the mask's shape: at density 0.9 the fake is timed
    (and, 2.5x faster, runs) for a mask it admits, and is not even timed for one it does
    not."""
    fake = FakeSparse()
    seen = []

    def limit(shape):
        seen.append(shape)
        return 1.0 if shape == (40, 32) else 0.5

    fake.max_density = limit
    _with_fake(monkeypatch, fake)
    timer = FakeTimer(lambda key, name: 0.4 if name != "torch" else 1.0)
    x, w, mask = _linear_case(0.9)
    with _autotune.use_timer(timer):
        _check_linear(x, w, mask)  # measured: the fake wins
        fake.calls.clear()
        _check_linear(x, w, mask)
    assert fake.calls == ["forward"] and len(timer.keys) == 1 and (40, 32) in seen
    torch.manual_seed(1)
    x2, w2 = torch.randn(6, 16), torch.randn(40, 16)
    m2 = torch.rand(40, 16) < 0.9
    fake.calls.clear()
    with _autotune.use_timer(timer):
        _check_linear(x2, w2, m2)
    assert fake.calls == [] and len(timer.keys) == 1  # not admitted: nothing timed


def test_thin_convs_admit_the_direct_kernels_at_any_density():
    """The cpp conv kernels' range: any density for a conv of at most THIN_CHANNELS input
    channels a group (an RGB or grey stem, a depthwise conv), else MAX_DENSITY."""
    from sparse_adv_fast.backends import cpp

    limit = cpp.SparseConv2d.max_density
    assert limit((16, 3, 3, 3)) == 1.0  # RGB stem
    assert limit((16, 1, 7, 7)) == 1.0  # grey stem, or depthwise
    assert limit((16, 4, 3, 3)) == cpp.MAX_DENSITY
    assert limit((32, 16, 1, 1)) == cpp.MAX_DENSITY  # a 1x1 GEMM: few MACs, not thin
    assert cpp.SparseLinear.max_density == cpp.MAX_DENSITY


class ScriptedClock:
    """perf_counter that advances only when a fake kernel 'runs' for a scripted time."""

    def __init__(self, scripts):
        self.now, self.scripts = 0.0, {k: list(v) for k, v in scripts.items()}

    def __call__(self):
        return self.now

    def kernel(self, name):
        def run():
            self.now += self.scripts[name].pop(0) if len(self.scripts[name]) > 1 else \
                self.scripts[name][0]
        return run


def test_default_timer_outlasts_stalls_of_a_noisy_machine(monkeypatch):
    """Three stalled samples of the dense reference must not hand it to the sparse kernel:
    rounds continue until each minimum is confirmed by a second sample."""
    clock = ScriptedClock({"torch": [50.0, 40.0, 60.0, 1.0, 1.1, 1.0], "cpp-sparse": [2.0]})
    monkeypatch.setattr(_autotune.time, "perf_counter", clock)
    fns = {n: clock.kernel(n) for n in ("torch", "cpp-sparse")}
    key = _autotune.make_key("masked_conv2d", "forward", (8, 16), 1.0, torch.float32,
                             torch.device("cpu"))
    times = _autotune.default_timer(key, fns)
    assert times == {"torch": 1.0, "cpp-sparse": 2.0}
    assert _autotune.rule(times) == "torch"
    quiet = ScriptedClock({"torch": [1.0], "cpp-sparse": [3.0]})
    monkeypatch.setattr(_autotune.time, "perf_counter", quiet)
    calls = []

    def counted(name):
        run = quiet.kernel(name)
        return lambda: (calls.append(name), run())

    fns = {n: counted(n) for n in ("torch", "cpp-sparse")}
    _autotune.default_timer(key, fns)
    assert len(calls) == 2 * _autotune.REPS, "a quiet machine needs only the first rounds"
