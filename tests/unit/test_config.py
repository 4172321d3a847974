import pytest

from pipeline import config as C


def test_defaults_are_valid_and_flat_keys_are_dotted():
    flat = C.load().flat()
    assert flat["shards.count"] == 5 and flat["privacy.epsilon"] == 1.0 and flat["finetune.strategy"] == "fc_gn"


def test_override_sets_nested_value_and_parses_yaml_scalars():
    cfg = C.load(None, ["shards.count=10", "privacy.epsilon=null", "train.lr=0.25"])
    assert cfg.shards.count == 10 and cfg.privacy.epsilon is None and cfg.train.lr == 0.25


@pytest.mark.parametrize("override, key", [
    ("shards.cout=3", "shards.cout"),
    ("shard.count=3", "shard"),
    ("privacy.epsilonn=1", "privacy.epsilonn"),
])
def test_unknown_key_is_rejected_with_its_name(override, key):
    with pytest.raises(C.ConfigError, match=key.replace(".", r"\.")):
        C.load(None, [override])


def test_typo_suggests_the_close_key():
    with pytest.raises(C.ConfigError, match="Did you mean 'shards.count'"):
        C.load(None, ["shards.cout=3"])


@pytest.mark.parametrize("override, key", [
    ("shards.count=0", "shards.count"),
    ("shards.slices=0", "shards.slices"),
    ("privacy.epsilon=0", "privacy.epsilon"),
    ("privacy.epsilon=-1", "privacy.epsilon"),
    ("privacy.delta=1", "privacy.delta"),
    ("privacy.delta=0", "privacy.delta"),
    ("finetune.strategy=everything", "finetune.strategy"),
    ("shards.count=two", "shards.count"),
    ("train.epochs=0", "train.epochs"),
    ("partition.strategy=random", "partition.strategy"),
])
def test_impossible_values_are_rejected_with_the_key_named(override, key):
    with pytest.raises(C.ConfigError, match=key.replace(".", r"\.")):
        C.load(None, [override])


def test_yaml_file_with_unknown_section_is_rejected(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("shards:\n  count: 2\nsharding: {count: 3}\n")
    with pytest.raises(C.ConfigError, match="sharding"):
        C.load(path)


def test_missing_and_malformed_files_are_clear_errors(tmp_path):
    with pytest.raises(C.ConfigError, match="not found"):
        C.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("shards: [1, 2\n")
    with pytest.raises(C.ConfigError, match="not valid YAML"):
        C.load(bad)
    with pytest.raises(C.ConfigError, match="key=value"):
        C.load(None, ["shards.count"])


def test_shipped_configs_load():
    for name in ("fmnist", "digits", "cifar10"):
        C.load(f"jobs/configs/{name}.yaml")


def test_privacy_unit_defaults_to_subject_when_partitioning_by_subject_and_to_sample_otherwise():
    assert C.privacy_unit(C.load(None, ["partition.strategy=by_subject"])) == "subject"
    assert C.privacy_unit(C.load(None, [])) == "sample"
    assert C.privacy_unit(C.load(None, ["partition.strategy=by_subject", "privacy.unit=sample"])) == "sample"


def test_unit_subject_with_a_partition_not_by_subject_is_refused_with_one_line_and_exit_3(capsys, tmp_path):
    from pipeline.cli.main import main
    from pipeline.errors import UserError

    with pytest.raises(C.UnitError, match="privacy.unit=subject needs partition.strategy=by_subject") as info:
        C.load(None, ["privacy.unit=subject"])
    assert isinstance(info.value, UserError) and "\n" not in str(info.value)
    with pytest.raises(SystemExit) as code:
        main(["train", "jobs/configs/digits.yaml", "privacy.unit=subject", "--run-dir", str(tmp_path / "run")])
    assert code.value.code == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "partition.strategy=by_subject" in err[0]
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_a_yaml_unit_subject_may_be_completed_by_an_override_of_the_partition(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("privacy:\n  unit: subject\n")
    assert C.privacy_unit(C.load(path, ["partition.strategy=by_subject"])) == "subject"
    with pytest.raises(C.UnitError):
        C.load(path)


@pytest.mark.parametrize("strategy", ["kmeans", "class_balanced"])
def test_data_dependent_partition_with_dp_is_refused_naming_the_hashed_alternative(strategy):
    from pipeline.errors import UserError

    refused = rf"partition.strategy' is {strategy}.*use partition.strategy=uniform \(or by_subject\)"
    with pytest.raises(C.ConfigError, match=refused) as info:
        C.load("jobs/configs/digits.yaml", [f"partition.strategy={strategy}"])
    assert isinstance(info.value, UserError) and info.value.exit_code == 3 and "\n" not in str(info.value)
    with pytest.raises(C.ConfigError, match="privacy.epsilon=0.5"):  # also when DP comes from an override
        C.load(None, [f"partition.strategy={strategy}", "privacy.epsilon=0.5"])


@pytest.mark.parametrize("strategy", ["kmeans", "class_balanced"])
def test_data_dependent_partition_without_dp_is_accepted(strategy):
    config = C.load("jobs/configs/digits.yaml", [f"partition.strategy={strategy}", "privacy.epsilon=null"])
    assert config.partition.strategy == strategy and config.privacy.epsilon is None


def test_hashed_partitions_with_dp_are_accepted():
    for strategy in ("uniform", "by_subject"):
        assert C.load(None, [f"partition.strategy={strategy}"]).privacy.epsilon == 1.0


def test_the_refused_strategies_are_exactly_the_data_dependent_ones_partition_offers():
    from pipeline.data.partition import STRATEGIES

    assert set(C.DATA_DEPENDENT_PARTITIONS) == {name for name, choose in STRATEGIES.items() if choose is not None}
    assert set(C.CHOICES["partition.strategy"]) == {*STRATEGIES, "by_subject"}


def test_config_offers_exactly_the_registered_finetune_strategies():
    from pipeline.core.finetune import STRATEGIES

    assert C.CHOICES["finetune.strategy"] == C.CHOICES["baselines.dp_strategy"] == tuple(STRATEGIES)


def test_every_shipped_run_config_loads():
    from pathlib import Path

    runs = [p for p in sorted(Path("jobs/configs").glob("*.yaml")) if not p.name.startswith("sweep_")]
    assert len(runs) >= 7
    for path in runs:
        C.load(path)


def test_every_shipped_sweep_file_loads_and_each_grid_point_is_a_valid_config():
    from pathlib import Path

    from pipeline.sweep import spec as sweep_spec

    sweeps = sorted(Path("jobs/configs").glob("sweep_*.yaml"))
    assert len(sweeps) >= 3
    for path in sweeps:
        loaded = sweep_spec.load_spec(path)  # validates every grid point against the base config
        assert loaded.points() and all(sweep_spec.trial_config(loaded, point) for point in loaded.points())
    subject = sweep_spec.load_spec("jobs/configs/sweep_fmnist_transfer_subject.yaml")
    assert {C.privacy_unit(sweep_spec.trial_config(subject, p)) for p in subject.points()} == {"subject"}
