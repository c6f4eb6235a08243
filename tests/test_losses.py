"""Losses vs independent computations: numpy formulas, brute-force set functions, identities."""

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pixelwise.losses import (
    LossSpec,
    combined_loss,
    cross_entropy,
    dice_loss,
    focal_loss,
    lovasz_grad,
    lovasz_softmax,
    segmentation_loss,
)


def _case(n=2, c=4, h=5, w=6, seed=0, ignore_frac=0.2):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, h, w, generator=g, dtype=torch.float64) * 2
    target = torch.randint(0, c, (n, h, w), generator=g)
    target[torch.rand(n, h, w, generator=g) < ignore_frac] = 255
    return logits, target


def test_weighted_ce_equals_manual_sum():
    logits, target = _case()
    cw = torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=torch.float64)
    pw = torch.rand(target.shape, dtype=torch.float64) + 0.5
    logp = logits.log_softmax(1).numpy()
    num = den = 0.0
    for n, y, x in itertools.product(*map(range, target.shape)):
        t = int(target[n, y, x])
        if t == 255:
            continue
        num += -logp[n, t, y, x] * cw[t].item() * pw[n, y, x].item()
        den += cw[t].item()
    assert cross_entropy(logits, target, cw, pw).item() == pytest.approx(num / den, rel=1e-6)
    # without pixel weights it is F.cross_entropy
    ref = F.cross_entropy(logits, target, weight=cw, ignore_index=255)
    assert cross_entropy(logits, target, cw).item() == pytest.approx(ref.item(), rel=1e-6)


def test_focal_gamma0_is_ce_and_matches_formula():
    logits, target = _case(seed=1)
    cw = torch.tensor([1.0, 0.3, 2.0, 1.5], dtype=torch.float64)
    pw = torch.rand(target.shape, dtype=torch.float64)
    for kw in ({}, {"class_weights": cw}, {"class_weights": cw, "pixel_weights": pw}):
        assert focal_loss(logits, target, 0.0, **kw).item() == pytest.approx(
            cross_entropy(logits, target, kw.get("class_weights"), kw.get("pixel_weights")).item(), rel=1e-6)
    p = logits.float().softmax(1).numpy()
    vals = [-(1 - p[n, t, y, x]) ** 2 * np.log(p[n, t, y, x])
            for (n, y, x) in itertools.product(*map(range, target.shape))
            if (t := int(target[n, y, x])) != 255]
    assert focal_loss(logits, target, 2.0).item() == pytest.approx(float(np.mean(vals)), rel=1e-5)
    assert focal_loss(logits, target, 2.0).item() < focal_loss(logits, target, 0.0).item()


def test_small_class_weights_are_normalised_not_clamped():
    """The 0/0 guard only clamps a zero weight sum: a batch whose weights sum to less than 1 (one
    labelled pixel of weight 0.1) is still the weighted mean, i.e. that pixel's -log p_t."""
    logits, target = _case(n=1, h=2, w=2, seed=3, ignore_frac=0.0)
    target[:] = 255
    target[0, 1, 0] = 1
    cw = torch.tensor([0.05, 0.1, 0.2, 0.3], dtype=torch.float64)
    p_t = logits[0, :, 1, 0].softmax(0)[1].item()
    assert cross_entropy(logits, target, cw).item() == pytest.approx(-np.log(p_t), rel=1e-9)
    assert cross_entropy(logits, target, cw).item() == pytest.approx(
        F.cross_entropy(logits, target, weight=cw, ignore_index=255).item(), rel=1e-9)
    assert focal_loss(logits, target, 2.0, cw).item() == pytest.approx(-(1 - p_t) ** 2 * np.log(p_t), rel=1e-9)


def test_dice_vs_numpy():
    logits, target = _case(seed=2)
    p = logits.float().softmax(1).numpy()
    t = target.numpy()
    valid = t != 255
    scores = []
    for k in range(4):
        g = (t == k) & valid
        if not g.any():
            continue
        pk = p[:, k] * valid
        scores.append((2 * (pk * g).sum() + 1) / (pk.sum() + g.sum() + 1))
    assert dice_loss(logits, target).item() == pytest.approx(1 - np.mean(scores), rel=1e-5)


def test_dice_is_zero_for_perfect_prediction():
    _, target = _case(seed=3, ignore_frac=0.0)
    logits = F.one_hot(target, 4).permute(0, 3, 1, 2).double() * 100
    assert dice_loss(logits, target, smooth=0.0).item() == pytest.approx(0.0, abs=1e-9)


def _jaccard_loss_of_set(wrong: set, fg: set) -> float:
    """Jaccard loss when exactly the pixels in ``wrong`` are mispredicted (Berman et al. eq. 4)."""
    union = fg | wrong
    return len(wrong) / len(union) if union else 0.0


