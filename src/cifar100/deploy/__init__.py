"""A trained model leaving the project: ONNX and safetensors, a model-hub folder and its
card, the one ``Classifier`` that loads any of them, and the demo page.
"""
