"""Verification metrics against answers worked out by hand or by brute force."""
import numpy as np
import pytest

from sf2dist.eval import (
    DISTANCE_THRESHOLDS,
    best_accuracy,
    equal_error_rate,
    kfold_accuracy,
    pair_metrics,
    roc_auc,
    roc_curve,
    tar_at_far,
    verification_accuracy,
)


def pairs_with_distances(distances):
    """Unit embeddings [n, 2] whose pairs have the given squared distances (d = 2 - 2 cos)."""
    angles = np.arccos(1 - np.asarray(distances, dtype=np.float64) / 2)
    first = np.tile([1.0, 0.0], (len(angles), 1))
    second = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return first, second


def brute_force_kfold(distances, issame, folds):
    """The protocol written as plainly as possible: loops over folds and thresholds."""
    accuracies = []
    for test in np.array_split(np.arange(len(distances)), folds):
        train = np.setdiff1d(np.arange(len(distances)), test)
        train_accuracy = [np.mean((distances[train] < t) == issame[train]) for t in DISTANCE_THRESHOLDS]
        best = DISTANCE_THRESHOLDS[int(np.argmax(train_accuracy))]
        accuracies.append(np.mean((distances[test] < best) == issame[test]))
    return np.array(accuracies)


def test_ten_fold_accuracy_known_answer_with_uneven_folds():
    # 23 pairs: folds of 3, 3, 3, then seven of 2. Positives at distance 0.5, negatives at
    # 1.5, except one negative at 0.3 (index 9, the first pair of fold 3), which every
    # threshold that accepts the positives gets wrong.
    issame = np.array([i % 2 == 0 for i in range(23)])
    distances = np.where(issame, 0.5, 1.5)
    issame[9], distances[9] = False, 0.3
    accuracies, thresholds = kfold_accuracy(distances, issame, folds=10)
    expected = np.ones(10)
    expected[3] = 0.5  # fold 3 = pairs 9 and 10
    np.testing.assert_array_equal(accuracies, expected)
    # Thresholds 0.51 .. 1.50 tie on the training folds; the lowest one is chosen.
    np.testing.assert_array_equal(thresholds, np.full(10, DISTANCE_THRESHOLDS[51]))
    mean, std = verification_accuracy(*pairs_with_distances(distances), issame)
    assert mean == pytest.approx(0.95)
    assert std == pytest.approx(np.std(expected))


def test_fold_sizes_put_the_extra_pairs_first():
    # 12 pairs in 10 folds: sizes 2, 2, 1, 1, ...; the wrong pair is pair 4 = fold 2 alone.
    issame = np.array([True, False] * 6)
    distances = np.where(issame, 0.2, 3.0)
    distances[4] = 3.0  # a positive that looks like a negative
    accuracies, _ = kfold_accuracy(distances, issame, folds=10)
    np.testing.assert_array_equal(accuracies, [1, 1, 0, 1, 1, 1, 1, 1, 1, 1])


def test_ten_fold_accuracy_matches_brute_force_on_noisy_pairs():
    rng = np.random.default_rng(0)
    n = 6001
    issame = rng.random(n) < 0.5
    distances = np.clip(np.where(issame, rng.normal(1.0, 0.3, n), rng.normal(1.6, 0.3, n)), 0, 3.99)
    distances = np.round(distances, 2)  # many pairs exactly on a threshold: the strict < matters
    accuracies, _ = kfold_accuracy(distances, issame, folds=10)
    np.testing.assert_allclose(accuracies, brute_force_kfold(distances, issame, 10), rtol=0, atol=1e-12)


def test_verification_accuracy_normalises_embeddings():
    rng = np.random.default_rng(1)
    first, second = rng.normal(size=(40, 8)), rng.normal(size=(40, 8))
    issame = rng.random(40) < 0.5
    scaled = verification_accuracy(first * 7.0, second * rng.uniform(0.1, 5, (40, 1)), issame)
    assert scaled == verification_accuracy(first, second, issame)


