"""``+stage=validate``: checks every shard of an SA-1B-format dataset
(``pipeline.dataset.validate``), prints each problem with its shard and key, and exits
with status 1 when there is any.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict

import pyarrow as pa
from omegaconf import DictConfig

from pipeline import storage
from pipeline.config.paths import dataset_paths, output_or_none
from pipeline.dataset.listing import committed_shards
from pipeline.dataset.tables import TableSink
from pipeline.dataset.validate import PROBLEM_SCHEMA, check_manifest, check_plan, check_shard, check_unique
from pipeline.execution.shard_map import map_shards


def run(cfg: DictConfig) -> dict:
    """Returns {"shards", "images", "annotations", "problems", "by_check"}; raises
    SystemExit(1) after printing the problems when there is any."""
    dataset, _ = dataset_paths(cfg)
    stage = cfg.stage
    shards = committed_shards(dataset)
    checks = list(map_shards(check_shard, shards, parallel=stage.parallel,
                             min_shards_for_ray=stage.min_shards_for_ray, cluster=cfg.get("cluster"),
                             desc="validate", decode_images=stage.decode_images,
                             bbox_tolerance_px=stage.bbox_tolerance_px))
    problems = [p for c in checks for p in c.problems]
    problems += check_unique(checks)
    problems += check_manifest(dataset, checks, stage.manifest_ok_status)
    problems += check_plan(dataset)
    by_check: dict[str, int] = defaultdict(int)
    for i, problem in enumerate(problems):
        by_check[problem.check] += 1
        if i < stage.max_printed:
            print(problem)
    summary = {"shards": len(shards), "images": sum(len(c.records) for c in checks),
               "annotations": int(sum(len(c.ann_ids) for c in checks)),
               "problems": len(problems), "by_check": dict(by_check)}
    # Hydra's run directory by default, next to the log; output=null writes nothing. No
    # problems, no table (an empty Parquet table breaks Hugging Face datasets).
    output = output_or_none(cfg)
    if output:
        fs, root = storage.filesystem(output)
        with TableSink(fs, storage.join(root, "validate", "problems.parquet"), PROBLEM_SCHEMA) as sink:
            sink.write(pa.Table.from_pylist([asdict(p) for p in problems], schema=PROBLEM_SCHEMA))
    print(f"validate: {summary['shards']} shards, {summary['images']} images, "
          f"{summary['annotations']} annotations, {len(problems)} problems {dict(by_check)}")
    if problems:
        raise SystemExit(1)
    return summary
