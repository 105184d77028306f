"""Autotuning of the Triton attention kernels (kernels/attention.py) by bucket, on CPU.

The GPU-only parts are faked: ``_tuning_possible`` (the device check), ``triton.testing.do_bench`` (a
timer whose verdict the test chooses) and ``torch.cuda.is_current_stream_capturing``; the kernels
themselves run under the interpreter, so the tuned configurations are also checked for correctness on
every member of the bucket they were chosen for.
"""
from __future__ import annotations

import math
import random
import warnings

import pytest
import torch
import triton.testing
from triton.runtime.errors import OutOfResources

from blipfast import ops
from blipfast.kernels import attention as kern

from tests.helpers.attention import DEV, _cross_case


class FakeTimer:
    """do_bench stand-in that times nothing: within each tuning round (one ``_choose`` call) it reports the
    candidate at position ``fastest`` as the fastest, so the test decides the winner."""

    def __init__(self, fastest: int, failing=()):
        self.fastest = fastest
        self.failing = set(failing)  # positions whose launch fails (as Triton does for a tile too big for the GPU)
        self.calls = {"fwd": 0, "bwd": 0}
        self.kind, self.pos = None, 0

    def start(self, kind: str) -> None:
        self.kind, self.pos = kind, 0

    def __call__(self, fn, warmup=None, rep=None):
        self.calls[self.kind] += 1
        self.pos += 1
        if self.pos - 1 in self.failing:
            raise OutOfResources(262144, 232448, "shared memory")
        return 1.0 if self.pos - 1 == self.fastest else 2.0


