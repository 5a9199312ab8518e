"""Tests for loss.py: MONAI/torch cross-checks, perfect predictions, numerical safety, API errors."""

import contextlib
import math
import warnings

import monai.losses
import pytest
import torch
from torch import nn

from loss import (
    LOSSES,
    CombinedLoss,
    CrossEntropyLoss,
    DeepSupervisionLoss,
    DiceCELoss,
    DiceFocalLoss,
    DiceLoss,
    FocalLoss,
    TverskyLoss,
    build_loss,
)

# (number of logit channels, spatial shape): binary and 3-class, 2D and 3D.
CASES = [(1, (8, 8)), (1, (4, 6, 6)), (3, (8, 8)), (3, (4, 6, 6))]
CASE_IDS = ["binary-2d", "binary-3d", "3class-2d", "3class-3d"]
DISTINCT_LOSS_NAMES = ["dice", "ce", "focal", "tversky", "dice_ce", "dice_focal"]


def make_case(num_classes: int, spatial: tuple[int, ...], seed: int = 0):
    """Random logits (N=2) and a (N, 1, *spatial) target: float 0/1 or int64 class indices."""
    generator = torch.Generator().manual_seed(seed)
    logits = 3.0 * torch.randn((2, num_classes, *spatial), generator=generator)
    if num_classes == 1:
        target = (torch.rand((2, 1, *spatial), generator=generator) > 0.7).float()
    else:
        target = torch.randint(0, num_classes, (2, 1, *spatial), generator=generator)
    return logits, target


def monai_activation(num_classes: int) -> dict:
    """MONAI options giving our semantics: sigmoid for binary, softmax + one-hot target otherwise."""
    binary = num_classes == 1
    return {"sigmoid": binary, "softmax": not binary, "to_onehot_y": not binary}


def assert_value_and_gradient_match(ours, reference, logits, target) -> None:
    """Both losses agree in value and in gradient w.r.t. the logits (1e-5 relative)."""
    ours_logits = logits.clone().requires_grad_()
    reference_logits = logits.clone().requires_grad_()
    ours_value = ours(ours_logits, target)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference_value = reference(reference_logits, target)
    ours_value.backward()
    reference_value.backward()
    torch.testing.assert_close(ours_value, reference_value, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours_logits.grad, reference_logits.grad, rtol=1e-5, atol=1e-8)


# --- cross-checks against MONAI and torch ---------------------------------------------------


