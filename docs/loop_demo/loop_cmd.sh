# $1: output dir; further args: extra overrides
out=$1; shift
exec .venv/bin/python -m pipeline.run +stage=loop \
  input=runs/loop_demo2/pool output=$out cluster.num_cpus=1 model=vit_tiny \
  stage.init_checkpoint=runs/loop_demo2/models/start/model.pth stage.rounds=2 \
  amg.points_per_side=16 stage.fully_auto.images_per_unit=50 \
  stage.retrain.tune=full stage.retrain.steps=300 stage.retrain.optim.lr=3e-4 \
  stage.retrain.optim.warmup_steps=30 stage.retrain.data.holdout_fraction=0 stage.retrain.gate.enabled=false \
  stage.retrain.use_gpu=false stage.retrain.cpus_per_worker=1 \
  stage.retrain.checkpoint_every=100 stage.retrain.log_every=20 \
  stage.retrain.interactive.num_rounds=3 stage.retrain.interactive.num_rounds_without_point=1 \
  stage.retrain.interactive.loss_size=128 stage.retrain.interactive.focal_weight=1.0 \
  stage.retrain.data.max_masks_per_image=16 \
  stage.retrain.data.pred_iou_thresh=0.3 stage.retrain.data.stability_score_thresh=0.8 \
  stage.retrain.data.synthetic.enabled=true stage.retrain.data.synthetic.seed_count=200 \
  stage.eval.num_images=30 stage.eval.amg.points_per_side=16 "$@"