@pytest.fixture
def tuning(monkeypatch):
    """Tuning switched on for CPU tensors, an empty cache, a recorder of the configurations launched
    (kind, cfg), and a factory of fake timers."""
    monkeypatch.setattr(kern, "_TUNED", {})
    monkeypatch.setattr(kern, "_REPORTED", set())
    monkeypatch.setattr(kern, "_tuning_possible", lambda device: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    launched, timers = [], []
    for name, kind in (("_launch_fwd", "fwd"), ("_launch_bwd", "bwd")):
        def launch(g, *args, _orig=getattr(kern, name), _kind=kind):
            launched.append((_kind, args[-1]))
            return _orig(g, *args)

        monkeypatch.setattr(kern, name, launch)
    orig_choose = kern._choose

    def choose(g, kind, candidates, run, device):
        for t in timers:
            t.start(kind)
        return orig_choose(g, kind, candidates, run, device)

    monkeypatch.setattr(kern, "_choose", choose)

    def timer(fastest, failing=()):
        t = FakeTimer(fastest, failing)
        timers.append(t)
        monkeypatch.setattr(triton.testing, "do_bench", t)
        return t

    return launched, timer


def _cross(n, m, lq, lk, h=2, d=16):
    """fp16 cross_attention through the op (Triton backend) with its gradients, held to the tolerance rule
    (docs/design.md#the-tolerance-rule) (fp32 has a single candidate configuration: nothing to tune); returns the
    call's geometry."""
    idx = torch.randint(0, m, (n,))
    _, (q, k, *_) = _cross_case(n, m, lq, lk, h, d, idx, "ragged", dtype=torch.float16, lowp="lowp")
    return kern._cross_geom(q, k, idx, 0.0, 1.0 / math.sqrt(d))


def _last(launched, kind):
    return [cfg for k, cfg in launched if k == kind][-1]


def test_two_key_lengths_of_one_bucket_tune_once(tuning):
    """Lk = 37 and 50 share the bucket Lk -> 64: the first call times the candidates, the second reuses the
    winner (a non-default one here) and is still right (forward and backward); Lk = 70 is another bucket
    and tunes again."""
    launched, timer = tuning
    t = timer(fastest=1)
    g = _cross(6, 3, 5, 37)
    fwd, bwd = kern._fwd_candidates(g), kern._bwd_candidates(g)
    assert len(fwd) > 1 and len(bwd) > 1 and t.calls == {"fwd": len(fwd), "bwd": len(bwd)}
    assert kern._TUNED[g.key("fwd")] == fwd[1] and kern._TUNED[g.key("bwd")] == bwd[1]
    g2 = _cross(6, 3, 5, 50)
    assert g2.key("fwd") == g.key("fwd") and g2.key("bwd") == g.key("bwd")
    assert t.calls == {"fwd": len(fwd), "bwd": len(bwd)}, "the same bucket must not re-tune"
    assert _last(launched, "fwd") == fwd[1] and _last(launched, "bwd") == bwd[1]
    _cross(6, 3, 5, 70)
    assert t.calls["fwd"] > len(fwd) and t.calls["bwd"] > len(bwd), "another key bucket tunes"


def test_capture_records_the_heuristic_and_eager_reuses_it(tuning, monkeypatch):
    """A bucket first seen while a CUDA graph is captured: no timing, the heuristic is used AND recorded,
    so a later eager call of the bucket launches the same tiling instead of tuning a different one."""
    launched, timer = tuning
    t = timer(fastest=1)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    g = _cross(6, 3, 5, 21)
    heuristic = {"fwd": kern._fwd_candidates(g)[0], "bwd": kern._bwd_candidates(g)[0]}
    for kind in ("fwd", "bwd"):
        assert _last(launched, kind) == heuristic[kind] and kern._TUNED[g.key(kind)] == heuristic[kind]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    _cross(6, 3, 5, 30)  # eager, same bucket (Lk -> 32)
    assert t.calls == {"fwd": 0, "bwd": 0}
    assert _last(launched, "fwd") == heuristic["fwd"] and _last(launched, "bwd") == heuristic["bwd"]


def test_capture_reuses_the_tuned_choice(tuning, monkeypatch):
    launched, timer = tuning
    t = timer(fastest=2)
    g = _cross(6, 3, 5, 40)
    tuned = kern._fwd_candidates(g)[2], kern._bwd_candidates(g)[2]
    calls = dict(t.calls)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    _cross(6, 3, 5, 60)
    assert t.calls == calls and (_last(launched, "fwd"), _last(launched, "bwd")) == tuned


def test_self_attention_tunes_by_bucket(tuning):
    """Self-attention: Lk = 25 and 32 (T = 20 and 27 text tokens) tune once, forward and backward."""
    _, timer = tuning
    t = timer(fastest=1)
    for lk in (25, 32):
        q, k, v = (torch.randn(2, lk, 2, 16, dtype=torch.float16, device=DEV, requires_grad=True) for _ in range(3))
        out = ops.qformer_attention(q, k, v, num_query=5, mode="causal", backend="triton")
        out.backward(torch.randn_like(out))
        if lk == 25:
            g = kern._self_geom(q, k, 5, "causal", 0.0, 0.25)
            first = dict(t.calls)
            assert first == {"fwd": len(kern._fwd_candidates(g)), "bwd": len(kern._bwd_candidates(g))}
    assert t.calls == first
    assert kern._TUNED[g.key("bwd")] == kern._bwd_candidates(g)[1]


def _random_geom(rng, has_index, **fixed):
    n = rng.randint(1, 300)
    m = rng.randint(1, n) if has_index else n
    lk = rng.randint(1, 700)
    lq = rng.randint(1, lk if not has_index else 200)
    g = dict(n=n, m=m, h=rng.choice([1, 2, 4, 6, 12]), lq=lq, lk=lk, d=rng.choice([16, 40, 64, 88, 128]),
             mode=0 if has_index else rng.randint(0, 2), nq=0, seq_off=0, has_index=has_index,
             dropout_p=rng.choice([0.0, 0.1]), scale=0.125,
             dtype=rng.choice([torch.float32, torch.float16, torch.bfloat16]))
    g.update(fixed)
    return kern._Geom(**g)


@pytest.mark.parametrize("has_index", [False, True], ids=["self", "cross"])
def test_members_of_a_bucket_get_the_same_and_valid_configurations(has_index):
    """For random pairs of geometries with the same bucket: identical candidate lists (so a choice made for
    one is a choice for all), and every candidate keeps its meaning on each member: single key tile
    (BLOCK_N >= Lk), fused backward, stacked row-sets, heads per program dividing H."""
    rng = random.Random(1234)
    pairs = 0
    for _ in range(3000):
        a = _random_geom(rng, has_index)
        b = _random_geom(rng, has_index, h=a.h, d=a.d, mode=a.mode, dtype=a.dtype, dropout_p=a.dropout_p)
        if a.key("fwd") != b.key("fwd"):
            # force a same-bucket partner: another Lq, Lk and N with the same power-of-two buckets
            lk = rng.randint(kern._np2(a.lk) // 2 + 1, kern._np2(a.lk))
            lq = rng.randint(kern._np2(a.lq) // 2 + 1, kern._np2(a.lq)) if has_index else min(lk, a.lq)
            b = kern._Geom(**{**a.__dict__, "lk": lk, "lq": lq})
            if a.key("fwd") != b.key("fwd"):
                continue
        pairs += 1
        for cands in (kern._fwd_candidates, kern._bwd_candidates):
            ca, cb = cands(a), cands(b)
            assert ca == cb, (a, b)
            for c in ca:
                assert a.h % c["HPP"] == 0
                assert (a.lk <= c["BLOCK_N"]) == (b.lk <= c["BLOCK_N"]), "single key tile on one member only"
                assert (kern._rowsets_per_tile(a, c["BLOCK_M"]) > 1) == (kern._rowsets_per_tile(b, c["BLOCK_M"]) > 1)
    assert pairs > 1000


def test_bucket_key_ignores_exact_lengths_but_not_what_matters():
    base = kern._Geom(n=48, m=16, h=12, lq=32, lk=257, d=64, mode=0, nq=0, seq_off=0, has_index=True,
                      dropout_p=0.1, scale=0.125, dtype=torch.bfloat16)
    same = [dict(lk=300), dict(lk=512), dict(n=40), dict(m=15), dict(lq=17), dict(dropout_p=0.2)]
    other = [dict(lk=256), dict(lk=513), dict(n=65), dict(m=9), dict(lq=33), dict(h=8), dict(d=80),
             dict(dtype=torch.float16), dict(dropout_p=0.0), dict(has_index=False)]
    for change in same:
        assert kern._Geom(**{**base.__dict__, **change}).key("fwd") == base.key("fwd"), change
    for change in other:
        assert kern._Geom(**{**base.__dict__, **change}).key("fwd") != base.key("fwd"), change
    assert base.key("fwd") != base.key("bwd")


def test_a_failing_candidate_is_reported_once_and_the_others_compete(tuning):
    """The candidate that would win fails (here the heuristic): a warning names the kernel, the configuration's
    parameters and the error; the fastest working candidate is chosen and runs right (_cross checks the result)."""
    launched, timer = tuning
    timer(fastest=0, failing={0})
    with pytest.warns(kern.AutotuneWarning) as caught:
        g = _cross(6, 3, 5, 37)
    fwd, bwd = kern._fwd_candidates(g), kern._bwd_candidates(g)
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 2, msgs  # forward and backward: one failing configuration each
    for msg, kernel, cfg in zip(msgs, ("attn_fwd_kernel", "attn_bwd_dkdv_kernel"), (fwd[0], bwd[0])):
        assert kernel in msg and "out of resource: shared memory" in msg, msg
        assert all(f"{k}={v}" in msg for k, v in cfg.items()), msg
    # every failure costs its position: the fastest of the rest (all 2.0: the first of them) wins
    assert kern._TUNED[g.key("fwd")] == fwd[1] and kern._TUNED[g.key("bwd")] == bwd[1]
    assert _last(launched, "fwd") == fwd[1] and _last(launched, "bwd") == bwd[1]


def test_the_same_failing_configuration_warns_once(tuning):
    """A configuration that failed once is not reported again when it fails in a later tuning round."""
    _, timer = tuning
    timer(fastest=1, failing={0})
    g = kern._Geom(n=6, m=3, h=2, lq=5, lk=37, d=16, mode=0, nq=0, seq_off=0, has_index=True, dropout_p=0.0,
                   scale=0.25, dtype=torch.float16)
    cands = kern._fwd_candidates(g)
    with pytest.warns(kern.AutotuneWarning, match="attn_fwd_kernel"):
        assert kern._choose(g, "fwd", cands, lambda cfg: None, torch.device("cpu")) == cands[1]
    kern._TUNED.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", kern.AutotuneWarning)
        assert kern._choose(g, "fwd", cands, lambda cfg: None, torch.device("cpu")) == cands[1]


def test_no_working_configuration_is_an_error_listing_every_failure(tuning):
    """Every candidate fails: a RuntimeError listing each configuration with its error (never a silent fallback
    to a configuration that cannot run), and nothing is cached for the bucket."""
    _, timer = tuning
    g = kern._Geom(n=6, m=3, h=2, lq=5, lk=37, d=16, mode=0, nq=0, seq_off=0, has_index=True, dropout_p=0.0,
                   scale=0.25, dtype=torch.float16)
    cands = kern._bwd_candidates(g)
    assert len(cands) > 1
    timer(fastest=0, failing=range(len(cands)))
    with pytest.warns(kern.AutotuneWarning), pytest.raises(RuntimeError, match="no configuration") as err:
        kern._choose(g, "bwd", cands, lambda cfg: None, torch.device("cpu"))
    msg = str(err.value)
    assert "attn_bwd_dq_kernel + attn_bwd_dkdv_kernel" in msg or "attn_bwd_dkdv_kernel" in msg
    assert msg.count("out of resource: shared memory") == len(cands)
    for cfg in cands:
        assert kern._describe(cfg) in msg
    assert isinstance(err.value.__cause__, OutOfResources)
    assert g.key("bwd") not in kern._TUNED
