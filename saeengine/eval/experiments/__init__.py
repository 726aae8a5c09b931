"""The offline real-data experiments of the saev paper's protocol on EfficientNet-Lite0
(ImageNet weights) and the offline digits: classification and segmentation interventions
and the cross-style model comparison. Each returns a JSON-able dict of its numbers."""
