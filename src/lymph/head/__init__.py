"""Stage two: MIL heads trained on the embedding store.

    registry.py  the poolings and model-directory estimators by name (torch-free)
    bags.py      padding, masks, length buckets, scalers
    pooling.py   attention, gated attention, mean, max, dsmil (masked)
    model.py     pooling + clinical features -> MLP -> logit
    train.py     the vectorised training loop, threshold rule
    base.py      TorchBagEstimator: what the torch estimators share (threads, scalers,
                 inner split, threshold); store helpers
    estimator.py MILClassifier (the scikit-learn style contract every model follows)
    evaluate.py  folds, metrics, cross-validation
    fit.py       `lymph fit-head`
    modeldir.py  the self-contained model directory
    predict.py   `lymph predict`
    bench.py     fit-head speed against one-bag-per-step training
    ensemble.py  the inner-CV ensemble of heads, trained as one vectorised network
    arrays.py    bags as plain arrays (``MILClassifier().fit(bags, y)``)

``from lymph.head import MILClassifier`` works (imported on first use: torch loads then).
"""

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "MILClassifier":
        from lymph.head.estimator import MILClassifier

        return MILClassifier
    raise AttributeError(f"module 'lymph.head' has no attribute {name!r}")
