"""The MLflow pyfunc of a dpsisa ensemble, logged as models-from-code: MLflow loads this file,
never a pickle. The model's artifacts are `ensemble` (ensemble.json: architecture, input shape,
per-shard versions), `weights` (one state dict per shard, read with `torch.load(weights_only=True)`)
and `erasure` (erasure.json: whether this version's weights were deleted because it saw data that
was later erased). `predict` takes float32 images normalised like the data loader's samples,
shaped (N, *input_shape), and returns the mean-softmax probabilities (N, classes), as `dpsisa
predict` does. Written by `pipeline/registry.py`.
"""
from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.pyfunc import PythonModel


class ErasedModelError(RuntimeError):
    """This registered version saw data that was erased later: its weights were deleted."""


class EnsembleModel(PythonModel):
    def load_context(self, context) -> None:
        try:
            from pipeline.core import models
        except ImportError:  # outside dpsisa's environment: the copy logged with the model (code_paths)
            import models  # type: ignore[no-redef]

        erasure = json.loads(Path(context.artifacts["erasure"]).read_text())
        if erasure.get("erased"):
            raise ErasedModelError(
                f"this model version saw data erased later (request(s) {', '.join(erasure.get('requests', []))}; "
                f"weights deleted at {erasure.get('erased_at')}); load the run's `live` alias instead")
        meta = json.loads(Path(context.artifacts["ensemble"]).read_text())
        self.input_shape = tuple(meta["input_shape"])
        self.members = []
        for shard in range(meta["shards"]):
            model = models.build(meta["model"], self.input_shape, meta["num_classes"], meta["width"], meta["seed"])
            state = torch.load(Path(context.artifacts["weights"]) / f"shard_{shard:03d}.pt", map_location="cpu",
                               weights_only=True)
            model.load_state_dict(state)
            self.members.append(model.eval())

    def predict(self, context, model_input, params=None) -> np.ndarray:
        x = np.asarray(model_input, dtype=np.float32)
        x = np.ascontiguousarray(x.reshape(-1, *self.input_shape))
        with torch.no_grad():
            inputs = torch.from_numpy(x)
            probs = [torch.softmax(m(inputs), dim=1).numpy() for m in self.members]
        return np.stack(probs).mean(axis=0)


mlflow.models.set_model(EnsembleModel())