def _lovasz_naive(errors: np.ndarray, fg: np.ndarray) -> float:
    """Lovasz extension from its definition: sum_i m_pi(i) (D({pi_1..pi_i}) - D({pi_1..pi_i-1}))."""
    order = sorted(range(len(errors)), key=lambda i: -errors[i])
    fgs = {i for i in range(len(fg)) if fg[i]}
    total, prefix, prev = 0.0, set(), 0.0
    for i in order:
        prefix.add(i)
        cur = _jaccard_loss_of_set(prefix, fgs)
        total += errors[i] * (cur - prev)
        prev = cur
    return total


def test_lovasz_grad_is_the_set_function_difference():
    fg = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    g = lovasz_grad(fg)
    fgs = {0, 2, 3}
    sets = [set(range(i)) for i in range(6)]
    expected = [_jaccard_loss_of_set(sets[i + 1], fgs) - _jaccard_loss_of_set(sets[i], fgs) for i in range(5)]
    assert g.tolist() == pytest.approx(expected)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lovasz_softmax_vs_naive_definition(seed):
    logits, target = _case(n=1, c=3, h=3, w=4, seed=seed)
    p = logits.float().softmax(1).permute(0, 2, 3, 1).reshape(-1, 3).numpy()
    t = target.reshape(-1).numpy()
    keep = t != 255
    p, t = p[keep], t[keep]
    per_class = [_lovasz_naive(np.abs((t == k) - p[:, k]), t == k) for k in range(3) if (t == k).any()]
    assert lovasz_softmax(logits, target).item() == pytest.approx(float(np.mean(per_class)), rel=1e-5)


def test_lovasz_of_hard_prediction_is_one_minus_iou():
    g = torch.Generator().manual_seed(5)
    target = torch.randint(0, 3, (2, 6, 6), generator=g)
    pred = torch.randint(0, 3, (2, 6, 6), generator=g)
    logits = F.one_hot(pred, 3).permute(0, 3, 1, 2).double() * 1e4
    ious = []
    for k in range(3):
        if (target == k).any():
            inter = ((pred == k) & (target == k)).sum().item()
            union = ((pred == k) | (target == k)).sum().item()
            ious.append(inter / union)
    assert lovasz_softmax(logits, target).item() == pytest.approx(1 - np.mean(ious), abs=1e-6)


def test_losses_ignore_255_and_have_gradients():
    logits, target = _case(seed=4)
    changed = logits.clone()
    changed[target.unsqueeze(1).expand_as(logits) == 255] = 37.0  # only ignored pixels change
    for kind in ("ce", "dice", "focal", "lovasz", "ce+dice", "ce+lovasz"):
        a = segmentation_loss(logits, target, kind)
        b = segmentation_loss(changed, target, kind)
        assert a.item() == pytest.approx(b.item(), rel=1e-6), kind
        x = logits.clone().requires_grad_()
        segmentation_loss(x, target, kind).backward()
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0, kind
    with pytest.raises(ValueError, match="unknown loss"):
        segmentation_loss(logits, target, "hinge")


def test_all_ignored_gives_zero_not_nan():
    """A batch where no pixel counts (a crop in a void region, or only classes of weight 0) teaches
    nothing: loss 0 and zero gradients, for every loss (ce's mean was 0/0 = NaN, which stopped
    training as 'diverged')."""
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    target = torch.full((1, 2, 2), 255)
    zero_weight = (torch.zeros(1, 2, 2, dtype=torch.long), torch.tensor([0.0, 1.0, 1.0]))  # class 0 weighs 0
    for kind in ("ce", "dice", "focal", "lovasz", "ce+dice", "ce+lovasz"):
        for t, weights in ((target, None), zero_weight):
            v = segmentation_loss(logits, t, kind, class_weights=weights)
            (grad,) = torch.autograd.grad(v, logits)
            assert torch.isfinite(v) and torch.isfinite(grad).all(), kind
            if kind in ("ce", "focal") or t is target:
                assert v.item() == 0.0 and not grad.any(), kind


@pytest.mark.parametrize("gamma", [0.25, 0.5, 1.0, 2.0])
def test_focal_gradients_stay_finite_where_the_model_is_certain(gamma):
    """(1 - p_t) ** gamma has an infinite derivative at p_t = 1 for gamma < 1: a pixel predicted with
    float certainty must not turn the gradients NaN (which a healthy run then took for divergence)."""
    logits = torch.zeros(1, 2, 2, 2)
    logits[0, 0] = 40.0  # class 0 certain everywhere: p_t == 1.0 in float32 where the target is 0
    logits.requires_grad_(True)
    target = torch.zeros(1, 2, 2, dtype=torch.long)
    target[0, 0, 0] = 1
    (grad,) = torch.autograd.grad(segmentation_loss(logits, target, "focal", focal_gamma=gamma), logits)
    assert torch.isfinite(grad).all() and grad[0, :, 0, 0].abs().sum() > 0  # the wrong pixel still learns


