"""nirvana-replicas-bench on a log built so that every repeat lands on the other replica."""

import json

import pytest

from nirvana_perf import replicas

PROMPTS = ["a red circle", "two green squares on a striped background", "a lighthouse at dawn", "a bowl of ramen",
           "a snowy mountain cabin", "a neon city street in the rain", "a watercolor fox", "an astronaut riding a horse",
           "a field of sunflowers", "a paper boat on a puddle", "a medieval castle on a hill"]


@pytest.mark.timeout(300)
def test_a_shared_cache_recovers_the_hits_that_separate_replicas_lose(repository, tmp_path):
    # 11 prompts (odd), each sent twice with its seed: round-robin sends the repeat to the other replica.
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"prompt": p, "seed": i}) + "\n" for _ in range(2) for i, p in enumerate(PROMPTS)))
    report = replicas.run(repository, log, output=tmp_path / "out")
    by_label = {r["label"]: r for r in report["replay"]}
    assert by_label["one server"]["exact_hits"] == len(PROMPTS)
    assert by_label["separate"]["exact_hits"] == 0  # each repeat went to the replica that had not seen it
    assert by_label["shared"]["exact_hits"] == len(PROMPTS)
    assert by_label["shared"]["fetches"] >= len(PROMPTS) and by_label["shared"]["errors"] == 0
    assert report["shared_vs_one"] == pytest.approx(1.0) and report["target_met"]
    assert report["separate_vs_one"] < 1.0
    assert "| shared |" in (tmp_path / "out" / "replicas.md").read_text()
