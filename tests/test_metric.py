"""The metric: hand-computed cases, a property test against an obviously-correct reference, the
real train.csv reference figures, and the `spine-ml score` CLI contract."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spine_ml.cli import main
from spine_ml.competition import vocabulary as V
from spine_ml.competition.metric import SubmissionError, score
from spine_ml.competition.tables import labels_to_wide, read_train_labels

from conftest import REAL_LABELS


def truth_frame(labels: dict[int, list[int]]) -> pd.DataFrame:
    """study_id -> 25 labels (-1 blank) in competition order -> long form."""
    rows = []
    for study, values in labels.items():
        for (condition, level), label in zip([(c, lv) for c in V.CONDITIONS for lv in V.LEVELS], values):
            rows.append((V.make_row_id(study, condition, level), study, condition, level, label))
    frame = pd.DataFrame(rows, columns=["row_id", "study_id", "condition", "level", "label"])
    frame["sample_weight"] = np.where(frame.label >= 0, np.take(V.SAMPLE_WEIGHTS, frame.label.clip(0)), 0.0)
    return frame


def submission_frame(truth: pd.DataFrame, probs) -> pd.DataFrame:
    probs = np.broadcast_to(np.asarray(probs, dtype=float), (len(truth), 3))
    return pd.DataFrame({"row_id": truth.row_id, "normal_mild": probs[:, 0], "moderate": probs[:, 1], "severe": probs[:, 2]})


def test_all_normal_uniform_prediction_by_hand():
    truth = truth_frame({1: [0] * 25})
    result = score(truth, submission_frame(truth, [1 / 3] * 3))
    ln3 = math.log(3)
    assert result.spinal == pytest.approx(ln3, abs=1e-12)
    assert result.foraminal == pytest.approx(ln3, abs=1e-12)
    assert result.subarticular == pytest.approx(ln3, abs=1e-12)
    # one study, not severe, weight 1, p(severe) = 1/3 -> -log(2/3)
    assert result.any_severe_spinal == pytest.approx(-math.log(2 / 3), abs=1e-12)
    assert result.score == pytest.approx((3 * ln3 - math.log(2 / 3)) / 4, abs=1e-12)


def test_weights_and_any_severe_by_hand():
    # spinal: L1/L2 severe (w4), L2/L3 moderate (w2), rest normal (w1); others normal
    labels = [2, 1, 0, 0, 0] + [0] * 20
    truth = truth_frame({5: labels})
    probs = np.tile([0.7, 0.2, 0.1], (25, 1))
    probs[0] = [0.2, 0.3, 0.5]
    result = score(truth, submission_frame(truth, probs))
    spinal = (4 * -math.log(0.5) + 2 * -math.log(0.2) + 3 * -math.log(0.7)) / (4 + 2 + 3)
    assert result.spinal == pytest.approx(spinal, abs=1e-12)
    assert result.foraminal == pytest.approx(-math.log(0.7), abs=1e-12)
    # study positive, weight = max spinal weight = 4, p = max severe over spinal rows = 0.5
    assert result.any_severe_spinal == pytest.approx(-math.log(0.5), abs=1e-12)


def test_blank_truth_rows_are_not_scored_and_two_studies_by_hand():
    a = [0] * 25
    b = [1] * 25
    b[15] = -1  # blank subarticular left L1/L2
    truth = truth_frame({10: a, 11: b})
    probs = np.tile([0.5, 0.4, 0.1], (50, 1))
    result = score(truth, submission_frame(truth, probs))
    # subarticular: 10 normal rows (w1, p .5) + 9 moderate rows (w2, p .4)
    expected = (10 * -math.log(0.5) + 9 * 2 * -math.log(0.4)) / (10 + 18)
    assert result.subarticular == pytest.approx(expected, abs=1e-12)
    # any_severe: both negative; weights 1 (all normal) and 2 (all moderate); p = 0.1
    assert result.any_severe_spinal == pytest.approx(-math.log(0.9), abs=1e-12)


def reference_score(truth: pd.DataFrame, sub: pd.DataFrame) -> float:
    """Deliberately plain re-statement of the spec, loop by loop."""
    eps = np.finfo(float).eps
    p = {r: np.array(v, dtype=float) for r, *v in sub[["row_id", "normal_mild", "moderate", "severe"]].itertuples(index=False)}
    p = {r: v / v.sum() for r, v in p.items()}
    losses = []
    for group in ("spinal", "foraminal", "subarticular"):
        num = den = 0.0
        for row in truth.itertuples():
            if row.label < 0 or group not in row.row_id:
                continue
            w = [1, 2, 4][row.label]
            num += -w * math.log(min(max(p[row.row_id][row.label], eps), 1 - eps))
            den += w
        losses.append(num / den)
    num = den = 0.0
    for study in truth.study_id.unique():
        rows = [r for r in truth.itertuples() if r.study_id == study and "spinal" in r.row_id and r.label >= 0]
        if not rows:
            continue
        y = any(r.label == 2 for r in rows)
        w = max([1, 2, 4][r.label] for r in rows)
        q = min(max(max(p[r.row_id][2] for r in rows), eps), 1 - eps)
        num += -w * (math.log(q) if y else math.log(1 - q))
        den += w
    losses.append(num / den)
    return sum(losses) / 4


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 4))
def test_agrees_with_reference_on_random_inputs(seed, studies):
    rng = np.random.default_rng(seed)
    labels = {1000 + i: list(rng.choice([-1, 0, 1, 2], size=25, p=[0.05, 0.6, 0.25, 0.1])) for i in range(studies)}
    for values in labels.values():
        values[0] = 0  # at least one scored row per group
        values[5] = 0
        values[15] = 0
    truth = truth_frame(labels)
    probs = rng.dirichlet([0.5, 0.5, 0.5], size=len(truth))
    probs[rng.random(len(truth)) < 0.05, 2] = 0.0  # exercise the clipping
    probs /= probs.sum(1, keepdims=True)
    sub = submission_frame(truth, probs).sample(frac=1.0, random_state=seed % 1000)  # order must not matter
    assert score(truth, sub).score == pytest.approx(reference_score(truth, sub), abs=1e-9)


def test_no_positive_any_severe_study_still_scores():
    truth = truth_frame({1: [0] * 25, 2: [1] * 25})
    result = score(truth, submission_frame(truth, [0.6, 0.3, 0.1]))
    assert np.isfinite(result.any_severe_spinal) and np.isfinite(result.score)


def test_missing_rows_are_named():
    truth = truth_frame({1: [0] * 25})
    sub = submission_frame(truth, [0.6, 0.3, 0.1]).iloc[2:]
    with pytest.raises(SubmissionError, match="2 row.*missing.*1_spinal_canal_stenosis_l1_l2"):
        score(truth, sub)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -0.1])
def test_non_finite_or_negative_values_are_named(bad):
    truth = truth_frame({1: [0] * 25})
    sub = submission_frame(truth, [0.6, 0.3, 0.1])
    sub.loc[3, "moderate"] = bad
    with pytest.raises(SubmissionError, match="1_spinal_canal_stenosis_l4_l5"):
        score(truth, sub)


def test_unnormalised_rows_are_normalised_with_a_warning():
    truth = truth_frame({1: [0] * 25})
    with pytest.warns(UserWarning, match="25 row.*normalised"):
        doubled = score(truth, submission_frame(truth, [1.2, 0.6, 0.2]))
    assert doubled.score == pytest.approx(score(truth, submission_frame(truth, [0.6, 0.3, 0.1])).score, abs=1e-12)


def test_extra_submission_rows_are_ignored():
    truth = truth_frame({1: [0] * 25})
    extra = submission_frame(truth_frame({2: [0] * 25}), [0.0, 0.0, 1.0])
    both = pd.concat([submission_frame(truth, [0.6, 0.3, 0.1]), extra])
    assert score(truth, both).score == pytest.approx(score(truth, submission_frame(truth, [0.6, 0.3, 0.1])).score)


@pytest.fixture(scope="module")
def real_truth():
    path = REAL_LABELS / "train.csv"
    if not path.is_file():
        pytest.skip("../shared/data/rsna2024/train.csv not present")
    return read_train_labels(path)


def test_real_labels_best_constant_prior_scores_0_790(real_truth):
    scored = real_truth[real_truth.label >= 0]
    freq = scored.groupby(["condition", "level"]).label.value_counts(normalize=True).unstack(fill_value=0)
    prior = freq.to_numpy() * np.array(V.SAMPLE_WEIGHTS)
    prior /= prior.sum(1, keepdims=True)
    table = pd.DataFrame(prior, index=freq.index, columns=list(V.PROBABILITY_COLUMNS))
    sub = real_truth[["row_id", "condition", "level"]].join(table, on=["condition", "level"])
    assert score(real_truth, sub).score == pytest.approx(0.790, abs=1e-3)
    assert score(real_truth, submission_frame(real_truth, [1 / 3] * 3)).score == pytest.approx(0.999, abs=1e-3)


def test_score_cli_both_truth_layouts_agree(tmp_path, capsys, real_truth):
    truth = real_truth[real_truth.study_id.isin(real_truth.study_id.unique()[:40])]
    wide = labels_to_wide(truth)
    wide.to_csv(tmp_path / "train.csv", index=False)
    rng = np.random.default_rng(0)
    probs = rng.dirichlet([1, 1, 1], size=len(truth))
    submission_frame(truth, probs).to_csv(tmp_path / "sub.csv", index=False)
    scored = truth[truth.label >= 0]
    solution = pd.DataFrame(np.eye(3)[scored.label], columns=list(V.PROBABILITY_COLUMNS))
    solution.insert(0, "row_id", scored.row_id.to_numpy())
    solution["sample_weight"] = scored.sample_weight.to_numpy()
    solution.to_csv(tmp_path / "solution.csv", index=False)

    assert main(["score", "--truth", str(tmp_path / "train.csv"), "--submission", str(tmp_path / "sub.csv"), "--json"]) == 0
    from_train = json.loads(capsys.readouterr().out)
    assert set(from_train) == {"score", "spinal", "foraminal", "subarticular", "any_severe_spinal"}
    assert from_train["score"] == pytest.approx(reference_score(truth, submission_frame(truth, probs)), abs=1e-9)
    assert main(["score", "--truth", str(tmp_path / "solution.csv"), "--submission", str(tmp_path / "sub.csv")]) == 0
    lines = dict(line.split() for line in capsys.readouterr().out.strip().splitlines())
    assert list(lines) == ["score", "spinal", "foraminal", "subarticular", "any_severe_spinal"]
    assert float(lines["score"]) == pytest.approx(from_train["score"], abs=1e-6)


def test_score_cli_reports_missing_rows_without_traceback(tmp_path, capsys):
    truth = truth_frame({7: [0] * 25})
    labels_to_wide(truth).to_csv(tmp_path / "train.csv", index=False)
    submission_frame(truth, [0.6, 0.3, 0.1]).iloc[:20].to_csv(tmp_path / "sub.csv", index=False)
    assert main(["score", "--truth", str(tmp_path / "train.csv"), "--submission", str(tmp_path / "sub.csv")]) == 2
    err = capsys.readouterr().err
    assert "5 row(s) of the truth are missing" in err and "7_right_subarticular_stenosis_l1_l2" in err
    assert "Traceback" not in err
