"""Retraining a model with Ray Train, split by concern (as sam2's ``training/``):

    stream.py       the endless, resumable training stream mixing the ground-truth sources
    optim.py        optimizer (AdamW without decay on norms and biases) and lr schedule
    checkpoints.py  checkpoint folders: written whole, marked complete last, found again
    worker.py       the Ray Train worker loop around ``sam_core.training.train_step``
    trainer.py      the driver side: worker settings, TorchTrainer wiring, storage
    plots.py        the training curve of a registered model

The model, losses and prompt simulation are ``sam_core.training`` (no Ray, no files);
the sources are ``pipeline.truth.ground_truth``; registered versions are ``pipeline.models.registry``.
"""
