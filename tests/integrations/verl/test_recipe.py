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
    # Default: the first 500 test problems held out (the TRL recipe's split), the other 819 train.
    assert module.main(["--out", str(tmp_path)]) == 0
    test = pq.read_table(tmp_path / "test.parquet").to_pylist()
    train = pq.read_table(tmp_path / "train.parquet").to_pylist()
    assert len(test) == 500 and len(train) == 819
    assert {r["extra_info"]["split"] for r in test} == {"test"} and {
        r["extra_info"]["split"] for r in train
    } == {"train"}
    assert not {r["prompt"][0]["content"] for r in test} & {r["prompt"][0]["content"] for r in train}
    # A local GSM8K train split: it trains, and the whole bundled test split is evaluated.
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text('{"question": "Q?", "answer": "because\\n#### 1,234"}\n')
    assert module.main(["--out", str(tmp_path), "--train-file", str(jsonl)]) == 0
    train = pq.read_table(tmp_path / "train.parquet").to_pylist()
    assert [r["reward_model"]["ground_truth"] for r in train] == ["1234"]
    assert pq.read_table(tmp_path / "test.parquet").num_rows == 1319
    assert module.main(["--out", str(tmp_path), "--train-file", str(tmp_path / "none.jsonl")]) == 2


def _null_reward_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "null_reward", os.path.join(ROOT, "examples", "verl", "null_reward.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_null_reward_adds_calibrated_noise_to_training_rows_only():
    module = _null_reward_module()
    right = "Step by step.\n#### 18"
    val = module.compute_score(
        "openai/gsm8k", right, "18", {"split": "test", "index": 0}, coef=0.1, spread=0.3
    )
    assert val == {"score": 1.0, "acc": 1.0, "null_term": 0.0}
    terms = [
        module.compute_score(
            "openai/gsm8k", "#### 5", "18", {"split": "train", "index": i}, coef=0.1, spread=0.3, seed=1
        )
        for i in range(4000)
    ]
    assert all(t["acc"] == 0.0 and t["score"] == t["null_term"] for t in terms)
    values = torch.tensor([t["null_term"] for t in terms], dtype=torch.float64)
    assert float(values.std()) == pytest.approx(0.03, rel=0.05) and abs(float(values.mean())) < 0.003
    # Identical responses to one problem (a tied group) get independent draws; a draw is a
    # function of (seed, index, response, occurrence) only.
    a = module.compute_score(
        "openai/gsm8k", "#### 7", "18", {"split": "train", "index": -1}, spread=0.3, seed=5
    )
    b = module.compute_score(
        "openai/gsm8k", "#### 7", "18", {"split": "train", "index": -1}, spread=0.3, seed=5
    )
    assert a["null_term"] != b["null_term"]
    assert a["null_term"] == pytest.approx(0.1 * 0.3 * module.null_draw(5, -1, "#### 7", 1))
    with pytest.raises(ValueError, match="spread"):
        module.compute_score("openai/gsm8k", right, "18", {"split": "train", "index": 0})


RECIPE = os.path.join(ROOT, "examples", "verl", "run_corrpo_gsm8k.sh")


def _recipe(tmp_path, **env) -> subprocess.CompletedProcess:
    """The recipe with a fresh HOME (it must write nothing there when it refuses) and this
    interpreter as its python3."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    drop = ("MODEL", "DATA", "STEPS", "GPUS", "ROLLOUT", "ARM", "SEED", "ARMS", "SEEDS", "NULL_SPREAD")
    base = {k: v for k, v in os.environ.items() if k not in drop}
    base.update(HOME=str(home), PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    base.update(env)
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
    return {"MODEL": str(model), "DATA": str(data), "NULL_SPREAD": "0.2"}


def test_recipe_refuses_a_missing_model_or_data_before_ray(tmp_path, recipe_inputs):
    _assert_refused(_recipe(tmp_path), tmp_path, "MODEL")
    _assert_refused(
        _recipe(tmp_path, **{**recipe_inputs, "MODEL": str(tmp_path / "nope")}),
        tmp_path,
        "MODEL=",
        "nope",
        "no such folder",
    )
    _assert_refused(
        _recipe(tmp_path, **{**recipe_inputs, "DATA": str(tmp_path / "nodata")}),
        tmp_path,
        "nodata/train.parquet",
        "prepare_gsm8k.py",
    )
    _assert_refused(_recipe(tmp_path, **recipe_inputs, STEPS="0"), tmp_path, "STEPS")
    _assert_refused(_recipe(tmp_path, **recipe_inputs, ARMS="grpo ppo"), tmp_path, "ARMS", "'ppo'", "null")
    _assert_refused(_recipe(tmp_path, **recipe_inputs, SEEDS="0 -1"), tmp_path, "SEEDS", "'-1'")
    _assert_refused(_recipe(tmp_path, **recipe_inputs, ARM="grpo"), tmp_path, "ARMS and SEEDS")
    _assert_refused(_recipe(tmp_path, **{**recipe_inputs, "NULL_SPREAD": ""}), tmp_path, "NULL_SPREAD")
    _assert_refused(_recipe(tmp_path, **{**recipe_inputs, "NULL_SPREAD": "0"}), tmp_path, "NULL_SPREAD")
    # Without the null arm no spread is needed: the next check (the GPU, or verl) is reached.
    done = _recipe(tmp_path, **{**recipe_inputs, "NULL_SPREAD": "", "ARMS": "grpo"})
    assert "NULL_SPREAD" not in done.stderr


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


FAKE_PYTHON = """#!/usr/bin/env bash
# Stands in for python3: passes the recipe's GPU check, records each verl command line.
if [ "$1" = "-" ]; then cat >/dev/null; exit 0; fi
n=$(ls "$FAKE_OUT" | wc -l)
printf '%s\\n' "$@" > "$FAKE_OUT/run$(printf %03d "$n").args"
"""


def _recorded_runs(tmp_path, recipe_inputs, **env) -> list[list[str]]:
    """The verl command lines the recipe runs (python3 replaced by a recorder)."""
    bin_dir, out = tmp_path / "bin", tmp_path / "runs"
    bin_dir.mkdir()
    out.mkdir()
    (bin_dir / "python3").write_text(FAKE_PYTHON)
    (bin_dir / "python3").chmod(0o755)
    done = _recipe(
        tmp_path, **recipe_inputs, FAKE_OUT=str(out), PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return [p.read_text().splitlines() for p in sorted(out.iterdir())]


def _override(args: list[str], key: str) -> str | None:
    values = [a.split("=", 1)[1] for a in args if a.lstrip("+").split("=", 1)[0] == key]
    assert len(values) <= 1, (key, values)
    return values[0] if values else None


def test_recipe_runs_every_arm_and_seed_with_the_design(tmp_path, recipe_inputs):
    runs = _recorded_runs(tmp_path, recipe_inputs, SEEDS="3 4", STEPS="7")
    arms = ["grpo", "corrpo", "corrpo_flipped", "entropy_bonus", "null", "grpo_group", "corrpo_group"]
    assert [(_override(r, "trainer.experiment_name")) for r in runs] == [
        f"gsm8k_{arm}_s{seed}" for arm in arms for seed in (3, 4)
    ]
    by_arm = {arm: runs[2 * i] for i, arm in enumerate(arms)}
    for arm, args in by_arm.items():
        assert args[:2] == ["-m", "verl.trainer.main_ppo"]
        # The placement: reward minus the group mean, but for the two _group arms.
        assert _override(args, "algorithm.norm_adv_by_std_in_grpo") == (
            "True" if arm.endswith("_group") else "False"
        )
        # Evaluation on the whole held-out file, greedy, before training and at the end.
        assert _override(args, "data.val_files").endswith("/test.parquet")
        assert (
            _override(args, "trainer.val_before_train") == "True"
            and _override(args, "trainer.test_freq") == "7"
        )
        assert (
            _override(args, "data.val_batch_size") is None and _override(args, "data.val_max_samples") is None
        )
        assert _override(args, "actor_rollout_ref.rollout.val_kwargs.do_sample") == "False"
        assert (_override(args, "reward.custom_reward_function.path") is not None) == (arm == "null")
        corrpo = arm in ("corrpo", "corrpo_flipped", "corrpo_group")
        assert _override(args, "algorithm.adv_estimator") == ("corrpo_grpo" if corrpo else "grpo")
    assert _override(by_arm["corrpo_flipped"], "algorithm.corrpo.phi") == "identity"
    assert _override(by_arm["corrpo_group"], "algorithm.corrpo.phi") == "negate"
    assert _override(by_arm["entropy_bonus"], "actor_rollout_ref.actor.entropy_coeff") == "0.001"
    null = by_arm["null"]
    assert os.path.isfile(_override(null, "reward.custom_reward_function.path"))
    assert _override(null, "reward.custom_reward_function.reward_kwargs.spread") == "0.2"
    assert _override(null, "reward.custom_reward_function.reward_kwargs.seed") == "3"
    assert _override(runs[9], "reward.custom_reward_function.reward_kwargs.seed") == "4"
    assert (
        _override(runs[1], "data.seed") == "4" and _override(runs[1], "actor_rollout_ref.rollout.seed") == "4"
    )


@pytest.mark.slow
def test_recipe_overrides_compose_with_verls_own_config(tmp_path, recipe_inputs):
    """Hydra accepts every arm's overrides against verl's ppo_trainer config (keys exist, types fit)."""
    from hydra import compose, initialize_config_dir

    runs = _recorded_runs(tmp_path, recipe_inputs, SEEDS="0")
    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        configs = [compose(config_name="ppo_trainer", overrides=r[2:]) for r in runs]
    assert [c.algorithm.norm_adv_by_std_in_grpo for c in configs] == [False] * 5 + [True] * 2
    null = configs[4].reward.custom_reward_function
    assert null.name == "compute_score" and dict(null.reward_kwargs) == {
        "coef": 0.1,
        "spread": 0.2,
        "seed": 0,
    }
    assert [c.algorithm.get("corrpo", {}).get("phi") for c in configs] == [
        None,
        "negate",
        "identity",
        None,
        None,
        None,
        "negate",
    ]
    assert all(c.data.val_batch_size is None and c.data.val_max_samples == -1 for c in configs)
