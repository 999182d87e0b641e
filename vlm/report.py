"""The run report: report.json, report.md and report.png from a run dir's stage outputs.

Read from the files the stages leave (RunPaths names them), so a run dir is enough: the
pipeline writes the report at the end of a run, `vqa-rlhf report DIR` rebuilds it, and
`vqa-rlhf compare` reads several. Stages are listed in pipeline order (vlm.config.STAGES).
"""
from __future__ import annotations

import json
from pathlib import Path

from vlm.config import ROUND_STAGES, STAGES, RunPaths
from vlm.files import write_json


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _sft_entry(paths: RunPaths, baselines: dict) -> dict | None:
    """SFT's training figures and the eval stage's test-split scores of the SFT model."""
    sft = _read(paths.metrics("sft"))
    sft_eval = _read(paths.eval_metrics("sft"))
    if not (sft or sft_eval):
        return None
    entry: dict = {}
    if sft_eval:
        entry.update({
            "vqa_accuracy": sft_eval["vqa_accuracy"],
            "by_answer_type": sft_eval["by_answer_type"],
            "by_question_family": sft_eval["by_question_family"],
            "eval_split": sft_eval["split"],
            "eval_count": sft_eval["count"],
            "train_check": sft_eval.get("train_check"),
            "tower_probe": sft_eval.get("tower_probe"),
        })
        baselines["majority_answer"] = sft_eval["baselines"]["majority_answer"]["vqa_accuracy"]
    if sft:
        entry.update({"seconds": sft["seconds"], "steps": sft["steps"], "checkpoint": sft["checkpoint"],
                      "train_loss": sft["train_loss"]})
    curve_path = paths.stage_dir("sft") / "eval_log.jsonl"
    if curve_path.is_file():
        curve = _read_jsonl(curve_path)
        # a captions-only SFT logs held-out caption perplexity, not VQA accuracy
        entry["val_accuracy_curve"] = [e for e in curve if "vqa_accuracy" in e]
        if any("caption_perplexity" in e for e in curve):
            entry["val_caption_perplexity_curve"] = [e for e in curve if "caption_perplexity" in e]
    if sft:
        plot(sft.get("log_history", []), entry.get("val_accuracy_curve", []), paths.root / "report.png")
    return entry


def _caption_entry(paths: RunPaths, baselines: dict) -> dict | None:
    captions = _read(paths.eval_metrics("captions"))  # stages/caption_eval.py
    return captions and {k: captions[k] for k in (
        "cider", "bleu_1", "bleu_2", "bleu_3", "bleu_4", "perplexity", "images", "split", "seconds") if k in captions}


def _retrieval_entry(paths: RunPaths, baselines: dict) -> dict | None:
    retrieval = _read(paths.eval_metrics("retrieval"))  # stages/retrieval_eval.py
    return retrieval and {k: retrieval[k] for k in (
        "recall@1", "recall@5", "recall@10", "chance", "queries", "index_size", "split", "seconds") if k in retrieval}


def _rm_entry(paths: RunPaths, baselines: dict) -> dict | None:
    rm = _read(paths.metrics("rm"))
    entry = None
    if rm:
        entry = {
            "accuracy": rm["accuracy"], "auc": rm["auc"], "objective": rm["objective"], "count": rm["count"],
            "seconds": rm["seconds"], "checkpoint": rm["checkpoint"], "by_group": rm.get("by_group", {}),
            "baselines": {name: {k: rm["baselines"][name][k] for k in ("accuracy", "auc", "by_group")}
                          for name in ("similarity", "exact_match") if name in rm["baselines"]},
            "similarity_failures": rm["baselines"].get("similarity", {}).get("failures", []),
            # does the reward know more than the policy (rewards/diagnostics.py)
            **{key: rm.get(key) for key in ("ranking_accuracy", "best_of_n", "train_fit", "label_noise",
                                            "candidate_top1")},
        }
    fact = _read(paths.metrics("rm-fact"))  # rm.facts=true: the fact-augmented reward model
    if fact:
        entry = entry or {}
        entry["fact_model"] = {
            key: fact.get(key) for key in ("accuracy", "auc", "count", "ranking_accuracy", "best_of_n", "seconds")}
    return entry


