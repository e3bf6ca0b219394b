"""Losses against their direct (non-log-space) formulas, against autograd, at extreme scores, and on bad input."""

import math

import pytest
import torch

from pyterrier_kdcl.training.losses import InfoNCE, KLDistillation, ListNet, MarginMSE, RankNet, Weighted

GROUP_SIZES = [2, 3, 8, 16]
TEMPERATURES = [0.5, 1.0, 2.0]


def _random(group_size, n=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed * 100 + group_size)
    scores = torch.randn(n, group_size, generator=g, dtype=dtype) * 3
    teacher = torch.randn(n, group_size, generator=g, dtype=dtype) * 3
    labels = torch.zeros(n, group_size, dtype=dtype)
    labels[:, 0] = 1
    return scores, labels, teacher


# --- direct formulas: plain exp / sums / loops, no log-space tricks -----------------------------------------

def naive_infonce(s, y, tau):
    e = torch.exp(s / tau)
    return (-torch.log((e * (y > 0)).sum(1) / e.sum(1))).mean()


def naive_softmax(x):
    return torch.exp(x) / torch.exp(x).sum(1, keepdim=True)


def naive_kl(s, t, tt, ts):
    p, q = naive_softmax(t / tt), naive_softmax(s / ts)
    return ts**2 * (p * torch.log(p / q)).sum(1).mean()


def naive_margin_mse(s, t, pos):
    rows = []
    for q in range(s.shape[0]):
        p = pos[q]
        terms = [((s[q, p] - s[q, j]) - (t[q, p] - t[q, j])) ** 2 for j in range(s.shape[1]) if j != p]
        rows.append(sum(terms) / len(terms))
    return torch.stack(rows).mean()


def naive_ranknet(s, y):
    rows = []
    for q in range(s.shape[0]):
        terms = [torch.log(1 + torch.exp(-(s[q, i] - s[q, j])))
                 for i in range(s.shape[1]) for j in range(s.shape[1]) if y[q, i] > y[q, j]]
        if terms:
            rows.append(sum(terms) / len(terms))
    return torch.stack(rows).mean()


def naive_listnet(s, y):
    return -(naive_softmax(y) * torch.log(naive_softmax(s))).sum(1).mean()


# --- values against the formulas -----------------------------------------------------------------------------

@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("tau", TEMPERATURES)
def test_infonce_matches_formula(group_size, tau):
    s, y, _ = _random(group_size)
    y = y[:, torch.randperm(group_size, generator=torch.Generator().manual_seed(1))]  # positive anywhere
    torch.testing.assert_close(InfoNCE(tau)(s, labels=y), naive_infonce(s, y, tau))


def test_infonce_multiple_and_graded_positives():
    s = torch.tensor([[1.0, 2.0, 0.5, -1.0], [0.0, 3.0, 1.0, 2.0]], dtype=torch.float64)
    y = torch.tensor([[1, 2, 0, 0], [0, 1, 0, 1]])
    expected = -(math.log((math.e**1 + math.e**2) / sum(math.exp(x) for x in [1, 2, 0.5, -1]))
                 + math.log((math.e**3 + math.e**2) / sum(math.exp(x) for x in [0, 3, 1, 2]))) / 2
    assert InfoNCE()(s, labels=y).item() == pytest.approx(expected)
    torch.testing.assert_close(InfoNCE(0.7)(s, labels=y), naive_infonce(s, y, 0.7))
    # all documents positive: probability 1, loss 0
    assert InfoNCE()(s, labels=torch.ones_like(s)).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("tt,ts", [(1.0, 1.0), (2.0, 1.0), (1.0, 2.0), (0.5, 3.0)])
def test_kl_matches_formula(group_size, tt, ts):
    s, _, t = _random(group_size)
    torch.testing.assert_close(KLDistillation(tt, ts)(s, teacher_scores=t), naive_kl(s, t, tt, ts))


@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_margin_mse_matches_formula(group_size):
    s, y, t = _random(group_size)
    n = s.shape[0]
    torch.testing.assert_close(MarginMSE()(s, teacher_scores=t), naive_margin_mse(s, t, [0] * n))
    pos = torch.randint(group_size, (n,), generator=torch.Generator().manual_seed(2))
    y = torch.zeros_like(s)
    y[torch.arange(n), pos] = 2
    y[torch.arange(n), (pos + 1) % group_size] += 1  # a lower graded label never wins over the positive
    torch.testing.assert_close(MarginMSE()(s, labels=y, teacher_scores=t), naive_margin_mse(s, t, pos.tolist()))


