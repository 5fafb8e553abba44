"""The `a2b` entry point: command dispatch and user errors without tracebacks."""
import subprocess
import sys

from a2b_dist.cli import main


def test_usage_and_unknown_command(capsys):
    assert main([]) == 2
    assert "usage: a2b COMMAND" in capsys.readouterr().err
    assert main(["--help"]) == 0
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_bad_config_value_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "a2b_dist.cli", "train", "--config", "configs/test.yaml",
                           "loss.lambda_rec=-2"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ")
    assert "loss.lambda_rec=-2.0 is out of range" in proc.stderr and "Traceback" not in proc.stderr


def test_export_of_missing_checkpoint(tmp_path, capsys):
    assert main(["export", str(tmp_path / "none"), str(tmp_path / "g.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "g.pt").exists()