def _ppo_entry(paths: RunPaths, baselines: dict) -> dict | None:
    ppo = _read(paths.metrics("ppo"))
    if not ppo:
        return None
    log_path = paths.stage_dir("ppo") / "log.jsonl"
    if log_path.is_file():
        plot_ppo(_read_jsonl(log_path), paths.stage_dir("ppo") / "ppo.png")
    return {key: ppo.get(key) for key in (
        "algo", "reward", "prompt_split", "vqa_accuracy_before", "vqa_accuracy_after", "error_removed", "ci95",
        "better", "worse", "by_family", "oracle_control", "mean_reward", "kl", "seconds", "updates",
        "hacking_alarm_at", "kept_because", "checkpoint")}


def _rlhf_entry(paths: RunPaths) -> dict | None:
    """What RLHF bought over the SFT model it started from, all rounds together (`stages.rlhf`):
    the start, the reference line (every training image with written answers), and per method its
    test accuracy, paired 95% CI of the change, share of the error removed, labels and seconds. The
    run itself runs the mission's path, `ppo` (labels -> reward model -> PPO); `vqa-rlhf bench rlhf`
    runs the others on the same labels."""
    ppo, sft_eval = _read(paths.metrics("ppo")), _read(paths.eval_metrics("sft"))
    if not (ppo and sft_eval and ppo.get("vs_sft")):
        return None
    rounds_root = paths.root / "rounds"
    earlier = sorted(int(p.name) for p in rounds_root.glob("*") if p.name.isdigit()) if rounds_root.is_dir() else []
    round_paths = [RunPaths(paths.root, rounds_root / str(r)) for r in earlier] + [paths]
    seconds = sum(marker["seconds"] for rp in round_paths for stage in ROUND_STAGES
                  if (marker := _read(rp.done_marker(stage))))
    rm = _read(paths.metrics("rm"))
    by_round = []
    for number, rp in enumerate(round_paths, 1):
        round_ppo = _read(rp.metrics("ppo"))
        if round_ppo and round_ppo.get("vs_sft"):
            vs = round_ppo["vs_sft"]
            round_rm = _read(rp.metrics("rm")) or {}
            by_round.append({"round": number, "test": round_ppo["vqa_accuracy_after"], "ci95": vs["ci95"],
                             "error_removed": vs["error_removed"],
                             "labels": (round_rm.get("train_labels") or 0) + (round_rm.get("heldout_labels") or 0),
                             "candidate_top1": (round_rm.get("candidate_top1") or {}).get("overall")})
    vs = ppo["vs_sft"]
    return {
        "start": sft_eval["vqa_accuracy"],
        "reference": ppo.get("reference"),
        "methods": {"ppo": {
            "test": ppo["vqa_accuracy_after"], "change": vs["change"], "ci95": vs["ci95"],
            "error_removed": vs["error_removed"], "better": vs["better"], "worse": vs["worse"],
            "by_family": vs.get("by_family"),
            "labels": rm and rm["train_labels"] + rm["heldout_labels"], "seconds": round(seconds, 1),
            "rounds": len(round_paths), "reward": ppo["reward"], "by_round": by_round}},
        "bench": _read(paths.root / "bench-rlhf" / "table.json"),
    }


def _instruct_change(paths: RunPaths) -> dict | None:
    """Instruction tuning's effect on VQA, question by question, from the policy it started from."""
    from vlm.evaluation import compare_evaluations

    after = paths.eval_dir("instruct")
    before = next((paths.eval_dir(tag) for tag in ("ppo", "sft") if (paths.eval_dir(tag) / "predictions.jsonl").is_file()),
                  None)
    if before is None or not (after / "predictions.jsonl").is_file():
        return None
    try:
        return compare_evaluations(before, after)
    except ValueError:  # evaluated on other questions: no paired comparison
        return None


