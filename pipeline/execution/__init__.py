"""Running units exactly once on Ray: the cluster connection and pool size, the
scheduler (retries, careful tries, isolation), the worker that turns units into
committed shards, the driver every annotating stage runs through, and the shard map of
the reading stages."""
