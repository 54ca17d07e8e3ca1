"""``nirvana-quality``: measure what approximate hits cost in image quality, and calibrate thresholds.

For the embedded model (default: the ONNX files of ``--repository``):
  1. no-cache adherence on held-out shapes captions (and a grid PNG of them);
  2. prompt pairs over similarity bands (wording only, one attribute, several),
     each target generated with no cache and resumed from its partner's state at
     every K, through the server's step loop;
  3. per K x band: adherence drop (95% CI), FID-style distance, PSNR/SSIM, in a
     markdown table, JSON and a plot;
  4. thresholds by the rule of :func:`nirvana_quality.harness.calibrate`; with
     ``--write-thresholds`` they go into the repository's pipeline.json files and
     the calibration file the export reads (``export/weights/calibration.json``).

For a Stable Diffusion folder (``--checkpoint``): the same pairs (from ``--prompts``,
a JSON Lines log, or the shapes captions) with PSNR/SSIM, and CLIP score with ``--clip``.

Examples:
    nirvana-quality                                    # embedded model, report in perf/results/quality
    nirvana-quality --write-thresholds                 # ... and recalibrate
    nirvana-quality --checkpoint ./sd15 --prompts log.jsonl --clip ./clip-vit-b32 --steps 30
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import time
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from nirvana_quality import harness

RESULTS = Path("perf/results/quality")


def save_grid(path: Path, images: np.ndarray, titles: Sequence[str], columns: int = 6, width: int = 28) -> None:
    """A captioned image grid (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = (len(images) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 2.0, rows * 2.5), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, title in zip(axes.flat, images, titles):
        ax.imshow(image, interpolation="nearest")
        ax.set_title("\n".join(textwrap.wrap(title, width)[:4]), fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_plot(path: Path, rows: Sequence[dict], gate: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for k in sorted({r["k"] for r in rows}):
        cells = sorted((r for r in rows if r["k"] == k and r["adherence_drop"] is not None), key=lambda r: r["band_low"])
        if cells:
            ax.errorbar([r["band_low"] for r in cells], [100 * r["adherence_drop"] for r in cells],
                        yerr=[100 * (r["adherence_drop_ci"] or 0.0) for r in cells], marker="o", capsize=2, label=f"K={k}")
    ax.axhline(100 * gate, color="grey", linestyle="--", linewidth=1, label="gate")
    ax.set_xlabel("prompt similarity (band lower edge)")
    ax.set_ylabel("adherence drop vs no cache (points)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_thresholds(repository: Path, thresholds: List[List[float]]) -> List[Path]:
    """Put ``thresholds`` into every pipeline.json of an exported repository."""
    import dataclasses

    from nirvana.config import PIPELINE_FILE, PipelineSpec

    written = []
    for path in sorted(repository.glob(f"*/1/{PIPELINE_FILE}")):
        spec = PipelineSpec.load(path.parent)
        written.append(dataclasses.replace(spec, thresholds=thresholds).save(path.parent))
    return written


def load_prompts(path: Path) -> List[str]:
    """The prompts of a JSON Lines log (``nirvana-simulate``'s reader)."""
    from nirvana_perf.simulate import load_log

    return [str(row["prompt"]).strip() for row in load_log(path)]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="nirvana-quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=Path("model_repository"),
                        help="exported model repository to measure (default: %(default)s)")
    parser.add_argument("--checkpoint", type=Path, help="a diffusers Stable Diffusion folder instead")
    parser.add_argument("--prompts", type=Path, help="JSON Lines prompt log to pair prompts from (default: shapes captions)")
    parser.add_argument("--clip", type=Path, help="local CLIP weights (transformers CLIPModel folder) for CLIP score")
    parser.add_argument("--scorer", type=Path, help="attribute scorer weights (default: the committed ones)")
    parser.add_argument("--per-band", type=int, default=30, help="prompt pairs per similarity band (default: %(default)s)")
    parser.add_argument("--candidates", type=int, default=2400,
                        help="shapes caption pairs drawn before stratifying into bands (default: %(default)s)")
    parser.add_argument("--ks", default=",".join(str(k) for k in harness.K_GRID),
                        help="resumed steps K at 50 steps (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps N (default: %(default)s)")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance (default: %(default)s)")
    parser.add_argument("--baseline", type=int, default=500,
                        help="held-out captions for the no-cache adherence (default: %(default)s; 0: skip)")
    parser.add_argument("--gate", type=float, default=harness.DEFAULT_GATE,
                        help="largest mean adherence drop a threshold may allow (default: %(default)s = 1 point)")
    parser.add_argument("--floor", type=float, default=harness.UNRELATED_FLOOR,
                        help="lowest similarity a threshold may have (default: %(default)s, unrelated MiniLM prompt pairs)")
    parser.add_argument("--table", type=Path,
                        help="recalibrate from an earlier run's quality.json or calibration.json (no generation)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32, help="images per step-loop batch")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime/torch threads (0: one per core)")
    parser.add_argument("--output", type=Path, default=RESULTS, help="report folder (default: %(default)s)")
    parser.add_argument("--write-thresholds", action="store_true",
                        help="write the calibrated thresholds into the repository's pipeline.json files and --calibration")
    parser.add_argument("--calibration", type=Path, help="calibration file the export reads "
                        "(default: export/weights/calibration.json)")
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (OSError, ValueError) as exc:
        print(f"nirvana-quality: error: {exc}", file=sys.stderr)
        return 1


def recalibrate(args) -> int:
    """Apply the rule to an earlier run's table (e.g. with another --gate)."""
    from nirvana_export import embedded

    data = json.loads(args.table.read_text())
    rows = data["rows"]
    thresholds = harness.calibrate(rows, args.gate, floor=args.floor)
    print(f"thresholds (gate {args.gate * 100:g} points, floor {args.floor}): {json.dumps(thresholds)}")
    if args.write_thresholds:
        write_calibration(args.calibration or embedded.WEIGHTS_DIR / embedded.CALIBRATION, data.get("model_id", ""),
                          args.gate, args.floor, thresholds, rows)
        written = write_thresholds(args.repository, thresholds)
        print(f"written to {len(written)} pipeline.json files of {args.repository}")
    return 0


def write_calibration(path: Path, model_id: str, gate: float, floor: float, thresholds, rows) -> None:
    path.write_text(json.dumps({"model_id": model_id, "gate": gate, "floor": floor,
                                "rule": harness.CALIBRATION_RULE, "thresholds": thresholds, "rows": rows},
                               indent=1) + "\n")


def run(args) -> int:
    import torch

    if args.table:
        return recalibrate(args)

    from nirvana_export import embedded
    from nirvana_quality.generators import RepositoryGenerator
    from nirvana_quality.scorer import load_scorer

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    ks = [int(k) for k in args.ks.split(",") if k.strip()]
    args.output.mkdir(parents=True, exist_ok=True)
    if args.checkpoint:
        from nirvana_quality.checkpoint import CheckpointGenerator

        generator = CheckpointGenerator(args.checkpoint)
        scorer = None
    else:
        generator = RepositoryGenerator(args.repository, threads=args.threads)
        scorer = load_scorer(args.scorer or embedded.WEIGHTS_DIR / embedded.SCORER_WEIGHTS)
    clip = None
    if args.clip:
        from nirvana_quality.metrics import ClipScorer

        clip = ClipScorer(args.clip)
    if args.write_thresholds and (args.checkpoint or args.prompts):
        raise ValueError("--write-thresholds calibrates on shapes captions with the scorer: "
                         "drop --checkpoint/--prompts")

    report = {"model_id": generator.model_id, "steps": args.steps, "guidance_scale": args.guidance,
              "gate": args.gate, "ks": ks, "seed": args.seed}
    lines = [f"# Quality of approximate hits: {generator.model_id}", ""]
    if scorer is not None and not args.prompts and args.baseline:
        adherence, images, examples = harness.baseline_adherence(generator, scorer, args.baseline, args.seed,
                                                                 args.steps, args.guidance, args.batch_size)
        mean, half = harness.metrics.mean_confidence_interval(adherence)
        per_attr = harness.per_attribute(scorer, images, examples)
        save_grid(args.output / "no_cache_grid.png", images[:36], [e.caption for e in examples[:36]])
        report["baseline"] = {"captions": len(examples), "adherence": mean, "ci": half, "per_attribute": per_attr}
        lines += [f"## Without the cache: {len(examples)} held-out captions", "",
                  f"Mean prompt adherence **{mean:.3f}** ± {half:.3f} (95% CI); grid: `no_cache_grid.png`.", "",
                  "| attribute | shown when named |", "|---|---|"]
        lines += [f"| {name} | {value:.3f} |" for name, value in per_attr.items()] + [""]

    if args.prompts:
        pairs = harness.log_pairs(generator, load_prompts(args.prompts), args.per_band, args.seed)
    else:
        pairs = harness.shapes_pairs(generator, args.seed, args.per_band, args.candidates)
    if not pairs:
        raise ValueError("no prompt pairs fell into the similarity bands")
    run_ = harness.measure(generator, pairs, ks, args.steps, args.guidance, args.batch_size)
    rows = harness.rows_as_dicts(harness.summarize(run_, scorer, clip))
    kinds = {}
    for p in pairs:
        kinds[p.kind] = kinds.get(p.kind, 0) + 1
    report.update({"pairs": len(pairs), "pair_kinds": kinds, "rows": rows})
    lines += [f"## Resumed from a similar prompt's state: {len(pairs)} pairs "
              f"({', '.join(f'{v} {k}' for k, v in sorted(kinds.items()))})", "",
              "Adherence drop = no-cache adherence - resumed adherence, in points (paired, 95% CI). "
              "FID-style: Frechet distance of scorer features, resumed vs no-cache sets of the cell. "
              "PSNR/SSIM: resumed vs the no-cache image of the same seed.", "",
              harness.markdown_table(rows), ""]
    show = [i for i in np.argsort([-p.similarity for p in pairs])][:: max(1, len(pairs) // 6)][:6]
    grid_images, titles = [], []
    for i in show:
        grid_images.append(run_.reference[i])
        titles.append(f"no cache: {pairs[i].target}")
        for k in (ks[0], ks[len(ks) // 2], ks[-1]):
            grid_images.append(run_.resumed[k][i])
            titles.append(f"K={k} from '{pairs[i].source}' (sim {pairs[i].similarity:.2f})")
    save_grid(args.output / "hits_grid.png", np.stack(grid_images), titles, columns=4)
    lines += ["Side by side (`hits_grid.png`): each row is a target with no cache, then resumed at "
              f"K={ks[0]}, {ks[len(ks) // 2]}, {ks[-1]} from its partner's state.", ""]

    if scorer is not None and not args.prompts:
        thresholds = harness.calibrate(rows, args.gate, floor=args.floor)
        report["thresholds"] = thresholds
        save_plot(args.output / "quality.png", rows, args.gate)
        lines += [f"## Calibrated thresholds (gate {args.gate * 100:g} adherence point, floor {args.floor})", "",
                  f"`{json.dumps(thresholds)}` (similarity, K at {args.steps} steps); the current ones: "
                  f"`{json.dumps(generator.spec.thresholds)}`. Plot: `quality.png`.", ""]
        if args.write_thresholds:
            calibration = args.calibration or embedded.WEIGHTS_DIR / embedded.CALIBRATION
            write_calibration(calibration, generator.model_id, args.gate, args.floor, thresholds, rows)
            written = write_thresholds(args.repository, thresholds)
            lines += [f"Written to {calibration} and {len(written)} pipeline.json files of {args.repository}.", ""]
    report["seconds"] = round(time.perf_counter() - start, 1)
    (args.output / "quality.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.output / "quality.md").write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"report in {args.output} ({report['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
