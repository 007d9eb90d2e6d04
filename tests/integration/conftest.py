import pytest

from tests.conftest import run_tool


@pytest.fixture(scope="session")
def main_job(tmp_path_factory):
    """The README's main job, shortened (3 iterations per stage), run once for every test
    that needs its output: {"run": CompletedProcess, "work_dir": Path}."""
    work = tmp_path_factory.mktemp("main_job") / "demo"
    r = run_tool("examples/pretrain_medmoe.py", "--work-dir", str(work), "--train-iters", "3",
                 "--log-interval", "1", nproc=2, timeout=900, show_warnings=True)
    return {"run": r, "work_dir": work}
