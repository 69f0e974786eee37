#!/bin/bash
# tierzero sbatch: `tierzero run` of run moe-2n in /scratch/tz/runs/moe-2n
# Rendered from /scratch/tz/runs/moe-2n/config.yaml; change the config and render again rather than editing this file.
#SBATCH --job-name=moe-2n
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --time=30
#SBATCH --output=/scratch/tz/runs/moe-2n/slurm-%j.out
#SBATCH --open-mode=append
#SBATCH --no-requeue
#SBATCH --signal=B:USR2@120

set -u
run_dir=/scratch/tz/runs/moe-2n
config=/scratch/tz/runs/moe-2n/config.yaml
exit_requeue=75
max_requeues=20

# Rendezvous at the first node of the allocation, by the address slurmctld reaches it at
# (NodeAddr): node names need not resolve (emulated nodes sharing one host); the port
# comes from the job id, so every task and every attempt of the job agree on it.
first_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
node_addr=$(scontrol show node "$first_node" 2>/dev/null | grep -o "NodeAddr=[^ ]*" | head -n 1 | cut -d= -f2)
export MASTER_ADDR="${node_addr:-$first_node}"
export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))

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

srun --kill-on-bad-exit=1 --nodes=1 --ntasks-per-node=4 tierzero run "$config" &
step_pid=$!
# a trap interrupts wait (status > 128) while the step runs on: wait until it is gone
while kill -0 "$step_pid" 2>/dev/null; do wait "$step_pid"; done
wait "$step_pid"; rc=$?

# requeue when the ranks say so (exit $exit_requeue), or when they were told to checkpoint and
# srun ended the step some other way (--kill-on-bad-exit stops the slower ranks): the next
# attempt resumes from the newest committed checkpoint either way.
if [ -z "$terminated" ] && { [ "$rc" -eq "$exit_requeue" ] || { [ -n "$signalled" ] && [ "$rc" -ne 0 ]; }; }; then
  echo "tierzero: ranks stopped to checkpoint (exit $rc); slurm.requeue=false, resubmit to go on"
fi
exit "$rc"
