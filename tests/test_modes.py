"""Launch-mode detection from environment dicts: every mode, without processes."""

import pytest

from tierzero.launcher.modes import detect_launch, slurm_port
from tierzero.slurm.nodelist import expand_nodelist, expand_tasks_per_node


def test_nothing_means_local():
    assert detect_launch({}).mode == "local"
    assert detect_launch({"PATH": "/bin", "HOME": "/root"}).mode == "local"


def test_torchrun():
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
           "GROUP_RANK": "1", "MASTER_ADDR": "node7", "MASTER_PORT": "29500",
           "TORCHELASTIC_RESTART_COUNT": "2"}
    l = detect_launch(env)
    assert (l.mode, l.rank, l.world_size, l.local_rank, l.local_world_size) == ("torchrun", 5, 8, 1, 4)
    assert (l.node_rank, l.num_nodes, l.master_addr, l.master_port, l.restart_count) == (1, 2, "node7", 29500, 2)
    assert not l.supervised


def test_torchrun_wins_over_slurm():
    env = {"RANK": "0", "WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "1"}
    assert detect_launch(env).mode == "torchrun"


def test_slurm_task():
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
           "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu-[07-08]", "SLURM_TASKS_PER_NODE": "2(x2)",
           "SLURM_JOB_ID": "123456", "SLURM_STEP_ID": "0", "SLURM_RESTART_COUNT": "1"}
    l = detect_launch(env)
    assert (l.mode, l.rank, l.world_size, l.local_rank, l.local_world_size) == ("slurm", 3, 4, 1, 2)
    assert (l.node_rank, l.num_nodes, l.master_addr, l.restart_count) == (1, 2, "gpu-07", 1)
    assert l.master_port == slurm_port(123456) and 20000 <= l.master_port < 40000


def test_slurm_uneven_tasks_per_node():
    env = {"SLURM_PROCID": "4", "SLURM_NTASKS": "5", "SLURM_LOCALID": "0", "SLURM_NODEID": "2",
           "SLURM_NNODES": "3", "SLURM_JOB_NODELIST": "n[1-3]", "SLURM_TASKS_PER_NODE": "2(x2),1",
           "SLURM_JOB_ID": "9", "SLURM_STEP_ID": "0"}
    l = detect_launch(env)
    assert l.local_world_size == 1 and l.master_addr == "n1"


def test_slurm_batch_shell_is_not_a_rank():
    # the batch script itself has SLURM_PROCID but no step id: it must spawn or srun, not join
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n1"}
    assert detect_launch(env).mode == "local"


def test_slurm_master_addr_env_wins():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_STEP_ID": "0", "SLURM_JOB_NODELIST": "n1",
           "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"}
    l = detect_launch(env)
    assert (l.master_addr, l.master_port) == ("10.0.0.1", 1234)


def test_openmpi():
    env = {"OMPI_COMM_WORLD_RANK": "6", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "2",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}
    l = detect_launch(env)
    assert (l.mode, l.rank, l.world_size, l.local_rank, l.local_world_size, l.node_rank, l.num_nodes) == \
        ("mpi", 6, 8, 2, 4, 1, 2)
    assert l.master_addr is None  # filled by the mpi4py broadcast at init


def test_mpich_hydra():
    env = {"PMI_RANK": "1", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "4"}
    l = detect_launch(env)
    assert (l.mode, l.rank, l.world_size, l.local_rank, l.num_nodes) == ("mpi", 1, 4, 1, 1)


def test_bad_integer_names_the_variable():
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        detect_launch({"RANK": "0", "WORLD_SIZE": "four"})


@pytest.mark.parametrize("text,hosts", [
    ("n1", ["n1"]),
    ("n[1-3,5]", ["n1", "n2", "n3", "n5"]),
    ("gpu-[01-04]", ["gpu-01", "gpu-02", "gpu-03", "gpu-04"]),
    ("n[1-3,5],gpu-[01-04]", ["n1", "n2", "n3", "n5", "gpu-01", "gpu-02", "gpu-03", "gpu-04"]),
    ("a,b[8-10],c", ["a", "b8", "b9", "b10", "c"]),
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
    ("x[098-101]", ["x098", "x099", "x100", "x101"]),
])
def test_nodelist(text, hosts):
    assert expand_nodelist(text) == hosts


@pytest.mark.parametrize("bad", ["n[1-3", "n1-3]", "n[3-1]", "n[a-b]"])
def test_bad_nodelist(bad):
    with pytest.raises(ValueError, match="nodelist"):
        expand_nodelist(bad)


def test_tasks_per_node():
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert expand_tasks_per_node("4") == [4]


def test_a_supervised_rank_says_so():
    """tierzero's supervisor tells each rank who it is in its own variables: the rank is
    'supervised' (not a torchrun rank), with its attempt and its supervisor's pid."""
    from tierzero.launcher.envvars import SupervisedRank

    who = SupervisedRank(rank=3, world_size=4, local_rank=3, local_world_size=4, node_rank=1,
                         store="/runs/r/.rendezvous-2-x", attempt=2, supervisor_pid=4242)
    env = who.to_env()
    assert all(k.startswith("TIERZERO_") for k in env) and "RANK" not in env
    launch = detect_launch(env)
    assert (launch.mode, launch.supervised, launch.rank, launch.world_size, launch.node_rank) == \
        ("supervised", True, 3, 4, 1)
    assert (launch.store, launch.master_addr, launch.restart_count, launch.supervisor_pid) == \
        ("/runs/r/.rendezvous-2-x", None, 2, 4242)
    # it wins over whatever launcher started the supervisor itself
    assert detect_launch({**env, "RANK": "0", "WORLD_SIZE": "8"}).mode == "supervised"
    assert not detect_launch({"RANK": "0", "WORLD_SIZE": "2"}).supervised
    with pytest.raises(ValueError, match="TIERZERO_WORLD_SIZE"):
        detect_launch({**env, "TIERZERO_WORLD_SIZE": "four"})


def test_fault_variables_are_read_in_one_place():
    from tierzero.launcher.envvars import FaultSpec, read_faults

    assert read_faults({}) == FaultSpec() and not read_faults({}).any
    spec = read_faults({"TIERZERO_FAULT_NAN_STEPS": "5, 9", "TIERZERO_FAULT_HANG": "1:4",
                        "TIERZERO_FAULT_SLOW_STEP_S": "0.5", "TIERZERO_FAULT_SLOW_SAVE": "10:3.5",
                        "TIERZERO_BENCH_FAULT": "all_gather"})
    assert spec == FaultSpec(nan_steps=frozenset({5, 9}), hang=(1, 4), slow_step_s=0.5, slow_save=(10, 3.5),
                             bench_corrupt_op="all_gather")
    with pytest.raises(ValueError, match="TIERZERO_FAULT_HANG"):
        read_faults({"TIERZERO_FAULT_HANG": "4"})
