"""Images with their true masks: ground-truth readers (synthetic, shards, COCO), the
procedural synthetic scenes, and pools of scenes written with their truth."""
