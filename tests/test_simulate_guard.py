"""nirvana-simulate's resume guard comparison: the token check replayed (variant a), the latent
check's estimate from tail records (variant b), and the note when their inputs are missing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nirvana.config import CacheConfig
from nirvana.guard import GuardPolicy
from nirvana_perf import simulate
from nirvana_perf.simulate import (RepositoryEmbedder, TokenGuard, config_for_thresholds, guard_inputs,
                                   latent_estimate, parse_bounds, parse_token_caps, record_downgraded, replay,
                                   unbounded_capacity)

CACHED = "a red circle on a white background"
ONE_WORD_EDIT = "a blue circle on a white background"  # one novel token: "blue"
NEAR_IDENTICAL = "red circle on a white background"  # a word dropped: no novel token
CAPS = "0:40,1:10,2:5,3:0"
LOW_TABLE = ((0.3, 40),)  # every pair of these prompts is above 0.3: the thresholds allow K=40


@pytest.fixture(scope="module")
def embedder(repository):
    return RepositoryEmbedder(repository)


def replay_pair(embedder, new_prompt, caps):
    """The cached prompt then ``new_prompt`` (other seeds: no exact hit), LCBFU, best of 16."""
    rows = [{"prompt": CACHED, "seed": 1}, {"prompt": new_prompt, "seed": 2}]
    embeddings = embedder.embed([r["prompt"] for r in rows], progress=False)
    config = config_for_thresholds(CacheConfig(lookup_k=16, use_gpu=False), LOW_TABLE)
    guard = None if caps is None else \
        TokenGuard(parse_token_caps(caps), embedder.tokenizer, [r["prompt"] for r in rows], embeddings)
    hits = []
    result = replay(rows, embeddings, config, unbounded_capacity(rows, config), token_guard=guard, hits=hits)
    return result, hits


@pytest.mark.timeout(120)
def test_token_cap_lowers_k_for_a_one_word_edit(embedder):
    unguarded, hits = replay_pair(embedder, ONE_WORD_EDIT, None)
    assert [k for k, _ in hits] == [40]
    guarded, hits = replay_pair(embedder, ONE_WORD_EDIT, CAPS)
    assert [k for k, _ in hits] == [10]  # one novel token: cap 10
    assert guarded.approximate_hits == 1 and (guarded.token_capped, guarded.token_eligible) == (1, 1)
    assert guarded.steps_saved_fraction < unguarded.steps_saved_fraction
    # A cap of 0 for one novel token turns the hit into a miss.
    missed, hits = replay_pair(embedder, ONE_WORD_EDIT, "0:40,1:0")
    assert hits == [] and missed.approximate_hits == 0 and missed.token_capped == 1


@pytest.mark.timeout(120)
def test_token_cap_leaves_a_near_identical_prompt_alone(embedder):
    guarded, hits = replay_pair(embedder, NEAR_IDENTICAL, CAPS)
    assert [k for k, _ in hits] == [40]
    assert (guarded.token_capped, guarded.token_eligible) == (0, 1)
    unguarded, _ = replay_pair(embedder, NEAR_IDENTICAL, None)
    assert guarded.steps_saved_fraction == unguarded.steps_saved_fraction


def test_token_caps_and_bounds_parse():
    caps = parse_token_caps(CAPS)
    assert (caps.cap(0), caps.cap(1), caps.cap(2), caps.cap(3), caps.cap(7)) == (40, 10, 5, 0, 0)
    assert parse_token_caps('{"caps": {"0": 30, "1": 5}, "max_counted": 1}').cap(4) == 5
    assert parse_bounds("5:0.35,10:0.4") == {5: 0.35, 10: 0.4} == parse_bounds('{"5": 0.35, "10": 0.4}')
    for bad in ("", "0:x", "0:60"):
        with pytest.raises(simulate.ConfigError):
            parse_token_caps(bad)


def record(similarity, probe_divergence, index=1, kind="wording"):
    """A tail record: the served check judges every K by the divergence at the probe step (5)."""
    return {"similarity": similarity, "index": index, "kind": kind,
            "k": {k: {"divergence": probe_divergence if k == "5" else 0.0, "lost": []} for k in ("5", "10", "40")}}


def test_latent_estimate_is_the_expected_steps_saved():
    policy = GuardPolicy(bounds={10: 0.4, 40: 0.25}, probe_k=5, fallback="probe", unchecked_max_k=5)
    records = [record(0.91, 0.2),  # band 0.90-0.95: kept at 10 and 40
               record(0.94, 0.3),  # band 0.90-0.95: kept at 10, downgraded at 40
               record(0.72, None)]  # band 0.70-0.75: no probe divergence: downgraded at every checked K
    assert [record_downgraded(r, 40, policy) for r in records] == [False, True, True]
    assert record_downgraded(records[0], 20, policy)  # no bound for K: downgraded
    assert not record_downgraded(records[2], 5, policy)  # within unchecked_max_k: never checked
    # Band 0.85-0.90 has no record: all bands' rate at 40. K=5 is served unchecked.
    hits = [(40, 0.92), (40, 0.93), (10, 0.72), (40, 0.86), (5, 0.75)]
    estimate = latent_estimate(hits, exact_hits=1, requests=10, records=records, policy=policy)
    # A checked hit pays the probe's half evaluation; a pass saves K - 0.5, a downgrade goes on from
    # the probed x_5 with the probe's prediction as that step's: 5 + 1 - 0.5.
    passed = lambda k: k - 0.5  # noqa: E731
    probe = 5 + 1 - 0.5
    expected = (50  # the exact hit
                + 2 * (0.5 * passed(40) + 0.5 * probe)  # rate 1/2 at 40 in 0.90-0.95
                + 1.0 * probe  # rate 1 at 10 in 0.70-0.75
                + (1 / 3) * passed(40) + (2 / 3) * probe  # 2 of 3 records downgraded at 40 over all bands
                + 5)  # unchecked
    assert estimate["steps_saved_fraction"] == pytest.approx(expected / (50 * 10))
    assert estimate["downgraded"] == pytest.approx(0.5 + 0.5 + 1 + 2 / 3)
    assert estimate["downgraded_share"] == pytest.approx((0.5 + 0.5 + 1 + 2 / 3) / 5)
    assert estimate["hit_rate"] == pytest.approx(6 / 10)  # a downgrade to the probe is still a hit
    assert (estimate["checked"], estimate["pooled_hits"]) == (4, 1)
    # Falling back to noise: a downgraded hit pays the probe and is a miss.
    noise = latent_estimate(hits[:1], 0, 1, records, GuardPolicy(bounds={40: 0.25}, fallback="noise"))
    assert noise["steps_saved_fraction"] == pytest.approx((0.5 * passed(40) + 0.5 * -0.5) / 50)
    assert noise["hit_rate"] == pytest.approx(0.5) and noise["approximate_hits"] == pytest.approx(0.5)


def test_guard_inputs_default_from_the_calibration_file(tmp_path):
    calibration = tmp_path / "calibration.json"
    calibration.write_text(json.dumps({"thresholds": [[0.9, 40]], "guard": {
        "default_target": 0.02,
        "targets": {"0.02": {"thresholds": [[0.9, 40], [0.71, 5]],
                             "guard": {"bounds": {"10": 0.35, "40": 0.5}, "probe_k": 5, "fallback": "probe",
                                       "unchecked_max_k": 0}}},
        "token": {"thresholds": [[0.9, 40]], "token_caps": {"caps": {"0": 40, "1": 10}, "max_counted": 1}}}}))
    records = tmp_path / "tail.jsonl"
    records.write_text("\n".join(json.dumps(r) for r in (
        {"header": {"model_id": "m"}}, record(0.9, 0.1, index=0), record(0.9, 0.1, index=1))) + "\n")
    inputs = guard_inputs(calibration, records=records, model_id="m")
    assert inputs.token and inputs.latent and not inputs.notes
    assert inputs.token_caps.cap(3) == 10 and inputs.guarded == ((0.9, 40), (0.71, 5))
    assert inputs.policy == GuardPolicy({10: 0.35, 40: 0.5}, 5, "probe", 0) and len(inputs.records) == 1
    # Options win over the file.
    inputs = guard_inputs(calibration, tokens="0:20", guarded="[[0.95,30]]", bounds="30:0.2", fallback="noise",
                          records=records, probe_k=10, unchecked_max_k=10)
    assert inputs.token_caps.cap(0) == 20 and inputs.guarded == ((0.95, 30),)
    assert inputs.policy == GuardPolicy({30: 0.2}, 10, "noise", 10)
    with pytest.raises(simulate.ConfigError):
        guard_inputs(calibration, fallback="elsewhere")


def test_guard_inputs_say_why_a_variant_is_skipped(tmp_path):
    inputs = guard_inputs(tmp_path / "missing.json", records=tmp_path / "missing.jsonl")
    assert not inputs.token and not inputs.latent
    assert any(n.startswith("token guard skipped") for n in inputs.notes)
    latent = next(n for n in inputs.notes if n.startswith("latent guard skipped"))
    assert "tail records" in latent and "guarded thresholds" in latent and "bounds" in latent


def tiny_log(tmp_path):
    log = tmp_path / "log.jsonl"
    prompts = [CACHED, ONE_WORD_EDIT, NEAR_IDENTICAL, "a green square at the top", CACHED, "a green square at the top"]
    log.write_text("\n".join(json.dumps({"prompt": p, "seed": i}) for i, p in enumerate(prompts)) + "\n")
    return log


@pytest.mark.timeout(120)
def test_simulate_prints_the_skip_note_without_guard_inputs(tmp_path, repository, capsys, monkeypatch):
    # Neither a calibration file nor a calibrated repository (the exported one carries the guard's
    # calibration in its pipeline.json: left out here, as for an uncalibrated checkpoint).
    real = simulate.guard_inputs
    monkeypatch.setattr(simulate, "guard_inputs", lambda *a, **k: real(*a[:7], None, *a[8:], **k))
    code = simulate.main([str(tiny_log(tmp_path)), "--model-repository", str(repository), "--policies", "",
                          "--sizes", "none", "--no-compare", "--output", str(tmp_path / "out"),
                          "--guard-calibration", str(tmp_path / "none.json"),
                          "--guard-records", str(tmp_path / "none.jsonl")])
    out = capsys.readouterr().out
    assert code == 0
    assert "guard comparison skipped: neither variant has its inputs" in out
    assert "token guard skipped" in out and "latent guard skipped" in out
    report = json.loads((tmp_path / "out" / "log.json").read_text())
    assert report["guard"]["rows"] == []


@pytest.mark.timeout(120)
def test_simulate_compares_the_guards(tmp_path, repository, capsys):
    records = tmp_path / "tail.jsonl"
    records.write_text("\n".join(json.dumps(record(s, 0.1, 0.9)) for s in (0.75, 0.8, 0.85, 0.9, 0.95)) + "\n")
    code = simulate.main([str(tiny_log(tmp_path)), "--model-repository", str(repository), "--policies", "",
                          "--sizes", "none", "--no-compare", "--output", str(tmp_path / "out"),
                          "--guard-calibration", str(tmp_path / "none.json"), "--guard-records", str(records),
                          "--guard-tokens", CAPS, "--guarded-thresholds", "[[0.9,40],[0.5,10]]",
                          "--guard-bounds", "10:0.35,40:0.35"])
    out = capsys.readouterr().out
    assert code == 0 and "guard comparison skipped" not in out
    rows = json.loads((tmp_path / "out" / "log.json").read_text())["guard"]["rows"]
    assert [(r["label"], r["guard"]) for r in rows] == [
        ("paper's table", "none"), ("current", "none"), ("paper's table", "token (a), replayed"),
        ("guarded thresholds", "token (a), replayed"), ("guarded thresholds", "latent (b), upper bound"),
        ("guarded thresholds", "latent (b), estimate")]
    upper, estimate = rows[-2], rows[-1]
    assert estimate["steps_saved_fraction"] <= upper["steps_saved_fraction"]
    assert np.isclose(estimate["exact_hits"], upper["exact_hits"])
    assert "| guard |" in out and "shapes model's calibration" in out
