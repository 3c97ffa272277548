"""Classifier knowledge distillation: pure losses, methods, plain trainer, CLI (`stpm distill`)."""
