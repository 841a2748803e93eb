#!/bin/bash
# A GPU training job that may wait for a low-carbon window, as long as it ends by its deadline.
#SBATCH --job-name=train-segmentation
#SBATCH --gres=gpu:a100:2
#SBATCH --cpus-per-task=16
#SBATCH --mem=128G
#SBATCH --time=8:00:00
#SBATCH --account=imaging
#GREEND --deferrable --deadline=+36h
#GREEND --data=campus-lustre
srun python train.py --epochs 40
