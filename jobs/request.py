"""`ray job submit --working-dir . -- python jobs/status.py ...`: same arguments as `dpsisa request`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the uploaded working dir holds `pipeline`

from pipeline.cli import main  # noqa: E402

if __name__ == "__main__":
    main(["request", *sys.argv[1:]])
