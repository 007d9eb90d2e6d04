"""tools/bench_moe.py at a tiny size: each expert count (its own process) prints one JSON line
per routing regime, with the three layers timed against the same dense FFNs."""

import json

from tests.conftest import run_tool


def test_bench_moe_reports_both_regimes_for_every_expert_count():
    r = run_tool("tools/bench_moe.py", "--hidden", "32", "--ffn", "64", "--tokens", "64",
                 "--num-experts", "2,4", "--repeats", "1")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    lines = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert [(line["experts"], line["regime"]) for line in lines] == [
        (2, "balanced"), (2, "skewed"), (4, "balanced"), (4, "skewed")]
    for line in lines:
        assert sum(line["tokens_per_expert_max_mean"]) > 0
        for key in ("medmoe_vs_dense", "megatron_vs_dense", "grouped_vs_dense",
                    "reference_vs_dense"):
            assert line[key] > 0, (key, line)
    # skewed: one modality, so (nearly) every token picks the same top-k experts
    assert lines[3]["tokens_per_expert_max_mean"][0] == 64
