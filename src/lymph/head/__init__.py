"""Stage two: MIL heads trained on the embedding store.

    bags.py      padding, masks, length buckets, scalers
    pooling.py   attention, gated attention, mean, max (masked)
    model.py     pooling + clinical features -> MLP -> logit
    train.py     the vectorised training loop, threshold rule
    estimator.py MILClassifier (the scikit-learn style contract every model follows)
    evaluate.py  folds, metrics, cross-validation
    fit.py       `lymph fit-head`
    modeldir.py  the self-contained model directory
    predict.py   `lymph predict`
    bench.py     fit-head speed against one-bag-per-step training
"""