# Stages whose report entry is more than a few keys of <run>/<stage>/metrics.json (Stage.report):
# stage -> (its name in the report, reader). The eval stage's scores of the SFT model are sft's.
READERS = {
    "sft": ("sft", _sft_entry),
    "rm": ("rm", _rm_entry),
    "ppo": ("ppo", _ppo_entry),
    "caption_eval": ("caption_eval", _caption_entry),
    "retrieval_eval": ("retrieval", _retrieval_entry),
}


def provenance(paths: RunPaths) -> dict:
    """Where the figures come from: the code's commit, the machine (CPU model), torch threads, the
    run's seed (from the SFT model's saved config) and the date. Figures differ across CPUs and
    thread counts; a figure without these is not a figure. The pipeline records them when it starts
    (<run>/provenance.json: the process the stages inherit their threads from); a report rebuilt
    for a run without that file records the rebuilding process's."""
    recorded = _read(paths.root / "provenance.json")
    if recorded:
        return recorded
    return machine_provenance(_read(paths.final("sft") / "training_config.json") or {})


def machine_provenance(config: dict) -> dict:
    """This process's commit, CPU model, torch threads and date, with the seed of `config` (a run config
    as a dict)."""
    import datetime
    import platform
    import subprocess

    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        if names:
            cpu = f"{names[0]} ({len(names)} cores)"
    return {"commit": commit, "cpu": cpu, "threads": torch.get_num_threads(), "seed": config.get("seed"),
            "date": datetime.date.today().isoformat(), "torch": torch.__version__}


def build_report(run_dir: Path) -> dict:
    paths = RunPaths(Path(run_dir))
    report: dict = {"run_dir": str(paths.root), "provenance": provenance(paths), "stages": {}, "baselines": {}}
    for stage, spec in STAGES.items():  # pipeline order
        if stage in READERS:
            name, reader = READERS[stage]
            entry = reader(paths, report["baselines"])
        elif spec.report:
            name, metrics = stage, _read(paths.metrics(stage))
            entry = metrics and {key: metrics[key] for key in spec.report if key in metrics}
        else:
            continue
        if entry:
            report["stages"][name] = entry
        if stage == "ppo" and (rlhf := _rlhf_entry(paths)):
            report["stages"]["rlhf"] = rlhf
        if stage == "instruct" and name in report["stages"] and (change := _instruct_change(paths)):
            report["stages"][name]["vqa_change"] = {k: change[k] for k in ("change", "ci95", "error_removed")}
    write_json(paths.report_json, report)
    (paths.root / "report.md").write_text(render_markdown(report))
    return report


def render_markdown(report: dict) -> str:
    lines = [f"# Run report: {report['run_dir']}", "",
             "What each stage bought on the test split (official VQA accuracy; change over the model the stage "
             "started from, paired bootstrap 95% CI over questions; RLHF against the SFT model):", ""]
    lines += ["| " + " | ".join(STAGE_COLUMNS) + " |", "|---" * len(STAGE_COLUMNS) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in stage_rows(report)]
    stages = report["stages"]
    sections = (("vision", _vision_md), ("sft", _sft_md), ("rm", _rm_md), ("ppo", _ppo_md), ("rlhf", _rlhf_md),
                ("instruct", _instruct_md), ("retrieval", _retrieval_md))  # pipeline order
    for name, section in sections:
        entry = stages.get(name)
        if entry and (name != "rm" or "accuracy" in entry):  # rm: a fact-augmented model alone has no table
            lines += section(entry)
    lines += ["", "![training curves](report.png)", ""]
    return "\n".join(lines)


