"""The release folder's remote code in another transformers version: set
MEDMOE_OTHER_TRANSFORMERS_PYTHON to a Python whose transformers is the other end of our pin
(e.g. a venv with transformers==4.57.*; this project installs 5.x). Skipped otherwise."""

import json
import os
import subprocess

import pytest

from tests.conftest import ROOT
from tests.demo_setup import make_workspace
from tests.release_setup import hf_answers, write_questions

OTHER = os.environ.get("MEDMOE_OTHER_TRANSFORMERS_PYTHON")


@pytest.mark.skipif(not OTHER, reason="MEDMOE_OTHER_TRANSFORMERS_PYTHON not set")
def test_release_runs_alike_in_both_transformers_versions(tmp_path, single_rank):
    import transformers

    from medmoe_mcore.conversion.release import export_release

    ws = make_workspace(tmp_path / "ws")
    export_release(ws["init"], tmp_path / "out", show_progress=False)
    questions = write_questions(tmp_path / "q")
    here = hf_answers(tmp_path / "out", questions, 8)
    code = ("import json, sys, transformers; sys.path.insert(0, sys.argv[1]); "
            "from tests.release_setup import hf_answers; "
            "print(transformers.__version__); "
            "print(json.dumps(hf_answers(sys.argv[2], sys.argv[3], 8)))")
    r = subprocess.run([OTHER, "-c", code, ROOT, str(tmp_path / "out"), str(questions)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    version, answers = r.stdout.strip().splitlines()[-2:]
    assert version.split(".")[0] != transformers.__version__.split(".")[0], version
    assert json.loads(answers) == here
