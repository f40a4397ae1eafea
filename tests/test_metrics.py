"""The statistics behind every agreement figure: cluster bootstrap intervals, paired differences, confident inputs."""

from __future__ import annotations

import numpy as np
import pytest

from lowbit.metrics import (
    Agreement,
    agreement,
    agreement_summary,
    bootstrap_interval,
    confident_mask,
    describe_agreement_summary,
    logit_gap,
    paired_difference,
)


def _photos_all_or_nothing() -> tuple[np.ndarray, np.ndarray]:
    """10 photos of 20 crops each; the model agrees on every crop of 7 photos and on no crop of the other 3."""
    groups = np.repeat(np.arange(10), 20)
    values = np.repeat(np.arange(10) < 7, 20)
    return values, groups


def test_cluster_bootstrap_is_wider_than_iid_when_crops_of_a_photo_agree_together() -> None:
    values, groups = _photos_all_or_nothing()
    iid = bootstrap_interval(values)
    cluster = bootstrap_interval(values, groups)
    # 200 independent crops at 70%: a half-width near 1.96 sqrt(0.21 / 200) = 6.4 points. 10 independent photos:
    # near 1.96 sqrt(0.21 / 10) = 28 points.
    assert iid.high - iid.low == pytest.approx(2 * 0.064, rel=0.2)
    assert cluster.high - cluster.low == pytest.approx(2 * 0.28, rel=0.25)
    assert cluster.high - cluster.low > 3 * (iid.high - iid.low)


def test_iid_interval_matches_the_normal_approximation() -> None:
    values = np.arange(400) < 340  # 85% of 400
    low, high, resamples = bootstrap_interval(values)
    assert resamples == 2000
    half_width = 1.96 * np.sqrt(0.85 * 0.15 / 400)
    assert (high - low) / 2 == pytest.approx(half_width, rel=0.15)
    assert low < 0.85 < high


def test_cluster_bootstrap_covers_the_true_agreement_where_the_iid_one_does_not() -> None:
    # Photos differ in difficulty (each photo's agreement rate drawn from Beta(4, 1), mean 0.8): crops of one photo
    # are correlated. Over 200 simulated evaluations of 20 photos x 10 crops, the photo bootstrap's interval holds
    # 0.8 about 95% of the time; the crop bootstrap's, far less often.
    rng = np.random.default_rng(123)
    groups = np.repeat(np.arange(20), 10)
    covered = {"photos": 0, "crops": 0}
    for rep in range(200):
        rate = rng.beta(4, 1, size=20)
        values = (rng.random((20, 10)) < rate[:, None]).ravel()
        for key, g in (("photos", groups), ("crops", None)):
            low, high, _ = bootstrap_interval(values, g, resamples=500, seed=rep)
            covered[key] += low <= 0.8 <= high
    assert covered["photos"] / 200 >= 0.88
    assert covered["crops"] / 200 <= covered["photos"] / 200 - 0.1