def _vision_md(vision: dict) -> list[str]:
    """The vision stage: the per-cell probe of the tower it trained, against an untrained one."""
    lines: list[str] = []
    trained, untrained = vision["probe"], vision["probe_untrained"]
    attributes = list(trained)  # shape, colour, place (runs before the place target: shape, colour)
    lines += ["", f"## Vision pretraining ({vision['objective']}, {vision['steps']} steps, {vision['seconds']} s)",
              "", f"Per-cell linear probe on the {vision['probe_split']} images (cells holding an object):", "",
              "| tower | " + " | ".join(f"{a} (%)" for a in attributes) + " |", "|---" * (len(attributes) + 1) + "|",
              "| pretrained here | " + " | ".join(str(trained[a]) for a in attributes) + " |",
              "| untrained (same architecture) | " + " | ".join(str(untrained.get(a, "-")) for a in attributes) + " |"]
    return lines


def _instruct_md(instruct: dict) -> list[str]:
    """Instruction tuning: VQA accuracy before / after, description quality."""
    lines: list[str] = []
    lines += ["", "## Instruction tuning", "",
              f"VQA accuracy {instruct['vqa_accuracy_before']} before, {instruct['vqa_accuracy_after']} after; "
              f"descriptions of held-out images: precision {instruct['description_precision']}, "
              f"recall {instruct['description_recall']} (objects: colour, shape and position)"]
    return lines


def _retrieval_md(retrieval: dict) -> list[str]:
    """Caption -> image retrieval recall against chance."""
    lines: list[str] = []
    chance = retrieval.get("chance", {})
    lines += ["", f"## Caption -> image retrieval ({retrieval['queries']} captions, {retrieval['index_size']} "
                  f"images, {retrieval['split']} split)", "", "| | recall@1 | recall@5 | recall@10 |",
              "|---|---|---|---|",
              f"| model | {retrieval['recall@1']} | {retrieval['recall@5']} | {retrieval['recall@10']} |",
              f"| chance | {chance.get('recall@1', '-')} | {chance.get('recall@5', '-')} | "
              f"{chance.get('recall@10', '-')} |"]
    return lines


def _rm_md(rm: dict) -> list[str]:
    """The reward model against its baselines, per group; what it knows beyond the policy."""
    lines: list[str] = []
    lines += ["", f"## Reward model ({rm['objective']}, {rm['count']} held-out labels, split by image)", "",
              "| reward | accuracy (%) | ROC AUC |", "|---|---|---|",
              f"| reward model | {rm['accuracy']} | {rm['auc']} |"]
    lines += [f"| baseline: {name} | {b['accuracy']} | {b['auc']} |" for name, b in rm["baselines"].items()]
    sim = rm["baselines"].get("similarity", {}).get("by_group", {})
    if rm["by_group"]:
        lines += ["", "| group | reward model (%) | similarity (%) | labels |", "|---|---|---|---|"]
        lines += [f"| {g} | {e['accuracy']} | {sim.get(g, {}).get('accuracy', '-')} | {e['count']} |"
                  for g, e in rm["by_group"].items()]
    lines += ["", f"Within-question ranking (held-out answers whose official accuracy differs): "
                  f"{rm.get('ranking_accuracy')}%; labels that disagree with the majority annotator answer: "
                  f"{(rm.get('label_noise') or {}).get('share')}%; training labels fitted: "
                  f"{(rm.get('train_fit') or {}).get('accuracy')}%."]
    probe = rm.get("candidate_top1")
    if probe and probe.get("overall") is not None:
        lines += ["", f"Does it know the answers? Every candidate answer of each question's family scored, "
                      f"{probe['questions']} test questions: the best one on top in {probe['overall']}%.", "",
                  "| " + " | ".join(probe["by_family"]) + " |", "|---" * len(probe["by_family"]) + "|",
                  "| " + " | ".join(str(v) for v in probe["by_family"].values()) + " |"]
    bon = rm.get("best_of_n")
    if bon:
        lines += ["", f"Best of {bon['n']} sampled answers ({bon['questions']} questions, VQA accuracy):", "",
                  "| greedy | reward's pick | random sample | majority vote | oracle |", "|---|---|---|---|---|",
                  f"| {bon['greedy']} | {bon['reward']} | {bon['random']} | {bon['majority']} | {bon['oracle']} |"]
    if rm.get("fact_model"):
        fm = rm["fact_model"]
        lines += ["", f"Fact-augmented reward model (reads the image's captions): held-out accuracy "
                      f"{fm['accuracy']}%, AUC {fm['auc']}, ranking {fm.get('ranking_accuracy')}%."]
    if rm["similarity_failures"]:
        lines += ["", "Wrong answers the similarity baseline accepts most confidently:", ""]
        lines += [f"- {f['question']} answer '{f['answer']}', ground truth {f['gt_answers']}: "
                  f"similarity {f['similarity']}" for f in rm["similarity_failures"]]
    return lines


