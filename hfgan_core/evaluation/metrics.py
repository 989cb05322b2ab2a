"""The paper's quality metrics: the generation score and the utility of generated data for a downstream classifier.

Definitions follow the reference implementation (HuSCF-GAN, Metrics/evaluation.py):

- **Generation score** (an Inception-score variant with a domain classifier):
  exp(mean_x KL(p(y|x) || p(y))), p(y) the mean of p(y|x) over the generated samples, p(y|x) the softmax of the
  domain's scoring classifier applied directly to the generator's [-1, 1] output (the classifier is trained on
  [-1, 1]-normalised real data). Labels are uniform random, z standard normal. Between 1 (every sample gets the same
  prediction) and the number of classes (confident, class-balanced predictions). We compute in float64 from the
  logits (log-softmax), with 0 log 0 = 0 as scipy's `entropy` does. The reference draws `n // 64` batches of 64
  (4,992 samples for n = 5,000); we draw exactly `n_samples`.
- **Utility**: a `UtilityCNN` trained only on `n_samples` generated samples (uniform random labels; Adam 1e-3,
  batch 64, 15 epochs), then tested on the real test set: accuracy, macro precision, macro recall, macro F1 (as
  scikit-learn's `*_score(average='macro', zero_division=0)`) and macro false-positive rate (per class
  FP / (FP + TN), 0 when undefined, averaged), all in percent. Classes are those that occur in the true or the
  predicted labels (scikit-learn's `unique_labels`). Implemented with numpy; no scikit-learn.

A generator is a callable `generate(labels: LongTensor[B], z: FloatTensor[B, z_dim]) -> images [B, C, H, W]` in
[-1, 1], e.g. the model composed from a cluster's layers in eval mode; it is called under `torch.no_grad()`.
Generation runs in batches of `batch_size` (default 250): eval-mode BatchNorm makes the result independent of it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .models import UTILITY_ARCH, build_model
from .training import Stopwatch, as_tensors, predict_logits, seeded_init, train_supervised

GenerateFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

DEFAULT_GEN_BATCH = 250


# ----------------------------------------------------------------------------------------------------------------
# Sampling


@torch.no_grad()
def sample_generator(
    generate: GenerateFn,
    n_samples: int,
    *,
    generator: torch.Generator,
    batch_size: int = DEFAULT_GEN_BATCH,
    num_classes: int = 10,
    z_dim: int = 100,
    device: str | torch.device = "cpu",
    labels: torch.Tensor | None = None,
    consume: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Draw `n_samples` images from `generate`, `batch_size` at a time.

    All labels (uniform over `num_classes`, unless `labels` fixes them), then all z, are drawn up front from the CPU
    `generator`, so the samples depend only on its seed: not on the device, nor on the batch size. With `consume`,
    each batch (images, labels) is handed to it and nothing is kept (returns None); otherwise returns
    (images, labels) on the CPU.
    """
    if n_samples < 0 or batch_size <= 0:
        raise ValueError("n_samples must be >= 0 and batch_size > 0")
    if labels is None:
        all_y = torch.randint(0, num_classes, (n_samples,), generator=generator)
    elif labels.shape != (n_samples,):
        raise ValueError(f"labels must have shape [{n_samples}]")
    else:
        all_y = labels.to(torch.int64).cpu()
    all_z = torch.randn(n_samples, z_dim, generator=generator)
    kept_x: list[torch.Tensor] = []
    for start in range(0, n_samples, batch_size):
        y = all_y[start : start + batch_size]
        b = y.shape[0]
        x = generate(y.to(device), all_z[start : start + batch_size].to(device))
        if x.dim() != 4 or x.shape[0] != b:
            raise ValueError(f"generate returned shape {list(x.shape)} for a batch of {b}; expected [B, C, H, W]")
        if consume is not None:
            consume(x, y)
        else:
            kept_x.append(x.detach().float().cpu())
    if consume is not None:
        return None
    if not kept_x:
        return torch.empty(0, 1, 1, 1), all_y
    return torch.cat(kept_x), all_y


