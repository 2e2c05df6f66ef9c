"""megaevo.log: one handler, rank 0 speaks, warnings on stderr and filterable like any log record."""
import logging

import pytest

from megaevo import cli
from megaevo.log import configured, get_logger, reset_logging, setup_logging


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv("MEGAEVO_LOG_ALL_RANKS", raising=False)
    monkeypatch.delenv("MEGAEVO_LOG_LEVEL", raising=False)


def test_loggers_live_under_megaevo():
    assert get_logger("megaevo.data.preprocess").name == "megaevo.data.preprocess"
    assert get_logger("trainer").name == "megaevo.trainer"
    assert get_logger().name == get_logger("megaevo").name == "megaevo"


def test_info_on_stdout_warnings_on_stderr_and_setup_is_idempotent(capsys):
    setup_logging()
    setup_logging()
    assert configured() and len(logging.getLogger("megaevo").handlers) == 1
    log = get_logger("megaevo.test")
    log.info("step 1 loss 2.5")
    log.debug("not shown at INFO")
    log.warning("the checkpoint was saved with other settings")
    out, err = capsys.readouterr()
    assert out == "step 1 loss 2.5\n"
    assert err == "warning: the checkpoint was saved with other settings\n"


def test_other_ranks_are_silent_but_for_warnings(capsys):
    setup_logging(rank=3)
    log = get_logger("megaevo.test")
    log.info("resumed from iteration 5")
    assert capsys.readouterr() == ("", "")
    log.warning("slow disk")
    assert capsys.readouterr() == ("", "[rank 3] warning: slow disk\n")
    setup_logging(rank=0)
    log.info("resumed from iteration 5")
    assert capsys.readouterr().out == "resumed from iteration 5\n"


def test_all_ranks_prefix_every_line(capsys):
    setup_logging(rank=2, all_ranks=True)
    get_logger("megaevo.test").info("two\nlines")
    assert capsys.readouterr().out == "[rank 2] two\n[rank 2] lines\n"
    setup_logging(rank=0, all_ranks=True)
    get_logger("megaevo.test").info("rank zero too")
    assert capsys.readouterr().out == "[rank 0] rank zero too\n"


def test_environment_overrides(capsys, monkeypatch):
    monkeypatch.setenv("MEGAEVO_LOG_ALL_RANKS", "1")
    monkeypatch.setenv("MEGAEVO_LOG_LEVEL", "debug")
    setup_logging(rank=1)
    get_logger("megaevo.test").debug("details")
    assert capsys.readouterr().out == "[rank 1] details\n"
    monkeypatch.setenv("MEGAEVO_LOG_ALL_RANKS", "0")
    monkeypatch.setenv("MEGAEVO_LOG_LEVEL", "WARNING")
    setup_logging(rank=0, all_ranks=True)
    get_logger("megaevo.test").info("quiet now")
    assert capsys.readouterr() == ("", "")
    monkeypatch.setenv("MEGAEVO_LOG_LEVEL", "LOUD")
    with pytest.raises(ValueError, match="MEGAEVO_LOG_LEVEL"):
        setup_logging()


def test_warnings_can_be_filtered(capsys):
    setup_logging()
    tokenizers = get_logger("megaevo.data.tokenizers")
    preprocess = get_logger("megaevo.data.preprocess")

    # By level, per module.
    tokenizers.setLevel(logging.ERROR)
    try:
        tokenizers.warning("skipped 3 unreadable lines")
        preprocess.warning("skipping in.jsonl:6")
        assert capsys.readouterr().err == "warning: skipping in.jsonl:6\n"
    finally:
        tokenizers.setLevel(logging.NOTSET)

    # By a logging.Filter on the handler, for every megaevo logger at once.
    class NoSkipping(logging.Filter):
        def filter(self, record):
            return not record.getMessage().startswith("skipping")

    handler = logging.getLogger("megaevo").handlers[0]
    handler.addFilter(NoSkipping())
    preprocess.warning("skipping in.jsonl:7")
    tokenizers.warning("skipped 3 unreadable lines")
    assert capsys.readouterr().err == "warning: skipped 3 unreadable lines\n"


def test_without_setup_records_reach_the_applications_handlers(caplog):
    setup_logging()
    reset_logging()
    assert not configured()
    with caplog.at_level(logging.WARNING):
        get_logger("megaevo.data.preprocess").warning("skipping in.jsonl:6")
    assert [(r.name, r.levelno, r.getMessage()) for r in caplog.records] == [
        ("megaevo.data.preprocess", logging.WARNING, "skipping in.jsonl:6")
    ]


def test_cli_errors_are_logged_on_stderr(tmp_path, capsys):
    assert cli.main(["merge", "--input", str(tmp_path / "none"), "--output-prefix", str(tmp_path / "x")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: megaevo merge: ") and "not found" in err
