"""The transfer task (docs/transfer.md): a public model pretrained on a subset of the classes
(`pretrain.classes`), the head re-initialised for all target classes, `public_accuracy`, and the DP
recipe levers (`finetune.ema`, `finetune.augmult`) keeping replays bit for bit. Digits, no Ray."""
import numpy as np
import pytest
import torch

from pipeline.core import finetune, pretrain, privacy
from pipeline.core.train import ShardState, ShardTrainer
from pipeline.data import datasets
from pipeline.data.partition import partition
from pipeline.evaluation import evaluate

SOURCE = "pretrain.classes=[0,1,2,3,4]"
SLICES = 2


@pytest.fixture(scope="module")
def digits_data():
    from pipeline.config import DataConfig

    return datasets.load(DataConfig(name="digits", public_size=400))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return f"pretrain.cache_dir={tmp_path_factory.mktemp('pretrained')}"


def test_class_subset_pretraining_trains_on_the_source_classes_only_with_a_head_over_them(digits_config, digits_data, cache):
    config = digits_config(SOURCE, cache)
    x, y = pretrain.source_task(config, digits_data)
    in_source = np.isin(digits_data.public.y, [0, 1, 2, 3, 4])
    assert len(y) == int(in_source.sum()) < len(digits_data.public.y)
    assert np.array_equal(x, digits_data.public.x[in_source]) and set(y.tolist()) == {0, 1, 2, 3, 4}
    model, info = pretrain.public_model(config, digits_data)
    assert model.fc.out_features == 5 and info["source_classes"] == [0, 1, 2, 3, 4]
    _, reordered = pretrain.source_task(digits_config("pretrain.classes=[7,2]", cache), digits_data)
    assert set(reordered.tolist()) == {0, 1}  # head index k is class classes[k]


def test_the_cache_key_names_the_source_classes_and_the_same_source_task_is_a_cache_hit(digits_config, digits_data, cache):
    first_half, second_half = digits_config(SOURCE, cache), digits_config("pretrain.classes=[5,6,7,8,9]", cache)
    model, info = pretrain.public_model(first_half, digits_data)
    # same head size and architecture: only the source classes tell the two keys apart
    assert pretrain.cache_key(first_half, digits_data, model) != pretrain.cache_key(second_half, digits_data, model)
    assert pretrain.cache_key(digits_config(cache), digits_data, model) != info["cache_key"]
    again, hit = pretrain.public_model(digits_config(SOURCE, cache), digits_data)
    assert hit["cached"] and hit["cache_key"] == info["cache_key"]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_the_reinitialised_head_has_ten_outputs_differs_from_the_source_head_and_depends_on_the_public_seed_only(
        digits_config, digits_data, cache):
    heads = []
    for run_seed in (0, 7):  # two runs (or a LiRA reference) sharing the public seed
        config = digits_config(SOURCE, cache, f"seed={run_seed}", "pretrain.seed=3")
        source, _ = pretrain.public_model(config, digits_data)
        target = pretrain.for_target(source, config, digits_data)
        assert target.fc.out_features == 10 and source.fc.out_features == 5
        assert not torch.equal(target.fc.weight[:5], source.fc.weight)
        assert all(torch.equal(a, b) for a, b in zip(target.features.state_dict().values(), source.features.state_dict().values()))
        heads.append(target.fc.state_dict())
    assert all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])
    other = digits_config(SOURCE, cache, "pretrain.seed=4")
    other_head = pretrain.for_target(pretrain.public_model(other, digits_data)[0], other, digits_data).fc
    assert not torch.equal(other_head.weight, heads[0]["weight"])


def test_without_a_class_subset_the_public_model_keeps_its_head(digits_config, digits_data, cache):
    config = digits_config(cache)
    source, _ = pretrain.public_model(config, digits_data)
    assert pretrain.for_target(source, config, digits_data) is source


def test_public_accuracy_counts_classes_outside_the_source_task_as_wrong(digits_config, digits_data, cache):
    config = digits_config(SOURCE, cache)
    source, info = pretrain.public_model(config, digits_data)
    predicted = pretrain.source_predictions(source, info["source_classes"], digits_data.test.x)
    assert set(predicted.tolist()) <= {0, 1, 2, 3, 4}
    unseen = digits_data.test.y >= 5
    accuracy = evaluate.public_accuracy(source, info["source_classes"], config, digits_data)
    assert accuracy == float((predicted == digits_data.test.y).mean())
    assert accuracy <= 1 - unseen.mean() + 1e-12 and accuracy > 0.3
    upper = digits_config("pretrain.classes=[5,6,7,8,9]", cache)
    upper_model, upper_info = pretrain.public_model(upper, digits_data)
    assert set(pretrain.source_predictions(upper_model, upper_info["source_classes"], digits_data.test.x).tolist()) <= {5, 6, 7, 8, 9}


