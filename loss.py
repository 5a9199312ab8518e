"""Segmentation losses on raw logits: Dice, (binary) cross-entropy, focal, Tversky and their sums.

Every loss takes ``(logits, target)``: logits ``(N, K, *spatial)`` straight from the network and
target ``(N, 1, *spatial)``. ``K == 1`` is a binary task (sigmoid, target 0/1 of any dtype);
``K > 1`` is multi-class (softmax over K, target integer class indices 0..K-1 of any dtype).
All losses compute in float32 with log-sigmoid / log-softmax forms, so they stay finite under
``torch.autocast`` (float16/bfloat16), on empty or all-foreground targets and for logits of ±1e4.

- Dice (Milletari et al. 2016): overlap of soft masks; insensitive to how small the foreground
  is, so it copes with the heavy class imbalance of organ/lesion masks.
- Cross-entropy / BCE: per-voxel likelihood with smooth, well-scaled gradients; calibrates
  probabilities but is dominated by the background when foreground is small.
- Focal (Lin et al. 2017): cross-entropy down-weighted by (1 - p_t)^gamma so easy, mostly
  background voxels count less and hard voxels near boundaries count more.
- Tversky (Salehi et al. 2017): Dice with separate weights on false positives (alpha) and false
  negatives (beta); beta > alpha favours recall of small lesions.
- Combined (Dice + CE, Dice + focal): region term for imbalance plus voxel term for stable
  gradients, the usual nnU-Net style default.
- Deep supervision: weighted mean of one loss over several full-resolution outputs (UNet++).
"""

import inspect
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LOSSES",
    "CombinedLoss",
    "CrossEntropyLoss",
    "DeepSupervisionLoss",
    "DiceCELoss",
    "DiceFocalLoss",
    "DiceLoss",
    "FocalLoss",
    "TverskyLoss",
    "build_loss",
]


