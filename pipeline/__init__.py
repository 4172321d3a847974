"""dpsisa: SISA exact unlearning with differentially private finetuning, on Ray."""
import os

# Ray reads this when it is imported: per-shard progress lines look alike, show them all.
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

__version__ = "0.1.0"
