#!/bin/bash
# tierzero sbatch: `tierzero run` of run moe-2n in /scratch/tz/runs/moe-2n
# Rendered from /scratch/tz/runs/moe-2n/config.yaml; change the config and render again rather than editing this file.
#SBATCH --job-name="olmoe 1b7b"
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=7
#SBATCH --mem=0
#SBATCH --time=2-00:00:00
#SBATCH --partition=batch
#SBATCH --account=csc123
#SBATCH --qos=normal
#SBATCH --constraint=nvme
#SBATCH --exclusive
#SBATCH --output=/scratch/tz/runs/moe-2n/logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR2@300
#SBATCH --mail-type=END
#SBATCH --reservation=hero

set -u
run_dir=/scratch/tz/runs/moe-2n
config=/scratch/tz/runs/moe-2n/config.yaml
exit_requeue=75
max_requeues=5

# Rendezvous at the first node of the allocation, by the address slurmctld reaches it at
# (NodeAddr): node names need not resolve (emulated nodes sharing one host); the port
# comes from the job id, so every task and every attempt of the job agree on it.
first_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
node_addr=$(scontrol show node "$first_node" 2>/dev/null | grep -o "NodeAddr=[^ ]*" | head -n 1 | cut -d= -f2)
export MASTER_ADDR="${node_addr:-$first_node}"
export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))

# slurm.setup (may override MASTER_ADDR, e.g. with a high-speed interface's address)
module load PrgEnv-gnu rocm/6.0
source /ccs/proj/csc123/venv/bin/activate
export MASTER_ADDR=$(hostname -s)-hsn0

echo "tierzero: job $SLURM_JOB_ID attempt ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST, rendezvous $MASTER_ADDR:$MASTER_PORT"

# USR2, sent before the time limit: srun passes it on to the ranks, which finish their step,
# commit a checkpoint and exit $exit_requeue; then the job requeues itself. `srun ... &` + wait
# lets bash run the trap while the step runs. TERM (scancel, the time limit itself, preemption)
# reaches the ranks from Slurm directly; the shell only notes it and never requeues after it,
# so scancel stays a cancel (preemption requeues through Slurm's own PreemptMode=REQUEUE).
step_pid=
signalled=
terminated=
forward() {
  echo "tierzero: batch shell got SIGUSR2; passing it to the ranks"
  signalled=USR2
  [ -n "$step_pid" ] && kill -s USR2 "$step_pid" 2>/dev/null
}
trap forward USR2
trap 'echo "tierzero: batch shell got SIGTERM; the job is ending (no requeue)"; terminated=1' TERM

srun --kill-on-bad-exit=1 --nodes=4 --ntasks-per-node=8 --cpus-per-task=7 /ccs/proj/csc123/venv/bin/python -m tierzero.launcher.cli run "$config" &
step_pid=$!
# a trap interrupts wait (status > 128) while the step runs on: wait until it is gone
while kill -0 "$step_pid" 2>/dev/null; do wait "$step_pid"; done
wait "$step_pid"; rc=$?

# requeue when the ranks say so (exit $exit_requeue), or when they were told to checkpoint and
# srun ended the step some other way (--kill-on-bad-exit stops the slower ranks): the next
# attempt resumes from the newest committed checkpoint either way.
if [ -z "$terminated" ] && { [ "$rc" -eq "$exit_requeue" ] || { [ -n "$signalled" ] && [ "$rc" -ne 0 ]; }; }; then
  if [ "${SLURM_RESTART_COUNT:-0}" -lt "$max_requeues" ]; then
    echo "tierzero: ranks stopped to checkpoint (exit $rc); requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  echo "tierzero: slurm.max_requeues=$max_requeues reached; not requeueing (resubmit to go on)"
fi
exit "$rc"