# ----------------------------------------------------------------------------------------------------------------
# Generation score


def score_from_log_probs(log_probs: torch.Tensor) -> float:
    """exp(mean_i KL(p_i || mean_j p_j)) from per-sample log-probabilities [N, K] (rows are normalised first)."""
    lp = torch.as_tensor(log_probs, dtype=torch.float64)
    if lp.dim() != 2 or lp.shape[0] == 0:
        raise ValueError("need log-probabilities of shape [N, K] with N > 0")
    lp = lp - torch.logsumexp(lp, dim=1, keepdim=True)  # scipy's entropy() normalises its inputs too
    p = lp.exp()
    log_py = torch.log(p.mean(dim=0))
    # 0 * log 0 = 0: where p underflows to 0 its term is dropped (log_py is finite wherever any p > 0).
    terms = torch.where(p > 0, p * (lp - log_py), torch.zeros((), dtype=torch.float64))
    kl = terms.sum(dim=1)
    return float(math.exp(float(kl.mean())))


def score_from_probs(probs: torch.Tensor | np.ndarray | Sequence[Sequence[float]]) -> float:
    """The generation score from per-sample class probabilities [N, K] (zeros allowed)."""
    p = torch.as_tensor(np.asarray(probs, dtype=np.float64))
    if (p < 0).any():
        raise ValueError("probabilities must be non-negative")
    return score_from_log_probs(torch.log(p))


@torch.no_grad()
def generation_score(
    generate: GenerateFn,
    classifier: nn.Module,
    n_samples: int = 5000,
    batch_size: int = DEFAULT_GEN_BATCH,
    *,
    generator: torch.Generator,
    num_classes: int = 10,
    z_dim: int = 100,
    device: str | torch.device | None = None,
    features: list[torch.Tensor] | None = None,
) -> float:
    """exp(E_x KL(p(y|x) || p(y))) over `n_samples` generated samples with uniform random labels (max: num_classes).

    `classifier` is the domain's scoring classifier; it runs in eval mode (its mode is restored afterwards).
    `device` defaults to the classifier's device. With a `features` list, the classifier's penultimate activations
    of the same samples are appended to it (for the classifier Fréchet distance; the logits are computed from them,
    the same operations as the classifier's forward).
    """
    if n_samples <= 0:
        raise ValueError("n_samples must be positive")
    if device is None:
        device = next(classifier.parameters()).device
    chunks: list[torch.Tensor] = []

    def logits(x: torch.Tensor) -> torch.Tensor:
        if features is None:
            return classifier(x)
        f = classifier.features(x)
        features.append(f.detach().cpu())
        return classifier.fc2(f)

    was_training = classifier.training
    classifier.eval()
    try:
        sample_generator(
            generate,
            n_samples,
            generator=generator,
            batch_size=batch_size,
            num_classes=num_classes,
            z_dim=z_dim,
            device=device,
            consume=lambda x, _y: chunks.append(torch.log_softmax(logits(x.to(device)).double(), dim=1).cpu()),
        )
    finally:
        classifier.train(was_training)
    return score_from_log_probs(torch.cat(chunks))


# ----------------------------------------------------------------------------------------------------------------
# Classification metrics


