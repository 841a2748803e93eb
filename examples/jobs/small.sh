#!/bin/bash
# A small, short job: the site's short partition.
#SBATCH --job-name=qc
#SBATCH --cpus-per-task=2
#SBATCH --mem=4G
#SBATCH --time=20:00
#SBATCH --account=genomics
srun fastqc sample.fastq.gz
