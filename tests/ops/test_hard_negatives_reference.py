"""sample_hard_negatives (public op, backend "torch") and its reference: the draws follow the softmax of
each row with the own pair / same-image pairs excluded (chi-square goodness of fit), extreme logits,
degenerate rows, reproducibility, global-row streams, and no host synchronisation."""
from __future__ import annotations

import pytest
import torch

from blipfast.ops import sample_hard_negatives, sample_hard_negatives_from_gathered, sample_hard_negatives_ref

F64 = torch.float64
INF = float("inf")
NAN = float("nan")


def chi2_sf(stat: float, df: int) -> float:
    """Survival function of the chi-square distribution: Q(df / 2, stat / 2)."""
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=F64), torch.tensor(stat / 2, dtype=F64)))


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson goodness of fit of a [R, C] table of counts (each row an independent multinomial sample)
    against row probabilities [R, C]; cells with probability 0 must be empty and add no freedom."""
    counts, probs = counts.to(F64), probs.to(F64)
    assert (counts[probs == 0] == 0).all(), "drew a column with probability 0"
    n = counts.sum(1, keepdim=True)
    exp = n * probs
    live = probs > 0
    assert (exp[live] >= 5).all(), "too few draws for the chi-square approximation"
    stat = float((((counts - exp) ** 2)[live] / exp[live]).sum())
    df = int(live.sum()) - counts.shape[0]
    return chi2_sf(stat, df)


def test_chi2_sf_known_values():
    # textbook critical values: P(chi2_1 > 3.841) = 0.05, P(chi2_10 > 23.209) = 0.01, P(chi2_2 > x) = exp(-x/2)
    assert abs(chi2_sf(3.841459, 1) - 0.05) < 1e-6
    assert abs(chi2_sf(23.209251, 10) - 0.01) < 1e-6
    assert abs(chi2_sf(7.3, 2) - torch.exp(torch.tensor(-3.65, dtype=F64)).item()) < 1e-12


def excluded_softmax(logits: torch.Tensor, drawable: torch.Tensor) -> torch.Tensor:
    """Reference probabilities: softmax over the drawable columns, exactly 0 elsewhere."""
    return torch.softmax(logits.to(F64).masked_fill(~drawable, -INF), dim=-1)


def test_reference_draws_follow_softmax_with_own_pair_excluded():
    """20k draws from identical rows (the reference is what backend 'torch' runs) against the softmax with
    the own column excluded; and the same draws reject a wrong distribution (the test has power)."""
    r, c, own = 20000, 10, 3
    gen = torch.Generator().manual_seed(20240611)
    l_t = (torch.randn(c, generator=gen, dtype=F64) * 1.5).float()
    l_i = (torch.randn(c, generator=gen, dtype=F64) * 1.5).float()
    l_t[own] = l_t.max() + 3.0  # the own pair is the most similar column, as in training
    drawable = torch.ones(r, c, dtype=torch.bool)
    drawable[:, own] = False
    seed = torch.tensor([987654321])
    neg_text, neg_image = sample_hard_negatives_ref(l_t.expand(r, c).contiguous(), l_i.expand(r, c).contiguous(),
                                                    drawable, seed)
    for draws, logits in ((neg_text, l_t), (neg_image, l_i)):
        assert draws.dtype == torch.int64 and draws.shape == (r,)
        counts = torch.bincount(draws, minlength=c).view(1, c)
        probs = excluded_softmax(logits, drawable[0]).view(1, c)
        p = chi2_pvalue(counts, probs)
        assert p > 1e-4, f"chi-square p-value {p:.2e}: draws do not follow the excluded softmax"
        # power: the same counts reject the softmax at a 20% different temperature
        assert chi2_pvalue(counts, excluded_softmax(logits * 1.2, drawable[0]).view(1, c)) < 1e-6


def _group_table(draws, rows_group, col_group, n_groups):
    t = torch.zeros(n_groups, n_groups, dtype=torch.int64)
    t.index_put_((rows_group, col_group[draws]), torch.ones_like(draws), accumulate=True)
    return t


def test_public_op_draws_follow_softmax_with_own_pair_excluded():
    """Through the public op: B = BW = 200, logit of column j is l[j % 5] in every row; row b excludes only
    itself, so group g has (40 - [b % 5 == g]) drawable columns with weight exp(l[g])."""
    b, ng, calls = 200, 5, 6
    l_t = torch.tensor([0.0, 0.6, -0.5, 1.0, -0.9])
    l_i = torch.tensor([-0.3, 0.2, 0.9, -0.8, 0.1])
    cols = torch.arange(b)
    grp = cols % ng
    gen = torch.Generator().manual_seed(4321)
    tables = [torch.zeros(ng, ng, dtype=torch.int64) for _ in range(2)]
    for _ in range(calls):
        neg_text, neg_image = sample_hard_negatives(l_t[grp].expand(b, b), l_i[grp].expand(b, b), generator=gen,
                                                    backend="torch")
        for t, draws in zip(tables, (neg_text, neg_image)):
            assert (draws != cols).all(), "drew the own pair"
            t += _group_table(draws, grp, grp, ng)
    for t, l in zip(tables, (l_t, l_i)):
        size = torch.full((ng, ng), b // ng, dtype=F64) - torch.eye(ng, dtype=F64)  # [row group, column group]
        w = size * torch.exp(l.to(F64)).view(1, ng)
        probs = w / w.sum(1, keepdim=True)
        p = chi2_pvalue(t, probs)
        assert p > 1e-4, f"p-value {p:.2e}"
        assert chi2_pvalue(t, torch.softmax(l.to(F64) * 1.5, 0).expand(ng, ng)) < 1e-6


def test_public_op_draws_follow_softmax_with_same_image_excluded():
    """With image_ids = j % 6 every row excludes its whole group (equal sizes): group g is drawn with
    probability softmax over the other groups of l."""
    b, ng, calls = 180, 6, 5
    l = torch.tensor([0.3, -0.4, 0.8, 0.0, -1.0, 0.5])
    ids = torch.arange(b) % ng
    gen = torch.Generator().manual_seed(99)
    table = torch.zeros(ng, ng, dtype=torch.int64)
    for _ in range(calls):
        neg_text, neg_image = sample_hard_negatives(l[ids].expand(b, b), l[ids].expand(b, b), image_ids=ids,
                                                    generator=gen, backend="torch")
        for draws in (neg_text, neg_image):
            assert (ids[draws] != ids).all(), "drew a pair showing the same image"
            table += _group_table(draws, ids, ids, ng)
    probs = torch.softmax(l.to(F64).view(1, ng).expand(ng, ng).masked_fill(torch.eye(ng, dtype=torch.bool), -INF), 1)
    assert chi2_pvalue(table, probs) > 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_extreme_logits_give_valid_indices(dtype):
    b = 6
    base = torch.randn(b, b, dtype=F64)
    s = base.clone()
    s[0, 2] = 1e4  # overwhelms the row: must be drawn
    s[1, 0], s[1, 4] = INF, INF  # +inf columns win
    s[2] = NAN
    s[2, 5] = -1e4  # the only valid column of its row
    s[3, 0], s[3, 1], s[3, 2] = NAN, NAN, -INF  # own pair is 3: only 4 and 5 remain
    s[4] = NAN
    s[4, 0], s[4, 1] = -INF, -INF
    s[4, 4] = 5.0  # the own pair, excluded: nothing drawable remains
    s[5, 5] = INF  # an infinite own pair is still excluded
    s[5, 1] = -1e4
    allowed = {0: {2}, 1: {0, 4}, 2: {5}, 3: {4, 5}, 4: {-1}, 5: {0, 1, 2, 3, 4}}
    x = s.to(dtype)
    gen = torch.Generator().manual_seed(3)
    seen5 = set()
    for _ in range(40):
        for draws in sample_hard_negatives(x, x.clone(), generator=gen, backend="torch"):
            assert draws.dtype == torch.int64
            for row, idx in enumerate(draws.tolist()):
                assert idx in allowed[row], f"row {row} drew {idx}"
            seen5.add(int(draws[5]))
    assert len(seen5) > 1  # the row with a finite spread really samples


def test_single_pair_and_fully_excluded_rows_return_minus_one():
    one = torch.randn(1, 1)
    nt, ni = sample_hard_negatives(one, one, backend="torch")
    assert nt.tolist() == [-1] and ni.tolist() == [-1] and nt.dtype == torch.int64
    s = torch.randn(4, 4)
    nt, ni = sample_hard_negatives(s, s, image_ids=torch.tensor([7, 7, 7, 7]), backend="torch")
    assert nt.tolist() == [-1] * 4 and ni.tolist() == [-1] * 4
    s = torch.randn(3, 3)
    for i in range(20):
        nt, ni = sample_hard_negatives(s, s, image_ids=torch.tensor([0, 0, 1], dtype=torch.int32), seed=i,
                                       backend="torch")
        for d in (nt, ni):
            assert d[0] == 2 and d[1] == 2 and int(d[2]) in (0, 1)


def test_generator_and_seed_reproducibility():
    b = 32
    s_i2t, s_t2i = torch.randn(b, b), torch.randn(b, b)

    def draw(**kw):
        return torch.stack(sample_hard_negatives(s_i2t, s_t2i, backend="torch", **kw))

    a = draw(generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, draw(generator=torch.Generator().manual_seed(7)))
    assert not torch.equal(a, draw(generator=torch.Generator().manual_seed(8)))
    g = torch.Generator().manual_seed(7)
    first, second = draw(generator=g), draw(generator=g)
    assert torch.equal(first, a) and not torch.equal(first, second), "the generator must advance"
    assert torch.equal(draw(seed=5), draw(seed=torch.tensor([5])))
    assert not torch.equal(draw(seed=5), draw(seed=6))
    assert not torch.equal(draw(), draw()), "two unseeded calls drew the same negatives"
    torch.manual_seed(1)
    x = draw()
    torch.manual_seed(1)
    assert torch.equal(x, draw())


def test_streams_are_indexed_by_global_row():
    """Rank r holding rows [r*B, (r+1)*B) of the global [BW, BW] logits draws what one process holding
    the whole batch draws for those rows under the same seed (docs/design.md#testing: distributed negatives equal the
    single-process big-batch result); the ops pass row_offset = rank * B."""
    world, b = 3, 4
    bw = world * b
    s_i2t, s_t2i = torch.randn(bw, bw), torch.randn(bw, bw)
    ids = torch.randint(0, 5, (bw,))
    for image_ids in (None, ids):
        full = sample_hard_negatives(s_i2t, s_t2i, image_ids=image_ids, seed=77, backend="torch")
        for rank in range(world):
            rows = slice(rank * b, (rank + 1) * b)
            if image_ids is None:
                drawable = torch.arange(bw).view(1, bw) != (torch.arange(b) + rank * b).view(b, 1)
            else:
                drawable = ids[rows].view(b, 1) != ids.view(1, bw)
            kw = {} if image_ids is None else dict(image_ids=ids[rows], image_ids_all=ids)
            public = sample_hard_negatives_from_gathered(s_i2t[rows], s_t2i[rows], rank=rank, seed=77,
                                                         backend="torch", **kw)
            local = torch.ops.blipfast.sample_hard_negatives(s_i2t[rows], s_t2i[rows], drawable,
                                                             torch.tensor([77]), rank * b, "torch")
            ref = sample_hard_negatives_ref(s_i2t[rows], s_t2i[rows], drawable, torch.tensor([77]), rank * b)
            for pu, lo, rf, fu in zip(public, local, ref, full):
                assert torch.equal(pu, fu[rows]) and torch.equal(lo, fu[rows]) and torch.equal(rf, fu[rows])
    # distinct rows get distinct noise: identical logit rows do not all draw the same column
    flat = torch.zeros(bw, bw)
    nt, _ = sample_hard_negatives(flat, flat, seed=1, backend="torch")
    assert len(set(nt.tolist())) > 3


def test_no_host_sync():
    """How this is checked: the public op (validation, seed drawing, masks, dispatch) and the reference
    sampler (the code backend 'torch' runs) both run on meta tensors, which have no data, so any host
    synchronisation (.item(), .tolist(), bool(tensor), data-dependent shapes such as nonzero) raises.
    On a GPU, test_no_host_sync_cuda also runs the op under torch.cuda.set_sync_debug_mode('error')."""
    b = 5
    s = torch.empty(b, b, device="meta")
    nt, ni = sample_hard_negatives(s, s, backend="torch")
    assert nt.device.type == "meta" and nt.shape == (b,) and nt.dtype == torch.int64
    nt, ni = sample_hard_negatives(s, s, image_ids=torch.empty(b, dtype=torch.int64, device="meta"))
    assert ni.shape == (b,)
    drawable = torch.empty(b, b, dtype=torch.bool, device="meta")
    seed = torch.empty(1, dtype=torch.int64, device="meta")
    nt, ni = sample_hard_negatives_ref(s, s, drawable, seed, 0)
    assert nt.shape == (b,) and nt.dtype == torch.int64 and ni.device.type == "meta"
    with pytest.raises((RuntimeError, NotImplementedError)):  # the probe does catch a sync
        torch.empty(1, device="meta").item()


@pytest.mark.gpu
def test_no_host_sync_cuda():
    s = torch.randn(16, 16, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    sample_hard_negatives(s, s, generator=g)  # warm-up (lazy init may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        nt, ni = sample_hard_negatives(s, s, generator=g)
        nt, ni = sample_hard_negatives(s, s, image_ids=torch.arange(16, device="cuda") % 4, generator=g)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert nt.device.type == "cuda"
