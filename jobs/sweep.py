"""`ray job submit --working-dir . -- python jobs/sweep.py jobs/configs/sweep_fmnist.yaml [key=value ...] [--resume]`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the uploaded working dir holds `pipeline`

from pipeline.sweep import main  # noqa: E402

if __name__ == "__main__":
    main(sys.argv[1:])
