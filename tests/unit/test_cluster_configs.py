"""The Ray cluster configs and the submit launcher agree on what the launcher relies on."""

from pathlib import Path

import yaml

from distributed_ft.config import load_config

ROOT = Path(__file__).resolve().parents[2]


def _entrypoint_overrides(entrypoint: str) -> tuple[str, list[str]]:
    words = entrypoint.split()
    assert words[:4] == ["python", "-m", "distributed_ft", "train"]
    return words[4], words[5:]


def test_aws_cluster_yaml_has_gpu_workers_and_installs_the_project():
    cluster = yaml.safe_load((ROOT / "cluster_configs/ray/aws-gpu.yaml").read_text())
    head = cluster["head_node_type"]
    assert head in cluster["available_node_types"]
    gpu_types = [t for t in cluster["available_node_types"].values() if t["resources"].get("GPU", 0) > 0]
    assert gpu_types and all(t["min_workers"] >= 1 for t in gpu_types)
    assert any("distributed_ft" in c and "[deepspeed,ray]" in c for c in cluster["setup_commands"])
    # ray_submit.sh talks to the dashboard port (8265) of the head
    assert any("--dashboard-port=8265" in c for c in cluster["head_start_ray_commands"])


def test_kuberay_rayjob_entrypoint_is_a_valid_dft_job():
    job = yaml.safe_load((ROOT / "cluster_configs/ray/kuberay-rayjob.yaml").read_text())
    assert job["kind"] == "RayJob"
    recipe, overrides = _entrypoint_overrides(job["spec"]["entrypoint"])
    config, _ = load_config(recipe, overrides)
    assert config.run.backend == "ray" and config.run.use_gpu
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpus = sum(
        int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) * g["replicas"]
        for g in workers
    )
    assert gpus >= config.run.num_workers
    ports = {
        p["containerPort"]
        for p in job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]
    }
    assert 8265 in ports


def test_ray_submit_passes_arguments_to_dft_train_and_excludes_heavy_folders():
    script = (ROOT / "launchers/ray_submit.sh").read_text()
    assert '-- python -m distributed_ft train "$@" run.backend=ray' in script
    for excluded in (".venv", "runs", "data"):
        assert f'"{excluded}"' in script