def _ppo_md(ppo: dict) -> list[str]:
    """RL: test accuracy before / after with its CI, per family; the oracle control."""
    lines: list[str] = []
    lines += ["", f"## RL ({ppo['algo']})", "",
              f"Test VQA accuracy (greedy, official metric) {ppo['vqa_accuracy_before']} before, "
              f"{ppo['vqa_accuracy_after']} after {ppo['updates']} updates in {ppo['seconds']} s "
              f"(reward: {ppo.get('reward')}, prompts: {ppo.get('prompt_split')}); "
              f"mean reward {ppo['mean_reward']}, KL {ppo['kl']} (last tenth of the updates).", ""]
    if ppo.get("ci95"):
        lines += [f"Change {ppo['ci95'][0]:+}..{ppo['ci95'][1]:+} points (paired bootstrap 95% CI over questions), "
                  f"{ppo['error_removed']}% of the error removed; {ppo['better']} questions better, "
                  f"{ppo['worse']} worse. Kept: {ppo.get('kept_because')}"
                  + (f"; reward-hacking alarm at update {ppo['hacking_alarm_at']}" if ppo.get("hacking_alarm_at") else "")
                  + ".", ""]
    if ppo.get("by_family"):
        lines += ["| family | before | after | error removed (%) | better | worse |", "|---|---|---|---|---|---|"]
        lines += [f"| {name} | {e['before']} | {e['after']} | {e['error_removed']} | {e['better']} | {e['worse']} |"
                  for name, e in ppo["by_family"].items()] + [""]
    if ppo.get("oracle_control"):
        oracle = ppo["oracle_control"]
        lines += [f"Oracle control (same budget, reward = official VQA accuracy): {oracle['vqa_accuracy_after']}, "
                  f"{oracle['error_removed']}% of the error removed.", ""]
    lines += ["![reward, KL and held-out accuracy over PPO updates](ppo/ppo.png)"]
    return lines


def _rlhf_md(rlhf: dict) -> list[str]:
    """RLHF over the few-answers SFT model: per round, and the peers when `vqa-rlhf bench rlhf` ran."""
    method = rlhf["methods"]["ppo"]
    lines = ["", f"## RLHF: judgments -> reward model -> PPO ({method['rounds']} round(s), {method['labels']} labels)",
             "", f"The SFT model RLHF starts from answers {rlhf['start']} of the test split."]
    reference = rlhf.get("reference") or {}
    if reference.get("vqa_accuracy") is not None:
        lines[-1] += (f" With written answers for every training image it answers {reference['vqa_accuracy']} "
                      f"(reference: {reference['source']}).")
    if method["by_round"]:
        lines += ["", "| round | labels (all rounds) | test VQA | 95% CI of the change over SFT | error removed (%) | "
                      "reward model's candidate probe (%) |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['round']} | {r['labels']} | {r['test']} | {r['ci95'][0]:+}..{r['ci95'][1]:+} | "
                  f"{r['error_removed']} | {r['candidate_top1']} |" for r in method["by_round"]]
    bench = rlhf.get("bench")
    if bench:
        lines += ["", f"Peers on the same labels (`vqa-rlhf bench rlhf`, {bench.get('command', '')}):", "",
                  "| method | test VQA | 95% CI of the change | error removed (%) | labels | seconds |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {name} | {m['test']} | {m['ci95'][0]:+}..{m['ci95'][1]:+} | {m['error_removed']} | "
                  f"{m.get('labels', '-')} | {m.get('seconds', '-')} |" for name, m in bench["methods"].items()]
    spread = (bench or {}).get("seeds")
    if spread:  # bench rlhf --seeds: the whole run per seed (another dataset and training each)
        lines += ["", "Over seeds (each seed its own dataset, SFT model, labels and reward model; mean +- sd; "
                      "the paired CI per seed):", "", "| " + " | ".join(SEEDS_COLUMNS) + " |",
                  "|" + "---|" * len(SEEDS_COLUMNS)]
        lines += ["| " + " | ".join(row) + " |" for row in seeds_rows(spread)]
    return lines


