"""``hatllm-edge bench``: every backend on the same seeded workloads, in one process and run.

Modules: :mod:`.workloads` (request shapes and seeded requests), :mod:`.backends` (backend names,
opening them, one request), :mod:`.timing` (the run and the paired check), :mod:`.verdict`
(speed-up ratios of the contenders), :mod:`.report` (table, plot, JSON), :mod:`.ablation`
(each engine step undone in turn).

Each backend is opened (load time measured), warmed up on every workload, then timed
request by request: at least ``min_repeats`` times and until ``seconds`` per workload have
passed (at most ``max_repeats``). A request is one call of the shared ranking code
(:func:`~hatllm_edge.ranking.candidates.score_candidates` or :func:`~hatllm_edge.ranking.search.beam_search`)
for a batch of users, so every backend runs the very same algorithm. Peak RSS is reset
before each backend loads (``/proc/self/clear_refs``), so each figure is that backend's own.
The targets are then timed again in a paired check (:func:`.timing.run_paired`): the machine's
speed drifts, and backends that take turns request by request drift together.

Histories are real: the last ``history`` items before each test target of MovieLens-100K;
candidates are the target plus seeded random catalog items. The prompt keeps every history
item given (the model's own ``max_history`` is lifted), so 20 items are 20 items.
"""
