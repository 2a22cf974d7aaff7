"""Knowledge distillation: losses and the training loop."""
