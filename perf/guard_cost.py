"""``nirvana-guard-bench``: what the resume guard costs per approximate hit, side by side with it off.

Shapes prompt pairs of every kind (framing, rewording, one attribute changed, several) are served
the way the cache serves them: the source is generated keeping its states and guidance directions,
then each target resumes at the K its similarity gives under the served thresholds, through the
server's step loop on the exported ONNX UNet, one hit at a time, twice in alternation: with the
latent check (the served guard's bound and a fallback from the same entry, or the target's own
noise) and without it. Reported per hit: wall time (mean, p99), its difference, UNet evaluations
(mean and worst case, a downgrade's discarded call included) and the downgrade rate.

Example:
    nirvana-guard-bench --pairs 60
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

from nirvana.config import CacheConfig, PipelineSpec, parse_parameters, read_pbtxt_parameters
from nirvana.guard import DOWNGRADED, FALLBACK_PROBE, ResumeCheck, policy_for
from nirvana.steps import start_step_for
from nirvana.unet_loop import DenoiseJob, StepRangeLoop


def served_guard(repository: Path):
    """(thresholds, guard policy) the latent_cache of ``repository`` serves with."""
    spec = PipelineSpec.load(repository / "latent_cache" / "1")
    config = parse_parameters(CacheConfig, read_pbtxt_parameters(repository / "latent_cache" / "config.pbtxt"))
    config = config.with_model_thresholds(spec)
    return config, policy_for(spec, config)


def percentile(values: List[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else 0.0


def measure(repository: Path, pairs_per_kind: int, steps: int = 50, guidance: float = 7.5,
            seed: int = 0) -> Dict[str, object]:
    from nirvana_quality import tail
    from nirvana_quality.generators import RepositoryGenerator, initial_latents

    config, policy = served_guard(repository)
    if policy is None:
        raise ValueError("the repository's latent_cache has guard off: nothing to measure")
    generator = RepositoryGenerator(repository)
    pairs = [p for p in tail.tail_pairs(generator, pairs_per_kind, seed=seed + 1)]
    hits = []
    for p in pairs:
        k = start_step_for(p.similarity, config.thresholds, config.base_steps, steps)
        if k > 0:
            hits.append((p, k))
    if not hits:
        raise ValueError("no pair is a hit under the served thresholds")
    sources = generator.generate([p.source for p, _ in hits], [p.seed for p, _ in hits], steps, guidance,
                                 save_steps=sorted(set(config.cache_steps)), batch_size=32, desc="sources")
    loop = StepRangeLoop(generator.unet, generator.scheduler_name, generator.scheduler_config)
    negative = generator.embed([""]).hidden[0]
    timings: Dict[str, List[float]] = {"checked": [], "unchecked": []}
    evaluations: Dict[str, List[int]] = {"checked": [], "unchecked": []}
    downgraded = probed = 0
    discarded: List[float] = []
    probe_step = policy.probe_step(config.base_steps, steps)
    for n, (pair, k) in enumerate(hits):
        hidden = generator.embed([pair.target]).hidden[0]
        own_noise = initial_latents(pair.seed, generator.latent_shape)
        bound = policy.bound_for(k, config.base_steps, steps)
        checked = bound is not None and probe_step < k and probe_step in sources.directions[n]
        fallback_step = probe_step if policy.fallback == FALLBACK_PROBE else 0
        for mode in (("checked", "unchecked") if n % 2 == 0 else ("unchecked", "checked")):
            check = (ResumeCheck(probe_step, sources.checkpoints[n][probe_step], sources.directions[n][probe_step],
                                 sources.unconds[n][probe_step], bound, fallback_step, own_noise)
                     if mode == "checked" and checked else None)
            job = DenoiseJob(latents=sources.checkpoints[n][k], prompt_embeds=hidden, negative_embeds=negative,
                             start_step=k, steps=steps, guidance_scale=guidance, check=check)
            began = time.perf_counter()
            result = loop.run([job])[0]
            timings[mode].append(time.perf_counter() - began)
            evaluations[mode].append(result.steps_run)
            if mode == "checked":
                discarded.append(result.discarded_rows / 2)  # a guided evaluation is two rows
                downgraded += result.verdict.outcome == DOWNGRADED
                probed += check is not None
    per_eval = float(np.mean(timings["unchecked"])) / float(np.mean(evaluations["unchecked"]))
    same_path = np.array([d == 0.5 and c - u == 1 for d, c, u in
                          zip(discarded, evaluations["checked"], evaluations["unchecked"])])
    extra_s = np.array(timings["checked"]) - np.array(timings["unchecked"])
    return {
        "hits": len(hits), "probed": probed, "downgraded": downgraded, "downgrade_rate": downgraded / len(hits),
        "thresholds": [list(t) for t in config.thresholds], "guard": policy.as_dict(),
        "seconds_per_unet_evaluation": per_eval,
        "checked": {"mean_s": float(np.mean(timings["checked"])), "p99_s": percentile(timings["checked"], 99),
                    "mean_evaluations": float(np.mean(evaluations["checked"])),
                    "worst_evaluations": int(max(evaluations["checked"]))},
        "unchecked": {"mean_s": float(np.mean(timings["unchecked"])), "p99_s": percentile(timings["unchecked"], 99),
                      "mean_evaluations": float(np.mean(evaluations["unchecked"])),
                      "worst_evaluations": int(max(evaluations["unchecked"]))},
        # The guard's own cost, in UNet evaluations: the rows of a probe whose prediction was not
        # used (half an evaluation with the cached unconditional prediction; none when a downgraded
        # row goes on from the probe), and the wall time of a passed probe over its unchecked twin.
        "cost_evaluations_mean": float(np.mean(discarded)),
        "cost_evaluations_worst": float(max(discarded)),
        "passed_probe_overhead_s_mean": float(np.mean(extra_s[same_path])) if same_path.any() else 0.0,
    }


def report_markdown(r: Dict[str, object]) -> str:
    c, u = r["checked"], r["unchecked"]
    return "\n".join([
        f"Resume guard cost: {r['hits']} approximate hits of shapes pairs (every kind), one at a time, checked and "
        f"unchecked in alternation; {r['probed']} probed, {r['downgraded']} downgraded "
        f"({100 * r['downgrade_rate']:.1f}%).", "",
        "| | mean per hit | p99 per hit | UNet evaluations per hit (mean / worst) |", "|---|---|---|---|",
        f"| unchecked | {1e3 * u['mean_s']:.1f} ms | {1e3 * u['p99_s']:.1f} ms | "
        f"{u['mean_evaluations']:.1f} / {u['worst_evaluations']} |",
        f"| guarded | {1e3 * c['mean_s']:.1f} ms | {1e3 * c['p99_s']:.1f} ms | "
        f"{c['mean_evaluations']:.1f} / {c['worst_evaluations']} |", "",
        f"The guard's own cost per hit: {r['cost_evaluations_mean']:.3f} UNet evaluations on average (worst "
        f"{r['cost_evaluations_worst']:.1f}: a probe's discarded rows); a hit that passed took "
        f"{1e3 * r['passed_probe_overhead_s_mean']:+.1f} ms over its unchecked twin (one UNet evaluation here is "
        f"{1e3 * r['seconds_per_unet_evaluation']:.1f} ms). A downgraded hit also runs the "
        f"steps it no longer saves: that is the quality it buys, counted in steps saved, not in cost.", ""])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="nirvana-guard-bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--pairs", type=int, default=6, help="pairs per kind (10 kinds; default %(default)s)")
    parser.add_argument("--output", type=Path, default=Path("perf/results/guard_cost"))
    args = parser.parse_args(argv)
    try:
        report = measure(args.model_repository, args.pairs)
    except (OSError, ValueError) as exc:
        print(f"nirvana-guard-bench: error: {exc}", file=sys.stderr)
        return 1
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "guard_cost.json").write_text(json.dumps(report, indent=1) + "\n")
    text = report_markdown(report)
    (args.output / "guard_cost.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
