"""EM prior adaptation (pneumoclip.priors) on data drawn from a known model, where the
exact Bayes posteriors under any priors can be written down."""

from __future__ import annotations

import numpy as np
import pytest

from pneumoclip.priors import MIN_BATCH, adapt, em_priors

MEANS = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0]])  # three overlapping unit Gaussians
TRAIN = np.array([0.25, 0.5, 0.25])  # the project's train shares, roughly


def draw(priors: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn with `priors`, points from each class's unit Gaussian."""
    rng = np.random.default_rng(seed)
    y = rng.choice(len(priors), size=n, p=priors)
    return y, MEANS[y] + rng.standard_normal((n, 2))


def bayes(x: np.ndarray, priors: np.ndarray) -> np.ndarray:
    """Exact posteriors p(class | x) under `priors` (a perfectly calibrated classifier)."""
    log = -0.5 * ((x[:, None, :] - MEANS[None]) ** 2).sum(-1) + np.log(priors)
    p = np.exp(log - log.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


def log_loss(y: np.ndarray, p: np.ndarray) -> float:
    return float(-np.log(p[np.arange(len(y)), y]).mean())


def test_em_recovers_shifted_priors_and_improves_the_posteriors():
    shifted = np.array([0.6, 0.15, 0.25])  # towards the first class, as at a screening site
    y, x = draw(shifted, 4000, seed=1)
    before = bayes(x, TRAIN)
    after, priors, iterations = em_priors(before, TRAIN)
    truth = np.bincount(y, minlength=3) / len(y)
    assert np.abs(priors - truth).max() < 0.03, (priors, truth)
    assert np.abs(priors - TRAIN).max() > 0.3  # it moved, not stayed put
    assert 1 < iterations < 100
    # the adapted posteriors are (close to) the Bayes posteriors under the shifted priors
    assert np.abs(after - bayes(x, shifted)).max() < 0.05
    assert log_loss(y, after) < log_loss(y, before) - 0.05
    assert (after.argmax(1) == y).mean() > (before.argmax(1) == y).mean() + 0.03


def test_the_estimate_is_a_fixed_point_of_the_em_step():
    _, x = draw(np.array([0.5, 0.2, 0.3]), 500, seed=2)
    after, priors, _ = em_priors(bayes(x, TRAIN), TRAIN, tol=1e-10, max_iter=10_000)
    assert np.allclose(after.sum(axis=1), 1)
    assert np.allclose(after.mean(axis=0), priors, atol=1e-8)


def test_unshifted_priors_stay_near_the_training_priors():
    y, x = draw(TRAIN, 4000, seed=3)
    before = bayes(x, TRAIN)
    after, priors, _ = em_priors(before, TRAIN)
    assert np.abs(priors - TRAIN).max() < 0.03
    assert np.abs(after - before).max() < 0.1
    assert abs(log_loss(y, after) - log_loss(y, before)) < 0.01


def test_max_iter_bounds_the_iterations():
    _, x = draw(np.array([0.7, 0.1, 0.2]), 300, seed=4)
    _, _, iterations = em_priors(bayes(x, TRAIN), TRAIN, max_iter=3)
    assert iterations == 3


def test_an_empty_batch_comes_back_as_it_is():
    after, priors, iterations = em_priors(np.zeros((0, 3)), TRAIN)
    assert after.shape == (0, 3) and iterations == 0
    assert np.allclose(priors, TRAIN)
    assert adapt(np.zeros((0, 3)), TRAIN)[0].shape == (0, 3)


@pytest.mark.parametrize(("probs", "priors", "message"), [
    (np.full(3, 1 / 3), TRAIN, r"must be \(n, 3\)"),
    (np.full((4, 2), 0.5), TRAIN, r"must be \(n, 3\)"),
    (np.full((4, 3), 0.5), TRAIN, "row 0 sums to 1.5"),
    (np.array([[2.0, -0.5, -0.5]]), TRAIN, "non-negative"),
    (np.array([[np.nan, 0.5, 0.5]]), TRAIN, "finite"),
    (np.full((4, 3), 1 / 3), np.array([0.5, 0.5, 0.0]), "positive"),
    (np.full((4, 3), 1 / 3), np.array([0.5, 0.5, 0.5]), "sum to 1"),
    (np.full((4, 3), 1 / 3), np.array([[0.5, 0.5]]), "1-D array"),
])
def test_bad_inputs_are_refused_with_the_reason(probs, priors, message):
    with pytest.raises(ValueError, match=message):
        em_priors(probs, priors)


@pytest.mark.parametrize(("option", "message"), [
    ({"max_iter": 0}, "max_iter"), ({"tol": 0.0}, "tol"),
])
def test_bad_options_are_refused(option, message):
    with pytest.raises(ValueError, match=message):
        em_priors(np.full((4, 3), 1 / 3), TRAIN, **option)


def test_adapt_refuses_a_single_image_and_a_handful():
    with pytest.raises(ValueError, match="at least"):
        adapt(np.array([[0.2, 0.5, 0.3]]), TRAIN)
    with pytest.raises(ValueError, match="at least"):
        adapt(np.full((MIN_BATCH - 1, 3), 1 / 3), TRAIN)
    _, x = draw(np.array([0.6, 0.2, 0.2]), MIN_BATCH, seed=5)
    probs = bayes(x, TRAIN)
    adapted, priors = adapt(probs, TRAIN)
    assert np.allclose(adapted, em_priors(probs, TRAIN)[0])
    assert np.allclose(priors, em_priors(probs, TRAIN)[1])
