"""Training progress for logs: one self-contained line per update, with step, loss, rate and ETA; never a carriage
return or a cursor code (those come only from a bar, which train draws only when the driver has a terminal)."""

from pipelines.train import progress_line


def test_progress_line_is_one_plain_line():
    line = progress_line("adapt", 30, 600, 1.23456, 3e-4, 2.1, 271.9)
    assert line == "[adapt] step 30/600 (5%) loss 1.2346 lr 3.00e-04 2.10 it/s ETA 4m31s"
    assert "\n" not in line and "\r" not in line and "\x1b" not in line


def test_progress_line_eta_in_hours_when_long():
    assert progress_line("base", 1, 1000, 5.0, 1e-5, 0.1, 3 * 3600 + 7 * 60 + 5).endswith("0.10 it/s ETA 3h07m")
    assert progress_line("base", 1000, 1000, 0.5, 1e-5, 3.0, 0.0).endswith("(100%) loss 0.5000 lr 1.00e-05 3.00 it/s ETA 0m00s")
