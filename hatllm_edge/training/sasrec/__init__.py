"""SASRec (Kang & McAuley 2018), the classic sequential baseline beside the LLM recommender.

Model: item embeddings (row 0 = padding), learned positional embeddings, causal self-attention
blocks (pre-LayerNorm, ReLU feed-forward), a final LayerNorm; the next-item logits are the dot
products of the last hidden state with every item embedding (shared input/output table).

Input convention (PyTorch and ONNX alike): ``item_ids`` [B, L] int64 of *catalog positions + 1*
(``catalog.item_ids[i]`` has id ``i + 1``), left-padded with 0, oldest first; only the last
``max_len`` columns are read. Positions are counted from the right (the newest item always sits
at position ``max_len - 1``) and padded keys are masked, so a row's scores do not depend on how
much padding it carries. Output ``scores`` [B, num_items]: log-probabilities of the next item,
column ``i`` = ``catalog.item_ids[i]``.

Training (``loo-full``): each user's training part ``seq[:-2]``; cross-entropy over the whole
catalog at every position (each target seeing up to ``max_len`` items before it), from windows
that cover every training target exactly once per epoch. Validation target ``seq[-2]`` given
``seq[:-2]`` picks the epoch (early stopping on NDCG@10 over all users); test target ``seq[-1]``
given ``seq[:-1]``. Ranking is over the whole catalog, history items included; ties go to the
item earlier in the catalog.

A checkpoint folder holds ``sasrec.json`` (architecture, item id order, training config and
outcome), ``model.safetensors`` (the best weights) and, while training, ``train_state.pt``
(model, optimiser, scheduler, RNG, early-stopping state) to resume from.

Modules: :mod:`.model`, :mod:`.checkpoint`, :mod:`.evaluate`, :mod:`.train`, :mod:`.onnx`, :mod:`.report`;
from the command line: ``hatllm-edge sasrec train|evaluate|export|report``.
"""

from hatllm_edge.core.formats import ASSISTANT_CONFIG as CONFIG_FILE  # noqa: F401
from hatllm_edge.ranking.assistant import read_config  # noqa: F401
from hatllm_edge.training.sasrec.checkpoint import (  # noqa: F401
    LOG_FILE,
    WEIGHTS_FILE,
    load_checkpoint,
)
from hatllm_edge.training.sasrec.evaluate import (  # noqa: F401
    evaluate_checkpoint,
    rank_examples,
    target_ranks,
)
from hatllm_edge.training.sasrec.model import SASRec, SASRecConfig  # noqa: F401
from hatllm_edge.training.sasrec.onnx import (  # noqa: F401
    export_checkpoint_onnx,
    export_model_onnx,
    onnx_parity,
)
from hatllm_edge.training.sasrec.report import report  # noqa: F401
from hatllm_edge.training.sasrec.train import (  # noqa: F401
    TrainConfig,
    train,
    train_sequences,
    training_windows,
)