def confusion_matrix(
    y_true: Sequence[int] | np.ndarray | torch.Tensor,
    y_pred: Sequence[int] | np.ndarray | torch.Tensor,
    labels: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(matrix [K, K] with rows = true class, columns = predicted class, the K labels).

    Without `labels`, the classes are the sorted union of those in y_true and y_pred (scikit-learn's default).
    """
    t = np.asarray(y_true, dtype=np.int64).ravel()
    p = np.asarray(y_pred, dtype=np.int64).ravel()
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length ({t.size} vs {p.size})")
    lab = np.unique(np.concatenate([t, p])) if labels is None else np.asarray(labels, dtype=np.int64)
    k = len(lab)
    order = np.argsort(lab, kind="stable")
    sorted_lab = lab[order]

    def positions(v: np.ndarray) -> np.ndarray:
        pos = np.clip(np.searchsorted(sorted_lab, v), 0, max(k - 1, 0))
        bad = sorted_lab[pos] != v if k else np.ones(v.shape, dtype=bool)
        if bad.any():
            raise ValueError(f"label {int(v[bad][0])} is not among the given labels")
        return order[pos]

    ti, pi = positions(t), positions(p)
    cm = np.bincount(ti * k + pi, minlength=k * k).reshape(k, k)
    return cm, lab


def classification_metrics(
    y_true: Sequence[int] | np.ndarray | torch.Tensor,
    y_pred: Sequence[int] | np.ndarray | torch.Tensor,
    labels: Sequence[int] | None = None,
) -> dict[str, float]:
    """accuracy, macro precision / recall / F1 (zero_division=0) and macro FPR, all in percent."""
    cm, _ = confusion_matrix(y_true, y_pred, labels)
    total = cm.sum()
    if total == 0:
        raise ValueError("no samples to score")
    tp = np.diag(cm).astype(np.float64)
    pred_pos = cm.sum(axis=0).astype(np.float64)  # TP + FP per class
    true_pos = cm.sum(axis=1).astype(np.float64)  # TP + FN per class
    fp = pred_pos - tp
    fn = true_pos - tp
    tn = total - tp - fp - fn

    def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        # zero_division=0: a class with an empty denominator scores 0.
        out = np.zeros_like(num)
        np.divide(num, den, out=out, where=den != 0)
        return out

    precision = ratio(tp, pred_pos)
    recall = ratio(tp, true_pos)
    f1 = ratio(2 * tp, 2 * tp + fp + fn)  # = 2PR/(P+R); 0 when tp = 0, as scikit-learn
    fpr = ratio(fp, fp + tn)
    return {
        "accuracy": 100.0 * float(tp.sum()) / float(total),
        "precision": 100.0 * float(precision.mean()),
        "recall": 100.0 * float(recall.mean()),
        "f1": 100.0 * float(f1.mean()),
        "fpr": 100.0 * float(fpr.mean()),
    }


# ----------------------------------------------------------------------------------------------------------------
# Utility


def utility_metrics(
    generate: GenerateFn,
    test_images: Any,
    test_labels: torch.Tensor | None = None,
    n_samples: int = 30000,
    epochs: int = 15,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    lr: float = 1e-3,
    gen_batch_size: int = DEFAULT_GEN_BATCH,
    num_classes: int = 10,
    z_dim: int = 100,
) -> dict[str, Any]:
    """Train a `UtilityCNN` on `n_samples` generated samples, test it on the real test set.

    `test_images` is either the images tensor (then `test_labels` is required) or an ImageSet-like object. Returns
    accuracy, precision, recall, f1, fpr (percent; see `classification_metrics`) plus n_samples, epochs and the
    wall times of generation (`generate_s`) and training (`train_s`). Seeded: `seed` fixes the labels, z, the
    CNN's initialisation and the shuffling.
    """
    source = test_images if test_labels is None else (test_images, test_labels)
    x_test, y_test = as_tensors(source, "test set")
    gen = torch.Generator().manual_seed(seed)
    with Stopwatch() as sw_gen:
        sampled = sample_generator(
            generate,
            n_samples,
            generator=gen,
            batch_size=gen_batch_size,
            num_classes=num_classes,
            z_dim=z_dim,
            device=device,
        )
    assert sampled is not None
    x_fake, y_fake = sampled
    # The CNN follows the test data's shape (channels, size).
    model = seeded_init(lambda: build_model(UTILITY_ARCH, num_classes, x_test.shape[1], x_test.shape[-1]), seed)
    with Stopwatch() as sw_train:
        train_supervised(model, x_fake, y_fake, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device=device)
    pred = predict_logits(model, x_test, device=device).argmax(1)
    out: dict[str, Any] = classification_metrics(y_test.numpy(), pred.numpy())
    out.update(n_samples=int(n_samples), epochs=int(epochs), generate_s=sw_gen.seconds, train_s=sw_train.seconds)
    return out
