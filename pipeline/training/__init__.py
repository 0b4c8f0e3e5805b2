"""Training with Ray Train, one stack for every model the engine trains (SAM and the box
detector), split by concern (as sam2's ``training/``):

    trainer.py       the driver side: TorchTrainer wiring, storage, resume, progress lines
    checkpoints.py   checkpoint folders: written whole, marked complete last, found again
    registration.py  a trained model registered under ``<output>/models/``
    optim.py         optimizers and learning-rate schedules
    stream.py        SAM's endless, resumable stream mixing the ground-truth sources
    worker.py        SAM's worker loop around ``sam_core.training.train_step``
    detector.py      the detector's data, worker loop and driver
    plots.py         the training curve of a registered model

The model, losses and prompt simulation are ``sam_core.training`` (no Ray, no files);
the sources are ``pipeline.truth``; the registry's layout is ``pipeline.models.registry``.
"""
