"""The Accelerate configs in recipes/accelerate/ load with Accelerate's own loader and say what their names
promise; the SLURM script is valid bash and launches what the README shows."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.utils import DistributedType

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "recipes" / "accelerate"
SBATCH = ROOT / "recipes" / "slurm" / "multi-node.sbatch"

EXPECTED = {
    "single-gpu.yaml": (DistributedType.NO, 1, 1),
    "multi-gpu.yaml": (DistributedType.MULTI_GPU, 1, 8),
    "multi-node.yaml": (DistributedType.MULTI_GPU, 2, 16),
    "fsdp.yaml": (DistributedType.FSDP, 1, 8),
    "deepspeed-zero2.yaml": (DistributedType.DEEPSPEED, 1, 8),
    "deepspeed-zero3.yaml": (DistributedType.DEEPSPEED, 1, 8),
}


def _load(name: str) -> ClusterConfig:
    config = load_config_from_file(str(CONFIGS / name))
    assert isinstance(config, ClusterConfig)  # a local cluster, not a SageMaker config
    return config


def test_every_config_in_the_folder_is_covered():
    assert sorted(p.name for p in CONFIGS.iterdir()) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads_with_accelerates_loader(name):
    config = _load(name)
    distributed_type, machines, processes = EXPECTED[name]
    assert (config.distributed_type, config.num_machines, config.num_processes) == (distributed_type, machines,
                                                                                   processes)
    assert config.use_cpu is False
    # Sharding settings only where the file's name says so.
    assert bool(config.fsdp_config) == (distributed_type == DistributedType.FSDP)
    assert bool(config.deepspeed_config) == (distributed_type == DistributedType.DEEPSPEED)


def test_multi_node_config_names_the_rendezvous():
    config = _load("multi-node.yaml")
    assert config.machine_rank == 0
    assert config.main_process_ip and config.main_process_port == 29500
    assert config.rdzv_backend == "static"


def test_fsdp_config_fully_shards_the_open_clip_blocks_in_bf16():
    config = _load("fsdp.yaml")
    assert config.mixed_precision == "bf16"
    fsdp = config.fsdp_config
    assert fsdp["fsdp_version"] == 2  # the trainer supports FSDP2 (training/fsdp.py)
    assert fsdp["fsdp_reshard_after_forward"] is True  # FSDP2's FULL_SHARD
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_transformer_layer_cls_to_wrap"] == "ResidualAttentionBlock"
    # The class really exists under that name in open_clip, so the auto-wrap policy can find it.
    from open_clip.transformer import ResidualAttentionBlock

    assert ResidualAttentionBlock.__name__ == fsdp["fsdp_transformer_layer_cls_to_wrap"]


@pytest.mark.parametrize("name, stage", [("deepspeed-zero2.yaml", 2), ("deepspeed-zero3.yaml", 3)])
def test_deepspeed_configs_set_their_zero_stage(name, stage):
    config = _load(name)
    assert config.deepspeed_config["zero_stage"] == stage
    assert config.mixed_precision == "bf16"


def test_sbatch_script_is_valid_bash_and_launches_the_multi_node_config():
    proc = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = SBATCH.read_text()
    for needed in ("#SBATCH --signal=USR1@120", "--config_file recipes/accelerate/multi-node.yaml",
                   '--num_machines "$SLURM_NNODES"', '--machine_rank "$SLURM_NODEID"',
                   "scontrol show hostnames", "--main_process_port", "-m vlpretrain.cli.main train",
                   "--resume auto",
                   # without these the launcher dies of SIGUSR1 and leaves its workers training, orphaned
                   'TORCHELASTIC_SIGNALS_TO_HANDLE="SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"',
                   "TORCH_ELASTIC_SHUTDOWN_TIMEOUT="):
        assert needed in text, needed
