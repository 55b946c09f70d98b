"""The console line says what each number is, and a log file gets one line per log interval (no bar redraws)."""
import sys

from megatron_qvgen.training.monitor import CONSOLE_FIELDS, Monitor


def test_console_labels_name_the_learning_rate_and_the_auxiliary_rank(capsys):
    monitor = Monitor(is_logging_rank=True, tensorboard_dir=None, world_size=1)
    monitor.console(10, 60, {"loss": 0.0152, "lr/weights": 9.865e-05, "aux/rank": 8.0, "aux/gate": 0.28,
                             "nonfinite/skipped": 0.0})
    line = capsys.readouterr().out.strip()
    assert line == "step 10/60 | loss 0.0152 | lr 9.865e-05 | aux_rank 8 | aux_gate 0.28 | nonfinite_skipped 0"
    assert len({label for _, label in CONSOLE_FIELDS}) == len(CONSOLE_FIELDS)


def test_no_progress_bar_when_stderr_is_not_a_terminal(capsys):
    assert not sys.stderr.isatty()   # pytest captures it
    monitor = Monitor(is_logging_rank=True, tensorboard_dir=None, world_size=1, total_steps=60)
    assert monitor.bar is None
    monitor.advance(0.5, 8)
    monitor.console(1, 60, {"loss": 0.5})
    captured = capsys.readouterr()
    assert captured.out == "step 1/60 | loss 0.5\n" and captured.err == ""
    monitor.close()


def test_other_ranks_print_nothing(capsys):
    Monitor(is_logging_rank=False, tensorboard_dir=None, world_size=2).console(1, 2, {"loss": 0.5})
    assert capsys.readouterr().out == ""
