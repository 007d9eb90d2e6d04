"""A scaling study's results, gathered from the points' result.json files: study.csv,
study.json, study.png (cost, throughput, quality, parameters, load and loss curves against
the expert count) and study.md (a table shaped like the paper's Tables 9-10)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

COLUMNS = ("point", "num_experts", "topk", "router_type", "meta_expert", "ep",
           "total_parameters", "active_parameters", "step_seconds", "tokens_per_s",
           "peak_memory_gib_max_rank", "load_expert_max_over_mean", "load_ep_rank_max_over_mean",
           "first_loss", "last_loss", "validation_loss", "closed_accuracy", "open_recall",
           "classification_accuracy")


def gather(study_dir) -> list[dict]:
    results = [json.loads(p.read_text())
               for p in sorted(Path(study_dir).glob("points/*/result.json"))]
    return sorted(results, key=lambda r: (r["router_type"], not r["meta_expert"], r["topk"],
                                          r["ep"], r["num_experts"]))


def row(r: dict) -> dict:
    balance = r["expert_balance"] or {}
    scores = r["scores"] or {}
    return {
        "point": r["point"], "num_experts": r["num_experts"], "topk": r["topk"],
        "router_type": r["router_type"], "meta_expert": r["meta_expert"], "ep": r["ep"],
        "total_parameters": r["parameters"]["total"],
        "active_parameters": r["parameters"]["active"],
        "step_seconds": round(r["step_seconds"], 4),
        "tokens_per_s": round(r["tokens_per_s"], 1),
        "peak_memory_gib_max_rank": round(max(r["peak_memory_bytes"]) / 2 ** 30, 3),
        "load_expert_max_over_mean": balance.get("per_expert_max_over_mean", {}).get("mean"),
        "load_ep_rank_max_over_mean": balance.get("per_ep_rank_max_over_mean", {}).get("mean"),
        "first_loss": round(r["losses"][0], 4), "last_loss": round(r["losses"][-1], 4),
        "validation_loss": round(r["validation"][-1][1], 4) if r["validation"] else None,
        **{k: scores.get(k) for k in ("closed_accuracy", "open_recall",
                                      "classification_accuracy")},
    }


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def markdown(rows: list[dict]) -> str:
    """One table, as the paper's Tables 9-10 (experts, top-k, parameters, time, scores)."""
    head = ("Experts", "Top-k", "Router", "Meta", "EP", "Total params", "Active params",
            "Step (s)", "Tokens/s", "Peak mem (GiB)", "Load expert max/mean",
            "Load EP-rank max/mean", "Val loss", "Closed acc", "Open recall")
    keys = ("num_experts", "topk", "router_type", "meta_expert", "ep", "total_parameters",
            "active_parameters", "step_seconds", "tokens_per_s", "peak_memory_gib_max_rank",
            "load_expert_max_over_mean", "load_ep_rank_max_over_mean", "validation_loss",
            "closed_accuracy", "open_recall")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_fmt(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _series(results: list[dict]) -> dict:
    """Points grouped by everything but the expert count: one line per group in the plots."""
    groups: dict = {}
    for r in results:
        label = f"top-{r['topk']} {r['router_type']}"
        label += "" if r["meta_expert"] else " no-meta"
        label += "" if r["ep"] == 1 else f" EP{r['ep']}"
        groups.setdefault(label, []).append(r)
    return {k: sorted(v, key=lambda r: r["num_experts"]) for k, v in groups.items()}


def plot(results: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("step time (s)", lambda r: r["step_seconds"]),
              ("tokens / s", lambda r: r["tokens_per_s"]),
              ("quality: last validation loss", lambda r: r["validation"][-1][1]
               if r["validation"] else r["losses"][-1]),
              ("parameters (total -, active --)", None),
              ("load: EP-rank max/mean (-), expert max/mean (--)", None))
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    series = _series(results)
    for ax, (title, value) in zip(axes.flat, panels):
        for label, rs in series.items():
            es = [r["num_experts"] for r in rs]
            if title.startswith("parameters"):
                line, = ax.plot(es, [r["parameters"]["total"] for r in rs], "o-", label=label)
                ax.plot(es, [r["parameters"]["active"] for r in rs], "s--",
                        color=line.get_color())
            elif title.startswith("load"):
                bal = [r["expert_balance"] or {} for r in rs]
                line, = ax.plot(es, [b.get("per_ep_rank_max_over_mean", {}).get("mean")
                                     for b in bal], "o-", label=label)
                ax.plot(es, [b.get("per_expert_max_over_mean", {}).get("mean") for b in bal],
                        "s--", color=line.get_color())
            else:
                ax.plot(es, [value(r) for r in rs], "o-", label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("experts")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["num_experts"] for r in results}),
                      [str(e) for e in sorted({r["num_experts"] for r in results})])
    curves = axes.flat[5]
    for r in results:
        curves.plot(range(1, len(r["losses"]) + 1), r["losses"], lw=0.8, label=r["point"])
    curves.set_title("training loss, one line per point", fontsize=10)
    curves.set_xlabel("iteration")
    if len(results) <= 8:  # beyond that a legend hides the curves; the CSV names them
        curves.legend(fontsize=6)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("Med-MoE scaling study")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(study_dir, left_out: list[str] = ()) -> list[dict]:
    """study.csv, study.json, study.png and study.md in the study folder; returns the rows."""
    folder = Path(study_dir)
    results = gather(folder)
    rows = [row(r) for r in results]
    with open(folder / "study.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    (folder / "study.json").write_text(json.dumps({"points": results,
                                                   "left_out": list(left_out)}, indent=1))
    text = markdown(rows)
    if left_out:
        text += "\nLeft out: " + "; ".join(left_out) + "\n"
    (folder / "study.md").write_text(text)
    if results:
        plot(results, folder / "study.png")
    return rows
