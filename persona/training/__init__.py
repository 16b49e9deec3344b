"""Training: an update of one adapter from interactions, its evaluation and its gate (docs/TRAINING.md).

``tokenize`` (interactions -> labelled token ids), ``batches`` (length-grouped padded tensors),
``evaluate`` (losses of weights and of stored versions), ``gate`` (the promotion decision),
``regularize`` (the L2/EWC pull and the Fisher), ``optimize`` (the training loop), ``supersede``
(replay rows that new data revises), ``trainer`` (the :class:`~.trainer.Trainer` running an update).
"""
