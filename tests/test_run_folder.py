"""What train and demo do with the files already in --out: never delete an input, never replace a
file they did not write, and resume only the run that is there."""

import json
import shutil

import pytest
import yaml

from conftest import edit_safetensors
from pixelwise.cli import main
from pixelwise.demo import run_demo
from pixelwise.engine.config import TrainConfig
from pixelwise.engine.trainer import fit
from pixelwise.errors import UserError

TINY = ["--model-kwargs", '{"base_channels": 4}', "--dataset-kwargs", '{"num_train": 8, "num_val": 4, "size": 32}',
        "--batch-size", "4", "--no-progress"]


def train(out, *extra):
    return main(["train", *TINY, "--out", str(out), *extra])


def files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_never_deletes_the_recipe_or_class_weights_the_run_reads(tmp_path, capsys):
    project = tmp_path / "project"
    project.mkdir()
    recipe = project / "config.yaml"
    recipe.write_text("# my recipe, with comments\nmodel: unet\nepochs: 1\n")
    before = files(project)
    assert main(["train", "--config", str(recipe), *TINY, "--out", str(project), "--overwrite"]) == 2
    assert "--overwrite would delete" in capsys.readouterr().err and files(project) == before
    weights = project / "class_weights.json"
    recipe.unlink()
    weights.write_text("[1, 2, 1, 1]")
    before = files(project)
    assert train(project, "--epochs", "1", "--class-weights", str(weights), "--overwrite") == 2
    err = capsys.readouterr().err
    assert "is the --class-weights file this run reads" in err and files(project) == before
    assert train(tmp_path / "run", "--epochs", "1", "--class-weights", str(weights)) == 0  # elsewhere: fine


def test_demo_refuses_an_out_that_holds_files_it_would_replace(tmp_path):
    for name in ("report.html", "training_curve.svg", "predictions/test_00000.png"):
        out = tmp_path / name.replace("/", "_")
        (out / name).parent.mkdir(parents=True)
        (out / name).write_text("mine")
        with pytest.raises(UserError, match=r"already holds a run \(" + name.split("/")[0]):
            run_demo(out, quick=True, log=lambda *_: None)
        assert files(out) == {name: b"mine"}