@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_ranknet_matches_formula(group_size):
    s, y, t = _random(group_size)
    torch.testing.assert_close(RankNet()(s, labels=y), naive_ranknet(s, y))
    torch.testing.assert_close(RankNet()(s, labels=y, teacher_scores=t), naive_ranknet(s, t))
    torch.testing.assert_close(RankNet(target="labels")(s, labels=y, teacher_scores=t), naive_ranknet(s, y))
    graded = torch.randint(3, s.shape, generator=torch.Generator().manual_seed(3)).double()
    graded[:, 0] = 3  # at least one ordered pair per row
    torch.testing.assert_close(RankNet()(s, labels=graded), naive_ranknet(s, graded))


def test_ranknet_rows_without_pairs_are_left_out():
    s, _, _ = _random(4, n=3)
    y = torch.tensor([[1.0, 0, 0, 0], [1, 1, 1, 1], [0, 2, 1, 0]], dtype=torch.float64)
    torch.testing.assert_close(RankNet()(s, labels=y), naive_ranknet(s, y))
    tied = RankNet()(s.requires_grad_(), labels=torch.zeros_like(s))
    assert tied.item() == 0.0
    tied.backward()


@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_listnet_matches_formula(group_size):
    s, y, t = _random(group_size)
    torch.testing.assert_close(ListNet()(s, labels=y), naive_listnet(s, y))
    torch.testing.assert_close(ListNet()(s, labels=y, teacher_scores=t), naive_listnet(s, t))
    torch.testing.assert_close(ListNet(target="labels")(s, labels=y, teacher_scores=t), naive_listnet(s, y))


def test_weighted_is_the_weighted_sum():
    s, y, t = _random(8)
    kd, cl = KLDistillation(2.0, 1.0), InfoNCE(0.5)
    alpha = 0.3
    loss = Weighted([(kd, alpha), (cl, 1 - alpha)])
    expected = alpha * kd(s, teacher_scores=t) + (1 - alpha) * cl(s, labels=y)
    torch.testing.assert_close(loss(s, labels=y, teacher_scores=t), expected)
    assert loss.needs == {"labels", "teacher_scores"}
    nested = Weighted([(loss, 2), (MarginMSE(), 0.5)])
    torch.testing.assert_close(nested(s, labels=y, teacher_scores=t),
                               2 * expected + 0.5 * MarginMSE()(s, labels=y, teacher_scores=t))
    with pytest.raises(ValueError, match="teacher_scores"):
        loss(s, labels=y)


# --- gradients -----------------------------------------------------------------------------------------------

CASES = [
    (InfoNCE(0.5), lambda s, y, t: naive_infonce(s, y, 0.5)),
    (KLDistillation(2.0, 0.5), lambda s, y, t: naive_kl(s, t, 2.0, 0.5)),
    (MarginMSE(), lambda s, y, t: naive_margin_mse(s, t, [0] * s.shape[0])),
    (RankNet(), lambda s, y, t: naive_ranknet(s, t)),
    (ListNet(), lambda s, y, t: naive_listnet(s, t)),
    (Weighted([(KLDistillation(), 0.5), (InfoNCE(), 0.5)]),
     lambda s, y, t: 0.5 * naive_kl(s, t, 1.0, 1.0) + 0.5 * naive_infonce(s, y, 1.0)),
]


@pytest.mark.parametrize("loss,naive", CASES, ids=lambda c: repr(c) if isinstance(c, torch.nn.Module) else "")
@pytest.mark.parametrize("group_size", [2, 3, 8])
def test_gradients(loss, naive, group_size):
    s, y, t = _random(group_size, n=3)
    s.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: loss(x, labels=y, teacher_scores=t), (s,))
    (ours,) = torch.autograd.grad(loss(s, labels=y, teacher_scores=t), s)
    (direct,) = torch.autograd.grad(naive(s, y, t), s)
    torch.testing.assert_close(ours, direct)


