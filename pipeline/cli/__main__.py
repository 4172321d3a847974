"""`python -m pipeline.cli ...`: the same as `dpsisa ...`."""
from pipeline.cli.main import main

main()
