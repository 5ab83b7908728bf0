"""How much history the assistant (SASRec) is given: the last 20 items (the prompt's
``max_history``, what evaluation used to hand it) or the whole history (what ``rank`` hands
it; SASRec reads its last ``max_len``). NDCG@10 of SASRec alone, both protocols, both splits.

    python scripts/assistant_history.py models/sasrec-ml100k --out results/sasrec/ml100k_history_length.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from hatllm_edge.core.data import load_dataset
from hatllm_edge.core.metrics import mean_metrics, target_rank
from hatllm_edge.ranking.assistant import Assistant


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sasrec", type=Path)
    ap.add_argument("--cut", type=int, default=20)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    data = load_dataset("ml-100k")
    assistant = Assistant.open(args.sasrec, data.catalog, 1)
    rows = []
    for split in ("valid", "test"):
        examples = data.split(split)
        for cut in (args.cut, None):
            prior = assistant.logprobs([list(ex.history)[-cut:] if cut else list(ex.history) for ex in examples])
            for excluded in (False, True):
                ranks = []
                for ex, p in zip(examples, prior):
                    seen = data.seen(ex.user_id, split) if excluded else set()
                    top = [int(i) for i in np.argsort(-p, kind="stable") if int(i) not in seen][:10]
                    ranks.append(target_rank([data.catalog.item_ids[i] for i in top], ex.target))
                rows.append({"split": split, "history_items": cut or "all", "history": "excluded" if excluded else "included",
                             "users": len(ranks), "NDCG@10": mean_metrics(ranks)["NDCG@10"]})
                print(rows[-1])
    args.out.write_text(json.dumps({"sasrec": str(args.sasrec), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
