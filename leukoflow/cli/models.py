"""CLI: ``train``, ``calibrate``, ``evaluate``, ``export`` (model lifecycle).

Heavy imports (torch, onnx, sklearn) happen inside the command bodies.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer


def _parse_kwargs(items: list[str] | None) -> dict:
    """``["width=0.25", "hidden=256"]`` -> ``{"width": 0.25, "hidden": 256}`` (JSON values)."""
    out = {}
    for it in items or []:
        if "=" not in it:
            raise typer.BadParameter(f"expected KEY=VALUE, got {it!r}")
        k, v = it.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


def _summary(card_or_report: dict) -> str:
    m = card_or_report.get("metrics", card_or_report)
    cal = m["calibration"]
    lines = [f"accuracy {100 * cal['after_T']['accuracy']['value']:.2f} % "
             f"(95 % CI {100 * cal['after_T']['accuracy']['ci95'][0]:.2f}-"
             f"{100 * cal['after_T']['accuracy']['ci95'][1]:.2f}), n = {m['n_test']}",
             f"T = {m['temperature']:.4f}; ECE before {100 * cal['before_T']['ece']['value']:.2f} %"
             f" -> after {100 * cal['after_T']['ece']['value']:.2f} %; NLL "
             f"{cal['before_T']['nll']['value']:.4f} -> {cal['after_T']['nll']['value']:.4f}"]
    rec = m["classification"]["per_class_recall"]
    lines.append("recall: " + ", ".join(f"{k} {100 * v['value']:.1f} %" for k, v in rec.items()))
    ood = m.get("ood", {}).get("detectors", {})
    for name, d in ood.items():
        per = {k: v for k, v in d["per_kind"].items() if isinstance(v, dict) and "auroc" in v}
        if per:
            lines.append(f"OOD {name}: " + ", ".join(f"{k} AUROC {v['auroc']:.3f}"
                                                     for k, v in per.items()))
    return "\n".join(lines)


def train(
    data: Annotated[str, typer.Option("--data", help="Dataset: .rtdc, .npz (PBC layout or "
                                      "x/y) or sim[:N[:K]] (N cells per class, K per OOD kind).")],
    out: Annotated[Path, typer.Option("--out", help="Artifact folder to write.")],
    arch: Annotated[str, typer.Option("--arch", help="lenet5, alexnet or lenet5_vi.")
                    ] = "lenet5",
    arch_kwarg: Annotated[list[str] | None, typer.Option(
        "--arch-kwarg", metavar="KEY=VALUE", help="Architecture keyword (repeatable), "
        "e.g. width=0.25.")] = None,
    seed: Annotated[int, typer.Option(help="Training seed (weights, order, augmentation).")
                    ] = 0,
    data_seed: Annotated[int, typer.Option(help="Seed of the split / simulator.")] = 0,
    epochs: Annotated[int, typer.Option(help="Maximum epochs.")] = 30,
    batch_size: Annotated[int, typer.Option(help="Batch size (cells).")] = 128,
    lr: Annotated[float, typer.Option(help="Peak AdamW learning rate.")] = 2e-3,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = 1e-4,
    patience: Annotated[int, typer.Option(help="Early stopping patience (epochs).")] = 6,
    balance: Annotated[str, typer.Option(help="weights, sampler or none.")] = "weights",
    noise_rad: Annotated[float, typer.Option(help="Augmentation noise std (rad).")] = 0.02,
    max_shift: Annotated[int, typer.Option(help="Augmentation max shift (px).")] = 3,
    ood: Annotated[str, typer.Option(help="OOD detector stored in the card.")] = "knn",
    descriptors: Annotated[str, typer.Option(
        help="Physical phase descriptors for OOD: auto (on for phase crops in rad with a "
             "pixel size), on or off.")] = "auto",
    knn_bank: Annotated[int, typer.Option(help="KNN feature bank size (cells).")] = 1000,
    alpha: Annotated[float, typer.Option(help="ID fraction allowed above OOD threshold.")
                     ] = 0.05,
    confidence_threshold: Annotated[float, typer.Option(help="Uncertain below this p.")
                                    ] = 0.8,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    threads: Annotated[int, typer.Option(help="torch CPU threads.")] = 1,
    n_boot: Annotated[int, typer.Option(help="Bootstrap resamples for intervals.")] = 1000,
    no_weights: Annotated[bool, typer.Option("--no-weights",
                                             help="Write the card only.")] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bar.")
                           ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the card as JSON.")
                       ] = False,
) -> None:
    """Train a model, calibrate it, fit OOD detectors and write an artifact folder."""
    import sys

    from leukoflow.models.data import Augment
    from leukoflow.models.ood import DETECTORS
    from leukoflow.models.pipeline import build_artifact
    from leukoflow.models.train import TrainConfig

    if balance not in ("weights", "sampler", "none"):
        raise typer.BadParameter("balance must be weights, sampler or none")
    if descriptors not in ("auto", "on", "off"):
        raise typer.BadParameter("descriptors must be auto, on or off")
    if ood not in DETECTORS:
        raise typer.BadParameter(f"unknown OOD detector {ood!r}: {DETECTORS.names()}")
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                      patience=patience, seed=seed, balance=balance, device=device,
                      threads=threads,
                      augment=Augment(max_shift_px=max_shift, noise_rad=noise_rad).to_dict())
    try:
        card = build_artifact(
            data, out, arch, _parse_kwargs(arch_kwarg), cfg, ood_detector=ood,
            alpha=alpha, confidence_threshold=confidence_threshold,
            data_seed=data_seed, n_boot=n_boot, progress=not no_progress,
            command="leukoflow " + " ".join(sys.argv[1:]), ship_weights=not no_weights,
            detector_params={"knn": {"bank_size": knn_bank}},
            descriptors={"auto": None, "on": True, "off": False}[descriptors])
    except (FileNotFoundError, ValueError) as exc:
        typer.echo(f"train: {exc}", err=True)
        raise typer.Exit(2) from exc
    if as_json:
        typer.echo(json.dumps(card, indent=2))
    else:
        typer.echo(f"wrote {out}\n" + _summary(card))


def calibrate(
    model: Annotated[str, typer.Option("--model", help="Artifact folder or shipped name.")],
    data: Annotated[str, typer.Option("--data", help="Dataset the model was trained on "
                                      "(its validation split is used).")],
    out: Annotated[Path | None, typer.Option("--out", help="Write the recalibrated "
                                             "artifact here (default: in place).")] = None,
    data_seed: Annotated[int, typer.Option(help="Seed of the split / simulator.")] = 0,
    ood: Annotated[str | None, typer.Option(help="OOD detector (default: the card's).")
                   ] = None,
    alpha: Annotated[float, typer.Option(help="ID fraction allowed above OOD threshold.")
                     ] = 0.05,
    png: Annotated[Path | None, typer.Option(help="Reliability diagram PNG "
                                             "(default: <artifact>/reliability_val.png).")
                   ] = None,
    n_boot: Annotated[int, typer.Option(help="Bootstrap resamples.")] = 1000,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")
                       ] = False,
) -> None:
    """Refit the temperature (validation NLL) and the OOD threshold; report before/after."""
    from leukoflow.models.artifact import ArtifactError, load_artifact
    from leukoflow.models.recalibrate import recalibrate

    try:
        art = load_artifact(model)
        rep = recalibrate(art, data, out=out, data_seed=data_seed, detector=ood,
                          alpha=alpha, png=png, n_boot=n_boot)
    except (ArtifactError, FileNotFoundError, ValueError) as exc:
        typer.echo(f"calibrate: {exc}", err=True)
        raise typer.Exit(2) from exc
    if as_json:
        typer.echo(json.dumps(rep, indent=2))
    else:
        b, a = rep["before"], rep["after"]
        typer.echo(f"T {rep['temperature_old']:.4f} -> {rep['temperature']:.4f} "
                   f"(validation n = {rep['n_val']})")
        for k in ("ece", "adaptive_ece", "mce", "nll", "brier", "accuracy"):
            typer.echo(f"  {k:13s} {b[k]['value']:.4f} [{b[k]['ci95'][0]:.4f}, "
                       f"{b[k]['ci95'][1]:.4f}] -> {a[k]['value']:.4f} "
                       f"[{a[k]['ci95'][0]:.4f}, {a[k]['ci95'][1]:.4f}]")
        typer.echo(f"OOD {rep['ood']['detector']} threshold {rep['ood']['threshold']:.4g}; "
                   f"wrote {rep['artifact']} and {rep['png']}")


def evaluate(
    dataset: Annotated[str, typer.Argument(help="Labeled .rtdc / .npz (PBC layout: test "
                                           "split + x_ood) or 'sim[:n]'.")],
    model: Annotated[str, typer.Option("--model", help="Artifact folder or shipped name.")
                     ] = "lenet5-sim",
    n_boot: Annotated[int, typer.Option(help="Bootstrap resamples.")] = 1000,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Accuracy, per-class recall, confusion matrix, calibration and OOD AUROC."""
    from leukoflow.models.artifact import ArtifactError, load_artifact
    from leukoflow.models.evaluate import evaluate_artifact

    try:
        rep = evaluate_artifact(load_artifact(model), dataset, n_boot=n_boot)
    except (ArtifactError, FileNotFoundError, ValueError) as exc:
        typer.echo(f"evaluate: {exc}", err=True)
        raise typer.Exit(2) from exc
    if as_json:
        typer.echo(json.dumps(rep, indent=2))
    else:
        typer.echo(_summary(rep))
        typer.echo("confusion (rows true, cols predicted): "
                   f"{rep['classification']['confusion_matrix']}")


