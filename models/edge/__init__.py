"""The edge model: feature windows, training, and the model package loader and scorer.

:mod:`.features` cuts readings into windows, :mod:`.train` trains and exports the model
(needs scikit-learn and skl2onnx), :mod:`.package` loads and runs a model package. The edge
install imports only :mod:`.features` and :mod:`.package` (numpy and onnxruntime).
"""
