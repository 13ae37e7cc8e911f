"""Threshold predictor: a regressor of the log completion length from the prompt.

The paper (Sec. 5.1) fine-tunes a transformer encoder to regress the log of the
model's own solution length; ``threshold_tokens = exp(predicted log length)``.
Submodules import torch / transformers / scikit-learn lazily where they can, so
``import clear_predictor`` itself stays cheap:

- :mod:`clear_predictor.data`      pools -> texts, log targets, groups
- :mod:`clear_predictor.model`     encoder + mean pooling + linear head; checkpoints
- :mod:`clear_predictor.train`     the training loop
- :mod:`clear_predictor.baselines` prompt-length and TF-IDF + Ridge baselines
- :mod:`clear_predictor.inference` :class:`ThresholdPredictor` for serving
- :mod:`clear_predictor.crossval`  grouped K-fold out-of-fold predictions
- :mod:`clear_predictor.metrics`   Spearman, Kendall, RMSE of log length
- :mod:`clear_predictor.features`  frozen mean-pooled encoder features
- :mod:`clear_predictor.head`      the shipped ridge head's file format (``heads/minilm_ridge.json``)
- :mod:`clear_predictor.head_fit`  fitting it out of fold, with its calibration
- :mod:`clear_predictor.head_predictor` serving it: prompts -> calibrated median, spread, runaway share
- :mod:`clear_predictor.cli`       ``predictor train|predict|crossval|evaluate|head``
"""
