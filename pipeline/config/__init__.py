"""The configuration around Hydra: what may run (``guard``), the resolvers configs use
(``resolvers``) and the user paths in a configuration, made absolute once (``paths``).

Importing the package registers the resolvers, so every way of composing a config (the
command line, ``jobs/submit.py``, a test with ``hydra.compose``) sees them."""
from pipeline.config import resolvers  # noqa: F401  registers ${project_root:}
