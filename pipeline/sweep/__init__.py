"""Ray Tune sweeps: a grid over config keys where each trial is a whole experiment (train →
evaluate → forget k random ids → evaluate) with its shard actors inside the trial's placement
group; one MLflow parent run per sweep, one child run per trial, summary table and plots.

spec (the sweep file) → trial (one experiment, its metrics) → mlflow_runs (parent/child runs) →
runner (Tune, resume, summary, CLI). The names below are the package's public surface (and keep
pickles of sweeps started before the split loadable on resume).
"""
from pipeline.sweep.mlflow_runs import ChildRunCallback, SweepTracking, open_parent
from pipeline.sweep.runner import add_arguments, command, main, max_concurrent_trials, param_space, run_sweep, warm_pretrain_cache
from pipeline.sweep.spec import TRAINABLE_CPUS, SweepError, SweepSpec, expand_grid, load_spec, trial_bundles, trial_config, trial_dir
from pipeline.sweep.trial import (
                                  AFTER,
                                  EVALUATION_METRICS,
                                  FORGET_METRICS,
                                  evaluation_metrics,
                                  forget_metrics,
                                  run_trial,
                                  trial_metrics,
                                  trial_resources,
)

__all__ = ["AFTER", "EVALUATION_METRICS", "FORGET_METRICS", "TRAINABLE_CPUS", "ChildRunCallback", "SweepError", "SweepSpec",
           "SweepTracking", "add_arguments", "command", "evaluation_metrics", "expand_grid", "forget_metrics",
           "load_spec", "main", "max_concurrent_trials", "open_parent", "param_space", "run_sweep", "run_trial",
           "trial_bundles", "trial_config", "trial_dir", "trial_metrics", "trial_resources", "warm_pretrain_cache"]
