"""Evaluation of pretrained backbones: linear probe, kNN and PCA baselines (probe), the results table (report),
feature extraction over ranks (features), the checks run during and after pretraining (monitor), the evaluation
command (evaluate) and fine-tuning (finetune). Entry points: `python -m trainer.eval`, `python -m trainer.finetune`."""