# -- recipe levers: bit-exact replays -------------------------------------------------------------

def _trainer(digits_config, data, cache, strategy="fc_gn", **levers):
    config = digits_config(SOURCE, cache, f"finetune.strategy={strategy}", "privacy.epsilon=1.0", "train.epochs=1")
    model, _ = pretrain.pretrained_model(config, data)
    plan = finetune.plan_for(model, strategy, 0.05)
    cols = partition(data.private.ids, data.private.y, 2, SLICES, "uniform", seed=0)
    mine = cols["shard"] == 0
    slices = [cols["sample_id"][mine & (cols["slice"] == r)] for r in range(SLICES)]
    recipe = privacy.make_recipe(config, 0, [len(s) for s in slices])
    return ShardTrainer(model, plan, recipe, seed=0, shard=0, **levers), slices


def _data(data, slices):
    return [(data.private.x[s], data.private.y[s]) for s in slices]


def _equal(a: ShardState, b: ShardState) -> bool:
    same = a.params.keys() == b.params.keys() and a.ema.keys() == b.ema.keys()
    return same and all(torch.equal(a.params[k], b.params[k]) for k in a.params) and \
        all(torch.equal(a.ema[k], b.ema[k]) for k in a.ema)


@pytest.mark.parametrize("levers", [{"ema": 0.9}, {"augmult": 2}, {"ema": 0.9, "augmult": 2}], ids=str)
def test_a_replay_with_a_recipe_lever_on_equals_from_scratch_training_bit_for_bit(digits_config, digits_data, cache, levers):
    trainer, slices = _trainer(digits_config, digits_data, cache, **levers)
    checkpoints = {}
    original = trainer.train(_data(digits_data, slices), on_stage=lambda j, s: checkpoints.__setitem__(j, s),
                             draws=[0, 0])
    stored = ShardState.from_payload(checkpoints[0].payload())  # what the stage-0 checkpoint carries
    forgotten = slices[1][[0, 3, 8]]
    kept = [s[~np.isin(s, forgotten)] for s in slices]
    replayed = trainer.train(_data(digits_data, kept), start_stage=1, state=stored, draws=[0, 1])
    oracle = trainer.train(_data(digits_data, kept), draws=[0, 1])  # verify's from-scratch retraining
    assert _equal(replayed, oracle)
    assert not _equal(original, oracle)
    assert bool(original.ema) == ("ema" in levers) == ("ema" in checkpoints[0].payload())
    plain, _ = _trainer(digits_config, digits_data, cache)
    assert not _equal(plain.train(_data(digits_data, slices), draws=[0, 0]), original)  # the lever changed training


def test_the_ema_weights_are_what_the_shard_serves(digits_config, digits_data, cache):
    trainer, slices = _trainer(digits_config, digits_data, cache, ema=0.9)
    state = trainer.train(_data(digits_data, slices))
    served = dict(trainer.model(state).named_parameters())
    assert all(torch.equal(served[name], state.ema[name]) for name in state.ema)
    assert not all(torch.equal(state.ema[name], state.params[name]) for name in state.ema)


def test_augmentation_multiplicity_draws_differ_by_step_and_release_draw(digits_config, digits_data, cache):
    trainer, slices = _trainer(digits_config, digits_data, cache, augmult=3)
    x = torch.from_numpy(digits_data.private.x[slices[0][:4]])
    y = torch.from_numpy(digits_data.private.y[slices[0][:4]])
    batch, labels = trainer._augmented(x, y, stage=0, draw=0, step=5)
    assert batch.shape == (12, *x.shape[1:]) and torch.equal(labels, y.repeat_interleave(3))
    assert torch.equal(batch, trainer._augmented(x, y, stage=0, draw=0, step=5)[0])
    for other in ({"stage": 1, "draw": 0, "step": 5}, {"stage": 0, "draw": 1, "step": 5}, {"stage": 0, "draw": 0, "step": 6}):
        assert not torch.equal(batch, trainer._augmented(x, y, **other)[0])
