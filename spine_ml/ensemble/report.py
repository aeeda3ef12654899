"""What the ensemble prints, and the MLflow run that records it.

The ensemble run (tag `spine_ml.run_kind=ensemble`) holds the member run ids and weights as params,
the cross-validated metric (`score` and its parts, the figure to compare with trials), the in-sample
figure (`insample_*`), the equal-weight blend, and artifacts: ensemble.json (what `predict` needs to
rebuild the blend), oof.csv (cross-validated ensemble OOF), frontier.csv, weights.png, submission.csv.
"""
from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from spine_ml.competition import vocabulary as V
from spine_ml.ensemble.budget import Candidate
from spine_ml.ensemble.select import Member
from spine_ml.tracking.store import RUN_KIND_TAG as KIND_TAG

if TYPE_CHECKING:
    from spine_ml.config import Config


@dataclass
class EnsembleSummary:
    """Everything the ensemble decided, for printing and logging."""
    members: list[Member]
    member_parts: list[dict[str, float]]  # each member's OOF metric on the truth
    equal_parts: dict[str, float]  # equal-weight blend of all members, in-sample (nothing fitted)
    chosen: Candidate
    all_fitted: Candidate | None  # every member fitted (before the budget chose)
    front: list[Candidate]
    budget_hours: float
    studies: int
    cv_folds: int
    method: str
    test_parts: dict[str, dict[str, float]] = field(default_factory=dict)  # name -> metric on test labels

    @property
    def best_member_score(self) -> float:
        return min(p["score"] for p in self.member_parts)


def ensemble_json(summary: EnsembleSummary) -> dict:
    chosen = summary.chosen
    return {
        "members": [{"run_id": m.run_id, "name": m.name, "backbone": m.backbone, "folds": m.folds,
                     "weight": float(chosen.blend.weights[i]), "oof_score": summary.member_parts[i]["score"],
                     "seconds_per_study": m.seconds_per_study}
                    for i, m in enumerate(summary.members) if chosen.blend.weights[i] > 0],
        "temperatures": dict(zip(V.CONDITIONS, map(float, chosen.blend.temperatures))),
        "fitted": chosen.fitted,
        "cv_score": chosen.cv_parts, "insample_score": chosen.insample_score,
        "inference_hours": chosen.hours, "studies": summary.studies, "budget_hours": summary.budget_hours,
        "cv_folds": summary.cv_folds, "method": summary.method,
    }


def frontier_frame(summary: EnsembleSummary) -> pd.DataFrame:
    return pd.DataFrame([{"members": c.label(summary.members), "hours": round(c.hours, 4),
                          "cv_score": round(c.cv_score, 6), "fits_budget": c.hours <= summary.budget_hours,
                          "chosen": c is summary.chosen} for c in summary.front])


