"""`python -m trainer.finetune` (console script simclr-finetune): fine-tune a pretrained backbone on a labeled
fraction. The command lives in trainer/evaluation/finetune.py."""
from trainer.evaluation.finetune import main

if __name__ == "__main__":
    raise SystemExit(main())
