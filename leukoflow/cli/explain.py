"""CLI: ``leukoflow explain`` (service), ``explain meta``, ``explain finding``, ``audit``.

The service's options are generated from :class:`leukoflow.explain.service.ExplainConfig`
(section ``[explain]``, ``LEUKOFLOW_EXPLAIN_*``). Heavy imports (torch, captum,
scikit-image) happen inside the command bodies only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from leukoflow.cli.options import ConfigOptions

EXPLAIN = ConfigOptions("leukoflow.explain.service:ExplainConfig", "explain")

explain_app = typer.Typer(
    name="explain", cls=EXPLAIN.group_class(), invoke_without_command=True,
    no_args_is_help=False,
    help="Explain flagged cells (the service; options below) and offline research tools.")


def _load_dataset(spec: str, split: str | None, seed: int):
    """``sim[:N]`` (simulated, N per class), ``.rtdc`` or ``.npz`` -> (x, y, truth, meta)."""
    import numpy as np

    if spec.startswith("sim"):
        n = int(spec.split(":", 1)[1]) if ":" in spec else 100
        from leukoflow.acquisition.sim import make_crop_dataset

        d = make_crop_dataset(n, 0, seed)
        keep = np.asarray(d["y"]) >= 0
        feats = {k: np.asarray(v)[keep] for k, v in d["features"].items()}
        return d["x"][keep], d["y"][keep], feats, {"source": f"simulated n_per_class={n} "
                                                             f"seed={seed}"}
    from leukoflow.core.rtdc import read_crop_dataset

    d = read_crop_dataset(spec, split=split)
    keep = np.asarray(d["y"]) >= 0
    feats = {k: np.asarray(v)[keep] for k, v in (d.get("features") or {}).items()}
    meta = {"source": spec, "split": split}
    return d["x"][keep], d["y"][keep], feats, meta


@explain_app.callback(invoke_without_command=True)
def explain(
    ctx: typer.Context,
    print_config: Annotated[bool, typer.Option(
        "--print-config", help="Print the resolved configuration as JSON and exit.")
    ] = False,
) -> None:
    """Run the explainer service: PULL flagged cells, write per-cell artifacts.

    Stops gracefully on SIGTERM, SIGINT or a control ``stop`` message; cells still in
    the backlog are counted as dropped (reason ``shutdown``).
    """
    if ctx.invoked_subcommand is not None:
        return
    import json

    from leukoflow.core.config import as_dict
    from leukoflow.explain.service import ExplainService

    cfg = EXPLAIN.resolve(ctx)
    if print_config:
        typer.echo(json.dumps(as_dict(cfg), indent=2))
        return
    from leukoflow.explain.methods import EXPLAINERS

    for m in cfg.methods:
        if m not in EXPLAINERS:
            typer.echo(f"leukoflow explain: unknown method {m!r}; available: "
                       f"{', '.join(EXPLAINERS.names())}", err=True)
            raise typer.Exit(2)
    svc = ExplainService(cfg)
    stats = svc.run_forever()
    typer.echo(json.dumps(stats))


@explain_app.command("meta")
def meta(
    source: Annotated[str, typer.Argument(
        help="Run folder (with explanations/), dataset (.rtdc/.npz) or sim[:N].")],
    out: Annotated[Path | None, typer.Option(
        "--out", help="Report folder (default SOURCE/meta or ./meta-<name>).")] = None,
    model: Annotated[str, typer.Option(
        "--model", help="Model artifact (dataset mode).")] = "lenet5-sim",
    method: Annotated[str, typer.Option("--method", help="Maps to analyse.")] = "lime",
    split: Annotated[str | None, typer.Option(
        "--split", help="Split of a split .npz (train/val/test).")] = None,
    max_cells: Annotated[int, typer.Option("--max-cells", help="Cells explained.")] = 400,
    lime_samples: Annotated[int, typer.Option(
        "--lime-samples", help="LIME samples per segmentation.")] = 300,
    location_cells: Annotated[int, typer.Option(
        "--location-cells", help="Cells per class for the location summary (0 off).")] = 20,
    tcav: Annotated[bool, typer.Option("--tcav/--no-tcav", help="Run TCAV.")] = True,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print meta.json.")] = False,
) -> None:
    """Meta-explanations: per class/confidence maps, SpRAy clusters, TCAV, location."""
    import json

    from leukoflow.research.meta import MetaConfig, compute_maps, load_run, run_meta

    cfg = MetaConfig(method=method, max_cells=max_cells, lime_samples=lime_samples,
                     location_cells=location_cells, tcav=tcav, seed=seed)
    p = Path(source)
    try:
        if p.is_dir():
            ms = load_run(p, method)
            summary = run_meta(ms, out or p / "meta", cfg, source=source)
        else:
            from leukoflow.explain.model import ModelBundle

            x, y, _feats, info = _load_dataset(source, split, seed)
            bundle = ModelBundle.from_artifact(model)
            sim = source.startswith("sim")
            ms = compute_maps(bundle, x, y, cfg)
            dest = out or Path(f"meta-{Path(source).stem.replace(':', '-')}")
            # simulated source: TCAV with simulator concepts (explain.tcav.tcav_sim)
            summary = run_meta(ms, dest, cfg, bundle=bundle, x=x, y=y, source=str(info),
                               sim_concepts=tcav and sim)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        typer.echo(f"leukoflow explain meta: {exc}", err=True)
        raise typer.Exit(2) from exc
    if as_json:
        typer.echo(json.dumps(summary, indent=1, default=float))
    else:
        typer.echo(f"{summary['n_maps']} maps; SpRAy clusters: "
                   f"{ {k: v['n_clusters'] for k, v in summary['spray'].items()} }")
        for k, v in summary.get("relevance_location", {}).items():
            typer.echo(f"{k}: interior enrichment {v['interior_enrichment_mean']:.2f} "
                       f"± {v['interior_enrichment_std']:.2f} (n={v['n_cells']})")
        if "tcav" in summary and "results" in summary["tcav"]:
            from leukoflow.research.tcav import tcav_report_lines

            for line in tcav_report_lines(summary["tcav"]):
                typer.echo(line)


@explain_app.command("finding")
def finding(
    model: Annotated[str, typer.Option(
        "--model", help="Model artifact name or folder.")] = "lenet5-sim",
    n_per_class: Annotated[int, typer.Option(
        "--n-per-class", help="Simulated test cells per class.")] = 300,
    seed: Annotated[int, typer.Option(
        "--seed", help="Simulation seed of the test cells (training used 0; the "
        "shipped test split 1000).")] = 1000,
    attribution_cells: Annotated[int, typer.Option(
        "--attribution-cells", help="Cells per class explained (0 = no maps).")] = 60,
    methods: Annotated[str, typer.Option(
        "--methods", help="Attribution methods (comma-separated).")
    ] = "lime,guided_backprop,integrated_gradients",
    lime_samples: Annotated[int, typer.Option(
        "--lime-samples", help="LIME samples per segmentation.")] = 300,
    rim_um: Annotated[float, typer.Option("--rim-um", help="Rim half-width [µm].")] = 1.0,
    size_factor: Annotated[float, typer.Option(
        "--size-factor", help="Size ablation factor of the larger class.")] = 0.85,
    n_boot: Annotated[int, typer.Option("--n-boot", help="Bootstrap resamples.")] = 2000,
    tcav: Annotated[bool, typer.Option("--tcav/--no-tcav", help="Run TCAV.")] = True,
    tcav_concept: Annotated[int, typer.Option(
        "--tcav-concept", help="Crops per TCAV concept and random set.")] = 100,
    tcav_random: Annotated[int, typer.Option(
        "--tcav-random", help="Random concepts (>= 10).")] = 10,
    tcav_seeds: Annotated[int, typer.Option(
        "--tcav-seeds", help="Repeat TCAV with this many seeds (stability table).")] = 1,
    tcav_layers: Annotated[str, typer.Option(
        "--tcav-layers", help="Layers (comma-separated, first = primary; default: the "
        "conv trunk output and the first hidden fc ReLU).")] = "",
    out: Annotated[Path, typer.Option(
        "--out", help="Folder for finding.json and finding.md.")] = Path("finding-sim"),
    as_json: Annotated[bool, typer.Option("--json", help="Print finding.json.")] = False,
) -> None:
    """Seed-paper finding on simulated cells: ablations, contrastive maps, TCAV.

    Monocyte vs eosinophil should be decided by the interior, neutrophil vs lymphocyte
    by size; see explain/finding.py and docs/finding-sim.md.
    """
    import json

    import numpy as np

    from leukoflow.acquisition.sim import make_crop_dataset
    from leukoflow.explain.model import ModelBundle
    from leukoflow.models.artifact import ArtifactError
    from leukoflow.research.finding import FindingConfig, finding_markdown, run_finding

    try:
        bundle = ModelBundle.from_artifact(model)
        d = make_crop_dataset(n_per_class, 0, seed)
        keep = np.asarray(d["y"]) >= 0
        cfg = FindingConfig(pixel_um=float(d["meta"]["pixel_um"]), rim_um=rim_um,
                            size_factor=size_factor, attribution_cells=attribution_cells,
                            lime_samples=lime_samples, n_boot=n_boot)
        meths = tuple(m for m in methods.split(",") if m)
        res = run_finding(bundle, d["x"][keep], d["y"][keep], cfg, meths,
                          source=f"simulated n_per_class={n_per_class} seed={seed}",
                          progress=lambda s: typer.echo(f"[finding] {s}", err=True))
        md = finding_markdown(res)
        if tcav:
            from leukoflow.research.tcav import tcav_markdown, tcav_sim

            typer.echo("[finding] tcav", err=True)
            layers = [ly for ly in tcav_layers.split(",") if ly]
            runs = [tcav_sim(bundle, n_concept=tcav_concept, n_inputs=tcav_concept,
                             n_random=tcav_random, layer=layers or None, seed=s)
                    for s in range(max(1, tcav_seeds))]
            res["tcav"] = runs[0]
            md += "\n\n" + "\n\n".join(tcav_markdown(runs[0], ly)
                                         for ly in runs[0]["layers"])
            if len(runs) > 1:
                from leukoflow.research.tcav import tcav_stability_markdown

                res["tcav_runs"] = runs[1:]
                md += "\n\n" + "\n\n".join(tcav_stability_markdown(runs, ly)
                                             for ly in runs[0]["layers"])
    except (ValueError, FileNotFoundError, KeyError, ArtifactError) as exc:
        typer.echo(f"leukoflow explain finding: {exc}", err=True)
        raise typer.Exit(2) from exc
    out.mkdir(parents=True, exist_ok=True)
    (out / "finding.json").write_text(json.dumps(res, indent=1, default=float))
    (out / "finding.md").write_text(md + "\n")
    typer.echo(json.dumps(res, indent=1, default=float) if as_json else md)


def audit(
    dataset: Annotated[str, typer.Argument(
        help="Labeled dataset: .rtdc, .npz (split layout: see --split) or sim[:N].")],
    out: Annotated[Path, typer.Option("--out", help="Report folder.")] = Path("audit"),
    split: Annotated[str | None, typer.Option(
        "--split", help="Split of a split .npz (train/val/test) (default train).")] = None,
    folds: Annotated[int, typer.Option("--folds", help="k of the k-fold.")] = 5,
    epochs: Annotated[int, typer.Option("--epochs", help="Max epochs per fold.")] = 25,
    top: Annotated[int, typer.Option("--top", help="Suspects listed.")] = 24,
    explain_top: Annotated[int, typer.Option(
        "--explain-top", help="Suspects explained (LIME, Guided Backprop).")] = 12,
    flip: Annotated[float, typer.Option(
        "--flip", help="Flip this fraction of labels first (validation of the audit).")
    ] = 0.0,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    threads: Annotated[int, typer.Option("--threads")] = 1,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda or auto.")] = "cpu",
    as_json: Annotated[bool, typer.Option("--json", help="Print audit.json.")] = False,
) -> None:
    """Audit a labeled dataset for mislabeled samples and outliers (HTML + PNG report)."""
    import json

    import numpy as np

    from leukoflow.core.vocabulary import CLASS_NAMES
    from leukoflow.research.audit import AuditConfig, flip_labels, run_audit

    try:
        x, y, _f, info = _load_dataset(dataset, split, seed)
        truth = None
        if flip > 0:
            y, truth = flip_labels(y, flip, len(CLASS_NAMES), np.random.default_rng(seed))
        cfg = AuditConfig(folds=folds, epochs=epochs, top=top, explain_top=explain_top,
                          seed=seed, threads=threads, device=device)
        name = f"{dataset}" + (f" [{split}]" if split else "")
        summary = run_audit(x, y, out, cfg, CLASS_NAMES, name, truth)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        typer.echo(f"leukoflow audit: {exc}", err=True)
        raise typer.Exit(2) from exc
    _ = info
    if as_json:
        typer.echo(json.dumps(summary, indent=1))
        return
    typer.echo(f"out-of-fold accuracy {summary['oof_accuracy']:.3f}; report: "
               f"{out / 'report.html'}")
    if "flipped" in summary:
        typer.echo(f"precision among top-{summary['flipped']['n']}: "
                   f"{summary['flipped']['precision_at_k']:.3f}")
    for r in summary["suspects"][:10]:
        typer.echo(f"#{r['rank']:>2} index {r['index']:>5} label {r['label']:<10} "
                   f"model {r['predicted']:<10} 1-p={r['disagreement']:.3f} "
                   f"ood={r['ood_score']:.2f}")


def register(app: typer.Typer) -> None:
    """Add the ``explain`` group and ``audit`` to ``app``."""
    app.add_typer(explain_app, name="explain")
    app.command("audit")(audit)
