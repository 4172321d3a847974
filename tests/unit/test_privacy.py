import pytest

from pipeline import config as C
from pipeline.core.privacy import Recipe, calibrate_noise, make_recipe, release_epsilon, schedule, spent_epsilon


def test_schedule_keeps_epochs_per_stage_and_rates_shrink_with_cumulative_data():
    stages = schedule([1000, 1000, 1000, 1000], batch_size=100, epochs=2)
    assert [s.samples for s in stages] == [1000, 2000, 3000, 4000]
    assert [s.sample_rate for s in stages] == [0.1, 0.05, 100 / 3000, 0.025]
    assert [s.steps for s in stages] == [20, 40, 60, 80]


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
@pytest.mark.parametrize("epsilon", [0.5, 1.0, 3.0])
def test_spent_epsilon_of_a_multi_slice_schedule_is_within_5_percent_below_target(accountant, epsilon):
    cfg = C.load(None, [f"privacy.epsilon={epsilon}", f"privacy.accountant={accountant}", "train.batch_size=64"])
    recipe = make_recipe(cfg, 0, [500, 500, 500, 500, 500])
    assert recipe.epsilon_spent <= epsilon
    assert recipe.epsilon_spent >= 0.95 * epsilon
    # the recipe's ε is what Opacus reports for the composition of all five stages
    history = [(recipe.noise_multiplier, s.sample_rate, s.steps) for s in recipe.stages]
    assert spent_epsilon(tuple(history), recipe.delta, accountant) == pytest.approx(recipe.epsilon_spent)


def test_more_noise_for_a_smaller_budget():
    stages = schedule([400, 400, 400], 50, 1)
    assert calibrate_noise(stages, 0.5, 1e-5, "rdp") > calibrate_noise(stages, 2.0, 1e-5, "rdp")


def test_non_private_recipe_has_no_noise_and_no_epsilon():
    recipe = make_recipe(C.load(None, ["privacy.epsilon=null"]), 0, [100, 100])
    assert not recipe.private and recipe.epsilon_spent is None and release_epsilon(recipe, [0]) is None


def test_each_release_adds_exposure_and_recipe_round_trips():
    recipe = make_recipe(C.load(None, ["train.batch_size=64"]), 2, [300, 300, 300])
    once, twice = release_epsilon(recipe, [2]), release_epsilon(recipe, [2, 0])
    assert recipe.epsilon_spent < once < twice
    assert Recipe.from_dict(recipe.to_dict()) == recipe
