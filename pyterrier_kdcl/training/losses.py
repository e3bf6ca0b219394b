"""Training losses over score matrices: contrastive (InfoNCE), distillation (KL, MarginMSE) and ranking ones.

Every loss is a small ``torch.nn.Module`` with one call convention::

    loss(scores, labels=None, teacher_scores=None) -> scalar tensor

``scores`` are the student's scores, shape ``(n_queries, group_size)``: one row per query, one column per
document of its training group (``group_size >= 2``). ``labels`` (relevance labels, ``> 0`` means
relevant) and ``teacher_scores`` have the same shape. Each loss says what it cannot do without in its
``needs`` attribute, and everything it reads when given in ``uses`` (``RankNet()`` needs labels, but uses
teacher scores instead when they are passed), so a trainer knows whether teacher scores must be computed, and
whether a teacher it was given would be read at all. A missing input or a mismatched shape raises a
``ValueError`` naming it. Losses are means over queries.

Everything is computed in log space (``log_softmax``, ``logsumexp``, ``softplus``), so scores of any
magnitude give finite losses and gradients. Half-precision scores are upcast to float32 first. Teacher
scores never receive gradients. ``repr(loss)`` shows every parameter, so it can serve as the loss's
identity in experiment names and caches.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["InfoNCE", "KLDistillation", "ListNet", "MarginMSE", "RankNet", "RankingLoss", "Weighted"]

_TARGETS = (None, "labels", "teacher_scores")


class RankingLoss(nn.Module):
    """Base class: input checks shared by every loss. ``needs`` names the inputs a loss cannot do without."""

    needs: frozenset = frozenset()

    @property
    def uses(self) -> frozenset:
        """The inputs this loss reads when they are passed: ``needs`` and any it takes up when given."""
        return self.needs

    def forward(self, scores: Tensor, labels: Tensor | None = None,
                teacher_scores: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def _scores(self, scores: Tensor) -> Tensor:
        if not isinstance(scores, Tensor):
            raise TypeError(f"{self!r}: scores must be a torch.Tensor of shape (n_queries, group_size), "
                            f"got {type(scores).__name__}")
        if scores.ndim != 2:
            raise ValueError(f"{self!r}: scores must have shape (n_queries, group_size), got {tuple(scores.shape)}")
        if scores.shape[0] == 0:
            raise ValueError(f"{self!r}: scores hold no queries (shape {tuple(scores.shape)})")
        if scores.shape[1] < 2:
            raise ValueError(f"{self!r}: a group needs at least 2 documents, got group_size={scores.shape[1]}")
        if not scores.is_floating_point():
            raise TypeError(f"{self!r}: scores must be floating point, got {scores.dtype}")
        if scores.dtype in (torch.float16, torch.bfloat16):
            scores = scores.float()  # softmax over a group in half precision loses the small differences
        return scores

    def _other(self, name: str, value, scores: Tensor) -> Tensor:
        """``labels`` or ``teacher_scores`` as a detached tensor like ``scores`` (same device, dtype, shape)."""
        if value is None:
            hint = ("compute teacher scores for every document of every group (a DistillationTrainer does)"
                    if name == "teacher_scores" else "pass the relevance labels of the group documents")
            raise ValueError(f"{self!r} needs {name}=...: {hint}")
        value = torch.as_tensor(value, device=scores.device)
        if value.shape != scores.shape:
            raise ValueError(f"{self!r}: {name} has shape {tuple(value.shape)} but scores have shape "
                             f"{tuple(scores.shape)}; both must be (n_queries, group_size)")
        return value.to(scores.dtype).detach()


def _positive_temperature(name: str, value: float) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        hint = (": 'auto' is DistillationTrainer(teacher_temperature='auto'), which fits it on the validation frames "
                "(or fit one with pyterrier_kdcl.training.temperature.fit_teacher_temperature)" if value == "auto"
                else "")
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}{hint}") from None
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


class TargetedLoss(RankingLoss):
    """Base class of the losses that rank by a chosen target (RankNet, ListNet): ``"labels"``, ``"teacher_scores"``,
    or ``None`` for the teacher scores when they are passed and the labels otherwise."""

    def __init__(self, target: str | None = None):
        super().__init__()
        if target not in _TARGETS:
            raise ValueError(f"target must be one of {_TARGETS}, got {target!r}")
        self.target = target
        # with target=None, labels suffice; teacher scores are used instead whenever they are passed
        self.needs = frozenset({target or "labels"})

    @property
    def uses(self) -> frozenset:
        return frozenset({"labels", "teacher_scores"}) if self.target is None else frozenset({self.target})

    def _target(self, scores: Tensor, labels, teacher_scores) -> Tensor:
        """The ranking target: the chosen input, or teacher scores when given and labels otherwise."""
        target = self.target or ("teacher_scores" if teacher_scores is not None else "labels")
        return self._other(target, labels if target == "labels" else teacher_scores, scores)

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}()" if self.target is None else f"{name}(target={self.target!r})"


class InfoNCE(RankingLoss):
    r"""Contrastive loss (InfoNCE) over each group: the positives against all documents of the group.

    .. math::
        \mathcal{L} = -\frac{1}{n}\sum_q \log
            \frac{\sum_{j:\, y_{qj} > 0} \exp(s_{qj}/\tau)}{\sum_j \exp(s_{qj}/\tau)}

    computed as ``logsumexp`` over the positives minus ``logsumexp`` over the group. Any label ``> 0``
    counts as a positive; several positives in a row are allowed. A row without a positive is an error.
    With one positive this is the softmax cross-entropy used to train rerankers with hard negatives
    (Tevatron, RankLLaMA).

    Source: van den Oord, Li, Vinyals, "Representation Learning with Contrastive Predictive Coding",
    arXiv 1807.03748, 2018.

    Example::

        loss = InfoNCE(temperature=1.0)
        scores = student(groups)                      # (n_queries, group_size), positive first
        labels = torch.zeros_like(scores); labels[:, 0] = 1
        loss(scores, labels=labels).backward()
    """

    needs = frozenset({"labels"})

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        self.temperature = _positive_temperature("temperature", temperature)

    def forward(self, scores: Tensor, labels: Tensor | None = None,
                teacher_scores: Tensor | None = None) -> Tensor:
        scores = self._scores(scores)
        positive = self._other("labels", labels, scores) > 0
        if not positive.any(dim=1).all():
            rows = (~positive.any(dim=1)).nonzero().flatten().tolist()
            raise ValueError(f"{self!r}: every row needs at least one positive label (> 0); "
                             f"rows {rows[:10]} have none")
        logits = scores / self.temperature
        log_positive = torch.logsumexp(logits.masked_fill(~positive, float("-inf")), dim=1)
        return (torch.logsumexp(logits, dim=1) - log_positive).mean()

    def __repr__(self) -> str:
        return f"InfoNCE(temperature={self.temperature!r})"


class KLDistillation(RankingLoss):
    r"""Knowledge distillation: KL divergence from the teacher's to the student's softened distribution.

    .. math::
        \mathcal{L} = \frac{1}{n}\sum_q T_s^2 \,
            \mathrm{KL}\big(\mathrm{softmax}(t_q/T_t) \,\|\, \mathrm{softmax}(s_q/T_s)\big)
            = \frac{T_s^2}{n}\sum_q \sum_j p_{qj} (\log p_{qj} - \log \hat p_{qj})

    with ``p = softmax(t/Tt)`` the teacher distribution over the group and ``p̂ = softmax(s/Ts)`` the
    student one, both taken as ``log_softmax``. The factor ``Ts²`` keeps gradient magnitudes comparable
    across student temperatures. Teacher scores are detached. Zero when ``s/Ts == t/Tt`` (up to a
    per-row constant). Tevatron's reranker distillation uses ``teacher_temperature=2.0,
    student_temperature=1.0``.

    Source: Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", arXiv 1503.02531, 2015;
    applied to rerankers in Xu et al., "Distillation versus Contrastive Learning: How to Train Your
    Rerankers", arXiv 2507.08336, 2025.

    Example::

        loss = KLDistillation(teacher_temperature=2.0, student_temperature=1.0)
        loss(student_scores, teacher_scores=teacher_scores).backward()
    """

    needs = frozenset({"teacher_scores"})

    def __init__(self, teacher_temperature: float = 1.0, student_temperature: float = 1.0):
        super().__init__()
        self.teacher_temperature = _positive_temperature("teacher_temperature", teacher_temperature)
        self.student_temperature = _positive_temperature("student_temperature", student_temperature)

    def forward(self, scores: Tensor, labels: Tensor | None = None,
                teacher_scores: Tensor | None = None) -> Tensor:
        scores = self._scores(scores)
        teacher = self._other("teacher_scores", teacher_scores, scores)
        log_p_teacher = F.log_softmax(teacher / self.teacher_temperature, dim=1)
        log_p_student = F.log_softmax(scores / self.student_temperature, dim=1)
        kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
        return kl * self.student_temperature ** 2

    def __repr__(self) -> str:
        return (f"KLDistillation(teacher_temperature={self.teacher_temperature!r}, "
                f"student_temperature={self.student_temperature!r})")


class MarginMSE(RankingLoss):
    r"""Margin-MSE distillation: the student's score margins should equal the teacher's.

    .. math::
        \mathcal{L} = \frac{1}{n}\sum_q \frac{1}{G-1}\sum_{j \ne p_q}
            \big((s_{q p_q} - s_{qj}) - (t_{q p_q} - t_{qj})\big)^2

    where ``p_q`` is the positive of row ``q``: the column of the highest label when ``labels`` are
    given (the first such column on ties; a row whose highest label is not ``> 0`` is an error), else
    **column 0**, the convention of this package's groups (positive first, then ``G-1`` negatives).
    With ``G = 2`` this is exactly the pairwise loss of the paper; larger groups average over their
    negatives. Teacher scores are detached. Only score differences matter, so student and teacher may
    live on different scales up to an additive constant.

    Source: Hofstätter, Althammer, Schröder, Sertkan, Hanbury, "Improving Efficient Neural Ranking Models
    with Cross-Architecture Knowledge Distillation", arXiv 2010.02666, 2020.

    Example::

        loss = MarginMSE()
        loss(student_scores, teacher_scores=teacher_scores)                 # positive in column 0
        loss(student_scores, labels=labels, teacher_scores=teacher_scores)  # positive found from labels
    """

    needs = frozenset({"teacher_scores"})
    uses = frozenset({"teacher_scores", "labels"})  # labels, when given, find the positive

    def forward(self, scores: Tensor, labels: Tensor | None = None,
                teacher_scores: Tensor | None = None) -> Tensor:
        scores = self._scores(scores)
        teacher = self._other("teacher_scores", teacher_scores, scores)
        n, group_size = scores.shape
        if labels is None:
            positive = torch.zeros(n, dtype=torch.long, device=scores.device)
        else:
            labels = self._other("labels", labels, scores)
            best, positive = labels.max(dim=1)
            if not (best > 0).all():
                rows = (best <= 0).nonzero().flatten().tolist()
                raise ValueError(f"{self!r}: every row needs a positive label (> 0); rows {rows[:10]} have none")
        positive = positive.unsqueeze(1)
        student_margin = scores.gather(1, positive) - scores
        teacher_margin = teacher.gather(1, positive) - teacher
        # the positive's own column has margin 0 for both, so it adds nothing to the sum
        return ((student_margin - teacher_margin) ** 2).sum(dim=1).div(group_size - 1).mean()

    def __repr__(self) -> str:
        return "MarginMSE()"


class RankNet(TargetedLoss):
    r"""RankNet: pairwise logistic loss over every pair the target orders.

    .. math::
        \mathcal{L} = \frac{1}{|Q'|}\sum_{q \in Q'} \frac{1}{|P_q|}\sum_{(i,j) \in P_q}
            \log\big(1 + \exp(-(s_{qi} - s_{qj}))\big),
        \qquad P_q = \{(i, j) : y_{qi} > y_{qj}\}

    The target ``y`` is chosen by ``target``: ``"labels"``, ``"teacher_scores"``, or ``None`` (default)
    for the teacher scores when they are passed and the labels otherwise. Tied pairs carry no order and
    are left out. ``Q'`` are the rows with at least one ordered pair; if no row has one the loss is 0.

    Source: Burges, Shaked, Renshaw, Lazier, Deeds, Hamilton, Hullender, "Learning to Rank using Gradient
    Descent", ICML 2005.

    Example::

        RankNet()(student_scores, labels=labels)                                  # from labels
        RankNet()(student_scores, labels=labels, teacher_scores=teacher_scores)   # teacher's order
    """

    def forward(self, scores: Tensor, labels: Tensor | None = None,
                teacher_scores: Tensor | None = None) -> Tensor:
        scores = self._scores(scores)
        target = self._target(scores, labels, teacher_scores)
        ordered = target.unsqueeze(2) > target.unsqueeze(1)         # (n, i, j): y_i > y_j
        pair_loss = F.softplus(scores.unsqueeze(1) - scores.unsqueeze(2))  # log(1 + exp(s_j - s_i))
        pairs = ordered.sum(dim=(1, 2))
        per_query = (pair_loss * ordered).sum(dim=(1, 2)) / pairs.clamp(min=1)
        has_pairs = pairs > 0
        if not has_pairs.any():
            return scores.sum() * 0.0  # keeps the graph, so backward() still works
        return per_query[has_pairs].mean()


class ListNet(TargetedLoss):
    r"""ListNet (top-one probabilities): cross-entropy between the target's and the student's softmax.

    .. math::
        \mathcal{L} = -\frac{1}{n}\sum_q \sum_j \mathrm{softmax}(y_q)_j \, \log \mathrm{softmax}(s_q)_j

    The target ``y`` is chosen by ``target``: ``"labels"``, ``"teacher_scores"``, or ``None`` (default)
    for the teacher scores when they are passed and the labels otherwise. It differs from
    ``KLDistillation`` (both temperatures 1) only by the target's entropy, a constant.

    Source: Cao, Qin, Liu, Tsai, Li, "Learning to Rank: From Pairwise Approach to Listwise Approach",
    ICML 2007.

    Example::

        ListNet()(student_scores, labels=labels)
        ListNet(target="teacher_scores")(student_scores, teacher_scores=teacher_scores)
    """

    def forward(self, scores: Tensor, labels: Tensor | None = None,
                teacher_scores: Tensor | None = None) -> Tensor:
        scores = self._scores(scores)
        target = self._target(scores, labels, teacher_scores)
        return -(F.softmax(target, dim=1) * F.log_softmax(scores, dim=1)).sum(dim=1).mean()


class Weighted(RankingLoss):
    r"""A weighted sum of losses: :math:`\mathcal{L} = \sum_k w_k \mathcal{L}_k`.

    Every loss gets the same ``labels`` and ``teacher_scores`` and reads what it needs; ``needs`` is
    the union of theirs. Combinations are data, not new classes (as in Lightning IR).

    Example::

        alpha = 0.5
        loss = Weighted([(KLDistillation(teacher_temperature=2.0), alpha), (InfoNCE(), 1 - alpha)])
        loss(scores, labels=labels, teacher_scores=teacher_scores).backward()
    """

    def __init__(self, losses: Iterable[tuple[RankingLoss, float]]):
        super().__init__()
        pairs: Sequence = list(losses)
        if not pairs:
            raise ValueError("Weighted needs at least one (loss, weight) pair")
        for pair in pairs:
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[0], nn.Module)):
                raise ValueError(f"Weighted takes (loss, weight) pairs, got {pair!r}")
            if not isinstance(pair[1], numbers.Real) or isinstance(pair[1], bool) or pair[1] != pair[1]:
                raise ValueError(f"Weighted: the weight of {pair[0]!r} must be a number, got {pair[1]!r}")
        self.losses = nn.ModuleList([loss for loss, _ in pairs])
        self.weights = [float(weight) for _, weight in pairs]
        self.needs = frozenset().union(*(getattr(loss, "needs", frozenset()) for loss in self.losses))

    @property
    def uses(self) -> frozenset:
        return frozenset().union(*(_uses(loss) for loss in self.losses))

    def forward(self, scores: Tensor, labels: Tensor | None = None,
                teacher_scores: Tensor | None = None) -> Tensor:
        return sum(weight * loss(scores, labels=labels, teacher_scores=teacher_scores)
                   for loss, weight in zip(self.losses, self.weights))

    def __repr__(self) -> str:
        return "Weighted([" + ", ".join(f"({loss!r}, {w!r})" for loss, w in zip(self.losses, self.weights)) + "])"


def _uses(loss: nn.Module) -> frozenset:
    """What a loss reads when given: its ``uses``, else (a loss from elsewhere) its ``needs``, else labels."""
    needs = frozenset(getattr(loss, "needs", {"labels"}))
    return frozenset(getattr(loss, "uses", needs)) | needs
