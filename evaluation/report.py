"""evaluate's report files: report.json, report.md (the Markdown table) and recall_at_k.png."""
import io
import json

from schemas import storage


def markdown_table(report: dict) -> str:
    ks = report["counts"]["ks"]
    cols = [(mode, k) for mode in ("t2i", "i2t") for k in ks]
    lines = ["| | " + " | ".join(f"{m.upper()} R@{k}" for m, k in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    rows = [("first_stage", "first stage")]
    if "joint_encoder" in report["t2i"]:
        rows += [("joint_encoder", "joint encoder alone"), ("reranked", "reranked (fused)")]
    else:
        rows.append(("reranked", "reranked"))
    for name, label in rows:
        lines.append(f"| {label} | " + " | ".join(f"{report[m][name][f'R@{k}']:.2f}" for m, k in cols) + " |")
    deltas = [round(report[m]["reranked"][f"R@{k}"] - report[m]["first_stage"][f"R@{k}"], 2) for m, k in cols]
    lines.append("| delta | " + " | ".join(f"{d:+.2f}" for d in deltas) + " |")
    return "\n".join(lines)


def markdown_report(report: dict) -> str:
    c = report["counts"]
    invalid = ", ".join(f"{r}: {n}" for r, n in c["invalid_queries"].items()) or "none"
    return "\n".join([
        "# Recall@k: first stage vs reranked", "",
        markdown_table(report), "",
        f"- T2I: {c['queries']} queries evaluated ({c['queries_without_relevant']} without `relevant` skipped; "
        f"invalid: {invalid}), {c['mean_candidates_per_query']:.2f} candidates per query on average "
        f"(at most {c['max_candidates_per_query']}), candidate recall {c['t2i_candidate_recall']:.2f}% "
        "(the ceiling of reranking).",
        f"- Scores: {c['score_rows']} rows; {c['unscored_candidates']} candidates of evaluated queries unscored "
        f"(ranked after the scored ones, in first-stage order); {c['queries_without_scores']} queries without "
        "any score.",
        f"- I2T: {c['i2t_images']} images evaluated (relevant to at least one query), "
        f"{c['i2t_mean_queries_per_image']:.2f} candidate queries per image on average, "
        f"{c['i2t_images_in_no_candidate_list']} in no candidate list, "
        f"candidate recall {c['i2t_candidate_recall']:.2f}%.",
        "- Recalls are percentages. Curves: `recall_at_k.png`.", ""])


def plot_curves(curves: dict, counts: dict) -> bytes:
    """The recall@k curves as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    titles = {"t2i": f"Text -> image ({counts['queries']} queries)",
              "i2t": f"Image -> text ({counts['i2t_images']} images)"}
    xlabels = {"t2i": "k (images retrieved per query)", "i2t": "k (queries retrieved per image)"}
    for n, mode in enumerate(("t2i", "i2t")):
        ax = fig.add_subplot(1, 2, n + 1)
        for name, label, style in (("first_stage", "first stage", "o--"), ("reranked", "reranked", "s-")):
            ys = curves[mode][name]
            ax.plot(range(1, len(ys) + 1), ys, style, label=label, markersize=3)
        ax.set_title(titles[mode])
        ax.set_xlabel(xlabels[mode])
        ax.set_ylabel("recall@k (%)")
        ax.set_ylim(-2, 102)
        ax.set_xlim(0.5, max(len(curves[mode]["first_stage"]), 1) + 0.5)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower right")
    fig.suptitle("Recall@k: first stage vs reranked")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_report(out_dir: str, report: dict, curves: dict) -> None:
    storage.make_dirs(out_dir)
    storage.write_bytes_atomic(storage.join(out_dir, "report.json"),
                               (json.dumps(report, indent=1) + "\n").encode("utf-8"))
    storage.write_bytes_atomic(storage.join(out_dir, "report.md"), markdown_report(report).encode("utf-8"))
    storage.write_bytes_atomic(storage.join(out_dir, "recall_at_k.png"), plot_curves(curves, report["counts"]))
