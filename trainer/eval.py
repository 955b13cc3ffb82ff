"""`python -m trainer.eval` (console script simclr-eval): linear-probe and kNN tables of a pretrained backbone.
The command lives in trainer/evaluation/evaluate.py."""
from trainer.evaluation.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
