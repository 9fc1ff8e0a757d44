"""The verl recipe of examples/verl/: its data is what verl's own GSM8K reward scores, it refuses
bad settings before Ray starts, and its arms are valid CorR-PO configs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

# verl imports Megatron and Ray, which warn about optional accelerators on a CPU machine.
pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

verl = pytest.importorskip("verl", reason="verl is not installed (bash scripts/setup.sh dev installs it)")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))


def test_recipe_data_is_scored_by_verls_gsm8k_reward(tmp_path):
    """examples/verl/prepare_gsm8k.py writes what verl's own rule reward (openai/gsm8k) scores."""
    import importlib.util

    import pyarrow.parquet as pq
    from verl.utils.reward_score import default_compute_score

    spec = importlib.util.spec_from_file_location(
        "prepare_gsm8k", os.path.join(ROOT, "examples", "verl", "prepare_gsm8k.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--out", str(tmp_path), "--val", "8"]) == 0
    rows = pq.read_table(tmp_path / "test.parquet").to_pylist()
    assert len(rows) == 8 and pq.read_table(tmp_path / "train.parquet").num_rows > 1000
    for r in rows:
        truth = r["reward_model"]["ground_truth"]
        assert r["data_source"] == "openai/gsm8k" and r["prompt"][0]["role"] == "user"
        assert default_compute_score("openai/gsm8k", f"Step by step.\n#### {truth}", truth) == 1.0
        assert default_compute_score("openai/gsm8k", f"#### {truth}1", truth) == 0.0
    assert module.main(["--out", str(tmp_path), "--val", "0"]) == 2


RECIPE = os.path.join(ROOT, "examples", "verl", "run_corrpo_gsm8k.sh")


def _recipe(tmp_path, **env) -> subprocess.CompletedProcess:
    """The recipe with a fresh HOME (it must write nothing there when it refuses) and this
    interpreter as its python3."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    base = {k: v for k, v in os.environ.items() if k not in ("MODEL", "DATA", "STEPS", "GPUS", "ROLLOUT")}
    base.update(HOME=str(home), PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"], **env)
    return subprocess.run(["bash", RECIPE], capture_output=True, text=True, env=base, timeout=120)


def _assert_refused(done: subprocess.CompletedProcess, tmp_path, *fragments: str) -> None:
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("run_corrpo_gsm8k.sh: error: "), done.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert list((tmp_path / "home").iterdir()) == []  # no Ray session, no caches


@pytest.fixture
def recipe_inputs(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    data = tmp_path / "data"
    data.mkdir()
    for name in ("train.parquet", "test.parquet"):
        (data / name).write_bytes(b"")
    return {"MODEL": str(model), "DATA": str(data)}


def test_recipe_refuses_a_missing_model_or_data_before_ray(tmp_path, recipe_inputs):
    _assert_refused(_recipe(tmp_path), tmp_path, "MODEL")
    _assert_refused(_recipe(tmp_path, **{**recipe_inputs, "MODEL": str(tmp_path / "nope")}), tmp_path,
                    "MODEL=", "nope", "no such folder")
    _assert_refused(_recipe(tmp_path, **{**recipe_inputs, "DATA": str(tmp_path / "nodata")}), tmp_path,
                    "nodata/train.parquet", "prepare_gsm8k.py")
    _assert_refused(_recipe(tmp_path, **recipe_inputs, STEPS="0"), tmp_path, "STEPS")
    _assert_refused(_recipe(tmp_path, **recipe_inputs, ARM="ppo"), tmp_path, "ARM", "corrpo_flipped")
    _assert_refused(_recipe(tmp_path, **recipe_inputs, SEED="-1"), tmp_path, "SEED")


def test_recipe_arms_parse_as_corrpo_configs():
    """The recipe's corrpo_flipped arm (+algorithm.corrpo.phi=identity) is a valid CorR-PO config."""
    from omegaconf import OmegaConf

    from entropy_gpu.integrations.verl import corrpo_config_from

    for phi, sign in (("negate", -1.0), ("identity", 1.0)):
        algorithm = OmegaConf.create({"corrpo": {"coef": 0.1, "phi": phi, "measure": "nll_grad_norm"}})
        config = corrpo_config_from(algorithm)
        assert config.phi == phi and config.measure == "nll_grad_norm"
        from entropy_gpu.corrpo import corrpo_term

        term = corrpo_term(torch.tensor([0.5]), torch.tensor([True]), config)
        assert term.item() == sign * 0.5


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU refusal needs a machine without CUDA")
def test_recipe_refuses_without_a_gpu_before_ray(tmp_path, recipe_inputs):
    _assert_refused(_recipe(tmp_path, **recipe_inputs), tmp_path, "CUDA")