def _sft_md(sft: dict) -> list[str]:
    """The SFT model on the test split: per answer type and family, memorisation, probe, curve."""
    lines: list[str] = []
    for title, key in (("By answer type", "by_answer_type"), ("By question family", "by_question_family")):
        if sft.get(key):
            lines += ["", f"## {title} (sft, {sft.get('eval_split')} split, {sft.get('eval_count')} questions)", "",
                      "| group | VQA accuracy |", "|---|---|"]
            lines += [f"| {group} | {acc:.2f} |" for group, acc in sorted(sft[key].items())]
    if sft.get("by_question_family") and sft.get("train_check"):
        check = sft["train_check"]
        lines += ["", f"## Memorisation check (sft): {check['count']} {check['split']} questions vs the "
                      f"{sft.get('eval_split')} split", "", "| family | train | test |", "|---|---|---|"]
        lines += [f"| {family} | {check['by_question_family'].get(family, float('nan')):.2f} | {acc:.2f} |"
                  for family, acc in sorted(sft["by_question_family"].items())]
        lines.append(f"| **overall** | {check['vqa_accuracy']:.2f} | {sft['vqa_accuracy']:.2f} |")
    if sft.get("tower_probe"):
        probe = ", ".join(f"{attribute} {value}%" for attribute, value in sft["tower_probe"].items())
        lines += ["", f"Per-cell probe of the SFT model's vision tower: {probe}."]
    if sft.get("val_accuracy_curve"):
        lines += ["", "## Held-out (val) accuracy against training time", "",
                  "| step | training minutes | VQA accuracy |", "|---|---|---|"]
        lines += [f"| {e['step']} | {e['train_seconds'] / 60:.1f} | {e['vqa_accuracy']:.2f} |"
                  for e in sft["val_accuracy_curve"]]
    return lines


