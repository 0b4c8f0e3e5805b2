"""OmegaConf resolvers the configs in ``conf/`` use, registered once at import."""
from __future__ import annotations

from omegaconf import OmegaConf

from pipeline.paths import PROJECT_ROOT

# ${project_root:} lets configs name files shipped with the repository (sample images,
# the default model) independently of the working directory.
if not OmegaConf.has_resolver("project_root"):
    OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT))