def test_embedding_errors_name_the_problem():
    first, second = np.ones((4, 3)), np.ones((4, 3))
    second[2] = 0
    with pytest.raises(ValueError, match=r"embeddings2\[2\] has norm 0"):
        verification_accuracy(first, second, [True, False, True, False], folds=2)
    with pytest.raises(ValueError, match="do not describe the same pairs"):
        verification_accuracy(first, np.ones((5, 3)), [True] * 4, folds=2)
    with pytest.raises(ValueError, match="folds=10"):
        verification_accuracy(first, first, [True, False, True, False])


# Scores with a tie group at 0.8 holding one positive and two negatives.
SCORES = np.array([0.9, 0.8, 0.8, 0.8, 0.5, 0.3])
LABELS = np.array([True, True, False, False, True, False])


def test_roc_treats_equal_scores_as_one_operating_point():
    roc = roc_curve(SCORES, LABELS)
    np.testing.assert_allclose(roc.far, [0, 0, 2 / 3, 2 / 3, 1])
    np.testing.assert_allclose(roc.tar, [0, 1 / 3, 2 / 3, 1, 1])
    np.testing.assert_array_equal(roc.thresholds, [np.inf, 0.9, 0.8, 0.5, 0.3])


def test_tar_at_far_with_repeated_scores():
    roc = roc_curve(SCORES, LABELS)
    # FAR 0.5 cannot take part of the 0.8 group: the best point under it is (0, 1/3).
    np.testing.assert_allclose(tar_at_far(roc, [0.0, 0.5, 2 / 3, 1.0]), [1 / 3, 1 / 3, 1.0, 1.0])
    everything_tied = roc_curve(np.full(6, 0.7), LABELS)
    np.testing.assert_array_equal(tar_at_far(everything_tied, [0.1, 0.99, 1.0]), [0.0, 0.0, 1.0])


def test_equal_error_rate_auc_and_best_accuracy_by_hand():
    roc = roc_curve(SCORES, LABELS)
    # On the segment (0, 1/3) -> (2/3, 2/3), FAR = 1 - TAR at FAR = 4/9.
    assert equal_error_rate(roc) == pytest.approx(4 / 9)
    # Mann-Whitney: 0.9 beats 3 negatives; 0.8 beats 1 and ties 2; 0.5 beats 1 -> 6/9.
    assert roc_auc(roc) == pytest.approx(6 / 9)
    accuracy, threshold = best_accuracy(roc)
    assert (accuracy, threshold) == (pytest.approx(4 / 6), 0.9)  # 0.5 also gets 4 of 6; 0.9 comes first


def test_auc_and_best_accuracy_match_brute_force_with_ties():
    rng = np.random.default_rng(2)
    labels = rng.random(300) < 0.4
    scores = rng.integers(0, 6, 300) + labels * rng.integers(0, 3, 300)  # integers: many ties
    roc = roc_curve(scores, labels)
    positives, negatives = scores[labels][:, None], scores[~labels][None, :]
    mann_whitney = np.mean((positives > negatives) + 0.5 * (positives == negatives))
    assert roc_auc(roc) == pytest.approx(mann_whitney)
    brute_best = max(np.mean((scores >= t) == labels) for t in [*np.unique(scores), np.inf])
    assert best_accuracy(roc)[0] == pytest.approx(brute_best)


def test_pair_metrics_reports_unmeasurable_tar_as_none():
    issame = np.array([True, False] * 20)  # 20 negative pairs: FAR resolution 1/20
    distances = np.where(issame, 0.4, 1.6)
    distances[1] = 0.2  # one negative closer than every positive
    metrics = pair_metrics(*pairs_with_distances(distances), issame)
    assert metrics["num_pairs"] == 40 and metrics["num_negative"] == 20
    assert metrics["tar_at_far"] == {"1e-06": None, "1e-05": None, "1e-04": None, "1e-03": None, "1e-02": None, "1e-01": 1.0}
    assert metrics["best_accuracy"] == pytest.approx(39 / 40)
    assert metrics["eer"] == pytest.approx(0.05)  # on the segment (1/20, 0) -> (1/20, 1)
    with pytest.raises(ValueError, match="both kinds of pairs"):
        roc_curve(np.ones(3), np.ones(3, dtype=bool))
