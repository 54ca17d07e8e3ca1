"""nirvana-train end to end at toy size: every stage runs and writes loadable weights."""

import json

import pytest
import torch

from nirvana_export import embedded
from nirvana_quality import scorer, train

pytestmark = pytest.mark.timeout(600)


def test_all_stages_write_weights_the_export_loads(tmp_path):
    code = train.main(["--output", str(tmp_path), "--captions", "16", "--renders", "2", "--scorer-steps", "2",
                       "--vae-steps", "2", "--vae-batch", "4", "--unet-steps", "2", "--unet-batch", "4",
                       "--threads", "1"])
    assert code == 0
    card = json.loads((tmp_path / embedded.TRAINING_CARD).read_text())
    assert {"scorer", "vae", "unet"} <= set(card) and card["dataset"]["captions"] == 16
    assert embedded.has_trained_weights(tmp_path)
    vae = embedded.build_vae(tmp_path / embedded.VAE_WEIGHTS)
    assert vae.config.scaling_factor == pytest.approx(card["vae"]["scaling_factor"], rel=1e-4)
    unet = embedded.build_unet(384, tmp_path / embedded.UNET_WEIGHTS)
    untrained = embedded.build_unet(384)
    changed = any(not torch.equal(a, b) for a, b in zip(unet.state_dict().values(), untrained.state_dict().values()))
    assert changed
    scorer.load_scorer(tmp_path / embedded.SCORER_WEIGHTS)


def test_unknown_stage_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.main(["--output", str(tmp_path), "--stages", "vae,clip"])
    assert "unknown stages" in capsys.readouterr().err
