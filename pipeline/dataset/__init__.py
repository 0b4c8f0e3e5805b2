"""The dataset on disk, one module per file kind: shards (SA-1B tars), manifest and
errors tables, the recorded plan, provenance (config.yaml), the output lease, isolated
inputs; listing (what is committed: every reader goes through it), the mask filter,
Parquet tables, the SA-1B validator and the COCO conversion."""
