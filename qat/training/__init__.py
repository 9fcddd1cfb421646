"""Float models and fitting, without quantization: the model (`models`), training with early stopping
(`fit`), distillation from a teacher (`distill`), and the cache of trained float models
(`checkpoints`)."""
