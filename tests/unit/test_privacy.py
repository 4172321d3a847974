import math

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
def test_spent_epsilon_of_a_multi_slice_schedule_is_within_5_percent_below_target(accountant, epsilon, tmp_path):
    cfg = C.load(None, [f"privacy.epsilon={epsilon}", f"privacy.accountant={accountant}", "train.batch_size=64",
                        f"pretrain.cache_dir={tmp_path}"])  # an empty cache: the calibration search runs
    recipe = make_recipe(cfg, 0, [500, 500, 500, 500, 500])
    assert recipe.epsilon_spent <= epsilon
    assert recipe.epsilon_spent >= 0.95 * epsilon
    # the recipe's ε is what Opacus reports for the composition of all five stages
    history = [(recipe.noise_multiplier, s.sample_rate, s.steps) for s in recipe.stages]
    assert spent_epsilon(tuple(history), recipe.delta, accountant) == pytest.approx(recipe.epsilon_spent)


@pytest.mark.parametrize("accountant, sizes, batch, epochs, epsilon", [
    ("prv", [400, 400, 400], 50, 1, 2.0), ("prv", [1000] * 4, 256, 2, 8.0), ("rdp", [400, 400, 400], 50, 1, 2.0),
    ("rdp", [200, 200], 64, 4, 1.0), ("rdp", [1000] * 4, 256, 2, 8.0), ("rdp", [100] * 5, 64, 10, 0.5)])
def test_the_calibration_lands_in_its_band_within_five_accountant_calls(accountant, sizes, batch, epochs, epsilon, monkeypatch):
    """The search is a secant from the μ-GDP guess: a handful of accountant calls where bisection over
    SIGMA_BOUNDS made ~12 (seconds each with PRV; the suite calibrates dozens of schedules)."""
    from pipeline.core import privacy

    calls = []
    real = privacy.spent_epsilon
    monkeypatch.setattr(privacy, "spent_epsilon", lambda *a: calls.append(a[0][0][0]) or real(*a))
    stages = schedule(sizes, batch, epochs)
    sigma = privacy.calibrate_noise.__wrapped__(stages, epsilon, 1e-5, accountant)
    assert privacy.CALIBRATION_BAND * epsilon <= real(tuple((sigma, s.sample_rate, s.steps) for s in stages), 1e-5,
                                                      accountant) <= epsilon
    assert len(set(calls)) <= 5, calls


def test_a_target_that_even_the_largest_sigma_misses_is_refused_and_a_lax_one_needs_little_noise():
    from pipeline.core import privacy

    stages = schedule([20, 20], 16, 50)
    with pytest.raises(privacy.PrivacyError, match="cannot be met even with"):
        calibrate_noise.__wrapped__(stages, 0.01, 1e-5, "rdp")
    lax = calibrate_noise.__wrapped__(schedule([400, 400, 400], 50, 1), 5000.0, 1e-5, "rdp")
    assert privacy.SIGMA_BOUNDS[0] <= lax < 0.1


def _cached_recipe(tmp_path, shard=0):
    cfg = C.load(None, ["privacy.accountant=rdp", "train.batch_size=64", f"pretrain.cache_dir={tmp_path}"])
    return make_recipe(cfg, shard, [300, 300])


def test_a_calibration_is_remembered_and_the_same_schedule_is_not_searched_again(tmp_path, monkeypatch):
    from pipeline.core import privacy

    first = _cached_recipe(tmp_path)
    assert len(list((tmp_path / "calibration").glob("*.json"))) == 1

    def no_search(*args):
        raise AssertionError("searched again")

    monkeypatch.setattr(privacy, "calibrate_noise", no_search)
    again = _cached_recipe(tmp_path, shard=1)
    assert (again.noise_multiplier, again.epsilon_spent) == (first.noise_multiplier, first.epsilon_spent)


@pytest.mark.parametrize("stored", ["half", "double", "garbage"])
def test_a_remembered_sigma_outside_the_target_band_is_searched_afresh_and_overwritten(tmp_path, stored):
    """An edited or stale file never lowers the noise: too little (ε above target), too much (ε far
    below it) or unreadable, the search runs again and its σ replaces the file."""
    import json

    first = _cached_recipe(tmp_path)
    (path,) = (tmp_path / "calibration").glob("*.json")
    sigma = first.noise_multiplier
    path.write_text({"half": json.dumps({"sigma": sigma / 2}), "double": json.dumps({"sigma": sigma * 2}),
                     "garbage": "{not json"}[stored])
    again = _cached_recipe(tmp_path)
    assert again.noise_multiplier == sigma and again.epsilon_spent <= again.epsilon_target
    assert json.loads(path.read_text()) == {"sigma": sigma}


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


