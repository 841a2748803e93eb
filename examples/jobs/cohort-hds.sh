#!/bin/bash
# Health data: only an HDS-certified cluster may run it, whatever the queues look like.
#SBATCH --job-name=cohort-linkage
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=32
#SBATCH --mem=200G
#SBATCH --time=12:00:00
#SBATCH --account=cohort-hds
#GREEND --data-class=hds
#GREEND --data=hds-vault
srun Rscript linkage.R
