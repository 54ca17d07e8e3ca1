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
     the calibration file the export reads (``export/weights/calibration.json``);
  5. the tail (:mod:`nirvana_quality.tail`): prompt pairs per kind, measured into
     ``--tail-records`` (resumable), then judged per kind (false hits: an attribute the
     prompt names lost) for the paper's table, the earlier tables and the latent and token
     guards calibrated per false-hit target (:mod:`nirvana_quality.policies`); with
     ``--write-thresholds`` the guard's calibration goes into the same files.

For a Stable Diffusion folder (``--checkpoint``): the same pairs (from ``--prompts``,
a JSON Lines log, or the shapes captions) with PSNR/SSIM, and CLIP score with ``--clip``.

Examples:
    nirvana-quality                                    # embedded model, report in perf/results/quality
    nirvana-quality --write-thresholds                 # ... and recalibrate
    nirvana-quality --checkpoint ./sd15 --prompts log.jsonl --clip ./clip-vit-b32 --steps 30
    nirvana-quality --tail-only --table perf/results/quality/tail_records.jsonl --write-thresholds
                                                       # recalibrate the guard from measured records
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
TAIL_RECORDS = RESULTS / "tail_records.jsonl"


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


def write_thresholds(repository: Path, thresholds: List[List[float]], guard: Optional[dict] = None) -> List[Path]:
    """Put ``thresholds`` (and the resume guard's calibration, when given) into every
    pipeline.json of an exported repository."""
    import dataclasses

    from nirvana.config import PIPELINE_FILE, PipelineSpec

    written = []
    for path in sorted(repository.glob(f"*/1/{PIPELINE_FILE}")):
        spec = PipelineSpec.load(path.parent)
        changes = {"thresholds": thresholds, **({"guard": guard} if guard is not None else {})}
        written.append(dataclasses.replace(spec, **changes).save(path.parent))
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
                        help="recalibrate from an earlier run's quality.json or calibration.json, or (a .jsonl "
                             "file, or with --tail-only) report and recalibrate the guard from tail records "
                             "(no generation)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32, help="images per step-loop batch")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime/torch threads (0: one per core)")
    parser.add_argument("--output", type=Path, default=RESULTS, help="report folder (default: %(default)s)")
    parser.add_argument("--write-thresholds", action="store_true",
                        help="write the calibrated thresholds into the repository's pipeline.json files and --calibration")
    parser.add_argument("--calibration", type=Path, help="calibration file the export reads "
                        "(default: export/weights/calibration.json)")
    parser.add_argument("--tail-records", type=Path, default=TAIL_RECORDS,
                        help="JSON Lines file of the tail pairs' records, measured into and resumed "
                             "(default: %(default)s)")
    parser.add_argument("--tail-per-kind", type=int, default=20,
                        help="tail pairs per kind to have measured (default: %(default)s; the calibration "
                             "run measures 200 with python -m nirvana_quality.tail; 0: measure none)")
    parser.add_argument("--tail-only", action="store_true",
                        help="skip the band table: measure and report the tail only (with --table: "
                             "report and recalibrate from --tail-records, no generation)")
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

    if args.table and (args.tail_only or args.table.suffix == ".jsonl"):
        return recalibrate_tail(args, args.table if args.table.suffix == ".jsonl" else args.tail_records)
    if args.table:
        return recalibrate(args)

    from nirvana_export import embedded
    from nirvana_quality import tail
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
    console: List[str] = []
    if not args.tail_only:
        band_table(args, generator, scorer, clip, ks, report, lines)
    band_lines = len(lines)
    if scorer is not None and not args.prompts:
        if args.steps != 50 or tuple(ks) != harness.K_GRID:
            lines += [f"Tail not measured: it is stated at N=50 and K in {list(harness.K_GRID)} "
                      f"(this run: N={args.steps}, K in {ks}).", ""]
        elif args.tail_per_kind <= 0 and not tail.load_records(args.tail_records, generator.model_id):
            lines += [f"Tail not reported: --tail-per-kind 0 and no records in {args.tail_records}.", ""]
        else:
            if args.tail_per_kind > 0:
                measure_tail(generator, scorer, args.tail_records, args.tail_per_kind, args.batch_size)
            console = tail_section(args, read_tail(args.tail_records, generator.model_id), generator.model_id,
                                   report, lines)
    report["seconds"] = round(time.perf_counter() - start, 1)
    (args.output / "quality.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.output / "quality.md").write_text("\n".join(lines))
    print("\n".join(lines[:band_lines] + (console or lines[band_lines:])))
    print(f"report in {args.output} ({report['seconds']:.0f} s)")
    return 0


def band_table(args, generator, scorer, clip, ks, report: dict, lines: List[str]) -> None:
    """Steps 1-4: the no-cache baseline, the K x band table and its thresholds (into ``report``
    and ``lines``)."""
    from nirvana_export import embedded

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


def tail_header(path: Path) -> Optional[dict]:
    """The header line of a tail records file (None: no file, or no header yet)."""
    if not path.exists():
        return None
    with open(path) as f:
        first = f.readline()
    try:
        row = json.loads(first)
    except json.JSONDecodeError:
        return None
    return row.get("header") if isinstance(row, dict) else None


def measure_tail(generator, scorer, path: Path, per_kind: int, batch_size: int) -> None:
    """Have at least ``per_kind`` pairs of every kind measured in ``path``.

    The pairs a run draws depend on its per-kind budget, so a file begun with another budget
    (the 200-per-kind calibration run) is continued with that file's budget, up to
    ``per_kind`` x kinds pairs: its first pairs take the kinds in turn, so this is ``per_kind``
    of each, and they are the very pairs the long run measures.
    """
    from nirvana_quality import tail

    header = tail_header(path)
    budget = int(header["per_kind"]) if header else per_kind
    wanted = min(per_kind, budget) * len(tail.TAIL_KINDS)
    done = len(tail.load_records(path, generator.model_id))
    if done < wanted:
        tail.run_tail(generator, scorer, path, budget, batch_size=batch_size, limit=wanted - done)


def read_tail(path: Path, model_id: Optional[str]) -> List[dict]:
    from nirvana_quality import tail

    records = tail.load_records(path, model_id)
    if not records:
        raise ValueError(f"no tail records in {path}: measure them (nirvana-quality --tail-only, "
                         f"or python -m nirvana_quality.tail)")
    return records


def tail_tokenizer(repository: Path):
    """The repository's tokenizer for the token variant (None when the repository has none)."""
    from nirvana_quality import policies

    if not (repository / "tokenizer" / "1" / "tokenizer").is_dir():
        return None
    return policies.load_tokenizer(repository)


def tail_section(args, records: List[dict], model_id: str, report: dict, lines: List[str]) -> List[str]:
    """Step 5: judge the policies on the tail records, into ``report`` and the markdown ``lines``
    (the K x band x kind table in full); returns the console's version (that table compacted).
    With ``--write-thresholds`` the guard's calibration goes into the calibration file and the
    repository's pipeline.json files."""
    from nirvana_export import embedded
    from nirvana_quality import policies

    tokenizer = tail_tokenizer(args.repository)
    tail = policies.tail_report(records, floor=args.floor, tokenizer=tokenizer)
    default_key = f"{tail['default_target']:g}"
    default = tail["targets"][default_key]
    report["tail"] = {k: v for k, v in tail.items() if k != "kind_table"}
    (args.output / "tail_kind_table.json").write_text(json.dumps(tail["kind_table"], indent=1) + "\n")
    policies.save_frontier_plot(args.output / "frontier.png", tail["frontier"])
    head = [f"## The tail: {tail['records']} pairs of {args.tail_records if not args.table else args.table} "
            f"({tail['calibration_pairs']} calibrate, {tail['heldout_pairs']} held out)", "",
            "A false hit: a served hit whose image loses an attribute the prompt names that its no-cache image "
            "shows. Constraint of the calibration: " + policies.CONSTRAINT_RULE + ".", "",
            f"Rule: {policies.TAIL_CALIBRATION_RULE}.", "",
            f"Latent guard at target {default_key} (upper {default['upper']:g}): thresholds "
            f"`{json.dumps(default['thresholds'])}`, guard `{json.dumps(default['guard'])}`.", ""]
    if tail["token"] is not None:
        head += [f"Token guard at target {default_key}: caps `{json.dumps(tail['token']['token_caps'])}` under "
                 f"`{json.dumps(tail['token']['thresholds'])}`.", ""]
    else:
        head += ["Token guard not calibrated: the repository has no tokenizer files.", ""]
    kinds = ["### Held-out pairs per kind: hit rate, false-hit rate (Wilson upper)", "",
             policies.markdown_kinds(tail["kinds_heldout"]), ""]
    frontier = ["### Frontier on held-out pairs (`frontier.png`)", "", policies.markdown_frontier(tail["frontier"]), ""]
    written = []
    if args.write_thresholds:
        calibration = args.calibration or embedded.WEIGHTS_DIR / embedded.CALIBRATION
        guard = policies.guard_calibration(tail)
        # The top-level thresholds are what a latent_cache with guard "off" serves: the table that
        # meets the default target unchecked; with the guard on, each target's own table applies.
        unguarded = tail["unguarded"]["thresholds"]
        write_tail_calibration(calibration, model_id, unguarded, guard)
        paths = write_thresholds(args.repository, unguarded, guard)
        written = [f"Guard calibration (all targets) written to {calibration} and {len(paths)} pipeline.json files "
                   f"of {args.repository}; without the guard their thresholds are `{json.dumps(unguarded)}` "
                   f"(target {default_key} unchecked).", ""]
    lines += head + kinds + ["### K x similarity band x kind (unchecked; within the default guard's bound)", "",
                             policies.markdown_kind_table(tail["kind_table"]), ""] + frontier + written
    return head + kinds + [policies.compact_kind_table(tail["kind_table"]), ""] + frontier + written


def write_tail_calibration(path: Path, model_id: str, thresholds, guard: dict) -> None:
    """Add the guard's calibration to the calibration file (its band keys kept) and make its
    top-level thresholds the default target's."""
    data = json.loads(path.read_text()) if path.exists() else {"model_id": model_id, "rows": []}
    data.update({"thresholds": thresholds, "guard": guard})
    data.setdefault("model_id", model_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")


def recalibrate_tail(args, records_path: Path) -> int:
    """Report and recalibrate from a tail records file, generating nothing."""
    start = time.perf_counter()
    header = tail_header(records_path) or {}
    model_id = header.get("model_id", "")
    records = read_tail(records_path, None)
    args.output.mkdir(parents=True, exist_ok=True)
    args.tail_records = records_path
    report = {"model_id": model_id, "tail_records": str(records_path)}
    lines = [f"# The tail of approximate hits: {model_id}", ""]
    console = tail_section(args, records, model_id, report, lines)
    report["seconds"] = round(time.perf_counter() - start, 1)
    (args.output / "tail.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.output / "tail.md").write_text("\n".join(lines))
    print("\n".join(console))
    print(f"report in {args.output} ({report['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
