"""Test-time speed: studies/s of `predict` for one model x 5 folds, and a projection for the hidden
test set (~700 studies at real image sizes).

    .venv/bin/python bench/bench_predict.py                       # demo settings, this machine
    .venv/bin/python bench/bench_predict.py --real-config sweeps/base.yaml --image-size 512

What is timed (weights are random: speed does not depend on them):
1. read + localise + crop: synthetic test studies generated at --image-size (DICOM decode, the
   localizer on every sagittal slice and the axial slices, prepare's crop_sample for 25 rows);
2. classify: 25 crops x 5 fold models of the config's backbone / crop / input size.
The projection multiplies the per-study costs measured at --image-size with the classifier cost of
--real-config's model (default sweeps/base.yaml) by --studies. On a CPU-only machine it is a CPU
estimate and says so; on CUDA the classifier runs with bf16 autocast as predict does.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PROJECT = Path(__file__).resolve().parents[1]


def make_data(folder: Path, studies: int, image_size: int, name: str) -> Path:
    from spine_ml.synth.generate import generate_dataset

    out = folder / f"data-{name}-{image_size}"  # the demo and real sets may share a size
    generate_dataset(out, studies=2, test_studies=studies, seed=11, image_size=image_size, workers=1)
    return out


def fold_checkpoints(config, folder: Path, folds: int) -> list[Path]:
    import torch

    from spine_ml.models.classifier import build_classifier

    bare = config.model.model_copy(update={"pretrained": False, "checkpoint": None})
    paths = []
    for fold in range(folds):
        torch.manual_seed(fold)
        path = folder / f"fold{fold}.pt"
        torch.save(build_classifier(bare, config.prepare.slices).state_dict(), path)
        paths.append(path)
    return paths


def time_localise(config, data: Path, studies: list[int]) -> tuple[float, object]:
    from spine_ml.localize.infer import Localizer
    from spine_ml.models.localizer import build_localizer
    from spine_ml.predict.crops import localise_and_cut

    localizer = Localizer(build_localizer(config.localizer), config.localizer, tuple(config.prepare.percentiles))
    started = time.perf_counter()
    crops = localise_and_cut(localizer, data, studies, config.prepare)
    return (time.perf_counter() - started) / len(studies), crops


def time_classify(config, checkpoints: list[Path], crops) -> float:
    """Seconds per study for all fold models on the study's 25 crops (fake crops of the config's size)."""
    from spine_ml.predict.pipeline import fold_probabilities

    studies = crops.rows.study_id.nunique()
    size = config.prepare.patch_px
    patches = np.random.default_rng(0).random((25 * studies, config.prepare.slices, size, size)).astype(np.float16)
    conditions = np.tile(np.repeat(np.arange(5), 5), studies)
    fold_probabilities(config, checkpoints[:1], patches[:8], conditions[:8])  # warm-up
    started = time.perf_counter()
    fold_probabilities(config, checkpoints, patches, conditions)
    return (time.perf_counter() - started) / studies


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(PROJECT / "sweeps" / "demo.yaml"))
    parser.add_argument("--real-config", default=str(PROJECT / "sweeps" / "base.yaml"))
    parser.add_argument("--image-size", type=int, default=160, help="synthetic Rows/Columns for the timing")
    parser.add_argument("--real-image-size", type=int, default=512, help="image size for the projection")
    parser.add_argument("--test-studies", type=int, default=4)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--studies", type=int, default=700, help="hidden test studies to project for")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    os.environ.setdefault("SPINE_ML_QUIET", "1")
    import torch

    from spine_ml.config import load_config

    torch.set_num_threads(args.threads)
    demo, real = load_config(args.config), load_config(args.real_config)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    report = {"device": device, "threads": args.threads, "folds": args.folds}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        demo_data = make_data(scratch, args.test_studies, args.image_size, "demo")
        studies = sorted({int(p.name) for p in (demo_data / "test_images").iterdir()})
        demo = demo.with_updates({"predict.crops_dir": str(scratch / "crops")})
        localise, crops = time_localise(demo, demo_data, studies)
        classify = time_classify(demo, fold_checkpoints(demo, scratch, args.folds), crops)
        report["demo"] = {"image_size": args.image_size, "backbone": demo.model.backbone,
                          "localise_crop_s_per_study": round(localise, 3), "classify_s_per_study": round(classify, 3),
                          "studies_per_s": round(1 / (localise + classify), 3)}
        real_data = make_data(scratch, 2, args.real_image_size, "real")
        real_studies = sorted({int(p.name) for p in (real_data / "test_images").iterdir()})
        real = real.with_updates({"model.pretrained": False, "predict.crops_dir": str(scratch / "crops-real"),
                                  "localizer.input_px": 256})
        real_localise, real_crops = time_localise(real, real_data, real_studies)
        (scratch / "real").mkdir()
        real_classify = time_classify(real, fold_checkpoints(real, scratch / "real", args.folds), real_crops)
        per_study = real_localise + real_classify
        report["projection"] = {
            "basis": f"{'CPU' if device == 'cpu' else device} estimate, {args.threads} threads",
            "image_size": args.real_image_size, "backbone": real.model.backbone,
            "input_px": real.model.input_px, "localizer_input_px": 256,
            "localise_crop_s_per_study": round(real_localise, 3), "classify_s_per_study": round(real_classify, 3),
            "studies": args.studies, "hours": round(args.studies * per_study / 3600, 2)}
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