def test_focal_by_name_uses_the_default_gamma_2():
    """segmentation_loss(kind="focal") and LossSpec("focal") without a gamma: the mean over labelled
    pixels of -(1 - p_t) ** 2 * log p_t (focal_loss's documented default), not the cross-entropy."""
    logits, target = _case(seed=6)
    p = logits.softmax(1).numpy()
    vals = [-(1 - p[n, t, y, x]) ** 2 * np.log(p[n, t, y, x])
            for (n, y, x) in itertools.product(*map(range, target.shape))
            if (t := int(target[n, y, x])) != 255]
    ref = float(np.mean(vals))
    assert segmentation_loss(logits, target, "focal").item() == pytest.approx(ref, rel=1e-7)
    assert combined_loss({"out": logits}, target, LossSpec("focal")).item() == pytest.approx(ref, rel=1e-7)
    assert cross_entropy(logits, target).item() > 1.05 * ref  # gamma 0 would be told apart


@pytest.mark.parametrize("kind", ["ce+dice", "ce+lovasz"])
def test_sum_losses_weight_only_the_cross_entropy(kind):
    """ce+dice / ce+lovasz = the weighted cross-entropy (checked against a naive sum in
    test_weighted_ce_equals_manual_sum) plus the unweighted set-level term."""
    logits, target = _case(seed=5)
    cw = torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=torch.float64)
    pw = torch.rand(target.shape, dtype=torch.float64) + 0.5
    ce = cross_entropy(logits, target, cw, pw)
    setlevel = dice_loss(logits, target) if kind == "ce+dice" else lovasz_softmax(logits, target)
    got = segmentation_loss(logits, target, kind, cw, pw)
    assert got.item() == pytest.approx((ce + setlevel).item(), rel=1e-9)
    assert setlevel.item() > 0.01  # the set-level term is not negligible in the check


@pytest.mark.parametrize("kind", ["ce", "focal", "ce+dice", "ce+lovasz"])
def test_combined_loss_adds_the_weighted_auxiliary_loss(kind):
    logits, target = _case(seed=3)
    aux, _ = _case(seed=4)
    cw = torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=torch.float64)
    pw = torch.rand(target.shape, dtype=torch.float64) + 0.5
    spec = LossSpec(kind, cw, focal_gamma=1.5, aux_weight=0.25)
    main = segmentation_loss(logits, target, kind, cw, pw, 1.5)
    assert torch.equal(combined_loss({"out": logits}, target, spec, pw), main)
    both = combined_loss({"out": logits, "aux": aux}, target, spec, pw)
    assert both.item() == pytest.approx((main + 0.25 * segmentation_loss(aux, target, kind, cw, pw, 1.5)).item())


@pytest.mark.parametrize("kind", ["lovasz", "ce+lovasz", "ce", "ce+dice", "focal"])
def test_an_all_ignored_half_precision_batch_costs_zero_not_nan(kind):
    """Lovasz summed the half logits to join the graph: past 65504 the sum is inf and inf * 0 is NaN,
    which stopped an --amp fp16 run as diverged on a crop of void pixels."""
    logits = (torch.full((2, 19, 64, 64), -8.0) + torch.randn(2, 19, 64, 64)).half().requires_grad_()
    assert torch.isinf(logits.detach().sum())  # what the old join overflowed to
    target = torch.full((2, 64, 64), 255)
    loss = segmentation_loss(logits, target, kind)
    assert loss.item() == 0.0 and loss.dtype == torch.float32
    loss.backward()
    assert logits.grad is not None and not logits.grad.float().abs().sum()


def test_dice_counts_a_class_with_a_single_pixel():
    # class 1 holds exactly one pixel: it is present and takes part in the mean (docs: the mean
    # runs over the classes present in the target). Naive numpy reference, smooth = 1.
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 3, 3, dtype=torch.float64)
    target = torch.zeros(1, 3, 3, dtype=torch.int64)
    target[0, 1, 1] = 1
    p = torch.softmax(logits, 1)[0].numpy()
    g = np.stack([(target[0].numpy() == c) for c in range(3)]).astype(np.float64)
    dice = [(2 * (p[c] * g[c]).sum() + 1) / (p[c].sum() + g[c].sum() + 1) for c in (0, 1)]  # present: 0, 1
    assert dice_loss(logits, target).item() == pytest.approx(1 - np.mean(dice), abs=1e-12)


def test_lovasz_present_and_all_differ_on_an_absent_class():
    # hard prediction [[0, 2], [1, 1]] of target [[0, 0], [1, 1]]: 1 - IoU is 1/2 (class 0), 0
    # (class 1) and 1 (class 2: absent from the target, predicted once). Berman et al.: for one-hot
    # p the loss is 1 - IoU averaged over the classes: present -> 0.25, all -> 0.5 (by hand).
    pred = torch.tensor([[0, 2], [1, 1]])
    logits = (torch.nn.functional.one_hot(pred, 3).permute(2, 0, 1)[None] * 100.0).double()
    target = torch.tensor([[[0, 0], [1, 1]]])
    assert lovasz_softmax(logits, target).item() == pytest.approx(0.25, abs=1e-9)
    assert lovasz_softmax(logits, target, classes="all").item() == pytest.approx(0.5, abs=1e-9)
