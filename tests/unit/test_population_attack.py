"""`evaluate`'s population attack (posterior, loss, logistic): members are only the ids the live model trained on."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.data import datasets
from pipeline.data.partition import partition
from pipeline.evaluation import evaluate
from pipeline.evaluation.lira import paired_halves
from pipeline.storage.ledger import Ledger


class _MemorisingEnsemble:
    """What `membership_inference` reads from an ensemble — `config`, `ledger`, `predict_mean` — over a model that
    has memorised exactly the ids its ledger assigns (an exact-match lookup): confident on them, uniform elsewhere."""

    def __init__(self, config, ledger: Ledger, data: datasets.Data):
        self.config, self.ledger = config, ledger
        trained = ledger.assignments()["sample_id"].to_numpy()
        self.memory = {data.private.x[i].tobytes(): int(data.private.y[i]) for i in trained}
        self.classes = data.num_classes

    def predict_mean(self, x: np.ndarray) -> np.ndarray:
        probs = np.full((len(x), self.classes), 1.0 / self.classes)
        for row, image in enumerate(x):
            label = self.memory.get(image.tobytes())
            if label is not None:
                probs[row] = 0.01 / (self.classes - 1)
                probs[row, label] = 0.99
        return probs


def test_population_attack_on_a_keep_half_run_counts_only_the_trained_half_as_members(digits_config, tmp_path):
    config = digits_config()
    data = datasets.load(config.data)
    keep = paired_halves(1, len(data.private.ids), 7)[0]  # what data.keep_half=7 trains on
    ids = data.private.ids[keep]
    ledger = Ledger(tmp_path)
    columns = partition(ids, data.private.y[ids], 2, 2, "uniform", config.seed)
    ledger.write_assignments({**columns, "label": data.private.y[columns["sample_id"]]})
    forgotten = {int(ids[0]), int(ids[1])}

    result = evaluate.membership_inference(_MemorisingEnsemble(config, ledger, data), data, forgotten, seed=0)

    trained = len(ids) - len(forgotten)
    for name in ("posterior", "loss"):
        attack = result["mia"][name]
        assert attack["n_members"] == min(evaluate.MIA_SAMPLES, trained, len(data.test.ids))
        # every member was memorised: the attack separates them from test non-members perfectly. Counting the
        # untrained half as members (as before) put uniform outputs among the members: AUC ≈ 0.75
        assert attack["auc"] == pytest.approx(1.0)
