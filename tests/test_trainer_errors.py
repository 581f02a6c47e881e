"""Bad configs and data paths fail early with messages that name the problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from trainer_helpers import prepared_data, tiny_config

from trainer.cli import main
from trainer.config import ConfigError, build_config, load_config
from trainer.data import TokenShards
from trainer.prepare import DataError, prepare
from trainer.train import train


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return prepared_data(tmp_path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"mode": "finetune"}, "mode"),
        ({"seq_lenn": 64}, "seq_lenn"),
        ({"global_batch": 3, "micro_batch": 2}, "multiple of micro_batch"),
        ({"steps": 0}, "steps"),
        ({"model": {"preset": "huge"}}, "unknown preset"),
        ({"optim": {"lr": -1}}, "optim.lr"),
    ],
)
def test_bad_config_values_name_the_key(data: Path, tmp_path: Path, change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config({**tiny_config(data, tmp_path / "o"), **change})


def test_missing_keys_and_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data: Field required"):
        build_config({"out": "x"})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("mode: [meta\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="must look like"):
        build_config({"data": "d", "out": "o"}, ["steps"])


def test_incompatible_model_and_data(data: Path, tmp_path: Path) -> None:
    swa = {"preset": "tiny", "overrides": {"model_type": "swa", "num_fast_layers": 0}}
    with pytest.raises(ConfigError, match="mode 'meta' needs a ttt-e2e model"):
        train(build_config(tiny_config(data, tmp_path / "o", model=swa)))
    with pytest.raises(ConfigError, match="multiple of mini_batch_size"):
        train(build_config(tiny_config(data, tmp_path / "o", seq_len=36)))
    with pytest.raises(ConfigError, match="window_size"):
        train(
            build_config(tiny_config(data, tmp_path / "o", model={"preset": "tiny", "overrides": {"window_size": 4}}))
        )


def test_bad_data_paths(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        prepare([tmp_path / "missing"], tmp_path / "out", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no text"):
        prepare([tmp_path / "empty"], tmp_path / "out", progress=False)
    (tmp_path / "x.bin").write_bytes(b"\0")
    with pytest.raises(DataError, match="unsupported file type"):
        prepare([tmp_path / "x.bin"], tmp_path / "out", progress=False)
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"body": "hello"}\n')
    with pytest.raises(DataError, match="no string field 'text'"):
        prepare([rows], tmp_path / "out", progress=False)
    with pytest.raises(DataError, match="not a prepared data directory"):
        TokenShards(tmp_path, "train")


def test_truncated_shard_is_refused(data: Path) -> None:
    meta = json.loads((data / "meta.json").read_text())
    shard = data / meta["splits"]["train"]["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(DataError, match="expected"):
        TokenShards(data, "train")


def test_cli_reports_errors_without_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"data": str(tmp_path / "nodata"), "out": str(tmp_path / "o"), "threads": 1}))
    assert main(["train", "--config", str(cfg)]) == 2
    assert "not a prepared data directory" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(tmp_path), "--data", str(tmp_path), "--seq-len", "8"]) == 2
    assert "error:" in capsys.readouterr().err