def plot(log_history: list[dict], curve: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = [(e["step"], e["loss"]) for e in log_history if "loss" in e]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    if losses:
        ax_loss.plot(*zip(*losses))
    ax_loss.set(title="SFT training loss", xlabel="step", ylabel="loss (answer tokens)")
    ax_loss.set_yscale("log")
    if curve:
        ax_acc.plot([e["train_seconds"] / 60 for e in curve], [e["vqa_accuracy"] for e in curve], marker="o")
    ax_acc.set(title="held-out VQA accuracy", xlabel="training minutes", ylabel="VQA accuracy (%)", ylim=(0, 100))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_ppo(log: list[dict], path: Path) -> None:
    """Reward, KL and held-out VQA accuracy over PPO updates, with the rollouts' own VQA accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    held_out = [(e["step"], e["val_vqa_accuracy"]) for e in log if "val_vqa_accuracy" in e]
    log = [e for e in log if "mean_reward" in e]  # update 0 has the held-out accuracy only
    steps = [e["step"] for e in log]
    fig, (ax_reward, ax_kl, ax_acc) = plt.subplots(1, 3, figsize=(14, 4))
    ax_reward.plot(steps, [e["mean_reward"] for e in log])
    ax_reward.set(title="mean reward (reward model)", xlabel="update")
    ax_kl.plot(steps, [e["kl"] for e in log])
    ax_kl.set(title="KL to the reference", xlabel="update")
    ax_acc.plot(steps, [e.get("rollout_vqa_accuracy") for e in log], label="rollouts (sampled)", alpha=0.6)
    if held_out:
        ax_acc.plot(*zip(*held_out), marker="o", label="held-out (greedy)")
    ax_acc.set(title="VQA accuracy (%)", xlabel="update")
    ax_acc.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def stage_rows(report: dict) -> list[tuple[str, str, str, str, str]]:
    """The report's first table, stage by stage: (stage, test VQA accuracy, change over the model the
    stage started from with its paired 95% CI, share of the error removed, seconds)."""
    rows = []
    stages = report["stages"]
    for stage, entry in stages.items():
        if stage == "rlhf":
            method = entry["methods"]["ppo"]
            low, high = method["ci95"]
            rows.append((f"rlhf: ppo, {method['rounds']} round(s), {method['labels']} labels",
                         f"{method['test']:.2f}", f"{method['change']:+.2f} ({low:+.2f}..{high:+.2f})",
                         f"{method['error_removed']:.1f}%", f"{method['seconds']:.0f}"))
            if entry.get("reference") and entry["reference"].get("vqa_accuracy") is not None:
                rows.append(("reference: every image answered", f"{entry['reference']['vqa_accuracy']:.2f}", "", "", ""))
            continue
        acc = entry.get("vqa_accuracy", entry.get("vqa_accuracy_after"))
        change, removed = "", ""
        if stage == "ppo" and entry.get("ci95"):
            change = f"{acc - entry['vqa_accuracy_before']:+.2f} ({entry['ci95'][0]:+.2f}..{entry['ci95'][1]:+.2f})"
            removed = f"{entry['error_removed']:.1f}%"
        elif entry.get("vqa_change"):
            c = entry["vqa_change"]
            change, removed = f"{c['change']:+.2f} ({c['ci95'][0]:+.2f}..{c['ci95'][1]:+.2f})", f"{c['error_removed']:.1f}%"
        seconds = entry.get("seconds")
        rows.append((stage, "-" if acc is None else f"{acc:.2f}", change, removed,
                     "-" if seconds is None else f"{seconds:.0f}"))
    rows += [(f"baseline: {name}", f"{value}", "", "", "") for name, value in report["baselines"].items()]
    return rows


STAGE_COLUMNS = ("stage", "test VQA", "change (95% CI)", "error removed", "seconds")


def mean_sd(spread: dict) -> str:
    """{"mean": m, "sd": s} as `m +- s` (sd None: one seed, the mean alone)."""
    return f"{spread['mean']:.2f}" + (f" +- {spread['sd']:.2f}" if spread["sd"] is not None else "")


def seeds_rows(spread: dict) -> list[tuple[str, str, str, str, str]]:
    """`vqa-rlhf bench rlhf --seeds`' table (stages.rlhf.bench.seeds), method by method: (method, its
    seeds, test VQA mean +- sd, error removed mean +- sd, whether the paired CI is above zero on every seed)."""
    rows = [("sft (start)", "", mean_sd(spread["start"]), "", "")]
    rows += [(name, ", ".join(map(str, r["seeds"])), mean_sd(r["test"]), mean_sd(r["error_removed"]),
              "yes" if r["ci_above_zero_on_every_seed"] else "no") for name, r in spread.items() if name != "start"]
    return rows


SEEDS_COLUMNS = ("method", "seeds", "test VQA (mean +- sd)", "error removed (%)", "paired CI above zero on every seed")


def print_table(report: dict) -> None:
    rows = [STAGE_COLUMNS, *stage_rows(report)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(STAGE_COLUMNS))]
    print()
    for row in rows:
        print("  ".join(cell.ljust(width) if i == 0 else cell.rjust(width) for i, (cell, width) in
                        enumerate(zip(row, widths))).rstrip())
