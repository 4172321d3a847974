import pytest
import torch
from opacus.validators import ModuleValidator

from pipeline.core import finetune, models


@pytest.mark.parametrize("name, shape", [
    ("gn_cnn", (1, 28, 28)), ("gn_cnn", (1, 8, 8)), ("resnet18_gn", (3, 32, 32)), ("mlp", (1, 28, 28))])
def test_every_model_is_opacus_compatible_and_maps_images_to_logits(name, shape):
    model = models.build(name, shape, 10, width=8, seed=0)
    assert ModuleValidator.validate(model, strict=False) == []
    assert model(torch.zeros(3, *shape)).shape == (3, 10)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert not any(getattr(m, "inplace", False) for m in model.modules())


def test_same_seed_same_weights():
    a, b = (models.build("gn_cnn", (1, 8, 8), 10, 8, seed=3) for _ in range(2))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_strategies_select_the_documented_parameters():
    model = models.build("gn_cnn", (1, 28, 28), 10, width=8, seed=0)
    fc = finetune.plan_for(model, "fc")
    assert fc.trainable == ["fc.weight", "fc.bias"] and fc.head_only
    fc_gn = finetune.plan_for(model, "fc_gn")
    norms = {n for n, m in model.named_modules() if isinstance(m, torch.nn.GroupNorm)}
    assert set(fc_gn.trainable) == {"fc.weight", "fc.bias"} | {f"{n}.{p}" for n in norms for p in ("weight", "bias")}
    conv = finetune.plan_for(model, "fc_gn_conv", conv_fraction=0.1)
    assert set(conv.trainable) > set(fc_gn.trainable) and conv.masks and not conv.head_only
    assert len(finetune.plan_for(model, "full").trainable) == len(list(model.parameters()))


def test_conv_finetuning_on_a_model_without_convs_is_a_clear_error():
    with pytest.raises(finetune.FinetuneError, match="conv"):
        finetune.plan_for(models.build("mlp", (1, 8, 8), 10, 8, 0), "fc_gn_conv")
