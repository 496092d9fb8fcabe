"""Issue 17.7: a run reports to MLflow in a local file store: the named experiment and run, each logged step's loss
as metrics.jsonl has it, the run closed, and nothing of the MLflow settings left in the environment after it. MLflow 3
refuses a file store unless MLFLOW_ALLOW_FILE_STORE is set, and a database URI without SQLAlchemy (mlflow-skinny):
each is one error at validation (they were tracebacks after the model had loaded)."""

from __future__ import annotations

import os

import _runs
import pytest
from click.testing import CliRunner
from lora_runtime.api import lora_sft
from lora_runtime.metrics import read_metrics

pytestmark = pytest.mark.slow
MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_NAME", "MLFLOW_ALLOW_FILE_STORE")


@pytest.fixture
def mlflow(monkeypatch):
    for name in MLFLOW_ENV:
        monkeypatch.delenv(name, raising=False)
    return pytest.importorskip("mlflow", reason="MLflow is an optional extra (`uv pip install mlflow`)")


def test_a_run_logs_its_losses_to_a_local_mlflow_store(mlflow, tiny_llama_dir, llama_shards, tmp_path, monkeypatch):
    """With wandb beside it, each keeps its own run name (MLflow's was wandb's)."""
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    for name, value in (("WANDB_MODE", "offline"), ("WANDB_DIR", str(tmp_path)), ("WANDB_SILENT", "true")):
        monkeypatch.setenv(name, value)
    named = []
    real_init = wandb.init
    monkeypatch.setattr(wandb, "init", lambda *a, **kw: (named.append(kw.get("name")), real_init(*a, **kw))[1])
    uri = (tmp_path / "mlruns").as_uri()
    result = lora_sft(str(tiny_llama_dir), str(llama_shards), str(tmp_path / "run"),
                      **{**_runs.RUN, "max_steps": 4, "save_steps": 4}, mlflow_tracking_uri=uri,
                      mlflow_experiment_name="lora-tests", mlflow_run_name="tiny", wandb_run_name="wb-name")
    assert named == ["wb-name"]
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("lora-tests")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "tiny" and run.info.status == "FINISHED", run.info
    logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    ours = {row["step"]: row["loss"] for row in read_metrics(result.metrics_path) if "loss" in row}
    assert sorted(logged) == [1, 2, 3, 4] and logged == pytest.approx(ours), (logged, ours)
    assert mlflow.active_run() is None
    assert not set(MLFLOW_ENV[:3]) & set(os.environ)


def test_a_run_stopped_at_a_nan_step_ends_its_mlflow_run_failed(mlflow, tiny_llama_dir, llama_shards, tmp_path,
                                                                 monkeypatch):
    """The non-finite stop skips on_train_end, where MLflow's callback ends its run: the run must not stay RUNNING
    (a resume starts another one), and holds every step's loss up to the stop."""
    from lora_runtime.errors import NonFiniteLossError
    from transformers import TrainerCallback

    class Fault(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kw):
            if state.global_step == 2:
                next(p for n, p in model.named_parameters() if "lora_B" in n).data.fill_(float("nan"))

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    with pytest.raises(NonFiniteLossError, match="training stopped at step 3"):
        lora_sft(str(tiny_llama_dir), str(llama_shards), str(tmp_path / "run"),
                 **{**_runs.RUN, "max_steps": 6, "save_steps": 6}, mlflow_tracking_uri=uri,
                 mlflow_experiment_name="lora-tests", callbacks=[Fault()])
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("lora-tests").experiment_id])
    assert run.info.status == "FAILED", run.info
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == [1, 2, 3]
    assert mlflow.active_run() is None