@pytest.mark.parametrize(("num_classes", "spatial"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("batch", [True, False])
@pytest.mark.parametrize("include_background", [True, False])
@pytest.mark.parametrize("smooth", [1.0, 1e-5])
def test_dice_matches_monai_dice_loss(num_classes, spatial, batch, include_background, smooth):
    logits, target = make_case(num_classes, spatial)
    reference = monai.losses.DiceLoss(
        include_background=include_background or num_classes == 1,
        batch=batch,
        smooth_nr=smooth,
        smooth_dr=smooth,
        **monai_activation(num_classes),
    )
    ours = DiceLoss(smooth=smooth, batch=batch, include_background=include_background)
    assert_value_and_gradient_match(ours, reference, logits, target)


@pytest.mark.parametrize(("num_classes", "spatial"), CASES, ids=CASE_IDS)
def test_cross_entropy_matches_torch_bce_or_ce(num_classes, spatial):
    logits, target = make_case(num_classes, spatial, seed=1)
    if num_classes == 1:
        reference = nn.BCEWithLogitsLoss()
        reference_target = target
    else:
        reference = nn.CrossEntropyLoss()
        reference_target = target[:, 0]
    ours_value = CrossEntropyLoss()(logits, target)
    torch.testing.assert_close(ours_value, reference(logits, reference_target), rtol=1e-5, atol=0)


@pytest.mark.parametrize(("num_classes", "spatial"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize(("gamma", "alpha"), [(2.0, None), (2.0, 0.25), (0.5, 0.75), (0.0, None)])
def test_focal_matches_monai_focal_loss_times_channels(num_classes, spatial, gamma, alpha):
    """MONAI averages softmax focal over the K one-hot channels too; ours averages over voxels
    only, so the multi-class yardstick is K x MONAI (K = 1 for binary). A scalar alpha weights
    foreground with alpha and background with 1 - alpha in both."""
    logits, target = make_case(num_classes, spatial, seed=2)
    monai_focal = monai.losses.FocalLoss(
        gamma=gamma, alpha=alpha, use_softmax=num_classes > 1, to_onehot_y=num_classes > 1
    )

    def reference(x, y):
        return num_classes * monai_focal(x, y)

    assert_value_and_gradient_match(FocalLoss(gamma=gamma, alpha=alpha), reference, logits, target)


@pytest.mark.parametrize(("num_classes", "spatial"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("batch", [True, False])
@pytest.mark.parametrize("include_background", [True, False])
@pytest.mark.parametrize(("alpha", "beta"), [(0.3, 0.7), (0.8, 0.1)])
def test_tversky_matches_monai_tversky_loss(num_classes, spatial, batch, include_background, alpha, beta):
    logits, target = make_case(num_classes, spatial, seed=3)
    reference = monai.losses.TverskyLoss(
        include_background=include_background or num_classes == 1,
        alpha=alpha,
        beta=beta,
        smooth_nr=1.0,
        smooth_dr=1.0,
        batch=batch,
        **monai_activation(num_classes),
    )
    ours = TverskyLoss(alpha, beta, smooth=1.0, batch=batch, include_background=include_background)
    assert_value_and_gradient_match(ours, reference, logits, target)


@pytest.mark.parametrize(("num_classes", "spatial"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("batch", [True, False])
def test_dice_ce_matches_monai_dice_ce_loss(num_classes, spatial, batch):
    """MONAI's DiceCELoss also switches to BCE with logits for a single channel."""
    logits, target = make_case(num_classes, spatial, seed=4)
    reference = monai.losses.DiceCELoss(
        include_background=num_classes == 1,
        batch=batch,
        smooth_nr=1.0,
        smooth_dr=1.0,
        lambda_dice=0.7,
        lambda_ce=1.5,
        **monai_activation(num_classes),
    )
    ours = build_loss("dice_ce", dice_weight=0.7, other_weight=1.5, batch=batch)
    assert_value_and_gradient_match(ours, reference, logits, target)


@pytest.mark.parametrize(("num_classes", "spatial"), CASES[:2], ids=CASE_IDS[:2])
@pytest.mark.parametrize("alpha", [None, 0.25])
def test_binary_dice_focal_matches_monai_dice_focal_loss(num_classes, spatial, alpha):
    logits, target = make_case(num_classes, spatial, seed=5)
    reference = monai.losses.DiceFocalLoss(
        sigmoid=True,
        batch=True,
        smooth_nr=1.0,
        smooth_dr=1.0,
        gamma=1.5,
        alpha=alpha,
        lambda_dice=2.0,
        lambda_focal=0.5,
    )
    ours = DiceFocalLoss(dice_weight=2.0, other_weight=0.5, gamma=1.5, alpha=alpha)
    assert_value_and_gradient_match(ours, reference, logits, target)


@pytest.mark.parametrize(("num_classes", "spatial"), CASES[2:], ids=CASE_IDS[2:])
def test_multiclass_dice_focal_matches_monai_dice_plus_softmax_focal(num_classes, spatial):
    """MONAI's DiceFocalLoss applies a sigmoid focal per one-hot channel (and drops the
    background channel from it), so it is no yardstick for a softmax focal; compare with
    MONAI's softmax DiceLoss plus K x its softmax FocalLoss instead."""
    logits, target = make_case(num_classes, spatial, seed=6)
    monai_dice = monai.losses.DiceLoss(
        include_background=False,
        batch=True,
        smooth_nr=1.0,
        smooth_dr=1.0,
        **monai_activation(num_classes),
    )
    monai_focal = monai.losses.FocalLoss(gamma=2.0, use_softmax=True, to_onehot_y=True)

    def reference(x, y):
        return 2.0 * monai_dice(x, y) + 0.5 * num_classes * monai_focal(x, y)

    ours = build_loss("dice_focal", dice_weight=2.0, other_weight=0.5)
    assert_value_and_gradient_match(ours, reference, logits, target)


# --- hand-computed values -------------------------------------------------------------------


def test_binary_focal_on_one_voxel_equals_hand_computed_value():
    logits = torch.zeros(1, 1, 1, 1)  # p = 0.5 for the true class
    target = torch.ones(1, 1, 1, 1)
    assert FocalLoss(gamma=2.0)(logits, target).item() == pytest.approx(0.25 * math.log(2))
    assert FocalLoss(gamma=2.0, alpha=0.25)(logits, target).item() == pytest.approx(0.25 * 0.25 * math.log(2))
    background = torch.zeros(1, 1, 1, 1)
    assert FocalLoss(gamma=2.0, alpha=0.25)(logits, background).item() == pytest.approx(
        0.75 * 0.25 * math.log(2)
    )


def test_multiclass_focal_on_one_voxel_equals_hand_computed_value():
    logits = torch.zeros(1, 3, 1, 1)  # p = 1/3 for every class
    foreground = torch.ones(1, 1, 1, 1, dtype=torch.uint8)
    expected = (2 / 3) ** 2 * math.log(3)
    assert FocalLoss(gamma=2.0)(logits, foreground).item() == pytest.approx(expected)
    assert FocalLoss(gamma=2.0, alpha=0.25)(logits, foreground).item() == pytest.approx(0.25 * expected)
    background = torch.zeros(1, 1, 1, 1)
    assert FocalLoss(gamma=2.0, alpha=0.25)(logits, background).item() == pytest.approx(0.75 * expected)


@pytest.mark.parametrize("num_classes", [1, 3])
def test_focal_with_gamma_zero_equals_cross_entropy(num_classes):
    logits, target = make_case(num_classes, (8, 8), seed=7)
    torch.testing.assert_close(FocalLoss(gamma=0.0)(logits, target), CrossEntropyLoss()(logits, target))


def test_dice_batch_option_pools_or_averages_samples_as_computed_by_hand():
    # Sample 0: foreground predicted as foreground; sample 1: background predicted as foreground.
    logits = torch.full((2, 1, 1, 1), 20.0)
    target = torch.tensor([1.0, 0.0]).view(2, 1, 1, 1)
    # Pooled: TP = 1, FP = 1, FN = 0 -> 1 - 2 / 3.
    pooled = DiceLoss(smooth=0.0, batch=True)(logits, target)
    assert pooled.item() == pytest.approx(1 / 3, abs=1e-6)
    # Per sample with smooth 1: 1 - 3/3 = 0 and 1 - 1/2 = 0.5, mean 0.25.
    per_sample = DiceLoss(smooth=1.0, batch=False)(logits, target)
    assert per_sample.item() == pytest.approx(0.25, abs=1e-6)


@pytest.mark.parametrize("loss", [DiceLoss(smooth=0.0, batch=False), TverskyLoss(smooth=0.0, batch=False)])
def test_without_smoothing_nothing_predicted_where_there_is_nothing_is_a_perfect_match(loss):
    logits = torch.full((2, 1, 4, 4), -1e4, requires_grad=True)  # the sigmoid is exactly 0
    target = torch.zeros(2, 1, 4, 4)
    target[1, 0, 0, 0] = 1  # sample 1 misses its one voxel: overlap 0
    value = loss(logits, target)
    assert value.item() == pytest.approx(0.5)
    value.backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize(("num_classes", "spatial"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("batch", [True, False])
def test_tversky_with_half_alpha_and_beta_equals_dice(num_classes, spatial, batch):
    logits, target = make_case(num_classes, spatial, seed=8)
    tversky = TverskyLoss(alpha=0.5, beta=0.5, smooth=0.0, batch=batch)
    dice = DiceLoss(smooth=0.0, batch=batch)
    torch.testing.assert_close(tversky(logits, target), dice(logits, target))
    smoothed_tversky = TverskyLoss(alpha=0.5, beta=0.5, smooth=1.0, batch=batch)
    smoothed_dice = DiceLoss(smooth=2.0, batch=batch)
    torch.testing.assert_close(smoothed_tversky(logits, target), smoothed_dice(logits, target))


def test_deep_supervision_returns_the_weighted_mean_of_the_outputs_losses():
    target = torch.ones(1, 1, 2, 2)
    first = torch.zeros(1, 1, 2, 2)  # BCE = ln 2
    second = torch.full((1, 1, 2, 2), math.log(3.0))  # BCE = ln(1 + 1/3)
    first_loss, second_loss = math.log(2.0), math.log(4.0 / 3.0)

    weighted = DeepSupervisionLoss(CrossEntropyLoss(), weights=[2.0, 1.0])
    assert weighted([first, second], target).item() == pytest.approx((2 * first_loss + second_loss) / 3)
    equal = DeepSupervisionLoss(CrossEntropyLoss())
    assert equal((first, second), target).item() == pytest.approx((first_loss + second_loss) / 2)
    assert equal(first, target).item() == pytest.approx(first_loss)


def test_deep_supervision_rejects_a_weight_count_that_differs_from_the_outputs():
    loss = DeepSupervisionLoss(CrossEntropyLoss(), weights=[1.0, 1.0, 1.0])
    outputs = [torch.zeros(1, 1, 2, 2)] * 2
    with pytest.raises(ValueError, match="expected 3 outputs"):
        loss(outputs, torch.ones(1, 1, 2, 2))
    with pytest.raises(ValueError, match="positive sum"):
        DeepSupervisionLoss(CrossEntropyLoss(), weights=[0.0, 0.0])


def test_combined_loss_is_the_weighted_sum_of_its_parts():
    logits, target = make_case(3, (8, 8), seed=9)
    dice, cross_entropy = DiceLoss(), CrossEntropyLoss()
    combined = CombinedLoss([dice, cross_entropy], [0.25, 3.0])
    expected = 0.25 * dice(logits, target) + 3.0 * cross_entropy(logits, target)
    torch.testing.assert_close(combined(logits, target), expected)
    with pytest.raises(ValueError, match="one weight per loss"):
        CombinedLoss([dice, cross_entropy], [1.0])


# --- perfect predictions --------------------------------------------------------------------


def perfect_logits(num_classes: int, target: torch.Tensor) -> torch.Tensor:
    """Logits of +20 on the true class and -20 elsewhere."""
    if num_classes == 1:
        return 20.0 * (2.0 * target.float() - 1.0)
    onehot = nn.functional.one_hot(target[:, 0].long(), num_classes).movedim(-1, 1)
    return 40.0 * onehot.float() - 20.0


@pytest.mark.parametrize(("num_classes", "spatial"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("name", DISTINCT_LOSS_NAMES)
@pytest.mark.parametrize("batch", [True, False])
def test_perfect_prediction_gives_a_loss_near_zero(num_classes, spatial, name, batch):
    _, target = make_case(num_classes, spatial, seed=10)
    options = {} if name in ("ce", "focal") else {"batch": batch, "include_background": True}
    value = build_loss(name, **options)(perfect_logits(num_classes, target), target)
    assert 0.0 <= value.item() < 1e-6


@pytest.mark.parametrize("name", ["ce", "focal"])
def test_voxel_losses_grow_when_the_prediction_gets_worse(name):
    _, target = make_case(1, (8, 8), seed=11)
    loss = build_loss(name)
    perfect = loss(perfect_logits(1, target), target)
    unsure = loss(torch.zeros_like(target), target)
    wrong = loss(-perfect_logits(1, target), target)
    assert perfect < unsure < wrong


# --- numerical safety -----------------------------------------------------------------------


def enter_cpu_autocast_or_skip(stack: contextlib.ExitStack, dtype: torch.dtype) -> None:
    """Enter CPU autocast with ``dtype`` on ``stack``; skip the test if the CPU rejects it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            stack.enter_context(torch.autocast("cpu", dtype=dtype))
    except (RuntimeError, UserWarning) as error:
        pytest.skip(f"CPU autocast rejects {dtype}: {error}")


@pytest.mark.parametrize("name", DISTINCT_LOSS_NAMES)
@pytest.mark.parametrize("num_classes", [1, 3])
@pytest.mark.parametrize("fill", ["empty", "full"])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("magnitude", [3.0, 1e4])
def test_loss_and_gradients_stay_finite(name, num_classes, fill, dtype, magnitude):
    """All-background or all-foreground targets, mixed precision and logits of +-1e4."""
    generator = torch.Generator().manual_seed(12)
    signs = torch.randn((2, num_classes, 6, 6), generator=generator).sign()
    logits = (magnitude * signs).to(dtype or torch.float32).requires_grad_()
    label = 0 if fill == "empty" else max(num_classes - 1, 1)
    target = torch.full((2, 1, 6, 6), label, dtype=torch.uint8)
    with contextlib.ExitStack() as stack:
        if dtype is not None:
            enter_cpu_autocast_or_skip(stack, dtype)
        value = build_loss(name)(logits, target)
    assert value.dtype == torch.float32
    assert torch.isfinite(value)
    value.backward()
    assert torch.isfinite(logits.grad).all()


def test_losses_inside_autocast_on_a_bfloat16_network_output_match_float32():
    torch.manual_seed(13)
    network = nn.Conv2d(1, 3, 3, padding=1)
    image = torch.randn(2, 1, 8, 8)
    target = torch.randint(0, 3, (2, 1, 8, 8))
    loss = build_loss("dice_ce")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = network(image)
        assert logits.dtype == torch.bfloat16
        value = loss(logits, target)
    torch.testing.assert_close(value, loss(logits.float(), target))


# --- input validation and the registry ------------------------------------------------------


@pytest.mark.parametrize("name", DISTINCT_LOSS_NAMES)
def test_target_without_channel_axis_is_rejected_with_the_expected_shape(name):
    logits = torch.zeros(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"\(N, 1, \*spatial\) = \(2, 1, 8, 8\)"):
        build_loss(name)(logits, torch.zeros(2, 8, 8, dtype=torch.long))


def test_class_index_outside_the_logit_channels_is_rejected():
    logits = torch.zeros(1, 3, 2, 2)
    with pytest.raises(ValueError, match=r"0\.\.2"):
        DiceLoss()(logits, torch.full((1, 1, 2, 2), 3))


@pytest.mark.parametrize("name", DISTINCT_LOSS_NAMES)
def test_a_binary_target_outside_0_and_1_is_rejected(name):
    """A lone class stored as 2 would train a sigmoid towards 2: a negative Dice and BCE, no error."""
    with pytest.raises(ValueError, match=r"values in \[0, 1\] for one logit channel, got 0\.\.2"):
        build_loss(name)(torch.zeros(1, 1, 2, 2), torch.tensor([0.0, 2.0, 0.0, 0.0]).view(1, 1, 2, 2))


def test_registry_maps_bce_and_ce_to_the_same_loss():
    assert LOSSES["bce"] is LOSSES["ce"] is CrossEntropyLoss
    assert LOSSES["dice_bce"] is LOSSES["dice_ce"] is DiceCELoss
    assert isinstance(build_loss("bce"), CrossEntropyLoss)


def test_build_loss_routes_options_to_the_parts_of_a_combined_loss():
    loss = build_loss("dice_focal", dice_weight=2.0, other_weight=3.0, smooth=0.5, gamma=0.0)
    dice, focal = loss.losses
    assert (dice.smooth, focal.gamma, loss.weights) == (0.5, 0.0, (2.0, 3.0))
    logits, target = make_case(1, (8, 8), seed=14)
    expected = 2.0 * DiceLoss(smooth=0.5)(logits, target) + 3.0 * CrossEntropyLoss()(logits, target)
    torch.testing.assert_close(loss(logits, target), expected)


def test_build_loss_rejects_an_unknown_name_and_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown loss 'jaccard'.*dice_focal"):
        build_loss("jaccard")


def test_build_loss_rejects_an_option_the_loss_does_not_take():
    with pytest.raises(TypeError, match="'dice'.*gamma"):
        build_loss("dice", gamma=2.0)
    with pytest.raises(TypeError, match="loss 'ce' got unexpected option.*args; accepted options: none"):
        build_loss("ce", args=1)


@pytest.mark.parametrize(
    ("name", "options"),
    [("dice", {"smooth": -1.0}), ("focal", {"alpha": 1.5}), ("tversky", {"beta": -0.1})],
)
def test_out_of_range_option_values_are_rejected(name, options):
    with pytest.raises(ValueError, match=next(iter(options))):
        build_loss(name, **options)
