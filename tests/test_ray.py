"""The pool's workers as Ray actors on a real two-node Ray cluster on this machine
(``ray.cluster_utils.Cluster``): devices train on both nodes (with Ditto's personal models and
federated evaluation) and the history is right.

Ray is an optional extra (``pip install -e ".[ray]"``; ``make test`` installs it). Starting a
cluster takes a while, so this module holds the one Ray test: four devices, small data."""

import os

import pytest

from tests.conftest import ROOT

try:
    import ray
except ImportError:  # a skip outside CI only: `make test` installs the extra
    if os.environ.get("CI"):
        raise
    pytest.skip("Ray is not installed (pip install -e \".[ray]\")", allow_module_level=True)


@pytest.fixture
def two_node_cluster():
    from ray.cluster_utils import Cluster

    small = {"num_cpus": 1, "object_store_memory": 80 * 2**20}
    cluster = Cluster(initialize_head=True, head_node_args={**small, "include_dashboard": False})
    cluster.add_node(**small)
    ray.init(address=cluster.address, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.slow
def test_devices_train_on_both_nodes_of_a_ray_cluster(tmp_path, data_dir, two_node_cluster):
    import fedhub
    from fedhub.split import split_to_devices

    nodes = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
    assert len(nodes) == 2
    root = tmp_path / "devices"
    summary = split_to_devices(root, 4, limit=100, data_dir=data_dir, progress=False, memmap=True)
    history = fedhub.simulate("basic", root, rounds=2, backend="ray", workers=2, cpus_per_worker=1,
                              ray_address=two_node_cluster.address, data_dir=data_dir, test_limit=300,
                              root=tmp_path, timeout=500, personalization="ditto")
    # One worker per node (each node has one CPU, each worker takes one), devices on both.
    tasks = history.stats["tasks"]
    assert {task["node"] for task in tasks} == nodes
    assert history.stats["backend"] == "ray" and history.stats["workers"] == 2
    assert sorted((t["round"], t["device"]) for t in tasks) == \
        sorted((r, name) for r in (1, 2) for name in summary)
    assert [entry["round"] for entry in history] == [1, 2]
    for entry in history:
        assert sorted(entry["devices"]) == sorted(summary) and entry["num_updates"] == 4
        assert entry["num_examples"] == sum(info["examples"] for info in summary.values())
    # 400 images, two rounds: the devices on both nodes learned (chance is 0.1 on 300 test images)
    assert history[-1]["test_accuracy"] > 0.3, [entry["test_accuracy"] for entry in history]
    log = (tmp_path / "logs" / "worker-0.log").read_text()
    assert "round 1: loss" in log, log[-2000:]
    assert history.stats["bytes_up"] >= 8 * 101_770 * 4  # eight updates of the basic network
    # each device evaluated the global model and its Ditto model on its held-out examples
    for entry in history:
        evaluation = entry["federated_evaluation"]
        assert sorted(evaluation["devices"]) == sorted(summary)
        assert all(d["num_examples"] == 10 and d["personal"] is not None
                   for d in evaluation["devices"].values())
    assert all((root / name / "personal.safetensors").is_file() for name in summary)
