"""Stage 3: trained routers, measured against the oracle (paper section 3.3, DESIGN 4.3).

Modules (mirroring ``oracle/``): ``methods`` (the registry of training methods: one entry each, its
loss, what it learns from, its defaults), ``config`` (RouterConfig and its validation), ``store``
(router folders saved and loaded; routing specs resolved against a run), ``labels`` (the oracle's
per-token patterns as imitation labels), ``objectives`` (the trainer the training loop runs),
``value`` (on-policy targets, DAgger rounds), ``calibrate`` (budget calibration), ``evaluate``
(``eval.json``), ``command`` (``train_router`` and ``duollm router``). The ``Router`` itself is
part of the model (``model/policy.py``): every export carries it.

A ``Router`` holds one linear map per layer from the hidden state entering the FFN (the
``x_BTD`` a ``RoutingPolicy`` receives) to one logit per allowed route. It *is* a routing
policy: ``DuoModel.forward(idx, tgt, routes=router)``, ``per_token_loss``, the oracle's
frozen context and generation all call ``router(layer, x_BTD)``. Its ``mode`` says what it
returns:

    "hard"              route_BT = argmax of the logits (evaluation, inference; the default)
    "soft"              prob_BTR = softmax(beta * logits): the layer output is the
                        probability-weighted mix of the routes (the paper's training)
    "straight-through"  prob_BTR = one_hot(argmax) + p - p.detach(): hard routes forward,
                        gradients of the softmax backward

The training methods (``methods.METHODS``) share that module, one training loop (``train_loop``,
so checkpoints, resume, DDP and metrics come from there) and one evaluation. The built-in ones:

    budget            the paper's router (3.3): soft mix, beta annealed upward, language-model
                      cross-entropy + alpha * mean_B (mean_{L,T} P(big) - target)^2, LM frozen
    straight-through  the same loss, but the forward pass takes the hard routes the router will
                      take at evaluation; the budget term sees the realised (hard) fractions
    imitation         supervised: cross-entropy of each layer's logits against the oracle's
                      per-token best pattern at the matching budget k = round(target * L)
    value             cross-entropy against the route of least on-policy value (the best loss
                      reachable under exactly k bigs), in DAgger rounds (``value.py``)
    expected-cost     the expected regret of the router's choice under the same values

Imitation uses teacher forcing: the model is run with every token routed by its own oracle
pattern, and the router at layer l sees the hidden state that routing produces. Those are
exactly the states a perfect imitator meets at inference (each token follows its own
pattern; a token's state at layer l depends only on the routes of layers < l), so a
router that fits its labels reproduces the oracle's routes when run on its own.

Imitation has no budget term, and the oracle's labels are minority-big at most layers when
k < L/2, so its argmax alone misses the budget; one offset on the big logit, found by
bisection on training-split tokens (``calibrate_budget``, on by default for imitation),
brings the realised big fraction to the target.

The oracle's per-token table covers the evaluation tokens only, so imitation trains on
part of them: every ``holdout_every``-th sequence of the table is held out, and every
router's ``eval.json`` carries a ``heldout`` section (router, oracle@k and fixed@k on
those sequences) where the comparison is free of that leak.

Files: ``RUN/routers/<name>/`` holds ``router.safetensors``, ``router.yaml`` (the resolved
``RouterConfig`` and the router's shape), ``eval.json`` and, from the training loop,
``metrics.jsonl`` and the checkpoint ``step-*/`` + ``latest``.

Tensor name legend (the suffix carries the shape):
    B  batch of sequences     T  positions          D  model width
    L  layers                 R  routes (skip=0, small=1, big=2)
    O  the router's options (allowed routes, in route-code order)
    S  evaluation sequences   N  flattened tokens
"""

