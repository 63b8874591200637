# Issue 15, stage 2 on a diverse family (MNIST projections, 5-class subsets, permutations, teacher_mlp; no Fashion): long-horizon meta-training from the long clone (stage 1, experiments/issue15_clone_long.sh,
# θ at its step 670 where the own-error probability has reached 1): truncated BPTT on the student's online
# cross-entropy over 2000-example episodes with the state carried (clone.ce_weight 1), the cloning loss kept
# as a regulariser, the student always fed its own errors.  Resume: add --resume runs/clone-long-ce-mix.
cd /work/wt-e-learner
export OMP_NUM_THREADS=1 VSML_DATA_DIR=/work/shared/datasets WANDB_MODE=disabled
python train.py --name clone-long-ce-mix --out_dir runs --task "mix:mnist+resize14+proj,mnist+resize14+proj+classes5,mnist+resize14+perm,teacher_mlp" --data_dir ../shared/datasets \
  --init_from runs/clone-long/checkpoints/step_000670.pt --seed 2 \
  --clone.steps 1340 --clone.length 2000 --clone.truncation 30 --clone.episodes 8 --clone.lr 1e-3 \
  --clone.random_frac 0.125 --clone.own_error_max 1.0 --clone.own_error_ramp 0 --clone.ce_weight 1.0 \
  --steps 0 --ckpt_every 335 --keep_checkpoints true --log.every 10 --log.progress false \
  --eval.every 0 --eval.tasks "mnist+resize14;fashion_mnist+resize14" --eval.episodes 16 --eval.length 2000 --eval.baselines "sgd,adam" "$@"
