"""Checkpoints are data, never code: stage files are hash-checked against the manifest and every
`.pt` file is read with weights_only loading, so a file written by anyone with bucket access can
neither run code nor be loaded silently corrupted (fast, no Ray)."""
from __future__ import annotations

import io
import json
import pathlib
from types import SimpleNamespace

import pytest
import torch

from pipeline.core.checkpoints import CheckpointIntegrityError, Manifest, ShardStore, load_torch, save_torch, sha256_hex
from pipeline.core.privacy import Recipe, Stage


class _RunsCode:
    """Unpickling this creates `marker`: what an attacker's file would do under weights_only=False."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def _payload(stage: int = 0) -> dict:
    """The same kinds of values `Shard._payload` stores: tensors, ints, strings, the recipe dict."""
    gen = torch.Generator().manual_seed(stage)
    recipe = Recipe(shard=1, stages=(Stage(0, 40, 0.25, 12), Stage(1, 80, 0.125, 24)), batch_size=10, lr=0.1,
                    momentum=0.9, noise_multiplier=1.1, max_grad_norm=1.0, epsilon_target=8.0, epsilon_spent=7.9,
                    delta=1e-5, accountant="rdp")
    return {"params": {"fc.weight": torch.randn(10, 16, generator=gen), "fc.bias": torch.randn(10, generator=gen)},
            "momentum": {"fc.weight": torch.randn(10, 16, generator=gen)}, "stage": stage, "version": 0,
            "ids_digest": f"digest-{stage}", "samples": 40 * (stage + 1), "seed": 7, "recipe": recipe.to_dict()}


def _committed(tmp_path, stages: int = 2) -> tuple[ShardStore, Manifest, list[dict]]:
    store = ShardStore(tmp_path, 1)
    payloads = [_payload(j) for j in range(stages)]
    entries = [store.write_stage(j, 0, p) for j, p in enumerate(payloads)]
    manifest = Manifest(1, 0, entries, [], [])
    store.commit(None, manifest)
    return store, store.manifest(), payloads


def _evil_bytes(marker: pathlib.Path) -> bytes:
    buffer = io.BytesIO()
    torch.save({"params": _RunsCode(marker), "stage": 1}, buffer)
    return buffer.getvalue()


def test_round_trip_is_bit_identical_and_hash_recorded(tmp_path):
    store, manifest, payloads = _committed(tmp_path)
    for j, payload in enumerate(payloads):
        entry = manifest.stages[j]
        assert entry["sha256"] == sha256_hex((store.dir / entry["file"]).read_bytes())
        loaded = store.load_stage(manifest, j)
        for group in ("params", "momentum"):
            for name, tensor in payload[group].items():
                assert torch.equal(loaded[group][name], tensor) and loaded[group][name].dtype == tensor.dtype
        assert {k: v for k, v in loaded.items() if k not in ("params", "momentum")} == \
               {k: v for k, v in payload.items() if k not in ("params", "momentum")}
        assert Recipe.from_dict(loaded["recipe"]) == Recipe.from_dict(payload["recipe"])
    assert store.damaged(manifest) == []


def test_flipped_byte_fails_the_integrity_check_naming_the_file(tmp_path):
    store, manifest, _ = _committed(tmp_path)
    path = store.dir / manifest.stages[1]["file"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointIntegrityError, match="failed its integrity check") as info:
        store.load_stage(manifest, 1)
    assert "shard_001/stage_1.v0.pt" in str(info.value) and "manifest.json" in str(info.value)
    assert "\n" not in str(info.value)  # one line for the CLI
    store.load_stage(manifest, 0)  # the untouched stage still loads
    assert store.damaged(manifest) == ["stage_1.v0.pt"]


def test_code_in_a_stage_file_never_runs_even_with_a_rewritten_manifest(tmp_path):
    store, manifest, _ = _committed(tmp_path)
    marker = tmp_path / "MARKER"
    evil = _evil_bytes(marker)
    (store.dir / manifest.stages[1]["file"]).write_bytes(evil)
    forged = json.loads((store.dir / "manifest.json").read_text())  # the attacker can write the manifest too
    forged["stages"][1]["sha256"] = sha256_hex(evil)
    (store.dir / "manifest.json").write_text(json.dumps(forged))
    with pytest.raises(CheckpointIntegrityError, match="weights_only loading refuses") as info:
        store.load_stage(store.manifest(), 1)
    assert "stage_1.v0.pt" in str(info.value) and "possible tampering" in str(info.value)
    assert "weights_only=False" not in str(info.value)  # never suggest the unsafe way out
    assert not marker.exists()


def test_manifest_without_hashes_still_loads_with_weights_only(tmp_path):
    store, manifest, payloads = _committed(tmp_path)
    old = json.loads((store.dir / "manifest.json").read_text())
    for entry in old["stages"]:
        del entry["sha256"]  # written before hashes were recorded
    (store.dir / "manifest.json").write_text(json.dumps(old))
    legacy = store.manifest()
    assert torch.equal(store.load_stage(legacy, 0)["params"]["fc.weight"], payloads[0]["params"]["fc.weight"])
    marker = tmp_path / "MARKER"
    (store.dir / legacy.stages[1]["file"]).write_bytes(_evil_bytes(marker))
    with pytest.raises(CheckpointIntegrityError, match="weights_only loading refuses"):
        store.load_stage(legacy, 1)
    assert not marker.exists()


def test_truncated_file_without_hash_is_a_clear_error(tmp_path):
    path = tmp_path / "pretrained.pt"
    save_torch(path, {"w": torch.ones(3)})
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(CheckpointIntegrityError, match="could not be read.*corrupted or truncated"):
        load_torch(path)


def test_pretrained_model_load_refuses_code(tmp_path, digits_config):
    from pipeline.core import models
    from pipeline.storage.rundir import RunDir

    config = digits_config()
    data = SimpleNamespace(input_shape=(1, 8, 8), num_classes=10)
    model = models.build(config.model.name, data.input_shape, data.num_classes, config.model.width, config.seed)
    run = RunDir(tmp_path)
    run.write_pretrained(model, data.input_shape, data.num_classes)
    loaded = run.pretrained_model(config)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))

    marker = tmp_path / "MARKER"
    evil = _evil_bytes(marker)
    (tmp_path / "pretrained.pt").write_bytes(evil)
    with pytest.raises(CheckpointIntegrityError, match="pretrained.pt failed its integrity check"):
        run.pretrained_model(config)
    info = json.loads((tmp_path / "model.json").read_text())  # an attacker who can also rewrite model.json
    (tmp_path / "model.json").write_text(json.dumps({**info, "sha256": sha256_hex(evil)}))
    with pytest.raises(CheckpointIntegrityError, match="pretrained.pt holds non-tensor objects"):
        run.pretrained_model(config)
    with pytest.raises(CheckpointIntegrityError):
        load_torch(tmp_path / "pretrained.pt")  # the pretrain cache (pipeline.core.pretrain) uses the same loader
    assert not marker.exists()


@pytest.mark.parametrize("junk", [b"", b"junk", b"\x80\x02}q\x00.", bytes(range(256)) * 4])
def test_arbitrary_bytes_are_a_checkpoint_error_not_a_crash(tmp_path, junk):
    path = tmp_path / "pretrained.pt"
    path.write_bytes(junk)
    with pytest.raises(CheckpointIntegrityError, match="pretrained.pt"):
        load_torch(path)
