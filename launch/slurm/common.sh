# Sourced by the sbatch scripts (from the submission directory, the repository root): the
# python, the ranks per node and the rendezvous point of this job, checked before anything runs.
#   PYTHON          the venv's python (default .venv/bin/python)
#   NPROC_PER_NODE  ranks per node (default: the GPUs Slurm gave the job on this node)
#   RDZV_PORT       the rendezvous port on the first node (default 29500 + job id % 1000)
# CPU_HINT (set by the caller) says how to run on CPUs when there is no GPU.
PYTHON=${PYTHON:-.venv/bin/python}
GPUS=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-0}}
GPUS=${GPUS##*:}  # "h100:8" -> 8
NPROC_PER_NODE=${NPROC_PER_NODE:-$GPUS}
RDZV_PORT=${RDZV_PORT:-$((29500 + SLURM_JOB_ID % 1000))}
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
if ! [ -x "$PYTHON" ]; then
  echo "sf2dist: $PYTHON is not an executable python: run 'make install' in $(pwd) or set PYTHON=" >&2
  exit 2
fi
if ! [ "$NPROC_PER_NODE" -ge 1 ] 2>/dev/null; then
  echo "sf2dist: no GPUs on this node (--gpus-per-node=$GPUS) and NPROC_PER_NODE is not set:" \
       "request GPUs, or set NPROC_PER_NODE=<ranks> with $CPU_HINT" >&2
  exit 2
fi
# NCCL: fail a collective whose peer died instead of hanging (see README, "Clusters").
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
