"""What a registration prints: MLflow's routine chatter is dropped, everything else still shows."""
from __future__ import annotations

import logging
import sys
import warnings

import pytest


def test_registration_drops_mlflows_routine_chatter_and_keeps_every_other_warning_and_line(capsys):
    from mlflow.utils.warnings_utils import color_warning

    from pipeline.tracking.registry import quiet_registration

    level = logging.getLogger("mlflow.pyfunc").level
    with pytest.warns(UserWarning, match="a real problem") as shown, quiet_registration():
        with warnings.catch_warnings():
            warnings.simplefilter("once", category=UserWarning)  # what MLflow's log_model wraps itself in
            color_warning("Add type hints to the `predict` method to enable data validation", stacklevel=1, color="yellow")
            warnings.warn("a real problem", UserWarning, stacklevel=1)
        assert logging.getLogger("mlflow.pyfunc").getEffectiveLevel() == logging.WARNING
        print("Successfully registered model 'm'.", file=sys.stderr)
        print("Registered model 'm' already exists. Creating a new version of this model...", file=sys.stderr)
        print("Created version '2' of model 'm'.", file=sys.stderr)
        print("a line that is not MLflow's routine", file=sys.stderr)
    err = capsys.readouterr().err
    assert "type hints" not in err and "registered model" not in err.lower() and "Created version" not in err
    assert "a line that is not MLflow's routine" in err
    assert not [w for w in shown if "type hints" in str(w.message)]  # dropped; the real problem was shown
    assert logging.getLogger("mlflow.pyfunc").level == level