@pytest.mark.parametrize("seed", range(5))
def test_interval_contains_the_point_estimate(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 300))
    values = rng.random(n) < rng.uniform(0.3, 0.99)
    groups = rng.integers(0, max(2, n // 8), size=n)
    for g in (groups, None):
        low, high, _ = bootstrap_interval(values, g, seed=seed)
        assert low <= values.mean() <= high


def test_bootstrap_is_deterministic_under_its_seed() -> None:
    values, groups = _photos_all_or_nothing()
    values = values ^ (np.arange(200) % 7 == 0)  # some variation inside photos too
    assert bootstrap_interval(values, groups, seed=3) == bootstrap_interval(values, groups, seed=3)
    intervals = {bootstrap_interval(values, groups, seed=s, resamples=200)[:2] for s in range(5)}
    assert len(intervals) > 1


def test_vectorized_mean_equals_the_general_statistic_path() -> None:
    # The fast path (group sums) and the general one (a statistic per resample) draw the same resamples.
    values, groups = _photos_all_or_nothing()
    values = values ^ (np.arange(200) % 5 == 0)
    fast = bootstrap_interval(values, groups, resamples=300)
    general = bootstrap_interval(values, groups, lambda v: float(np.mean(v)), resamples=300)
    assert fast.low == pytest.approx(general.low) and fast.high == pytest.approx(general.high)


def test_groups_must_match_the_samples() -> None:
    with pytest.raises(ValueError, match="one id per sample"):
        bootstrap_interval(np.ones(5), np.arange(4))
    with pytest.raises(ValueError, match="empty"):
        bootstrap_interval(np.ones(0))


def test_paired_difference_of_identical_models_is_exactly_zero() -> None:
    values, groups = _photos_all_or_nothing()
    diff, (low, high, resamples) = paired_difference(values, values, groups)
    assert (diff, low, high, resamples) == (0.0, 0.0, 0.0, 2000)


def test_paired_difference_is_narrower_than_the_separate_intervals() -> None:
    # Model b shares a's hard photos and loses 2 more crops of photo 0: the difference is small and certain,
    # while each model's own interval is wide.
    a, groups = _photos_all_or_nothing()
    b = a.copy()
    b[:2] = False
    diff, interval = paired_difference(a, b, groups)
    assert diff == pytest.approx(0.01)
    assert 0 <= interval.low <= diff <= interval.high <= 0.04  # photo 0 drawn up to 4 times
    alone = bootstrap_interval(a, groups)
    assert interval.high - interval.low < (alone.high - alone.low) / 5


def test_paired_difference_of_a_general_statistic() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 100))
    diff, interval = paired_difference(a, b, statistic=np.median, resamples=200)
    assert diff == pytest.approx(np.median(a) - np.median(b))
    assert interval.low <= diff <= interval.high
    with pytest.raises(ValueError, match="equal shapes"):
        paired_difference(a, b[:50])


def test_confident_mask_uses_the_top1_top2_gap() -> None:
    logits = np.array([[3.0, 1.0, 0.0],   # gap 2: confident
                       [1.0, 0.5, 0.9],   # gap 0.1
                       [0.0, 2.0, 1.0],   # gap exactly 1.0: not above it
                       [5.0, 5.0, 0.0]])  # tie
    np.testing.assert_allclose(logit_gap(logits), [2.0, 0.1, 1.0, 0.0])
    assert confident_mask(logits).tolist() == [True, False, False, False]
    assert confident_mask(logits, gap=0.05).tolist() == [True, True, True, False]


def test_agreement_counts_photos_and_describes_itself() -> None:
    reference = np.eye(4)[[0, 1, 2, 3, 0, 1]] * 3.0  # gaps of 3: all confident
    other = reference.copy()
    other[5] = np.eye(4)[2]  # one disagreement
    photos = np.array([7, 7, 7, 8, 8, 9])
    a = agreement(reference, other, photos)
    assert (a.agree, a.samples, a.photos) == (5, 6, 3)
    assert a.low is not None and a.high is not None and a.low <= 5 / 6 <= a.high == 1.0
    assert a.describe().endswith("(5/6 crops of 3 photos)")
    assert a.describe().startswith("83.3% [")
    assert agreement(reference, other).counts() == "samples, grouping unknown"
    assert agreement(reference, other, np.arange(6)).counts() == "photos, one crop each"
    assert Agreement.from_json(a.to_json()) == a

    masked = agreement(reference, other, photos, np.array([True, False, False, True, True, False]))
    assert (masked.agree, masked.samples, masked.photos) == (3, 3, 2)
    empty = agreement(reference, other, photos, np.zeros(6, bool))
    assert empty.value is None and empty.describe() == "n/a (no crops)"


def test_agreement_summary_keeps_confident_inputs_apart() -> None:
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(120, 10)) * 1.5
    other = reference + rng.normal(size=reference.shape) * 0.4
    photos = np.repeat(np.arange(12), 10)
    summary = agreement_summary(reference, other, photos)
    confident = confident_mask(reference)
    assert summary["confident"]["samples"] == int(confident.sum()) > 0
    agrees = reference.argmax(1) == other.argmax(1)
    assert summary["confident"]["agree"] == int(agrees[confident].sum())
    assert summary["top1"]["agree"] == int(agrees.sum()) and summary["top1"]["photos"] == 12
    # Near ties flip; confident inputs hardly do.
    assert summary["confident"]["agreement"] > summary["top1"]["agreement"]
    assert summary["bootstrap"]["resampled"] == "photos"
    text = describe_agreement_summary(summary)
    assert "crops of 12 photos); confident inputs (gap > 1.0): " in text
    assert agreement_summary(reference, other)["bootstrap"]["resampled"] == "samples"
