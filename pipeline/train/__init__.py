"""The training loop: the trainer, its state, evaluation, callbacks, the run config, the model builder and plots."""
