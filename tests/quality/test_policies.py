"""Cache policies judged on hand-made tail records: no generation, every test well under a second
or two (the CLI one loads matplotlib)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from nirvana.guard import GuardPolicy, TokenCaps
from nirvana_quality import cli, policies
from nirvana_quality.policies import Policy, Served
from nirvana_quality.tail import TAIL_KS

REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"


def outcome(lost=(), divergence=0.1):
    return {"lost": list(lost), "adherence": 1.0, "psnr_db": 40.0, "ssim": 0.99, "divergence": divergence}


def record(index, kind, similarity, lost_from=None, divergence=0.1, attribute="colour", **extra):
    """A record whose target loses ``attribute`` when resumed at K >= ``lost_from`` (None: never)."""
    k = {str(step): outcome([attribute] if lost_from is not None and step >= lost_from else [],
                            divergence(step) if callable(divergence) else divergence) for step in TAIL_KS}
    return {"index": index, "kind": kind, "similarity": similarity, "heldout": index % 2 == 1,
            "source": f"source {index}", "target": f"target {index}", "k": k, **extra}


# -- the Wilson bound ---------------------------------------------------------------------------------

def test_wilson_upper_matches_the_closed_form():
    assert policies.wilson_upper(0, 73) == pytest.approx(0.05, abs=2e-4)  # z^2 / (n + z^2)
    assert policies.wilson_upper(1, 10) == pytest.approx(0.4042, abs=1e-3)
    assert policies.wilson_upper(0, 0) == 1.0
    assert policies.fewest_hits_for(0.05) == 73
    with pytest.raises(ValueError):
        policies.wilson_upper(3, 2)


def test_constraint_judges_a_small_kind_as_if_it_had_min_n_hits():
    constraint = policies.Constraint.for_target(0.02)  # upper 0.05, min_n 73
    assert constraint.min_n == 73
    # Below min_n hits: false hits over min_n within the target, the upper bound not required
    # (n does not allow it); from min_n on, the Wilson upper bound too (1/73: 7.4% > 5%).
    assert constraint.holds(5, 0) and constraint.holds(5, 1) and not constraint.holds(5, 2)
    assert constraint.holds(73, 0) and not constraint.holds(73, 1)
    allowed = constraint.most_false_hits(400)
    assert allowed[0] == 0 and allowed[100] == 0
    assert all(constraint.holds(n, allowed[n]) and (allowed[n] == n or not constraint.holds(n, allowed[n] + 1))
               for n in (5, 72, 73, 150, 300, 400))
    assert allowed[72] == 1 and allowed[73] == 0  # the upper bound applies from min_n on


# -- one record ---------------------------------------------------------------------------------------

def test_serve_miss_hit_downgrade_and_fallback():
    # The guard judges a hit at K > 5 by the divergence at the probe step (5).
    r = record(0, "one-attribute:colour", 0.92, lost_from=20, divergence=lambda k: 0.9 if k <= 5 else 0.2)
    table = [[0.9, 40], [0.8, 10]]
    assert Policy("unchecked", table).serve({**r, "similarity": 0.5}) == Served(0, False, False, 0, False)
    assert Policy("unchecked", table).serve(r) == Served(40, True, True, 0, False)
    assert Policy("low", table).serve({**r, "similarity": 0.85}) == Served(10, True, False, 0, False)
    strict = GuardPolicy({40: 0.5, 10: 0.5})
    assert Policy("guard", table, strict).serve(r) == Served(0, False, False, 0.5, True)  # 0.9 > 0.5: from noise
    assert Policy("guard", table, GuardPolicy({40: 1.0})).serve(r) == Served(40, True, True, 0.5, False)
    fallback = GuardPolicy({40: 0.5}, fallback="probe")  # a downgrade goes on from the probe, its call used
    assert Policy("fallback", table, fallback).serve(r) == Served(5, True, False, 0, True)
    low = {**r, "similarity": 0.85}  # K=10: above unchecked_max_k 5 it is checked, at or below it is not
    assert Policy("guard", table, GuardPolicy({10: 0.1}, unchecked_max_k=5)).serve(low).downgraded
    assert Policy("guard", table, GuardPolicy({}, unchecked_max_k=10)).serve(low) == Served(10, True, False, 0, False)
    assert Policy("no bound", table, GuardPolicy({10: 9.0})).serve(r) == Served(0, False, False, 0, False)
    at_probe = Policy("probe k", [[0.9, 5]], GuardPolicy({}, unchecked_max_k=0))  # K=5 cannot be probed
    assert at_probe.serve(r) == Served(0, False, False, 0, False)
    assert Policy("probe k", [[0.9, 5]], GuardPolicy({})).serve(r) == Served(5, True, False, 0, False)
    no_direction = {**r, "k": {**r["k"], "5": outcome(divergence=None)}}
    assert Policy("none", table, GuardPolicy({40: 9.0})).serve(no_direction) == Served(0, False, False, 0.5, True)


def test_serve_caps_k_by_novel_tokens_to_a_measured_step():
    caps = TokenCaps({0: 40, 1: 23, 2: 0}, max_counted=2)
    policy = Policy("token", [[0.7, 40]], token=caps)
    r = record(0, "wording", 0.95)
    assert policy.serve({**r, "novel_tokens": 0}).k_served == 40
    assert policy.serve({**r, "novel_tokens": 1}) == Served(20, True, False, 0, False)  # 23 -> grid step 20
    assert policy.serve({**r, "novel_tokens": 5}) == Served(0, False, False, 0, False)  # counted as 2: a miss
    with pytest.raises(KeyError, match="novel_tokens"):
        policy.serve(r)


def test_with_novel_tokens_ignores_special_and_padding_ids():
    from nirvana.text import TokenizedPrompts

    vocab = {"a": 5, "red": 6, "blue": 7, "circle": 8, "4k": 9}

    def tokenizer(texts):  # [CLS]=1 words [SEP]=2, padded with 0 to 6
        rows = [[1] + [vocab[w] for w in t.split()] + [2] for t in texts]
        ids = np.array([row + [0] * (6 - len(row)) for row in rows])
        return TokenizedPrompts(ids, (ids != 0).astype(np.int64), np.zeros(len(texts), dtype=bool))

    records = [{**record(0, "one-attribute:colour", 0.9), "source": "a red circle", "target": "a blue circle"},
               {**record(1, "near-duplicate", 0.95), "source": "a red circle", "target": "a red circle 4k"},
               {**record(2, "wording", 0.95), "source": "a red circle", "target": "circle a red"}]
    assert [r["novel_tokens"] for r in policies.with_novel_tokens(records, tokenizer)] == [1, 1, 0]


# -- many records -------------------------------------------------------------------------------------

def test_evaluate_counts_per_kind_and_finds_the_worst():
    records = ([record(i, "near-duplicate", 0.95) for i in range(4)]
               + [record(4 + i, "one-attribute:colour", 0.95, lost_from=30 if i < 2 else None) for i in range(4)]
               + [record(8, "several", 0.5)])
    result = policies.evaluate(Policy("t", [[0.9, 40]]), records)
    near, colour, several = (result["kinds"][k] for k in ("near-duplicate", "one-attribute:colour", "several"))
    assert (near["pairs"], near["hits"], near["false_hits"]) == (4, 4, 0)
    assert (colour["hits"], colour["false_hits"], colour["false_hit_rate"]) == (4, 2, 0.5)
    assert colour["wilson_upper"] == pytest.approx(policies.wilson_upper(2, 4))
    assert (several["hits"], several["hit_rate"], several["wilson_upper"]) == (0, 0.0, 1.0)
    assert result["overall"]["hits"] == 8 and result["overall"]["mean_k"] == 40.0
    assert result["overall"]["steps_saved"] == pytest.approx(8 * 40 / (50 * 9))
    assert result["worst_kind"] == "one-attribute:colour"
    assert list(result["kinds"]) == ["near-duplicate", "one-attribute:colour", "several"]  # TAIL_KINDS order


def test_heldout_halves_every_kind():
    # Ten kinds in turn: an index's parity is its kind's, so the split ranks within each kind.
    kinds = ["near-duplicate", "wording"]
    records = [record(i, kinds[i % 2], 0.9) for i in range(8)]
    calibration, heldout = policies.split(records)
    assert sorted(r["index"] for r in calibration) == [0, 1, 4, 5]
    assert sorted(r["index"] for r in heldout) == [2, 3, 6, 7]


def test_the_vectorised_replay_agrees_with_serve():
    rng = np.random.default_rng(3)
    kinds = ["near-duplicate", "one-attribute:colour", "several"]
    records = [record(i, kinds[i % 3], float(rng.uniform(0.6, 1.0)), lost_from=int(rng.choice([5, 20, 35, 99])),
                      divergence=lambda k, r=rng.uniform(0.1, 1.0, 8): float(r[TAIL_KS.index(k)]))
               for i in range(300)]
    arrays = policies._Arrays.of(records)
    for fallback in (0, 5):
        bounds = {40: 0.6, 25: 0.5, 10: 0.8, 5: np.inf}
        table = [[0.9, 40], [0.8, 25], [0.7, 10], [0.65, 5]]
        replay = policies._replay(arrays, policies._route(arrays, table), bounds, fallback)
        guard = GuardPolicy({k: b for k, b in bounds.items() if k > 5}, probe_k=5,
                            fallback="probe" if fallback else "noise", unchecked_max_k=5)
        result = policies.evaluate(Policy("p", table, guard), records)
        assert replay.saved == pytest.approx(result["overall"]["steps_saved"] * 50 * len(records))
        assert list(replay.hits) == [result["kinds"][k]["hits"] for k in arrays.kinds]
        assert list(replay.false_hits) == [result["kinds"][k]["false_hits"] for k in arrays.kinds]


def guarded_records(count=400):
    """Near-duplicates: low divergence, nothing lost. One-attribute pairs at the same similarities:
    high divergence, the attribute lost from K=10 on. The guard can tell them apart; similarity cannot."""
    rng = np.random.default_rng(7)
    out = []
    for i in range(count):
        similarity = float(rng.uniform(0.86, 0.99))
        if i % 2 == 0:
            out.append(record(i, "near-duplicate", similarity, divergence=float(rng.uniform(0.1, 0.3))))
        else:
            out.append(record(i, "one-attribute:colour", similarity, lost_from=10,
                              divergence=float(rng.uniform(1.0, 2.0))))
    return out


def test_calibrate_tail_downgrades_changed_attributes_and_keeps_near_duplicates():
    records = guarded_records()
    result = policies.calibrate_tail(records, target=0.02, upper=0.05)
    guard = GuardPolicy.from_dict(result["guard"])
    top_k = result["thresholds"][0][1]
    assert top_k >= 25 and 0.3 <= guard.bounds[top_k] < 1.1  # between the two kinds' divergences
    for half in ("calibration", "heldout"):
        kinds = result[half]["kinds"]
        assert kinds["near-duplicate"]["hit_rate"] == 1.0 and kinds["near-duplicate"]["mean_k"] >= 25
        colour = kinds["one-attribute:colour"]
        # At most what the target allows a kind with few hits (2% of min_n = 73): one.
        assert colour["false_hits"] <= 1 and colour["downgrades"] >= colour["pairs"] - 1
    assert result["rule"] == policies.TAIL_CALIBRATION_RULE and result["target"] == 0.02
    assert all(a[0] > b[0] and a[1] > b[1] for a, b in zip(result["thresholds"], result["thresholds"][1:]))
    assert all(s >= policies.harness.UNRELATED_FLOOR for s, _ in result["thresholds"])
    assert policies.calibrate_tail(records, target=0.02, upper=0.05) == result  # deterministic


def test_calibrate_tail_without_a_guard_signal_keeps_to_the_safe_steps():
    # Same divergence for both kinds: only K=5 (where nothing is lost) can be served to everyone.
    records = [{**r, "k": {k: {**o, "divergence": 0.2} for k, o in r["k"].items()}} for r in guarded_records(200)]
    result = policies.calibrate_tail(records, target=0.02)
    assert result["calibration"]["overall"]["false_hits"] == 0
    assert {k for _, k in result["thresholds"]} == {5}


def test_calibrate_targets_keys_and_upper():
    results = policies.calibrate_targets(guarded_records(200), targets=(0.02, 0.1))
    assert list(results) == ["0.02", "0.1"]
    assert results["0.1"]["upper"] == pytest.approx(0.25)


def test_calibrate_token_caps_learns_smaller_caps_for_more_novel_tokens():
    records = []
    for i in range(300):
        novel = i % 3  # 0: kept at every K; 1: lost from K=30; 2: lost from K=10
        lost_from = {0: None, 1: 30, 2: 10}[novel]
        records.append({**record(i, ["near-duplicate", "one-attribute:colour", "several"][novel], 0.9,
                                 lost_from=lost_from), "novel_tokens": novel})
    result = policies.calibrate_token_caps(records, [[0.71, 40]], target=0.02)
    caps = {int(c): k for c, k in result["token_caps"]["caps"].items()}
    assert caps[0] == 40 and caps[1] == 25 and caps[2] == 5
    assert result["heldout"]["overall"]["false_hits"] == 0
    assert policies.token_policy(result).token.cap(7) == caps[3]


def test_kind_table_rows():
    guard = GuardPolicy({40: 0.5})
    records = [record(0, "near-duplicate", 0.96, divergence=0.2),
               record(1, "one-attribute:colour", 0.97, lost_from=30, divergence=0.9),
               record(2, "one-attribute:colour", 0.96, lost_from=30, divergence=0.3)]
    rows = {(r["k"], r["kind"]): r for r in policies.kind_table(records, (5, 40), guard)}
    colour = rows[(40, "one-attribute:colour")]
    assert colour["band"] == "0.95-1.00" and colour["n"] == 2 and colour["false_hit_rate"] == 1.0
    assert colour["passing"] == 1 and colour["passing_false_hit_rate"] == 1.0
    assert rows[(5, "one-attribute:colour")]["passing"] == 0  # no bound at 5
    assert "K=40" in policies.compact_kind_table(list(rows.values()))


def test_frontier_rows():
    records = guarded_records(200)
    _, heldout = policies.split(records)
    guard = Policy("guarded", [[0.8, 40]], GuardPolicy({40: 0.5}))
    rows = policies.frontier(heldout, [Policy("unchecked", [[0.8, 40]]), guard])
    unchecked, guarded = rows
    assert unchecked["worst_kind"] == "one-attribute:colour" and unchecked["worst_false_hit_rate"] == 1.0
    assert unchecked["hit_rate"] == 1.0 and unchecked["wasted_per_hit"] == 0.0
    assert guarded["false_hit_rate"] == 0.0 and guarded["hit_rate"] == 0.5
    assert guarded["wasted_per_hit"] == pytest.approx(1.0)  # one downgrade per near-duplicate hit
    assert guarded["steps_saved"] == pytest.approx((50 * 40 - 50) / (50 * 100))
    assert "| guarded |" in policies.markdown_frontier(rows)
    names = [p.name for p in policies.frontier_policies({"0.02": {**policies.calibrate_tail(records), "target": 0.02},
                                                         "0.05": policies.calibrate_tail(records, 0.05)},
                                                        default_target=0.02)]
    assert names == ["paper's table", "MiniLM table", "band-calibrated table", "latent guard 0.02 (default)",
                     "latent guard 0.05"]


# -- the CLI, from a records file ---------------------------------------------------------------------

def test_cli_recalibrates_from_tail_records(tmp_path, capsys):
    from nirvana.config import CacheConfig, PipelineSpec
    from nirvana.guard import calibration_for
    from nirvana_export import embedded

    records_path = tmp_path / "tail_records.jsonl"
    header = {"header": {"model_id": "toy", "per_kind": 200, "ks": list(TAIL_KS), "steps": 50}}
    records_path.write_text("\n".join(json.dumps(r) for r in [header] + guarded_records(120)) + "\n")
    repo = tmp_path / "repo"
    for path in REPOSITORY.glob("*/1/pipeline.json"):  # the specs only: no tokenizer, so no token variant
        (repo / path.parent.relative_to(REPOSITORY)).mkdir(parents=True)
        shutil.copy(path, repo / path.relative_to(REPOSITORY))
    calibration = tmp_path / "calibration.json"
    calibration.write_text(json.dumps({"model_id": "toy", "gate": 0.01, "thresholds": [[0.9, 40]],
                                       "rows": [{"k": 5}]}))
    out = tmp_path / "report"
    assert cli.main(["--tail-only", "--table", str(records_path), "--repository", str(repo), "--output", str(out),
                     "--write-thresholds", "--calibration", str(calibration)]) == 0
    printed = capsys.readouterr().out
    assert "latent guard 0.1 (default)" in printed and "paper's table" in printed
    for name in ("frontier.png", "tail.md", "tail.json", "tail_kind_table.json"):
        assert (out / name).stat().st_size > 0
    written = json.loads(calibration.read_text())
    assert written["rows"] == [{"k": 5}] and written["gate"] == 0.01  # the band calibration's keys kept
    guard = written["guard"]
    assert guard["metric"] == "guidance_divergence" and guard["default_target"] == 0.1
    assert set(guard["targets"]) == {"0.01", "0.02", "0.05", "0.1"}
    # Without the guard a server serves the table that meets the target unchecked.
    assert written["thresholds"] == policies.calibrate_unguarded(guarded_records(120), 0.1)["thresholds"]
    assert embedded.calibrated_thresholds(tmp_path) == written["thresholds"]
    spec = PipelineSpec.load(repo / "latent_cache" / "1")
    assert spec.thresholds == written["thresholds"]
    chosen = calibration_for(spec, CacheConfig(false_hit_target=0.02))
    assert chosen.target == 0.02 and chosen.policy.as_dict() == guard["targets"]["0.02"]["guard"]