def plot_weights(summary: EnsembleSummary, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    weights = summary.chosen.blend.weights
    labels = [f"{m.short_id}\n{m.backbone}\n{p['score']:.3f}" for m, p in zip(summary.members, summary.member_parts)]
    figure, axis = plt.subplots(figsize=(max(4.0, 1.2 * len(weights)), 3.5))
    axis.bar(range(len(weights)), weights, color="tab:blue")
    axis.set_xticks(range(len(weights)), labels, fontsize=7)
    axis.set_ylabel("blend weight")
    axis.set_ylim(0, 1)
    axis.set_title(f"ensemble: CV score {summary.chosen.cv_score:.4f} "
                   f"(best member {summary.best_member_score:.4f})", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def log_ensemble_run(config: Config, summary: EnsembleSummary, oof: pd.DataFrame,
                     submission: Path | None = None) -> str:
    """Record the ensemble as its own MLflow run; returns the run id. `oof`: the ensemble's
    cross-validated OOF predictions (submission layout)."""
    from mlflow.entities import Metric, Param, RunStatus

    from spine_ml.tracking.store import client, ensure_experiment

    mlflow_client = client(config)
    chosen = summary.chosen
    kept = [m.run_id for i, m in enumerate(summary.members) if chosen.blend.weights[i] > 0]
    run = mlflow_client.create_run(ensure_experiment(config), run_name=f"ensemble-{len(kept)}",
                                   tags={KIND_TAG: "ensemble", "spine_ml.members": ",".join(kept)})
    run_id = run.info.run_id
    try:
        params = {"members": ",".join(kept), "candidates": ",".join(m.run_id for m in summary.members),
                  "method": summary.method, "cv_folds": summary.cv_folds, "budget_hours": summary.budget_hours,
                  "studies": summary.studies, "fitted": chosen.fitted,
                  **{f"weight.{m.run_id}": f"{chosen.blend.weights[i]:.6f}" for i, m in enumerate(summary.members)},
                  **{f"temperature.{c}": f"{t:.4f}" for c, t in zip(V.CONDITIONS, chosen.blend.temperatures)}}
        now = int(time.time() * 1000)
        values = {**chosen.cv_parts, **{f"cv_{k}": v for k, v in chosen.cv_parts.items()},
                  "insample_score": chosen.insample_score, "equal_blend_score": summary.equal_parts["score"],
                  "best_member_score": summary.best_member_score, "inference_hours": chosen.hours,
                  **{f"test_{name}_{k}": v for name, parts in summary.test_parts.items() for k, v in parts.items()}}
        mlflow_client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()][:100],
                                metrics=[Metric(k, float(v), now, 0) for k, v in values.items() if np.isfinite(v)])
        with tempfile.TemporaryDirectory() as folder:
            folder = Path(folder)
            (folder / "ensemble.json").write_text(json.dumps(ensemble_json(summary), indent=2))
            oof.to_csv(folder / "oof.csv", index=False, float_format="%.8g")
            frontier_frame(summary).to_csv(folder / "frontier.csv", index=False)
            plot_weights(summary, folder / "weights.png")
            for name in ("ensemble.json", "oof.csv", "frontier.csv", "weights.png"):
                mlflow_client.log_artifact(run_id, str(folder / name))
        if submission is not None:
            mlflow_client.log_artifact(run_id, str(submission))
    except BaseException:
        mlflow_client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
        raise
    mlflow_client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))
    return run_id


def _row(label: str, parts: dict[str, float], extra: str = "") -> str:
    cells = " ".join(f"{parts[k]:>8.4f}" for k in V.METRIC_PARTS)
    return f"  {label:<34} {cells}  {extra}"


def format_summary(summary: EnsembleSummary) -> str:
    header = "  " + " " * 34 + " " + " ".join(f"{k[:8]:>8}" for k in V.METRIC_PARTS)
    lines = ["OOF metric (lower is better):", header]
    for member, parts in zip(summary.members, summary.member_parts):
        hours = member.hours(summary.studies)
        cost = f"{hours:.2f} h" if hours is not None else "cost ?"
        lines.append(_row(f"{member.short_id} {member.backbone[:16]}", parts, f"member, {cost}"))
    lines.append(_row("equal-weight blend", summary.equal_parts, "in-sample (nothing fitted)"))
    if summary.all_fitted is not None:
        fitted = summary.all_fitted
        lines.append(f"  {'fitted blend, all members':<34} {fitted.insample_score:>8.4f}  in-sample")
        lines.append(_row("fitted blend, all members", fitted.cv_parts, f"{summary.cv_folds}-fold nested CV"))
    chosen = summary.chosen
    how = f"{summary.cv_folds}-fold nested CV" if chosen.fitted else "nothing fitted"
    lines.append(_row("CHOSEN", chosen.cv_parts, f"{how}, {chosen.hours:.2f} h <= {summary.budget_hours:g} h: "
                      f"{chosen.label(summary.members)}"))
    lines.append("")
    lines.append(f"score vs inference cost ({summary.studies} studies, budget {summary.budget_hours:g} h):")
    for candidate in summary.front:
        mark = "*" if candidate is chosen else " " if candidate.hours <= summary.budget_hours else "x"
        lines.append(f"  {mark} {candidate.hours:>8.2f} h  CV {candidate.cv_score:.4f}  {candidate.label(summary.members)}")
    weights = ", ".join(f"{m.short_id}={chosen.blend.weights[i]:.3f}" for i, m in enumerate(summary.members)
                        if chosen.blend.weights[i] > 0)
    temps = ", ".join(f"{V.condition_group(c)}{'-' + V.CONDITION_INFO[c].side if V.CONDITION_INFO[c].side else ''}"
                      f"={t:.2f}" for c, t in zip(V.CONDITIONS, chosen.blend.temperatures))
    lines.append(f"weights: {weights}")
    lines.append(f"temperatures: {temps}")
    for name, parts in summary.test_parts.items():
        lines.append(_row(f"test: {name}", parts, "vs test labels"))
    return "\n".join(lines)
