"""Reliability-diagram bins against a hand computation, and their ECE against evaluation's."""

from __future__ import annotations

import numpy as np
import pytest

from cnnlab.evaluation import expected_calibration_error, reliability_bins


def test_reliability_bins_on_known_inputs() -> None:
    # 4 bins of width 0.25. Confidence 0.95: 4 images, 3 right; confidence 0.55: 3 images,
    # 2 right (the last one predicts class 0 for a 1); the two lower bins stay empty.
    probabilities = np.array([[0.95, 0.05]] * 4 + [[0.45, 0.55]] * 2 + [[0.55, 0.45]])
    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    bins = reliability_bins(probabilities, labels, bins=4)
    np.testing.assert_allclose(bins.edges, [0.0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_array_equal(bins.counts, [0, 0, 3, 4])
    assert np.isnan(bins.accuracy[0]) and np.isnan(bins.confidence[1])
    assert bins.accuracy[2] == pytest.approx(2 / 3)
    assert bins.confidence[2] == pytest.approx(0.55)
    assert bins.accuracy[3] == pytest.approx(0.75) and bins.confidence[3] == pytest.approx(0.95)
    expected = (3 * abs(2 / 3 - 0.55) + 4 * abs(0.75 - 0.95)) / 7
    assert bins.expected_calibration_error == pytest.approx(expected)
    assert expected_calibration_error(probabilities, labels, bins=4) == pytest.approx(expected)


def test_a_confidence_on_an_edge_falls_in_the_lower_bin() -> None:
    bins = reliability_bins(np.array([[0.5, 0.5], [1.0, 0.0]]), np.array([0, 0]), bins=2)
    np.testing.assert_array_equal(bins.counts, [1, 1])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bins_give_the_same_ece_as_evaluation(seed: int) -> None:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(500, 6)) * 3
    probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = rng.integers(0, 6, 500)
    bins = reliability_bins(probabilities, labels)
    assert bins.counts.sum() == 500
    assert bins.expected_calibration_error == pytest.approx(
        expected_calibration_error(probabilities, labels)
    )