def export(
    out: Annotated[Path | None, typer.Option("--out", help="Output .onnx file.")] = None,
    triton: Annotated[Path | None, typer.Option(
        "--triton", help="Write a Triton Inference Server model repository entry into this "
        "folder (ONNX, config.pbtxt for CPU/GPU/python/TensorRT, the card beside it); "
        "dynamic batching follows the workers' [infer] max_batch and max_delay_ms.")] = None,
    triton_max_batch: Annotated[int, typer.Option(
        help="Triton max_batch_size (0 = 2 x the workers' max_batch).")] = 0,
    instances: Annotated[int, typer.Option(help="Triton model instances (CPU; per GPU).")
                         ] = 1,
    model: Annotated[str, typer.Option("--model", help="Artifact folder or shipped name.")
                     ] = "lenet5-sim",
    opset: Annotated[int, typer.Option(help="ONNX opset.")] = 18,
    verify: Annotated[bool, typer.Option(help="Compare with PyTorch in ONNX Runtime.")
                      ] = True,
    tensorrt: Annotated[bool, typer.Option("--tensorrt", help="Also build a TensorRT "
                                           "engine (needs tensorrt + CUDA).")] = False,
    precision: Annotated[str, typer.Option(help="TensorRT precision: fp16 or fp32.")
                         ] = "fp16",
    max_batch: Annotated[int, typer.Option(help="TensorRT profile max batch.")] = 2048,
    opt_batch: Annotated[int, typer.Option(help="TensorRT profile optimum batch.")] = 256,
    engine_dir: Annotated[Path | None, typer.Option(help="TensorRT engine cache folder.")
                          ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Export to ONNX (dynamic batch), verify with ONNX Runtime, optionally TensorRT; or
    (--triton REPO) a Triton model repository entry."""
    from leukoflow.models.artifact import ArtifactError, load_artifact
    from leukoflow.models.export import ExportError, export_artifact

    if triton is not None:
        _export_triton(triton, model, triton_max_batch, instances, tensorrt, precision,
                       as_json)
        return
    if out is None:
        typer.echo("export: give --out FILE.onnx or --triton REPO", err=True)
        raise typer.Exit(2)
    try:
        art = load_artifact(model)
        res = export_artifact(art, out, opset=opset, verify=verify)
    except (ArtifactError, ExportError, ValueError) as exc:
        typer.echo(f"export: {exc}", err=True)
        raise typer.Exit(2) from exc
    if tensorrt:
        from leukoflow.models.tensorrt_build import TensorRTError, build_engine

        try:
            b = build_engine(out, art.sha256, art.input_size, precision=precision,
                             profile=(1, opt_batch, max_batch),
                             cache_dir=engine_dir or out.parent / "engines")
        except TensorRTError as exc:
            typer.echo(f"export: {exc}", err=True)
            raise typer.Exit(3) from exc
        res["tensorrt"] = b.to_dict()
    if as_json:
        typer.echo(json.dumps(res, indent=2))
    else:
        typer.echo(f"wrote {res['onnx']}")
        if "verify" in res:
            v = res["verify"]
            typer.echo(f"ONNX Runtime vs PyTorch on {v['n']} crops: max |logit diff| "
                       f"{v['max_abs_logit_diff']:.2e} at batch sizes "
                       f"{list(v['per_batch_size'])}")
        if "tensorrt" in res:
            typer.echo(f"TensorRT engine {res['tensorrt']['engine']} "
                       f"({res['tensorrt']['precision']})")


def _export_triton(repo: Path, model: str, triton_max_batch: int, instances: int,
                   tensorrt: bool, precision: str, as_json: bool) -> None:
    """``export --triton REPO`` (see :mod:`leukoflow.inference.triton_repo`)."""
    from leukoflow.core.config import resolve
    from leukoflow.inference.triton_repo import (
        TritonExportConfig,
        TritonExportError,
        export_triton,
    )
    from leukoflow.inference.worker import SECTION, InferConfig
    from leukoflow.models.artifact import ArtifactError, load_artifact

    try:
        infer = resolve(SECTION, InferConfig)
        cfg = TritonExportConfig(max_batch=infer.max_batch, max_delay_ms=infer.max_delay_ms,
                                 triton_max_batch=triton_max_batch, cpu_instances=instances,
                                 gpu_instances=instances, threads=infer.threads,
                                 tensorrt="on" if tensorrt else "auto", precision=precision)
        res = export_triton(load_artifact(model), repo, cfg)
    except (ArtifactError, TritonExportError, ValueError, OSError) as exc:
        typer.echo(f"export: {exc}", err=True)
        raise typer.Exit(2) from exc
    if as_json:
        typer.echo(json.dumps(res, indent=2))
        return
    typer.echo(f"wrote {repo / res['model']} ({', '.join(res['configs'].values())}); "
               f"TensorRT plan: {'built' if res['tensorrt'].get('built') else 'no'}")
    typer.echo(f"  serve: tritonserver --model-repository={repo} [--model-config-name="
               "gpu|python|tensorrt]")
    typer.echo(f"  workers: leukoflow infer --backend triton --model {repo / res['model']}/"
               "artifact (LEUKOFLOW_TRITON_URL=host:8001)")


def register(app: typer.Typer) -> None:
    """Add ``train``, ``calibrate``, ``evaluate``, ``export`` to ``app``."""
    app.command("train")(train)
    app.command("calibrate")(calibrate)
    app.command("evaluate")(evaluate)
    app.command("export")(export)