@pytest.mark.parametrize("loss", [KLDistillation(2.0, 1.0), MarginMSE(), RankNet(), ListNet()], ids=repr)
def test_no_gradient_reaches_the_teacher(loss):
    s, y, t = _random(4)
    s.requires_grad_()
    t.requires_grad_()
    loss(s, labels=y, teacher_scores=t).backward()
    assert t.grad is None
    assert s.grad is not None and s.grad.abs().sum() > 0


# --- stability -----------------------------------------------------------------------------------------------

ALL_LOSSES = [InfoNCE(0.05), KLDistillation(2.0, 0.5), MarginMSE(), RankNet(), ListNet(),
              Weighted([(KLDistillation(), 1.0), (InfoNCE(), 1.0)])]


@pytest.mark.parametrize("loss", ALL_LOSSES, ids=repr)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_large_scores_stay_finite(loss, dtype):
    s, y, t = _random(8, dtype=dtype)
    s = (s * 1e4).requires_grad_()
    value = loss(s, labels=y, teacher_scores=t * 1e4)
    assert torch.isfinite(value)
    value.backward()
    assert torch.isfinite(s.grad).all()


def test_large_scores_exact_values():
    s = torch.tensor([[1e4, 0.0, -1e4], [0.0, 1e4, 0.0]])
    y = torch.tensor([[1, 0, 0], [1, 0, 0]])
    # row 0: the positive dominates (loss ~0); row 1: it trails by 1e4 (loss ~1e4 / tau)
    assert InfoNCE(2.0)(s, labels=y).item() == pytest.approx((0 + 1e4 / 2) / 2, rel=1e-6)
    assert not torch.isfinite(naive_infonce(s, y, 2.0))  # what the log-space form avoids
    assert KLDistillation()(s, teacher_scores=s).item() == pytest.approx(0.0, abs=1e-6)


# --- KL properties -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_kl_zero_when_student_equals_teacher(temperature):
    s, _, _ = _random(8)
    s.requires_grad_()
    loss = KLDistillation(temperature, temperature)(s, teacher_scores=s.detach().clone())
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    loss.backward()
    torch.testing.assert_close(s.grad, torch.zeros_like(s))
    # a per-row shift changes nothing: softmax ignores it
    shifted = KLDistillation(temperature, temperature)(s, teacher_scores=s.detach() + torch.arange(5.0)[:, None])
    assert shifted.item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("ts", [0.5, 2.0, 4.0])
def test_kl_scales_with_student_temperature_squared(ts):
    s, _, t = _random(8)
    # s*ts / ts == s: same distributions, so the only difference is the ts² factor
    scaled = KLDistillation(1.0, ts)(s * ts, teacher_scores=t)
    torch.testing.assert_close(scaled, ts**2 * KLDistillation()(s, teacher_scores=t))


def test_listnet_and_kl_differ_by_target_entropy():
    s, _, t = _random(8)
    p = torch.softmax(t, 1)
    entropy = -(p * torch.log(p)).sum(1).mean()
    torch.testing.assert_close(ListNet()(s, teacher_scores=t), KLDistillation()(s, teacher_scores=t) + entropy)


def test_margin_mse_zero_for_matching_margins():
    s, _, t = _random(8)
    assert MarginMSE()(t + 7.0, teacher_scores=t).item() == pytest.approx(0.0, abs=1e-20)
    assert MarginMSE()(s, teacher_scores=t).item() > 0


# --- needs, repr, errors -------------------------------------------------------------------------------------

def test_needs():
    assert InfoNCE().needs == {"labels"}
    assert KLDistillation().needs == {"teacher_scores"}
    assert MarginMSE().needs == {"teacher_scores"}
    assert RankNet().needs == {"labels"} and ListNet().needs == {"labels"}
    assert RankNet(target="teacher_scores").needs == {"teacher_scores"}
    assert ListNet(target="teacher_scores").needs == {"teacher_scores"}
    assert Weighted([(InfoNCE(), 1.0), (MarginMSE(), 1.0)]).needs == {"labels", "teacher_scores"}


