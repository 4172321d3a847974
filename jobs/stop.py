"""`ray job submit --working-dir . -- python jobs/stop.py --run-dir RUN`: release kept-alive actors."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the uploaded working dir holds `pipeline`

from pipeline.cli import main  # noqa: E402

if __name__ == "__main__":
    main(["stop", *sys.argv[1:]])
