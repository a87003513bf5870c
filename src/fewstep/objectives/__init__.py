"""Training objectives, each a small callable ``objective(model, batch) -> (loss, logs)``: denoising,
consistency (with its curricula), guided and progressive distillation, adversarial consistency, and
the distances they use."""