def check_logits_and_target(logits: torch.Tensor, target: torch.Tensor) -> None:
    """Raise ValueError unless logits are (N, K, *spatial) and target is (N, 1, *spatial).

    On the CPU the target values must also lie in 0..K-1 for multi-class logits and in [0, 1] for one
    channel; on an accelerator that check would stop the device at every step (training data is
    checked once, when it is read).
    """
    if logits.ndim < 3:
        raise ValueError(
            f"logits: expected shape (N, K, *spatial) with at least one spatial dim, "
            f"got {tuple(logits.shape)}"
        )
    expected = (logits.shape[0], 1, *logits.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(
            f"target: expected shape (N, 1, *spatial) = {expected} to match logits "
            f"{tuple(logits.shape)}, got {tuple(target.shape)}"
        )
    num_classes = logits.shape[1]
    if target.numel() == 0 or target.device.type != "cpu":
        return
    low, high = float(target.min()), float(target.max())
    if num_classes == 1 and (low < 0 or high > 1):
        raise ValueError(f"target: expected values in [0, 1] for one logit channel, got {low:g}..{high:g}")
    if num_classes > 1 and (low < 0 or high >= num_classes):
        raise ValueError(
            f"target: expected class indices in 0..{num_classes - 1} for {num_classes} "
            f"logit channels, got values in {int(low)}..{int(high)}"
        )


def _probabilities_and_onehot(
    logits: torch.Tensor, target: torch.Tensor, include_background: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 probabilities and a matching float32 target, both (N, C, *spatial).

    Binary: the single sigmoid channel. Multi-class: softmax and one-hot target, dropping
    class 0 from both unless ``include_background``.
    """
    logits = logits.float()
    if logits.shape[1] == 1:
        return torch.sigmoid(logits), target.float()
    probabilities = torch.softmax(logits, dim=1)
    onehot = F.one_hot(target[:, 0].long(), logits.shape[1]).movedim(-1, 1).float()
    if not include_background:
        probabilities, onehot = probabilities[:, 1:], onehot[:, 1:]
    return probabilities, onehot


def _soft_confusion(
    logits: torch.Tensor, target: torch.Tensor, include_background: bool, batch: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Soft true positives, false positives and false negatives per class (batch=True)
    or per sample and class (batch=False)."""
    probabilities, onehot = _probabilities_and_onehot(logits, target, include_background)
    dims = [0, *range(2, probabilities.ndim)] if batch else list(range(2, probabilities.ndim))
    true_pos = (probabilities * onehot).sum(dim=dims)
    false_pos = (probabilities * (1.0 - onehot)).sum(dim=dims)
    false_neg = ((1.0 - probabilities) * onehot).sum(dim=dims)
    return true_pos, false_pos, false_neg


def _check_non_negative(owner: str, **values: float) -> None:
    for name, value in values.items():
        if value < 0:
            raise ValueError(f"{owner}: {name} must be >= 0, got {value}")


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator, and 1 where the denominator is 0 (smooth=0, nothing predicted where
    there is nothing: a perfect match, as the DSC metric scores it), with finite gradients."""
    empty = denominator == 0
    return torch.where(empty, torch.ones_like(numerator), numerator / torch.where(empty, 1.0, denominator))


class _OverlapLoss(nn.Module):
    """1 - mean overlap index over soft true/false positive and false negative counts.

    Dice and Tversky differ only in the index; ``smooth``, ``batch`` and ``include_background``
    mean the same for both (see :class:`DiceLoss`).
    """

    def __init__(self, smooth: float, batch: bool, include_background: bool) -> None:
        super().__init__()
        self.smooth = smooth
        self.batch = batch
        self.include_background = include_background

    def overlap(
        self, true_pos: torch.Tensor, false_pos: torch.Tensor, false_neg: torch.Tensor
    ) -> torch.Tensor:
        """Overlap index in [0, 1] per class (``batch=True``) or per sample and class."""
        raise NotImplementedError

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        check_logits_and_target(logits, target)
        true_pos, false_pos, false_neg = _soft_confusion(logits, target, self.include_background, self.batch)
        return (1.0 - self.overlap(true_pos, false_pos, false_neg)).mean()


class DiceLoss(_OverlapLoss):
    """Soft Dice loss, 1 - (2|P∩T| + smooth) / (|P| + |T| + smooth) (Milletari et al. 2016).

    ``batch=True`` sums over the whole batch before the ratio, then averages over classes
    (stable when a slice has no foreground); ``batch=False`` takes the ratio per sample and
    class, then averages. Multi-class ignores class 0 unless ``include_background`` (nnU-Net's
    default); binary always uses its single foreground channel.
    """

    def __init__(self, smooth: float = 1.0, batch: bool = True, include_background: bool = False) -> None:
        _check_non_negative("DiceLoss", smooth=smooth)
        super().__init__(smooth, batch, include_background)

    def overlap(
        self, true_pos: torch.Tensor, false_pos: torch.Tensor, false_neg: torch.Tensor
    ) -> torch.Tensor:
        return _ratio(2.0 * true_pos + self.smooth, 2.0 * true_pos + false_pos + false_neg + self.smooth)


class TverskyLoss(_OverlapLoss):
    """Tversky loss, 1 - (TP + smooth) / (TP + alpha·FP + beta·FN + smooth) (Salehi et al. 2017).

    ``alpha`` weighs false positives and ``beta`` false negatives (MONAI's convention), on soft
    counts. ``alpha = beta = 0.5`` is Dice: exactly for ``smooth=0``, and in general
    ``TverskyLoss(0.5, 0.5, smooth=s)`` equals ``DiceLoss(smooth=2 * s)``. ``batch`` and
    ``include_background`` behave as in :class:`DiceLoss`.
    """

    def __init__(
        self,
        alpha: float = 0.3,
        beta: float = 0.7,
        smooth: float = 1.0,
        batch: bool = True,
        include_background: bool = False,
    ) -> None:
        _check_non_negative("TverskyLoss", alpha=alpha, beta=beta, smooth=smooth)
        super().__init__(smooth, batch, include_background)
        self.alpha = alpha
        self.beta = beta

    def overlap(
        self, true_pos: torch.Tensor, false_pos: torch.Tensor, false_neg: torch.Tensor
    ) -> torch.Tensor:
        return _ratio(
            true_pos + self.smooth, true_pos + self.alpha * false_pos + self.beta * false_neg + self.smooth
        )


class CrossEntropyLoss(nn.Module):
    """Mean per-voxel cross-entropy: BCE with logits when K == 1, softmax cross-entropy when K > 1."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        check_logits_and_target(logits, target)
        logits = logits.float()
        if logits.shape[1] == 1:
            return F.binary_cross_entropy_with_logits(logits, target.float())
        return F.cross_entropy(logits, target[:, 0].long())


class FocalLoss(nn.Module):
    """Focal loss, mean over voxels of -alpha_t (1 - p_t)^gamma log p_t (Lin et al. 2017).

    p_t is the predicted probability of the true class (sigmoid for K == 1, softmax for K > 1),
    so ``gamma=0`` without alpha is exactly :class:`CrossEntropyLoss`. ``alpha`` (optional, in
    [0, 1]) weights the foreground: alpha_t = alpha on foreground voxels (label 1, or any class
    > 0) and 1 - alpha on background voxels, as MONAI does for a scalar alpha. Multi-class
    values are averaged over voxels only, so they are K times MONAI's softmax FocalLoss, which
    also averages over the K one-hot channels.
    """

    def __init__(self, gamma: float = 2.0, alpha: float | None = None) -> None:
        super().__init__()
        _check_non_negative("FocalLoss", gamma=gamma)
        if alpha is not None and not 0.0 <= alpha <= 1.0:
            raise ValueError(f"FocalLoss: alpha must be in [0, 1] or None, got {alpha}")
        self.gamma = gamma
        self.alpha = alpha

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        check_logits_and_target(logits, target)
        logits = logits.float()
        if logits.shape[1] == 1:
            foreground = target.float()
            signed_logits = (2.0 * foreground - 1.0) * logits
            log_p_true = F.logsigmoid(signed_logits)
            log_p_false = F.logsigmoid(-signed_logits)
        else:
            labels = target.long()
            foreground = (labels > 0).float()
            log_probabilities = torch.log_softmax(logits, dim=1)
            log_p_true = log_probabilities.gather(1, labels)
            is_true_class = F.one_hot(labels[:, 0], logits.shape[1]).movedim(-1, 1).bool()
            log_p_false = log_probabilities.masked_fill(is_true_class, float("-inf")).logsumexp(
                dim=1, keepdim=True
            )
        voxel_loss = -torch.exp(self.gamma * log_p_false) * log_p_true
        if self.alpha is not None:
            voxel_loss = voxel_loss * (self.alpha * foreground + (1.0 - self.alpha) * (1 - foreground))
        return voxel_loss.mean()


class CombinedLoss(nn.Module):
    """Weighted sum of losses that all take the same (logits, target); weights default to 1."""

    def __init__(self, losses: Sequence[nn.Module], weights: Sequence[float] | None = None) -> None:
        super().__init__()
        if len(losses) == 0:
            raise ValueError("CombinedLoss: losses must not be empty")
        weights = [1.0] * len(losses) if weights is None else [float(w) for w in weights]
        if len(weights) != len(losses):
            raise ValueError(
                f"CombinedLoss: expected one weight per loss ({len(losses)}), got {len(weights)}"
            )
        if any(w < 0 for w in weights):
            raise ValueError(f"CombinedLoss: weights must be >= 0, got {weights}")
        self.losses = nn.ModuleList(losses)
        self.weights = tuple(weights)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return sum(w * loss(logits, target) for w, loss in zip(self.weights, self.losses, strict=True))


class DiceCELoss(CombinedLoss):
    """dice_weight · Dice + other_weight · (B)CE; Dice options go to :class:`DiceLoss`."""

    def __init__(
        self,
        dice_weight: float = 1.0,
        other_weight: float = 1.0,
        smooth: float = 1.0,
        batch: bool = True,
        include_background: bool = False,
    ) -> None:
        super().__init__(
            [DiceLoss(smooth, batch, include_background), CrossEntropyLoss()],
            [dice_weight, other_weight],
        )


class DiceFocalLoss(CombinedLoss):
    """dice_weight · Dice + other_weight · focal; smooth/batch/include_background go to
    :class:`DiceLoss`, gamma/alpha to :class:`FocalLoss` (which always counts every voxel)."""

    def __init__(
        self,
        dice_weight: float = 1.0,
        other_weight: float = 1.0,
        smooth: float = 1.0,
        batch: bool = True,
        include_background: bool = False,
        gamma: float = 2.0,
        alpha: float | None = None,
    ) -> None:
        super().__init__(
            [DiceLoss(smooth, batch, include_background), FocalLoss(gamma, alpha)],
            [dice_weight, other_weight],
        )


class DeepSupervisionLoss(nn.Module):
    """Weighted mean of ``loss`` over several full-resolution outputs (deep supervision, e.g.
    UNet++'s nested decoders, Zhou et al. 2018).

    Given a list/tuple of logits it returns sum_i w_i · loss(logits_i, target) / sum_i w_i
    (equal weights by default); given a single tensor it returns ``loss(logits, target)``.
    """

    def __init__(self, loss: nn.Module, weights: Sequence[float] | None = None) -> None:
        super().__init__()
        if weights is not None:
            weights = [float(w) for w in weights]
            if any(w < 0 for w in weights) or sum(weights) <= 0:
                raise ValueError(
                    f"DeepSupervisionLoss: weights must be >= 0 with a positive sum, got {weights}"
                )
        self.loss = loss
        self.weights = None if weights is None else tuple(weights)

    def forward(self, logits: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if isinstance(logits, torch.Tensor):
            return self.loss(logits, target)
        if len(logits) == 0:
            raise ValueError("DeepSupervisionLoss: expected at least one output, got none")
        weights = self.weights if self.weights is not None else (1.0,) * len(logits)
        if len(weights) != len(logits):
            raise ValueError(
                f"DeepSupervisionLoss: expected {len(weights)} outputs (one per weight), got {len(logits)}"
            )
        total = sum(w * self.loss(output, target) for w, output in zip(weights, logits, strict=True))
        return total / sum(weights)


LOSSES: dict[str, type[nn.Module]] = {
    "dice": DiceLoss,
    "bce": CrossEntropyLoss,
    "ce": CrossEntropyLoss,
    "focal": FocalLoss,
    "tversky": TverskyLoss,
    "dice_bce": DiceCELoss,
    "dice_ce": DiceCELoss,
    "dice_focal": DiceFocalLoss,
}


def build_loss(name: str, **options: object) -> nn.Module:
    """Build the loss registered as ``name`` in :data:`LOSSES` with its keyword ``options``.

    Combined losses take ``dice_weight``/``other_weight`` plus the options of their parts
    (e.g. ``smooth`` for Dice, ``gamma`` for focal). Unknown names raise ValueError; options
    the loss does not accept raise TypeError naming the loss and the option.
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; expected one of: {', '.join(sorted(LOSSES))}")
    loss_class = LOSSES[name]
    accepted = [
        name
        for name, parameter in inspect.signature(loss_class.__init__).parameters.items()
        if name != "self" and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
    ]
    unknown = [option for option in options if option not in accepted]
    if unknown:
        raise TypeError(
            f"loss {name!r} got unexpected option(s) {', '.join(unknown)}; "
            f"accepted options: {', '.join(accepted) or 'none'}"
        )
    return loss_class(**options)
