"""Issue 15 items 1-2 (part): run names cannot reach outside output.dir, overwrite only replaces raylign's
own run directories, a torn last line of metrics.jsonl no longer blocks --resume."""

from __future__ import annotations

import json

import pytest

from raylign.cli import main
from raylign.config import ConfigError, load_config
from raylign.rundir import METRICS_FILE, RUN_MARKER, RunDir, read_metrics


@pytest.mark.parametrize("name", ["../victim", "/", "a/b", "..", ".", "x" * 256, "a\\b", "a\0b"])
def test_a_run_name_is_one_path_component(name):
    with pytest.raises(ConfigError, match="must be one directory name under output.dir"):
        load_config("sft", ["output.overwrite=true"] + [f"output.name={json.dumps(name)}"])


def test_the_cli_refuses_a_name_that_escapes_and_deletes_nothing(tmp_path, capsys):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    code = main(["train", "sft", f"output.dir={tmp_path}/runs", "output.name=../victim", "output.overwrite=true"])
    assert code == 2 and (victim / "precious.txt").read_text() == "keep me"
    assert "one directory name" in capsys.readouterr().err
    assert main(["train", "--name", "/", "sft", f"output.dir={tmp_path}/runs", "output.overwrite=true"]) == 2


def test_overwrite_replaces_only_a_directory_raylign_created(tmp_path):
    config = load_config("sft", [f"output.dir={tmp_path}", "output.name=r", "output.overwrite=true",
                                 "output.trackers=[]"])
    foreign = tmp_path / "r"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="raylign did not create it"):
        RunDir(config)
    assert (foreign / "notes.txt").read_text() == "mine"
    (foreign / "notes.txt").unlink()
    RunDir(config).close()  # empty: raylign takes it and marks it
    assert (foreign / RUN_MARKER).is_file()
    (foreign / "old.txt").write_text("from the last run")
    RunDir(config).close()  # marked: replaced
    assert not (foreign / "old.txt").exists() and (foreign / RUN_MARKER).is_file()


def test_a_torn_last_metrics_line_is_cut_on_resume_and_the_rest_kept(tmp_path, capsys):
    config = load_config("sft", [f"output.dir={tmp_path}", "output.name=r", "output.trackers=[]"])
    run = RunDir(config)
    for step in (1, 2, 3):
        run.log_metrics(step, {"train/loss": 1.0 / step})
    run.close()
    with open(tmp_path / "r" / METRICS_FILE, "a") as f:
        f.write('{"step": 4, "train/lo')  # killed mid-write
    assert [r["step"] for r in read_metrics(tmp_path / "r")] == [1, 2, 3]
    resumed = RunDir(config, resume=True)
    resumed.truncate_logs_after(2)
    resumed.close()
    assert "cut a torn last line" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(tmp_path / "r")] == [1, 2]
    (tmp_path / "r" / METRICS_FILE).write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ConfigError, match="line 2 is not JSON"):  # damage in the middle is not a torn tail
        read_metrics(tmp_path / "r")
