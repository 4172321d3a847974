"""dpsisa: SISA exact unlearning with differentially private finetuning, on Ray."""
__version__ = "0.1.0"
