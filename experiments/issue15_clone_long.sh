# Issue 15, stage 1: long-horizon shallow cloning from the shipped learner (2000-example episodes, truncations of 30
# with the state carried, own-error probability ramped 0 -> 1 over 670 steps).  Resume: add --resume runs/clone-long.
cd /work/wt-e-learner
export OMP_NUM_THREADS=1 VSML_DATA_DIR=/work/shared/datasets WANDB_MODE=disabled
python train.py --name clone-long --out_dir runs --task "mnist+resize14+proj" --data_dir ../shared/datasets \
  --init_from vsml/pretrained/mnist14-clone-es.safetensors --seed 0 \
  --clone.steps 1340 --clone.length 2000 --clone.truncation 30 --clone.episodes 8 --clone.lr 2e-3 \
  --clone.random_frac 0.125 --clone.own_error_max 1.0 --clone.own_error_ramp 670 \
  --steps 0 --ckpt_every 335 --keep_checkpoints true --log.every 10 --log.progress false \
  --eval.every 0 --eval.tasks "mnist+resize14;fashion_mnist+resize14" --eval.episodes 16 --eval.length 2000 --eval.baselines "sgd,adam" "$@"