def test_unit_subject_recipe_records_the_subject_rate_and_epsilon_is_recomputable_from_recipes_json(tmp_path):
    """recipes.json alone gives ε per person: unit, σ, each stage's subject rate q_j = B / subjects_j
    and step count, δ and the accountant, fed to Opacus' accountant directly."""
    import json

    from opacus.accountants import RDPAccountant

    from pipeline.storage.rundir import RunDir

    cfg = C.load(None, ["partition.strategy=by_subject", "privacy.accountant=rdp", "train.batch_size=32", "privacy.epsilon=1.0"])
    recipe = make_recipe(cfg, 0, [900, 600, 300], subject_counts=[300, 200, 100])
    RunDir(tmp_path).write_recipes([recipe])
    (stored,) = json.loads((tmp_path / "recipes.json").read_text())
    assert stored["unit"] == "subject"
    assert [s["subjects"] for s in stored["stages"]] == [300, 500, 600]
    assert [s["sample_rate"] for s in stored["stages"]] == [32 / 300, 32 / 500, 32 / 600]  # per subject, not per sample
    assert [s["steps"] for s in stored["stages"]] == [10, 16, 19]  # one epoch of subjects per stage
    accountant = RDPAccountant()
    accountant.history = [(stored["noise_multiplier"], s["sample_rate"], s["steps"]) for s in stored["stages"]]
    assert accountant.get_epsilon(delta=stored["delta"]) == pytest.approx(stored["epsilon_spent"])
    assert 0.95 <= stored["epsilon_spent"] <= 1.0
    assert Recipe.from_dict(stored) == recipe


def test_without_dp_a_per_person_run_trains_as_ordinary_minibatch_sgd_over_samples():
    """No ε, no unit to protect: a by_subject run without DP samples images at B/n and averages over
    them, as the same run partitioned per sample does (before: it sampled people and divided their
    summed gradients by B people, a ~k times larger step with k images each)."""
    by_subject = C.load(None, ["partition.strategy=by_subject", "privacy.unit=subject", "privacy.epsilon=null",
                               "train.batch_size=32"])
    recipe = make_recipe(by_subject, 0, [900, 600], subject_counts=[300, 200])
    assert recipe.unit == "sample" and not recipe.private
    assert [s.sample_rate for s in recipe.stages] == [32 / 900, 32 / 1500]
    plain = make_recipe(C.load(None, ["privacy.epsilon=null", "train.batch_size=32"]), 0, [900, 600])
    assert recipe == plain
    assert make_recipe(C.load(None, ["partition.strategy=by_subject", "train.batch_size=32", "privacy.epsilon=1.0"]),
                       0, [900, 600], subject_counts=[300, 200]).unit == "subject"  # with DP: per person


def test_a_recipe_from_before_privacy_units_reads_as_unit_sample():
    recipe = make_recipe(C.load(None, ["train.batch_size=64", "privacy.accountant=rdp"]), 0, [300, 300])
    old = recipe.to_dict()
    del old["unit"]
    for stage in old["stages"]:
        del stage["subjects"]
    assert Recipe.from_dict(old) == recipe and recipe.unit == "sample"


def test_group_bound_is_k_epsilon_and_k_e_to_the_k_minus_1_epsilon_delta_and_vacuous_from_delta_1():
    from pipeline.core.privacy import group_bound, person_privacy

    bound = group_bound(1.0, 1e-5, 3)
    assert bound["epsilon"] == 3.0 and bound["delta"] == pytest.approx(3 * math.exp(2.0) * 1e-5) and not bound["vacuous"]
    assert not group_bound(1.0, 1e-5, 10)["vacuous"] and group_bound(1.0, 1e-5, 11)["vacuous"]  # issue 20: vacuous at ε=1 from k=11
    assert not group_bound(2.0, 1e-5, 5)["vacuous"] and group_bound(2.0, 1e-5, 6)["vacuous"]  # and at ε=2 from k=6
    sample = person_privacy("sample", 2.0, 1e-5, 8)
    assert sample["privacy_unit"] == "sample" and sample["group_bound"]["vacuous"] and sample["epsilon_per_person"] is None
    assert person_privacy("sample", 1.0, 1e-5, 2)["epsilon_per_person"] == 2.0
    assert person_privacy("subject", 1.0, 1e-5, None) == {"privacy_unit": "subject", "epsilon_per_person": 1.0,
                                                          "delta_per_person": 1e-5, "group_bound": None}
