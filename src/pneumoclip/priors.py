"""Label-shift adaptation: re-estimate the class priors of an unlabelled batch by EM.

A classifier's posteriors carry the class shares it was trained on. When a batch comes from
one site whose shares differ (a clinic that sees mostly healthy children, say), the image
given a class looks the same but the priors moved, and the posteriors are off by the ratio
new prior / training prior. Saerens, Latinne & Decaestecker (2002), "Adjusting the outputs of
a classifier to new a priori probabilities: a simple procedure", Neural Computation 14(1),
estimate the new priors by EM from the posteriors alone: reweight each posterior by the
ratio, renormalise, take the mean adjusted posterior as the new prior, repeat. The fixed
point is the maximum-likelihood estimate of the batch's priors, and the adjusted posteriors
are the classifier's posteriors under those priors.

When to use it (an option, off by default):
- on a batch from one source whose class shares may differ from training, all at once;
- only with calibrated probabilities (the classifier's temperature scaling provides them):
  EM trusts the posteriors' values, and over-confident ones drive the priors too far. One
  temperature does not remove a per-class bias: check that on data with the training shares
  (validation) the mean posterior matches the training priors; where it does not, EM drifts
  even without any shift and can drive a weakly separated class's prior towards 0;
- on tens of images at least (`MIN_BATCH` is the floor `adapt` enforces), never on a single
  image: one image's "prior" is its own prediction, and the reweighting then only sharpens it.
`train_priors` should be the classifier's own mean posterior on data with the training
shares, not the counted shares: pneumoclip's models record it as `reference_priors` (the mean
calibrated validation posterior), so that on validation-like data EM stops where it starts.

It corrects label shift only: under an acquisition change (contrast, blur, ...) the image
given a class changes too, which this cannot undo and may make worse.
"""

from __future__ import annotations

import numpy as np

MIN_BATCH = 30  # images; below this the estimated priors are mostly noise
SUM_TOLERANCE = 1e-3  # how far a probability row (float32 softmax) may sum from 1


def check_inputs(probs: np.ndarray, train_priors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both as float64 arrays, or a ValueError saying what is wrong: a caller that passes
    logits, a transposed matrix or unnormalised counts should hear it, not get numbers."""
    probs = np.asarray(probs, dtype=np.float64)
    priors = np.asarray(train_priors, dtype=np.float64)
    if priors.ndim != 1 or priors.size < 2:
        raise ValueError(f"train_priors must be a 1-D array of at least 2 classes, "
                         f"got shape {priors.shape}")
    if not np.all(np.isfinite(priors)) or np.any(priors <= 0):
        raise ValueError(f"train_priors must be positive and finite, got {priors.tolist()}")
    if abs(priors.sum() - 1) > 1e-6:
        raise ValueError(f"train_priors must sum to 1, got {priors.sum():.6g}")
    if probs.ndim != 2 or probs.shape[1] != priors.size:
        raise ValueError(f"probs must be (n, {priors.size}) to match train_priors, "
                         f"got shape {probs.shape}")
    if not np.all(np.isfinite(probs)) or np.any(probs < 0):
        raise ValueError("probs must be finite and non-negative (probabilities, not logits)")
    sums = probs.sum(axis=1)
    if probs.size and np.any(np.abs(sums - 1) > SUM_TOLERANCE):
        worst = int(np.argmax(np.abs(sums - 1)))
        raise ValueError(f"each row of probs must sum to 1; row {worst} sums to "
                         f"{sums[worst]:.6g}")
    return probs, priors / priors.sum()


def reweight(probs: np.ndarray, ratio: np.ndarray) -> np.ndarray:
    """Posteriors times the prior ratio per class, rows renormalised (Bayes' rule)."""
    adjusted = probs * ratio
    return adjusted / np.maximum(adjusted.sum(axis=1, keepdims=True), np.finfo(float).tiny)


def em_priors(
    probs: np.ndarray, train_priors: np.ndarray, max_iter: int = 100, tol: float = 1e-6
) -> tuple[np.ndarray, np.ndarray, int]:
    """Saerens et al.'s EM on a batch of posteriors `probs` (n, classes) made under
    `train_priors` (classes,).

    Returns (adapted posteriors, estimated priors, iterations run). It stops when no prior
    moves by `tol` or more in an iteration, or after `max_iter`. An empty batch comes back
    as it is, with the training priors and 0 iterations.
    """
    if max_iter < 1:
        raise ValueError(f"max_iter must be at least 1, got {max_iter}")
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol}")
    probs, train = check_inputs(probs, train_priors)
    if len(probs) == 0:
        return probs, train.copy(), 0
    priors, iterations, moved = train.copy(), 0, np.inf
    while moved >= tol and iterations < max_iter:
        new = reweight(probs, priors / train).mean(axis=0)
        moved = float(np.abs(new - priors).max())
        priors, iterations = new, iterations + 1
    return reweight(probs, priors / train), priors, iterations


def adapt(probs: np.ndarray, train_priors: np.ndarray, min_batch: int = MIN_BATCH,
          **options) -> tuple[np.ndarray, np.ndarray]:
    """The batch's posteriors under its EM-estimated priors, and those priors; refuses a
    batch of fewer than `min_batch` images (but not an empty one), where the estimate would
    be mostly noise. `options` go to em_priors (max_iter, tol)."""
    n = len(np.asarray(probs))
    if 0 < n < min_batch:
        raise ValueError(f"prior adaptation needs a batch of at least {min_batch} images, "
                         f"got {n}: it estimates the batch's class shares, which one image "
                         "or a handful cannot show")
    adapted, priors, _ = em_priors(probs, train_priors, **options)
    return adapted, priors
