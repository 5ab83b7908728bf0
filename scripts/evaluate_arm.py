"""Export and evaluate one seed of a training arm the way every seed of the masks-vs-causal
comparison is evaluated, and enter it in the comparison's spec: a ``scripts/train_rounds.py``
folder (its rounds.json names the arm, the seeds and the model), or a checkpoint with ``--arm``
and ``--label`` (a seed already in the spec, evaluated again: its rounds stay as recorded).

The five evaluations (ml-100k loo-full, all 943 users, the int4 engine, renormalised beams 10
wide, 2 threads): validation and test with the LLM alone, test with the user's history left out,
and test fused with SASRec (weight 16, the whole history) with the history kept and left out.
Each one is skipped when its file exists, so re-running the command after an interruption
continues where it stopped; about 11 minutes each on 2 cores. ``--only`` runs some of them,
for a model that is not (yet) a seed of the comparison: a further round read on validation
before anything else is, e.g.

    python scripts/evaluate_arm.py runs/ml100k/hatllm-shipped/r5 --name hatllm_s0_r5 --only valid/llm

    python scripts/evaluate_arm.py runs/ml100k/hatllm-seeds10 --name hatllm_s10 \\
        --spec results/ml100k/hatllm_vs_causal_spec.json
    python scripts/evaluate_arm.py models/hatllm-ml100k --name hatllm_s0 --arm hatllm \\
        --label "rounds seeded 0,1,2,3" --spec results/ml100k/hatllm_vs_causal_spec.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from hatllm_edge.core.formats import MANIFEST_FILE

SASREC = Path("models/sasrec-ml100k")
EVALS = {  # spec key -> (file suffix, split, fused with SASRec, history left out)
    "valid/llm": ("llm_valid", "valid", False, False),
    "test/llm": ("llm_test", "test", False, False),
    "test/llm_histex": ("llm_test_histex", "test", False, True),
    "test/fused": ("fused_test", "test", True, False),
    "test/fused_histex": ("fused_test_histex", "test", True, True),
}


def cli(*args: str, cwd: Path) -> None:
    """Run ``hatllm-edge ARGS`` in this interpreter's environment; stop on failure. ``cwd`` is
    outside the checkout so that ``$PYTHONPATH`` (a frozen copy of the code) decides what runs."""
    command = [sys.executable, "-m", "hatllm_edge", *args]
    print("+ hatllm-edge", " ".join(args), flush=True)
    subprocess.run(command, check=True, cwd=cwd)


def keep_round_records(run: Path, rounds: list[int], dest: Path) -> list[str]:
    """Copy each round's record (hatllm.json and its logs; not the weights) next to the results,
    so the comparison reads them from the repository once the run folder is gone."""
    paths = []
    for n in rounds:
        folder = dest / f"r{n}"
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("hatllm.json", "train_log.jsonl", "valid_log.jsonl"):
            if (run / f"r{n}" / name).is_file():
                shutil.copyfile(run / f"r{n}" / name, folder / name)
        paths.append(str(folder / "hatllm.json"))
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="the arm's folder from train_rounds.py (its rounds and rounds.json), or a checkpoint")
    ap.add_argument("--name", required=True, help="prefix of the bundle and result files, e.g. hatllm_s10")
    ap.add_argument("--spec", type=Path, help="the comparison's spec; the seed is entered in its arm (left alone without it)")
    ap.add_argument("--arm", help="a checkpoint's arm in the spec")
    ap.add_argument("--label", help="a checkpoint's seed label in the spec")
    ap.add_argument("--bundles", type=Path, default=Path("bundles"))
    ap.add_argument("--results", type=Path, default=Path("results/ml100k"))
    ap.add_argument("--only", type=lambda text: text.split(","), default=list(EVALS),
                    help=f"comma-separated evaluations to run (default all: {','.join(EVALS)}); without --spec")
    args = ap.parse_args()
    if unknown := [k for k in args.only if k not in EVALS]:
        ap.error(f"--only: unknown evaluation(s) {', '.join(unknown)}; choose from {', '.join(EVALS)}")
    if args.spec and set(args.only) != set(EVALS):
        ap.error("--only with --spec: the comparison needs every evaluation of a seed")
    record_file = args.run / "rounds.json"
    if record_file.is_file():
        record = json.loads(record_file.read_text(encoding="utf-8"))
        record["model"] = str(args.run.resolve() / Path(record["model"]).name)  # the run may have moved (trained elsewhere)
        label = "rounds seeded " + ",".join(str(s) for s in record["seeds"])
        if "start" in record and args.spec:
            raise SystemExit(f"{args.run}: rounds {record['start']['round']}+ on a model trained elsewhere; a seed of the "
                             "comparison is all its rounds from one train_rounds.py folder (leave out --spec)")
    elif (args.run / "hatllm.json").is_file() and (args.spec is None or (args.arm and args.label)):
        record, label = {"arm": args.arm, "model": str(args.run.resolve())}, args.label
    else:
        raise SystemExit(f"{args.run}: neither a train_rounds.py folder with rounds.json (finish the arm first) "
                         "nor a checkpoint (given with --arm and --label where it goes into --spec)")
    bundle = (args.bundles / f"{args.name}-int4").resolve()
    evals = {}
    for key in args.only:
        suffix, split, fused, histex = EVALS[key]
        out = args.results / f"eval_{args.name}_{suffix}.json"
        if not out.is_file():
            if not (bundle / MANIFEST_FILE).is_file():  # exported once, by the first evaluation that needs it
                cli("export", record["model"], str(bundle), "--quant", "int4", "--overwrite", cwd=args.run.resolve())
            flags = ["--renormalise", *(["--assistant", str(SASREC.resolve()), "--assistant-weight", "16"] if fused else ["--no-assist"]),
                     *(["--exclude-history"] if histex else [])]
            cli("evaluate", str(bundle), "--split", split, "--threads", "2", *flags, "--out", str(out.resolve()),
                cwd=args.run.resolve())
        evals[key] = str(out)
    if args.spec is None:
        return
    spec = json.loads(args.spec.read_text(encoding="utf-8"))
    seeds = spec["arms"][record["arm"]]["seeds"]
    known = [s for s in seeds if s["label"] == label]
    if "seeds" in record:
        rounds = [r["round"] for r in record["rounds"]]
        entry = {"label": label, "rounds": keep_round_records(args.run, rounds, args.results / args.name), "evals": evals}
        seeds[:] = [s for s in seeds if s["label"] != label] + [entry]
    elif known:
        known[0]["evals"] = evals
    else:
        raise SystemExit(f"{args.spec}: arm {record['arm']} has no seed labelled {label!r}; its rounds must be recorded there first")
    args.spec.write_text(json.dumps(spec, indent=1) + "\n", encoding="utf-8")
    print(f"{args.spec}: {record['arm']} now has {len(seeds)} seed(s)")


if __name__ == "__main__":
    main()
