#!/usr/bin/env python
"""Benchmarks of the synthetic data set: generation speed, and whether its images carry the labels.

    .venv/bin/python bench/bench_synth.py speed [--studies 100] [--workers 0]
    .venv/bin/python bench/bench_synth.py scores [--studies 400]          # oracle / prior, labels only
    .venv/bin/python bench/bench_synth.py learn [--studies 90] [--train 60] [--epochs 20] [--data DIR]

`learn` is the quality check the demo depends on: a resnet10t trained from scratch on CPU on 2.5D
crops (3 slices around the labelled instance, 48 mm at 1 mm/px centred on the labelled point) of
``--train`` studies must close most of the gap between the best constant prior and the oracle on
the held-out studies. Its crop code is deliberately independent of spine_ml.prepare: it checks the
data, not the pipeline. Results are printed and written to bench/results/synth_*.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from spine_ml.competition import metric  # noqa: E402
from spine_ml.competition import vocabulary as V  # noqa: E402
from spine_ml.competition.tables import read_coordinates, read_train_labels  # noqa: E402

RESULTS = ROOT / "bench" / "results"
PATCH_MM, PIXEL_MM, SLICES, CROP_PX = 48.0, 1.0, 3, 40


def _save(name: str, payload: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"synth_{name}.json").write_text(json.dumps(payload, indent=2))
    print(json.dumps(payload, indent=2))


def bench_speed(args: argparse.Namespace) -> None:
    from spine_ml.synth.generate import generate_dataset

    import resource

    def cpu_seconds() -> float:  # this process and its finished workers
        return sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                     resource.getrusage(resource.RUSAGE_CHILDREN)))

    out = Path(tempfile.mkdtemp(prefix="synth_speed_"))
    try:
        cpu, load_before = cpu_seconds(), os.getloadavg()[0]
        summary = generate_dataset(out / "data", args.studies, 0, args.seed, args.image_size, args.workers)
        cpu = cpu_seconds() - cpu
        _save("speed", {"studies": args.studies, "image_size": args.image_size, "workers": args.workers or "all cores",
                        "cores": os.cpu_count(), "files": summary.files, "seconds": round(summary.seconds, 1),
                        "cpu_seconds": round(cpu, 1), "cpu_seconds_per_study": round(cpu / args.studies, 3),
                        "load_average_before_after": [round(load_before, 1), round(os.getloadavg()[0], 1)]})
    finally:
        shutil.rmtree(out, ignore_errors=True)


def bench_scores(args: argparse.Namespace) -> None:
    """Oracle and prior on ``--studies`` studies from the label model alone (no images)."""
    from spine_ml.synth import labels
    from spine_ml.synth.scoring import best_constant_prior
    from spine_ml.synth.study import StudyResult
    from spine_ml.synth.writer import write_labels, write_oracle

    results = []
    for index in range(args.studies):
        rng = np.random.default_rng(np.random.SeedSequence([args.seed, 0, index]).spawn(1)[0])
        truth = labels.draw_truth(rng, labels.draw_axial_first_level(rng))
        results.append(StudyResult("train", 10_000 + index, truth.labels, truth.probabilities))
    with tempfile.TemporaryDirectory() as folder:
        write_labels(Path(folder) / "train.csv", results)
        write_oracle(Path(folder) / "oracle.csv", results)
        truth = read_train_labels(Path(folder) / "train.csv")
        oracle = metric.score(truth, pd.read_csv(Path(folder) / "oracle.csv"))
        prior = metric.score(truth, best_constant_prior(truth))
    _save("scores", {"studies": args.studies, "oracle": oracle.as_dict(), "prior": prior.as_dict()})


# --- learnability ------------------------------------------------------------------------------
def _series_geometry(folder: Path) -> dict[int, dict]:
    """instance number -> pixels, IPP, IOP, spacing; plus the stack order along the normal."""
    import pydicom

    slices = {}
    for path in folder.glob("*.dcm"):
        ds = pydicom.dcmread(path)
        iop = np.array(ds.ImageOrientationPatient, dtype=np.float64)
        slices[int(ds.InstanceNumber)] = {
            "pixels": ds.pixel_array.astype(np.float32), "ipp": np.array(ds.ImagePositionPatient, dtype=np.float64),
            "x": iop[:3], "y": iop[3:], "spacing": np.array(ds.PixelSpacing, dtype=np.float64)}
    return slices


def _neighbours(slices: dict[int, dict], instance: int) -> list[int]:
    """The labelled instance and its neighbours along the slice normal, within its own stack."""
    ref = slices[instance]
    normal = np.cross(ref["x"], ref["y"])
    same_stack = [k for k, s in slices.items() if np.allclose(s["x"], ref["x"]) and np.allclose(s["y"], ref["y"])]
    ordered = sorted(same_stack, key=lambda k: slices[k]["ipp"] @ normal)
    i = ordered.index(instance)
    return [ordered[int(np.clip(i + d, 0, len(ordered) - 1))] for d in range(-(SLICES // 2), SLICES // 2 + 1)]


def _crop(slice_: dict, point: np.ndarray) -> np.ndarray:
    """PATCH_MM square at PIXEL_MM around a patient point, in the slice's own row/column axes."""
    from scipy.ndimage import map_coordinates

    offset = point - slice_["ipp"]
    col = offset @ slice_["x"] / slice_["spacing"][1]
    row = offset @ slice_["y"] / slice_["spacing"][0]
    half = PATCH_MM / 2
    grid = np.arange(-half + PIXEL_MM / 2, half, PIXEL_MM)
    rows = row + grid[:, None] / slice_["spacing"][0]
    cols = col + grid[None, :] / slice_["spacing"][1]
    pixels = slice_["pixels"]
    low, high = np.percentile(pixels, [1, 99.5])
    patch = map_coordinates(pixels, np.broadcast_arrays(rows, cols), order=1, mode="nearest")
    return (patch - low) / max(high - low, 1.0)