def test_uses_names_every_input_a_loss_reads_when_given():
    assert InfoNCE().uses == {"labels"} and KLDistillation().uses == {"teacher_scores"}
    assert MarginMSE().uses == {"labels", "teacher_scores"}  # labels find the positive
    assert RankNet().uses == {"labels", "teacher_scores"} and ListNet().uses == {"labels", "teacher_scores"}
    assert RankNet(target="labels").uses == {"labels"} and ListNet(target="teacher_scores").uses == {"teacher_scores"}
    assert Weighted([(InfoNCE(), 1.0), (RankNet(), 1.0)]).uses == {"labels", "teacher_scores"}


def test_repr_shows_parameters():
    assert repr(InfoNCE(0.1)) == "InfoNCE(temperature=0.1)"
    assert repr(KLDistillation(2, 1)) == "KLDistillation(teacher_temperature=2.0, student_temperature=1.0)"
    assert repr(MarginMSE()) == "MarginMSE()"
    assert repr(RankNet()) == "RankNet()" and repr(ListNet(target="labels")) == "ListNet(target='labels')"
    assert (repr(Weighted([(KLDistillation(2.0), 0.5), (InfoNCE(), 0.5)]))
            == "Weighted([(KLDistillation(teacher_temperature=2.0, student_temperature=1.0), 0.5), "
               "(InfoNCE(temperature=1.0), 0.5)])")
    assert repr(InfoNCE(0.5)) != repr(InfoNCE(1.0))


@pytest.mark.parametrize("loss,kwargs,match", [
    (InfoNCE(), {}, "needs labels"),
    (InfoNCE(), {"teacher_scores": "t"}, "needs labels"),
    (KLDistillation(), {"labels": "y"}, "needs teacher_scores"),
    (MarginMSE(), {"labels": "y"}, "needs teacher_scores"),
    (RankNet(), {}, "needs labels"),
    (ListNet(target="teacher_scores"), {"labels": "y"}, "needs teacher_scores"),
], ids=lambda c: repr(c) if isinstance(c, torch.nn.Module) else None)
def test_missing_inputs(loss, kwargs, match):
    s, y, t = _random(4)
    kwargs = {k: {"y": y, "t": t}[v] for k, v in kwargs.items()}
    with pytest.raises(ValueError, match=match):
        loss(s, **kwargs)


@pytest.mark.parametrize("loss", ALL_LOSSES, ids=repr)
def test_shape_errors(loss):
    s, y, t = _random(4)
    with pytest.raises(ValueError, match="shape"):
        loss(s, labels=y[:, :3], teacher_scores=t[:, :3])
    with pytest.raises(ValueError, match="shape"):
        loss(s, labels=y[:2], teacher_scores=t[:2])
    with pytest.raises(ValueError, match="shape"):
        loss(s[0], labels=y[0], teacher_scores=t[0])
    with pytest.raises(ValueError, match="at least 2"):
        loss(s[:, :1], labels=y[:, :1], teacher_scores=t[:, :1])
    with pytest.raises(ValueError, match="no queries"):
        loss(s[:0], labels=y[:0], teacher_scores=t[:0])
    with pytest.raises(TypeError, match="torch.Tensor"):
        loss(s.tolist(), labels=y, teacher_scores=t)


def test_rows_without_positive():
    s, y, t = _random(4)
    y[2] = 0
    with pytest.raises(ValueError, match=r"rows \[2\]"):
        InfoNCE()(s, labels=y)
    with pytest.raises(ValueError, match=r"rows \[2\]"):
        MarginMSE()(s, labels=y, teacher_scores=t)


def test_labels_accept_other_types():
    s, y, _ = _random(4)
    expected = InfoNCE()(s, labels=y)
    torch.testing.assert_close(InfoNCE()(s, labels=y.bool()), expected)
    torch.testing.assert_close(InfoNCE()(s, labels=y.long().numpy()), expected)


@pytest.mark.parametrize("bad", [
    lambda: InfoNCE(0), lambda: InfoNCE(-1.0), lambda: KLDistillation(float("nan")),
    lambda: KLDistillation(1.0, float("inf")), lambda: RankNet(target="teacher"),
    lambda: Weighted([]), lambda: Weighted([InfoNCE()]), lambda: Weighted([(InfoNCE(), "1")]),
    lambda: Weighted([(InfoNCE(), float("nan"))]),
])
def test_bad_parameters(bad):
    with pytest.raises(ValueError):
        bad()