def test_a_store_the_installed_mlflow_cannot_use_is_one_error_line_before_training(mlflow, tmp_path,
                                                                                     monkeypatch):
    import importlib.util

    from lora_cli.main import main

    store = tmp_path / "mlruns"
    args = ["train", "--model", "m", "--data", _data_file(tmp_path), "--output", str(tmp_path / "o"), "--dry-run"]
    res = CliRunner().invoke(main, [*args, "--mlflow-tracking-uri", store.as_uri()])
    assert res.exit_code == 1 and res.output.count("\n") == 1, res.output
    assert res.output.startswith(f"error: --mlflow-tracking-uri={store.as_uri()} is a file store, which the "
                                 "installed MLflow refuses") and "MLFLOW_ALLOW_FILE_STORE=true" in res.output
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the user's way to keep it
    assert CliRunner().invoke(main, [*args, "--mlflow-tracking-uri", str(store)]).exit_code == 0

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sqlalchemy" else real(name, *a))
    res = CliRunner().invoke(main, [*args, "--mlflow-tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    assert res.exit_code == 1 and res.output.count("\n") == 1, res.output
    assert "SQLAlchemy, not installed here" in res.output and "`uv pip install mlflow`" in res.output, res.output


def test_an_experiment_name_alone_checks_mlflows_default_store(mlflow, tmp_path, monkeypatch):
    """MLflow turned on by an experiment name or a run name only writes to its default URI (a local sqlite database
    in MLflow 3): where that store cannot work here, it is one error at validation too (a run name alone was a
    traceback after the model loaded)."""
    import importlib.util

    from lora_cli.main import main

    monkeypatch.chdir(tmp_path)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sqlalchemy" else real(name, *a))
    monkeypatch.setattr(mlflow, "get_tracking_uri", lambda: f"sqlite:///{tmp_path / 'mlflow.db'}")
    args = ["train", "--model", "m", "--data", _data_file(tmp_path), "--output", str(tmp_path / "o"), "--dry-run"]
    for asked in (["--mlflow-experiment-name", "x"], ["--mlflow-run-name", "r"]):
        res = CliRunner().invoke(main, [*args, *asked])
        assert res.exit_code == 1 and "MLflow's default tracking URI" in res.output, res.output
        assert "SQLAlchemy, not installed here" in res.output
    monkeypatch.setattr(mlflow, "get_tracking_uri", lambda: "http://mlflow.example:5000")
    assert CliRunner().invoke(main, [*args, "--mlflow-experiment-name", "x"]).exit_code == 0


def test_a_second_ctrl_c_while_the_last_log_is_written_still_ends_the_mlflow_run(mlflow, tiny_llama_dir, llama_shards,
                                                                                tmp_path, monkeypatch):
    """A step fails; while the trainer writes the log it was holding, a second Ctrl-C arrives (KeyboardInterrupt):
    the MLflow run ends KILLED, not left RUNNING, and the interrupt is what the caller gets."""
    from lora_runtime.trainer import PackedTrainer
    from transformers import TrainerCallback

    class Fault(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 2:
                raise RuntimeError("a step failed")

    real = PackedTrainer._emit_pending

    def emit_pending(self, wait=True):
        if not wait:  # the write after a failure
            raise KeyboardInterrupt
        return real(self, wait)

    monkeypatch.setattr(PackedTrainer, "_emit_pending", emit_pending)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    with pytest.raises(KeyboardInterrupt):
        lora_sft(str(tiny_llama_dir), str(llama_shards), str(tmp_path / "run"),
                 **{**_runs.RUN, "max_steps": 4, "save_steps": 4}, mlflow_tracking_uri=uri,
                 mlflow_experiment_name="lora-tests", callbacks=[Fault()])
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("lora-tests").experiment_id])
    assert run.info.status == "KILLED", run.info
    assert mlflow.active_run() is None


def _data_file(tmp_path) -> str:
    """A data file for --dry-run, which checks that the data is there."""
    (tmp_path / "data").mkdir(exist_ok=True)
    (tmp_path / "data" / "d.jsonl").touch()
    return str(tmp_path / "data" / "d.jsonl")
