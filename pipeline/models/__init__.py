"""Models as the pipeline knows them: one model spec and loader for SAM, one registry of
trained models (sam, detector, verifier), the box detector, the mask verifier, and a
model's held-out evaluation."""