def extract_crops(root: Path) -> tuple[np.ndarray, pd.DataFrame]:
    coordinates = read_coordinates(root / "train_label_coordinates.csv")
    crops, rows = [], []
    for (study, series), group in coordinates.groupby(["study_id", "series_id"]):
        slices = _series_geometry(root / "train_images" / str(study) / str(series))
        for r in group.itertuples():
            ref = slices[int(r.instance_number)]
            point = ref["ipp"] + r.x * ref["spacing"][1] * ref["x"] + r.y * ref["spacing"][0] * ref["y"]
            crops.append(np.stack([_crop(slices[k], point) for k in _neighbours(slices, int(r.instance_number))]))
            rows.append((V.make_row_id(study, r.condition, r.level), study, V.CONDITIONS.index(r.condition)))
    return np.stack(crops).astype(np.float32), pd.DataFrame(rows, columns=["row_id", "study_id", "condition"])


def _augment(images: np.ndarray, rng: np.random.Generator):
    """Random rotation (+-10 deg), scale (+-10%) and shift (+-3.6 px), then the central CROP_PX,
    intensity scale and a little noise: what keeps 60 studies from being memorised."""
    import torch
    import torch.nn.functional as F

    batch = torch.from_numpy(np.ascontiguousarray(images))
    n = len(batch)
    angle = torch.from_numpy(rng.uniform(-0.17, 0.17, n)).float()
    scale = torch.from_numpy(rng.uniform(0.9, 1.1, n)).float()
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = torch.cos(angle) / scale, -torch.sin(angle) / scale
    theta[:, 1, 0], theta[:, 1, 1] = torch.sin(angle) / scale, torch.cos(angle) / scale
    theta[:, :, 2] = torch.from_numpy(rng.uniform(-0.15, 0.15, (n, 2))).float()
    grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
    batch = F.grid_sample(batch, grid, padding_mode="border", align_corners=False)
    margin = (images.shape[-1] - CROP_PX) // 2
    batch = batch[:, :, margin:margin + CROP_PX, margin:margin + CROP_PX]
    batch = batch * torch.from_numpy(rng.uniform(0.85, 1.15, (n, 1, 1, 1))).float()
    return batch + 0.03 * torch.randn_like(batch)


def _train(x: np.ndarray, condition: np.ndarray, label: np.ndarray, epochs: int, seed: int, evaluate):
    """resnet10t from scratch, one 3-class head per condition, CE weighted 1/2/4 like the metric."""
    import timm
    import torch

    torch.manual_seed(seed)
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    model = timm.create_model("resnet10t", pretrained=False, in_chans=SLICES, num_classes=3 * len(V.CONDITIONS),
                              drop_rate=0.2)
    optimiser = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    steps = epochs * int(np.ceil(len(x) / 64))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=2e-3, total_steps=steps)
    weights = torch.tensor(V.SAMPLE_WEIGHTS, dtype=torch.float32)
    rng = np.random.default_rng(seed)
    started = time.time()
    for epoch in range(epochs):
        model.train()
        order = rng.permutation(len(x))
        total = 0.0
        for start in range(0, len(x), 64):
            batch = order[start:start + 64]
            logits = model(_augment(x[batch], rng)).view(len(batch), -1, 3)
            chosen = logits[torch.arange(len(batch)), torch.from_numpy(condition[batch])]
            loss = torch.nn.functional.cross_entropy(chosen, torch.from_numpy(label[batch]), weight=weights)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            total += loss.item() * len(batch)
        print(f"epoch {epoch + 1}/{epochs}: train loss {total / len(x):.4f}, held-out {evaluate(model)} "
              f"({time.time() - started:.0f} s)", flush=True)
    return model


def _predict(model, x: np.ndarray, condition: np.ndarray) -> np.ndarray:
    import torch

    model.eval()
    margin = (x.shape[-1] - CROP_PX) // 2
    out = []
    with torch.no_grad():
        for start in range(0, len(x), 256):
            images = torch.from_numpy(np.ascontiguousarray(x[start:start + 256, :, margin:margin + CROP_PX, margin:margin + CROP_PX]))
            logits = model(images).view(len(images), -1, 3)
            chosen = logits[torch.arange(len(images)), torch.from_numpy(condition[start:start + 256])]
            out.append(torch.softmax(chosen, -1).numpy())
    return np.concatenate(out)


