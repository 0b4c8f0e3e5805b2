"""What loop and engine (the stages that compose other stages) share: configs derived
for their sub-stages (``settings``), resumable phases (``phases``), and the engine's
figures and report (``engine_report``)."""
