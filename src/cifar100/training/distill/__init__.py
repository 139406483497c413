"""Knowledge distillation: the loss, the teachers, and their cached logits."""