def bench_learn(args: argparse.Namespace) -> None:
    from spine_ml.synth.generate import generate_dataset

    scratch = None if args.data else Path(tempfile.mkdtemp(prefix="synth_learn_"))
    root = Path(args.data) if args.data else scratch / "data"
    if not (root / "train.csv").exists():
        generate_dataset(root, args.studies, 0, args.seed, args.image_size)
    try:
        _learn(args, root)
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)


def _learn(args: argparse.Namespace, root: Path) -> None:
    from spine_ml.synth.scoring import best_constant_prior, gap_closed

    start = time.time()
    x, rows = extract_crops(root)
    truth = read_train_labels(root / "train.csv")
    studies = np.array(sorted(truth.study_id.unique()))
    train_studies = set(np.random.default_rng(args.seed).permutation(studies)[:args.train].tolist())
    label_of = dict(zip(truth.row_id, truth.label))
    rows["label"] = rows.row_id.map(label_of)
    usable = rows.label >= 0
    fit = (usable & rows.study_id.isin(train_studies)).to_numpy()
    print(f"{len(rows)} crops ({fit.sum()} for training) in {time.time() - start:.0f} s", flush=True)

    held_truth = truth[~truth.study_id.isin(train_studies)].reset_index(drop=True)
    # the ceiling: the best constant prior, in-sample on the held-out labels (as the project defines it)
    constant = best_constant_prior(held_truth)[list(V.PROBABILITY_COLUMNS)].to_numpy()
    # rows without a crop get the training studies' prior, smoothed (a class unseen in 60 studies
    # must not get probability 0)
    fitted = best_constant_prior(truth[truth.study_id.isin(train_studies)])
    fitted_values = 0.98 * fitted[list(V.PROBABILITY_COLUMNS)].to_numpy() + 0.02 / 3
    fallback_by_suffix = dict(zip(fitted.row_id.str.split("_", n=1).str[1], fitted_values))
    held = (~rows.study_id.isin(train_studies)).to_numpy()
    oracle = pd.read_csv(root / "oracle_train.csv").set_index("row_id").loc[held_truth.row_id].to_numpy()
    reweighted = oracle * np.asarray(V.SAMPLE_WEIGHTS)

    def frame(values: np.ndarray) -> pd.DataFrame:
        out = pd.DataFrame(values, columns=list(V.PROBABILITY_COLUMNS))
        out.insert(0, "row_id", held_truth.row_id.to_numpy())
        return out

    def model_probabilities(model) -> np.ndarray:
        predicted = pd.DataFrame(_predict(model, x[held], rows.condition.to_numpy()[held]), index=rows.row_id[held])
        predicted = predicted[~predicted.index.duplicated()]
        values = np.stack([fallback_by_suffix[r.split("_", 1)[1]] for r in held_truth.row_id])
        present = held_truth.row_id.isin(predicted.index).to_numpy()
        values[present] = predicted.loc[held_truth.row_id[present]].to_numpy()
        return values

    floor, ceiling = metric.score(held_truth, frame(oracle)).score, metric.score(held_truth, frame(constant)).score

    def evaluate(model) -> str:
        value = metric.score(held_truth, frame(model_probabilities(model))).score
        return f"{value:.4f} (gap closed {gap_closed(value, floor, ceiling):.3f})"

    model = _train(x[fit], rows.condition.to_numpy()[fit], rows.label.to_numpy()[fit], args.epochs, args.seed, evaluate)
    scores = {name: metric.score(held_truth, frame(values)).as_dict() for name, values in
              (("model", model_probabilities(model)), ("oracle", oracle),
               ("oracle_reweighted", reweighted / reweighted.sum(1, keepdims=True)), ("prior", constant))}
    closed = {part: round(gap_closed(scores["model"][part], scores["oracle"][part], scores["prior"][part]), 3)
              for part in V.METRIC_PARTS}
    _save("learn", {"studies": args.studies, "train_studies": args.train, "epochs": args.epochs,
                    "seconds": round(time.time() - start), "scores": scores, "gap_closed": closed})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    for name, default_studies in (("speed", 100), ("scores", 400), ("learn", 90)):
        p = sub.add_parser(name)
        p.add_argument("--studies", type=int, default=default_studies)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--image-size", type=int, default=160)
        p.add_argument("--workers", type=int, default=0)
        if name == "learn":
            p.add_argument("--train", type=int, default=60)
            p.add_argument("--epochs", type=int, default=20)
            p.add_argument("--data", help="an existing synthetic data set to use instead of generating one")
    args = parser.parse_args()
    {"speed": bench_speed, "scores": bench_scores, "learn": bench_learn}[args.what](args)


if __name__ == "__main__":
    main()
