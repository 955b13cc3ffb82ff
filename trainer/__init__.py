"""Distributed SimCLR pretraining: config, model, loss, optimizer, loop, checkpoints and evaluation."""