def test_resume_takes_the_runs_settings_and_refuses_others(tmp_path, capsys):
    base = tmp_path / "base"
    assert train(base, "--epochs", "1", "--optimizer", "adam", "--lr", "0.002") == 0
    state = (base / "last.state.safetensors").read_bytes()
    # the plain "continue my run": the settings come from OUT/config.yaml
    assert main(["train", "--resume", "--out", str(base), "--epochs", "2", "--no-progress"]) == 0
    saved = yaml.safe_load((base / "config.yaml").read_text())
    assert saved["optimizer"] == "adam" and saved["lr"] == 0.002 and saved["epochs"] == 2
    assert saved["model_kwargs"] == {"base_channels": 4}
    assert len((base / "metrics.csv").read_text().strip().splitlines()) == 3  # header + 2 epochs
    (base / "last.state.safetensors").write_bytes(state)
    before = files(base)
    for extra, words in ((["--model-kwargs", '{"base_channels": 8}'], "of other shapes, e.g. "),
                         (["--model", "segnet_basic", "--model-kwargs", "{}"], "missing, e.g. "),
                         (["--optimizer", "sgd"], "trains with Adam, these settings with SGD")):
        assert main(["train", "--resume", "--out", str(base), "--epochs", "3", "--no-progress", *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("pixelwise: error: cannot resume") and words in err and len(err.splitlines()) == 1
        assert "--resume --out" in err and files(base) == before  # config.yaml not rewritten
    json.loads((base / "metrics.json").read_text())


def test_a_run_stopped_inside_an_epoch_resumes_only_with_its_batch_size(tmp_path):
    from pixelwise.engine.config import TrainConfig
    from pixelwise.engine.trainer import fit

    def stop_after_two_steps(event, state):
        if event == "step" and state.step == 2:
            raise KeyboardInterrupt

    base = {"model": "unet", "dataset": "shapes", "out": str(tmp_path / "run"), "epochs": 1, "batch_size": 2,
            "progress": False, "model_kwargs": {"base_channels": 4},
            "dataset_kwargs": {"num_train": 8, "num_val": 2, "size": 32}}
    with pytest.raises(KeyboardInterrupt):
        fit(TrainConfig(**base), log=lambda *_: None, callbacks=[stop_after_two_steps])
    before = files(tmp_path / "run")
    with pytest.raises(UserError, match="after 2 batches of 2 images; resume with --batch-size 2"):
        fit(TrainConfig(**{**base, "batch_size": 4, "resume": True}), log=lambda *_: None)
    assert files(tmp_path / "run") == before
    assert fit(TrainConfig(**{**base, "resume": True}), log=lambda *_: None)["epochs_completed"] == 1


def test_a_run_stopped_inside_an_epoch_resumes_only_in_its_number_of_processes(tmp_path):
    """Each process trains its own share of an epoch's images: a run of 2 processes resumed in one
    (or the other way round) would skip or repeat images. It was refused by the steps-per-epoch
    check, whose advice (another --batch-size) the batch-size check then refused in turn."""
    from safetensors import safe_open

    from pixelwise.engine.config import TrainConfig
    from pixelwise.engine.trainer import fit

    def stop_after_two_steps(event, state):
        if event == "step" and state.step == 2:
            raise KeyboardInterrupt

    run = tmp_path / "run"
    base = {"model": "unet", "dataset": "shapes", "out": str(run), "epochs": 1, "batch_size": 2,
            "progress": False, "model_kwargs": {"base_channels": 4},
            "dataset_kwargs": {"num_train": 8, "num_val": 2, "size": 32}}
    with pytest.raises(KeyboardInterrupt):
        fit(TrainConfig(**base), log=lambda *_: None, callbacks=[stop_after_two_steps])
    with safe_open(run / "last.state.safetensors", "pt") as f:
        assert json.loads(f.metadata()["pixelwise_train_state"])["processes"] == 1
    state = (run / "last.state.safetensors").read_bytes()
    _restate(run, lambda m: m.update(processes=2))
    before = files(run)
    with pytest.raises(UserError, match=r"inside epoch 1 in 2 processes, and this run has 1 process: .* resume it "
                                        r"in 2 processes \(torchrun --nproc-per-node 2\)"):
        fit(TrainConfig(**{**base, "resume": True}), log=lambda *_: None)
    assert files(run) == before
    (run / "last.state.safetensors").write_bytes(state)
    assert fit(TrainConfig(**{**base, "resume": True}), log=lambda *_: None)["epochs_completed"] == 1


@pytest.mark.parametrize("removed", ["the folder", "config.yaml"])
def test_a_run_folder_removed_while_training_stops_the_run_and_is_not_made_again(tmp_path, removed):
    """The first save after it made the folder again, without config.yaml or the lock, and the run
    ended with exit 0 in a folder that --resume cannot read."""
    run = tmp_path / "run"

    def remove(event, state):
        if event == "step" and state.step == 1:
            if removed == "the folder":
                shutil.rmtree(run)
            else:
                (run / "config.yaml").unlink()

    cfg = TrainConfig(model="unet", dataset="shapes", out=str(run), epochs=1, batch_size=2, progress=False,
                      model_kwargs={"base_channels": 4}, dataset_kwargs={"num_train": 4, "num_val": 2, "size": 32})
    with pytest.raises(UserError, match=r"lost its config.yaml while training .* stopped after 2 optimizer steps "
                                        "without saving"):
        fit(cfg, log=lambda *_: None, callbacks=[remove])
    assert not run.exists() if removed == "the folder" else not (run / "last.safetensors").exists()


def test_ctrl_c_after_the_run_folder_was_removed_is_an_interruption_that_saves_nothing(tmp_path, capsys,
                                                                                       monkeypatch):
    """Ctrl-C once the folder was gone ended as `pixelwise: error: ... lost its config.yaml` with exit 2,
    an error's status for what was an interruption (130); its line must also say nothing was saved."""
    from pixelwise.engine import trainer

    run = tmp_path / "run"

    def remove_then_stop(event, state):
        if event == "step" and state.step == 1:
            shutil.rmtree(run)
            raise KeyboardInterrupt

    def fit_stopped(cfg, *args, **kwargs):
        return fit(cfg, callbacks=[remove_then_stop])

    monkeypatch.setattr(trainer, "fit", fit_stopped)
    assert main(["train", "--model", "unet", "--dataset", "shapes", "--out", str(run), "--epochs", "1",
                 "--batch-size", "2", "--no-progress", "--model-kwargs", '{"base_channels": 4}',
                 "--dataset-kwargs", '{"num_train": 4, "num_val": 2, "size": 32}']) == 130
    out, err = capsys.readouterr()
    assert "interrupted: " in out and "lost its config.yaml" in out and "without saving" in out, out
    assert err.startswith("pixelwise: interrupted") and "error" not in err, err
    assert not run.exists()


def _restate(run, meta_edit=None, tensor_edit=None):
    """The run's last.state.safetensors with its counters and/or tensors edited (damage, a hand edit)."""
    path = run / "last.state.safetensors"
    edit_safetensors(path, path, "pixelwise_train_state", meta_edit, tensor_edit)


def _drop_first_optim(tensors):
    tensors.pop(min(k for k in tensors if k.startswith("optim.") and k.endswith(".exp_avg")))


def _shrink_first_optim(tensors):
    key = min(k for k in tensors if k.startswith("optim.") and k.endswith(".exp_avg"))
    tensors[key] = tensors[key].reshape(-1)[:1].clone()


@pytest.mark.parametrize("meta_edit, tensor_edit, words", [
    (lambda m: m.update(epoch="1"), None, "epoch is '1', not a whole number >= 0"),
    (lambda m: m.update(rows="x"), None, "rows is 'x', not a list of rows"),
    (lambda m: m.update(elapsed_s=None), None, "elapsed_s is None, not a number"),
    (lambda m: m.update(amp="x"), None, "amp is 'x', not off, bf16 or fp16"),
    (lambda m: m.update(stage_step=-1), None, "stage_step is -1"),
    (lambda m: m.update(processes=0), None, "processes is 0, not a whole number >= 1"),
    (lambda m: m.pop("optim_scalars"), None, "the optimizer state in"),
    (lambda m: m.update(param_groups="x"), None, "param_groups is 'x'"),
    (None, _drop_first_optim, "parameters with different entries"),
    (None, _shrink_first_optim, "exp_avg of parameter"),
    (None, lambda t: t.update({"optim.99.exp_avg": t[min(t)]}), "an entry '99.exp_avg' for no parameter"),
])
def test_a_damaged_training_state_is_refused_before_anything_is_written(tmp_path, capsys, meta_edit, tensor_edit,
                                                                       words):
    """The state's counters and optimizer tensors were taken as they were: 200 of 364 edits ended in
    a traceback (KeyError in Adam, a str compared with an int), 121 after config.yaml was rewritten."""
    run = tmp_path / "run"
    assert train(run, "--epochs", "1") == 0
    _restate(run, meta_edit, tensor_edit)
    before = files(run)
    assert main(["train", "--resume", "--out", str(run), "--epochs", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pixelwise: error: cannot resume") and "is damaged" in err and words in err, err
    assert len(err.splitlines()) == 1 and files(run) == before


def test_a_resume_whose_best_checkpoint_is_gone_picks_the_best_again(tmp_path, capsys):
    """It said "wrote best.safetensors" and exit 0 with no best.safetensors in the folder."""
    run = tmp_path / "run"
    assert train(run, "--epochs", "1") == 0
    (run / "best.safetensors").write_bytes(b"cut")
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(run), "--epochs", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "best.safetensors (epoch 1) cannot be read" in out and "picked again" in out
    from pixelwise import load_checkpoint

    assert load_checkpoint(run / "best.safetensors")[1]["training"]["epoch"] == 2
    assert json.loads((run / "metrics.json").read_text())["best_epoch"] == 2


def test_a_run_whose_validation_loss_is_nan_stops_as_diverged_and_saves_no_best(tmp_path, capsys):
    """--lr 1e30: a finite training loss, NaN weights, val_loss nan, and a NaN model saved as best
    (scored above the real one: class 0 everywhere)."""
    assert train(tmp_path / "run", "--epochs", "1", "--lr", "1e30", "--batch-size", "8") == 2  # one step: a finite loss
    assert "the validation loss is nan" in capsys.readouterr().err
    assert not (tmp_path / "run" / "best.safetensors").exists()


def test_a_resume_with_the_parameters_grouped_otherwise_says_so_not_damaged(tmp_path, capsys):
    """--decay-norm-and-bias toggled on resume regroups the parameters: the state was called
    damaged ("resume from a copy of the run") where the settings were what differed."""
    run = tmp_path / "run"
    assert train(run, "--epochs", "1", "--weight-decay", "0.01") == 0
    before = files(run)
    assert main(["train", "--resume", "--out", str(run), "--epochs", "2", "--decay-norm-and-bias",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "groups the parameters" in err and "damaged" not in err and "config.yaml" in err, err
    assert files(run) == before


def test_a_state_of_before_stage_epoch_steps_is_checked_by_its_steps_per_finished_epoch(tmp_path, capsys):
    """A state written before ``stage_epoch_steps`` existed has only stage_step / stage_epoch, which
    holds between whole epochs: 8 images in batches of 4 took 2 steps an epoch, and --batch-size 8
    (1 step) would move the schedule, while the run's own batch size resumes."""
    run = tmp_path / "run"
    assert train(run, "--epochs", "1") == 0
    _restate(run, lambda m: m.pop("stage_epoch_steps"))
    before = files(run)
    resume = ["train", "--resume", "--out", str(run), "--epochs", "2", "--no-progress"]
    assert main([*resume, "--batch-size", "8"]) == 2
    err = capsys.readouterr().err
    assert "took 2 optimizer steps per epoch and these settings take 1" in err, err
    assert files(run) == before
    assert main(resume) == 0
    assert json.loads((run / "metrics.json").read_text())["steps"] == 4


def test_a_state_of_before_the_amp_field_keeps_the_precision_the_run_gives(tmp_path):
    """A state file of an older version has no ``amp``: the resumed run takes its own (the run's
    config.yaml records bf16), rather than switching to float32."""
    run = tmp_path / "run"
    assert train(run, "--epochs", "1", "--amp", "bf16") == 0
    _restate(run, lambda m: m.pop("amp"))
    assert main(["train", "--resume", "--out", str(run), "--epochs", "1", "--no-progress"]) == 0
    assert json.loads((run / "metrics.json").read_text())["amp"] == "bf16"
